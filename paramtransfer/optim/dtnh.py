"""DTNH: the descent direction that never opposes the task gradient (Wan et al., Algorithm 1).

Given the stochastic gradients of the empirical loss ``g_J`` and of the regulariser ``g_O`` at the same
point, DTNH (Eqs. 6-7) keeps ``d = g_J + lam * g_O`` when the two form an acute (or right) angle and
otherwise drops the component of ``g_O`` along ``g_J``:

    g_O^x = <g_J, g_O> / ||g_J||^2 * g_J,    g_O^y = g_O - g_O^x,    d = g_J + lam * g_O^y.

Erratum (see DESIGN.md): Algorithm 1 line 11 and the text print ``lam * J_t``; the direction is
``g_J + lam * g_O^y`` (line 8's form with the projected regulariser gradient). Since ``<d, g_J> =
||g_J||^2 >= 0`` after the correction, the direction never increases the task loss to first order.

Step length: the corrected direction is usually LONGER than the plain sum ``p = g_J + lam * g_O``. With
``c = <g_J, g_O> < 0`` and ``k = c / ||g_J||^2``, split ``g_O = k g_J + g_O^y`` (``g_O^y`` orthogonal to
``g_J``). Then ``p = (1 + lam k) g_J + lam g_O^y`` and ``d = g_J + lam g_O^y``: the same part orthogonal to
``g_J``, and along ``g_J`` a length ``||g_J||`` for ``d`` against ``|1 + lam k| ||g_J||`` for ``p``, so

    ||d||^2 - ||p||^2 = (1 - (1 + lam k)^2) ||g_J||^2 = -lam c (2 + lam c / ||g_J||^2),

for ``lam = 1``: ``-c (2 + c / ||g_J||^2)``. It is positive whenever ``-2 < lam k < 0``, i.e. whenever the
part of ``lam g_O`` opposing ``g_J`` (length ``lam |c| / ||g_J||``) is shorter than ``2 ||g_J||``, which
covers most conflicts; it peaks at ``||g_J||^2`` for ``lam k = -1`` (``p`` has no component along ``g_J``
at all), is zero at ``lam k = -2`` and negative only beyond. Always ``||d||^2 = ||g_J||^2 +
lam^2 ||g_O^y||^2 >= ||g_J||^2``. So at one learning rate DTNH takes longer steps than plain
regularised training, which is consistent with its runs diverging more often at lr 0.1
(``benchmarks/dtnh``); with ``granularity="tensor"`` the identity holds per tensor and the differences add.

The paper treats all parameters as one flat vector (``granularity="global"``); :func:`correct_tensors`
also offers the projection tensor by tensor (``"tensor"``), which removes conflicts that cancel out in
the global inner product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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

    In a conflict ``d`` is longer than ``g_J + lam * g_O`` by ``||d||^2 - ||g_J + lam g_O||^2 =
    -lam <g_J,g_O> (2 + lam <g_J,g_O> / ||g_J||^2)``, positive unless the opposing part of ``lam * g_O``
    exceeds ``2 ||g_J||`` (derivation in the module docstring): the same learning rate takes longer steps.

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
    return correct_tensors([grad_task], [grad_reg], lam)[0][0]


def _dots(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)]


@dataclass
class Correction:
    """The result of :func:`correct`: the direction and what it took.

    Attributes:
        direction: ``d``, one tensor per parameter.
        corrected: fraction of projections applied (global: 0 or 1; tensor: fraction of tensors).
        angles: Angles 1-4 of Sec. V-D in degrees (None where a vector is zero): ``d`` vs ``g_J``,
            ``d`` vs ``g_O``, ``g_J + lam g_O`` vs ``g_J``, ``g_J + lam g_O`` vs ``g_O``.
        sizes: how large the conflict is, not only whether there is one (None where ``g_J`` or ``g_O``
            is zero): ``(||lam g_O|| / ||g_J||, cos(g_J, g_O), ||d - (g_J + lam g_O)|| / ||g_J||)``; the last
            is the length of what the projection removed, relative to the task gradient (0 without a
            conflict; ``lam |<g_J,g_O>| / ||g_J||^2`` for the global projection).
    """

    direction: list[torch.Tensor]
    corrected: float
    angles: tuple[float | None, float | None, float | None, float | None]
    sizes: tuple[float | None, float | None, float | None] = (None, None, None)


def _angle(dot: float, sq_a: float, sq_b: float) -> float | None:
    if sq_a <= 0.0 or sq_b <= 0.0:
        return None
    return math.degrees(math.acos(max(-1.0, min(1.0, dot / math.sqrt(sq_a * sq_b)))))


def _projection_coeff(task: list[torch.Tensor], reg: list[torch.Tensor], jo: float, jj: float) -> float:
    """``<g_J, g_O> / ||g_J||^2``. When ``||g_J||^2`` underflows (float16 already at |g_J| ~ 1e-3), it is
    computed on ``u = g_J / max|g_J|`` instead (``||u||^2 >= 1``) and scaled back."""
    if jj > 1e-30 and math.isfinite(jo / jj):
        return jo / jj
    scale = float(torch.stack([g.abs().max() for g in task]).max())
    units = [g / scale for g in task]
    uo = float(sum(_dots(units, reg), torch.zeros(())))
    uu = float(sum(_dots(units, units), torch.zeros(())))
    return uo / uu / scale


def correct(
    grads_task: Sequence[torch.Tensor],
    grads_reg: Sequence[torch.Tensor],
    lam: float = 1.0,
    granularity: str = "global",
) -> Correction:
    """Algorithm 1 over parameter-shaped gradients, with the angles of Sec. V-D.

    Three inner products per projection group (the whole vector, or each tensor) give the projection
    coefficients and, since ``d = (1 - lam k) g_J + lam g_O``, all four angles without another pass over
    the gradients; the direction itself is one fused pass per tensor. Half-precision gradients are
    combined in float32 and cast back.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is unknown; use one of {GRANULARITIES}")
    acc = torch.promote_types(grads_task[0].dtype, torch.float32) if grads_task else torch.float32
    task = [g.to(acc) for g in grads_task]
    reg = [g.to(acc) for g in grads_reg]
    if granularity == "global":  # three dot products over the concatenation: few calls on many tensors
        groups = [list(range(len(task)))]
        flat_task = torch.cat([g.reshape(-1) for g in task]) if task else torch.zeros(0, dtype=acc)
        flat_reg = torch.cat([g.reshape(-1) for g in reg]) if reg else torch.zeros(0, dtype=acc)
        flats = [(flat_task, flat_reg)]
    else:
        groups = [[i] for i in range(len(task))]
        flats = [(t.reshape(-1), r.reshape(-1)) for t, r in zip(task, reg, strict=True)]
    jj = [float(torch.dot(t, t)) for t, _ in flats]  # per group
    jo = [float(torch.dot(t, r)) for t, r in flats]
    oo = [float(torch.dot(r, r)) for _, r in flats]
    a = [1.0] * len(groups)  # d = a g_J + lam g_O within each group
    corrected = 0
    for g, idx in enumerate(groups):
        if jo[g] < 0:
            k = _projection_coeff([task[i] for i in idx], [reg[i] for i in idx], jo[g], jj[g])
            corrected += 1
            a[g] = 1.0 - lam * k
    direction: list[torch.Tensor] = [torch.empty(0)] * len(task)
    for g, idx in enumerate(groups):
        gt, gr = [task[i] for i in idx], [reg[i] for i in idx]
        if a[g] == 1.0:
            ds = (
                torch._foreach_add(gt, gr)
                if lam == 1.0
                else [t + lam * r for t, r in zip(gt, gr, strict=True)]
            )
        elif lam == 1.0:
            ds = torch._foreach_add(gr, gt, alpha=a[g])
        else:
            ds = [t * a[g] + lam * r for t, r in zip(gt, gr, strict=True)]
        for i, d in zip(idx, ds, strict=True):
            direction[i] = d.to(grads_task[i].dtype)
    sjj, sjo, soo = sum(jj), sum(jo), sum(oo)
    d_j = sum(a[g] * jj[g] + lam * jo[g] for g in range(len(a)))
    d_o = sum(a[g] * jo[g] + lam * oo[g] for g in range(len(a)))
    d_d = sum(a[g] ** 2 * jj[g] + 2 * a[g] * lam * jo[g] + lam**2 * oo[g] for g in range(len(a)))
    l_l = sjj + 2 * lam * sjo + lam**2 * soo
    angles = (
        _angle(d_j, d_d, sjj),
        _angle(d_o, d_d, soo),
        _angle(sjj + lam * sjo, l_l, sjj),
        _angle(sjo + lam * soo, l_l, soo),
    )
    removed = math.sqrt(sum((a[g] - 1.0) ** 2 * jj[g] for g in range(len(a))))
    sizes = (
        math.sqrt(lam**2 * soo / sjj) if sjj > 0 else None,
        sjo / math.sqrt(sjj * soo) if sjj > 0 and soo > 0 else None,
        removed / math.sqrt(sjj) if sjj > 0 else None,
    )
    return Correction(direction, corrected / max(1, len(groups)), angles, sizes)


def correct_tensors(
    grads_task: Sequence[torch.Tensor],
    grads_reg: Sequence[torch.Tensor],
    lam: float = 1.0,
    granularity: str = "global",
) -> tuple[list[torch.Tensor], float]:
    """Algorithm 1 over a list of parameter-shaped gradients (:func:`correct` without the angles).

    ``"global"`` gives exactly :func:`correct_direction` on the concatenation of the tensors; ``"tensor"``
    applies it to each tensor on its own.

    Returns:
        the direction, one tensor per parameter, and the fraction of projections applied (0 or 1 for
        ``"global"``; the fraction of tensors in conflict for ``"tensor"``).
    """
    out = correct(grads_task, grads_reg, lam, granularity)
    return out.direction, out.corrected


def angle_degrees(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float | None:
    """The angle between two vectors given as lists of tensors (None if either is zero)."""
    total = torch.zeros(())
    return _angle(
        float(sum(_dots(a, b), total)), float(sum(_dots(a, a), total)), float(sum(_dots(b, b), total))
    )
