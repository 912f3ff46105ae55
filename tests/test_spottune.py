"""SpotTune (Guo et al. 2019): Eq. 2 with the DESIGN erratum (I=1 -> fine-tuned copy), all-frozen and
all-fine-tuned routes against nets built by hand, masked per-example routing, the straight-through
Gumbel gradient, deterministic evaluation, frozen copies that never move, tau annealing across a
resume, the global-k losses (Eqs. 5-6), the compact export, diagnostics, wrapped models, config
errors, and the Visual Decathlon score."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paramtransfer as pt
from paramtransfer.errors import UserError
from paramtransfer.experiments.run import train_model
from paramtransfer.methods.base import make_method
from paramtransfer.methods.spottune import SpotTuneNet, _sample, global_losses, routable_blocks
from paramtransfer.metrics import decathlon_score
from paramtransfer.models.zoo import BasicBlock
from paramtransfer.train.trainer import TrainConfig, fit, keep_frozen_batchnorm

ROUTED = 9  # the basic blocks of ResNet-20 (blocks 1..9; block 0 is the stem)


def _build(spec: str, source: pt.LayeredNet, num_classes: int = 5, seed: int = 0, **options):
    method = make_method(spec, **options)
    model = method.build(source, num_classes, arch=source.arch, in_shape=source.in_shape, seed=seed)
    return method, model


def _inputs(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _perturb(module: nn.Module, scale: float = 0.2, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def _chain(blocks: list[nn.Module], head: nn.Module, neck: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """head(neck(block_n(...block_1(x)))) run by hand."""
    h = x
    for b in blocks:
        h = b(h)
    return head(neck(h))


def _raise(*_args, **_kwargs):
    raise AssertionError("the policy network must not run here")


# ---- 1-3: Eq. 2 against nets assembled by hand ----------------------------------------------------


def test_resnet20_routes_its_nine_basic_blocks(tiny_resnet_source: pt.LayeredNet) -> None:
    _, model = _build("spottune", tiny_resnet_source)
    expected = [i for i, b in enumerate(tiny_resnet_source.blocks) if isinstance(b, BasicBlock)]
    assert model.routed == routable_blocks(tiny_resnet_source) == expected == list(range(1, 10))
    assert sorted(model.tuned.keys(), key=int) == [str(i) for i in expected]
    assert model.policy(_inputs(2)).shape == (2, ROUTED, 2)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_all_frozen_route_is_the_source_with_the_new_head(
    tiny_resnet_source: pt.LayeredNet, mode: str
) -> None:
    _, model = _build("spottune", tiny_resnet_source)
    _perturb(model.tuned)  # the frozen route must not see the tuned copies at all
    source = copy.deepcopy(tiny_resnet_source).eval()
    x = _inputs(6)
    with torch.no_grad():
        expected = _chain(list(source.blocks), model.net.head, model.net.neck, x)
        if mode == "eval":
            model.eval()
        else:
            model.train()
            keep_frozen_batchnorm(model)
        out = model(x, route=torch.zeros(6, ROUTED))
    assert torch.equal(out, expected)
    # the head is the new one, not the source's
    assert not torch.equal(model.net.head.weight, tiny_resnet_source.head.weight)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_all_finetuned_route_runs_the_tuned_copies(tiny_resnet_source: pt.LayeredNet, mode: str) -> None:
    _, model = _build("spottune", tiny_resnet_source)
    _perturb(model.tuned)
    x = _inputs(6)
    ones, zeros = torch.ones(6, ROUTED), torch.zeros(6, ROUTED)
    with torch.no_grad():
        if mode == "eval":
            model.eval()
            tuned = [model.tuned[str(i)] for i in model.routed]
        else:
            model.train()
            keep_frozen_batchnorm(model)
            # copies in training mode (batch statistics), so the model's own update of their running
            # statistics does not enter the reference
            tuned = [copy.deepcopy(model.tuned[str(i)]).train() for i in model.routed]
        expected = _chain([model.net.blocks[0], *tuned], model.net.head, model.net.neck, x)
        out = model(x, route=ones)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        model.eval()
        assert not torch.allclose(model(x, route=ones), model(x, route=zeros))


@pytest.mark.parametrize("channels_last", [False, True])
def test_mixed_route_in_eval_equals_each_example_alone(
    tiny_resnet_source: pt.LayeredNet, channels_last: bool
) -> None:
    _, model = _build("spottune", tiny_resnet_source)
    _perturb(model.tuned)
    model.eval()
    b = 6
    route = torch.tensor([[(r + j) % 2 for j in range(ROUTED)] for r in range(b)], dtype=torch.float32)
    route[4] = 1.0
    route[5] = 0.0  # but for the two columns below
    route[:, 7] = 0.0  # a block no example fine-tunes
    route[:, 8] = 1.0  # a block every example fine-tunes
    x = _inputs(b)
    with torch.no_grad():
        expected = []
        for n in range(b):  # each example through its own chain of blocks
            blocks = [model.net.blocks[0]] + [
                model.tuned[str(i)] if route[n, j] else model.net.blocks[i]
                for j, i in enumerate(model.routed)
            ]
            expected.append(_chain(blocks, model.net.head, model.net.neck, x[n : n + 1]))
        expected = torch.cat(expected)
        if channels_last:
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x, route=route)
        frozen = model(x, route=torch.zeros_like(route))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for n in range(b):  # every row fine-tunes block 9 at least, so no row is the frozen net
        assert not torch.allclose(out[n], frozen[n])


# ---- 4-5: training decisions and their gradient; deterministic evaluation ------------------------


def test_straight_through_gumbel_gives_the_policy_gradients(tiny_resnet_source: pt.LayeredNet) -> None:
    _, model = _build("spottune", tiny_resnet_source)
    _perturb(model.tuned, scale=0.05)
    model.train()
    keep_frozen_batchnorm(model)
    torch.manual_seed(0)
    x, y = _inputs(8), torch.arange(8) % 5
    loss = F.cross_entropy(model(x), y)
    route = model.route
    assert route.shape == (8, ROUTED)
    assert bool(((route == 0) | (route == 1)).all()), "training decisions must be exactly 0 or 1"
    assert route.requires_grad
    loss.backward()
    for name, p in model.policy.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"policy.{name} got no gradient"
    for name, p in model.tuned.named_parameters():
        assert p.grad is not None, f"tuned.{name} got no gradient"
    assert all(p.grad is None for p in model.net.blocks.parameters())


def test_eval_is_deterministic_argmax_of_the_policy(tiny_resnet_source: pt.LayeredNet) -> None:
    _, model = _build("spottune", tiny_resnet_source)
    _perturb(model.tuned)
    with torch.no_grad():  # spread the policy's logits so that both decisions occur
        model.policy.logits.bias.copy_(torch.randn(2 * ROUTED, generator=torch.Generator().manual_seed(3)))
    model.eval()
    x = _inputs(8)
    with torch.no_grad():
        out1, route1 = model(x), model.route.clone()
        out2, route2 = model(x), model.route.clone()
        argmax = model.policy(x).argmax(-1).float()
        by_route = model(x, route=argmax)
    assert torch.equal(out1, out2) and torch.equal(route1, route2)
    assert torch.equal(route1, argmax)
    assert torch.equal(out1, by_route)
    assert 0 < float(route1.mean()) < 1
    # training samples (Gumbel noise): the decisions vary between two forwards
    model.train()
    keep_frozen_batchnorm(model)
    torch.manual_seed(0)
    samples = []
    with torch.no_grad():
        for _ in range(3):
            model(x[:4])
            samples.append(model.route.clone())
    assert any(not torch.equal(samples[0], s) for s in samples[1:])


@pytest.mark.parametrize(("eval_route", "fill"), [("finetuned", 1.0), ("frozen", 0.0)])
def test_eval_route_options_behave_as_named(
    tiny_resnet_source: pt.LayeredNet, eval_route: str, fill: float
) -> None:
    _, model = _build("spottune", tiny_resnet_source, eval_route=eval_route)
    _perturb(model.tuned)
    model.eval()
    model.policy.forward = _raise  # the fixed routes never ask the policy
    x = _inputs(4)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(model.route, torch.full((4, ROUTED), fill))
        assert torch.equal(out, model(x, route=torch.full((4, ROUTED), fill)))


# ---- 6-8: training: frozen copies stay put, freeze_first, tau annealing ---------------------------


def test_frozen_copies_never_change_and_copies_share_no_storage(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    source_before = _snapshot(tiny_resnet_source)
    method, model = _build("spottune", tiny_resnet_source)
    frozen_before, tuned_before = _snapshot(model.net.blocks), _snapshot(model.tuned)
    groups = method.param_groups(model)
    assert [g.get("lr_mult", 1.0) for g in groups] == [1.0, 10.0]
    optimized = {id(p) for g in groups for p in g["params"]}
    assert not optimized & {id(p) for p in model.net.blocks.parameters()}
    fit(model, method, tiny_task, TrainConfig(epochs=2, batch_size=8, lr=0.1, patience=None), seed=0)
    _assert_same_state(model.net.blocks, frozen_before)  # parameters and BatchNorm statistics
    tuned_after = model.tuned.state_dict()
    changed = [k for k, v in tuned_before.items() if not torch.equal(tuned_after[k], v)]
    assert any(k.endswith("weight") for k in changed), "the fine-tuned copies did not train"
    ptrs = {t.data_ptr() for t in model.tuned.state_dict().values() if t.numel()}
    frozen_ptrs = {t.data_ptr() for t in model.net.blocks.state_dict().values() if t.numel()}
    source_ptrs = {t.data_ptr() for t in tiny_resnet_source.state_dict().values() if t.numel()}
    assert not ptrs & frozen_ptrs and not ptrs & source_ptrs and not frozen_ptrs & source_ptrs
    _assert_same_state(tiny_resnet_source, source_before)


def test_freeze_first_blocks_always_take_the_frozen_copy(tiny_resnet_source: pt.LayeredNet) -> None:
    k = 3
    for eval_route in ("policy", "finetuned"):
        method, model = _build("spottune", tiny_resnet_source, freeze_first=k, eval_route=eval_route)
        with torch.no_grad():  # a policy that wants every block fine-tuned, by a wide margin
            model.policy.logits.weight.zero_()
            model.policy.logits.bias.copy_(torch.tensor([-10.0, 10.0]).repeat(ROUTED))
        x = _inputs(6)
        model.train()
        keep_frozen_batchnorm(model)
        with torch.no_grad():
            model(x)
        assert torch.equal(model.route[:, :k], torch.zeros(6, k))
        assert torch.equal(model.route[:, k:], torch.ones(6, ROUTED - k))
        model.eval()
        with torch.no_grad():
            model(x)
        assert torch.equal(model.route[:, :k], torch.zeros(6, k))
        assert torch.equal(model.route[:, k:], torch.ones(6, ROUTED - k))
        assert torch.equal(method.routes(model, x)[:, :k], torch.zeros(6, k))


def test_tau_anneals_geometrically_and_resumes_from_the_model_state(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task, tmp_path
) -> None:
    tau, tau_min, anneal = 4.0, 0.5, 2

    def expected(e: int) -> float:
        return tau * (tau_min / tau) ** min(1.0, e / anneal)

    options = dict(tau=tau, tau_min=tau_min, anneal_epochs=anneal)
    cfg = dict(batch_size=8, lr=0.05, patience=None)
    ckpt = tmp_path / "ckpt.pt"
    method, model = _build("spottune", tiny_resnet_source, **options)
    assert "tau" in model.state_dict()
    first = fit(model, method, tiny_task, TrainConfig(epochs=1, **cfg), checkpoint=ckpt, fingerprint="tau")
    assert [r["tau"] for r in first.history] == pytest.approx([expected(0)])
    # a fresh model and method pick the schedule up from the checkpointed buffers
    method2, model2 = _build("spottune", tiny_resnet_source, **options)
    assert float(model2.tau) == pytest.approx(expected(0))
    out = fit(model2, method2, tiny_task, TrainConfig(epochs=2, **cfg), checkpoint=ckpt, fingerprint="tau")
    assert out.resumed_from_epoch == 1
    assert [r["tau"] for r in out.history] == pytest.approx([expected(0), expected(1)], rel=1e-6)
    assert tau > expected(1) > tau_min == pytest.approx(expected(2))
    # the same with a bare state_dict round trip
    method3, model3 = _build("spottune", tiny_resnet_source, **options)
    method4, model4 = _build("spottune", tiny_resnet_source, **options)
    method3.epoch_stats()
    model4.load_state_dict(model3.state_dict())
    assert method4.epoch_stats()["tau"] == pytest.approx(expected(1), rel=1e-6)
    assert float(model4.tau) == pytest.approx(expected(2), rel=1e-6)


@pytest.mark.parametrize("noise", [1.0, 0.5, 0.2])
def test_scaled_noise_samples_argmax_of_logits_plus_scaled_gumbel(noise: float) -> None:
    logits = torch.randn(64, 9, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    tau = 5.0
    torch.manual_seed(3)
    out = _sample(logits, tau, noise)
    torch.manual_seed(3)  # the same Gumbel draws as F.gumbel_softmax makes: -log(Exp(1))
    g = -torch.empty_like(logits).exponential_().log()
    y = logits.detach() + noise * g
    assert torch.equal(out.detach(), F.one_hot(y.argmax(-1), 2).float())
    # backward: the gradient of softmax((logits + s g) / tau), the straight-through estimator
    w = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * w).sum(), logits)
    soft = torch.softmax(y / tau, -1)
    expected = soft * (w - (soft * w).sum(-1, keepdim=True)) / tau
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_zero_noise_trains_the_argmax_routes_with_softmax_gradients() -> None:
    logits = torch.tensor([[[0.3, -0.2], [-1.0, 2.0]]], requires_grad=True)
    tau = 2.0
    out = _sample(logits, tau, 0.0)
    assert torch.equal(out.detach(), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    out[..., 1].sum().backward()
    # d softmax(l / tau)_1 / d l_1 = p0 p1 / tau, and the opposite for l_0
    p1 = torch.sigmoid((logits[..., 1] - logits[..., 0]) / tau).detach()
    expected = torch.stack([-p1 * (1 - p1) / tau, p1 * (1 - p1) / tau], -1)
    torch.testing.assert_close(logits.grad, expected)


def test_noise_anneals_linearly_and_training_routes_reach_the_eval_routes(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    method, model = _build("spottune", tiny_resnet_source, noise_final=0.0, anneal_epochs=4)
    assert [method.config.noise_at(e) for e in range(6)] == pytest.approx([1, 0.75, 0.5, 0.25, 0, 0])
    assert [make_method("spottune").config.noise_at(e) for e in (0, 9)] == [1.0, 1.0]
    stats = [method.epoch_stats()["noise"] for _ in range(5)]
    assert stats == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    assert float(model.noise) == 0.0 and "noise" in model.state_dict()
    x = tiny_task.train.x
    eval_routes = method.routes(model, x)
    model.train()
    model.policy.eval()  # the same BatchNorm statistics as at test time; only the noise could differ
    train_routes = model.decide(x).detach()
    assert torch.equal(train_routes, eval_routes)  # no noise: training follows the test-time routes
    method.config.noise_final = None
    model.noise.fill_(1.0)
    assert not torch.equal(model.decide(x).detach(), eval_routes)


# ---- 9-10: the compact global variant (Sec. 3.3) -------------------------------------------------


def test_global_losses_by_hand() -> None:
    route = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]], requires_grad=True)
    l_k, l_e = global_losses(route, 1)  # v = [1, 0, 0.5]
    assert l_k.item() == pytest.approx((1.5 - 1) ** 2)
    assert l_e.item() == pytest.approx(-(1 * math.log(1) + 0.5 * math.log(0.5)))  # 0 log 0 = 0
    (l_k + l_e).backward()
    assert torch.isfinite(route.grad).all()
    l_k3, l_e3 = global_losses(torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]), 3)
    assert float(l_k3) == pytest.approx(0.25)
    assert float(l_e3) == pytest.approx(-0.5 * math.log(0.5))
    assert float(global_losses(torch.zeros(4, 3), 0)[1]) == 0.0


def test_global_variant_settles_on_k_blocks_and_exports_them(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    freeze_first, k = 2, 3
    method, model = _build("spottune_global", tiny_resnet_source, freeze_first=freeze_first)
    assert method.k == k == ROUTED // 3  # the default: a third of the routed blocks
    out = fit(model, method, tiny_task, TrainConfig(epochs=2, batch_size=8, lr=0.1, patience=None), seed=0)
    chosen = [j for j, use in enumerate(model.global_route.tolist()) if use == 1.0]
    assert len(chosen) == k and model.global_route.sum() == k
    assert all(j >= freeze_first for j in chosen)
    usage = out.history[out.best_epoch - 1]["finetune_fraction_train"]  # the weights fit kept
    most_used = sorted(range(freeze_first, ROUTED), key=lambda j: (-usage[j], j))[:k]
    assert sorted(chosen) == sorted(most_used)

    model.eval()
    model.policy.forward = _raise  # no policy at test time
    x = tiny_task.test.x[:10].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(model.route, model.global_route.expand(10, -1))
        fixed = torch.zeros(10, ROUTED)
        fixed[:, chosen] = 1.0
        assert torch.equal(logits, model(x, route=fixed))
    diag = method.diagnostics(model, tiny_task)
    assert diag["global_route"] == model.global_route.tolist()
    assert diag["blocks_used_histogram"][k] == len(tiny_task.test.y)

    compact = method.export(model)
    assert type(compact) is pt.LayeredNet and not compact.training
    with torch.no_grad():
        torch.testing.assert_close(compact(x), logits)
    chosen_blocks = {model.routed[j] for j in chosen}
    for i, block in enumerate(compact.blocks):
        reference = model.tuned[str(i)] if i in chosen_blocks else model.net.blocks[i]
        state, ref = block.state_dict(), reference.state_dict()
        assert state.keys() == ref.keys() and all(torch.equal(state[n], ref[n]) for n in ref), i
        if i in chosen_blocks:  # and so differs from the frozen block it replaced
            frozen = model.net.blocks[i].state_dict()
            assert any(not torch.equal(state[n], frozen[n]) for n in frozen), i
        assert all(
            block_t.data_ptr() != ref_t.data_ptr() for block_t, ref_t in zip(state.values(), ref.values())
        )
    expected_params = sum(p.numel() for p in tiny_resnet_source.blocks.parameters()) + sum(
        p.numel() for p in model.net.head.parameters()
    )
    assert sum(p.numel() for p in compact.parameters()) == expected_params


def test_global_settle_by_hand(tiny_resnet_source: pt.LayeredNet) -> None:
    method, model = _build("spottune_global", tiny_resnet_source, freeze_first=2)
    # usage sums over an epoch of 10 examples; the first two blocks may never be chosen
    model.usage.copy_(torch.tensor([9.0, 9.0, 2.0, 8.0, 5.0, 1.0, 7.0, 0.0, 0.0, 10.0]))
    method.settle(model)
    assert model.global_route.tolist() == [0, 0, 0, 1, 1, 0, 1, 0, 0]
    model.usage.copy_(torch.tensor([0.0] * 9 + [10.0]))  # ties: the earliest free blocks
    method.settle(model)
    assert model.global_route.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0]
    model.usage.zero_()  # no training examples seen: the policy stays
    method.settle(model)
    assert model.global_route.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0]


def test_global_k_defaults_and_limits(tiny_resnet_source: pt.LayeredNet) -> None:
    assert _build("spottune_global", tiny_resnet_source)[0].k == 3
    assert _build("spottune_global", tiny_resnet_source, freeze_first=8)[0].k == 1
    assert _build("spottune_global", tiny_resnet_source, k=5, freeze_first=4)[0].k == 5
    with pytest.raises(UserError, match="k=6 exceeds the 5 blocks"):
        _build("spottune_global", tiny_resnet_source, k=6, freeze_first=4)
    with pytest.raises(UserError, match="k=10 exceeds the 9 blocks"):
        _build("spottune_global", tiny_resnet_source, k=10)
    for bad in (-1, 1.5, True):
        with pytest.raises(UserError, match="whole number"):
            make_method("spottune_global", k=bad)
    with pytest.raises(UserError, match="lambda_k and lambda_e"):
        make_method("spottune_global", lambda_e=-1.0)


# ---- 11: diagnostics of a run ---------------------------------------------------------------------


def test_run_diagnostics_fraction_and_histogram_agree(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    result, model = train_model(
        "spottune",
        source=tiny_resnet_source,
        target=tiny_task,
        lr=0.05,
        epochs=1,
        train_options={"batch_size": 8, "patience": None},
    )
    diag = result.diagnostics
    n = len(tiny_task.test.y)
    fraction, hist = diag["finetune_fraction"], diag["blocks_used_histogram"]
    assert len(fraction) == ROUTED and all(0.0 <= f <= 1.0 for f in fraction)
    assert len(hist) == ROUTED + 1 and sum(hist) == n and all(h >= 0 for h in hist)
    assert sum(fraction) * n == pytest.approx(sum(j * h for j, h in enumerate(hist)))
    assert "tau" in result.history[0]
    # recomputed from the policy's logits
    model.eval()
    with torch.no_grad():
        route = model.policy(tiny_task.test.x).argmax(-1)
    assert fraction == pytest.approx(route.float().mean(0).tolist())
    assert hist == torch.bincount(route.sum(1), minlength=ROUTED + 1).tolist()


# ---- 12: wrapped models (hooks) -------------------------------------------------------------------


def test_wrapped_model_routes_through_hooks(tiny_wrapped_source: pt.LayeredNet) -> None:
    _, model = _build("spottune", tiny_wrapped_source)
    assert isinstance(model, SpotTuneNet) and model.routed == [0, 1]
    _perturb(model.tuned)
    model.eval()
    x = _inputs(4)
    zeros, ones = torch.zeros(4, 2), torch.ones(4, 2)
    reference = copy.deepcopy(tiny_wrapped_source).eval()
    reference._set_head(copy.deepcopy(model.net.head))
    with torch.no_grad():
        frozen = model(x, route=zeros)
        assert torch.equal(frozen, model.net(x))  # hooks inactive outside SpotTuneNet.forward
        assert torch.equal(frozen, reference(x))
        finetuned = model(x, route=ones)
        assert not torch.allclose(finetuned, frozen)
        reference.module.conv1 = copy.deepcopy(model.tuned["0"])
        reference.module.conv2 = copy.deepcopy(model.tuned["1"])
        torch.testing.assert_close(finetuned, reference(x))
        mixed = model(x, route=torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
        torch.testing.assert_close(mixed[2], finetuned[2])
        torch.testing.assert_close(mixed[3], frozen[3])
        assert not torch.allclose(mixed[:2], frozen[:2]) and not torch.allclose(mixed[:2], finetuned[:2])


def test_wrapped_model_survives_deepcopy(tiny_wrapped_source: pt.LayeredNet) -> None:
    _, model = _build("spottune", tiny_wrapped_source)
    _perturb(model.tuned)
    model.eval()
    x, ones = _inputs(3), torch.ones(3, 2)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(x, route=ones), model(x, route=ones))


# ---- 13: configuration errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("spottune", {"tau": 0.0}, "tau > 0"),
        ("spottune", {"tau": -1.0}, "tau > 0"),
        ("spottune", {"tau": 1.0, "tau_min": 2.0}, "tau_min <= tau"),
        ("spottune", {"tau_min": 0.0}, "0 < tau_min"),
        ("spottune", {"anneal_epochs": 0}, "anneal_epochs must be >= 1"),
        ("spottune", {"noise_final": -0.1}, "noise_final must lie in [0, 1]"),
        ("spottune", {"noise_final": 1.5}, "noise_final must lie in [0, 1]"),
        ("spottune", {"policy_lr_mult": 0.0}, "policy_lr_mult"),
        ("spottune", {"freeze_first": -1}, "freeze_first >= 0"),
        ("spottune", {"eval_route": "sometimes"}, "use one of policy, finetuned, frozen"),
        ("spottune", {"eval_route": "global"}, "eval_route='global'"),
        ("spottune", {"no_such_option": 1}, "no option 'no_such_option'"),
    ],
)
def test_config_errors(spec: str, options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        make_method(spec, **options)


def test_build_errors_are_helpful(tiny_resnet_source: pt.LayeredNet, tiny_source: pt.LayeredNet) -> None:
    with pytest.raises(UserError, match="freeze_first=10 exceeds the 9 routed blocks"):
        _build("spottune", tiny_resnet_source, freeze_first=10)
    _build("spottune", tiny_resnet_source, freeze_first=ROUTED)  # every block frozen is allowed
    with pytest.raises(UserError, match="routes residual blocks; the lenet source has none"):
        _build("spottune", tiny_source)
    with pytest.raises(UserError, match="transfers from a source"):
        make_method("spottune").build(None, 5, arch="resnet20", in_shape=(1, 28, 28), seed=0)


# ---- 14: the Visual Decathlon score ---------------------------------------------------------------


def test_decathlon_score_by_hand() -> None:
    assert decathlon_score([0.0], [0.4]) == pytest.approx(1000.0)  # a perfect classifier
    assert decathlon_score([0.0, 0.0, 0.0], [0.1, 0.5, 1.0]) == pytest.approx(3000.0)
    assert decathlon_score([0.3], [0.3]) == 0.0  # as good as the baseline
    assert decathlon_score([0.6], [0.3]) == 0.0  # worse: no negative score
    assert decathlon_score([0.25], [0.5]) == pytest.approx(1000 / 0.25 * 0.0625) == pytest.approx(250.0)
    assert decathlon_score([0.25, 0.9, 0.0], [0.5, 0.5, 0.2]) == pytest.approx(1250.0)
    assert decathlon_score([], []) == 0.0


@pytest.mark.parametrize(
    ("errors", "baseline", "message"),
    [
        ([0.1, 0.2], [0.3], "2 errors but 1 baseline"),
        ([-0.1], [0.3], "errors in \\[0, 1\\]"),
        ([1.5], [0.3], "errors in \\[0, 1\\]"),
        ([0.1], [0.0], "baseline errors in \\(0, 1\\]"),
        ([0.1], [1.2], "baseline errors in \\(0, 1\\]"),
        ([float("nan")], [0.3], "errors in"),
    ],
)
def test_decathlon_score_rejects_bad_input(errors: list, baseline: list, message: str) -> None:
    with pytest.raises(UserError, match=message):
        decathlon_score(errors, baseline)
