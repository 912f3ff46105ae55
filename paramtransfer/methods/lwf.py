"""LwF: Learning without Forgetting (Li & Hoiem, ECCV 2016; TPAMI 2017).

Before training, the source network's outputs on the target training images are recorded (``Y_o``,
logits of the source head). The shared blocks, the new head ``theta_n`` and a copy of the source head
``theta_o`` then train together on

    L = CE(y, y_hat_n) + lambda_o * L_old(Y_o, Y_hat_o)                         (Li & Hoiem, Eq. 1 / Alg. 1)

    L_old(y_o, y_hat_o) = - sum_i y'_o(i) log y'_hat_o(i),
    y'_o(i) = y_o(i)^(1/T) / sum_j y_o(j)^(1/T)                                 (Eq. 2)

with ``y_o`` the recorded probabilities and ``y_hat_o`` the source head's current ones; on logits,
``y'_o = softmax(z_o / T)``. ``L_old`` is averaged over the batch. Prediction and export use the new
head only (a plain target LayeredNet).

``L_old`` is the ``"reg"`` term, so ``dtnh:lwf`` exists; its gradient reaches the source-head copy and
the shared blocks (the new head gets none), and DTNH projects it over all of them.

Defaults are the paper's: ``lambda_o = 1``, ``T = 2``. TLlib (``tllib/regularization/lwf.py`` with
``examples/task_adaptation/image_classification/lwf.py``) uses ``trade_off = 4``, ``T = 3`` and
``KLDivLoss(batchmean)`` between the tempered softmaxes, without a ``T^2`` factor: the KL divergence is
our ``L_old`` minus the (constant) entropy of the recorded targets, so its gradient is the same and
TLlib's ``trade_off`` is our ``lambda_o``. TLlib leaves the source head out of the optimizer (its
line is commented out); we train it, as the paper does. The paper's optional warm-up (training the
new head alone first) is not done here; a run with ``finetune[freeze=...]`` first is the equivalent.

The source's recorded outputs come from a frozen copy in eval mode (BatchNorm statistics and no
dropout), computed once in ``prepare`` on the training split when they fit ``runtime.cache_mb``; with
augmented inputs (or no cache) the copy computes them at every step on the batch it sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.methods.base import MethodConfig, register_method
from paramtransfer.methods.source_head import SourceHeadMethod, check_coefficient


@dataclass
class LwFConfig(MethodConfig):
    """Attributes:
    lambda_o: weight of the distillation term on the source head (``lambda_o`` of Eq. 1).
    temperature: ``T`` of Eq. 2 (> 0; 1 is plain cross-entropy to the recorded probabilities).
    """

    lambda_o: float = 1.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        check_coefficient(self.lambda_o, "lwf lambda_o")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < float("inf"):
            raise UserError(f"lwf temperature={t!r}: give a finite number > 0, e.g. temperature=2")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """LwF's ``L_old`` (Eq. 2): ``-1/B sum_b sum_i softmax(t_b / T)_i * log softmax(s_b / T)_i``.

    Args:
        student: the source head's current logits ``[B, C]`` (gradient flows here).
        teacher: the recorded source logits ``[B, C]`` (treated as constants).
        temperature: ``T``.

    Example:
        >>> z = torch.tensor([[0.0, 0.0]])
        >>> float(distillation_loss(z, z, 2.0))  # log 2
        0.6931471824645996
    """
    target = torch.softmax(teacher.detach().float() / temperature, dim=-1)
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    return -(target * log_p).sum(-1).mean()


@register_method("lwf")
class LwF(SourceHeadMethod):
    """Learning without Forgetting (see the module docstring for the equations and TLlib's scale).

    Model: :class:`~paramtransfer.methods.source_head.WithSourceHead` (``target.*``, ``source_head.*``),
    everything trainable. Diagnostics: ``old_head_agreement``, the fraction of test images on which the
    trained source head's top class is the source network's, and ``old_head_distill``, ``L_old`` there
    (how much of the source task the shared features and the old head still reproduce).
    """

    Config = LwFConfig
    strength_option: ClassVar[str] = "lambda_o"
    # rows of the recorded outputs are looked up by the batch's indices into task.train
    wants_batch_index = True

    def prepare(self, model: nn.Module, task: Any) -> None:
        """Record ``Y_o`` on the training split once (eval mode, no augmentation) when it fits
        ``runtime.cache_mb``; otherwise each step asks the frozen source."""
        self._recorded: torch.Tensor | None = None
        split, rt = task.train, self.runtime
        if rt.augmenting or not rt.cache_mb or not len(split):
            return
        if len(split) * self.source_classes * 4 > rt.cache_mb * 2**20:
            return
        self._recorded = self.source_logits(model, split)
        self.release_source()

    def recorded_outputs(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``Y_o`` for a batch: the recorded rows ``index`` of the training split when there are, else
        the frozen source's logits on ``x``."""
        recorded = getattr(self, "_recorded", None)
        if recorded is not None and index is not None:
            return recorded[index.to(recorded.device)]
        return self.source_logits_of(x)

    def loss_terms(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        c: LwFConfig = self.config  # type: ignore[assignment]
        new, old = model.both(x)
        teacher = self.recorded_outputs(x, index)
        return {
            "task": F.cross_entropy(new, y),
            "reg": c.lambda_o * distillation_loss(old, teacher, c.temperature),
        }

    @torch.no_grad()
    def diagnostics(self, model: nn.Module, task: Any) -> dict[str, Any]:
        c: LwFConfig = self.config  # type: ignore[assignment]
        if not len(task.test):
            return {}
        model.eval()
        rt = self.runtime
        old = []
        for xb in rt.inputs(task.test, 256):
            with rt.autocast():
                old.append(model.both(xb)[1].float())
        student = torch.cat(old)
        teacher = self.source_logits(model, task.test)
        self.release_source()
        agree = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
        return {
            "old_head_agreement": float(agree),
            "old_head_distill": float(distillation_loss(student, teacher, c.temperature)),
        }
