"""Raw dataset readers: Fashion-MNIST (Debian idx files), scikit-learn digits, image folders, npz.

Each reader returns a :class:`RawData`: images ``[N, C, H, W]`` at their native size (uint8 pixels, or
float in [0, 1] for data that are not 8-bit; a folder larger than its memory budget as an
:class:`~paramtransfer.data.files.ImageFiles` read from disk on demand), integer labels, the class names,
and an official test split when the dataset has one.
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from paramtransfer.data.files import ImageFiles, decode_image, first_line, read_header
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
    x: torch.Tensor | ImageFiles  # [N, C, H, W]: uint8, or float in [0, 1]; ImageFiles: streamed
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


DEFAULT_MEMORY_MB = 2048  # the decoded size of a folder above which it is streamed from disk


def check_memory_mb(memory_mb: object, name: str = "memory_mb") -> float:
    """``memory_mb`` as a float: a finite number above 0; anything else is a UserError (``name``: how
    the message calls the setting)."""
    ok = isinstance(memory_mb, int | float) and not isinstance(memory_mb, bool)
    if not ok or not math.isfinite(memory_mb) or memory_mb <= 0:  # type: ignore[arg-type]
        raise UserError(
            f"{name}={memory_mb!r}: give the memory budget for decoded images in megabytes, a number "
            f"above 0 (a folder larger than that is read from disk batch by batch), "
            f"e.g. --set data.memory_mb={DEFAULT_MEMORY_MB}"
        )
    return float(memory_mb)


def load_folder(path: str, memory_mb: float = DEFAULT_MEMORY_MB) -> RawData:
    """An ImageFolder layout: ``PATH/<class name>/<image files>``; classes sorted by name.

    Images are uint8 ``[N, C, H, W]``, all at the first image's size, RGB if any image is in colour (see
    :mod:`paramtransfer.data.files` for the decoding rules). If their decoded size (N*C*H*W bytes,
    from the files' headers) fits ``memory_mb`` megabytes (MiB) they are decoded now; otherwise ``x``
    is an :class:`~paramtransfer.data.files.ImageFiles` that decodes them batch by batch (streamed).

    A file with an image suffix that PIL cannot read (corrupt, truncated, not an image) is an error
    naming the file, not skipped: a silently smaller class would change the task behind the user's back.
    An in-memory folder is decoded in full here, so every such file is found now; a streamed folder has
    every header read and checked now, and a file whose pixels are corrupt past its header is reported
    when a batch first reads it.
    """
    budget = check_memory_mb(memory_mb) * 2**20
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"folder {root} does not exist; give folder:PATH with one sub-folder per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise UserError(f"folder {root} needs at least two class sub-folders (PATH/<class>/<images>)")
    paths: list[Path] = []
    ys: list[int] = []
    for label, cdir in enumerate(class_dirs):
        files = sorted(f for f in cdir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"class folder {cdir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths += files
        ys += [label] * len(files)
    headers = [read_header(f, root) for f in paths]
    size = headers[0][0]
    channels = max(c for _, c in headers)
    y = torch.tensor(ys, dtype=torch.int64)
    classes = tuple(d.name for d in class_dirs)
    if len(paths) * channels * size[0] * size[1] > budget:
        return RawData(x=ImageFiles(paths, (channels, *size), root), y=y, classes=classes)
    x = np.stack([decode_image(f, root, size, channels) for f in paths])
    return RawData(x=torch.from_numpy(x), y=y, classes=classes)


_NPZ_KEYS = ("x", "y", "x_test", "y_test")
_NPZ_CURE = "save plain numeric arrays with numpy.savez(PATH, x=images, y=labels)"


def _read_npz(p: Path) -> dict[str, np.ndarray]:
    """The arrays of ``_NPZ_KEYS`` that ``p`` holds; any unreadable file is a UserError naming it."""
    with open(p, "rb") as fh:
        head = fh.read(6)
    if head == b"\x93NUMPY":
        raise UserError(f"{p} holds a single .npy array, not an npz archive of named arrays; {_NPZ_CURE}")
    if not zipfile.is_zipfile(p):
        raise UserError(
            f"{p} is not an npz archive (not a zip file: damaged, truncated or another format); {_NPZ_CURE}"
        )
    out: dict[str, np.ndarray] = {}
    key = ""
    try:
        with np.load(p, allow_pickle=False) as f:
            if "x" not in f.files or "y" not in f.files:
                raise UserError(
                    f"{p} must hold arrays named 'x' and 'y' (it has {', '.join(f.files) or 'none'})"
                )
            for key in _NPZ_KEYS:
                if key in f.files:
                    out[key] = f[key]
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        if "allow_pickle" in str(err):  # numpy's only sign of an object (pickled) array
            raise UserError(
                f"{p}: array {key!r} holds Python objects (a pickled object array), which are never "
                f"loaded; {_NPZ_CURE}"
            ) from None
        raise UserError(f"{p}: array {key!r} cannot be read ({first_line(err)}); {_NPZ_CURE}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise UserError(
            f"{p} is a damaged npz archive (array {key!r}: {first_line(err)}); {_NPZ_CURE}"
        ) from None
    return out


def _npz_images(x: np.ndarray, name: str, path: Path) -> torch.Tensor:
    """Images ``x`` of an npz file as float32 ``[N, C, H, W]`` in [0, 1].

    Values must be finite and lie in [0, 1] (intensities, kept) or [0, 255] (8-bit pixels, divided by
    255; chosen when the largest value exceeds 1). NaN/inf, negative values (e.g. mean/std-normalised
    data) and values above 255 (e.g. 16-bit images) are errors: no scale can be guessed for them.
    """
    if x.dtype.kind not in "biuf":
        raise UserError(f"{path}: {name} holds {x.dtype} values; {_NPZ_CURE} (pixel values as numbers)")
    if len(x) == 0:
        raise UserError(f"{path}: {name} holds no images; {_NPZ_CURE}")
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            raise UserError(
                f"{path}: {name} holds NaN or infinite values ({int(bad.sum())} of {len(x)} images, first at "
                f"index {int(np.argmax(bad))}); replace those values or drop those images"
            )
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:  # flat vectors: square grey images if possible
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise UserError(f"{path}: {name} has shape {x.shape}; give images [N,H,W] or [N,C,H,W]")
        x = x.reshape(-1, 1, side, side)
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif x.ndim != 4:
        raise UserError(f"{path}: {name} has shape {x.shape}; give images [N,H,W] or [N,C,H,W]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 255.0:
        raise UserError(
            f"{path}: {name} has pixel values from {lo:g} to {hi:g}; give pixels in [0, 1] or [0, 255] "
            "(undo any mean/std normalisation, rescale 16-bit images)"
        )
    if hi > 1.0:
        x = x / 255.0
    return torch.from_numpy(np.ascontiguousarray(x))


def _npz_labels(y: np.ndarray, name: str, path: Path) -> np.ndarray:
    """Labels ``y`` of an npz file as int64 ``[N]``.

    Integers of any width; floats only when every value is a whole number (``3.0`` is class ``3``, as
    arrays round-tripped through float tools often are); booleans as classes 0 and 1. Fractional or
    non-finite floats, strings and other types are errors. Shape ``[N, 1]`` is read as ``[N]``.
    """
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise UserError(
            f"{path}: {name} has shape {y.shape}; give one integer class label per image, shape [N] "
            "(for one-hot labels save y.argmax(1))"
        )
    if y.dtype.kind in "biu":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        fractional = ~np.isfinite(y) | (y != np.round(y))
        if fractional.any():
            i = int(np.argmax(fractional))
            raise UserError(
                f"{path}: {name} holds non-integer label {y[i].item()!r} (index {i}, "
                f"{int(fractional.sum())} such labels); give integer class labels 0..K-1"
            )
        return y.astype(np.int64)
    raise UserError(
        f"{path}: {name} holds {y.dtype} values, not integer class labels; map the classes to integers "
        "0..K-1 and save those"
    )


def load_npz(path: str) -> RawData:
    """Arrays ``x`` (images) and ``y`` (integer labels); optional ``x_test`` and ``y_test`` (both or none).

    Class names are the distinct label values, sorted. See :func:`_npz_images` and :func:`_npz_labels`
    for what values are accepted; a file that is not an npz archive, holds pickled object arrays, or
    whose images and labels do not pair up one to one is an error naming the file.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"npz file {p} does not exist; give npz:PATH to a file with arrays x and y")
    raw = _read_npz(p)
    if ("x_test" in raw) != ("y_test" in raw):
        have, missing = ("x_test", "y_test") if "x_test" in raw else ("y_test", "x_test")
        raise UserError(f"{p} has {have} but no {missing}; save both test arrays or neither")
    ys = {k: _npz_labels(raw[k], k, p) for k in ("y", "y_test") if k in raw}
    for xk, yk in (("x", "y"), ("x_test", "y_test")):
        if yk in ys and (raw[xk].ndim == 0 or len(raw[xk]) != len(ys[yk])):
            n_x = len(raw[xk]) if raw[xk].ndim else "no"
            raise UserError(
                f"{p}: {xk} holds {n_x} images but {yk} holds {len(ys[yk])} labels; give one label per image"
            )
    labels = np.unique(np.concatenate(list(ys.values())))

    def index(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.searchsorted(labels, y).astype(np.int64))

    has_test = "y_test" in ys
    return RawData(
        x=_npz_images(raw["x"], "x", p),
        y=index(ys["y"]),
        classes=tuple(str(v) for v in labels.tolist()),
        x_test=_npz_images(raw["x_test"], "x_test", p) if has_test else None,
        y_test=index(ys["y_test"]) if has_test else None,
    )


def clear_cache() -> None:
    """Forget the datasets read so far in this process (they are cached per folder)."""
    _load_fashion_from.cache_clear()
    load_digits.cache_clear()
