"""LwF and Co-Tuning: the source head trained beside the new one, checked against hand computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import paramtransfer as pt
from paramtransfer.errors import UserError
from paramtransfer.methods.base import make_method
from paramtransfer.methods.co_tuning import direct_relationship, reverse_relationship
from paramtransfer.methods.lwf import distillation_loss
from paramtransfer.methods.source_head import WithSourceHead
from paramtransfer.runtime import Runtime
from paramtransfer.train.trainer import TrainConfig, fit


def _build(spec: str, source: pt.LayeredNet, num_classes: int = 5, seed: int = 0):
    method = make_method(spec)
    model = method.build(source, num_classes, arch=source.arch, in_shape=source.in_shape, seed=seed)
    return method, model


def _fit(method, model, task: pt.Task, epochs: int = 1, batch_size: int = 5) -> None:
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.05, patience=None)
    out = fit(model, method, task, config)
    assert not out.diverged


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- the shared model: one pass, two heads ----------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_source", "tiny_wrapped_source", "tiny_resnet_source"])
def test_source_head_reads_the_target_heads_input_and_starts_as_the_source(
    fixture: str, request: pytest.FixtureRequest, tiny_task: pt.Task
) -> None:
    source = request.getfixturevalue(fixture)
    _, model = _build("lwf", source)
    assert isinstance(model, WithSourceHead) and model.source_head is not source.head_layer()
    x = tiny_task.train.x[:6]
    model.eval()
    source.eval()
    with torch.no_grad():
        new, old = model.both(x)
        assert torch.equal(new, model.target(x))
        assert torch.allclose(old, source(x), atol=1e-6)
    assert old.shape == (6, source.num_classes)


# ---- LwF --------------------------------------------------------------------------------------------


def test_distillation_term_matches_a_hand_computation() -> None:
    # student [2, 0], teacher [0, 2], T = 2: y' = softmax([0, 1]) = [1, e] / (1 + e),
    # log y_hat' = log softmax([1, 0]) = [1 - log(1 + e), -log(1 + e)]  ->  L = log(1 + e) - 1 / (1 + e)
    e = math.e
    expected = math.log(1 + e) - 1 / (1 + e)
    got = distillation_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), 2.0)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # T = 1 is plain cross-entropy to the teacher's softmax:
    # y = [1, e^2] / (1 + e^2), log q = [2, 0] - log(1 + e^2)
    expected_t1 = math.log(1 + e**2) - 2 / (1 + e**2)
    got_t1 = distillation_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), 1.0)
    assert float(got_t1) == pytest.approx(expected_t1, rel=1e-6)
    # a uniform student costs log C whatever the teacher; the batch is averaged
    batch = distillation_loss(torch.zeros(2, 3), torch.tensor([[5.0, 0.0, -1.0], [0.0, 0.0, 9.0]]), 2.0)
    assert float(batch) == pytest.approx(math.log(3), rel=1e-6)


def test_lwf_reg_term_is_lambda_times_the_distillation_of_the_recorded_outputs(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    method, model = _build("lwf[lambda_o=0.5,temperature=3]", tiny_source)
    method.prepare(model, tiny_task)
    idx = torch.arange(8)
    x, y = tiny_task.train.x[idx], tiny_task.train.y[idx]
    with torch.no_grad():
        model.source_head.weight.add_(0.1)  # away from the source, so that L_old is not its minimum
        terms = method.loss_terms(model, x, y, index=idx)
        new, old = model.both(x)
        teacher = tiny_source(x)
    t = torch.softmax(teacher / 3, -1)
    expected = -0.5 * (t * torch.log_softmax(old / 3, -1)).sum(-1).mean()
    assert torch.allclose(terms["reg"], expected, atol=1e-6)
    assert torch.allclose(terms["task"], F.cross_entropy(new, y))


def test_lwf_records_the_source_outputs_once_and_they_never_change(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    method, model = _build("lwf", tiny_resnet_source)
    seen: list[torch.Tensor] = []

    def at_each_step(event: str, **_: object) -> None:
        if event == "on_before_optimizer_step":
            seen.append(method._recorded.clone())

    config = TrainConfig(epochs=3, batch_size=5, lr=0.05, patience=None)
    fit(model, method, tiny_task, config, callbacks=[at_each_step])
    tiny_resnet_source.eval()
    with torch.no_grad():
        expected = tiny_resnet_source(tiny_task.train.x)
    assert len(seen) == 3 * math.ceil(len(tiny_task.train) / 5)
    for recorded in seen:
        assert torch.equal(recorded, seen[0])
    assert torch.allclose(seen[0], expected, atol=1e-5)
    assert method._teacher is None  # the frozen copy is released once the outputs are recorded


def test_lwf_without_cache_asks_the_frozen_source_and_gets_the_recorded_values(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    cached, model = _build("lwf", tiny_resnet_source)
    cached.prepare(model, tiny_task)
    streaming = make_method("lwf")
    streaming.build(tiny_resnet_source, 5, arch="resnet20", in_shape=(1, 28, 28), seed=0)
    streaming.runtime = Runtime(augmenting=True)
    streaming.prepare(model, tiny_task)
    assert cached._recorded is not None and streaming._recorded is None
    idx = torch.tensor([3, 0, 7, 12])
    x, y = tiny_task.train.x[idx], tiny_task.train.y[idx]
    model.train()
    a = cached.loss_terms(model, x, y, index=idx)["reg"]
    b = streaming.loss_terms(model, x, y, index=idx)["reg"]
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "fixture"),
    [
        ("lwf[lambda_o=0]", "tiny_source"),
        ("lwf[lambda_o=0]", "tiny_resnet_source"),
        ("co_tuning[trade_off=0]", "tiny_source"),
        ("co_tuning[trade_off=0,relationship=reverse]", "tiny_resnet_source"),
    ],
)
def test_zero_coefficient_is_fine_tuning_exactly(
    spec: str, fixture: str, request: pytest.FixtureRequest, tiny_task: pt.Task
) -> None:
    source = request.getfixturevalue(fixture)
    method, model = _build(spec, source)
    ft_method, ft = _build("finetune", source)
    _fit(method, model, tiny_task)
    _fit(ft_method, ft, tiny_task)
    got, want = model.target.state_dict(), ft.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    x = tiny_task.test.x
    with torch.no_grad():
        assert torch.equal(method.predict(model.eval(), x), ft_method.predict(ft.eval(), x))


@pytest.mark.parametrize("spec", ["lwf", "dtnh:lwf", "co_tuning", "dtnh:co_tuning"])
def test_source_head_moves_but_predictions_and_export_are_the_new_heads(
    spec: str, tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    method, model = _build(spec, tiny_source)
    before = _state(model.source_head)
    _fit(method, model, tiny_task, epochs=2)
    after = model.source_head.state_dict()
    for k in before:  # at the first step L_old is at its minimum (see the method matrix); not later
        assert not torch.equal(after[k], before[k]), f"{spec}: source_head.{k} did not move"
    x = tiny_task.test.x
    model.eval()
    with torch.no_grad():
        new, old = model.both(x)
        assert torch.equal(method.predict(model, x), new)
        assert new.shape == (len(x), tiny_task.num_classes)
    exported = method.export(model)
    assert isinstance(exported, pt.LayeredNet) and exported is model.target
    assert "source_head.weight" not in exported.state_dict()


def test_dtnh_lwf_gives_the_source_head_exactly_the_regulariser_gradient(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    """The task gradient is zero on the source head, so DTNH's direction there is g_O itself (Eq. 7's
    projection removes only a multiple of g_J)."""
    method, model = _build("dtnh:lwf", tiny_resnet_source)
    method.prepare(model, tiny_task)
    with torch.no_grad():
        model.source_head.weight.mul_(0.5)
    idx = torch.arange(10)
    x, y = tiny_task.train.x[idx], tiny_task.train.y[idx]
    model.train()
    terms = method.loss_terms(model, x, y, index=idx)
    head = list(model.source_head.parameters())
    g_reg = torch.autograd.grad(terms["reg"], head, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in g_reg)
    method.backward(terms, model)
    for p, g in zip(head, g_reg, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-7)


def test_lwf_diagnostics_are_small_and_json(tiny_source: pt.LayeredNet, tiny_task: pt.Task) -> None:
    method, model = _build("lwf", tiny_source)
    method.prepare(model, tiny_task)
    diag = method.diagnostics(model, tiny_task)
    json.dumps(diag)
    assert diag["old_head_agreement"] == 1.0  # untrained: the source head is the source
    assert 0 < diag["old_head_distill"] <= math.log(tiny_source.num_classes) + 1e-6


# ---- Co-Tuning --------------------------------------------------------------------------------------


def test_direct_relationship_of_a_known_case() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 0, 1])
    got = direct_relationship(probs, labels, 3)
    expected = torch.tensor(
        [[0.6, 0.25, 0.15], [0.1, 0.1, 0.8], [1.3 / 3, 0.6 / 3, 1.1 / 3]]  # class 2 has no example: the mean
    )
    assert torch.allclose(got, expected, atol=1e-7)


def test_reverse_relationship_follows_bayes_rule_on_a_clear_case() -> None:
    # source class 0 and 2 are target class 1, source class 1 is target class 0; source class 2 is rarer
    probs = torch.tensor([[0.9, 0.05, 0.05]] * 4 + [[0.05, 0.9, 0.05]] * 4 + [[0.05, 0.05, 0.9]] * 2)
    labels = torch.tensor([1] * 4 + [0] * 4 + [1] * 2)
    r = reverse_relationship(probs, labels, 2)
    assert r.shape == (2, 3)
    assert torch.allclose(r.sum(1), torch.ones(2), atol=1e-6)
    assert int(r[0].argmax()) == 1 and float(r[0, 1]) > 0.9
    assert int(r[1].argmax()) == 0 and float(r[1, 0]) > float(r[1, 2]) > float(r[1, 1])


@pytest.mark.parametrize("relationship", ["direct", "reverse"])
def test_co_tuning_learns_the_relationship_from_the_sources_predictions(
    relationship: str, tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    method, model = _build(f"co_tuning[relationship={relationship}]", tiny_resnet_source)
    method.prepare(model, tiny_task)
    tiny_resnet_source.eval()
    with torch.no_grad():
        probs = torch.softmax(tiny_resnet_source(tiny_task.train.x), -1)
    learn = direct_relationship if relationship == "direct" else reverse_relationship
    expected = learn(probs, tiny_task.train.y, tiny_task.num_classes)
    assert torch.allclose(method.relationship, expected, atol=1e-5)
    assert method._teacher is None


def test_co_tuning_reg_term_is_the_cross_entropy_to_the_soft_source_labels(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    method, model = _build("co_tuning[trade_off=1.5]", tiny_source)
    method.relationship = torch.tensor(  # a hand-made p(y_s | y_t): 5 target x 5 source classes
        [
            [1.0, 0, 0, 0, 0],
            [0, 0.5, 0.5, 0, 0],
            [0.2, 0.2, 0.2, 0.2, 0.2],
            [0, 0, 0, 0, 1.0],
            [0, 0, 0.25, 0.75, 0],
        ]
    )
    x, y = tiny_task.train.x[:4], torch.tensor([0, 1, 2, 4])
    with torch.no_grad():
        terms = method.loss_terms(model, x, y)
        new, old = model.both(x)
    log_q = torch.log_softmax(old, -1)
    by_hand = [
        -log_q[0, 0],
        -0.5 * (log_q[1, 1] + log_q[1, 2]),
        -0.2 * log_q[2].sum(),
        -(0.25 * log_q[3, 2] + 0.75 * log_q[3, 3]),
    ]
    assert torch.allclose(terms["reg"], 1.5 * torch.stack(by_hand).mean(), atol=1e-6)
    assert torch.allclose(terms["task"], F.cross_entropy(new, y))


def test_co_tuning_diagnostics_name_each_target_class_top_source_class(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    method, model = _build("co_tuning", tiny_source)
    method.relationship = torch.tensor([[0.5, 0.5, 0, 0, 0], [0, 0, 0, 0, 1.0]] + [[0.2] * 5] * 3)
    method.source_class_names = ["a", "b", "c", "d", "e"]
    diag = method.diagnostics(model, tiny_task)
    json.dumps(diag)
    assert diag["top_source_class"][:2] == [0, 4] and diag["top_source_name"][:2] == ["a", "e"]
    assert diag["top_source_prob"][:2] == [0.5, 1.0]
    assert diag["relationship_entropy"][0] == pytest.approx(math.log(2))
    assert diag["relationship_entropy"][1] == 0.0
    assert diag["relationship_entropy"][2] == pytest.approx(math.log(5))
    assert diag["relationship_uniform_entropy"] == pytest.approx(math.log(5))


def test_co_tuning_run_is_deterministic(tiny_source: pt.LayeredNet, tiny_task: pt.Task) -> None:
    a = pt.run("co_tuning[relationship=reverse]", source=tiny_source, target=tiny_task, lr=0.05, epochs=1)
    b = pt.run("co_tuning[relationship=reverse]", source=tiny_source, target=tiny_task, lr=0.05, epochs=1)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert a.test_accuracy == b.test_accuracy
    assert a.diagnostics["top_source_class"] == b.diagnostics["top_source_class"]
    assert a.diagnostics["relationship"] == "reverse"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("lwf[lambda_o=-1]", "lambda_o=-1"),
        ("lwf[lambda_o=inf]", "lambda_o=inf"),
        ("lwf[lambda_o=abc]", "lambda_o='abc'"),
        ("lwf[temperature=0]", "temperature=0"),
        ("lwf[temperature=true]", "temperature=True"),
        ("co_tuning[trade_off=-0.5]", "trade_off=-0.5"),
        ("co_tuning[relationship=inverse]", "relationship='inverse'"),
    ],
)
def test_bad_options_are_user_errors(spec: str, needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace("[", r"\[")):
        make_method(spec)


def test_a_source_whose_head_is_not_linear_is_refused(tiny_source: pt.LayeredNet) -> None:
    import copy

    odd = copy.deepcopy(tiny_source)
    odd.head = torch.nn.Sequential(odd.head)
    with pytest.raises(UserError, match="must be nn.Linear"):
        _build("co_tuning", odd)
