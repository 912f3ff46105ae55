"""One run: a method transfers a source to a target task; the result is a :class:`RunResult` (JSON)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from paramtransfer.data.pipeline import InputSpec
from paramtransfer.data.task import DEFAULT_SHAPE, Task, load_task
from paramtransfer.errors import UserError
from paramtransfer.methods.base import Method, make_config, make_method
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.store import save_model
from paramtransfer.models.zoo import build_model
from paramtransfer.results import RESULT, RunResult
from paramtransfer.runtime import Runtime, make_runtime, module_device
from paramtransfer.train.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    hold_lock,
    remove_stale_temps,
)
from paramtransfer.train.trainer import (
    FitOutcome,
    TrainConfig,
    evaluate,
    fit,
    uses_channels_last,
)

CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"  # held by the process that trains the run in that folder (see train_model)
MODEL_DIR = "model"
STATE_DICT = "state_dict.safetensors"
STATE_DICT_NOTE = "state_dict.json"


def _source_name(source: LayeredNet | None) -> str | None:
    if source is None:
        return None
    info = getattr(source, "source_info", None) or {}
    return info.get("source") or f"<{source.arch} model>"


def _source_identity(source: LayeredNet | None) -> str:
    """A cheap fingerprint of the source weights (so a changed source never reuses old results)."""
    if source is None:
        return "none"
    h = hashlib.sha1()
    for k, v in source.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().double().sum().item().hex().encode())
    return h.hexdigest()[:16]


# Options left out of a run's fingerprint at these values, so that results from before they existed
# are still reused: trace_test only adds records (left out of the current fingerprint; the older one of
# ``fingerprints[1]`` kept it), the others are what every run did before they existed (no augmentation,
# float32, the source's image size) and are left out of both.
_OBSERVATIONAL_DEFAULTS = {"trace_test": False}
_NEW_DEFAULTS = {"augment": False, "precision": "32", "image_size": None, "bn": "train"}
# Never part of a run's identity: where it ran, and whether frozen blocks' outputs were cached.
_PLACE = ("device", "prefix_cache_mb")


def _without(options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in _PLACE and defaults.get(k, ...) != v}


def _fingerprint(identity: list[Any], *, omit_defaults: bool) -> str:
    config = dict(identity[4])
    defaults = {**_NEW_DEFAULTS, **(_OBSERVATIONAL_DEFAULTS if omit_defaults else {})}
    for part in ("train", "data"):
        if config.get(part):
            config[part] = _without(config[part], defaults)
    identity = [*identity[:4], config, *identity[5:]]
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _count(params: Any) -> int:
    return int(sum(p.numel() for p in params))


@dataclass
class _RunSetup:
    """Everything that defines one run, settled before anything trains (see :func:`train_model`)."""

    method: Method
    task: Task
    source: LayeredNet | None
    arch: str  # the architecture the run records: the source's, else ``arch``, else "none"
    seed: int
    config: dict[str, Any]  # RunResult.config
    train: TrainConfig | None  # None: the method trains no network
    variant: str
    fingerprints: tuple[str, str]  # (this version's, the one written before observational defaults)

    @property
    def fingerprint(self) -> str:
        return self.fingerprints[0]

    def result(self, t0: float, **fields: Any) -> RunResult:
        """The run's RunResult with ``fields`` (accuracies, history, diagnostics, ...) added."""
        return RunResult(
            method=self.variant,
            source=_source_name(self.source),
            target=self.task.spec,
            arch=self.arch,
            seed=self.seed,
            config=self.config,
            wall_time_s=time.perf_counter() - t0,
            fingerprint=self.fingerprint,
            **fields,
        )


def _check_request(
    m: Method, source: LayeredNet | None, arch: str | None, out: str | Path | None, save_weights: bool
) -> None:
    """Refuse, before any data loads, a request that cannot run: saving without a folder or a network, a
    source that is not a LayeredNet or not of ``arch``."""
    if save_weights and out is None:
        raise UserError("save_weights writes the trained model under OUT/model; give out (the run folder)")
    if save_weights and not m.trains:
        raise UserError(
            f"method {m.name!r} trains no network, so there is no model to save; drop --save-model"
        )
    if source is not None and arch is not None and source.arch not in (arch, "custom", "wrapped"):
        raise UserError(f"the source is a {source.arch}, but arch is {arch}; drop --arch or match it")
    if source is not None and not isinstance(source, LayeredNet):
        raise UserError("the source must be a LayeredNet (wrap other models with LayeredNet.wrap)")


