"""The ``paramtransfer`` command: pretrain | run | compare | demo | bench | report | modelset | rank.

Bad input (unknown method or arch, class range outside the dataset, missing data, bad shots, a
malformed ``--set``, a source that does not fit) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
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

Task specs (--target; --source when it is not a saved model folder):
  fashion           Fashion-MNIST, all 10 classes (Debian's dataset-fashion-mnist, or $PARAMTRANSFER_DATA)
  fashion[0-4]      a range of its classes; fashion[0,3,7] a list of classes
  digits            scikit-learn's 8x8 handwritten digits, 10 classes; digits[5-9] a range of them
  folder:PATH       an image folder with one sub-folder per class (the sub-folder names are the classes)
  npz:PATH          a .npz file with arrays x (images: [N,H,W], [N,C,H,W] or [N,H,W,C]) and y (integer
                    labels), optionally x_test and y_test (else a fixed third of each class is the test set)
Environment:
  $PARAMTRANSFER_HOME   cache of pretrained sources (default ~/.cache/paramtransfer)
  $PARAMTRANSFER_DATA   a folder holding the Fashion-MNIST files *-idx?-ubyte.gz
                        (default /usr/share/datasets/fashion-mnist)
"""

COMPARE_OUT = """\
Output folder: --out holds one comparison. Running the same comparison again, or with more methods,
learning rates or seeds, reuses its finished runs; a comparison with other settings (target, shots,
source, architecture, epochs, --set train./data. values) is refused rather than mixed with the runs
already there: use another --out, or delete the folder. A damaged OUT/runs/**/result.json is an error
that names the file (delete it and re-run the command: that run alone is run again).
"""


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r} (none)")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r} (none)")
    return values


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
    from paramtransfer.experiments.compare import DATA_FIELDS, check_data_options
    from paramtransfer.methods.base import METHODS, parse_value
    from paramtransfer.train.trainer import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    data_fields = set(DATA_FIELDS)
    in_run = list(dict.fromkeys(method_names))
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
            check_data_options({name: value}, where="--set data")
            data[name] = value
        elif scope:
            cls = METHODS.get(scope)  # unknown method -> error listing the known ones
            if scope not in in_run:
                # METHOD.FIELD names one method exactly: l2sp.alpha is not dtnh:l2sp's alpha
                twins = [m for m in in_run if m.endswith(":" + scope)]
                other = f" (for {twins[0]} write --set {twins[0]}.{name}=...)" if twins else ""
                raise UserError(
                    f"--set {key}: {scope} is not among the methods of this run ({', '.join(in_run)})"
                    f"{other}; drop the --set or add the method"
                )
            options = [f.name for f in dataclasses.fields(cls.Config)]
            if name not in options:
                raise UserError(
                    f"--set {key}: method {scope!r} has no option {name!r}; its options: "
                    f"{', '.join(options) or 'none'}"
                )
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


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a bad flag value, an unknown flag) as one line, like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see `{self.prog} --help`")


def _explicit_flags(argv: Sequence[str] | None) -> set[str]:
    """The destinations of the flags given on the command line (parsed again with no defaults at all), so
    that a flag given with its default value still counts as given."""
    parser = build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        p._defaults.clear()  # set_defaults(...)
        for action in p._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return set(vars(parser.parse_args(argv)))


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
        help="source: a task spec to pretrain on (cached), e.g. fashion[0-4], digits, folder:PATH, npz:PATH; "
        "or a saved model directory, written as a path (with a /, or starting with . or ~, e.g. ./fashion, "
        "or a .safetensors file): a bare word is always a task spec (default: fashion[0-4])",
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
    parser = _Parser(
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


def _check_out(path: str | os.PathLike | None, flag: str = "--out") -> None:
    """Refuse, before anything loads or trains, an output folder that cannot be one: a regular file, a
    path under a regular file, or a folder this user cannot write to."""
    if path is None:
        return
    p = Path(path).expanduser()
    try:
        if p.exists() and not p.is_dir():
            raise UserError(f"{flag} {path} is a file, not a folder; give a folder as {flag}")
        q = p
        while not q.exists() and q.parent != q:  # the nearest existing folder is where it would be made
            q = q.parent
    except OSError as err:
        raise UserError(f"{flag} {path} cannot be used ({err.strerror}); give another {flag}") from None
    if not q.is_dir():
        raise UserError(f"{flag} {path} cannot be made: {q} is a file, not a folder; give another {flag}")
    if not os.access(q, os.W_OK | os.X_OK):
        raise UserError(
            f"{flag} {path}: the folder {q} is not writable; give another {flag} or fix its permissions"
        )


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
    :func:`paramtransfer.models.store.is_model_path`; a task spec never is one), else lenet."""
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
    _check_out(args.out)
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

    _check_out(args.out)
    args.arch = _effective_arch(args.source, args.arch)
    name = parse_method_spec(args.method)[0]
    train, data, per_method = parse_sets(args.set, [name])
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
    config.train = {**config.train, **train}
    config.data = {**config.data, **data}
    for name, opts in per_method.items():
        config.method_options[name] = {**config.method_options.get(name, {}), **opts}
    check_out_dir(config, args.out)
    summary = compare(config, args.out, progress=not args.quiet, executor=_open_executor(args))
    print(comparison_table(summary))
    print(f"wrote {args.out}/results.json, table.md and plots")


def _cmd_report(args: argparse.Namespace) -> None:
    from paramtransfer.report import comparison_table, load_results, write_report
    from paramtransfer.report.bench import detect_layout, write_bench_report

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


def _cmd_bench(args: argparse.Namespace) -> None:
    from paramtransfer.experiments.bench import SPEED, list_lines, run_bench, suites_root

    if args.list:
        print("\n".join(list_lines(suites_root(args.suites), args.out, args.name)))
        return
    if not args.name:
        raise UserError(
            "name a benchmark: a suite (e.g. ptu), SUITE/SETTING, all or speed; --list shows them"
        )
    _check_out(args.out)
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


def _cmd_rank(args: argparse.Namespace) -> None:
    from paramtransfer.selection.modelset import EvalConfig
    from paramtransfer.selection.rank import RankConfig, format_rank, rank_sources

    _check_out(args.out)
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
    """Run the command; bad input is one ``paramtransfer: error: ...`` line on stderr and exit code 2.

    A closed stdout (``paramtransfer compare ... | head -1``: the reader went away) is one error line and
    exit code 2 as well (the table of bad inputs expects 2), never a BrokenPipeError traceback.
    """
    try:
        try:
            code = _dispatch(argv)
        except SystemExit:  # --help: argparse prints, then exits 0
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # inside the try: a closed stdout shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        _drop_stdout()
        print(
            "paramtransfer: error: the output pipe was closed before the output was written (e.g. by "
            "`| head`); read the written files under --out, or send stdout to a file",
            file=sys.stderr,
        )
        return 2


def _drop_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured in tests)
        pass


def _dispatch(argv: Sequence[str] | None) -> int:
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
        args = build_parser().parse_args(argv)
        args._explicit = _explicit_flags(argv)
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
