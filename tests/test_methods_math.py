"""Per-method math, checked by hand: L2-SP and KnowDist (DTNH paper Eqs. 2-3), FT-l / last-k /
stochastic freezing, linear probe, scratch, K-NN's choice of K, random guess, and method specs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paramtransfer as pt
from paramtransfer.data.task import Split, Task
from paramtransfer.methods.base import (
    Method,
    make_method,
    parse_method_spec,
    split_method_list,
)
from paramtransfer.methods.baselines import Finetune
from paramtransfer.methods.regularizers import feature_distance
from paramtransfer.train.trainer import TrainConfig, fit, keep_frozen_batchnorm


def _build(method: Method, source: pt.LayeredNet, num_classes: int = 5, seed: int = 0) -> nn.Module:
    return method.build(source, num_classes, arch=source.arch, in_shape=source.in_shape, seed=seed)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _trainable_blocks(model: pt.LayeredNet) -> list[int]:
    out = []
    for i, block in enumerate(model.blocks):
        flags = {p.requires_grad for p in block.parameters()}
        assert len(flags) == 1, f"block {i} is partly frozen"
        if flags == {True}:
            out.append(i)
    return out


def _train(model: nn.Module, method: Method, task: pt.Task, epochs: int = 2, batch_size: int = 8) -> None:
    fit(model, method, task, TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.1, patience=None))


# ---- L2-SP (DTNH Eq. 2) ------------------------------------------------------------------------------


def test_l2sp_regularizer_matches_hand_computation(tiny_source: pt.LayeredNet) -> None:
    alpha, beta, d = 0.3, 0.05, 0.1
    method = make_method("l2sp", alpha=alpha, beta=beta)
    model = _build(method, tiny_source)
    n_block = sum(p.numel() for p in model.blocks.parameters())
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.add_(d)
        model.head.weight.fill_(0.5)
        model.head.bias.fill_(-0.2)
    n_w, n_b = model.head.weight.numel(), model.head.bias.numel()
    expected = alpha / 2 * n_block * d**2 + beta / 2 * (0.25 * n_w + 0.04 * n_b)
    assert method.regularizer().item() == pytest.approx(expected, rel=1e-4)
    terms = method.loss_terms(model, torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]))
    assert terms["reg"].item() == pytest.approx(expected, rel=1e-4)
    # the neck has no parameters and nothing else is regularised: only the head term is left at w = w_s
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.sub_(d)
    assert method.regularizer().item() == pytest.approx(beta / 2 * (0.25 * n_w + 0.04 * n_b), rel=1e-4)


def test_l2sp_starts_at_the_source_so_only_the_head_term_is_nonzero(
    tiny_resnet_source: pt.LayeredNet,
) -> None:
    method = make_method("l2sp", alpha=1.0, beta=0.2)
    model = _build(method, tiny_resnet_source)
    for p, a, s in zip(model.blocks.parameters(), method.anchors, tiny_resnet_source.blocks.parameters()):
        assert torch.equal(p, s) and torch.equal(a, s)
    head_sq = sum(float((p.detach() ** 2).sum()) for p in model.head.parameters())
    assert head_sq > 0
    assert method.regularizer().item() == pytest.approx(0.1 * head_sq, rel=1e-5)
    zero = make_method("l2sp", alpha=1.0, beta=0.0)
    _build(zero, tiny_resnet_source)
    assert zero.regularizer().item() == 0.0


def test_l2sp_closed_form_gradient_equals_autograd(tiny_source: pt.LayeredNet) -> None:
    method = make_method("l2sp", alpha=0.7, beta=0.03)
    model = _build(method, tiny_source)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    params = list(model.parameters())
    auto = torch.autograd.grad(method.regularizer(), params)
    closed = method.reg_gradients()
    assert {id(p) for p in closed} == {id(p) for p in params}
    for p, g in zip(params, auto):
        assert g.abs().sum() > 0
        torch.testing.assert_close(closed[p], g, rtol=1e-5, atol=1e-7)


def test_l2sp_anchors_stay_at_the_source_while_the_weights_move(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    method = make_method("l2sp", alpha=0.5)
    model = _build(method, tiny_source)
    _train(model, method, tiny_task)
    source_params = list(tiny_source.blocks.parameters())
    assert all(torch.equal(a, s) for a, s in zip(method.anchors, source_params))
    assert any(not torch.equal(p, s) for p, s in zip(model.blocks.parameters(), source_params))
    assert method.regularizer().item() > 0


# ---- KnowDist (DTNH Eq. 3) ---------------------------------------------------------------------------


def test_feature_distance_matches_hand_computation() -> None:
    target = [torch.ones(2, 3), torch.zeros(2, 2, 2)]
    source = [torch.zeros(2, 3), torch.full((2, 2, 2), 2.0)]
    # layer 0: 2 examples x 3 elements x 1^2 = 6; layer 1: 2 x 4 x 2^2 = 32; divided by n = 2
    assert float(feature_distance(target, source, [0, 1])) == pytest.approx(19.0)
    assert float(feature_distance(target, source, [1])) == pytest.approx(16.0)
    assert float(feature_distance(target, source, [0])) == pytest.approx(3.0)
    # per example: (1 + 4) for the first, 0 for the second, averaged over n = 2
    assert float(feature_distance([torch.tensor([[1.0, 2.0], [0.0, 0.0]])], [torch.zeros(2, 2)], [0])) == 2.5
    assert float(feature_distance(source, source, [0, 1])) == 0.0


def test_knowdist_reg_is_zero_at_initialisation(
    tiny_source: pt.LayeredNet, tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    x, y = tiny_task.train.x[:8], tiny_task.train.y[:8]
    method = make_method("knowdist", beta=1.0)
    model = _build(method, tiny_source)
    model.train()
    terms = method.loss_terms(model, x, y)
    assert terms["reg"].item() == 0.0
    assert terms["task"].item() > 0
    # BatchNorm: compared in eval mode (in training mode the target normalises by batch statistics)
    model = _build(method, tiny_resnet_source)
    model.eval()
    assert method.loss_terms(model, x, y)["reg"].item() == 0.0


def test_knowdist_reg_matches_a_hand_computed_feature_distance(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    beta = 0.25
    method = make_method("knowdist", beta=beta)
    model = _build(method, tiny_source)
    with torch.no_grad():
        model.target.blocks[1][0].weight.mul_(1.5)
    x, y = tiny_task.train.x[:6], tiny_task.train.y[:6]
    reg = method.loss_terms(model, x, y)["reg"].item()
    expected = 0.0
    with torch.no_grad():
        for i in range(len(x)):
            ft, fs = model.target.features(x[i : i + 1]), model.source.features(x[i : i + 1])
            expected += sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(ft, fs))
    assert reg > 0
    assert reg == pytest.approx(beta * expected / len(x), rel=1e-4)


def test_knowdist_layers_select_which_block_outputs_are_compared(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    x, y = tiny_task.train.x[:6], tiny_task.train.y[:6]
    regs = {}
    for layers in ([0, 1], [3], [-1]):
        method = make_method("knowdist", beta=1.0, layers=layers)
        model = _build(method, tiny_source)
        with torch.no_grad():
            model.target.blocks[3][0].bias.add_(1.0)  # only the last block's output changes
        regs[str(layers)] = method.loss_terms(model, x, y)["reg"].item()
    assert regs["[0, 1]"] == 0.0
    assert regs["[3]"] > 0 and regs["[-1]"] == regs["[3]"]
    with pytest.raises(pt.UserError, match="outside"):
        _build(make_method("knowdist", layers=[4]), tiny_source)


def test_knowdist_with_no_layers_is_rejected_or_is_plain_finetuning(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    try:
        method = make_method("knowdist", layers=[])
    except pt.UserError:
        return
    model = _build(method, tiny_source)
    terms = method.loss_terms(model, tiny_task.train.x[:4], tiny_task.train.y[:4])
    assert isinstance(terms["reg"], torch.Tensor) and terms["reg"].item() == 0.0
    _train(model, method, tiny_task, epochs=1)


def test_knowdist_source_copy_never_changes(tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task) -> None:
    fixture_state = _state(tiny_resnet_source)
    method = make_method("knowdist", beta=0.01)
    model = _build(method, tiny_resnet_source)
    # real copies: neither the caller's source nor the target share storage with the frozen source
    ptrs = {p.data_ptr() for p in model.source.parameters()}
    assert ptrs.isdisjoint(p.data_ptr() for p in tiny_resnet_source.parameters())
    assert ptrs.isdisjoint(p.data_ptr() for p in model.target.parameters())
    source_before, target_before = _state(model.source), _state(model.target)
    assert any("running_mean" in k for k in source_before)
    _train(model, method, tiny_task)
    for k, v in model.source.state_dict().items():
        assert torch.equal(v, source_before[k]), f"frozen source {k} moved"
    moved = [k for k, v in model.target.state_dict().items() if not torch.equal(v, target_before[k])]
    assert any("running_mean" in k for k in moved) and any(k.endswith("weight") for k in moved)
    for k, v in tiny_resnet_source.state_dict().items():
        assert torch.equal(v, fixture_state[k])
    assert method.export(model) is model.target


# ---- FT-l, last-k, stochastic ------------------------------------------------------------------------


def test_finetune_freeze_l_freezes_exactly_the_first_l_blocks(
    tiny_source: pt.LayeredNet, tiny_resnet_source: pt.LayeredNet
) -> None:
    for source in (tiny_source, tiny_resnet_source):
        n = source.num_blocks
        for frozen in range(n + 1):
            method = make_method(f"finetune[freeze={frozen}]")
            model = _build(method, source)
            assert _trainable_blocks(model) == list(range(frozen, n))
            assert all(p.requires_grad for p in model.head.parameters())
            optimized = {id(p) for g in method.param_groups(model) for p in g["params"]}
            assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
            assert method.diagnostics(model, None) == {"frozen_blocks": list(range(frozen))}
            assert method.variant() == ("finetune" if frozen == 0 else f"finetune[freeze={frozen}]")


def test_finetune_freeze_all_expands_to_every_l(tiny_source: pt.LayeredNet) -> None:
    n = tiny_source.num_blocks
    assert Finetune.expand({"freeze": "all"}, tiny_source) == [{"freeze": f} for f in range(1, n)]
    assert Finetune.expand({"freeze": 2}, tiny_source) == [{"freeze": 2}]
    with pytest.raises(pt.UserError):
        Finetune.expand({"freeze": "all"}, None)
    with pytest.raises(pt.UserError, match="sweep"):
        _build(make_method("finetune[freeze=all]"), tiny_source)


def test_finetune_freeze_beyond_the_blocks_is_a_user_error(tiny_source: pt.LayeredNet) -> None:
    n = tiny_source.num_blocks
    with pytest.raises(pt.UserError, match=f"only {n} blocks"):
        _build(make_method(f"finetune[freeze={n + 1}]"), tiny_source)
    with pytest.raises(pt.UserError, match=f"only {n} blocks"):
        _build(make_method(f"finetune[last_k={n + 1}]"), tiny_source)


@pytest.mark.parametrize(
    "options",
    [
        {"freeze": -1},
        {"freeze": "some"},
        {"last_k": -1},
        {"freeze": 1, "last_k": 1},
        {"freeze": 1, "stochastic": True},
    ],
)
def test_finetune_rejects_bad_or_conflicting_options(options: dict) -> None:
    with pytest.raises(pt.UserError):
        make_method("finetune", **options)


def test_finetune_rejects_a_fractional_freeze() -> None:
    # freeze=2.5 must not silently become FT-2
    with pytest.raises(pt.UserError):
        make_method("finetune[freeze=2.5]")


def test_finetune_last_k_trains_exactly_the_last_k_blocks_and_the_head(
    tiny_resnet_source: pt.LayeredNet,
) -> None:
    n = tiny_resnet_source.num_blocks
    for k in (0, 1, 3, n):
        model = _build(make_method("finetune", last_k=k), tiny_resnet_source)
        assert _trainable_blocks(model) == list(range(n - k, n))
        assert all(p.requires_grad for p in model.head.parameters())


def test_finetune_stochastic_freezes_half_the_blocks_chosen_by_the_seed(
    tiny_source: pt.LayeredNet, tiny_resnet_source: pt.LayeredNet
) -> None:
    for source in (tiny_source, tiny_resnet_source):
        n = source.num_blocks
        choices = set()
        for seed in range(6):
            a, b = make_method("finetune[stochastic=true]"), make_method("finetune[stochastic=true]")
            model = _build(a, source, seed=seed)
            _build(b, source, seed=seed)
            assert a.frozen == b.frozen
            assert len(a.frozen) == n // 2 == len(set(a.frozen))
            assert sorted(set(range(n)) - set(_trainable_blocks(model))) == a.frozen
            choices.add(tuple(a.frozen))
        assert len(choices) > 1, "the frozen blocks do not depend on the seed"


# ---- linear probe, scratch ---------------------------------------------------------------------------


def test_linear_probe_trains_only_the_head_and_keeps_batchnorm_stats(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    method = make_method("linear_probe")
    model = _build(method, tiny_resnet_source)
    assert _trainable_blocks(model) == []
    before = _state(model)
    _train(model, method, tiny_task)
    after = model.state_dict()
    for k, v in after.items():
        if k.startswith("head."):
            assert not torch.equal(v, before[k]), f"head {k} did not train"
        else:
            assert torch.equal(v, before[k]), f"{k} changed under a linear probe"


def test_frozen_batchnorm_is_put_in_eval_mode_by_the_trainer(tiny_resnet_source: pt.LayeredNet) -> None:
    model = _build(make_method("finetune[freeze=1]"), tiny_resnet_source)
    model.train()
    keep_frozen_batchnorm(model)
    bns = [(i, m) for i, b in enumerate(model.blocks) for m in b.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training == (i >= 1) for i, m in bns)


def test_scratch_does_not_start_from_the_source(
    tiny_source: pt.LayeredNet, tiny_resnet_source: pt.LayeredNet
) -> None:
    for source in (tiny_source, tiny_resnet_source):
        model = _build(make_method("scratch"), source, num_classes=3, seed=0)
        assert model.arch == source.arch and model.num_classes == 3
        src = dict(source.named_parameters())
        weights = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("head")]
        assert weights
        for n, p in weights:
            assert p.shape == src[n].shape
            assert not torch.equal(p, src[n]), f"scratch copied the source's {n}"
        again = _build(make_method("scratch"), source, num_classes=3, seed=0)
        other = _build(make_method("scratch"), source, num_classes=3, seed=1)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
        assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def test_scratch_without_a_source_needs_an_arch() -> None:
    scratch = make_method("scratch")
    model = scratch.build(None, 4, arch="lenet", in_shape=(1, 28, 28), seed=0)
    assert model.arch == "lenet" and model(torch.zeros(2, 1, 28, 28)).shape == (2, 4)
    with pytest.raises(pt.UserError, match="arch"):
        scratch.build(None, 4, arch=None, in_shape=(1, 28, 28), seed=0)  # type: ignore[arg-type]
    with pytest.raises(pt.UserError, match="source"):
        make_method("finetune").build(None, 4, arch="lenet", in_shape=(1, 28, 28), seed=0)


# ---- K-NN and random guess ---------------------------------------------------------------------------


def _points(values: list[float], labels: list[int]) -> Split:
    return Split(torch.tensor(values).reshape(-1, 1, 1, 1), torch.tensor(labels))


def _hand_task(train: Split, val: Split, test: Split, classes: int = 2) -> Task:
    return Task(spec="hand", classes=tuple(str(c) for c in range(classes)), train=train, val=val, test=test)


def test_knn_picks_k_1_when_one_neighbour_is_best() -> None:
    # one example of class 0 at 0; ten of class 1 near 10: any K >= 3 outvotes the lone class-0 point
    train = _points([0.0] + [10.0 + 0.1 * i for i in range(10)], [0] + [1] * 10)
    task = _hand_task(train, _points([0.05, 10.05], [0, 1]), _points([0.02, 0.1, 9.9], [0, 0, 1]))
    res = make_method("knn[features=raw]").fit_evaluate(None, task, seed=0)
    assert res["diagnostics"]["k"] == 1
    assert res["diagnostics"]["val_accuracy_per_k"] == {"1": 1.0, "3": 0.5, "5": 0.5, "10": 0.5}
    assert res["val_accuracy"] == 1.0 and res["test_accuracy"] == 1.0


def test_knn_picks_the_k_that_maximises_val_accuracy_smallest_on_ties() -> None:
    # a mislabelled point sits next to the class-0 validation point: K=1 is fooled, K=3 and K=5 are not,
    # K=10 takes every training point (6 of class 1)
    train = _points([0.0, 0.1, 0.2, 0.3, 0.4] + [10.0 + 0.1 * i for i in range(5)], [1, 0, 0, 0, 0] + [1] * 5)
    task = _hand_task(train, _points([0.01, 10.01], [0, 1]), _points([0.25, 10.2], [0, 1]))
    res = make_method("knn", features="raw").fit_evaluate(None, task, seed=0)
    per_k = res["diagnostics"]["val_accuracy_per_k"]
    assert per_k == {"1": 0.5, "3": 1.0, "5": 1.0, "10": 0.5}
    assert res["diagnostics"]["k"] == 3
    assert res["val_accuracy"] == max(per_k.values()) and res["test_accuracy"] == 1.0
    # K larger than the training set is skipped; if every K is, the user is told
    small = make_method("knn", features="raw", ks=[1, 100]).fit_evaluate(None, task, seed=0)
    assert small["diagnostics"]["val_accuracy_per_k"] == {"1": 0.5}
    with pytest.raises(pt.UserError, match="exceeds"):
        make_method("knn", features="raw", ks=[50]).fit_evaluate(None, task, seed=0)


def test_knn_on_source_features_needs_a_source(tiny_task: pt.Task) -> None:
    with pytest.raises(pt.UserError, match="source"):
        make_method("knn").fit_evaluate(None, tiny_task, seed=0)


@pytest.mark.parametrize("num_classes", [2, 10])
def test_random_guess_is_right_one_time_in_c(num_classes: int) -> None:
    n = 20_000
    y = torch.arange(n) % num_classes
    split = Split(torch.zeros(n, 1, 1, 1), y)
    task = _hand_task(
        split, split, Split(torch.zeros(n, 1, 1, 1), torch.zeros(n, dtype=torch.long)), num_classes
    )
    method = make_method("random_guess")
    res = method.fit_evaluate(None, task, seed=0)
    # binomial standard deviation <= 0.0036 at n = 20000: 4 sigma
    for key in ("val_accuracy", "test_accuracy"):
        assert abs(res[key] - 1 / num_classes) < 0.015
    assert res["diagnostics"]["expected_accuracy"] == pytest.approx(1 / num_classes)
    assert method.fit_evaluate(None, task, seed=0) == res
    assert method.fit_evaluate(None, task, seed=1)["val_accuracy"] != res["val_accuracy"]


# ---- method specs ------------------------------------------------------------------------------------


def test_parse_method_spec_reads_names_and_typed_options() -> None:
    assert parse_method_spec("finetune") == ("finetune", {})
    assert parse_method_spec(" finetune[freeze=2] ") == ("finetune", {"freeze": 2})
    assert parse_method_spec("l2sp[alpha=0.1, beta=0.01]") == ("l2sp", {"alpha": 0.1, "beta": 0.01})
    assert parse_method_spec("finetune[stochastic=true]") == ("finetune", {"stochastic": True})
    assert parse_method_spec("finetune[freeze=all]") == ("finetune", {"freeze": "all"})


def test_parse_method_spec_reads_list_options() -> None:
    # knn's own error message tells users to write ks=[1,3,5,10]
    assert parse_method_spec("knn[ks=[1,3,5]]") == ("knn", {"ks": [1, 3, 5]})
    assert parse_method_spec("knowdist[beta=0.1,layers=[0,2]]") == (
        "knowdist",
        {"beta": 0.1, "layers": [0, 2]},
    )


def test_parse_method_spec_reads_exponent_numbers() -> None:
    # YAML 1.1 reads "1e-3" as a string; a learning-rate-like value must still be a number
    assert make_method("l2sp[alpha=1e-3]").config.alpha == pytest.approx(1e-3)


@pytest.mark.parametrize("spec", ["finetune[freeze=2", "finetune[2]", "finetune[=2]"])
def test_parse_method_spec_rejects_malformed_specs(spec: str) -> None:
    with pytest.raises(pt.UserError, match="key=value|name\\[key=value"):
        parse_method_spec(spec)


def test_split_method_list_splits_only_outside_brackets() -> None:
    text = "scratch, finetune[freeze=1,last_k=2],l2sp ,knn[ks=[1,3]],"
    assert split_method_list(text) == ["scratch", "finetune[freeze=1,last_k=2]", "l2sp", "knn[ks=[1,3]]"]
    assert split_method_list("") == []


def test_make_method_errors_name_what_exists() -> None:
    with pytest.raises(pt.UserError, match="unknown method 'nope'") as err:
        make_method("nope")
    for name in pt.list_methods():
        assert name in str(err.value)
    with pytest.raises(pt.UserError, match="no option 'frz'") as err:
        make_method("finetune[frz=1]")
    assert "freeze, last_k, stochastic" in str(err.value)
    with pytest.raises(pt.UserError, match="no option 'gamma'.*alpha, beta"):
        make_method("l2sp", gamma=1.0)
    with pytest.raises(pt.UserError):
        make_method("l2sp[alpha=-1]")
    with pytest.raises(pt.UserError):
        make_method("l2sp[alpha=abc]")


def test_make_method_keyword_options_override_the_spec() -> None:
    method = make_method("l2sp[alpha=0.5,beta=0.2]", beta=0.3)
    assert (method.config.alpha, method.config.beta) == (0.5, 0.3)
    assert method.variant() == "l2sp[alpha=0.5,beta=0.3]"
    assert make_method(method) is method
    assert make_method("l2sp").variant() == "l2sp"


def test_task_loss_is_plain_cross_entropy(tiny_source: pt.LayeredNet, tiny_task: pt.Task) -> None:
    method = make_method("finetune")
    model = _build(method, tiny_source)
    model.eval()
    x, y = tiny_task.train.x[:8], tiny_task.train.y[:8]
    terms = method.loss_terms(model, x, y)
    assert set(terms) == {"task"}
    torch.testing.assert_close(terms["task"], F.cross_entropy(copy.deepcopy(model)(x), y))


def test_variant_names_parse_back_into_the_same_method() -> None:
    from paramtransfer.methods.base import make_method

    for spec in ["ptu[layers=[1,2,3],group_filter=0.0001]", "knn[ks=[1,5]]", "finetune[freeze=2]", "l2sp"]:
        variant = make_method(spec).variant()
        assert make_method(variant).variant() == variant
        assert make_method(variant).config == make_method(spec).config