def input_spec_of(source: LayeredNet | None, image_size: int | None = None) -> InputSpec:
    """What the run feeds its networks: the source's input (channels, size, normalisation), at
    ``image_size`` pixels if given; without a source, the zoo's 1x28x28 in [-1, 1]."""
    if source is None:
        return InputSpec.of(DEFAULT_SHAPE).resized(image_size)
    mean, std = source.input_stats()
    return InputSpec.of(tuple(source.in_shape), mean, std).resized(image_size)


def runtime_of(train_options: dict[str, Any] | None) -> Runtime:
    """The device and precision that ``train_options`` ask for (``device``, ``precision``), resolved:
    a device this machine lacks is a UserError. Methods that do not train use it for their features."""
    opts = train_options or {}
    return make_runtime(opts.get("device", "auto"), opts.get("precision", "32"), opts.get("augment") is True)


def _check_source_size(source: LayeredNet | None, spec: InputSpec) -> None:
    """Refuse an image size the source cannot take (e.g. a LeNet, whose task layer is sized for 28x28),
    with one forward pass of a blank image (only when the size differs from the source's own)."""
    if source is None or tuple(spec.in_shape) == tuple(source.in_shape):
        return
    was = source.training
    source.eval()
    try:
        with torch.no_grad():
            source(torch.zeros(1, *spec.in_shape, device=module_device(source)))
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"the source ({source.arch}, input {tuple(source.in_shape)}) cannot take "
            f"{spec.size[0]}x{spec.size[1]} images ({first}); drop --image-size or use "
            f"--image-size {source.in_shape[-1]}"
        ) from None
    finally:
        source.train(was)


def target_task(
    target: str | Task, source: LayeredNet | None, shots: int | None, seed: int, data: dict[str, Any]
) -> Task:
    """The target task, converted to the source's input (``data``: val_shots, limit, test_limit,
    image_size, memory_mb); a given Task is re-targeted to that input (its images are not copied)."""
    data = dict(data)
    spec = input_spec_of(source, data.pop("image_size", None))
    _check_source_size(source, spec)
    if not isinstance(target, Task):
        return load_task(target, shots, seed, input_spec=spec, **data)
    if target.input_spec is None:  # hand-made splits of model inputs: they must fit as they are
        if source is not None and tuple(target.in_shape) != tuple(spec.in_shape):
            raise UserError(
                f"the source takes inputs of shape {tuple(spec.in_shape)} but the target {target.spec} "
                f"gives {tuple(target.in_shape)}; build its splits in that shape"
            )
        return target
    return target.with_input(spec)


def _setup(
    m: Method,
    task: Task,
    source: LayeredNet | None,
    *,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
    seed: int,
    lr: float | None,
    epochs: int,
    train_options: dict[str, Any] | None,
    data: dict[str, Any],
    variant: str | None,
) -> _RunSetup:
    """The run's training settings, recorded config and fingerprints."""
    train_cfg = None
    if m.trains:
        if lr is None:
            raise UserError(f"method {m.name!r} trains by gradient descent and needs a learning rate (--lr)")
        train_cfg = make_config(
            TrainConfig, {"epochs": epochs, "lr": lr, **(train_options or {})}, "training"
        )
    run_arch = source.arch if source is not None else (arch or "none")
    config = {
        "lr": lr if m.trains else None,
        "epochs": epochs if m.trains else None,
        "shots": task.shots,
        "train": dataclasses.asdict(train_cfg) if train_cfg is not None else None,
        "method": dataclasses.asdict(m.config),
        "data": data,
        "arch_kwargs": dict(arch_kwargs or (source.arch_kwargs if source is not None else {})),
    }
    variant = variant or m.variant()
    identity = [variant, task.spec, seed, run_arch, config, _source_identity(source)]
    fingerprints = (_fingerprint(identity, omit_defaults=True), _fingerprint(identity, omit_defaults=False))
    return _RunSetup(m, task, source, run_arch, seed, config, train_cfg, variant, fingerprints)


def _build_target(run: _RunSetup, arch: str | None, arch_kwargs: dict[str, Any] | None) -> nn.Module:
    """The model to train (under the caller's seeded RNG): the method's, or the bare architecture for a
    method that trains from scratch without a source."""
    m, task = run.method, run.task
    in_shape = tuple(task.in_shape)
    if run.source is None and arch is not None and not m.needs_source:
        return build_model(arch, task.num_classes, in_shape=in_shape, seed=run.seed, **(arch_kwargs or {}))
    return m.build(run.source, task.num_classes, arch=run.arch, in_shape=in_shape, seed=run.seed)


