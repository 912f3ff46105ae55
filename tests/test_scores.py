"""Transferability scores (LogME, LEEP, NCE, H-score) checked by hand and against their definitions.

* hand-computed values: LEEP on a 4-example 2x2 case, NCE on a small joint table, H-score in 1-D;
* LogME: the fixed point matches a direct (no SVD) evaluation of the evidence formula and is a
  maximum of it (neighbours and a brute-force grid score no higher), also for n < d;
* orderings (informative > uninformative), invariances (relabelling, permutations, linear maps);
* torch and numpy inputs agree, results are deterministic, bad input gets a clear error.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from paramtransfer.errors import UserError
from paramtransfer.selection.scores import (
    LOGME_GRAM_RATIO,
    SCORES,
    _as_matrix,
    _fit_logme,
    hscore,
    leep,
    logme,
    logme_fit,
    nce,
)


def _direct_evidence(features: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """The LogME evidence / n straight from its definition: explicit A, a linear solve, slogdet."""
    n, d = features.shape
    a = alpha * np.eye(d) + beta * features.T @ features
    m = beta * np.linalg.solve(a, features.T @ y)
    sign, logdet = np.linalg.slogdet(a)
    assert sign > 0
    evidence = (
        n / 2 * math.log(beta)
        + d / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * float(np.sum((features @ m - y) ** 2))
        - alpha / 2 * float(m @ m)
        - logdet / 2
    )
    return evidence / n


def _gaussian_evidence(
    features: np.ndarray, y: np.ndarray, alpha: float | np.ndarray, beta: float | np.ndarray
) -> np.ndarray:
    """The same evidence / n as a Gaussian density: y ~ N(0, I/beta + F F^T/alpha) (w integrated out).

    Independent of the SVD and of m; unlike the explicit ``A`` above it stays well conditioned when
    beta -> inf with n < d (the labels are interpolated). ``alpha`` and ``beta`` broadcast (a grid).
    """
    n = len(y)
    a = np.asarray(alpha, dtype=np.float64)[..., None, None]
    b = np.asarray(beta, dtype=np.float64)[..., None, None]
    chol = np.linalg.cholesky(np.eye(n) / b + features @ features.T / a)
    white = np.linalg.solve(chol, np.broadcast_to(y[:, None], chol.shape[:-1] + (1,)))[..., 0]
    logdet = np.log(np.diagonal(chol, axis1=-2, axis2=-1)).sum(-1)
    return (-n / 2 * math.log(2 * math.pi) - logdet - (white**2).sum(-1) / 2) / n


def _class_problem(n: int, d: int, classes: int, signal: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features = class-dependent mean (scaled by ``signal``) + unit Gaussian noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, d))
    return signal * centres[labels] + rng.normal(size=(n, d)), labels


# ---------------------------------------------------------------- LEEP


def test_leep_hand_computed_2x2():
    # theta rows (source classes z0, z1) and labels y = 0, 0, 1, 1; n = 4.
    # P(y=0,z0) = (0.8+0.6)/4 = 0.35   P(y=0,z1) = (0.2+0.4)/4 = 0.15
    # P(y=1,z0) = (0.3+0.1)/4 = 0.10   P(y=1,z1) = (0.7+0.9)/4 = 0.40
    # P(z0) = 0.45, P(z1) = 0.55 -> P(0|z0) = 7/9, P(1|z0) = 2/9, P(0|z1) = 3/11, P(1|z1) = 8/11
    # EEP_1 = 0.8*7/9 + 0.2*3/11 = (61.6 + 5.4)/99 = 67/99;  EEP_2 = 0.6*7/9 + 0.4*3/11 = 57/99
    # EEP_3 = 0.3*2/9 + 0.7*8/11 = (6.6 + 50.4)/99 = 57/99;  EEP_4 = 0.1*2/9 + 0.9*8/11 = 67/99
    # LEEP = (2 log(67/99) + 2 log(57/99)) / 4 = -0.4712479...
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    expected = 0.5 * (math.log(67 / 99) + math.log(57 / 99))
    assert leep(probs, np.array([0, 0, 1, 1])) == pytest.approx(expected, abs=1e-12)
    assert leep(probs, np.array([0, 0, 1, 1]), num_target_classes=2) == pytest.approx(expected, abs=1e-12)


def test_leep_uniform_probabilities_give_minus_label_entropy():
    # theta = 1/Z: P(y|z) = P(y), so EEP_i = P(y_i) and LEEP = sum_y P(y) log P(y)
    labels = np.array([0, 0, 0, 1, 2, 2])
    uniform = np.full((6, 4), 0.25)
    expected = 0.5 * math.log(0.5) + 1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3)
    assert leep(uniform, labels) == pytest.approx(expected, abs=1e-12)


def test_leep_informative_beats_uniform():
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    logits = 3.0 * np.eye(5)[labels] + rng.normal(size=(60, 5))  # source class z = y is favoured
    informative = torch.softmax(torch.from_numpy(logits), dim=1)
    uniform = np.full((60, 5), 0.2)
    assert leep(informative, labels) > leep(uniform, labels) + 0.1
    assert leep(uniform, labels) == pytest.approx(-math.log(3), abs=1e-12)


def test_leep_invariant_to_permuting_source_and_target_classes():
    rng = np.random.default_rng(1)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(30, 6))), dim=1).numpy()
    labels = rng.integers(0, 3, 30)
    base = leep(probs, labels)
    assert leep(probs[:, [3, 0, 5, 1, 4, 2]], labels) == pytest.approx(base, abs=1e-12)
    assert leep(probs, np.array([7, 2, 5])[labels]) == pytest.approx(base, abs=1e-12)
    order = rng.permutation(30)
    assert leep(probs[order], labels[order]) == pytest.approx(base, abs=1e-12)


def test_leep_source_class_without_mass_is_ignored():
    probs = np.array([[0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.1, 0.9, 0.0]])
    expected = 0.5 * (math.log(67 / 99) + math.log(57 / 99))  # the 2x2 case above
    assert leep(probs, np.array([0, 0, 1, 1])) == pytest.approx(expected, abs=1e-12)


def _leep_by_the_definition(probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP with explicit loops over examples (the definition, nothing vectorised)."""
    theta = probs / probs.sum(1, keepdims=True)
    n, z = theta.shape
    classes = sorted(set(labels.tolist()))
    joint = {
        (y, j): sum(theta[i, j] for i in range(n) if labels[i] == y) / n for y in classes for j in range(z)
    }
    marginal = [sum(joint[y, j] for y in classes) for j in range(z)]
    total = 0.0
    for i in range(n):
        total += math.log(
            sum(joint[labels[i], j] / marginal[j] * theta[i, j] for j in range(z) if marginal[j] > 0)
        )
    return total / n


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_leep_matches_the_definition_on_random_outputs(dtype):
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(12, 0.3), size=40)
    probs[:, 5] = 0.0  # a source class without mass
    probs /= probs.sum(1, keepdims=True)
    probs *= 1 + rng.uniform(-1e-4, 1e-4, size=(40, 1))  # rows summing to 1 only within PROB_ATOL
    probs = probs.astype(dtype)
    labels = rng.integers(0, 4, 40)
    expected = _leep_by_the_definition(probs.astype(np.float64), labels)
    assert leep(probs, labels) == pytest.approx(expected, abs=1e-12)


