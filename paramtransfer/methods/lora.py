"""LoRA: a trainable low-rank update beside each frozen Conv2d / Linear of the transferred network.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022, arXiv:2106.09685), Eq. 3 and
Sec. 4.1: a layer ``h = W0 x`` becomes ``h = W0 x + (alpha / r) * B A x`` with ``W0`` frozen,
``A in R^{r x k}`` random, ``B in R^{d x r}`` zero, so training starts at the source network exactly. For a
convolution, ``W0 [out, in, kh, kw]`` is the matrix ``out x (in*kh*kw)``: ``A`` is a convolution
``in -> r`` with the layer's own kernel, stride, padding and dilation (run by the layer's own forward, so a
subclass's padding such as EfficientNet's TF-SAME applies to it too) and ``B`` a 1x1 convolution
``r -> out``. Both maps are linear, so ``conv(x, W0) + s * B(A(x)) == conv(x, W0 + s * B.A)``: the
update merges into the weight for export (``merge=true``).

Choices:

* **Where**: every ``nn.Conv2d`` / ``nn.Linear`` of the transferred network (the blocks and a wrapped
  model's un-named part, which come with the source like block 1, see :class:`LayeredNet`), not the new
  head, which trains whole. **Grouped convolutions are skipped** (EfficientNet-Lite0's 16 depth-wise
  convolutions, 182k of its 3.37M transferred parameters, 5 %): ``B.A`` of a dense ``A`` is no grouped
  kernel, so it could not merge. There, r = 8 adapts 33 layers with 183k parameters, r = 4 with 91k.
  Layers whose forward never runs (a weight read directly, e.g. MultiheadAttention's ``out_proj``) and
  parametrized ones get no update; :meth:`LoRA.diagnostics` counts the skipped.
* **Frozen**: every transferred weight *and its BatchNorm statistics* (the blocks are frozen as by
  ``linear_probe``: BatchNorm normalises with the source's statistics, in eval mode). The target network
  then differs from the source by ``s * B.A`` alone, as LoRA intends; with batch statistics it would also
  shift with every batch's statistics.
* **Init**: the paper says "random Gaussian" for ``A`` without a scale; its reference code (loralib) and
  peft draw ``A`` like ``nn.Linear``'s weight (``kaiming_uniform_(a=sqrt(5))``, U(+-1/sqrt(fan_in))),
  as here; ``B = 0``. Seeded by the run's seed.
* **Defaults** ``r = 8``, ``alpha = 8`` (scale 1): peft's defaults, and the paper's rule "we simply set
  alpha to the first r we try and do not tune it": keep ``alpha`` when sweeping ``r``.

Why not huggingface ``peft`` (the issue asked to prefer it as an optional extra): measured with pip in a
fresh venv beside torch 2.13.0+cpu, ``peft 0.21.2`` keeps our torch (``torch>=1.13``) but requires
``transformers`` (hard dependency), ``accelerate``, ``huggingface_hub`` and, through transformers,
``tokenizers``, ``hf-xet``, ``pydantic``, ``typer``, ``rich``...: 31 packages, +284 MB installed
(transformers alone 129 MB), ~7 s CPU to ``import peft``. Its ``LoraModel`` replaces each target module
in place (``setattr(parent, name, lora.Conv2d(...))``: our rule is hooks, never rewriting a user's model;
it would rename every state_dict key). Its conv LoRA on a grouped conv needs ``r % groups == 0`` (a
depth-wise conv has groups = channels, 32 to 1152 on EfficientNet-Lite0) and cannot merge. LoRA itself is a
few lines, so it is written here.

TLlib (thuml/Transfer-Learning-Library) has neither LoRA nor BitFit (no file mentions them); the scale
``alpha / r`` and the defaults follow the paper and peft (``lora_alpha / r``, ``r = lora_alpha = 8``).

Args (``lora[r=8,alpha=8,targets=[conv,linear],merge=true]``): see :class:`LoRAConfig`.

Shape:
    Linear: ``A [r, in]``, ``B [out, r]``, ``r * (in + out)`` parameters; Conv2d ``kh x kw``:
    ``A [r, in, kh, kw]``, ``B [out, r]``, ``r * (in*kh*kw + out)`` parameters.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from paramtransfer.errors import UserError
from paramtransfer.methods.base import Method, MethodConfig, register_method, transfer_copy
from paramtransfer.models.layered import LayeredNet, unfreeze
from paramtransfer.runtime import evaluating

KINDS: dict[str, type[nn.Module]] = {"conv": nn.Conv2d, "linear": nn.Linear}
_UPDATE = "_lora_update"  # plain attributes of an adapted layer: a deep copy of the model follows them
_HOOK = "_lora_hook_id"


@dataclass
class LoRAConfig(MethodConfig):
    """Attributes:
    r: rank of each update ``B.A`` (>= 1).
    alpha: the update is scaled by ``alpha / r`` (>= 0; 0 adds nothing: a linear probe).
    targets: which layers get an update: ``conv`` (``nn.Conv2d``), ``linear`` (``nn.Linear``) or both.
    merge: export the plain network with ``W0 + alpha/r * B.A`` in each adapted weight (no hooks; a zoo
        net then saves and reloads as one); false exports the hooked model itself.
    """

    r: int = 8
    alpha: float = 8.0
    targets: list[str] = field(default_factory=lambda: ["conv", "linear"])
    merge: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise UserError(f"lora r={self.r!r}: give the rank as a whole number >= 1, e.g. r=8")
        alpha = self.alpha
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, int | float)
            or not math.isfinite(alpha)
            or alpha < 0
        ):
            raise UserError(
                f"lora alpha={alpha!r}: give a number >= 0 (updates are scaled by alpha/r), e.g. alpha=8"
            )
        self.alpha = float(alpha)
        targets = [self.targets] if isinstance(self.targets, str) else self.targets
        if (
            not isinstance(targets, list | tuple)
            or not targets
            or any(not isinstance(t, str) or t not in KINDS for t in targets)
        ):
            raise UserError(f"lora targets={self.targets!r}: give conv, linear or [conv,linear]")
        self.targets = [k for k in KINDS if k in targets]
        if not isinstance(self.merge, bool):
            raise UserError(f"lora merge={self.merge!r}: use true or false")


class LowRankUpdate(nn.Module):
    """``scale * B.A`` beside one frozen ``nn.Linear`` or ungrouped ``nn.Conv2d`` (see the module doc).

    Args:
        layer: the frozen layer (its weight gives the shapes, dtype and device).
        r: the rank.
        scale: ``alpha / r``.
    """

    def __init__(self, layer: nn.Linear | nn.Conv2d, r: int, scale: float) -> None:
        super().__init__()
        w = layer.weight
        self.a = nn.Parameter(torch.empty(r, *w.shape[1:], dtype=w.dtype, device=w.device))
        self.b = nn.Parameter(torch.zeros(w.shape[0], r, dtype=w.dtype, device=w.device))
        self.scale = float(scale)
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``scale * B(A(x))``, the term added to ``layer(x)``."""
        if self.a.dim() == 2:
            return self.scale * F.linear(F.linear(x, self.a), self.b)
        return self.scale * F.conv2d(_conv_with_weight(layer, x, self.a), self.b[:, :, None, None])

    def delta_weight(self) -> torch.Tensor:
        """``scale * B.A`` in the layer's weight shape."""
        return self.scale * torch.einsum("or,r...->o...", self.b, self.a)


