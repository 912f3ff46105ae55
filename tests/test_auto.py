"""``paramtransfer auto`` end to end on a tiny target: the plan's compute by hand, the decision recorded,
the same decisions and numbers under a seed whatever order the runs finish in, and a killed auto that
continues where it stopped without training a finished run again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import paramtransfer as pt
import paramtransfer.experiments.compare as compare_module
from paramtransfer.errors import UserError
from paramtransfer.experiments.executors import make_executor
from paramtransfer.report import comparison_table, label, load_results
from paramtransfer.selection.auto import AutoConfig, auto
from paramtransfer.selection.autoconfig import DEFAULT_SCORE, methods_for
from paramtransfer.selection.candidates import (
    Candidate,
    parse_candidate,
    parse_candidates,
    rank_candidates,
    ranking_agreement,
)

N_TRAIN = 5 * 2  # fashion[5-9], 2 shots per class


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_source) -> str:
    return str(pt.save_model(tiny_source, tmp_path_factory.mktemp("auto_src") / "lenet_src"))


def _config(saved: str, **change) -> AutoConfig:
    fields = dict(
        target="fashion[5-9]",
        sources=["lenet@fashion[0-4]", "lenet@digits", saved],
        shots=2,
        methods=["linear_probe", "finetune"],
        lrs=[0.1, 0.01],
        seeds=[0],
        epochs=6,
        budget=0.4,
        eta=3,
        keep=2,
        source_epochs=1,
        source_limit=40,
        data={"val_shots": 2, "test_limit": 20},
    )
    return AutoConfig(**{**fields, **change})


@pytest.fixture(scope="module")
def first(tmp_path_factory, saved) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("auto") / "a"
    return out, auto(_config(saved), out, progress=False)


def _decisions(report: dict) -> dict:
    """Everything auto decided and measured, without the wall times."""
    compute = {k: v for k, v in report["compute"].items() if k != "wall_time_s"}
    return {k: report[k] for k in ("ranking", "race", "decision")} | {"compute": compute}


def _to_6_digits(value):
    """``value`` with every float rounded to 6 significant digits (nested dicts and lists)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _to_6_digits(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_6_digits(v) for v in value]
    return value


def test_the_plan_and_its_compute_by_hand(first) -> None:
    out, report = first
    # grid: 3 sources x 2 methods x 2 lrs x 1 seed x 6 epochs = 72 configuration-epochs; budget 0.4 -> 28.
    # The race of 2 kept sources x 2 x 2 = 8 configurations first gets all 28: rungs of 8 and 2 (eta 3),
    # filled from the last: r_1 = min(6, 28 // (2 * 2)) = 6, then r_0 = (28 - 2 * 6) // (1 * 8) = 2.
    # Rung 1's runs are full (6 epochs, the only seed), so the winner's final training is its rung-1 run
    # and costs nothing more: 8 * 2 + 2 * 6 = 28 <= 28.
    race = report["race"]
    assert race["configurations"] == 8
    rungs = [(r["epochs"], r["seeds"], len(r["configs"]), r["keep"]) for r in race["rungs"]]
    assert rungs == [(2, 1, 8, 2), (6, 1, 2, 1)]
    compute = report["compute"]
    assert report["train_examples"] == N_TRAIN
    assert compute["grid_examples"] == 72 * N_TRAIN
    assert compute["planned_examples"] == (8 * 2 + 2 * 6) * N_TRAIN
    assert compute["planned_ratio"] == pytest.approx(28 / 72) and compute["planned_ratio"] <= 0.4
    # no run stops early within 6 epochs (patience 10), so what was used is what was planned
    assert compute["used_examples"] == compute["planned_examples"]
    assert compute["final_examples"] == 0 and compute["race_examples"] == 28 * N_TRAIN
    for rung in race["rungs"]:
        assert all(c["epochs_trained"] == rung["epochs"] == len(c["val_curve"]) for c in rung["configs"])


def test_the_decision_follows_the_ranking_and_the_race(first) -> None:
    out, report = first
    rows = report["ranking"]["candidates"]
    assert report["ranking"]["score"] == DEFAULT_SCORE == "nce"  # the default, chosen on the oracle bench
    nce = [r["scores"]["nce"] for r in rows]
    assert nce == sorted(nce, reverse=True)
    assert report["ranking"]["kept"] == [rows[0]["name"], rows[1]["name"]]
    rung0, rung1 = report["race"]["rungs"]
    assert {c["source"] for c in rung0["configs"]} == set(report["ranking"]["kept"])
    assert [c["name"] for c in rung1["configs"]] == rung0["survivors"]
    assert [c["name"] for c in rung0["configs"][:2]] == rung0["survivors"]
    key = [(c["val_accuracy"], -c["val_loss"]) for c in rung0["configs"]]
    assert key == sorted(key, reverse=True)
    decision = report["decision"]
    assert report["race"]["winner"] == rung1["survivors"][0] == rung1["configs"][0]["name"]
    assert report["race"]["winner"] == f"{decision['source']} · {decision['variant']} · lr={decision['lr']:g}"
    assert decision["final"]["lr"] == decision["lr"] and 0 <= decision["final"]["test_mean"] <= 1
    # the race's runs are ordinary run folders, the final training a comparison `report` reads
    assert len(list((out / "race").glob("rung=0/*/runs/*/lr=*/seed=0/result.json"))) == 8
    assert len(list((out / "full").glob("*/runs/*/lr=*/seed=0/result.json"))) == 2  # rung 1 and the final
    assert not (out / "race" / "rung=1").exists()
    summary = load_results(out / "final")
    assert list(summary["selected"]) == [decision["variant"]]
    assert label(decision["variant"]) in comparison_table(summary)
    md = (out / "auto.md").read_text()
    assert decision["source"] in md and "Rung 1" in md and "of the exhaustive grid" in md
    assert json.loads((out / "auto.json").read_text())["decision"] == decision


