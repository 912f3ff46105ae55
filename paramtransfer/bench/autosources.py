"""What the ``auto`` benchmark builds for itself (see :mod:`paramtransfer.bench.autobench`): an ImageNet
source saved at a chosen input size, a zoo source pretrained for its own number of epochs, the deliberately
bad source's task (images with their labels permuted at random) and a folder target of test images; and the
checks of the setting entries that ask for them. Everything is written once, atomically, and reused after."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paramtransfer.data.specs import parse_spec
from paramtransfer.errors import UserError
from paramtransfer.models.zoo import list_models

BUILT_SOURCES = ("imagenet", "pretrained", "shuffled_labels")
_SHUFFLED_FIELDS = {"arch": str, "images": str, "examples": int, "seed": int}
_PRETRAINED_FIELDS = {"arch": str, "images": str, "epochs": int}


def check_folder_target(folder: Any) -> dict[str, Any]:
    example = "folder_target: {images: 'fashion[0,2,4,6]', per_class: 250}"
    if not isinstance(folder, dict) or set(folder) != {"images", "per_class"}:
        raise UserError(f"folder_target needs images and per_class, e.g. {example}")
    n = folder["per_class"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise UserError(f"folder_target.per_class={n!r}: give a whole number of at least 2, e.g. {example}")
    spec = parse_spec(str(folder["images"]))
    if spec.dataset not in ("fashion", "digits"):
        raise UserError(f"folder_target.images={folder['images']!r}: give fashion[...] or digits[...]")
    return {"images": str(spec), "per_class": n}


def check_built_source(source: Any) -> None:
    forms = (
        "{imagenet: {image_size: 64}}, {pretrained: {arch: lenet, images: 'digits[0-4]', epochs: 40}} or "
        "{shuffled_labels: {arch: lenet, images: fashion, examples: 2000, seed: 0}}"
    )
    if not isinstance(source, dict) or len(source) != 1 or next(iter(source)) not in BUILT_SOURCES:
        raise UserError(f"sources: {source!r} is neither a candidate string nor one of {forms}")
    kind, options = next(iter(source.items()))
    if not isinstance(options, dict):
        raise UserError(f"sources: {kind} needs its options, e.g. {forms}")
    if kind == "imagenet":
        size = options.get("image_size")
        if set(options) != {"image_size"} or isinstance(size, bool) or not isinstance(size, int):
            raise UserError(f"sources: imagenet takes image_size (pixels), e.g. {forms}")
        if not 16 <= size <= 1024:
            raise UserError(f"sources: imagenet image_size={size}: give 16 to 1024 pixels, e.g. 64")
        return
    if kind == "pretrained":
        if set(options) != set(_PRETRAINED_FIELDS) or not all(
            isinstance(options[k], t) and not isinstance(options[k], bool)
            for k, t in _PRETRAINED_FIELDS.items()
        ):
            raise UserError(f"sources: pretrained needs arch, images and epochs, e.g. {forms}")
        if options["arch"] not in list_models():
            raise UserError(f"sources: pretrained arch {options['arch']!r} is not one of {list_models()}")
        parse_spec(options["images"])
        if not 1 <= options["epochs"] <= 1000:
            raise UserError(f"sources: pretrained epochs={options['epochs']}: give 1 to 1000, e.g. 40")
        return
    if set(options) != set(_SHUFFLED_FIELDS) or not all(
        isinstance(options[k], t) and not isinstance(options[k], bool) for k, t in _SHUFFLED_FIELDS.items()
    ):
        raise UserError(f"sources: shuffled_labels needs arch, images, examples and seed, e.g. {forms}")
    if options["arch"] not in list_models():
        raise UserError(f"sources: shuffled_labels arch {options['arch']!r} is not one of {list_models()}")
    if parse_spec(options["images"]).dataset not in ("fashion", "digits") or options["examples"] < 10:
        raise UserError(f"sources: shuffled_labels takes fashion or digits images, at least 10, e.g. {forms}")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=.+-]+", "_", text).strip("_.") or "x"


def build_folder_target(images: str, per_class: int, root: Path) -> Path:
    """``root/<name>/<class>/<i>.png``: the first ``per_class`` test images of each class of ``images``
    (written once, into a temporary folder renamed when complete)."""
    import torch
    from PIL import Image

    from paramtransfer.data import load_task

    folder = root / f"{_safe(images)}_test_{per_class}"
    if folder.is_dir():
        return folder
    task = load_task(images, seed=0)
    x, y = task.test.raw(), task.test.y
    tmp = root / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for c, name in enumerate(task.classes):
        idx = (y == c).nonzero().flatten()[:per_class]
        if len(idx) < per_class:
            raise UserError(f"folder_target: class {name!r} of {images} has only {len(idx)} test images")
        cdir = tmp / f"{c:02d}_{_safe(name)}"
        cdir.mkdir(parents=True)
        for i in idx.tolist():
            img = x[i]
            if img.dtype.is_floating_point:  # digits: [0, 1] floats
                img = (img * 255).round()
            Image.fromarray(img.squeeze(0).to(torch.uint8).numpy()).save(cdir / f"{i}.png")
    tmp.rename(folder)
    return folder


def build_shuffled_npz(images: str, examples: int, seed: int, root: Path) -> Path:
    """About ``examples`` training images of ``images`` (as many of each class) with their labels permuted
    at random (``seed``)."""
    import numpy as np
    import torch

    from paramtransfer.data import load_task

    path = root / f"shuffled_{_safe(images)}_{examples}_seed{seed}.npz"
    if path.is_file():
        return path
    k = load_task(images, seed=seed).num_classes  # the same number of images of each class
    task = load_task(images, shots=max(2, examples // k), seed=seed)
    x = task.train.raw()
    if x.dtype.is_floating_point:
        x = (x * 255).round().to(torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    y = task.train.y[torch.randperm(len(task.train.y), generator=gen)]
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{path.stem}.tmp.npz"
    np.savez(tmp, x=x.numpy(), y=y.numpy())
    tmp.rename(path)
    return path


def build_imagenet_copy(image_size: int, root: Path) -> Path:
    """EfficientNet-Lite0's ImageNet weights saved with an ``image_size`` x ``image_size`` input."""

    def imagenet_at_size() -> Any:
        net = _resolve("imagenet", None)
        net.in_shape = (int(net.in_shape[0]), image_size, image_size)
        return net

    return _save_once(root / f"imagenet_{image_size}px", imagenet_at_size, {"image_size": image_size})


