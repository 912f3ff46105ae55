"""The ``paramtransfer`` command: pretrain | run | compare | demo | bench | report | modelset | rank.

Bad input (unknown method or arch, class range outside the dataset, missing data, bad shots, a
malformed ``--set``, a source that does not fit) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paramtransfer.errors import UserError

EPILOG = """\
--set KEY=VALUE (repeatable) overrides a setting:
  train.FIELD=V     training: epochs, batch_size, optimizer (sgd|adam), momentum, weight_decay,
                    schedule (cosine|step|constant), patience, grad_clip, ...
  data.FIELD=V      data: val_shots (validation examples per class), test_limit
  METHOD.FIELD=V    a method's option, e.g. l2sp.alpha=0.1, knowdist.layers=[0,1], knn.ks=[1,5]
  FIELD=V           the training or method field of that name, e.g. batch_size=64 or alpha=0.1
Methods take options in brackets too: finetune[freeze=2], finetune[freeze=all] (every FT-l),
finetune[last_k=2], finetune[stochastic=true], l2sp[alpha=0.1,beta=0.01]. In compare, options
prefixed arch. run that variant on another architecture pretrained on the same source task, e.g.
finetune[arch.depth=38] (a ResNet-38 next to ResNet-20 methods).
"""


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def parse_sets(sets: Sequence[str], method_names: Sequence[str]) -> tuple[dict, dict, dict[str, dict]]:
    """Split ``--set`` items into training, data and per-method options (see ``EPILOG``)."""
    from paramtransfer.methods.base import METHODS, parse_value
    from paramtransfer.train.trainer import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    data_fields = {"val_shots", "test_limit"}
    train: dict[str, Any] = {}
    data: dict[str, Any] = {}
    per_method: dict[str, dict[str, Any]] = {}
    for item in sets:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key or not raw.strip():
            raise UserError(f"malformed --set {item!r}; write KEY=VALUE, e.g. --set train.batch_size=64")
        value = parse_value(raw.strip())
        scope, _, name = key.rpartition(".")
        if scope == "train":
            if name not in train_fields:
                raise UserError(
                    f"--set {key}: training has no field {name!r}; fields: {', '.join(sorted(train_fields))}"
                )
            train[name] = value
        elif scope == "data":
            if name not in data_fields:
                raise UserError(
                    f"--set {key}: data has no field {name!r}; fields: {', '.join(sorted(data_fields))}"
                )
            data[name] = value
        elif scope:
            METHODS.get(scope)  # unknown method -> error listing the known ones
            per_method.setdefault(scope, {})[name] = value
        elif name in train_fields:
            train[name] = value
        else:
            owners = [
                m for m in method_names if name in {f.name for f in dataclasses.fields(METHODS.get(m).Config)}
            ]
            if not owners:
                raise UserError(
                    f"--set {key}: no training field and no option of "
                    f"{', '.join(method_names) or 'the methods'} "
                    f"is called {name!r}; use train.FIELD, data.FIELD or METHOD.FIELD"
                )
            for m in owners:
                per_method.setdefault(m, {})[name] = value
    return train, data, per_method


def _common(p: argparse.ArgumentParser, *, out: str) -> None:
    p.add_argument("--out", default=out, help=f"output directory (default: {out})")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (see below)"
    )


def _executor_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help=f"where {what} run: local (in this process, one after another; the default) or ray (one Ray "
        "task each, in parallel; needs pip install 'paramtransfer[ray]')",
    )
    p.add_argument(
        "--address",
        default=None,
        help="with --executor ray: an existing Ray cluster (e.g. auto, or ray://HOST:10001) whose "
        "workers share this filesystem (default: start a local Ray with all CPUs)",
    )


def _open_executor(args: argparse.Namespace):
    from paramtransfer.experiments.executors import make_executor

    return make_executor(args.executor, args.address)


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arch",
        default=None,
        help="architecture: lenet, resnet20, mobilenet, rnn (default: a saved source's own, else lenet)",
    )
    p.add_argument(
        "--source",
        default="fashion[0-4]",
        help="source: a task spec to pretrain on (cached), or a saved model directory "
        "(default: fashion[0-4])",
    )
    p.add_argument(
        "--source-epochs", type=_positive_int, default=3, help="epochs to pretrain the source (default: 3)"
    )
    p.add_argument(
        "--source-limit", type=_positive_int, default=None, metavar="N", help="cap source training examples"
    )


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="fashion[5-9]", help="target task spec (default: fashion[5-9])")
    p.add_argument(
        "--shots", type=int, default=20, help="labelled training examples per class; 0 = all (default: 20)"
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=30, help="training epochs on the target (default: 30)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paramtransfer",
        description="Parameter-based deep transfer learning: transfer a source network to a small "
        "target task and compare strategies with the baselines.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
            epilog=EPILOG,
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
        p.set_defaults(_parser=p)

    p = sub.add_parser(
        "run",
        help="one method, one learning rate, one seed -> OUT/result.json",
        description="Transfer the source to the target with one method and write OUT/result.json; "
        "a run killed part-way resumes from its checkpoint when started again with the same --out.",
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

    p = sub.add_parser(
        "report",
        help="rebuild a comparison's table and plots, or a benchmark report, from results alone",
        description="Rebuild from results alone, never running anything. A compare/demo output "
        "(DIR/results.json or DIR/runs/**/result.json): table.md, ft_layers.png, learning_curves.png, and "
        "print the table. A `paramtransfer bench` output (DIR/SUITE/NAME/results.json) or the benchmarks "
        "folder itself (DIR/SUITE/results/NAME/results.json and DIR/SUITE/paper.yaml): report.md, every "
        "setting next to the paper's numbers and claims, and figures/claims_SUITE.png; e.g. "
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
    _add_bench_parser(sub)
    _add_modelset_parser(sub)
    _add_rank_parser(sub)
    return parser


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
setting's models are the runs Ray spreads); speed about 8 min. --executor ray spreads each setting's
runs over a cluster.

`paramtransfer report OUT` (or `paramtransfer report benchmarks`) rebuilds report.md from the results
alone, without running anything.
"""


