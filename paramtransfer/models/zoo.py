"""The model zoo: lenet, resnet20, mobilenet, rnn, efficientnet_lite0 and torchvision's ImageNet
architectures (resnet18/34/50/101, mobilenet_v2, mobilenet_v3_small/large, efficientnet_b0..b3, see
:mod:`paramtransfer.models.tvmodels`) as LayeredNets, registered by name.

:func:`build_model` checks the options before it builds (a saved ``meta.json`` or a ``--set arch.NAME=V``
can ask for anything): only an architecture's own options, integers that are positive, an input shape of
at most :data:`MAX_INPUT_ELEMENTS` values, and at most :data:`MAX_PARAMS` parameters, counted on the
``meta`` device (shapes only, nothing allocated). A factory therefore must not need real values while it
builds: it computes shapes with arithmetic and skips weight initialisation on ``meta`` tensors.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.models.efficientnet import efficientnet_lite0
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.tvmodels import TORCHVISION_ARCHS
from paramtransfer.registry import Registry

MODELS: Registry[Callable[..., LayeredNet]] = Registry("arch")

# A zoo net above a billion parameters (4 GB of float32 weights, 3x that while training with momentum) is a
# typo or a corrupt meta.json on the machines this library targets; the largest sensible zoo settings
# (e.g. resnet20 width=64 depth=110) have tens of millions.
MAX_PARAMS = 1_000_000_000
# Inputs up to 4M values per example (3 x 1024 x 1024 fits); larger ones are refused before building.
MAX_INPUT_ELEMENTS = 1 << 22


@MODELS.register("lenet")
def lenet(
    num_classes: int, in_shape: tuple[int, ...] = (1, 28, 28), width: int = 32, hidden: int = 256
) -> LayeredNet:
    """LeNet-like 5-layer CNN (PTU paper, setting S1): conv-conv-fc-fc blocks, then the task layer."""
    c, h, w = in_shape
    convs: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(c, width, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(width, 2 * width, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
    ]
    # two (5x5 valid convolution, 2x2 max-pool) stages, computed rather than run (see the module doc)
    h2, w2 = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    if h2 < 1 or w2 < 1:
        raise UserError(f"lenet needs inputs of at least 16x16 pixels, got {h}x{w}; use in_shape=(C, 28, 28)")
    flat = 2 * width * h2 * w2
    blocks = [
        *convs,
        nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(inplace=True)),
        nn.Sequential(nn.Linear(hidden, hidden // 2), nn.ReLU(inplace=True)),
    ]
    return LayeredNet(
        blocks,
        nn.Linear(hidden // 2, num_classes),
        arch="lenet",
        in_shape=in_shape,
        arch_kwargs={"width": width, "hidden": hidden},
    )


class StridedPointwise(nn.Conv2d):
    """A 1x1 convolution with a stride, computed as subsampling then a 1x1 convolution (same result,
    same parameters as ``nn.Conv2d(cin, cout, 1, stride)``).

    Why: with torch 2.13's CPU build, the weight gradient of a strided 1x1 convolution in channels-last
    format corrupts the heap for some shapes (e.g. 8 -> 16 channels at 28x28 with a batch of 25, two
    threads); the subsampled form takes another oneDNN path and is safe.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return F.conv2d(x[:, :, :: s[0], :: s[1]], self.weight, self.bias)


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block: ``relu(residual(x) + shortcut(x))``.

    ``residual`` (conv-bn-relu-conv-bn) and ``shortcut`` (identity, or 1x1 conv-bn when the shape
    changes) are separate attributes so that routing methods (SpotTune) can combine copies of them.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(StridedPointwise(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


class GlobalPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@MODELS.register("resnet20")
def resnet20(
    num_classes: int, in_shape: tuple[int, ...] = (1, 28, 28), width: int = 16, depth: int = 20
) -> LayeredNet:
    """CIFAR-style ResNet (He et al. 2016): a stem, 3 stages x n basic blocks (n = (depth-2)/6)."""
    if (depth - 2) % 6:
        raise UserError(f"resnet depth must be 6n+2 (20, 32, 44, ...), got {depth}")
    n = (depth - 2) // 6
    blocks: list[nn.Module] = [
        nn.Sequential(
            nn.Conv2d(in_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
    ]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for i in range(n):
            blocks.append(BasicBlock(cin, cout, stride=2 if stage > 0 and i == 0 else 1))
            cin = cout
    for m in nn.ModuleList(blocks).modules():
        if isinstance(m, nn.Conv2d) and not m.weight.is_meta:  # meta: only counting parameters
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return LayeredNet(
        blocks,
        nn.Linear(cin, num_classes),
        GlobalPool(),
        arch="resnet20",
        in_shape=in_shape,
        arch_kwargs={"width": width, "depth": depth},
    )


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


@MODELS.register("mobilenet")
def mobilenet(num_classes: int, in_shape: tuple[int, ...] = (1, 28, 28), width: int = 16) -> LayeredNet:
    """A small MobileNetV1-style net (Howard et al. 2017): a stem and 6 depth-wise separable blocks."""
    w = width
    plan = [
        (w, 2 * w, 2),
        (2 * w, 4 * w, 1),
        (4 * w, 4 * w, 2),
        (4 * w, 8 * w, 1),
        (8 * w, 8 * w, 1),
        (8 * w, 8 * w, 1),
    ]
    blocks: list[nn.Module] = [
        nn.Sequential(
            nn.Conv2d(in_shape[0], w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        )
    ]
    blocks += [_separable(cin, cout, s) for cin, cout, s in plan]
    return LayeredNet(
        blocks,
        nn.Linear(8 * w, num_classes),
        GlobalPool(),
        arch="mobilenet",
        in_shape=in_shape,
        arch_kwargs={"width": width},
    )


class RowRNN(nn.Module):
    """Reads an image row by row (rows are time steps) and returns the last hidden state.

    ``cell_step`` exposes one step with the same weights, for methods that combine hidden states
    step by step (PTU-RNN).

    Shape:
        ``[B, C, H, W] -> [B, hidden]``, with ``H`` steps of ``C*W`` inputs each.
    """

    def __init__(self, input_size: int, hidden: int = 128, cell: str = "gru") -> None:
        super().__init__()
        kinds = {"rnn": nn.RNN, "gru": nn.GRU}
        if cell not in kinds:
            raise UserError(f"unknown rnn cell {cell!r}; use one of {', '.join(kinds)}")
        self.cell = cell
        self.hidden = hidden
        self.rnn = kinds[cell](input_size, hidden, batch_first=True)

    @staticmethod
    def as_sequence(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 1, 3).flatten(2)  # [B, H, C*W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(self.as_sequence(x))
        return h[-1]

    def cell_step(self, x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One time step: ``[B, input] x [B, hidden] -> [B, hidden]``."""
        r = self.rnn
        args = (x_t, h, r.weight_ih_l0, r.weight_hh_l0, r.bias_ih_l0, r.bias_hh_l0)
        return torch.gru_cell(*args) if self.cell == "gru" else torch.rnn_tanh_cell(*args)


@MODELS.register("rnn")
def rnn(
    num_classes: int, in_shape: tuple[int, ...] = (1, 28, 28), hidden: int = 128, cell: str = "gru"
) -> LayeredNet:
    """A recurrent classifier with ``hidden`` units over image rows (PTU paper, RNN experiments)."""
    c, _, w = in_shape
    return LayeredNet(
        [RowRNN(c * w, hidden, cell)],
        nn.Linear(hidden, num_classes),
        arch="rnn",
        in_shape=in_shape,
        arch_kwargs={"hidden": hidden, "cell": cell},
    )


# EfficientNet-Lite0 (ImageNet weights: source ``imagenet``, see :mod:`paramtransfer.models.imagenet`)
MODELS.register("efficientnet_lite0")(efficientnet_lite0)

# torchvision's architectures (weights: the source ``torchvision:ARCH`` with a local state_dict file)
for _arch, _factory in TORCHVISION_ARCHS.items():
    MODELS.register(_arch)(_factory)


def _is_positive_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def _options(arch: str) -> dict[str, Any]:
    """An architecture's options and their defaults, from its factory's signature."""
    return {
        name: p.default
        for name, p in inspect.signature(MODELS.get(arch)).parameters.items()
        if name not in ("num_classes", "in_shape") and p.kind is p.POSITIONAL_OR_KEYWORD
    }


def _input_problem(num_classes: Any, in_shape: Any) -> str | None:
    if not _is_positive_int(num_classes):
        return f"num_classes must be a positive integer, got {num_classes!r}"
    if (
        not isinstance(in_shape, (tuple, list))
        or len(in_shape) != 3
        or not all(_is_positive_int(v) for v in in_shape)
    ):
        return f"in_shape must be 3 positive integers (C, H, W), got {in_shape!r}"
    if int(in_shape[0]) * int(in_shape[1]) * int(in_shape[2]) > MAX_INPUT_ELEMENTS:
        return f"in_shape {tuple(in_shape)} has more than {MAX_INPUT_ELEMENTS} values per example"
    return None


def _options_problem(
    arch: str, num_classes: int, in_shape: tuple[int, ...], kwargs: dict[str, Any]
) -> str | None:
    defaults = _options(arch)
    for name, value in kwargs.items():
        if name not in defaults:
            return f"{arch} has no option {name!r} (its options: {', '.join(defaults)})"
        default = defaults[name]
        if isinstance(default, int) and not isinstance(default, bool) and not _is_positive_int(value):
            return f"{arch} option {name}={value!r} must be a positive integer"
        if isinstance(default, str) and not isinstance(value, str):
            return f"{arch} option {name}={value!r} must be a string"
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            skeleton = MODELS.get(arch)(num_classes, in_shape=tuple(in_shape), **kwargs)
    except UserError:
        raise
    except (TypeError, ValueError, RuntimeError) as err:  # e.g. a layer that cannot take this shape
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"{arch} cannot be built with {kwargs or 'its defaults'} for inputs {tuple(in_shape)}: {first}"
    count = sum(p.numel() for p in skeleton.parameters())
    if count > MAX_PARAMS:
        options = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "its defaults"
        return f"{arch} with {options} would have {count:.3g} parameters, above the limit of {MAX_PARAMS:.0e}"
    return None


def arch_problem(arch: str, num_classes: Any, in_shape: Any, kwargs: dict[str, Any]) -> str | None:
    """What is wrong with building ``arch`` with these settings (a phrase without a cure), or ``None``.

    Cheap: option names and types are read from the factory's signature (an option whose default is an
    integer must be a positive integer, one whose default is a string a string), and the parameter count
    comes from a build on the ``meta`` device, which allocates nothing (refused above :data:`MAX_PARAMS`).
    A factory's own :class:`UserError` (e.g. a ResNet depth that is not 6n+2) propagates.
    """
    if arch not in MODELS:
        return f"unknown arch {arch!r} (known: {', '.join(MODELS.names())})"
    return _input_problem(num_classes, in_shape) or _options_problem(arch, num_classes, in_shape, kwargs)


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int | None = None,
    *,
    in_shape: tuple[int, ...] | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> LayeredNet:
    """Build a zoo architecture as a LayeredNet.

    Args:
        arch: ``lenet``, ``resnet20``, ``mobilenet``, ``rnn``, ``efficientnet_lite0`` or one of
            torchvision's (``resnet18``, ``mobilenet_v2``, ``efficientnet_b0``, ...; see :func:`list_models`).
        num_classes: size of the task layer.
        in_channels: input channels (shortcut for ``in_shape=(C, 28, 28)``).
        in_shape: full input shape ``(C, H, W)``; default ``(1, 28, 28)``.
        seed: if given, the initial weights depend only on it (the global RNG is left untouched).
        kwargs: architecture options (``width``, ``hidden``, ``depth``, ``cell``).

    Raises:
        UserError: unknown options, options of the wrong type, or a net above :data:`MAX_PARAMS`
            parameters (checked before anything is allocated, see :func:`arch_problem`).
    """
    factory = MODELS.get(arch)
    if isinstance(num_classes, numbers.Integral) and num_classes < 1:
        raise UserError(f"num_classes must be at least 1 (got {num_classes})")
    shape = tuple(in_shape) if in_shape is not None else (in_channels or 1, 28, 28)
    problem = _input_problem(num_classes, shape)
    if problem is not None:
        raise UserError(f"{problem}; e.g. num_classes=5, in_shape=(1, 28, 28)")
    problem = _options_problem(arch, num_classes, shape, kwargs)
    if problem is not None:
        example = " ".join(f"arch.{k}={v}" for k, v in _options(arch).items())
        raise UserError(
            f"bad option for arch {arch!r}: {problem}; pass options that {arch} takes, within the limits "
            f"(its defaults: {example})"
        )
    if seed is None:
        return factory(num_classes, in_shape=shape, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(num_classes, in_shape=shape, **kwargs)


def list_models() -> list[str]:
    return MODELS.names()
