"""Fast transferability scores: LogME, LEEP, NCE and H-score, as pure functions of arrays.

Each score rates how well a trained source model suits a target task from one forward pass over the
target data, without fine-tuning; higher is better for all four. They are the cheap baselines that
source selection by LPS is compared against.

* :func:`logme` (You et al., ICML 2021): the maximised Bayesian linear-regression evidence of the
  one-hot labels given the source *features*.
* :func:`leep` (Nguyen et al., ICML 2020): the log expected empirical prediction of the target labels
  through the source model's *softmax outputs* over its own classes.
* :func:`nce` (Tran et al., ICCV 2019): the negative conditional entropy of the target labels given
  the source model's *hard predictions*.
* :func:`hscore` (Bao et al., ICIP 2019): ``tr(cov(f)^-1 cov(E[f|y]))`` of the source *features*.

Inputs are torch tensors or numpy arrays (any float dtype for features and probabilities, any integer
dtype for labels; labels need not be contiguous: they are mapped to ``0..K-1`` by their sorted
values). All arithmetic is in float64 and every score returns a Python float. Bad input raises
:class:`~paramtransfer.errors.UserError` (a ``ValueError``) saying what to pass instead.

``SCORES`` registers them by name (``"logme"``, ``"leep"``, ``"nce"``, ``"hscore"``); their first
arguments differ (features, softmax probabilities, predicted source labels), so a caller picking a
score by name must know which source-model output it takes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from paramtransfer.errors import UserError
from paramtransfer.registry import Registry

ArrayLike = torch.Tensor | np.ndarray

SCORES: Registry[Callable[..., float]] = Registry("score")

# Rows of ``source_probs`` must sum to 1 within this; loose enough for float16/float32 softmax outputs
# over thousands of classes, far too tight for logits to pass by accident.
PROB_ATOL = 1e-3
# Relative cut-off below which the pseudo-inverse in the H-score treats an eigenvalue of cov(f) as zero.
HSCORE_RTOL = 1e-10
# LogME keeps alpha and beta inside [1/_LOGME_BOUND, _LOGME_BOUND]: when the evidence is maximised on
# the boundary (alpha -> inf: the features do not help that class) the iteration would otherwise
# overflow before the evidence change falls below the tolerance.
_LOGME_BOUND = 1e150
# LogME reads the spectrum of F^T F from the eigendecomposition of the d x d Gram matrix instead of the
# thin SVD of the n x d features when n >= LOGME_GRAM_RATIO * d (3-4x faster there; see _logme_spectrum).
LOGME_GRAM_RATIO = 4
# ... and only when the Gram matrix is this well conditioned (its eigenvalues then carry >= ~7 digits)
# and no class is fitted almost exactly by a linear function of the features (its least-squares residual
# at least this fraction of the class size): near an exact fit the evidence grows with beta until round-off
# in the residual stops it, and the normal equations' residual is the less accurate one.
_LOGME_GRAM_MIN_RATIO = 1e-8
_LOGME_GRAM_MIN_RESIDUAL = 1e-6


def _as_numpy(x: object, name: str, score: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, list | tuple):
        return np.asarray(x)
    raise UserError(f"{score}: {name} must be a torch.Tensor or a numpy array; got {type(x).__name__}")


def _as_matrix(x: object, name: str, score: str, shape_hint: str) -> torch.Tensor:
    """A finite float64 ``[n, d]`` tensor with ``n, d >= 1``."""
    arr = _as_numpy(x, name, score)
    if arr.dtype.kind not in "biuf":
        raise UserError(f"{score}: {name} must hold real numbers; got dtype {arr.dtype}")
    if arr.ndim != 2:
        hint = " (for a single feature use x.reshape(-1, 1))" if arr.ndim == 1 else ""
        raise UserError(f"{score}: {name} must be 2-D {shape_hint}; got shape {tuple(arr.shape)}{hint}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserError(f"{score}: {name} is empty (shape {tuple(arr.shape)}); pass at least one example")
    # float64 input is used in place (never written to); anything else, or a read-only array, is copied
    out = torch.from_numpy(arr.astype(np.float64, copy=not arr.flags.writeable))
    # One pass without temporaries: a NaN or an infinity makes the sum non-finite. Only then (or when
    # huge finite values overflow it) count them element by element.
    if not math.isfinite(float(out.sum())):
        bad = int((~torch.isfinite(out)).sum())
        if bad:
            raise UserError(
                f"{score}: {name} contains {bad} NaN or infinite values; remove or fix them first"
            )
    return out


def _as_labels(y: object, name: str, score: str, n: int | None = None) -> tuple[torch.Tensor, int]:
    """Integer labels mapped to ``0..K-1`` (sorted by value), as an int64 ``[n]`` tensor, and ``K``."""
    arr = _as_numpy(y, name, score)
    if arr.dtype.kind not in "iu":
        raise UserError(
            f"{score}: {name} must be integer class indices; got dtype {arr.dtype} "
            "(pass y.long() or y.astype(int); for scores or probabilities take argmax first)"
        )
    if arr.ndim != 1:
        raise UserError(f"{score}: {name} must be 1-D [n]; got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise UserError(f"{score}: {name} is empty; pass at least one example")
    if n is not None and arr.shape[0] != n:
        raise UserError(f"{score}: {name} has {arr.shape[0]} entries but there are {n} examples")
    classes, inverse = np.unique(arr, return_inverse=True)
    return torch.from_numpy(inverse.reshape(-1).astype(np.int64)), len(classes)


def _need_two_classes(num_classes: int, name: str, score: str) -> None:
    if num_classes < 2:
        raise UserError(
            f"{score}: {name} holds only {num_classes} distinct class; the score needs at least 2 target "
            "classes (with one class every source model scores the same)"
        )


@dataclass
class LogMEFit:
    """The per-class result of :func:`logme_fit`.

    Attributes:
        score: the LogME value, ``mean(evidence)``.
        evidence: the maximised log evidence divided by ``n``, one per class (in sorted label order).
        alpha: the prior precision ``alpha`` at the maximum, one per class.
        beta: the noise precision ``beta`` at the maximum, one per class.
        iterations: fixed-point updates done (the most over the classes).
        converged: per class, whether its evidence met the tolerance within ``max_iter`` updates.
        solver: ``"svd"`` or ``"gram"``, how the spectrum of ``F^T F`` was computed (see :func:`logme`).
    """

    score: float
    evidence: list[float]
    alpha: list[float]
    beta: list[float]
    iterations: int
    converged: list[bool]
    solver: str = "svd"


def _logme_evidence(
    alpha: torch.Tensor,
    beta: torch.Tensor,
    sq: torch.Tensor,
    proj: torch.Tensor,
    perp: torch.Tensor,
    n: int,
    d: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evidence / n, gamma, ``m^T m`` and ``||F m - y||^2`` for K columns at once, in the SVD basis.

    With ``F = U diag(s) V^T`` (rank r) and ``sq = s^2``, ``proj = U^T Y`` ``[r, K]`` and ``perp`` the
    squared norm of the part of each column of ``Y`` outside the column space of ``F``:
    ``V^T m = beta s proj / (alpha + beta sq)`` and ``F m - y = -alpha proj / (alpha + beta sq)`` there
    plus the outside part, and ``log|A| = sum log(alpha + beta sq) + (d - r) log alpha``.
    """
    denom = alpha + beta * sq[:, None]  # [r, K]: the eigenvalues of A in the row space of F
    gamma = (beta * sq[:, None] / denom).sum(0)
    mm = ((beta * sq.sqrt()[:, None] * proj / denom) ** 2).sum(0)
    resid = ((alpha * proj / denom) ** 2).sum(0) + perp
    logdet = denom.log().sum(0) + (d - sq.numel()) * alpha.log()
    evidence = (
        n / 2 * beta.log()
        + d / 2 * alpha.log()
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * resid
        - alpha / 2 * mm
        - logdet / 2
    )
    return evidence / n, gamma, mm, resid


