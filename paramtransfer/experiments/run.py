"""One run: a method transfers a source to a target task; the result is a :class:`RunResult` (JSON)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from paramtransfer.data.task import DEFAULT_SHAPE, Task, load_task
from paramtransfer.errors import UserError
from paramtransfer.methods.base import Method, make_config, make_method
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.store import save_model
from paramtransfer.models.zoo import build_model
from paramtransfer.results import RESULT, RunResult
from paramtransfer.train.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    hold_lock,
    remove_stale_temps,
)
from paramtransfer.train.trainer import TrainConfig, evaluate, fit, to_memory_format, uses_channels_last

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


# Training options that only add records to the history: at these values they are left out of a run's
# fingerprint, so that results from before the option existed are still reused.
_OBSERVATIONAL_DEFAULTS = {"trace_test": False}


def _fingerprint(identity: list[Any], *, omit_defaults: bool) -> str:
    if omit_defaults and identity[4].get("train"):
        train = dict(identity[4]["train"])
        for key, default in _OBSERVATIONAL_DEFAULTS.items():
            if train.get(key) == default:
                train.pop(key)
        identity = [*identity[:4], {**identity[4], "train": train}, *identity[5:]]
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _count(params: Any) -> int:
    return int(sum(p.numel() for p in params))


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
    """
    m = make_method(method, **(method_options or {}))
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
    in_shape = tuple(source.in_shape) if source is not None else DEFAULT_SHAPE
    if isinstance(target, Task):
        task = target
        if source is not None and tuple(task.in_shape) != in_shape:
            raise UserError(
                f"the source takes inputs of shape {in_shape} but the target {task.spec} gives "
                f"{tuple(task.in_shape)}; load it with in_shape={in_shape}"
            )
    else:
        task = load_task(
            target, shots, seed, val_shots=val_shots, limit=limit, test_limit=test_limit, in_shape=in_shape
        )
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
        "data": {"val_shots": val_shots, "limit": limit, "test_limit": test_limit},
        "arch_kwargs": dict(arch_kwargs or (source.arch_kwargs if source is not None else {})),
    }
    variant = variant or m.variant()
    identity = [variant, task.spec, seed, run_arch, config, _source_identity(source)]
    fingerprint = _fingerprint(identity, omit_defaults=True)
    out_dir = Path(out) if out is not None else None
    # results written before the omission of observational defaults carry the full fingerprint
    fingerprints = (fingerprint, _fingerprint(identity, omit_defaults=False))
    old = _finished(out_dir, fingerprints)
    if old is not None:
        return old, None
    if reuse_only:
        return None, None

    with ExitStack() as held:

        def hold_run() -> RunResult | None:
            """Called right before the work starts (after everything that can fail on bad input): lock the
            run folder against other processes; the result if one of them finished the run meanwhile."""
            if out_dir is None:
                return None
            waiting = f"waiting for another process that is running {out_dir}"
            held.enter_context(hold_lock(out_dir / LOCK, waiting if progress else None))
            remove_stale_temps(out_dir)
            remove_stale_temps(out_dir / "model")
            return _finished(out_dir, fingerprints)

        t0 = time.perf_counter()
        common = dict(method=variant, source=_source_name(source), target=task.spec, arch=run_arch, seed=seed)
        if not m.trains:
            done = hold_run()
            if done is not None:
                return done, None
            res = m.fit_evaluate(source, task, seed)
            result = RunResult(
                **common,
                config=config,
                val_accuracy=res["val_accuracy"],
                test_accuracy=res["test_accuracy"],
                wall_time_s=time.perf_counter() - t0,
                diagnostics={"classes": list(task.classes), **res["diagnostics"]},
                fingerprint=fingerprint,
            )
            model = None
        else:
            assert train_cfg is not None
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if source is None and arch is not None and not m.needs_source:  # scratch without a source
                    model = build_model(
                        arch, task.num_classes, in_shape=in_shape, seed=seed, **(arch_kwargs or {})
                    )
                else:
                    model = m.build(source, task.num_classes, arch=run_arch, in_shape=in_shape, seed=seed)
                done = hold_run()
                if done is not None:
                    return done, None
                outcome = fit(
                    model,
                    m,
                    task,
                    train_cfg,
                    seed=seed,
                    checkpoint=out_dir / CHECKPOINT if out_dir is not None else None,
                    fingerprint=fingerprint,
                    progress=progress,
                    callbacks=callbacks,
                )
            ok = not outcome.diverged
            test_acc = None
            if ok:
                x_test = to_memory_format(task.test.x, uses_channels_last(model, train_cfg))
                test_acc, _ = evaluate(m, model, x_test, task.test.y, train_cfg.eval_batch_size)
            diagnostics = {
                "classes": list(task.classes),
                "trainable_params": _count(p for g in m.param_groups(model) for p in g["params"]),
                "total_params": _count(model.parameters()),
                "stopped_early": outcome.stopped_early,
                "resumed_from_epoch": outcome.resumed_from_epoch,
            }
            if ok:
                diagnostics.update(m.diagnostics(model, task))
                diagnostics.update(m.summarize_history(outcome.history))
            result = RunResult(
                **common,
                config=config,
                val_accuracy=outcome.best_val_accuracy if ok else None,
                test_accuracy=test_acc,
                history=outcome.history,
                wall_time_s=time.perf_counter() - t0,
                diagnostics=diagnostics,
                status="ok" if ok else "diverged",
                best_epoch=outcome.best_epoch,
                fingerprint=fingerprint,
            )
        if out_dir is not None:
            if save_weights and model is not None and result.status == "ok":
                save_trained(m.export(model), out_dir / MODEL_DIR, result.method)
            result.save(out_dir / RESULT)
            (out_dir / CHECKPOINT).unlink(missing_ok=True)
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
