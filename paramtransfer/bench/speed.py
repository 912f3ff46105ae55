"""Training-step and evaluation time of methods relative to plain fine-tuning, in one process.

Steps of all methods are interleaved (round-robin) and the median of the repeats is taken, so that
machine load affects every method alike. Each method runs exactly as the trainer runs it: the
trainer's optimizer, BatchNorm handling and memory format. A spec's ``arch.`` options (as in compare)
change the architecture it runs on, e.g. ``finetune[arch.depth=38]``.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from paramtransfer.data.task import Split
from paramtransfer.experiments.compare import split_arch_options
from paramtransfer.methods.base import make_method, parse_method_spec
from paramtransfer.models.zoo import build_model
from paramtransfer.train.trainer import (
    TrainConfig,
    keep_frozen_batchnorm,
    make_optimizer,
    to_memory_format,
    uses_channels_last,
)


def _steppers(
    spec: str,
    arch: str,
    batch: int,
    seed: int,
    *,
    input_shape: Sequence[int] | None = None,
    source_in_shape: Sequence[int] | None = None,
    source_classes: int = 5,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A training step and an evaluation pass of ``spec`` on ``arch``, each over one batch of ``batch``
    random inputs (five classes), as the trainer runs them.

    The source is ``build_model(arch, source_classes, in_shape=source_in_shape)`` (the zoo's default
    1x28x28 when None), with random weights; the method builds its model for ``input_shape`` (default: the
    source's), which is also the shape of the inputs, so a source can be fed inputs of another size than
    its native one, as a run with ``image_size`` does (e.g. EfficientNet-Lite0 built for 3x224x224, fed
    3x64x64)."""
    name, options = parse_method_spec(spec)
    options, arch_kwargs = split_arch_options(options)  # finetune[arch.depth=38]: a deeper source
    source_shape = tuple(source_in_shape) if source_in_shape is not None else None
    source = build_model(arch, source_classes, in_shape=source_shape, seed=seed, **arch_kwargs)
    shape = tuple(input_shape) if input_shape is not None else tuple(source.in_shape)
    method = make_method(name, **options)
    model = method.build(source, 5, arch=arch, in_shape=shape, seed=seed)
    channels_last = uses_channels_last(model, TrainConfig())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    x = to_memory_format(torch.randn(batch, *shape, generator=gen), channels_last)
    y = torch.randint(0, 5, (batch,), generator=gen)
    method.prepare(model, SimpleNamespace(train=Split(x, y)))  # x: model inputs already (no spec)
    optimizer = make_optimizer(method.param_groups(model), TrainConfig())
    extra = {"index": torch.arange(batch)} if method.wants_batch_index else {}  # x is the "training set"

    def train_step() -> None:
        model.train()
        keep_frozen_batchnorm(model)
        terms = method.loss_terms(model, x, y, **extra)
        optimizer.zero_grad(set_to_none=True)
        method.backward(terms, model)
        optimizer.step()

    @torch.no_grad()
    def eval_step() -> None:
        model.eval()
        method.predict(model, x)

    return train_step, eval_step


def _interleaved_medians(fns: dict[str, Callable[[], float]], repeats: int, warmup: int) -> dict[str, float]:
    """Median over ``repeats`` rounds of the seconds each ``fn`` reports for itself.

    Every fn runs ``warmup`` times first; then each round calls every fn once, in turn (round-robin),
    so that a change of machine load during the measurement affects all of them alike. The order is
    shuffled every round (seeded): in a fixed order, a step measured right after a heavy one (PTU's)
    came out ~10-15 % slower than the same work measured elsewhere in the round. A fn times only the part
    that is to be compared and leaves its own set-up (e.g. copying a model) out of the clock.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    shuffle = random.Random(0)
    for _ in range(repeats):
        shuffle.shuffle(order)
        for k in order:
            times[k].append(fns[k]())
    return {k: statistics.median(v) for k, v in times.items()}


def _timed(fn: Callable[[], None]) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def _median_times(fns: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    return _interleaved_medians({k: _timed(fn) for k, fn in fns.items()}, repeats, warmup)


def measure_arch(
    arch: str,
    specs: Sequence[str],
    *,
    batch: int,
    repeats: int,
    warmup: int = 3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    input_shape: Sequence[int] | None = None,
    source_in_shape: Sequence[int] | None = None,
    source_classes: int = 5,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of one training step and of one evaluation pass of every spec on ``arch``.

    All models are built first; then the training steps of all specs are interleaved, then their
    evaluation passes. ``log`` (if given) receives one line per model built and per phase.
    ``input_shape``, ``source_in_shape``, ``source_classes``: see :func:`_steppers` (the defaults: the
    zoo's 1x28x28 source with five classes, fed inputs of its own shape).
    """
    pairs = {}
    for spec in specs:
        if log is not None:
            log(f"{arch}: building {spec}")
        pairs[spec] = _steppers(
            spec,
            arch,
            batch,
            seed,
            input_shape=input_shape,
            source_in_shape=source_in_shape,
            source_classes=source_classes,
        )
    if log is not None:
        log(f"{arch}: timing training steps ({len(pairs)} methods x {repeats} repeats, interleaved)")
    train = _median_times({m: p[0] for m, p in pairs.items()}, repeats, warmup)
    if log is not None:
        log(f"{arch}: timing evaluation ({len(pairs)} methods x {repeats} repeats, interleaved)")
    evals = _median_times({m: p[1] for m, p in pairs.items()}, repeats, warmup)
    return train, evals


def step_time_ratios(
    archs: Sequence[str],
    methods: Sequence[str],
    *,
    baseline: str = "finetune",
    batch: int = 128,
    repeats: int = 20,
    warmup: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Median step times (ms) and their ratios to ``baseline`` for every arch and method.

    Returns ``{"train_step_ms": {arch: {method: ms}}, "eval_ms": {...}, "train_step_ratio": {...},
    "eval_ratio": {...}, "batch": batch, "repeats": repeats, "threads": n}``.
    """
    out: dict[str, Any] = {"batch": batch, "repeats": repeats, "threads": torch.get_num_threads()}
    for key in ("train_step_ms", "eval_ms", "train_step_ratio", "eval_ratio"):
        out[key] = {}
    for arch in archs:
        specs = [baseline, *[m for m in methods if m != baseline]]
        train, evals = measure_arch(arch, specs, batch=batch, repeats=repeats, warmup=warmup, seed=seed)
        out["train_step_ms"][arch] = {m: 1000 * t for m, t in train.items()}
        out["eval_ms"][arch] = {m: 1000 * t for m, t in evals.items()}
        out["train_step_ratio"][arch] = {m: train[m] / train[baseline] for m in specs if m != baseline}
        out["eval_ratio"][arch] = {m: evals[m] / evals[baseline] for m in specs if m != baseline}
    return out
