"""BSS: Batch Spectral Shrinkage (Chen, Wang, Fu, Long, Wang, NeurIPS 2019).

"Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for Safe Transfer Learning".
Fine-tuning from the source, with a penalty on the smallest singular values of the batch's feature
matrix, added to the task's cross-entropy:

    L_bss(F) = eta * sum_{i=1..k} sigma_{-i}^2

``F`` is the ``[B, D]`` matrix of the head's inputs (penultimate features) of the ``B`` examples of a
batch and ``sigma_{-i}`` its ``i``-th smallest singular value. The paper argues that the spectral
components with small singular values are the untransferable ones that fine-tuning on little data
over-fits to; shrinking them keeps the representation from drifting towards them.

Scale and defaults: those of the paper's experiments (``k = 1``, ``eta = 0.001``) and of TLlib
(``tllib/regularization/bss.py``: ``BatchSpectralShrinkage(k=1)`` returns ``sum sigma_{-i}^2``, and
``examples/task_adaptation/image_classification/bss.py`` adds it with ``--trade-off 0.001``): our
``eta`` is TLlib's trade-off. TLlib reads the features after its bottleneck, before the head, as we
do (a net whose neck ends in dropout, like EfficientNet-Lite0, gives the features after the dropout:
those are what the head sees).

A batch has only ``min(B, D)`` singular values. ``k`` must be below ``D`` (checked when the target is
built); when a batch is small (a last batch, ``batch_size`` near ``k``), ``k`` is clamped to
``min(B, D) - 1`` for that batch, so that the largest singular value is never penalised: with
``k = min(B, D)`` the penalty would be ``||F||^2``, a plain feature-norm decay, not a spectral shrinkage;
a batch of one example is not regularised. A feature that is 0 on every example of the batch (a dead
ReLU unit) makes ``F`` rank-deficient, ``sigma_min = 0``: the penalty and its gradient are then exactly
0 (for every ``k`` up to the number of such features), in TLlib as here.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.methods.base import Method, MethodConfig, register_method, transfer_copy
from paramtransfer.models.layered import LayeredNet


@dataclass
class BSSConfig(MethodConfig):
    """Attributes:
    eta: weight of the penalty (the paper's and TLlib's 0.001).
    k: how many of the smallest singular values of the batch's features are penalised (1, as the paper).
    """

    eta: float = 0.001
    k: int = 1

    def __post_init__(self) -> None:
        eta = self.eta
        if (
            isinstance(eta, bool)
            or not isinstance(eta, numbers.Real)
            or not (math.isfinite(eta) and eta >= 0)
        ):
            raise UserError(f"bss eta={eta!r}: give a number >= 0, e.g. bss[eta=0.001]")
        k = self.k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise UserError(f"bss k={k!r}: give a whole number >= 1 of singular values, e.g. bss[k=1]")


def batch_spectral_shrinkage(features: torch.Tensor, k: int) -> torch.Tensor:
    """``sum_{i=1..k} sigma_{-i}^2`` of the feature matrix (``k`` clamped to ``min(B, D) - 1``).

    Args:
        features: the batch's features, ``[B, D]`` (more dimensions are flattened into ``D``).
        k: how many of the smallest singular values to penalise.

    Shape:
        ``[B, D] -> []``; computed in float32 (``torch.linalg.svdvals``, whose gradient is stable even
        for repeated singular values).

    Example:
        >>> f = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
        >>> float(batch_spectral_shrinkage(f, 1))
        4.0
    """
    f = features.flatten(1).float()
    sigma = torch.linalg.svdvals(f)  # descending
    k = min(int(k), sigma.numel() - 1)
    if k <= 0:
        return torch.zeros((), device=f.device)
    return sigma[-k:].pow(2).sum()


@register_method("bss")
class BSS(Method):
    """Fine-tuning with Batch Spectral Shrinkage; see the module docstring.

    The target is a copy of the source with a fresh head, everything trainable (as ``finetune``); the
    loss is ``{"task": CE, "reg": eta * L_bss(F)}``, so ``dtnh:bss`` projects the penalty's gradient.
    With ``eta = 0`` a step is plain fine-tuning's, bit for bit.
    """

    Config = BSSConfig
    regularized = True
    strength_option: ClassVar[str] = "eta"  # the coefficient a report names

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        model = transfer_copy(self._require_source(source), num_classes, seed)
        c: BSSConfig = self.config  # type: ignore[assignment]
        dim = model.head_layer().in_features
        if c.k >= dim:
            raise UserError(
                f"bss k={c.k} penalises at least as many singular values as the head's {dim} input "
                f"features have; use k <= {dim - 1} (the paper uses k=1)"
            )
        return model

    def loss_terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        c: BSSConfig = self.config  # type: ignore[assignment]
        logits, features = model.logits_and_embedding(x)
        return {"task": F.cross_entropy(logits, y), "reg": c.eta * batch_spectral_shrinkage(features, c.k)}
