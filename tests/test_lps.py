"""LPS (Wang et al., Eqs. 5-9): filter alignment, the second-order network and its baselines.

* ``align_filters`` equals Eqs. 5-8 written as loops, and worked examples by hand;
* the aligned representation does not change when a layer's filters (and, above layer 1, its input
  channels) are permuted, on every layer (the erratum: the sort is not only on layer 1), while the
  ablations without one of the two alignments do change;
* a real lenet whose hidden units are permuted computes the same function and gets the same embedding;
* Eq. 9 by hand; shapes, cosine similarity, errors; a second-order network learns task labels.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import paramtransfer as pt
from paramtransfer.selection.lps import (
    FlatFC,
    FrobeniusFC,
    SecondOrderNet,
    align_filters,
    branch_weighted_loss,
    model_parameters,
    similarity,
    similarity_matrix,
)

D64 = torch.float64


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0.0, atol=1e-9)


def _align_by_loops(
    theta: torch.Tensor, phi: torch.Tensor, first_layer: bool, alignment: str
) -> torch.Tensor:
    """Eqs. 5-8 transcribed index by index (slow, only for tiny tensors)."""
    g, c = theta.shape[:2]
    g2 = phi.shape[0]
    s = torch.zeros(g2, g, dtype=theta.dtype)
    for gi in range(g):
        for gj in range(g2):
            if first_layer or alignment in ("filter", "none"):  # Eq. 7
                s[gj, gi] = sum((theta[gi, ci] * phi[gj, ci]).sum() for ci in range(c))
            else:  # Eqs. 5-6
                s[gj, gi] = sum(
                    max((theta[gi, ci] * phi[gj, cj]).sum() for ci in range(c)) for cj in range(c)
                )
    if alignment in ("both", "filter"):  # Eq. 8
        s = torch.stack([torch.tensor(sorted(row.tolist(), reverse=True), dtype=s.dtype) for row in s])
    return s


# ---- align_filters: the equations ----------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("first_layer", [True, False])
@pytest.mark.parametrize("alignment", ["both", "filter", "channel", "none"])
def test_align_filters_is_eqs_5_to_8(kernel: int, first_layer: bool, alignment: str) -> None:
    gen = torch.Generator().manual_seed(kernel)
    theta = torch.randn(5, 3, kernel, kernel, generator=gen, dtype=D64)
    phi = torch.randn(4, 3, kernel, kernel, generator=gen, dtype=D64)
    s = align_filters(theta, phi, first_layer, alignment)
    assert s.shape == (4, 5)
    assert _close(s, _align_by_loops(theta, phi, first_layer, alignment))


def test_worked_example_channel_matching_vs_channel_pairing() -> None:
    # one filter with two 1x2 channels: theta_c0 = [1, 0], theta_c1 = [0, 1];
    # phi_c0 = [2, 1]: <theta_c0, phi_c0> = 2, <theta_c1, phi_c0> = 1 -> best match 2
    # phi_c1 = [3, -1]: <theta_c0, phi_c1> = 3, <theta_c1, phi_c1> = -1 -> best match 3
    # Eq. 6: 2 + 3 = 5;  Eq. 7 pairs channels by index: 2 + (-1) = 1
    theta = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    phi = torch.tensor([[[[2.0, 1.0]], [[3.0, -1.0]]]])
    assert align_filters(theta, phi, first_layer=False).tolist() == [[5.0]]
    assert align_filters(theta, phi, first_layer=True).tolist() == [[1.0]]


def test_worked_example_1x1_kernels_and_the_sort() -> None:
    # theta rows (two filters, two 1x1 channels): [1, -2] and [4, 0]; phi = [-1, 2]
    # filter 0: cj=0: max(1*-1, -2*-1) = 2;  cj=1: max(1*2, -2*2) = 2  -> 4
    # filter 1: cj=0: max(4*-1, 0*-1) = 0;   cj=1: max(4*2, 0*2) = 8   -> 8
    # sorted, strongest first: [8, 4]
    theta = torch.tensor([[1.0, -2.0], [4.0, 0.0]]).view(2, 2, 1, 1)
    phi = torch.tensor([[-1.0, 2.0]]).view(1, 2, 1, 1)
    assert align_filters(theta, phi, first_layer=False).tolist() == [[8.0, 4.0]]
    assert align_filters(theta, phi, first_layer=False, alignment="channel").tolist() == [[4.0, 8.0]]


def test_align_filters_takes_a_batch_of_models() -> None:
    theta = torch.randn(3, 6, 4, 3, 3, dtype=D64)
    phi = torch.randn(5, 4, 3, 3, dtype=D64)
    batched = align_filters(theta, phi, first_layer=False)
    assert batched.shape == (3, 5, 6)
    assert _close(batched, torch.stack([align_filters(t, phi, False) for t in theta]))


# ---- align_filters: permutation invariance -------------------------------------------------------------


@pytest.mark.parametrize("first_layer", [True, False])
def test_permuting_filters_leaves_the_alignment_unchanged(first_layer: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(7, 4, 3, 3, generator=gen, dtype=D64)
    phi = torch.randn(5, 4, 3, 3, generator=gen, dtype=D64)
    perm = torch.randperm(7, generator=gen)
    shuffled = theta[perm]
    assert _close(align_filters(theta, phi, first_layer), align_filters(shuffled, phi, first_layer))
    assert _close(
        align_filters(theta, phi, first_layer, "filter"), align_filters(shuffled, phi, first_layer, "filter")
    )
    # teeth: without the sort of Eq. 8 the same permutation shows
    for unsorted in ("channel", "none"):
        assert not _close(
            align_filters(theta, phi, first_layer, unsorted),
            align_filters(shuffled, phi, first_layer, unsorted),
        )


def test_above_layer_1_permuting_input_channels_leaves_the_alignment_unchanged() -> None:
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(7, 6, 3, 3, generator=gen, dtype=D64)
    phi = torch.randn(5, 6, 3, 3, generator=gen, dtype=D64)
    filters, channels = torch.randperm(7, generator=gen), torch.randperm(6, generator=gen)
    both = theta[filters][:, channels]
    assert _close(align_filters(theta, phi, False), align_filters(both, phi, False))
    assert _close(
        align_filters(theta, phi, False, "channel"), align_filters(theta[:, channels], phi, False, "channel")
    )
    # teeth: pairing channels by index (filter alignment only, Fig. 3c "filt.") is not channel-invariant,
    # and on layer 1 the image's channel order is meaningful, so it is not either
    assert not _close(align_filters(theta, phi, False, "filter"), align_filters(both, phi, False, "filter"))
    assert not _close(align_filters(theta, phi, True), align_filters(both, phi, True))


def test_invariance_holds_in_float32_to_1e6() -> None:
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(16, 8, 3, 3, generator=gen) * 0.1
    phi = torch.randn(8, 8, 3, 3, generator=gen) * 0.1
    shuffled = theta[torch.randperm(16, generator=gen)][:, torch.randperm(8, generator=gen)]
    assert torch.allclose(
        align_filters(theta, phi, False), align_filters(shuffled, phi, False), rtol=0.0, atol=1e-6
    )


# ---- a real lenet: function-preserving permutations ----------------------------------------------------


def _lenet() -> pt.LayeredNet:
    return pt.build_model("lenet", num_classes=3, seed=0, width=4, hidden=16).double().eval()


def _permute_hidden_units(net: pt.LayeredNet, seed: int) -> pt.LayeredNet:
    """Shuffle the units of every hidden layer and the input channels of the layer after it, consistently."""
    gen = torch.Generator().manual_seed(seed)
    conv1, conv2 = net.blocks[0][0], net.blocks[1][0]
    fc1, fc2, head = net.blocks[2][1], net.blocks[3][0], net.head
    with torch.no_grad():
        for layer, nxt in ((conv1, conv2), (conv2, fc1), (fc1, fc2), (fc2, head)):
            perm = torch.randperm(layer.weight.shape[0], generator=gen)
            layer.weight.copy_(layer.weight[perm])
            layer.bias.copy_(layer.bias[perm])
            w = nxt.weight.view(
                nxt.weight.shape[0], len(perm), -1
            )  # fc1's inputs are conv2's maps, flattened
            nxt.weight.copy_(w[:, perm].reshape(nxt.weight.shape))
    return net


def test_permuted_lenet_computes_the_same_function_and_gets_the_same_embedding() -> None:
    net, shuffled = _lenet(), _permute_hidden_units(_lenet(), seed=7)
    x = torch.randn(4, 1, 28, 28, dtype=D64)
    assert _close(net(x), shuffled(x))
    assert not _close(net.blocks[0][0].weight, shuffled.blocks[0][0].weight)

    torch.manual_seed(0)
    lps = SecondOrderNet.for_model(net, embed_dim=8, num_classes=3, filters=5, weights=[1, 1, 1, 1]).double()
    a, b = model_parameters(net), model_parameters(shuffled)
    assert _close(lps.embed(a), lps.embed(b))  # every layer sorted: layers 2-4 too (the erratum)
    assert _close(lps(a).logits, lps(b).logits)
    assert similarity(lps.embed(a), lps.embed(b)).item() == pytest.approx(1.0, abs=1e-12)

    # teeth: each ablation sees the permutation, and so does an FC on the raw parameters
    for alignment in ("filter", "channel", "none"):
        torch.manual_seed(0)
        ablation = SecondOrderNet.for_model(net, 8, 3, filters=5, weights=[1, 1, 1, 1], alignment=alignment)
        assert not _close(ablation.double().embed(a), ablation.embed(b)), alignment
    flat = FlatFC([p.shape for p in a], 8, 3).double()
    assert not _close(flat.embed(a), flat.embed(b))


def test_the_task_layer_keeps_its_label_order() -> None:
    # Eq. 8 sorts layers 1..L-1 only: with the head included, its inputs (fc2's units) still permute
    # freely, but reordering the classes is a different model
    net, shuffled = _lenet(), _permute_hidden_units(_lenet(), seed=8)
    torch.manual_seed(0)
    lps = SecondOrderNet.for_model(net, 8, 3, head=True, filters=5, weights=[0, 0, 0, 0, 1]).double()
    assert lps.last_is_head
    a = model_parameters(net, head=True)
    assert _close(lps.embed(a), lps.embed(model_parameters(shuffled, head=True)))
    swapped = [*a[:-1], a[-1][[1, 0, 2]]]
    assert not _close(lps.embed(a), lps.embed(swapped))


def test_model_parameters_of_lenet() -> None:
    net = pt.build_model("lenet", num_classes=3, seed=0, width=4, hidden=16)
    shapes = [tuple(p.shape) for p in model_parameters(net)]
    # conv1, conv2, fc1 seen as a 4x4 "convolution" over conv2's 8 maps, fc2 as 1x1; no head by default
    assert shapes == [(4, 1, 5, 5), (8, 4, 5, 5), (16, 8, 4, 4), (8, 16, 1, 1)]
    assert [tuple(p.shape) for p in model_parameters(net, head=True)][-1] == (3, 8, 1, 1)
    assert torch.equal(model_parameters(net)[2].reshape(16, -1), net.blocks[2][1].weight)
    assert not any(p.requires_grad for p in model_parameters(net))


def test_model_parameters_skip_resnet_shortcuts_as_the_paper_does() -> None:
    net = pt.build_model("resnet20", num_classes=3, seed=0, width=4)
    assert len(model_parameters(net)) == 19  # 1 stem + 18 block convolutions
    assert len(model_parameters(net, shortcuts=True)) == 21


# ---- Eq. 9 ---------------------------------------------------------------------------------------------


def test_eq9_by_hand() -> None:
    # branch 1 logits [0, 0] -> q^1 = [1/2, 1/2];  branch 2 logits [ln 3, 0] -> q^2 = [3/4, 1/4]
    # w = (1, 3), W = 4: mixture = (1 * q^1 + 3 * q^2) / 4 = [(0.5 + 2.25) / 4, (0.5 + 0.75) / 4]
    #                                                    = [0.6875, 0.3125]
    # labels (0, 1): L = (-ln 0.6875 - ln 0.3125) / 2 = (0.374693 + 1.163151) / 2 = 0.768922
    b1 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    b2 = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]])
    labels = torch.tensor([0, 1])
    loss = branch_weighted_loss([b1, b2], labels, [1.0, 3.0])
    assert loss.item() == pytest.approx((-math.log(0.6875) - math.log(0.3125)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.768922, abs=1e-6)
    # the mixture is inside the log: not the weighted mean of the branch cross-entropies (0.747 here)
    weighted_ce = (F.cross_entropy(b1, labels) + 3 * F.cross_entropy(b2, labels)) / 4
    assert abs(loss.item() - weighted_ce.item()) > 0.01
    # one non-zero weight: that branch's cross-entropy; weights are relative (1/W)
    assert branch_weighted_loss([b1, b2], labels, [0.0, 2.0]).item() == pytest.approx(
        F.cross_entropy(b2, labels).item(), abs=1e-6
    )
    assert branch_weighted_loss([b1, b2], labels, [2.0, 6.0]).item() == pytest.approx(loss.item(), abs=1e-6)


def test_second_order_net_loss_is_eq9_of_its_branches() -> None:
    torch.manual_seed(0)
    shapes = [(6, 1, 3, 3), (4, 6, 3, 3)]
    lps = SecondOrderNet(shapes, embed_dim=5, num_classes=3, weights=[1.0, 3.0])
    params = [torch.randn(2, *s) for s in shapes]
    labels = torch.tensor([2, 0])
    out = lps(params)
    expected = branch_weighted_loss(out.branch_logits, labels, [1.0, 3.0])
    assert lps.loss(params, labels).item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(out.logits.exp().sum(-1), torch.ones(2))
    assert F.nll_loss(out.logits, labels).item() == pytest.approx(expected.item(), abs=1e-6)


# ---- shapes, similarity, errors ------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["lps", "frobenius", "flat"])
def test_shapes_and_interface(model: str) -> None:
    net = pt.build_model("lenet", num_classes=3, seed=0, width=4, hidden=16)
    params = model_parameters(net)
    shapes = [p.shape for p in params]
    make = {"lps": SecondOrderNet, "frobenius": FrobeniusFC, "flat": FlatFC}[model]
    m = make(shapes, 6, 3)
    batch = [torch.stack([p, p * 2, -p]) for p in params]
    out = m(batch)
    assert out.logits.shape == (3, 3) and all(b.shape == (3, 3) for b in out.branch_logits)
    assert len(out.branch_logits) == (1 if model == "flat" else 4)
    assert m.embed(batch).shape == (3, 6) and m.embed(params).shape == (6,)
    assert m(params).logits.shape == (3,)
    loss = m.loss(batch, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.dim() == 0 and loss.item() > 0


def test_embedding_size_and_mean_of_branch_similarities() -> None:
    torch.manual_seed(0)
    shapes = [(6, 1, 3, 3), (4, 6, 3, 3)]
    lps = SecondOrderNet(shapes, embed_dim=5, num_classes=3, weights=[1.0, 3.0])
    a, b = [torch.randn(*s) for s in shapes], [torch.randn(*s) for s in shapes]
    assert lps.embed(a).shape == (10,)
    assert SecondOrderNet(shapes, 5, 3).embed(a).shape == (5,)  # the paper's w = (1, 0): branch 1 only
    fa, fb = lps.branch_features(a), lps.branch_features(b)
    per_branch = [similarity(x, y).item() for x, y in zip(fa, fb)]
    assert similarity(lps.embed(a), lps.embed(b)).item() == pytest.approx(
        (per_branch[0] + 3 * per_branch[1]) / 4, abs=1e-6
    )


def test_cosine_similarity() -> None:
    e = torch.randn(5, 7)
    assert torch.allclose(similarity(e, e), torch.ones(5))
    assert similarity(e[0], e[1]).item() == pytest.approx(similarity(e[1], e[0]).item())
    assert similarity(e[0], 3 * e[0]).item() == pytest.approx(1.0)
    assert similarity(e[0], -e[0]).item() == pytest.approx(-1.0)
    m = similarity_matrix(e)
    assert m.shape == (5, 5) and torch.allclose(m, m.T) and torch.allclose(m.diagonal(), torch.ones(5))
    assert torch.allclose(similarity_matrix(e[:2], e), similarity(e[:2, None], e[None]), atol=1e-6)


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="channels or kernel"):
        align_filters(torch.randn(4, 3, 3, 3), torch.randn(2, 5, 3, 3), first_layer=False)
    with pytest.raises(ValueError, match="channels or kernel"):
        align_filters(torch.randn(4, 3, 3, 3), torch.randn(2, 3, 5, 5), first_layer=True)
    with pytest.raises(ValueError, match="unknown"):
        align_filters(torch.randn(4, 3, 3, 3), torch.randn(2, 3, 3, 3), True, alignment="sorted")
    with pytest.raises(ValueError, match=r"\[g2, c, kh, kw\]"):
        align_filters(torch.randn(4, 3, 3), torch.randn(2, 3, 3), True)

    net = pt.build_model("lenet", num_classes=3, seed=0, width=4, hidden=16)
    lps = SecondOrderNet.for_model(net, 6, 3)
    params = model_parameters(net)
    with pytest.raises(pt.UserError, match=r"layer 2 weights have shape \(8, 5, 5, 5\)"):
        lps.embed([params[0], torch.randn(8, 5, 5, 5), *params[2:]])
    with pytest.raises(pt.UserError, match="built for 4 layers"):
        lps.embed(params[:3])
    with pytest.raises(pt.UserError, match="batch size"):
        lps.embed([params[0][None], *(torch.stack([p, p]) for p in params[1:])])
    with pytest.raises(pt.UserError, match="non-negative"):
        SecondOrderNet([(4, 1, 3, 3)], 6, 3, weights=[-1.0])
    with pytest.raises(pt.UserError, match="one \\(g, c, kh, kw\\)"):
        SecondOrderNet([(4, 9)], 6, 3)
    with pytest.raises(pt.UserError, match="GRU"):
        model_parameters(pt.build_model("rnn", num_classes=3, hidden=4))
    with pytest.raises(pt.UserError, match="LayeredNet"):
        model_parameters(torch.nn.Linear(3, 4))
    with pytest.raises(pt.UserError, match="unaligned baseline"):
        FrobeniusFC([(4, 1, 3, 3)], 6, 3, alignment="both")


# ---- learning ------------------------------------------------------------------------------------------


def _synthetic_model_set(per_task: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Three "tasks" whose trained models share layer 1 in distribution and differ in layer 2's filters
    (prototype + noise), each model with its hidden units in a random order (as retraining gives)."""
    gen = torch.Generator().manual_seed(0)  # the tasks themselves are fixed
    layer1 = torch.randn(6, 1, 3, 3, generator=gen)
    protos = [torch.randn(8, 6, 3, 3, generator=gen) for _ in range(3)]
    gen.manual_seed(seed)
    firsts, seconds, labels = [], [], []
    for task, proto in enumerate(protos):
        for _ in range(per_task):
            units1, units2 = torch.randperm(6, generator=gen), torch.randperm(8, generator=gen)
            w1 = layer1 + 0.3 * torch.randn(layer1.shape, generator=gen)
            w2 = proto + 0.6 * torch.randn(proto.shape, generator=gen)
            firsts.append(w1[units1])
            seconds.append(w2[units2][:, units1])
            labels.append(task)
    return [torch.stack(firsts), torch.stack(seconds)], torch.tensor(labels)


