"""BSS (batch spectral shrinkage) and StochNorm (stochastic normalisation), against hand-computed values.

BSS: the penalty is eta times the sum of the k smallest squared singular values of the head's inputs,
its gradient 2 sigma u v^T reaches every block, eta = 0 is fine-tuning bit for bit. StochNorm: p = 1
normalises with the moving statistics as they stood before the batch (which still update as usual),
p = 0 is fine-tuning bit for bit, the per-channel choice is torch's seeded RNG, export leaves a plain
network.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paramtransfer as pt
from paramtransfer.methods.base import METHODS, Method, make_method
from paramtransfer.methods.bss import BSS, batch_spectral_shrinkage
from paramtransfer.methods.stochnorm import StochasticStatistics, StochNorm
from paramtransfer.train.trainer import TrainConfig, fit

SIGMA = torch.tensor([3.0, 2.0, 0.5])


def _known_spectrum(b: int = 3, d: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F = U diag(3, 2, 0.5) V^T with random orthonormal U [b, 3], V [d, 3]; returns (F, U, V)."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(b, 3, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, 3, generator=gen, dtype=torch.float64))
    return (u * SIGMA.double()) @ v.T, u, v


def _build(method: Method, source: pt.LayeredNet, num_classes: int = 5, seed: int = 0) -> nn.Module:
    return method.build(source, num_classes, arch=source.arch, in_shape=source.in_shape, seed=seed)


def _one_step(method: Method, model: nn.Module, task: pt.Task, epochs: int = 1) -> None:
    config = TrainConfig(epochs=epochs, batch_size=len(task.train), lr=0.1, patience=None)
    assert not fit(model, method, task, config, seed=3).diverged


def _identity_net(dim: int = 5) -> pt.LayeredNet:
    """A net whose head input is its input: ``[B, 1, 1, dim] -> [B, dim] -> head``."""
    torch.manual_seed(1)
    return pt.LayeredNet([nn.Flatten()], nn.Linear(dim, 2), in_shape=(1, 1, dim))


# ---- BSS --------------------------------------------------------------------------------------------


def test_bss_sums_the_k_smallest_squared_singular_values() -> None:
    f, _, _ = _known_spectrum()
    assert float(batch_spectral_shrinkage(f, 1)) == pytest.approx(0.25, rel=1e-5)
    assert float(batch_spectral_shrinkage(f, 2)) == pytest.approx(0.25 + 4.0, rel=1e-5)
    # 3 examples have 3 singular values: k is clamped to 2, the largest (9) is never penalised
    assert float(batch_spectral_shrinkage(f, 3)) == pytest.approx(4.25, rel=1e-5)
    assert float(batch_spectral_shrinkage(f, 100)) == pytest.approx(4.25, rel=1e-5)
    # the transpose (5 examples of 3 features) has the same spectrum
    assert float(batch_spectral_shrinkage(f.T.contiguous(), 1)) == pytest.approx(0.25, rel=1e-5)


def test_bss_on_a_batch_of_one_is_zero_and_on_two_penalises_only_the_smaller() -> None:
    one = batch_spectral_shrinkage(torch.tensor([[3.0, 4.0]]), 1)
    assert float(one) == 0.0
    two = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    assert float(batch_spectral_shrinkage(two, 2)) == pytest.approx(0.25)


def test_bss_gradient_is_two_sigma_u_v() -> None:
    """d sigma_min^2 / dF = 2 sigma_min u_min v_min^T (u, v: its singular vectors)."""
    f, u, v = _known_spectrum()
    f = f.float().requires_grad_(True)
    batch_spectral_shrinkage(f, 1).backward()
    expected = 2 * 0.5 * torch.outer(u[:, 2], v[:, 2]).float()
    assert torch.allclose(f.grad, expected, atol=1e-5)


def test_bss_reg_term_is_eta_times_the_spectrum_of_the_head_input() -> None:
    f, _, _ = _known_spectrum()
    f = f.float()
    source = _identity_net()
    method = make_method("bss[eta=0.1,k=2]")
    model = _build(method, source, num_classes=2)
    x, y = f.view(3, 1, 1, 5), torch.tensor([0, 1, 0])
    terms = method.loss_terms(model, x, y)
    assert set(terms) == {"task", "reg"}
    assert float(terms["reg"]) == pytest.approx(0.1 * 4.25, rel=1e-5)
    assert torch.equal(terms["task"], F.cross_entropy(model(x), y))


def test_bss_refuses_k_at_least_the_feature_dimension_when_built(tiny_source: pt.LayeredNet) -> None:
    make_method("bss[k=4]").build(_identity_net(), 2, arch="custom", in_shape=(1, 1, 5), seed=0)
    with pytest.raises(pt.UserError, match="k <= 4"):
        make_method("bss[k=5]").build(_identity_net(), 2, arch="custom", in_shape=(1, 1, 5), seed=0)
    with pytest.raises(pt.UserError, match="k <= 7"):  # the tiny LeNet's head reads 8 features
        _build(make_method("bss[k=8]"), tiny_source)


@pytest.mark.parametrize("bad", ["bss[k=0]", "bss[k=1.5]", "bss[k=true]", "bss[eta=-1]", "bss[eta=abc]"])
def test_bss_config_refuses_bad_values(bad: str) -> None:
    with pytest.raises(pt.UserError, match="bss (k|eta)="):
        make_method(bad)


def test_bss_gradient_reaches_every_block_and_not_the_head(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    # (not the tiny LeNet: 6 of its 8 ReLU features are 0 on every example, so sigma_min = 0 and the
    # penalty and its gradient are exactly 0)
    method = make_method("bss[eta=1]")
    model = _build(method, tiny_resnet_source)
    terms = method.loss_terms(model, tiny_task.train.x[:8], tiny_task.train.y[:8])
    assert float(terms["reg"].detach()) > 0
    terms["reg"].backward()
    for i, block in enumerate(model.blocks):
        grads = [p.grad for p in block.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), f"block {i}"
    assert all(p.grad is None for p in model.head.parameters())


@pytest.mark.parametrize("spec", ["bss[eta=0]", "dtnh:bss[eta=0]"])
def test_bss_with_eta_zero_is_fine_tuning_bit_for_bit(
    spec: str, tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    plain, bss = make_method("finetune"), make_method(spec)
    a, b = _build(plain, tiny_resnet_source), _build(bss, tiny_resnet_source)
    _one_step(plain, a, tiny_task, epochs=2)
    _one_step(bss, b, tiny_task, epochs=2)
    after_a, after_b = a.state_dict(), b.state_dict()
    assert after_a.keys() == after_b.keys()
    for key in after_a:
        assert torch.equal(after_a[key], after_b[key]), key
    assert not torch.equal(after_a["blocks.0.0.weight"], tiny_resnet_source.state_dict()["blocks.0.0.weight"])


def test_bss_with_eta_moves_the_blocks_differently(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    plain, bss = make_method("finetune"), make_method("bss[eta=1]")
    a, b = _build(plain, tiny_resnet_source), _build(bss, tiny_resnet_source)
    _one_step(plain, a, tiny_task)
    _one_step(bss, b, tiny_task)
    assert not torch.equal(a.blocks[0][0].weight, b.blocks[0][0].weight)


def test_dtnh_bss_is_registered_as_the_twin() -> None:
    twin = METHODS.get("dtnh:bss")
    assert issubclass(twin, BSS) and BSS.regularized
    method = make_method("dtnh:bss[eta=0.01,k=2,granularity=tensor]")
    assert (method.config.eta, method.config.k, method.config.granularity) == (0.01, 2, "tensor")
    assert "dtnh:stochnorm" not in METHODS and not StochNorm.regularized


# ---- StochNorm: one BatchNorm layer --------------------------------------------------------------------


def _bn(channels: int = 3, dims: int = 1) -> nn.modules.batchnorm._BatchNorm:
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, channels))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, channels))
        bn.running_mean.copy_(torch.linspace(-0.3, 0.6, channels))
        bn.running_var.copy_(torch.linspace(0.5, 4.0, channels))
    return bn


def test_p_one_normalises_with_the_moving_statistics_which_still_update() -> None:
    bn = _bn()
    plain = copy.deepcopy(bn)
    StochasticStatistics(1.0).attach(bn)
    x = torch.tensor([[1.0, 2.0, -1.0], [3.0, 0.0, 0.5], [-2.0, 1.0, 4.0], [0.0, -1.0, 2.0]])
    rng = torch.get_rng_state()
    out = bn.train()(x)
    assert torch.equal(torch.get_rng_state(), rng)  # p = 1 draws nothing
    # by hand, with the statistics as they stood before the batch
    mean, var = torch.tensor([-0.3, 0.15, 0.6]), torch.tensor([0.5, 2.25, 4.0])
    expected = (x - mean) / torch.sqrt(var + 1e-5) * torch.tensor([0.5, 1.25, 2.0]) + torch.tensor(
        [-1, 0, 1.0]
    )
    assert torch.allclose(out, expected, atol=1e-6)
    plain.train()(x)  # the statistics update exactly as plain BatchNorm's
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(plain, name)), name
    assert not torch.equal(bn.running_mean, mean)
    # the moving statistics are constants: the input's gradient is gamma / sqrt(var + eps)
    var = bn.running_var.clone()
    xg = x.clone().requires_grad_(True)
    bn(xg).sum().backward()
    assert torch.allclose(xg.grad, (torch.tensor([0.5, 1.25, 2.0]) / torch.sqrt(var + 1e-5)).expand(4, 3))


def test_p_zero_and_eval_mode_are_plain_batchnorm() -> None:
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    for p, train in ((0.0, True), (0.5, False), (1.0, False)):
        bn, plain = _bn(), _bn()
        StochasticStatistics(p).attach(bn)
        rng = torch.get_rng_state()
        assert torch.equal(bn.train(train)(x), plain.train(train)(x))
        assert torch.equal(torch.get_rng_state(), rng)
        assert torch.equal(bn.running_mean, plain.running_mean)


def test_each_channel_takes_one_branch_drawn_from_the_seeded_rng() -> None:
    channels = 64
    x = torch.randn(8, channels, 3, 3, generator=torch.Generator().manual_seed(0))
    bn = _bn(channels, dims=2)
    before = (bn.running_mean.clone(), bn.running_var.clone())
    batch_branch = copy.deepcopy(bn).train()(x)
    moving_branch = F.batch_norm(x, *before, bn.weight, bn.bias, False, 0.0, bn.eps)
    StochasticStatistics(0.5).attach(bn)
    torch.manual_seed(7)
    out = bn.train()(x)
    torch.manual_seed(7)
    chosen = torch.rand(channels) < 0.5
    assert 10 < int(chosen.sum()) < 54  # both branches occur
    for c in range(channels):
        want = moving_branch[:, c] if chosen[c] else batch_branch[:, c]
        assert torch.allclose(out[:, c], want, atol=1e-6), c
    # the same seed gives the same choice, another seed another
    bn.running_mean.copy_(before[0])
    bn.running_var.copy_(before[1])
    torch.manual_seed(7)
    assert torch.equal(bn(x), out)
    torch.manual_seed(8)
    assert not torch.equal(bn(x), out)


@pytest.mark.parametrize(
    "bad", ["stochnorm[p=-0.1]", "stochnorm[p=1.5]", "stochnorm[p=abc]", "stochnorm[p=true]"]
)
def test_stochnorm_config_refuses_bad_values(bad: str) -> None:
    with pytest.raises(pt.UserError, match="stochnorm p="):
        make_method(bad)


# ---- StochNorm: the method ------------------------------------------------------------------------------


def _hooked(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]


def test_stochnorm_hooks_every_source_batchnorm_and_export_removes_them(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    method = make_method("stochnorm")
    model = _build(method, tiny_resnet_source)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and _hooked(model) == norms
    _one_step(method, model, tiny_task)
    exported = method.export(model)
    assert exported is model and _hooked(exported) == []
    method.export(model)  # twice is harmless
    # the exported network in training mode is plain BatchNorm: the same as a hook-free copy
    plain = copy.deepcopy(tiny_resnet_source)
    plain.reset_head(5)
    plain.load_state_dict(exported.state_dict())
    exported.to(memory_format=torch.contiguous_format)  # the trainer may have made it channels-last
    x = tiny_task.train.x[:8]
    torch.manual_seed(0)
    got = exported.train()(x)
    assert torch.equal(got, plain.train()(x))


def test_stochnorm_with_p_zero_is_fine_tuning_bit_for_bit(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    plain, stoch = make_method("finetune"), make_method("stochnorm[p=0]")
    a, b = _build(plain, tiny_resnet_source), _build(stoch, tiny_resnet_source)
    _one_step(plain, a, tiny_task, epochs=2)
    _one_step(stoch, b, tiny_task, epochs=2)
    after_a, after_b = a.state_dict(), b.state_dict()
    for key in after_a:
        assert torch.equal(after_a[key], after_b[key]), key


def test_stochnorm_changes_the_step_and_is_deterministic_under_a_seed(
    tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    runs = []
    for spec in ("finetune", "stochnorm", "stochnorm"):
        method = make_method(spec)
        model = _build(method, tiny_resnet_source)
        _one_step(method, model, tiny_task)
        runs.append(model.state_dict())
    plain, first, second = runs
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert not torch.equal(plain["blocks.0.0.weight"], first["blocks.0.0.weight"])
    # the running statistics updated as usual, from the batch: the same as fine-tuning's first update
    assert not torch.equal(
        first["blocks.0.1.running_mean"], tiny_resnet_source.state_dict()["blocks.0.1.running_mean"]
    )


def test_stochnorm_refuses_sources_without_batchnorm(
    tiny_source: pt.LayeredNet, tiny_rnn_source: pt.LayeredNet
) -> None:
    for arch in ("lenet", "rnn"):
        with pytest.raises(pt.UserError, match="--arch resnet20"):
            StochNorm.check_arch(arch)
    for arch in ("resnet20", "mobilenet", "efficientnet_lite0", "wrapped", "custom"):
        StochNorm.check_arch(arch)
    with pytest.raises(pt.UserError, match="has none; use finetune"):
        make_method("stochnorm").build(_identity_net(), 2, arch="custom", in_shape=(1, 1, 5), seed=0)
