"""Raw dataset readers: Fashion-MNIST (Debian idx files), scikit-learn digits, image folders, npz.

Each reader returns a :class:`RawData`: uint8/float images as a float tensor in [0, 1] with shape
``[N, C, H, W]``, integer labels, the class names, and an official test split when the dataset has one.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from paramtransfer.errors import UserError

DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}


@dataclass
class RawData:
    x: torch.Tensor  # [N, C, H, W] float32 in [0, 1]
    y: torch.Tensor  # [N] int64
    classes: tuple[str, ...]
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None


def fashion_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where the Fashion-MNIST idx files live: argument, then $PARAMTRANSFER_DATA, then Debian's path."""
    for candidate in (data_dir, os.environ.get("PARAMTRANSFER_DATA"), DEBIAN_FASHION_DIR):
        if candidate:
            return Path(candidate)
    return Path(DEBIAN_FASHION_DIR)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte idx file; reinstall dataset-fashion-mnist")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise UserError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}; install it with "
        "'apt-get install dataset-fashion-mnist' or point PARAMTRANSFER_DATA at a folder holding "
        "the idx files"
    )


def load_fashion(data_dir: str | os.PathLike | None = None) -> RawData:
    """Fashion-MNIST from ``data_dir``, $PARAMTRANSFER_DATA or Debian's path (cached per folder)."""
    return _load_fashion_from(str(fashion_dir(data_dir).resolve()))


@lru_cache(maxsize=2)
def _load_fashion_from(folder: str) -> RawData:
    root = Path(folder)
    arrays = {
        stem: _read_idx(_find_idx(root, stem))
        for stem in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    }

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.copy()).unsqueeze(1)  # uint8; converted to float after selection

    return RawData(
        x=images(arrays["train-images-idx3-ubyte"]),
        y=torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)),
        classes=FASHION_CLASSES,
        x_test=images(arrays["t10k-images-idx3-ubyte"]),
        y_test=torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)),
    )


@lru_cache(maxsize=1)
def load_digits() -> RawData:
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    return RawData(
        x=x, y=torch.from_numpy(d.target.astype(np.int64)), classes=tuple(str(i) for i in range(10))
    )


def load_folder(path: str) -> RawData:
    """An ImageFolder layout: ``PATH/<class name>/<image files>``; classes sorted by name."""
    from PIL import Image

    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"folder {root} does not exist; give folder:PATH with one sub-folder per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise UserError(f"folder {root} needs at least two class sub-folders (PATH/<class>/<images>)")
    xs: list[np.ndarray] = []
    ys: list[int] = []
    shape: tuple[int, ...] | None = None
    for label, cdir in enumerate(class_dirs):
        files = sorted(f for f in cdir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"class folder {cdir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in files:
            with Image.open(f) as im:
                im = im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
                if shape is None:
                    shape = (np.asarray(im).shape[0], np.asarray(im).shape[1])
                if (im.height, im.width) != shape:
                    im = im.resize((shape[1], shape[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(label)
    channels = max(a.shape[0] for a in xs)
    xs = [np.repeat(a, channels, axis=0) if a.shape[0] != channels else a for a in xs]
    return RawData(
        x=torch.from_numpy(np.stack(xs)),
        y=torch.tensor(ys, dtype=torch.int64),
        classes=tuple(d.name for d in class_dirs),
    )


def _npz_images(x: np.ndarray, path: Path) -> torch.Tensor:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:  # flat vectors: square grey images if possible
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise UserError(f"{path}: x has shape {x.shape}; give images [N,H,W] or [N,C,H,W]")
        x = x.reshape(-1, 1, side, side)
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif x.ndim != 4:
        raise UserError(f"{path}: x has shape {x.shape}; give images [N,H,W] or [N,C,H,W]")
    if x.max(initial=0.0) > 1.0:
        x = x / 255.0
    return torch.from_numpy(np.ascontiguousarray(x))


def load_npz(path: str) -> RawData:
    """Arrays ``x`` (images) and ``y`` (integer labels); optional ``x_test``, ``y_test``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"npz file {p} does not exist; give npz:PATH to a file with arrays x and y")
    with np.load(p, allow_pickle=False) as f:
        if "x" not in f or "y" not in f:
            raise UserError(f"{p} must hold arrays named 'x' and 'y' (it has {', '.join(f.files)})")
        raw = {k: f[k] for k in f.files}
    labels = np.unique(np.concatenate([raw["y"], raw.get("y_test", raw["y"])]))

    def index(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.searchsorted(labels, y).astype(np.int64))

    has_test = "x_test" in raw and "y_test" in raw
    return RawData(
        x=_npz_images(raw["x"], p),
        y=index(raw["y"]),
        classes=tuple(str(v) for v in labels),
        x_test=_npz_images(raw["x_test"], p) if has_test else None,
        y_test=index(raw["y_test"]) if has_test else None,
    )


def clear_cache() -> None:
    """Forget the datasets read so far in this process (they are cached per folder)."""
    _load_fashion_from.cache_clear()
    load_digits.cache_clear()
