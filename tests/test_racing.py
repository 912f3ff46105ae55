"""Successive halving on synthetic learning curves: the rung arithmetic by hand, the budget never exceeded,
a known best arm kept, ties and missing scores decided the same way whatever the order of the arms."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from paramtransfer.experiments.racing import (
    Rung,
    min_budget,
    plan_cost,
    plan_rungs,
    rank_arms,
    rung_sizes,
    successive_halving,
    trained_cost,
)


def test_rung_sizes_and_epochs_by_hand() -> None:
    # 12 configurations, eta 3: rungs of 12 and 4 (the best of the 4 wins); 100 configuration-epochs:
    # 50 per rung, r_0 = floor(100 / (2 * 12)) = 4, r_1 = floor(100 / (2 * 4)) = 12
    assert rung_sizes(12, 3) == [12, 4]
    assert min_budget(12, 3) == 24
    assert plan_rungs(12, 3, 30, 100) == [Rung(0, 12, 4, 4), Rung(1, 4, 12, 1)]
    assert plan_cost(plan_rungs(12, 3, 30, 100)) == 12 * 4 + 4 * 12 == 96
    # 18 -> 6 -> 2 -> 1; 132: r = 132 // 54, 132 // 18, 132 // 6 = 2, 7, 22
    assert plan_rungs(18, 3, 30, 132) == [Rung(0, 18, 2, 6), Rung(1, 6, 7, 2), Rung(2, 2, 22, 1)]
    # eta 2 halves: 8 -> 4 -> 2 -> 1
    assert rung_sizes(8, 2) == [8, 4, 2]
    # a rung never trains longer than the full run, and one that would only repeat the next rung's runs
    # (both at 5 epochs) keeps the winner directly
    assert plan_rungs(4, 2, 5, 1000) == [Rung(0, 4, 5, 1)]
    # floor division leaves at least one survivor: 5 // 3 = 1, so one rung of 5
    assert plan_rungs(5, 3, 30, 10) == [Rung(0, 5, 2, 1)]


def test_past_the_full_epochs_the_resource_is_seeds_by_hand() -> None:
    # 60 configurations, eta 3, E = 10, S = 3, B = 762: sizes 60, 20, 6, 2. Filled from the last rung:
    # r_3 = min(30, 762 // (4 * 2)) = 30 (3 seeds), left 702; r_2 = min(30, 702 // (3 * 6)) = 30, the same
    # resource as rung 3, so rung 2 keeps the winner directly and the plan is shared again over 3 rungs:
    # r_2 = min(30, 762 // (3 * 6)) = 30, left 582; r_1 = 582 // (2 * 20) = 14 -> 10 (whole seeds past E),
    # left 382; r_0 = 382 // 60 = 6
    rungs = plan_rungs(60, 3, 10, 762, seeds=3)
    assert rungs == [Rung(0, 60, 6, 20), Rung(1, 20, 10, 6), Rung(2, 6, 10, 1, seeds=3)]
    assert plan_cost(rungs) == 360 + 200 + 180 == 740 and rungs[-1].resource == 30
    # one seed: the cap is E, and the budget the capped rung cannot use goes to the first rung
    assert plan_rungs(60, 3, 10, 762) == [Rung(0, 60, 9, 20), Rung(1, 20, 10, 1)]
    # the whole grid's budget (12 x 3 x 15 = 540): 2 seeds for all, the third for the best 4; a budget that
    # gives every rung the whole grid trains every configuration fully on every seed, with no cut
    assert plan_rungs(12, 3, 15, 540, seeds=3) == [Rung(0, 12, 15, 4, seeds=2), Rung(1, 4, 15, 1, seeds=3)]
    assert plan_rungs(12, 3, 15, 1000, seeds=3) == [Rung(0, 12, 15, 1, seeds=3)]
    with pytest.raises(ValueError, match="seeds"):
        plan_rungs(12, 3, 15, 540, seeds=0)
    # what is trained when full runs are reused: rung 2 trains 2 more seeds of 6 configurations (its first
    # seed's runs are rung 1's), and the winner's final training is rung 2's runs
    assert trained_cost(rungs, 10, 3) == (360 + 200 + 6 * 20, 0)
    # short last rung: the final trains every seed; a full one-seed last rung leaves the other seeds
    assert trained_cost([Rung(0, 8, 1, 2), Rung(1, 2, 5, 1)], 6, 3) == (8 + 10, 18)
    assert trained_cost([Rung(0, 8, 2, 2), Rung(1, 2, 6, 1)], 6, 3) == (16 + 12, 12)


def test_one_configuration_has_nothing_to_race() -> None:
    assert rung_sizes(1, 3) == [] and min_budget(1, 3) == 0 and plan_rungs(1, 3, 30, 0) == []
    outcome = successive_halving(["only"], [], lambda alive, rung: pytest.fail("nothing to evaluate"))
    assert outcome.winner == "only" and outcome.cost == 0


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 24"):
        plan_rungs(12, 3, 30, 23)
    with pytest.raises(ValueError, match="eta"):
        rung_sizes(12, 1)
    with pytest.raises(ValueError, match="at least one"):
        rung_sizes(0, 3)
    with pytest.raises(ValueError, match="max_epochs"):
        plan_rungs(4, 2, 0, 100)


@pytest.mark.parametrize("n,eta", list(itertools.product([2, 3, 5, 9, 12, 27, 40], [2, 3, 4])))
def test_the_budget_is_never_exceeded(n: int, eta: int) -> None:
    for max_epochs, seeds in itertools.product((1, 3, 30), (1, 3)):
        for budget in range(min_budget(n, eta), 4 * n * max_epochs * seeds + 7, max(1, n // 3)):
            rungs = plan_rungs(n, eta, max_epochs, budget, seeds=seeds)
            assert plan_cost(rungs) <= budget and rungs[0].configs == n
            assert all(1 <= r.epochs <= max_epochs and 1 <= r.seeds <= seeds for r in rungs)
            assert all(r.seeds == 1 or r.epochs == max_epochs for r in rungs)  # seeds only past E
            res = [r.resource for r in rungs]
            assert res == sorted(set(res))  # more as the field shrinks, never a repeat of the last rung
            assert [r.keep for r in rungs[:-1]] == [r.configs for r in rungs[1:]] and rungs[-1].keep == 1
            assert [r.configs for r in rungs] == sorted({r.configs for r in rungs}, reverse=True)
            assert set(r.configs for r in rungs) <= set(rung_sizes(n, eta))


def _curves(n: int, seed: int) -> dict[str, tuple[float, float]]:
    """Saturating curves acc(e) = a * (1 - exp(-e / tau)); arm-00 has the highest plateau and learns
    fastest, so it leads at every epoch: it must win."""
    rng = random.Random(seed)
    arms = {f"arm-{i:02d}": (rng.uniform(0.3, 0.85), rng.uniform(1.5, 8.0)) for i in range(1, n)}
    arms["arm-00"] = (0.9, 1.0)
    return arms


@pytest.mark.parametrize("seed", range(5))
def test_a_known_best_arm_survives_every_rung(seed: int) -> None:
    curves = _curves(27, seed)
    trained: list[tuple[str, int]] = []

    def evaluate(alive: list[str], rung: Rung) -> dict[str, float]:
        trained.extend((a, rung.epochs) for a in alive)
        return {a: curves[a][0] * (1 - math.exp(-rung.epochs / curves[a][1])) for a in alive}

    names = list(curves)
    random.Random(seed).shuffle(names)
    rungs = plan_rungs(27, 3, 30, 300)
    outcome = successive_halving(names, rungs, evaluate)
    assert outcome.winner == "arm-00"
    assert all("arm-00" in r.survivors for r in outcome.rungs)
    assert [len(r.survivors) for r in outcome.rungs] == [9, 3, 1]
    assert sum(e for _, e in trained) == outcome.cost == plan_cost(rungs) <= 300
    # the survivors of each rung are exactly its best third by score
    for r in outcome.rungs:
        best = sorted(r.scores, key=lambda a: -r.scores[a])[: r.rung.keep]
        assert r.survivors == best


def test_a_late_bloomer_needs_a_long_enough_first_rung() -> None:
    """Successive halving's known weakness, shown on two curves: the arm with the higher plateau but slow
    start loses a 1-epoch first rung and wins when the budget gives the first rung enough epochs."""
    curves = {"fast": (0.6, 0.5), "slow": (0.9, 4.0)}

    def evaluate(alive: list[str], rung: Rung) -> dict[str, float]:
        return {a: curves[a][0] * (1 - math.exp(-rung.epochs / curves[a][1])) for a in alive}

    assert successive_halving(list(curves), plan_rungs(2, 3, 30, 2), evaluate).winner == "fast"
    assert successive_halving(list(curves), plan_rungs(2, 3, 30, 20), evaluate).winner == "slow"


def test_ties_go_to_the_name_first_in_order_whatever_the_order_given() -> None:
    scores = {"c": 0.5, "a": 0.5, "b": 0.5, "d": 0.4}
    assert rank_arms(scores) == ["a", "b", "c", "d"]
    for perm in itertools.permutations(scores):
        outcome = successive_halving(list(perm), [Rung(0, 4, 1, 1)], lambda alive, rung: scores)
        assert outcome.winner == "a"
    # a tuple score breaks an accuracy tie by its second entry (auto: minus the validation loss)
    assert rank_arms({"x": (0.5, -0.2), "y": (0.5, -0.1), "z": (0.4, 0.0)}) == ["y", "x", "z"]


def test_missing_and_undefined_scores_rank_last() -> None:
    assert rank_arms({"ok": 0.1, "diverged": None, "nan": math.nan, "best": 0.9}) == [
        "best",
        "ok",
        "diverged",
        "nan",
    ]


def test_an_evaluator_that_skips_a_configuration_is_an_error() -> None:
    with pytest.raises(ValueError, match="rung 0"):
        successive_halving(["a", "b"], [Rung(0, 2, 1, 1)], lambda alive, rung: {"a": 1.0})
    with pytest.raises(ValueError, match="distinct"):
        successive_halving(["a", "a"], [Rung(0, 2, 1, 1)], lambda alive, rung: {"a": 1.0})
