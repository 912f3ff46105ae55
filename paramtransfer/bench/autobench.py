"""The ``auto`` kind of benchmark setting: ``paramtransfer auto`` against the exhaustive oracle (issue 18).

One setting is one target and its candidate sources (a YAML with ``kind: auto``, see ``benchmarks/auto/``).
Running it (resumably: every run is an ordinary run folder that a re-run reuses) does, in order:

1. **The oracle** (``OUT/oracle/<candidate folder>/``): for every candidate, a comparison
   (:func:`~paramtransfer.experiments.compare.compare`) of every method variant x learning rate x seed,
   ``epochs`` each; a method that cannot run on a candidate's architecture is skipped for that candidate
   (as auto skips it; the results say which and why). The oracle's choice is the (source, variant, lr) with
   the best mean validation accuracy over the seeds, ties to the lower mean validation loss, then the larger
   learning rate (the rule of :func:`paramtransfer.results.select`), then the source and variant that sort
   first; a learning rate at which any seed diverged is not eligible. Its test accuracy is the mean over the
   seeds at that configuration. Test accuracy never chooses.
2. **auto** (``OUT/auto/``, :func:`paramtransfer.selection.auto.auto`) with the same settings; its final
   training uses the same seeds, so its test accuracy is comparable to the oracle's.
3. **The ranking step alone**: the weighted Kendall tau
   (:func:`~paramtransfer.selection.candidates.ranking_agreement`) of each fast score's order of the
   sources (auto's ranking, on the first seed's training split) against the oracle's order of the sources:
   each source's best mean *validation* accuracy (``ranking_tau``, the honest order, as the oracle would
   choose) and the test accuracy at that configuration (``ranking_tau_test``).

Compute is counted as auto counts it: training examples (epochs actually trained x the target's training
set size; the ranking's forward passes are not training). The oracle's is every run of step 1, auto's its
race and final runs; ``compute_ratio`` = auto's / the oracle's. Wall time: the summed ``wall_time_s`` of
the runs (a reused run keeps the time it took when it ran), plus, for auto, the ranking's seconds.
``regret`` = the oracle's test accuracy minus auto's, in points.

**Sources and targets the bench builds** (besides every candidate string auto takes), written under
``OUT/data`` and ``OUT/sources`` the first time and reused after:

* ``{imagenet: {image_size: S}}``: EfficientNet-Lite0 with the ImageNet-1k weights, saved with an
  ``S`` x ``S`` input (its architecture pools globally, so only the recorded input size changes). auto's
  ``data.image_size`` applies to every candidate and a LeNet takes only 28 x 28, so this is how an ImageNet
  candidate runs at a CPU-friendly size beside LeNets. Shown as ``imagenet@S px``.
* ``{pretrained: {arch: A, images: SPEC, epochs: N}}``: ``A`` pretrained on ``SPEC`` for ``N`` epochs
  (seed ``source_seed``) and saved as a model folder, for a source task too small for the setting's
  ``source_epochs`` (3 epochs leave a LeNet on digits at 36 % validation accuracy, 40 give 98 %). Shown as
  ``A@SPEC (N ep)``.
* ``{shuffled_labels: {arch: A, images: SPEC, examples: N, seed: K}}``: the deliberately bad source, ``A``
  pretrained (like the other ``ARCH@SPEC`` candidates: ``source_epochs``, ``source_limit``) on ``N``
  training images of ``SPEC`` whose labels were permuted at random (seed ``K``, class balance kept): an
  ``npz`` task whose labels say nothing about the images. Shown as ``shuffled_labels:A@SPEC``.
* ``folder_target: {images: SPEC, per_class: N}`` (instead of ``target``): an image folder (one sub-folder
  of PNGs per class) holding the first ``N`` *test* images of each class of ``SPEC``, so that no zoo source
  pretrained on that dataset's training split has seen them; the target is ``folder:PATH``. Shown as
  ``folder<SPEC test images>``.

The goal of issue 18 (``goal:``, default regret <= 1 point at <= 20 % of the oracle's compute) becomes two
claims per setting (:func:`goal_claims`); the mean over the settings is the suite summary
(:func:`oracle_summary`, ``summary: {kind: auto_oracle, settings: [...]}`` in the suite's paper.yaml).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

from paramtransfer.bench.autosources import (
    build_folder_target,
    build_imagenet_copy,
    build_pretrained,
    build_shuffled_npz,
    check_built_source,
    check_folder_target,
)
from paramtransfer.bench.paper import AGREE, DISAGREE, ClaimResult, Side, claim_verdict
from paramtransfer.bench.suites import KINDS, Section, register_kind
from paramtransfer.errors import UserError
from paramtransfer.experiments.compare import check_methods, compare
from paramtransfer.experiments.executors import make_executor
from paramtransfer.methods.base import make_config
from paramtransfer.report.tables import label as variant_label
from paramtransfer.results import RunResult, best_val_loss
from paramtransfer.selection.autoconfig import AutoConfig, methods_for
from paramtransfer.selection.candidates import Candidate, load_candidate, ranking_agreement
from paramtransfer.selection.rank import FAST_SCORES
from paramtransfer.train.checkpoint import atomic_write_bytes, atomic_write_json

RESULTS = "results.json"
DEFAULT_GOAL = {"regret": 1.0, "compute_ratio": 0.2}


# ---- the setting -------------------------------------------------------------------------------------


@dataclasses.dataclass
class AutoBenchSetting:
    """A setting YAML without ``kind``: AutoConfig's fields (``sources`` may hold the bench-built forms of
    the module doc), ``folder_target`` instead of ``target`` if wanted, and ``goal``."""

    fields: dict[str, Any]
    sources: list[str | dict[str, Any]]
    folder_target: dict[str, Any] | None
    goal: dict[str, float]


def parse_setting(config: dict[str, Any]) -> AutoBenchSetting:
    """Check a setting before anything loads or trains; every problem is a UserError naming the fix."""
    config = dict(config)
    sources = config.pop("sources", None)
    if not isinstance(sources, list) or not sources:
        raise UserError(
            "sources: give the candidate sources as a list, e.g. [imagenet, lenet@fashion[0-4], lenet@digits]"
        )
    goal = {**DEFAULT_GOAL, **(config.pop("goal", None) or {})}
    if set(goal) != set(DEFAULT_GOAL) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in goal.values()
    ):
        raise UserError(f"goal: give positive numbers for regret and compute_ratio, e.g. {DEFAULT_GOAL}")
    folder = config.pop("folder_target", None)
    if folder is not None:
        if "target" in config:
            raise UserError("give either target or folder_target, not both")
        folder = check_folder_target(folder)
    plain = [s for s in sources if isinstance(s, str)]
    for s in sources:
        if not isinstance(s, str):
            check_built_source(s)
    # AutoConfig checks the rest (methods, lrs, budget, score, ...); the built sources do not exist yet,
    # so it sees the plain ones (or a stand-in) and a stand-in target for a folder to be written
    check = {**config, "sources": plain or ["imagenet"]}
    if folder is not None:
        check["target"] = folder["images"]
    ac: AutoConfig = make_config(AutoConfig, check, "benchmark setting")  # type: ignore[assignment,arg-type]
    check_methods(ac.compare_config(Candidate("x", "x", None), "lenet", ac.methods), None)  # names, options
    return AutoBenchSetting(config, sources, folder, {k: float(v) for k, v in goal.items()})


def prepare(setting: AutoBenchSetting, out: Path) -> tuple[AutoConfig, dict[str, str], str]:
    """The AutoConfig of a setting with its built sources and target in place (under ``out``), the
    readable label of each candidate name, and the target's label."""
    names, labels = [], {}
    for s in setting.sources:
        if isinstance(s, str):
            names.append(s)
            labels[s] = s
            continue
        kind, o = next(iter(s.items()))
        if kind == "imagenet":
            name = str(build_imagenet_copy(o["image_size"], out / "sources").resolve())
            labels[name] = f"imagenet@{o['image_size']}px"
        elif kind == "pretrained":
            seed = int(setting.fields.get("source_seed", AutoConfig.source_seed))
            name = str(build_pretrained(o["arch"], o["images"], o["epochs"], seed, out / "sources").resolve())
            labels[name] = f"{o['arch']}@{o['images']} ({o['epochs']} ep)"
        else:
            npz = build_shuffled_npz(o["images"], o["examples"], o["seed"], out / "data")
            name = f"{o['arch']}@npz:{npz.resolve()}"
            labels[name] = f"shuffled_labels:{o['arch']}@{o['images']}"
        names.append(name)
    fields = {**setting.fields, "sources": names}
    target_label = str(fields.get("target", "fashion[5-9]"))
    if setting.folder_target is not None:
        f = setting.folder_target
        folder = build_folder_target(f["images"], f["per_class"], out / "data")
        fields["target"] = f"folder:{folder.resolve()}"
        target_label = f"folder<{f['images']} test images>"
    config = make_config(AutoConfig, fields, "benchmark setting")  # type: ignore[arg-type]
    return config, labels, target_label  # type: ignore[return-value]


