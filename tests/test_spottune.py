"""SpotTune (Guo et al. 2019): Eq. 2 with the DESIGN erratum (I=1 -> fine-tuned copy), all-frozen and
all-fine-tuned routes against nets built by hand, masked per-example routing, the straight-through
Gumbel gradient, deterministic evaluation, frozen copies that never move, tau annealing across a
resume, the global-k losses (Eqs. 5-6), the compact export, diagnostics, wrapped models, config
errors, and the Visual Decathlon score. The Eq. 2 tests run on ResNet-20 (whole blocks routed) and on
EfficientNet-Lite0 at 32 px (MBConv blocks routed inside their stages); the routed units of torchvision's
ResNet-18 and MobileNetV2 are checked too."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paramtransfer as pt
from paramtransfer.errors import UserError
from paramtransfer.experiments.run import train_model
from paramtransfer.methods.base import make_method
from paramtransfer.methods.spottune import (
    SpotTune,
    SpotTuneNet,
    _sample,
    global_losses,
    routable_blocks,
    unit_key,
)
from paramtransfer.metrics import decathlon_score
from paramtransfer.models.zoo import BasicBlock
from paramtransfer.train.trainer import TrainConfig, fit, keep_frozen_batchnorm

ROUTED = 9  # the basic blocks of ResNet-20 (blocks 1..9; block 0 is the stem)
SMALL = (3, 32, 32)  # the input of the ImageNet architectures in these tests


def _imagenet_net(arch: str) -> pt.LayeredNet:
    """``arch`` at 32 px with random weights and BatchNorm statistics of random inputs, as a trained source
    has them: with the initial statistics (0, 1) the activations of these deep nets saturate in eval mode
    and every example gets the same logits, which would make the comparisons below vacuous."""
    net = pt.build_model(arch, num_classes=5, in_shape=SMALL, seed=0)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None  # a cumulative average: one batch sets the statistics to its own
    net.train()
    with torch.no_grad():
        net(_inputs(32, seed=9, shape=SMALL))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return net.eval()


def _assert_examples_differ(logits: torch.Tensor) -> None:
    assert not torch.allclose(logits[0], logits[1], rtol=0, atol=1e-3), "saturated: every example alike"


@pytest.fixture(scope="module")
def efficientnet_source() -> pt.LayeredNet:
    """EfficientNet-Lite0 (random weights) at 32 px: 9 MBConv blocks with an identity shortcut, in stages."""
    return _imagenet_net("efficientnet_lite0")


@pytest.fixture(params=["resnet20", "efficientnet_lite0"])
def routed_source(request: pytest.FixtureRequest) -> pt.LayeredNet:
    """ResNet-20 (blocks routed whole) and EfficientNet-Lite0 (children of stages routed)."""
    name = "tiny_resnet_source" if request.param == "resnet20" else "efficientnet_source"
    return request.getfixturevalue(name)


def _build(spec: str, source: pt.LayeredNet, num_classes: int = 5, seed: int = 0, **options):
    method = make_method(spec, **options)
    model = method.build(source, num_classes, arch=source.arch, in_shape=source.in_shape, seed=seed)
    return method, model


def _inputs(n: int, seed: int = 0, shape: tuple[int, ...] = (1, 28, 28)) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _perturb(module: nn.Module, scale: float = 0.2, seed: int = 1, relative: bool = False) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = scale * torch.randn(p.shape, generator=gen)
            if relative:
                p.mul_(1 + noise)
            else:
                p.add_(noise)


def _perturb_tuned(model: SpotTuneNet, scale: float = 0.2) -> None:
    """Move the fine-tuned copies away from the frozen ones: by ``scale * N(0, 1)`` in ResNet-20, by a factor
    ``1 + scale * N(0, 1)`` in the deep ImageNet nets (there an additive shift of 0.2 inflates the
    activations until a batch and its examples run alone part by far more than rounding)."""
    _perturb(model.tuned, scale, relative=model.net.arch != "resnet20")


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


def _blocks_with(model: SpotTuneNet, on: set, fresh: bool = False) -> list[nn.Module]:
    """The source net's blocks with the fine-tuned copies of the units ``on`` in place, assembled by hand: a
    stage with a routed child becomes a new ``nn.Sequential`` of the same modules. ``fresh``: deep copies
    of the fine-tuned copies in training mode (so a reference run leaves the model's statistics alone)."""

    def tuned(unit: tuple) -> nn.Module:
        t = model.tuned[unit_key(unit)]
        return copy.deepcopy(t).train() if fresh else t

    blocks: list[nn.Module] = []
    for i, block in enumerate(model.net.blocks):
        if (i, None) in on:
            blocks.append(tuned((i, None)))
        elif any(u[0] == i for u in on):
            blocks.append(nn.Sequential(*[tuned((i, j)) if (i, j) in on else b for j, b in enumerate(block)]))
        else:
            blocks.append(block)
    return blocks


def _raise(*_args, **_kwargs):
    raise AssertionError("the policy network must not run here")


# ---- 1-3: Eq. 2 against nets assembled by hand ----------------------------------------------------


def test_resnet20_routes_its_nine_basic_blocks(tiny_resnet_source: pt.LayeredNet) -> None:
    _, model = _build("spottune", tiny_resnet_source)
    expected = [i for i, b in enumerate(tiny_resnet_source.blocks) if isinstance(b, BasicBlock)]
    assert model.routed == routable_blocks(tiny_resnet_source) == [(i, None) for i in expected]
    assert expected == list(range(1, 10))
    assert sorted(model.tuned.keys(), key=int) == [str(i) for i in expected]
    assert model.policy(_inputs(2)).shape == (2, ROUTED, 2)
    method = make_method("spottune")
    diag = method.diagnostics(model, SimpleNamespace(test=_inputs(3)))
    assert diag["routed_blocks"] == expected  # plain block numbers, as results always had them


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18", "mobilenet_v2"])
def test_imagenet_nets_route_exactly_their_residual_blocks(arch: str) -> None:
    source = _imagenet_net(arch)
    residual = source.residual_blocks()
    method, model = _build("spottune", source)
    units = [(i, j) for i, j, _ in residual]
    assert model.routed == routable_blocks(source) == units
    assert len(units) == {"efficientnet_lite0": 9, "resnet18": 5, "mobilenet_v2": 10}[arch]
    if arch == "mobilenet_v2":  # the inverted residuals are blocks of their own
        assert all(j is None for _, j in units)
    else:  # children of the stages; the first MBConv / BasicBlock of a stage changes the shape
        assert all(j is not None and isinstance(source.blocks[i], nn.Sequential) for i, j in units)
        assert all(j > 0 for i, j in units if i > 1)
    keys = [str(i) if j is None else f"{i}_{j}" for i, j in units]
    assert list(model.tuned.keys()) == keys
    for (i, j, module), key in zip(residual, keys, strict=True):
        assert module.has_skip
        frozen = model.net.blocks[i] if j is None else model.net.blocks[i][j]
        copy_state, frozen_state = model.tuned[key].state_dict(), frozen.state_dict()
        assert copy_state.keys() == frozen_state.keys()
        assert all(torch.equal(copy_state[n], frozen_state[n]) for n in frozen_state)
        assert not {t.data_ptr() for t in copy_state.values()} & {t.data_ptr() for t in frozen_state.values()}
    for size in (32, 64):  # the policy reads the image at the size the pipeline gives
        assert model.policy(_inputs(2, shape=(3, size, size))).shape == (2, len(units), 2)
    _perturb_tuned(model)
    model.eval()
    x = _inputs(3, shape=SMALL)
    with torch.no_grad():
        frozen_out = model(x, route=torch.zeros(3, len(units)))
        assert torch.equal(frozen_out, model.net(x))  # the source's blocks with the new head
        expected = _chain(_blocks_with(model, set(units)), model.net.head, model.net.neck, x)
        finetuned_out = model(x, route=torch.ones(3, len(units)))
        assert torch.equal(finetuned_out, expected)
    _assert_examples_differ(frozen_out)
    _assert_examples_differ(finetuned_out)
    assert not torch.allclose(frozen_out, finetuned_out)
    labels = method.diagnostics(model, SimpleNamespace(test=x))["routed_blocks"]
    assert labels == [i if j is None else [i, j] for i, j in units]
    assert json.loads(json.dumps(labels)) == labels


def test_supported_archs_are_the_nets_with_residual_blocks() -> None:
    archs = [a for a in SpotTune.supported_archs if a != "wrapped"]
    assert {"resnet20", "efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v2"} <= set(archs)
    assert {"mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b3"} <= set(archs)
    for arch in archs:
        SpotTune.check_arch(arch)
        with torch.device("meta"):  # shapes only
            net = pt.build_model(arch, num_classes=5, in_shape=SMALL)
        assert routable_blocks(net), arch
    for arch in ("lenet", "mobilenet", "rnn"):
        with pytest.raises(UserError, match=f"not on {arch}; use --arch resnet20"):
            SpotTune.check_arch(arch)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_all_frozen_route_is_the_source_with_the_new_head(routed_source: pt.LayeredNet, mode: str) -> None:
    _, model = _build("spottune", routed_source)
    _perturb_tuned(model)  # the frozen route must not see the tuned copies at all
    source = copy.deepcopy(routed_source).eval()
    x = _inputs(6, shape=routed_source.in_shape)
    with torch.no_grad():
        if mode == "eval":
            model.eval()
        else:
            model.train()
            keep_frozen_batchnorm(model)
        torch.manual_seed(0)  # the same dropout mask in the neck (EfficientNet's) for both runs
        expected = _chain(list(source.blocks), model.net.head, model.net.neck, x)
        torch.manual_seed(0)
        out = model(x, route=torch.zeros(6, len(model.routed)))
    assert torch.equal(out, expected)
    # the head is the new one, not the source's
    assert not torch.equal(model.net.head.weight, routed_source.head.weight)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_all_finetuned_route_runs_the_tuned_copies(routed_source: pt.LayeredNet, mode: str) -> None:
    _, model = _build("spottune", routed_source)
    _perturb_tuned(model)
    x = _inputs(6, shape=routed_source.in_shape)
    n = len(model.routed)
    ones, zeros = torch.ones(6, n), torch.zeros(6, n)
    with torch.no_grad():
        if mode == "eval":
            model.eval()
        else:
            model.train()
            keep_frozen_batchnorm(model)
        # in training: copies in training mode (batch statistics), so the model's own update of their
        # running statistics does not enter the reference
        blocks = _blocks_with(model, set(model.routed), fresh=mode == "train")
        if routed_source.arch == "resnet20" and mode == "eval":  # the stem, then the fine-tuned copies
            assert blocks == [model.net.blocks[0], *(model.tuned[str(i)] for i in range(1, 10))]
        torch.manual_seed(0)
        expected = _chain(blocks, model.net.head, model.net.neck, x)
        torch.manual_seed(0)
        out = model(x, route=ones)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        model.eval()
        assert not torch.allclose(model(x, route=ones), model(x, route=zeros))


@pytest.mark.parametrize("channels_last", [False, True])
def test_mixed_route_in_eval_equals_each_example_alone(
    routed_source: pt.LayeredNet, channels_last: bool
) -> None:
    _, model = _build("spottune", routed_source)
    _perturb_tuned(model)
    model.eval()
    b, units = 6, len(model.routed)
    route = torch.tensor([[(r + j) % 2 for j in range(units)] for r in range(b)], dtype=torch.float32)
    route[4] = 1.0
    route[5] = 0.0  # but for the two columns below
    route[:, units - 2] = 0.0  # a block no example fine-tunes
    route[:, units - 1] = 1.0  # a block every example fine-tunes
    x = _inputs(b, shape=routed_source.in_shape)
    with torch.no_grad():
        expected = []
        for n in range(b):  # each example through its own chain of blocks
            on = {u for j, u in enumerate(model.routed) if route[n, j]}
            expected.append(_chain(_blocks_with(model, on), model.net.head, model.net.neck, x[n : n + 1]))
        expected = torch.cat(expected)
        if channels_last:
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x, route=route)
        frozen = model(x, route=torch.zeros_like(route))
    tol = 1e-5 if routed_source.arch == "resnet20" else 1e-4  # 30 layers more of batch-size rounding
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    _assert_examples_differ(out)
    for n in range(b):  # every row fine-tunes the last block at least, so no row is the frozen net
        assert not torch.allclose(out[n], frozen[n])


