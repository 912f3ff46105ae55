"""What a run checks before it spends time, and what ``save_weights`` writes for every kind of model."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from safetensors.torch import load_file

import paramtransfer as pt
from paramtransfer.cli import main
from paramtransfer.errors import UserError
from paramtransfer.experiments.run import MODEL_DIR, STATE_DICT, STATE_DICT_NOTE, train_model
from paramtransfer.methods.base import make_method

# ---- method/architecture mismatches fail before a source is pretrained ---------------------------------


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--method", "ptu_rnn", "--arch", "resnet20"], "ptu_rnn"),
        (["run", "--method", "ptu", "--arch", "rnn"], "ptu_rnn for rnn"),
        (["run", "--method", "spottune", "--arch", "lenet"], "--arch resnet20"),
        (["run", "--method", "finetune[freeze=-1]", "--arch", "lenet"], "freeze=-1"),
        (["run", "--method", "l2sp", "--arch", "lenet", "--set", "l2sp.alpha=-1"], "alpha"),
        (["compare", "--methods", "finetune,spottune_global", "--arch", "mobilenet"], "spottune_global"),
        (["compare", "--methods", "finetune,l2sp[alpha=-1]", "--arch", "lenet"], "alpha"),
    ],
)
def test_a_mismatch_fails_in_a_moment_and_pretrains_nothing(argv, needle, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("PARAMTRANSFER_HOME", str(home))
    t0 = time.perf_counter()
    code = main([*argv, "--source", "fashion[0-4]", "--target", "fashion[5-9]", "--out", str(tmp_path / "o")])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("paramtransfer: error: ") and needle in lines[0], err
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
    assert not home.exists() or not any(home.rglob("*.safetensors")), "a source was pretrained"


def test_check_arch_accepts_what_the_method_supports() -> None:
    for spec, arch in [("ptu", "lenet"), ("ptu_rnn", "rnn"), ("spottune", "resnet20"), ("l2sp", "rnn")]:
        type(make_method(spec)).check_arch(arch)
    with pytest.raises(UserError, match="not on lenet"):
        type(make_method("spottune_global")).check_arch("lenet")


# ---- save_weights ---------------------------------------------------------------------------------------


def test_save_weights_of_a_wrapped_model_writes_a_state_dict_that_loads_into_the_same_module(
    tiny_stem_wrapped_source, tiny_task, tmp_path
):
    out = tmp_path / "run"
    result, model = train_model(
        "finetune", source=tiny_stem_wrapped_source, target=tiny_task, epochs=1, out=out, save_weights=True
    )
    assert result.status == "ok"
    saved = out / MODEL_DIR
    note = json.loads((saved / STATE_DICT_NOTE).read_text())
    assert note["arch"] == "wrapped" and note["method"] == "finetune" and "same module" in note["note"]
    assert not (saved / "meta.json").exists()  # nothing that load_model would try to rebuild
    fresh = make_method("finetune").build(
        tiny_stem_wrapped_source, tiny_task.num_classes, arch="wrapped", in_shape=(1, 28, 28), seed=1
    )
    fresh.load_state_dict(load_file(str(saved / STATE_DICT)))
    x = tiny_task.test.x[:16]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), copy.deepcopy(model).eval()(x))


def test_save_weights_of_a_two_network_model_writes_its_state_dict(tiny_resnet_source, tiny_task, tmp_path):
    out = tmp_path / "run"
    train_model("spottune", source=tiny_resnet_source, target=tiny_task, epochs=1, out=out, save_weights=True)
    note = json.loads((out / MODEL_DIR / STATE_DICT_NOTE).read_text())
    assert note["module"] == "SpotTuneNet"
    assert any(k.startswith("tuned.") for k in load_file(str(out / MODEL_DIR / STATE_DICT)))


def test_save_weights_of_a_zoo_model_is_loadable_as_a_source(tiny_source, tiny_task, tmp_path):
    out = tmp_path / "run"
    train_model("finetune", source=tiny_source, target=tiny_task, epochs=1, out=out, save_weights=True)
    assert pt.load_model(out / MODEL_DIR).num_classes == tiny_task.num_classes


def test_save_weights_without_a_folder_or_a_network_fails_before_training(tiny_source, tiny_task, tmp_path):
    with pytest.raises(UserError, match="give out"):
        train_model("finetune", source=tiny_source, target=tiny_task, epochs=1, save_weights=True)
    with pytest.raises(UserError, match="no model to save"):
        train_model("knn", source=tiny_source, target=tiny_task, out=tmp_path / "k", save_weights=True)
    assert not (tmp_path / "k").exists()
