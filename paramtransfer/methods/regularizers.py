"""Regularised fine-tuning towards the source: L2-SP (weights) and KnowDist (feature maps).

Both start from the source weights and add a regulariser Omega(w, w_s) to the task loss (DTNH paper,
Eq. 1); they return it as a separate loss term ``"reg"`` so that DTNH can correct the direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.methods.base import Method, MethodConfig, frozen_copy, register_method, transfer_copy
from paramtransfer.models.layered import LayeredNet
from paramtransfer.runtime import evaluating


@dataclass
class L2SPConfig(MethodConfig):
    """Attributes:
    alpha: weight of the pull of the transferred parameters (all but the head's) towards the source values.
    beta: weight of plain L2 decay on the new head, which has no source value.
    """

    alpha: float = 0.1
    beta: float = 0.01

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise UserError("l2sp alpha and beta must be >= 0")


@register_method("l2sp")
class L2SP(Method):
    """L2-SP (Li et al. 2018; DTNH paper Eq. 2).

    ``Omega(w) = alpha/2 * ||w_S - w_S^0||^2 + beta/2 * ||w_head||^2`` where ``w_S`` are the transferred
    parameters (everything but the head: every block and, in a wrapped model, the modules that are
    neither a named block nor the head), ``w_S^0`` their source values (also the starting point) and
    ``w_head`` the new task layer. Its gradient is closed form: ``alpha * (w_S - w_S^0)`` and
    ``beta * w_head`` (:meth:`reg_gradients`).
    """

    Config = L2SPConfig
    regularized = True
    strength_option: ClassVar[str] = "alpha"  # the coefficient a report names
    reg_needs_graph = True  # DTNH uses reg_gradients() instead and turns this off

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        model = transfer_copy(self._require_source(source), num_classes, seed)
        self.transferred = model.transferred_parameters()  # blocks and a wrapped model's un-named part
        self.anchors = [p.detach().clone() for p in self.transferred]
        self.head_params = list(model.head.parameters())
        return model

    def regularizer(self) -> torch.Tensor:
        c: L2SPConfig = self.config  # type: ignore[assignment]
        sp = sum(((p - a) ** 2).sum() for p, a in zip(self.transferred, self.anchors, strict=True))
        head = sum((p**2).sum() for p in self.head_params)
        return 0.5 * c.alpha * sp + 0.5 * c.beta * head

    def reg_gradients(self) -> dict[nn.Parameter, torch.Tensor]:
        """The closed-form gradient of :meth:`regularizer` for each parameter (no backward pass)."""
        c: L2SPConfig = self.config  # type: ignore[assignment]
        moved = torch._foreach_sub([p.detach() for p in self.transferred], self.anchors)
        torch._foreach_mul_(moved, c.alpha)
        grads = dict(zip(self.transferred, moved, strict=True))
        grads.update({p: c.beta * p.detach() for p in self.head_params})
        return grads

    def loss_terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(self.reg_needs_graph and torch.is_grad_enabled()):
            reg = self.regularizer()
        return {"task": F.cross_entropy(model(x), y), "reg": reg}


@dataclass
class KnowDistConfig(MethodConfig):
    """Attributes:
    beta: weight of the feature-map distance.
    layers: indices of the blocks whose outputs are compared (``"all"``: every block).
    """

    beta: float = 0.01
    layers: list[int] | str = field(default="all")

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise UserError("knowdist beta must be >= 0")
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if isinstance(self.layers, str) and self.layers != "all":
            raise UserError(f"knowdist layers={self.layers!r}: give a list of block indices or 'all'")
        if not self.layers:
            raise UserError("knowdist layers=[] compares nothing; give block indices (or use finetune)")


class WithFrozenSource(nn.Module):
    """A target LayeredNet beside a frozen copy of the source; ``forward`` is the target's."""

    def __init__(self, target: LayeredNet, source: LayeredNet) -> None:
        super().__init__()
        self.target = target
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(x)


def feature_distance(
    target_feats: list[torch.Tensor], source_feats: list[torch.Tensor], layers: list[int]
) -> torch.Tensor:
    """``1/n * sum_j sum_i ||F_j(w, x_i) - F_j(w_s, x_i)||^2`` over the chosen layers (DTNH Eq. 3)."""
    n = target_feats[0].shape[0]
    return sum(((target_feats[j] - source_feats[j]) ** 2).sum() for j in layers) / n


@register_method("knowdist")
class KnowDist(Method):
    """Feature-map distillation towards the frozen source (Yim et al. 2017; DTNH paper Eq. 3).

    The target starts from the source weights; ``beta * 1/n sum_j sum_i ||F_j(w, x_i) - F_j(w_s, x_i)||^2``
    over the outputs ``F_j`` of the chosen blocks is added to the task loss. The source copy is frozen
    (weights and BatchNorm statistics): like a teacher, it runs in eval mode, so with BatchNorm the
    distance is not exactly zero at the start of training (the target normalises with batch statistics).
    Modules of a wrapped model that are neither a named block nor the head train with the target and
    are anchored through the block outputs they feed (one after the last compared block is not).
    """

    Config = KnowDistConfig
    regularized = True
    strength_option: ClassVar[str] = "beta"  # the coefficient a report names

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        src = self._require_source(source)
        target = transfer_copy(src, num_classes, seed)
        frozen = frozen_copy(src)
        c: KnowDistConfig = self.config  # type: ignore[assignment]
        n = src.num_blocks
        self.layers = list(range(n)) if c.layers == "all" else [int(i) for i in c.layers]
        bad = [i for i in self.layers if not -n <= i < n]
        if bad:
            raise UserError(f"knowdist layers {bad} outside the source's blocks 0..{n - 1}")
        return WithFrozenSource(target, frozen)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.target.parameters() if p.requires_grad]}]

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.target(x)

    def export(self, model: nn.Module) -> nn.Module:
        return model.target

    # the trainer passes each batch's row indices, so that the frozen source's features on the training
    # split can be computed once (prepare) instead of at every step
    wants_batch_index = True

    def prepare(self, model: nn.Module, task: Any) -> None:
        """The frozen source's outputs of the compared blocks on the whole training split, computed once
        in eval mode when they fit ``runtime.cache_mb`` (the teacher is frozen and deterministic, so a
        cached row equals the one computed at a step); never while the inputs are augmented."""
        self._teacher: list[torch.Tensor | None] | None = None
        split, rt = task.train, self.runtime
        if rt.augmenting or not rt.cache_mb or not len(split):
            return
        n = model.source.num_blocks
        layers = sorted({j % n for j in self.layers})
        with torch.no_grad(), evaluating(model.source), rt.autocast():
            one = model.source.features(rt.to(split.inputs(slice(0, 1))))
            size = sum(one[j].numel() * one[j].element_size() for j in layers) * len(split)
            if size > rt.cache_mb * 2**20:
                return
            channels_last = next(model.target.parameters()).is_contiguous(memory_format=torch.channels_last)
            chunks = [model.source.features(xb) for xb in rt.inputs(split, 256, channels_last=channels_last)]
        self._teacher = [torch.cat([c[j] for c in chunks]) if j in layers else None for j in range(n)]

    def paired_features(
        self, model: nn.Module, x: torch.Tensor, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The target's logits and block outputs, and the frozen source's block outputs (no graph): the
        cached rows ``index`` of the training split when there are (see :meth:`prepare`)."""
        logits, feats = model.target.forward_features(x)
        cache = getattr(self, "_teacher", None)
        if cache is not None and index is not None:
            idx = index.to(next(t for t in cache if t is not None).device)
            return logits, feats, [t[idx] if t is not None else None for t in cache]  # type: ignore[misc]
        with torch.no_grad():
            source_feats = model.source.features(x)
        return logits, feats, source_feats

    def loss_terms(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        c: KnowDistConfig = self.config  # type: ignore[assignment]
        logits, feats, source_feats = self.paired_features(model, x, index)
        return {
            "task": F.cross_entropy(logits, y),
            "reg": c.beta * feature_distance(feats, source_feats, self.layers),
        }
