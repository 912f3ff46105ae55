"""The input pipeline: raw images (native resolution) -> the network's input, one batch at a time.

A task keeps its images as the dataset gives them (uint8 pixels, or floats in [0, 1] for data that are
not 8-bit, e.g. scikit-learn's digits), at their native size. A model's :class:`InputSpec` says what it
takes: channels, height x width and the per-channel normalisation ``(x - mean) / std`` of pixels
``x`` in [0, 1]. :func:`to_input` converts a batch:

1. pixels to float in [0, 1] (uint8 / 255);
2. channels: grey -> RGB by repetition, RGB(A) -> grey by the mean of R, G, B;
3. size: bilinear resize (anti-aliased when shrinking), or, for training with augmentation, the
   random-resized crop and horizontal flip of the ImageNet recipe that the papers fine-tune with
   (:func:`sample_crops`; Szegedy et al. 2015, as in torchvision's ``RandomResizedCrop``);
4. normalisation.

Everything is plain torch (no decoding happens here; folders are decoded by PIL when they load).
A 28x28 grey Fashion image thus feeds a 3x64x64 ImageNet net, and a 500x375 JPEG a 1x32x32 ResNet,
without user code. Converting without augmentation is a pure function of the pixels, so a batch
converted alone equals the same rows converted with the whole split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from paramtransfer.errors import UserError


@dataclass(frozen=True)
class InputSpec:
    """What a network takes: ``channels`` x ``size`` images normalised as ``(x - mean) / std``."""

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(
        cls,
        in_shape: tuple[int, ...],
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> InputSpec:
        """The spec of an input shape ``(C, H, W)``; mean/std default to 0.5 (pixels to [-1, 1])."""
        c, h, w = (int(v) for v in in_shape)
        mean = tuple(float(v) for v in mean) if mean is not None else (0.5,) * c
        std = tuple(float(v) for v in std) if std is not None else (0.5,) * c
        if len(mean) != c or len(std) != c:
            raise UserError(f"input normalisation needs {c} means and stds (got {len(mean)} and {len(std)})")
        return cls(c, (h, w), mean, std)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def resized(self, size: int | None) -> InputSpec:
        """The same spec at ``size`` x ``size`` pixels (``None``: unchanged)."""
        if size is None:
            return self
        return InputSpec(self.channels, (int(size), int(size)), self.mean, self.std)

    def describe(self) -> dict:
        return {"in_shape": list(self.in_shape), "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random-resized crop (area ``scale`` of the image, aspect ``ratio``) then a
    horizontal flip with probability ``flip`` (the ImageNet recipe: scale 0.08-1, ratio 3/4-4/3, 0.5)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5


def sample_crops(n: int, height: int, width: int, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """``[n, 5]`` int64 rows ``(top, left, crop height, crop width, flip)`` for images of ``height`` x
    ``width``: per image up to 10 tries of an area in ``aug.scale`` and a log-uniform aspect in
    ``aug.ratio`` that fits, else the central crop of the nearest allowed aspect (torchvision's rule).
    All randomness comes from ``gen``, a fixed number of draws per image, so a seeded run repeats."""
    area = height * width
    log_lo, log_hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    u = torch.rand(n, 10, 4, generator=gen, dtype=torch.float64)
    flips = torch.rand(n, generator=gen, dtype=torch.float64) < aug.flip
    rows = []
    for i in range(n):
        box = None
        for t in range(10):
            target = area * (aug.scale[0] + (aug.scale[1] - aug.scale[0]) * float(u[i, t, 0]))
            aspect = math.exp(log_lo + (log_hi - log_lo) * float(u[i, t, 1]))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(float(u[i, t, 2]) * (height - h + 1))
                left = int(float(u[i, t, 3]) * (width - w + 1))
                box = (top, left, h, w)
                break
        if box is None:
            aspect = width / height
            if aspect < aug.ratio[0]:
                w, h = width, int(round(width / aug.ratio[0]))
            elif aspect > aug.ratio[1]:
                h, w = height, int(round(height * aug.ratio[1]))
            else:
                w, h = width, height
            box = ((height - h) // 2, (width - w) // 2, h, w)
        rows.append((*box, int(flips[i])))
    return torch.tensor(rows, dtype=torch.int64).reshape(n, 5)


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _fit_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    if x.shape[1] == c:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, c, -1, -1)
    if c == 1 and x.shape[1] in (3, 4):
        return x[:, :3].mean(dim=1, keepdim=True)
    raise UserError(f"cannot convert {x.shape[1]}-channel images to the model's {c} channels")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def fit_shape(x: torch.Tensor, in_shape: tuple[int, int, int]) -> torch.Tensor:
    """Images ``[N, C, H, W]`` (float) in ``in_shape`` (grey <-> RGB, bilinear resize), unnormalised."""
    c, h, w = in_shape
    return _resize(_fit_channels(x, c), (h, w)).contiguous()


def to_input(x: torch.Tensor, spec: InputSpec, crops: torch.Tensor | None = None) -> torch.Tensor:
    """Raw images ``[N, C, H, W]`` (uint8, or float in [0, 1]) -> the network's float input.

    Args:
        crops: rows of :func:`sample_crops` (one per image): crop, resize and flip each image (training
            augmentation); ``None``: resize the whole image.
    """
    x = _fit_channels(_to_float(x), spec.channels)
    if crops is None:
        x = _resize(x, spec.size).contiguous()
    else:
        out = []
        for img, (top, left, h, w, flip) in zip(x, crops.tolist(), strict=True):
            piece = _resize(img[None, :, top : top + h, left : left + w], spec.size)
            out.append(piece.flip(-1) if flip else piece)
        x = torch.cat(out).contiguous()
    if len(set(spec.mean)) == 1 and len(set(spec.std)) == 1:  # scalars: the same arithmetic as always
        return (x - spec.mean[0]) / spec.std[0]
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std
