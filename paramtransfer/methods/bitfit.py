"""BitFit: fine-tune the bias terms of the transferred network (and the new head), nothing else.

Ben Zaken, Ravfogel & Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models" (ACL 2022), Sec. 2: every layer ``y = W x + b`` keeps ``W`` at its pre-trained
value and trains ``b``; the task's own classification layer trains whole. Here "a bias" is every
parameter of the transferred network (the blocks and a wrapped model's un-named part, which come with the
source like block 1) whose name starts with ``bias``: ``nn.Conv2d`` / ``nn.Linear`` biases, the BatchNorm
/ LayerNorm / GroupNorm shift (beta), and a recurrent layer's ``bias_ih_l0`` / ``bias_hh_l0``.
EfficientNet-Lite0's and ResNet's convolutions have no bias (a BatchNorm follows each), so there BitFit
trains the BatchNorm shifts, which play the bias's part.

BatchNorm statistics stay the source's: the transferred network is frozen as by ``linear_probe`` (its
BatchNorm layers in eval mode) and only its biases are released. The trained network then differs from
the source in its bias vectors alone (BitFit's point: a task costs one vector per layer); in train mode
BatchNorm would also normalise with each batch's statistics and move its running ones, two more vectors
per layer, and a conv bias just before a train-mode BatchNorm gets no gradient at all (the batch mean
removes it). The full-network variant is implemented; the paper's subset (query and MLP-intermediate
biases only) is transformer-specific.

TLlib (thuml/Transfer-Learning-Library) has no BitFit; there are no options to relate.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.methods.base import Method, register_method, transfer_copy
from paramtransfer.models.layered import LayeredNet


def is_bias(name: str) -> bool:
    """Whether the parameter called ``name`` (dotted) is a bias term."""
    return name.rpartition(".")[2].startswith("bias")


@register_method("bitfit")
class BitFit(Method):
    """BitFit (Ben Zaken et al. 2022): the transferred network frozen (weights and BatchNorm statistics)
    but for its bias terms, which train with the new head."""

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        model = transfer_copy(self._require_source(source), num_classes, seed)
        model.freeze_blocks(
            range(model.num_blocks)
        )  # and the un-named part: weights and BatchNorm statistics
        head = {id(p) for p in model.head.parameters()}
        biases = [p for name, p in model.named_parameters() if id(p) not in head and is_bias(name)]
        if not biases:
            raise UserError(
                f"bitfit finds no bias outside the head of this {model.arch} source (BitFit would be a "
                "linear probe); use linear_probe or lora"
            )
        for p in biases:
            p.requires_grad_(True)
        return model

    def diagnostics(self, model: nn.Module, task: Any) -> dict[str, Any]:
        """Biases trained, parameters transferred (the trainer adds ``trainable_params``, with the head)."""
        head = {id(p) for p in model.head.parameters()}  # type: ignore[union-attr]
        transferred = [(n, p) for n, p in model.named_parameters() if id(p) not in head]
        return {
            "bias_parameters": sum(p.numel() for n, p in transferred if p.requires_grad),
            "transferred_parameters": sum(p.numel() for _, p in transferred),
        }
