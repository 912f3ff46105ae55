"""SpotTune: per-example routing between frozen and fine-tuned residual blocks (Guo et al., CVPR 2019).

Every routed block keeps its frozen source copy ``F_l`` and gets a trainable copy ``F^_l`` initialised
from it (a real copy, no shared storage). A small policy ResNet maps the input to logits
``beta in R^{L x 2}`` (Sec. 3.2); decisions ``I_l(x)`` are drawn with ``F.gumbel_softmax(hard=True)``
(straight-through: hard in the forward pass, the softmax relaxation's gradient in the backward pass).
Block ``l`` outputs (Eq. 2, erratum of DESIGN.md applied: the trainable copy is ``F^``)::

    x_l = I_l(x) F^_l(x_{l-1}) + (1 - I_l(x)) F_l(x_{l-1})

where our blocks already contain the skip connection and the final ReLU (``relu(residual + shortcut)``,
as the official code mixes post-ReLU block outputs); with hard decisions this is Eq. 2 exactly. At
evaluation the routing is deterministic (argmax, no Gumbel noise) and each copy of a block runs only on
the examples routed through it. The frozen blocks keep their BatchNorm statistics (the official code
let them train; we do not, a frozen block is frozen). The modules of a wrapped model that are neither
a named block nor the head are frozen like the frozen copies (weights and BatchNorm statistics).

What is routed (:func:`routable_blocks`) are *units* ``(i, j)``: block ``i`` whole (``j`` None: the basic
blocks of ResNet-20, the inverted residuals of MobileNetV2/V3, every named block of a wrapped model) or
child ``j`` of block ``i`` where block ``i`` is a stage (an ``nn.Sequential``) of residual blocks
(EfficientNet-Lite0, torchvision's ResNets and EfficientNets). The nets that list their residual blocks
(``residual_blocks()``) have only those with an identity shortcut routed, the blocks of Eq. 2 (``F(x) +
x``, or ``relu(F(x) + x)`` in a ResNet; the copies' outputs are mixed as above). ResNet-20 keeps
routing all its basic blocks (those that downsample copy their 1x1 shortcut too), as it always did.
A stage holding routed children runs them one by one.

``spottune_global`` (Sec. 3.3) adds ``lambda_1 l_k + lambda_2 l_e`` (Eqs. 5-7) on the fraction ``v_l``
of a batch routed to ``F^_l``; after training every example follows one global policy (the k blocks
most used by the last epoch's training examples), the policy network is not needed at test time,
and :meth:`SpotTuneGlobal.export` returns a compact LayeredNet with only the chosen fine-tuned blocks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.methods.base import Method, MethodConfig, register_method, transfer_copy
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.tvmodels import TORCHVISION_ARCHS
from paramtransfer.models.zoo import BasicBlock, GlobalPool

ROUTES = ("policy", "finetuned", "frozen")
POLICY_INITS = ("small", "random")
POLICY_INIT_SCALE = 1e-3  # policy_init="small": the output layer's initial weights times this, biases 0
# the architectures with residual blocks SpotTune can route; "wrapped": every named block of a user's model
RESIDUAL_ARCHS = ("resnet20", "efficientnet_lite0", *TORCHVISION_ARCHS)

Unit = tuple[int, int | None]  # a routed unit: block i whole (j None), or child j of block i (a stage)


@dataclass
class SpotTuneConfig(MethodConfig):
    """Attributes:
    tau: Gumbel-softmax temperature (the paper and its code: 5, constant).
    tau_min: if set, tau is annealed geometrically from ``tau`` to ``tau_min`` over ``anneal_epochs``.
        With ``hard=True`` the sampled routes are ``argmax(logits + Gumbel noise)`` whatever tau is;
        tau shapes only the straight-through gradient, so annealing alone does not make the training
        routes less random.
    noise_final: if set, the scale of the Gumbel noise is annealed linearly from 1 to ``noise_final``
        over ``anneal_epochs``: the training routes ``argmax(logits + s * g)`` move from samples of the
        policy to the argmax routes used at evaluation (``s = 0``), so the routes the test uses are the
        ones the fine-tuned blocks were trained on. The straight-through gradient stays the one of
        ``softmax((logits + s * g) / tau)``.
    anneal_epochs: epochs of the annealing (of ``tau_min`` and ``noise_final``).
    policy_lr_mult: learning-rate multiplier of the policy network. Default 10, chosen on validation
        (``benchmarks/spottune/remedy.yaml``): the paper trains the policy at 0.01x (Table 2) or 0.1x
        (Decathlon) the network's rate over thousands of steps; with ~100 target examples there are
        ~100 steps, the policy then stays at its random initialisation, and the argmax routes used at
        test are decided by that initialisation (SpotTune lost 7 points to fine-tuning at 0.1x).
    policy_width: channels of the policy ResNet's first stage.
    freeze_first: the first ``k`` routed blocks are never fine-tuned (always the frozen copy).
    eval_route: at evaluation, ``policy`` (argmax of the policy), ``finetuned`` (every example through
        the fine-tuned copies: the paper's "running fine-tuned blocks" variant) or ``frozen``.
    """

    tau: float = 5.0
    tau_min: float | None = None
    noise_final: float | None = None
    anneal_epochs: int = 20
    policy_lr_mult: float = 10.0
    policy_width: int = 8
    freeze_first: int = 0
    eval_route: str = "policy"
    routes: ClassVar[tuple[str, ...]] = ROUTES

    def __post_init__(self) -> None:
        if not self.tau > 0 or (self.tau_min is not None and not 0 < self.tau_min <= self.tau):
            raise UserError(f"spottune needs tau > 0 and 0 < tau_min <= tau (got {self.tau}, {self.tau_min})")
        if self.noise_final is not None and not 0 <= self.noise_final <= 1:
            raise UserError(f"spottune noise_final must lie in [0, 1] (got {self.noise_final})")
        if self.anneal_epochs < 1:
            raise UserError("spottune anneal_epochs must be >= 1")
        if self.policy_lr_mult <= 0 or self.policy_width < 1 or self.freeze_first < 0:
            raise UserError("spottune policy_lr_mult and policy_width must be > 0, freeze_first >= 0")
        if self.eval_route not in self.routes:
            raise UserError(f"spottune eval_route={self.eval_route!r}: use one of {', '.join(self.routes)}")

    def tau_at(self, epoch: int) -> float:
        """The temperature during ``epoch`` (0-based)."""
        if self.tau_min is None:
            return self.tau
        t = min(1.0, epoch / self.anneal_epochs)
        return self.tau * (self.tau_min / self.tau) ** t

    def noise_at(self, epoch: int) -> float:
        """The scale of the Gumbel noise during ``epoch`` (0-based)."""
        if self.noise_final is None:
            return 1.0
        t = min(1.0, epoch / self.anneal_epochs)
        return 1.0 + (self.noise_final - 1.0) * t


class PolicyNet(nn.Module):
    """The lightweight policy network: a 3-block ResNet, global pooling, ``L x 2`` logits.

    Shape: ``[B, C, H, W] -> [B, L, 2]``.
    """

    def __init__(self, in_channels: int, num_blocks: int, width: int = 8) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            BasicBlock(width, width),
            BasicBlock(width, 2 * width, stride=2),
            BasicBlock(2 * width, 4 * width, stride=2),
            GlobalPool(),
        )
        self.logits = nn.Linear(4 * width, 2 * num_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x)).view(-1, self.num_blocks, 2)


def routable_blocks(net: LayeredNet) -> list[Unit]:
    """The units SpotTune routes, ``(i, j)`` in network order: ``j`` None routes block ``i`` whole, else the
    ``j``-th child of block ``i`` (an ``nn.Sequential`` stage).

    * a wrapped model: every named block, whole (hooks mix the copies in);
    * a net with ``residual_blocks()`` (EfficientNet-Lite0, torchvision's ResNets, MobileNets and
      EfficientNets): its residual blocks with an identity shortcut;
    * otherwise (ResNet-20 of the zoo): every ``BasicBlock`` block, whole.
    """
    if not net.sequential:
        return [(i, None) for i in range(net.num_blocks)]
    residual = getattr(net, "residual_blocks", None)
    if callable(residual):
        units: list[Unit] = [(i, j) for i, j, _ in residual()]
        for i, j in units:
            if j is not None and not isinstance(net.blocks[i], nn.Sequential):
                raise ValueError(f"block {i} of {net.arch} holds a routed child but is no nn.Sequential")
        return units
    return [(i, None) for i, b in enumerate(net.blocks) if isinstance(b, BasicBlock)]


def unit_key(unit: Unit) -> str:
    """The name of a unit's fine-tuned copy in ``SpotTuneNet.tuned`` (ModuleDict keys hold no '.')."""
    i, j = unit
    return str(i) if j is None else f"{i}_{j}"


def unit_label(unit: Unit) -> int | list[int]:
    """A unit for JSON: ``i`` for a whole block (as results of ResNet-20 always read), ``[i, j]`` else."""
    i, j = unit
    return i if j is None else [i, j]


class SpotTuneNet(nn.Module):
    """Frozen source blocks, trainable copies of the routed units, a policy network and a new head.

    ``net`` is the source with a fresh head (trainable) and frozen blocks; ``routed`` lists the units
    ``(i, j)`` (see :func:`routable_blocks`) and ``tuned[unit_key(u)]`` is the trainable copy of unit ``u``
    (``tuned["3"]`` for block 3 whole, ``tuned["3_1"]`` for child 1 of stage 3). ``route`` (optional
    ``[B, len(routed)]`` in {0, 1}) overrides the policy, which tests and the global variant use.
    """

    def __init__(
        self, net: LayeredNet, routed: list[Unit], policy: PolicyNet, tau: float, noise: float = 1.0
    ) -> None:
        super().__init__()
        self.net = net
        self.routed: list[Unit] = [(int(i), None if j is None else int(j)) for i, j in routed]
        self.tuned = nn.ModuleDict({unit_key(u): copy.deepcopy(self._frozen(u)) for u in self.routed})
        for p in self.tuned.parameters():
            p.requires_grad_(True)
        net.freeze_blocks(range(net.num_blocks))  # and a wrapped model's un-named part (LayeredNet)
        # the forward's plan: block i -> column of the route (routed whole) or {child j: column}
        self._whole: dict[int, int] = {}
        self._inner: dict[int, dict[int, int]] = {}
        for col, (i, j) in enumerate(self.routed):
            if j is None:
                self._whole[i] = col
            else:
                self._inner.setdefault(i, {})[j] = col
        self.policy = policy
        self.register_buffer("tau", torch.tensor(float(tau)))
        self.register_buffer("noise", torch.tensor(float(noise)))
        self.register_buffer("epochs_done", torch.tensor(0))
        # the global variant: usage of each fine-tuned copy over an epoch, and the policy it settles on
        self.register_buffer("usage", torch.zeros(len(routed) + 1))  # sums per unit, then the count
        self.register_buffer("global_route", torch.zeros(len(routed)))
        self.eval_route = "policy"  # or "finetuned", "frozen", "global"
        self.min_frozen = 0
        self.route: torch.Tensor | None = None  # the last decisions, with gradient in training
        self._route: torch.Tensor | None = None
        if not net.sequential:  # a wrapped model runs its own forward; hooks mix in the tuned copies
            for col, (i, _) in enumerate(self.routed):
                block = net.blocks[i]
                # plain attributes (not submodules): a deep copy of the model then points at the copy
                object.__setattr__(block, "_spottune_owner", self)
                object.__setattr__(block, "_spottune_index", col)
                block.register_forward_hook(_mix_hook)

    def _frozen(self, unit: Unit) -> nn.Module:
        """The frozen source module of a unit."""
        i, j = unit
        return self.net.blocks[i] if j is None else self.net.blocks[i][j]

    def decide(self, x: torch.Tensor) -> torch.Tensor:
        """``I(x)``: ``[B, L]`` in {0, 1}; straight-through Gumbel samples in training, argmax otherwise."""
        if not self.training and self.eval_route == "global":
            route = self.global_route.to(x.dtype).expand(x.shape[0], -1)
        elif not self.training and self.eval_route != "policy":
            fill = 1.0 if self.eval_route == "finetuned" else 0.0
            route = x.new_full((x.shape[0], len(self.routed)), fill)
        else:
            logits = self.policy(x)
            if self.training:
                route = _sample(logits, float(self.tau), float(self.noise))[..., 1]
            else:
                route = (logits[..., 1] > logits[..., 0]).to(x.dtype)
        if self.min_frozen:
            route = torch.cat([torch.zeros_like(route[:, : self.min_frozen]), route[:, self.min_frozen :]], 1)
        return route

    def forward(self, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        route = self.decide(x) if route is None else route
        self.route = route
        if self.training:
            with torch.no_grad():
                self.usage[:-1] += route.sum(0)
                self.usage[-1] += route.shape[0]
        if not self.net.sequential:
            self._route = route
            try:
                return self.net(x)
            finally:
                self._route = None
        h = x
        for i, block in enumerate(self.net.blocks):
            if i in self._whole:
                h = self._mix(block, self.tuned[str(i)], h, route[:, self._whole[i]])
            elif i in self._inner:  # a stage: its children one by one, the routed ones mixed
                cols = self._inner[i]
                for j, sub in enumerate(block):
                    col = cols.get(j)
                    h = sub(h) if col is None else self._mix(sub, self.tuned[f"{i}_{j}"], h, route[:, col])
            else:
                h = block(h)
        return self.net.head(self.net.neck(h))

    def _mix(self, frozen: nn.Module, tuned: nn.Module, h: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
        if self.training:  # both paths: the straight-through gradient of I needs both outputs
            w = use.view(-1, *([1] * (h.dim() - 1)))
            return w * tuned(h) + (1 - w) * frozen(h)
        mask = use > 0.5
        if bool(mask.all()):
            return tuned(h)
        if not bool(mask.any()):
            return frozen(h)
        out_t, out_f = tuned(h[mask]), frozen(h[~mask])
        shape = (h.shape[0], *out_t.shape[1:])
        out = torch.empty(shape, dtype=out_t.dtype, device=out_t.device, memory_format=_format(out_t))
        out[mask], out[~mask] = out_t, out_f
        return out


def _sample(logits: torch.Tensor, tau: float, noise: float) -> torch.Tensor:
    """Straight-through Gumbel-softmax with the noise scaled by ``s = noise``.

    Forward: the hard ``argmax(l + s g)``; backward: the gradient of ``softmax((l + s g) / tau)``. Since
    ``(l + s g) / tau = (l / s + g) / (tau / s)`` this is ``F.gumbel_softmax(l / s, tau / s)``; ``s = 0`` is
    the argmax with the gradient of ``softmax(l / tau)``.
    """
    if noise == 1.0:
        return F.gumbel_softmax(logits, tau=tau, hard=True)
    if noise > 0:
        return F.gumbel_softmax(logits / noise, tau=tau / noise, hard=True)
    soft = torch.softmax(logits / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


def _mix_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on a wrapped model's routed block: ``I * F^(x) + (1 - I) * F(x)``."""
    owner: SpotTuneNet = module._spottune_owner  # type: ignore[assignment]
    if owner._route is None:
        return None
    col = module._spottune_index
    tuned = owner.tuned[unit_key(owner.routed[col])]
    w = owner._route[:, col].view(-1, *([1] * (output.dim() - 1)))
    return w * tuned(inputs[0]) + (1 - w) * output


def _format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@register_method("spottune")
class SpotTune(Method):
    """SpotTune (Guo et al. 2019), per-example policy; see the module docstring."""

    Config = SpotTuneConfig
    supported_archs = (*RESIDUAL_ARCHS, "wrapped")
    arch_advice = " (SpotTune routes residual blocks)"

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        src = self._require_source(source)
        routed = routable_blocks(src)
        if not routed:
            raise UserError(f"spottune routes residual blocks; the {src.arch} source has none")
        c: SpotTuneConfig = self.config  # type: ignore[assignment]
        if c.freeze_first > len(routed):
            raise UserError(f"spottune freeze_first={c.freeze_first} exceeds the {len(routed)} routed blocks")
        net = transfer_copy(src, num_classes, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            policy = PolicyNet(src.in_shape[0], len(routed), c.policy_width)
        model = SpotTuneNet(net, routed, policy, c.tau_at(0), c.noise_at(0))
        model.eval_route = c.eval_route
        model.min_frozen = c.freeze_first
        self._model = model
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        c: SpotTuneConfig = self.config  # type: ignore[assignment]
        return [
            {"params": [*model.tuned.parameters(), *model.net.head.parameters()]},
            {"params": list(model.policy.parameters()), "lr_mult": c.policy_lr_mult},
        ]

    def loss_terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"task": F.cross_entropy(model(x), y)}

    def epoch_stats(self) -> dict[str, Any]:
        """Advance the temperature schedule; the state lives in model buffers, so a resume continues it."""
        model = getattr(self, "_model", None)
        if model is None:
            return {}
        c: SpotTuneConfig = self.config  # type: ignore[assignment]
        stats = {"tau": float(model.tau), "noise": float(model.noise)}
        count = float(model.usage[-1])
        if count:
            stats["finetune_fraction_train"] = (model.usage[:-1] / count).tolist()
        self.settle(model)
        model.usage.zero_()
        model.epochs_done += 1
        model.tau.fill_(c.tau_at(int(model.epochs_done)))
        model.noise.fill_(c.noise_at(int(model.epochs_done)))
        return stats

    def settle(self, model: nn.Module) -> None:
        """End-of-epoch hook for variants that fix a policy (see :class:`SpotTuneGlobal`)."""

    @torch.no_grad()
    def routes(self, model: nn.Module, x: Any, batch: int = 500) -> torch.Tensor:
        """Evaluation-time decisions ``[N, L]`` for inputs ``x`` (a tensor, or a task's split)."""
        model.eval()
        if not isinstance(x, torch.Tensor):
            return self.runtime.map(model.decide, x, batch)
        return torch.cat([model.decide(x[i : i + batch]) for i in range(0, len(x), batch)])

    def diagnostics(self, model: nn.Module, task: Any) -> dict[str, Any]:
        """Fig. 3: fraction of test examples through each fine-tuned block; Fig. 4: how many fine-tuned
        blocks each test example used (histogram over 0..L)."""
        route = self.routes(model, task.test)
        used = route.sum(1).long()
        return {
            "routed_blocks": [unit_label(u) for u in model.routed],
            "finetune_fraction": route.mean(0).tolist(),
            "blocks_used_histogram": torch.bincount(used, minlength=len(model.routed) + 1).tolist(),
            "tau_final": float(model.tau),
        }


@dataclass
class SpotTuneGlobalConfig(SpotTuneConfig):
    """Attributes (besides SpotTune's):
    k: number of blocks to fine-tune (Eq. 5); None: a third of the routed blocks (3 of ResNet-20's 9).
    lambda_k: weight of ``l_k = (sum_l v_l - k)^2`` (Eq. 7, lambda_1).
    lambda_e: weight of ``l_e = sum_l -v_l log v_l`` (Eq. 7, lambda_2).
    warmup_epochs: the first epochs train with ``lambda_k = lambda_e = 0`` (plain SpotTune), so that the
        policy's usage reflects the target before the losses of Eqs. 5-7 harden it.
    policy_init: ``"small"``: the policy's output layer starts with its default weights times 1e-3 and
        zero biases, so every block is fine-tuned with probability 1/2 ± 0.001 for every image and which
        blocks win is decided by the target's gradients (not zero: a zero layer would pass no gradient to
        the layers before it in the first step); ``"random"``: PyTorch's default initialisation (SpotTune's).

    Why the two defaults (``benchmarks/spottune/README.md``): with a random policy and the losses from the
    first step, the entropy term ``l_e`` sharpens whatever usage the initialisation happens to give, so
    the k blocks kept were the same on two different targets for a given seed (and the test accuracy
    varied by ±10 points over seeds).
    """

    k: int | None = None
    lambda_k: float = 1.0
    lambda_e: float = 1.0
    warmup_epochs: int = 5
    policy_init: str = "small"
    eval_route: str = "global"  # the learned global policy; no policy network at test time
    routes: ClassVar[tuple[str, ...]] = (*ROUTES, "global")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0):
            raise UserError(f"spottune_global k must be a whole number >= 0 (got {self.k!r})")
        if self.lambda_k < 0 or self.lambda_e < 0:
            raise UserError("spottune_global lambda_k and lambda_e must be >= 0")
        if (
            isinstance(self.warmup_epochs, bool)
            or not isinstance(self.warmup_epochs, int)
            or self.warmup_epochs < 0
        ):
            raise UserError(
                f"spottune_global warmup_epochs must be a whole number >= 0 (got {self.warmup_epochs!r})"
            )
        if self.policy_init not in POLICY_INITS:
            raise UserError(
                f"spottune_global policy_init={self.policy_init!r}: use {' or '.join(POLICY_INITS)}"
            )


def global_losses(route: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``l_k`` and ``l_e`` of Eqs. 5-6 from a batch of decisions ``[B, L]`` (``v_l`` = batch mean)."""
    v = route.mean(0)
    l_k = (v.sum() - k) ** 2
    l_e = -(v * torch.log(v.clamp_min(1e-6))).sum()
    return l_k, l_e


@register_method("spottune_global")
class SpotTuneGlobal(SpotTune):
    """SpotTune's compact global policy (Sec. 3.3): the same k fine-tuned blocks for every image.

    During training the per-image policy is pushed towards using k blocks for all images (Eqs. 5-7).
    At the end of every epoch the global policy is the k blocks most used over that epoch; evaluation
    follows it (no policy network), and :meth:`export` returns the compact network.
    """

    Config = SpotTuneGlobalConfig

    def build(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super().build(*args, **kwargs)
        c: SpotTuneGlobalConfig = self.config  # type: ignore[assignment]
        free = len(model.routed) - c.freeze_first
        self.k = c.k if c.k is not None else min(free, max(1, len(model.routed) // 3))
        if self.k > free:
            raise UserError(f"spottune_global k={self.k} exceeds the {free} blocks it may fine-tune")
        if c.policy_init == "small":
            with torch.no_grad():
                model.policy.logits.weight.mul_(POLICY_INIT_SCALE)
                model.policy.logits.bias.zero_()
        return model

    def loss_terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        c: SpotTuneGlobalConfig = self.config  # type: ignore[assignment]
        task = F.cross_entropy(model(x), y)
        l_k, l_e = global_losses(model.route, self.k)
        on = 0.0 if int(model.epochs_done) < c.warmup_epochs else 1.0  # the buffer resumes with the model
        return {"task": task, "policy": on * (c.lambda_k * l_k + c.lambda_e * l_e)}

    def settle(self, model: nn.Module) -> None:
        count = float(model.usage[-1])
        if not count:
            return
        c: SpotTuneGlobalConfig = self.config  # type: ignore[assignment]
        v = model.usage[:-1] / count
        v[: c.freeze_first] = -1.0  # never chosen
        chosen = torch.argsort(v, descending=True, stable=True)[: self.k]
        model.global_route.zero_()
        model.global_route[chosen] = 1.0

    def export(self, model: nn.Module) -> nn.Module:
        """The source net (a deep copy, of its own class), with the chosen fine-tuned copies in place:
        a routed block replaced whole, a routed child inside a copy of its stage."""
        net: LayeredNet = model.net
        if not net.sequential:
            return model  # a wrapped model's blocks cannot be swapped without rewriting it
        compact = copy.deepcopy(net)
        for (i, j), use in zip(model.routed, model.global_route.tolist(), strict=True):
            if use > 0.5:
                tuned = copy.deepcopy(model.tuned[unit_key((i, j))])
                if j is None:
                    compact.blocks[i] = tuned
                else:
                    compact.blocks[i][j] = tuned
        return compact.eval()

    def diagnostics(self, model: nn.Module, task: Any) -> dict[str, Any]:
        out = super().diagnostics(model, task)
        out["global_route"] = model.global_route.tolist()
        return out