# ---- the oracle --------------------------------------------------------------------------------------


def oracle_configurations(source: str, runs: list[RunResult]) -> list[dict[str, Any]]:
    """One entry per (variant, lr) of a candidate's runs: mean validation accuracy, loss and test accuracy
    over the seeds, the epochs trained and the seconds; ``status`` diverged when any seed diverged."""
    groups: dict[tuple[str, Any], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.method, r.config.get("lr")), []).append(r)
    out = []
    for (variant, lr), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0.0)):
        rs = sorted(rs, key=lambda r: r.seed)
        entry: dict[str, Any] = {
            "source": source,
            "variant": variant,
            "lr": lr,
            "seeds": [r.seed for r in rs],
            "epochs": sum(len(r.history) for r in rs),
            "wall_time_s": sum(r.wall_time_s for r in rs),
            "status": "ok" if all(r.status == "ok" for r in rs) else "diverged",
        }
        if entry["status"] == "ok":
            tests = [r.test_accuracy for r in rs]
            entry.update(
                val=statistics.fmean(r.val_accuracy for r in rs),
                val_loss=statistics.fmean(best_val_loss(r) for r in rs),
                test=statistics.fmean(tests),
                test_std=statistics.stdev(tests) if len(tests) > 1 else 0.0,
            )
        out.append(entry)
    return out


