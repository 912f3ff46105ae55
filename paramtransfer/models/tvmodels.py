"""torchvision's ImageNet architectures as LayeredNets, written from their definitions (torchvision is not
needed): ResNet-18/34/50/101, MobileNetV2, MobileNetV3-Small/Large and EfficientNet-B0..B3.

A ``state_dict`` saved by torchvision (e.g. ``~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth``)
loads into them unchanged in values after :func:`convert_torchvision` renamed its keys; inside a block
the names are torchvision's own (``layer2.0.conv1.weight`` is ``blocks.2.0.conv1.weight``). The layers
follow torchvision exactly: BatchNorm eps/momentum (PyTorch's defaults, MobileNetV3 eps 1e-3 and
momentum 0.01), squeeze-and-excitation, Hardswish, stochastic depth ("row" mode, identity in eval),
the dropout before the classifier, the width/depth multipliers of EfficientNet-B1..B3, the
``make_divisible`` rounding of channels, and torchvision's weight initialisation.
``tests/test_tvmodels.py`` checks logits, parameter counts and state_dict keys against torchvision 0.29.

Blocks (``net.blocks``), neck and head:

* ResNet: block 0 the stem (``conv1``, ``bn1``, ``relu``, ``maxpool``), blocks 1-4 ``layer1..layer4``;
  neck global average pooling + flatten; head ``fc``.
* MobileNetV2: the entries of ``features`` (stem, 17 inverted residuals, last 1x1 conv); neck pooling,
  flatten, dropout 0.2; head ``classifier.1``.
* MobileNetV3: the entries of ``features``, then one block holding pooling, flatten, ``classifier.0``
  (a Linear) and Hardswish (it has parameters, so it is a block, not the neck); neck dropout 0.2; head
  ``classifier.3``.
* EfficientNet-B0..B3: ``features.0`` .. ``features.8``; neck pooling, flatten, dropout; head
  ``classifier.1``.

Input: ImageNet's per-channel mean and std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`); ``native_size``
is the crop size of torchvision's weights (224; EfficientNet-B1 240, B2 288, B3 300). ``in_shape[0]`` may
be any number of channels (1 for grey images: the stem convolution then takes one channel, and the
normalisation uses the mean of the three channels' statistics); ImageNet weights need 3.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.models.layered import LayeredNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- building blocks ------------------------------------------------------------------------------------


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """The channel rounding of MobileNet and EfficientNet: ``value`` to the nearest multiple of ``divisor``
    (at least ``min_value``, default ``divisor``), one ``divisor`` more if that lost over 10 %."""
    floor = divisor if min_value is None else min_value
    rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvNormAct(nn.Sequential):
    """``Conv2d`` (no bias, padding ``(kernel - 1) // 2``), BatchNorm, then an activation unless ``act`` is
    None: torchvision's ``Conv2dNormActivation`` (state_dict keys ``0.weight``, ``1.*``)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act: Callable[..., nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            norm(cout),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """``x * gate(fc2(act(fc1(avgpool(x)))))`` with 1x1 convolutions ``fc1``/``fc2`` (with bias)."""

    def __init__(
        self,
        channels: int,
        squeeze: int,
        act: Callable[..., nn.Module] = nn.ReLU,
        gate: Callable[..., nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class StochasticDepth(nn.Module):
    """Drops the residual branch at random while training (Huang et al. 2016), as torchvision's
    ``StochasticDepth``: mode ``"row"`` draws one keep/drop per example, ``"batch"`` one for the batch;
    kept branches are scaled by ``1 / (1 - p)``. Identity in eval mode and for ``p == 0``."""

    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"stochastic depth probability must lie in [0, 1], got {p}")
        if mode not in ("row", "batch"):
            raise ValueError(f"stochastic depth mode must be 'row' or 'batch', got {mode!r}")
        self.p = p
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        size = [x.shape[0]] + [1] * (x.dim() - 1) if self.mode == "row" else [1] * x.dim()
        noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(keep)
        if keep > 0.0:
            noise.div_(keep)
        return x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


class ResNetBasicBlock(nn.Module):
    """ResNet-18/34 block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, the shortcut the
    identity or ``downsample`` (1x1 conv with the stride, BatchNorm) when the shape changes."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(cin, planes * self.expansion, stride)

    @property
    def has_skip(self) -> bool:
        """Whether the shortcut is the identity."""
        return self.downsample is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetBottleneck(nn.Module):
    """ResNet-50/101 block (torchvision's "v1.5": the stride sits on the 3x3 convolution): 1x1 reduce,
    3x3, 1x1 expand to ``4 * planes``, each with BatchNorm; ReLU after the sum with the shortcut."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes * self.expansion, stride)

    @property
    def has_skip(self) -> bool:
        """Whether the shortcut is the identity."""
        return self.downsample is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class InvertedResidual(nn.Module):
    """A mobile inverted bottleneck: ``branch(x) (+ x)``; the branch (expansion, depth-wise convolution,
    optional squeeze-excitation, projection) is kept under torchvision's name: ``conv`` in MobileNetV2,
    ``block`` in MobileNetV3 and EfficientNet. ``use_res_connect`` (stride 1, same channels) adds the
    input; EfficientNet's blocks pass the branch through :class:`StochasticDepth` first (``drop``)."""

    def __init__(
        self, layers: Sequence[nn.Module], skip: bool, branch: str = "block", drop: float | None = None
    ) -> None:
        super().__init__()
        self.branch_name = branch
        self.add_module(branch, nn.Sequential(*layers))
        self.use_res_connect = skip
        if drop is not None:
            self.stochastic_depth = StochasticDepth(drop, "row")

    @property
    def has_skip(self) -> bool:
        """Whether the input is added to the branch (an identity shortcut)."""
        return self.use_res_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self, self.branch_name)(x)
        if not self.use_res_connect:
            return out
        if hasattr(self, "stochastic_depth"):
            out = self.stochastic_depth(out)
        return out + x


# ---- the nets ---------------------------------------------------------------------------------------------


class TorchvisionNet(LayeredNet):
    """A LayeredNet with torchvision's ImageNet input: :attr:`native_size` (the crop size of its ImageNet
    weights) and ImageNet's mean/std normalisation (:meth:`LayeredNet.normalize`)."""

    native_size = 224

    def __init__(self, *args, native_size: int = 224, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.native_size = native_size
        c = int(self.in_shape[0])
        if c == 3:
            self.input_mean, self.input_std = IMAGENET_MEAN, IMAGENET_STD
        else:  # grey (or other) inputs: the three channels' statistics averaged
            self.input_mean = (sum(IMAGENET_MEAN) / 3,) * c
            self.input_std = (sum(IMAGENET_STD) / 3,) * c

    def residual_blocks(self) -> list[tuple[int, int | None, nn.Module]]:
        """``(block index, index in the block, module)`` of every residual block with an identity
        shortcut, as :meth:`paramtransfer.models.efficientnet.EfficientNetLite.residual_blocks`. The
        index in the block is ``None`` where block ``i`` is itself the residual block (MobileNet)."""
        found: list[tuple[int, int | None, nn.Module]] = []
        for i, block in enumerate(self.blocks):
            if getattr(block, "has_skip", False):
                found.append((i, None, block))
            elif isinstance(block, nn.Sequential):
                found += [(i, j, sub) for j, sub in enumerate(block) if getattr(sub, "has_skip", False)]
        return found


def _pool_flatten() -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]


def _init(net: nn.Module, linear: str) -> None:
    """torchvision's initialisation: convolutions Kaiming-normal (fan out), biases 0, norms 1/0; linear
    layers ``"default"`` (PyTorch's, ResNet), ``"normal"`` N(0, 0.01) (MobileNet) or ``"uniform"``
    U(+-1/sqrt(out)) (EfficientNet), biases 0. Skipped on the meta device (shapes only)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm) and m.weight is not None and not m.weight.is_meta:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear != "default" and not m.weight.is_meta:
            if linear == "normal":
                nn.init.normal_(m.weight, 0, 0.01)
            else:
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


# ResNet: (block type, blocks per layer)
RESNETS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (ResNetBasicBlock, (2, 2, 2, 2)),
    "resnet34": (ResNetBasicBlock, (3, 4, 6, 3)),
    "resnet50": (ResNetBottleneck, (3, 4, 6, 3)),
    "resnet101": (ResNetBottleneck, (3, 4, 23, 3)),
}


def resnet(arch: str, num_classes: int, in_shape: tuple[int, ...]) -> TorchvisionNet:
    """ResNet (He et al. 2016) as torchvision builds it: 5 blocks (stem, layer1..layer4)."""
    kind, counts = RESNETS[arch]
    stem = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_shape[0], 64, 7, 2, 3, bias=False),
            bn1=nn.BatchNorm2d(64),
            relu=nn.ReLU(inplace=True),
            maxpool=nn.MaxPool2d(3, 2, 1),
        )
    )
    blocks: list[nn.Module] = [stem]
    cin = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
        layer = []
        for r in range(count):
            layer.append(kind(cin, planes, 2 if stage > 0 and r == 0 else 1))
            cin = planes * kind.expansion
        blocks.append(nn.Sequential(*layer))
    net = TorchvisionNet(
        blocks, nn.Linear(cin, num_classes), nn.Sequential(*_pool_flatten()), arch=arch, in_shape=in_shape
    )
    _init(net, "default")
    return net


# MobileNetV2: (expansion t, channels c, repeats n, stride s) per stage
MOBILENET_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def mobilenet_v2(num_classes: int, in_shape: tuple[int, ...] = (3, 224, 224)) -> TorchvisionNet:
    """MobileNetV2 (Sandler et al. 2018), width 1.0: 19 blocks (stem, 17 inverted residuals, 1x1 conv to
    1280), 3.50 M parameters with 1000 classes."""
    relu6 = nn.ReLU6
    cin = make_divisible(32)
    blocks: list[nn.Module] = [ConvNormAct(in_shape[0], cin, 3, 2, act=relu6)]
    for t, c, n, s in MOBILENET_V2_STAGES:
        cout = make_divisible(c)
        for r in range(n):
            stride = s if r == 0 else 1
            hidden = int(round(cin * t))
            layers: list[nn.Module] = []
            if t != 1:
                layers.append(ConvNormAct(cin, hidden, 1, act=relu6))
            layers += [
                ConvNormAct(hidden, hidden, 3, stride, groups=hidden, act=relu6),
                nn.Conv2d(hidden, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            ]
            blocks.append(InvertedResidual(layers, stride == 1 and cin == cout, branch="conv"))
            cin = cout
    last = make_divisible(1280)
    blocks.append(ConvNormAct(cin, last, 1, act=relu6))
    neck = nn.Sequential(*_pool_flatten(), nn.Dropout(0.2))
    net = TorchvisionNet(blocks, nn.Linear(last, num_classes), neck, arch="mobilenet_v2", in_shape=in_shape)
    _init(net, "normal")
    return net


# MobileNetV3: (input, kernel, expanded, output, squeeze-excite, activation, stride) per block
MOBILENET_V3_LARGE = (
    (16, 3, 16, 16, False, "RE", 1),
    (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2),
    (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1),
    (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2),
    (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1),
)
MOBILENET_V3_SMALL = (
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
)
# arch -> (blocks, width of classifier.0)
MOBILENET_V3 = {
    "mobilenet_v3_large": (MOBILENET_V3_LARGE, 1280),
    "mobilenet_v3_small": (MOBILENET_V3_SMALL, 1024),
}


def mobilenet_v3(arch: str, num_classes: int, in_shape: tuple[int, ...]) -> TorchvisionNet:
    """MobileNetV3 (Howard et al. 2019), width 1.0: the ``features`` entries, then a block of pooling,
    ``Linear`` and Hardswish; dropout 0.2 (the neck) before the task layer."""
    plan, last_channel = MOBILENET_V3[arch]
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
    first = make_divisible(plan[0][0])
    blocks: list[nn.Module] = [ConvNormAct(in_shape[0], first, 3, 2, norm=norm, act=nn.Hardswish)]
    for cin, kernel, expanded, cout, se, activation, stride in plan:
        cin, expanded, cout = make_divisible(cin), make_divisible(expanded), make_divisible(cout)
        act = nn.Hardswish if activation == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormAct(cin, expanded, 1, norm=norm, act=act))
        layers.append(ConvNormAct(expanded, expanded, kernel, stride, groups=expanded, norm=norm, act=act))
        if se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4), gate=nn.Hardsigmoid))
        layers.append(ConvNormAct(expanded, cout, 1, norm=norm, act=None))
        blocks.append(InvertedResidual(layers, stride == 1 and cin == cout, branch="block"))
    cin = make_divisible(plan[-1][3])
    blocks.append(ConvNormAct(cin, 6 * cin, 1, norm=norm, act=nn.Hardswish))
    last = make_divisible(last_channel)
    blocks.append(nn.Sequential(*_pool_flatten(), nn.Linear(6 * cin, last), nn.Hardswish(inplace=True)))
    net = TorchvisionNet(blocks, nn.Linear(last, num_classes), nn.Dropout(0.2), arch=arch, in_shape=in_shape)
    _init(net, "normal")
    return net


# EfficientNet-B0 stages: (expand ratio, kernel, stride, input channels, output channels, layers)
EFFICIENTNET_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
# arch -> (width multiplier, depth multiplier, dropout, native size = crop size of torchvision's weights)
EFFICIENTNETS = {
    "efficientnet_b0": (1.0, 1.0, 0.2, 224),
    "efficientnet_b1": (1.0, 1.1, 0.2, 240),
    "efficientnet_b2": (1.1, 1.2, 0.3, 288),
    "efficientnet_b3": (1.2, 1.4, 0.3, 300),
}
STOCHASTIC_DEPTH = 0.2  # the drop probability of the last MBConv, growing linearly from 0 at the first


def efficientnet(arch: str, num_classes: int, in_shape: tuple[int, ...]) -> TorchvisionNet:
    """EfficientNet-B0..B3 (Tan & Le 2019) as torchvision builds them: 9 blocks (stem, 7 MBConv stages,
    1x1 conv to 4x the last stage's channels), SiLU, squeeze-excitation, stochastic depth."""
    width, depth, dropout, size = EFFICIENTNETS[arch]
    stages = [
        (t, k, s, make_divisible(cin * width), make_divisible(cout * width), int(math.ceil(n * depth)))
        for t, k, s, cin, cout, n in EFFICIENTNET_STAGES
    ]
    silu = nn.SiLU
    blocks: list[nn.Module] = [ConvNormAct(in_shape[0], stages[0][3], 3, 2, act=silu)]
    total = sum(stage[-1] for stage in stages)
    done = 0
    for t, k, s, cin, cout, n in stages:
        stage = []
        for r in range(n):
            cin_r, stride = (cin, s) if r == 0 else (cout, 1)
            expanded = make_divisible(cin_r * t)
            layers: list[nn.Module] = []
            if expanded != cin_r:
                layers.append(ConvNormAct(cin_r, expanded, 1, act=silu))
            layers += [
                ConvNormAct(expanded, expanded, k, stride, groups=expanded, act=silu),
                SqueezeExcitation(expanded, max(1, cin_r // 4), act=partial(nn.SiLU, inplace=True)),
                ConvNormAct(expanded, cout, 1, act=None),
            ]
            drop = STOCHASTIC_DEPTH * done / total
            stage.append(InvertedResidual(layers, stride == 1 and cin_r == cout, "block", drop))
            done += 1
        blocks.append(nn.Sequential(*stage))
    last_in = stages[-1][4]
    blocks.append(ConvNormAct(last_in, 4 * last_in, 1, act=silu))
    neck = nn.Sequential(*_pool_flatten(), nn.Dropout(dropout))
    net = TorchvisionNet(
        blocks, nn.Linear(4 * last_in, num_classes), neck, arch=arch, in_shape=in_shape, native_size=size
    )
    _init(net, "uniform")
    return net


# ---- the zoo's factories and the checkpoint conversion -------------------------------------------------


def _factory(arch: str, build: Callable[[str, int, tuple[int, ...]], TorchvisionNet], size: int):
    def factory(num_classes: int, in_shape: tuple[int, ...] = (3, size, size)) -> LayeredNet:
        return build(arch, num_classes, tuple(in_shape))

    factory.__name__ = arch
    factory.__doc__ = f"torchvision's {arch} as a LayeredNet (see :mod:`paramtransfer.models.tvmodels`)."
    return factory


TORCHVISION_ARCHS: dict[str, Callable[..., LayeredNet]] = {
    **{a: _factory(a, resnet, 224) for a in RESNETS},
    "mobilenet_v2": mobilenet_v2,
    **{a: _factory(a, mobilenet_v3, 224) for a in MOBILENET_V3},
    **{a: _factory(a, efficientnet, EFFICIENTNETS[a][3]) for a in EFFICIENTNETS},
}


def native_size(arch: str) -> int:
    """The input size of ``arch``'s torchvision ImageNet weights (their crop size)."""
    return EFFICIENTNETS[arch][3] if arch in EFFICIENTNETS else 224


def head_key(arch: str) -> str:
    """The torchvision name of ``arch``'s task layer weight (its rows are the classes)."""
    if arch in RESNETS:
        return "fc.weight"
    return "classifier.3.weight" if arch in MOBILENET_V3 else "classifier.1.weight"


def stem_key(arch: str) -> str:
    """The torchvision name of ``arch``'s first convolution weight (its columns are the input channels)."""
    return "conv1.weight" if arch in RESNETS else "features.0.0.weight"


def _rename(arch: str, name: str, last_block: int) -> str | None:
    """One torchvision key -> this module's name, or None if ``arch`` has no such key."""
    first, _, rest = name.partition(".")
    if arch in RESNETS:
        if first in ("conv1", "bn1"):
            return f"blocks.0.{name}"
        if first in ("layer1", "layer2", "layer3", "layer4") and rest:
            return f"blocks.{first[-1]}.{rest}"
        return f"head.{rest}" if first == "fc" and rest in ("weight", "bias") else None
    if first == "features" and rest:
        return f"blocks.{rest}"
    head = "3" if arch in MOBILENET_V3 else "1"
    index, _, leaf = rest.partition(".")
    if first == "classifier" and leaf in ("weight", "bias"):
        if index == head:
            return f"head.{leaf}"
        if index == "0" and arch in MOBILENET_V3:
            return f"blocks.{last_block}.2.{leaf}"
    return None


def convert_torchvision(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ``state_dict`` of ``arch`` -> this module's names (``conv1.weight`` ->
    ``blocks.0.conv1.weight``, ``layer2.0.conv1.weight`` -> ``blocks.2.0.conv1.weight``, ``fc.weight`` ->
    ``head.weight``, ``features.3.block.0.0.weight`` -> ``blocks.3.block.0.0.weight``), checked against the
    architecture: every tensor known, none missing, each of the right shape. The number of classes and
    of input channels are the checkpoint's own. BatchNorm's ``num_batches_tracked`` may be absent (older
    checkpoints lack it); it is then 0.

    Raises:
        UserError: ``arch`` is not one of :data:`TORCHVISION_ARCHS`, or the state_dict does not fit it (the
            message names the first unknown, missing or mis-shaped tensor).
    """
    if arch not in TORCHVISION_ARCHS:
        raise UserError(f"unknown torchvision arch {arch!r}; known: {', '.join(TORCHVISION_ARCHS)}")
    for key, what in ((head_key(arch), "task layer"), (stem_key(arch), "first convolution")):
        tensor = state.get(key)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
            raise UserError(
                f"the state_dict is not a torchvision {arch}: it lacks the {what} {key}; give the weights "
                f"of a torchvision {arch} (or the torchvision arch they belong to)"
            )
    num_classes, channels = int(state[head_key(arch)].shape[0]), int(state[stem_key(arch)].shape[1])
    size = native_size(arch)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        expected = TORCHVISION_ARCHS[arch](num_classes, in_shape=(channels, size, size)).state_dict()
    last_block = max(int(k.split(".")[1]) for k in expected if k.startswith("blocks."))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        new = _rename(arch, name, last_block)
        if new is None or new not in expected:
            raise UserError(
                f"the state_dict has a tensor {name!r} that torchvision's {arch} does not have; give the "
                f"weights of a torchvision {arch}"
            )
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"the state_dict's {name!r} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != tuple(expected[new].shape):
            raise UserError(
                f"the state_dict's {name} has shape {list(tensor.shape)}, but torchvision's {arch} needs "
                f"{list(expected[new].shape)}; give the weights of a torchvision {arch}"
            )
        out[new] = tensor
    for new in expected:
        if new not in out:
            if not new.endswith("num_batches_tracked"):
                raise UserError(
                    f"the state_dict lacks {_original(arch, new, last_block)}, which torchvision's {arch} "
                    f"has; give the complete weights of a torchvision {arch}"
                )
            out[new] = torch.zeros((), dtype=torch.long)
    return out


def _original(arch: str, new: str, last_block: int) -> str:
    """This module's tensor name -> torchvision's (for messages)."""
    rest = new.partition(".")[2]
    if new.startswith("head."):
        return ("fc." if arch in RESNETS else f"{head_key(arch).rsplit('.', 1)[0]}.") + rest
    index, _, leaf = rest.partition(".")
    if arch in RESNETS:
        return leaf if index == "0" else f"layer{index}.{leaf}"
    if arch in MOBILENET_V3 and int(index) == last_block:
        return f"classifier.0.{leaf.partition('.')[2]}"
    return f"features.{rest}"
