"""LayeredNet: the one interface every layer-wise transfer method speaks.

A LayeredNet is ``blocks`` (layers 1..L-1, shared in shape by source and target), a parameter-free
``neck`` (e.g. global pooling) and ``head`` (the task layer, an ``nn.Linear``). Any torch model can be
wrapped by naming its blocks and head; block outputs are then read with forward hooks, never by
rewriting the model.

Freezing is by module: :func:`freeze` stops the gradients of a module's parameters and marks the module
and all its submodules frozen, so that the trainer keeps the BatchNorm statistics of everything in a
frozen part fixed (BatchNorm without affine parameters included).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from paramtransfer.errors import UserError

_FROZEN = "_paramtransfer_frozen"  # instance attribute: survives deepcopy and pickling, not in state_dict
_START = "_paramtransfer_start"  # set only inside LayeredNet.starting_at


def freeze(modules: nn.Module | Iterable[nn.Module]) -> None:
    """Stop gradients through ``modules`` and mark them (with every submodule) frozen; the trainer then
    keeps their BatchNorm statistics fixed too, whether or not a BatchNorm has affine parameters."""
    for m in [modules] if isinstance(modules, nn.Module) else modules:
        for sub in m.modules():
            sub.__dict__[_FROZEN] = True
        for p in m.parameters():
            p.requires_grad_(False)


def unfreeze(module: nn.Module) -> None:
    """Undo :func:`freeze` on ``module`` and everything in it: all parameters trainable, no marks."""
    for sub in module.modules():
        sub.__dict__.pop(_FROZEN, None)
    for p in module.parameters():
        p.requires_grad_(True)


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` lies in a part of the model that :func:`freeze` froze."""
    return bool(module.__dict__.get(_FROZEN, False))


