"""DTNH (Wan et al., Algorithm 1 with the erratum, Eqs. 6-7) and DELTA, checked by hand.

* the corrected direction ``d = g_J + lam * g_O^y`` (``g_O^y = g_O - <g_J,g_O>/||g_J||^2 g_J`` only
  when ``<g_J,g_O> < 0``) on worked examples, random pairs, lists of tensors and angles;
* the ``dtnh:<method>`` twins: lam = 0 is plain training bit for bit, ``.grad`` after the DTNH step is
  exactly the corrected direction, momentum/Adam, diagnostics, resume;
* DELTA's weighted feature distance and channel attention; configs, registry and the report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paramtransfer as pt
from paramtransfer.experiments.compare import select
from paramtransfer.experiments.run import RunResult, train_model
from paramtransfer.methods.base import METHODS, Method, frozen_copy, make_method
from paramtransfer.methods.delta import channel_attention, fit_probe, weighted_feature_distance
from paramtransfer.methods.dtnh import ANGLE_NAMES, register_dtnh
from paramtransfer.methods.regularizers import feature_distance
from paramtransfer.optim.dtnh import angle_degrees, correct, correct_direction, correct_tensors
from paramtransfer.report import comparison_table
from paramtransfer.report.plots import plot_dtnh

PNG = b"\x89PNG\r\n\x1a\n"
# tiny_task has 20 training examples: batches of 8 give 3 steps per epoch (the last one holds 4)
STEPS_PER_EPOCH = 3
TRAIN = {"batch_size": 8, "patience": None}


def _t(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _build(method: Method, source: pt.LayeredNet, num_classes: int = 5, seed: int = 0) -> nn.Module:
    return method.build(source, num_classes, arch=source.arch, in_shape=source.in_shape, seed=seed)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))


# ---- correct_direction: worked examples ----------------------------------------------------------------


def test_correct_direction_acute_angle_keeps_the_plain_sum() -> None:
    # <g_J, g_O> = 1 > 0: d = g_J + 0.5 g_O = [1.5, 0.5]
    d = correct_direction(_t([1.0, 0.0]), _t([1.0, 1.0]), 0.5)
    assert d.tolist() == [1.5, 0.5]


def test_correct_direction_obtuse_angle_drops_the_conflicting_part() -> None:
    # <g_J, g_O> = -1, ||g_J||^2 = 1: g_O^x = -[1, 0], g_O^y = [-1, 1] - [-1, 0] = [0, 1];
    # d = [1, 0] + 2 [0, 1] = [1, 2]   (the plain sum would be [-1, 2])
    d = correct_direction(_t([1.0, 0.0]), _t([-1.0, 1.0]), 2.0)
    assert d.tolist() == [1.0, 2.0]


def test_correct_direction_right_angle_is_the_plain_sum() -> None:
    # <[1, 2], [2, -1]> = 0 exactly: no projection, d = [1 + 3*2, 2 - 3*1] = [7, -1]
    d = correct_direction(_t([1.0, 2.0]), _t([2.0, -1.0]), 3.0)
    assert d.tolist() == [7.0, -1.0]


def test_correct_direction_3d_obtuse_non_unit_task_gradient() -> None:
    # g_J = [1, 2, 2] (||g_J||^2 = 9), g_O = [0, -3, 0]: <g_J, g_O> = -6, coefficient -6/9 = -2/3
    # g_O^x = -2/3 [1, 2, 2] = [-2/3, -4/3, -4/3];  g_O^y = g_O - g_O^x = [2/3, -5/3, 4/3]
    # (check: <g_J, g_O^y> = 2/3 - 10/3 + 8/3 = 0); lam = 1.5: d = [1 + 1, 2 - 2.5, 2 + 2] = [2, -0.5, 4]
    d = correct_direction(_t([1.0, 2.0, 2.0]), _t([0.0, -3.0, 0.0]), 1.5)
    torch.testing.assert_close(d, _t([2.0, -0.5, 4.0]))
    # g_J = [2, 0, 1] (||g_J||^2 = 5), g_O = [-3, 1, 1]: <g_J, g_O> = -5, coefficient -1
    # g_O^y = [-3, 1, 1] + [2, 0, 1] = [-1, 1, 2]; lam = 0.5: d = [2 - 0.5, 0.5, 1 + 1] = [1.5, 0.5, 2]
    d = correct_direction(_t([2.0, 0.0, 1.0]), _t([-3.0, 1.0, 1.0]), 0.5)
    assert d.tolist() == [1.5, 0.5, 2.0]


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)],
)
def test_correct_direction_keeps_the_dtype(dtype: torch.dtype, tol: float) -> None:
    cases = [
        (([1.0, 2.0, 2.0], [0.0, -3.0, 0.0], 1.5), [2.0, -0.5, 4.0]),  # obtuse, worked out above
        (([1.0, 0.0], [1.0, 1.0], 0.5), [1.5, 0.5]),  # acute
        (([1.0, 0.0], [-1.0, 1.0], 2.0), [1.0, 2.0]),  # obtuse
    ]
    for (gj, go, lam), expected in cases:
        d = correct_direction(_t(gj, dtype), _t(go, dtype), lam)
        assert d.dtype == dtype
        torch.testing.assert_close(d.double(), _t(expected, torch.float64), rtol=tol, atol=tol)


def test_correct_direction_with_a_zero_task_gradient_is_lam_times_the_regulariser() -> None:
    go = _t([1.0, -2.0, 3.0])
    d = correct_direction(torch.zeros(3), go, 0.5)
    assert d.tolist() == [0.5, -1.0, 1.5]
    d = correct_direction(torch.zeros(3), torch.zeros(3), 2.0)
    assert d.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("gj", "go", "dtype"),
    [
        ([1e-23, 1e-23, 1e-23], [-1.0, 1e-2, 0.0], torch.float32),
        ([1e-3, 0.0], [-1.0, 1.0], torch.float16),
    ],
)
def test_correct_direction_is_robust_to_tiny_task_gradients(gj: list, go: list, dtype: torch.dtype) -> None:
    g_j, g_o = _t(gj, dtype), _t(go, dtype)
    d = correct_direction(g_j, g_o, 1.0)
    # reference in float64: g_J + g_O - <g_J,g_O>/||g_J||^2 g_J
    ref = correct_direction(g_j.double(), g_o.double(), 1.0)
    assert torch.isfinite(d).all(), d
    assert float(torch.dot(d.double(), g_j.double())) >= 0.0
    torch.testing.assert_close(d.double(), ref, rtol=1e-2, atol=1e-3)


def test_correct_direction_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="shape"):
        correct_direction(torch.zeros(3), torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="flat"):
        correct_direction(torch.zeros(2, 2), torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match="flat"):
        correct_direction(torch.zeros(()), torch.zeros(()), 1.0)
    with pytest.raises(TypeError, match="floating"):
        correct_direction(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 1.0)
    with pytest.raises(TypeError, match="floating"):
        correct_direction(torch.zeros(3), torch.zeros(3, dtype=torch.int32), 1.0)


# ---- correct_direction: properties on random pairs -------------------------------------------------------


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_corrected_direction_never_opposes_the_task_gradient(dtype: torch.dtype, rel: float) -> None:
    gen = torch.Generator().manual_seed(0)
    obtuse = acute = 0
    for i in range(300):
        dim = int(torch.randint(1, 60, (1,), generator=gen))
        scale = float(10 ** torch.empty(()).uniform_(-3, 3, generator=gen))
        gj = scale * torch.randn(dim, generator=gen, dtype=torch.float64)
        kind = i % 3
        if kind == 0:  # independent
            go = torch.randn(dim, generator=gen, dtype=torch.float64) * scale * 3
        elif kind == 1:  # strongly obtuse: nearly anti-parallel and much larger
            go = -20 * gj + 0.1 * scale * torch.randn(dim, generator=gen, dtype=torch.float64)
        else:  # strongly acute
            go = 5 * gj + scale * torch.randn(dim, generator=gen, dtype=torch.float64)
        lam = float(torch.empty(()).uniform_(0, 5, generator=gen))
        gj, go = gj.to(dtype), go.to(dtype)
        d = correct_direction(gj, go, lam)
        g64, o64, d64 = gj.double(), go.double(), d.double()
        norm2 = float(g64 @ g64)
        size = math.sqrt(norm2) * float(d64.norm()) + norm2
        assert float(d64 @ g64) >= -1e-6 * size, (i, float(d64 @ g64))
        if float(g64 @ o64) < 0:
            obtuse += 1
            # g_O^y is orthogonal to g_J, so <d, g_J> = ||g_J||^2 exactly (up to rounding)
            assert float(d64 @ g64) == pytest.approx(norm2, rel=rel * 10, abs=rel * size), i
            assert float((d64 - g64) @ g64) == pytest.approx(0.0, abs=rel * (size + lam * norm2 * 20)), i
        else:
            acute += 1
            torch.testing.assert_close(d, gj + lam * go)
    assert obtuse >= 100 and acute >= 100


# ---- correct_tensors -----------------------------------------------------------------------------------

SHAPES = [(3, 4), (5,), (2, 1, 3)]


def _tensors(seed: int, flips: tuple[float, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Task and regulariser gradients; tensor i of g_O is ``flips[i] * g_J_i`` plus small noise."""
    gen = torch.Generator().manual_seed(seed)
    gj = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    go = [f * g + 0.05 * torch.randn(g.shape, generator=gen, dtype=torch.float64) for f, g in zip(flips, gj)]
    return gj, go


