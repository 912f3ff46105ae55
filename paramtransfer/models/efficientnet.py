"""EfficientNet-Lite0 (Tan & Le 2019, "Lite" variant of 2020) as a LayeredNet, written from its definition.

Blocks: the stem (3x3 conv, stride 2, BN, ReLU6), the seven MBConv stages (each an ``nn.Sequential`` of
:class:`MBConv`) and the final 1x1 conv 320 -> 1280 (BN, ReLU6); then global average pooling (the neck)
and the task layer ``Linear(1280, num_classes)`` (dropout 0.2 before it, as in the original). Lite
means: no squeeze-and-excitation, ReLU6 everywhere, a fixed stem and head width.

BatchNorm: eps 1e-3 as in the TensorFlow original; momentum 0.1 (PyTorch's default, as torchvision's
and timm's EfficientNets), not TF's decay 0.99 (0.01 in PyTorch's terms). The decay suits a long ImageNet
run; in a target training of ~100 steps the running statistics would barely leave their start. Measured
here (Fashion-MNIST, 10 shots, 64 px, 20 epochs): trained from scratch with momentum 0.01 the network
stays at chance on validation (10 %) while its training loss falls from 2.6 to 1.1, because evaluation
normalises with statistics that lag the weights. Momentum changes nothing in evaluation mode, so the
ImageNet predictions are the same with either value.

Padding: the ImageNet weights were trained in TensorFlow with ``padding="SAME"``. For a stride-2
convolution on an even-sized input TF pads asymmetrically (the extra pixel goes right/bottom), which no
``nn.Conv2d(padding=...)`` can express, so :class:`SameConv2d` pads with ``F.pad`` computed from the
input size (any input size works, not only 224). Chosen empirically on the two photos of scikit-learn's
``load_sample_images`` (temple, flower), top-1 class and probability of a 224 px center crop:

* TF-SAME padding, TF normalisation: temple 'palace' 0.33, flower 'daisy' 0.20;
* symmetric padding (``k // 2``), TF normalisation: temple 'palace' 0.51, flower 'daisy' 0.13;
* TF-SAME, ImageNet mean/std: temple 'bell cote' 0.34, flower 'daisy' 0.08;
* symmetric, ImageNet mean/std: temple 'bell cote' 0.42, flower 'mushroom' 0.10.

The center crop alone does not separate the two paddings, so 40 views per photo were scored (scales
224/256/288/320, five crops, flips): TF-SAME takes 'daisy' top-1 on 82 % of the flower's views (mean p
0.21) against 45 % (0.09) for symmetric padding, and the temple's top-1 is a building on 65 % against
62 %; the summed negative log-likelihood of the right classes is 2.85 (TF-SAME) against 4.17. The
weights therefore expect TF-SAME padding, as their TF origin says.

Normalisation: TF's EfficientNet-Lite takes ``(x * 255 - 127) / 128`` for pixels ``x`` in [0, 1], i.e.
per-channel mean 0.5 and std 0.5 (up to 1/256); :meth:`EfficientNetLite.normalize` computes exactly
that. The same views confirm it: ImageNet's mean/std normalisation gives the flower 'daisy' on 10 % of
its views (NLL 4.14 with TF-SAME padding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from paramtransfer.models.layered import LayeredNet

BN_EPS = 1e-3
BN_MOMENTUM = 0.1  # PyTorch's convention and default; TF's decay 0.99 would be 0.01 (see above)

# (expand ratio, kernel, stride of the first block, output channels, repeats) per stage
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NATIVE_SIZE = 224
# (x * 255 - 127) / 128 == (x - 127/255) / (128/255)
INPUT_MEAN = 127.0 / 255.0
INPUT_STD = 128.0 / 255.0


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's ``padding="SAME"``: output size ``ceil(input / stride)``, the
    total padding ``max((out - 1) * stride + kernel - input, 0)`` split with the larger half after
    (right/bottom). For stride 1 and odd kernels that is the symmetric ``kernel // 2``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    @staticmethod
    def _pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pads(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = self._pads(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Mobile inverted bottleneck (Sandler et al. 2018) without squeeze-excite: optional 1x1 expansion
    (BN, ReLU6), depth-wise kxk (BN, ReLU6), 1x1 projection (BN, no activation).

    ``residual`` is that branch; ``shortcut`` is ``nn.Identity`` when the block keeps its shape (stride 1,
    same channels), else ``None``: ``forward = residual(x) + shortcut(x)`` or ``residual(x)``. Routing
    methods (SpotTune) combine copies of blocks with an identity shortcut, listed by
    :meth:`EfficientNetLite.residual_blocks`.
    """

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), _bn(mid), nn.ReLU6(inplace=True)]
        layers += [SameConv2d(mid, mid, kernel, stride, groups=mid), _bn(mid), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(mid, cout, 1, bias=False), _bn(cout)]
        self.residual = nn.Sequential(*layers)
        self.shortcut: nn.Module | None = nn.Identity() if stride == 1 and cin == cout else None

    @property
    def has_skip(self) -> bool:
        return self.shortcut is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        return out + self.shortcut(x) if self.shortcut is not None else out


