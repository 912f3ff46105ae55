"""What two or more subcommands share: the source/target/output/executor flags, the ``--set`` text and its
parser, the flag value parsers, and the output-folder check.

As in every module of this package, library modules are imported inside the functions that use them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paramtransfer.errors import UserError

EPILOG = """\
--set KEY=VALUE (repeatable) overrides a setting:
  train.FIELD=V     training: epochs, batch_size, optimizer (sgd|adam), momentum, weight_decay,
                    schedule (cosine|step|constant), patience, grad_clip, ...
  data.FIELD=V      data: val_shots (validation examples per class), test_limit, image_size,
                    memory_mb (MiB of decoded images held in memory, default 2048; a larger image
                    folder is read from disk batch by batch)
  train.augment=true  train on random-resized crops + horizontal flips (the ImageNet recipe; off
                    by default, as for 28x28 sources)
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
  $PARAMTRANSFER_DEVICE the device --device auto stands for (default: CUDA if present, else MPS, else CPU)
"""


def _number_list(text: str, kind: type, what: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r} (none)")
    return values


def _floats(text: str) -> list[float]:
    return _number_list(text, float, "numbers")


def _ints(text: str) -> list[int]:
    return _number_list(text, int, "integers")


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
        help="architecture: lenet, resnet20, mobilenet, rnn, efficientnet_lite0 or torchvision's (resnet18, "
        "mobilenet_v2, efficientnet_b0, ...) (default: a saved or torchvision source's own, else lenet)",
    )
    p.add_argument(
        "--source",
        default="fashion[0-4]",
        help="source: a task spec to pretrain on (cached), e.g. fashion[0-4], digits, folder:PATH, npz:PATH; "
        "or a saved model directory, written as a path (with a /, or starting with . or ~, e.g. ./fashion, "
        "or a .safetensors file): a bare word is always a task spec; or imagenet (EfficientNet-Lite0's "
        "shipped weights), or torchvision:ARCH with --source-weights PATH (default: fashion[0-4])",
    )
    p.add_argument(
        "--source-weights",
        default=None,
        metavar="PATH",
        help="with --source torchvision:ARCH (ARCH: resnet18/34/50/101, mobilenet_v2, mobilenet_v3_small, "
        "mobilenet_v3_large, efficientnet_b0..b3): a torchvision state_dict file of ARCH (.pth, .pt or "
        ".safetensors), e.g. ~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth; read as tensors only, "
        "converted once into the source cache",
    )
    p.add_argument(
        "--source-epochs", type=_positive_int, default=3, help="epochs to pretrain the source (default: 3)"
    )
    p.add_argument(
        "--source-limit", type=_positive_int, default=None, metavar="N", help="cap source training examples"
    )


def _check_source_weights(args: argparse.Namespace) -> None:
    """Refuse ``--source-weights`` without ``--source torchvision:ARCH`` before anything loads or trains
    (a method that needs no source would otherwise ignore it)."""
    from paramtransfer.models.store import is_torchvision_source

    if getattr(args, "source_weights", None) is not None and not is_torchvision_source(args.source):
        raise UserError(
            f"--source-weights goes with --source torchvision:ARCH, not with --source {args.source}; drop "
            "--source-weights or give --source torchvision:ARCH"
        )


def _target_args(p: argparse.ArgumentParser) -> None:
    _runtime_args(p)
    p.add_argument("--target", default="fashion[5-9]", help="target task spec (default: fashion[5-9])")
    p.add_argument(
        "--shots", type=int, default=20, help="labelled training examples per class; 0 = all (default: 20)"
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=30, help="training epochs on the target (default: 30)"
    )


def _device(text: str) -> str:
    from paramtransfer.runtime import check_device_name

    try:
        return check_device_name(text)
    except UserError as err:  # argparse's own wording would hide the cure
        raise argparse.ArgumentTypeError(str(err)) from None


def _runtime_args(p: argparse.ArgumentParser, *, image_size: bool = True) -> None:
    """``--device``, ``--precision`` and (for commands that train on a target) ``--image-size``."""
    p.add_argument(
        "--device",
        type=_device,
        default=None,
        help="where networks run: auto (CUDA if present, else MPS, else CPU; the default), cpu, cuda, "
        "cuda:N or mps; a device this machine lacks is an error",
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=["32", "bf16", "16"],
        help="32 (float32, the default), bf16 or 16 (autocast; 16 scales the loss with a GradScaler)",
    )
    if image_size:
        p.add_argument(
            "--image-size",
            type=_positive_int,
            default=None,
            metavar="N",
            help="resize every image to NxN for the network (default: the source's input size: 28 for "
            "the zoo's sources, 224 for imagenet; 64 keeps an ImageNet source fast on a CPU)",
        )


def check_runtime(train: dict[str, Any]) -> None:
    """Refuse, before any source is pretrained or data loads, a device this machine lacks or a
    precision it cannot run (``train``: the training settings, e.g. from --set or a YAML)."""
    from paramtransfer.experiments.run import runtime_of

    runtime_of(train)


def apply_runtime_args(args: argparse.Namespace, train: dict[str, Any], data: dict[str, Any]) -> None:
    """The flags of :func:`_runtime_args` into the training and data settings (flags win over --set);
    then :func:`check_runtime`."""
    if getattr(args, "device", None) is not None:
        train["device"] = args.device
    if getattr(args, "precision", None) is not None:
        train["precision"] = args.precision
    if getattr(args, "image_size", None) is not None:
        data["image_size"] = args.image_size
        from paramtransfer.experiments.compare import check_data_options

        check_data_options({"image_size": args.image_size})
    check_runtime(train)


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
