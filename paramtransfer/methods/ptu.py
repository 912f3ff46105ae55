"""PTU: the Parameter Transfer Unit (Zhang, Zhang & Yang, PAKDD 2019).

A frozen source network and a freshly initialised target network of the same architecture run side
by side; after each chosen layer l a PTU mixes their activations (Eqs. 1-2)::

    r_l = sigmoid(W^r [h^S_l, h^T_l])                 fine-tune gate
    z_l = sigmoid(W^z [h^S_l, h^T_l])                 update gate
    h^f_l = (1 - r_l) * h^S_l + r_l * phi(W^h h^S_l)
    h~^T_l = (1 - z_l) * h^T_l + z_l * h^f_l           fed to target layer l+1

z = 0 gives the target network alone (no transfer); z = 1, r = 0 copies the source activation.
Only the target network and the PTUs train. No public implementation of PTU exists; this one is
built from the equations, with two engineering choices measured on our data (see ``PTUConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.methods.base import (
    Method,
    MethodConfig,
    freeze,
    fresh_model,
    frozen_copy,
    register_method,
    transfer_copy,
)
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.zoo import RowRNN

_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}
DEPTHWISE = ("shared", "per_channel")
TARGET_INITS = ("random", "source")


class SeparableConv2d(nn.Module):
    """Depth-wise ``k x k`` convolution followed by a point-wise ``1 x 1`` one (Howard et al. 2017).

    Args:
        shared: one ``k x k`` filter for every channel in the depth-wise step, as the PTU paper's
            Scalability section describes it ("a single filter is shared across all the channels");
            ``False`` gives MobileNet's one filter per channel.

    A shared filter commutes with the point-wise step (both are linear, and zero padding maps to zero),
    so ``pointwise(depthwise(x)) == depthwise(pointwise(x))``; :class:`PTU` uses this to compute both
    gates with one point-wise and one depth-wise convolution over the smaller output. With
    ``kernel_size=1`` the depth-wise step (a per-channel scale) is left out.

    Shape: ``[B, cin, H, W] -> [B, cout, H, W]`` (same padding).
    """

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, shared: bool = False) -> None:
        super().__init__()
        self.cin, self.kernel_size, self.shared = cin, kernel_size, shared
        if kernel_size == 1:
            self.depthwise_weight = None
        else:
            self.depthwise_weight = nn.Parameter(
                torch.empty(1 if shared else cin, 1, kernel_size, kernel_size)
            )
            # the default init of a depth-wise nn.Conv2d (fan-in k*k)
            bound = 1.0 / kernel_size
            nn.init.uniform_(self.depthwise_weight, -bound, bound)
        self.pointwise = nn.Conv2d(cin, cout, 1)

    def depthwise(
        self, x: torch.Tensor, kernel: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The depth-wise step on ``x`` (any channel count when the filter is shared), plus ``bias``."""
        w = self.depthwise_weight if kernel is None else kernel
        if w is None:
            return x if bias is None else x + bias.view(1, -1, 1, 1)
        channels = x.shape[1]
        if w.shape[0] == 1:
            w = w.expand(channels, 1, self.kernel_size, self.kernel_size)
        return F.conv2d(x, w, bias, padding=self.kernel_size // 2, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class PTU(nn.Module):
    """One Parameter Transfer Unit (Eqs. 1-2).

    Args:
        dim: feature size (``kind="linear"``) or channels (``kind="conv"``) of both activations.
        kind: ``"linear"`` (W^r, W^z: Linear(2*dim, dim); W^h: Linear(dim, dim)) or ``"conv"``.
        activation: phi, ``"tanh"`` or ``"relu"``.
        separable: for ``kind="conv"``, depth-wise separable convolutions for W^r, W^z, W^h (the
            paper's choice for scalability); ``False`` uses standard ``k x k`` convolutions.
        depthwise: ``"shared"`` (one depth-wise filter per convolution, the paper's description) or
            ``"per_channel"`` (MobileNet's), for separable conv PTUs.
        kernel_size: spatial size of the convolutions.
        gate_bias_r, gate_bias_z: initial biases of the gates (sigmoid(0) = 0.5).

    Shape:
        ``h_source``, ``h_target``: ``[B, dim]`` or ``[B, dim, H, W]``; output: the same.

    After each forward, ``last_r`` and ``last_z`` hold the gate values (detached).

    Example:
        >>> u = PTU(8)
        >>> u(torch.randn(2, 8), torch.randn(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        dim: int,
        kind: str = "linear",
        activation: str = "tanh",
        separable: bool = True,
        kernel_size: int = 3,
        gate_bias_r: float = 0.0,
        gate_bias_z: float = 0.0,
        depthwise: str = "shared",
    ) -> None:
        super().__init__()
        if kind not in ("linear", "conv"):
            raise UserError(f"PTU kind {kind!r} is unknown; use 'linear' or 'conv'")
        if activation not in _ACTIVATIONS:
            raise UserError(f"PTU activation {activation!r} is unknown; use tanh or relu")
        if depthwise not in DEPTHWISE:
            raise UserError(f"PTU depthwise {depthwise!r} is unknown; use {' or '.join(DEPTHWISE)}")
        shared = depthwise == "shared"
        self.dim, self.kind, self.activation, self.separable = dim, kind, activation, separable
        if kind == "linear":
            self.gate_r: nn.Module = nn.Linear(2 * dim, dim)
            self.gate_z: nn.Module = nn.Linear(2 * dim, dim)
            self.adapt: nn.Module = nn.Linear(dim, dim)
        elif separable:
            self.gate_r = SeparableConv2d(2 * dim, dim, kernel_size, shared)
            self.gate_z = SeparableConv2d(2 * dim, dim, kernel_size, shared)
            self.adapt = SeparableConv2d(dim, dim, kernel_size, shared)
        else:
            pad = kernel_size // 2
            self.gate_r = nn.Conv2d(2 * dim, dim, kernel_size, padding=pad)
            self.gate_z = nn.Conv2d(2 * dim, dim, kernel_size, padding=pad)
            self.adapt = nn.Conv2d(dim, dim, kernel_size, padding=pad)
        with torch.no_grad():
            self._bias(self.gate_r).fill_(gate_bias_r)
            self._bias(self.gate_z).fill_(gate_bias_z)
        self.last_r: torch.Tensor | None = None
        self.last_z: torch.Tensor | None = None

    @staticmethod
    def _bias(gate: nn.Module) -> torch.Tensor:
        return gate.pointwise.bias if isinstance(gate, SeparableConv2d) else gate.bias

    def gates(self, h_source: torch.Tensor, h_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, z)`` of Eq. 1."""
        return torch.sigmoid(self.gate_logits(h_source, h_target)).chunk(2, dim=1)

    def gate_logits(self, h_source: torch.Tensor, h_target: torch.Tensor) -> torch.Tensor:
        """``[W^r x; W^z x]`` stacked along dim 1 (x = [h^S, h^T]): both gates' logits in one pass.

        Linear and standard-conv gates run as one matmul / convolution over the stacked weights of
        W^r and W^z. Separable gates with a shared depth-wise filter run as one point-wise convolution
        (stacked weights) followed by one depth-wise convolution over its output, which has half the
        channels of the input (the two steps commute, see :class:`SeparableConv2d`): measured here
        (LeNet's first PTU, 2 threads, channels-last) that is 25 % faster than two separable
        convolutions. Per-channel depth-wise filters do not commute with the point-wise step; those
        gates run separately (fusing them into grouped convolutions was 35 % slower: oneDNN's grouped
        1x1 path is slow).
        """
        r, z = self.gate_r, self.gate_z
        x = torch.cat([h_source, h_target], 1)
        if self.kind == "linear":
            rz = F.linear(x, torch.cat([r.weight, z.weight]), torch.cat([r.bias, z.bias]))
        elif not self.separable:
            w = torch.cat([r.weight, z.weight])
            rz = F.conv2d(x, w, torch.cat([r.bias, z.bias]), padding=r.padding)
        elif r.shared or r.depthwise_weight is None:
            rz = F.conv2d(x, torch.cat([r.pointwise.weight, z.pointwise.weight]))
            kernels = None
            if r.depthwise_weight is not None:
                kernels = torch.cat([r.depthwise_weight, z.depthwise_weight]).repeat_interleave(self.dim, 0)
            rz = r.depthwise(rz, kernels, torch.cat([r.pointwise.bias, z.pointwise.bias]))
        else:
            rz = torch.cat([r(x), z(x)], 1)
        return rz

    def forward(self, h_source: torch.Tensor, h_target: torch.Tensor) -> torch.Tensor:
        out, rz = _GatedMix.apply(
            self.gate_logits(h_source, h_target),
            self.adapt(h_source),
            h_source,
            h_target,
            self.activation == "relu",
        )
        self.last_r, self.last_z = rz.detach().chunk(2, dim=1)
        return out

    def fix_gates(self) -> None:
        """Fix r = z = 0.5 for good: the gates' parameters become zeros (logits 0) and stop training.

        The control of :class:`PTUConfig` ``fixed_gates``: what is left is a frozen source beside a
        trainable target, averaged (``0.5 h^T + 0.25 h^S + 0.25 phi(W^h h^S)``), with W^h still learned.
        """
        for gate in (self.gate_r, self.gate_z):
            for p in gate.parameters():
                p.detach().zero_()
                p.requires_grad_(False)

    def weights(self) -> list[torch.Tensor]:
        """The weight tensors W^r, W^z, W^h (biases excluded), for the regularisers."""
        return [p for name, p in self.named_parameters() if name.endswith("weight")]


class _GatedMix(torch.autograd.Function):
    """Eq. 2 from the gate logits, with a hand-written backward.

    ``[r; z] = sigmoid(rz_logits)``, ``h_f = lerp(h_S, phi(h_logits), r)``, output ``lerp(h_T, h_f, z)``
    (``lerp(a, b, w) = (1 - w) a + w b``, exact at w = 0 and w = 1). The backward writes both gates'
    gradients into one tensor (no concatenation of the two halves) and needs about a third fewer
    element-wise passes than autograd's, which matters because a PTU's element-wise work is memory-bound.
    Also returns the gate values ``[r; z]`` (not differentiable) for ``last_r`` / ``last_z``.
    """

    @staticmethod
    def forward(ctx: Any, rz_logits, h_logits, h_source, h_target, relu: bool):  # type: ignore[override]
        rz = torch.sigmoid(rz_logits)
        r, z = rz.chunk(2, dim=1)
        adapted = torch.relu(h_logits) if relu else torch.tanh(h_logits)
        h_f = torch.lerp(h_source, adapted, r)
        out = torch.lerp(h_target, h_f, z)
        ctx.save_for_backward(rz, adapted, h_f, h_source, h_target)
        ctx.relu = relu
        ctx.mark_non_differentiable(rz)
        return out, rz

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_rz: torch.Tensor | None):  # type: ignore[override]
        rz, adapted, h_f, h_source, h_target = ctx.saved_tensors
        r, z = rz.chunk(2, dim=1)
        grad_hf = grad * z
        grad_rz = torch.empty_like(rz)
        grad_r, grad_z = grad_rz.chunk(2, dim=1)
        torch.mul(grad, h_f - h_target, out=grad_z)
        torch.mul(grad_hf, adapted - h_source, out=grad_r)
        grad_rz = torch.ops.aten.sigmoid_backward(grad_rz, rz)
        grad_adapted = grad_hf * r
        if ctx.relu:
            grad_h = torch.ops.aten.threshold_backward(grad_adapted, adapted, 0)
        else:
            grad_h = torch.ops.aten.tanh_backward(grad_adapted, adapted)
        need = ctx.needs_input_grad
        grad_source = grad_hf - grad_adapted if need[2] else None
        grad_target = grad - grad_hf if need[3] else None
        return grad_rz, grad_h, grad_source, grad_target, None


