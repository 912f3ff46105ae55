"""Scores computed from results: the Visual Decathlon score (SpotTune paper, Sec. 4.1)."""

from __future__ import annotations

from collections.abc import Sequence

from paramtransfer.errors import UserError


def decathlon_score(errors: Sequence[float], baseline_errors: Sequence[float]) -> float:
    """``S = sum_i alpha_i * max(0, E_i^max - E_i)^2`` with ``alpha_i = 1000 / (E_i^max)^2``.

    Args:
        errors: test errors ``E_i`` (fractions in [0, 1]) of the method on each target domain.
        baseline_errors: ``E_i^max``, the errors of a reasonable baseline on the same domains.

    Each domain contributes at most 1000 (a perfect classifier) and 0 when the method is no better than
    the baseline.

    Example:
        >>> decathlon_score([0.0, 0.5], [0.5, 0.5])
        1000.0
    """
    if len(errors) != len(baseline_errors):
        raise UserError(f"decathlon_score: {len(errors)} errors but {len(baseline_errors)} baseline errors")
    score = 0.0
    for e, e_max in zip(errors, baseline_errors, strict=True):
        if not (0.0 <= e <= 1.0 and 0.0 < e_max <= 1.0):
            raise UserError(
                f"decathlon_score needs errors in [0, 1] and baseline errors in (0, 1]; got {e}, {e_max}"
            )
        score += 1000.0 / e_max**2 * max(0.0, e_max - e) ** 2
    return score