def test_leep_rejects_logits_and_out_of_range_labels():
    labels = np.array([0, 1, 0, 1])
    logits = np.array([[2.0, -1.0], [0.5, 0.3], [1.0, 1.0], [-0.2, 0.1]])
    with pytest.raises(UserError, match="softmax.*not logits"):
        leep(logits, labels)
    with pytest.raises(UserError, match="sum to 1.*not logits"):
        leep(np.abs(logits), labels)
    probs = np.full((4, 2), 0.5)
    with pytest.raises(UserError, match=r"\[0, 2\).*\[0, 2\]"):
        leep(probs, np.array([0, 1, 2, 1]), num_target_classes=2)
    with pytest.raises(UserError, match="at least 2"):
        leep(probs, np.array([1, 1, 1, 1]))


# ---------------------------------------------------------------- NCE


def test_nce_hand_computed_table():
    # counts (rows y, columns z):  z=0: y0 2, y1 1;  z=1: y0 0, y1 3;  n = 6
    # NCE = sum P(y,z) log P(y|z) = 2/6 log(2/3) + 1/6 log(1/3) + 3/6 log(3/3) = -0.3182571...
    z = np.array([0, 0, 0, 1, 1, 1])
    y = np.array([0, 0, 1, 1, 1, 1])
    expected = 2 / 6 * math.log(2 / 3) + 1 / 6 * math.log(1 / 3)
    assert nce(z, y) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(-0.5 * (-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)))


