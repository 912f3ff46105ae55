"""DELTA: feature-map distance weighted by channel attention (Li et al., ICLR 2019).

    Omega(w) = alpha * 1/n sum_i sum_j sum_c W_jc * ||FM_jc(w, x_i) - FM_jc(w_s, x_i)||^2
               + beta/2 * ||w_head||^2

``FM_jc`` is channel ``c`` of block ``j``'s output, ``w_s`` the frozen source and ``w_head`` the new task
layer (which has no source value). The attention ``W_j = softmax_c(Delta L_jc / T)`` weighs a channel by
how much the source's target-task loss grows when that channel is zeroed. To read a target-task loss
off the source, DELTA first fits a linear classifier on the frozen source features; we do that with
L-BFGS from a zero start (deterministic) on at most ``attention_examples`` training examples, and
average ``Delta L`` over those examples (the paper writes W per example; its code, like ours, uses one
weight per channel). With ``T = 1`` (the paper) small loss increases give near-uniform weights; a
smaller temperature sharpens them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.methods.base import MethodConfig, register_method
from paramtransfer.methods.regularizers import KnowDist
from paramtransfer.models.layered import LayeredNet


@dataclass
class DeltaConfig(MethodConfig):
    """Attributes:
    alpha: weight of the attention-weighted feature-map distance.
    beta: weight of plain L2 decay on the new head.
    layers: indices of the regularised blocks (``"all"``: every block).
    temperature: T of the softmax over each block's channel loss increases.
    attention_examples: training examples used to measure the attention (the first ones).
    """

    alpha: float = 0.01
    beta: float = 0.01
    layers: list[int] | str = field(default="all")
    temperature: float = 1.0
    attention_examples: int = 128

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise UserError("delta alpha and beta must be >= 0")
        if not self.temperature > 0:
            raise UserError(f"delta temperature must be > 0 (got {self.temperature})")
        if isinstance(self.attention_examples, bool) or not (
            isinstance(self.attention_examples, int) and self.attention_examples >= 1
        ):
            raise UserError(
                f"delta attention_examples must be a whole number >= 1 (got {self.attention_examples!r})"
            )
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if isinstance(self.layers, str) and self.layers != "all":
            raise UserError(f"delta layers={self.layers!r}: give a list of block indices or 'all'")
        if not self.layers:
            raise UserError("delta layers=[] regularises nothing; give block indices (or use finetune)")


def fit_probe(features: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int = 50) -> nn.Linear:
    """A linear classifier on fixed features by L-BFGS from zero weights (no randomness)."""
    head = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    features = features.detach()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(features), y) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head.requires_grad_(False)


def _masked_embeddings(source: LayeredNet, x: torch.Tensor, block: int, channels: range) -> torch.Tensor:
    """Head inputs of the source with one channel of ``block``'s output zeroed, for each channel.

    Returns ``[len(channels), N, D]``. Sequential nets restart from the block's cached output; wrapped
    nets zero the channel with a forward hook on the block and run the whole model.
    """
    out = []
    if source.sequential:
        h = x
        for b in source.blocks[: block + 1]:
            h = b(h)
        for c in channels:
            z = h.clone()
            z[:, c] = 0
            for b in source.blocks[block + 1 :]:
                z = b(z)
            out.append(source.neck(z).flatten(1))
        return torch.stack(out)
    for c in channels:

        def zero(_m: nn.Module, _i: Any, o: torch.Tensor, c: int = c) -> torch.Tensor:
            o = o.clone()
            o[:, c] = 0
            return o

        handle = source.blocks[block].register_forward_hook(zero)
        try:
            out.append(source.embed(x))
        finally:
            handle.remove()
    return torch.stack(out)


@torch.no_grad()
def channel_attention(
    source: LayeredNet, x: torch.Tensor, y: torch.Tensor, layers: list[int], temperature: float = 1.0
) -> list[torch.Tensor]:
    """DELTA's per-channel weights ``W_j = softmax_c(Delta L_jc / T)`` for each block ``j`` in ``layers``."""
    was_training = source.training
    source.eval()
    try:
        num_classes = int(y.max()) + 1
        probe = fit_probe(source.embed(x), y, num_classes)
        base = F.cross_entropy(probe(source.embed(x)), y)
        channels = [f.shape[1] for f in source.features(x[:1])]
        weights = []
        for j in layers:
            emb = _masked_embeddings(source, x, j, range(channels[j]))
            increase = torch.stack([F.cross_entropy(probe(e), y) for e in emb]) - base
            weights.append(torch.softmax(increase / temperature, dim=0))
        return weights
    finally:
        source.train(was_training)


def weighted_feature_distance(
    target_feats: list[torch.Tensor],
    source_feats: list[torch.Tensor],
    layers: list[int],
    weights: list[torch.Tensor],
) -> torch.Tensor:
    """``1/n sum_i sum_j sum_c W_jc ||FM_jc(w, x_i) - FM_jc(w_s, x_i)||^2`` (one weight per channel)."""
    n = target_feats[0].shape[0]
    total = torch.zeros(())
    for j, w in zip(layers, weights, strict=True):
        sq = (target_feats[j] - source_feats[j]) ** 2
        per_channel = sq.flatten(2).sum(2) if sq.dim() > 2 else sq  # [n, C]
        total = total + (per_channel * w).sum()
    return total / n


@register_method("delta")
class Delta(KnowDist):
    """DELTA (Li et al. 2019), the attention-weighted feature-map regulariser; see the module docstring.

    The target starts from the source weights beside a frozen source copy, like :class:`KnowDist`.
    """

    Config = DeltaConfig
    regularized = True
    strength_option: ClassVar[str] = "alpha"  # the coefficient a report names

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        self.weights: list[torch.Tensor] | None = None
        return super().build(source, num_classes, arch=arch, in_shape=in_shape, seed=seed)

    def prepare(self, model: nn.Module, task: Any) -> None:
        super().prepare(model, task)  # the frozen source's cached features, as KnowDist's
        c: DeltaConfig = self.config  # type: ignore[assignment]
        k = c.attention_examples
        rt = self.runtime
        x = rt.to(task.train.inputs(slice(0, k)))
        self.weights = channel_attention(model.source, x, rt.to(task.train.y[:k]), self.layers, c.temperature)

    def loss_terms(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if self.weights is None:
            raise RuntimeError("delta needs its channel attention: call prepare(model, task) first")
        c: DeltaConfig = self.config  # type: ignore[assignment]
        logits, feats, source_feats = self.paired_features(model, x, index)
        head = sum(p.pow(2).sum() for p in model.target.head.parameters())
        reg = c.alpha * weighted_feature_distance(feats, source_feats, self.layers, self.weights)
        return {"task": F.cross_entropy(logits, y), "reg": reg + 0.5 * c.beta * head}

    def diagnostics(self, model: nn.Module, task: Any) -> dict[str, Any]:
        if self.weights is None:
            return {}
        return {"attention": {str(j): w.tolist() for j, w in zip(self.layers, self.weights, strict=True)}}
