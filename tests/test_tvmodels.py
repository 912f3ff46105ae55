"""torchvision's architectures in the zoo (paramtransfer.models.tvmodels), checked against real torchvision.

``tests/data/torchvision_reference.json`` was recorded with torchvision 0.29.1 by
``tests/data/make_torchvision_reference.py`` (see there): state_dict keys and shapes, parameter counts,
residual blocks, BatchNorm settings, dropout and stochastic depth, and eval-mode logits for weights that
are a deterministic function of each tensor's name and shape. Here the same weights, converted with
:func:`convert_torchvision`, must give the same logits in our nets (in float64, to 1e-6 of their
scale): any layer that differs fails.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.store import load_model, save_model
from paramtransfer.models.tvmodels import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCHVISION_ARCHS,
    InvertedResidual,
    StochasticDepth,
    convert_torchvision,
    make_divisible,
)
from paramtransfer.models.zoo import arch_problem, build_model, list_models

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "torchvision_reference.json").read_text())["archs"]
_spec = importlib.util.spec_from_file_location("make_tv_reference", DATA / "make_torchvision_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

ARCHS = list(TORCHVISION_ARCHS)
RTOL = 1e-6  # of the largest logit's magnitude, in float64 (see make_torchvision_reference.py)


def torchvision_state(arch: str) -> dict[str, torch.Tensor]:
    """The torchvision-named state_dict that the reference used: every recorded key, filled."""
    return {name: ref.fill(name, shape) for name, shape in ref.decode_keys(REFERENCE[arch]["keys"])}


def loaded(arch: str) -> LayeredNet:
    size = REFERENCE[arch]["native_size"]
    net = build_model(arch, 1000, in_shape=(3, size, size))
    net.load_state_dict(convert_torchvision(arch, torchvision_state(arch)))
    return net.eval().double()


def test_every_reference_arch_is_in_the_zoo():
    assert sorted(REFERENCE) == sorted(ARCHS)
    assert set(ARCHS) <= set(list_models())


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_torchvision(arch):
    net = loaded(arch)
    with torch.no_grad():
        for name, x in ref.inputs().items():
            want = REFERENCE[arch]["logits"][name]
            got = ref.summarize(net(x.double()))
            scale = want["absmax"]
            first = torch.tensor(got["first"]) - torch.tensor(want["first"])
            assert first.abs().max().item() <= RTOL * scale, (arch, name, first.abs().max().item(), scale)
            assert got["absmax"] == pytest.approx(scale, rel=RTOL)
            # sums over 1000 classes: the tolerance grows with the number of logits summed
            n = len(want["first"]) * 1000
            for key in ("sum", "weighted"):
                assert abs(got[key] - want[key]) <= RTOL * scale * n**0.5, (arch, name, key)


@pytest.mark.parametrize("arch", ARCHS)
def test_initialisation_and_training_mode_equal_torchvision(arch):
    """With the same seeds: torchvision's initial weights, and one training-mode forward (dropout,
    stochastic depth, batch statistics) with the same logits and the same BatchNorm running means."""
    want = REFERENCE[arch]
    size = want["native_size"]
    init = ref.weight_sums(build_model(arch, 1000, in_shape=(3, size, size), seed=0).state_dict())
    assert init["sum"] == pytest.approx(want["init"]["sum"], rel=1e-6, abs=1e-3)
    assert init["abssum"] == pytest.approx(want["init"]["abssum"], rel=1e-6)
    net = loaded(arch).train()
    with torch.no_grad():
        torch.manual_seed(1)
        got = ref.summarize(net(ref.inputs()["x40"].double()))
    scale = want["train"]["logits"]["absmax"]
    first = torch.tensor(got["first"]) - torch.tensor(want["train"]["logits"]["first"])
    assert first.abs().max().item() <= RTOL * scale, (arch, first.abs().max().item(), scale)
    running = sum(v.sum().item() for k, v in net.state_dict().items() if "running_mean" in k)
    assert running == pytest.approx(want["train"]["running_mean"], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_structure_equals_torchvision(arch):
    want = REFERENCE[arch]
    net = build_model(arch, 1000, in_shape=(3, want["native_size"], want["native_size"]))
    assert sum(p.numel() for p in net.parameters()) == want["params"]
    assert len(net.residual_blocks()) == want["residual_blocks"]
    assert all(m.has_skip for _, _, m in net.residual_blocks())
    assert net.native_size == want["native_size"]
    norms: dict[str, int] = {}
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            key = f"{m.eps:g},{m.momentum:g}"
            norms[key] = norms.get(key, 0) + 1
    assert norms == want["batchnorm"]
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == want["dropout"]
    assert [m.p for m in net.modules() if isinstance(m, StochasticDepth)] == pytest.approx(
        want["stochastic_depth"]
    )
    assert all(m.mode == "row" for m in net.modules() if isinstance(m, StochasticDepth))
    assert net.input_stats() == (IMAGENET_MEAN, IMAGENET_STD)
    assert not list(net.neck.parameters())  # parameter-free: everything with weights is a block or the head


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_keys_are_exactly_ours(arch):
    want = REFERENCE[arch]
    size = want["native_size"]
    ours = build_model(arch, 1000, in_shape=(3, size, size)).state_dict()
    converted = convert_torchvision(arch, torchvision_state(arch))
    assert list(converted) == list(ours)  # same names, same order: nothing missing, nothing unexpected
    assert all(converted[k].shape == ours[k].shape for k in ours)


def test_key_names():
    state = convert_torchvision("resnet18", torchvision_state("resnet18"))
    for name in ("blocks.0.conv1.weight", "blocks.2.0.conv1.weight", "blocks.2.0.downsample.0.weight"):
        assert name in state
    assert torch.equal(state["head.weight"], ref.fill("fc.weight", (1000, 512)))
    v3 = convert_torchvision("mobilenet_v3_small", torchvision_state("mobilenet_v3_small"))
    assert torch.equal(v3["blocks.13.2.weight"], ref.fill("classifier.0.weight", (1024, 576)))
    assert torch.equal(v3["head.bias"], ref.fill("classifier.3.bias", (1000,)))
    eff = convert_torchvision("efficientnet_b0", torchvision_state("efficientnet_b0"))
    assert "blocks.2.1.block.2.fc1.weight" in eff  # squeeze-excitation of stage 2's second MBConv


def test_old_checkpoints_without_num_batches_tracked_load():
    state = {k: v for k, v in torchvision_state("resnet18").items() if "num_batches_tracked" not in k}
    converted = convert_torchvision("resnet18", state)
    assert int(converted["blocks.0.bn1.num_batches_tracked"]) == 0
    build_model("resnet18", 1000, in_shape=(3, 64, 64)).load_state_dict(converted)


def test_conversion_errors_name_the_tensor():
    state = torchvision_state("resnet18")
    with pytest.raises(UserError, match="unknown torchvision arch 'resnet19'.*resnet18"):
        convert_torchvision("resnet19", state)
    with pytest.raises(UserError, match="'layer5.0.conv1.weight'"):
        convert_torchvision("resnet18", {**state, "layer5.0.conv1.weight": torch.zeros(1)})
    missing = {k: v for k, v in state.items() if k != "layer3.1.bn2.running_var"}
    with pytest.raises(UserError, match=r"lacks layer3\.1\.bn2\.running_var"):
        convert_torchvision("resnet18", missing)
    with pytest.raises(UserError, match=r"layer1\.0\.conv1\.weight has shape \[64, 64, 1, 1\]"):
        convert_torchvision("resnet18", {**state, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)})
    with pytest.raises(UserError, match="lacks the task layer fc.weight"):
        convert_torchvision("resnet18", torchvision_state("mobilenet_v2"))
    # resnet34's weights are not resnet18's: the first extra block is named
    with pytest.raises(UserError, match="'layer1.2.conv1.weight'"):
        convert_torchvision("resnet18", torchvision_state("resnet34"))


def test_another_number_of_classes():
    state = torchvision_state("mobilenet_v2")
    state["classifier.1.weight"] = state["classifier.1.weight"][:7]
    state["classifier.1.bias"] = state["classifier.1.bias"][:7]
    net = build_model("mobilenet_v2", 7, in_shape=(3, 64, 64))
    net.load_state_dict(convert_torchvision("mobilenet_v2", state))
    assert net.num_classes == 7


@pytest.mark.parametrize("arch", ARCHS)
def test_grey_input_and_blocks(arch):
    net = build_model(arch, 5, in_shape=(1, 40, 40), seed=0).eval()
    mean, std = net.input_stats()
    assert len(mean) == len(std) == 1
    with torch.no_grad():
        logits, feats = net.forward_features(torch.rand(2, 1, 40, 40))
    assert logits.shape == (2, 5) and len(feats) == net.num_blocks
    assert net.blocks[0](torch.rand(1, 1, 40, 40)).shape[0] == 1
    assert all(p.requires_grad for p in net.parameters())


def test_block_counts_and_residual_indices():
    counts = {a: build_model(a, 10, in_shape=(3, 32, 32)).num_blocks for a in ARCHS}
    assert counts["resnet18"] == counts["resnet101"] == 5
    assert counts["mobilenet_v2"] == 19
    assert counts["mobilenet_v3_small"] == 14 and counts["mobilenet_v3_large"] == 18
    assert all(counts[f"efficientnet_b{i}"] == 9 for i in range(4))
    r18 = build_model("resnet18", 10, in_shape=(3, 32, 32))
    assert [(i, j) for i, j, _ in r18.residual_blocks()] == [(1, 0), (1, 1), (2, 1), (3, 1), (4, 1)]
    assert all(m is r18.blocks[i][j] for i, j, m in r18.residual_blocks())
    v2 = build_model("mobilenet_v2", 10, in_shape=(3, 32, 32))
    found = v2.residual_blocks()
    assert [i for i, _, _ in found] == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]
    assert all(j is None and m is v2.blocks[i] and isinstance(m, InvertedResidual) for i, j, m in found)
    # MobileNetV3's last block carries classifier.0 (parameters), its neck is the dropout alone
    v3 = build_model("mobilenet_v3_large", 10, in_shape=(3, 32, 32))
    assert isinstance(v3.blocks[-1][2], nn.Linear) and isinstance(v3.neck, nn.Dropout)


def test_stochastic_depth_row_mode():
    layer = StochasticDepth(0.5, "row")
    x = torch.ones(2000, 3, 2, 2)
    torch.manual_seed(0)
    out = layer.train()(x)
    per_row = out.flatten(1)
    assert torch.all(per_row == per_row[:, :1])  # one decision per example
    assert set(per_row[:, 0].tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
    assert 0.45 < (per_row[:, 0] == 0).float().mean().item() < 0.55
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(StochasticDepth(0.0).train()(x), x)
    with pytest.raises(ValueError):
        StochasticDepth(1.5)
    # EfficientNet: the drop probability grows linearly with the MBConv's position (16 in B0)
    net = build_model("efficientnet_b0", 3, in_shape=(3, 32, 32), seed=0)
    last = net.blocks[6][3]
    assert last.stochastic_depth.p == pytest.approx(0.2 * 14 / 16)


def test_make_divisible():
    assert make_divisible(32 * 1.1) == 32
    assert make_divisible(16 * 1.2) == 24  # 19.2 -> 16 would lose more than 10 %
    assert make_divisible(3) == 8
    assert make_divisible(1280 * 1.0) == 1280


def test_save_load_round_trip(tmp_path):
    net = build_model("mobilenet_v3_small", 4, in_shape=(3, 48, 48), seed=1).eval()
    loaded_net = load_model(save_model(net, tmp_path / "m")).eval()
    assert loaded_net.arch == "mobilenet_v3_small" and loaded_net.native_size == 224
    assert loaded_net.input_stats() == (IMAGENET_MEAN, IMAGENET_STD)
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded_net(x), net(x))


def test_zoo_checks_on_the_meta_device():
    assert arch_problem("efficientnet_b3", 1000, (3, 300, 300), {}) is None
    assert "has no option" in arch_problem("resnet50", 10, (3, 224, 224), {"width": 2})