class _GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class EfficientNetLite(LayeredNet):
    """A LayeredNet that also knows its ImageNet input: :attr:`native_size` and the TF normalisation
    ``(x*255 - 127) / 128`` (:meth:`LayeredNet.normalize` with mean 127/255, std 128/255)."""

    native_size = NATIVE_SIZE

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = int(self.in_shape[0])
        self.input_mean = (INPUT_MEAN,) * c
        self.input_std = (INPUT_STD,) * c

    def residual_blocks(self) -> list[tuple[int, int, MBConv]]:
        """``(block index, index in the stage, MBConv)`` of every MBConv with an identity shortcut."""
        found = []
        for i, block in enumerate(self.blocks):
            for j, sub in enumerate(block.children() if isinstance(block, nn.Sequential) else []):
                if isinstance(sub, MBConv) and sub.has_skip:
                    found.append((i, j, sub))
        return found


def efficientnet_lite0(
    num_classes: int, in_shape: tuple[int, ...] = (3, NATIVE_SIZE, NATIVE_SIZE)
) -> LayeredNet:
    """EfficientNet-Lite0: 9 blocks (stem, 7 MBConv stages, 1x1 conv to 1280), 4.65 M parameters with
    1000 classes; global average pooling and dropout 0.2 (as in the original) before the task layer."""
    stem = nn.Sequential(
        SameConv2d(in_shape[0], STEM_CHANNELS, 3, 2), _bn(STEM_CHANNELS), nn.ReLU6(inplace=True)
    )
    blocks: list[nn.Module] = [stem]
    cin = STEM_CHANNELS
    for expand, kernel, stride, cout, repeats in LITE0_STAGES:
        stage = []
        for r in range(repeats):
            stage.append(MBConv(cin, cout, expand, kernel, stride if r == 0 else 1))
            cin = cout
        blocks.append(nn.Sequential(*stage))
    blocks.append(
        nn.Sequential(
            nn.Conv2d(cin, HEAD_CHANNELS, 1, bias=False), _bn(HEAD_CHANNELS), nn.ReLU6(inplace=True)
        )
    )
    for m in nn.ModuleList(blocks).modules():
        if isinstance(m, nn.Conv2d) and not m.weight.is_meta:  # meta: only counting parameters
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    head = nn.Linear(HEAD_CHANNELS, num_classes)
    neck = nn.Sequential(_GlobalAvgPool(), nn.Dropout(0.2))
    return EfficientNetLite(blocks, head, neck, arch="efficientnet_lite0", in_shape=in_shape)


def convert_tf_port(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``efficientnet_pytorch`` naming (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc`` ...) of
    EfficientNet-Lite0 -> this module's state_dict names. Raises ``KeyError`` for an unknown tensor."""
    # flat block number -> (stage block index, index in stage)
    where: list[tuple[int, int]] = []
    for s, (*_, repeats) in enumerate(LITE0_STAGES):
        where += [(s + 1, r) for r in range(repeats)]
    last = len(LITE0_STAGES) + 1
    fixed = {"_conv_stem": "blocks.0.0", "_bn0": "blocks.0.1", "_conv_head": f"blocks.{last}.0"}
    fixed |= {"_bn1": f"blocks.{last}.1", "_fc": "head"}
    out = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if module in fixed:
            out[f"{fixed[module]}.{leaf}"] = tensor
            continue
        prefix, n, part = module.split(".")
        if prefix != "_blocks":
            raise KeyError(name)
        stage, r = where[int(n)]
        expands = LITE0_STAGES[stage - 1][0] != 1
        offset = {
            "_expand_conv": 0,
            "_bn0": 1,
            "_depthwise_conv": 3,
            "_bn1": 4,
            "_project_conv": 6,
            "_bn2": 7,
        }
        pos = offset[part] - (0 if expands else 3)
        out[f"blocks.{stage}.{r}.residual.{pos}.{leaf}"] = tensor
    return out
