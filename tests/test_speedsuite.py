"""The speed suite: what it measures is what its JSON says, and its numbers fit together.

One tiny suite run (LeNet, finetune / l2sp / dtnh:l2sp, batch 16, two repeats, a 64-example epoch for
the trainer-vs-bare-loop comparison, without the EfficientNet-Lite0 rows) is shared by the schema
tests, and one tiny run of the EfficientNet-Lite0 rows (32 px, a handful of images, one round) by
theirs; the timings themselves are not asserted beyond being positive, since this machine is shared.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import paramtransfer.bench.speedsuite as speedsuite
from paramtransfer.bench.report import speed_section
from paramtransfer.bench.speedsuite import (
    TARGETS,
    bare_loop,
    default_methods,
    peak_rss_mb,
    run_speed_suite,
    synthetic_dataset,
    synthetic_raw_images,
    write_jpeg_folder,
)
from paramtransfer.data.pipeline import InputSpec, to_input
from paramtransfer.data.task import load_task
from paramtransfer.errors import UserError
from paramtransfer.methods.base import METHODS
from paramtransfer.models.zoo import build_model

METHODS_SUBSET = ["finetune", "l2sp", "dtnh:l2sp"]
IMAGENET_TARGETS = {
    "imagenet_trainer_over_bare_loop",
    "ftl_sweep_over_ft0",
    "linear_probe_over_ft0",
    "streamed_over_memory",
}
SWEEP = [f"finetune[freeze={level}]" for level in range(1, 9)]  # EfficientNet-Lite0 has 9 blocks
NET_STEP_METHODS = ["ptu", "l2sp", "dtnh:l2sp"]  # the fixture's short list (finetune comes first anyway)
NET_STEP_KEYS = (
    "train_step_ms",
    "eval_ms",
    "train_step_ratio",
    "eval_ratio",
    "dtnh_over_base",
    "step_settings",
)


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
            out, archs=("lenet",), methods=METHODS_SUBSET, batch=16, repeats=2, progress=False, imagenet=False
        )
    return result, out


@pytest.fixture(scope="module")
def imagenet_suite(one_thread) -> dict:
    """The whole suite with its EfficientNet-Lite0 rows at tiny sizes: 32 px, one round, 8-example
    batches, 16 + 8 images in the fits, 30 JPEGs of 16 px, single steps of three methods besides
    finetune after one warm-up step (the LeNet part minimal, no memory children)."""
    tiny = {
        "TRAINER_EXAMPLES": 16,
        "WARMUP": 0,
        "IMAGENET_SIZE": 32,
        "IMAGENET_BATCH": 8,
        "IMAGENET_LOOP_EXAMPLES": 8,
        "IMAGENET_TRAIN": 16,
        "IMAGENET_VAL": 8,
        "IMAGENET_EPOCHS": 1,
        "FOLDER_FILES": 30,
        "FOLDER_IMAGE_SIZE": 16,
        "IMAGENET_STEP_METHODS": NET_STEP_METHODS,
        "IMAGENET_STEP_WARMUP": 1,
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in tiny.items():
            mp.setattr(speedsuite, name, value)
        mp.setattr(speedsuite, "peak_rss_mb", lambda *a, **k: 1.0)  # no child processes here
        lines: list[str] = []
        mp.setattr(speedsuite, "_progress_log", lambda t_start: lines.append)
        result = run_speed_suite(None, archs=("lenet",), methods=["finetune"], batch=8, repeats=1)
    return {"result": result, "log": lines}


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
        *IMAGENET_TARGETS,
    }
    assert "imagenet" not in result  # imagenet=False
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
    # not in the method subset, or the EfficientNet-Lite0 rows left out (imagenet=False)
    for unmeasured in ("ptu_train_step_ratio", "dtnh_over_knowdist", *IMAGENET_TARGETS):
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
    result = run_speed_suite(
        None, archs=("lenet",), methods=["finetune"], batch=8, repeats=1, progress=False, imagenet=False
    )
    assert result["train_step_ms"]["lenet"]["finetune"] > 0
    assert list(tmp_path.iterdir()) == []


def test_progress_goes_to_stderr_one_line_per_method(capsys, monkeypatch, one_thread):
    monkeypatch.setattr(speedsuite, "TRAINER_EXAMPLES", 16)
    monkeypatch.setattr(speedsuite, "WARMUP", 0)
    monkeypatch.setattr(speedsuite, "peak_rss_mb", lambda *a, **k: 1.0)
    run_speed_suite(
        None, archs=("lenet",), methods=["l2sp"], batch=8, repeats=1, progress=True, imagenet=False
    )
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


# ---- the EfficientNet-Lite0 rows ---------------------------------------------------------------------


def _positive(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_imagenet_rows_are_measured_by_default_with_every_documented_key(imagenet_suite):
    net = imagenet_suite["result"]["imagenet"]
    for key in (
        "trainer_over_bare_loop",
        "trainer_over_bare_loop_detail",
        "fit_s",
        "fit_over_ft0",
        "cached_prefix",
        "ftl_sweep_over_ft0",
        "linear_probe_over_ft0",
        "fit_settings",
        "streamed_over_memory",
        "streamed_detail",
        "wall_time_s",
    ):
        assert key in net, key
    assert net["arch"] == "efficientnet_lite0"
    assert (net["raw_shape"], net["input_shape"]) == ([1, 28, 28], [3, 32, 32])  # the patched 32 px
    assert (net["batch"], net["repeats"]) == (8, 1)
    assert net["fit_settings"] == {"train": 16, "val": 8, "epochs": 1, "batch": 8}
    assert list(net["fit_s"]) == ["finetune", *SWEEP, "linear_probe"]
    assert list(net["fit_over_ft0"]) == [*SWEEP, "linear_probe"]  # FT-0's own ratio is 1


def test_imagenet_ratios_are_positive_and_come_from_the_medians(imagenet_suite):
    net = imagenet_suite["result"]["imagenet"]
    for key in (
        "trainer_over_bare_loop",
        "ftl_sweep_over_ft0",
        "linear_probe_over_ft0",
        "streamed_over_memory",
    ):
        assert _positive(net[key]), key
    seconds = net["fit_s"]
    assert all(_positive(v) for v in seconds.values())
    for spec, ratio in net["fit_over_ft0"].items():
        assert ratio == pytest.approx(seconds[spec] / seconds["finetune"], rel=1e-12)
    sweep = sum(seconds[spec] for spec in SWEEP) / seconds["finetune"]
    assert net["ftl_sweep_over_ft0"] == pytest.approx(sweep, rel=1e-12)
    assert net["linear_probe_over_ft0"] == net["fit_over_ft0"]["linear_probe"]
    loop = net["trainer_over_bare_loop_detail"]
    assert (loop["examples"], loop["input_shape"]) == (8, [3, 32, 32])
    assert net["trainer_over_bare_loop"] == pytest.approx(
        loop["trainer_images_per_s"] / loop["bare_images_per_s"], rel=1e-9
    )
    folder = net["streamed_detail"]
    assert folder["files"] == 30 and folder["file_shape"] == [3, 16, 16] and folder["train"] > 0
    assert net["streamed_over_memory"] == pytest.approx(
        folder["streamed_images_per_s"] / folder["memory_images_per_s"], rel=1e-9
    )


def test_each_fit_cached_the_frozen_prefix_of_its_method(imagenet_suite):
    cached = imagenet_suite["result"]["imagenet"]["cached_prefix"]
    assert cached == {
        "finetune": 0,
        **{f"finetune[freeze={level}]": level for level in range(1, 9)},
        "linear_probe": 9,
    }


def test_imagenet_targets_are_judged_from_the_section(imagenet_suite):
    result = imagenet_suite["result"]
    keys = {
        "imagenet_trainer_over_bare_loop": "trainer_over_bare_loop",
        "ftl_sweep_over_ft0": "ftl_sweep_over_ft0",
        "linear_probe_over_ft0": "linear_probe_over_ft0",
        "streamed_over_memory": "streamed_over_memory",
    }
    for name, key in keys.items():
        target = result["targets"][name]
        value = result["imagenet"][key]
        assert target["values"] == {"efficientnet_lite0": value}
        op, limit = TARGETS[name]
        assert (target["op"], target["limit"]) == (op, limit)
        assert target["met"] is (value <= limit if op == "<=" else value >= limit)


def test_imagenet_progress_lines_name_each_row(imagenet_suite):
    log = "\n".join(imagenet_suite["log"])
    for phase in (
        "trainer vs bare loop",
        "whole fits of finetune",
        "streamed folder vs in memory",
        "training steps and evaluation passes of 3 methods (batch 8 of 3x32x32, 1 warm-up + 1 rounds",
        "building ptu",
    ):
        assert f"efficientnet_lite0: {phase}" in log


# ---- the EfficientNet-Lite0 steps ----------------------------------------------------------------------


def test_imagenet_steps_have_every_key_and_ratios_from_the_medians(imagenet_suite):
    net = imagenet_suite["result"]["imagenet"]
    for key in NET_STEP_KEYS:
        assert key in net, key
    specs = ["finetune", *NET_STEP_METHODS]
    for key in ("train_step_ms", "eval_ms"):
        assert list(net[key]) == specs
        assert all(_positive(v) for v in net[key].values()), key
    for raw, ratio in (("train_step_ms", "train_step_ratio"), ("eval_ms", "eval_ratio")):
        ms = net[raw]
        assert list(net[ratio]) == NET_STEP_METHODS  # finetune's is 1 by definition
        for spec, value in net[ratio].items():
            assert _positive(value)
            assert value == pytest.approx(ms[spec] / ms["finetune"], rel=1e-12)
    steps = net["train_step_ms"]
    assert net["dtnh_over_base"] == {"l2sp": pytest.approx(steps["dtnh:l2sp"] / steps["l2sp"], rel=1e-12)}
    assert net["step_settings"] == {
        "methods": specs,
        "batch": 8,
        "input_shape": [3, 32, 32],
        "warmup": 1,
        "repeats": 1,  # min(repeats=1, IMAGENET_STEP_REPEATS)
    }


def test_step_targets_judge_efficientnet_beside_the_zoo_archs(imagenet_suite):
    result = imagenet_suite["result"]
    net = result["imagenet"]
    ptu = result["targets"]["ptu_train_step_ratio"]
    assert ptu["values"] == {"efficientnet_lite0": net["train_step_ratio"]["ptu"]}  # lenet ran finetune only
    assert ptu["met"] is (net["train_step_ratio"]["ptu"] <= 1.8)
    l2sp = result["targets"]["dtnh_over_l2sp"]
    assert l2sp["values"] == {"efficientnet_lite0": net["dtnh_over_base"]["l2sp"]}
    assert result["targets"]["dtnh_over_knowdist"]["values"] == {}  # not in the short list


@pytest.mark.parametrize(
    ("net_steps", "net_dtnh", "met"),
    [
        ({"ptu": 1.7}, {"l2sp": 1.05, "knowdist": 1.4}, [True, True, True]),
        ({"ptu": 1.9}, {"l2sp": 1.2, "knowdist": 1.6}, [False, False, False]),  # EfficientNet alone fails
        ({}, {}, [True, True, True]),  # not measured there: the zoo archs alone
    ],
)
def test_step_targets_take_the_efficientnet_values_on_hand_made_results(net_steps, net_dtnh, met):
    result = {
        "train_step_ratio": {"lenet": {"ptu": 1.5}, "resnet20": {"ptu": 1.6}},
        "dtnh_over_base": {"lenet": {"l2sp": 1.0, "knowdist": 1.2}, "resnet20": {"l2sp": 1.05}},
        "trainer_over_bare_loop": 1.0,
        "imagenet": {"train_step_ratio": net_steps, "dtnh_over_base": net_dtnh},
    }
    targets = speedsuite._targets(result)
    names = ["ptu_train_step_ratio", "dtnh_over_l2sp", "dtnh_over_knowdist"]
    assert [targets[n]["met"] for n in names] == met
    net = {"ptu": net_steps.get("ptu"), "l2sp": net_dtnh.get("l2sp"), "knowdist": net_dtnh.get("knowdist")}
    expected = {
        "ptu_train_step_ratio": {"lenet": 1.5, "resnet20": 1.6},
        "dtnh_over_l2sp": {"lenet": 1.0, "resnet20": 1.05},
        "dtnh_over_knowdist": {"lenet": 1.2},
    }
    for name, key in zip(names, ("ptu", "l2sp", "knowdist"), strict=True):
        extra = {"efficientnet_lite0": net[key]} if net[key] is not None else {}
        assert targets[name]["values"] == {**expected[name], **extra}


def test_every_imagenet_step_method_steps_on_efficientnet(monkeypatch, one_thread):
    """The real IMAGENET_STEP_METHODS (PTU and its layer subset, both SpotTunes, the regularisers and
    their DTNH variants) build on EfficientNet-Lite0 and take a step and an evaluation pass: batch 2,
    32 px, one round without warm-up."""
    monkeypatch.setattr(speedsuite, "IMAGENET_SIZE", 32)
    monkeypatch.setattr(speedsuite, "IMAGENET_BATCH", 2)
    monkeypatch.setattr(speedsuite, "IMAGENET_STEP_WARMUP", 0)
    out = speedsuite.imagenet_step_ratios(repeats=1)
    specs = list(dict.fromkeys(["finetune", *speedsuite.IMAGENET_STEP_METHODS]))
    assert {"ptu", "ptu[layers=[2,4,6,7]]", "spottune", "spottune_global", "dtnh:delta"} <= set(specs)
    assert list(out["train_step_ms"]) == list(out["eval_ms"]) == specs
    assert all(_positive(v) for key in ("train_step_ms", "eval_ms") for v in out[key].values())
    assert set(out["dtnh_over_base"]) == {"l2sp", "knowdist", "delta"}


def test_a_bad_imagenet_step_method_fails_before_anything_is_measured(tmp_path, monkeypatch):
    def must_not_measure(*args, **kwargs):
        raise AssertionError("measured before validating")

    monkeypatch.setattr(speedsuite, "measure_arch", must_not_measure)
    monkeypatch.setattr(speedsuite, "IMAGENET_STEP_METHODS", ["finetune", "knn"])
    with pytest.raises(UserError, match="does not train"):
        run_speed_suite(
            tmp_path / "r.json", archs=("lenet",), methods=["finetune"], repeats=1, progress=False
        )
    assert not (tmp_path / "r.json").exists()


def test_steppers_feed_efficientnet_its_imagenet_shape_at_the_run_size(monkeypatch):
    """The source is built as the ImageNet source (1000 classes, 3x224x224); the method's model is built
    for, and fed, the given input shape, channels-last as the trainer runs a conv net."""
    import paramtransfer.bench.speed as speed

    built: list[tuple] = []
    seen: list[tuple] = []
    real_build, real_make = speed.build_model, speed.make_method

    def build_model(arch, num_classes, **kwargs):
        built.append((arch, num_classes, kwargs.get("in_shape")))
        return real_build(arch, num_classes, **kwargs)

    def make_method(name, **options):
        method = real_make(name, **options)
        for attr in ("loss_terms", "predict"):
            real = getattr(method, attr)

            def record(model, x, *args, _real=real, _attr=attr, **kwargs):
                seen.append((_attr, tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last)))
                return _real(model, x, *args, **kwargs)

            setattr(method, attr, record)
        return method

    monkeypatch.setattr(speed, "build_model", build_model)
    monkeypatch.setattr(speed, "make_method", make_method)
    train_step, eval_step = speed._steppers(
        "finetune",
        "efficientnet_lite0",
        2,
        0,
        input_shape=(3, 32, 32),
        source_in_shape=(3, 224, 224),
        source_classes=1000,
    )
    train_step()
    eval_step()
    assert built[0] == ("efficientnet_lite0", 1000, (3, 224, 224))
    assert seen == [("loss_terms", (2, 3, 32, 32), True), ("predict", (2, 3, 32, 32), True)]
    built.clear()
    speed._steppers("finetune", "lenet", 2, 0)  # the zoo archs: as before, 5 classes and their 1x28x28
    assert built[0] == ("lenet", 5, None)


@pytest.mark.parametrize(
    ("values", "met"),
    [
        (
            {
                "trainer_over_bare_loop": 0.97,
                "ftl_sweep_over_ft0": 2.4,
                "linear_probe_over_ft0": 0.05,
                "streamed_over_memory": 0.95,
            },
            [True, True, True, True],
        ),
        (
            {
                "trainer_over_bare_loop": 0.9,
                "ftl_sweep_over_ft0": 2.6,
                "linear_probe_over_ft0": 0.2,
                "streamed_over_memory": 0.5,
            },
            [False, False, False, False],
        ),
        (
            {
                "trainer_over_bare_loop": 0.95,
                "ftl_sweep_over_ft0": 2.5,
                "linear_probe_over_ft0": 0.1,
                "streamed_over_memory": 0.9,
            },
            [True, True, True, True],
        ),  # the limits themselves meet them
    ],
)
def test_imagenet_targets_met_logic_on_hand_made_values(values, met):
    result = {"train_step_ratio": {}, "dtnh_over_base": {}, "trainer_over_bare_loop": 1.0, "imagenet": values}
    targets = speedsuite._targets(result)
    names = [
        "imagenet_trainer_over_bare_loop",
        "ftl_sweep_over_ft0",
        "linear_probe_over_ft0",
        "streamed_over_memory",
    ]
    assert [targets[n]["met"] for n in names] == met
    del result["imagenet"]  # results without the section (imagenet=False): nothing measured, nothing judged
    assert all(speedsuite._targets(result)[n] == {**targets[n], "values": {}, "met": None} for n in names)


def test_the_bare_loop_converts_raw_batches_like_the_trainer(one_thread):
    """With a spec, each batch of raw uint8 rows goes through to_input: the same losses as a loop over
    inputs converted up front (the conversion of a batch equals that of the whole split)."""
    source = build_model("lenet", 5, in_shape=(1, 32, 32), seed=0)
    spec = InputSpec.of((1, 32, 32))  # raw 1x28x28 uint8 -> 1x32x32 in [-1, 1]
    raw, y = synthetic_raw_images(64, (1, 28, 28), 5, seed=0)
    assert raw.dtype == torch.uint8
    kwargs = {"batch": 16, "lr": 0.01, "momentum": 0.9, "channels_last": True, "epochs": 2}
    per_batch = bare_loop(copy.deepcopy(source), raw, y, spec=spec, **kwargs)
    up_front = bare_loop(copy.deepcopy(source), to_input(raw, spec), y, **kwargs)
    assert per_batch == pytest.approx(up_front, rel=1e-5)


def test_the_jpeg_folder_loads_in_memory_and_streamed_alike(tmp_path: Path):
    write_jpeg_folder(tmp_path, 20, 16, 5, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"class_{c}" for c in range(5)]
    spec = InputSpec.of((3, 32, 32))
    memory = load_task(f"folder:{tmp_path}", input_spec=spec)
    streamed = load_task(f"folder:{tmp_path}", input_spec=spec, memory_mb=speedsuite.STREAMED_MEMORY_MB)
    assert not memory.train.streamed and streamed.train.streamed
    assert torch.equal(memory.train.raw(), streamed.train.raw())
    assert tuple(memory.train.raw().shape[1:]) == (3, 16, 16)


# ---- the report's speed section ----------------------------------------------------------------------


def test_the_report_shows_the_imagenet_rows(imagenet_suite):
    result = imagenet_suite["result"]
    text = speed_section(json.loads(json.dumps(result)))  # as read back from results.json
    net = result["imagenet"]
    assert (
        "efficientnet_lite0 at 32 px: whole fits (train 16, val 8, epochs 1, batch 8, median of 1 rounds)"
        in text
    )
    assert f"| finetune | {net['fit_s']['finetune']:.2f} | 1 | 0 |" in text
    for level in range(1, 9):
        spec = f"finetune[freeze={level}]"
        assert f"| {spec} | {net['fit_s'][spec]:.2f} | {net['fit_over_ft0'][spec]:.2f} | {level} |" in text
    assert (
        f"| linear_probe | {net['fit_s']['linear_probe']:.2f} | {net['linear_probe_over_ft0']:.2f} | 9 |"
        in text
    )
    assert f"FT-l sweep (every l, summed) over one FT-0: {net['ftl_sweep_over_ft0']:.2f}" in text
    assert (
        f"streamed folder over in memory (training images per second): {net['streamed_over_memory']:.2f}"
        in text
    )
    for name in IMAGENET_TARGETS:  # the targets table lists them with their limits
        op, limit = TARGETS[name]
        assert f"| {name} | {op} {limit} | efficientnet_lite0 " in text
    assert (
        "efficientnet_lite0 at 32 px: one training step and one evaluation pass next to fine-tuning "
        "(batch 8, median of 1 interleaved rounds, after 1 warm-up steps)" in text
    )
    assert "| method | train step (ms) | × FT | eval (ms) | × FT |" in text
    steps, evals = net["train_step_ms"], net["eval_ms"]
    assert f"| finetune | {steps['finetune']:.1f} | 1 | {evals['finetune']:.1f} | 1 |" in text
    for spec in NET_STEP_METHODS:
        row = (
            f"| {spec} | {steps[spec]:.1f} | {net['train_step_ratio'][spec]:.2f} | "
            f"{evals[spec]:.1f} | {net['eval_ratio'][spec]:.2f} |"
        )
        assert row in text
    assert f"DTNH over its regulariser (training step): l2sp {net['dtnh_over_base']['l2sp']:.2f}." in text
    assert (
        f"| ptu_train_step_ratio | <= 1.8 | efficientnet_lite0 {net['train_step_ratio']['ptu']:.2f} |" in text
    )


def test_the_report_of_imagenet_rows_without_the_steps(imagenet_suite):
    """A results.json from before the per-step rows: the whole fits as before, no step table."""
    net = json.loads(json.dumps(imagenet_suite["result"]["imagenet"]))
    for key in NET_STEP_KEYS:
        del net[key]
    text = speed_section({"imagenet": net})
    assert "whole fits" in text and "FT-l sweep" in text
    assert (
        "one training step" not in text and "× FT |" not in text and "DTNH over its regulariser" not in text
    )


def test_the_report_without_the_imagenet_rows(suite):
    result, _ = suite  # imagenet=False, as an old results.json: no "imagenet" key
    old = json.loads(json.dumps(result))
    old["targets"] = {k: v for k, v in old["targets"].items() if k not in IMAGENET_TARGETS}
    text = speed_section(old)
    assert "whole fits" not in text and "efficientnet_lite0" not in text
    assert "Trainer over a bare PyTorch loop" in text
    with_unmeasured = speed_section(json.loads(json.dumps(result)))
    assert "| ftl_sweep_over_ft0 | <= 2.5 | — | — |" in with_unmeasured


@pytest.mark.parametrize(
    "imagenet",
    [
        None,
        3,
        "x",
        {},
        {"fit_s": 3, "cached_prefix": [1]},
        {"fit_s": {"finetune": "slow"}, "repeats": 2},
        {"train_step_ms": [1], "eval_ms": {"finetune": "fast"}, "dtnh_over_base": 2, "step_settings": 3},
        {
            "train_step_ratio": {"ptu": None},
            "dtnh_over_base": {"l2sp": "x"},
            "step_settings": {"input_shape": 5},
        },
    ],
)
def test_the_report_survives_odd_imagenet_rows(imagenet):
    text = speed_section({"imagenet": imagenet, "trainer_over_bare_loop": 1.0})
    assert text.startswith("## speed")


@pytest.mark.parametrize("arch", ["lenet", "resnet20"])
def test_every_default_method_gets_a_training_step(arch):
    """Each method the suite measures by default builds, prepares (on the suite's stand-in training split)
    and takes a step and an evaluation pass, on both architectures."""
    from paramtransfer.bench.speed import _steppers
    from paramtransfer.bench.speedsuite import default_methods

    for spec in default_methods(arch):
        train_step, eval_step = _steppers(spec, arch, 4, 0)
        train_step()
        eval_step()