@pytest.mark.parametrize(
    ("flips", "global_conflict", "tensor_fraction"),
    [
        ((-2.0, -2.0, -2.0), 1.0, 1.0),
        ((1.5, 0.5, 2.0), 0.0, 0.0),
        ((-3.0, 1.0, -1.0), 1.0, 2 / 3),  # conflicts dominate the global dot product
        ((-0.1, 3.0, -0.1), 0.0, 2 / 3),  # conflicts cancel out globally, but not tensor by tensor
    ],
)
def test_correct_tensors_matches_correct_direction(
    flips: tuple, global_conflict: float, tensor_fraction: float
) -> None:
    gj, go = _tensors(1, flips)
    per_tensor_dots = [float((a * b).sum()) for a, b in zip(gj, go)]
    assert [d < 0 for d in per_tensor_dots] == [f < 0 for f in flips]
    assert (sum(per_tensor_dots) < 0) == bool(global_conflict)
    lam = 0.7
    flat = correct_direction(
        torch.cat([g.reshape(-1) for g in gj]), torch.cat([g.reshape(-1) for g in go]), lam
    )
    out, fraction = correct_tensors(gj, go, lam, "global")
    assert fraction == global_conflict
    assert [o.shape for o in out] == [g.shape for g in gj]
    torch.testing.assert_close(torch.cat([o.reshape(-1) for o in out]), flat, rtol=1e-12, atol=1e-12)
    out, fraction = correct_tensors(gj, go, lam, "tensor")
    assert fraction == pytest.approx(tensor_fraction)
    for o, a, b in zip(out, gj, go, strict=True):
        assert o.shape == a.shape
        torch.testing.assert_close(o, correct_direction(a.reshape(-1), b.reshape(-1), lam).reshape(a.shape))


def test_correct_tensors_by_hand() -> None:
    gj, go = [_t([1.0]), _t([[0.0]])], [_t([-1.0]), _t([[1.0]])]
    # global: the obtuse example [1, 0] / [-1, 1] with lam = 2 -> [1, 2]
    out, fraction = correct_tensors(gj, go, 2.0, "global")
    assert [o.tolist() for o in out] == [[1.0], [[2.0]]] and fraction == 1.0
    # tensor: [1] vs [-1] conflicts (g_O^y = -1 - (-1)(1) = 0, d = 1); [0] vs [1] has dot 0 (d = 0 + 2)
    out, fraction = correct_tensors(gj, go, 2.0, "tensor")
    assert [o.tolist() for o in out] == [[1.0], [[2.0]]] and fraction == 0.5
    # the default lam is 1; the plain sum where nothing conflicts
    out, fraction = correct_tensors([_t([1.0, 1.0])], [_t([2.0, -1.0])])
    assert out[0].tolist() == [3.0, 0.0] and fraction == 0.0


