"""LayeredNet, the model zoo, wrapped models, the source store and the registry."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paramtransfer as pt
from paramtransfer.errors import UserError
from paramtransfer.models import store
from paramtransfer.models.layered import WrappedNet
from paramtransfer.models.tvmodels import TORCHVISION_ARCHS
from paramtransfer.models.zoo import MODELS, RowRNN, list_models
from paramtransfer.registry import Registry

ZOO = list_models()
# torchvision's larger variants share their code with resnet18, mobilenet_v3_small and efficientnet_b0;
# test_tvmodels.py checks every one of them against torchvision
TESTED = [
    a for a in ZOO if a not in TORCHVISION_ARCHS or a in ("resnet18", "mobilenet_v3_small", "efficientnet_b0")
]
SMALL = {
    "lenet": {"width": 4, "hidden": 16},
    "resnet20": {"width": 4},
    "mobilenet": {"width": 4},
    "rnn": {"hidden": 8},
    "efficientnet_lite0": {},  # fixed width: the ImageNet architecture
    **{arch: {} for arch in TORCHVISION_ARCHS},  # torchvision's, fixed too (see test_tvmodels.py)
}


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -------------------------------------------------------------------------------------------------- zoo


def test_zoo_lists_the_architectures() -> None:
    assert ZOO == sorted(["efficientnet_lite0", "lenet", "mobilenet", "resnet20", "rnn", *TORCHVISION_ARCHS])
    assert pt.list_models() == ZOO


@pytest.mark.parametrize("arch", TESTED)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_zoo_forward_and_features(arch: str, in_channels: int) -> None:
    net = pt.build_model(arch, num_classes=7, in_channels=in_channels, seed=0)
    assert isinstance(net, pt.LayeredNet)
    assert net.arch == arch
    assert net.in_shape == (in_channels, 28, 28)
    assert net.num_classes == 7
    assert isinstance(net.head, nn.Linear)
    net.eval()
    x = torch.randn(3, in_channels, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(x)
        feats = net.features(x)
        logits, feats2 = net.forward_features(x)
        emb = net.embed(x)
    assert out.shape == (3, 7)
    assert len(feats) == net.num_blocks == len(net.blocks) >= 1
    assert all(f.shape[0] == 3 for f in feats)
    # each block's output feeds the next block, the last one feeds the head (through the neck)
    with torch.no_grad():
        prev = x
        for block, f in zip(net.blocks, feats):
            assert torch.allclose(block(prev), f, atol=1e-6)
            prev = f
        assert torch.allclose(net.head(net.neck(feats[-1])), out, atol=1e-6)
    assert torch.allclose(logits, out)
    assert all(torch.equal(a, b) for a, b in zip(feats, feats2))
    assert emb.shape == (3, net.head.in_features)
    assert torch.allclose(net.head(emb), out, atol=1e-6)


def test_zoo_block_counts_and_widths() -> None:
    lenet = pt.build_model("lenet", 5, width=4, hidden=16)
    assert lenet.num_blocks == 4
    assert lenet.head.in_features == 8  # hidden // 2
    assert lenet.describe() == {
        "arch": "lenet",
        "arch_kwargs": {"width": 4, "hidden": 16},
        "in_shape": [1, 28, 28],
        "num_classes": 5,
        "num_blocks": 4,
    }
    res = pt.build_model("resnet20", 5, width=4)
    assert res.num_blocks == 1 + 9  # stem + 3 stages x 3 basic blocks
    assert res.head.in_features == 16  # 4 * width
    assert pt.build_model("resnet20", 5, width=4, depth=32).num_blocks == 1 + 15
    with pytest.raises(UserError, match="6n\\+2"):
        pt.build_model("resnet20", 5, depth=21)
    mob = pt.build_model("mobilenet", 5, width=4)
    assert mob.num_blocks == 7
    assert mob.head.in_features == 32  # 8 * width
    rnn = pt.build_model("rnn", 5, hidden=8)
    assert rnn.num_blocks == 1 and rnn.head.in_features == 8


def test_build_model_with_other_input_shape() -> None:
    net = pt.build_model("lenet", 3, in_shape=(3, 32, 32), width=4, hidden=16)
    assert net.in_shape == (3, 32, 32)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    rnn = pt.build_model("rnn", 3, in_shape=(2, 10, 6), hidden=5)
    assert rnn.blocks[0].rnn.input_size == 12  # C * W per row
    assert rnn(torch.zeros(4, 2, 10, 6)).shape == (4, 3)


@pytest.mark.parametrize("arch", TESTED)
def test_build_model_seed_is_deterministic_and_leaves_global_rng(arch: str) -> None:
    torch.manual_seed(2024)
    state = torch.get_rng_state()
    a = pt.build_model(arch, 4, seed=5, **SMALL[arch])
    assert torch.equal(torch.get_rng_state(), state)
    b = pt.build_model(arch, 4, seed=5, **SMALL[arch])
    c = pt.build_model(arch, 4, seed=6, **SMALL[arch])
    assert torch.equal(torch.get_rng_state(), state)
    assert _state_equal(a, b)
    assert not _state_equal(a, c)
    # without a seed the global RNG is used (and advanced)
    pt.build_model(arch, 4, **SMALL[arch])
    assert not torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("arch", TESTED)
def test_reset_head_changes_only_the_head(arch: str) -> None:
    net = pt.build_model(arch, 4, seed=0, **SMALL[arch])
    before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("head.")}
    old_head = net.head
    net.reset_head(9)
    assert net.head is not old_head
    assert net.head.out_features == 9 and net.num_classes == 9
    assert net.head.in_features == old_head.in_features
    after = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net(torch.zeros(2, *net.in_shape)).shape == (2, 9)


def test_reset_head_keeps_bias_choice() -> None:
    net = pt.LayeredNet([nn.Flatten()], nn.Linear(4, 2, bias=False), in_shape=(1, 2, 2))
    net.reset_head(3)
    assert net.head.bias is None and net.head.weight.shape == (3, 4)
    bad = pt.LayeredNet([nn.Flatten()], nn.Sequential(nn.Linear(4, 2)), in_shape=(1, 2, 2))
    with pytest.raises(UserError, match="nn.Linear"):
        bad.reset_head(3)


def test_unknown_arch_lists_known_names() -> None:
    with pytest.raises(UserError) as err:
        pt.build_model("vgg16", 10)
    msg = str(err.value)
    assert "'vgg16'" in msg
    for name in ZOO:
        assert name in msg


def test_build_model_bad_options() -> None:
    with pytest.raises(UserError, match="lenet"):
        pt.build_model("lenet", 10, depth=3)
    with pytest.raises(UserError, match="num_classes"):
        pt.build_model("lenet", 0)
    with pytest.raises(UserError, match="cell"):
        pt.build_model("rnn", 3, cell="lstm")


def test_hand_made_layered_net() -> None:
    blocks = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)]
    head = nn.Linear(2, 5)
    net = pt.LayeredNet(blocks, head, in_shape=(3,))
    x = torch.randn(6, 3)
    h1 = blocks[0](x)
    h2 = torch.tanh(h1)
    h3 = blocks[2](h2)
    feats = net.features(x)
    assert len(feats) == 3
    for got, want in zip(feats, (h1, h2, h3)):
        assert torch.allclose(got, want)
    assert torch.allclose(net(x), head(h3))
    assert torch.allclose(net.embed(x), h3)
    assert net.arch == "custom"


# ------------------------------------------------------------------------------------------------- wrap


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1) * 2.0)  # the head's input is not any block's output


def _small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


def test_wrap_forward_features_embed() -> None:
    m = _small_cnn()
    net = pt.LayeredNet.wrap(m, ["conv1", "conv2"], "fc", in_shape=(1, 9, 9))
    assert isinstance(net, WrappedNet)
    assert net.num_blocks == 2 and net.num_classes == 5
    assert net.sequential is False
    assert net.head is m.fc
    assert list(net.blocks) == [m.conv1, m.conv2]
    x = torch.randn(4, 1, 9, 9)
    c1 = m.conv1(x)
    c2 = m.conv2(F.relu(c1))
    emb = F.relu(c2).flatten(1) * 2.0
    assert torch.allclose(net(x), m(x))
    feats = net.features(x)
    assert len(feats) == 2
    assert torch.allclose(feats[0], c1)
    assert torch.allclose(feats[1], c2)
    assert torch.allclose(net.embed(x), emb)
    assert torch.allclose(m.fc(net.embed(x)), m(x))
    # the hooks are removed again
    assert not m.conv1._forward_hooks and not m.conv2._forward_hooks and not m.fc._forward_pre_hooks
    # the wrapped model's parameters are the net's parameters (no copies)
    assert {id(p) for p in net.parameters()} == {id(p) for p in m.parameters()}


def test_wrap_features_unaffected_by_inplace_activation() -> None:
    """A block followed by an in-place ReLU: features() must still give the block's own output."""

    class InplaceNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 2, 3)
            self.act = nn.ReLU(inplace=True)
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.act(self.conv1(x)).flatten(1))

    torch.manual_seed(0)
    m = InplaceNet()
    net = pt.LayeredNet.wrap(m, ["conv1"], "fc", in_shape=(1, 6, 6))
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        c1 = m.conv1(x)
        assert (c1 < 0).any()
        assert torch.allclose(net.features(x)[0], c1)