def test_nce_is_zero_for_a_deterministic_mapping():
    z = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    y = np.array([0, 1, 1, 0, 0, 1, 1, 0])  # y = f(z): 0->0, 1->1, 2->1, 3->0
    assert nce(z, y) == 0.0
    assert nce(y, z) < 0  # z is not a function of y


def test_nce_independent_uniform_is_minus_log_k():
    z, y = (np.array(v) for v in zip(*itertools.product(range(2), range(3)), strict=True))  # all 6 pairs
    assert nce(np.tile(z, 2), np.tile(y, 2)) == pytest.approx(-math.log(3), abs=1e-12)
    assert nce(np.zeros(6, dtype=np.int64), np.array([0, 1, 2, 0, 1, 2])) == pytest.approx(-math.log(3))


def test_nce_invariant_to_relabelling_source_classes():
    rng = np.random.default_rng(2)
    z = rng.integers(0, 5, 50)
    y = (z + rng.integers(0, 2, 50)) % 3
    base = nce(z, y)
    assert base < 0
    assert nce(np.array([40, 3, 17, -2, 9])[z], y) == base
    assert nce(z, np.array([5, 1, 8])[y]) == pytest.approx(base, abs=1e-12)


def test_nce_rejects_bad_labels():
    with pytest.raises(UserError, match="integer"):
        nce(np.array([0.0, 1.0]), np.array([0, 1]))
    with pytest.raises(UserError, match="3 entries but there are 2"):
        nce(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(UserError, match="empty"):
        nce(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    with pytest.raises(UserError, match="at least 2"):
        nce(np.array([0, 1, 2]), np.array([4, 4, 4]))


# ---------------------------------------------------------------- H-score


def test_hscore_hand_computed_1d():
    # f = 0, 2, 4, 6 with y = 0, 0, 1, 1: class means 1 and 5, overall mean 3
    # var(f) = (9 + 1 + 1 + 9)/4 = 5; var(E[f|y]) = (4 + 4 + 4 + 4)/4 = 4 -> H = 4/5
    f = np.array([[0.0], [2.0], [4.0], [6.0]])
    assert hscore(f, np.array([0, 0, 1, 1])) == pytest.approx(0.8, abs=1e-12)
    # y = 0, 1, 0, 1: class means 2 and 4 -> var(E[f|y]) = 1 -> H = 1/5
    assert hscore(f, np.array([0, 1, 0, 1])) == pytest.approx(0.2, abs=1e-12)
    # perfectly separated: E[f|y] = f -> H = 1
    assert hscore(np.array([[1.0], [1.0], [3.0], [3.0]]), np.array([0, 0, 1, 1])) == pytest.approx(1.0)


def test_hscore_separating_features_beat_random_ones():
    good, labels = _class_problem(90, 8, 3, signal=2.0, seed=3)
    noise = np.random.default_rng(4).normal(size=(90, 8))
    assert hscore(good, labels) > hscore(noise, labels) + 1.0
    assert 0 <= hscore(noise, labels) <= 2  # at most min(K - 1, d)


def test_hscore_invariant_to_invertible_linear_maps():
    f, labels = _class_problem(60, 5, 3, signal=1.0, seed=5)
    mix = np.random.default_rng(6).normal(size=(5, 5)) + 3 * np.eye(5)
    assert abs(np.linalg.det(mix)) > 1
    assert hscore(f @ mix, labels) == pytest.approx(hscore(f, labels), rel=1e-9)
    assert hscore(f * 1000.0 + 7.0, labels) == pytest.approx(hscore(f, labels), rel=1e-9)


def test_hscore_singular_covariance_uses_the_pseudo_inverse():
    f, labels = _class_problem(40, 3, 2, signal=1.0, seed=7)
    padded = np.hstack([f, f[:, :1] * 2.0, np.full((40, 1), 3.0)])  # a collinear and a constant column
    assert hscore(padded, labels) == pytest.approx(hscore(f, labels), rel=1e-8)
    assert hscore(np.ones((4, 2)), np.array([0, 0, 1, 1])) == 0.0


# ---------------------------------------------------------------- LogME


# (8, 12): n < d, the labels of class 0 can be interpolated and its evidence grows as beta -> inf;
# (30, 4) with no signal: for class 0 the evidence grows as alpha -> inf (m -> 0, the features do not help).
PROBLEMS = [(40, 5, 1.0), (30, 4, 0.0), (8, 12, 1.0)]


@pytest.mark.parametrize(("n", "d", "signal"), PROBLEMS)
def test_logme_matches_the_direct_evidence_at_its_fixed_point(n: int, d: int, signal: float):
    features, labels = _class_problem(n, d, 3, signal=signal, seed=n + d)
    fit = logme_fit(features, labels)
    assert all(fit.converged)
    assert fit.score == pytest.approx(float(np.mean(fit.evidence)), abs=1e-15)
    assert logme(features, labels) == fit.score
    for c in range(3):
        y = (labels == c).astype(np.float64)
        assert fit.evidence[c] == pytest.approx(
            _gaussian_evidence(features, y, fit.alpha[c], fit.beta[c]), abs=1e-12
        )
        if n > d:  # the explicit A = alpha I + beta F^T F is ill-conditioned at beta ~ 1e9 when n < d
            direct = _direct_evidence(features, y, fit.alpha[c], fit.beta[c])
            assert fit.evidence[c] == pytest.approx(direct, abs=1e-12)


@pytest.mark.parametrize(("n", "d", "signal"), PROBLEMS)
def test_logme_is_a_maximum_of_the_evidence(n: int, d: int, signal: float):
    features, labels = _class_problem(n, d, 3, signal=signal, seed=n + d)
    fit = logme_fit(features, labels)
    for c in range(3):
        y = (labels == c).astype(np.float64)
        best = fit.evidence[c]
        # neighbours in (log alpha, log beta); at a boundary maximum (alpha or beta -> inf) moving further
        # out gains less than the remaining gap, which the 1e-10 evidence tolerance keeps below 1e-9
        for step in (0.01, 0.1, 1.0):
            for da, db in itertools.product((-step, 0.0, step), repeat=2):
                alpha, beta = fit.alpha[c] * math.exp(da), fit.beta[c] * math.exp(db)
                assert _gaussian_evidence(features, y, alpha, beta) <= best + 1e-9
        # brute force over a wide log-grid: no grid point beats the fixed point, and some come close
        log_alpha, log_beta = np.meshgrid(np.linspace(-12.0, 14.0, 53), np.linspace(-12.0, 14.0, 53))
        values = _gaussian_evidence(features, y, np.exp(log_alpha), np.exp(log_beta))
        assert best - 0.05 <= values.max() <= best + 1e-9


def test_logme_fixed_point_equations_hold_at_an_interior_maximum():
    features, labels = _class_problem(50, 4, 2, signal=1.5, seed=8)
    fit = logme_fit(features, labels)
    for c in range(2):
        y = (labels == c).astype(np.float64)
        alpha, beta = fit.alpha[c], fit.beta[c]
        a = alpha * np.eye(4) + beta * features.T @ features
        m = beta * np.linalg.solve(a, features.T @ y)
        gamma = 4 - alpha * np.trace(np.linalg.inv(a))  # = sum beta s^2 / (alpha + beta s^2)
        assert alpha == pytest.approx(gamma / (m @ m), rel=1e-3)
        assert beta == pytest.approx((50 - gamma) / np.sum((features @ m - y) ** 2), rel=1e-3)


def _gram_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """n >> d features: well conditioned, and near-singular ones the Gram path must leave to the SVD."""
    rng = np.random.default_rng(21)
    cases = {}
    for n, d, k, signal in [(2000, 16, 3, 1.0), (1200, 60, 10, 0.3), (500, 50, 5, 0.0), (3000, 32, 4, 5.0)]:
        cases[f"gaussian {n}x{d}"] = _class_problem(n, d, k, signal, seed=n + d)
    base, labels = _class_problem(1500, 30, 5, 1.0, seed=22)
    relu = np.maximum(base @ rng.normal(size=(30, 120)), 0.0)
    relu[:, :7] = 0.0  # dead units: exact null directions, left out of the Gram matrix
    cases["relu with dead units"] = (relu, labels)
    for noise in (1e-2, 1e-5, 1e-8, 0.0):  # a column that is (almost) a combination of the others
        extra = base[:, :10] @ rng.normal(size=10) + noise * rng.normal(size=1500)
        cases[f"near-collinear {noise:g}"] = (np.column_stack([base, extra]), labels)
    for scale in (1e-2, 1e-3, 1e-4, 1e-5):  # the informative feature at a tiny scale (badly conditioned)
        tiny = scale * (labels + 0.1 * rng.normal(size=1500))
        cases[f"informative column at {scale:g}"] = (
            np.column_stack([rng.normal(size=(1500, 20)), tiny]),
            labels,
        )
    scaled = base * 10.0 ** rng.uniform(-4, 4, size=30)
    cases["columns scaled 1e-4..1e4"] = (scaled, labels)
    three = labels % 3
    exact = np.column_stack([rng.normal(size=(1500, 10)), three == 0, three == 1])  # 2 classes fitted exactly
    cases["labels linear in the features"] = (exact.astype(np.float64), three)
    return cases


@pytest.mark.parametrize("name", list(_gram_cases()))
def test_logme_gram_path_matches_the_svd(name: str):
    """n >= LOGME_GRAM_RATIO * d: the d x d Gram eigendecomposition replaces the SVD where it keeps the
    log evidence within 1e-6 of it (every class); near-singular features fall back to the SVD itself."""
    features, labels = _gram_cases()[name]
    assert features.shape[0] >= LOGME_GRAM_RATIO * features.shape[1]
    svd = _fit_logme(features, labels, 1e-10, 10_000, solver="svd")
    auto = logme_fit(features, labels)
    assert svd.solver == "svd" and all(svd.converged) and all(auto.converged)
    assert np.max(np.abs(np.subtract(auto.evidence, svd.evidence))) <= 1e-6
    assert abs(auto.score - svd.score) <= 1e-6
    gram = ["relu with dead units", "near-collinear 0.01", "informative column at 0.01"]
    svd_only = ["near-collinear 1e-08", "near-collinear 0", "informative column at 1e-05"]
    if name.startswith("gaussian") or name in gram:
        assert auto.solver == "gram"
    if name in [*svd_only, "labels linear in the features"]:
        assert auto.solver == "svd"  # too ill-conditioned (or fitted exactly) for the Gram matrix


def test_logme_picks_the_gram_path_only_for_n_much_larger_than_d():
    features, labels = _class_problem(4 * 12, 12, 3, 1.0, seed=23)
    assert logme_fit(features, labels).solver == "gram"
    assert logme_fit(features[:-1], labels[:-1]).solver == "svd"  # n < 4 d
    assert logme_fit(
        features[:, :5].T @ features[:, :5] @ np.ones((5, 1)) @ np.ones((1, 3)), [0, 1, 0, 1, 0]
    ).solver
    with pytest.raises(UserError, match="all zero"):
        logme(np.zeros((40, 3)), np.arange(40) % 2)


def test_logme_separating_features_beat_random_ones():
    good, labels = _class_problem(90, 8, 3, signal=2.0, seed=9)
    noise = np.random.default_rng(10).normal(size=(90, 8))
    assert logme(good, labels) > logme(noise, labels) + 0.1


def test_logme_invariant_to_class_names_and_example_order():
    features, labels = _class_problem(36, 6, 3, signal=1.0, seed=11)
    base = logme(features, labels)
    order = np.random.default_rng(12).permutation(36)
    assert logme(features[order], labels[order]) == pytest.approx(base, abs=1e-9)
    assert logme(features, np.array([9, -4, 2])[labels]) == pytest.approx(base, abs=1e-12)


def test_logme_warns_when_not_converged():
    features, labels = _class_problem(40, 5, 3, signal=1.0, seed=13)
    with pytest.warns(RuntimeWarning, match="3 of 3 classes did not converge within 1 iterations") as record:
        fit = logme_fit(features, labels, max_iter=1)
    assert not any(fit.converged) and fit.iterations == 1
    with pytest.warns(RuntimeWarning, match="did not converge") as record_score:
        logme(features, labels, max_iter=1)
    # the warning points at the caller, not into the library
    assert record[0].filename == record_score[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(logme_fit(features, labels).converged)


def test_logme_rejects_all_zero_features():
    with pytest.raises(UserError, match="all zero"):
        logme(np.zeros((4, 3)), np.array([0, 1, 0, 1]))


# ---------------------------------------------------------------- all scores


def _inputs(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    features, labels = _class_problem(24, 4, 3, signal=1.0, seed=seed)
    probs = torch.softmax(torch.from_numpy(features), dim=1).numpy()
    return {
        "logme": (features, labels),
        "hscore": (features, labels),
        "leep": (probs, labels),
        "nce": (probs.argmax(1), labels),
    }


@pytest.mark.parametrize("name", ["logme", "leep", "nce", "hscore"])
def test_torch_and_numpy_inputs_agree_and_runs_are_deterministic(name: str):
    score = SCORES.get(name)
    x, y = _inputs(14)[name]
    value = score(x, y)
    assert isinstance(value, float) and math.isfinite(value)
    assert score(torch.from_numpy(x), torch.from_numpy(y)) == value
    assert score(x, y) == value
    if x.dtype == np.float64:  # float32 input is promoted to float64: same as float32-rounded numpy
        assert score(torch.from_numpy(x).float(), y) == score(x.astype(np.float32), y)


def test_registry_lists_the_scores():
    assert SCORES.names() == [
        "hscore",
        "hscore_shrinkage",
        "leep",
        "logme",
        "logme_regression",
        "nce",
        "transrate",
    ]
    with pytest.raises(
        UserError, match="known: hscore, hscore_shrinkage, leep, logme, logme_regression, nce"
    ):
        SCORES.get("gbc")


@pytest.mark.parametrize("name", ["logme", "hscore", "leep"])
def test_feature_scores_reject_bad_input(name: str):
    score = SCORES.get(name)
    x, y = _inputs(15)[name]
    with pytest.raises(UserError, match="23 entries but there are 24 examples"):
        score(x, y[:-1])
    with pytest.raises(UserError, match="empty"):
        score(x[:0], y[:0])
    with pytest.raises(UserError, match="integer class indices"):
        score(x, y.astype(np.float32))
    with pytest.raises(UserError, match="at least 2 target classes"):
        score(x, np.zeros(24, dtype=np.int64))
    with pytest.raises(UserError, match="2-D"):
        score(x[:, 0], y)
    with pytest.raises(UserError, match="must be a torch.Tensor or a numpy array"):
        score("features.npy", y)
    broken = x.copy()
    broken[3, 1] = np.nan
    with pytest.raises(UserError, match="1 NaN or infinite"):
        score(broken, y)
    broken[3, 1], broken[5, 0] = np.inf, -np.inf  # their sum is NaN: still two bad values
    with pytest.raises(UserError, match="2 NaN or infinite"):
        score(broken, y)


def test_huge_finite_features_pass_the_finite_check_and_inputs_are_not_changed():
    huge = np.full((3, 2), 1e308)  # their sum overflows to inf, yet every value is finite
    assert torch.equal(_as_matrix(huge, "features", "hscore", "[n, d]"), torch.from_numpy(huge))
    features, labels = _class_problem(24, 4, 3, 2.0, 0)
    probs = torch.softmax(torch.from_numpy(features), dim=1)
    before = probs.clone()
    leep(probs, labels)
    logme(features, labels)
    assert torch.equal(probs, before)
    read_only = features.copy()
    read_only.flags.writeable = False
    assert logme(read_only, labels) == logme(features, labels)  # copied, no warning about writing
