"""TransRate, the shrinkage H-score and LogME for regression / multi-label targets, and their wiring.

* TransRate: hand-computed 2-D cases, the two Gram paths of the coding rate agree (Sylvester), a direct
  slogdet evaluation of the definition, invariances, bad input;
* shrinkage H-score: a hand-computed case (Ledoit-Wolf's alpha by hand), alpha = 0 is the plain H-score
  exactly, sklearn's LedoitWolf covariance gives the same value, ``0 <= H_alpha <= H``, and it still
  separates features where the plain H-score cannot (n < d);
* LogME regression: on one-hot labels it is classification LogME exactly; on real targets its fixed point
  matches the evidence formula and a brute-force maximisation; scaling the targets by c shifts it by
  -log c; multi-label columns are scored one by one;
* ``rank`` reports both new scores (and their tau), a stored report gains them without training, and the
  bench's ``scores:`` list and the LPS bench's labels accept them.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.covariance import LedoitWolf, ledoit_wolf_shrinkage

import paramtransfer as pt
from paramtransfer.errors import UserError
from paramtransfer.selection.scores import (
    SCORES,
    _coding_rate,
    _fit_logme_columns,
    hscore,
    hscore_shrinkage,
    logme,
    logme_fit,
    logme_regression,
    transrate,
)


def _class_problem(n: int, d: int, classes: int, signal: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    return signal * rng.normal(size=(classes, d))[labels] + rng.normal(size=(n, d)), labels


# ---------------------------------------------------------------- TransRate


CROSS = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # centred; class 0 on x, class 1 on y


def test_transrate_hand_computed():
    # Z^T Z = diag(8, 2), n = 4: R(Z) = 1/2 log((1 + 8/(4 eps)) (1 + 2/(4 eps)))
    # class 0: Z0^T Z0 = diag(8, 0), n0 = 2: R = 1/2 log(1 + 8/(2 eps)); class 1: 1/2 log(1 + 2/(2 eps))
    # eps = 1:   1/2 log(3 * 1.5) - 1/2 (1/2 log 5 + 1/2 log 2) = 1/4 log(20.25 / 10)
    # eps = 0.5: 1/2 log(5 * 2)   - 1/2 (1/2 log 9 + 1/2 log 3) = 1/4 log(100 / 27)
    labels = np.array([0, 0, 1, 1])
    assert transrate(CROSS, labels, eps=1.0) == pytest.approx(0.25 * math.log(2.025), abs=1e-14)
    assert transrate(CROSS, labels, eps=0.5) == pytest.approx(0.25 * math.log(100 / 27), abs=1e-14)
    # features are centred over all examples first: a shift changes nothing
    assert transrate(CROSS + [5.0, -3.0], labels, eps=0.5) == pytest.approx(
        0.25 * math.log(100 / 27), abs=1e-13
    )


def test_transrate_class_subsets_are_not_centred_again():
    # As in the authors' code: 1-D classes with the same second moment about the global mean score 0
    # (R(Z_c) = 1/2 log(1 + 5/eps) for both classes and for Z), although the classes are separated.
    assert transrate(
        np.array([[-3.0], [-1.0], [1.0], [3.0]]), np.array([0, 0, 1, 1]), eps=1.0
    ) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize(("n", "d"), [(5, 30), (30, 5), (12, 12)])
def test_coding_rate_gram_paths_agree_and_match_slogdet(n: int, d: int):
    z = torch.from_numpy(np.random.default_rng(n * d).normal(size=(n, d)))
    for eps in (1e-4, 1.0):
        examples, features = _coding_rate(z, eps, "examples"), _coding_rate(z, eps, "features")
        sign, direct = np.linalg.slogdet(np.eye(d) + z.numpy().T @ z.numpy() / (n * eps))
        assert sign > 0
        assert examples == pytest.approx(features, rel=1e-11)
        assert _coding_rate(z, eps) == pytest.approx(0.5 * direct, rel=1e-11)


def _transrate_direct(features: np.ndarray, labels: np.ndarray, eps: float) -> float:
    """The definition with d x d log-determinants throughout."""

    def rate(z: np.ndarray) -> float:
        return 0.5 * np.linalg.slogdet(np.eye(z.shape[1]) + z.T @ z / (len(z) * eps))[1]

    z = features - features.mean(0)
    classes = np.unique(labels)
    return rate(z) - sum(rate(z[labels == c]) for c in classes) / len(classes)


@pytest.mark.parametrize(("n", "d"), [(12, 30), (60, 6)])
def test_transrate_matches_the_definition(n: int, d: int):
    features, labels = _class_problem(n, d, 3, 1.0, seed=n)
    for eps in (1e-4, 0.1):
        assert transrate(features, labels, eps=eps) == pytest.approx(
            _transrate_direct(features, labels, eps), rel=1e-10
        )


def test_transrate_invariances_and_ordering():
    features, labels = _class_problem(45, 6, 3, 1.5, seed=3)
    base = transrate(features, labels)
    rotation, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(6, 6)))
    assert transrate(features @ rotation, labels) == pytest.approx(base, rel=1e-10)
    assert transrate(features[:, ::-1], labels) == pytest.approx(base, rel=1e-10)  # a negative-stride view
    order = np.random.default_rng(5).permutation(45)
    assert transrate(features[order], labels[order]) == pytest.approx(base, rel=1e-12)
    assert transrate(features, np.array([7, -2, 40])[labels]) == pytest.approx(base, rel=1e-12)
    noise = np.random.default_rng(6).normal(size=(45, 6)) * features.std()
    assert transrate(features, labels) > transrate(noise, labels) + 0.5
    assert transrate(torch.from_numpy(features), torch.from_numpy(labels)) == base


@pytest.mark.parametrize("eps", [0, -1e-4, math.nan, math.inf, True, "1e-4", None])
def test_transrate_rejects_a_bad_eps(eps):
    with pytest.raises(UserError, match="eps must be a positive finite number"):
        transrate(CROSS, [0, 0, 1, 1], eps=eps)


def test_transrate_rejects_bad_features_and_labels():
    with pytest.raises(UserError, match="at least 2 target classes"):
        transrate(CROSS, [1, 1, 1, 1])
    with pytest.raises(UserError, match="3 entries but there are 4 examples"):
        transrate(CROSS, [0, 1, 1])
    with pytest.raises(UserError, match="2-D"):
        transrate(CROSS[:, 0], [0, 0, 1, 1])
    with pytest.raises(UserError, match="2 NaN or infinite"):
        transrate(np.where(np.eye(4, 2) == 1, np.nan, 1.0), [0, 0, 1, 1])
    with pytest.raises(UserError, match="features too large"):
        transrate(CROSS * 1e200, [0, 0, 1, 1])


# ---------------------------------------------------------------- shrinkage H-score


def test_hscore_shrinkage_hand_computed():
    # Centred CROSS, labels 0, 1, 0, 1: S = diag(2, 0.5), mu = tr(S)/d = 1.25.
    # Ledoit-Wolf: delta = ||S - mu I||_F^2 / d = (0.75^2 + 0.75^2) / 2 = 0.5625,
    # beta = (sum_i ||x_i||^4 / n - ||S||_F^2) / (d n) = (34/4 - 4.25) / 8 = 0.53125,
    # alpha = beta / delta = 17/18.
    # cov_alpha = S/18 + 17/18 * 1.25 I = diag(23.25, 21.75) / 18.
    # class means (1, 0.5), (-1, -0.5), each P = 1/2: cov(E[f|y]) = [[1, 0.5], [0.5, 0.25]].
    # H_alpha = (1/18) tr(cov_alpha^-1 cov_means) = 1/23.25 + 0.25/21.75.
    labels = np.array([0, 1, 0, 1])
    assert ledoit_wolf_shrinkage(CROSS) == pytest.approx(17 / 18, abs=1e-15)
    expected = 1 / 23.25 + 0.25 / 21.75
    assert hscore_shrinkage(CROSS, labels) == pytest.approx(expected, abs=1e-14)
    assert hscore_shrinkage(CROSS, labels, shrinkage=17 / 18) == pytest.approx(expected, abs=1e-14)
    # the plain H-score of the same data: tr(diag(1/2, 2) cov_means) = 1
    assert hscore(CROSS, labels) == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize(("n", "d"), [(40, 5), (10, 20)])
def test_hscore_shrinkage_zero_is_the_plain_hscore_exactly(n: int, d: int):
    features, labels = _class_problem(n, d, 3, 1.0, seed=n + d)
    assert hscore_shrinkage(features, labels, shrinkage=0.0) == hscore(features, labels)
    assert hscore_shrinkage(features, labels, shrinkage=1.0) == 0.0


def test_hscore_shrinkage_in_1d_is_the_plain_hscore():
    # one dimension: S = mu I, so Ledoit-Wolf's alpha is 0
    features, labels = np.array([[0.0], [2.0], [4.0], [6.0]]), np.array([0, 0, 1, 1])
    assert hscore_shrinkage(features, labels) == hscore(features, labels) == pytest.approx(0.8)


@pytest.mark.parametrize(("n", "d"), [(60, 6), (12, 30)])
def test_hscore_shrinkage_matches_sklearns_ledoit_wolf_and_is_at_most_hscore(n: int, d: int):
    features, labels = _class_problem(n, d, 3, 1.0, seed=7 * n)
    lw = LedoitWolf().fit(features)
    centred = features - features.mean(0)
    means = np.stack([centred[labels == c].mean(0) for c in labels])  # each example's class mean
    expected = np.trace(np.linalg.solve(lw.covariance_, (1 - lw.shrinkage_) * means.T @ means / n))
    value = hscore_shrinkage(features, labels)
    assert 0 < lw.shrinkage_ < 1
    assert value == pytest.approx(expected, rel=1e-10)
    assert 0 <= value <= hscore(features, labels) + 1e-12
    for alpha in (0.25, 0.75):
        assert 0 <= hscore_shrinkage(features, labels, shrinkage=alpha) <= hscore(features, labels) + 1e-12


def test_hscore_shrinkage_separates_features_where_hscore_cannot():
    # n <= d: the plain H-score is K - 1 for any features (the class means lie in the span of the data)
    good, labels = _class_problem(20, 50, 4, 2.0, seed=8)
    noise = np.random.default_rng(9).normal(size=(20, 50))
    assert hscore(good, labels) == pytest.approx(3.0) and hscore(noise, labels) == pytest.approx(3.0)
    assert hscore_shrinkage(good, labels) > hscore_shrinkage(noise, labels) + 1.0


@pytest.mark.parametrize("shrinkage", [-0.1, 1.5, math.nan, "0.5", True])
def test_hscore_shrinkage_rejects_a_bad_shrinkage(shrinkage):
    with pytest.raises(UserError, match=r"shrinkage must be a number in \[0, 1\]"):
        hscore_shrinkage(CROSS, [0, 1, 0, 1], shrinkage=shrinkage)


def test_hscore_shrinkage_rejects_bad_features_and_labels():
    with pytest.raises(UserError, match="hscore_shrinkage: labels holds only 1 distinct class"):
        hscore_shrinkage(CROSS, [2, 2, 2, 2])
    with pytest.raises(UserError, match="integer class indices"):
        hscore_shrinkage(CROSS, np.array([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(UserError, match="2 NaN or infinite"):
        hscore_shrinkage(np.where(np.eye(4, 2) == 1, np.inf, 1.0), [0, 1, 0, 1])


# ---------------------------------------------------------------- LogME for regression and multi-label


@pytest.mark.parametrize(("n", "d"), [(80, 8), (15, 40)])
def test_logme_regression_on_one_hot_labels_is_classification_logme_exactly(n: int, d: int):
    features, labels = _class_problem(n, d, 3, 1.0, seed=n)
    labels = np.array([4, 9, 11])[labels]  # not 0..K-1
    onehot = (labels[:, None] == np.unique(labels)[None, :]).astype(np.float64)
    assert logme_regression(features, onehot) == logme(features, labels)
    assert logme_regression(features, onehot.astype(bool)) == logme(features, labels)
    assert logme_regression(torch.from_numpy(features), torch.from_numpy(onehot)) == logme(features, labels)


def _direct_evidence(features: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """The evidence / n as the density of y ~ N(0, I/beta + F F^T / alpha) (w integrated out)."""
    n = len(y)
    cov = np.eye(n) / beta + features @ features.T / alpha
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    return float(-0.5 * (n * math.log(2 * math.pi) + logdet + y @ np.linalg.solve(cov, y))) / n


def _real_targets(n: int, d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, d))
    return features, features @ rng.normal(size=(d, k)) + 0.5 * rng.normal(size=(n, k)) + 1.0


@pytest.mark.parametrize(("n", "d"), [(40, 4), (8, 3), (6, 10)])
def test_logme_regression_fixed_point_is_the_evidence_maximum(n: int, d: int):
    features, targets = _real_targets(n, d, 2, seed=n + d)
    fit = _fit_logme_columns(
        torch.from_numpy(features), torch.from_numpy(targets), 1e-12, 10_000, "auto", "t"
    )
    assert all(fit.converged)
    for j in range(2):
        y = targets[:, j]
        at_fit = _direct_evidence(features, y, fit.alpha[j], fit.beta[j])
        assert fit.evidence[j] == pytest.approx(at_fit, abs=1e-9)

        # brute force: maximise over (log alpha, log beta) from several starts
        def negative(p: np.ndarray, y: np.ndarray = y) -> float:
            return -_direct_evidence(features, y, math.exp(p[0]), math.exp(p[1]))

        best = min(
            minimize(negative, start, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14}).fun
            for start in ([0.0, 0.0], [-4.0, 3.0], [4.0, -3.0])
        )
        assert fit.evidence[j] == pytest.approx(-best, abs=1e-7)
        assert fit.evidence[j] >= -best - 1e-9  # never below the brute-force maximum
    assert logme_regression(features, targets) == pytest.approx(np.mean(fit.evidence), abs=1e-9)


def test_logme_regression_scaled_targets_shift_by_minus_log_c():
    # y -> c y maps the evidence maximum (alpha, beta) -> (alpha, beta) / c^2: log p(c y) = log p(y) - n log c
    features, targets = _real_targets(50, 5, 3, seed=10)
    base = logme_regression(features, targets)
    for c in (3.0, 0.01):
        assert logme_regression(features, c * targets) == pytest.approx(base - math.log(c), abs=1e-8)


def test_logme_multi_label_scores_each_label_column():
    rng = np.random.default_rng(11)
    features = rng.normal(size=(60, 6))
    labels = (features[:, :3] + 0.5 * rng.normal(size=(60, 3)) > 0).astype(np.float64)  # 0/1, several per row
    assert (labels.sum(1) > 1).any()
    columns = [logme_regression(features, labels[:, [j]]) for j in range(3)]
    assert logme_regression(features, labels) == pytest.approx(np.mean(columns), abs=1e-10)
    assert logme_regression(features, labels[:, ::-1]) == pytest.approx(np.mean(columns), abs=1e-12)
    noise = rng.normal(size=(60, 6))
    assert logme_regression(features, labels) > logme_regression(noise, labels) + 0.05


def test_logme_regression_rejects_bad_targets_and_warns_like_logme():
    features, targets = _real_targets(20, 3, 2, seed=12)
    with pytest.raises(UserError, match=r"targets must be 2-D .*single target use targets.reshape\(-1, 1\)"):
        logme_regression(features, targets[:, 0])
    with pytest.raises(UserError, match="targets has 19 rows but there are 20 examples"):
        logme_regression(features, targets[:-1])
    with pytest.raises(UserError, match="target column\\(s\\) 1 are all zero"):
        logme_regression(features, np.column_stack([targets[:, 0], np.zeros(20)]))
    broken = targets.copy()
    broken[4, 1] = np.nan
    with pytest.raises(UserError, match="targets contains 1 NaN"):
        logme_regression(features, broken)
    with pytest.raises(UserError, match="logme_regression: features are all zero"):
        logme_regression(np.zeros((20, 3)), targets)
    with pytest.raises(UserError, match="need tol > 0"):
        logme_regression(features, targets, tol=0)
    with pytest.warns(RuntimeWarning, match="2 of 2 target columns did not converge") as record:
        logme_regression(features, targets, max_iter=1)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isfinite(logme_regression(features, targets))


def test_the_registry_holds_the_new_scores():
    assert {"transrate", "hscore_shrinkage", "logme_regression"} <= set(SCORES.names())
    assert SCORES.get("transrate") is transrate and SCORES.get("hscore_shrinkage") is hscore_shrinkage
    features, labels = _class_problem(30, 4, 3, 1.0, seed=13)
    assert logme_fit(features, labels).score == logme(features, labels)  # the classification path unchanged


# ---------------------------------------------------------------- wiring: rank, bench settings, LPS bench


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    from paramtransfer.selection.modelset import build_modelset

    root = tmp_path_factory.mktemp("set")
    build_modelset(
        "digits",
        root,
        models_per_task=1,
        max_tasks=3,
        epochs=1,
        shots=10,
        arch_kwargs={"width": 4, "hidden": 16},
        progress=False,
    )
    return root


def test_rank_reports_the_new_scores_and_a_stored_report_gains_them(tiny_set: Path, tmp_path: Path):
    from paramtransfer.selection.rank import (
        FAST_SCORES,
        SCORE_NAMES,
        RankConfig,
        add_missing_scores,
        fast_scores,
        find_candidates,
        rank_sources,
    )

    assert SCORE_NAMES == ("lps", *FAST_SCORES) and {"transrate", "hscore_shrinkage"} <= set(FAST_SCORES)
    config = RankConfig(shots=5, verify_epochs=1, test_limit=50)
    paths = [c.path for c in find_candidates([tiny_set])[0]]
    report = rank_sources("digits[0,1]", paths, tmp_path, config=config, verify=True, progress=False)
    assert report["scores"] == list(FAST_SCORES)
    rows = report["candidates"]
    for s in ("transrate", "hscore_shrinkage"):
        assert sorted(r[f"{s}_rank"] for r in rows) == [1, 2, 3]
        assert report["weighted_tau"][s] is None or -1 <= report["weighted_tau"][s] <= 1
    assert "hscore_shrinkage | transrate | fine-tuned accuracy |" in (tmp_path / "rank.md").read_text()

    task = pt.load_task("digits[0,1]", shots=5, seed=0)
    model = pt.load_model(paths[0])
    with torch.no_grad():
        feats = model.eval().embed(task.train.x).double()
    scores = fast_scores(model, task)
    assert scores["transrate"] == pytest.approx(transrate(feats, task.train.y), rel=1e-12)
    assert scores["hscore_shrinkage"] == pytest.approx(hscore_shrinkage(feats, task.train.y), rel=1e-12)

    # a report stored before the two scores existed gets them, with the same values, ranks and tau
    stored = json.loads((tmp_path / "rank.json").read_text())
    old = json.loads(json.dumps(stored))
    for row in old["candidates"]:
        for s in ("transrate", "hscore_shrinkage"):
            del row[s], row[f"{s}_rank"]
    old["scores"] = ["logme", "leep", "nce", "hscore"]
    for s in ("transrate", "hscore_shrinkage"):
        del old["weighted_tau"][s]
    assert add_missing_scores(old, config) == ["hscore_shrinkage", "transrate"]
    assert old == stored
    assert add_missing_scores(old, config) == [] and old == stored


def test_bench_settings_and_the_lps_bench_know_the_new_scores(tmp_path: Path):
    from paramtransfer.bench.compare import run_compare_setting
    from paramtransfer.bench.lps import _score_label
    from paramtransfer.selection.rank import SCORE_NAMES

    assert _score_label("transrate") == "TransRate"
    assert _score_label("hscore_shrinkage") == "H-score (shrinkage)"
    assert all(_score_label(s) for s in SCORE_NAMES)
    with pytest.raises(UserError, match="scores must be a list of logme, .*hscore_shrinkage, transrate"):
        run_compare_setting({"methods": ["scratch"], "scores": ["lps"]}, tmp_path, None, False)