def test_wrap_reset_head_replaces_the_named_head() -> None:
    m = _small_cnn()
    net = pt.LayeredNet.wrap(m, ["conv1", "conv2"], "fc", in_shape=(1, 9, 9))
    conv_before = m.conv1.weight.clone()
    net.reset_head(2)
    assert isinstance(m.fc, nn.Linear) and m.fc.out_features == 2 and m.fc.in_features == 36
    assert net.head is m.fc
    assert net.num_classes == 2
    assert net(torch.zeros(3, 1, 9, 9)).shape == (3, 2)
    assert torch.equal(m.conv1.weight, conv_before)


def test_wrap_nested_head_name() -> None:
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("features", nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    m.add_module("classifier", nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3)))
    net = pt.LayeredNet.wrap(m, ["features.0", "features"], "classifier.1", in_shape=(1, 6, 6))
    x = torch.randn(2, 1, 6, 6)
    feats = net.features(x)
    assert torch.allclose(feats[0], m.features[0](x))
    assert torch.allclose(feats[1], torch.relu(m.features[0](x)))
    net.reset_head(6)
    assert m.classifier[1].out_features == 6
    assert net(x).shape == (2, 6)


def test_wrap_bad_names() -> None:
    m = _small_cnn()
    with pytest.raises(UserError) as err:
        pt.LayeredNet.wrap(m, ["conv1", "conv3"], "fc")
    assert "'conv3'" in str(err.value) and "conv1" in str(err.value)
    with pytest.raises(UserError, match="'head'"):
        pt.LayeredNet.wrap(m, ["conv1"], "head")
    with pytest.raises(UserError, match="at least one block"):
        pt.LayeredNet.wrap(m, [], "fc")
    with pytest.raises(UserError):
        pt.LayeredNet.wrap(m, [""], "fc")


