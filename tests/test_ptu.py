"""PTU (Zhang, Zhang & Yang 2019): Eq. 2 by hand, the degenerate gates the paper states, frozen
source, gradients, PTU-RNN, diagnostics and the regularisers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import paramtransfer as pt
from paramtransfer.errors import UserError
from paramtransfer.methods.base import make_method
from paramtransfer.methods.ptu import PTU, PTUNet, SeparableConv2d, group_lasso
from paramtransfer.train.trainer import TrainConfig, fit, keep_frozen_batchnorm


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _build(spec: str, source: pt.LayeredNet, num_classes: int = 5, seed: int = 0, **options):
    method = make_method(spec, **options)
    model = method.build(source, num_classes, arch=source.arch, in_shape=source.in_shape, seed=seed)
    return method, model


def _force_gates(model: torch.nn.Module, r: float | None, z: float | None) -> None:
    """Zero the gate weights and set the biases so that sigmoid gives exactly 0 or 1."""
    with torch.no_grad():
        for unit in model.units.values():
            for gate, value in ((unit.gate_r, r), (unit.gate_z, z)):
                if value is None:
                    continue
                for name, p in gate.named_parameters():
                    p.zero_()
                    if name.endswith("bias"):
                        p.fill_(1e4 if value == 1 else -1e4)


def test_eq2_linear_against_hand_computation() -> None:
    u = PTU(2, kind="linear", activation="tanh")
    with torch.no_grad():
        u.gate_r.weight.copy_(torch.tensor([[0.1, 0.0, 0.2, 0.0], [0.0, -0.3, 0.0, 0.1]]))
        u.gate_r.bias.copy_(torch.tensor([0.0, 0.5]))
        u.gate_z.weight.copy_(torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, -1.0, 1.0]]))
        u.gate_z.bias.copy_(torch.tensor([-0.2, 0.0]))
        u.adapt.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
        u.adapt.bias.copy_(torch.tensor([0.1, 0.0]))
    hs, ht = [1.0, 2.0], [3.0, -1.0]
    # Eq. 1 written out element by element
    r = [_sigmoid(0.1 * 1 + 0.2 * 3), _sigmoid(-0.3 * 2 + 0.1 * -1 + 0.5)]
    z = [_sigmoid(0.5 * 1 + 0.5 * 2 - 0.2), _sigmoid(-1.0 * 3 + 1.0 * -1)]
    a = [math.tanh(1 * 1 + 2 * 2 + 0.1), math.tanh(-1 * 2)]
    hf = [(1 - r[i]) * hs[i] + r[i] * a[i] for i in range(2)]
    expected = [(1 - z[i]) * ht[i] + z[i] * hf[i] for i in range(2)]
    out = u(torch.tensor([hs]), torch.tensor([ht]))
    torch.testing.assert_close(out, torch.tensor([expected]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u.last_r, torch.tensor([r]))
    torch.testing.assert_close(u.last_z, torch.tensor([z]))


@pytest.mark.parametrize(
    ("separable", "depthwise", "kernel_size"),
    [
        (True, "shared", 3),
        (True, "per_channel", 3),
        (True, "shared", 1),
        (True, "shared", 5),
        (False, "shared", 3),
    ],
)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_eq2_conv_matches_the_formula_with_its_own_convolutions(
    separable: bool, depthwise: str, kernel_size: int, activation: str
) -> None:
    torch.manual_seed(0)
    u = PTU(
        3,
        kind="conv",
        activation=activation,
        separable=separable,
        kernel_size=kernel_size,
        depthwise=depthwise,
        gate_bias_r=0.3,
        gate_bias_z=-0.4,
    )
    hs, ht = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    x = torch.cat([hs, ht], 1)
    r = torch.sigmoid(u.gate_r(x))  # W^r [h^S, h^T] by the unit's own (unfused) modules
    z = torch.sigmoid(u.gate_z(x))
    phi = torch.tanh if activation == "tanh" else torch.relu
    hf = (1 - r) * hs + r * phi(u.adapt(hs))
    expected = (1 - z) * ht + z * hf
    torch.testing.assert_close(u(hs, ht), expected, rtol=1e-5, atol=1e-6)
    assert isinstance(u.gate_r, SeparableConv2d) == separable


def test_shared_depthwise_filter_is_one_kernel_for_every_channel() -> None:
    """The paper: "in the depth-wise convolution step, a single filter is shared across all the channels"."""
    torch.manual_seed(0)
    conv = SeparableConv2d(4, 2, 3, shared=True)
    assert conv.depthwise_weight.shape == (1, 1, 3, 3)
    x = torch.randn(2, 4, 6, 6)
    kernel = conv.depthwise_weight[0, 0]
    by_hand = torch.stack(
        [F.conv2d(x[:, c : c + 1], kernel.view(1, 1, 3, 3), padding=1)[:, 0] for c in range(4)], 1
    )
    torch.testing.assert_close(conv.depthwise(x), by_hand)
    # one filter commutes with the point-wise step (zero padding maps to zero): the fused gates rely on it
    pw = conv.pointwise
    torch.testing.assert_close(
        F.conv2d(conv.depthwise(x), pw.weight), conv.depthwise(F.conv2d(x, pw.weight)), rtol=1e-5, atol=1e-5
    )
    per_channel = SeparableConv2d(4, 2, 3, shared=False)
    assert per_channel.depthwise_weight.shape == (4, 1, 3, 3)


def test_ptu_depthwise_option_is_validated() -> None:
    with pytest.raises(UserError, match="depthwise"):
        PTU(3, kind="conv", depthwise="grouped")
    with pytest.raises(UserError, match="depthwise"):
        make_method("ptu[depthwise=grouped]")


def test_contract_shapes_of_linear_gates() -> None:
    u = PTU(7)
    assert (u.gate_r.in_features, u.gate_r.out_features) == (14, 7)
    assert (u.gate_z.in_features, u.gate_z.out_features) == (14, 7)
    assert (u.adapt.in_features, u.adapt.out_features) == (7, 7)


def test_gate_bias_initialisation() -> None:
    u = PTU(4, gate_bias_r=-2.0, gate_bias_z=1.5)
    u(torch.zeros(3, 4), torch.zeros(3, 4))
    assert torch.allclose(u.last_r, torch.full((3, 4), _sigmoid(-2.0)))
    assert torch.allclose(u.last_z, torch.full((3, 4), _sigmoid(1.5)))


@pytest.mark.parametrize("fixture", ["tiny_source", "tiny_resnet_source"])
def test_z_zero_gives_the_target_network_alone(fixture: str, request: pytest.FixtureRequest) -> None:
    source = request.getfixturevalue(fixture)
    _, model = _build("ptu", source)
    _force_gates(model, r=None, z=0)
    model.eval()
    x = torch.randn(4, *source.in_shape)
    assert torch.equal(model(x), model.target(x))


@pytest.mark.parametrize("fixture", ["tiny_source", "tiny_resnet_source"])
def test_z_one_r_zero_passes_the_source_activations_through(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    source = request.getfixturevalue(fixture)
    _, model = _build("ptu", source)
    _force_gates(model, r=0, z=1)
    model.eval()
    x = torch.randn(4, *source.in_shape)
    src_last = model.source.features(x)[-1]
    assert torch.equal(model(x), model.target.head(model.target.neck(src_last)))
    unit = PTU(3)
    with torch.no_grad():
        for gate, bias in ((unit.gate_r, -1e4), (unit.gate_z, 1e4)):
            gate.weight.zero_()
            gate.bias.fill_(bias)
    hs, ht = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(unit(hs, ht), hs)


def test_target_is_fresh_and_source_is_a_frozen_copy(tiny_resnet_source: pt.LayeredNet) -> None:
    _, model = _build("ptu", tiny_resnet_source)
    src_w = tiny_resnet_source.blocks[0][0].weight
    assert torch.equal(model.source.blocks[0][0].weight, src_w)
    assert model.source.blocks[0][0].weight.data_ptr() != src_w.data_ptr()
    assert not torch.equal(model.target.blocks[0][0].weight, src_w)
    assert not any(p.requires_grad for p in model.source.parameters())


def test_training_never_moves_the_source(tiny_resnet_source: pt.LayeredNet, tiny_task: pt.Task) -> None:
    method, model = _build("ptu", tiny_resnet_source)
    before = {k: v.clone() for k, v in model.source.state_dict().items()}
    target_before = {k: v.clone() for k, v in model.target.state_dict().items()}
    fit(model, method, tiny_task, TrainConfig(epochs=2, batch_size=8, lr=0.1, patience=None))
    after = model.source.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "source weights or BN statistics moved"
    assert any(not torch.equal(target_before[k], v) for k, v in model.target.state_dict().items())


@pytest.mark.parametrize("fixture", ["tiny_source", "tiny_resnet_source"])
def test_gradients_reach_every_target_and_ptu_parameter(fixture: str, request: pytest.FixtureRequest) -> None:
    source = request.getfixturevalue(fixture)
    method, model = _build("ptu", source)
    model.train()
    x, y = torch.randn(6, *source.in_shape), torch.arange(6) % 5
    method.backward(method.loss_terms(model, x, y), model)
    for name, p in [*model.target.named_parameters(), *model.units.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert all(p.grad is None for p in model.source.parameters())


def test_ptu_parameters_get_the_learning_rate_multiplier(tiny_source: pt.LayeredNet) -> None:
    method, model = _build("ptu", tiny_source, lr_mult=7.0)
    groups = method.param_groups(model)
    ids = {id(p) for p in model.units.parameters()}
    assert {id(p) for p in groups[1]["params"]} == ids and groups[1]["lr_mult"] == 7.0
    assert not ids & {id(p) for p in groups[0]["params"]}


def test_units_follow_the_block_kinds_and_chosen_layers(tiny_source: pt.LayeredNet) -> None:
    _, model = _build("ptu", tiny_source)
    kinds = [model.units[str(i)].kind for i in range(tiny_source.num_blocks)]
    assert kinds == ["conv", "conv", "linear", "linear"]
    _, model = _build("ptu[layers=[1,-1]]", tiny_source)
    assert model.layers == [1, 3]
    with pytest.raises(UserError, match="outside"):
        _build("ptu[layers=[4]]", tiny_source)


def test_bad_sources_are_refused(
    tiny_rnn_source: pt.LayeredNet, tiny_source: pt.LayeredNet, tiny_wrapped_source: pt.LayeredNet
) -> None:
    with pytest.raises(UserError, match="ptu_rnn"):
        _build("ptu", tiny_rnn_source)
    with pytest.raises(UserError, match="rnn source"):
        _build("ptu_rnn", tiny_source)
    with pytest.raises(UserError):
        make_method("ptu[activation=sigmoid]")


def test_ptu_rnn_degenerate_gates(tiny_rnn_source: pt.LayeredNet) -> None:
    x = torch.randn(3, 1, 28, 28)
    _, model = _build("ptu_rnn", tiny_rnn_source)
    model.eval()
    _force_gates(model, r=None, z=0)  # the target RNN alone, stepped cell by cell
    torch.testing.assert_close(model(x), model.target(x), rtol=1e-5, atol=1e-6)
    _force_gates(model, r=0, z=1)  # every step copies the source hidden state
    torch.testing.assert_close(model(x), model.target.head(model.source.blocks[0](x)), rtol=1e-5, atol=1e-6)


def test_ptu_rnn_shares_one_unit_across_steps_and_learns(tiny_rnn_source: pt.LayeredNet) -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 1, 28, 28)
    y = (x[:, 0, :, :14].mean(dim=(1, 2)) > x[:, 0, :, 14:].mean(dim=(1, 2))).long()  # a toy sequence task
    method, model = _build("ptu_rnn", tiny_rnn_source, num_classes=2)
    assert len(model.units) == 1
    opt = torch.optim.Adam([p for g in method.param_groups(model) for p in g["params"]], lr=0.01)
    first = None
    for _ in range(60):
        loss = method.loss_terms(model, x, y)["task"]
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_diagnostics_report_gate_means_per_layer_and_channel(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    res = pt.run("ptu", source=tiny_source, target=tiny_task, lr=0.05, epochs=1, seed=0)
    gates = res.diagnostics["gates"]
    assert gates["layers"] == [0, 1, 2, 3]
    channels = [4, 8, 16, 8]  # lenet width=4, hidden=16
    assert [len(c) for c in gates["r_per_channel"]] == channels
    for g in ("r", "z"):
        assert all(0 < v < 1 for v in gates[g])
        for mean, per in zip(gates[g], gates[f"{g}_per_channel"], strict=True):
            assert mean == pytest.approx(sum(per) / len(per))


def test_diagnostics_mean_is_the_mean_over_examples_and_positions(tiny_source: pt.LayeredNet) -> None:
    method, model = _build("ptu", tiny_source)
    x = torch.randn(7, 1, 28, 28)
    task = pt.Task("toy", tuple("abcde"), *[pt.data.Split(x, torch.zeros(7, dtype=torch.long))] * 3)
    gates = method.diagnostics(model, task)["gates"]
    model.eval()
    model(x)
    first = model.units["0"]
    torch.testing.assert_close(
        torch.tensor(gates["z_per_channel"][0], dtype=torch.float64),
        first.last_z.double().mean(dim=(0, 2, 3)),
    )


def test_group_lasso_and_regulariser_by_hand(tiny_source: pt.LayeredNet) -> None:
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert float(group_lasso(w, 0)) == pytest.approx(5.0 + 1.0)  # rows (filters)
    assert float(group_lasso(w, 1)) == pytest.approx(3.0 + math.sqrt(17.0))  # columns (channels)
    method, model = _build("ptu[layers=[3],l1=0.1,l2=0.01,group_filter=0.5,group_channel=0.2]", tiny_source)
    unit = model.units["3"]
    ws = [unit.gate_r.weight, unit.gate_z.weight, unit.adapt.weight]
    expected = sum(
        0.1 * w.abs().sum() + 0.01 * (w**2).sum() + 0.5 * w.norm(dim=1).sum() + 0.2 * w.norm(dim=0).sum()
        for w in ws
    )
    torch.testing.assert_close(method.regularizer(model), expected)
    terms = method.loss_terms(model, torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))
    assert set(terms) == {"task", "reg"}
    plain, model2 = _build("ptu", tiny_source)
    assert set(plain.loss_terms(model2, torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))) == {"task"}


# ---- speed machinery: the source-activation cache and the hand-written backward of Eq. 2 ------------------


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4, 4)])
def test_hand_written_backward_of_eq2_matches_finite_differences(relu: bool, shape: tuple) -> None:
    from paramtransfer.methods.ptu import _GatedMix

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(shape[0], 2 * shape[1], *shape[2:], generator=gen, dtype=torch.double)
    args = [logits] + [torch.randn(*shape, generator=gen, dtype=torch.double) for _ in range(3)]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda a, b, c, d: _GatedMix.apply(a, b, c, d, relu)[0], args)


@pytest.mark.parametrize("fixture", ["tiny_source", "tiny_resnet_source", "tiny_rnn_source"])
def test_cached_source_activations_give_the_same_loss_as_running_the_source(
    fixture: str, request: pytest.FixtureRequest, tiny_task: pt.Task
) -> None:
    source = request.getfixturevalue(fixture)
    method, model = _build("ptu_rnn" if source.arch == "rnn" else "ptu", source)
    method.prepare(model, tiny_task)
    assert method._cache is not None
    model.train()
    keep_frozen_batchnorm(model)  # as the trainer does: the frozen source normalises with its own stats
    idx = torch.tensor([3, 0, 7, 5])
    x, y = tiny_task.train.x[idx], tiny_task.train.y[idx]
    torch.manual_seed(0)
    cached = method.loss_terms(model, x, y, index=idx)["task"]
    torch.manual_seed(0)
    live = method.loss_terms(model, x, y)["task"]
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
    # a wrong index must change the loss: the cache really is looked up by example
    assert not torch.allclose(method.loss_terms(model, x, y, index=idx.flip(0))["task"], live)


def test_source_cache_can_be_turned_off_and_respects_its_budget(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    off, model = _build("ptu[source_cache_mb=0]", tiny_source)
    off.prepare(model, tiny_task)
    assert off._cache is None
    tiny_budget, model = _build("ptu[source_cache_mb=1e-6]", tiny_source)
    tiny_budget.prepare(model, tiny_task)
    assert tiny_budget._cache is None
    with pytest.raises(UserError, match="source_cache_mb"):
        make_method("ptu[source_cache_mb=-1]")
    # training without the cache still works and gives finite losses
    out = fit(model, tiny_budget, tiny_task, TrainConfig(epochs=1, batch_size=8, patience=None))
    assert math.isfinite(out.history[0]["train_task"])


# ---- the hook path: PTU on any LayeredNet ---------------------------------------------------------


def _hooked_twin(model: PTUNet) -> PTUNet:
    """The same source, target and units (copies), run through forward hooks on the target's blocks."""
    import copy

    twin = copy.deepcopy(model)
    return PTUNet(twin.source, twin.target, {int(k): u for k, u in twin.units.items()}, hooks=True)