def _conv_with_weight(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer``'s own convolution (padding, stride, dilation; a subclass's own forward, e.g. TF-SAME
    padding) with another weight and no bias."""
    if type(layer).forward is nn.Conv2d.forward:
        return layer._conv_forward(x, weight, None)  # type: ignore[operator]
    params = layer._parameters  # a subclass pads in its forward: run it with the weight swapped for A
    saved = params["weight"], params.get("bias")
    params["weight"], params["bias"] = weight, None  # type: ignore[assignment]
    try:
        return type(layer).forward(layer, x)
    finally:
        params["weight"], params["bias"] = saved


def _lora_hook(layer: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
    update = layer.__dict__.get(_UPDATE)
    if update is None:
        return None
    x = args[0] if args else next(iter(kwargs.values()))
    return output + update(layer, x)


class LoRANet(nn.Module):
    """The frozen target network and its updates (``adapters``, a ModuleDict keyed by layer name with
    ``-`` for ``.``), attached by forward hooks; ``forward`` is the network's."""

    def __init__(self, net: LayeredNet, updates: dict[str, LowRankUpdate]) -> None:
        super().__init__()
        self.net = net
        self.adapters = nn.ModuleDict({name.replace(".", "-"): u for name, u in updates.items()})
        for name, update in updates.items():
            layer = net.get_submodule(name)
            layer.__dict__[_UPDATE] = update
            layer.__dict__[_HOOK] = layer.register_forward_hook(_lora_hook, with_kwargs=True).id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def adapted(self) -> list[tuple[nn.Module, LowRankUpdate]]:
        return [(m, m.__dict__[_UPDATE]) for m in self.net.modules() if _UPDATE in m.__dict__]

    @torch.no_grad()
    def merged(self) -> LayeredNet:
        """A plain copy of the network, ``W0 + scale * B.A`` in each adapted weight, no hooks, all
        parameters trainable, in eval mode."""
        net = copy.deepcopy(self.net)
        for layer in net.modules():
            update = layer.__dict__.pop(_UPDATE, None)
            if update is None:
                continue
            hook_id = layer.__dict__.pop(_HOOK)
            for hooks in (layer._forward_hooks, layer._forward_hooks_with_kwargs):
                hooks.pop(hook_id, None)
            layer.weight.add_(update.delta_weight().to(layer.weight.dtype))
        unfreeze(net)
        return net.eval()


