"""The ``compare`` kind of benchmark setting: the YAML is a :class:`CompareConfig`; its report section
is one row per method variant next to the paper's numbers, then the paper's claims judged on ours."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from paramtransfer.bench.paper import (
    BEST_FTL,
    evaluate_claims,
    paper_map,
    paper_values,
    resolve_side,
    show_paper_value,
    side_paper,
)
from paramtransfer.bench.suites import Section, register_kind
from paramtransfer.errors import UserError
from paramtransfer.experiments.compare import CompareConfig, compare
from paramtransfer.methods.base import make_config, parse_method_spec
from paramtransfer.report.tables import best_ft, corrected_base, ft_level, label, pct, row_order
from paramtransfer.train.checkpoint import atomic_write_json

_NUMBERS = re.compile(r"(\d+(?:\.\d+)?)")


def _pm(entry: dict[str, Any]) -> str:
    return f"{pct(entry['test_mean'], entry['test_std'], entry.get('n_seeds'))} ({entry.get('n_seeds', '?')})"


def _describe(cfg: dict[str, Any]) -> str:
    seeds, epochs = cfg.get("seeds") or [], cfg.get("epochs")
    lrs = ", ".join(f"{lr:g}" for lr in cfg.get("lrs") or [])
    return (
        f"{cfg.get('source')} → {cfg.get('target')}, {cfg.get('arch')}, "
        f"{cfg.get('shots') or 'all'} shots per class, {len(seeds)} seed{'s' if len(seeds) != 1 else ''}, "
        f"{epochs} epoch{'s' if epochs != 1 else ''}; learning rate chosen on validation from {{{lrs}}}"
    )


def _diffs(a: list[float | None], b: list[float | None]) -> str:
    return " / ".join("—" if x is None or y is None else f"{x - y:+.2f}" for x, y in zip(a, b))


def render_compare(summary: dict[str, Any], paper: dict[str, Any] | None, results_dir: Path) -> Section:
    """A compare setting: one row per method variant (ours, selected lr, the paper's number, Δ to the
    fine-tuning reference, ours and the paper's), the paper rows with no counterpart, then the claims."""
    paper = paper or {}
    selected: dict[str, dict[str, Any]] = summary.get("selected") or {}
    scale = paper.get("scale", "percent")
    mapping = paper_map(paper, selected)
    ref = resolve_side(paper.get("reference", "finetune"), selected)
    ref_paper = side_paper(ref, mapping)
    with_paper = bool(paper.get("numbers"))
    out = []
    if paper.get("mirrors"):
        out.append(f"Paper: {paper['mirrors']}.")
    out.append(f"Ours: {_describe(summary.get('config') or {})}.")
    scores = summary.get("source_scores") or {}
    if scores:
        shown = ", ".join(f"{n} {v['mean']:.3f} ± {v['std']:.3f}" for n, v in scores.items())
        out.append(
            f"Transferability of the source on the target's training split (per seed, mean ± std): {shown}."
        )
    out.append("")
    columns = paper.get("columns")
    head = ["method variant", "ours: test % (mean ± std, seeds)", "selected lr"]
    if ref.ok:
        head.append(f"Δ vs {ref.label}, ours")
    if with_paper:
        head[3:3] = [f"paper % ({' / '.join(columns)})" if columns else "paper %"]
        head.append(f"Δ vs {ref_paper['row']}, paper" if ref_paper else "Δ vs fine-tuning, paper")
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [(v, selected[v]) for v in sorted(selected, key=_row_key)]
    best = best_ft(selected)
    if best is not None and sum(ft_level(v) is not None for v in selected) > 1:
        rows.append((BEST_FTL, best[1]))
    ref_mean = ref.entry["test_mean"] if ref.ok and ref.entry is not None else None
    for key, entry in rows:
        name = f"**best FT-l** = {label(best[0])}" if key == BEST_FTL and best else label(key)
        ok = entry.get("status") == "ok"
        is_ref = key == ref.spec or (ref.variant is not None and key == ref.variant)
        cells = [
            name,
            _pm(entry) if ok else "diverged at every lr",
            "—" if entry.get("lr") is None else f"{entry['lr']:g}",
        ]
        if ref_mean is not None:
            delta = f"{100 * (entry['test_mean'] - ref_mean):+.2f}" if ok else "—"
            cells.append("ref." if is_ref else delta)
        if with_paper:
            row = mapping.get(key)
            cells.insert(3, f"{show_paper_value(row['value'], scale)} ({row['row']})" if row else "—")
            if row and is_ref:
                cells.append("ref.")
            elif row and ref_paper:
                cells.append(
                    _diffs(paper_values(row["value"], scale), paper_values(ref_paper["value"], scale))
                )
            else:
                cells.append("—")
        out.append("| " + " | ".join(cells) + " |")
    unmatched = [
        r for r in paper.get("numbers") or [] if not any(_present(s, selected) for s in _as_list(r["ours"]))
    ]
    if unmatched:
        shown = ", ".join(f"{r['row']} {show_paper_value(r['value'], scale)}" for r in unmatched)
        out += ["", f"Paper rows with no counterpart in our results: {shown}."]
    if paper.get("notes"):
        out += ["", str(paper["notes"]).strip()]
    claims = evaluate_claims(paper, selected)
    if not paper:
        out += ["", "No paper numbers or claims for this setting (no entry in the suite's paper.yaml)."]
    elif not claims:
        out += ["", "No claim of the paper is tested by this setting."]
    else:
        out += ["", "**Claims**", "", *(c.markdown() for c in claims)]
    return Section("\n".join(out), sorted(results_dir.glob("*.png")), claims)


def _natural(text: str) -> tuple:
    """``l2sp[alpha=0.01]`` < ``l2sp[alpha=0.1]`` < ``l2sp[alpha=1]``: numbers compared as numbers."""
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(_NUMBERS.split(text)))