def logme_fit(features: ArrayLike, labels: ArrayLike, tol: float = 1e-10, max_iter: int = 10_000) -> LogMEFit:
    """LogME with its per-class evidence and hyper-parameters (see :func:`logme` for the method).

    The fixed-point updates stop for a class once its evidence / n changes by at most ``tol``; a
    :class:`RuntimeWarning` says when some class has not converged within ``max_iter`` updates.
    """
    fit = _fit_logme(features, labels, tol, max_iter)
    _warn_unconverged(fit, tol, max_iter)
    return fit


def _warn_unconverged(fit: LogMEFit, tol: float, max_iter: int) -> None:
    if not all(fit.converged):
        warnings.warn(
            f"logme: the evidence of {fit.converged.count(False)} of {len(fit.converged)} classes did not "
            f"converge within {max_iter} iterations (tol={tol}); the score may be inaccurate",
            RuntimeWarning,
            stacklevel=3,
        )


def _logme_spectrum(
    f: torch.Tensor, onehot: torch.Tensor, solver: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """``sq``, ``proj``, ``perp`` of :func:`_logme_evidence` (the nonzero eigenvalues of ``F^T F``, the
    labels in the matching left singular vectors, the squared norm of their part outside them) and the
    solver that computed them.

    ``"svd"``: the thin SVD of ``F``. ``"gram"``: the eigendecomposition of ``G = F^T F`` (``d x d``,
    3-4x faster for ``n >> d``) with ``U = F V S^-1`` never formed: ``proj = V^T F^T Y / s`` and
    ``perp = ||Y - F V S^-2 V^T F^T Y||^2`` computed directly (not as ``||Y||^2 - ||proj||^2``, which
    cancels). Forming ``G`` squares the condition number: an eigenvalue ``lam`` of ``G`` is only known to
    about ``eps * lam_max / lam`` relatively, against ``eps * s_max / s`` for the singular value, and
    whether a small one is zero cannot be told. So the Gram path is used only when every eigenvalue of
    ``G`` (all-zero feature columns left out: they are exact null directions) is at least
    ``_LOGME_GRAM_MIN_RATIO * lam_max`` and no class is fitted almost exactly (least-squares residual
    below ``_LOGME_GRAM_MIN_RESIDUAL`` times the class size); otherwise (near-collinear or badly scaled
    features, near-interpolated labels) the SVD is used. ``"auto"`` tries the Gram path when
    ``n >= LOGME_GRAM_RATIO * d``.
    """
    n, d = f.shape
    eps = torch.finfo(torch.float64).eps
    if solver not in ("auto", "svd", "gram"):
        raise ValueError(f"solver must be auto, svd or gram; got {solver!r}")
    if solver == "gram" or (solver == "auto" and n >= LOGME_GRAM_RATIO * d):
        used = f[:, (f != 0).any(0)]
        if used.shape[1] == 0:
            raise UserError(
                "logme: features are all zero; pass the source model's features on the target data"
            )
        lam, v = torch.linalg.eigh(used.T @ used)  # ascending; O(n d^2) for G, O(d^3) for eigh
        if float(lam[0]) >= _LOGME_GRAM_MIN_RATIO * float(lam[-1]):
            s = lam.sqrt()
            proj = (v.T @ (used.T @ onehot)) / s[:, None]  # U^T Y with U = F V / s
            perp = ((onehot - used @ (v @ (proj / s[:, None]))) ** 2).sum(0)
            if bool((perp >= _LOGME_GRAM_MIN_RESIDUAL * onehot.sum(0)).all()):
                return lam, proj, perp, "gram"
    u, s, _ = torch.linalg.svd(f, full_matrices=False)  # O(n d min(n, d)); V is never needed
    if float(s[0]) == 0.0:
        raise UserError("logme: features are all zero; pass the source model's features on the target data")
    # A singular value at round-off level adds log(alpha + beta s^2) ~= log(alpha) to log|A|, like a
    # null-space direction: count it as one.
    keep = s > s[0] * max(n, d) * eps
    u, sq = u[:, keep], s[keep] ** 2
    proj = u.T @ onehot  # [r, K]
    perp = ((onehot - u @ proj) ** 2).sum(0)
    return sq, proj, perp, "svd"


def _fit_logme(
    features: ArrayLike, labels: ArrayLike, tol: float, max_iter: int, solver: str = "auto"
) -> LogMEFit:
    score = "logme"
    f = _as_matrix(features, "features", score, "[n, d]")
    n, d = f.shape
    y, num_classes = _as_labels(labels, "labels", score, n)
    _need_two_classes(num_classes, "labels", score)
    if not (tol > 0 and max_iter >= 1):
        raise UserError(f"{score}: need tol > 0 and max_iter >= 1; got tol={tol}, max_iter={max_iter}")
    onehot = torch.nn.functional.one_hot(y, num_classes).to(torch.float64)  # [n, K]
    sq, proj, perp, used_solver = _logme_spectrum(f, onehot, solver)

    alpha = torch.ones(num_classes, dtype=torch.float64)
    beta = torch.ones(num_classes, dtype=torch.float64)
    evidence, gamma, mm, resid = _logme_evidence(alpha, beta, sq, proj, perp, n, d)
    active = torch.ones(num_classes, dtype=torch.bool)
    tiny = torch.finfo(torch.float64).tiny
    iterations = 0
    while active.any() and iterations < max_iter:
        iterations += 1
        new_alpha = (gamma / mm.clamp_min(tiny)).clamp(1 / _LOGME_BOUND, _LOGME_BOUND)
        new_beta = ((n - gamma) / resid.clamp_min(tiny)).clamp(1 / _LOGME_BOUND, _LOGME_BOUND)
        alpha = torch.where(active, new_alpha, alpha)
        beta = torch.where(active, new_beta, beta)
        new_evidence, gamma, mm, resid = _logme_evidence(alpha, beta, sq, proj, perp, n, d)
        # The evidence, not (alpha, beta), decides convergence: when it is maximised on the boundary
        # (alpha -> inf, m -> 0: the features do not help that class) alpha grows without bound while
        # the evidence settles.
        active &= (new_evidence - evidence).abs() > tol
        evidence = new_evidence
    return LogMEFit(
        score=float(evidence.mean()),
        evidence=evidence.tolist(),
        alpha=alpha.tolist(),
        beta=beta.tolist(),
        iterations=iterations,
        converged=(~active).tolist(),
        solver=used_solver,
    )


@SCORES.register("logme")
def logme(features: ArrayLike, labels: ArrayLike, tol: float = 1e-10, max_iter: int = 10_000) -> float:
    """LogME: the maximised log marginal evidence of the labels given the features, per example.

    You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
    ICML 2021. For each class ``c`` the one-hot column ``y = Y[:, c]`` is modelled by Bayesian linear
    regression on the features ``F`` with prior ``w ~ N(0, alpha^-1 I)`` and noise precision ``beta``.
    Its log evidence is

        L(alpha, beta) = n/2 log beta + d/2 log alpha - n/2 log 2pi - beta/2 ||F m - y||^2
                         - alpha/2 m^T m - 1/2 log|A|,
        A = alpha I + beta F^T F,    m = beta A^-1 F^T y,

    maximised by the paper's fixed-point iteration (Algorithm 1), from ``alpha = beta = 1``:

        gamma = sum_i beta s_i^2 / (alpha + beta s_i^2),  alpha <- gamma / m^T m,
        beta <- (n - gamma) / ||F m - y||^2,

    with ``s_i^2`` the eigenvalues of ``F^T F`` from one thin SVD of ``F``, so the cost is
    ``O(n d min(n, d))`` and ``n < d`` is fine. For ``n >= LOGME_GRAM_RATIO * d`` they come from the
    eigendecomposition of the ``d x d`` Gram matrix ``F^T F`` instead (2-3x faster for n = 5000,
    d = 64-512), but only when it is well conditioned and no class is fitted almost exactly; otherwise,
    and always for ``n < 4 d``, from the SVD (:attr:`LogMEFit.solver` says which). On the tests the two
    agree to 1e-9 in every class's evidence / n where the Gram path is taken.
    LogME is ``1/K sum_c L_c(alpha_c*, beta_c*) / n``.
    Features are used as given (no centring, no bias column), as in the paper.

    The maximum can lie on the boundary: ``alpha -> inf`` (``m -> 0``) when the features do not help a
    class, ``beta -> inf`` when ``n <= d`` lets them interpolate its labels. The evidence still converges
    (to the limit), so convergence is judged on the evidence, not on ``alpha`` and ``beta``. There it
    creeps up slowly: on random Gaussian features the iteration took up to ~3000 updates and stopped
    10-500 ``tol`` short of the limit (an interior maximum converges in tens of updates).

    Unlike the authors' code (a 1% tolerance on ``alpha / beta``, at most 11 steps, an epsilon added to
    the denominators), the iteration runs until the evidence / n changes by at most ``tol`` and the
    evidence is evaluated exactly at the final ``(alpha, beta)``; values can differ from theirs in the
    third decimal. Use :func:`logme_fit` for the per-class evidence, ``alpha`` and ``beta``.

    Args:
        features: the source model's features ``F`` of the target examples.
        labels: the target labels (integers; any values, mapped to ``0..K-1``), at least 2 classes.
        tol: convergence tolerance on the change of each class's evidence / n.
        max_iter: the most fixed-point updates per class.

    Shape:
        ``features [n, d]``, ``labels [n]`` -> float.
    """
    fit = _fit_logme(features, labels, tol, max_iter)
    _warn_unconverged(fit, tol, max_iter)
    return fit.score


@SCORES.register("leep")
def leep(source_probs: ArrayLike, labels: ArrayLike, num_target_classes: int | None = None) -> float:
    """LEEP: the log expected empirical prediction of the target labels through the source classifier.

    Nguyen, Hassner, Seeger, Archambeau, "LEEP: A New Measure to Evaluate Transferability of Learned
    Representations", ICML 2020. With ``theta(x)`` the source model's softmax over its ``Z`` classes:

        P(y, z) = 1/n sum_{i: y_i = y} theta(x_i)_z,    P(y | z) = P(y, z) / P(z),
        LEEP = 1/n sum_i log sum_z P(y_i | z) theta(x_i)_z.

    LEEP <= 0; with uniform ``theta`` it equals ``sum_y P(y) log P(y)`` (minus the label entropy).
    Rows are renormalised to sum exactly to 1 after the check below; a source class no example puts
    mass on (``P(z) = 0``) contributes nothing.

    Args:
        source_probs: ``theta(x_i)``, the source model's class probabilities on the target examples:
            softmax outputs, not logits (rows non-negative, summing to 1 within ``PROB_ATOL``).
        labels: the target labels (integers), at least 2 distinct classes.
        num_target_classes: if given, labels must lie in ``[0, num_target_classes)``; otherwise any
            integer values are accepted. The score itself does not depend on it.

    Shape:
        ``source_probs [n, Z]``, ``labels [n]`` -> float.

    Example:
        >>> probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
        >>> round(leep(probs, torch.tensor([0, 0, 1, 1])), 6)
        -0.471248
    """
    score = "leep"
    theta = _as_matrix(source_probs, "source_probs", score, "[n, Z] (softmax outputs)")
    n = theta.shape[0]
    y_raw = _as_numpy(labels, "labels", score)
    y, num_classes = _as_labels(y_raw, "labels", score, n)
    if num_target_classes is not None:
        if num_target_classes < 2:
            raise UserError(f"{score}: num_target_classes must be at least 2; got {num_target_classes}")
        low, high = int(y_raw.min()), int(y_raw.max())
        if low < 0 or high >= num_target_classes:
            raise UserError(
                f"{score}: labels must lie in [0, {num_target_classes}) for num_target_classes="
                f"{num_target_classes}; got values in [{low}, {high}]"
            )
    _need_two_classes(num_classes, "labels", score)
    if float(theta.min()) < 0:
        raise UserError(
            f"{score}: source_probs has negative entries; pass softmax probabilities "
            "(torch.softmax(logits, dim=1)), not logits"
        )
    row_sums = theta.sum(1)
    worst = int((row_sums - 1).abs().argmax())
    worst_sum = float(row_sums[worst])
    if abs(worst_sum - 1) > PROB_ATOL:
        raise UserError(
            f"{score}: rows of source_probs must sum to 1 (row {worst} sums to {worst_sum:.6g}); "
            "pass softmax probabilities (torch.softmax(logits, dim=1)), not logits"
        )
    # Two [n, Z] x K matmuls and no [n, Z] temporary: the renormalisation theta_i / s_i (s_i the row sum)
    # is folded into the one-hot matrix, P(y, z) = (one_hot(y) / s)^T theta / n, and the expected
    # prediction of example i is (theta P(.|.)^T)[i, y_i] / s_i. (Gathering P(y_i | .) for every example,
    # as ``conditional[y]``, and the normalised copy of theta took three quarters of the time.)
    onehot = torch.nn.functional.one_hot(y, num_classes).to(torch.float64) / row_sums[:, None]  # [n, K]
    joint = onehot.T @ theta / n  # [K, Z]
    marginal = joint.sum(0)
    conditional = torch.where(marginal > 0, joint / marginal.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    # sum_z P(y_i|z) theta_iz >= theta_iz^2 / (n P(z)) > 0 for some z, so the log is finite.
    expected = (theta @ conditional.T).gather(1, y[:, None])[:, 0] / row_sums
    return float(expected.log().mean())


@SCORES.register("nce")
def nce(source_labels: ArrayLike, target_labels: ArrayLike) -> float:
    """NCE: the negative conditional entropy ``-H(Y | Z)`` of target labels given source predictions.

    Tran, Nguyen, Hassner, "Transferability and Hardness of Supervised Classification Tasks", ICCV 2019.
    From the empirical joint distribution of the source model's hard predictions ``z_i`` (argmax over
    its classes) and the target labels ``y_i``, with natural logarithms:

        P(y, z) = #{i: y_i = y, z_i = z} / n,
        NCE = -H(Y | Z) = sum_{y, z} P(y, z) log(P(y, z) / P(z)).

    NCE <= 0, with 0 exactly when ``Y`` is a function of ``Z``; when ``Z`` says nothing about ``Y`` it
    equals ``-H(Y)`` (``-log K`` for ``K`` balanced classes). Computed from integer counts, so a
    deterministic mapping gives exactly 0.

    Args:
        source_labels: the source model's predicted classes ``z_i`` (integers, any values).
        target_labels: the target labels ``y_i`` (integers), at least 2 distinct classes.

    Shape:
        ``source_labels [n]``, ``target_labels [n]`` -> float.

    Example:
        >>> round(nce(torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 1, 1])), 6)
        -0.318257
    """
    score = "nce"
    z, num_source = _as_labels(source_labels, "source_labels", score)
    y, num_target = _as_labels(target_labels, "target_labels", score, z.numel())
    _need_two_classes(num_target, "target_labels", score)
    n = z.numel()
    counts = torch.bincount(y * num_source + z, minlength=num_target * num_source)
    counts = counts.reshape(num_target, num_source).to(torch.float64)
    per_source = counts.sum(0).expand_as(counts)
    seen = counts > 0
    return float((counts[seen] / n * (counts[seen] / per_source[seen]).log()).sum())


@SCORES.register("hscore")
def hscore(features: ArrayLike, labels: ArrayLike) -> float:
    """H-score: ``tr(cov(f)^+ cov(E[f | y]))``, how much of the feature variance the labels explain.

    Bao, Li, Huang, Zheng, "An Information-Theoretic Approach to Transferability in Task Transfer
    Learning", ICIP 2019:

        H(f) = tr(cov(f)^-1 cov(E_{P(X|Y)}[f(X) | Y])),

    where ``cov(E[f|y])`` is the covariance of the features after replacing each example's features by
    the mean of its class. Both covariances are the biased (1/n) sample covariances; the normalisation
    cancels. ``H`` lies in ``[0, min(K - 1, d)]`` and is invariant to any invertible linear map of the
    features. For a singular ``cov(f)`` (``n <= d``, constant or collinear features) the inverse is the
    Moore-Penrose pseudo-inverse (eigenvalues below ``HSCORE_RTOL`` times the largest count as zero),
    which keeps that invariance on the span of the data; with few examples per dimension the score is
    still optimistic (class means are over-fitted), so compare sources at equal ``n`` and ``d``.

    Args:
        features: the source model's features ``f(x_i)`` of the target examples.
        labels: the target labels (integers), at least 2 distinct classes.

    Shape:
        ``features [n, d]``, ``labels [n]`` -> float.

    Example:
        >>> round(hscore(torch.tensor([[0.0], [2.0], [4.0], [6.0]]), torch.tensor([0, 0, 1, 1])), 6)
        0.8
    """
    score = "hscore"
    f = _as_matrix(features, "features", score, "[n, d]")
    n, d = f.shape
    y, num_classes = _as_labels(labels, "labels", score, n)
    _need_two_classes(num_classes, "labels", score)
    centred = f - f.mean(0)
    cov_f = centred.T @ centred / n
    sizes = torch.bincount(y, minlength=num_classes).to(torch.float64)
    class_means = torch.zeros(num_classes, d, dtype=torch.float64).index_add_(0, y, centred) / sizes[:, None]
    cov_means = (class_means.T * (sizes / n)) @ class_means  # sum_c P(c) mu_c mu_c^T, mu centred
    inverse = torch.linalg.pinv(cov_f, rtol=HSCORE_RTOL, hermitian=True)
    return float((inverse * cov_means.T).sum())
