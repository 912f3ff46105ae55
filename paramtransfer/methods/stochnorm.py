"""StochNorm: stochastic normalisation (Kou, You, Wang, Long, "Stochastic Normalization", NeurIPS 2020).

Fine-tuning from the source in which every BatchNorm layer copied from the source picks, in training,
independently for each channel and each forward pass, which statistics normalise it:

    x_hat_moving = (x - mu_running) / sqrt(var_running + eps)
    x_hat_batch  = (x - mu_batch)   / sqrt(var_batch + eps)
    x_hat        = m * x_hat_moving + (1 - m) * x_hat_batch,    m ~ Bernoulli(p) per channel
    y            = gamma * x_hat + beta

``mu_running``/``var_running`` are the moving statistics as they stand before this batch; they keep
updating from the batch statistics as usual (every forward pass, whatever ``m``), and evaluation
normalises with them as usual. A channel normalised by the moving statistics passes no gradient
through the batch mean and variance: the paper's regularising effect on small target sets. A
channel choice applies to the whole batch (and all positions), as in TLlib.

Relation to TLlib (``tllib/normalization/stochnorm.py``, ``_StochNorm.forward``): TLlib's ``p`` is
the probability of the *mini-batch* branch (``s ~ Bernoulli(p)`` selects ``z_1``, the batch-statistics
output; "the probability to choose the second branch (usual BN)"); ours is the probability of the
*moving-statistics* branch, so ``p = 0`` is plain fine-tuning and ``p = 1`` always the moving
statistics. Ours = 1 - TLlib's; the default 0.5 (TLlib's ``--prob 0.5``) is the same either way.
TLlib draws the choice with NumPy's global RNG per channel (one draw per channel shared by the
batch), as we do with torch's RNG on the layer's device, so a seeded run is deterministic and a
resumed one continues the stream (the trainer checkpoints torch's RNG states).

Implementation: TLlib replaces every BatchNorm module by its own StochNorm class; we keep the user's
modules and add a forward pre-hook (remembers the moving statistics before the layer updates them) and
a forward hook (recomputes the channels drawn for the moving statistics) on each BatchNorm that
:func:`~paramtransfer.methods.base.transfer_copy` copied from the source. :meth:`StochNorm.export`
removes the hooks: the exported network is the plain network. The hooks do nothing in eval mode (and
so with ``TrainConfig.bn = "frozen"``, where the source's BatchNorm layers stay in eval mode and
StochNorm is the same as frozen-statistics fine-tuning) and on BatchNorm layers without running
statistics.

A source without BatchNorm has nothing to make stochastic: LeNet and the RNN are refused by
``supported_archs``, a wrapped or hand-made source without BatchNorm when the target is built.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from paramtransfer.errors import UserError
from paramtransfer.methods.base import Method, MethodConfig, register_method, transfer_copy
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.tvmodels import TORCHVISION_ARCHS

BATCHNORM_ARCHS = ("resnet20", "mobilenet", "efficientnet_lite0", *TORCHVISION_ARCHS)


@dataclass
class StochNormConfig(MethodConfig):
    """Attributes:
    p: probability that a channel of a source BatchNorm is normalised by its moving statistics in a
        training forward pass (else by the batch's); 0 is plain fine-tuning. TLlib's ``p`` is 1 - ours.
    """

    p: float = 0.5

    def __post_init__(self) -> None:
        p = self.p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (math.isfinite(p) and 0 <= p <= 1):
            raise UserError(f"stochnorm p={p!r}: give a probability between 0 and 1, e.g. stochnorm[p=0.5]")


class StochasticStatistics:
    """The pair of hooks that makes one BatchNorm layer stochastic (see the module docstring).

    Args:
        p: probability that a channel uses the moving statistics.

    Shape:
        the layer's own: ``[N, C]``, ``[N, C, L]``, ``[N, C, H, W]`` or ``[N, C, D, H, W]``.
    """

    def __init__(self, p: float) -> None:
        self.p = float(p)
        self.moving: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach(self, bn: nn.modules.batchnorm._BatchNorm) -> list[RemovableHandle]:
        return [bn.register_forward_pre_hook(self.before), bn.register_forward_hook(self.after)]

    def before(self, bn: nn.modules.batchnorm._BatchNorm, args: tuple[torch.Tensor, ...]) -> None:
        self.moving = None
        if bn.training and self.p > 0 and bn.running_mean is not None and bn.running_var is not None:
            # copies: the layer updates its running statistics in place during this forward pass
            self.moving = (bn.running_mean.detach().clone(), bn.running_var.detach().clone())

    def after(
        self, bn: nn.modules.batchnorm._BatchNorm, args: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        moving, self.moving = self.moving, None
        if moving is None:
            return None
        x = args[0]
        mean, var = moving
        by_moving = F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps).to(output.dtype)
        if self.p >= 1:
            return by_moving
        chosen = torch.rand(bn.num_features, device=x.device) < self.p
        return torch.where(chosen.view(1, -1, *([1] * (x.dim() - 2))), by_moving, output)


def source_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that came with the source (marked by ``transfer_copy``) and keep running
    statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and getattr(m, "source_statistics", False)
        and m.track_running_stats
    ]


@register_method("stochnorm")
class StochNorm(Method):
    """Fine-tuning with stochastic normalisation; see the module docstring.

    The target is a copy of the source with a fresh head, everything trainable (as ``finetune``); its
    loss is the task's cross-entropy alone (no regulariser term, so no ``dtnh:`` twin).
    """

    Config = StochNormConfig
    supported_archs = (*BATCHNORM_ARCHS, "wrapped", "custom")
    arch_advice = " (StochNorm changes how BatchNorm layers normalise; lenet and rnn have none)"
    strength_option: ClassVar[str] = "p"  # the option a report names

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        model = transfer_copy(self._require_source(source), num_classes, seed)
        norms = source_batchnorms(model)
        if not norms:
            raise UserError(
                f"stochnorm needs BatchNorm layers with running statistics and the {model.arch} source has "
                "none; use finetune (or a source with BatchNorm, e.g. --arch resnet20)"
            )
        c: StochNormConfig = self.config  # type: ignore[assignment]
        self.handles: list[RemovableHandle] = []
        for bn in norms:
            self.handles += StochasticStatistics(c.p).attach(bn)
        return model

    def export(self, model: nn.Module) -> nn.Module:
        """The trained network without the hooks (a plain network; training it again is plain BatchNorm)."""
        for handle in getattr(self, "handles", []):
            handle.remove()
        self.handles = []
        return model

    def diagnostics(self, model: nn.Module, task: Any) -> dict[str, Any]:
        return {"stochastic_batchnorms": len(source_batchnorms(model))}