def test_wrap_refuses_a_head_inside_a_block() -> None:
    m = nn.Sequential()
    m.add_module("body", nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)))
    with pytest.raises(UserError, match="overlap"):
        pt.LayeredNet.wrap(m, ["body"], "body.2", in_shape=(1, 6, 6))


def test_unnamed_part_of_a_wrapped_model(tiny_stem_wrapped_source) -> None:
    net = tiny_stem_wrapped_source
    m = net.module
    assert {id(x) for x in net.unnamed_modules()} >= {id(m.stem), id(m.between), id(m.classifier[0])}
    assert not {id(x) for x in net.unnamed_modules()} & {id(m.conv1), id(m.conv2), id(m.classifier[1])}
    unnamed = {id(p) for p in net.unnamed_parameters()}
    assert unnamed == {id(p) for p in [*m.stem.parameters(), *m.between.parameters(), m.scale]}
    head = {id(p) for p in net.head.parameters()}
    assert {id(p) for p in net.transferred_parameters()} == {id(p) for p in net.parameters()} - head
    zoo = pt.build_model("lenet", 3, width=4, hidden=16)
    assert [id(x) for x in zoo.unnamed_modules()] == [id(zoo.neck)] and zoo.unnamed_parameters() == []


def test_wrapped_and_custom_models_cannot_be_saved(tmp_path: Path) -> None:
    net = pt.LayeredNet.wrap(_small_cnn(), ["conv1"], "fc", in_shape=(1, 9, 9))
    with pytest.raises(UserError, match="zoo"):
        pt.save_model(net, tmp_path / "w")
    custom = pt.LayeredNet([nn.Flatten()], nn.Linear(4, 2), in_shape=(1, 2, 2))
    with pytest.raises(UserError, match="zoo"):
        pt.save_model(custom, tmp_path / "c")
    assert not (tmp_path / "w").exists() and not (tmp_path / "c").exists()


