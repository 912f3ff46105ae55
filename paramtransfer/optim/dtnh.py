"""DTNH: the descent direction that never opposes the task gradient (Wan et al., Algorithm 1).

Given the stochastic gradients of the empirical loss ``g_J`` and of the regulariser ``g_O`` at the same
point, DTNH (Eqs. 6-7) keeps ``d = g_J + lam * g_O`` when the two form an acute (or right) angle and
otherwise drops the component of ``g_O`` along ``g_J``:

    g_O^x = <g_J, g_O> / ||g_J||^2 * g_J,    g_O^y = g_O - g_O^x,    d = g_J + lam * g_O^y.

Erratum (see DESIGN.md): Algorithm 1 line 11 and the text print ``lam * J_t``; the direction is
``g_J + lam * g_O^y`` (line 8's form with the projected regulariser gradient). Since ``<d, g_J> =
||g_J||^2 >= 0`` after the correction, the direction never increases the task loss to first order.

The paper treats all parameters as one flat vector (``granularity="global"``); :func:`correct_tensors`
also offers the projection tensor by tensor (``"tensor"``), which removes conflicts that cancel out in
the global inner product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

GRANULARITIES = ("global", "tensor")


def correct_direction(grad_task: torch.Tensor, grad_reg: torch.Tensor, lam: float) -> torch.Tensor:
    """Algorithm 1 on flat vectors: the corrected descent direction ``d``.

    Args:
        grad_task: ``g_J``, the gradient of the empirical loss, any float dtype.
        grad_reg: ``g_O``, the gradient of the (unweighted) regulariser, same shape and dtype.
        lam: the regularisation coefficient lambda of Eq. 1.

    Shape:
        ``[d]`` and ``[d]`` -> ``[d]``.

    Example:
        >>> correct_direction(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), 1.0)
        tensor([1., 1.])
    """
    if grad_task.shape != grad_reg.shape:
        raise ValueError(f"gradients differ in shape: {tuple(grad_task.shape)} vs {tuple(grad_reg.shape)}")
    if grad_task.dim() != 1:
        raise ValueError(f"correct_direction takes flat vectors; got shape {tuple(grad_task.shape)}")
    if not (grad_task.is_floating_point() and grad_reg.is_floating_point()):
        raise TypeError("correct_direction takes floating-point gradients")
    fixed = _conflict_free([grad_task], [grad_reg])
    if fixed is not None:
        return grad_task + lam * fixed[0]
    return grad_task + lam * grad_reg


def _dots(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)]


def _conflict_free(
    grads_task: Sequence[torch.Tensor], grads_reg: Sequence[torch.Tensor]
) -> list[torch.Tensor] | None:
    """``g_O^y = g_O - <g_J, g_O> / ||g_J||^2 * g_J`` (Eqs. 6-7) if ``<g_J, g_O> < 0``, else None.

    The projection runs on ``u = g_J / max|g_J|``, which spans the same line: ``||u||^2 >= 1``, so a tiny
    task gradient (whose squared norm would underflow, in float16 already at |g_J| ~ 1e-3) cannot
    divide by zero or lose the sign of the correction.
    """
    acc = torch.promote_types(grads_task[0].dtype, torch.float32)  # half types accumulate in float32
    task = [g.to(acc) for g in grads_task]
    reg = [g.to(acc) for g in grads_reg]
    zero = torch.zeros((), dtype=acc)
    if not sum(_dots(task, reg), zero) < 0:
        return None
    scale = torch.stack([g.abs().max() for g in task]).max()
    units = [g / scale for g in task]
    coeff = sum(_dots(units, reg), zero) / sum(_dots(units, units), zero)
    return [(r - coeff * u).to(g.dtype) for r, u, g in zip(reg, units, grads_reg, strict=True)]


def correct_tensors(
    grads_task: Sequence[torch.Tensor],
    grads_reg: Sequence[torch.Tensor],
    lam: float = 1.0,
    granularity: str = "global",
) -> tuple[list[torch.Tensor], float]:
    """Algorithm 1 over a list of parameter-shaped gradients, without concatenating them.

    ``"global"`` gives exactly :func:`correct_direction` on the concatenation of the tensors; ``"tensor"``
    applies it to each tensor on its own.

    Returns:
        the direction, one tensor per parameter, and the fraction of projections applied (0 or 1 for
        ``"global"``; the fraction of tensors in conflict for ``"tensor"``).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is unknown; use one of {GRANULARITIES}")
    if granularity == "global":
        fixed = _conflict_free(grads_task, grads_reg)
        reg = fixed if fixed is not None else grads_reg
        return [gj + lam * gr for gj, gr in zip(grads_task, reg, strict=True)], float(fixed is not None)
    out, corrected = [], 0
    for gj, gr in zip(grads_task, grads_reg, strict=True):
        fixed = _conflict_free([gj], [gr])
        corrected += fixed is not None
        out.append(gj + lam * (fixed[0] if fixed is not None else gr))
    return out, corrected / max(1, len(out))


def angle_degrees(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float | None:
    """The angle between two vectors given as lists of tensors (None if either is zero)."""
    dot = float(sum(_dots(a, b), torch.zeros(())))
    na = math.sqrt(float(sum(_dots(a, a), torch.zeros(()))))
    nb = math.sqrt(float(sum(_dots(b, b), torch.zeros(()))))
    if na == 0.0 or nb == 0.0:
        return None
    return math.degrees(math.acos(max(-1.0, min(1.0, dot / (na * nb)))))
