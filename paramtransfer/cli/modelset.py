"""``paramtransfer modelset build|eval``: build an LPS model set (many small models per task) and evaluate
LPS and its baselines on it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from paramtransfer.cli.common import (
    _check_out,
    _common,
    _executor_args,
    _floats,
    _open_executor,
    _positive_int,
)

MODELSET_EPILOG = """\
--set KEY=VALUE (repeatable):
  arch.FIELD=V      architecture option, e.g. arch.width=8 arch.hidden=64 (a small lenet)
  train.FIELD=V     training: batch_size (default 32), optimizer, momentum, weight_decay, schedule, ...
The set is resumable: run the same command again and finished models (listed in DIR/index.json) are
skipped; a larger --models-per-task or --max-tasks extends it.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "modelset",
        help="build a model set (many small models per task) and evaluate LPS on it",
        description="LPS model sets (Wang et al., Sec. 5): `build` trains M models on every pair of "
        "classes of a dataset; `eval` trains the second-order network on their weights and reports task "
        "classification, retrieval, transferability, per-branch accuracy and the alignment ablation.",
    )
    actions = p.add_subparsers(dest="modelset_command", required=True, metavar="ACTION")
    b = actions.add_parser(
        "build",
        help="train M models per task and write DIR/index.json",
        description="Train --models-per-task models (each with its own seed) from scratch on every pair of\n"
        "classes of --dataset (45 two-class tasks, as ModelSet500 in LPS Sec. 5) and save them under\n"
        "OUT/models/<task>/<seed>/; OUT/index.json lists the finished ones.",
        epilog=MODELSET_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument(
        "--dataset", required=True, metavar="fashion|digits", help="dataset whose classes form the tasks"
    )
    b.add_argument("--tasks", default="pairs", help="task layout: pairs (every pair of classes; the default)")
    b.add_argument(
        "--max-tasks", type=_positive_int, default=None, metavar="N", help="only the first N tasks"
    )
    b.add_argument(
        "--models-per-task", type=_positive_int, default=10, metavar="M", help="models per task (default: 10)"
    )
    b.add_argument("--arch", default="lenet", help="architecture of every model (default: lenet)")
    b.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="epochs per model (default: 3 for fashion, 20 for digits)",
    )
    b.add_argument("--lr", type=float, default=0.02, help="learning rate (default: 0.02)")
    b.add_argument(
        "--shots", type=_positive_int, default=None, help="training examples per class (default: all)"
    )
    b.add_argument(
        "--limit", type=_positive_int, default=None, metavar="N", help="cap training examples per model"
    )
    b.add_argument(
        "--seed", type=int, default=0, help="data split seed and base of the model seeds (default: 0)"
    )
    _executor_args(b, "models train")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(b, out="runs/modelset")

    e = actions.add_parser(
        "eval",
        help="evaluate LPS and its baselines on a model set -> OUT/eval.json",
        description="Train second-order networks on the weights of a model set and write OUT/eval.json: "
        "task classification (Sec. 5.1) and retrieval (5.2) for LPS, random prediction, FlatFC and "
        "FrobeniusFC; transferability (5.3); top-1 per branch (5.4); the alignment ablation (5.5). Prints "
        "a summary table. On 45 x 6 lenets the defaults take ~20 min on one core, 2/3 of it in branches "
        "and alignment; --sections classification,retrieval,transferability takes ~7 min.",
    )
    e.add_argument("dir", help="a model set directory (from `paramtransfer modelset build`)")
    e.add_argument("--out", default=None, help="where to write eval.json (default: DIR)")
    e.add_argument(
        "--epochs", type=_positive_int, default=20, help="epochs per second-order network (default: 20)"
    )
    e.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    e.add_argument(
        "--batch-size", type=_positive_int, default=8, help="models per step (default: 8; the paper: 1)"
    )
    e.add_argument("--embed-dim", type=_positive_int, default=64, help="embedding size (default: 64)")
    e.add_argument(
        "--filters", type=_positive_int, default=8, help="second-order filters per layer (default: 8)"
    )
    e.add_argument(
        "--ari-images",
        type=_positive_int,
        default=500,
        help="test images per task for k-means (default: 500)",
    )
    e.add_argument(
        "--sections",
        default="classification,retrieval,transferability,branches,alignment",
        help="comma-separated sections to run (default: all five)",
    )
    e.add_argument(
        "--lps-weights",
        type=_floats,
        default=None,
        metavar="W1,W2,...",
        help="Eq. 9's branch weights w_l of LPS in classification, retrieval and transferability, one per "
        "layer (default: the paper's 1,0,...,0)",
    )
    e.add_argument(
        "--methods",
        default="flat_fc,frobenius_fc,lps",
        help="second-order methods to train (default: flat_fc,frobenius_fc,lps; random is always shown)",
    )
    e.add_argument("--seed", type=int, default=0, help="seed of splits, networks and k-means (default: 0)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")


def command(args: argparse.Namespace) -> None:
    from paramtransfer.bench.modelset import evaluate_modelset, format_summary
    from paramtransfer.selection.modelset import build_modelset, parse_build_sets

    if args.modelset_command == "build":
        _check_out(args.out)
        arch_kwargs, train_options = parse_build_sets(args.set)
        entries = build_modelset(
            args.dataset,
            args.out,
            tasks=args.tasks,
            models_per_task=args.models_per_task,
            arch=args.arch,
            epochs=args.epochs,
            max_tasks=args.max_tasks,
            shots=args.shots,
            limit=args.limit,
            lr=args.lr,
            seed=args.seed,
            arch_kwargs=arch_kwargs,
            train_options=train_options,
            progress=not args.quiet,
            executor=_open_executor(args),
        )
        accuracies = [e["test_accuracy"] for e in entries]
        print(
            f"{len(entries)} models on {len({e['task'] for e in entries})} tasks, mean test accuracy "
            f"{100 * sum(accuracies) / len(accuracies):.2f}%"
        )
        print(f"wrote {Path(args.out) / 'index.json'}")
        return
    _check_out(args.out if args.out is not None else (args.dir if Path(args.dir).is_dir() else None))
    report = evaluate_modelset(
        args.dir,
        out=args.out,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        embed_dim=args.embed_dim,
        filters=args.filters,
        seed=args.seed,
        ari_images=args.ari_images,
        sections=[s.strip() for s in args.sections.split(",") if s.strip()],
        lps_weights=args.lps_weights,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        progress=not args.quiet,
    )
    print(format_summary(report))
    print(f"wrote {Path(args.out or args.dir) / 'eval.json'}")
