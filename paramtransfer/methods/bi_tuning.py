"""Bi-Tuning (Zhong, Wang, Long, Wang, "Bi-tuning of Pre-trained Representations", 2020, arXiv:2011.06182).

Fine-tuning from the source with two heads on the penultimate features ``h`` (the head's input) and a
momentum (key) encoder with a queue of keys per class, MoCo style. The loss of a batch is

    ``L = CE + cce * L_CCE + ccl * L_CCL``

and both contrastive terms have one form (the paper's Eqs. for CCE and CCL): for a query ``u_i``, a set
``S_i`` of unit keys with labels and the positives ``P_i`` (the keys of class ``y_i``),

    ``L = -1/n sum_i 1/|P_i| sum_{p in P_i} log( exp(u_i.p / T) / sum_{s in S_i} exp(u_i.s / T) )``.

* **CCL** (categorical contrastive learning, projector head): ``u_i = z_i``, the query's projection
  ``normalize(g(h_i))``; ``S`` = the key encoder's projections of the batch (the image's own key among
  the positives) and the queue's.
* **CCE** (contrastive cross-entropy, classifier head): the query is the class's classifier weight
  ``u_i = normalize([w_{y_i}, b_{y_i}])`` and the keys are features ``normalize([h, 1])``; ``S_i`` = the
  query encoder's own ``h_i`` (a positive, with gradient), the key encoder's features of the batch and
  the queue's. Gradients reach the classifier weights (the paper's query); TLlib detaches them.

The key encoder is ``theta_k <- m * theta_k + (1 - m) * theta_q`` over every parameter of the target but
the head (unused by the keys) and of the projector, applied at the start of each step before the keys
are computed (as TLlib does). Its values are **buffers** (``model.key``, names with ``.`` written ``-``),
not parameters: nothing can give them gradients or hand them to an optimizer, and they go into
``state_dict`` with the queues (``queue_h``, ``queue_z``, ``queue_count``), so a checkpointed run
resumes identically. The keys are computed by running the target network itself with the key values
substituted (``torch.func.functional_call``): hooks, wrapped models and BatchNorm modes carry over; the
BatchNorm statistics that pass updates are copies, thrown away (MoCo's key encoder tracks its own, which
a key pass in train mode never reads), and the pass draws from a fork of the RNG, so with ``cce = ccl = 0``
a run is plain fine-tuning, bit for bit.

Differences from the paper and TLlib (``tllib/regularization/bi_tuning.py`` + its example script):

* One view: the trainer gives one batch, so the key encoder sees the same (with ``augment``: the same
  augmented) images as the query; the paper and TLlib feed it a second augmentation.
* Keys of the current batch join the queue's in both terms (TLlib's CCE sees them too: it enqueues before
  contrasting), and an empty slot is no key (TLlib starts from random unit vectors): with few examples
  per class the batch holds most of the positives, and the first step has keys to contrast with.
* TLlib scores with ``KLDivLoss`` against the uniform target over the positives: our value is larger by
  ``log |P_i|`` (the target's entropy), the gradient is the same.
* Defaults scaled to few-shot targets: ``queue_size`` 8 keys per class (TLlib 40, for 30-60 images per
  class; 8 stays below a 10-shot class, so the queue holds recent keys of distinct images), ``momentum``
  0.99 (TLlib 0.999 over 10,000 steps; a 10-shot target trains ~100-300 steps here, and 0.999 would
  leave the keys near the source). ``temperature`` 0.07, ``projection_dim`` 128 and weight 1 for both
  terms are TLlib's (``trade_off`` weighs their sum). TLlib's projector is one ``Linear``; ours is a
  two-layer MLP as in MoCo v2 / SimCLR (``projector="linear"`` for TLlib's). One learning rate for
  everything (TLlib gives the backbone and projector 0.1x).

Both contrastive terms are loss terms besides ``"task"``, so ``dtnh:bi_tuning`` drops the part of their
gradient that opposes the task's (a conflict-free auxiliary loss, not a pull towards the source).

Args: see :class:`BiTuningConfig`.

Shape:
    forward ``[B, *in_shape] -> [B, num_classes]`` (the target's logits); queues ``[C, K, D + 1]`` and
    ``[C, K, projection_dim]`` (``D + 1``: ``[h, 1]``; ``D`` for a head without bias).

Example:
    >>> pt.run("bi_tuning[queue_size=4,momentum=0.95]", source=src, target=task)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from paramtransfer.errors import UserError
from paramtransfer.methods.base import Method, MethodConfig, register_method, transfer_copy
from paramtransfer.models.layered import LayeredNet

PROJECTORS = ("mlp", "linear")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class BiTuningConfig(MethodConfig):
    """Attributes:
    cce: weight of the contrastive cross-entropy on the classifier head (0: off).
    ccl: weight of the categorical contrastive loss on the projector head (0: off).
    temperature: T of both contrastive softmaxes.
    queue_size: keys kept per class (K).
    momentum: m of the key encoder's moving average (1: the keys stay at the source's encoder).
    projection_dim: size of the projector's L2-normalised output.
    projector: ``mlp`` (Linear(D, D), ReLU, Linear(D, projection_dim)) or ``linear`` (TLlib's).
    """

    cce: float = 1.0
    ccl: float = 1.0
    temperature: float = 0.07
    queue_size: int = 8
    momentum: float = 0.99
    projection_dim: int = 128
    projector: str = "mlp"

    def __post_init__(self) -> None:
        for name in ("cce", "ccl"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise UserError(f"bi_tuning {name}={value!r}: give a weight >= 0 (0 turns the term off)")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise UserError(f"bi_tuning temperature={self.temperature!r}: give a number > 0, e.g. 0.07")
        if not _is_whole(self.queue_size) or self.queue_size < 1:
            raise UserError(
                f"bi_tuning queue_size={self.queue_size!r}: give a whole number of keys per class >= 1"
            )
        if not _is_number(self.momentum) or not 0 <= self.momentum <= 1:
            raise UserError(f"bi_tuning momentum={self.momentum!r}: give a number in [0, 1], e.g. 0.99")
        if not _is_whole(self.projection_dim) or self.projection_dim < 1:
            raise UserError(f"bi_tuning projection_dim={self.projection_dim!r}: give a whole number >= 1")
        if self.projector not in PROJECTORS:
            raise UserError(f"bi_tuning projector={self.projector!r}: use {' or '.join(PROJECTORS)}")


def _key_name(name: str) -> str:
    return name.replace(".", "-")  # a buffer's name cannot hold a dot


class BiTuningNet(nn.Module):
    """The target LayeredNet, the projector on the head's input, the key encoder's values and the queues.

    ``forward(x)`` is the target's logits; ``forward(x, embed=True)`` also returns the head's input ``h``
    ``[B, D]`` and the projection ``g(h)`` ``[B, projection_dim]`` (not normalised).
    """

    def __init__(
        self, target: LayeredNet, projector: nn.Module, num_classes: int, queue_size: int, projection_dim: int
    ) -> None:
        super().__init__()
        self.target = target
        self.projector = projector
        head = target.head_layer()
        head_ids = {id(p) for p in head.parameters()}
        self.key_names = [n for n, p in self.named_parameters() if id(p) not in head_ids]
        self.key = nn.Module()
        for name in self.key_names:
            self.key.register_buffer(_key_name(name), self.get_parameter(name).detach().clone())
        if len(dict(self.key.named_buffers())) != len(self.key_names):
            raise UserError("bi_tuning: two parameter names collide once dots become '-'; rename the modules")
        dim_h = head.in_features + (head.bias is not None)
        self.register_buffer("queue_h", torch.zeros(num_classes, queue_size, dim_h))
        self.register_buffer("queue_z", torch.zeros(num_classes, queue_size, projection_dim))
        self.register_buffer("queue_count", torch.zeros(num_classes, dtype=torch.long))  # keys ever stored

    def forward(self, x: torch.Tensor, embed: bool = False) -> Any:
        if not embed:
            return self.target(x)
        logits, h = self.target.logits_and_embedding(x)
        return logits, h, self.projector(h)

    def key_values(self) -> list[torch.Tensor]:
        return [self.key.get_buffer(_key_name(n)) for n in self.key_names]

    def query_values(self) -> list[torch.Tensor]:
        return [self.get_parameter(n) for n in self.key_names]

    def valid_slots(self) -> torch.Tensor:
        """``[C, K]`` bool: which queue slots hold a key."""
        k = self.queue_h.shape[1]
        return torch.arange(k, device=self.queue_count.device)[None] < self.queue_count[:, None]


def homogeneous(h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``normalize([h, 1])`` (``normalize(h)`` for a head without bias): the unit vector whose dot product
    with ``normalize([w_c, b_c])`` is the cosine of the classifier's affine score."""
    if bias is not None:
        h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
    return F.normalize(h, dim=1)


def contrast(logits: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``-1/n sum_i 1/|P_i| sum_{p in P_i} log softmax(logits_i)[p]``, the softmax over the valid keys and
    ``P_i`` the valid positives (every row needs one). Shapes: ``[n, S]`` each (``valid`` broadcasts)."""
    log_p = logits.masked_fill(~valid, -math.inf).log_softmax(dim=1)
    positive = positive & valid
    return -(torch.where(positive, log_p, 0.0).sum(1) / positive.sum(1)).mean()


def ccl_loss(
    z_q: torch.Tensor,
    z_k: torch.Tensor,
    y: torch.Tensor,
    queue_z: torch.Tensor,
    valid_slots: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Categorical contrastive loss of unit queries ``z_q`` ``[B, d]`` against the batch's unit keys ``z_k``
    ``[B, d]`` (labels ``y``) and the queue ``[C, K, d]`` (``valid_slots`` ``[C, K]``)."""
    num_classes, k, _ = queue_z.shape
    keys = torch.cat([z_k, queue_z.flatten(0, 1)])
    labels = torch.cat([y, torch.arange(num_classes, device=y.device).repeat_interleave(k)])
    valid = torch.cat([torch.ones_like(y, dtype=torch.bool), valid_slots.flatten()])
    return contrast(z_q @ keys.T / temperature, y[:, None] == labels[None], valid[None])


def cce_loss(
    h_q: torch.Tensor,
    h_k: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    queue_h: torch.Tensor,
    valid_slots: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Contrastive cross-entropy: the unit class weights ``w`` ``[C, D]`` as queries; for example ``i`` the
    keys are its own unit feature ``h_q[i]`` (a positive), the batch's key features ``h_k`` ``[B, D]`` and
    the queue ``[C, K, D]``; the positives are the features of class ``y_i``."""
    num_classes, k, _ = queue_h.shape
    keys = torch.cat([h_k, queue_h.flatten(0, 1)])
    labels = torch.cat([y, torch.arange(num_classes, device=y.device).repeat_interleave(k)])
    valid = torch.cat([torch.ones_like(y, dtype=torch.bool), valid_slots.flatten()])
    w_y = w[y]
    logits = torch.cat([(w_y * h_q).sum(1, keepdim=True), w_y @ keys.T], dim=1) / temperature
    own = torch.ones_like(y, dtype=torch.bool)[:, None]
    positive = torch.cat([own, y[:, None] == labels[None]], dim=1)
    return contrast(logits, positive, torch.cat([own[:1, :1], valid[None]], dim=1))


@torch.no_grad()
def enqueue(
    queues: list[torch.Tensor], count: torch.Tensor, keys: list[torch.Tensor], y: torch.Tensor
) -> None:
    """Store each row of ``keys[j]`` in ``queues[j]`` (``[C, K, d]``) at its class, oldest slot first; of a
    class with more than K rows in the batch the last K are kept. ``count`` ``[C]`` (keys ever stored)
    grows by the rows per class."""
    num_classes, k = queues[0].shape[:2]
    onehot = F.one_hot(y, num_classes)
    rank = (onehot.cumsum(0) - 1).gather(1, y[:, None]).squeeze(1)  # place of the row within its class
    per_class = onehot.sum(0)
    keep = rank >= (per_class - k)[y]
    slot = (count[y] + rank) % k
    for queue, rows in zip(queues, keys, strict=True):
        queue[y[keep], slot[keep]] = rows[keep].to(queue.dtype)
    count += per_class


@register_method("bi_tuning")
class BiTuning(Method):
    """Bi-Tuning: ``CE + cce * L_CCE + ccl * L_CCL`` with a projector, a momentum key encoder and a queue
    of keys per class (the equations, defaults and differences from TLlib: this module's docstring)."""

    Config = BiTuningConfig
    regularized = True  # its contrastive terms are loss terms besides "task": dtnh:bi_tuning exists

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        c: BiTuningConfig = self.config  # type: ignore[assignment]
        target = transfer_copy(self._require_source(source), num_classes, seed)
        dim = target.head_layer().in_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            if c.projector == "mlp":
                projector: nn.Module = nn.Sequential(
                    nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, c.projection_dim)
                )
            else:
                projector = nn.Linear(dim, c.projection_dim)
        return BiTuningNet(target, projector, num_classes, c.queue_size, c.projection_dim)

    @torch.no_grad()
    def update_key(self, model: BiTuningNet) -> None:
        """``theta_k <- m * theta_k + (1 - m) * theta_q`` for every key value."""
        m = float(self.config.momentum)  # type: ignore[attr-defined]
        keys = model.key_values()
        torch._foreach_mul_(keys, m)
        torch._foreach_add_(keys, [p.detach() for p in model.query_values()], alpha=1.0 - m)

    @torch.no_grad()
    def keys(self, model: BiTuningNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key encoder's ``h`` and ``g(h)`` for ``x``: the target network run with the key values."""
        values: dict[str, torch.Tensor] = dict(zip(model.key_names, model.key_values(), strict=True))
        for name, buf in model.named_buffers():
            if name.startswith(("target.", "projector.")):
                values[name] = buf.clone()  # BatchNorm statistics the key pass updates: thrown away
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            _, h, z = functional_call(model, values, (x,), {"embed": True})
        return h, z

    def loss_terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        c: BiTuningConfig = self.config  # type: ignore[assignment]
        logits, h, z = model(x, embed=True)
        self.update_key(model)
        h_k, z_k = self.keys(model, x)
        head = model.target.head_layer()
        w = head.weight if head.bias is None else torch.cat([head.weight, head.bias[:, None]], dim=1)
        valid = model.valid_slots()
        t = float(c.temperature)
        with torch.autocast(x.device.type, enabled=False):  # cosines / 0.07 need more than bf16's digits
            h_q, h_k = homogeneous(h.float(), head.bias), homogeneous(h_k.float(), head.bias)
            z_q, z_k = F.normalize(z.float(), dim=1), F.normalize(z_k.float(), dim=1)
            cce = cce_loss(h_q, h_k, y, F.normalize(w.float(), dim=1), model.queue_h, valid, t)
            ccl = ccl_loss(z_q, z_k, y, model.queue_z, valid, t)
        enqueue([model.queue_h, model.queue_z], model.queue_count, [h_k, z_k], y)
        return {"task": F.cross_entropy(logits, y), "cce": c.cce * cce, "ccl": c.ccl * ccl}

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.target(x)

    def export(self, model: nn.Module) -> nn.Module:
        return model.target
