"""Co-Tuning (You, Kou, Jiang, Wang, Long: "Co-Tuning for Transfer Learning", NeurIPS 2020).

The source head is kept and fine-tuned beside the new one. A category relationship ``p(y_s | y_t)``
turns each target label into a soft label over the source classes, and the source head learns it:

    L = 1/n sum_i [ CE(y_t_i, f_t(x_i)) + lambda * CE(p(y_s | y_t = y_t_i), f_s(x_i)) ]    (Sec. 3.2)

with ``f_t`` the new head's and ``f_s`` the source head's softmax on the same shared features and
``CE(p, q) = - sum_j p_j log q_j``. The relationship is learned once, before training, from the source
network's predictions ``f_0(x)`` on the target training split (eval mode):

* ``direct`` (Sec. 3.3, Eq. 4): ``p(y_s | y_t = t) = 1/|D_t| sum_{x in D_t} f_0(x)``, the mean source
  softmax over the training examples of class ``t`` (a class without examples gets the mean over all);
* ``reverse`` (Sec. 3.3, Eqs. 5-6): a multinomial logistic regression without intercept from
  ``f_0(x)`` to ``y_t`` gives ``p(y_t | y_s = j) = softmax(W_j)`` (its prediction for the one-hot
  source label ``e_j``); Bayes' rule with the marginal ``p(y_s) = mean_x f_0(x)`` gives ``p(y_s | y_t)``.

``lambda * CE(...)`` is the ``"reg"`` term, so ``dtnh:co_tuning`` exists (its gradient reaches the
source head and the shared blocks). Prediction and export use the new head only.

Relation to the reference code: TLlib (``tllib/regularization/co_tuning.py``) implements the direct
approach only, with ``trade_off = 2.3`` (its example script); the authors' code (thuml/CoTuning,
``module/relationship_learning.py``) uses the reverse approach with the same ``trade_off = 2.3``. Our
``trade_off`` is theirs (same mean-over-batch cross-entropy). Differences in ``reverse``: the authors
pick the logistic regression's regularisation on the validation split and calibrate its scale there
(and pre-scale ImageNet logits by a fixed 0.884); we fit on the training split alone with a fixed
small L2 weight (``REVERSE_L2``) and no calibration, so that the validation split stays held out. Both
use the source head at the same learning rate as the rest (TLlib's ``--finetune`` gives the backbone
and the source head a 10x smaller one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.methods.base import MethodConfig, register_method
from paramtransfer.methods.source_head import SourceHeadMethod, check_coefficient

RELATIONSHIPS = ("direct", "reverse")
REVERSE_L2 = 1e-4  # weight of ||W||^2 in the reverse approach's logistic regression (mean CE + this)


@dataclass
class CoTuningConfig(MethodConfig):
    """Attributes:
    trade_off: ``lambda``, the weight of the source head's cross-entropy to the soft source labels.
    relationship: how ``p(y_s | y_t)`` is learned: ``direct`` (mean source softmax per target class)
        or ``reverse`` (logistic regression from source predictions to target labels, then Bayes' rule).
    """

    trade_off: float = 2.3
    relationship: str = "direct"

    def __post_init__(self) -> None:
        check_coefficient(self.trade_off, "co_tuning trade_off")
        if self.relationship not in RELATIONSHIPS:
            raise UserError(
                f"co_tuning relationship={self.relationship!r}: use one of {', '.join(RELATIONSHIPS)}"
            )


def direct_relationship(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``p(y_s | y_t)`` by the direct approach (Eq. 4): row ``t`` is the mean of ``probs`` over the rows
    labelled ``t`` (the mean over all rows for a class without any).

    Args:
        probs: the source's softmax on the target examples ``[N, C_s]``.
        labels: their target labels ``[N]`` in ``0 .. num_classes - 1``.
        num_classes: ``C_t``.

    Shape:
        ``[C_t, C_s]``, each row a distribution.
    """
    onehot = F.one_hot(labels.long(), num_classes).to(probs.dtype)  # [N, C_t]
    counts = onehot.sum(0)
    sums = onehot.T @ probs
    overall = probs.mean(0, keepdim=True).expand_as(sums)
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], overall)


def reverse_relationship(
    probs: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = REVERSE_L2
) -> torch.Tensor:
    """``p(y_s | y_t)`` by the reverse approach (Eqs. 5-6): fit ``p(y_t | f_0(x)) = softmax(f_0(x) W)``
    (no intercept; L-BFGS from ``W = 0``, deterministic), read ``p(y_t | y_s = j) = softmax(W_j)`` and
    apply Bayes' rule with ``p(y_s) = mean(probs)``. Shape: ``[C_t, C_s]``, each row a distribution."""
    probs = probs.detach().double()
    labels = labels.long()
    w = torch.zeros(probs.shape[1], num_classes, dtype=probs.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probs @ w, labels) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    target_given_source = torch.softmax(w.detach(), dim=1)  # [C_s, C_t]
    joint = target_given_source * probs.mean(0)[:, None]
    return (joint / joint.sum(0, keepdim=True)).T.float()


@register_method("co_tuning")
class CoTuning(SourceHeadMethod):
    """Co-Tuning (see the module docstring for the equations and the reference code's scale).

    Model: :class:`~paramtransfer.methods.source_head.WithSourceHead` (``target.*``, ``source_head.*``),
    everything trainable. Diagnostics, per target class: ``relationship_entropy`` (nats, of
    ``p(y_s | y_t)``; ``log C_s`` is uniform), ``top_source_class`` and ``top_source_prob`` (the source
    class it maps to most), ``top_source_name`` when the source knows its class names.
    """

    Config = CoTuningConfig
    strength_option: ClassVar[str] = "trade_off"

    def prepare(self, model: nn.Module, task: Any) -> None:
        """Learn ``p(y_s | y_t)`` from the frozen source's predictions on the training split (eval mode,
        no augmentation); deterministic, so a resumed run learns the same one."""
        c: CoTuningConfig = self.config  # type: ignore[assignment]
        probs = torch.softmax(self.source_logits(model, task.train), dim=-1).cpu()
        self.release_source()
        num_classes = model.target.num_classes
        labels = task.train.y.long()
        learn = direct_relationship if c.relationship == "direct" else reverse_relationship
        self.relationship = learn(probs, labels, num_classes).to(self.runtime.device)

    def loss_terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        c: CoTuningConfig = self.config  # type: ignore[assignment]
        relationship = getattr(self, "relationship", None)
        if relationship is None:
            raise RuntimeError("co_tuning: call prepare(model, task) before the first step (fit does)")
        new, old = model.both(x)
        soft = relationship.to(old.device)[y]
        return {"task": F.cross_entropy(new, y), "reg": c.trade_off * F.cross_entropy(old.float(), soft)}

    def diagnostics(self, model: nn.Module, task: Any) -> dict[str, Any]:
        r = self.relationship.double().cpu()
        entropy = -(r * r.clamp(min=1e-300).log()).sum(1)
        top_prob, top = r.max(1)
        out: dict[str, Any] = {
            "relationship": self.config.relationship,
            "relationship_entropy": [round(float(v), 6) for v in entropy],
            "relationship_uniform_entropy": round(math.log(r.shape[1]), 6),
            "top_source_class": [int(i) for i in top],
            "top_source_prob": [round(float(v), 6) for v in top_prob],
        }
        if self.source_class_names is not None:
            out["top_source_name"] = [self.source_class_names[int(i)] for i in top]
        return out
