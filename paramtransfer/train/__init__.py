"""The training loop, checkpoints and determinism.

May import: errors, data, models, methods (``checkpoint``, atomic writes and folder locks, imports only
the standard library and torch: every layer writes files with it).
"""

from paramtransfer.train.trainer import FitOutcome, TrainConfig, evaluate, fit

__all__ = ["FitOutcome", "TrainConfig", "evaluate", "fit"]
