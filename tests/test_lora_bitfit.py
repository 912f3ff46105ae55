"""LoRA and BitFit against hand-computed values (Hu et al. 2021 Eq. 3; Ben Zaken et al. 2022 Sec. 2).

The generic checks (one step moves exactly the optimized parameters, BatchNorm statistics of frozen parts
stay fixed, save/load, determinism) run in tests/test_method_matrix.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import paramtransfer as pt
from paramtransfer.errors import UserError
from paramtransfer.methods.base import make_method, transfer_copy
from paramtransfer.methods.lora import LoRAConfig
from paramtransfer.models.efficientnet import SameConv2d
from paramtransfer.train.trainer import TrainConfig, fit


def _build(spec: str, source: pt.LayeredNet, num_classes: int = 5, seed: int = 0):
    method = make_method(spec)
    model = method.build(source, num_classes, arch=source.arch, in_shape=source.in_shape, seed=seed)
    return method, model


def _linear_net() -> pt.LayeredNet:
    return pt.LayeredNet([nn.Linear(3, 2)], nn.Linear(2, 2), in_shape=(3,))


def _conv_net() -> pt.LayeredNet:
    """conv 1->2 (2x2, with bias), then a head on the flattened 2x2x2 output (inputs 1x3x3)."""
    return pt.LayeredNet([nn.Conv2d(1, 2, 2)], nn.Linear(8, 2), neck=nn.Flatten(), in_shape=(1, 3, 3))


def _count_net() -> pt.LayeredNet:
    """Input 1x6x6: conv 3x3 1->3 (bias) | 1x1 conv 3->4 (no bias) + BatchNorm | depth-wise 3x3 on 4
    channels (bias) | Linear 64->6; head Linear 6->5."""
    blocks = [
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU()),
        nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(64, 6)),
    ]
    return pt.LayeredNet(blocks, nn.Linear(6, 5), in_shape=(1, 6, 6))


def _randomize_updates(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


# ---- LoRA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture", ["tiny_source", "tiny_resnet_source", "tiny_effnet_source", "tiny_stem_wrapped_source"]
)
def test_lora_with_b_zero_is_the_source_network_exactly(
    fixture: str, request: pytest.FixtureRequest, tiny_task: pt.Task
) -> None:
    source = request.getfixturevalue(fixture)
    _, model = _build("lora", source)
    reference = transfer_copy(source, 5, seed=0)  # the same head: transfer_copy seeds it the same way
    x = tiny_task.test.x[:16]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x))
    assert all(
        torch.count_nonzero(u.b) == 0 and torch.count_nonzero(u.a) > 0 for u in model.adapters.values()
    )


def test_lora_linear_is_w_x_plus_b_plus_scaled_b_a_x_by_hand() -> None:
    _, model = _build("lora[r=1,alpha=2]", _linear_net(), num_classes=2)  # scale alpha/r = 2
    layer, update = model.adapted()[0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
        update.a.copy_(torch.tensor([[1.0, 1.0, 0.0]]))
        update.b.copy_(torch.tensor([[1.0], [2.0]]))
        x = torch.tensor([[1.0, 2.0, 3.0]])
        # x W^T + b = [7.5, -1.5]; A x = 3; 2 * B (A x) = [6, 12]
        assert torch.equal(model.net.blocks[0](x), torch.tensor([[13.5, 10.5]]))
        merged = make_method("lora").export(model)
        assert torch.equal(merged.blocks[0].weight, torch.tensor([[3.0, 2.0, 2.0], [4.0, 5.0, -1.0]]))
        assert torch.equal(merged.blocks[0](x), torch.tensor([[13.5, 10.5]]))


def test_lora_conv_adds_a_scaled_one_by_one_of_a_kernel_conv_by_hand() -> None:
    _, model = _build("lora[r=1,alpha=1]", _conv_net(), num_classes=2)
    layer, update = model.adapted()[0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[0.0, 1.0], [1.0, 0.0]]]]))
        layer.bias.copy_(torch.tensor([0.0, 1.0]))
        update.a.copy_(torch.tensor([[[[1.0, -1.0], [0.0, 0.0]]]]))  # x[i, j] - x[i, j+1] = -1 everywhere
        update.b.copy_(torch.tensor([[1.0], [3.0]]))
        x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
        # base: channel 0 = x[i,j] + x[i+1,j+1] = [[6,8],[12,14]], channel 1 = x[i,j+1] + x[i+1,j] + 1
        # = [[7,9],[13,15]]; the update adds 1*(-1) and 3*(-1)
        expected = torch.tensor([[[[5.0, 7.0], [11.0, 13.0]], [[4.0, 6.0], [10.0, 12.0]]]])
        assert torch.equal(model.net.blocks[0](x), expected)


def test_lora_conv_keeps_the_layers_stride_padding_and_dilation() -> None:
    """A strided, padded, dilated conv: the hooked output equals explicit sums over the zero-padded input
    with the weight W + s * B.A (s = alpha/r = 3/2)."""
    torch.manual_seed(0)
    net = pt.LayeredNet(
        [nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2)], nn.Linear(3, 2), in_shape=(2, 7, 7)
    )
    net.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    _, model = _build("lora[r=2,alpha=3]", net, num_classes=2)
    layer, update = model.adapted()[0]
    _randomize_updates(model)
    x = torch.randn(1, 2, 7, 7)
    w = layer.weight + 1.5 * torch.einsum("or,rikl->oikl", update.b, update.a)
    xp = torch.zeros(1, 2, 11, 11)
    xp[:, :, 2:9, 2:9] = x
    expected = torch.zeros(1, 3, 4, 4)
    for o in range(3):
        for i in range(4):
            for j in range(4):
                patch = xp[0, :, 2 * i : 2 * i + 5 : 2, 2 * j : 2 * j + 5 : 2]
                expected[0, o, i, j] = (patch * w[o]).sum() + layer.bias[o]
    with torch.no_grad():
        assert torch.allclose(model.net.blocks[0](x), expected, atol=1e-5)


def test_lora_on_tf_same_padding_runs_the_subclass_forward() -> None:
    """EfficientNet's SameConv2d pads asymmetrically in its forward: A must see the same padding."""
    torch.manual_seed(1)
    net = pt.LayeredNet([SameConv2d(2, 4, 3, stride=2)], nn.Linear(4, 2), in_shape=(2, 6, 6))
    net.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    _, model = _build("lora[r=2]", net, num_classes=2)
    layer, update = model.adapted()[0]
    _randomize_updates(model)
    x = torch.randn(3, 2, 6, 6)
    w = layer.weight + update.scale * torch.einsum("or,rikl->oikl", update.b, update.a)
    # TF-SAME for 6 px, kernel 3, stride 2: 1 pixel of padding, after (right/bottom) only
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), w, None, 2)
    with torch.no_grad():
        assert torch.allclose(model.net.blocks[0](x), expected, atol=1e-5)
    assert layer.bias is None and "weight" in layer._parameters  # the swap is undone


