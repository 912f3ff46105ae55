"""``paramtransfer report``: rebuild a comparison's table and plots, or a benchmark report, from results
alone."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from paramtransfer.cli.common import _check_out


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="rebuild a comparison's table and plots, or a benchmark report, from results alone",
        description="Rebuild from results alone, never running anything. A compare/demo output "
        "(DIR/results.json or DIR/runs/**/result.json): table.md, ft_layers.png, learning_curves.png, and "
        "print the table. The table holds the runs listed in DIR/results.json; without it (or when it is "
        "damaged: a warning says so) it is rebuilt from DIR/runs/**/result.json, which must all be runs "
        "of one comparison: runs of different settings (a stale comparison in the same folder) are an "
        "error, never mixed into one table. A `paramtransfer bench` output (DIR/SUITE/NAME/results.json) "
        "or the benchmarks folder itself (DIR/SUITE/results/NAME/results.json and DIR/SUITE/paper.yaml): "
        "report.md, every setting next to the paper's numbers and claims, and figures/claims_SUITE.png; e.g. "
        "`paramtransfer report benchmarks`.",
    )
    p.add_argument("dir", help="a compare/demo output, a bench output, or the benchmarks folder")
    p.add_argument("--out", default=None, help="where to write (default: DIR)")
    p.add_argument(
        "--suites",
        default=None,
        metavar="DIR",
        help="with a bench output: the folder of the suites' YAMLs and paper.yaml files (default: the one "
        "the bench used, from DIR/bench.json, else the repository's benchmarks/)",
    )


def command(args: argparse.Namespace) -> None:
    from paramtransfer.bench.report import detect_layout, write_bench_report
    from paramtransfer.report import comparison_table, load_results, write_report

    d = Path(args.dir)
    _check_out(args.out if args.out is not None else (d if d.is_dir() else None))
    layout = None
    if not ((d / "results.json").is_file() or (d / "runs").is_dir()):
        layout = detect_layout(d, args.suites)
    if layout is not None:
        report = write_bench_report(layout, args.out)
        print(report.summary)
        print(f"wrote {report.path}")
        return
    summary = load_results(args.dir)
    written = write_report(summary, args.out or args.dir)
    print(comparison_table(summary))
    print("wrote " + ", ".join(str(p) for p in written.values()))
