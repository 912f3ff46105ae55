"""Pretrained sources: train a source model once and keep it in the source store.

:mod:`paramtransfer.models.store` saves, loads and keys sources and never trains; this module trains a
source the store does not hold yet (``scratch`` on the source task, with :func:`train_model`) and
hands it to the store. :func:`resolve_source` turns a ``--source`` (a LayeredNet, a saved model path,
a source name such as ``imagenet`` or ``torchvision:resnet18`` with its weights file, or a task spec) into
a source model, pretraining it when it is a task spec.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from paramtransfer.data.specs import parse_spec
from paramtransfer.errors import UserError
from paramtransfer.experiments.run import train_model
from paramtransfer.models.imagenet import named_source
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.store import (
    META,
    WEIGHTS,
    _pretrain_cure,
    home,
    is_model_path,
    is_source_name,
    load_model,
    save_model,
    source_key,
    source_settings,
)
from paramtransfer.train.checkpoint import hold_lock, remove_stale_temps


def pretrain(
    arch: str,
    spec: str,
    epochs: int = 3,
    seed: int = 0,
    *,
    limit: int | None = None,
    lr: float = 0.02,
    batch_size: int = 128,
    arch_kwargs: dict[str, Any] | None = None,
    cache: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
    weights: str | os.PathLike | None = None,
) -> LayeredNet:
    """Train ``arch`` on the task ``spec`` once and cache it; later calls load the cached weights.

    Args:
        arch: zoo architecture (``lenet``, ``resnet20``, ``mobilenet``, ``rnn``).
        spec: source task spec, e.g. ``fashion[0-4]`` (all its training examples unless ``limit``).
        epochs, seed, lr, batch_size: training settings (SGD with momentum, cosine schedule).
        limit: cap on source training examples.
        cache: the cache root (default :func:`home`).
        force: retrain even if cached.
        weights: with the source name ``torchvision:ARCH``, the torchvision state_dict file it stores
            (a source name is stored, never trained: see
            :func:`paramtransfer.models.imagenet.named_source`).

    Returns:
        The source LayeredNet; ``model.source_info`` holds its metadata (accuracies, settings, path).

    Raises:
        UserError: a damaged cached copy (see :func:`load_model`), naming the exact
            ``paramtransfer pretrain ... --force`` command that rebuilds it.

    Processes that need the same source take turns under the lock ``<cache>/locks/<key>.lock``: the first
    trains and caches it, the others wait and load it.
    """
    if is_source_name(spec):  # fixed weights: nothing to train (``named_source`` stores them once)
        return named_source(spec, arch, weights=weights, cache=cache)
    _no_weights(spec, weights)
    if is_model_path(spec):
        raise UserError(
            f"pretrain trains on a task spec, and {spec} is a path; give a task spec such as fashion[0-4] "
            "(a saved model is used as it is: pass it as --source to run or compare)"
        )
    settings = source_settings(spec, epochs, seed, limit, lr, batch_size, arch_kwargs)
    root = Path(cache or home())
    key = source_key(arch, spec, **settings)
    directory = root / "sources" / key
    cure = _pretrain_cure(directory, arch, spec, settings)
    waiting = f"waiting for another process that is pretraining {arch} on {spec} ({directory})"
    with hold_lock(root / "locks" / f"{key}.lock", waiting if progress else None):
        if directory.is_dir():
            remove_stale_temps(directory)
        if not force and (directory / WEIGHTS).is_file() and (directory / META).is_file():
            return load_model(directory, cure=cure)
        result, model = train_model(
            "scratch",
            source=None,
            target=spec,
            arch=arch,
            arch_kwargs=arch_kwargs or {},
            seed=seed,
            lr=lr,
            epochs=epochs,
            limit=limit,
            train_options={"batch_size": batch_size, "patience": None},
            progress=progress,
        )
        if result.status != "ok":
            raise UserError(f"pretraining {arch} on {spec} diverged at lr={lr}; pass a smaller lr")
        meta = {
            "source": spec,
            "classes": result.diagnostics.get("classes"),
            "settings": settings,
            "val_accuracy": result.val_accuracy,
            "test_accuracy": result.test_accuracy,
            "wall_time_s": result.wall_time_s,
        }
        save_model(model, directory, meta)
        return load_model(directory, cure=cure)


def _no_weights(source: Any, weights: str | os.PathLike | None) -> None:
    """Refuse a weights file for a source that is not ``torchvision:ARCH`` (it would be ignored)."""
    if weights is not None:
        shown = f"<{source.arch} model>" if isinstance(source, LayeredNet) else source
        raise UserError(
            f"--source-weights goes with --source torchvision:ARCH, not with --source {shown}; drop "
            "--source-weights or give --source torchvision:ARCH"
        )


def resolve_source(
    source: str | os.PathLike | LayeredNet | None,
    arch: str | None,
    *,
    epochs: int = 3,
    seed: int = 0,
    limit: int | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
    weights: str | os.PathLike | None = None,
) -> LayeredNet | None:
    """A source from a LayeredNet, a saved model path, or a task spec (pretrained and cached; ``arch_kwargs``
    are the architecture's options, e.g. ``{"depth": 32}``).

    Which one a string is follows :func:`is_model_path`: ``./fashion`` is a saved model, ``fashion`` the
    dataset, even if a folder of that name exists. ``imagenet`` is EfficientNet-Lite0's ImageNet weights
    (``--arch efficientnet_lite0`` or no ``--arch``), see :func:`paramtransfer.models.imagenet.pretrained`;
    ``torchvision:ARCH`` is torchvision's ``ARCH`` with the state_dict file ``weights``
    (``--source-weights``), see :func:`paramtransfer.models.tvsource.torchvision_source`. ``weights`` with
    any other source is a :class:`UserError`."""
    if source is None or isinstance(source, torch.nn.Module):
        _no_weights(source, weights)
        return source
    if isinstance(source, str) and is_source_name(source):
        if arch_kwargs:
            raise UserError(f"the source {source} has fixed weights; drop the arch. options")
        return named_source(source, arch, weights=weights)
    _no_weights(source, weights)
    if isinstance(source, os.PathLike) or is_model_path(source):
        model = load_model(source)
        if arch is not None and arch != model.arch:
            raise UserError(
                f"the source at {source} is a {model.arch}, but --arch is {arch}; drop --arch or match it"
            )
        return model
    try:
        parse_spec(source)
    except UserError as err:
        if (Path(source).expanduser() / META).is_file():
            raise UserError(f"{err}; for the saved model in the folder {source} write ./{source}") from None
        raise
    if arch is None:
        raise UserError(f"to pretrain a source on {source!r} give --arch (e.g. lenet)")
    return pretrain(
        arch, source, epochs=epochs, seed=seed, limit=limit, arch_kwargs=arch_kwargs, progress=progress
    )
