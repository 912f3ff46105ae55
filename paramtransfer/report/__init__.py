"""Tables and plots from comparison results; ``write_report`` rebuilds them from results alone.

Reads results (:mod:`paramtransfer.results`) and never runs anything. May import: errors, registry,
data, models, methods, train.checkpoint, results. Benchmark reports are :mod:`paramtransfer.bench.report`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from paramtransfer.errors import UserError, warn_user
from paramtransfer.report.plots import (
    plot_dtnh,
    plot_ft_layers,
    plot_learning_curves,
    plot_ptu_gates,
    plot_spottune,
)
from paramtransfer.report.tables import comparison_table, label
from paramtransfer.results import (
    RunResult,
    read_result,
    result_problem,
    run_settings,
    select,
    settings_difference,
)
from paramtransfer.train.checkpoint import atomic_write_bytes

__all__ = ["comparison_table", "label", "load_results", "write_report"]


def write_report(summary: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write ``table.md`` and the plots the results support (FT-l, curves, PTU gates, DTNH, SpotTune)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"table": out / "table.md"}
    atomic_write_bytes(written["table"], comparison_table(summary).encode())
    plots = (
        ("ft_layers", plot_ft_layers),
        ("learning_curves", plot_learning_curves),
        ("ptu_gates", plot_ptu_gates),
        ("dtnh", plot_dtnh),
        ("spottune", plot_spottune),
    )
    for name, fn in plots:
        p = fn(summary, out / f"{name}.png")
        if p is not None:
            written[name] = p
    return written


def load_results(directory: str | Path) -> dict[str, Any]:
    """The comparison in ``directory``: its ``results.json``, or rebuilt from ``runs/**/result.json``.

    A damaged ``results.json`` (invalid JSON, another shape) is rebuilt from the run files with a warning,
    or, without run files, is an error naming it. Run files of different settings (another target,
    shots, source, epochs, ...: a stale comparison in the same folder) are never mixed into one table:
    rebuilding from them is an error that names two that differ.
    """
    d = Path(directory)
    summary_file = d / "results.json"
    files = sorted(d.glob("runs/**/result.json"))
    if summary_file.is_file():
        try:
            summary, runs = _read_summary(summary_file)
        except UserError as err:
            if not files:
                raise
            problem = str(err).removesuffix("; delete it and re-run the command")
            warn_user(
                f"{problem}; the table is rebuilt from the {len(files)} run files under {d / 'runs'} instead "
                "(re-run the comparison to rewrite it)"
            )
        else:
            summary["selected"] = select(runs)
            return summary
    if not files:
        raise UserError(
            f"no results.json or runs/**/result.json under {d}; run `paramtransfer compare --out {d}`"
        )
    runs = [read_result(f) for f in files]
    first = run_settings(runs[0])
    for f, r in zip(files[1:], runs[1:]):
        diff = settings_difference(first, run_settings(r))
        if diff is not None:
            key, a, b = diff
            raise UserError(
                f"{d / 'runs'} mixes runs of different settings ({key} {a} in {files[0].relative_to(d)}, "
                f"{b} in {f.relative_to(d)}); delete the stale runs (or use another --out for each "
                "comparison) before `paramtransfer report`"
            )
    first_run = runs[0]
    config = {
        "source": first_run.source,
        "target": first_run.target,
        "arch": first_run.arch,
        "shots": first_run.config.get("shots"),
        "seeds": sorted({r.seed for r in runs}),
        "lrs": sorted({r.config["lr"] for r in runs if _is_lr(r.config.get("lr"))}, reverse=True),
    }
    summary = {"config": config, "runs": [r.to_dict() for r in runs]}
    summary["selected"] = select(runs)
    return summary


def _is_lr(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_summary(path: Path) -> tuple[dict[str, Any], list]:
    """``results.json`` and its runs; a file that is not one is a :class:`UserError` naming it."""
    cure = "delete it and re-run the command"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path} is not a readable results file ({first}); {cure}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("runs"), list):
        raise UserError(f"{path} is not a comparison's results file (no list of 'runs'); {cure}")
    if not isinstance(summary.get("config", {}), dict):
        raise UserError(f"{path} is not a comparison's results file ('config' is not a mapping); {cure}")
    for i, r in enumerate(summary["runs"]):
        why = result_problem(r)
        if why:
            raise UserError(f"{path} is not a comparison's results file (run {i}: {why}); {cure}")
    return summary, [RunResult.from_dict(r) for r in summary["runs"]]