def _key(e: dict[str, Any]) -> tuple[float, float, float]:
    return (e["val"], -e["val_loss"], e["lr"] if e["lr"] is not None else 0.0)


def oracle_choice(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """The best configuration on validation (module doc); ties to the source and variant sorting first."""
    ok = sorted((e for e in configs if e["status"] == "ok"), key=lambda e: (e["source"], e["variant"]))
    if not ok:
        raise UserError("every configuration of the oracle diverged; give smaller learning rates")
    return max(ok, key=_key)  # max keeps the first of equal keys


def _run_oracle(
    config: AutoConfig, cands: list[Candidate], sources: dict, root: Path, runner: Any, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    configs, skipped = [], {}
    for c in cands:
        methods, skipped[c.name] = methods_for(config, c, sources[c.name].arch)
        cfg = config.compare_config(c, sources[c.name].arch, methods)
        summary = compare(cfg, root / c.folder, source=sources[c.name], progress=progress, executor=runner)
        configs += oracle_configurations(c.name, [RunResult.from_dict(d) for d in summary["runs"]])
    return configs, skipped


# ---- the runner --------------------------------------------------------------------------------------


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def run_auto_bench(config: dict[str, Any], out: Path, executor: Any, progress: bool) -> dict[str, Any]:
    """The ``auto`` kind (module doc): writes and returns ``out/results.json``."""
    from paramtransfer.selection.auto import auto

    setting = parse_setting(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    auto_config, labels, target_label = prepare(setting, out)
    cands = auto_config.candidates()
    runner = make_executor(executor)
    a = auto_config
    kw = {"epochs": a.source_epochs, "seed": a.source_seed, "limit": a.source_limit, "progress": progress}
    sources = {c.name: load_candidate(c, **kw) for c in cands}
    configs, skipped = _run_oracle(auto_config, cands, sources, out / "oracle", runner, progress)
    report = auto(auto_config, out / "auto", progress=progress, executor=runner)

    n_train = int(report["train_examples"])
    best = oracle_choice(configs)
    per_source = {}  # a source that diverged everywhere has no place in the oracle's order
    for c in cands:
        ok = [e for e in configs if e["source"] == c.name and e["status"] == "ok"]
        if ok:
            per_source[c.name] = oracle_choice(ok)
    ranked = sorted((e for e in configs if e["status"] == "ok"), key=lambda e: (e["source"], e["variant"]))
    ranked.sort(key=_key, reverse=True)
    decision, compute = report["decision"], report["compute"]
    final = decision.get("final") or {}
    chosen = (decision["source"], decision["variant"], decision["lr"])
    mine = next((i for i, e in enumerate(ranked, 1) if (e["source"], e["variant"], e["lr"]) == chosen), None)
    oracle_examples = sum(e["epochs"] for e in configs) * n_train
    oracle_wall = sum(e["wall_time_s"] for e in configs)
    wall = compute["wall_time_s"]
    auto_wall = wall["ranking"] + wall["race_runs"] + wall["final_runs"]
    rows = [
        {"name": r["name"], "scores": {s: _finite(r["scores"].get(s)) for s in FAST_SCORES}}
        for r in report["ranking"]["candidates"]
    ]
    nan_rows = [
        {**r, "scores": {s: math.nan if v is None else v for s, v in r["scores"].items()}} for r in rows
    ]

    def name(n: str) -> str:
        return labels.get(n, n)

    def shown(e: dict[str, Any]) -> dict[str, Any]:
        return {**e, "source": name(e["source"])}

    auto_test = final.get("test_mean")
    summary = {
        "target": target_label,
        "goal": setting.goal,
        "settings": {
            k: v for k, v in dataclasses.asdict(auto_config).items() if k not in ("sources", "target")
        },
        "train_examples": n_train,
        "candidates": [
            {
                "name": name(c.name),
                "arch": sources[c.name].arch,
                "skipped_methods": skipped[c.name],
                "oracle_best": shown(per_source.get(c.name, {"source": c.name, "status": "diverged"})),
            }
            for c in cands
        ],
        "oracle": {
            **{k: best[k] for k in ("variant", "lr", "val", "test", "test_std")},
            "source": name(best["source"]),
            "configurations": len(configs),
            "runs": sum(len(e["seeds"]) for e in configs),
            "examples": oracle_examples,
            "wall_time_s": oracle_wall,
        },
        "auto": {
            "source": name(decision["source"]),
            "variant": decision["variant"],
            "lr": decision["lr"],
            "val": final.get("val_mean"),
            "test": auto_test,
            "test_std": final.get("test_std"),
            "n_seeds": final.get("n_seeds"),
            "score": report["ranking"]["score"],
            "score_rank": decision["score_rank"],
            "kept": [name(k) for k in report["ranking"]["kept"]],
            "race_configurations": report["race"]["configurations"],
            "rungs": [[len(r["configs"]), r["epochs"], r["seeds"]] for r in report["race"]["rungs"]],
            "oracle_val_rank": mine,  # place of auto's configuration in the oracle's validation order
            "examples": compute["used_examples"],
            "planned_ratio": compute["planned_ratio"],
            "wall_time_s": auto_wall,
        },
        "same_choice": chosen == (best["source"], best["variant"], best["lr"]),
        "regret": None if auto_test is None else 100 * (best["test"] - auto_test),
        "compute_ratio": compute["used_examples"] / oracle_examples if oracle_examples else None,
        "wall_time_ratio": auto_wall / oracle_wall if oracle_wall else None,
        "ranking": [{"name": name(r["name"]), "scores": r["scores"]} for r in rows],
        "ranking_tau": ranking_agreement(nan_rows, {n: e["val"] for n, e in per_source.items()}),
        "ranking_tau_test": ranking_agreement(nan_rows, {n: e["test"] for n, e in per_source.items()}),
        "oracle_grid": [shown(e) for e in configs],
    }
    atomic_write_json(out / RESULTS, summary)
    atomic_write_bytes(out / "table.md", (format_auto_bench(summary) + "\n").encode())
    import yaml

    setting_yaml = yaml.safe_dump({"kind": "auto", **config}, sort_keys=False)
    atomic_write_bytes(out / "config.yaml", setting_yaml.encode())
    return summary


# ---- report ------------------------------------------------------------------------------------------


def _rung_text(configs: int, epochs: int, seeds: int = 1) -> str:
    return f"{configs}x{epochs} epochs" + (f" x {seeds} seeds" if seeds > 1 else "")


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _lr(v: float | None) -> str:
    return "—" if v is None else f"{v:g}"


def _tau(v: float | None) -> str:
    return "—" if v is None else f"{v:+.3f}"


def format_auto_bench(summary: dict[str, Any]) -> str:
    """Markdown for one setting: oracle vs auto, regret and compute, tau per score, skipped methods."""
    o, a = summary["oracle"], summary["auto"]
    s = summary["settings"]
    lines = [
        f"Target {summary['target']}, {s.get('shots') or 'all'} shots per class, {len(s['seeds'])} seeds, "
        f"{s['epochs']} epochs; {len(summary['candidates'])} candidate sources, "
        f"{o['configurations']} configurations (source x variant x lr), {o['runs']} oracle runs. "
        f"auto: score {a['score']}, budget {s['budget']:g}, eta {s['eta']}, keep {s['keep']}.",
        "",
        "| | source | variant | lr | val % | test % (mean ± std) | training examples | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for who, e in (("oracle", o), ("auto", a)):
        test = "—" if e["test"] is None else f"{_pct(e['test'])} ± {_pct(e['test_std'])}"
        lines.append(
            f"| {who} | {e['source']} | {variant_label(e['variant'])} | {_lr(e['lr'])} | {_pct(e['val'])} | "
            f"{test} | {e['examples']:,} | {e['wall_time_s']:.0f} |"
        )
    regret = "—" if summary["regret"] is None else f"{summary['regret']:+.2f}"
    ratio = summary["compute_ratio"]
    wall = summary["wall_time_ratio"]
    lines += [
        "",
        f"**Regret** {regret} points (oracle − auto, test); **compute** {_pct(ratio)} % of the oracle's "
        f"training examples (planned {_pct(a['planned_ratio'])} % of the grid), wall time "
        f"{_pct(wall)} %. auto {'made the oracle' if summary['same_choice'] else 'did not make the oracle'}"
        f"'s choice; its configuration is place {a['oracle_val_rank'] or '—'} of {o['configurations']} "
        f"in the oracle's validation order. auto kept {', '.join(a['kept'])} (its source was place "
        f"{a['score_rank']} by {a['score']}) and raced {a['race_configurations']} configurations in rungs "
        + (", ".join(_rung_text(*r) for r in a["rungs"]) or "— (one configuration)")
        + ".",
        "",
        "Ranking step alone: weighted Kendall τ of each score's order of the sources against the oracle's "
        "(each source's best validation accuracy over the grid; and the test accuracy there).",
        "",
        "| score | τ vs oracle (val) | τ vs oracle (test) |",
        "|---|---|---|",
    ]
    for score, tau in summary["ranking_tau"].items():
        mark = " (auto's)" if score == a["score"] else ""
        lines.append(f"| {score}{mark} | {_tau(tau)} | {_tau(summary['ranking_tau_test'].get(score))} |")
    lines += ["", "| source | arch | oracle's best there | val % | test % |", "|---|---|---|---|---|"]
    for c in summary["candidates"]:
        b = c["oracle_best"]
        if "variant" not in b:
            lines.append(f"| {c['name']} | {c['arch']} | diverged at every configuration | — | — |")
            continue
        lines.append(
            f"| {c['name']} | {c['arch']} | {variant_label(b['variant'])}, lr {_lr(b['lr'])} | "
            f"{_pct(b.get('val'))} | {_pct(b.get('test'))} |"
        )
    for c in summary["candidates"]:
        for spec, why in c["skipped_methods"].items():
            lines.append(f"\nNot run on {c['name']} (by the oracle nor by auto): {spec} ({why}).")
    return "\n".join(lines)


def _side(text: str, value: float, std: float, n: int) -> Side:
    return Side(text, text, text, {"status": "ok", "test_mean": value, "test_std": std, "n_seeds": n})


def goal_claims(summary: dict[str, Any]) -> list[ClaimResult]:
    """Issue 18's goal on one target. Regret: "auto + goal points beats the oracle" under the bench's
    verdict rule (noise = the larger std over seeds; inconclusive within it). Compute: exact counts, so
    agree iff the ratio is at most the goal."""
    goal, o, a = summary["goal"], summary["oracle"], summary["auto"]
    claims = []
    n = min(len(summary["settings"]["seeds"]), a.get("n_seeds") or 0)
    if a["test"] is not None:
        g = goal["regret"] / 100
        better = _side(f"auto + {goal['regret']:g} point(s)", a["test"] + g, a["test_std"], n)
        worse = _side("the oracle", o["test"], o["test_std"], n)
        diff, noise = 100 * (a["test"] + g - o["test"]), 100 * max(a["test_std"], o["test_std"])
        claims.append(
            ClaimResult(
                f"auto's test accuracy is within {goal['regret']:g} point(s) of the exhaustive oracle's",
                claim_verdict(diff, noise, seeds=n),
                better,
                worse,
                paper="issue 18's goal",
                diff=diff,
                noise=noise,
            )
        )
    ratio = summary["compute_ratio"]
    if ratio is not None:
        limit = goal["compute_ratio"]
        claims.append(
            ClaimResult(
                f"auto spends at most {100 * limit:g} % of the oracle's training examples",
                AGREE if ratio <= limit else DISAGREE,
                _side(f"{100 * limit:g} % of the oracle", limit, 0.0, 1),
                _side("auto's share", ratio, 0.0, 1),
                paper="issue 18's goal (shares in %, not accuracies)",
                diff=100 * (limit - ratio),
                noise=0.0,
            )
        )
    return claims


def render_auto_bench(summary: dict[str, Any], paper: dict[str, Any] | None, results_dir: Path) -> Section:
    """The ``auto`` kind's report section (see :mod:`paramtransfer.bench.suites`)."""
    claims = goal_claims(summary)
    text = format_auto_bench(summary)
    if paper and paper.get("notes"):
        text += "\n\n" + str(paper["notes"]).strip()
    if claims:
        text += "\n\n**Goal**\n\n" + "\n".join(c.markdown() for c in claims)
    return Section(text, sorted(results_dir.glob("*.png")), claims)


def oracle_summary(results: dict[str, dict[str, Any]]) -> list[str]:
    """The cross-target table (one row per setting), the means against the goal, and the mean tau per
    score (the numbers that choose auto's default score)."""
    rows = [
        "| setting | target | oracle: source, variant, lr | test % | auto: source, variant, lr | test % | "
        "regret (points) | compute | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    regrets, ratios, taus = [], [], {}
    goal = DEFAULT_GOAL
    for setting, s in results.items():
        o, a = s["oracle"], s["auto"]
        goal = s.get("goal", goal)
        if s["regret"] is not None:
            regrets.append(s["regret"])
        if s["compute_ratio"] is not None:
            ratios.append(s["compute_ratio"])
        for score, tau in s["ranking_tau"].items():
            taus.setdefault(score, []).append(tau)
        regret = "—" if s["regret"] is None else f"{s['regret']:+.2f}"
        rows.append(
            f"| {setting} | {s['target']} | {o['source']}, {variant_label(o['variant'])}, {_lr(o['lr'])} | "
            f"{_pct(o['test'])} | {a['source']}, {variant_label(a['variant'])}, {_lr(a['lr'])} | "
            f"{_pct(a['test'])} | {regret} | "
            f"{_pct(s['compute_ratio'])} % | {_pct(s['wall_time_ratio'])} % |"
        )
    if not rows[2:]:
        return ["No setting of the suite has results yet."]
    mean_regret = statistics.fmean(regrets) if regrets else None
    mean_ratio = statistics.fmean(ratios) if ratios else None

    def met(value: float | None, limit: float) -> str:
        return "—" if value is None else ("**met**" if value <= limit else "**missed**")

    rows += [
        "",
        f"Over {len(results)} target(s): mean regret {'—' if mean_regret is None else f'{mean_regret:+.2f}'} "
        f"points (goal ≤ {goal['regret']:g}: {met(mean_regret, goal['regret'])}); mean compute "
        f"{_pct(mean_ratio)} % of the oracle's training examples (goal ≤ {100 * goal['compute_ratio']:g} %: "
        f"{met(mean_ratio, goal['compute_ratio'])}).",
        "",
        "| score | mean weighted τ vs the oracle's order of sources (val) | per setting |",
        "|---|---|---|",
    ]
    for score, values in taus.items():
        known = [v for v in values if v is not None]
        mean = statistics.fmean(known) if known else None
        rows.append(f"| {score} | {_tau(mean)} | {', '.join(_tau(v) for v in values)} |")
    return rows


if "auto" not in KINDS.names():  # a re-imported module must not register twice
    register_kind("auto", run_auto_bench, render_auto_bench)
