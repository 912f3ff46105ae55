"""``paramtransfer rank``: rank candidate source models for a target (LPS similarity, LogME, LEEP, NCE,
H-score, shrinkage H-score, TransRate), optionally checked against brief fine-tuning."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from paramtransfer.cli.common import _check_out, _floats, _positive_int, _runtime_args


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "rank",
        help="rank candidate source models for a target: LPS similarity, LogME, LEEP, NCE, H-score, "
        "shrinkage H-score, TransRate",
        description="Score every candidate source on the target's labelled examples and write OUT/rank.json "
        "and OUT/rank.md. LPS (cosine similarity to a probe trained on the target, in a second-order "
        "network trained on a model set) needs a model set: the candidates' own (--sources DIR) or "
        "--lps-set DIR. With --verify every candidate is also fine-tuned briefly and each ranking is "
        "compared with the fine-tuned accuracy by the weighted Kendall tau.",
    )
    p.add_argument("--target", required=True, help="target task spec, e.g. 'fashion[3,7]' or digits")
    p.add_argument(
        "--sources",
        required=True,
        nargs="+",
        metavar="DIR|MODEL",
        help="a model set directory, or saved models",
    )
    p.add_argument(
        "--lps-set", default=None, metavar="DIR", help="model set to train LPS on (default: --sources)"
    )
    p.add_argument(
        "--shots", type=_positive_int, default=20, help="labelled target examples per class (default: 20)"
    )
    p.add_argument(
        "--lps-weights",
        type=_floats,
        default=None,
        metavar="W1,W2,...",
        help="Eq. 9's branch weights of the LPS network, one per layer (default: the paper's 1,0,...,0; "
        "on Fashion-MNIST pairs branch 2 alone, 0,1,0,0, classified tasks best: benchmarks/lps)",
    )
    p.add_argument(
        "--verify", action="store_true", help="fine-tune every candidate and report weighted Kendall tau"
    )
    p.add_argument(
        "--verify-epochs",
        type=_positive_int,
        default=10,
        help="fine-tuning epochs with --verify (default: 10)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the target split and of training (default: 0)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _runtime_args(p)
    p.add_argument("--out", default="runs/rank", help="output directory (default: runs/rank)")


def command(args: argparse.Namespace) -> None:
    from paramtransfer.selection.modelset import EvalConfig
    from paramtransfer.selection.rank import RankConfig, format_rank, rank_sources

    _check_out(args.out)
    config = RankConfig(
        shots=args.shots,
        seed=args.seed,
        verify_epochs=args.verify_epochs,
        lps=EvalConfig(lps_weights=args.lps_weights),
        **{k: v for k, v in (("device", args.device), ("precision", args.precision)) if v is not None},
        image_size=args.image_size,
    )
    report = rank_sources(
        args.target,
        args.sources,
        args.out,
        config=config,
        verify=args.verify,
        lps_set=args.lps_set,
        progress=not args.quiet,
    )
    print(format_rank(report))
    print(f"wrote {Path(args.out) / 'rank.json'} and rank.md")
