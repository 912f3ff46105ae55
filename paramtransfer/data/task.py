"""Tasks: a spec resolved into seeded train/val/test tensors with labels re-indexed from 0."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from paramtransfer.data.pipeline import InputSpec, to_input
from paramtransfer.data.sources import (
    DEFAULT_MEMORY_MB,
    RawData,
    check_memory_mb,
    load_digits,
    load_fashion,
    load_folder,
    load_npz,
)
from paramtransfer.data.specs import TaskSpec, parse_spec
from paramtransfer.errors import UserError

DEFAULT_SHAPE = (1, 28, 28)
_TEST_SEED = 20190101  # fixed: datasets without an official test split get the same test set for every seed
_TEST_FRACTION = 1 / 3


@dataclass
class Split:
    """One split of a task: raw images and labels; :meth:`inputs` converts rows to the model's input.

    Attributes:
        images: the pixels as the dataset gives them, ``[N, C, H, W]`` at native resolution: uint8, or
            float in [0, 1] (e.g. digits); or an object with the same indexing that reads them from disk
            on demand (a streamed folder, :class:`~paramtransfer.data.files.ImageFiles`).
        y: ``[N]`` int64 labels in ``[0, num_classes)``.
        spec: the model's input (:class:`InputSpec`), set by :func:`load_task` / :meth:`Task.with_input`;
            ``None``: ``images`` already are model inputs (hand-made splits) and pass unchanged.
    """

    images: Any
    y: torch.Tensor  # [N] int64 in [0, num_classes)
    spec: InputSpec | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def streamed(self) -> bool:
        """Whether the images are read from disk batch by batch (not held in memory)."""
        return not isinstance(self.images, torch.Tensor)

    def raw(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Rows ``idx`` (all by default) of the raw images, decoded."""
        rows = self.images if idx is None else self.images[idx]
        return rows if isinstance(rows, torch.Tensor) else rows.load()

    def convert(self, raw: torch.Tensor, crops: torch.Tensor | None = None) -> torch.Tensor:
        """Raw rows -> model input (see :func:`~paramtransfer.data.pipeline.to_input`)."""
        if self.spec is None:
            return raw
        return to_input(raw, self.spec, crops)

    def inputs(
        self, idx: torch.Tensor | slice | None = None, crops: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``idx`` converted to the model's input (``crops``: training augmentation)."""
        return self.convert(self.raw(idx), crops)

    @property
    def x(self) -> torch.Tensor:
        """The whole split as model input (converted on every access: loops over a large split should use
        :meth:`chunks`)."""
        return self.inputs()

    def chunks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, labels)`` of consecutive rows, ``size`` at a time, in order (a streamed split is
        decoded in worker processes, see :meth:`~paramtransfer.data.files.ImageFiles.stream`)."""
        starts = range(0, len(self), size)
        if self.streamed:
            order = [torch.arange(s, min(s + size, len(self))) for s in starts]
            for idx, raw in zip(order, self.images.stream(order), strict=True):
                yield self.convert(raw), self.y[idx]
            return
        for start in starts:
            rows = slice(start, start + size)
            yield self.inputs(rows), self.y[rows]

    def with_spec(self, spec: InputSpec | None) -> Split:
        return Split(self.images, self.y, spec)


@dataclass
class Task:
    """A classification task ready to train on: labelled splits of raw images and the input they are
    converted to at batch time (:class:`InputSpec`, the same for every split)."""

    spec: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    seed: int = 0
    shots: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_spec(self) -> InputSpec | None:
        return self.train.spec

    @property
    def in_shape(self) -> tuple[int, int, int]:
        if self.train.spec is not None:
            return self.train.spec.in_shape
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def with_input(self, spec: InputSpec) -> Task:
        """The same task (same images, same splits) converted to another input; nothing is copied."""
        splits = {name: getattr(self, name).with_spec(spec) for name in ("train", "val", "test")}
        return dataclasses.replace(self, **splits)

    def summary(self) -> str:
        shots = f", {self.shots} shots" if self.shots else ""
        return (
            f"{self.spec}: {self.num_classes} classes{shots}, train {len(self.train)}, "
            f"val {len(self.val)}, test {len(self.test)}, input {tuple(self.in_shape)}"
        )


def _load_raw(spec: TaskSpec, data_dir: str | None, memory_mb: float) -> RawData:
    if spec.dataset == "fashion":
        return load_fashion(data_dir)
    if spec.dataset == "digits":
        return load_digits()
    if spec.dataset == "folder":
        return load_folder(spec.path or "", memory_mb)
    return load_npz(spec.path or "")


def _split_per_class(y: torch.Tensor, num_classes: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A random permutation of each class's indices."""
    out = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        out.append(idx[torch.randperm(len(idx), generator=gen)])
    return out