def test_conflict_sizes_by_hand() -> None:
    # g_J = (2, 0), g_O = (-1, 1), lam = 3: ||3 g_O|| / ||g_J|| = 3 sqrt(2) / 2, cos = -2 / (2 sqrt 2);
    # k = <g_J,g_O> / ||g_J||^2 = -1/2, the removed part is lam k g_J = (-3, 0): 3 / 2 of ||g_J||
    out = correct([torch.tensor([2.0, 0.0])], [torch.tensor([-1.0, 1.0])], 3.0)
    ratio, cosine, removed = out.sizes
    assert ratio == pytest.approx(3 * math.sqrt(2) / 2)
    assert cosine == pytest.approx(-1 / math.sqrt(2))
    assert removed == pytest.approx(1.5)
    torch.testing.assert_close(out.direction[0], torch.tensor([2.0, 3.0]))
    # no conflict: nothing removed
    assert correct([torch.tensor([2.0, 0.0])], [torch.tensor([1.0, 1.0])], 3.0).sizes[2] == 0.0
    # per tensor: only the first tensor conflicts and loses (1, 0), of ||g_J|| = sqrt 2
    task, reg = (
        [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])],
        [torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 1.0])],
    )
    assert correct(task, reg, 1.0, "tensor").sizes[2] == pytest.approx(1 / math.sqrt(2))
    assert correct(task, reg, 1.0, "global").sizes[2] == 0.0  # the conflicts cancel globally
    assert correct([torch.zeros(2)], [torch.ones(2)], 1.0).sizes == (None, None, None)


def test_correct_tensors_rejects_an_unknown_granularity() -> None:
    with pytest.raises(ValueError, match="granularity"):
        correct_tensors([_t([1.0])], [_t([1.0])], 1.0, "layer")


# ---- angle_degrees -------------------------------------------------------------------------------------


def test_angle_degrees_by_hand() -> None:
    e1 = [_t([1.0, 0.0])]
    assert angle_degrees(e1, [_t([3.0, 0.0])]) == pytest.approx(0.0, abs=1e-5)
    assert angle_degrees(e1, [_t([0.0, 3.0])]) == pytest.approx(90.0, abs=1e-9)
    assert angle_degrees(e1, [_t([-2.0, 0.0])]) == pytest.approx(180.0, abs=1e-5)
    assert angle_degrees(e1, [_t([1.0, 1.0])]) == pytest.approx(45.0, abs=1e-5)
    assert angle_degrees([_t([1.0, 0.0])], [_t([-1.0, 1.0])]) == pytest.approx(135.0, abs=1e-5)
    # vectors split over several tensors: [1, 0, 0] vs [1, 1, 0] -> 45 degrees
    assert angle_degrees([_t([1.0]), _t([[0.0, 0.0]])], [_t([1.0]), _t([[1.0, 0.0]])]) == pytest.approx(45.0)
    assert angle_degrees(e1, [torch.zeros(2)]) is None
    assert angle_degrees([torch.zeros(2)], e1) is None


# ---- dtnh twins: lam = 0 is plain training --------------------------------------------------------------


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize(
    ("dtnh", "plain", "part"),
    [
        ("dtnh:l2sp[alpha=0,beta=0]", "finetune", None),
        ("dtnh:knowdist[beta=0]", "knowdist[beta=0]", "target"),  # two backward passes
    ],
)
def test_dtnh_with_lambda_zero_is_plain_training_bit_for_bit(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task, dtnh: str, plain: str, part: str | None
) -> None:
    kwargs = dict(source=tiny_source, target=tiny_task, lr=0.05, epochs=2, seed=3, train_options=TRAIN)
    res_d, model_d = train_model(dtnh, **kwargs)
    res_p, model_p = train_model(plain, **kwargs)
    assert res_d.status == res_p.status == "ok"
    assert res_d.val_accuracy == res_p.val_accuracy and res_d.test_accuracy == res_p.test_accuracy
    assert [r["train_task"] for r in res_d.history] == [r["train_task"] for r in res_p.history]
    assert [r["val_loss"] for r in res_d.history] == [r["val_loss"] for r in res_p.history]
    assert all(r["dtnh_steps"] == STEPS_PER_EPOCH for r in res_d.history)
    assert res_d.diagnostics["corrected_fraction"] == 0.0
    if part is not None:
        model_d, model_p = getattr(model_d, part), getattr(model_p, part)
    before = _params(tiny_source)
    after = _params(model_d)
    assert any(not torch.equal(a, b) for a, b in zip(after[:-2], before[:-2])), "nothing trained"
    for a, b in zip(after, _params(model_p), strict=True):
        assert torch.equal(a, b)


# ---- dtnh twins: the step writes exactly the corrected direction ------------------------------------------


