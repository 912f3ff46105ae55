"""``paramtransfer run``: one method, one learning rate, one seed -> OUT/result.json."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paramtransfer.cli.common import (
    EPILOG,
    _check_out,
    _check_source_weights,
    _common,
    _source_args,
    _target_args,
    apply_runtime_args,
    parse_sets,
)
from paramtransfer.errors import UserError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="one method, one learning rate, one seed -> OUT/result.json",
        description="Transfer the source to the target with one method and write OUT/result.json; "
        "a run killed part-way resumes from its checkpoint when started again with the same --out, and a "
        "finished one is reused. An --out holding the finished result of another run (another method, "
        "target, seed, lr, shots, epochs or --set values) is refused, never overwritten: use another "
        "--out or delete it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _source_args(p)
    _target_args(p)
    p.add_argument(
        "--method", default="finetune", help="method spec, e.g. finetune[freeze=1] (default: finetune)"
    )
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (default: 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument(
        "--save-model",
        action="store_true",
        help="also save the trained model under OUT/model (a zoo net that --source loads again; any "
        "other model, e.g. spottune's, as state_dict.safetensors for the same module)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(p, out="runs/run")


def _check_run_out(args: argparse.Namespace, train: dict, data: dict, method_options: dict) -> None:
    """Refuse an ``--out`` holding the finished result of another run (it would be overwritten). The same
    run finds its result (reused) or its checkpoint (resumed), as before."""
    from paramtransfer.experiments.compare import canonical, normal_spec, read_result
    from paramtransfer.experiments.run import RESULT
    from paramtransfer.methods.base import make_config, make_method
    from paramtransfer.train.trainer import TrainConfig

    path = Path(args.out) / RESULT
    if not path.is_file():
        return
    old = read_result(path)  # a damaged file: one line naming it and the cure
    m = make_method(args.method, **method_options)
    here: dict[str, Any] = {
        "method": m.variant(),
        "target": normal_spec(args.target),
        "seed": args.seed,
        "lr": args.lr if m.trains else None,
        "epochs": args.epochs if m.trains else None,
        "shots": args.shots or None,
    }
    there: dict[str, Any] = {
        "method": old.method,
        "target": old.target,
        "seed": old.seed,
        **{k: old.config.get(k) for k in ("lr", "epochs", "shots")},
    }
    if old.arch not in ("custom", "wrapped", "none"):
        here["arch"], there["arch"] = args.arch, old.arch
    sub = {"method": dataclasses.asdict(m.config), "data": {"val_shots": None, "test_limit": None, **data}}
    if m.trains:
        cfg = make_config(TrainConfig, {"epochs": args.epochs, "lr": args.lr, **train}, "training")
        sub["train"] = dataclasses.asdict(cfg)
    for group, values in sub.items():
        found = old.config.get(group)
        if isinstance(found, dict):
            for k, v in values.items():
                if k in found:
                    here[f"{group}.{k}"], there[f"{group}.{k}"] = v, found[k]
    here, there = canonical(here), canonical(there)
    diffs = [k for k in here if here[k] != there.get(k)]
    if diffs:
        k = diffs[0]
        raise UserError(
            f"--out {args.out} holds the finished result of another run ({old.method} on {old.target}, seed "
            f"{old.seed}; {k} {there.get(k)} there, {here[k]} here); use another --out or delete {args.out}"
        )


def _effective_arch(source: str, arch: str | None) -> str:
    """``--arch`` if given, else the architecture of a saved source (a path, see
    :func:`paramtransfer.models.store.is_model_path`; a task spec never is one) or of a source
    ``torchvision:ARCH``, else lenet."""
    from paramtransfer.models.store import saved_arch

    return arch or saved_arch(source) or "lenet"


def _resolve_source(args: argparse.Namespace, method_specs: Sequence[str]):
    from paramtransfer.experiments.pretrain import resolve_source
    from paramtransfer.methods.base import METHODS, parse_method_spec

    if not any(METHODS.get(parse_method_spec(s)[0]).needs_source for s in method_specs):
        return None
    return resolve_source(
        args.source,
        args.arch,
        epochs=args.source_epochs,
        seed=0,
        limit=args.source_limit,
        progress=not getattr(args, "quiet", False),
        weights=args.source_weights,
    )


def command(args: argparse.Namespace) -> None:
    from paramtransfer.experiments.run import train_model
    from paramtransfer.methods.base import check_method, parse_method_spec

    _check_out(args.out)
    _check_source_weights(args)
    args.arch = _effective_arch(args.source, args.arch)
    name = parse_method_spec(args.method)[0]
    train, data, per_method = parse_sets(args.set, [name])
    apply_runtime_args(args, train, data)
    check_method(args.method, args.arch, **per_method.get(name, {}))  # fails before any pretraining
    _check_run_out(args, train, data, per_method.get(name, {}))
    source = _resolve_source(args, [args.method])
    result, _ = train_model(
        args.method,
        source=source,
        target=args.target,
        arch=args.arch,
        seed=args.seed,
        lr=args.lr,
        epochs=args.epochs,
        shots=args.shots or None,
        val_shots=data.get("val_shots"),
        test_limit=data.get("test_limit"),
        image_size=data.get("image_size"),
        memory_mb=data.get("memory_mb"),
        train_options=train,
        method_options=per_method.get(name, {}),
        out=args.out,
        save_weights=args.save_model,
        progress=not args.quiet,
    )
    if result.status != "ok":
        print(f"{result.method}: diverged (non-finite loss) at lr={args.lr}; try a smaller --lr")
    else:
        print(
            f"{result.method} {result.source} → {result.target} ({result.arch}, seed {result.seed}): "
            f"val {100 * result.val_accuracy:.2f}%, test {100 * result.test_accuracy:.2f}% "
            f"in {result.wall_time_s:.1f} s"
        )
    print(f"wrote {Path(args.out) / 'result.json'}")