# -------------------------------------------------------------------------------------------------- rnn


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_rowrnn_cell_step_matches_torch_rnn(cell: str) -> None:
    torch.manual_seed(0)
    rr = RowRNN(input_size=2 * 5, hidden=6, cell=cell)
    x = torch.randn(3, 2, 7, 5)  # B, C, H (7 steps), W
    seq = rr.as_sequence(x)
    assert seq.shape == (3, 7, 10)
    full, _ = rr.rnn(seq)
    h = torch.zeros(3, 6)
    for t in range(7):
        h = rr.cell_step(seq[:, t], h)
        assert torch.allclose(h, full[:, t], atol=1e-6)
    assert torch.allclose(rr(x), h, atol=1e-6)


def test_rowrnn_sequence_is_rows_of_all_channels() -> None:
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)  # C=2, H=3, W=4
    seq = RowRNN.as_sequence(x)
    assert seq.shape == (1, 3, 8)
    # step 1 = row 1 of channel 0, then row 1 of channel 1
    assert seq[0, 1].tolist() == [4.0, 5.0, 6.0, 7.0, 16.0, 17.0, 18.0, 19.0]


def test_rowrnn_unknown_cell() -> None:
    with pytest.raises(UserError) as err:
        RowRNN(4, 3, cell="lstm")
    assert "gru" in str(err.value) and "rnn" in str(err.value)


# ------------------------------------------------------------------------------------------------ store


@pytest.mark.parametrize(
    ("arch", "kwargs", "in_shape"),
    [
        ("lenet", {"width": 4, "hidden": 16}, (1, 28, 28)),
        ("resnet20", {"width": 4}, (3, 28, 28)),
        ("mobilenet", {"width": 4}, (1, 28, 28)),
        ("rnn", {"hidden": 8, "cell": "rnn"}, (1, 28, 28)),
    ],
)
def test_save_load_round_trip(tmp_path: Path, arch: str, kwargs: dict, in_shape: tuple) -> None:
    net = pt.build_model(arch, 3, in_shape=in_shape, seed=1, **kwargs)
    x = torch.randn(4, *in_shape, generator=torch.Generator().manual_seed(2))
    net.train()
    with torch.no_grad():
        net(x)  # moves BatchNorm running statistics away from their initial values
    net.eval()
    d = pt.save_model(net, tmp_path / "m", meta={"source": "fashion[0-4]", "note": 1})
    assert (d / "model.safetensors").is_file() and (d / "meta.json").is_file()
    meta = json.loads((d / "meta.json").read_text())
    assert meta["arch"] == arch and meta["num_classes"] == 3
    assert meta["in_shape"] == list(in_shape) and meta["arch_kwargs"] == net.arch_kwargs
    assert kwargs.items() <= meta["arch_kwargs"].items()
    assert meta["source"] == "fashion[0-4]" and meta["note"] == 1
    loaded = pt.load_model(d)
    assert loaded.arch == arch and loaded.in_shape == in_shape
    assert _state_equal(net, loaded)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))
    assert loaded.source_info["source"] == "fashion[0-4]"
    # the weights file path works too
    again = pt.load_model(d / "model.safetensors")
    assert _state_equal(net, again)


