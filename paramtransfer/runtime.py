"""Where and how a network runs: the device (``--device``) and the numeric precision (``--precision``).

* ``auto`` picks CUDA when present, else Apple's MPS, else the CPU (``$PARAMTRANSFER_DEVICE``, if set,
  overrides that choice: the test suite sets it to ``cpu``); ``cpu``, ``cuda``, ``cuda:N`` and
  ``mps`` ask for one; a device this machine lacks is a :class:`UserError` (one line, exit 2).
* ``32`` runs in float32 (CPU results are then bit-for-bit what they always were); ``bf16`` and ``16``
  run the forward pass under ``torch.autocast`` (weights, optimizer state and the loss's backward stay
  float32); ``16`` also scales the loss with a ``GradScaler`` so that small gradients do not underflow.

A :class:`Runtime` is what the trainer hands to a method (``method.runtime``): its device, precision and
whether the training inputs are augmented (then nothing may be cached per training example).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from paramtransfer.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_ENV = "PARAMTRANSFER_DEVICE"  # if set, the device "auto" stands for (e.g. cpu in the test suite)
PRECISIONS = ("32", "bf16", "16")
_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def check_device_name(name: str) -> str:
    """``name`` if it is a device name this library knows (not whether the machine has it)."""
    base, _, index = str(name).partition(":")
    if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
        raise UserError(f"device {name!r} is unknown; use auto, cpu, cuda, cuda:N or mps")
    return str(name)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device for ``name`` (see the module docstring); an absent device is a UserError."""
    if isinstance(name, torch.device):
        return name
    name = check_device_name(name)
    if name == "auto" and os.environ.get(DEVICE_ENV):
        name = check_device_name(os.environ[DEVICE_ENV])  # what "auto" means on this machine
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name}: this machine has no CUDA device (or torch is a CPU build); "
                "use --device cpu or auto"
            )
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                "use cuda:0 .. cuda:N-1"
            )
    if name == "mps" and not _mps_available():
        raise UserError("--device mps: this machine has no Apple MPS device; use --device cpu or auto")
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> str:
    precision = str(precision)
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is unknown; use 32, bf16 or 16")
    if precision == "16" and device.type == "mps":
        raise UserError("--precision 16 is not supported on MPS here; use 32 or bf16")
    return precision


@dataclass(frozen=True)
class Runtime:
    """The device and precision a run uses, whether its training inputs are augmented, and the memory a
    method may spend on per-example caches of frozen activations (``TrainConfig.prefix_cache_mb``)."""

    device: torch.device = torch.device("cpu")
    precision: str = "32"
    augmenting: bool = False
    cache_mb: int = 2048  # budget of a method's per-example activation caches (0: none)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's precision context (nothing at ``32``)."""
        if self.precision == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for float16 (``None`` otherwise)."""
        if self.precision != "16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def to(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True) if x.device != self.device else x

    def inputs(self, split: Any, size: int = 500, *, channels_last: bool = False) -> Iterator[torch.Tensor]:
        """A split's model inputs in order, ``size`` rows at a time, on this device (``split`` is a
        :class:`~paramtransfer.data.task.Split`, converted from raw images chunk by chunk)."""
        for x, _ in split.chunks(size):
            x = self.to(x)
            yield x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x

    @torch.no_grad()
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], split: Any, size: int = 500) -> torch.Tensor:
        """``fn`` over a split's inputs (eval-mode callers' business), under this precision; the float32
        results concatenated on the CPU."""
        outs = []
        for x in self.inputs(split, size):
            with self.autocast():
                outs.append(fn(x).float().cpu())
        return torch.cat(outs)


def make_runtime(
    device: str = "auto", precision: str = "32", augment: bool = False, cache_mb: int = 2048
) -> Runtime:
    """A :class:`Runtime` with ``device`` resolved (an absent or unknown one is a UserError) and
    ``precision`` checked against it: the one place where settings become a device."""
    resolved = resolve_device(check_device_name(str(device)))
    return Runtime(resolved, check_precision(str(precision), resolved), bool(augment), int(cache_mb))


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for an empty module)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block; its former mode afterwards."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)