def _add_bench_parser(sub: Any) -> None:
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_rank_parser(sub: Any) -> None:
    p = sub.add_parser(
        "rank",
        help="rank candidate source models for a target: LPS similarity, LogME, LEEP, NCE, H-score",
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
    p.add_argument("--out", default="runs/rank", help="output directory (default: runs/rank)")


MODELSET_EPILOG = """\
--set KEY=VALUE (repeatable):
  arch.FIELD=V      architecture option, e.g. arch.width=8 arch.hidden=64 (a small lenet)
  train.FIELD=V     training: batch_size (default 32), optimizer, momentum, weight_decay, schedule, ...
The set is resumable: run the same command again and finished models (listed in DIR/index.json) are
skipped; a larger --models-per-task or --max-tasks extends it.
"""


def _add_modelset_parser(sub: Any) -> None:
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


def _effective_arch(source: str, arch: str | None) -> str:
    """``--arch`` if given, else the architecture of a saved source, else lenet."""
    from paramtransfer.models.store import saved_arch

    return arch or saved_arch(source) or "lenet"


def _resolve_source(args: argparse.Namespace, method_specs: Sequence[str]):
    from paramtransfer.methods.base import METHODS, parse_method_spec
    from paramtransfer.models.store import resolve_source

    if not any(METHODS.get(parse_method_spec(s)[0]).needs_source for s in method_specs):
        return None
    return resolve_source(
        args.source,
        args.arch,
        epochs=args.source_epochs,
        seed=0,
        limit=args.source_limit,
        progress=not getattr(args, "quiet", False),
    )


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from paramtransfer.models.store import pretrain, save_model

    args.arch = args.arch or "lenet"
    model = pretrain(
        args.arch,
        args.source,
        epochs=args.source_epochs,
        seed=args.seed,
        limit=args.source_limit,
        lr=args.lr,
        force=args.force,
        progress=True,
    )
    info = model.source_info
    print(
        f"{args.arch} on {args.source}: val accuracy {100 * info['val_accuracy']:.2f}%, "
        f"test accuracy {100 * info['test_accuracy']:.2f}% ({info['wall_time_s']:.0f} s to train)"
    )
    if args.out:
        extra = {k: v for k, v in info.items() if k not in model.describe()}
        print(f"saved to {save_model(model, args.out, extra)}")


def _cmd_run(args: argparse.Namespace) -> None:
    from paramtransfer.experiments.run import train_model
    from paramtransfer.methods.base import check_method, parse_method_spec

    args.arch = _effective_arch(args.source, args.arch)
    name = parse_method_spec(args.method)[0]
    train, data, per_method = parse_sets(args.set, [name])
    check_method(args.method, args.arch, **per_method.get(name, {}))  # fails before any pretraining
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


def _cmd_compare(args: argparse.Namespace) -> None:
    from paramtransfer.experiments.compare import CompareConfig, compare, load_compare_config
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
        "source_epochs": args.source_epochs,
        "source_limit": args.source_limit,
    }
    if args.arch is None:
        del flags["arch"]
    if args.config:
        parser: argparse.ArgumentParser = args._parser
        dests = {"lrs": "lr", "methods": "methods", "shots": "shots"}
        explicit = {
            k: v
            for k, v in flags.items()
            if getattr(args, dests.get(k, k)) != parser.get_default(dests.get(k, k))
            or (k == "seeds" and args.seed is not None)
        }
        config = load_compare_config(args.config, **explicit)
    else:
        config = CompareConfig(**flags)
    if args.arch is None and saved_arch(config.source) is not None:
        config.arch = saved_arch(config.source)  # a saved source brings its own architecture
    names = [parse_method_spec(m)[0] for m in config.methods]
    train, data, per_method = parse_sets(args.set, names)
    config.train = {**config.train, **train}
    config.data = {**config.data, **data}
    for name, opts in per_method.items():
        config.method_options[name] = {**config.method_options.get(name, {}), **opts}
    summary = compare(config, args.out, progress=not args.quiet, executor=_open_executor(args))
    print(comparison_table(summary))
    print(f"wrote {args.out}/results.json, table.md and plots")


