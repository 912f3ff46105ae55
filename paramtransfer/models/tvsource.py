"""The source ``torchvision:ARCH``: a torchvision state_dict file the user has (e.g.
``~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth``), as the zoo's ``ARCH``.

Nothing is downloaded and torchvision is not needed. The file is read as tensors only: a ``.pth``/``.pt``
with ``torch.load(weights_only=True)`` (never unpickling code), or a ``.safetensors``. It may hold the
state_dict itself or wrap it as ``{"state_dict": ...}`` or ``{"model": ...}``. The keys are renamed by
:func:`paramtransfer.models.tvmodels.convert_torchvision` and checked against the architecture; the
number of classes is the checkpoint's (its task layer's rows), and a 1000-class checkpoint is named with
the ImageNet-1k class names (:mod:`paramtransfer.models.classnames`).

The converted net is kept in the source store, keyed by the architecture and the sha256 of the file
(``$PARAMTRANSFER_HOME/sources/ARCH-torchvision-<hash>/``, safetensors + meta.json, written under a
lock), so a second use reads the stored copy and only hashes the file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from paramtransfer.errors import UserError
from paramtransfer.models.classnames import NUM_IMAGENET_CLASSES, imagenet_classes
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.store import (
    META,
    TORCHVISION_PREFIX,
    WEIGHTS,
    home,
    load_model,
    save_model,
    source_key,
)
from paramtransfer.models.tvmodels import (
    TORCHVISION_ARCHS,
    convert_torchvision,
    native_size,
    stem_key,
)
from paramtransfer.train.checkpoint import hold_lock, remove_stale_temps

TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
WRAPPERS = ("state_dict", "model")  # {"state_dict": {...}} (Lightning, many scripts), {"model": {...}}
EXAMPLE = "~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth"


def check_arch(arch: str) -> None:
    """Refuse an architecture that is not one of torchvision's in the zoo, listing those."""
    if arch not in TORCHVISION_ARCHS:
        raise UserError(
            f"unknown torchvision arch {arch!r} in {TORCHVISION_PREFIX}{arch}; known: "
            + ", ".join(TORCHVISION_ARCHS)
        )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _weights_path(weights: str | os.PathLike | None, arch: str) -> Path:
    if weights is None or not str(weights).strip():
        raise UserError(
            f"the source {TORCHVISION_PREFIX}{arch} needs its weights file: give --source-weights PATH "
            f"(in Python weights=PATH), a torchvision state_dict such as {EXAMPLE}"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise UserError(f"the weights file {weights} {what}; give the path of a torchvision state_dict file")
    if path.suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise UserError(
            f"the weights file {weights} is neither .pth/.pt (torch.save) nor .safetensors; give a "
            "torchvision state_dict in one of those formats"
        )
    return path


def _first_line(err: BaseException) -> str:
    """``Type: first sentence of the message`` (terminal colour codes removed, at most 150 characters)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(err).__name__}: {first}"[:150] if first else type(err).__name__


def _needs_code(err: BaseException) -> str:
    """What a ``weights_only`` load refused, e.g. ``the class torch.nn.modules.linear.Linear``."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return f"it needs {found.group(1)}" if found else _first_line(err)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict file (``.pth``/``.pt`` read with ``weights_only=True``, or
    ``.safetensors``), unwrapped from ``{"state_dict": ...}`` or ``{"model": ...}``.

    Raises:
        UserError: the file is damaged, needs pickled code to load, or holds no dict of named tensors.
    """
    p = Path(path)
    if p.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as err:  # the parser's own error types: the bytes are not safetensors
            raise UserError(
                f"the weights file {path} is not a readable safetensors file ({_first_line(err)}); "
                "download or save it again"
            ) from None
    try:
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"the weights file {path} holds more than tensors: loading it would run pickled code "
            f"({_needs_code(err)}); save the state_dict alone (torch.save(model.state_dict(), PATH)) "
            "or as .safetensors"
        ) from None
    except Exception as err:  # a truncated or foreign file: zip, pickle and storage errors of every kind
        raise UserError(
            f"the weights file {path} is damaged or not a torch file ({_first_line(err)}); download or "
            "save it again"
        ) from None
    if isinstance(obj, dict):
        for key in WRAPPERS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not (
        isinstance(obj, dict)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        kind = type(obj).__name__ if not isinstance(obj, dict) else "a dict of other things than tensors"
        raise UserError(
            f"the weights file {path} holds no state_dict (found {kind}); give a file saved with "
            "torch.save(model.state_dict(), PATH)"
        )
    return obj


def convert_file(arch: str, path: str | os.PathLike) -> LayeredNet:
    """The zoo's ``arch`` with the weights of a torchvision state_dict file (not stored)."""
    check_arch(arch)
    state = read_state_dict(path)
    try:
        converted = convert_torchvision(arch, state)
    except UserError as err:
        raise UserError(f"the weights file {path} does not fit: {err}") from None
    num_classes = int(converted["head.weight"].shape[0])
    channels = int(state[stem_key(arch)].shape[1])
    size = native_size(arch)
    net = TORCHVISION_ARCHS[arch](num_classes, in_shape=(channels, size, size))
    net.load_state_dict(converted)
    if num_classes == NUM_IMAGENET_CLASSES:
        net.class_names = imagenet_classes()
    return net


def torchvision_source(
    arch: str, weights: str | os.PathLike | None, *, cache: str | os.PathLike | None = None
) -> LayeredNet:
    """``arch`` with the weights of a local torchvision state_dict file, through the source store.

    Args:
        arch: one of torchvision's architectures in the zoo (``resnet18``, ``mobilenet_v3_large``,
            ``efficientnet_b0``, ...).
        weights: the file (``.pth``/``.pt``/``.safetensors``).
        cache: the store's root (default :func:`paramtransfer.models.store.home`).

    Returns:
        The LayeredNet (the checkpoint's classes, input ``(3, native, native)``); ``net.normalize`` maps
        images in [0, 1] to its input; ``net.source_info["source"]`` is ``torchvision:ARCH``.

    Raises:
        UserError: an unknown arch, no weights, or a file that is missing, damaged, needs unpickling
            code, or does not fit ``arch`` (naming the first tensor that does not).
    """
    check_arch(arch)
    path = _weights_path(weights, arch)
    digest = _file_sha256(path)
    root = Path(cache or home())
    key = source_key(arch, "torchvision", weights_sha256=digest, classes="imagenet-names")
    directory = root / "sources" / key
    cure = f"delete {directory} and run again (it is converted anew from {path})"
    with hold_lock(root / "locks" / f"{key}.lock"):
        if directory.is_dir():
            remove_stale_temps(directory)
        if not ((directory / WEIGHTS).is_file() and (directory / META).is_file()):
            net = convert_file(arch, path)
            mean, std = net.input_stats()
            meta = {
                "source": f"{TORCHVISION_PREFIX}{arch}",
                "classes": list(range(net.num_classes)),
                "input": {"size": native_size(arch), "mean": list(mean), "std": list(std)},
                "settings": {"weights_file": str(path.resolve()), "weights_file_sha256": digest},
            }
            save_model(net, directory, meta)
        return load_model(directory, cure=cure)
