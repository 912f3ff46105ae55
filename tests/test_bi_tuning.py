"""Bi-Tuning: the contrastive terms against a direct computation, the queues, the key encoder's moving
average, the degenerate case (both weights 0 is fine-tuning, bit for bit), resume and the config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import paramtransfer as pt
from paramtransfer.errors import UserError
from paramtransfer.methods.base import make_method
from paramtransfer.methods.bi_tuning import BiTuningConfig, cce_loss, ccl_loss, enqueue, homogeneous
from paramtransfer.train.checkpoint import load_checkpoint
from paramtransfer.train.trainer import TrainConfig, fit


def _build(spec: str, source: pt.LayeredNet, num_classes: int = 5, seed: int = 0):
    method = make_method(spec)
    model = method.build(source, num_classes, arch=source.arch, in_shape=source.in_shape, seed=seed)
    return method, model


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _mean_log_prob_of_positives(query, keys, key_labels, label, t) -> float:
    """-1/|P| sum_{p in P} log(exp(q.p/t) / sum_k exp(q.k/t)), written out with Python floats."""
    scores = [sum(float(a) * float(b) for a, b in zip(query, k, strict=True)) / t for k in keys]
    log_z = math.log(sum(math.exp(s) for s in scores))
    pos = [s for s, lab in zip(scores, key_labels, strict=True) if lab == label]
    return -sum(s - log_z for s in pos) / len(pos)


# a queue of 2 classes x K=3 slots: class 0 holds 1 key, class 1 is full (count 4 > K)
COUNT = torch.tensor([1, 4])
VALID = torch.arange(3)[None] < COUNT[:, None]


def test_ccl_equals_a_direct_computation():
    z_q, z_k, queue = _unit(3, 4, seed=0), _unit(3, 4, seed=1), _unit(2, 3, 4, seed=2)
    y = torch.tensor([1, 0, 1])
    t = 0.5
    got = float(ccl_loss(z_q, z_k, y, queue, VALID, t))
    # keys: the batch's three keys, then the valid queue slots (class 0 slot 0, class 1 slots 0-2)
    keys = [*z_k, queue[0, 0], *queue[1]]
    labels = [1, 0, 1, 0, 1, 1, 1]
    want = sum(_mean_log_prob_of_positives(z_q[i], keys, labels, int(y[i]), t) for i in range(3)) / 3
    assert got == pytest.approx(want, rel=1e-5)


def test_cce_equals_a_direct_computation():
    h_q, h_k, queue, w = _unit(3, 4, seed=3), _unit(3, 4, seed=4), _unit(2, 3, 4, seed=5), _unit(2, 4, seed=6)
    y = torch.tensor([0, 0, 1])
    t = 0.1
    got = float(cce_loss(h_q, h_k, y, w, queue, VALID, t))
    want = 0.0
    for i in range(3):
        c = int(y[i])
        # the query is the class's weight; its own feature h_q[i] is a positive key
        keys = [h_q[i], *h_k, queue[0, 0], *queue[1]]
        labels = [c, 0, 0, 1, 0, 1, 1, 1]
        want += _mean_log_prob_of_positives(w[c], keys, labels, c, t) / 3
    assert got == pytest.approx(want, rel=1e-5)


def test_homogeneous_features_give_the_cosine_of_the_affine_score():
    h, w, b = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4)
    score = h @ w.T + b
    norms = torch.cat([h, torch.ones(2, 1)], 1).norm(dim=1)[:, None] * torch.cat([w, b[:, None]], 1).norm(
        dim=1
    )
    wn = F.normalize(torch.cat([w, b[:, None]], 1), dim=1)
    assert torch.allclose(homogeneous(h, b) @ wn.T, score / norms, atol=1e-6)


def test_enqueue_fills_each_class_oldest_slot_first_and_wraps():
    queue = torch.zeros(2, 3, 1)
    count = torch.zeros(2, dtype=torch.long)
    enqueue([queue], count, [torch.tensor([[1.0], [2.0], [3.0]])], torch.tensor([0, 1, 0]))
    assert count.tolist() == [2, 1]
    assert queue[:, :, 0].tolist() == [[1, 3, 0], [2, 0, 0]]
    enqueue([queue], count, [torch.tensor([[4.0], [5.0]])], torch.tensor([0, 0]))  # class 0 wraps around
    assert count.tolist() == [4, 1]
    assert queue[:, :, 0].tolist() == [[5, 3, 4], [2, 0, 0]]
    # five keys of class 1 in one batch, written from slot 1 on: 10, 11 -> slots 1, 2; 12, 13, 14 -> slots
    # 0, 1, 2 overwrite them (only the last K of a class are stored)
    enqueue([queue], count, [torch.arange(10.0, 15.0)[:, None]], torch.ones(5, dtype=torch.long))
    assert count.tolist() == [4, 6]
    assert queue[1, :, 0].tolist() == [12, 13, 14]
    assert queue[0, :, 0].tolist() == [5, 3, 4]


def test_loss_terms_use_the_queue_before_the_batch_and_then_store_its_keys(tiny_source, tiny_task):
    method, model = _build("bi_tuning[queue_size=2,cce=2,ccl=3]", tiny_source)
    x, y = tiny_task.train.x[:6], tiny_task.train.y[:6]
    model.train()
    terms = method.loss_terms(model, x, y)
    assert set(terms) == {"task", "cce", "ccl"}
    # the first step: empty queues, the keys are the batch's (the key encoder equals the query encoder)
    with torch.no_grad():
        logits, h, z = model(x, embed=True)
        bias = model.target.head.bias
        hq = homogeneous(h, bias)
        w = F.normalize(torch.cat([model.target.head.weight, bias[:, None]], 1), dim=1)
        empty = torch.zeros(5, 2, dtype=torch.bool)
        cce = cce_loss(hq, hq, y, w, torch.zeros(5, 2, hq.shape[1]), empty, 0.07)
        zq = F.normalize(z, dim=1)
        ccl = ccl_loss(zq, zq, y, torch.zeros(5, 2, zq.shape[1]), empty, 0.07)
    assert float(terms["task"].detach()) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert float(terms["cce"].detach()) == pytest.approx(2 * float(cce), rel=1e-5)
    assert float(terms["ccl"].detach()) == pytest.approx(3 * float(ccl), rel=1e-5)
    counts = torch.bincount(y, minlength=5)
    assert model.queue_count.tolist() == counts.tolist()
    first = int(y[0])
    assert torch.allclose(model.queue_z[first, 0], zq[0], atol=1e-6)
    assert torch.allclose(model.queue_h[first, 0], hq[0], atol=1e-6)
    # CCE's query is the classifier weight: its gradient reaches the head (TLlib detaches it)
    grad = torch.autograd.grad(terms["cce"], model.target.head.weight)[0]
    assert grad.abs().sum() > 0


def test_key_encoder_is_buffers_and_follows_the_moving_average(tiny_source, tiny_task):
    method, model = _build("bi_tuning[momentum=0.75]", tiny_source)
    assert not list(model.key.parameters())
    head = {"target.head.weight", "target.head.bias"}
    assert set(model.key_names) == {n for n, _ in model.named_parameters()} - head
    assert any(n.startswith("projector.") for n in model.key_names)
    for name in model.key_names:  # the key encoder starts as the query encoder
        assert torch.equal(model.key.get_buffer(name.replace(".", "-")), model.get_parameter(name))
    before = [k.clone() for k in model.key_values()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    query = [p.detach().clone() for p in model.query_values()]
    model.train()
    method.loss_terms(model, tiny_task.train.x[:5], tiny_task.train.y[:5])
    for k, k0, q in zip(model.key_values(), before, query, strict=True):
        torch.testing.assert_close(k, 0.75 * k0 + 0.25 * q, rtol=0, atol=1e-6)
        assert not torch.equal(k, q) and not torch.equal(k, k0)


@pytest.mark.parametrize("fixture", ["tiny_resnet_source", "tiny_effnet_source"])
def test_both_weights_zero_is_fine_tuning_bit_for_bit(fixture, request, tiny_task):
    """Several steps over two epochs: the key pass neither touches the target's BatchNorm statistics
    (resnet) nor the random stream of its dropout (EfficientNet-Lite0)."""
    source = request.getfixturevalue(fixture)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, patience=None)
    ft_method, ft_model = _build("finetune", source)
    bt_method, bt_model = _build("bi_tuning[cce=0,ccl=0]", source)
    ft = fit(ft_model, ft_method, tiny_task, cfg, seed=4)
    bt = fit(bt_model, bt_method, tiny_task, cfg, seed=4)
    expected = ft_model.state_dict()
    for name, value in bt_model.target.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert [r["train_task"] for r in bt.history] == [r["train_task"] for r in ft.history]
    assert all(r["train_cce"] == 0 and r["train_ccl"] == 0 for r in bt.history)
    assert int(bt_model.queue_count.sum()) > 0  # the machinery ran


def test_contrastive_terms_change_the_training(tiny_source, tiny_task):
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05, patience=None)
    ft_method, ft_model = _build("finetune", tiny_source)
    bt_method, bt_model = _build("bi_tuning", tiny_source)
    fit(ft_model, ft_method, tiny_task, cfg, seed=0)
    fit(bt_model, bt_method, tiny_task, cfg, seed=0)
    assert not torch.equal(bt_model.target.blocks[0][0].weight, ft_model.blocks[0][0].weight)


def test_resume_after_a_crash_continues_identically(tiny_resnet_source, tiny_task, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, patience=None)
    method, ref = _build("bi_tuning[queue_size=3]", tiny_resnet_source)
    ref_out = fit(ref, method, tiny_task, cfg, seed=2)

    def crash(event: str, **kw) -> None:
        if event == "on_epoch_end" and kw["record"]["epoch"] == 2:
            raise RuntimeError("killed")

    path = tmp_path / "ckpt.pt"
    method, model = _build("bi_tuning[queue_size=3]", tiny_resnet_source)
    with pytest.raises(RuntimeError, match="killed"):
        fit(model, method, tiny_task, cfg, seed=2, checkpoint=path, fingerprint="f", callbacks=[crash])
    saved = load_checkpoint(path)["model"]
    assert int(saved["queue_count"].sum()) == len(tiny_task.train)  # the queues are in the checkpoint
    assert any(k.startswith("key.") for k in saved)
    method, model = _build("bi_tuning[queue_size=3]", tiny_resnet_source)
    out = fit(model, method, tiny_task, cfg, seed=2, checkpoint=path, fingerprint="f")
    assert out.resumed_from_epoch == 1
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in out.history]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in ref_out.history]
    want = ref.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), name


def test_same_seed_same_run_and_export_is_the_plain_target(tiny_source, tiny_task):
    a = pt.run("bi_tuning", source=tiny_source, target=tiny_task, lr=0.05, epochs=2, seed=0)
    b = pt.run("bi_tuning", source=tiny_source, target=tiny_task, lr=0.05, epochs=2, seed=0)
    assert a.history and [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert a.test_accuracy == b.test_accuracy
    method, model = _build("bi_tuning", tiny_source)
    exported = method.export(model)
    assert type(exported) is type(tiny_source) and exported is model.target
    x = tiny_task.test.x[:4]
    model.eval()
    with torch.no_grad():
        assert torch.equal(method.predict(model, x), exported(x))


def test_dtnh_twin_exists():
    assert "dtnh:bi_tuning" in pt.list_methods()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"cce": -1}, "cce=-1"),
        ({"ccl": "much"}, "ccl='much'"),
        ({"temperature": 0}, "temperature=0"),
        ({"queue_size": 0}, "queue_size=0"),
        ({"queue_size": 2.5}, "queue_size=2.5"),
        ({"momentum": 1.5}, "momentum=1.5"),
        ({"projection_dim": True}, "projection_dim=True"),
        ({"projector": "conv"}, "projector='conv'"),
    ],
)
def test_config_refuses_each_bad_field(options, words):
    with pytest.raises(UserError, match=words.replace("[", r"\[")):
        BiTuningConfig(**options)