def _perturb(params: list[nn.Parameter], gen: torch.Generator, size: float = 0.05) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(size * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("towards", [-0.5, 0.5])
def test_dtnh_l2sp_step_writes_the_corrected_direction(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task, granularity: str, towards: float
) -> None:
    alpha, beta = 1.0, 0.01
    method = make_method("dtnh:l2sp[alpha=1]", granularity=granularity)
    assert (method.config.alpha, method.config.beta, method.config.granularity) == (alpha, beta, granularity)
    model = _build(method, tiny_source)
    x, y = tiny_task.train.x[:8], tiny_task.train.y[:8]
    params = list(model.parameters())
    blocks, head = list(model.blocks.parameters()), list(model.head.parameters())
    # move the blocks along (towards > 0) or against (< 0) the task gradient: the L2-SP pull
    # alpha (w - w_s) then points with or against the task gradient (no conflict / conflict)
    g0 = torch.autograd.grad(F.cross_entropy(model(x), y), blocks)
    with torch.no_grad():
        for p, g in zip(blocks, g0):
            p.add_(towards * g)
    model.zero_grad(set_to_none=True)
    terms = method.loss_terms(model, x, y)
    assert set(terms) == {"task", "reg"}
    method.backward(terms, model)
    # reference, computed independently: autograd of the task loss alone, the closed form by hand
    g_task = list(torch.autograd.grad(F.cross_entropy(model(x), y), params))
    source_blocks = [p.detach() for p in tiny_source.blocks.parameters()]
    g_reg = [alpha * (p.detach() - s) for p, s in zip(blocks, source_blocks, strict=True)]
    g_reg += [beta * p.detach() for p in head]
    expected, fraction = correct_tensors(g_task, g_reg, 1.0, granularity)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
    conflict = _dot(g_task, g_reg) < 0
    assert conflict == (towards < 0)
    if granularity == "global":
        assert fraction == float(conflict)
        # the step never opposes the task gradient: <d, g_J> = ||g_J||^2 when corrected
        grads = [p.grad for p in params]
        if conflict:
            assert _dot(grads, g_task) == pytest.approx(_dot(g_task, g_task), rel=1e-4)
        else:
            plain = [a + b for a, b in zip(g_task, g_reg)]
            for g, s in zip(grads, plain):
                torch.testing.assert_close(g, s, rtol=1e-5, atol=1e-7)
    stats = method.epoch_stats()
    assert stats["dtnh_steps"] == 1 and stats["dtnh_tensors_corrected"] == pytest.approx(fraction)
    assert stats["dtnh_corrected"] == (fraction > 0)  # steps with any projection
    assert len(stats["dtnh_angles"]) == 1 and len(stats["dtnh_angles"][0]) == 5  # step, Angles 1-4
    assert method.epoch_stats() == {}  # counters reset


@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("towards", [-0.5, 0.5])
def test_dtnh_knowdist_step_writes_the_corrected_direction(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task, granularity: str, towards: float
) -> None:
    beta = 0.5
    method = make_method("dtnh:knowdist", beta=beta, granularity=granularity)
    model = _build(method, tiny_source)
    x, y = tiny_task.train.x[:8], tiny_task.train.y[:8]
    model.train()
    blocks = list(model.target.blocks.parameters())
    # near the source the feature distance grows like a quadratic form in (w - w_s): moving the blocks
    # against the task gradient makes its gradient oppose g_J (conflict), moving along it does not
    g0 = torch.autograd.grad(F.cross_entropy(model.target(x), y), blocks)
    with torch.no_grad():
        for p, g in zip(blocks, g0):
            p.add_(towards * g)
    terms = method.loss_terms(model, x, y)
    method.backward(terms, model)
    params = list(model.target.parameters())
    logits, feats = model.target.forward_features(x)
    with torch.no_grad():
        src = model.source.features(x)
    task = F.cross_entropy(logits, y)
    reg = beta * sum(((f - s) ** 2).sum() for f, s in zip(feats, src)) / len(x)
    assert float(reg.detach()) == pytest.approx(float(terms["reg"].detach()), rel=1e-5)
    assert float(reg.detach()) > 0
    g_task = list(torch.autograd.grad(task, params, retain_graph=True))
    g_reg = torch.autograd.grad(reg, params, allow_unused=True)
    g_reg = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_reg)]
    assert torch.count_nonzero(g_reg[-1]) == 0  # the head does not change the block outputs
    conflict = _dot(g_task, g_reg) < 0
    assert conflict == (towards < 0)
    expected, fraction = correct_tensors(g_task, g_reg, 1.0, granularity)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
    if granularity == "global":
        assert fraction == float(conflict)
        if conflict:  # <d, g_J> = ||g_J||^2
            assert _dot([p.grad for p in params], g_task) == pytest.approx(_dot(g_task, g_task), rel=1e-3)
    stats = method.epoch_stats()
    assert stats["dtnh_tensors_corrected"] == pytest.approx(fraction)
    assert stats["dtnh_corrected"] == (fraction > 0)
    assert all(p.grad is None for p in model.source.parameters())


# ---- the dtnh twin's closed-form regulariser gradient ------------------------------------------------------


