"""The training loop: determinism, checkpoint/resume, divergence, batching, frozen BatchNorm, early
stopping, learning-rate schedules, config validation and atomic files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import paramtransfer as pt
from paramtransfer.errors import UserError
from paramtransfer.methods.base import freeze, make_config, make_method
from paramtransfer.train import checkpoint as ckpt_mod
from paramtransfer.train.checkpoint import atomic_write_json, load_checkpoint
from paramtransfer.train.trainer import TrainConfig, batches, evaluate, fit, keep_frozen_batchnorm


class _Crash(RuntimeError):
    """Stands for a process dying part-way through training."""


def _crash_at_epoch(k: int):
    def cb(event: str, **kw) -> None:
        if event == "on_epoch_end" and kw["record"]["epoch"] == k:
            raise _Crash(f"simulated crash at the end of epoch {k}")

    return cb


def _build(method_spec: str, source: pt.LayeredNet | None, task: pt.Task, seed: int = 0):
    """A fresh model as a restarted process would build it (same seed -> same initial weights)."""
    m = make_method(method_spec)
    model = m.build(source, task.num_classes, arch="lenet", in_shape=tuple(task.in_shape), seed=seed)
    return m, model


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in history]


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(params=["lenet", "resnet"])
def source_for(request, tiny_source, tiny_resnet_source):
    return tiny_source if request.param == "lenet" else tiny_resnet_source


# ---- determinism ---------------------------------------------------------------------------------


def test_same_seed_is_bitwise_identical_and_other_seed_differs(source_for, tiny_task):
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=8, patience=None)
    outs, models = [], []
    for seed in (0, 0, 1):
        # identical initial weights: only the trainer's seed (batch order) varies
        m, model = _build("finetune", source_for, tiny_task, seed=0)
        outs.append(fit(model, m, tiny_task, cfg, seed=seed))
        models.append(model)
    assert len(outs[0].history) == 2
    assert _strip(outs[0].history) == _strip(outs[1].history)
    _assert_same_state(models[0], models[1])
    assert not _states_equal(models[0], models[2])
    assert _strip(outs[0].history) != _strip(outs[2].history)


# ---- checkpoints and resume ----------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "crash_epoch"), [("lenet", 2), ("lenet", 4), ("resnet", 3)])
def test_resume_after_crash_matches_uninterrupted_run(
    tiny_source, tiny_resnet_source, tiny_task, tmp_path, arch, crash_epoch
):
    # freeze=1 also exercises frozen BatchNorm statistics (resnet) across the restart
    source_for = tiny_source if arch == "lenet" else tiny_resnet_source
    spec = "finetune[freeze=1]"
    cfg = TrainConfig(epochs=4 if arch == "lenet" else 3, lr=0.05, batch_size=8, patience=10)

    m, ref_model = _build(spec, source_for, tiny_task)
    ref = fit(ref_model, m, tiny_task, cfg, seed=3)
    assert ref.resumed_from_epoch is None

    path = tmp_path / "checkpoint.pt"
    m, model = _build(spec, source_for, tiny_task)
    with pytest.raises(_Crash):
        fit(
            model,
            m,
            tiny_task,
            cfg,
            seed=3,
            checkpoint=path,
            fingerprint="fp",
            callbacks=[_crash_at_epoch(crash_epoch)],
        )
    state = load_checkpoint(path)
    assert state is not None and state["fingerprint"] == "fp"
    assert len(state["history"]) == crash_epoch - 1  # the crashed epoch was never saved

    m, model = _build(spec, source_for, tiny_task)  # a restarted process starts from fresh objects
    out = fit(model, m, tiny_task, cfg, seed=3, checkpoint=path, fingerprint="fp")
    assert out.resumed_from_epoch == crash_epoch - 1
    assert _strip(out.history) == _strip(ref.history)
    assert out.best_epoch == ref.best_epoch
    assert out.best_val_accuracy == ref.best_val_accuracy
    _assert_same_state(model, ref_model)


@pytest.mark.parametrize("patience", [None, 1])
def test_resume_from_final_checkpoint_reproduces_finished_run(tiny_source, tiny_task, tmp_path, patience):
    """A kill after the last checkpoint but before result.json is written must not train any further
    (with early stopping the run had already decided to stop)."""
    cfg = TrainConfig(epochs=12, lr=0.05, batch_size=8, patience=patience, schedule="constant")
    path = tmp_path / "checkpoint.pt"
    m, model = _build("finetune", tiny_source, tiny_task)
    first = fit(model, m, tiny_task, cfg, seed=0, checkpoint=path, fingerprint="fp")
    if patience is not None:
        assert first.stopped_early, "precondition: this setting should stop early"

    m, again = _build("finetune", tiny_source, tiny_task)
    second = fit(again, m, tiny_task, cfg, seed=0, checkpoint=path, fingerprint="fp")
    assert _strip(second.history) == _strip(first.history)
    assert second.stopped_early == first.stopped_early
    assert second.best_epoch == first.best_epoch
    _assert_same_state(again, model)


def test_checkpoint_with_other_fingerprint_or_garbage_is_ignored(tiny_source, tiny_task, tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=8, patience=None)
    m, ref_model = _build("finetune", tiny_source, tiny_task)
    ref = fit(ref_model, m, tiny_task, cfg, seed=0)

    path = tmp_path / "checkpoint.pt"
    m, model = _build("finetune", tiny_source, tiny_task)
    with pytest.raises(_Crash):
        fit(
            model,
            m,
            tiny_task,
            cfg,
            seed=0,
            checkpoint=path,
            fingerprint="old",
            callbacks=[_crash_at_epoch(3)],
        )
    assert load_checkpoint(path)["epoch"] == 1

    m, model = _build("finetune", tiny_source, tiny_task)
    out = fit(model, m, tiny_task, cfg, seed=0, checkpoint=path, fingerprint="new")
    assert out.resumed_from_epoch is None
    assert _strip(out.history) == _strip(ref.history)
    _assert_same_state(model, ref_model)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02 this is not a checkpoint")
    assert load_checkpoint(garbage) is None
    m, model = _build("finetune", tiny_source, tiny_task)
    out = fit(model, m, tiny_task, cfg, seed=0, checkpoint=garbage, fingerprint="new")
    assert out.resumed_from_epoch is None
    _assert_same_state(model, ref_model)


# ---- divergence ----------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [1e4, 1e6])
def test_huge_lr_diverges_without_exception(tiny_task, tmp_path, lr):
    res = pt.run(
        "scratch",
        target=tiny_task,
        arch="lenet",
        lr=lr,
        epochs=3,
        seed=0,
        train_options={"optimizer": "sgd", "batch_size": 8},
        out=tmp_path,
    )
    assert res.status == "diverged"
    assert res.val_accuracy is None and res.test_accuracy is None
    saved = json.loads((tmp_path / "result.json").read_text())  # strict JSON: no NaN/Infinity tokens
    assert saved["status"] == "diverged"
    assert saved["val_accuracy"] is None and saved["test_accuracy"] is None
    for record in saved["history"]:
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))
    assert not (tmp_path / "checkpoint.pt").exists()


# ---- batching ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch_size", "min_last", "sizes"),
    [
        (100, 32, 0.5, [32, 32, 36]),  # remainder 4 < 16: merged into the last batch
        (90, 32, 0.5, [32, 32, 26]),  # remainder 26 >= 16: kept
        (100, 40, 0.5, [40, 40, 20]),  # remainder exactly half: kept
        (100, 32, 0.0, [32, 32, 32, 4]),  # never merge
        (96, 32, 0.5, [32, 32, 32]),  # no remainder
        (10, 32, 0.5, [10]),  # fewer examples than one batch
        (1, 1, 0.5, [1]),
        (0, 8, 0.5, []),
    ],
)
def test_batches_merge_small_remainder_and_cover_each_index_once(n, batch_size, min_last, sizes):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    got = list(batches(n, batch_size, min_last, perm))
    assert [len(b) for b in got] == sizes
    flat = torch.cat(got) if got else torch.empty(0, dtype=torch.long)
    assert torch.equal(flat, perm)  # every index exactly once, in the permutation's order
    assert sorted(flat.tolist()) == list(range(n))


# ---- frozen BatchNorm ----------------------------------------------------------------------------


def test_keep_frozen_batchnorm_sets_only_frozen_bn_to_eval():
    frozen, live, opted_out = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for p in [*frozen.parameters(), *opted_out.parameters()]:
        p.requires_grad_(False)
    opted_out.keep_training_stats = True
    model = torch.nn.Sequential(frozen, live, opted_out)
    model.train()
    keep_frozen_batchnorm(model)
    assert not frozen.training
    assert live.training
    assert opted_out.training


def _bn_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in module.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def test_frozen_batchnorm_statistics_do_not_change_during_training(tiny_resnet_source, tiny_task):
    m, model = _build("finetune[freeze=2]", tiny_resnet_source, tiny_task)
    before = [_bn_buffers(b) for b in model.blocks]
    assert before[0] and before[1] and before[2]
    fit(model, m, tiny_task, TrainConfig(epochs=2, lr=0.05, batch_size=8, patience=None), seed=0)
    after = [_bn_buffers(b) for b in model.blocks]
    for i in (0, 1):  # frozen blocks: statistics exactly as in the source
        for k in before[i]:
            assert torch.equal(before[i][k], after[i][k]), f"frozen block {i} {k} changed"
    changed = [k for k in before[2] if not torch.equal(before[2][k], after[2][k])]
    assert changed, "the BatchNorm statistics of a trained block should move"


def test_batchnorm_without_affine_parameters_in_a_frozen_block_keeps_its_statistics(tiny_task):
    """Frozen-ness is by module: an affine-free BatchNorm has no parameters to tell by."""
    torch.manual_seed(0)
    blocks = [
        torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.BatchNorm2d(4, affine=False)),
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, stride=2), torch.nn.BatchNorm2d(4, affine=False)),
    ]
    source = pt.LayeredNet(blocks, torch.nn.Linear(4 * 6 * 6, 5), torch.nn.Flatten(), in_shape=(1, 28, 28))
    m, model = _build("finetune[freeze=1]", source, tiny_task)
    before = [_bn_buffers(b) for b in model.blocks]
    fit(model, m, tiny_task, TrainConfig(epochs=1, lr=0.05, batch_size=8, patience=None), seed=0)
    after = [_bn_buffers(b) for b in model.blocks]
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), f"frozen block 0 {k} changed"
    assert not torch.equal(before[1]["1.running_mean"], after[1]["1.running_mean"])


def test_keep_frozen_batchnorm_follows_the_frozen_part_not_the_parameters():
    part = torch.nn.Sequential(torch.nn.BatchNorm2d(3, affine=False))
    live = torch.nn.BatchNorm2d(3, affine=False)
    freeze(part)
    model = torch.nn.Sequential(part, live).train()
    keep_frozen_batchnorm(model)
    assert not part[0].training
    assert live.training


# ---- early stopping ------------------------------------------------------------------------------


def test_early_stopping_restores_best_validation_weights(tiny_task):
    m, model = _build("scratch", None, tiny_task, seed=0)
    patience = 2
    cfg = TrainConfig(epochs=40, lr=0.05, batch_size=8, patience=patience, schedule="constant")
    out = fit(model, m, tiny_task, cfg, seed=0)
    assert out.stopped_early
    vals = [r["val_accuracy"] for r in out.history]
    assert len(vals) < 40
    assert len(vals) == out.best_epoch + patience  # stopped exactly `patience` epochs after the best
    assert out.best_val_accuracy == max(vals)
    best = out.history[out.best_epoch - 1]
    assert best["val_accuracy"] == max(vals)
    assert all(v <= best["val_accuracy"] for v in vals[out.best_epoch :])
    # the model holds the weights of the best epoch, not of the last one
    acc, loss = evaluate(m, model, tiny_task.val.x, tiny_task.val.y)
    assert acc == best["val_accuracy"]
    assert loss == pytest.approx(best["val_loss"], rel=1e-6)
    assert loss != pytest.approx(out.history[-1]["val_loss"], rel=1e-6)


# ---- learning-rate schedules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "factors"),
    [
        (
            {"schedule": "cosine", "epochs": 4},
            [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 - math.cos(math.pi / 4)) / 2],
        ),
        ({"schedule": "step", "epochs": 9}, [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01]),
        ({"schedule": "step", "epochs": 5, "step_every": 2, "step_gamma": 0.5}, [1, 1, 0.5, 0.5, 0.25]),
        ({"schedule": "step", "epochs": 2}, [1.0, 0.1]),  # a third of 2 epochs rounds up to 1
        ({"schedule": "constant", "epochs": 3}, [1.0, 1.0, 1.0]),
    ],
)
def test_lr_factor_by_hand(kwargs, factors):
    cfg = TrainConfig(**kwargs)
    assert [cfg.lr_factor(e) for e in range(cfg.epochs)] == pytest.approx(factors, abs=1e-12)


def test_schedule_reaches_the_optimizer(tiny_source, tiny_task):
    """A step schedule with gamma 0 must stop all updates after the first epoch."""
    stepped = TrainConfig(
        epochs=3, lr=0.05, batch_size=8, patience=None, schedule="step", step_every=1, step_gamma=0.0
    )
    m, model = _build("finetune", tiny_source, tiny_task)
    out = fit(model, m, tiny_task, stepped, seed=0)
    assert [r["lr"] for r in out.history] == [0.05, 0.0, 0.0]
    assert out.history[1]["val_loss"] == out.history[2]["val_loss"] == out.history[0]["val_loss"]

    m, one = _build("finetune", tiny_source, tiny_task)
    fit(one, m, tiny_task, TrainConfig(epochs=1, lr=0.05, batch_size=8, patience=None), seed=0)
    _assert_same_state(model, one)


# ---- configuration validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"lr": 0.0},
        {"lr": -0.1},
        {"lr": float("nan")},
        {"lr": float("inf")},
        {"batch_size": 0},
        {"optimizer": "rmsprop"},
        {"schedule": "linear"},
        {"patience": 0},
    ],
)
def test_train_config_rejects_bad_values_with_user_error(kwargs):
    with pytest.raises(UserError):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"momentum": -1.0},  # torch.optim.SGD raises a plain ValueError later -> traceback in the CLI
        {"weight_decay": -1.0},  # same
        {"eval_batch_size": 0},  # range(..., 0) raises ValueError in evaluate()
        {"epochs": 2.5},  # range() raises TypeError in fit()
    ],
)
def test_train_config_rejects_values_that_would_crash_later(kwargs):
    with pytest.raises(UserError):
        TrainConfig(**kwargs)


def test_make_config_turns_unknown_or_mistyped_training_fields_into_user_error():
    with pytest.raises(UserError, match="no option 'epoch'"):
        make_config(TrainConfig, {"epoch": 3}, "training")
    with pytest.raises(UserError):
        make_config(TrainConfig, {"batch_size": "many"}, "training")


# ---- atomic files --------------------------------------------------------------------------------


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name != "result.json")


@pytest.mark.parametrize("bad", [{"x": float("nan")}, {"x": object()}])
def test_atomic_write_json_failed_serialisation_keeps_old_file(tmp_path, bad):
    path = tmp_path / "result.json"
    atomic_write_json(path, {"version": 1})
    with pytest.raises((ValueError, TypeError)):
        atomic_write_json(path, bad)
    assert json.loads(path.read_text()) == {"version": 1}
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
def test_atomic_write_json_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "result.json"
    atomic_write_json(path, {"version": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.os, fail_in, boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"version": 2, "payload": list(range(1000))})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"version": 1}
    assert _leftovers(tmp_path) == []
    atomic_write_json(path, {"version": 3})
    assert json.loads(path.read_text()) == {"version": 3}
    assert _leftovers(tmp_path) == []
    assert os.listdir(tmp_path) == ["result.json"]


def test_trace_test_records_test_scores_without_changing_training(tiny_source, tiny_task):
    m1, model1 = _build("finetune", tiny_source, tiny_task)
    m2, model2 = _build("finetune", tiny_source, tiny_task)
    plain = fit(model1, m1, tiny_task, TrainConfig(epochs=2, batch_size=8, patience=None))
    traced = fit(model2, m2, tiny_task, TrainConfig(epochs=2, batch_size=8, patience=None, trace_test=True))
    for a, b in zip(_strip(plain.history), _strip(traced.history), strict=True):
        assert {k: v for k, v in b.items() if not k.startswith("test_")} == a
        assert 0.0 <= b["test_accuracy"] <= 1.0 and math.isfinite(b["test_loss"])
    _assert_same_state(model1, model2)
    # the recorded test loss is that of the final weights after the last epoch (no early stopping here)
    _, loss = evaluate(m2, model2, tiny_task.test.x, tiny_task.test.y)
    assert traced.history[-1]["test_loss"] == pytest.approx(loss, rel=1e-5)


def test_results_from_before_trace_test_existed_are_reused(tiny_source, tiny_task, tmp_path):
    """A result fingerprinted with ``trace_test: False`` spelled out (as written before the option was
    left out of fingerprints at its default) is still recognised as the same run."""
    from paramtransfer.experiments import run as run_mod

    res = pt.run("finetune", source=tiny_source, target=tiny_task, lr=0.05, epochs=1, seed=0, out=tmp_path)
    stored = json.loads((tmp_path / "result.json").read_text())
    identity = [
        res.method,
        tiny_task.spec,
        0,
        res.arch,
        stored["config"],
        run_mod._source_identity(tiny_source),
    ]
    legacy = run_mod._fingerprint(identity, omit_defaults=False)
    assert legacy != stored["fingerprint"]
    stored["fingerprint"], stored["test_accuracy"] = legacy, 0.123  # marked, to see that it is reused
    (tmp_path / "result.json").write_text(json.dumps(stored))
    again = pt.run("finetune", source=tiny_source, target=tiny_task, lr=0.05, epochs=1, seed=0, out=tmp_path)
    assert again.test_accuracy == 0.123
    # with trace_test on, the run is another one and trains again
    traced = pt.run(
        "finetune",
        source=tiny_source,
        target=tiny_task,
        lr=0.05,
        epochs=1,
        seed=0,
        out=tmp_path,
        train_options={"trace_test": True},
    )
    assert traced.test_accuracy != 0.123 and "test_loss" in traced.history[0]


def test_prepare_runs_before_the_first_step_and_again_on_resume(tiny_source, tiny_task, tmp_path):
    calls = []

    class Recording(type(make_method("finetune"))):
        def prepare(self, model, task):
            calls.append(len(task.train))

    method = Recording()
    model = method.build(tiny_source, tiny_task.num_classes, arch="lenet", in_shape=(1, 28, 28), seed=0)
    cfg = TrainConfig(epochs=2, batch_size=8, patience=None)
    with pytest.raises(_Crash):
        fit(model, method, tiny_task, cfg, checkpoint=tmp_path / "c.pt", callbacks=[_crash_at_epoch(1)])
    fit(model, method, tiny_task, cfg, checkpoint=tmp_path / "c.pt")
    assert calls == [len(tiny_task.train)] * 2


def _bn_state(model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """Clones of every BatchNorm's running statistics (``kind="stats"``) or affine parameters."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            names = ("running_mean", "running_var") if kind == "stats" else ("weight", "bias")
            out.update({f"{name}.{n}": getattr(m, n).detach().clone() for n in names})
    return out


