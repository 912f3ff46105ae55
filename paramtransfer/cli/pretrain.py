"""``paramtransfer pretrain``: train a source model once and cache it."""

from __future__ import annotations

import argparse
from typing import Any

from paramtransfer.cli.common import _check_out, _check_source_weights, _source_args


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train a source model once and cache it",
        description="Train ARCH on the source task and cache it under $PARAMTRANSFER_HOME (default "
        "~/.cache/paramtransfer); a second call with the same settings loads the cached model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _source_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the source training (default: 0)")
    p.add_argument("--lr", type=float, default=0.02, help="source learning rate (default: 0.02)")
    p.add_argument("--force", action="store_true", help="retrain even if a cached model exists")
    p.add_argument("--out", default=None, help="also save a copy of the model here")


def command(args: argparse.Namespace) -> None:
    from paramtransfer.experiments.pretrain import pretrain
    from paramtransfer.models.store import save_model, saved_arch

    _check_out(args.out)
    _check_source_weights(args)
    args.arch = args.arch or saved_arch(args.source) or "lenet"  # torchvision:ARCH brings ARCH
    model = pretrain(
        args.arch,
        args.source,
        epochs=args.source_epochs,
        seed=args.seed,
        limit=args.source_limit,
        lr=args.lr,
        force=args.force,
        progress=True,
        weights=args.source_weights,
    )
    info = model.source_info
    if "val_accuracy" in info:
        print(
            f"{args.arch} on {args.source}: val accuracy {100 * info['val_accuracy']:.2f}%, "
            f"test accuracy {100 * info['test_accuracy']:.2f}% ({info['wall_time_s']:.0f} s to train)"
        )
    else:  # fixed weights (--source imagenet, torchvision:ARCH): nothing was trained
        print(f"{args.arch} with {args.source} weights, stored as a source")
    if args.out:
        extra = {k: v for k, v in info.items() if k not in model.describe()}
        print(f"saved to {save_model(model, args.out, extra)}")
