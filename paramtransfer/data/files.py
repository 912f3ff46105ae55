"""Image files decoded on demand: a folder larger than its memory budget, read from disk batch by batch.

:func:`~paramtransfer.data.sources.load_folder` holds a folder's images in memory (uint8) when their
decoded size fits the budget (``memory_mb``); a larger folder becomes an :class:`ImageFiles`: the file
paths in the order of the labels and the common image shape. It indexes like the tensor it stands for,
and :meth:`ImageFiles.stream` decodes the batches of an epoch in DataLoader worker processes.

Both ways decode a file with :func:`decode_image`, so a streamed folder gives exactly the pixels of an
in-memory one: grey modes (``1``, ``L``, ``I``, ``I;16``, ``F``) become ``L``, every other mode ``RGB``;
every image is resized to the common size (the first image's) with PIL's bilinear filter; grey images
are repeated to 3 channels when the folder also holds colour images.

What is checked when: at load time every file's header is read (:func:`read_header`: PIL opens the file
and ``verify()`` checks what it can without decoding, e.g. the chunk checksums of a PNG). The pixels of
a streamed folder are decoded only when a batch needs them, so a file that is corrupt past its header
(e.g. a truncated JPEG) is reported when its batch is read, as a :class:`UserError` naming the file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from paramtransfer.errors import UserError

GREY_MODES = frozenset({"1", "L", "I", "I;16", "F"})


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _unreadable() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file it cannot read (SyntaxError: e.g. a PNG with a broken checksum)."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def unreadable_error(path: str | Path, root: str | Path, err: BaseException) -> UserError:
    return UserError(
        f"{path} is not a readable image ({first_line(err)}); remove or fix it "
        f"(every file with an image suffix in {root} must be an image)"
    )


def read_header(path: str | Path, root: str | Path) -> tuple[tuple[int, int], int]:
    """``(height, width)`` and channels (1: grey, 3: colour) of an image file, from its header.

    Nothing is decoded; ``verify()`` checks the file as far as PIL can without decoding (a no-op for
    some formats, e.g. JPEG). A file PIL cannot open is a UserError naming it (``root``: the folder)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size, mode = (im.height, im.width), im.mode
            im.verify()
    except _unreadable() as err:
        raise unreadable_error(path, root, err) from None
    return size, 1 if mode in GREY_MODES else 3


def decode_image(path: str | Path, root: str | Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """The pixels of an image file as uint8 ``[channels, *size]`` (see the module's rules).

    Every byte is decoded: a corrupt or truncated file is a UserError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = "L" if im.mode in GREY_MODES else "RGB"
            im.load()
            im = im.convert(mode)
            if (im.height, im.width) != tuple(size):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except _unreadable() as err:
        raise unreadable_error(path, root, err) from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.repeat(arr, channels, axis=0) if arr.shape[0] != channels else arr


def default_workers() -> int:
    """Decoding processes for :meth:`ImageFiles.stream`: the CPUs that training's torch threads leave
    free, at most 4; none (decoding in the main process, between steps) when the threads take every CPU.

    A worker beside OpenMP threads that spin-wait for every core slows both: measured on 2 cores with 2
    torch threads, one worker made training on a streamed folder 0.54x as fast as in memory (bench speed).
    """
    cpus = os.cpu_count() or 1
    return max(0, min(4, cpus - torch.get_num_threads()))


class ImageFiles:
    """Images on disk standing in for a uint8 tensor ``[N, C, H, W]`` (a streamed folder).

    ``paths[i]`` is row ``i`` (in the order of the labels); ``image_shape`` is the common ``(C, H, W)``
    every file is decoded to; ``root`` is the folder (named in errors). Indexing by an int64 tensor, a
    bool mask, a slice or a list gives the :class:`ImageFiles` of those rows; :meth:`load` decodes rows
    in this process, :meth:`stream` batches in worker processes.
    """

    dtype = torch.uint8

    def __init__(self, paths: Sequence[str | Path], image_shape: tuple[int, int, int], root: str | Path):
        self.paths = tuple(str(p) for p in paths)
        self.image_shape = tuple(int(v) for v in image_shape)
        self.root = str(root)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files in {self.root}, shape {tuple(self.shape)})"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.image_shape))

    def __getitem__(self, idx: torch.Tensor | slice | Sequence[int]) -> ImageFiles:
        if isinstance(idx, slice):
            return ImageFiles(self.paths[idx], self.image_shape, self.root)
        index = torch.as_tensor(idx)
        if index.dtype == torch.bool:
            index = torch.nonzero(index).flatten()
        if index.dim() != 1 or (index.numel() and index.is_floating_point()):
            raise TypeError(f"ImageFiles rows are a 1-d integer index, a mask or a slice, not {idx!r}")
        return ImageFiles([self.paths[i] for i in index.tolist()], self.image_shape, self.root)

    def decode(self, row: int) -> np.ndarray:
        """Row ``row`` decoded: uint8 ``[C, H, W]``."""
        return decode_image(self.paths[row], self.root, self.image_shape[1:], self.image_shape[0])

    def stack(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Decoded rows as one uint8 tensor ``[len(arrays), C, H, W]``."""
        if not arrays:
            return torch.empty((0, *self.image_shape), dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays))

    def load(self) -> torch.Tensor:
        """Every row decoded in this process: uint8 ``[N, C, H, W]``."""
        return self.stack([self.decode(i) for i in range(len(self))])

    def stream(self, order: Sequence[torch.Tensor], workers: int | None = None) -> Iterator[torch.Tensor]:
        """The batches of ``order`` (index tensors into these rows), decoded, in order: uint8 tensors
        ``[len(idx), C, H, W]``.

        A :class:`torch.utils.data.DataLoader` decodes them in ``workers`` processes (default
        :func:`default_workers`; 0: in this process), each with one torch thread, started afresh for each
        call. Nothing random happens there, so the batches do not depend on the number of workers. A
        file that cannot be decoded is the UserError :func:`decode_image` raises, raised here."""
        from torch.utils.data import DataLoader

        workers = default_workers() if workers is None else int(workers)
        if workers < 0:
            raise UserError(f"workers must be 0 (decode in this process) or more (got {workers})")
        rows = _Rows(self)
        loader = DataLoader(
            rows,
            batch_sampler=[torch.as_tensor(idx).tolist() for idx in order],
            num_workers=workers,
            collate_fn=rows.collate,
            worker_init_fn=_one_thread if workers else None,
            persistent_workers=False,
        )
        for batch in loader:
            if isinstance(batch, _Failure):
                raise UserError(batch.message)
            yield batch


@dataclass(frozen=True)
class _Failure:
    """A UserError met in a worker, carried back as data (a raised one would reach the caller wrapped in
    the DataLoader's multi-line report)."""

    message: str


class _Rows:
    """The map-style dataset of :meth:`ImageFiles.stream`: row ``i`` decoded, or the :class:`_Failure`;
    :meth:`collate` makes a batch of rows."""

    def __init__(self, files: ImageFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int) -> np.ndarray | _Failure:
        try:
            return self.files.decode(row)
        except UserError as err:
            return _Failure(str(err))

    def collate(self, rows: list[np.ndarray | _Failure]) -> torch.Tensor | _Failure:
        """Decoded rows -> one uint8 batch; the first failure instead, if any row failed."""
        failed = [r for r in rows if isinstance(r, _Failure)]
        return failed[0] if failed else self.files.stack(rows)  # type: ignore[arg-type]


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)
