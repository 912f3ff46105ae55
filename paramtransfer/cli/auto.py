"""``paramtransfer auto``: rank candidate sources by a fast score, race source x method x learning rate by
successive halving on validation, train the winner fully (:mod:`paramtransfer.selection.auto`)."""

from __future__ import annotations

import argparse
from typing import Any

from paramtransfer.cli.common import (
    EPILOG,
    _check_out,
    _common,
    _executor_args,
    _floats,
    _ints,
    _open_executor,
    _positive_int,
    _target_args,
    apply_runtime_args,
    parse_sets,
)

AUTO_HELP = """\
Candidates (--sources, comma-separated): ARCH@SPEC (the zoo's ARCH pretrained on SPEC and cached, e.g.
lenet@fashion[0-4]), a saved model path (./models/src), imagenet (EfficientNet-Lite0), or
torchvision:ARCH@WEIGHTS_FILE. They may differ in architecture.
Compute is counted in training examples; --budget is the fraction of the exhaustive grid (every candidate
x method variant x learning rate x seed, --epochs each) that auto may spend, the winner's full training
included. Rungs shorter than --epochs train on the first of --seeds; past --epochs a rung adds seeds and
scores the mean over them; full runs are never trained twice (the winner's final training reuses them).
Running the same command again (e.g. after a kill) reuses every finished run; an --out that
holds an auto run with other settings is refused: use another --out, or delete the folder.
"""


def add_parser(sub: Any) -> None:
    from paramtransfer.selection.autoconfig import (
        DEFAULT_BUDGET,
        DEFAULT_ETA,
        DEFAULT_KEEP,
        DEFAULT_METHODS,
        DEFAULT_SCORE,
    )
    from paramtransfer.selection.rank import FAST_SCORES

    help_text = "pick the source and the strategy: rank sources, race configurations, train the winner"
    p = sub.add_parser(
        "auto",
        help=help_text,
        description="Rank the candidate sources by a fast score on the target's training split, keep the "
        "best, race (source x method x learning rate) by successive halving on the validation split, and "
        "train the winner fully. Writes OUT/auto.json, OUT/auto.md and OUT/final (a comparison of the "
        "winner: results.json, table.md), and prints the ranking, the race, the decision and the compute.",
        epilog=AUTO_HELP + "\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _target_args(p)
    p.add_argument("--sources", default="", help="candidate sources, comma-separated (see below)")
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated method specs (default: {DEFAULT_METHODS})",
    )
    p.add_argument(
        "--lr", type=_floats, default=[0.1, 0.01, 0.001], help="learning rates (default: 0.1,0.01,0.001)"
    )
    p.add_argument(
        "--seeds", type=_ints, default=[0], help="seeds of the final training; the race uses the first"
    )
    p.add_argument("--seed", type=int, default=None, help="a single seed (shorthand for --seeds N)")
    p.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET,
        help="fraction of the exhaustive grid's training examples to spend, in (0, 1] "
        f"(default: {DEFAULT_BUDGET})",
    )
    p.add_argument(
        "--eta", type=int, default=DEFAULT_ETA, help=f"keep the best 1/eta per rung (default: {DEFAULT_ETA})"
    )
    p.add_argument(
        "--keep", type=int, default=DEFAULT_KEEP, help=f"sources kept for the race (default: {DEFAULT_KEEP})"
    )
    p.add_argument(
        "--score",
        default=DEFAULT_SCORE,
        help=f"ranking score: {', '.join(FAST_SCORES)} (default: {DEFAULT_SCORE})",
    )
    p.add_argument(
        "--source-epochs",
        type=_positive_int,
        default=3,
        help="epochs to pretrain ARCH@SPEC sources (default: 3)",
    )
    p.add_argument(
        "--source-limit", type=_positive_int, default=None, metavar="N", help="cap source training examples"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _executor_args(p, "the race's and the final training's runs")
    _common(p, out="runs/auto")


def command(args: argparse.Namespace) -> None:
    from paramtransfer.methods.base import parse_method_spec, split_method_list
    from paramtransfer.report.auto import format_auto
    from paramtransfer.selection.auto import AutoConfig, auto, check_out_dir
    from paramtransfer.selection.candidates import split_sources

    _check_out(args.out)
    methods = split_method_list(args.methods)
    train, data, per_method = parse_sets(args.set, [parse_method_spec(m)[0] for m in methods])
    apply_runtime_args(args, train, data)
    config = AutoConfig(
        target=args.target,
        sources=split_sources(args.sources),
        shots=args.shots or None,
        methods=methods,
        lrs=args.lr,
        seeds=[args.seed] if args.seed is not None else args.seeds,
        epochs=args.epochs,
        budget=args.budget,
        eta=args.eta,
        keep=args.keep,
        score=args.score,
        source_epochs=args.source_epochs,
        source_limit=args.source_limit,
        train=train,
        data=data,
        method_options=per_method,
    )
    check_out_dir(config, args.out)
    report = auto(config, args.out, progress=not args.quiet, executor=_open_executor(args))
    print(format_auto(report), end="")
    print(f"wrote {args.out}/auto.json, auto.md and final/ (results.json, table.md)")