def group_lasso(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of the L2 norms of the groups along ``dim`` (0: filter-wise, 1: channel-wise; Wen et al. 2016)."""
    if weight.dim() < 2:
        return weight.new_zeros(())
    other = [d for d in range(weight.dim()) if d != dim]
    return weight.pow(2).sum(dim=other).sqrt().sum()


@dataclass
class PTUConfig(MethodConfig):
    """Attributes:
    layers: 0-based indices of the blocks followed by a PTU (``"all"``, the default: every block, the
        paper's placement). On EfficientNet-Lite0 (``benchmarks/imagenet/README.md``) units after stages
        2, 4, 6, 7 only were better on validation on both targets, within the seeds' spread, at half
        the step time (the unit after the 1,280-channel block holds 8 M of the 9 M unit parameters);
        the default stays "all" and ``layers=[2,4,6,7]`` is the recommendation there.
    activation: phi of Eq. 2 (``tanh`` or ``relu``).
    separable: depth-wise separable convolutions in conv PTUs (the paper's "Scalability" section).
    depthwise: ``"shared"``: one depth-wise filter per convolution, as the paper describes it ("a single
        filter is shared across all the channels"), which lets both gates run as one point-wise and
        one depth-wise convolution; ``"per_channel"``: MobileNet's one filter per channel.
    kernel_size: spatial size of the conv PTUs' convolutions.
    lr_mult: learning-rate multiplier for the PTU parameters (the paper trains PTU at a 10x larger
        learning rate than its baselines; at the base rate the gates hardly leave 0.5).
    gate_bias_r, gate_bias_z: initial gate biases.
    l1, l2, group_filter, group_channel: coefficients of the regularisers on the PTU weights:
        ``l1 * sum|w| + l2 * sum w^2 + group_filter * sum_f ||W_f|| + group_channel * sum_c ||W_c||``.
    source_cache_mb: the frozen source's activations of the training split are computed once before
        training and looked up per batch when they fit in this many MB (0: recompute every step). The
        source is frozen and runs in eval mode, so this changes no number beyond float rounding; it
        saves the source forward pass, about a sixth of a PTU step on LeNet.

    fixed_gates: the control "PTU without gating": r = z = 0.5 throughout (:meth:`PTU.fix_gates`), only
        W^h and the target train. A gain that survives it comes from the architecture (a frozen source
        beside a trainable net), not from learned gating.
    target_init: ``"random"`` (the paper: a freshly initialised target, NoTL's starting point) or
        ``"source"`` (the target starts as a copy of the source, a fine-tuned net beside the frozen one).

    The defaults and the measurements behind them are in ``benchmarks/ptu/README.md``: on our data the
    variants are within noise of each other; ``lr_mult=10`` is kept because at 1 the gates do not
    leave 0.5 within a few hundred steps.
    """

    layers: list[int] | str = "all"
    activation: str = "tanh"
    separable: bool = True
    depthwise: str = "shared"
    kernel_size: int = 3
    lr_mult: float = 10.0
    gate_bias_r: float = 0.0
    gate_bias_z: float = 0.0
    l1: float = 0.0
    l2: float = 0.0
    group_filter: float = 0.0
    group_channel: float = 0.0
    source_cache_mb: float = 1024.0
    fixed_gates: bool = False
    target_init: str = "random"

    def __post_init__(self) -> None:
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = [self.layers]
        if isinstance(self.layers, str) and self.layers != "all":
            raise UserError(f"ptu layers={self.layers!r}: give a list of block indices or 'all'")
        if not self.layers:
            raise UserError("ptu layers=[] places no PTU; give block indices (that would be scratch)")
        if self.activation not in _ACTIVATIONS:
            raise UserError(f"ptu activation={self.activation!r}: use tanh or relu")
        if self.lr_mult <= 0:
            raise UserError("ptu lr_mult must be > 0")
        if min(self.l1, self.l2, self.group_filter, self.group_channel) < 0:
            raise UserError("ptu regulariser coefficients must be >= 0")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise UserError("ptu kernel_size must be an odd positive number")
        if self.depthwise not in DEPTHWISE:
            raise UserError(f"ptu depthwise={self.depthwise!r}: use {' or '.join(DEPTHWISE)}")
        if self.source_cache_mb < 0:
            raise UserError("ptu source_cache_mb must be >= 0 (0 turns the cache off)")
        if self.target_init not in TARGET_INITS:
            raise UserError(f"ptu target_init={self.target_init!r}: use {' or '.join(TARGET_INITS)}")
        if not isinstance(self.fixed_gates, bool):
            raise UserError(f"ptu fixed_gates={self.fixed_gates!r}: use true or false")


class _PTUModel(nn.Module):
    """Shared parts of the CNN and RNN PTU models: a frozen source, a target, the units."""

    def __init__(self, source: LayeredNet, target: LayeredNet, units: dict[int, PTU]) -> None:
        super().__init__()
        freeze(source)
        self.source = source
        self.target = target
        self.units = nn.ModuleDict({str(i): u for i, u in sorted(units.items())})

    @property
    def layers(self) -> list[int]:
        return [int(k) for k in self.units]


class PTUNet(_PTUModel):
    """PTU-CNN (Fig. 3): source and target blocks side by side, a PTU after each chosen block.

    Two ways to run the target, with the same numbers: a zoo net's blocks one by one (``hooks=False``),
    or the target's own forward with a forward hook on each chosen block that *replaces* the block's
    output by the PTU's mix (``hooks=True``, the only way for a wrapped model: its forward is the
    user's and cannot be run block by block). Default: hooks exactly when the target is not sequential.
    """

    def __init__(
        self, source: LayeredNet, target: LayeredNet, units: dict[int, PTU], hooks: bool | None = None
    ) -> None:
        super().__init__(source, target, units)
        self.hooks = (not target.sequential) if hooks is None else bool(hooks)
        self._source_acts: list[torch.Tensor | None] | None = None  # set only inside forward
        if self.hooks:
            for i in self.layers:
                block = target.blocks[i]
                # plain attributes, not submodules: a deep copy of the model then points at the copy
                object.__setattr__(block, "_ptu_owner", self)
                object.__setattr__(block, "_ptu_layer", i)
                block.register_forward_hook(_mix_hook)

    @torch.no_grad()
    def source_activations(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """The source's output at every block with a PTU (None elsewhere)."""
        if not self.source.sequential:
            feats = self.source.features(x)[: max(self.layers) + 1]
            return [f if str(i) in self.units else None for i, f in enumerate(feats)]
        out: list[torch.Tensor | None] = []
        hs = x
        for i, bs in enumerate(self.source.blocks):
            if i > max(self.layers):
                break
            hs = bs(hs)
            out.append(hs if str(i) in self.units else None)
        return out

    def forward(self, x: torch.Tensor, source: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Logits; ``source`` (from :meth:`source_activations`) skips the source's forward pass."""
        hs = self.source_activations(x) if source is None else source
        if self.hooks:
            self._source_acts = hs
            try:
                return self.target(x)
            finally:
                self._source_acts = None
        ht = x
        for i, bt in enumerate(self.target.blocks):
            ht = bt(ht)
            if str(i) in self.units:
                ht = self.units[str(i)](hs[i], ht)
        return self.target.head(self.target.neck(ht))


def _mix_hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on a chosen target block: its output ``h^T_l`` becomes the PTU's ``h~^T_l`` (Eq. 2)."""
    owner: PTUNet = module._ptu_owner  # type: ignore[assignment]
    hs = owner._source_acts
    if hs is None:  # the target run on its own, outside PTUNet.forward
        return None
    layer = module._ptu_layer
    return owner.units[str(layer)](hs[layer], output)


class PTURNN(_PTUModel):
    """PTU-RNN (Fig. 5): at every time step one PTU (shared across steps) combines the source and the
    target hidden state; the combination is the target's next hidden state, the head reads the last."""

    @torch.no_grad()
    def source_activations(self, x: torch.Tensor) -> torch.Tensor:
        """All the source's hidden states ``[B, T, H]`` (it runs on its own, so all at once)."""
        hs_all, _ = self.source.blocks[0].rnn(RowRNN.as_sequence(x))
        return hs_all

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        tgt: RowRNN = self.target.blocks[0]
        seq = RowRNN.as_sequence(x)
        hs_all = self.source_activations(x) if source is None else source
        unit = self.units["0"]
        ht = seq.new_zeros(seq.shape[0], tgt.hidden)
        for t in range(seq.shape[1]):
            ht = unit(hs_all[:, t], tgt.cell_step(seq[:, t], ht))
        return self.target.head(ht)


class _PTUMethodBase(Method):
    Config = PTUConfig

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        c: PTUConfig = self.config  # type: ignore[assignment]
        return [
            {"params": [p for p in model.target.parameters() if p.requires_grad]},
            {"params": [p for p in model.units.parameters() if p.requires_grad], "lr_mult": c.lr_mult},
        ]

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        c: PTUConfig = self.config  # type: ignore[assignment]
        if not (c.l1 or c.l2 or c.group_filter or c.group_channel):
            return None
        total = torch.zeros(())
        for unit in model.units.values():
            for w in unit.weights():
                if c.l1:
                    total = total + c.l1 * w.abs().sum()
                if c.l2:
                    total = total + c.l2 * w.pow(2).sum()
                if c.group_filter:
                    total = total + c.group_filter * group_lasso(w, 0)
                if c.group_channel:
                    total = total + c.group_channel * group_lasso(w, 1)
        return total

    wants_batch_index = True

    def prepare(self, model: nn.Module, task: Any) -> None:
        """Compute the source activations of the whole training split once, if they fit the budget
        (never while the training inputs are augmented: an example's activations then change per step)."""
        c: PTUConfig = self.config  # type: ignore[assignment]
        self._cache: Any = None
        split, rt = task.train, self.runtime
        if rt.augmenting or not c.source_cache_mb or not len(split):
            return
        channels_last = next(model.target.parameters()).is_contiguous(memory_format=torch.channels_last)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), rt.autocast():
                first = _flat(model.source_activations(rt.to(split.inputs(slice(0, 1)))))
                per_example = sum(t.numel() * t.element_size() for t in first)
                if per_example * len(split) > c.source_cache_mb * 2**20:
                    return
                chunks = [
                    model.source_activations(xb) for xb in rt.inputs(split, 512, channels_last=channels_last)
                ]
        finally:
            model.train(was_training)
        self._cache = _concat(chunks)

    def loss_terms(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        cache = getattr(self, "_cache", None)
        source = _take(cache, index) if cache is not None and index is not None else None
        terms = {"task": F.cross_entropy(model(x, source), y)}
        reg = self.regularizer(model)
        if reg is not None:
            terms["reg"] = reg
        return terms

    @torch.no_grad()
    def diagnostics(self, model: nn.Module, task: Any) -> dict[str, Any]:
        """Mean r and z per PTU layer over the test split, overall and per channel (Fig. 7).

        Means run over examples, positions and (PTU-RNN) time steps.
        """
        model.eval()
        sums: dict[int, list[torch.Tensor]] = {}  # layer -> [sum of r per channel, of z, count]
        handles = [
            unit.register_forward_hook(lambda m, _i, _o, i=int(k): _accumulate(sums, i, m.last_r, m.last_z))
            for k, unit in model.units.items()
        ]
        try:
            for xb in self.runtime.inputs(task.test, 500):
                with self.runtime.autocast():
                    model(xb)
        finally:
            for h in handles:
                h.remove()
        layers = sorted(sums)
        per_channel = {g: [(sums[i][j] / sums[i][2]).tolist() for i in layers] for j, g in enumerate("rz")}
        return {
            "gates": {
                "layers": layers,
                "r": [sum(v) / len(v) for v in per_channel["r"]],
                "z": [sum(v) / len(v) for v in per_channel["z"]],
                "r_per_channel": per_channel["r"],
                "z_per_channel": per_channel["z"],
            }
        }


def _flat(acts: Any) -> list[torch.Tensor]:
    return [a for a in acts if a is not None] if isinstance(acts, list) else [acts]


def _concat(chunks: list[Any]) -> Any:
    if isinstance(chunks[0], list):
        return [None if a is None else torch.cat([c[i] for c in chunks]) for i, a in enumerate(chunks[0])]
    return torch.cat(chunks)


def _take(cache: Any, index: torch.Tensor) -> Any:
    if isinstance(cache, list):
        return [None if a is None else a[index] for a in cache]
    return cache[index]


def _accumulate(sums: dict[int, list[torch.Tensor]], layer: int, r: torch.Tensor, z: torch.Tensor) -> None:
    dims = [0, *range(2, r.dim())]
    part = [r.double().sum(dim=dims), z.double().sum(dim=dims), torch.tensor(r.numel() // r.shape[1])]
    sums[layer] = part if layer not in sums else [a + b for a, b in zip(sums[layer], part, strict=True)]


def _unit_kind(feature: torch.Tensor) -> tuple[str, int]:
    if feature.dim() == 4:
        return "conv", int(feature.shape[1])
    if feature.dim() == 2:
        return "linear", int(feature.shape[1])
    raise UserError(f"PTU needs block outputs of shape [B, D] or [B, C, H, W], got {tuple(feature.shape)}")


def _make_unit(c: PTUConfig, kind: str, dim: int) -> PTU:
    return PTU(dim, kind, c.activation, c.separable, c.kernel_size, c.gate_bias_r, c.gate_bias_z, c.depthwise)


@register_method("ptu")
class PTUMethod(_PTUMethodBase):
    """PTU-CNN: a frozen source, a freshly initialised target of the same architecture, and a PTU after
    each chosen block (conv PTUs after conv blocks, linear PTUs after fully connected ones). Any
    LayeredNet: zoo nets, EfficientNet-Lite0, the torchvision architectures and wrapped models (hooks)."""

    @classmethod
    def check_arch(cls, arch: str) -> None:
        if arch == "rnn":
            raise UserError("method 'ptu' runs on CNNs, not on rnn; use the method ptu_rnn for rnn")

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        src = self._require_source(source)
        if src.arch == "rnn":
            self.check_arch(src.arch)
        c: PTUConfig = self.config  # type: ignore[assignment]
        n = src.num_blocks
        bad = [i for i in (c.layers if c.layers != "all" else []) if not -n <= int(i) < n]
        if bad:
            raise UserError(f"ptu layers {bad} outside the source's blocks 0..{n - 1}")
        layers = list(range(n)) if c.layers == "all" else sorted({int(i) % n for i in c.layers})
        with torch.no_grad():
            was_training = src.training
            src.eval()
            feats = src.features(torch.zeros(2, *src.in_shape))
            src.train(was_training)
        if c.target_init == "source":
            target = transfer_copy(src, num_classes, seed)
        else:
            target = fresh_model(src, num_classes, arch, in_shape, seed)
        frozen_source = frozen_copy(src)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            units = {i: _make_unit(c, *_unit_kind(feats[i])) for i in layers}
        if c.fixed_gates:
            for unit in units.values():
                unit.fix_gates()
        return PTUNet(frozen_source, target, units)


@register_method("ptu_rnn")
class PTURNNMethod(_PTUMethodBase):
    """PTU-RNN: source and target RNN cells over the rows of an image, one shared PTU per step."""

    supported_archs = ("rnn",)
    arch_advice = ", or the method ptu for CNNs"

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        src = self._require_source(source)
        if src.arch != "rnn":
            raise UserError(f"ptu_rnn needs an rnn source (got {src.arch}); use ptu for CNNs")
        c: PTUConfig = self.config  # type: ignore[assignment]
        target = fresh_model(src, num_classes, arch, in_shape, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            unit = PTU(
                src.blocks[0].hidden,
                "linear",
                c.activation,
                gate_bias_r=c.gate_bias_r,
                gate_bias_z=c.gate_bias_z,
            )
        return PTURNN(frozen_copy(src), target, {0: unit})