@pytest.mark.parametrize(
    "fixture",
    [
        "tiny_source",
        "tiny_resnet_source",
        "tiny_effnet_source",
        "tiny_wrapped_source",
        "tiny_stem_wrapped_source",
    ],
)
def test_lora_merged_export_equals_the_hooked_model(
    fixture: str, request: pytest.FixtureRequest, tiny_task: pt.Task
) -> None:
    source = request.getfixturevalue(fixture)
    method, model = _build("lora", source)
    _randomize_updates(model)
    merged = method.export(model)
    assert isinstance(merged, pt.LayeredNet) and type(merged) is type(source)
    assert set(merged.state_dict()) == set(
        transfer_copy(source, 5, 0).state_dict()
    )  # plain keys, no adapters
    assert not any(m._forward_hooks for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())
    x = tiny_task.test.x[:16]
    with torch.no_grad():
        hooked = model.eval()(x)
        assert not torch.allclose(hooked, transfer_copy(source, 5, 0).eval()(x), atol=1e-4)  # updates matter
        assert torch.allclose(merged(x), hooked, atol=1e-4, rtol=1e-4), (merged(x) - hooked).abs().max()
    assert make_method("lora[merge=false]").export(model) is model


def test_lora_parameter_counts_follow_r_times_fan_in_plus_fan_out() -> None:
    method, model = _build("lora[r=2]", _count_net())
    # conv 3x3 1->3: 2*(1*9 + 3) = 24; 1x1 conv 3->4: 2*(3 + 4) = 14; depth-wise conv skipped;
    # Linear 64->6: 2*(64 + 6) = 140; head 6*5 + 5 = 35
    d = method.diagnostics(model, None)
    assert d["adapted_layers"] == 3 and d["skipped_layers"]["grouped_conv"] == 1
    assert d["adapter_parameters"] == 24 + 14 + 140
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 24 + 14 + 140 + 35
    assert sorted(model.adapters) == ["blocks-0-0", "blocks-1-0", "blocks-3-1"]
    _, linear_only = _build("lora[r=2,targets=linear]", _count_net())
    assert sorted(linear_only.adapters) == ["blocks-3-1"]


