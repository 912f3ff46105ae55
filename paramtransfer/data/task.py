"""Tasks: a spec resolved into seeded train/val/test tensors with labels re-indexed from 0."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from paramtransfer.data.sources import RawData, load_digits, load_fashion, load_folder, load_npz
from paramtransfer.data.specs import TaskSpec, parse_spec
from paramtransfer.errors import UserError

DEFAULT_SHAPE = (1, 28, 28)
_TEST_SEED = 20190101  # fixed: datasets without an official test split get the same test set for every seed
_TEST_FRACTION = 1 / 3


@dataclass
class Split:
    x: torch.Tensor  # [N, C, H, W] float32, normalised to [-1, 1]
    y: torch.Tensor  # [N] int64 in [0, num_classes)

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Task:
    """A classification task ready to train on: every split lives in memory as tensors."""

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
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    def summary(self) -> str:
        shots = f", {self.shots} shots" if self.shots else ""
        return (
            f"{self.spec}: {self.num_classes} classes{shots}, train {len(self.train)}, "
            f"val {len(self.val)}, test {len(self.test)}, input {tuple(self.in_shape)}"
        )


def fit_shape(x: torch.Tensor, in_shape: tuple[int, int, int]) -> torch.Tensor:
    """Convert images ``[N, C, H, W]`` to ``in_shape`` (grey <-> RGB, bilinear resize)."""
    c, h, w = in_shape
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1 and x.shape[1] in (3, 4):
            x = x[:, :3].mean(dim=1, keepdim=True)
        else:
            raise UserError(f"cannot convert {x.shape[1]}-channel images to the model's {c} channels")
    if tuple(x.shape[2:]) != (h, w):
        shrink = x.shape[2] > h or x.shape[3] > w
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
    return x.contiguous()


def _to_model_input(x: torch.Tensor, in_shape: tuple[int, int, int]) -> torch.Tensor:
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return (fit_shape(x, in_shape) - 0.5) / 0.5


def _load_raw(spec: TaskSpec, data_dir: str | None) -> RawData:
    if spec.dataset == "fashion":
        return load_fashion(data_dir)
    if spec.dataset == "digits":
        return load_digits()
    if spec.dataset == "folder":
        return load_folder(spec.path or "")
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
        in_shape: the model's input shape; images are converted to it (Fashion is 1x28x28 already,
            digits are upsampled from 8x8).
        data_dir: folder with the Fashion-MNIST idx files (default $PARAMTRANSFER_DATA, then Debian's).

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
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must lie in (0, 1) (got {val_fraction})")
    raw = _load_raw(parsed, data_dir)
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

    return Task(
        spec=str(parsed),
        classes=tuple(raw.classes[c] for c in chosen),
        train=Split(_to_model_input(raw.x[train_sel], in_shape), remap[raw.y[train_sel]]),
        val=Split(_to_model_input(raw.x[val_sel], in_shape), remap[raw.y[val_sel]]),
        test=Split(_to_model_input(x_test, in_shape), y_test),
        seed=seed,
        shots=shots,
        info={"dataset": parsed.dataset, "source_classes": list(chosen)},
    )
