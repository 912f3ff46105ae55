"""The speed suite behind ``paramtransfer bench speed``: what each method costs next to fine-tuning.

Four measurements, all on synthetic inputs of the architecture's shape (speed does not depend on the
pixel values) and all in the calling process except the memory one:

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

Example:
    >>> from paramtransfer.bench.speedsuite import run_speed_suite
    >>> r = run_speed_suite(None, archs=("lenet",), methods=["l2sp", "dtnh:l2sp"], repeats=3)
    >>> r["dtnh_over_base"]["lenet"]["l2sp"]  # doctest: +SKIP
    1.04
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paramtransfer.bench.speed import _interleaved_medians, _steppers, measure_arch
from paramtransfer.data.task import Split
from paramtransfer.errors import UserError
from paramtransfer.experiments.compare import split_arch_options
from paramtransfer.experiments.executors import child_pythonpath
from paramtransfer.methods.base import METHODS, make_method, parse_method_spec
from paramtransfer.models.zoo import build_model, list_models
from paramtransfer.train.checkpoint import atomic_write_json
from paramtransfer.train.trainer import TrainConfig, fit, uses_channels_last

BASELINE = "finetune"
DTNH_VARIANTS = ("dtnh:l2sp", "dtnh:knowdist", "dtnh:delta")
# examples in the trainer-vs-bare-loop epoch (rounded up to whole batches, so both loops take the
# same batches: the trainer would otherwise merge a small remainder into the last batch)
TRAINER_EXAMPLES = 2048
RSS_STEPS = 3  # training steps a memory child runs (the first allocates; later ones reuse the memory)
WARMUP = 3
NUM_CLASSES = 5

# name -> (op, limit): met when every measured arch's value satisfies `value op limit`
TARGETS: dict[str, tuple[str, float]] = {
    "ptu_train_step_ratio": ("<=", 1.8),
    "dtnh_over_l2sp": ("<=", 1.10),
    "dtnh_over_knowdist": ("<=", 1.5),
    "trainer_over_bare_loop": (">=", 0.95),
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
) -> dict[str, Any]:
    """Measure every method's training-step and evaluation cost, the trainer's overhead and peak memory.

    Args:
        out: JSON file written atomically at the end (None: write nothing).
        archs: zoo architectures to measure on.
        methods: method specs (options allowed, e.g. ``ptu[kernel_size=1]``); None: every registered
            method that trains and supports the architecture (K-NN and random guess do not train),
            which includes ``dtnh:l2sp``, ``dtnh:knowdist`` and ``dtnh:delta``. ``finetune`` is always
            measured, as the baseline.
        batch: examples per training step and per evaluation pass.
        repeats: interleaved rounds whose median is taken (also for the trainer-vs-bare-loop epochs).
        progress: one line per architecture/method and phase on stderr.

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
    plan = {arch: _specs_for(arch, methods) for arch in _check_archs(archs)}
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


def _examples(batch: int) -> int:
    return batch * math.ceil(TRAINER_EXAMPLES / batch)


def synthetic_dataset(
    n: int, in_shape: tuple[int, ...], num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` learnable examples: a random prototype per class plus unit Gaussian noise, balanced labels."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *in_shape, generator=gen)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=gen)]
    return prototypes[y] + torch.randn(n, *in_shape, generator=gen), y


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
) -> list[float]:
    """Plain PyTorch SGD training, the yardstick for the trainer: shuffle, slice, forward, cross-entropy,
    backward, step. Returns the loss of every step."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=shuffle)
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


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
    method = make_method(BASELINE)
    initial = method.build(source, NUM_CLASSES, arch="lenet", in_shape=source.in_shape, seed=seed)
    x, y = synthetic_dataset(n, source.in_shape, NUM_CLASSES, seed)
    config = TrainConfig(epochs=1, batch_size=batch, patience=None)
    empty = Split(x[:0], y[:0])
    task = SimpleNamespace(train=Split(x, y), val=empty, test=empty)
    channels_last = uses_channels_last(initial, config)

    def trainer_epoch() -> float:
        model = copy.deepcopy(initial)
        t0 = time.perf_counter()
        fit(model, method, task, config, seed=seed)
        return time.perf_counter() - t0

    def bare_epoch() -> float:
        model = copy.deepcopy(initial)
        t0 = time.perf_counter()
        bare_loop(
            model, x, y, batch=batch, lr=config.lr, momentum=config.momentum, channels_last=channels_last
        )
        return time.perf_counter() - t0

    seconds = _interleaved_medians({"trainer": trainer_epoch, "bare": bare_epoch}, repeats, warmup=1)
    return {
        "ratio": seconds["bare"] / seconds["trainer"],  # (n / t_trainer) / (n / t_bare)
        "arch": "lenet",
        "examples": n,
        "batch": batch,
        "trainer_epoch_ms": 1000 * seconds["trainer"],
        "bare_epoch_ms": 1000 * seconds["bare"],
        "trainer_images_per_s": n / seconds["trainer"],
        "bare_images_per_s": n / seconds["bare"],
    }


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