def build_pretrained(arch: str, images: str, epochs: int, seed: int, root: Path) -> Path:
    """``arch`` pretrained on ``images`` for ``epochs`` epochs (seed ``seed``; the zoo's cached
    pretraining, as ``paramtransfer pretrain`` does it), saved as a model folder: the candidate is that
    path. A setting's ``source_epochs`` applies to every ``ARCH@SPEC`` candidate, and a few epochs that
    train a LeNet on Fashion-MNIST's 60,000 images leave one on the 900 images of digits [0-4] at about
    chance, so a small source task gets its own length this way."""
    folder = root / f"{arch}_{_safe(images)}_{epochs}ep_seed{seed}"
    kw = {"epochs": epochs, "seed": seed, "limit": None, "progress": False}
    return _save_once(folder, lambda: _resolve(images, arch, **kw))


def _resolve(source: str, arch: str | None, **kw: Any) -> Any:
    from paramtransfer.experiments.pretrain import resolve_source

    net = resolve_source(source, arch, **kw)
    assert net is not None
    return net


def _save_once(folder: Path, build: Callable[[], Any], settings: dict[str, Any] | None = None) -> Path:
    """``folder`` holding the network ``build()`` returns (called only when the folder is not complete),
    with its source information (``settings`` added to its pretraining settings)."""
    from paramtransfer.models.store import META, WEIGHTS, save_model

    if (folder / WEIGHTS).is_file() and (folder / META).is_file():
        return folder
    net = build()
    info = dict(getattr(net, "source_info", None) or {})
    fields = ("source", "classes", "settings", "val_accuracy", "test_accuracy")
    keep = {k: info[k] for k in fields if k in info}
    if settings:
        keep["settings"] = {**keep.get("settings", {}), **settings}
    save_model(net, folder, keep)
    return folder