def test_dtnh_l2sp_closed_form_gradient_equals_autograd(tiny_source: pt.LayeredNet) -> None:
    alpha, beta = 0.7, 0.03
    method = make_method("dtnh:l2sp", alpha=alpha, beta=beta)
    model = _build(method, tiny_source)
    gen = torch.Generator().manual_seed(0)
    _perturb(list(model.parameters()), gen)
    params = list(model.parameters())
    auto = torch.autograd.grad(method.regularizer(), params)
    closed = method.reg_gradients()
    assert {id(p) for p in closed} == {id(p) for p in params}
    source = dict(tiny_source.named_parameters())
    for (name, p), g in zip(model.named_parameters(), auto, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(closed[p], g, rtol=1e-5, atol=1e-7)
        by_hand = beta * p.detach() if name.startswith("head.") else alpha * (p.detach() - source[name])
        torch.testing.assert_close(closed[p], by_hand, rtol=1e-5, atol=1e-7)
    # the twin evaluates the regulariser without a graph (one backward pass); plain L2-SP keeps it
    x, y = torch.zeros(2, 1, 28, 28), torch.tensor([0, 1])
    terms = method.loss_terms(model, x, y)
    assert not terms["reg"].requires_grad and terms["task"].requires_grad
    assert float(terms["reg"]) == pytest.approx(float(method.regularizer().detach()), rel=1e-6)
    plain = make_method("l2sp", alpha=alpha, beta=beta)
    _build(plain, tiny_source)
    assert plain.loss_terms(model, x, y)["reg"].requires_grad


# ---- optimizers, the caller's source, diagnostics ---------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("spec", ["dtnh:l2sp[alpha=0.5]", "dtnh:knowdist[beta=0.5]"])
def test_dtnh_trains_with_momentum_and_adam_and_never_touches_the_source(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task, optimizer: str, spec: str
) -> None:
    before = _state(tiny_source)
    options = {**TRAIN, "optimizer": optimizer, "momentum": 0.9}
    res, model = train_model(
        spec, source=tiny_source, target=tiny_task, lr=0.01, epochs=1, seed=0, train_options=options
    )
    assert res.status == "ok" and res.config["train"]["optimizer"] == optimizer
    assert res.history[0]["dtnh_steps"] == STEPS_PER_EPOCH
    assert math.isfinite(res.history[0]["train_loss"])
    target = getattr(model, "target", model)
    moved = [k for k, v in target.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any(k.startswith("blocks.") for k in moved)
    for k, v in tiny_source.state_dict().items():
        assert torch.equal(v, before[k]), f"the source's {k} changed"
    assert all(p.grad is None for p in tiny_source.parameters())


def _check_angles(diag: dict, n: int) -> None:
    assert set(diag["angles"]) == {"step", *ANGLE_NAMES}
    assert [len(diag["angles"][k]) for k in ANGLE_NAMES] == [n] * 4
    assert diag["angles"]["step"] == list(range(n))  # angle_every=1: every step, numbered across epochs
    for name in ANGLE_NAMES:
        values = diag["angles"][name]
        assert all(v is None or 0.0 <= v <= 180.0 for v in values)
        finite = [v for v in values if v is not None]
        mean = diag[f"mean_angle_{name}"]
        assert (mean is None) if not finite else mean == pytest.approx(sum(finite) / len(finite))


def test_dtnh_run_diagnostics(tiny_source: pt.LayeredNet, tiny_task: pt.Task) -> None:
    options = {**TRAIN, "trace_test": True}
    res = pt.run(
        "dtnh:l2sp[alpha=1]", source=tiny_source, target=tiny_task, lr=0.05, epochs=2, train_options=options
    )
    diag = res.diagnostics
    assert res.status == "ok"
    assert [r["dtnh_steps"] for r in res.history] == [STEPS_PER_EPOCH] * 2
    assert all("test_loss" in r and "test_accuracy" in r for r in res.history)
    n = 2 * STEPS_PER_EPOCH
    corrected = sum(r["dtnh_corrected"] for r in res.history)
    assert 0.0 <= diag["corrected_fraction"] <= 1.0
    assert diag["corrected_fraction"] == pytest.approx(corrected / n)
    assert diag["granularity"] == "global" and diag["angle_every"] == 1
    _check_angles(diag, n)
    # Angle 1 (d vs grad J) is never obtuse: that is the point of DTNH
    assert all(a <= 90.0 + 1e-4 for a in diag["angles"]["d_vs_task"] if a is not None)
    # d is never further from grad J than the plain sum (Angle 1 <= Angle 3): with g_O^x = c g_J, c < 0,
    # tan(Angle 1) = ||g_O^y|| / ||g_J|| <= ||g_O^y|| / ((1 + c) ||g_J||) = tan(Angle 3) (or Angle 3 >= 90)
    for a1, a3 in zip(diag["angles"]["d_vs_task"], diag["angles"]["sum_vs_task"]):
        assert a1 <= a3 + 1e-3

    # where nothing conflicted d is the plain sum (Angle 1 = Angle 3, Angle 2 = Angle 4): in every epoch
    # at least (steps - corrected steps) rows have equal pairs
    def same(a: float | None, b: float | None) -> bool:
        return a == b if a is None or b is None else abs(a - b) < 1e-3

    for rec in res.history:
        equal = sum(same(a1, a3) and same(a2, a4) for _, a1, a2, a3, a4 in rec["dtnh_angles"])
        assert equal >= rec["dtnh_steps"] - rec["dtnh_corrected"]
    assert 0 < corrected < n  # both kinds of steps occurred
    # the size of the conflicts: the removed part is 0 on uncorrected steps, > 0 on corrected ones
    assert diag["mean_removed_ratio_corrected"] > 0 and diag["mean_cosine_corrected"] < 0
    assert diag["mean_removed_ratio"] == pytest.approx(diag["mean_removed_ratio_corrected"] * corrected / n)
    assert diag["mean_reg_task_norm_ratio"] > 0 and -1 <= diag["mean_cosine"] <= 1
    text = json.dumps(res.to_dict(), allow_nan=False)
    assert RunResult.from_dict(json.loads(text)).diagnostics == json.loads(json.dumps(diag))

    quiet = pt.run(
        "dtnh:knowdist[beta=1,angle_every=0,granularity=tensor]",
        source=tiny_source,
        target=tiny_task,
        lr=0.05,
        epochs=1,
        train_options=TRAIN,
    )
    assert quiet.history[0]["dtnh_steps"] == STEPS_PER_EPOCH
    assert quiet.diagnostics["granularity"] == "tensor"
    assert all(quiet.diagnostics["angles"][k] == [] for k in ANGLE_NAMES)
    assert all(quiet.diagnostics[f"mean_angle_{k}"] is None for k in ANGLE_NAMES)
    assert 0.0 <= quiet.diagnostics["corrected_fraction"] <= 1.0
    json.dumps(quiet.to_dict(), allow_nan=False)


def test_dtnh_angle_every_counts_within_each_epoch_and_records_global_steps(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    res = pt.run(
        "dtnh:l2sp[angle_every=2]",
        source=tiny_source,
        target=tiny_task,
        lr=0.05,
        epochs=2,
        train_options=TRAIN,
    )
    # 3 steps per epoch, every 2nd step of each epoch (so a resume logs the same): global steps 0, 2, 3, 5
    assert STEPS_PER_EPOCH == 3
    assert res.diagnostics["angles"]["step"] == [0, 2, 3, 5]
    assert len(res.diagnostics["angles"]["d_vs_task"]) == 4


def test_dtnh_diagnostics_survive_a_resume(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task, tmp_path: Path
) -> None:
    kwargs = dict(
        source=tiny_source,
        target=tiny_task,
        lr=0.05,
        epochs=2,
        seed=1,
        train_options={**TRAIN, "trace_test": True},
    )
    spec = "dtnh:l2sp[alpha=1]"
    full, _ = train_model(spec, out=tmp_path / "full", **kwargs)

    class Killed(Exception):
        pass

    def kill(event: str, **info: object) -> None:
        if event == "on_before_optimizer_step" and info["step"] == STEPS_PER_EPOCH + 1:
            raise Killed  # in the middle of epoch 2, after epoch 1's checkpoint

    with pytest.raises(Killed):
        train_model(spec, out=tmp_path / "resumed", callbacks=(kill,), **kwargs)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "resumed" / "result.json").exists()
    resumed, _ = train_model(spec, out=tmp_path / "resumed", **kwargs)
    assert resumed.diagnostics["resumed_from_epoch"] == 1 and full.diagnostics["resumed_from_epoch"] is None

    def strip(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "time_s"} for r in history]

    assert strip(resumed.history) == strip(full.history)
    assert [r["dtnh_steps"] for r in resumed.history] == [STEPS_PER_EPOCH] * 2
    for key in ("corrected_fraction", "angles", *(f"mean_angle_{k}" for k in ANGLE_NAMES)):
        assert resumed.diagnostics[key] == full.diagnostics[key], key
    _check_angles(resumed.diagnostics, 2 * STEPS_PER_EPOCH)
    assert resumed.test_accuracy == full.test_accuracy
    saved = RunResult.load(tmp_path / "resumed" / "result.json")
    assert saved.diagnostics["angles"] == full.diagnostics["angles"]


# ---- DELTA ---------------------------------------------------------------------------------------------


def test_weighted_feature_distance_by_hand() -> None:
    conv_t = torch.tensor([[[[1.0, 1.0]], [[0.0, 2.0]]], [[[3.0, 0.0]], [[0.0, 0.0]]]])  # [2, 2, 1, 2]
    conv_s = torch.zeros(2, 2, 1, 2)
    flat_t = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 4.0]])
    flat_s = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    w_conv, w_flat = _t([0.25, 0.75]), _t([0.5, 0.25, 0.25])
    # conv: per (example, channel) squared sums [[2, 4], [9, 0]]; weighted 0.25*2 + 0.75*4 + 0.25*9 = 5.75
    # over n = 2 examples -> 2.875
    t, s = [conv_t, flat_t], [conv_s, flat_s]
    assert float(weighted_feature_distance(t, s, [0], [w_conv])) == pytest.approx(2.875)
    # flat: squared [[1, 4, 0], [0, 0, 4]]; weighted 0.5*1 + 0.25*4 + 0.25*4 = 2.5; / 2 -> 1.25
    assert float(weighted_feature_distance(t, s, [1], [w_flat])) == pytest.approx(1.25)
    assert float(weighted_feature_distance(t, s, [0, 1], [w_conv, w_flat])) == pytest.approx(4.125)
    assert float(weighted_feature_distance(t, s, [-1], [w_flat])) == pytest.approx(1.25)
    # weight 1 for every channel is KnowDist's plain distance (2 + 4 + 9 = 15 and 9, over 2)
    ones = [torch.ones(2), torch.ones(3)]
    assert float(weighted_feature_distance(t, s, [0, 1], ones)) == pytest.approx(12.0)
    assert float(weighted_feature_distance(t, s, [0, 1], ones)) == pytest.approx(
        float(feature_distance(t, s, [0, 1]))
    )
    assert float(weighted_feature_distance(s, s, [0, 1], [w_conv, w_flat])) == 0.0