class _Reversed:
    """An executor that finishes the jobs last to first (as a parallel one may)."""

    name = "reversed"

    def map(self, fn, jobs):
        for i in reversed(range(len(jobs))):
            yield i, fn(jobs[i])


def test_the_same_seed_gives_the_same_decisions_whatever_order_runs_finish(first, saved, tmp_path) -> None:
    _, report = first
    again = auto(_config(saved), tmp_path / "b", progress=False, executor=_Reversed())
    assert _decisions(again) == _decisions(report)


def test_a_killed_auto_continues_where_it_stopped(first, saved, tmp_path, monkeypatch) -> None:
    _, report = first
    trained: list[str] = []
    real = compare_module.train_model
    kills = []

    def killed_in_rung_1(method, **kwargs):
        if not kwargs.get("reuse_only") and not (Path(kwargs["out"]) / "result.json").exists():
            if len(trained) == 9 and not kills:  # rung 0's 8 runs and the first of rung 1 are done
                kills.append(kwargs["out"])
                raise KeyboardInterrupt
            trained.append(kwargs["out"])
        return real(method, **kwargs)

    monkeypatch.setattr(compare_module, "train_model", killed_in_rung_1)
    with pytest.raises(KeyboardInterrupt):
        auto(_config(saved), tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "auto.json").exists()
    before = list(trained)
    resumed = auto(_config(saved), tmp_path / "c", progress=False)
    # only the missing run of rung 1 ran (the final training is a run of rung 1): nothing finished was
    # trained again
    again = trained[len(before) :]
    assert again == kills and "full" in again[0] and again[0] not in before
    assert _decisions(resumed) == _decisions(report)


def test_past_the_full_epochs_the_race_adds_seeds_and_the_final_reuses_them(saved, tmp_path) -> None:
    # 2 seeds: grid 144, budget 0.4 -> 57. Rungs of 8 and 2: r_1 = min(2 * 6, 57 // 4) = 12 (both seeds,
    # full), r_0 = (57 - 24) // 8 = 4; then 8 * 4 + 2 * 12 = 56 and the final trains nothing more
    report = auto(_config(saved, seeds=[0, 1]), tmp_path, progress=False)
    rung0, rung1 = report["race"]["rungs"]
    assert (rung0["epochs"], rung0["seeds"], rung1["epochs"], rung1["seeds"]) == (4, 1, 6, 2)
    assert report["compute"]["used_examples"] == report["compute"]["planned_examples"] == 56 * N_TRAIN
    assert report["compute"]["final_examples"] == 0
    # the last rung decides on the mean over both seeds (then the lower mean loss), as the grid's choice
    from paramtransfer.results import best_val_loss, read_result

    files = list((tmp_path / "full").glob("*/runs/*/lr=*/seed=*/result.json"))
    assert len(files) == 4
    by_config: dict = {}
    for f in files:  # full/<candidate folder>/runs/...
        r = read_result(f)
        by_config.setdefault(
            (f.relative_to(tmp_path / "full").parts[0], r.method, r.config["lr"]), []
        ).append(r)
    assert all(sorted(r.seed for r in rs) == [0, 1] for rs in by_config.values())
    mean = {
        k: (sum(r.val_accuracy for r in rs) / 2, -sum(best_val_loss(r) for r in rs) / 2)
        for k, rs in by_config.items()
    }
    d = report["decision"]
    mine = (parse_candidate(d["source"]).folder, d["variant"], d["lr"])
    assert mean[mine] == max(mean.values())
    assert rung1["configs"][0]["val_accuracy"] == pytest.approx(mean[mine][0])
    # the final comparison holds exactly those two runs
    final = json.loads((tmp_path / "final" / "results.json").read_text())
    chosen = sorted(by_config[mine], key=lambda r: r.seed)
    assert [r["test_accuracy"] for r in final["runs"]] == [r.test_accuracy for r in chosen]


def test_an_out_folder_of_another_auto_is_refused(first, saved) -> None:
    out, _ = first
    with pytest.raises(UserError, match="budget 0.4 there, 0.5 here"):
        auto(_config(saved, budget=0.5), out, progress=False)


