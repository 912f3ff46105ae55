"""The part LwF and Co-Tuning share: the target network beside a trainable copy of the source's head.

Both methods fine-tune the transferred blocks with a new head for the target classes *and* keep the
source's own head (its source classes) on top of the same features, trained by a second loss term that
ties the source head's outputs to what the source network said or implies:

* LwF (:mod:`paramtransfer.methods.lwf`): the source's recorded outputs on the target images;
* Co-Tuning (:mod:`paramtransfer.methods.co_tuning`): soft source labels ``p(y_s | y_t)``.

:class:`WithSourceHead` holds the two (state_dict names ``target.*`` and ``source_head.*``); one forward
pass of the shared blocks gives both heads' logits (:meth:`WithSourceHead.both`). Prediction and export
use the target network alone, so a trained model deploys as a plain LayeredNet.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.methods.base import Method, frozen_copy, transfer_copy
from paramtransfer.models.layered import LayeredNet, unfreeze
from paramtransfer.runtime import evaluating


class WithSourceHead(nn.Module):
    """A target LayeredNet (new head) beside a trainable copy of the source's head.

    Args:
        target: the transferred network with its new task layer.
        source_head: a copy of the source's task layer (``nn.Linear`` to the source classes).

    Shape:
        forward: ``[B, *in_shape] -> [B, target classes]``; :meth:`both` adds ``[B, source classes]``.
    """

    def __init__(self, target: LayeredNet, source_head: nn.Linear) -> None:
        super().__init__()
        self.target = target
        self.source_head = source_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(x)

    def both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(target logits, source-head logits)`` from one pass through the shared blocks: the source
        head reads the very input of the target head (caught by a forward pre-hook, so that a wrapped
        model runs its own forward)."""
        logits, embedding = self.target.logits_and_embedding(x)
        return logits, self.source_head(embedding)


class SourceHeadMethod(Method):
    """Base of the methods that train the source's head beside the new one (see the module docstring).

    ``build`` keeps a reference to the caller's source (never trained); :meth:`source_logits` runs a
    frozen copy of it, in eval mode, on device, for the source's own outputs on the target data.
    """

    regularized = True  # the source-head term is "reg": dtnh:<name> corrects its gradient

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        src = self._require_source(source)
        old = src.head_layer()  # a UserError for a head that is not nn.Linear
        source_head = copy.deepcopy(old)
        unfreeze(source_head)  # a frozen source's head trains here
        self._source = src
        self._teacher: LayeredNet | None = None
        self.source_classes = int(old.out_features)
        self.source_class_names = list(src.class_names) if src.class_names is not None else None
        return WithSourceHead(transfer_copy(src, num_classes, seed), source_head)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.target(x)

    def export(self, model: nn.Module) -> nn.Module:
        return model.target

    def frozen_source(self, device: torch.device) -> LayeredNet:
        """A frozen copy of the source on ``device``, in eval mode (made once, on first use)."""
        if self._teacher is None:
            self._teacher = frozen_copy(self._source).to(device).eval()
        return self._teacher

    def release_source(self) -> None:
        """Drop the frozen copy (a method that needs it no more after ``prepare`` saves its memory)."""
        self._teacher = None

    @torch.no_grad()
    def source_logits(self, model: nn.Module, split: Any) -> torch.Tensor:
        """The source network's logits on every row of ``split``, in order, computed in eval mode under
        the run's precision; float32, on the run's device. ``[len(split), source classes]``."""
        rt = self.runtime
        teacher = self.frozen_source(rt.device)
        channels_last = next(model.target.parameters()).is_contiguous(memory_format=torch.channels_last)
        outs = []
        with evaluating(teacher), rt.autocast():
            for xb in rt.inputs(split, 256, channels_last=channels_last):
                outs.append(teacher(xb).float())
        if not outs:
            return torch.zeros(0, self.source_classes, device=rt.device)
        return torch.cat(outs)

    @torch.no_grad()
    def source_logits_of(self, x: torch.Tensor) -> torch.Tensor:
        """The source network's logits on a batch (eval mode, no graph)."""
        teacher = self.frozen_source(x.device)
        with evaluating(teacher):
            return teacher(x).float()


def check_coefficient(value: Any, what: str) -> None:
    """A loss coefficient must be a finite number >= 0 (``what`` names it, e.g. ``lwf lambda_o``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value < math.inf):
        raise UserError(f"{what}={value!r}: give a finite number >= 0 (0 turns the source-head term off)")