def _evaluated_result(run: _RunSetup, t0: float) -> RunResult:
    """A method that trains no network (kNN, random guess): fit and evaluate in one go."""
    res = run.method.fit_evaluate(run.source, run.task, run.seed)
    return run.result(
        t0,
        val_accuracy=res["val_accuracy"],
        test_accuracy=res["test_accuracy"],
        diagnostics={"classes": list(run.task.classes), **res["diagnostics"]},
    )


def _trained_result(run: _RunSetup, model: nn.Module, outcome: FitOutcome, t0: float) -> RunResult:
    """The RunResult of a trained model: test accuracy at the best epoch, diagnostics (none of the
    method's own when the run diverged)."""
    m, task, train_cfg = run.method, run.task, run.train
    assert train_cfg is not None
    ok = not outcome.diverged
    test_acc = None
    if ok:
        test_acc, _ = evaluate(
            m,
            model,
            task.test,
            batch_size=train_cfg.eval_batch_size,
            runtime=m.runtime,
            channels_last=uses_channels_last(model, train_cfg),
        )
    diagnostics = {
        "classes": list(task.classes),
        "trainable_params": _count(p for g in m.param_groups(model) for p in g["params"]),
        "total_params": _count(model.parameters()),
        "stopped_early": outcome.stopped_early,
        "resumed_from_epoch": outcome.resumed_from_epoch,
        "device": str(m.runtime.device),
        "cached_prefix_blocks": outcome.cached_prefix,
    }
    if ok:
        diagnostics.update(m.diagnostics(model, task))
        diagnostics.update(m.summarize_history(outcome.history))
    return run.result(
        t0,
        val_accuracy=outcome.best_val_accuracy if ok else None,
        test_accuracy=test_acc,
        history=outcome.history,
        diagnostics=diagnostics,
        status="ok" if ok else "diverged",
        best_epoch=outcome.best_epoch,
    )


def _claim_run(
    held: ExitStack, out_dir: Path | None, fingerprints: tuple[str, ...], progress: bool
) -> RunResult | None:
    """Called right before the work starts (after everything that can fail on bad input): lock the run
    folder against other processes (released with ``held``); the result if one of them finished the run
    meanwhile."""
    if out_dir is None:
        return None
    waiting = f"waiting for another process that is running {out_dir}"
    held.enter_context(hold_lock(out_dir / LOCK, waiting if progress else None))
    remove_stale_temps(out_dir)
    remove_stale_temps(out_dir / MODEL_DIR)
    return _finished(out_dir, fingerprints)


def _write_run(
    out_dir: Path, run: _RunSetup, result: RunResult, model: nn.Module | None, save_weights: bool
) -> None:
    """``result.json`` (and with ``save_weights`` the exported model); the checkpoint is no longer needed."""
    if save_weights and model is not None and result.status == "ok":
        save_trained(run.method.export(model), out_dir / MODEL_DIR, result.method)
    result.save(out_dir / RESULT)
    (out_dir / CHECKPOINT).unlink(missing_ok=True)


