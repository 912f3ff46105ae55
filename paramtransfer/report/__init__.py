"""Tables and plots from comparison results; ``write_report`` rebuilds them from results alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from paramtransfer.errors import UserError
from paramtransfer.report.plots import (
    plot_dtnh,
    plot_ft_layers,
    plot_learning_curves,
    plot_ptu_gates,
    plot_spottune,
)
from paramtransfer.report.tables import comparison_table, label
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
    """The comparison in ``directory``: its ``results.json``, or rebuilt from ``runs/**/result.json``."""
    from paramtransfer.experiments.compare import select
    from paramtransfer.experiments.run import RunResult

    d = Path(directory)
    if (d / "results.json").is_file():
        summary = json.loads((d / "results.json").read_text())
        runs = [RunResult.from_dict(r) for r in summary["runs"]]
    else:
        files = sorted(d.glob("runs/**/result.json"))
        if not files:
            raise UserError(
                f"no results.json or runs/**/result.json under {d}; run `paramtransfer compare --out {d}`"
            )
        runs = [RunResult.load(f) for f in files]
        first = runs[0]
        config = {
            "source": first.source,
            "target": first.target,
            "arch": first.arch,
            "shots": first.config.get("shots"),
            "seeds": sorted({r.seed for r in runs}),
        }
        summary = {"config": config, "runs": [r.to_dict() for r in runs]}
    summary["selected"] = select(runs)
    return summary
