"""The readable summary of ``paramtransfer auto`` (``OUT/auto.md``, also printed) from ``auto.json`` alone."""

from __future__ import annotations

from typing import Any


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _curve(values: list[float | None]) -> str:
    return " ".join(_pct(v) for v in values) if values else "—"


def format_auto(report: dict[str, Any]) -> str:
    """Ranking (every score), the race rung by rung, the decision with its reasons, and the compute."""
    ranking, race, decision, compute = (
        report["ranking"],
        report["race"],
        report["decision"],
        report["compute"],
    )
    score = ranking["score"]
    names = list(ranking["candidates"][0]["scores"]) if ranking["candidates"] else []
    lines = [
        f"# auto: {report['target']}",
        "",
        f"## 1. Ranking of the candidate sources by {score} (target's training split, nothing trained)",
        "",
        "| place | candidate | arch | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for i, row in enumerate(ranking["candidates"], 1):
        cells = [f"**{row['scores'][s]:.4g}**" if s == score else f"{row['scores'][s]:.4g}" for s in names]
        lines.append(f"| {i} | {row['name']} | {row['arch']} | " + " | ".join(cells) + " |")
    lines += ["", f"Kept for the race: {', '.join(ranking['kept'])}."]
    if ranking["dropped_for_budget"]:
        lines.append(f"Dropped to fit the budget: {', '.join(ranking['dropped_for_budget'])}.")
    for name, skipped in ranking.get("skipped_methods", {}).items():
        for spec, why in skipped.items():
            lines.append(f"Not raced on {name}: {spec} ({why}).")
    lines += [
        "",
        f"## 2. Race: {race['configurations']} configurations, successive halving (eta = {race['eta']}, "
        f"short runs on seed {race['seed']}), validation accuracy in %",
        "",
    ]
    if not race["rungs"]:
        lines.append("One configuration: nothing to race.")
    for rung in race["rungs"]:
        lines += [
            f"### Rung {rung['rung']}: {len(rung['configs'])} configurations x {rung['epochs']} epochs"
            + (f" x {rung['seeds']} seeds (mean over the seeds)" if rung.get("seeds", 1) > 1 else "")
            + (f", {rung['keep']} go on" if rung["keep"] > 1 else ", the best wins"),
            "",
            "| place | configuration | val accuracy | val accuracy per epoch | |",
            "|---|---|---|---|---|",
        ]
        for c in rung["configs"]:
            mark = "kept" if c["survived"] else ("diverged" if c["status"] != "ok" else "")
            acc, curve = _pct(c["val_accuracy"]), _curve(c["val_curve"])
            lines.append(f"| {c['place']} | {c['name']} | {acc} | {curve} | {mark} |")
        lines.append("")
    final = decision.get("final", {})
    lr = "—" if decision["lr"] is None else f"{decision['lr']:g}"
    lines += [
        "## 3. Decision",
        "",
        f"**{decision['source']}**, **{decision['variant']}**, lr {lr}.",
        "",
        f"Why: {decision['source']} was place {decision['score_rank']} of {len(ranking['candidates'])} by "
        f"{score}; {race['winner']} "
        + (
            f"had the best validation accuracy in the last rung ({_last_rung_text(race)}; ties go to the "
            "lower validation loss, then the name)."
            if race["rungs"]
            else "was the only configuration."
        ),
    ]
    if final.get("status") == "ok":
        n = final.get("n_seeds", 1)
        lines.append(
            f"Trained fully ({report['config']['epochs']} epochs, {n} seed(s)): validation "
            f"{_pct(final['val_mean'])}, test {_pct(final['test_mean'])}"
            + (f" ± {100 * final['test_std']:.2f}" if n > 1 else "")
            + " (test accuracy is reported, never used to decide)."
        )
    elif final:
        lines.append("The full training of the winner diverged at every seed.")
    wall = compute["wall_time_s"]
    lines += [
        "",
        "## Compute",
        "",
        f"Training examples: {compute['used_examples']:,} of the exhaustive grid's "
        f"{compute['grid_examples']:,} "
        f"= {_ratio(compute['ratio'])} (planned at most {_ratio(compute['planned_ratio'])}, budget "
        f"{compute['budget']:g}); race {compute['race_examples']:,}, final {compute['final_examples']:,}.",
        f"Wall time: sources {wall['sources']:.1f} s, ranking {wall['ranking']:.1f} s (forward passes only), "
        f"race runs {wall['race_runs']:.1f} s, final runs {wall['final_runs']:.1f} s; this invocation "
        f"{wall['total']:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


def _ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _last_rung_text(race: dict[str, Any]) -> str:
    rung = race["rungs"][-1]
    best = rung["configs"][0]
    others = [c for c in rung["configs"][1:]]
    tail = ", ".join(f"{c['name']} {_pct(c['val_accuracy'])}" for c in others[:3])
    seeds = rung.get("seeds", 1)
    per = f" x {seeds} seeds, the mean" if seeds > 1 else ""
    return f"{_pct(best['val_accuracy'])}% after {rung['epochs']} epochs{per}" + (
        f"; next: {tail}" if tail else ""
    )
