"""The source ``torchvision:ARCH`` with ``--source-weights PATH`` (paramtransfer.models.tvsource).

Weights files are made here from torchvision's key list (recorded in tests/data/torchvision_reference.json)
and the deterministic fill of tests/data/make_torchvision_reference.py: what a torchvision checkpoint
holds, without torchvision.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import paramtransfer as pt
from paramtransfer.cli import main
from paramtransfer.errors import UserError
from paramtransfer.experiments.compare import CompareConfig
from paramtransfer.experiments.pretrain import pretrain, resolve_source
from paramtransfer.models import imagenet, tvsource
from paramtransfer.models.classnames import imagenet_classes
from paramtransfer.models.store import is_model_path, is_source_name, saved_arch
from paramtransfer.models.tvmodels import convert_torchvision, head_key

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "torchvision_reference.json").read_text())["archs"]
_spec = importlib.util.spec_from_file_location("make_tv_reference", DATA / "make_torchvision_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def torchvision_state(arch: str, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """A state_dict as torchvision saves ``arch`` (filled weights), with ``num_classes`` classes."""
    state = {name: ref.fill(name, shape) for name, shape in ref.decode_keys(REFERENCE[arch]["keys"])}
    head = head_key(arch).rsplit(".", 1)[0]
    for leaf in ("weight", "bias"):
        state[f"{head}.{leaf}"] = state[f"{head}.{leaf}"][:num_classes].clone()
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """resnet18 (1000 classes) as .pth; mobilenet_v3_small (10 classes) as .safetensors and wrapped."""
    d = tmp_path_factory.mktemp("tvweights")
    torch.save(torchvision_state("resnet18"), d / "resnet18.pth")
    small = torchvision_state("mobilenet_v3_small", 10)
    save_file(small, str(d / "v3s.safetensors"))
    torch.save({"model": small, "epoch": 3}, d / "v3s_wrapped.pt")
    torch.save({"state_dict": small}, d / "v3s_lightning.pt")
    return {
        "r18": d / "resnet18.pth",
        "v3s": d / "v3s.safetensors",
        "v3s_model": d / "v3s_wrapped.pt",
        "v3s_state_dict": d / "v3s_lightning.pt",
    }


def _equal_to(net: pt.LayeredNet, arch: str, state: dict[str, torch.Tensor]) -> bool:
    ours = net.state_dict()
    return all(torch.equal(ours[k], v) for k, v in convert_torchvision(arch, state).items())


def test_names_and_arch_of_the_source():
    assert is_source_name("torchvision:resnet18") and not is_model_path("torchvision:resnet18")
    assert saved_arch("torchvision:resnet18") == "resnet18"
    assert saved_arch("torchvision:resnet19") is None and saved_arch("torchvision:lenet") is None


def test_stored_once_with_class_names(files, tmp_path, monkeypatch):
    net = tvsource.torchvision_source("resnet18", files["r18"], cache=tmp_path)
    assert net.arch == "resnet18" and net.num_classes == 1000 and net.in_shape == (3, 224, 224)
    assert _equal_to(net, "resnet18", torchvision_state("resnet18"))
    assert net.class_names == imagenet_classes() and net.class_names[985] == "daisy"
    info = net.source_info
    assert info["source"] == "torchvision:resnet18" and info["class_names"][0] == "tench"
    assert info["input_mean"] == [0.485, 0.456, 0.406] and info["input_std"] == [0.229, 0.224, 0.225]
    assert info["settings"]["weights_file_sha256"] == tvsource._file_sha256(files["r18"])
    # the second use reads the stored copy: the file is hashed, not converted again
    monkeypatch.setattr(tvsource, "convert_file", lambda *a: pytest.fail("converted again"))
    again = pt.pretrained("resnet18", weights=files["r18"], cache=tmp_path)
    assert _equal_to(again, "resnet18", torchvision_state("resnet18"))
    assert len(list((tmp_path / "sources").iterdir())) == 1


@pytest.mark.parametrize("which", ["v3s", "v3s_model", "v3s_state_dict"])
def test_safetensors_and_wrapped_files(files, tmp_path, which):
    net = tvsource.torchvision_source("mobilenet_v3_small", files[which], cache=tmp_path)
    assert net.num_classes == 10 and net.class_names is None  # not ImageNet-1k: no names
    assert _equal_to(net, "mobilenet_v3_small", torchvision_state("mobilenet_v3_small", 10))


def test_another_file_is_another_source(files, tmp_path):
    a = tvsource.torchvision_source("mobilenet_v3_small", files["v3s"], cache=tmp_path)
    state = torchvision_state("mobilenet_v3_small", 10)
    state["classifier.3.bias"] += 1
    other = tmp_path / "other.safetensors"
    save_file(state, str(other))
    b = tvsource.torchvision_source("mobilenet_v3_small", other, cache=tmp_path)
    assert torch.equal(b.head.bias, a.head.bias + 1)


def test_bad_files(files, tmp_path):
    cache = tmp_path / "home"
    with pytest.raises(UserError, match="needs its weights file: give --source-weights PATH"):
        tvsource.torchvision_source("resnet18", None, cache=cache)
    with pytest.raises(UserError, match="does not exist"):
        tvsource.torchvision_source("resnet18", tmp_path / "nope.pth", cache=cache)
    with pytest.raises(UserError, match="is a folder"):
        tvsource.torchvision_source("resnet18", tmp_path, cache=cache)
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(UserError, match="neither .pth/.pt"):
        tvsource.torchvision_source("resnet18", tmp_path / "w.npz", cache=cache)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(UserError, match="run pickled code .it needs torch.nn.modules.linear.Linear"):
        tvsource.torchvision_source("resnet18", tmp_path / "module.pth", cache=cache)
    data = files["r18"].read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="is damaged or not a torch file"):
        tvsource.torchvision_source("resnet18", tmp_path / "cut.pth", cache=cache)
    (tmp_path / "cut.safetensors").write_bytes(files["v3s"].read_bytes()[:1000])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        tvsource.torchvision_source("mobilenet_v3_small", tmp_path / "cut.safetensors", cache=cache)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(UserError, match=r"holds no state_dict \(found list\)"):
        tvsource.torchvision_source("resnet18", tmp_path / "list.pth", cache=cache)
    torch.save({"fc.weight": torch.zeros(3, 512), "epoch": 1}, tmp_path / "mixed.pth")
    with pytest.raises(UserError, match="holds no state_dict"):
        tvsource.torchvision_source("resnet18", tmp_path / "mixed.pth", cache=cache)
    with pytest.raises(UserError, match=r"does not fit.*lacks layer1\.2\.conv1\.weight"):
        tvsource.torchvision_source("resnet34", files["r18"], cache=cache)
    state = torchvision_state("resnet18")
    state["layer4.1.bn2.weight"] = torch.ones(256)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(UserError, match=r"layer4\.1\.bn2\.weight has shape \[256\].*needs \[512\]"):
        tvsource.torchvision_source("resnet18", tmp_path / "shape.pth", cache=cache)
    with pytest.raises(UserError, match="unknown torchvision arch 'vgg16'.*resnet18"):
        tvsource.torchvision_source("vgg16", files["r18"], cache=cache)
    assert not (cache / "sources").exists() or not list((cache / "sources").iterdir())


def test_named_source_and_resolve_source(files, monkeypatch, tmp_path):
    monkeypatch.setenv("PARAMTRANSFER_HOME", str(tmp_path))
    net = resolve_source("torchvision:resnet18", "resnet18", weights=str(files["r18"]))
    assert net.arch == "resnet18" and resolve_source("torchvision:resnet18", None, weights=files["r18"])
    with pytest.raises(UserError, match="is a resnet18, but --arch is lenet"):
        resolve_source("torchvision:resnet18", "lenet", weights=files["r18"])
    with pytest.raises(UserError, match="fixed weights; drop the arch. options"):
        resolve_source("torchvision:resnet18", "resnet18", weights=files["r18"], arch_kwargs={"width": 2})
    for other in ("fashion[0-4]", "imagenet", "./saved", net):
        with pytest.raises(UserError, match="--source-weights goes with --source torchvision:ARCH"):
            resolve_source(other, None, weights=files["r18"])
    with pytest.raises(UserError, match="no ImageNet weights ship for resnet18"):
        imagenet.pretrained("resnet18")
    with pytest.raises(UserError, match="--source-weights goes with"):
        pretrain("lenet", "fashion[0-4]", weights=files["r18"])
    assert pretrain("resnet18", "torchvision:resnet18", weights=files["r18"]).arch == "resnet18"
    with pytest.raises(UserError, match="--source-weights goes with"):
        CompareConfig(source="fashion[0-4]", source_weights=str(files["r18"]))


def _cli(argv: list[str], capsys) -> str:
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.mark.slow
def test_cli_linear_probe_keeps_the_files_weights(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARAMTRANSFER_HOME", str(tmp_path / "home"))
    out = tmp_path / "lp"
    argv = ["run", "--source", "torchvision:resnet18", "--source-weights", str(files["r18"])]
    argv += ["--target", "digits", "--shots", "2", "--epochs", "1", "--set", "data.test_limit=50"]
    _cli([*argv, "--method", "linear_probe", "--out", str(out), "--save-model", "--quiet"], capsys)
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["source"] == "torchvision:resnet18"
    assert result["arch"] == "resnet18"
    trained = pt.load_model(out / "model")
    assert trained.num_classes == 10  # digits
    state = convert_torchvision("resnet18", torchvision_state("resnet18"))
    ours = trained.state_dict()
    # linear probing trains the head alone: every block is the file's
    assert all(torch.equal(ours[k], v) for k, v in state.items() if not k.startswith("head."))


@pytest.mark.slow
def test_cli_finetune_from_safetensors(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARAMTRANSFER_HOME", str(tmp_path / "home"))
    out = tmp_path / "ft"
    argv = ["run", "--source", "torchvision:mobilenet_v3_small", "--source-weights", str(files["v3s"])]
    argv += ["--target", "digits", "--shots", "2", "--epochs", "1", "--set", "data.test_limit=50"]
    printed = _cli([*argv, "--method", "finetune", "--out", str(out), "--save-model", "--quiet"], capsys)
    assert "finetune torchvision:mobilenet_v3_small" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["arch"] == "mobilenet_v3_small"
    trained = pt.load_model(out / "model").state_dict()
    source = convert_torchvision("mobilenet_v3_small", torchvision_state("mobilenet_v3_small", 10))
    assert not torch.equal(trained["blocks.1.block.0.0.weight"], source["blocks.1.block.0.0.weight"])
    # pretrain stores it (nothing trained) and names the weights
    printed = _cli(
        ["pretrain", "--source", "torchvision:mobilenet_v3_small", "--source-weights", str(files["v3s"])],
        capsys,
    )
    assert "mobilenet_v3_small with torchvision:mobilenet_v3_small weights" in printed


@pytest.mark.slow
def test_compare_with_a_torchvision_source(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARAMTRANSFER_HOME", str(tmp_path / "home"))
    argv = ["compare", "--source", "torchvision:mobilenet_v3_small", "--source-weights", str(files["v3s"])]
    argv += ["--target", "digits", "--shots", "2", "--epochs", "1", "--set", "data.test_limit=30"]
    argv += ["--methods", "linear_probe", "--lr", "0.01", "--seeds", "0", "--out", str(tmp_path / "c")]
    _cli([*argv, "--quiet"], capsys)
    summary = json.loads((tmp_path / "c" / "results.json").read_text())
    assert summary["config"]["source_weights"] == str(files["v3s"])
    assert summary["source"]["source"] == "torchvision:mobilenet_v3_small"