def train_model(
    method: str | Method,
    *,
    source: LayeredNet | None,
    target: str | Task,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    lr: float | None = 0.01,
    epochs: int = 30,
    shots: int | None = None,
    limit: int | None = None,
    val_shots: int | None = None,
    test_limit: int | None = None,
    image_size: int | None = None,
    memory_mb: float | None = None,
    train_options: dict[str, Any] | None = None,
    method_options: dict[str, Any] | None = None,
    out: str | Path | None = None,
    save_weights: bool = False,
    progress: bool = False,
    callbacks: tuple = (),
    variant: str | None = None,
    reuse_only: bool = False,
) -> tuple[RunResult | None, nn.Module | None]:
    """Run one method and return its :class:`RunResult` and trained model (``None`` if reused/untrained).

    With ``out`` the run checkpoints every epoch to ``out/checkpoint.pt``, resumes from it if killed,
    writes ``out/result.json`` atomically, and returns the existing result if it is already complete.
    The process that trains the run holds the lock ``out/.lock``: another process asked for the same run
    waits for it, then returns the finished result (or resumes the run if the holder died).
    ``variant`` is the name the run is recorded under (default: the method's variant name).
    With ``reuse_only`` nothing trains: the result is the complete one under ``out``, or ``None``.
    ``save_weights`` writes the exported model under ``out/model`` (see :func:`save_trained`).
    ``memory_mb``: the memory budget of a folder target (see :func:`load_task`; ``None``: its default).
    It changes where the images are read from, never the result, so it is not part of the run's
    recorded config or fingerprint.
    """
    m = make_method(method, **(method_options or {}))
    _check_request(m, source, arch, out, save_weights)
    m.runtime = runtime_of(train_options)  # an absent --device fails here, before any data loads
    data = {"val_shots": val_shots, "limit": limit, "test_limit": test_limit}
    if image_size is not None:
        data["image_size"] = image_size
    budget = {"memory_mb": memory_mb} if memory_mb is not None else {}
    task = target_task(target, source, shots, seed, {**data, **budget})
    run = _setup(
        m,
        task,
        source,
        arch=arch,
        arch_kwargs=arch_kwargs,
        seed=seed,
        lr=lr,
        epochs=epochs,
        train_options=train_options,
        data=data,
        variant=variant,
    )
    out_dir = Path(out) if out is not None else None
    old = _finished(out_dir, run.fingerprints)
    if old is not None:
        return old, None
    if reuse_only:
        return None, None

    with ExitStack() as held:
        t0 = time.perf_counter()
        model = None
        if not m.trains:
            done = _claim_run(held, out_dir, run.fingerprints, progress)
            if done is not None:
                return done, None
            result = _evaluated_result(run, t0)
        else:
            assert run.train is not None
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = _build_target(run, arch, arch_kwargs)
                done = _claim_run(held, out_dir, run.fingerprints, progress)
                if done is not None:
                    return done, None
                outcome = fit(
                    model,
                    m,
                    task,
                    run.train,
                    seed=seed,
                    checkpoint=out_dir / CHECKPOINT if out_dir is not None else None,
                    fingerprint=run.fingerprint,
                    progress=progress,
                    callbacks=callbacks,
                )
            result = _trained_result(run, model, outcome, t0)
        if out_dir is not None:
            _write_run(out_dir, run, result, model, save_weights)
        return result, model


def _finished(out_dir: Path | None, fingerprints: tuple[str, ...]) -> RunResult | None:
    """The complete result under ``out_dir`` if it was made with one of these fingerprints, else ``None``."""
    if out_dir is None or not (out_dir / RESULT).is_file():
        return None
    try:
        old = RunResult.load(out_dir / RESULT)
    except (ValueError, TypeError, KeyError, AttributeError, OSError):  # not a result: run again
        return None
    return old if old.fingerprint in fingerprints else None


def save_trained(model: nn.Module, directory: Path, method: str) -> Path:
    """Save a run's exported model under ``directory``.

    A zoo network is saved with :func:`~paramtransfer.models.store.save_model`, so ``load_model`` and
    ``--source`` rebuild it. Anything else (a wrapped user model, a hand-made LayeredNet, the two-network
    models of SpotTune and PTU) cannot be rebuilt from a name: its ``state_dict`` is written as
    ``state_dict.safetensors`` with ``state_dict.json`` beside it saying so; it loads only into the same
    module built the same way (``module.load_state_dict(safetensors.torch.load_file(path))``).
    """
    model = model.to(memory_format=torch.contiguous_format)
    if isinstance(model, LayeredNet) and model.arch not in ("custom", "wrapped"):
        return save_model(model, directory, {"method": method})
    directory.mkdir(parents=True, exist_ok=True)
    # clones: safetensors refuses tensors that share storage (tied weights)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / STATE_DICT, save(tensors))
    atomic_write_json(
        directory / STATE_DICT_NOTE,
        {
            "method": method,
            "module": type(model).__qualname__,
            "arch": getattr(model, "arch", None),
            "note": (
                "a state_dict only: load it into the same module built the same way with "
                "module.load_state_dict(safetensors.torch.load_file(path)); load_model and --source "
                "cannot rebuild it"
            ),
        },
    )
    return directory


def run(
    method: str | Method,
    source: LayeredNet | None = None,
    target: str | Task = "fashion[5-9]",
    *,
    lr: float = 0.01,
    epochs: int = 30,
    seed: int = 0,
    **kwargs: Any,
) -> RunResult:
    """Transfer ``source`` to ``target`` with ``method`` and return the :class:`RunResult`.

    Example:
        >>> src = pt.pretrain("lenet", "fashion[0-4]", epochs=3)
        >>> res = pt.run("finetune[freeze=1]", source=src, target="fashion[5-9]", shots=20, lr=0.01)
        >>> res.test_accuracy

    Keyword arguments are those of :func:`train_model` (``shots``, ``arch``, ``train_options``,
    ``method_options``, ``out``, ...).
    """
    return train_model(method, source=source, target=target, lr=lr, epochs=epochs, seed=seed, **kwargs)[0]
