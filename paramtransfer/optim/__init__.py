"""Optimisation add-ons: DTNH's conflict-free descent direction (pure functions of tensors).

May import: errors.
"""

from paramtransfer.optim.dtnh import correct_direction, correct_tensors

__all__ = ["correct_direction", "correct_tensors"]
