"""``paramtransfer bench``: run the benchmark suites and write report.md next to the papers' numbers."""

from __future__ import annotations

import argparse
from typing import Any

from paramtransfer.cli.common import _check_out, _executor_args, _open_executor
from paramtransfer.errors import UserError

BENCH_DESCRIPTION = """\
Run the benchmark suites (YAML settings under benchmarks/) and write one report that puts every table
next to the paper's numbers and says which of the paper's claims our results agree with.

NAME is a suite (a folder of --suites: ptu, dtnh, spottune, ...), one setting (ptu/s1_lenet_20shots: the
file benchmarks/ptu/s1_lenet_20shots.yaml), all (every setting of every suite), or speed (each method's
step time, evaluation time and memory next to fine-tuning; not part of all, run it on an idle machine).

Layout:
  OUT/SUITE/NAME/    results.json, table.md, config.yaml and plots of one setting (as compare writes them)
  OUT/speed/         results.json of bench speed
  OUT/report.md      every setting's table beside the paper's numbers, the claims with a verdict
                     (agree / disagree / inconclusive), and the figures; OUT/figures/claims_SUITE.png
  --record also copies each setting's results.json, table.md, config.yaml and PNGs to
  SUITES/SUITE/results/NAME/ (speed: SUITES/speed/results.json) and rebuilds SUITES/report.md.

Finished runs are reused: an interrupted bench continues where it stopped, and a finished setting only
rebuilds its table and plots. Times on 2 CPU cores (the suites' READMEs): ptu about 1.7 h, dtnh about
1.3 h, spottune about 2.5 h (ResNet-20 and a ResNet-38 source), lps about 1 h (450 models; an lps
setting's models are the runs Ray spreads); speed about 13 min (8 with --no-imagenet, which skips its
EfficientNet-Lite0 rows). --executor ray spreads each setting's runs over a cluster.

`paramtransfer report OUT` (or `paramtransfer report benchmarks`) rebuilds report.md from the results
alone, without running anything.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="run the benchmark suites and write report.md next to the papers' numbers",
        description=BENCH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="a suite, SUITE/SETTING, all, or speed")
    p.add_argument("--out", default="runs/bench", help="output directory (default: runs/bench)")
    p.add_argument(
        "--suites",
        default=None,
        metavar="DIR",
        help="the folder of the suites (default: the repository's benchmarks/)",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="also copy the results into SUITES/SUITE/results/NAME/ and rebuild SUITES/report.md",
    )
    p.add_argument(
        "--list", action="store_true", help="list the suites and settings (recorded? in OUT?) and exit"
    )
    _executor_args(p, "runs")
    p.add_argument(
        "--no-imagenet",
        action="store_true",
        help="bench speed only: skip its EfficientNet-Lite0 rows (64 px: the trainer's overhead, FT-l with "
        "the cached prefix and the linear probe next to FT-0, a streamed folder; about 5 minutes)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def command(args: argparse.Namespace) -> None:
    from paramtransfer.bench.runner import SPEED, list_lines, run_bench, suites_root

    if args.list:
        print("\n".join(list_lines(suites_root(args.suites), args.out, args.name)))
        return
    if not args.name:
        raise UserError(
            "name a benchmark: a suite (e.g. ptu), SUITE/SETTING, all or speed; --list shows them"
        )
    if args.no_imagenet and args.name != SPEED:
        raise UserError("--no-imagenet belongs to `paramtransfer bench speed`; drop it for other benchmarks")
    _check_out(args.out)
    executor = None if args.name == SPEED else _open_executor(args)
    report = run_bench(
        args.name,
        out=args.out,
        suites=args.suites,
        record=args.record,
        executor=executor,
        progress=not args.quiet,
        imagenet=not args.no_imagenet,
    )
    print(report.summary)
    print(f"wrote {report.path}")
