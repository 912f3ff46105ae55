"""The LPS depth study (issue 17, ``benchmarks/lps/depth.py``) and the library pieces it stands on.

* ``build_modelset(only=...)`` rebuilds part of a set with the task ids and seeds of the whole set, so
  the same tasks trained with the same settings give the same weights;
* ``classification_top_k`` is ``evaluate_modelset``'s task classification, and ``train_per_task`` trains
  on that many models per task only;
* the study's weight normalisations (set, model, filter) give unit RMS where they say, and each model's
  initialisation is rebuilt exactly from its seed;
* the script runs a row on a tiny set, skips it on a re-run, and ends bad input with one line and 2.

A 2-filter lenet on digits, 3 tasks x 3 models, 1 epoch: mechanics, not accuracy.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from paramtransfer.bench import modelset as bench_modelset
from paramtransfer.bench.modelset import classification_top_k, evaluate_modelset
from paramtransfer.errors import UserError
from paramtransfer.models.store import load_model
from paramtransfer.models.zoo import build_model
from paramtransfer.selection.lps import model_parameters
from paramtransfer.selection.modelset import EvalConfig, build_modelset, load_modelset

TINY = {"width": 2, "hidden": 8}
ROOT = Path(__file__).resolve().parents[1]


def _depth():
    spec = importlib.util.spec_from_file_location("lps_depth", ROOT / "benchmarks" / "lps" / "depth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(out: Path, **kwargs) -> list[dict]:
    settings = dict(models_per_task=3, max_tasks=3, epochs=1, arch_kwargs=TINY, progress=False)
    return build_modelset("digits", out, **{**settings, **kwargs})


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("depth") / "set"
    _build(out)
    return out


def test_only_rebuilds_part_of_a_set_with_its_seeds_and_weights(tiny_set: Path, tmp_path: Path) -> None:
    entries = _build(tmp_path / "part", only=["digits[0,3]"])
    assert [(e["task"], e["task_id"], e["seed"]) for e in entries] == [
        ("digits[0,3]", 2, 2000),
        ("digits[0,3]", 2, 2001),
        ("digits[0,3]", 2, 2002),
    ]
    for e in entries:  # same task, seed and settings: the same model as in the whole set
        part = model_parameters(load_model(tmp_path / "part" / e["path"]))
        whole = model_parameters(load_model(tiny_set / e["path"]))
        assert all(torch.equal(a, b) for a, b in zip(part, whole))
    assert json.loads((tmp_path / "part" / "modelset.json").read_text())["only"] == ["digits[0,3]"]


def test_only_names_unknown_tasks(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"digits\[7,8\] is not a task of this set"):
        _build(tmp_path / "part", only=["digits[7,8]"])  # the set has the first 3 tasks only
    with pytest.raises(UserError, match="no task"):
        _build(tmp_path / "part", only=[])


def test_classification_top_k_is_the_evaluations_task_classification(tiny_set: Path, tmp_path: Path) -> None:
    report = evaluate_modelset(
        tiny_set, out=tmp_path, epochs=2, sections=["classification"], methods=["lps"], progress=False
    )
    ms = load_modelset(tiny_set)
    assert classification_top_k(ms, EvalConfig(epochs=2)) == report["classification"]["methods"]["lps"]


def test_train_per_task_trains_on_that_many_models_per_task(tiny_set: Path, monkeypatch) -> None:
    seen: list[torch.Tensor] = []
    real = bench_modelset._train_net

    def spy(net, params, labels, cfg, desc, progress):
        seen.append(labels.clone())
        return real(net, params, labels, cfg, desc, progress)

    monkeypatch.setattr(bench_modelset, "_train_net", spy)
    ms = load_modelset(tiny_set)
    classification_top_k(ms, EvalConfig(epochs=1), train_per_task=1)
    classification_top_k(ms, EvalConfig(epochs=1))
    assert torch.bincount(seen[0]).tolist() == [1, 1, 1]  # 3 models per task: 2 train, 1 test
    assert torch.bincount(seen[1]).tolist() == [2, 2, 2]
    with pytest.raises(UserError, match="train_per_task"):
        classification_top_k(ms, EvalConfig(epochs=1), train_per_task=0)
    with pytest.raises(UserError, match="one tensor per layer"):
        classification_top_k(ms, EvalConfig(epochs=1), params=ms.params[:-1])


def test_normalisations_give_unit_rms_where_they_say(tiny_set: Path) -> None:
    depth, ms = _depth(), load_modelset(tiny_set)
    for p in depth.normalised(ms, "set"):
        assert float(p.square().mean()) == pytest.approx(1.0, rel=1e-5)
    for p in depth.normalised(ms, "model"):
        assert p.flatten(1).square().mean(1).tolist() == pytest.approx([1.0] * len(p), rel=1e-5)
    for p in depth.normalised(ms, "filter"):
        assert p.flatten(2).square().mean(2).flatten().tolist() == pytest.approx(
            [1.0] * (p.shape[0] * p.shape[1]), rel=1e-5
        )
    assert all(torch.equal(a, b) for a, b in zip(depth.normalised(ms, "none"), ms.params))


def test_initial_weights_are_rebuilt_from_each_models_seed(tiny_set: Path) -> None:
    depth, ms = _depth(), load_modelset(tiny_set)
    init = depth.initial_weights(ms)
    e = ms.entries[4]
    net = build_model("lenet", 2, in_shape=ms.in_shape, seed=e["seed"], **TINY)
    assert all(torch.equal(a[4], b) for a, b in zip(init, model_parameters(net)))
    assert all(0 < d < 2 for d in depth.drift(ms, init))  # trained one epoch: moved, not replaced


def test_subset_keeps_the_tasks_models_and_renumbers_them(tiny_set: Path) -> None:
    depth, ms = _depth(), load_modelset(tiny_set)
    part = depth.subset(ms, ["digits[0,3]", "digits[0,1]"])
    assert part.tasks == ["digits[0,1]", "digits[0,3]"] and part.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(part.params[0][3], ms.params[0][6])


def test_the_script_runs_a_row_and_reuses_it(tiny_set: Path, tmp_path: Path, capsys) -> None:
    depth = _depth()
    config = tmp_path / "setting.yaml"
    config.write_text("kind: lps\neval: {epochs: 1}\n")
    args = ["--modelset", str(tiny_set), "--out", str(tmp_path / "out"), "--config", str(config)]
    assert depth.main([*args, "--rows", "protocol,norm_model"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["rows"]) == {"protocol", "norm_model"}
    row = results["rows"]["protocol"]
    assert row["seeds"] == [0, 1, 2] and len(row["per_seed"]) == 3
    assert 0 <= row["top1"]["mean"] <= 100 and len(results["drift_full_set"]) == len(
        load_modelset(tiny_set).params
    )
    table = (tmp_path / "out" / "depth.md").read_text()
    assert "| weights normalised per model | " in table and "Drift from the initialisation" in table
    capsys.readouterr()
    assert depth.main([*args, "--rows", "protocol"]) == 0
    assert "[3 tasks]" not in capsys.readouterr().out  # measured already: skipped, nothing trained


def test_the_script_ends_bad_input_with_one_line(tiny_set: Path, tmp_path: Path, capsys) -> None:
    depth = _depth()
    assert depth.main(["--modelset", str(tiny_set), "--out", str(tmp_path), "--rows", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown row(s) ['nope']" in err and "protocol" in err
    assert depth.main(["--modelset", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert (
        depth.main(
            ["--modelset", str(tiny_set), "--out", str(tmp_path), "--config", str(tmp_path / "no.yaml")]
        )
        == 2
    )
    assert "no.yaml" in capsys.readouterr().err
    for flags, needle in ((["--tasks", "1"], "--tasks must lie in"), (["--more-models", "2"], "must exceed")):
        assert depth.main(["--modelset", str(tiny_set), "--out", str(tmp_path), *flags]) == 2
        assert needle in capsys.readouterr().err


def test_lps_bench_variants_take_weights_or_weights_and_settings() -> None:
    from paramtransfer.bench.lps import LPSBenchConfig, _variant_title, variant_settings

    assert variant_settings("b2", [0, 1, 0, 0]) == ([0.0, 1.0, 0.0, 0.0], {})
    value = {"weights": [0, 0, 1, 0], "epochs": 100}
    assert variant_settings("b3", value) == ([0.0, 0.0, 1.0, 0.0], {"epochs": 100})
    assert _variant_title("b3", value) == "LPS, b3 (w = (0, 0, 1, 0), epochs 100)"
    bad_values = ({"epochs": 100}, {"weights": 3}, {"weights": [1], "momentum": 0}, "branch 3")
    bad_values += ({"weights": [1], "epochs": "many"}, {"weights": [1], "epochs": 0}, {"weights": ["a"]})
    for bad in bad_values:
        with pytest.raises(UserError, match="eval variant 'x'"):
            LPSBenchConfig.from_dict({"eval": {"variants": {"x": bad}}})
