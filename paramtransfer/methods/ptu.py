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
from paramtransfer.methods.base import Method, MethodConfig, freeze, fresh_model, frozen_copy, register_method
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.zoo import RowRNN

_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


class SeparableConv2d(nn.Module):
    """Depth-wise ``k x k`` convolution followed by a point-wise ``1 x 1`` one (Howard et al. 2017).

    With ``kernel_size=1`` the depth-wise step (a per-channel scale the point-wise step can absorb)
    is left out.

    Shape: ``[B, cin, H, W] -> [B, cout, H, W]`` (same padding).
    """

    def __init__(self, cin: int, cout: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.depthwise = (
            nn.Conv2d(cin, cin, kernel_size, padding=kernel_size // 2, groups=cin, bias=False)
            if kernel_size > 1
            else nn.Identity()
        )
        self.pointwise = nn.Conv2d(cin, cout, 1)

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
    ) -> None:
        super().__init__()
        if kind not in ("linear", "conv"):
            raise UserError(f"PTU kind {kind!r} is unknown; use 'linear' or 'conv'")
        if activation not in _ACTIVATIONS:
            raise UserError(f"PTU activation {activation!r} is unknown; use tanh or relu")
        self.dim, self.kind, self.activation, self.separable = dim, kind, activation, separable
        if kind == "linear":
            self.gate_r: nn.Module = nn.Linear(2 * dim, dim)
            self.gate_z: nn.Module = nn.Linear(2 * dim, dim)
            self.adapt: nn.Module = nn.Linear(dim, dim)
        elif separable:
            self.gate_r = SeparableConv2d(2 * dim, dim, kernel_size)
            self.gate_z = SeparableConv2d(2 * dim, dim, kernel_size)
            self.adapt = SeparableConv2d(dim, dim, kernel_size)
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
        """``(r, z)`` of Eq. 1.

        Linear and standard-conv gates run as one matmul / convolution over the stacked weights of
        W^r and W^z. Separable gates run separately: measured here (2 CPU threads, channels-last),
        fusing them into one grouped depth-wise and one grouped point-wise convolution was 35 % slower
        than two plain separable convolutions, because oneDNN's grouped 1x1 path is slow.
        """
        r, z = self.gate_r, self.gate_z
        if self.kind == "linear":
            w = torch.cat([r.weight, z.weight])
            b = torch.cat([r.bias, z.bias])
            rz = F.linear(torch.cat([h_source, h_target], 1), w, b)
        elif self.separable:
            x = torch.cat([h_source, h_target], 1)
            return torch.sigmoid(r(x)), torch.sigmoid(z(x))
        else:
            w = torch.cat([r.weight, z.weight])
            rz = F.conv2d(
                torch.cat([h_source, h_target], 1), w, torch.cat([r.bias, z.bias]), padding=r.padding
            )
        return torch.sigmoid(rz).chunk(2, dim=1)

    def forward(self, h_source: torch.Tensor, h_target: torch.Tensor) -> torch.Tensor:
        r, z = self.gates(h_source, h_target)
        self.last_r, self.last_z = r.detach(), z.detach()
        adapted = _ACTIVATIONS[self.activation](self.adapt(h_source))
        # lerp(a, b, w) = (1 - w) * a + w * b: Eq. 2 in one fused kernel per line, exact at w = 0 and w = 1
        h_f = torch.lerp(h_source, adapted, r)
        return torch.lerp(h_target, h_f, z)

    def weights(self) -> list[torch.Tensor]:
        """The weight tensors W^r, W^z, W^h (biases excluded), for the regularisers."""
        return [p for name, p in self.named_parameters() if name.endswith("weight")]


def group_lasso(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of the L2 norms of the groups along ``dim`` (0: filter-wise, 1: channel-wise; Wen et al. 2016)."""
    if weight.dim() < 2:
        return weight.new_zeros(())
    other = [d for d in range(weight.dim()) if d != dim]
    return weight.pow(2).sum(dim=other).sqrt().sum()


@dataclass
class PTUConfig(MethodConfig):
    """Attributes:
    layers: 0-based indices of the blocks followed by a PTU (``"all"``: every block).
    activation: phi of Eq. 2 (``tanh`` or ``relu``).
    separable: depth-wise separable convolutions in conv PTUs (the paper's "Scalability" section).
    kernel_size: spatial size of the conv PTUs' convolutions.
    lr_mult: learning-rate multiplier for the PTU parameters (the paper trains PTU at a 10x larger
        learning rate than its baselines; at the base rate the gates hardly leave 0.5).
    gate_bias_r, gate_bias_z: initial gate biases.
    l1, l2, group_filter, group_channel: coefficients of the regularisers on the PTU weights:
        ``l1 * sum|w| + l2 * sum w^2 + group_filter * sum_f ||W_f|| + group_channel * sum_c ||W_c||``.

    The defaults and the measurements behind them are in ``benchmarks/ptu/README.md``: on our data the
    variants are within noise of each other; ``lr_mult=10`` is kept because at 1 the gates do not
    leave 0.5 within a few hundred steps.
    """

    layers: list[int] | str = "all"
    activation: str = "tanh"
    separable: bool = True
    kernel_size: int = 3
    lr_mult: float = 10.0
    gate_bias_r: float = 0.0
    gate_bias_z: float = 0.0
    l1: float = 0.0
    l2: float = 0.0
    group_filter: float = 0.0
    group_channel: float = 0.0

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
    """PTU-CNN (Fig. 3): source and target blocks side by side, a PTU after each chosen block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hs, ht = x, x
        for i, (bs, bt) in enumerate(zip(self.source.blocks, self.target.blocks, strict=True)):
            with torch.no_grad():
                hs = bs(hs)
            ht = bt(ht)
            unit = self.units[str(i)] if str(i) in self.units else None
            if unit is not None:
                ht = unit(hs, ht)
        return self.target.head(self.target.neck(ht))


class PTURNN(_PTUModel):
    """PTU-RNN (Fig. 5): at every time step one PTU (shared across steps) combines the source and the
    target hidden state; the combination is the target's next hidden state, the head reads the last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src: RowRNN = self.source.blocks[0]
        tgt: RowRNN = self.target.blocks[0]
        seq = RowRNN.as_sequence(x)
        with torch.no_grad():
            hs_all, _ = src.rnn(seq)  # the source runs on its own: all its hidden states at once
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
            {"params": list(model.units.parameters()), "lr_mult": c.lr_mult},
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

    def loss_terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {"task": F.cross_entropy(model(x), y)}
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
            for start in range(0, len(task.test.x), 500):
                model(task.test.x[start : start + 500])
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
    return PTU(dim, kind, c.activation, c.separable, c.kernel_size, c.gate_bias_r, c.gate_bias_z)


@register_method("ptu")
class PTUMethod(_PTUMethodBase):
    """PTU-CNN: a frozen source, a freshly initialised target of the same architecture, and a PTU after
    each chosen block (conv PTUs after conv blocks, linear PTUs after fully connected ones)."""

    supported_archs = ("lenet", "resnet20", "mobilenet")

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        src = self._require_source(source)
        if not src.sequential:
            raise UserError(
                "ptu runs source and target blocks one by one; use a zoo architecture, not a wrapped model"
            )
        if src.arch == "rnn":
            raise UserError("for the rnn architecture use the method ptu_rnn")
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
        target = fresh_model(src, num_classes, arch, in_shape, seed)
        frozen_source = frozen_copy(src)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            units = {i: _make_unit(c, *_unit_kind(feats[i])) for i in layers}
        return PTUNet(frozen_source, target, units)


@register_method("ptu_rnn")
class PTURNNMethod(_PTUMethodBase):
    """PTU-RNN: source and target RNN cells over the rows of an image, one shared PTU per step."""

    supported_archs = ("rnn",)

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