# ---- 4-5: training decisions and their gradient; deterministic evaluation ------------------------


def test_straight_through_gumbel_gives_the_policy_gradients(routed_source: pt.LayeredNet) -> None:
    _, model = _build("spottune", routed_source)
    _perturb_tuned(model, 0.05)
    model.train()
    keep_frozen_batchnorm(model)
    torch.manual_seed(0)
    x, y = _inputs(8, shape=routed_source.in_shape), torch.arange(8) % 5
    loss = F.cross_entropy(model(x), y)
    route = model.route
    assert route.shape == (8, ROUTED)  # nine units in both nets
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


def test_one_training_step_on_efficientnet_moves_only_tuned_copies_policy_and_head(
    efficientnet_source: pt.LayeredNet,
) -> None:
    method, model = _build("spottune", efficientnet_source)
    before = _snapshot(model)
    model.train()
    keep_frozen_batchnorm(model)  # as the trainer does
    groups = method.param_groups(model)
    optimizer = torch.optim.SGD([{"params": g["params"], "lr": 0.1 * g.get("lr_mult", 1.0)} for g in groups])
    torch.manual_seed(0)
    x, y = _inputs(8, shape=SMALL), torch.arange(8) % 5
    loss = method.loss_terms(model, x, y)["task"]
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    moved = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert all(k.startswith(("tuned.", "policy.", "net.head.")) or k == "usage" for k in moved), moved
    # the frozen copies, their BatchNorm statistics included, are bitwise what they were
    _assert_same_state(
        model.net.blocks, {k[len("net.blocks.") :]: v for k, v in before.items() if "blocks." in k}
    )
    assert {"net.head.weight", "net.head.bias", "policy.logits.weight"} <= moved
    assert any(k.startswith("tuned.") and k.endswith(".weight") for k in moved)
    for key in model.tuned:  # every fine-tuned copy ran (both paths in training): its statistics moved
        assert any(k.startswith(f"tuned.{key}.") and k.endswith("running_mean") for k in moved), key


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
    chosen_blocks = {model.routed[j][0] for j in chosen}
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


