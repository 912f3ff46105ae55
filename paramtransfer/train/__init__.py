"""The training loop, checkpoints and determinism."""

from paramtransfer.train.trainer import FitOutcome, TrainConfig, evaluate, fit

__all__ = ["FitOutcome", "TrainConfig", "evaluate", "fit"]