def test_lora_on_efficientnet_lite0_adapts_33_convs_and_skips_16_depthwise(
    tiny_effnet_source: pt.LayeredNet,
) -> None:
    """Stem + 15 expansions (the first MBConv has none) + 16 projections + the final 1x1 = 33; one
    depth-wise conv per MBConv = 16 (stages of 1, 2, 2, 3, 3, 4, 1 blocks)."""
    method, model = _build("lora", tiny_effnet_source)
    d = method.diagnostics(model, None)
    assert d["adapted_layers"] == 33 and d["skipped_layers"] == {
        "grouped_conv": 16,
        "parametrized": 0,
        "not_run": 0,
    }


def test_lora_trains_only_updates_and_head_and_a_moves_from_the_second_step(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    method, model = _build("lora", tiny_resnet_source)
    net_before = {k: v.clone() for k, v in model.net.state_dict().items()}
    a_before = {k: u.a.detach().clone() for k, u in model.adapters.items()}
    batch = len(tiny_task.train)
    fit(model, method, tiny_task, TrainConfig(epochs=1, batch_size=batch, lr=0.1, patience=None))
    # B = 0 at the start: dL/dA = s * B^T (...) = 0, so A has not moved after one step; B has
    assert all(torch.equal(u.a, a_before[k]) for k, u in model.adapters.items())
    assert all(torch.count_nonzero(u.b) > 0 for u in model.adapters.values())
    fit(model, make_method("lora"), tiny_task, TrainConfig(epochs=1, batch_size=batch, lr=0.1, patience=None))
    assert all(not torch.equal(u.a, a_before[k]) for k, u in model.adapters.items())
    after = model.net.state_dict()
    for key, value in net_before.items():  # weights, BatchNorm parameters and statistics: all the source's
        assert torch.equal(after[key], value) != key.startswith("head."), key


def test_lora_alpha_zero_is_a_linear_probe(tiny_source: pt.LayeredNet, tiny_task: pt.Task) -> None:
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, patience=None, prefix_cache_mb=0)
    lora, model = _build("lora[alpha=0]", tiny_source)
    probe, probe_model = _build("linear_probe", tiny_source)
    torch.manual_seed(0)
    fit(model, lora, tiny_task, config)
    torch.manual_seed(0)
    fit(probe_model, probe, tiny_task, config)
    assert not torch.equal(model.net.head.weight, transfer_copy(tiny_source, 5, seed=0).head.weight)
    assert torch.allclose(model.net.head.weight, probe_model.head.weight, atol=1e-6)
    assert all(torch.count_nonzero(u.b) == 0 for u in model.adapters.values())