def test_global_export_on_efficientnet_gives_the_global_route_logits(
    efficientnet_source: pt.LayeredNet,
) -> None:
    method, model = _build("spottune_global", efficientnet_source)
    assert method.k == 3 and model.eval_route == "global"
    _perturb_tuned(model)
    wanted = [(4, 1), (4, 2), (6, 3)]  # two children of one stage, the last child of another
    usage = torch.zeros(len(model.routed) + 1)
    for unit in wanted:
        usage[model.routed.index(unit)] = 5.0
    usage[-1] = 6.0
    model.usage.copy_(usage)
    method.settle(model)
    assert [u for u, use in zip(model.routed, model.global_route.tolist(), strict=True) if use] == wanted
    model.eval()
    model.policy.forward = _raise  # no policy at test time
    x = _inputs(5, shape=SMALL)
    with torch.no_grad():
        logits = model(x)
        compact = method.export(model)
        assert type(compact) is type(efficientnet_source) and not compact.training
        assert torch.equal(compact(x), logits)
        assert not torch.allclose(logits, model(x, route=torch.zeros(5, len(model.routed))))
    _assert_examples_differ(logits)
    for i, block in enumerate(compact.blocks):
        frozen = model.net.blocks[i]
        assert block is not frozen
        for j, sub in enumerate(block):
            reference = model.tuned[f"{i}_{j}"] if (i, j) in wanted else frozen[j]
            state, ref = sub.state_dict(), reference.state_dict()
            assert state.keys() == ref.keys() and all(torch.equal(state[n], ref[n]) for n in ref), (i, j)
            assert not {t.data_ptr() for t in state.values()} & {t.data_ptr() for t in ref.values()}
    expected_params = sum(p.numel() for p in efficientnet_source.blocks.parameters()) + sum(
        p.numel() for p in model.net.head.parameters()
    )
    assert sum(p.numel() for p in compact.parameters()) == expected_params