def choose_layers(net: LayeredNet, targets: list[str]) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """The layers of ``net`` that get an update (by name) and the counts of those skipped, by reason."""
    head = {id(m) for m in net.head.modules()}
    kinds = tuple(KINDS[t] for t in targets)
    chosen: dict[str, nn.Module] = {}
    skipped = {"grouped_conv": 0, "parametrized": 0, "not_run": 0}
    for name, m in net.named_modules():
        if id(m) in head or not isinstance(m, kinds):
            continue
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            skipped["grouped_conv"] += 1
        elif parametrize.is_parametrized(m):
            skipped["parametrized"] += 1
        else:
            chosen[name] = m
    ran: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, _i, _o: ran.add(id(mod))) for m in chosen.values()]
    try:
        p = next(net.parameters())
        with torch.no_grad(), evaluating(net):
            net(torch.zeros(2, *net.in_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
    for name in [n for n, m in chosen.items() if id(m) not in ran]:
        del chosen[name]
        skipped["not_run"] += 1
    return chosen, skipped


@register_method("lora")
class LoRA(Method):
    """LoRA (Hu et al. 2021, Eq. 3): the source frozen (weights and BatchNorm statistics), a rank-``r``
    update ``alpha/r * B.A`` beside each of its Conv2d / Linear layers, and the new head, train."""

    Config = LoRAConfig

    @classmethod
    def check_arch(cls, arch: str) -> None:
        if arch == "rnn":
            raise UserError(
                "method 'lora' adapts Conv2d and Linear layers; the rnn's only block is a GRU; "
                "use bitfit or finetune for rnn"
            )

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        c: LoRAConfig = self.config  # type: ignore[assignment]
        net = transfer_copy(self._require_source(source), num_classes, seed)
        net.freeze_blocks(range(net.num_blocks))  # and the un-named part: weights and BatchNorm statistics
        layers, self.skipped = choose_layers(net, c.targets)
        if not layers:
            raise UserError(
                f"lora finds no {' or '.join(KINDS[t].__name__ for t in c.targets)} layer to adapt outside "
                f"the head of this {net.arch} source; use bitfit or finetune"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            updates = {name: LowRankUpdate(layer, c.r, c.alpha / c.r) for name, layer in layers.items()}
        return LoRANet(net, updates)

    def export(self, model: nn.Module) -> nn.Module:
        return model.merged() if self.config.merge else model  # type: ignore[attr-defined]

    def diagnostics(self, model: nn.Module, task: Any) -> dict[str, Any]:
        """Counts (the trainer adds ``trainable_params``: updates and head), and the mean relative size
        ``||scale * B.A|| / ||W0||`` of the learned updates."""
        pairs = model.adapted()  # type: ignore[operator]
        with torch.no_grad():
            rel = [float(u.delta_weight().norm() / m.weight.norm().clamp_min(1e-12)) for m, u in pairs]
        return {
            "adapted_layers": len(pairs),
            "skipped_layers": dict(getattr(self, "skipped", {})),
            "adapter_parameters": sum(p.numel() for p in model.adapters.parameters()),  # type: ignore[union-attr]
            "update_relative_norm": sum(rel) / len(rel) if rel else 0.0,
        }