def _row_key(variant: str) -> tuple:
    """Baselines, FT-l by l, other fine-tuning, then the rest; a method's variants by strength, each
    ``dtnh:`` variant right after the one it corrects (its plain form before its other options)."""
    group = row_order(variant)
    base = corrected_base(variant)
    try:
        name = parse_method_spec(variant)[0]
    except Exception:  # a variant recorded by an older version that no longer parses
        name = variant
    if group[0] >= 2 and row_order(name)[0] == 0:  # knn[features=raw] next to knn
        group = row_order(name)
    return (
        group[0],
        group[1],
        _natural(label(base or variant)),
        base is not None,
        variant.count(","),
        _natural(label(variant)),
    )


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _present(spec: Any, selected: dict[str, dict[str, Any]]) -> bool:
    return resolve_side(str(spec), selected).entry is not None


def source_scores(cfg: CompareConfig, names: list[str]) -> dict[str, Any]:
    """Transferability scores (``names`` of :data:`~paramtransfer.selection.rank.SCORE_NAMES` but lps) of
    the comparison's source on each seed's target training split, with their mean and std."""
    import statistics

    from paramtransfer.experiments.compare import resolve_source
    from paramtransfer.experiments.run import runtime_of, target_task
    from paramtransfer.selection.rank import fast_scores

    src = resolve_source(
        cfg.source,
        cfg.arch,
        epochs=cfg.source_epochs,
        seed=cfg.source_seed,
        limit=cfg.source_limit,
        weights=cfg.source_weights,
    )
    data = {k: v for k, v in cfg.data.items() if k in ("val_shots", "test_limit", "image_size", "memory_mb")}
    per_seed: dict[str, list[float]] = {n: [] for n in names}
    for seed in cfg.seeds:
        task = target_task(cfg.target, src, cfg.shots, seed, data)
        values = fast_scores(src, task, runtime_of(cfg.train))
        for n in names:
            per_seed[n].append(values[n])
    return {
        n: {
            "per_seed": v,
            "mean": statistics.fmean(v),
            "std": statistics.stdev(v) if len(v) > 1 else 0.0,
        }
        for n, v in per_seed.items()
    }


def run_compare_setting(config: dict[str, Any], out: Path, executor: Any, progress: bool) -> dict[str, Any]:
    """The ``compare`` kind: the YAML is a CompareConfig, plus an optional ``scores: [logme, leep, ...]``
    (transferability scores of the source on each seed's target training split, written into
    ``results.json`` as ``source_scores``); finished runs are reused by compare itself."""
    from paramtransfer.selection.rank import FAST_SCORES

    config = dict(config)
    names = config.pop("scores", None) or []
    if not isinstance(names, list) or any(n not in FAST_SCORES for n in names):
        raise UserError(
            f"benchmark setting: scores must be a list of {', '.join(FAST_SCORES)} (got {names!r})"
        )
    cfg = make_config(CompareConfig, config, "benchmark setting")  # type: ignore[arg-type]
    summary = compare(cfg, out, executor=executor, progress=progress)  # type: ignore[arg-type]
    if names:
        summary["source_scores"] = source_scores(cfg, names)
        atomic_write_json(Path(out) / "results.json", summary)
    return summary


register_kind("compare", run_compare_setting, render_compare)
