"""``dtnh:<method>``: any regularised method with DTNH's conflict-free descent direction.

DTNH (Wan et al., "Towards Making Deep Transfer Learning Never Hurt", Algorithm 1) changes only the
step between backward and the optimizer: it obtains the task gradient ``g_J`` and the regulariser
gradient ``g_O`` separately from one forward pass, replaces their sum by
:func:`~paramtransfer.optim.dtnh.correct_tensors` (Eqs. 6-7), writes the result into ``.grad`` and lets
the optimizer (SGD, momentum, Adam, with clipping and weight decay) step as usual.

* Methods with a closed-form regulariser gradient (L2-SP, ``reg_gradients()``) need one backward pass,
  for the task term only; the regulariser is then evaluated without building a graph.
* Feature-map regularisers (KnowDist, DELTA) take two backward passes over the one forward graph:
  ``g_J`` with ``retain_graph=True``, then ``g_O``, which stops at the deepest regularised block.

The loss terms arrive already weighted (``"reg"`` is ``lambda * Omega``); projecting ``lambda * g_O``
and adding it is the same as ``g_J + lambda * g_O^y``, so the correction runs with ``lam = 1``.

Every method registered with ``regularized = True`` gets a ``dtnh:`` twin when ``paramtransfer.methods``
is imported; a user's own regularised method can be added with :func:`register_dtnh`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.methods.base import METHODS, Method, make_method, parse_method_spec, register_method
from paramtransfer.optim.dtnh import GRANULARITIES, correct

PREFIX = "dtnh:"
ANGLE_NAMES = ("d_vs_task", "d_vs_reg", "sum_vs_task", "sum_vs_reg")  # Angles 1, 2, 3, 4 (Sec. V-D)
# the size of the conflicts (optim.dtnh.Correction.sizes), averaged over all steps and over corrected ones
SIZE_NAMES = ("reg_task_norm_ratio", "cosine", "removed_ratio")


def _validate(self: Any) -> None:
    base_post_init = getattr(super(type(self), self), "__post_init__", None)
    if base_post_init is not None:
        base_post_init()
    if self.granularity not in GRANULARITIES:
        raise UserError(f"dtnh granularity={self.granularity!r}: use one of {', '.join(GRANULARITIES)}")
    if isinstance(self.angle_every, bool) or not isinstance(self.angle_every, int) or self.angle_every < 0:
        raise UserError(f"dtnh angle_every={self.angle_every!r}: a whole number of steps (0: never)")


def with_dtnh(base: type[Method]) -> type[Method]:
    """A subclass of ``base`` whose backward step is DTNH's (config: base options + DTNH's own).

    DTNH options:
        granularity: ``"global"`` (default, the paper: one projection over the whole parameter vector)
            or ``"tensor"`` (one projection per parameter tensor).
        angle_every: log the four angles of Sec. V-D at every this-many-th step of each epoch (0: never);
            counting restarts each epoch so that the log is the same after a resume.
    """
    config = dataclasses.make_dataclass(
        f"DTNH{base.Config.__name__}",
        [("granularity", str, "global"), ("angle_every", int, 1)],
        bases=(base.Config,),
        namespace={"__post_init__": _validate},
    )

    class DTNH(base):  # type: ignore[valid-type, misc]
        __doc__ = f"{base.__name__} with DTNH's corrected descent direction.\n\n{with_dtnh.__doc__}"
        Config = config
        reg_needs_graph = False  # a closed-form g_O needs no autograd graph for the regulariser

        def build(self, *args: Any, **kwargs: Any) -> nn.Module:
            self._epoch: dict[str, Any] = _new_epoch()
            return super().build(*args, **kwargs)

        def backward(self, terms: dict[str, torch.Tensor], model: nn.Module) -> None:
            params = [p for g in self.param_groups(model) for p in g["params"] if p.requires_grad]
            task = terms["task"]
            reg_terms = [v for k, v in terms.items() if k != "task"]
            closed_form = getattr(self, "reg_gradients", None)
            if closed_form is not None:
                task.backward()
                g_task = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                reg_grads = closed_form()
                scale = getattr(self, "loss_scale", 1.0)  # float16: the task's gradient is scaled
                g_reg = [reg_grads[p] * scale if p in reg_grads else torch.zeros_like(p) for p in params]
            else:
                reg = sum(reg_terms, torch.zeros(()))
                g_task = list(
                    torch.autograd.grad(task, params, retain_graph=reg.requires_grad, materialize_grads=True)
                )
                if reg.requires_grad:
                    g_reg = list(torch.autograd.grad(reg, params, materialize_grads=True))
                else:
                    g_reg = [torch.zeros_like(p) for p in params]
            result = correct(g_task, g_reg, 1.0, self.config.granularity)
            for p, d in zip(params, result.direction, strict=True):
                p.grad = d
            ep = self._epoch
            every = self.config.angle_every
            if every and ep["steps"] % every == 0:
                ep["angles"].append([ep["steps"], *result.angles])
            ep["steps"] += 1
            ep["corrected"] += result.corrected > 0
            ratio, cosine, removed = result.sizes
            if ratio is not None and cosine is not None:
                sums = ep["sizes"]
                sums[0] += 1
                sums[1] += ratio
                sums[2] += cosine
                sums[3] += removed
                if result.corrected > 0:
                    sums[4] += 1
                    sums[5] += ratio
                    sums[6] += cosine
                    sums[7] += removed
            ep["tensors_corrected"] += result.corrected

        def epoch_stats(self) -> dict[str, Any]:
            ep = self._epoch
            self._epoch = _new_epoch()
            if not ep["steps"]:
                return {}
            return {
                "dtnh_steps": ep["steps"],
                "dtnh_corrected": ep["corrected"],
                "dtnh_tensors_corrected": ep["tensors_corrected"],
                "dtnh_angles": ep["angles"],  # rows [step within the epoch, Angle 1, 2, 3, 4]
                # [steps, sum ||g_O||/||g_J||, sum cos, sum removed/||g_J||; the same over corrected steps]
                "dtnh_sizes": ep["sizes"],
            }

        def summarize_history(self, history: list[dict[str, Any]]) -> dict[str, Any]:
            steps = sum(rec.get("dtnh_steps", 0) for rec in history)
            corrected = sum(rec.get("dtnh_corrected", 0) for rec in history)
            tensors = sum(rec.get("dtnh_tensors_corrected", 0.0) for rec in history)
            rows, offset = [], 0
            for rec in history:
                rows += [[offset + row[0], *row[1:]] for row in rec.get("dtnh_angles", [])]
                offset += rec.get("dtnh_steps", 0)
            angles = {"step": [row[0] for row in rows]}
            angles.update({name: [row[i + 1] for row in rows] for i, name in enumerate(ANGLE_NAMES)})
            out: dict[str, Any] = {
                "corrected_fraction": corrected / steps if steps else 0.0,
                "corrected_tensor_fraction": tensors / steps if steps else 0.0,
                "granularity": self.config.granularity,
                "angle_every": self.config.angle_every,
                "angles": angles,
            }
            sizes = [sum(rec.get("dtnh_sizes", [0.0] * 8)[i] for rec in history) for i in range(8)]
            for suffix, (n, first) in {"": (sizes[0], 1), "_corrected": (sizes[4], 5)}.items():
                for i, name in enumerate(SIZE_NAMES):
                    out[f"mean_{name}{suffix}"] = sizes[first + i] / n if n else None
            for name in ANGLE_NAMES:
                values = angles[name]
                finite = [v for v in values if v is not None]
                out[f"mean_angle_{name}"] = sum(finite) / len(finite) if finite else None
            return out

    DTNH.__name__ = DTNH.__qualname__ = f"DTNH{base.__name__}"
    return DTNH


def _new_epoch() -> dict[str, Any]:
    return {"steps": 0, "corrected": 0, "tensors_corrected": 0.0, "angles": [], "sizes": [0.0] * 8}


def dtnh_base(variant: str) -> str | None:
    """The variant that ``dtnh:X[...]`` corrects: ``X`` with the same options minus DTNH's own.

    Example: ``dtnh:l2sp[alpha=1,granularity=tensor]`` -> ``l2sp[alpha=1]``; not a dtnh variant -> None.
    """
    if not variant.startswith(PREFIX):
        return None
    name, options = parse_method_spec(variant)
    own = {"granularity", "angle_every"}
    return make_method(name[len(PREFIX) :], **{k: v for k, v in options.items() if k not in own}).variant()


def register_dtnh(name: str) -> type[Method]:
    """Register ``dtnh:<name>`` for the registered regularised method ``name``."""
    base = METHODS.get(name)
    if not getattr(base, "regularized", False):
        raise UserError(f"dtnh needs a method with a regulariser term; {name!r} has none")
    return register_method(PREFIX + name)(with_dtnh(base))


def register_twins() -> None:
    """Register ``dtnh:<name>`` for every registered regularised method that has none yet."""
    for name in METHODS.names():
        if getattr(METHODS.get(name), "regularized", False) and PREFIX + name not in METHODS:
            register_dtnh(name)