def test_lora_deep_copy_hooks_follow_the_copy(tiny_source: pt.LayeredNet, tiny_task: pt.Task) -> None:
    _, model = _build("lora", tiny_source)
    twin = copy.deepcopy(model)
    x = tiny_task.test.x[:8]
    with torch.no_grad():
        before = model.eval()(x)
        _randomize_updates(twin)
        assert torch.equal(model(x), before)  # the original's hooks do not read the copy's updates
        assert not torch.allclose(twin.eval()(x), before)  # the copy's hooks read its own


def test_lora_refuses_rnn_and_a_source_without_layers_to_adapt(tiny_rnn_source: pt.LayeredNet) -> None:
    with pytest.raises(UserError, match="bitfit"):
        make_method("lora").check_arch("rnn")
    with pytest.raises(UserError, match="no Conv2d layer"):
        _build("lora[targets=conv]", _linear_net(), num_classes=2)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"r": 0}, "r=0"),
        ({"r": 2.5}, "r=2.5"),
        ({"r": True}, "r=True"),
        ({"alpha": -1.0}, "alpha=-1.0"),
        ({"alpha": float("nan")}, "alpha=nan"),
        ({"targets": "attention"}, "targets='attention'"),
        ({"targets": []}, "targets=[]"),
        ({"merge": "yes"}, "merge='yes'"),
    ],
)
def test_lora_config_refuses_bad_values(options: dict, needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        LoRAConfig(**options)


def test_lora_config_reads_targets_and_names_its_variant() -> None:
    assert LoRAConfig(targets="linear").targets == ["linear"]
    assert LoRAConfig(targets=["linear", "conv"]).targets == ["conv", "linear"]
    assert make_method("lora[r=4,targets=[linear,conv]]").variant() == "lora[r=4]"
    assert make_method("lora[targets=conv]").variant() == "lora[targets=[conv]]"


# ---- BitFit ---------------------------------------------------------------------------------------


def test_bitfit_trains_biases_and_head_only_counted_by_hand() -> None:
    method, model = _build("bitfit", _count_net())
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained == [
        "blocks.0.0.bias",  # 3
        "blocks.1.1.bias",  # BatchNorm shift: 4
        "blocks.2.0.bias",  # 4
        "blocks.3.1.bias",  # 6
        "head.bias",
        "head.weight",  # 35
    ]
    d = method.diagnostics(model, None)
    assert d["bias_parameters"] == 3 + 4 + 4 + 6
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 17 + 35
    assert d["transferred_parameters"] == (27 + 3) + (12 + 8) + (36 + 4) + (384 + 6)


@pytest.mark.parametrize("fixture", ["tiny_resnet_source", "tiny_effnet_source", "tiny_rnn_source"])
def test_bitfit_moves_only_biases_and_head_and_keeps_batchnorm_statistics(
    fixture: str, request: pytest.FixtureRequest, tiny_task: pt.Task
) -> None:
    source = request.getfixturevalue(fixture)
    method, model = _build("bitfit", source)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, method, tiny_task, TrainConfig(epochs=2, batch_size=10, lr=0.1, patience=None))
    after = model.state_dict()
    params = dict(model.named_parameters())
    biases = [k for k in params if k.rpartition(".")[2].startswith("bias") and not k.startswith("head.")]
    assert biases
    for key in after:
        should_move = key in biases or key.startswith("head.")
        assert (not torch.equal(after[key], before[key])) == should_move, key  # statistics included


def test_bitfit_refuses_a_source_without_biases() -> None:
    net = pt.LayeredNet([nn.Conv2d(1, 2, 3, bias=False)], nn.Linear(2, 2), in_shape=(1, 5, 5))
    net.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UserError, match="linear_probe"):
        _build("bitfit", net, num_classes=2)