class LayeredNet(nn.Module):
    """A network seen as ``head(neck(block_L-1(...block_1(x))))``.

    **Un-named modules.** A wrapped model may hold modules that are neither a named block nor the head:
    an un-named stem before the first block (``conv0`` + BatchNorm), activations or norms between
    blocks, parameters the model holds itself (a position embedding); a zoo net's only one is its
    parameter-free neck. They come with the source like block 1, so every method treats them as part of
    the transferred network (:meth:`unnamed_modules`, :meth:`transferred_parameters`):

    * they are frozen, weights and BatchNorm statistics, whenever a method freezes any block
      (:meth:`freeze_blocks`: linear probe, FT-l for l >= 1, last-k, stochastic fine-tuning, SpotTune);
    * they train like block 1 when every block trains (full fine-tuning, scratch, L2-SP, KnowDist);
    * L2-SP pulls them towards their source values (its Omega covers every transferred parameter,
      everything but the head); KnowDist and DELTA reach them through the block outputs they feed.

    Name such a module as a block to give it a block's own treatment.

    Args:
        blocks: the transferable layers, applied in order.
        head: the task layer; an ``nn.Linear`` so that :meth:`reset_head` can replace it.
        neck: a parameter-free module between the last block and the head (default identity).
        arch: the zoo name that rebuilds this net (``"custom"`` for hand-made ones).
        in_shape: input shape ``(C, H, W)`` without the batch dimension.
        arch_kwargs: keyword arguments that rebuild the architecture with :func:`build_model`.

    Shape:
        forward: ``[B, *in_shape] -> [B, num_classes]``; features: one tensor per block.
    """

    sequential = True  # blocks can be run one by one (wrapped models cannot guarantee this)
    # The input the net expects: pixels x in [0, 1] become (x - mean) / std per channel; None means 0.5
    # for every channel (pixels in [-1, 1], the zoo's convention). ImageNet nets set their own.
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None
    class_names: list[str] | None = None  # names of the source's classes, when known

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        neck: nn.Module | None = None,
        *,
        arch: str = "custom",
        in_shape: tuple[int, ...] = (1, 28, 28),
        arch_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.neck = neck if neck is not None else nn.Identity()
        self.head = head
        self.arch = arch
        self.in_shape = tuple(in_shape)
        self.arch_kwargs = dict(arch_kwargs or {})

    def input_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel ``(mean, std)`` of the input normalisation (see :meth:`normalize`)."""
        c = int(self.in_shape[0])
        mean = tuple(self.input_mean) if self.input_mean is not None else (0.5,) * c
        std = tuple(self.input_std) if self.input_std is not None else (0.5,) * c
        return mean, std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Images with pixels in [0, 1] (``[N, C, H, W]``) -> the network's input ``(x - mean) / std``."""
        mean, std = self.input_stats()
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - m) / s

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_classes(self) -> int:
        return int(self.head_layer().out_features)

    def head_layer(self) -> nn.Linear:
        head = self.head
        if not isinstance(head, nn.Linear):
            raise UserError(
                f"the head of {self.arch} is a {type(head).__name__}; a transfer head must be nn.Linear"
            )
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = self.__dict__.get(_START, 0)  # > 0 only inside starting_at: x is block start-1's output
        for i, block in enumerate(self.blocks):
            if i >= start:
                x = block(x)
        return self.head(self.neck(x))

    def frozen_prefix(self) -> int:
        """How many leading blocks are frozen and deterministic: every module in them frozen (weights and
        BatchNorm statistics, see :func:`freeze`) and none a dropout. Their output depends on the input
        alone, so a trainer may compute it once per example (0 for a wrapped model: its forward is the
        user's own and cannot start at a block)."""
        if not self.sequential or type(self).forward is not LayeredNet.forward:
            return 0
        n = 0
        for block in self.blocks:
            mods = list(block.modules())
            if not all(is_frozen(m) for m in mods) or any(
                isinstance(m, nn.modules.dropout._DropoutNd) for m in mods
            ):
                break
            n += 1
        return n

    @contextlib.contextmanager
    def starting_at(self, start: int) -> Iterator[LayeredNet]:
        """Within the block, ``forward`` takes the output of block ``start - 1`` (e.g. a cached one) and
        runs blocks ``start ..`` and the head."""
        self.__dict__[_START] = int(start)
        try:
            yield self
        finally:
            self.__dict__.pop(_START, None)

    def run_prefix(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """The output of blocks ``0 .. stop-1`` for input ``x``."""
        for block in list(self.blocks)[:stop]:
            x = block(x)
        return x

    def features_until(self, x: torch.Tensor, stop: int) -> list[torch.Tensor]:
        """The outputs of blocks ``0 .. stop-1`` for input ``x``."""
        out = []
        for block in list(self.blocks)[:stop]:
            x = block(x)
            out.append(x)
        return out

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and each block's output from one forward pass."""
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return self.head(self.neck(x)), feats

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each block's output, in order."""
        return self.forward_features(x)[1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input (penultimate features), flattened to ``[B, D]``."""
        feats = self.features(x)
        return self.neck(feats[-1]).flatten(1)

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(x)`` and what the head received (flattened to ``[B, D]``) from one pass: a forward
        pre-hook on the head, so that any forward (a wrapped model's own, hooks of a method) runs as is."""
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            logits = self(x)
        finally:
            handle.remove()
        return logits, captured[-1].flatten(1)

    def unnamed_modules(self) -> list[nn.Module]:
        """The largest submodules that neither are nor contain a block or the head, and lie in none
        (see the class docstring); for a zoo net, the neck."""
        return self._partition()[0]

    def unnamed_parameters(self) -> list[nn.Parameter]:
        """Every parameter outside the blocks and the head: those of :meth:`unnamed_modules` and those a
        module holding blocks owns itself (e.g. a wrapped model's own ``nn.Parameter``)."""
        outside, containers = self._partition()
        params = [p for m in outside for p in m.parameters()]
        params += [p for m in containers for p in m.parameters(recurse=False)]
        return list({id(p): p for p in params}.values())

    def transferred_parameters(self) -> list[nn.Parameter]:
        """The parameters that come with the source: every parameter but the head's."""
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def freeze_blocks(self, indices: Iterable[int]) -> None:
        """Freeze the blocks at ``indices`` (weights and BatchNorm statistics); if there is any, the
        un-named part is frozen with them (it comes with the source, like block 1)."""
        chosen = [self.blocks[i] for i in indices]
        if not chosen:
            return
        freeze(chosen)
        freeze(self.unnamed_modules())
        for p in self.unnamed_parameters():
            p.requires_grad_(False)

    def _partition(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """(un-named modules, modules that hold a block or the head), by identity, in module order."""
        named = {id(b) for b in self.blocks} | {id(self.head)}
        outside: list[nn.Module] = []
        containers: list[nn.Module] = []

        def visit(m: nn.Module) -> None:
            if id(m) in named:
                return
            if any(id(sub) in named for sub in m.modules()):
                containers.append(m)
                for child in m.children():
                    visit(child)
            else:
                outside.append(m)

        visit(self)
        return outside, containers

    def reset_head(self, num_classes: int) -> None:
        """Replace the task layer by a freshly initialised ``Linear(in_features, num_classes)``; the
        source's :attr:`class_names` go with the old one (the new classes are the target's)."""
        old = self.head_layer()
        self._set_head(nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
        self.class_names = None

    def _set_head(self, head: nn.Linear) -> None:
        self.head = head

    def describe(self) -> dict[str, Any]:
        """What rebuilds this architecture (stored beside saved weights)."""
        info: dict[str, Any] = {
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "in_shape": list(self.in_shape),
            "num_classes": self.num_classes,
            "num_blocks": self.num_blocks,
        }
        if self.input_mean is not None or self.input_std is not None:
            mean, std = self.input_stats()
            info["input_mean"], info["input_std"] = list(mean), list(std)
        if self.class_names is not None:
            info["class_names"] = list(self.class_names)
        return info

    @staticmethod
    def wrap(
        module: nn.Module, blocks: Sequence[str], head: str, in_shape: tuple[int, ...] = (1, 28, 28)
    ) -> WrappedNet:
        """View any torch model as a LayeredNet by naming its blocks and its head (no rewriting)."""
        return WrappedNet(module, blocks, head, in_shape)


class WrappedNet(LayeredNet):
    """A user's model seen through forward hooks on its named blocks.

    ``forward`` is the model's own forward; :meth:`forward_features` captures the named blocks' outputs
    with temporary forward hooks. Methods that mix in their own outputs (PTU, SpotTune) replace a named
    block's output with a forward hook of their own.
    The model's modules that are neither a named block nor the head are its un-named part, treated as
    :class:`LayeredNet` describes.
    """

    sequential = False

    def __init__(
        self, module: nn.Module, blocks: Sequence[str], head: str, in_shape: tuple[int, ...]
    ) -> None:
        nn.Module.__init__(self)
        names = dict(module.named_modules())
        missing = [n for n in [*blocks, head] if n not in names or n == ""]
        if missing:
            raise UserError(
                f"wrapped model has no submodule {missing[0]!r}; its submodules include "
                + ", ".join(list(n for n in names if n)[:12])
            )
        if not blocks:
            raise UserError("wrap needs at least one block name")
        overlap = [b for b in blocks if head == b or head.startswith(b + ".") or b.startswith(head + ".")]
        if overlap:
            raise UserError(
                f"wrapped model: block {overlap[0]!r} and the head {head!r} overlap (freezing the block "
                "would freeze the head); name blocks that neither contain nor lie in the head"
            )
        self.module = module
        self.block_names = list(blocks)
        self.head_name = head
        self.arch = "wrapped"
        self.in_shape = tuple(in_shape)
        self.arch_kwargs = {}
        self.neck = nn.Identity()

    @property
    def blocks(self) -> nn.ModuleList:  # type: ignore[override]
        return nn.ModuleList(self.module.get_submodule(n) for n in self.block_names)

    @property
    def head(self) -> nn.Module:  # type: ignore[override]
        return self.module.get_submodule(self.head_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        captured: dict[int, torch.Tensor] = {}
        # clone: an in-place op after a block (ReLU(inplace=True)) would otherwise overwrite its output
        handles = [
            block.register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(i, out.clone()))
            for i, block in enumerate(self.blocks)
        ]
        try:
            logits = self.module(x)
        finally:
            for h in handles:
                h.remove()
        return logits, [captured[i] for i in range(len(self.block_names))]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_embedding(x)[1]

    def _set_head(self, head: nn.Linear) -> None:
        parent_name, _, attr = self.head_name.rpartition(".")
        parent = self.module.get_submodule(parent_name) if parent_name else self.module
        setattr(parent, attr, head)
