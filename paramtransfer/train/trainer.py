"""The one training loop: fit/evaluate, per-epoch checkpoints with RNG state, early stopping on val.

The loop knows nothing about methods beyond :class:`~paramtransfer.methods.base.Method`: it asks for
parameter groups, loss terms and the backward step, and fires ``on_before_optimizer_step`` /
``on_epoch_end`` callbacks. A run killed at any point and started again with the same checkpoint path
resumes from the last finished epoch and ends bit-for-bit like an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paramtransfer.data.pipeline import Augment, sample_crops
from paramtransfer.errors import UserError
from paramtransfer.models.layered import LayeredNet, is_frozen
from paramtransfer.runtime import PRECISIONS, Runtime, check_device_name, evaluating, make_runtime
from paramtransfer.train.checkpoint import load_checkpoint, save_checkpoint

Callback = Callable[..., None]


@dataclass
class TrainConfig:
    """Optimisation settings shared by every method.

    Attributes:
        epochs: passes over the training split.
        lr: base learning rate (a parameter group's ``lr_mult`` scales it).
        batch_size: examples per step; a remainder smaller than ``min_last_batch * batch_size`` is merged
            into the previous batch, so BatchNorm never trains on a handful of examples.
        optimizer: ``sgd`` (with ``momentum``) or ``adam``.
        weight_decay: plain L2 decay applied by the optimizer.
        schedule: ``cosine`` (to 0 over ``epochs``), ``step`` (x ``step_gamma`` every ``step_every``
            epochs; 0 means a third of the epochs) or ``constant``.
        patience: stop after this many epochs without a better validation accuracy (None: never);
            in every case the weights of the best validation epoch are the ones evaluated on test.
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        channels_last: channels-last memory format (None: for every net with a Conv2d; measured here it
            makes LeNet steps ~1.4x and ResNet-20 steps ~1.35x faster, and depth-wise convolutions 3x).
        trace_test: also record test loss and accuracy after every epoch (for plots such as DTNH's
            Fig. 3; never used to select anything; costs one pass over the test split per epoch).
        augment: train on random-resized crops with horizontal flips of the training images (the
            ImageNet recipe, :class:`~paramtransfer.data.pipeline.Augment`); off by default, as for
            28x28 sources. Caches of per-example activations are off while it is on.
        device: ``auto`` (CUDA if present, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``
            (see :mod:`paramtransfer.runtime`); not part of a run's identity.
        precision: ``32``, ``bf16`` or ``16`` (autocast; ``16`` with a GradScaler).
        prefix_cache_mb: memory budget of the frozen-prefix cache (0: off). When a method allows it
            (``prefix_cacheable``: FT-l, linear probe, last-k) and the first ``l`` blocks are frozen and
            deterministic (:meth:`~paramtransfer.models.layered.LayeredNet.frozen_prefix`), their outputs
            on the training and validation splits are computed once per run and the blocks after them
            train on those; off while ``augment`` is on, and when the outputs exceed the budget.
        bn: ``train`` (BatchNorm layers normalise with batch statistics and update their running ones)
            or ``frozen``: the BatchNorm layers that come with the source (copied by
            :func:`~paramtransfer.methods.base.transfer_copy`) keep the source's running statistics and
            normalise with them while their affine parameters train (timm's / TLlib's "freeze BN"); layers
            a method initialises afresh (scratch, PTU's target) train as usual. Measured on the ImageNet
            source (``benchmarks/imagenet/README.md``): it needs a 3-10x smaller learning rate (at 0.01
            fine-tuning EfficientNet-Lite0 collapsed to a constant output), then validation preferred
            it on Fashion-MNIST and not on digits, so the default stays ``train``.
    """

    epochs: int = 30
    lr: float = 0.01
    batch_size: int = 32
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    step_every: int = 0
    step_gamma: float = 0.1
    patience: int | None = 10
    grad_clip: float | None = None
    min_last_batch: float = 0.5
    channels_last: bool | None = None
    eval_batch_size: int = 1000
    trace_test: bool = False
    augment: bool = False
    device: str = "auto"
    precision: str = "32"
    prefix_cache_mb: int = 2048
    bn: str = "train"

    def __post_init__(self) -> None:
        if self.bn not in BN_MODES:
            raise UserError(f"bn={self.bn!r} is unknown; use {' or '.join(BN_MODES)}")
        for name in ("augment", "trace_test"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false (got {getattr(self, name)!r})")
        check_device_name(self.device)
        if str(self.precision) not in PRECISIONS:
            raise UserError(f"precision {self.precision!r} is unknown; use 32, bf16 or 16")
        self.precision = str(self.precision)
        for name in ("epochs", "batch_size", "eval_batch_size", "step_every", "prefix_cache_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} must be a whole number (got {value!r})")
        if self.patience is not None and (
            isinstance(self.patience, bool) or not isinstance(self.patience, int)
        ):
            raise UserError(f"patience must be a whole number or null (got {self.patience!r})")
        for name in ("lr", "momentum", "weight_decay", "step_gamma", "min_last_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"{name} must be a number (got {value!r})")
        if self.grad_clip is not None and not (
            isinstance(self.grad_clip, int | float) and self.grad_clip > 0
        ):
            raise UserError(f"grad_clip must be a positive number or null (got {self.grad_clip!r})")
        if self.prefix_cache_mb < 0:
            raise UserError(
                f"prefix_cache_mb must be >= 0 (0 turns the cache off; got {self.prefix_cache_mb})"
            )
        if self.momentum < 0 or self.weight_decay < 0 or self.step_gamma < 0 or self.step_every < 0:
            raise UserError("momentum, weight_decay, step_gamma and step_every must be >= 0")
        if not 0 <= self.min_last_batch <= 1:
            raise UserError(f"min_last_batch must lie in [0, 1] (got {self.min_last_batch})")
        if self.eval_batch_size < 1:
            raise UserError(f"eval_batch_size must be at least 1 (got {self.eval_batch_size})")
        if self.epochs < 1:
            raise UserError(f"epochs must be at least 1 (got {self.epochs})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"learning rate must be a positive number (got {self.lr})")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1 (got {self.batch_size})")
        if self.optimizer not in ("sgd", "adam"):
            raise UserError(f"optimizer {self.optimizer!r} is unknown; use sgd or adam")
        if self.schedule not in ("cosine", "step", "constant"):
            raise UserError(f"schedule {self.schedule!r} is unknown; use cosine, step or constant")
        if self.patience is not None and self.patience < 1:
            raise UserError(f"patience must be at least 1 or null (got {self.patience})")

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of the base learning rate during ``epoch`` (0-based)."""
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        if self.schedule == "step":
            every = self.step_every or max(1, self.epochs // 3)
            return self.step_gamma ** (epoch // every)
        return 1.0


@dataclass
class FitOutcome:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_accuracy: float | None = None
    diverged: bool = False
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    cached_prefix: int = 0  # leading frozen blocks whose outputs were computed once (see TrainConfig)


def batches(n: int, batch_size: int, min_last: float, perm: torch.Tensor) -> Iterator[torch.Tensor]:
    """Index batches over ``perm``; a small remainder joins the previous batch instead of standing alone."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < min_last * batch_size:
        starts.pop()
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        yield perm[s:end]


BN_MODES = ("train", "frozen")


def freeze_source_statistics(model: nn.Module) -> None:
    """``TrainConfig.bn = "frozen"``: BatchNorm layers copied from the source normalise with the source's
    running statistics (eval mode) and leave them unchanged; their affine parameters still train."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and getattr(m, "source_statistics", False):
            m.eval()


def keep_frozen_batchnorm(model: nn.Module) -> None:
    """Put the BatchNorm layers of frozen parts in eval mode, so that their running statistics never
    change either. Frozen-ness is by module (:func:`~paramtransfer.models.layered.freeze` marks the part
    it freezes), so a BatchNorm without affine parameters in a frozen block stays fixed too; a BatchNorm
    whose affine parameters were all frozen by hand counts as frozen as well. A module may opt out with
    ``keep_training_stats = True``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not getattr(m, "keep_training_stats", False):
            params = list(m.parameters(recurse=False))
            if is_frozen(m) or (params and not any(p.requires_grad for p in params)):
                m.eval()


def _is_convnet(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def uses_channels_last(model: nn.Module, config: TrainConfig) -> bool:
    """Whether the trainer runs ``model`` in channels-last memory format (see ``TrainConfig``)."""
    return config.channels_last if config.channels_last is not None else _is_convnet(model)


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.no_grad()
def evaluate(
    method: Any,
    model: nn.Module,
    split: Any,
    y: torch.Tensor | None = None,
    batch_size: int = 1000,
    *,
    runtime: Runtime | None = None,
    channels_last: bool = False,
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``method.predict`` on a split, in eval mode.

    ``split`` is a :class:`~paramtransfer.data.task.Split` (converted to the model's input in chunks of
    ``batch_size``) or a tensor of inputs with labels ``y``. ``runtime`` gives the device and precision
    (default: the CPU in float32)."""
    rt = runtime or Runtime()
    model.eval()
    correct, loss, n = 0, 0.0, 0
    chunks = (
        split.chunks(batch_size)
        if y is None
        else ((split[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size))
    )
    for xb, yb in chunks:
        xb, yb = to_memory_format(rt.to(xb), channels_last), rt.to(yb)
        with rt.autocast():
            logits = method.predict(model, xb)
        logits = logits.float()
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
        n += len(yb)
    n = max(1, n)
    return correct / n, loss / n


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UserError("this method leaves nothing to train (every parameter is frozen)")
    for g in groups:
        g.setdefault("lr_mult", 1.0)
        g["lr"] = config.lr * g["lr_mult"]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Batches:
    """The training split as batches of model input on the run's device (converted at batch time; with
    augmentation, each batch's crops are drawn from ``gen``); streamed splits come through a DataLoader
    (see :meth:`~paramtransfer.data.files.ImageFiles.stream`)."""

    def __init__(self, split: Any, config: TrainConfig, runtime: Runtime, channels_last: bool) -> None:
        self.split, self.config, self.runtime, self.channels_last = split, config, runtime, channels_last
        self.augment = Augment() if config.augment else None

    def __call__(
        self, order: list[torch.Tensor], gen: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        split = self.split
        raws = split.images.stream(order) if split.streamed else (split.raw(idx) for idx in order)
        for idx, raw in zip(order, raws, strict=True):
            crops = None
            if self.augment is not None:
                crops = sample_crops(len(idx), raw.shape[-2], raw.shape[-1], self.augment, gen)
            x = split.convert(raw, crops)
            yield idx, to_memory_format(self.runtime.to(x), self.channels_last), self.runtime.to(split.y[idx])


@torch.no_grad()
def prefix_cache(
    model: nn.Module, method: Any, task: Any, config: TrainConfig, runtime: Runtime, channels_last: bool
) -> tuple[int, Any, Any]:
    """``(l, train, val)``: the outputs of the model's first ``l`` blocks on the training and validation
    splits as splits of model input for block ``l`` on (see ``TrainConfig.prefix_cache_mb``): ``l`` is
    the deepest frozen, deterministic block whose outputs fit the budget; ``(0, None, None)`` when there
    is nothing to cache or nothing fits."""
    from paramtransfer.data.task import Split

    if config.augment or not config.prefix_cache_mb or not getattr(method, "prefix_cacheable", False):
        return 0, None, None
    depth = model.frozen_prefix() if isinstance(model, LayeredNet) else 0
    if depth == 0 or not len(task.train):
        return 0, None, None
    with evaluating(model), runtime.autocast():
        x1 = runtime.to(task.train.inputs(slice(0, 1)))
        n = len(task.train) + len(task.val)
        # the deepest frozen block whose outputs fit the budget (deeper saves more compute)
        sizes = [(o.numel() * o.element_size() * n) for o in model.features_until(x1, depth)]
        fitting = [i + 1 for i, size in enumerate(sizes) if size <= config.prefix_cache_mb * 2**20]
        if not fitting:
            return 0, None, None
        depth = fitting[-1]
        out = []
        for split in (task.train, task.val):
            parts = [
                model.run_prefix(x, depth) for x in runtime.inputs(split, 256, channels_last=channels_last)
            ]
            out.append(Split(torch.cat(parts) if parts else x1[:0], split.y))
    return depth, out[0], out[1]


def runtime_of_config(config: TrainConfig) -> Runtime:
    """The device (resolved: an absent one is a UserError), precision, augmentation and cache budget of
    ``config``."""
    return make_runtime(config.device, config.precision, config.augment, config.prefix_cache_mb)


def fit(
    model: nn.Module,
    method: Any,
    task: Any,
    config: TrainConfig,
    *,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    fingerprint: str = "",
    progress: bool = False,
    callbacks: Sequence[Callback] = (),
) -> FitOutcome:
    """Train ``model`` on ``task.train`` with ``method``'s loss; select the best epoch on ``task.val``.

    The model moves to ``config.device``; batches are converted from raw images to its input at batch
    time (with ``config.augment``: random-resized crops and flips) and moved there; the forward pass runs
    under ``config.precision``. The method sees the same :class:`~paramtransfer.runtime.Runtime` as
    ``method.runtime``.

    Args:
        checkpoint: file written after every epoch (model, optimizer, RNG states, history); if it
            exists with the same ``fingerprint`` the run resumes from it (on any device).
        callbacks: called as ``cb("on_before_optimizer_step", model=..., terms=..., step=...)`` and
            ``cb("on_epoch_end", model=..., record=...)``.
    """
    runtime = runtime_of_config(config)
    channels_last = uses_channels_last(model, config)
    model.to(runtime.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    depth, cached_train, cached_val = prefix_cache(model, method, task, config, runtime, channels_last)
    train_batches = _Batches(
        task.train if cached_train is None else cached_train, config, runtime, channels_last
    )
    val_split = task.val if cached_val is None else cached_val
    n = len(task.train)

    def from_prefix() -> contextlib.AbstractContextManager:
        return model.starting_at(depth) if depth else contextlib.nullcontext()

    def score(split: Any) -> tuple[float, float]:
        return evaluate(
            method,
            model,
            split,
            batch_size=config.eval_batch_size,
            runtime=runtime,
            channels_last=channels_last,
        )

    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed + 7919)
    crops = torch.Generator().manual_seed(seed + 104729)  # augmentation draws (unused without augment)
    method.runtime = runtime
    method.prepare(model, task)
    optimizer = make_optimizer(method.param_groups(model), config)
    scaler = runtime.grad_scaler()
    out = FitOutcome(cached_prefix=depth)
    best_state: dict[str, torch.Tensor] | None = None
    best_key = (-1.0, -math.inf)
    bad_epochs, start_epoch, step = 0, 0, 0

    state = load_checkpoint(checkpoint) if checkpoint else None  # on the CPU: tensors load into place
    if state is not None and state.get("fingerprint") == fingerprint:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        shuffle.set_state(state["shuffle_rng"])
        if "crop_rng" in state:
            crops.set_state(state["crop_rng"])
        if state.get("cuda_rng") is not None and runtime.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], runtime.device)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        out.history = list(state["history"])
        best_state = state["best_state"]
        best_key = tuple(state["best_key"])  # type: ignore[assignment]
        out.best_epoch = state["best_epoch"]
        bad_epochs, start_epoch, step = state["bad_epochs"], state["epoch"] + 1, state["step"]
        out.resumed_from_epoch = start_epoch
        if state.get("stopped"):  # killed after early stopping but before the result was written
            out.stopped_early = True
            start_epoch = config.epochs

    epochs = range(start_epoch, config.epochs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs, initial=start_epoch, desc="epochs", leave=False)
    index_wanted = getattr(method, "wants_batch_index", False)
    for epoch in epochs:
        t0 = time.perf_counter()
        factor = config.lr_factor(epoch)
        for g in optimizer.param_groups:
            g["lr"] = config.lr * g["lr_mult"] * factor
        model.train()
        keep_frozen_batchnorm(model)
        if config.bn == "frozen":
            freeze_source_statistics(model)
        sums: dict[str, float] = {}
        seen = 0
        perm = torch.randperm(n, generator=shuffle)
        order = list(batches(n, config.batch_size, config.min_last_batch, perm))
        for idx, xb, yb in train_batches(order, crops):
            extra = {"index": idx} if index_wanted and not config.augment else {}
            with runtime.autocast(), from_prefix():
                terms = method.loss_terms(model, xb, yb, **extra)
            total = sum(terms.values())
            if not torch.isfinite(total):
                out.diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                method.backward(terms, model)
            else:  # the terms scaled alike: every backward (DTNH's projection too) is linear in them
                method.loss_scale = float(scaler.get_scale())  # for gradients computed in closed form
                method.backward({k: scaler.scale(v) for k, v in terms.items()}, model)
                scaler.unscale_(optimizer)
            for cb in callbacks:
                cb("on_before_optimizer_step", model=model, terms=terms, step=step)
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], config.grad_clip
                )
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            step += 1
            b = len(idx)
            seen += b
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * b
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) * b
        if out.diverged:
            break
        stats = method.epoch_stats()  # before evaluating: a method may settle its policy here
        with from_prefix():
            val_acc, val_loss = score(val_split)
        if not math.isfinite(val_loss):
            out.diverged = True
            break
        record = {
            "epoch": epoch + 1,
            "lr": config.lr * factor,
            "train_loss": sums["loss"] / seen,
            **{f"train_{k}": v / seen for k, v in sums.items() if k != "loss"},
            "val_accuracy": val_acc,
            "val_loss": val_loss,
            **stats,
        }
        if config.trace_test:
            record["test_accuracy"], record["test_loss"] = score(task.test)
        record["time_s"] = time.perf_counter() - t0
        for cb in callbacks:
            cb("on_epoch_end", model=model, record=record)
        out.history.append(record)
        key = (val_acc, -val_loss)
        if key > best_key:
            best_key, best_state, out.best_epoch, bad_epochs = key, _clone_state(model), epoch + 1, 0
        else:
            bad_epochs += 1
        stop = config.patience is not None and bad_epochs >= config.patience
        if checkpoint:
            save_checkpoint(
                checkpoint,
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                    "shuffle_rng": shuffle.get_state(),
                    "crop_rng": crops.get_state(),
                    "cuda_rng": torch.cuda.get_rng_state(runtime.device)
                    if runtime.device.type == "cuda"
                    else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "history": out.history,
                    "best_state": best_state,
                    "best_key": list(best_key),
                    "best_epoch": out.best_epoch,
                    "bad_epochs": bad_epochs,
                    "stopped": stop,
                },
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{val_acc:.3f}")
        if stop:
            out.stopped_early = True
            break
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
        out.best_val_accuracy = best_key[0]
    return out


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)
