"""Successive halving (Jamieson & Talwalkar, AISTATS 2016, Alg. 1; one bracket of Li et al.'s Hyperband,
JMLR 2018): race configurations on short runs, keep the best ``1/eta`` after each rung.

Pure Python (no torch): the race is a function of the scores it is given, so it is tested on synthetic
learning curves, and the same scores give the same decisions whichever executor produced them and in
whatever order they finished.

The plan, from ``n`` configurations, a reduction factor ``eta`` >= 2, the full number of epochs ``E``, the
number of seeds ``S`` the winner is finally trained on and a budget ``B`` in *configuration-epochs* (one
configuration trained for one epoch on one seed):

* rung sizes: ``n_0 = n``, ``n_{k+1} = max(1, floor(n_k / eta))``; the rungs are those with ``n_k >= 2``
  (a rung of one configuration has nothing to race: it is the winner), so there are
  ``K = len(rungs)`` of them (``n = 12, eta = 3``: rungs of 12 and 4, the winner is the best of the 4);
* the resource of a configuration in rung ``k`` is ``r_k`` configuration-epochs: ``r_k <= E`` epochs on
  the first seed, or, past ``E``, ``r_k = m E``: the full ``E`` epochs on the first ``m <= S`` seeds
  (Hyperband's maximum resource ``R`` is ``S E``: once a run is as long as it gets, more of it is more seeds,
  which is what the final decision averages over);
* each rung gets an equal share ``B / K`` of the budget split equally among its configurations
  (Jamieson & Talwalkar's allocation), capped at ``R``, and what a capped rung cannot use goes to the rungs
  before it (filled from the last rung back: ``r_k = level(floor(B_k / ((k + 1) n_k)))`` with ``B_k`` what
  the later rungs left, ``level`` capping at ``R`` and rounding a value past ``E`` down to whole seeds,
  and never more than ``r_{k+1}``). So ``sum_k n_k r_k <= B`` always, ``r_k`` grows as the field shrinks,
  and the race is possible only when ``r_0 >= 1``, i.e. ``B >= K n`` (:func:`min_budget`);
* a rung whose resource equals the next rung's would only repeat its runs: it keeps the next rung's
  survivors directly (a larger cut) and the budget is shared again among the remaining rungs;
* each rung trains its configurations with ``r_k`` (the caller's choice how, see
  :mod:`paramtransfer.selection.auto`: a short run from scratch, full runs reused), ranks them by score
  (higher is better; ties go to the name that sorts first; a missing score, e.g. a diverged run, ranks
  last) and keeps the first ``n_{k+1}``.

Why not Ray Tune or Optuna: Optuna is not installed here, Ray Tune would need ``ray[tune]`` beyond the
``ray`` the executor uses, and neither gives what the project needs from the race: runs that live in
ordinary run folders (``train_model``'s files), so that a killed race resumes from them and
``paramtransfer report`` reads them, and decisions that depend on the finished results alone (Tune's ASHA
promotes asynchronously, in completion order). The whole algorithm is the few lines below.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

Score = float | tuple[float, ...]


@dataclass(frozen=True)
class Rung:
    """``configs`` configurations train ``epochs`` epochs each on the first ``seeds`` seeds (``seeds`` > 1
    only at the full number of epochs); the best ``keep`` go on (1: the winner)."""

    index: int
    configs: int
    epochs: int
    keep: int
    seeds: int = 1

    @property
    def resource(self) -> int:
        """Configuration-epochs per configuration: ``epochs x seeds``."""
        return self.epochs * self.seeds


def rung_sizes(n: int, eta: int) -> list[int]:
    """How many configurations each rung races: ``n, n // eta, ...`` while at least two are left."""
    _check(n, eta)
    sizes = []
    while n >= 2:
        sizes.append(n)
        n = max(1, n // eta)
    return sizes


def min_budget(n: int, eta: int) -> int:
    """The smallest budget (configuration-epochs) that gives every configuration of the first rung one
    epoch under :func:`plan_rungs`'s allocation; 0 for a single configuration (no race)."""
    sizes = rung_sizes(n, eta)
    return len(sizes) * sizes[0] if sizes else 0


def plan_rungs(n: int, eta: int, max_epochs: int, budget: int, seeds: int = 1) -> list[Rung]:
    """The rungs of a race of ``n`` configurations within ``budget`` configuration-epochs (module doc);
    past ``max_epochs`` a configuration's resource is more of the first ``seeds`` seeds.

    Raises:
        ValueError: the budget is below :func:`min_budget` (callers turn it into a user's error).
    """
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1 (got {max_epochs})")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a whole number of at least 1 (got {seeds})")
    sizes = rung_sizes(n, eta)
    if budget < min_budget(n, eta):
        raise ValueError(
            f"a race of {n} configurations needs at least {min_budget(n, eta)} configuration-epochs"
        )
    cap = seeds * max_epochs

    def level(share: int) -> int:
        r = min(cap, share)
        return r if r <= max_epochs else r - r % max_epochs

    while True:
        k, left, res = len(sizes), budget, [0] * len(sizes)
        for i in reversed(range(k)):
            res[i] = level(left // ((i + 1) * sizes[i]))
            if i + 1 < k:
                res[i] = min(res[i], res[i + 1])
            left -= sizes[i] * res[i]
        repeat = next((i for i in range(k - 1) if res[i] == res[i + 1]), None)
        if repeat is None:
            break
        del sizes[repeat + 1]  # rung `repeat` keeps the survivors of the rung it would only repeat
    keeps = [*sizes[1:], 1][: len(sizes)]
    rungs = []
    for i, (size, keep, r) in enumerate(zip(sizes, keeps, res, strict=True)):
        epochs, m = (r, 1) if r <= max_epochs else (max_epochs, r // max_epochs)
        rungs.append(Rung(i, size, epochs, keep, m))
    return rungs


def plan_cost(rungs: Sequence[Rung]) -> int:
    """Configuration-epochs the rungs ask for (at most the budget they were planned with; a caller that
    reuses a full run in a later rung trains less)."""
    return sum(r.configs * r.resource for r in rungs)


def trained_cost(rungs: Sequence[Rung], max_epochs: int, seeds: int) -> tuple[int, int]:
    """Configuration-epochs the rungs, then the winner's final training on all ``seeds``, actually train
    when full runs (``max_epochs`` long, one per seed) are reused: a rung after a full one trains only its
    extra seeds, the final only the seeds the last rung did not train. Returns (race, final)."""
    total, before = 0, 0  # before: the full seeds each configuration of the rung already has
    for r in rungs:
        total += r.configs * (r.resource - before * max_epochs if r.epochs == max_epochs else r.resource)
        before = r.seeds if r.epochs == max_epochs else 0
    return total, (seeds - before) * max_epochs


def _key(score: Score | None) -> tuple[float, ...]:
    if score is None:
        return (-math.inf,)
    values = (score,) if isinstance(score, int | float) else tuple(score)
    return tuple(-math.inf if math.isnan(v) else float(v) for v in values)


def rank_arms(scores: Mapping[str, Score | None]) -> list[str]:
    """Names best first: higher score first, ties (and equal missing scores) by name."""
    by_name = sorted(scores)
    return sorted(by_name, key=lambda a: _key(scores[a]), reverse=True)  # stable: ties stay by name


@dataclass
class RungResult:
    rung: Rung
    scores: dict[str, Score | None]
    order: list[str]  # every configuration of the rung, best first
    survivors: list[str]


@dataclass
class RaceOutcome:
    winner: str
    rungs: list[RungResult] = field(default_factory=list)

    @property
    def cost(self) -> int:
        return plan_cost([r.rung for r in self.rungs])


Evaluate = Callable[[list[str], Rung], Mapping[str, Score | None]]


def successive_halving(arms: Sequence[str], rungs: Sequence[Rung], evaluate: Evaluate) -> RaceOutcome:
    """Race ``arms`` through ``rungs`` (from :func:`plan_rungs` with ``n = len(arms)``).

    ``evaluate(alive, rung)`` trains every configuration in ``alive`` for ``rung.epochs`` and returns one
    score per name. Returns the winner and every rung's scores, order and survivors.
    """
    alive = list(arms)
    if len(set(alive)) != len(alive) or not alive:
        raise ValueError(f"give distinct configurations to race (got {alive})")
    if len(alive) != (rungs[0].configs if rungs else 1):
        raise ValueError(f"the rungs were planned for {rungs[0].configs if rungs else 1} configurations")
    done: list[RungResult] = []
    for rung in rungs:
        scores = dict(evaluate(list(alive), rung))
        if set(scores) != set(alive):
            raise ValueError(f"rung {rung.index}: scores for {sorted(scores)}, expected {sorted(alive)}")
        order = rank_arms(scores)
        alive = order[: rung.keep]
        done.append(RungResult(rung, scores, order, list(alive)))
    return RaceOutcome(alive[0], done)


def _check(n: int, eta: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"race at least one configuration (got {n})")
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise ValueError(f"eta must be a whole number of at least 2 (got {eta})")
