"""The source store: train a source model once, cache its weights (safetensors) and metadata (JSON).

Cache location: ``$PARAMTRANSFER_HOME`` (default ``~/.cache/paramtransfer``) ``/sources/<key>/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from paramtransfer.errors import UserError
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.zoo import build_model
from paramtransfer.train.checkpoint import atomic_write_json

WEIGHTS = "model.safetensors"
META = "meta.json"


def home() -> Path:
    return Path(os.environ.get("PARAMTRANSFER_HOME") or Path.home() / ".cache" / "paramtransfer")


def save_model(model: LayeredNet, directory: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``meta.json`` (architecture + ``meta``) into ``directory``."""
    if model.arch in ("custom", "wrapped"):
        raise UserError(
            "only zoo architectures can be saved and rebuilt; save a wrapped model's state_dict yourself"
        )
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = d / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, d / WEIGHTS)
    atomic_write_json(d / META, {**model.describe(), **(meta or {})})
    return d


def load_model(path: str | os.PathLike) -> LayeredNet:
    """Rebuild a saved model from a directory (or its ``model.safetensors``) with ``meta.json`` beside it."""
    p = Path(path).expanduser()
    d = p.parent if p.suffix == ".safetensors" else p
    if not (d / WEIGHTS).is_file() or not (d / META).is_file():
        raise UserError(
            f"no saved model at {p} (expected {WEIGHTS} and {META}); create one with `paramtransfer pretrain`"
        )
    meta = json.loads((d / META).read_text())
    model = build_model(
        meta["arch"], meta["num_classes"], in_shape=tuple(meta["in_shape"]), **meta["arch_kwargs"]
    )
    model.load_state_dict(load_file(str(d / WEIGHTS)))
    model.source_info = meta
    return model


def saved_arch(path: str | os.PathLike) -> str | None:
    """The architecture recorded beside a saved model, or None if ``path`` is not a saved model."""
    p = Path(path).expanduser()
    d = p.parent if p.suffix == ".safetensors" else p
    try:
        return json.loads((d / META).read_text())["arch"]
    except (OSError, ValueError, KeyError):
        return None


def source_key(arch: str, spec: str, **settings: Any) -> str:
    readable = re.sub(r"[^A-Za-z0-9]+", "-", f"{arch}-{spec}").strip("-")
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{readable}-{digest}"


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
) -> LayeredNet:
    """Train ``arch`` on the task ``spec`` once and cache it; later calls load the cached weights.

    Args:
        arch: zoo architecture (``lenet``, ``resnet20``, ``mobilenet``, ``rnn``).
        spec: source task spec, e.g. ``fashion[0-4]`` (all its training examples unless ``limit``).
        epochs, seed, lr, batch_size: training settings (SGD with momentum, cosine schedule).
        limit: cap on source training examples.
        cache: the cache root (default :func:`home`).
        force: retrain even if cached.

    Returns:
        The source LayeredNet; ``model.source_info`` holds its metadata (accuracies, settings, path).
    """
    from paramtransfer.experiments.run import train_model  # late import: experiments builds on models

    settings = {"epochs": epochs, "seed": seed, "limit": limit, "lr": lr, "batch_size": batch_size}
    settings["arch_kwargs"] = arch_kwargs or {}
    if not spec.strip().startswith("fashion"):
        # Datasets without an official test split changed their split rule (test images fixed per
        # dataset, not per class selection): a source cached under the old rule must not be reused.
        settings["test_split"] = "per-dataset"
    directory = Path(cache or home()) / "sources" / source_key(arch, spec, **settings)
    if not force and (directory / WEIGHTS).is_file() and (directory / META).is_file():
        return load_model(directory)
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
    return load_model(directory)


def resolve_source(
    source: str | LayeredNet | None,
    arch: str | None,
    *,
    epochs: int = 3,
    seed: int = 0,
    limit: int | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> LayeredNet | None:
    """A source from a LayeredNet, a saved model path, or a task spec (pretrained and cached; ``arch_kwargs``
    are the architecture's options, e.g. ``{"depth": 32}``)."""
    if source is None or isinstance(source, torch.nn.Module):
        return source
    if Path(source).expanduser().exists():
        model = load_model(source)
        if arch is not None and arch != model.arch:
            raise UserError(
                f"the source at {source} is a {model.arch}, but --arch is {arch}; drop --arch or match it"
            )
        return model
    if arch is None:
        raise UserError(f"to pretrain a source on {source!r} give --arch (e.g. lenet)")
    return pretrain(
        arch, source, epochs=epochs, seed=seed, limit=limit, arch_kwargs=arch_kwargs, progress=progress
    )