def _fit_and_score(model: torch.nn.Module, steps: int = 40) -> float:
    train, y_train = _synthetic_model_set(per_task=10, seed=1)
    test, y_test = _synthetic_model_set(per_task=10, seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model.loss(train, y_train).backward()
        opt.step()
    with torch.no_grad():
        return (model(test).logits.argmax(-1) == y_test).float().mean().item()


def test_second_order_net_learns_task_labels_from_aligned_layer_2() -> None:
    shapes = [(6, 1, 3, 3), (8, 6, 3, 3)]
    torch.manual_seed(0)
    # the tasks differ only in layer 2, so this exercises Eq. 6 and the sort above layer 1
    accuracy = _fit_and_score(SecondOrderNet(shapes, embed_dim=16, num_classes=3, filters=8, weights=[0, 1]))
    assert accuracy >= 0.9  # chance: 1/3
    torch.manual_seed(0)
    layer1_only = _fit_and_score(SecondOrderNet(shapes, embed_dim=16, num_classes=3, filters=8))
    assert layer1_only <= 0.6  # the paper's default branch 1 cannot see the difference here
    torch.manual_seed(0)
    flat = _fit_and_score(FlatFC(shapes, embed_dim=16, num_classes=3))
    assert flat <= accuracy - 0.2  # Table 1's point: unaligned parameters confuse an FC layer
