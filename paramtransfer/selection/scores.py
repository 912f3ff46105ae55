"""Fast transferability scores: LogME, LEEP, NCE, H-score and TransRate, as pure functions of arrays.

Each score rates how well a trained source model suits a target task from one forward pass over the
target data, without fine-tuning; higher is better for all of them. They are the cheap baselines that
source selection by LPS is compared against.

* :func:`logme` (You et al., ICML 2021): the maximised Bayesian linear-regression evidence of the
  one-hot labels given the source *features*; :func:`logme_regression` the same for real-valued or
  multi-label targets (one column each).
* :func:`leep` (Nguyen et al., ICML 2020): the log expected empirical prediction of the target labels
  through the source model's *softmax outputs* over its own classes.
* :func:`nce` (Tran et al., ICCV 2019): the negative conditional entropy of the target labels given
  the source model's *hard predictions*.
* :func:`hscore` (Bao et al., ICIP 2019): ``tr(cov(f)^-1 cov(E[f|y]))`` of the source *features*;
  :func:`hscore_shrinkage` (Ibrahim et al., ECML-PKDD 2022) with a Ledoit-Wolf shrunk ``cov(f)``.
* :func:`transrate` (Huang et al., ICML 2022): the coding rate of the *features* minus their coding
  rate given the labels.

Inputs are torch tensors or numpy arrays (any float dtype for features and probabilities, any integer
dtype for labels; labels need not be contiguous: they are mapped to ``0..K-1`` by their sorted
values). All arithmetic is in float64 and every score returns a Python float. Bad input raises
:class:`~paramtransfer.errors.UserError` (a ``ValueError``) saying what to pass instead.

``SCORES`` registers them by name (``"logme"``, ``"logme_regression"``, ``"leep"``, ``"nce"``,
``"hscore"``, ``"hscore_shrinkage"``, ``"transrate"``); their first arguments differ (features, softmax
probabilities, predicted source labels) and so does the second of ``logme_regression`` (real targets),
so a caller picking a score by name must know which source-model output it takes.
"""

from __future__ import annotations

import math
import numbers
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