def _attention_by_hand(
    source: pt.LayeredNet, x: torch.Tensor, y: torch.Tensor, block: int, temperature: float, rest
) -> torch.Tensor:
    """softmax_c((CE(probe(masked_c)) - CE(probe(unmasked))) / T), channel c of ``block`` zeroed."""
    source.eval()
    with torch.no_grad():
        emb = source.embed(x)
    probe = fit_probe(emb, y, int(y.max()) + 1)
    increases = []
    with torch.no_grad():
        base = F.cross_entropy(probe(emb), y)
        h = x
        for b in source.blocks[: block + 1]:
            h = b(h)
        for c in range(h.shape[1]):
            z = h.clone()
            z[:, c] = 0
            increases.append(float(F.cross_entropy(probe(rest(z)), y) - base))
    return torch.softmax(torch.tensor(increases) / temperature, dim=0)


def test_channel_attention_is_a_distribution_per_block(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    source = frozen_copy(tiny_source)
    x, y = tiny_task.train.x, tiny_task.train.y
    feats = source.features(x[:1])
    soft = channel_attention(source, x, y, [0, 1, 2, 3], temperature=1.0)
    sharp = channel_attention(source, x, y, [0, 1, 2, 3], temperature=0.05)
    for j, (w1, w2) in enumerate(zip(soft, sharp, strict=True)):
        for w in (w1, w2):
            assert w.shape == (feats[j].shape[1],)
            assert (w >= 0).all() and float(w.sum()) == pytest.approx(1.0, abs=1e-5)
        assert float(w2.max()) > float(w1.max()), j
    assert [len(w) for w in soft] == [4, 8, 16, 8]

    # the same weights by hand: mask a channel, run the remaining blocks, read the probe's loss
    def after(block: int):
        def rest(z: torch.Tensor) -> torch.Tensor:
            for b in source.blocks[block + 1 :]:
                z = b(z)
            return source.neck(z).flatten(1)

        return rest

    for j in (0, 3):
        torch.testing.assert_close(
            soft[j], _attention_by_hand(source, x, y, j, 1.0, after(j)), rtol=1e-4, atol=1e-6
        )
    # determinism (the attention is recomputed on resume)
    assert all(torch.equal(a, b) for a, b in zip(soft, channel_attention(source, x, y, [0, 1, 2, 3], 1.0)))


def test_channel_attention_on_a_wrapped_source(
    tiny_wrapped_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    source = frozen_copy(tiny_wrapped_source)
    x, y = tiny_task.train.x, tiny_task.train.y
    source.train()
    (w,) = channel_attention(source, x, y, [0], temperature=0.5)
    assert source.training  # measured in eval mode (BatchNorm), then the mode is restored
    conv2 = source.blocks[1]
    expected = _attention_by_hand(source, x, y, 0, 0.5, lambda z: conv2(torch.relu(z)).flatten(1))
    torch.testing.assert_close(w, expected, rtol=1e-4, atol=1e-6)


def test_channel_attention_gives_a_dead_channel_the_smallest_weight(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    source = frozen_copy(tiny_source)
    with torch.no_grad():  # unit 2 of the last block: ReLU(0 * h - 1) = 0 for every input
        source.blocks[3][0].weight[2] = 0.0
        source.blocks[3][0].bias[2] = -1.0
    for temperature in (1.0, 0.1):
        (w,) = channel_attention(source, tiny_task.train.x, tiny_task.train.y, [3], temperature)
        assert float(w[2]) == pytest.approx(float(w.min()), rel=1e-6)
        assert float(w.max()) > float(w[2])


def test_channel_attention_accepts_a_trainable_source(tiny_source: pt.LayeredNet, tiny_task: pt.Task) -> None:
    source = _build(make_method("finetune"), tiny_source)  # a copy: parameters require grad
    weights = channel_attention(source, tiny_task.train.x, tiny_task.train.y, [3])
    assert float(weights[0].sum()) == pytest.approx(1.0, abs=1e-5)
    assert all(p.grad is None for p in source.parameters())


def test_delta_needs_prepare_and_then_starts_with_only_the_head_term(
    tiny_source: pt.LayeredNet, tiny_task: pt.Task
) -> None:
    beta = 0.2
    method = make_method("delta", alpha=1.0, beta=beta, attention_examples=12, layers=[0, 3])
    model = _build(method, tiny_source)
    x, y = tiny_task.train.x[:4], tiny_task.train.y[:4]
    with pytest.raises(RuntimeError, match="prepare"):
        method.loss_terms(model, x, y)
    method.prepare(model, tiny_task)
    assert [len(w) for w in method.weights] == [4, 8]
    model.train()
    terms = method.loss_terms(model, x, y)
    head = sum(float((p.detach() ** 2).sum()) for p in model.target.head.parameters())
    assert float(terms["reg"].detach()) == pytest.approx(
        0.5 * beta * head, rel=1e-5
    )  # features equal the source's
    diag = method.diagnostics(model, tiny_task)["attention"]
    assert set(diag) == {"0", "3"} and sum(diag["3"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        "delta[alpha=-1]",
        "delta[beta=-0.1]",
        "delta[temperature=0]",
        "delta[temperature=-1]",
        "delta[layers=[]]",
        "delta[layers=some]",
        "delta[attention_examples=0]",
        "dtnh:delta[temperature=0]",
    ],
)
def test_delta_rejects_bad_configs(spec: str) -> None:
    with pytest.raises(pt.UserError):
        make_method(spec)


# ---- configs and registry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "dtnh:l2sp[granularity=nope]",
        "dtnh:l2sp[angle_every=-1]",
        "dtnh:l2sp[angle_every=1.5]",
        "dtnh:l2sp[angle_every=true]",
        "dtnh:l2sp[alpha=-1]",  # the base method's own checks still run
        "dtnh:knowdist[layers=[]]",
        "dtnh:l2sp[lam=1]",
    ],
)
def test_dtnh_rejects_bad_configs(spec: str) -> None:
    with pytest.raises(pt.UserError):
        make_method(spec)


def test_dtnh_twins_exist_exactly_for_regularised_methods() -> None:
    with pytest.raises(pt.UserError, match="unknown method 'dtnh:finetune'") as err:
        make_method("dtnh:finetune")
    assert "dtnh:l2sp" in str(err.value) and "finetune" in str(err.value)
    with pytest.raises(pt.UserError, match="regulariser"):
        register_dtnh("finetune")
    names = METHODS.names()
    regularised = [
        n for n in names if getattr(METHODS.get(n), "regularized", False) and not n.startswith("dtnh:")
    ]
    assert {"l2sp", "knowdist", "delta"} <= set(regularised)
    for name in regularised:
        twin = METHODS.get("dtnh:" + name)
        assert issubclass(twin, METHODS.get(name)) and twin.name == "dtnh:" + name
        fields = twin.Config.__dataclass_fields__
        assert {"granularity", "angle_every"} <= set(fields)
        assert set(METHODS.get(name).Config.__dataclass_fields__) <= set(fields)
    for name in names:
        if not getattr(METHODS.get(name), "regularized", False):
            assert "dtnh:" + name not in METHODS
    assert not any(n.startswith("dtnh:dtnh:") for n in names)


def test_dtnh_variant_parses_back() -> None:
    method = make_method("dtnh:l2sp[alpha=1,granularity=tensor]")
    assert (method.config.alpha, method.config.granularity, method.config.angle_every) == (1, "tensor", 1)
    variant = method.variant()
    assert variant == "dtnh:l2sp[alpha=1,granularity=tensor]"
    assert make_method(variant).config == method.config
    assert make_method("dtnh:l2sp").variant() == "dtnh:l2sp"
    knowdist = make_method("dtnh:knowdist[layers=[0,2],angle_every=5]")
    assert make_method(knowdist.variant()).config == knowdist.config


# ---- report ----------------------------------------------------------------------------------------------


def _result(method: str, seed: int, val: float, test: float, angles: bool = False) -> RunResult:
    history = [
        {"epoch": e, "train_loss": 1.5 / e, "train_task": 1.4 / e, "val_accuracy": val, "val_loss": 1.0 / e}
        for e in (1, 2)
    ]
    diagnostics: dict = {}
    if angles:
        diagnostics = {
            "corrected_fraction": 0.25 if seed == 0 else 0.75,
            "granularity": "global",
            "angle_every": 1,
            "angles": {
                "d_vs_task": [10.0, 80.0, 45.0],
                "d_vs_reg": [70.0, 60.0, None],
                "sum_vs_task": [10.0, 120.0, 45.0],
                "sum_vs_reg": [70.0, 30.0, None],
            },
        }
    return RunResult(
        method=method,
        source="fashion[0-4]",
        target="fashion[5-9]",
        arch="lenet",
        seed=seed,
        config={"lr": 0.01},
        val_accuracy=val,
        test_accuracy=test,
        history=history,
        diagnostics=diagnostics,
        best_epoch=2,
    )


def _summary(runs: list[RunResult]) -> dict:
    config = {
        "source": "fashion[0-4]",
        "target": "fashion[5-9]",
        "arch": "lenet",
        "shots": 20,
        "seeds": [0, 1],
    }
    return {
        "config": {**config, "lrs": [0.01]},
        "selected": select(runs),
        "runs": [r.to_dict() for r in runs],
    }


def _row(table: str, name: str) -> str:
    rows = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, (name, table)
    return rows[0]


def test_report_marks_negative_transfer_and_dtnh_gain(tmp_path: Path) -> None:
    runs = [
        _result("scratch", 0, 0.70, 0.70),
        _result("scratch", 1, 0.72, 0.72),  # mean 0.71
        _result("finetune", 0, 0.80, 0.80),
        _result("finetune", 1, 0.80, 0.76),  # mean 0.78: above scratch
        _result("l2sp", 0, 0.60, 0.60),
        _result("l2sp", 1, 0.64, 0.64),  # mean 0.62: below scratch
        _result("dtnh:l2sp", 0, 0.70, 0.66, angles=True),
        _result("dtnh:l2sp", 1, 0.70, 0.67, angles=True),  # mean 0.665: 4.50 points above l2sp
    ]
    summary = _summary(runs)
    assert summary["selected"]["dtnh:l2sp"]["corrected_fraction"] == pytest.approx(0.5)
    assert "corrected_fraction" not in summary["selected"]["l2sp"]
    table = comparison_table(summary)
    assert "negative transfer" in _row(table, "l2sp[alpha=0.1]")  # the default strength is named
    assert "negative transfer" not in _row(table, "fine-tune (FT-0)")
    assert "negative transfer" not in _row(table, "scratch (NoTL)")
    dtnh = _row(table, "dtnh:l2sp[alpha=0.1]")
    assert "+4.50 points vs l2sp[alpha=0.1]" in dtnh
    assert "gradients conflicted in 50 % of steps" in dtnh
    assert "negative transfer" in dtnh  # 0.665 is still below scratch
    names = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert names.index("dtnh:l2sp[alpha=0.1]") == names.index("l2sp[alpha=0.1]") + 1

    # DTNH worse than its base: a negative gain, and no negative transfer above scratch
    worse = [r for r in runs if r.method != "l2sp"] + [_result("l2sp", s, 0.9, 0.9) for s in (0, 1)]
    row = _row(comparison_table(_summary(worse)), "dtnh:l2sp[alpha=0.1]")
    assert "-23.50 points vs l2sp[alpha=0.1]" in row

    path = plot_dtnh(summary, tmp_path / "dtnh.png")
    assert path is not None and path.read_bytes()[:8] == PNG
    alone = _summary([r for r in runs if r.method != "l2sp"])
    assert plot_dtnh(alone, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    no_angles = _summary(
        [r for r in runs if not r.method.startswith("dtnh")] + [_result("dtnh:l2sp", 0, 0.7, 0.66)]
    )
    assert plot_dtnh(no_angles, tmp_path / "none.png") is None


def test_report_pairs_dtnh_variants_with_their_options_to_the_base(tmp_path: Path) -> None:
    runs = [_result("l2sp", s, 0.6, 0.6) for s in (0, 1)]
    runs += [_result("dtnh:l2sp[granularity=tensor]", s, 0.7, 0.65, angles=True) for s in (0, 1)]
    summary = _summary(runs)
    assert "+5.00 points vs l2sp[alpha=0.1]" in _row(
        comparison_table(summary), "dtnh:l2sp[granularity=tensor]"
    )
    assert plot_dtnh(summary, tmp_path / "dtnh.png") is not None


def test_report_from_real_dtnh_runs(tiny_source: pt.LayeredNet, tiny_task: pt.Task, tmp_path: Path) -> None:
    kwargs = dict(
        source=tiny_source, target=tiny_task, lr=0.05, epochs=2, train_options={**TRAIN, "trace_test": True}
    )
    runs = [pt.run(m, **kwargs) for m in ("l2sp[alpha=1]", "dtnh:l2sp[alpha=1]")]
    summary = _summary(runs)
    entry = summary["selected"]["dtnh:l2sp[alpha=1]"]
    assert entry["corrected_fraction"] == runs[1].diagnostics["corrected_fraction"]
    json.dumps(summary, allow_nan=False)
    row = _row(comparison_table(summary), "dtnh:l2sp[alpha=1]")
    gain = 100 * (runs[1].test_accuracy - runs[0].test_accuracy)
    assert f"{gain:+.2f} points vs l2sp[alpha=1]" in row
    assert f"gradients conflicted in {100 * entry['corrected_fraction']:.0f} % of steps" in row
    path = plot_dtnh(summary, tmp_path / "dtnh.png")
    assert path is not None and path.read_bytes()[:8] == PNG


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0, 3.0])
def test_corrected_direction_length_matches_the_hand_derived_identity(lam: float) -> None:
    """||d||^2 - ||g_J + lam g_O||^2 = -lam c (2 + lam c / ||g_J||^2) in a conflict (c = <g_J, g_O> < 0),
    0 without one; ||d||^2 = ||g_J||^2 + lam^2 ||g_O^y||^2; d is longer exactly when
    -2 < lam c / ||g_J||^2 < 0."""
    gen = torch.Generator().manual_seed(int(lam * 100))
    longer = shorter = 0
    for _ in range(200):
        g_j = torch.randn(50, generator=gen, dtype=torch.float64) * 10 ** torch.empty(1).uniform_(
            -2, 2, generator=gen
        )
        g_o = torch.randn(50, generator=gen, dtype=torch.float64) * 10 ** torch.empty(1).uniform_(
            -2, 2, generator=gen
        )
        c = float(g_j @ g_o)
        jj = float(g_j @ g_j)
        plain = g_j + lam * g_o
        d = correct_direction(g_j, g_o, lam)
        diff = float(d @ d) - float(plain @ plain)
        if c >= 0:
            assert diff == 0.0 and torch.equal(d, plain)
            continue
        expected = -lam * c * (2 + lam * c / jj)
        assert diff == pytest.approx(expected, rel=1e-9, abs=1e-12 * float(plain @ plain + d @ d))
        perp = g_o - c / jj * g_j
        assert float(d @ d) == pytest.approx(jj + lam**2 * float(perp @ perp), rel=1e-12)
        if abs(expected) > 1e-9 * float(plain @ plain + d @ d):  # the sign is beyond round-off
            assert (diff > 0) == (-2 < lam * c / jj < 0)
            longer, shorter = longer + (diff > 0), shorter + (diff < 0)
    assert longer > 0 and (lam < 1 or shorter > 0)  # both cases occur
    # hand-picked: g_J = (1, 0), g_O = (-1, 1), lam = 1: d = (1, 1), p = (0, 1); -c (2 + c) = 1 * (2 - 1) = 1
    d = correct_direction(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), 1.0)
    assert float(d @ d) - 1.0 == 1.0