@pytest.mark.parametrize("fixture", ["tiny_source", "tiny_resnet_source"])
def test_hook_path_gives_the_zoo_path_numbers(fixture: str, request: pytest.FixtureRequest) -> None:
    source = request.getfixturevalue(fixture)
    _, model = _build("ptu[layers=[0,2]]", source)
    twin = _hooked_twin(model)
    assert twin.hooks and not model.hooks
    x = torch.randn(4, *source.in_shape)
    y = torch.tensor([0, 1, 2, 3])
    for m in (model, twin):
        m.train()
        keep_frozen_batchnorm(m)
        F.cross_entropy(m(x), y).backward()
    assert torch.equal(model(x), twin(x))
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
    for (name, b), (_, c) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
        assert torch.equal(b, c), name  # the BatchNorm statistics moved alike
    model.eval(), twin.eval()
    assert torch.equal(model(x), twin(x))
    # outside PTUNet.forward the hooks leave the target alone
    assert torch.equal(twin.target(x), model.target(x))


@pytest.mark.parametrize("fixture", ["tiny_wrapped_source", "tiny_stem_wrapped_source"])
def test_ptu_on_a_wrapped_model_through_hooks(fixture: str, request: pytest.FixtureRequest) -> None:
    source = request.getfixturevalue(fixture)
    method, model = _build("ptu", source)
    assert model.hooks and model.layers == list(range(source.num_blocks))
    x = torch.randn(6, *source.in_shape)
    y = torch.arange(6) % 5
    # the gates reach every unit: each ran in the forward pass and gets a gradient
    for unit in model.units.values():
        unit.last_r = None
    model.train()
    keep_frozen_batchnorm(model)
    F.cross_entropy(model(x), y).backward()
    for k, unit in model.units.items():
        assert unit.last_r is not None, k
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in unit.parameters()), k
    # z = 0 gives the target network alone
    model.eval()
    _force_gates(model, r=None, z=0)
    assert torch.equal(model(x), model.target(x))
    # z = 1, r = 0 passes the source's activation on: the last block's output is the source's
    _force_gates(model, r=0, z=1)
    seen = {}
    last = model.target.blocks[-1]
    handle = last.register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out.detach().clone()))
    try:
        model(x)
    finally:
        handle.remove()
    # the capture hook runs after the PTU's, so it sees the mixed output
    torch.testing.assert_close(seen["out"], model.source.features(x)[-1], rtol=0, atol=0)