def _fixed_test_indices(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The test images of a dataset without an official test split: a fixed third of each class.

    Drawn over *all* the dataset's classes in label order, so an image's split depends only on the
    dataset and the image, never on the class selection of a spec or on the seed: no test image of
    ``digits[5-9]`` is a training image of ``digits`` (for the full dataset the draw is the one used
    before this rule, so full-dataset splits are unchanged).
    """
    parts = _split_per_class(y, num_classes, torch.Generator().manual_seed(_TEST_SEED))
    return torch.cat([p[: max(1, math.floor(len(p) * _TEST_FRACTION))] for p in parts])


def _one_class_message(parsed: TaskSpec, spec: str, name: str, n_all: int) -> str:
    head = f"a classification task needs at least 2 classes; {spec!r} has only class {name!r}"
    if parsed.classes is None:  # a user file: the data itself holds one class
        return f"{head}; give images of at least 2 classes"
    c = parsed.classes[0]
    more = f"{c}-{n_all - 1}" if c < n_all - 1 else f"0-{c}"
    return f"{head}; select more, e.g. {parsed.dataset}[{more}]"


def load_task(
    spec: str,
    shots: int | None = None,
    seed: int = 0,
    *,
    val_shots: int | None = None,
    val_fraction: float = 0.1,
    limit: int | None = None,
    test_limit: int | None = None,
    in_shape: tuple[int, int, int] = DEFAULT_SHAPE,
    data_dir: str | None = None,
    input_spec: InputSpec | None = None,
    image_size: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> Task:
    """Resolve a task spec into seeded train/val/test splits.

    Args:
        spec: ``fashion[0-4]``, ``fashion``, ``digits``, ``digits[0-4]``, ``folder:PATH`` or ``npz:PATH``.
        shots: labelled training examples per class (a low-resource target); ``None`` keeps them all.
        seed: seeds the choice of training and validation examples.
        val_shots: validation examples per class when ``shots`` is set (default: ``shots``). Without
            ``shots``, ``val_fraction`` of each class's training pool is held out instead.
        limit: cap on the number of training examples (random, seeded), e.g. to pretrain quickly.
        test_limit: cap on the number of test examples (random, fixed across seeds).
        in_shape: the model's input shape; images are converted to it at batch time (Fashion is 1x28x28
            already, digits are upsampled from 8x8), normalised to [-1, 1].
        input_spec: the model's input in full (channels, size, normalisation); overrides ``in_shape``.
        image_size: the side the images are resized to (overrides the size of ``in_shape``/``input_spec``).
        data_dir: folder with the Fashion-MNIST idx files (default $PARAMTRANSFER_DATA, then Debian's).
        memory_mb: memory budget (MiB) for a folder's decoded images; a larger folder is streamed from
            disk batch by batch (:func:`~paramtransfer.data.sources.load_folder`). Other datasets ignore it.

    Images stay raw (native resolution, uint8 where the data are 8-bit); each split converts them to
    the model's input when a batch is taken (:meth:`Split.inputs`).

    The validation split is carved out of the training split; the test split is the dataset's official
    one (Fashion) or a fixed third of each class (digits, folders, npz without ``x_test``).
    A task needs at least 2 classes: a one-class selection (``digits[3]``) or file is a UserError, as
    training on it would report a meaningless 100 %.
    """
    parsed = parse_spec(spec)
    if shots is not None and shots < 1:
        raise UserError(f"shots must be at least 1 (got {shots})")
    if val_shots is not None and val_shots < 1:
        raise UserError(f"val_shots must be at least 1 (got {val_shots})")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= 4096
    ):
        raise UserError(f"image_size must be a whole number of pixels from 1 to 4096 (got {image_size!r})")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must lie in (0, 1) (got {val_fraction})")
    memory_mb = check_memory_mb(memory_mb)
    raw = _load_raw(parsed, data_dir, memory_mb)
    n_all = len(raw.classes)
    chosen = parsed.classes if parsed.classes is not None else tuple(range(n_all))
    bad = [c for c in chosen if c >= n_all]
    if bad:
        raise UserError(
            f"class {bad[0]} in {spec!r} is outside {parsed.dataset}, which has classes 0-{n_all - 1}"
        )
    if len(chosen) < 2:
        raise UserError(_one_class_message(parsed, spec, raw.classes[chosen[0]], n_all))

    remap = torch.full((n_all,), -1, dtype=torch.int64)
    remap[list(chosen)] = torch.arange(len(chosen))
    k = len(chosen)

    pool_y = remap[raw.y]
    pool_idx = torch.nonzero(pool_y >= 0).flatten()
    if raw.x_test is not None and raw.y_test is not None:
        test_y_all = remap[raw.y_test]
        test_idx = torch.nonzero(test_y_all >= 0).flatten()
        x_test, y_test = raw.x_test[test_idx], test_y_all[test_idx]
    else:
        test_sel = _fixed_test_indices(raw.y, n_all)
        test_sel = test_sel[pool_y[test_sel] >= 0]
        x_test, y_test = raw.x[test_sel], pool_y[test_sel]
        keep = torch.ones(len(pool_y), dtype=torch.bool)
        keep[test_sel] = False
        pool_idx = torch.nonzero(keep & (pool_y >= 0)).flatten()

    pool_labels = pool_y[pool_idx]
    gen = torch.Generator().manual_seed(int(seed))
    train_parts, val_parts = [], []
    for c, perm in enumerate(_split_per_class(pool_labels, k, gen)):
        name = raw.classes[chosen[c]]
        n_c = len(perm)
        if shots is not None:
            n_val = val_shots if val_shots is not None else shots
            if shots > n_c - 1:
                raise UserError(
                    f"shots={shots} is more than class {name!r} of {spec} can give "
                    f"({n_c} training examples, at least 1 needed for validation); use shots <= {n_c - 1}"
                )
            n_val = min(n_val, n_c - shots)
            train_parts.append(perm[:shots])
            val_parts.append(perm[shots : shots + n_val])
        else:
            if n_c < 2:
                raise UserError(f"class {name!r} of {spec} has {n_c} training example(s); need at least 2")
            n_val = max(1, round(val_fraction * n_c))
            val_parts.append(perm[:n_val])
            train_parts.append(perm[n_val:])
    train_sel = pool_idx[torch.cat(train_parts)]
    val_sel = pool_idx[torch.cat(val_parts)]
    if limit is not None:
        if limit < k:
            raise UserError(f"limit={limit} is smaller than the number of classes ({k})")
        train_sel = train_sel[torch.randperm(len(train_sel), generator=gen)[:limit]]
    # A fixed order (by index) so that the batch order depends only on the trainer's own generator.
    train_sel = train_sel.sort().values
    val_sel = val_sel.sort().values
    if test_limit is not None and test_limit < len(y_test):
        pick = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(_TEST_SEED))[:test_limit]
        x_test, y_test = x_test[pick], y_test[pick]

    spec_in = (input_spec or InputSpec.of(in_shape)).resized(image_size)
    return Task(
        spec=str(parsed),
        classes=tuple(raw.classes[c] for c in chosen),
        train=Split(raw.x[train_sel], remap[raw.y[train_sel]], spec_in),
        val=Split(raw.x[val_sel], remap[raw.y[val_sel]], spec_in),
        test=Split(x_test, y_test, spec_in),
        seed=seed,
        shots=shots,
        info={"dataset": parsed.dataset, "source_classes": list(chosen)},
    )