def test_a_budget_too_small_for_one_source_names_the_budget_needed(saved, tmp_path) -> None:
    # 72 configuration-epochs; the winner's 6 and a race of the top source's 4 configurations (one rung:
    # 4 // 3 = 1) needing 4 -> 10 / 72 = 0.139
    with pytest.raises(UserError, match=r"need 0\.139 of the exhaustive grid; give --budget 0\.139"):
        auto(_config(saved, budget=0.1), tmp_path, progress=False)
    assert not (tmp_path / "auto_config.json").exists()


def test_a_small_budget_drops_the_lower_ranked_kept_source(first, saved, tmp_path) -> None:
    _, report = first
    small = auto(_config(saved, budget=0.2, epochs=6), tmp_path, progress=False)
    # 0.2 * 72 = 14; 8 left for the race beside a whole final: 8 configurations need 16, 4 (one source)
    # need 4 (one rung); 14 for the race would leave no room for the final (a 3-epoch rung is not full)
    assert small["ranking"]["kept"] == report["ranking"]["kept"][:1]
    assert small["ranking"]["dropped_for_budget"] == report["ranking"]["kept"][1:]
    assert small["compute"]["planned_ratio"] <= 0.2


def test_candidate_forms() -> None:
    assert parse_candidate("lenet@fashion[0,3,7]") == Candidate(
        "lenet@fashion[0,3,7]", "fashion[0,3,7]", "lenet"
    )
    assert parse_candidate("imagenet") == Candidate("imagenet", "imagenet", None)
    assert parse_candidate("torchvision:resnet18@/w/r18.pth") == Candidate(
        "torchvision:resnet18@/w/r18.pth", "torchvision:resnet18", "resnet18", "/w/r18.pth"
    )
    names = [c.name for c in parse_candidates("lenet@fashion[0,3],lenet@digits[0-4]")]
    assert names == ["lenet@fashion[0,3]", "lenet@digits[0-4]"]
    folders = {Candidate("a/b", "a/b", None).folder, Candidate("a_b", "a_b", None).folder}
    assert len(folders) == 2  # distinct names never share a run folder
    for bad, needle in [
        ("fashion[0-4]", "cannot read the candidate"),
        ("lenet9@fashion", "unknown architecture"),
        ("lenet@", "give the task"),
        ("lenet@nosuchtask", "nosuchtask"),
        ("./no/such/model", "no saved model there"),
        ("torchvision:resnet18", "needs its weights file"),
    ]:
        with pytest.raises(UserError, match=needle):
            parse_candidate(bad)
    with pytest.raises(UserError, match="more than once"):
        parse_candidates(["lenet@digits", "lenet@digits"])
    with pytest.raises(UserError, match="--sources"):
        parse_candidates([])


def test_methods_that_cannot_run_on_a_candidate_are_left_out_and_said(saved) -> None:
    config = _config(saved, methods=["finetune", "spottune"])
    ok, skipped = methods_for(config, Candidate("x", "x", "lenet"), "lenet")
    assert ok == ["finetune"] and "spottune" in skipped and "lenet" in skipped["spottune"]
    with pytest.raises(UserError, match="none of the methods runs on it"):
        methods_for(_config(saved, methods=["spottune"]), Candidate("x", "x", "lenet"), "lenet")
    with pytest.raises(UserError, match="ARCH@SPEC"):
        methods_for(
            _config(saved, methods=["finetune[arch.hidden=8]"]), Candidate("x", "x", "lenet"), "lenet"
        )


def test_ranking_ties_and_agreement_with_an_oracle() -> None:
    rows = [
        {
            "name": n,
            "scores": {s: v for s in ("logme", "leep", "nce", "hscore", "hscore_shrinkage", "transrate")},
        }
        for n, v in (("b", 1.0), ("a", 1.0), ("c", 3.0))
    ]
    assert [r["name"] for r in rank_candidates(rows, "logme")] == ["c", "a", "b"]
    taus = ranking_agreement(rows[:1] + rows[2:], {"b": 0.2, "c": 0.9})
    assert taus["logme"] == pytest.approx(1.0)


@pytest.mark.slow
def test_ray_makes_the_same_decisions_as_the_local_executor(saved, tmp_path) -> None:
    pytest.importorskip("ray")
    # Ray runs each task with one thread (num_cpus=1); the ranking runs in this process in both cases, so
    # this process uses one thread too: float reductions then add up in the same order everywhere
    torch.set_num_threads(1)
    try:
        local = auto(_config(saved), tmp_path / "local", progress=False)
        ray = make_executor("ray", num_cpus=2)
        try:
            on_ray = auto(_config(saved), tmp_path / "ray", progress=False, executor=ray)
        finally:
            ray.shutdown()
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    # every decision (ranking, survivors, winner, compute) is the same; a Ray worker's kernels may differ
    # from this process's in the last bits of a loss (seen: a validation loss 2e-7 apart), hence 6 digits
    assert _to_6_digits(_decisions(on_ray)) == _to_6_digits(_decisions(local))
    assert on_ray["race"]["winner"] == local["race"]["winner"]
    survivors = [[r["survivors"] for r in report["race"]["rungs"]] for report in (on_ray, local)]
    assert survivors[0] == survivors[1]
