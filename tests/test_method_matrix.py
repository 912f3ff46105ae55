"""The method matrix: every registered method x every tiny source architecture.

Parametrised over ``METHODS.names()``, so a method is tested the moment it is registered: it builds,
one training step moves exactly the parameters it hands to the optimizer (frozen ones, and the
BatchNorm statistics of frozen blocks, stay bitwise identical), its state_dict round-trips, and a seed
fixes every number of its RunResult. Methods that do not train (K-NN, random guess) are checked through
``fit_evaluate`` instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import paramtransfer as pt
from paramtransfer.errors import UserError
from paramtransfer.experiments.run import input_spec_of
from paramtransfer.methods.base import METHODS, Method, make_method, parse_method_spec
from paramtransfer.train.trainer import TrainConfig, fit

# tiny_effnet_source: EfficientNet-Lite0 at 28x28 grey.
# tiny_stem_wrapped_source: a wrapped model with an un-named stem (conv + BatchNorm), an un-named BatchNorm
# between its blocks, a parameter of its own and a BatchNorm without affine parameters in a block
ARCHS = [
    "tiny_source",
    "tiny_resnet_source",
    "tiny_wrapped_source",
    "tiny_stem_wrapped_source",
    "tiny_rnn_source",
    "tiny_effnet_source",
]
DESIGN_KEYS = {
    "method",
    "source",
    "target",
    "arch",
    "seed",
    "config",
    "val_accuracy",
    "test_accuracy",
    "history",
    "wall_time_s",
    "diagnostics",
}

# What the known methods hand to the optimizer, by parameter name; a method missing here still gets
# every generic check below.
# The head of a wrapped model lives under its own name (here module.classifier.1).
EXPECTED_TRAINABLE: dict[str, Callable[[str], bool]] = {
    "scratch": lambda name: True,
    "finetune": lambda name: True,
    "l2sp": lambda name: True,
    "linear_probe": lambda name: name.startswith(("head.", "module.classifier.1.")),
    "knowdist": lambda name: name.startswith("target."),
    "delta": lambda name: name.startswith("target."),
    "dtnh:l2sp": lambda name: True,
    "dtnh:knowdist": lambda name: name.startswith("target."),
    "dtnh:delta": lambda name: name.startswith("target."),
    "spottune": lambda name: name.startswith(("tuned.", "policy.", "net.head.", "net.module.classifier.1.")),
    "spottune_global": lambda name: name.startswith(
        ("tuned.", "policy.", "net.head.", "net.module.classifier.1.")
    ),
    "ptu": lambda name: name.startswith(("target.", "units.")),
    "ptu_rnn": lambda name: name.startswith(("target.", "units.")),
    "bss": lambda name: True,
    "dtnh:bss": lambda name: True,
    "stochnorm": lambda name: True,
    "bi_tuning": lambda name: name.startswith(("target.", "projector.")),
    "dtnh:bi_tuning": lambda name: name.startswith(("target.", "projector.")),
    # the target network and the source head trained beside it (everything)
    "lwf": lambda name: name.startswith(("target.", "source_head.")),
    "dtnh:lwf": lambda name: name.startswith(("target.", "source_head.")),
    "co_tuning": lambda name: name.startswith(("target.", "source_head.")),
    "dtnh:co_tuning": lambda name: name.startswith(("target.", "source_head.")),
    "lora": lambda name: name.startswith(("adapters.", "net.head.", "net.module.classifier.1.")),
    "bitfit": lambda name: (
        name.startswith(("head.", "module.classifier.1.")) or name.rpartition(".")[2].startswith("bias")
    ),
}

# Trainable parameters whose gradient is zero at a first step over the whole (balanced) training split,
# while the blocks and the source head are still the source's (no BatchNorm or dropout to tell train mode
# from the source's eval mode); they move at later steps (tests/test_source_heads.py).
# LwF's source head: it reproduces the recorded outputs exactly, so L_old is at its minimum.
# Co-Tuning's source-head bias: its gradient is mean_i softmax(f_s(x_i)) - mean_i p(y_s | y_i), and with
# the direct relationship both means are the source's mean prediction over the split.
_SOURCE_HEAD = ("source_head.weight", "source_head.bias")
MAY_STAY_AFTER_ONE_FULL_BATCH_STEP: dict[str, tuple[str, ...]] = {
    "lwf": _SOURCE_HEAD,
    "dtnh:lwf": _SOURCE_HEAD,
    "co_tuning": ("source_head.bias",),
    "dtnh:co_tuning": ("source_head.bias",),
}
# Optimizer steps before every optimized parameter has moved (default 1): LoRA's B starts at zero (the
# target starts as the source exactly), so A's gradient B^T.g is zero at the first step
STEPS_TO_MOVE: dict[str, int] = {"lora": 2}

TRAINING = [n for n in METHODS.names() if METHODS.get(n).trains]
NOT_TRAINING = [n for n in METHODS.names() if not METHODS.get(n).trains]


def _source(request: pytest.FixtureRequest, fixture: str, method: str) -> pt.LayeredNet:
    source = request.getfixturevalue(fixture)
    if fixture == "tiny_effnet_source" and method in ("delta", "dtnh:delta"):
        # DELTA's channel attention masks each of EfficientNet-Lite0's ~2,100 channels once (30-60 s per
        # build here); DELTA runs on EfficientNet-Lite0 in benchmarks/imagenet
        pytest.skip("delta on EfficientNet-Lite0: too slow for the matrix")
    try:
        METHODS.get(method).check_arch(source.arch)
    except UserError:
        pytest.skip(f"{method} declares it does not support {source.arch}")
    return source


def _build(method: Method, source: pt.LayeredNet, num_classes: int, seed: int = 0) -> nn.Module:
    return method.build(source, num_classes, arch=source.arch, in_shape=source.in_shape, seed=seed)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _optimized(method: Method, model: nn.Module) -> set[int]:
    return {id(p) for g in method.param_groups(model) for p in g["params"]}


def _bn_frozen(name: str, mod_name: str, mod: nn.Module, optimized: set[int]) -> bool | None:
    """Whether a BatchNorm lies in the part ``name`` keeps frozen: by the module's place for the known
    methods (so a BatchNorm without affine parameters is judged too), else by its parameters (None: no
    way to tell)."""
    if name in EXPECTED_TRAINABLE:
        return not EXPECTED_TRAINABLE[name](f"{mod_name}.weight")
    params = list(mod.parameters(recurse=False))
    return None if not params else not any(id(p) in optimized for p in params)


def _one_step(method: Method, model: nn.Module, task: pt.Task, lr: float = 0.1, steps: int = 1) -> None:
    """Exactly one optimizer step (or ``steps``): the whole training split is one batch (``steps`` equal
    batches), one epoch."""
    batch = math.ceil(len(task.train) / steps)
    out = fit(model, method, task, TrainConfig(epochs=1, batch_size=batch, lr=lr, patience=None))
    assert len(out.history) == 1 and not out.diverged
    assert math.isfinite(out.history[0]["train_task"])


@pytest.mark.parametrize("fixture", ARCHS)
@pytest.mark.parametrize("name", TRAINING)
def test_one_step_moves_exactly_the_optimized_parameters(
    name: str, fixture: str, request: pytest.FixtureRequest, tiny_task: pt.Task
) -> None:
    source = _source(request, fixture, name)
    source_before = _snapshot(source)
    method = make_method(name)
    model = _build(method, source, tiny_task.num_classes)
    optimized = _optimized(method, model)
    assert optimized, f"{name} leaves nothing to train"
    params = dict(model.named_parameters())
    if name in EXPECTED_TRAINABLE:
        expected = {n for n in params if EXPECTED_TRAINABLE[name](n)}
        assert {n for n, p in params.items() if id(p) in optimized} == expected
    for n, p in params.items():  # what the optimizer does not see must not get gradients either
        if id(p) not in optimized:
            assert not p.requires_grad, f"{n} is not optimized but still requires grad"

    before = _snapshot(model)
    _one_step(method, model, tiny_task, steps=STEPS_TO_MOVE.get(name, 1))
    after = model.state_dict()

    for n, p in params.items():
        if id(p) in optimized:
            if n in MAY_STAY_AFTER_ONE_FULL_BATCH_STEP.get(name, ()):
                continue
            assert not torch.equal(after[n], before[n]), f"{name}: trainable {n} did not move"
        else:
            assert torch.equal(after[n], before[n]), f"{name}: frozen {n} moved"
    bn_checked = 0
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            continue
        frozen = _bn_frozen(name, mod_name, mod, optimized)
        if frozen is None:
            continue
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"{mod_name}.{buf}"
            if frozen:
                assert torch.equal(after[key], before[key]), f"{name}: frozen BatchNorm stat {key} moved"
            elif buf == "running_mean":
                assert not torch.equal(after[key], before[key]), f"{name}: trained BatchNorm {key} is stale"
        bn_checked += 1
    assert bn_checked > 0 or source.arch != "resnet20"
    # the caller's source net is never trained in place
    for k, v in source.state_dict().items():
        assert torch.equal(v, source_before[k]), f"{name} changed the source's {k}"


@pytest.mark.parametrize("fixture", ARCHS)
@pytest.mark.parametrize("name", TRAINING)
def test_loss_terms_have_a_finite_task_term(
    name: str, fixture: str, request: pytest.FixtureRequest, tiny_task: pt.Task
) -> None:
    source = _source(request, fixture, name)
    method = make_method(name)
    model = _build(method, source, tiny_task.num_classes)
    method.prepare(model, tiny_task)  # as the trainer does before the first step
    model.train()
    terms = method.loss_terms(model, tiny_task.train.x[:8], tiny_task.train.y[:8])
    assert isinstance(terms, dict) and "task" in terms
    for key, value in terms.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, f"{name}: term {key} is not a scalar"
        assert torch.isfinite(value), f"{name}: term {key} = {value}"
    assert terms["task"].requires_grad
    # 5 balanced classes and a fresh head: the task loss is a cross-entropy near log(5), not e.g. a sum
    assert 0.5 < float(terms["task"].detach()) < 5.0


@pytest.mark.parametrize("fixture", ARCHS)
@pytest.mark.parametrize("name", TRAINING)
def test_state_dict_round_trip_gives_identical_predictions(
    name: str, fixture: str, request: pytest.FixtureRequest, tiny_task: pt.Task, tmp_path
) -> None:
    source = _source(request, fixture, name)
    method = make_method(name)
    model = _build(method, source, tiny_task.num_classes, seed=0)
    _one_step(method, model, tiny_task)
    torch.save(model.state_dict(), tmp_path / "model.pt")

    reloaded_method = make_method(name)
    fresh = _build(reloaded_method, source, tiny_task.num_classes, seed=1)
    for net in (model, fresh):  # the trainer may have made conv weights channels-last
        net.to(memory_format=torch.contiguous_format).eval()
    x = tiny_task.test.x
    with torch.no_grad():
        expected = method.predict(model, x)
        assert not torch.equal(reloaded_method.predict(fresh, x), expected)  # the load must matter
        fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
        got = reloaded_method.predict(fresh, x)
    assert torch.equal(got, expected), (got - expected).abs().max()


def _numbers(result: pt.RunResult) -> dict:
    history = [{k: v for k, v in rec.items() if k != "time_s"} for rec in result.history]
    return {"val": result.val_accuracy, "test": result.test_accuracy, "history": history}


def _check_result(result: pt.RunResult, name: str) -> None:
    d = result.to_dict()
    assert DESIGN_KEYS <= set(d), f"missing keys {DESIGN_KEYS - set(d)}"
    assert d["method"] == name and d["seed"] in (0, 1)
    assert isinstance(d["diagnostics"], dict) and isinstance(d["config"], dict)
    assert d["wall_time_s"] >= 0
    for key in ("val_accuracy", "test_accuracy"):
        assert 0.0 <= d[key] <= 1.0
    json.dumps(d)  # a RunResult is JSON


@pytest.mark.parametrize("fixture", ARCHS)
@pytest.mark.parametrize("name", TRAINING)
def test_run_is_deterministic_under_a_seed(
    name: str, fixture: str, request: pytest.FixtureRequest, tiny_task: pt.Task, tmp_path
) -> None:
    source = _source(request, fixture, name)
    a = pt.run(name, source=source, target=tiny_task, lr=0.05, epochs=2, seed=0, out=tmp_path / "a")
    b = pt.run(name, source=source, target=tiny_task, lr=0.05, epochs=2, seed=0)
    # another seed: one epoch is enough to see that the seed is used (the first epoch's lr is the same)
    c = pt.run(name, source=source, target=tiny_task, lr=0.05, epochs=1, seed=1)
    for res in (a, b, c):
        _check_result(res, name)
        assert res.status == "ok"
        assert all(math.isfinite(rec["train_loss"]) for rec in res.history)
    assert [rec["epoch"] for rec in a.history] == [1, 2]
    assert _numbers(a) == _numbers(b)
    assert a.history[0]["train_loss"] != c.history[0]["train_loss"]
    on_disk = json.loads((tmp_path / "a" / "result.json").read_text())
    assert DESIGN_KEYS <= set(on_disk)
    assert on_disk["val_accuracy"] == a.val_accuracy and on_disk["history"] == a.history


@pytest.mark.parametrize("fixture", ARCHS)
@pytest.mark.parametrize("name", NOT_TRAINING)
def test_non_training_method_is_deterministic_and_bounded(
    name: str, fixture: str, request: pytest.FixtureRequest, tiny_task: pt.Task
) -> None:
    source = _source(request, fixture, name)
    method = make_method(name)
    task = tiny_task.with_input(input_spec_of(source))  # the source's normalisation, as pt.run feeds it
    first = method.fit_evaluate(source, task, seed=0)
    second = make_method(name).fit_evaluate(source, task, seed=0)
    assert set(first) >= {"val_accuracy", "test_accuracy", "diagnostics"}
    for key in ("val_accuracy", "test_accuracy"):
        assert 0.0 <= first[key] <= 1.0
        assert first[key] == second[key]
    for split in ("val", "test"):  # an accuracy is a count of correct examples over the split size
        n = len(getattr(tiny_task, split))
        assert first[f"{split}_accuracy"] * n == pytest.approx(round(first[f"{split}_accuracy"] * n))
    result = pt.run(name, source=source, target=tiny_task, seed=0)
    _check_result(result, name)
    assert result.val_accuracy == first["val_accuracy"] and result.test_accuracy == first["test_accuracy"]
    assert result.history == []


# ---- the un-named part of a wrapped model goes with the source ---------------------------------------

# the stem fixture's modules and parameters that are neither a named block nor the head
UNNAMED_PARAMS = ("module.stem.0.weight", "module.stem.1.weight", "module.scale", "module.between.weight")
UNNAMED_BN = ("module.stem.1", "module.between")
VARIANTS = [*TRAINING, "finetune[freeze=1]", "finetune[last_k=1]", "finetune[stochastic=true]"]


@pytest.mark.parametrize("spec", VARIANTS)
def test_unnamed_part_is_frozen_whenever_a_block_is_and_trains_otherwise(
    spec: str, tiny_stem_wrapped_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    """LayeredNet's rule, in every copy of the wrapped model a method holds (target, frozen source,
    SpotTune's frozen net): the un-named stem, the BatchNorm between the blocks and the model's own
    parameter are frozen, BatchNorm statistics included, whenever any block of that copy is frozen, and
    train like the blocks when every block trains; a BatchNorm without affine parameters follows its block."""
    source = _source_for_spec(tiny_stem_wrapped_source, spec)
    method = make_method(spec)
    model = _build(method, source, tiny_task.num_classes)
    before = _snapshot(model)
    _one_step(method, model, tiny_task)
    after = model.state_dict()

    def moved(key: str) -> bool:
        return not torch.equal(after[key], before[key])

    copies = [k[: -len("module.conv1.0.weight")] for k in after if k.endswith("module.conv1.0.weight")]
    assert copies, "no copy of the wrapped model found"
    for prefix in copies:
        blocks_train = moved(f"{prefix}module.conv1.0.weight") and moved(f"{prefix}module.conv2.0.weight")
        for name in UNNAMED_PARAMS:
            assert moved(prefix + name) == blocks_train, f"{spec}: {prefix}{name} moved={not blocks_train}"
        for bn in UNNAMED_BN:
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                key = f"{prefix}{bn}.{buf}"
                assert moved(key) == blocks_train, f"{spec}: BatchNorm statistic {key} moved={moved(key)}"
        affine_free = f"{prefix}module.conv1.1.running_mean"
        assert moved(affine_free) == moved(f"{prefix}module.conv1.0.weight"), f"{spec}: {affine_free}"


def _source_for_spec(source: pt.LayeredNet, spec: str) -> pt.LayeredNet:
    supported = METHODS.get(parse_method_spec(spec)[0]).supported_archs
    if supported is not None and source.arch not in supported:
        pytest.skip(f"{spec} declares it does not support {source.arch}")
    return source


@pytest.mark.parametrize("name", ["l2sp", "dtnh:l2sp"])
def test_l2sp_anchors_every_transferred_parameter_including_the_unnamed_part(
    name: str, tiny_stem_wrapped_source: pt.LayeredNet
) -> None:
    method = make_method(name)
    model = _build(method, tiny_stem_wrapped_source, 5)
    head = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in method.transferred} == {id(p) for p in model.parameters() if id(p) not in head}
    alpha = method.config.alpha
    before = float(method.regularizer().detach())
    with torch.no_grad():  # move an un-named stem weight and the model's own parameter by 1 each
        model.module.stem[0].weight.add_(1.0)
        model.module.scale.add_(1.0)
    n = model.module.stem[0].weight.numel() + 1
    assert float(method.regularizer().detach()) - before == pytest.approx(0.5 * alpha * n, rel=1e-4)
    grads = method.reg_gradients()
    assert torch.allclose(grads[model.module.scale], torch.full((1,), alpha))
    stem_weight = model.module.stem[0].weight
    assert torch.allclose(grads[stem_weight], torch.full_like(stem_weight, alpha))


def test_ptu_runs_a_wrapped_model_through_hooks(tiny_stem_wrapped_source: pt.LayeredNet) -> None:
    model = _build(make_method("ptu"), tiny_stem_wrapped_source, 5)
    assert model.hooks
