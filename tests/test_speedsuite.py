"""The speed suite: what it measures is what its JSON says, and its numbers fit together.

One tiny suite run (LeNet, finetune / l2sp / dtnh:l2sp, batch 16, two repeats, a 64-example epoch for
the trainer-vs-bare-loop comparison) is shared by the schema tests; the timings themselves are not
asserted beyond being positive, since this machine is shared.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import paramtransfer.bench.speedsuite as speedsuite
from paramtransfer.bench.speedsuite import (
    bare_loop,
    default_methods,
    peak_rss_mb,
    run_speed_suite,
    synthetic_dataset,
)
from paramtransfer.errors import UserError
from paramtransfer.methods.base import METHODS
from paramtransfer.models.zoo import build_model

METHODS_SUBSET = ["finetune", "l2sp", "dtnh:l2sp"]


@pytest.fixture(scope="module")
def one_thread():
    """Two OpenMP threads on two cores that another process also uses can make steps many times
    slower; one thread keeps these tests fast."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, one_thread) -> tuple[dict, object]:
    out = tmp_path_factory.mktemp("speed") / "nested" / "results.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speedsuite, "TRAINER_EXAMPLES", 64)
        mp.setattr(speedsuite, "WARMUP", 1)
        result = run_speed_suite(
            out, archs=("lenet",), methods=METHODS_SUBSET, batch=16, repeats=2, progress=False
        )
    return result, out


def test_json_has_every_documented_key(suite):
    result, out = suite
    for key in (
        "train_step_ratio",
        "eval_ratio",
        "train_step_ms",
        "eval_ms",
        "dtnh_over_base",
        "trainer_over_bare_loop",
        "peak_rss_mb",
        "rss_import_mb",
        "targets",
    ):
        assert key in result, key
    assert result["command"] == "paramtransfer bench speed"
    assert (result["batch"], result["repeats"], result["threads"]) == (16, 2, 1)
    assert result["torch"] == torch.__version__
    assert set(result["targets"]) == {
        "ptu_train_step_ratio",
        "dtnh_over_l2sp",
        "dtnh_over_knowdist",
        "trainer_over_bare_loop",
    }
    assert json.loads(out.read_text()) == result  # what is returned is what was written


def test_raw_times_include_finetune_and_ratios_leave_it_out(suite):
    result, _ = suite
    for key in ("train_step_ms", "eval_ms", "peak_rss_mb"):
        assert set(result[key]) == {"lenet"}
        assert set(result[key]["lenet"]) == set(METHODS_SUBSET)
        assert all(v > 0 and math.isfinite(v) for v in result[key]["lenet"].values())
    for key in ("train_step_ratio", "eval_ratio"):
        assert set(result[key]["lenet"]) == {"l2sp", "dtnh:l2sp"}  # finetune's is 1 by definition
        assert all(v > 0 for v in result[key]["lenet"].values())


def test_ratios_are_raw_times_over_finetune(suite):
    result, _ = suite
    for raw, ratio in (("train_step_ms", "train_step_ratio"), ("eval_ms", "eval_ratio")):
        ms = result[raw]["lenet"]
        for method, value in result[ratio]["lenet"].items():
            assert value == pytest.approx(ms[method] / ms["finetune"], rel=1e-12)


def test_dtnh_over_base_is_the_ratio_of_the_raw_step_times(suite):
    result, _ = suite
    ms = result["train_step_ms"]["lenet"]
    expected = ms["dtnh:l2sp"] / ms["l2sp"]
    assert result["dtnh_over_base"]["lenet"] == {"l2sp": pytest.approx(expected, rel=1e-12)}


def test_targets_are_judged_from_the_measured_values(suite):
    result, _ = suite
    targets = result["targets"]
    l2sp = targets["dtnh_over_l2sp"]
    assert l2sp["values"] == {"lenet": result["dtnh_over_base"]["lenet"]["l2sp"]}
    assert l2sp["met"] is (l2sp["values"]["lenet"] <= 1.10)
    bare = targets["trainer_over_bare_loop"]
    assert bare["values"] == {"lenet": result["trainer_over_bare_loop"]}
    assert bare["met"] is (result["trainer_over_bare_loop"] >= 0.95)
    for unmeasured in ("ptu_train_step_ratio", "dtnh_over_knowdist"):  # not in the method subset
        assert targets[unmeasured]["values"] == {} and targets[unmeasured]["met"] is None