def _as_matrix(x: object, name: str, score: str, shape_hint: str, column: str = "feature") -> torch.Tensor:
    """A finite float64 ``[n, d]`` tensor with ``n, d >= 1`` (``column`` names one column in the hint)."""
    arr = _as_numpy(x, name, score)
    if arr.dtype.kind not in "biuf":
        raise UserError(f"{score}: {name} must hold real numbers; got dtype {arr.dtype}")
    if arr.ndim != 2:
        hint = f" (for a single {column} use {name}.reshape(-1, 1))" if arr.ndim == 1 else ""
        raise UserError(f"{score}: {name} must be 2-D {shape_hint}; got shape {tuple(arr.shape)}{hint}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserError(f"{score}: {name} is empty (shape {tuple(arr.shape)}); pass at least one example")
    # float64 input is used in place (never written to); anything else, a read-only array or a view with
    # negative strides (x[:, ::-1], which torch cannot wrap) is copied
    copy = not arr.flags.writeable or any(stride < 0 for stride in arr.strides)
    out = torch.from_numpy(
        np.array(arr, dtype=np.float64, order="C") if copy else arr.astype(np.float64, copy=False)
    )
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


def _warn_unconverged(
    fit: LogMEFit, tol: float, max_iter: int, score: str = "logme", what: str = "classes"
) -> None:
    if not all(fit.converged):
        warnings.warn(
            f"{score}: the evidence of {fit.converged.count(False)} of {len(fit.converged)} {what} did not "
            f"converge within {max_iter} iterations (tol={tol}); the score may be inaccurate",
            RuntimeWarning,
            stacklevel=3,
        )


def _logme_spectrum(
    f: torch.Tensor, targets: torch.Tensor, solver: str = "auto", score: str = "logme"
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
    below ``_LOGME_GRAM_MIN_RESIDUAL`` times the class size, ``||y||^2`` for a real target column);
    otherwise (near-collinear or badly scaled features, near-interpolated labels) the SVD is used.
    ``"auto"`` tries the Gram path when ``n >= LOGME_GRAM_RATIO * d``.
    """
    n, d = f.shape
    eps = torch.finfo(torch.float64).eps
    if solver not in ("auto", "svd", "gram"):
        raise ValueError(f"solver must be auto, svd or gram; got {solver!r}")
    if solver == "gram" or (solver == "auto" and n >= LOGME_GRAM_RATIO * d):
        used = f[:, (f != 0).any(0)]
        if used.shape[1] == 0:
            raise UserError(
                f"{score}: features are all zero; pass the source model's features on the target data"
            )
        lam, v = torch.linalg.eigh(used.T @ used)  # ascending; O(n d^2) for G, O(d^3) for eigh
        if float(lam[0]) >= _LOGME_GRAM_MIN_RATIO * float(lam[-1]):
            s = lam.sqrt()
            proj = (v.T @ (used.T @ targets)) / s[:, None]  # U^T Y with U = F V / s
            perp = ((targets - used @ (v @ (proj / s[:, None]))) ** 2).sum(0)
            # ||y||^2 is the class size for a one-hot column
            if bool((perp >= _LOGME_GRAM_MIN_RESIDUAL * (targets**2).sum(0)).all()):
                return lam, proj, perp, "gram"
    u, s, _ = torch.linalg.svd(f, full_matrices=False)  # O(n d min(n, d)); V is never needed
    if float(s[0]) == 0.0:
        raise UserError(
            f"{score}: features are all zero; pass the source model's features on the target data"
        )
    # A singular value at round-off level adds log(alpha + beta s^2) ~= log(alpha) to log|A|, like a
    # null-space direction: count it as one.
    keep = s > s[0] * max(n, d) * eps
    u, sq = u[:, keep], s[keep] ** 2
    proj = u.T @ targets  # [r, K]
    perp = ((targets - u @ proj) ** 2).sum(0)
    return sq, proj, perp, "svd"


def _fit_logme(
    features: ArrayLike, labels: ArrayLike, tol: float, max_iter: int, solver: str = "auto"
) -> LogMEFit:
    score = "logme"
    f = _as_matrix(features, "features", score, "[n, d]")
    y, num_classes = _as_labels(labels, "labels", score, f.shape[0])
    _need_two_classes(num_classes, "labels", score)
    onehot = torch.nn.functional.one_hot(y, num_classes).to(torch.float64)  # [n, K]
    return _fit_logme_columns(f, onehot, tol, max_iter, solver, score)


def _fit_logme_columns(
    f: torch.Tensor, targets: torch.Tensor, tol: float, max_iter: int, solver: str, score: str
) -> LogMEFit:
    """The LogME iteration for every column of ``targets`` ``[n, K]`` (one-hot classes or real targets)."""
    n, d = f.shape
    num_columns = targets.shape[1]
    if not (tol > 0 and max_iter >= 1):
        raise UserError(f"{score}: need tol > 0 and max_iter >= 1; got tol={tol}, max_iter={max_iter}")
    sq, proj, perp, used_solver = _logme_spectrum(f, targets, solver, score)

    alpha = torch.ones(num_columns, dtype=torch.float64)
    beta = torch.ones(num_columns, dtype=torch.float64)
    evidence, gamma, mm, resid = _logme_evidence(alpha, beta, sq, proj, perp, n, d)
    active = torch.ones(num_columns, dtype=torch.bool)
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


@SCORES.register("logme_regression")
def logme_regression(
    features: ArrayLike, targets: ArrayLike, tol: float = 1e-10, max_iter: int = 10_000
) -> float:
    """LogME for real-valued (regression) or multi-label targets: the mean maximised evidence per column.

    The same Bayesian linear regression and fixed-point iteration as :func:`logme` (You et al., ICML 2021,
    who apply it to regression with the target values as ``y``), run on every column of ``targets``
    instead of every one-hot column of the labels; LogME is ``1/k sum_j L_j(alpha_j*, beta_j*) / n``. So on
    ``targets = one_hot(labels)`` it equals :func:`logme` exactly, and a multi-label target (one 0/1
    column per label, several ones per row allowed) is scored label by label. Targets are used as given
    (not centred or scaled, as in the paper and TLlib's ``log_maximum_evidence(..., regression=True)``):
    the evidence is not invariant to the targets' scale, so compare sources on the same targets only.

    Args:
        features: the source model's features ``F`` of the target examples.
        targets: real targets, one column per output (for one output use ``y.reshape(-1, 1)``); no
            column may be all zero (a label nobody has: nothing to score).
        tol, max_iter: as in :func:`logme`.

    Shape:
        ``features [n, d]``, ``targets [n, k]`` -> float.
    """
    score = "logme_regression"
    f = _as_matrix(features, "features", score, "[n, d]")
    y = _as_matrix(targets, "targets", score, "[n, k] (one column per target)", column="target")
    if y.shape[0] != f.shape[0]:
        raise UserError(f"{score}: targets has {y.shape[0]} rows but there are {f.shape[0]} examples")
    zero = (y == 0).all(0)
    if bool(zero.any()):
        columns = ", ".join(str(int(j)) for j in zero.nonzero()[:, 0][:5])
        raise UserError(
            f"{score}: target column(s) {columns} are all zero (a label no example has); drop them first"
        )
    fit = _fit_logme_columns(f, y, tol, max_iter, "auto", score)
    _warn_unconverged(fit, tol, max_iter, score, "target columns")
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
    cov_f, cov_means, _ = _hscore_covariances(features, labels, score)
    inverse = torch.linalg.pinv(cov_f, rtol=HSCORE_RTOL, hermitian=True)
    return float((inverse * cov_means.T).sum())


def _hscore_covariances(
    features: ArrayLike, labels: ArrayLike, score: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cov(f)``, ``cov(E[f|y])`` (both 1/n) and the centred features."""
    f = _as_matrix(features, "features", score, "[n, d]")
    n, d = f.shape
    y, num_classes = _as_labels(labels, "labels", score, n)
    _need_two_classes(num_classes, "labels", score)
    centred = f - f.mean(0)
    cov_f = centred.T @ centred / n
    sizes = torch.bincount(y, minlength=num_classes).to(torch.float64)
    class_means = torch.zeros(num_classes, d, dtype=torch.float64).index_add_(0, y, centred) / sizes[:, None]
    cov_means = (class_means.T * (sizes / n)) @ class_means  # sum_c P(c) mu_c mu_c^T, mu centred
    return cov_f, cov_means, centred


@SCORES.register("hscore_shrinkage")
def hscore_shrinkage(features: ArrayLike, labels: ArrayLike, shrinkage: float | None = None) -> float:
    """The shrinkage-regularised H-score ``H_alpha``, with Ledoit-Wolf's optimal shrinkage ``alpha``.

    Ibrahim, Ponomareva, Mazumder, "Newer is not always better: Rethinking transferability metrics, their
    peculiarities, stability and performance", ECML-PKDD 2022. The plain :func:`hscore` inverts the sample
    covariance of the features, which is singular or badly conditioned when ``n`` is not much larger than
    ``d`` (few-shot targets, wide features); they replace it by the Ledoit-Wolf estimate

        cov_alpha(f) = (1 - alpha) cov(f) + alpha sigma I,    sigma = tr(cov(f)) / d,
        H_alpha(f) = tr(cov_alpha(f)^-1 (1 - alpha) cov(E[f | y])),

    shrinking the class-mean covariance by the same ``1 - alpha``. ``alpha`` is Ledoit and Wolf's (2004)
    estimate of the MSE-optimal shrinkage from the centred features
    (:func:`sklearn.covariance.ledoit_wolf_shrinkage`), so ``cov_alpha`` is
    ``sklearn.covariance.LedoitWolf().fit(features).covariance_``. ``alpha = 0`` gives :func:`hscore`
    exactly; in 1-D Ledoit-Wolf's alpha is 0. Both covariances are 1/n, like :func:`hscore`; TLlib's
    ``regularized_h_score`` (tllib/ranking/hscore.py) takes ``cov(E[f|y])`` with ``np.cov`` (1/(n-1))
    against the 1/n Ledoit-Wolf estimate, so its values are ``n / (n - 1)`` times ours (the same ranking).

    Args:
        features: the source model's features ``f(x_i)`` of the target examples.
        labels: the target labels (integers), at least 2 distinct classes.
        shrinkage: a fixed ``alpha`` in [0, 1] instead of Ledoit-Wolf's (None, the default).

    Shape:
        ``features [n, d]``, ``labels [n]`` -> float.
    """
    score = "hscore_shrinkage"
    if shrinkage is not None and (
        isinstance(shrinkage, bool) or not isinstance(shrinkage, numbers.Real) or not 0 <= shrinkage <= 1
    ):
        raise UserError(
            f"{score}: shrinkage must be a number in [0, 1], or None for Ledoit-Wolf's; got {shrinkage!r}"
        )
    cov_f, cov_means, centred = _hscore_covariances(features, labels, score)
    d = cov_f.shape[0]
    if shrinkage is None:
        from sklearn.covariance import ledoit_wolf_shrinkage

        shrinkage = float(ledoit_wolf_shrinkage(centred.numpy(), assume_centered=True))
    alpha = float(shrinkage)
    shrunk = (1 - alpha) * cov_f + alpha * (torch.trace(cov_f) / d) * torch.eye(d, dtype=torch.float64)
    inverse = torch.linalg.pinv(shrunk, rtol=HSCORE_RTOL, hermitian=True)
    return float((1 - alpha) * (inverse * cov_means.T).sum())


TRANSRATE_EPS = 1e-4


def _coding_rate(z: torch.Tensor, eps: float, via: str = "auto") -> float:
    """``R(Z, eps) = 1/2 logdet(I_d + Z^T Z / (n eps))`` of the rows of ``z`` ``[n, d]``.

    Through the smaller of the two Gram matrices: by Sylvester's identity
    ``det(I_d + A^T A) = det(I_n + A A^T)``, so ``via="examples"`` (``n x n``) and ``via="features"``
    (``d x d``) agree; ``"auto"`` picks the smaller. ``I + A^T A`` has every eigenvalue >= 1, so its
    Cholesky factor always exists and ``logdet = 2 sum log diag(L)`` is stable.
    """
    n, d = z.shape
    a = z / math.sqrt(n * eps)  # scaled before the product: squares overflow later
    if via == "auto":
        via = "examples" if n < d else "features"
    gram = a @ a.T if via == "examples" else a.T @ a
    gram.diagonal().add_(1.0)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0 or not bool(torch.isfinite(chol).all()):
        raise UserError(
            "transrate: features too large for the coding rate (|Z|^2 / (n eps) overflows); scale the "
            "features down or raise eps"
        )
    return float(chol.diagonal().log().sum())


@SCORES.register("transrate")
def transrate(features: ArrayLike, labels: ArrayLike, eps: float = TRANSRATE_EPS) -> float:
    """TransRate: the coding rate of the features minus their coding rate given the labels.

    Huang, Huang, Rong, Yang, Wei, "Frustratingly Easy Transferability Estimation", ICML 2022. TransRate
    estimates the mutual information between the features and the labels with the coding rate (the
    bits needed to encode the features up to a distortion ``eps``) in place of the entropy:

        TrR(Z, Y) = R(Z, eps) - R(Z, eps | Y),
        R(Z, eps) = 1/2 logdet(I_d + 1/(n eps) Z^T Z),
        R(Z, eps | Y) = 1/K sum_c R(Z_c, eps),

    with ``Z`` the features centred by their mean over all ``n`` examples and ``Z_c`` the ``n_c`` rows of
    class ``c`` (not centred again; each ``R(Z_c)`` normalised by its own ``n_c``). This is the authors'
    released code, which TLlib's ``transrate`` (tllib/ranking/transrate.py) follows, default
    ``eps = 1e-4`` included. Their scale ``1/(n eps)`` is the coding-rate formula's ``d/(n eps'^2)``
    (Ma et al. 2007) with ``eps = eps'^2 / d``; the class average is uniform (``1/K``), which is the
    weight ``n_c / n`` for the balanced (shots per class) targets the project ranks. Unlike TLlib, ``K``
    counts the classes present (labels need not be ``0..K-1``). Higher is better; the value depends on
    the scale of the features through ``eps``.

    The log-determinants come from the Cholesky factor of the smaller Gram matrix (``n_c x n_c`` for a
    class with fewer examples than dimensions, Sylvester's identity), stable since ``I + Z^T Z / (n eps)``
    has every eigenvalue >= 1.

    Args:
        features: the source model's features ``Z`` of the target examples.
        labels: the target labels (integers), at least 2 distinct classes.
        eps: the distortion ``eps > 0``.

    Shape:
        ``features [n, d]``, ``labels [n]`` -> float.

    Example:
        >>> z = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> round(transrate(z, torch.tensor([0, 0, 1, 1]), eps=1.0), 6)  # log(4.5)/2 - log(10)/4
        0.176392
    """
    score = "transrate"
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
        raise UserError(
            f"{score}: eps must be a positive finite number (default {TRANSRATE_EPS}); got {eps!r}"
        )
    f = _as_matrix(features, "features", score, "[n, d]")
    y, num_classes = _as_labels(labels, "labels", score, f.shape[0])
    _need_two_classes(num_classes, "labels", score)
    z = f - f.mean(0)
    order = torch.argsort(y, stable=True)
    per_class = torch.split(z[order], torch.bincount(y, minlength=num_classes).tolist())
    conditional = sum(_coding_rate(zc, eps) for zc in per_class) / num_classes
    return _coding_rate(z, eps) - conditional
