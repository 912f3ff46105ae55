"""LPS: Learnable Parameter Similarity (Wang, Lai, Liang & Wang), Sections 3-5, Eqs. 5-9.

A *second-order network* reads the weights of trained models and learns, from models labelled with the
task they were trained on, an embedding in which models of the same task are close. Hidden units of a
trained network can come out in any order, so each layer's weights ``theta_l`` (``[g, c, kh, kw]``) are
first *aligned* against learned second-order filters ``phi_l`` (``[g', c, kh, kw]``):

    Eq. 5   s[gi, g'j, ci, cj] = <theta[gi, ci], phi[g'j, cj]>_F    (every channel pair, layer > 1)
    Eq. 6   s[gi, g'j] = sum_cj max_ci s[gi, g'j, ci, cj]            (channel alignment, layer > 1)
    Eq. 7   s[gi, g'j] = sum_c <theta[gi, c], phi[g'j, c]>_F          (layer 1: the image's channels)
    Eq. 8   s[g'j, :] = sort_gi s[gi, g'j]                            (filter alignment)

so the aligned ``[g', g]`` matrix does not depend on the order of the layer's filters (Eq. 8) nor, above
layer 1, on the order of its input channels (the max over ``ci`` in Eq. 6). Each layer is one *branch*:
alignment, a fully connected projection (the branch's embedding) and a task classifier with class
probabilities ``q^l``. The branches are trained together with the branch-weighted loss of Eq. 9.

Erratum (see DESIGN.md): the authors' public code disables the sort after layer 1 by accident; here
every layer is sorted (Eq. 8 for ``l in [1, L-1]``). Only the task layer, whose filter order is fixed by
the labels, is left unsorted, and only when asked (``last_is_head=True``).

Baselines of Sec. 5.1 / Tables 1-2, with the same ``embed``/``forward``/``loss`` interface:
:class:`FlatFC` ("only one FC layer", on the flattened parameters) and :class:`FrobeniusFC`
("Frobenius + FC, w/o alignment": Eq. 7 on every layer, no sort). Random prediction needs no model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from paramtransfer.errors import UserError

ALIGNMENTS = ("both", "filter", "channel", "none")
# Above layer 1, Eq. 5 materialises one value per (filter, second-order filter, channel pair); the
# second-order filters are processed in chunks so that this tensor stays below ~64 MB in float32.
_MAX_PAIR_ELEMENTS = 1 << 24


def align_filters(
    theta: torch.Tensor, phi: torch.Tensor, first_layer: bool, alignment: str = "both"
) -> torch.Tensor:
    """The aligned response of second-order filters ``phi`` to a layer's filters ``theta`` (Eqs. 5-8).

    Args:
        theta: the layer's weights (filters ``g``, input channels ``c``, kernel ``kh x kw``); a linear
            layer is a ``1 x 1`` convolution (see :func:`model_parameters`). Leading batch dimensions
            (several models at once) are allowed.
        phi: the second-order filters ``phi_l``, with the same channels and kernel as ``theta`` (the
            paper's ``(g'_l, c_l, h_l, w_l)``); ``g2`` is free.
        first_layer: ``theta`` reads the input image, whose channel order is fixed: Eq. 7 instead of
            Eqs. 5-6.
        alignment: which of the paper's two alignments to apply (the Fig. 3c ablation):
            ``"both"`` (the method): Eqs. 5-6 (layer > 1) or 7 (layer 1), then the sort of Eq. 8;
            ``"filter"``: Eq. 7 on every layer (channels paired by index), then Eq. 8;
            ``"channel"``: Eqs. 5-6 (layer > 1) or 7 (layer 1), no sort;
            ``"none"``: Eq. 7, no sort (the "Frobenius + FC, w/o alignment" baseline).

    Returns:
        ``s[..., j, :]``: the responses of ``phi[j]`` to all of ``theta``'s filters, sorted in descending
        order (strongest match first) when the filters are aligned. With ``"both"`` it is invariant to
        permuting ``theta``'s filters and, unless ``first_layer``, its input channels.

    Shape:
        theta ``[..., g, c, kh, kw]``, phi ``[g2, c, kh, kw]`` -> ``[..., g2, g]``.

    Example:
        >>> theta, phi = torch.randn(8, 4, 3, 3), torch.randn(5, 4, 3, 3)
        >>> s = align_filters(theta, phi, first_layer=False)
        >>> torch.allclose(s, align_filters(theta[torch.randperm(8)][:, torch.randperm(4)], phi, False))
        True
    """
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment {alignment!r} is unknown; use one of {ALIGNMENTS}")
    if theta.dim() < 4 or phi.dim() != 4:
        raise ValueError(
            f"align_filters takes theta [..., g, c, kh, kw] and phi [g2, c, kh, kw]; "
            f"got {tuple(theta.shape)} and {tuple(phi.shape)}"
        )
    if theta.shape[-3:] != phi.shape[-3:]:
        raise ValueError(
            f"theta {tuple(theta.shape)} and phi {tuple(phi.shape)} differ in channels or kernel size; "
            "phi must be [g2, c, kh, kw] with theta's c, kh, kw"
        )
    lead = theta.shape[:-4]
    g, c, kh, kw = theta.shape[-4:]
    t = theta.reshape(-1, g, c, kh * kw)
    p = phi.reshape(phi.shape[0], c, kh * kw)
    if first_layer or alignment in ("filter", "none"):
        s = torch.matmul(t.flatten(2), p.flatten(1).T)  # Eq. 7: [B, g, g2]
    else:
        s = _channel_matched(t, p)  # Eqs. 5-6
    s = s.transpose(1, 2)  # [B, g2, g]
    if alignment in ("both", "filter"):
        s = s.sort(dim=-1, descending=True).values  # Eq. 8
    return s.reshape(*lead, phi.shape[0], g)


def _channel_matched(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Eqs. 5-6: ``[B, g, c, K]``, ``[g2, c, K]`` -> ``[B, g, g2]``, each channel of ``p`` matched to its
    best channel of ``t``. ``max`` (not ``amax``) keeps only indices for backward, so each chunk's pair
    tensor is freed as soon as it is reduced."""
    b, g, c, k = t.shape
    if k == 1:
        # 1x1 kernels: max_ci t*p is p * max(t) where p >= 0 and p * min(t) where p < 0 (same value, and
        # it avoids a [B, g, c, g2, c] outer product that dominates the cost of linear layers)
        tt, pp = t.squeeze(-1), p.squeeze(-1)
        hi, lo = tt.max(dim=-1).values.unsqueeze(-1), tt.min(dim=-1).values.unsqueeze(-1)
        return hi * pp.clamp(min=0).sum(-1) + lo * pp.clamp(max=0).sum(-1)
    rows = t.reshape(b, g * c, k)
    step = max(1, _MAX_PAIR_ELEMENTS // (b * g * c * c))
    out = []
    for start in range(0, p.shape[0], step):
        chunk = p[start : start + step]
        pairs = torch.matmul(rows, chunk.reshape(-1, k).T).view(b, g, c, chunk.shape[0], c)
        out.append(pairs.max(dim=2).values.sum(dim=-1))
    return torch.cat(out, dim=-1)


class LPSOutput(NamedTuple):
    """What the second-order networks return: one set of logits per branch and the combined one.

    ``logits`` is ``log((1/W) sum_l w_l q^l)`` (Eq. 9's mixture, a log-probability); its argmax is the
    predicted task and ``F.nll_loss(logits, y)`` is Eq. 9.
    """

    branch_logits: list[torch.Tensor]
    logits: torch.Tensor


def branch_weighted_loss(
    branch_logits: Sequence[torch.Tensor], labels: torch.Tensor, weights: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Eq. 9, averaged over a batch of models: ``-log((1/W) sum_l w_l q^l_y)``, ``W = sum_l w_l``.

    The branch probabilities are mixed *inside* the log (this is not the weighted sum of per-branch
    cross-entropies); with one non-zero weight it is that branch's cross-entropy.

    Shape:
        ``L x [B, N]`` logits, labels ``[B]`` -> scalar.
    """
    return F.nll_loss(_mixture(branch_logits, weights), labels)


def _mixture(branch_logits: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=branch_logits[0].dtype, device=branch_logits[0].device)
    if w.dim() != 1 or len(w) != len(branch_logits):
        raise ValueError(f"{len(branch_logits)} branches need as many weights, got {tuple(w.shape)}")
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"branch weights must be non-negative with a positive sum, got {w.tolist()}")
    used = [i for i in range(len(w)) if float(w[i]) > 0]
    logq = torch.stack([F.log_softmax(branch_logits[i], dim=-1) for i in used])  # [L+, B, N]
    log_w = torch.log(w[used] / w.sum()).view(-1, *([1] * (logq.dim() - 1)))
    return torch.logsumexp(logq + log_w, dim=0)


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of model embeddings (Sec. 4: normalise, then inner product).

    Shape: ``[..., D]`` and ``[..., D]`` (broadcast) -> ``[...]``.
    """
    return F.cosine_similarity(a, b, dim=-1)


def similarity_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """All pairwise cosine similarities between two sets of embeddings (``b`` defaults to ``a``).

    Shape: ``[n, D]`` and ``[m, D]`` -> ``[n, m]``.
    """
    b = a if b is None else b
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def _check_params(
    params: Sequence[torch.Tensor], shapes: Sequence[torch.Size]
) -> tuple[list[torch.Tensor], bool]:
    """Validate one model's (``[g, c, kh, kw]`` each) or a batch's (``[B, g, c, kh, kw]``) layer weights;
    return them batched, and whether the input was a single model."""
    if len(params) != len(shapes):
        raise UserError(
            f"got {len(params)} weight tensors, but this network was built for {len(shapes)} layers; "
            "pass model_parameters(net) of the architecture it was built for"
        )
    single = params[0].dim() == len(shapes[0])
    batched = []
    for i, (p, shape) in enumerate(zip(params, shapes)):
        got = tuple(p.shape) if single else tuple(p.shape[1:])
        if got != tuple(shape) or p.dim() != len(shape) + (0 if single else 1):
            raise UserError(
                f"layer {i + 1} weights have shape {tuple(p.shape)}, but this network expects "
                f"{tuple(shape)} (or [batch, {', '.join(map(str, shape))}]); pass model_parameters(net) "
                "of the architecture it was built for"
            )
        batched.append(p.unsqueeze(0) if single else p)
    if len({p.shape[0] for p in batched}) != 1:
        raise UserError(f"layer weights disagree on the batch size: {[p.shape[0] for p in batched]}")
    return batched, single


class SecondOrderNet(nn.Module):
    """The hierarchical second-order network of Sec. 4 (Fig. 2): one branch per layer.

    Branch ``l``: ``align_filters(theta_l, phi_l)`` (``[g'_l, g_l]``, Eqs. 5-8) -> flatten -> a fully
    connected projection to ``embed_dim`` (the branch's parameter feature) -> a linear classifier over
    the ``num_classes`` training tasks, with probabilities ``q^l``. Training minimises Eq. 9::

        L = -sum_i Y_i log( (1/W) sum_l w_l q^l_i ),    W = sum_l w_l.

    The paper's experiments use ``w_1 = 1`` and ``w_l = 0`` otherwise (the default); branches with a
    zero weight are skipped by :meth:`loss` and :meth:`embed`.

    Args:
        layer_shapes: the weight shape ``(g, c, kh, kw)`` of each layer, from the input on, e.g.
            ``[p.shape for p in model_parameters(net)]``.
        embed_dim: size ``D`` of each branch's parameter feature.
        num_classes: number ``N`` of task labels in the training model set.
        filters: ``g'_l``, the number of second-order filters, for every layer or per layer.
        alignment: see :func:`align_filters` (``"both"`` is the method, the others the Fig. 3c ablation).
        weights: ``w_l`` of Eq. 9, one per layer (default ``(1, 0, ..., 0)`` as in Sec. 5).
        last_is_head: the last layer is the task layer, whose filter order is fixed by the labels; it is
            then not sorted (Eq. 8 is for ``l in [1, L-1]``). The paper omits this layer.
        starts_at_input: the first layer reads the input image (Eq. 7 applies to it).

    Shape:
        params: one tensor per layer, ``[g, c, kh, kw]`` for one model or ``[B, g, c, kh, kw]`` for a
        batch; embed -> ``[B, L+ * D]`` (``[L+ * D]`` for one model), ``L+`` = branches with ``w_l > 0``.
    """

    def __init__(
        self,
        layer_shapes: Sequence[Sequence[int]],
        embed_dim: int,
        num_classes: int,
        *,
        filters: int | Sequence[int] = 16,
        alignment: str = "both",
        weights: Sequence[float] | None = None,
        last_is_head: bool = False,
        starts_at_input: bool = True,
    ) -> None:
        super().__init__()
        if alignment not in ALIGNMENTS:
            raise UserError(f"alignment {alignment!r} is unknown; use one of {', '.join(ALIGNMENTS)}")
        shapes = [torch.Size(s) for s in layer_shapes]
        if not shapes or any(len(s) != 4 for s in shapes):
            raise UserError(
                "SecondOrderNet needs one (g, c, kh, kw) weight shape per layer, e.g. "
                f"[p.shape for p in model_parameters(net)]; got {[tuple(s) for s in shapes]}"
            )
        n = len(shapes)
        counts = [filters] * n if isinstance(filters, int) else list(filters)
        if len(counts) != n or min(counts) < 1:
            raise UserError(f"filters must be a positive int or one per layer ({n}); got {filters}")
        w = [1.0] + [0.0] * (n - 1) if weights is None else [float(x) for x in weights]
        if len(w) != n or min(w) < 0 or sum(w) <= 0:
            raise UserError(f"weights must be {n} non-negative numbers with a positive sum; got {weights}")
        if embed_dim < 1 or num_classes < 1:
            raise UserError(f"embed_dim and num_classes must be positive; got {embed_dim}, {num_classes}")
        self.layer_shapes = shapes
        self.alignment = alignment
        self.last_is_head = last_is_head
        self.starts_at_input = starts_at_input
        self.register_buffer("weights", torch.tensor(w))
        self.phi = nn.ParameterList(
            # unit-variance responses to unit-variance weights (a fan-in init, as for a convolution)
            nn.Parameter(torch.randn(g2, *s[1:]) / math.sqrt(s[1:].numel()))
            for g2, s in zip(counts, shapes)
        )
        self.project = nn.ModuleList(nn.Linear(g2 * s[0], embed_dim) for g2, s in zip(counts, shapes))
        self.classify = nn.ModuleList(nn.Linear(embed_dim, num_classes) for _ in shapes)

    @classmethod
    def for_model(
        cls, net: nn.Module, embed_dim: int, num_classes: int, *, head: bool = False, **kwargs: Any
    ) -> SecondOrderNet:
        """A second-order network for models of ``net``'s architecture (the layers of
        :func:`model_parameters`; ``head=True`` also reads the task layer and sets ``last_is_head``)."""
        shapes = [p.shape for p in model_parameters(net, head=head)]
        return cls(shapes, embed_dim, num_classes, last_is_head=head, **kwargs)

    def _layer_alignment(self, layer: int) -> str:
        if self.last_is_head and layer == len(self.layer_shapes) - 1:
            return {"both": "channel", "filter": "none"}.get(self.alignment, self.alignment)
        return self.alignment

    def _branch(self, layer: int, theta: torch.Tensor) -> torch.Tensor:
        phi = self.phi[layer]
        first = self.starts_at_input and layer == 0
        s = align_filters(theta.to(phi.dtype), phi, first, self._layer_alignment(layer))
        return self.project[layer](s.flatten(1))

    def _used(self) -> list[int]:
        return [i for i in range(len(self.layer_shapes)) if float(self.weights[i]) > 0]

    def branch_features(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each branch's projection (its unnormalised parameter feature), ``L x [B, D]``."""
        batched, _ = _check_params(params, self.layer_shapes)
        return [self._branch(i, p) for i, p in enumerate(batched)]

    def embed(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The model embedding: each weighted branch's feature, L2-normalised and scaled by
        ``sqrt(w_l / W)``, concatenated. Its cosine similarity is therefore the ``w``-weighted mean of
        the branches' cosine similarities; with the paper's ``w = (1, 0, ...)`` it is branch 1's
        normalised feature (Sec. 4: "normalize parameter features and use the cosine similarity")."""
        batched, single = _check_params(params, self.layer_shapes)
        share = self.weights / self.weights.sum()
        parts = [F.normalize(self._branch(i, batched[i]), dim=-1) * share[i].sqrt() for i in self._used()]
        out = torch.cat(parts, dim=-1)
        return out[0] if single else out

    def forward(self, params: Sequence[torch.Tensor]) -> LPSOutput:
        """Logits of every branch (zero-weight ones too, for the per-branch analysis of Fig. 3b) and
        Eq. 9's weighted mixture (see :class:`LPSOutput`)."""
        batched, single = _check_params(params, self.layer_shapes)
        branch = [self.classify[i](self._branch(i, p)) for i, p in enumerate(batched)]
        mixed = _mixture(branch, self.weights)
        if single:
            return LPSOutput([b[0] for b in branch], mixed[0])
        return LPSOutput(branch, mixed)

    def loss(self, params: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Eq. 9 averaged over the batch (zero-weight branches are not computed)."""
        batched, single = _check_params(params, self.layer_shapes)
        labels = labels.reshape(1) if single else labels
        used = self._used()
        logits = [self.classify[i](self._branch(i, batched[i])) for i in used]
        return branch_weighted_loss(logits, labels, self.weights[used])


class FrobeniusFC(SecondOrderNet):
    """Baseline "Frobenius + FC, w/o alignment" (Sec. 5.1): the same branches with the Frobenius inner
    products of Eq. 7 on every layer and no sort, i.e. ``SecondOrderNet(alignment="none")``."""

    def __init__(
        self, layer_shapes: Sequence[Sequence[int]], embed_dim: int, num_classes: int, **kwargs: Any
    ) -> None:
        if kwargs.pop("alignment", "none") != "none":
            raise UserError("FrobeniusFC is the unaligned baseline; use SecondOrderNet for an alignment")
        super().__init__(layer_shapes, embed_dim, num_classes, alignment="none", **kwargs)


class FlatFC(nn.Module):
    """Baseline "only one FC layer" (Sec. 5.1): all weights flattened and concatenated, one fully
    connected projection (the embedding), a task classifier; ``hidden`` adds ReLU layers before the
    projection (an MLP). Same interface as :class:`SecondOrderNet`, with one branch.

    Shape:
        params as for :class:`SecondOrderNet`; embed -> ``[B, D]`` (``[D]`` for one model).
    """

    def __init__(
        self,
        layer_shapes: Sequence[Sequence[int]],
        embed_dim: int,
        num_classes: int,
        *,
        hidden: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.layer_shapes = [torch.Size(s) for s in layer_shapes]
        if not self.layer_shapes:
            raise UserError("FlatFC needs at least one layer shape")
        sizes = [sum(s.numel() for s in self.layer_shapes), *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.project = nn.Sequential(*layers, nn.Linear(sizes[-1], embed_dim))
        self.classify = nn.Linear(embed_dim, num_classes)

    def _features(self, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        batched, single = _check_params(params, self.layer_shapes)
        dtype = self.classify.weight.dtype
        return self.project(torch.cat([p.flatten(1).to(dtype) for p in batched], dim=1)), single

    def embed(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        z, single = self._features(params)
        z = F.normalize(z, dim=-1)
        return z[0] if single else z

    def forward(self, params: Sequence[torch.Tensor]) -> LPSOutput:
        z, single = self._features(params)
        logits = self.classify(z)
        if single:
            logits = logits[0]
        return LPSOutput([logits], F.log_softmax(logits, dim=-1))

    def loss(self, params: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        z, single = self._features(params)
        return F.cross_entropy(self.classify(z), labels.reshape(1) if single else labels)


def model_parameters(net: nn.Module, *, head: bool = False, shortcuts: bool = False) -> list[torch.Tensor]:
    """The per-layer weights LPS reads from a LayeredNet (detached copies), as ``[g, c, kh, kw]`` each.

    Every ``nn.Conv2d`` and ``nn.Linear`` of ``net.blocks``, in order (biases and BatchNorm are left
    out, as in the paper). A linear layer ``[out, in]`` becomes ``[out, in, 1, 1]``, except right after
    a convolution with ``C`` filters (a flatten): ``[out, C, h, w]`` with ``h * w = in / C`` (square when
    possible, else ``[in / C, 1]``), so that its channels are the convolution's filters and permute with
    them. Note that on ``1 x 1`` kernels Eq. 6 keeps only each filter's extreme weights.

    Args:
        net: a LayeredNet (``lenet``, ``resnet20``, ``mobilenet``, or a wrapped model made of those layers).
        head: also return the task layer (the paper omits it; see ``SecondOrderNet(last_is_head=...)``).
        shortcuts: keep the 1x1 down-sampling convolutions of residual shortcuts (the paper omits them).
    """
    blocks = getattr(net, "blocks", None)
    if blocks is None:
        raise UserError(
            f"model_parameters reads a LayeredNet, got {type(net).__name__}; build it with pt.build_model "
            "or wrap your model with pt.LayeredNet.wrap(model, blocks=[...], head=...)"
        )
    modules = [(f"blocks.{n}", m) for n, m in blocks.named_modules()]
    if head:
        modules.append(("head", net.head_layer()))
    out: list[torch.Tensor] = []
    prev_filters: int | None = None  # filters of the preceding layer when it is a convolution
    for name, m in modules:
        if isinstance(m, (nn.RNNBase, nn.Conv1d, nn.Conv3d, nn.modules.conv._ConvTransposeNd, nn.Embedding)):
            raise UserError(
                f"LPS aligns convolution and linear layers; {getattr(net, 'arch', 'this model')} has a "
                f"{type(m).__name__} at {name!r}. Use a convolutional or MLP architecture (e.g. lenet)"
            )
        if isinstance(m, nn.Conv2d):
            if "shortcut" in name.split(".") and not shortcuts:
                continue
            out.append(m.weight.detach().clone())
            prev_filters = m.out_channels
        elif isinstance(m, nn.Linear):
            out.append(_as_filters(m.weight.detach().clone(), prev_filters))
            prev_filters = None
    if not out:
        raise UserError(f"{getattr(net, 'arch', type(net).__name__)} has no conv or linear layer for LPS")
    return out


def _as_filters(weight: torch.Tensor, prev_conv_filters: int | None) -> torch.Tensor:
    out_f, in_f = weight.shape
    c = prev_conv_filters
    if c is None or in_f % c or in_f == c:
        return weight.reshape(out_f, in_f, 1, 1)
    area = in_f // c
    side = math.isqrt(area)
    h, w = (side, side) if side * side == area else (area, 1)
    return weight.reshape(out_f, c, h, w)  # flatten of [C, H, W] is channel-major