@pytest.mark.parametrize("bn", ["train", "frozen"])
def test_bn_frozen_keeps_the_source_statistics_and_trains_the_affine_parameters(
    tiny_resnet_source, tiny_task, bn
):
    """``bn=frozen``: the BatchNorm layers copied from the source normalise with its statistics, which
    never change, while their weights and biases train; a net initialised afresh (scratch) is unaffected."""
    method = make_method("finetune")
    model = method.build(tiny_resnet_source, 5, arch="resnet20", in_shape=tiny_resnet_source.in_shape, seed=0)
    before_stats, before_affine = _bn_state(model, "stats"), _bn_state(model, "affine")
    assert before_stats and before_affine
    fit(model, method, tiny_task, TrainConfig(lr=0.05, epochs=1, batch_size=8, bn=bn))
    moved = [k for k, v in _bn_state(model, "stats").items() if not torch.equal(v, before_stats[k])]
    assert (moved == []) == (bn == "frozen")
    assert any(not torch.equal(v, before_affine[k]) for k, v in _bn_state(model, "affine").items())
    scratch = make_method("scratch")
    fresh = scratch.build(None, 5, arch="resnet20", in_shape=(1, 28, 28), seed=0)
    fresh_stats = _bn_state(fresh, "stats")
    fit(fresh, scratch, tiny_task, TrainConfig(lr=0.05, epochs=1, batch_size=8, bn=bn))
    assert all(not torch.equal(v, fresh_stats[k]) for k, v in _bn_state(fresh, "stats").items())
