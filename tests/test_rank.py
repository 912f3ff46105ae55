"""Ranking candidate sources: weighted Kendall tau, candidates, the scores, and `rank` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import paramtransfer as pt
from paramtransfer.errors import UserError
from paramtransfer.selection.modelset import build_modelset
from paramtransfer.selection.rank import (
    FAST_SCORES,
    RankConfig,
    fast_scores,
    find_candidates,
    format_rank,
    rank_sources,
    weighted_tau,
)
from paramtransfer.selection.scores import logme

SMALL = {"width": 4, "hidden": 16}


def test_weighted_tau_agrees_reverses_and_weights_the_top() -> None:
    assert weighted_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert weighted_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # one swap at the top costs more than one swap at the bottom (hyperbolic weights)
    top = weighted_tau([4, 3, 2, 1], [3, 4, 2, 1])
    bottom = weighted_tau([4, 3, 2, 1], [4, 3, 1, 2])
    assert -1 < top < bottom < 1
    with pytest.raises(UserError, match="at least two candidates"):
        weighted_tau([1.0], [0.5])
    with pytest.raises(UserError, match="at least two candidates"):
        weighted_tau([1.0, 2.0], [0.5])


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("set")
    build_modelset(
        "digits", root, models_per_task=2, max_tasks=3, epochs=1, shots=10, arch_kwargs=SMALL, progress=False
    )
    return root


def test_candidates_from_a_model_set_or_from_saved_models(tiny_set: Path, tmp_path: Path) -> None:
    found, root = find_candidates([tiny_set])
    assert root == tiny_set
    assert [c.task for c in found] == ["digits[0,1]"] * 2 + ["digits[0,2]"] * 2 + ["digits[0,3]"] * 2
    assert all((c.path / "model.safetensors").is_file() for c in found)
    loose, root = find_candidates([found[0].path, found[3].path / "model.safetensors"])
    assert root is None and [c.path for c in loose] == [found[0].path, found[3].path]
    with pytest.raises(UserError, match="neither a model set"):
        find_candidates([tmp_path])
    with pytest.raises(UserError, match="give candidate sources"):
        find_candidates([])


def test_fast_scores_read_the_candidates_features_and_outputs(tiny_set: Path) -> None:
    found, _ = find_candidates([tiny_set])
    task = pt.load_task("digits[0,1]", shots=5, seed=0)
    model = pt.load_model(found[0].path)
    scores = fast_scores(model, task)
    assert set(scores) == {"logme", "leep", "nce", "hscore", "hscore_shrinkage", "transrate"}
    with torch.no_grad():
        feats = model.eval().embed(task.train.x).double()
    assert scores["logme"] == pytest.approx(logme(feats, task.train.y))
    assert scores["nce"] <= 0 and scores["leep"] <= 0 and scores["hscore"] >= 0


def test_rank_end_to_end_with_verification(tiny_set: Path, tmp_path: Path) -> None:
    config = RankConfig(shots=5, probe_epochs=1, verify_epochs=1, test_limit=50)
    config.lps.epochs = 2
    report = rank_sources("digits[0,1]", [tiny_set], tmp_path, config=config, verify=True, progress=False)
    assert report["scores"] == ["lps", "logme", "leep", "nce", "hscore", "hscore_shrinkage", "transrate"]
    rows = report["candidates"]
    assert len(rows) == 6
    for s in report["scores"]:
        assert sorted(r[f"{s}_rank"] for r in rows) == list(range(1, 7))
        best = min(rows, key=lambda r: r[f"{s}_rank"])
        assert best[s] == max(r[s] for r in rows)
        tau = report["weighted_tau"][s]
        assert tau is None or -1 <= tau <= 1
    assert all(0 <= r["finetune_accuracy"] <= 1 for r in rows)
    assert all(-1 - 1e-6 <= r["lps"] <= 1 + 1e-6 for r in rows)
    assert json.loads((tmp_path / "rank.json").read_text()) == json.loads(json.dumps(report))
    md = (tmp_path / "rank.md").read_text()
    assert "Weighted Kendall τ" in md and md.count("| digits[0,") == 6


def test_the_second_order_network_is_trained_once_per_set_and_settings(tiny_set: Path, monkeypatch) -> None:
    from paramtransfer.selection import rank
    from paramtransfer.selection.modelset import EvalConfig

    calls: list[int] = []
    real = rank.train_second_order
    monkeypatch.setattr(rank, "train_second_order", lambda ms, cfg: calls.append(cfg.epochs) or real(ms, cfg))
    monkeypatch.setattr(rank, "_SECOND_ORDER", {})
    candidates, _ = find_candidates([tiny_set])
    task = pt.load_task("digits[0,1]", shots=5, seed=0, test_limit=50)
    config = RankConfig(shots=5, probe_epochs=1, lps=EvalConfig(epochs=2))
    first = rank.lps_scores(tiny_set, candidates, task, config)
    rank.lps_scores(
        tiny_set, candidates, task, RankConfig(shots=5, seed=1, probe_epochs=1, lps=EvalConfig(epochs=2))
    )
    assert calls == [2]  # another target seed: the same network
    rank._SECOND_ORDER.clear()
    assert rank.lps_scores(tiny_set, candidates, task, config) == first  # trained again: the same scores
    rank.lps_scores(tiny_set, candidates, task, RankConfig(shots=5, probe_epochs=1, lps=EvalConfig(epochs=3)))
    assert calls == [2, 2, 3]  # other settings: another network


def test_loose_models_are_ranked_without_lps_unless_a_set_is_given(tiny_set: Path, tmp_path: Path) -> None:
    found, _ = find_candidates([tiny_set])
    paths = [c.path for c in found[:3]]
    report = rank_sources("digits[0,1]", paths, tmp_path, config=RankConfig(shots=5), progress=False)
    assert report["scores"] == list(FAST_SCORES) and "weighted_tau" not in report
    assert "fine-tuned accuracy" not in format_rank(report)


def test_cli_rank_writes_the_table_and_errors_are_one_line(tiny_set: Path, tmp_path: Path, capsys) -> None:
    from paramtransfer.cli import main

    out = tmp_path / "rank"
    argv = ["rank", "--target", "digits[0,1]", "--sources", str(tiny_set), "--shots", "5", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| candidate | lps | logme | leep | nce | hscore | hscore_shrinkage | transrate |" in printed
    assert json.loads((out / "rank.json").read_text())["target"] == "digits[0-1]"  # the canonical spec
    weighted = tmp_path / "rank2"
    assert main([*argv, "--lps-weights", "0,1,0,0", "--out", str(weighted)]) == 0
    capsys.readouterr()
    assert json.loads((weighted / "rank.json").read_text())["config"]["lps"]["lps_weights"] == [0, 1, 0, 0]
    assert main([*argv, "--lps-weights", "1,1", "--out", str(tmp_path / "bad")]) == 2
    assert "weights must be 4 non-negative numbers" in capsys.readouterr().err
    assert main(["rank", "--target", "digits[0,1]", "--sources", str(tmp_path / "nothing"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("paramtransfer: error:") and "neither a model set" in err and "\n" not in err
