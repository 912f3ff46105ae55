"""The speed suite behind ``paramtransfer bench speed``: what each method costs next to fine-tuning.

Five measurements, all on synthetic data (speed does not depend on the pixel values) and all in the
calling process except the memory one:

* **step and evaluation time** of every method relative to plain fine-tuning (``finetune``) on the
  same architecture and batch: all models of one architecture are built first, then their training
  steps run interleaved (round-robin, one step of each method per round) and the median over
  ``repeats`` rounds is taken, then the same for one evaluation forward pass
  (:func:`paramtransfer.bench.speed.measure_arch`). A step is exactly what the trainer does per
  batch: the method's loss terms, its backward (DTNH's correction included) and the optimizer step.
* **DTNH over its base regulariser**: ``dtnh:l2sp`` / ``l2sp`` etc., from the same interleaved medians.
* **trainer over a bare loop**: images per second of :func:`paramtransfer.train.trainer.fit`
  (``finetune`` on LeNet, one epoch) divided by those of a plain PyTorch loop (see
  :func:`trainer_over_bare_loop`).
* **peak resident memory** of a fresh Python process that builds one method's model and runs a few
  training steps, one child process at a time (see :func:`peak_rss_mb`).
* **ImageNet-scale rows** (``imagenet=True``, the default): on EfficientNet-Lite0 at 64 px fed from raw
  1x28x28 uint8 images converted at batch time (as a Fashion-MNIST target is), the trainer over a bare
  loop that converts alike; whole fits of every FT-l (frozen-prefix cache on) and of the linear probe
  over FT-0's; a folder of JPEGs streamed from disk over the same folder in memory; and one training step
  and one evaluation pass of PTU, SpotTune, the regularisers and their DTNH variants next to fine-tuning's
  (batch 16 of 3x64x64 inputs; see :func:`imagenet_section`).

Example:
    >>> from paramtransfer.bench.speedsuite import run_speed_suite
    >>> r = run_speed_suite(None, archs=("lenet",), methods=["l2sp", "dtnh:l2sp"], repeats=3, imagenet=False)
    >>> r["dtnh_over_base"]["lenet"]["l2sp"]  # doctest: +SKIP
    1.04
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paramtransfer.bench.speed import _interleaved_medians, _steppers, measure_arch
from paramtransfer.data.files import default_workers
from paramtransfer.data.pipeline import InputSpec, to_input
from paramtransfer.data.task import Split, Task, load_task
from paramtransfer.errors import UserError
from paramtransfer.experiments.compare import split_arch_options
from paramtransfer.experiments.executors import child_pythonpath
from paramtransfer.methods.base import METHODS, make_method, parse_method_spec
from paramtransfer.models.zoo import build_model, list_models
from paramtransfer.train.checkpoint import atomic_write_json
from paramtransfer.train.trainer import TrainConfig, fit, to_memory_format, uses_channels_last

BASELINE = "finetune"
DTNH_VARIANTS = ("dtnh:l2sp", "dtnh:knowdist", "dtnh:delta")
# examples in the trainer-vs-bare-loop epoch (rounded up to whole batches, so both loops take the
# same batches: the trainer would otherwise merge a small remainder into the last batch)
TRAINER_EXAMPLES = 2048
RSS_STEPS = 3  # training steps a memory child runs (the first allocates; later ones reuse the memory)
WARMUP = 3
NUM_CLASSES = 5

# The ImageNet-scale rows (imagenet_section); about 6-7 minutes on one or two threads with the defaults
IMAGENET_ARCH = "efficientnet_lite0"
IMAGENET_SOURCE_SHAPE = (3, 224, 224)  # the ImageNet source's native input (its weights are random here)
IMAGENET_SOURCE_CLASSES = 1000
IMAGENET_SIZE = 64  # side of the model input (the demo's and benchmarks/imagenet's 64 px)
IMAGENET_RAW_SHAPE = (1, 28, 28)  # the raw uint8 images, converted at batch time as Fashion-MNIST's are
IMAGENET_BATCH = 16  # as benchmarks/imagenet
IMAGENET_REPEATS = 3  # at most this many interleaved rounds: a round is whole epochs and fits, not steps
IMAGENET_LOOP_EXAMPLES = 320  # the trainer-vs-bare-loop epoch (rounded up to whole batches)
IMAGENET_TRAIN = 100  # training images of each whole fit (FT-0, FT-l, linear probe): 10 shots x 10
IMAGENET_VAL = 100  # validation images, evaluated after every epoch (as benchmarks/imagenet)
IMAGENET_EPOCHS = 15  # as benchmarks/imagenet: a fit here is one run of that suite
FOLDER_FILES = 400  # JPEGs of the streamed-vs-in-memory row
FOLDER_IMAGE_SIZE = 48  # their side (RGB)
STREAMED_MEMORY_MB = 1e-3  # a folder budget (1 KiB) below any folder's decoded size: it streams
# The per-step rows of EfficientNet-Lite0 (imagenet_step_ratios): these specs, finetune the baseline
IMAGENET_STEP_METHODS = [
    "finetune",
    "ptu",
    "ptu[layers=[2,4,6,7]]",
    "spottune",
    "spottune_global",
    "l2sp",
    "dtnh:l2sp",
    "knowdist",
    "dtnh:knowdist",
    "delta",
    "dtnh:delta",
]
IMAGENET_STEP_REPEATS = 10  # at most this many interleaved rounds of single steps (fewer if repeats is)
IMAGENET_STEP_WARMUP = 2  # steps (and evaluation passes) of each spec before the rounds

# name -> (op, limit): met when every measured arch's value satisfies `value op limit`
TARGETS: dict[str, tuple[str, float]] = {
    "ptu_train_step_ratio": ("<=", 1.8),
    "dtnh_over_l2sp": ("<=", 1.10),
    "dtnh_over_knowdist": ("<=", 1.5),
    "trainer_over_bare_loop": (">=", 0.95),
    "imagenet_trainer_over_bare_loop": (">=", 0.95),
    "ftl_sweep_over_ft0": ("<=", 2.5),
    "linear_probe_over_ft0": ("<=", 0.1),
    "streamed_over_memory": (">=", 0.9),
}
# target name -> the key of result["imagenet"] it judges (values keyed by IMAGENET_ARCH)
IMAGENET_TARGETS = {
    "imagenet_trainer_over_bare_loop": "trainer_over_bare_loop",
    "ftl_sweep_over_ft0": "ftl_sweep_over_ft0",
    "linear_probe_over_ft0": "linear_probe_over_ft0",
    "streamed_over_memory": "streamed_over_memory",
}

_CHILD = "import sys; from paramtransfer.bench.speedsuite import _child; _child(sys.argv[1:])"


def run_speed_suite(
    out: str | Path | None = "benchmarks/speed/results.json",
    *,
    archs: Sequence[str] = ("lenet", "resnet20"),
    methods: Sequence[str] | None = None,
    batch: int = 128,
    repeats: int = 20,
    progress: bool = True,
    imagenet: bool = True,
) -> dict[str, Any]:
    """Measure every method's training-step and evaluation cost, the trainer's overhead, peak memory and
    (``imagenet``) the EfficientNet-Lite0 rows.

    Args:
        out: JSON file written atomically at the end (None: write nothing).
        archs: zoo architectures to measure on.
        methods: method specs (options allowed, e.g. ``ptu[kernel_size=1]``); None: every registered
            method that trains and supports the architecture (K-NN and random guess do not train),
            which includes ``dtnh:l2sp``, ``dtnh:knowdist`` and ``dtnh:delta``. ``finetune`` is always
            measured, as the baseline.
        batch: examples per training step and per evaluation pass.
        repeats: interleaved rounds whose median is taken (also for the trainer-vs-bare-loop epochs; the
            EfficientNet-Lite0 rows take at most ``IMAGENET_REPEATS`` of them for epochs and fits, at most
            ``IMAGENET_STEP_REPEATS`` for single steps).
        progress: one line per architecture/method and phase on stderr.
        imagenet: also measure the EfficientNet-Lite0 rows (:func:`imagenet_section`; about 6-7 minutes).

    Returns:
        ``train_step_ms`` / ``eval_ms``: ``{arch: {method: median ms}}``, ``finetune`` included.
        ``train_step_ratio`` / ``eval_ratio``: the same divided by ``finetune``'s; ``finetune`` itself is
        not listed (its ratio is 1 by definition).
        ``dtnh_over_base``: ``{arch: {base: ms of dtnh:base / ms of base}}`` for every DTNH spec whose
        base was measured too.
        ``trainer_over_bare_loop``: see :func:`trainer_over_bare_loop`; its timings are under
        ``trainer_over_bare_loop_detail``.
        ``peak_rss_mb``: ``{arch: {method: MB}}`` for every method measured (see :func:`peak_rss_mb`);
        ``rss_import_mb``: the same for a child that only imports torch and paramtransfer, to subtract.
        ``imagenet``: the EfficientNet-Lite0 rows, see :func:`imagenet_section` (absent with
        ``imagenet=False``).
        ``targets``: ``{name: {"op", "limit", "values": {arch: value}, "met"}}``; ``met`` is true when
        every measured value meets the limit, None when nothing was measured for it.
        Plus ``command``, ``batch``, ``repeats``, ``threads``, ``torch``, ``date``, ``wall_time_s`` and
        ``load_average`` (the machine's 1-minute load before and after; compare it with ``threads``).

    Raises:
        UserError: an unknown architecture or method, a method that does not train, or one that does
            not support a requested architecture.
    """
    t_start = time.perf_counter()
    load_before = _load_average()
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"batch must be a whole number >= 1 (got {batch!r})")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise UserError(f"repeats must be a whole number >= 1 (got {repeats!r})")
    if not isinstance(imagenet, bool):
        raise UserError(f"imagenet must be true or false (got {imagenet!r})")
    plan = {arch: _specs_for(arch, methods) for arch in _check_archs(archs)}
    if imagenet:
        _specs_for(IMAGENET_ARCH, IMAGENET_STEP_METHODS)  # a bad constant fails now, not minutes in
    log = _progress_log(t_start) if progress else None
    threads = torch.get_num_threads()

    result: dict[str, Any] = {
        key: {} for key in ("train_step_ratio", "eval_ratio", "train_step_ms", "eval_ms", "dtnh_over_base")
    }
    for arch, specs in plan.items():
        train, evals = measure_arch(arch, specs, batch=batch, repeats=repeats, warmup=WARMUP, log=log)
        result["train_step_ms"][arch] = {m: 1000 * s for m, s in train.items()}
        result["eval_ms"][arch] = {m: 1000 * s for m, s in evals.items()}
        result["train_step_ratio"][arch] = {m: train[m] / train[BASELINE] for m in specs if m != BASELINE}
        result["eval_ratio"][arch] = {m: evals[m] / evals[BASELINE] for m in specs if m != BASELINE}
        result["dtnh_over_base"][arch] = _dtnh_over_base(train)

    if log is not None:
        log(f"lenet: trainer vs bare loop ({_examples(batch)} examples, {repeats} epochs each, interleaved)")
    detail = trainer_over_bare_loop(batch=batch, repeats=repeats)
    result["trainer_over_bare_loop"] = detail.pop("ratio")
    result["trainer_over_bare_loop_detail"] = detail
    if imagenet:
        result["imagenet"] = imagenet_section(repeats=repeats, log=log)

    result["rss_import_mb"] = peak_rss_mb(None, "lenet", batch=batch, threads=threads)
    result["peak_rss_mb"] = {}
    for arch, specs in plan.items():
        result["peak_rss_mb"][arch] = {}
        for spec in specs:
            if log is not None:
                log(f"{arch}: peak memory of {spec} (fresh process)")
            result["peak_rss_mb"][arch][spec] = peak_rss_mb(spec, arch, batch=batch, threads=threads)

    result["targets"] = _targets(result)
    result.update(
        command="paramtransfer bench speed",
        batch=batch,
        repeats=repeats,
        threads=threads,
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        load_average=[load_before, _load_average()],
        wall_time_s=time.perf_counter() - t_start,
    )
    if out is not None:
        atomic_write_json(out, result)
        if log is not None:
            log(f"wrote {out}")
    return result


# ---- which methods --------------------------------------------------------------------------------


def _check_archs(archs: Sequence[str]) -> list[str]:
    if isinstance(archs, str):  # ("lenet") is a string, not a tuple: one arch, not five letters
        archs = [archs]
    known = list_models()
    for arch in archs:
        if arch not in known:
            raise UserError(f"unknown arch {arch!r}; known: {', '.join(known)}")
    if not archs:
        raise UserError(f"give at least one arch, e.g. archs=('lenet',); known: {', '.join(known)}")
    return list(dict.fromkeys(archs))


def _supports(cls: type, arch: str) -> bool:
    supported = getattr(cls, "supported_archs", None)  # the same rule as the method matrix's tests
    return supported is None or arch in supported


def default_methods(arch: str) -> list[str]:
    """Every registered method that trains and supports ``arch``, plus the DTNH variants."""
    names = [n for n in METHODS.names() if METHODS.get(n).trains and _supports(METHODS.get(n), arch)]
    return list(dict.fromkeys([*names, *DTNH_VARIANTS]))


def _specs_for(arch: str, methods: Sequence[str] | None) -> list[str]:
    """``finetune`` first, then the requested specs (validated before anything is measured)."""
    if isinstance(methods, str):
        raise UserError(f"give methods as a list, e.g. [{methods!r}], not as one string")
    specs = default_methods(arch) if methods is None else [s.strip() for s in methods]
    for spec in specs:
        name, options = parse_method_spec(spec)
        cls = METHODS.get(name)  # UserError naming the known methods
        if not cls.trains:
            raise UserError(
                f"method {name!r} does not train, so it has no training step to time; leave it out"
            )
        if not _supports(cls, arch):
            raise UserError(
                f"method {name!r} does not support arch {arch!r} (only {', '.join(cls.supported_archs)}); "
                "leave it out or choose archs it supports"
            )
        make_method(name, **split_arch_options(options)[0])  # unknown options fail here, not mid-run
    return list(dict.fromkeys([BASELINE, *specs]))


def _dtnh_over_base(train: dict[str, float]) -> dict[str, float]:
    out = {}
    for spec, seconds in train.items():
        if not spec.startswith("dtnh:"):
            continue
        base = spec[len("dtnh:") :]
        if base not in train:  # dtnh:l2sp[granularity=tensor] -> l2sp
            base = parse_method_spec(base)[0]
        if base in train:
            out[spec[len("dtnh:") :]] = seconds / train[base]
    return out


def _targets(result: dict[str, Any]) -> dict[str, Any]:
    values = {
        "ptu_train_step_ratio": {a: r["ptu"] for a, r in result["train_step_ratio"].items() if "ptu" in r},
        "dtnh_over_l2sp": {a: r["l2sp"] for a, r in result["dtnh_over_base"].items() if "l2sp" in r},
        "dtnh_over_knowdist": {
            a: r["knowdist"] for a, r in result["dtnh_over_base"].items() if "knowdist" in r
        },
        "trainer_over_bare_loop": {"lenet": result["trainer_over_bare_loop"]},
    }
    net = result.get("imagenet") or {}
    for name, key in IMAGENET_TARGETS.items():
        values[name] = {IMAGENET_ARCH: net[key]} if key in net else {}
    # the per-step targets also judge EfficientNet-Lite0's steps, where the section measured them
    net_steps = net.get("train_step_ratio") or {}
    net_dtnh = net.get("dtnh_over_base") or {}
    for name, ratios, key in (
        ("ptu_train_step_ratio", net_steps, "ptu"),
        ("dtnh_over_l2sp", net_dtnh, "l2sp"),
        ("dtnh_over_knowdist", net_dtnh, "knowdist"),
    ):
        if key in ratios:
            values[name][IMAGENET_ARCH] = ratios[key]
    out = {}
    for name, (op, limit) in TARGETS.items():
        got = values[name]
        ok = [v <= limit if op == "<=" else v >= limit for v in got.values()]
        out[name] = {"op": op, "limit": limit, "values": got, "met": all(ok) if ok else None}
    return out


def _progress_log(t_start: float) -> Callable[[str], None]:
    def line(message: str) -> None:
        print(f"[bench speed +{time.perf_counter() - t_start:.0f}s] {message}", file=sys.stderr, flush=True)

    return line


def _load_average() -> float | None:
    """The 1-minute load average: timings taken while other processes compete for the cores are
    unreliable (with OpenMP threads on busy cores, steps can be many times slower), so it is recorded."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


# ---- the trainer against a bare PyTorch loop --------------------------------------------------------


def _whole_batches(n: int, batch: int) -> int:
    """``n`` rounded up to whole batches (so that the trainer merges no small remainder into the last
    batch and both loops take the same batches)."""
    return batch * math.ceil(n / batch)


def _examples(batch: int) -> int:
    return _whole_batches(TRAINER_EXAMPLES, batch)


def synthetic_dataset(
    n: int, in_shape: tuple[int, ...], num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` learnable examples: a random prototype per class plus unit Gaussian noise, balanced labels."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *in_shape, generator=gen)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=gen)]
    return prototypes[y] + torch.randn(n, *in_shape, generator=gen), y


def synthetic_raw_images(
    n: int, shape: tuple[int, ...], num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`synthetic_dataset` as an 8-bit dataset stores it: uint8 pixels ``128 + 40 * value``
    (rounded, clipped to 0..255), ``[n, *shape]``, with the same labels."""
    x, y = synthetic_dataset(n, shape, num_classes, seed)
    return (128 + 40 * x).round().clamp(0, 255).to(torch.uint8), y


def bare_loop(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch: int,
    lr: float,
    momentum: float,
    channels_last: bool,
    epochs: int = 1,
    seed: int = 0,
    spec: InputSpec | None = None,
) -> list[float]:
    """Plain PyTorch SGD training, the yardstick for the trainer: shuffle, slice, forward, cross-entropy,
    backward, step. Returns the loss of every step.

    ``spec``: ``x`` holds raw images (e.g. uint8), and each batch's rows are converted to the model's
    input with :func:`~paramtransfer.data.pipeline.to_input` (then put in the memory format), as the
    trainer converts its batches; ``None``: ``x`` already is model input (put in the memory format once)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if spec is None:
            x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=shuffle)
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            xb = x[idx] if spec is None else to_memory_format(to_input(x[idx], spec), channels_last)
            loss = F.cross_entropy(model(xb), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


class _TimedFit:
    """A whole :func:`~paramtransfer.train.trainer.fit` of one method spec on a task, as a timing fn for
    :func:`~paramtransfer.bench.speed._interleaved_medians`: the method's model is built once from
    ``source`` (new head of ``NUM_CLASSES``), each call trains a fresh copy of it (copied outside the
    clock) and returns the seconds of the ``fit`` call; ``cached_prefix`` is the last fit's
    :attr:`~paramtransfer.train.trainer.FitOutcome.cached_prefix`."""

    def __init__(self, spec: str, source: nn.Module, task: Any, config: TrainConfig, seed: int) -> None:
        self.method = make_method(spec)
        self.initial = self.method.build(
            source, NUM_CLASSES, arch=source.arch, in_shape=source.in_shape, seed=seed
        )
        self.task, self.config, self.seed = task, config, seed
        self.cached_prefix: int | None = None

    def __call__(self) -> float:
        model = copy.deepcopy(self.initial)
        t0 = time.perf_counter()
        outcome = fit(model, self.method, self.task, self.config, seed=self.seed)
        seconds = time.perf_counter() - t0
        self.cached_prefix = outcome.cached_prefix
        return seconds


def _trainer_and_bare_seconds(
    source: nn.Module, train: Split, config: TrainConfig, *, repeats: int, seed: int
) -> dict[str, float]:
    """Median seconds of one trainer epoch and one :func:`bare_loop` epoch over ``train`` (``finetune`` of
    ``source``; the trainer with an empty validation split), interleaved after one warm-up each; the bare
    loop converts raw rows with ``train.spec`` as the trainer does (see :func:`trainer_over_bare_loop`)."""
    empty = Split(train.images[:0], train.y[:0], train.spec)
    trainer = _TimedFit(BASELINE, source, SimpleNamespace(train=train, val=empty, test=empty), config, seed)
    channels_last = uses_channels_last(trainer.initial, config)

    def bare_epoch() -> float:
        model = copy.deepcopy(trainer.initial)
        t0 = time.perf_counter()
        bare_loop(
            model,
            train.images,
            train.y,
            batch=config.batch_size,
            lr=config.lr,
            momentum=config.momentum,
            channels_last=channels_last,
            spec=train.spec,
        )
        return time.perf_counter() - t0

    return _interleaved_medians({"trainer": trainer, "bare": bare_epoch}, repeats, warmup=1)


def _throughputs(seconds: dict[str, float], n: int, first: str, second: str) -> dict[str, float]:
    """``ratio`` = images/s of ``first`` / images/s of ``second`` (= seconds of second / of first), plus
    each one's epoch in ms and images per second."""
    out = {"ratio": seconds[second] / seconds[first]}  # (n / t_first) / (n / t_second)
    for name in (first, second):
        out[f"{name}_epoch_ms"] = 1000 * seconds[name]
        out[f"{name}_images_per_s"] = n / seconds[name]
    return out


def trainer_over_bare_loop(*, batch: int = 128, repeats: int = 20, seed: int = 0) -> dict[str, Any]:
    """Throughput of the trainer divided by that of :func:`bare_loop` (1.0: no overhead at all).

    Both train the same model (``finetune`` of a LeNet source: a copy with a fresh head) for one epoch
    over the same in-memory :func:`synthetic_dataset` (``TRAINER_EXAMPLES`` rounded up to whole batches),
    with the trainer's SGD settings (``TrainConfig()``'s lr and momentum, no weight decay) and memory
    format (channels-last for a conv net). Each repeat starts from a fresh copy of the same weights; the
    copy is made outside the clock. The rounds alternate trainer and bare loop (after one warm-up epoch
    each) and the medians are compared.

    What is counted: for the trainer, the whole ``fit()`` call with an *empty* validation split, so its
    per-epoch evaluation has nothing to evaluate — that is the set-up (memory format, ``prepare``,
    optimizer), shuffling, batch indexing, the steps, the per-step loss bookkeeping and finiteness check,
    and the end-of-epoch copy of the best weights. For the bare loop: memory format, optimizer,
    shuffling, batch indexing, the steps and ``loss.item()`` per step.

    Returns:
        ``{"ratio", "arch", "examples", "batch", "trainer_epoch_ms", "bare_epoch_ms",
        "trainer_images_per_s", "bare_images_per_s"}``.
    """
    n = _examples(batch)
    source = build_model("lenet", NUM_CLASSES, seed=seed)
    x, y = synthetic_dataset(n, source.in_shape, NUM_CLASSES, seed)
    config = TrainConfig(epochs=1, batch_size=batch, patience=None, device="cpu")  # as the bare loop
    seconds = _trainer_and_bare_seconds(source, Split(x, y), config, repeats=repeats, seed=seed)
    times = _throughputs(seconds, n, "trainer", "bare")
    return {"ratio": times.pop("ratio"), "arch": "lenet", "examples": n, "batch": batch, **times}


# ---- EfficientNet-Lite0 at 64 px: the ImageNet-scale rows --------------------------------------------


def _imagenet_source(seed: int) -> nn.Module:
    """EfficientNet-Lite0 shaped as the ImageNet source (1000 classes, native 3x224x224 input) with
    random weights: the time of a step does not depend on the weights' values, and no wheel is needed."""
    return build_model(IMAGENET_ARCH, IMAGENET_SOURCE_CLASSES, in_shape=IMAGENET_SOURCE_SHAPE, seed=seed)


def imagenet_input_spec(source: nn.Module) -> InputSpec:
    """The source's input (channels, normalisation) at ``IMAGENET_SIZE`` pixels, as a run with
    ``image_size`` gives it."""
    mean, std = source.input_stats()
    return InputSpec.of(tuple(source.in_shape), mean, std).resized(IMAGENET_SIZE)


def _imagenet_config(epochs: int) -> TrainConfig:
    """The trainer's defaults (SGD, cosine, prefix cache on) on the CPU, the bare loop's device, with
    ``IMAGENET_BATCH`` and no early stopping, so every fit runs all its epochs."""
    return TrainConfig(epochs=epochs, batch_size=IMAGENET_BATCH, patience=None, device="cpu")


def imagenet_trainer_over_bare_loop(*, repeats: int, seed: int = 0) -> dict[str, Any]:
    """:func:`trainer_over_bare_loop` on EfficientNet-Lite0 from raw images: one epoch over
    ``IMAGENET_LOOP_EXAMPLES`` (rounded up to whole batches of ``IMAGENET_BATCH``) uint8 images of
    ``IMAGENET_RAW_SHAPE``, converted batch by batch to the 3 x ``IMAGENET_SIZE`` x ``IMAGENET_SIZE``
    input (grey to RGB, bilinear resize, the source's normalisation) on both sides: by the trainer's
    batches (``Split.convert``) and in :func:`bare_loop` by the same
    :func:`~paramtransfer.data.pipeline.to_input` call. Counted as there, plus the conversion.

    Returns:
        ``{"ratio", "arch", "examples", "batch", "raw_shape", "input_shape", "trainer_epoch_ms",
        "bare_epoch_ms", "trainer_images_per_s", "bare_images_per_s"}``.
    """
    source = _imagenet_source(seed)
    spec = imagenet_input_spec(source)
    n = _whole_batches(IMAGENET_LOOP_EXAMPLES, IMAGENET_BATCH)
    x, y = synthetic_raw_images(n, IMAGENET_RAW_SHAPE, NUM_CLASSES, seed)
    seconds = _trainer_and_bare_seconds(
        source, Split(x, y, spec), _imagenet_config(1), repeats=repeats, seed=seed
    )
    times = _throughputs(seconds, n, "trainer", "bare")
    return {
        "ratio": times.pop("ratio"),
        "arch": IMAGENET_ARCH,
        "examples": n,
        "batch": IMAGENET_BATCH,
        "raw_shape": list(IMAGENET_RAW_SHAPE),
        "input_shape": list(spec.in_shape),
        **times,
    }


def sweep_specs(source: nn.Module) -> list[str]:
    """The specs that ``finetune[freeze=all]`` expands to on ``source`` (as compare runs the sweep):
    ``finetune[freeze=l]`` for l = 1 .. blocks - 1."""
    levels = METHODS.get(BASELINE).expand({"freeze": "all"}, source)
    return [f"{BASELINE}[freeze={options['freeze']}]" for options in levels]


def imagenet_fit_ratios(*, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Wall time of a whole ``fit`` of FT-0 (``finetune``), of every FT-l of the ``finetune[freeze=all]``
    sweep and of ``linear_probe`` on EfficientNet-Lite0, each over FT-0's.

    Every fit trains ``IMAGENET_EPOCHS`` epochs (no early stopping) over ``IMAGENET_TRAIN`` raw images of
    ``IMAGENET_RAW_SHAPE`` (converted at batch time to the 64 px input) and evaluates ``IMAGENET_VAL``
    validation images after every epoch, with the trainer's defaults, the frozen-prefix cache included
    (``TrainConfig.prefix_cache_mb``): FT-l computes its first ``l`` blocks' outputs once, the linear
    probe all 9 blocks'. A fit's time is the whole ``fit()`` call (cache, set-up, epochs, evaluations,
    best-weight copies); the model it starts from is built and copied outside the clock. All fits take
    turns (interleaved, shuffled order) for ``repeats`` rounds; no warm-up round, as one round is long
    and the same network has just been warmed up by the trainer-vs-bare-loop epochs (the median leaves
    a slow first round out).

    Returns:
        ``fit_s`` ``{spec: median seconds}`` (``finetune`` first, then the sweep, then ``linear_probe``);
        ``fit_over_ft0`` ``{spec: fit_s / FT-0's}`` (``finetune`` left out: 1); ``cached_prefix``
        ``{spec: blocks whose outputs the fit cached}``; ``ftl_sweep_over_ft0`` (the sweep's seconds
        summed, over FT-0's); ``linear_probe_over_ft0``; ``fit_settings`` (``train``, ``val``,
        ``epochs``, ``batch``).
    """
    source = _imagenet_source(seed)
    spec = imagenet_input_spec(source)
    x, y = synthetic_raw_images(IMAGENET_TRAIN + IMAGENET_VAL, IMAGENET_RAW_SHAPE, NUM_CLASSES, seed)
    train = Split(x[:IMAGENET_TRAIN], y[:IMAGENET_TRAIN], spec)
    val = Split(x[IMAGENET_TRAIN:], y[IMAGENET_TRAIN:], spec)
    task = SimpleNamespace(train=train, val=val, test=Split(x[:0], y[:0], spec))
    sweep = sweep_specs(source)
    config = _imagenet_config(IMAGENET_EPOCHS)
    fits = {s: _TimedFit(s, source, task, config, seed) for s in [BASELINE, *sweep, "linear_probe"]}
    seconds = _interleaved_medians(dict(fits), repeats, warmup=0)
    ft0 = seconds[BASELINE]
    return {
        "fit_s": seconds,
        "fit_over_ft0": {s: t / ft0 for s, t in seconds.items() if s != BASELINE},
        "cached_prefix": {s: f.cached_prefix for s, f in fits.items()},
        "ftl_sweep_over_ft0": sum(seconds[s] for s in sweep) / ft0,
        "linear_probe_over_ft0": seconds["linear_probe"] / ft0,
        "fit_settings": {
            "train": IMAGENET_TRAIN,
            "val": IMAGENET_VAL,
            "epochs": IMAGENET_EPOCHS,
            "batch": IMAGENET_BATCH,
        },
    }


def write_jpeg_folder(root: Path, files: int, side: int, num_classes: int, seed: int = 0) -> None:
    """``files`` RGB JPEGs of ``side`` x ``side`` pixels (quality 90) in ``root/class_<c>/`` (an
    ImageFolder layout); their pixels are :func:`synthetic_raw_images`."""
    from PIL import Image

    x, y = synthetic_raw_images(files, (3, side, side), num_classes, seed)
    for i, (pixels, label) in enumerate(zip(x, y.tolist(), strict=True)):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.jpg", quality=90)


def _without_val(task: Task) -> Task:
    """``task`` with an empty, in-memory validation split (a fit then evaluates nothing per epoch)."""
    train = task.train
    return dataclasses.replace(task, val=Split(train.raw(slice(0, 0)), train.y[:0], train.spec))


def streamed_over_memory(*, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Training throughput of ``fit`` on a folder streamed from disk over the same folder held in memory.

    ``FOLDER_FILES`` RGB JPEGs of ``FOLDER_IMAGE_SIZE`` px (:func:`write_jpeg_folder`, a temporary
    folder) are loaded twice with :func:`~paramtransfer.data.task.load_task` and the same input (the
    EfficientNet-Lite0 source's at ``IMAGENET_SIZE`` px): with the default ``memory_mb`` they are
    decoded into memory at load time; with ``STREAMED_MEMORY_MB`` they exceed the budget and every
    epoch decodes them from disk in DataLoader workers
    (:meth:`~paramtransfer.data.files.ImageFiles.stream`, ``default_workers()`` processes). Loading
    is not timed. Then ``finetune`` trains one epoch on each task's training split (the same images and
    batches) with an empty validation split; a fit's time is the whole ``fit()`` call (for the streamed
    folder that includes starting its workers). One warm-up fit each, then ``repeats`` interleaved rounds.

    Returns:
        ``{"ratio"`` (streamed images/s over in-memory images/s), ``"files"``, ``"file_shape"``,
        ``"train"``, ``"batch"``, ``"streamed_memory_mb"``, ``"workers"``, ``"streamed_epoch_ms"``,
        ``"memory_epoch_ms"``, ``"streamed_images_per_s"``, ``"memory_images_per_s"}``.
    """
    source = _imagenet_source(seed)
    spec = imagenet_input_spec(source)
    with tempfile.TemporaryDirectory(prefix="paramtransfer-speed-") as tmp:
        write_jpeg_folder(Path(tmp), FOLDER_FILES, FOLDER_IMAGE_SIZE, NUM_CLASSES, seed)
        tasks = {
            "streamed": load_task(f"folder:{tmp}", seed=seed, input_spec=spec, memory_mb=STREAMED_MEMORY_MB),
            "memory": load_task(f"folder:{tmp}", seed=seed, input_spec=spec),
        }
        if not tasks["streamed"].train.streamed or tasks["memory"].train.streamed:
            raise RuntimeError(
                f"expected a streamed and an in-memory folder of {FOLDER_FILES} files; "
                f"raise FOLDER_FILES or lower STREAMED_MEMORY_MB ({STREAMED_MEMORY_MB})"
            )
        config = _imagenet_config(1)
        fits = {k: _TimedFit(BASELINE, source, _without_val(t), config, seed) for k, t in tasks.items()}
        seconds = _interleaved_medians(dict(fits), repeats, warmup=1)
    n = len(tasks["memory"].train)
    times = _throughputs(seconds, n, "streamed", "memory")
    return {
        "ratio": times.pop("ratio"),
        "files": FOLDER_FILES,
        "file_shape": [3, FOLDER_IMAGE_SIZE, FOLDER_IMAGE_SIZE],
        "train": n,
        "batch": IMAGENET_BATCH,
        "streamed_memory_mb": STREAMED_MEMORY_MB,
        "workers": default_workers(),
        **times,
    }


def imagenet_step_ratios(
    *, repeats: int, seed: int = 0, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Median time of one training step and of one evaluation pass of every ``IMAGENET_STEP_METHODS`` spec
    on EfficientNet-Lite0, relative to ``finetune``'s: :func:`~paramtransfer.bench.speed.measure_arch` on
    the ImageNet source's shape (``IMAGENET_SOURCE_CLASSES`` classes, native ``IMAGENET_SOURCE_SHAPE``,
    random weights) with models built for and fed ``IMAGENET_BATCH`` random inputs of 3 x
    ``IMAGENET_SIZE`` x ``IMAGENET_SIZE`` (channels-last, as the trainer runs a conv net; the batch-time
    conversion from raw images is not part of a step), five classes. All models are built first;
    ``IMAGENET_STEP_WARMUP`` steps of each, then ``repeats`` interleaved rounds (shuffled order), then the
    same for the evaluation passes. Each step is what the trainer does per batch (loss terms, backward with
    DTNH's correction, optimizer step); PTU reads its cache of the source's activations and KnowDist/DELTA
    their teacher's features by the batch's row indices, as in a run; SpotTune's evaluation routes each
    example to the copy its policy picks (``method.predict`` in eval mode).

    Returns:
        ``train_step_ms`` / ``eval_ms`` ``{spec: median ms}`` (``finetune`` first); ``train_step_ratio`` /
        ``eval_ratio`` ``{spec: ms / finetune's}`` (``finetune`` left out: 1); ``dtnh_over_base``
        ``{base: ms of dtnh:base / ms of base}`` (training steps); ``step_settings`` (``methods``,
        ``batch``, ``input_shape``, ``warmup``, ``repeats``).

    Raises:
        UserError: a spec in ``IMAGENET_STEP_METHODS`` that is unknown, does not train or does not support
            EfficientNet-Lite0 (checked before anything is built).
    """
    specs = _specs_for(IMAGENET_ARCH, IMAGENET_STEP_METHODS)
    input_shape = (3, IMAGENET_SIZE, IMAGENET_SIZE)
    train, evals = measure_arch(
        IMAGENET_ARCH,
        specs,
        batch=IMAGENET_BATCH,
        repeats=repeats,
        warmup=IMAGENET_STEP_WARMUP,
        seed=seed,
        log=log,
        input_shape=input_shape,
        source_in_shape=IMAGENET_SOURCE_SHAPE,
        source_classes=IMAGENET_SOURCE_CLASSES,
    )
    return {
        "train_step_ms": {m: 1000 * s for m, s in train.items()},
        "eval_ms": {m: 1000 * s for m, s in evals.items()},
        "train_step_ratio": {m: train[m] / train[BASELINE] for m in specs if m != BASELINE},
        "eval_ratio": {m: evals[m] / evals[BASELINE] for m in specs if m != BASELINE},
        "dtnh_over_base": _dtnh_over_base(train),
        "step_settings": {
            "methods": specs,
            "batch": IMAGENET_BATCH,
            "input_shape": list(input_shape),
            "warmup": IMAGENET_STEP_WARMUP,
            "repeats": repeats,
        },
    }


def imagenet_section(
    *, repeats: int, seed: int = 0, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """The EfficientNet-Lite0 rows of the speed suite (``result["imagenet"]``), each a median over
    ``min(repeats, IMAGENET_REPEATS)`` interleaved rounds (a round is whole epochs or fits, not steps):

    * ``trainer_over_bare_loop`` (details under ``trainer_over_bare_loop_detail``), see
      :func:`imagenet_trainer_over_bare_loop`;
    * ``fit_s``, ``fit_over_ft0``, ``cached_prefix``, ``ftl_sweep_over_ft0``,
      ``linear_probe_over_ft0``, ``fit_settings``, see :func:`imagenet_fit_ratios`;
    * ``streamed_over_memory`` (details under ``streamed_detail``), see :func:`streamed_over_memory`;
    * ``train_step_ms``, ``eval_ms``, ``train_step_ratio``, ``eval_ratio``, ``dtnh_over_base``,
      ``step_settings``: one step of each of ``IMAGENET_STEP_METHODS`` next to ``finetune``'s, a median
      over ``min(repeats, IMAGENET_STEP_REPEATS)`` rounds of single steps, see
      :func:`imagenet_step_ratios`;

    plus ``arch``, ``raw_shape``, ``input_shape``, ``batch``, ``repeats`` (the rounds of the epochs and
    fits) and ``wall_time_s`` (the whole section)."""
    t_start = time.perf_counter()
    rounds = min(repeats, IMAGENET_REPEATS)
    size = f"{'x'.join(map(str, IMAGENET_RAW_SHAPE))} uint8 -> 3x{IMAGENET_SIZE}x{IMAGENET_SIZE}"
    out: dict[str, Any] = {
        "arch": IMAGENET_ARCH,
        "raw_shape": list(IMAGENET_RAW_SHAPE),
        "input_shape": [3, IMAGENET_SIZE, IMAGENET_SIZE],
        "batch": IMAGENET_BATCH,
        "repeats": rounds,
    }
    n = _whole_batches(IMAGENET_LOOP_EXAMPLES, IMAGENET_BATCH)
    if log is not None:
        log(f"{IMAGENET_ARCH}: trainer vs bare loop ({n} images {size}, {rounds} epochs each, interleaved)")
    detail = imagenet_trainer_over_bare_loop(repeats=rounds, seed=seed)
    out["trainer_over_bare_loop"] = detail.pop("ratio")
    out["trainer_over_bare_loop_detail"] = detail
    if log is not None:
        log(
            f"{IMAGENET_ARCH}: whole fits of finetune, finetune[freeze=1..], linear_probe ({IMAGENET_EPOCHS} "
            f"epochs, {IMAGENET_TRAIN} + {IMAGENET_VAL} images, {rounds} rounds, interleaved)"
        )
    out.update(imagenet_fit_ratios(repeats=rounds, seed=seed))
    if log is not None:
        log(
            f"{IMAGENET_ARCH}: streamed folder vs in memory ({FOLDER_FILES} JPEGs of {FOLDER_IMAGE_SIZE} px, "
            f"one epoch, {rounds} rounds, interleaved)"
        )
    detail = streamed_over_memory(repeats=rounds, seed=seed)
    out["streamed_over_memory"] = detail.pop("ratio")
    out["streamed_detail"] = detail
    step_rounds = min(repeats, IMAGENET_STEP_REPEATS)
    if log is not None:
        log(
            f"{IMAGENET_ARCH}: training steps and evaluation passes of {len(IMAGENET_STEP_METHODS)} methods "
            f"(batch {IMAGENET_BATCH} of 3x{IMAGENET_SIZE}x{IMAGENET_SIZE}, {IMAGENET_STEP_WARMUP} warm-up + "
            f"{step_rounds} rounds, interleaved)"
        )
    out.update(imagenet_step_ratios(repeats=step_rounds, seed=seed, log=log))
    out["wall_time_s"] = time.perf_counter() - t_start
    return out


# ---- peak memory, one fresh process per method -------------------------------------------------------


def peak_rss_mb(spec: str | None, arch: str, *, batch: int = 128, threads: int | None = None) -> float:
    """Peak resident memory (MB) of a fresh ``sys.executable`` that imports torch and paramtransfer,
    builds ``spec``'s model on ``arch`` and runs ``RSS_STEPS`` training steps of ``batch`` examples
    (``spec=None``: only the imports, the baseline to subtract).

    The child reports its own peak. On Linux that is ``VmHWM`` from ``/proc/self/status``, not
    ``ru_maxrss``: Linux carries the parent's high-water mark into ``ru_maxrss`` across fork+exec, so
    every child of a large parent would report at least the parent's size. Elsewhere ``ru_maxrss``
    is used (bytes on macOS, KB otherwise), valid only when the child outgrows the parent.
    """
    threads = threads if threads is not None else torch.get_num_threads()
    args = [str(threads), spec or "", arch, str(batch), str(RSS_STEPS)]
    env = dict(os.environ)
    env["PYTHONPATH"] = child_pythonpath()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the memory child for {spec or 'imports only'} on {arch} failed:\n{tail}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def _own_peak_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _child(argv: list[str]) -> None:
    """Entry point of a memory child (see :func:`peak_rss_mb`); prints ``{"peak_rss_mb": MB}``."""
    threads, spec, arch, batch, steps = argv
    torch.set_num_threads(int(threads))
    if spec:
        train_step, _ = _steppers(spec, arch, int(batch), seed=0)
        for _ in range(int(steps)):
            train_step()
    print(json.dumps({"peak_rss_mb": _own_peak_mb()}), flush=True)
