"""Make ``tests/data/torchvision_reference.json``: what real torchvision computes, for test_tvmodels.py.

Our torchvision-format architectures (:mod:`paramtransfer.models.tvmodels`) are written without torchvision
(it cannot be imported beside our torch build). This script records, with real torchvision, what they must
reproduce, for every architecture the zoo has:

* the state_dict's keys and shapes (zlib + base64 of ``name:shape`` lines, in state_dict order);
* the parameter count (1000 classes), the number of residual blocks with an identity shortcut, the
  crop size of the DEFAULT ImageNet weights, every BatchNorm's (eps, momentum), the dropout and
  stochastic-depth probabilities in module order;
* the initialisation: sums of torchvision's initial weights after ``torch.manual_seed(0)``;
* one training-mode forward (dropout, stochastic depth, BatchNorm batch statistics) after
  ``torch.manual_seed(1)``: its logits and the BatchNorm running means it leaves;
* eval-mode logits for two fixed inputs (``x40``: 2x3x40x40, ``x33``: 1x3x33x33, odd for the padding and
  pooling arithmetic), with weights that do not depend on torchvision's initialisation or on the random
  number generator: every tensor of the state_dict is :func:`fill`-ed from its name and shape, so the
  test fills our net's (converted) state_dict the same way without torchvision.

The logits are computed in float64. These weights are not trained, so activations grow through the
layers, and where they meet a bounded gate (the sigmoid of squeeze-excitation, Hardsigmoid) a rounding
difference is amplified: in float32, merely running EfficientNet-B3 on 2 threads instead of 1 changes its
logits by 30 % of their scale. In float64 the same amplification leaves them equal to ~1e-10, so the test
can demand agreement to 1e-6 on any machine, and any layer that differs shows.

Run it in a throwaway environment that has torchvision (nothing is downloaded at run time; the
architectures are built without weights)::

    python3 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy safetensors
    OMP_NUM_THREADS=1 /tmp/tvenv/bin/python tests/data/make_torchvision_reference.py

The test imports :func:`fill`, :func:`inputs` and :func:`decode_keys` from this file, so this module
imports nothing but torch and the standard library at the top.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from pathlib import Path

import torch

ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
)
NUM_CLASSES = 1000
FIRST = 8  # logits recorded in full per example (the rest through the sums)
OUT = Path(__file__).with_name("torchvision_reference.json")


def fill(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A deterministic tensor for the state_dict entry ``name`` of ``shape``, noise-like values in [-1, 1]
    (``frac(sin(k * 12.9898 + phase) * 43758.5453)``, a classic hash, with the phase the crc32 of the
    name), computed in float64 so that any torch gives the same float32 values.

    Scales keep a deep net's activations finite: convolution and linear weights uniform with He's
    variance ``2 / fan_in``, norm weights 1 +- 0.2, biases and running means within +-0.1, running
    variances in [0.3, 1.3]."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.tensor(0, dtype=torch.long)
    k = torch.arange(math.prod(shape), dtype=torch.float64)
    phase = zlib.crc32(name.encode()) % 1000
    noise = (torch.frac(torch.sin(k * 12.9898 + phase).abs() * 43758.5453) * 2 - 1).reshape(shape)
    if leaf == "running_var":
        out = 0.8 + 0.5 * noise
    elif leaf == "running_mean":
        out = 0.1 * noise
    elif len(shape) == 1:
        out = 1.0 + 0.2 * noise if leaf == "weight" else 0.1 * noise
    else:
        out = noise * math.sqrt(6.0 / math.prod(shape[1:]))
    return out.to(torch.float32)


def inputs() -> dict[str, torch.Tensor]:
    """The fixed inputs the logits are recorded for."""

    def wave(shape: tuple[int, ...], speed: float) -> torch.Tensor:
        t = torch.arange(math.prod(shape), dtype=torch.float64)
        return (torch.sin(t * speed) + 0.5 * torch.cos(t * 0.013)).reshape(shape).to(torch.float32)

    return {"x40": wave((2, 3, 40, 40), 0.61), "x33": wave((1, 3, 33, 33), 0.29)}


def summarize(logits: torch.Tensor) -> dict[str, object]:
    """What is stored of a batch of logits: the first ones, their sum, a position-weighted sum (catches
    permuted classes) and the largest magnitude (the scale the test's tolerance is relative to)."""
    weights = torch.cos(torch.arange(logits.shape[1], dtype=torch.float64) * 0.7)
    return {
        "first": logits[:, :FIRST].tolist(),
        "sum": logits.double().sum().item(),
        "weighted": (logits.double() * weights).sum().item(),
        "absmax": logits.abs().max().item(),
    }


def weight_sums(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sums over every floating tensor of a state_dict (float64): of the values, of their magnitudes."""
    floats = [v.double() for v in state.values() if v.is_floating_point()]
    return {"sum": sum(v.sum().item() for v in floats), "abssum": sum(v.abs().sum().item() for v in floats)}


def encode_keys(state: dict[str, torch.Tensor]) -> str:
    text = "\n".join(f"{k}:{','.join(str(d) for d in v.shape)}" for k, v in state.items())
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode()


def decode_keys(blob: str) -> list[tuple[str, tuple[int, ...]]]:
    """The ``(name, shape)`` list that :func:`encode_keys` stored."""
    text = zlib.decompress(base64.b64decode(blob)).decode()
    out = []
    for line in text.splitlines():
        name, _, dims = line.rpartition(":")
        out.append((name, tuple(int(d) for d in dims.split(",") if d)))
    return out


def describe(arch: str) -> dict[str, object]:
    import torchvision
    from torchvision.models import get_model, get_model_weights
    from torchvision.models.efficientnet import MBConv
    from torchvision.models.mobilenetv2 import InvertedResidual as V2Residual
    from torchvision.models.mobilenetv3 import InvertedResidual as V3Residual
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.ops import StochasticDepth

    torch.manual_seed(0)
    model = get_model(arch, weights=None, num_classes=NUM_CLASSES).eval()
    state = model.state_dict()
    init = weight_sums(state)
    model.load_state_dict({k: fill(k, tuple(v.shape)) for k, v in state.items()})
    model.double()
    with torch.no_grad():
        torch.manual_seed(1)
        train = {"logits": summarize(model.train()(inputs()["x40"].double()))}
        train["running_mean"] = sum(
            v.sum().item() for k, v in model.state_dict().items() if "running_mean" in k
        )
        model.eval().load_state_dict({k: fill(k, tuple(v.shape)) for k, v in state.items()})
    residual = 0
    for m in model.modules():
        if isinstance(m, BasicBlock | Bottleneck):
            residual += m.downsample is None
        elif isinstance(m, V2Residual | V3Residual | MBConv):
            residual += bool(m.use_res_connect)
    norms: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            key = f"{m.eps:g},{m.momentum:g}"
            norms[key] = norms.get(key, 0) + 1
    with torch.no_grad():
        logits = {name: summarize(model(x.double())) for name, x in inputs().items()}
    weights = get_model_weights(arch).DEFAULT
    return {
        "keys": encode_keys(state),
        "params": sum(p.numel() for p in model.parameters()),
        "residual_blocks": residual,
        "native_size": int(weights.transforms().crop_size[0]),
        "batchnorm": norms,
        "dropout": [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)],
        "stochastic_depth": [m.p for m in model.modules() if isinstance(m, StochasticDepth)],
        "logits": logits,
        "init": init,
        "train": train,
        "torchvision": torchvision.__version__,
    }


def main() -> None:
    torch.set_num_threads(1)
    reference = {
        "torch": torch.__version__,
        "dtype": "float64",
        "archs": {arch: describe(arch) for arch in ARCHS},
    }
    OUT.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