def test_global_policy_starts_even_and_its_losses_wait_for_the_warmup(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    method, model = _build("spottune_global", tiny_resnet_source, warmup_epochs=1)
    x = tiny_task.train.x[:6]
    with torch.no_grad():  # a small output layer: every block about 50/50 for every image
        probs = torch.softmax(model.policy(x), -1)
        assert (probs - 0.5).abs().max() < 2e-3
    _, random_model = _build("spottune_global", tiny_resnet_source, policy_init="random")
    with torch.no_grad():
        assert (torch.softmax(random_model.policy(x), -1) - 0.5).abs().max() > 1e-2
    model.train()
    assert float(method.loss_terms(model, x, tiny_task.train.y[:6])["policy"].detach()) == 0.0  # warm-up
    model.epochs_done += 1
    terms = method.loss_terms(model, x, tiny_task.train.y[:6])
    l_k, l_e = global_losses(model.route, method.k)
    policy = float(terms["policy"].detach())
    assert policy == pytest.approx(float((l_k + l_e).detach())) and policy > 0
    # the warm-up follows the model's epoch counter, so a resumed run continues it
    model.epochs_done.zero_()
    out = fit(model, method, tiny_task, TrainConfig(epochs=2, batch_size=8, lr=0.1, patience=None), seed=0)
    assert [rec["train_policy"] == 0.0 for rec in out.history] == [True, False]


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
    assert isinstance(model, SpotTuneNet) and model.routed == [(0, None), (1, None)]
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
        ("spottune_global", {"warmup_epochs": -1}, "warmup_epochs must be a whole number"),
        ("spottune_global", {"warmup_epochs": 1.5}, "warmup_epochs must be a whole number"),
        ("spottune_global", {"policy_init": "ones"}, "policy_init='ones'"),
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