def test_wrapped_ptu_trains_and_its_source_never_moves(tiny_stem_wrapped_source: pt.LayeredNet) -> None:
    task = pt.load_task("fashion[0-4]", shots=4, seed=0, val_shots=2, test_limit=20)
    method, model = _build("ptu", tiny_stem_wrapped_source)
    source_before = {k: v.clone() for k, v in model.source.state_dict().items()}
    units_before = {k: v.clone() for k, v in model.units.state_dict().items()}
    fit(model, method, task, TrainConfig(lr=0.05, epochs=2, batch_size=8))
    assert all(torch.equal(v, model.source.state_dict()[k]) for k, v in source_before.items())
    assert any(not torch.equal(v, model.units.state_dict()[k]) for k, v in units_before.items())
    gates = method.diagnostics(model, task)["gates"]
    assert gates["layers"] == [0, 1] and len(gates["r"]) == 2


def test_fixed_gates_stay_at_one_half(tiny_source: pt.LayeredNet) -> None:
    task = pt.load_task("fashion[0-4]", shots=4, seed=0, val_shots=2, test_limit=20)
    method, model = _build("ptu[fixed_gates=true]", tiny_source)
    gate_params = [p for u in model.units.values() for g in (u.gate_r, u.gate_z) for p in g.parameters()]
    assert gate_params and not any(p.requires_grad for p in gate_params)
    optimised = {id(p) for g in method.param_groups(model) for p in g["params"]}
    assert not optimised & {id(p) for p in gate_params}
    fit(model, method, task, TrainConfig(lr=0.05, epochs=2, batch_size=8))
    assert all(torch.equal(p, torch.zeros_like(p)) for p in gate_params)
    gates = method.diagnostics(model, task)["gates"]
    assert gates["r"] == [0.5] * len(model.units) and gates["z"] == [0.5] * len(model.units)
    # what is left: 0.5 h_T + 0.5 ((h_S + phi(W^h h_S)) / 2)
    u = model.units["0"]
    hs, ht = torch.randn(2, u.dim, 5, 5), torch.randn(2, u.dim, 5, 5)
    expected = 0.5 * ht + 0.25 * hs + 0.25 * torch.tanh(u.adapt(hs))
    torch.testing.assert_close(u(hs, ht), expected, rtol=1e-6, atol=1e-6)


def test_target_init_source_copies_the_source(tiny_resnet_source: pt.LayeredNet) -> None:
    _, model = _build("ptu[target_init=source]", tiny_resnet_source)
    for (name, p), q in zip(model.target.blocks.named_parameters(), tiny_resnet_source.blocks.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    assert all(p.requires_grad for p in model.target.blocks.parameters())
    _, random_model = _build("ptu", tiny_resnet_source)
    first = next(random_model.target.blocks.parameters())
    assert not torch.equal(first, next(tiny_resnet_source.blocks.parameters()))
    with pytest.raises(UserError, match="target_init"):
        make_method("ptu[target_init=imagenet]")


def test_ptu_on_efficientnet_lite0_at_a_tiny_size() -> None:
    source = pt.build_model("efficientnet_lite0", num_classes=7, in_shape=(3, 32, 32), seed=0)
    method, model = _build("ptu[layers=[1,3,8]]", source)
    assert not model.hooks and model.layers == [1, 3, 8]
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    model.train()
    keep_frozen_batchnorm(model)
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in model.source.parameters())
    assert all(p.grad is not None for p in model.units.parameters())