def _cmd_report(args: argparse.Namespace) -> None:
    from paramtransfer.report import comparison_table, load_results, write_report
    from paramtransfer.report.bench import detect_layout, write_bench_report

    d = Path(args.dir)
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


def _cmd_bench(args: argparse.Namespace) -> None:
    from paramtransfer.experiments.bench import SPEED, list_lines, run_bench, suites_root

    if args.list:
        print("\n".join(list_lines(suites_root(args.suites), args.out, args.name)))
        return
    if not args.name:
        raise UserError(
            "name a benchmark: a suite (e.g. ptu), SUITE/SETTING, all or speed; --list shows them"
        )
    executor = None if args.name == SPEED else _open_executor(args)
    report = run_bench(
        args.name,
        out=args.out,
        suites=args.suites,
        record=args.record,
        executor=executor,
        progress=not args.quiet,
    )
    print(report.summary)
    print(f"wrote {report.path}")


def _cmd_modelset(args: argparse.Namespace) -> None:
    from paramtransfer.selection.modelset import (
        build_modelset,
        evaluate_modelset,
        format_summary,
        parse_build_sets,
    )

    if args.modelset_command == "build":
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


def _cmd_rank(args: argparse.Namespace) -> None:
    from paramtransfer.selection.modelset import EvalConfig
    from paramtransfer.selection.rank import RankConfig, format_rank, rank_sources

    config = RankConfig(
        shots=args.shots,
        seed=args.seed,
        verify_epochs=args.verify_epochs,
        lps=EvalConfig(lps_weights=args.lps_weights),
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "pretrain": _cmd_pretrain,
        "run": _cmd_run,
        "compare": _cmd_compare,
        "demo": _cmd_compare,
        "report": _cmd_report,
        "bench": _cmd_bench,
        "modelset": _cmd_modelset,
        "rank": _cmd_rank,
    }
    try:
        import paramtransfer  # noqa: F401  (registers methods)

        handlers[args.command](args)
    except UserError as err:
        print(f"paramtransfer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paramtransfer: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