def test_trainer_over_bare_loop_is_the_ratio_of_throughputs(suite):
    result, _ = suite
    detail = result["trainer_over_bare_loop_detail"]
    assert detail["examples"] == 64 and detail["batch"] == 16
    assert result["trainer_over_bare_loop"] == pytest.approx(
        detail["trainer_images_per_s"] / detail["bare_images_per_s"], rel=1e-9
    )
    assert result["trainer_over_bare_loop"] > 0


def test_peak_rss_exceeds_the_import_only_baseline(suite):
    result, _ = suite
    assert result["rss_import_mb"] > 50  # torch alone is bigger than this
    for method, mb in result["peak_rss_mb"]["lenet"].items():
        assert mb > result["rss_import_mb"], method


def test_a_child_reports_its_own_peak_not_its_parents(one_thread):
    """Linux carries a parent's peak into a child's ru_maxrss; the child must report its own."""
    ballast = torch.ones(600 * 2**20 // 4)  # 600 MB in this (parent) process
    ballast += 1  # touch every page
    assert peak_rss_mb(None, "lenet") < 500
    del ballast


def test_no_temporary_file_is_left_next_to_the_results(suite):
    _, out = suite
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]


def test_out_none_writes_nothing(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # the default path is relative: nothing may appear here either
    monkeypatch.setattr(speedsuite, "TRAINER_EXAMPLES", 16)
    monkeypatch.setattr(speedsuite, "WARMUP", 0)
    monkeypatch.setattr(speedsuite, "peak_rss_mb", lambda *a, **k: 1.0)  # no child processes here
    result = run_speed_suite(None, archs=("lenet",), methods=["finetune"], batch=8, repeats=1, progress=False)
    assert result["train_step_ms"]["lenet"]["finetune"] > 0
    assert list(tmp_path.iterdir()) == []


def test_progress_goes_to_stderr_one_line_per_method(capsys, monkeypatch, one_thread):
    monkeypatch.setattr(speedsuite, "TRAINER_EXAMPLES", 16)
    monkeypatch.setattr(speedsuite, "WARMUP", 0)
    monkeypatch.setattr(speedsuite, "peak_rss_mb", lambda *a, **k: 1.0)
    run_speed_suite(None, archs=("lenet",), methods=["l2sp"], batch=8, repeats=1, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    for method in ("finetune", "l2sp"):
        assert f"lenet: building {method}" in captured.err
        assert f"lenet: peak memory of {method}" in captured.err


def test_the_bare_loop_really_trains(one_thread):
    source = build_model("lenet", 5, seed=0)
    model = copy.deepcopy(source)
    x, y = synthetic_dataset(160, source.in_shape, 5, seed=0)
    losses = bare_loop(model, x, y, batch=16, lr=0.01, momentum=0.9, channels_last=True, epochs=5)
    assert len(losses) == 5 * 10
    # class prototypes + noise are easy to learn: from ~ln 5 = 1.6 to ~0.2 in five epochs (seeds 0-2)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), source.parameters(), strict=True)]
    assert all(moved)


def test_default_methods_are_those_that_train_and_support_the_arch():
    lenet = default_methods("lenet")
    assert {"dtnh:l2sp", "dtnh:knowdist", "dtnh:delta", "ptu", "l2sp", "finetune"} <= set(lenet)
    assert "knn" not in lenet and "random_guess" not in lenet
    assert "spottune" not in lenet and "ptu_rnn" not in lenet  # spottune: ResNet only; ptu_rnn: rnn only
    assert "spottune" in default_methods("resnet20")
    for name in lenet:
        assert METHODS.get(name).trains


@pytest.mark.parametrize(
    ("archs", "methods", "message"),
    [
        (("lenet",), ["finetune", "no_such_method"], "unknown method 'no_such_method'"),
        (("lenet",), ["knn"], "does not train"),
        (("lenet",), ["spottune"], "does not support arch 'lenet'"),
        (("lenet",), ["l2sp[no_such_option=1]"], "no option 'no_such_option'"),
        (("vgg",), None, "unknown arch 'vgg'"),
    ],
)
def test_bad_names_fail_before_anything_is_measured(tmp_path, monkeypatch, archs, methods, message):
    def must_not_measure(*args, **kwargs):
        raise AssertionError("measured before validating")

    monkeypatch.setattr(speedsuite, "measure_arch", must_not_measure)
    with pytest.raises(UserError, match=message):
        run_speed_suite(tmp_path / "r.json", archs=archs, methods=methods, repeats=1, progress=False)
    assert not (tmp_path / "r.json").exists()