def test_saved_weights_are_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    net = pt.build_model("lenet", 2, seed=0, width=4, hidden=16)
    pt.save_model(net, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors.keys() == net.state_dict().keys()
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def test_load_model_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        pt.load_model(tmp_path / "nothing")
    assert "model.safetensors" in str(err.value) and "pretrain" in str(err.value)
    pt.save_model(pt.build_model("lenet", 2, width=4, hidden=16), tmp_path / "half")
    (tmp_path / "half" / "meta.json").unlink()
    with pytest.raises(UserError, match="meta.json"):
        pt.load_model(tmp_path / "half")


def test_store_home_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARAMTRANSFER_HOME", str(tmp_path))
    assert store.home() == tmp_path


def test_source_key() -> None:
    a = store.source_key("lenet", "fashion[0-4]", epochs=1, seed=0)
    assert a == store.source_key("lenet", "fashion[0-4]", seed=0, epochs=1)  # order-free
    assert a.startswith("lenet-fashion-0-4-")
    assert a != store.source_key("lenet", "fashion[0-4]", epochs=1, seed=1)
    assert a != store.source_key("lenet", "fashion[5-9]", epochs=1, seed=0)


def test_pretrain_caches(tmp_path: Path) -> None:
    kwargs = dict(epochs=1, seed=0, limit=200, arch_kwargs={"width": 4, "hidden": 16}, cache=tmp_path)
    first = pt.pretrain("lenet", "fashion[0-4]", **kwargs)
    dirs = list((tmp_path / "sources").iterdir())
    assert len(dirs) == 1
    d = dirs[0]
    files = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert {"model.safetensors", "meta.json"} <= files.keys()
    assert first.arch == "lenet" and first.num_classes == 5
    assert first.arch_kwargs == {"width": 4, "hidden": 16}
    info = first.source_info
    assert info["source"] == "fashion[0-4]"
    assert info["settings"]["limit"] == 200 and info["settings"]["epochs"] == 1
    assert 0.0 <= info["val_accuracy"] <= 1.0

    t0 = time.perf_counter()
    second = pt.pretrain("lenet", "fashion[0-4]", **kwargs)
    assert time.perf_counter() - t0 < 2.0  # loading only (training took seconds)
    assert _state_equal(first, second)
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == files  # nothing rewritten
    assert len(list((tmp_path / "sources").iterdir())) == 1

    # the trained weights differ from the initial weights of the same seed
    init = pt.build_model("lenet", 5, seed=0, width=4, hidden=16)
    assert not _state_equal(first, init)

    # force retrains (and training is deterministic under the seed)
    forced = pt.pretrain("lenet", "fashion[0-4]", **kwargs, force=True)
    assert (d / "model.safetensors").stat().st_mtime_ns != files["model.safetensors"]
    assert _state_equal(first, forced)


# --------------------------------------------------------------------------------------------- registry


def test_registry_basics() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("b")(2)
    obj = reg.register("a")(1)
    assert obj == 1  # register returns the object (usable as a decorator)
    assert reg.get("a") == 1 and reg.get("b") == 2
    assert reg.names() == ["a", "b"]
    assert list(reg) == ["a", "b"]
    assert "a" in reg and "c" not in reg


def test_registry_unknown_name_lists_known() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("zeta")(1)
    reg.register("alpha")(2)
    with pytest.raises(UserError) as err:
        reg.get("beta")
    assert str(err.value) == "unknown widget 'beta'; known: alpha, zeta"


def test_registry_double_registration() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(2)
    assert reg.get("a") == 1
    with pytest.raises(ValueError, match="already registered"):
        MODELS.register("lenet")(lambda num_classes: None)
    assert MODELS.get("lenet") is not None and "lenet" in ZOO


def test_strided_shortcut_is_a_strided_pointwise_convolution() -> None:
    from paramtransfer.models.zoo import StridedPointwise

    torch.manual_seed(0)
    conv, ours = nn.Conv2d(8, 16, 1, 2, bias=False), StridedPointwise(8, 16, 2)
    ours.load_state_dict(conv.state_dict())  # same parameters, same names
    for size in (9, 28):
        x = torch.randn(3, 8, size, size)
        torch.testing.assert_close(ours(x), conv(x))


def test_resnet_trains_channels_last_at_a_batch_that_crashed_oneDNN() -> None:
    """torch 2.13 CPU: the weight gradient of a strided 1x1 conv in channels-last corrupted the heap for
    8 -> 16 channels at 28x28 and a batch of 25; the zoo's shortcut must not take that path."""
    net = pt.build_model("resnet20", num_classes=5, seed=0, width=8).to(memory_format=torch.channels_last)
    x = torch.randn(25, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    net(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
