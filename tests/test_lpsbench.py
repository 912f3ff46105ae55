"""The LPS benchmark setting (``kind: lps``): a tiny digits run end to end, resumed, and its report.

* every stage lands in results.json: model set, eval sections, ranking tau per score, timing;
* a second run trains nothing (models, second-order nets for eval and finished rankings are reused);
* the claim verdicts follow the rule (agree / disagree / inconclusive) on hand-made numbers;
* unknown sections and fields are clear errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paramtransfer.bench import lps as lpsbench
from paramtransfer.bench.lps import (
    LPSBenchConfig,
    format_lps_bench,
    lps_claims,
    render_lps,
    run_lps_bench,
)
from paramtransfer.bench.paper import VERDICTS
from paramtransfer.bench.suites import KINDS
from paramtransfer.errors import UserError
from paramtransfer.selection import modelset, rank
from paramtransfer.selection.rank import SCORE_NAMES

TINY = {
    "kind": "lps",
    "build": {
        "dataset": "digits",
        "models_per_task": 2,
        "max_tasks": 3,
        "arch_kwargs": {"width": 2, "hidden": 8},
        "epochs": 1,
        "limit": None,
    },
    "eval": {
        "epochs": 1,
        "ari_images": 30,
        "sections": ["classification", "retrieval", "transferability"],
        "variants": {"all branches": [1, 1, 1, 1]},
    },
    "rank": {"targets": ["digits[5-9]"], "seeds": [0], "shots": 5, "verify_epochs": 1, "probe_epochs": 1},
    "timing": {"widths": [2, 4], "repeats": 2},
}


@pytest.mark.slow
def test_tiny_lps_bench_end_to_end_and_resumed(tmp_path: Path, monkeypatch) -> None:
    summary = run_lps_bench(TINY, tmp_path, progress=False)
    assert summary["modelset"]["models"] == 6 and summary["modelset"]["tasks"] == 3
    assert set(TINY["eval"]["sections"]) <= set(summary["eval"])
    for m in summary["eval"]["transferability"]["methods"].values():  # rho with and without the own task
        assert {"mean_spearman", "mean_spearman_other_tasks", "queries_other_tasks"} <= set(m)
    variant = summary["eval_variants"]["all branches"]
    assert set(variant["classification"]["methods"]) == {"random", "lps"}  # LPS alone, re-weighted
    assert variant["settings"]["lps_weights"] == [1, 1, 1, 1]
    target = summary["rank"]["targets"]["digits[5-9]"]
    assert summary["rank"]["candidates"] == 3  # one model per task
    assert set(target["weighted_tau"]) == {*SCORE_NAMES, "lps[all branches]"}
    assert summary["rank"]["scores"][-1] == "lps[all branches]"
    assert set(target["best_true"]) <= {"digits[0,1]", "digits[0,2]", "digits[0,3]"}
    assert [row["width"] for row in summary["timing"]] == [2, 4]
    assert summary["timing"][1]["params"] > summary["timing"][0]["params"]
    assert (tmp_path / "results.json").is_file() and (tmp_path / "eval.json").is_file()
    assert (tmp_path / "lps_fig3.png").stat().st_size > 1000
    text = format_lps_bench(summary, {"table1": {"lps": [79.8, 94.8, 98.0]}})
    assert "Table 1" in text and "79.8" in text and "Time to embed one model" in text
    assert "LPS, all branches (w = (1, 1, 1, 1))" in text and "LPS (all branches)" in text
    section = render_lps(summary, None, tmp_path)  # the bench report's section for kind: lps
    assert len(section.claims) == 3 and all(c.verdict in VERDICTS for c in section.claims)
    assert "claims on our model set" in section.markdown and "Task retrieval" in section.markdown
    assert KINDS.get("lps").run is run_lps_bench

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage was redone")

    monkeypatch.setattr(modelset, "train_model", refuse)
    monkeypatch.setattr(lpsbench, "evaluate_modelset", refuse)
    monkeypatch.setattr(lpsbench, "rank_sources", refuse)
    monkeypatch.setattr(rank, "lps_scores", refuse)  # the LPS variants' similarities are cached too
    monkeypatch.setattr(lpsbench, "embedding_time", refuse)  # a measurement, kept like the others
    again = run_lps_bench(TINY, tmp_path, progress=False)
    assert again["eval"]["classification"] == summary["eval"]["classification"]
    assert again["rank"] == summary["rank"] and again["timing"] == summary["timing"]
    changed = {**TINY, "rank": {**TINY["rank"], "verify_epochs": 2}}  # other settings: ranked again
    with pytest.raises(AssertionError, match="a finished stage was redone"):
        run_lps_bench(changed, tmp_path, progress=False)


def test_ranking_trains_the_second_order_network_as_the_evaluation(tmp_path: Path, monkeypatch) -> None:
    """The recorded setting: the ranking's LPS networks (plain and every variant) get the eval section's
    settings (30 epochs there), not defaults of their own (once 20 epochs, undisclosed)."""
    import dataclasses
    import types

    import yaml

    from paramtransfer.data import task as task_module
    from paramtransfer.models import store

    config = yaml.safe_load((Path(__file__).parents[1] / "benchmarks/lps/fashion_pairs.yaml").read_text())
    config["timing"] = None
    entries = [{"task": t, "path": f"models/{t}/0", "test_accuracy": 0.9, "wall_time_s": 1.0} for t in "abc"]
    seen: dict[str, list] = {"eval": [], "rank": [], "variant": []}

    def evaluate(directory, **kwargs):
        seen["eval"].append(kwargs)
        return {"complete": True}

    def rank_sources(target, candidates, out, *, config, **kwargs):
        seen["rank"].append(config)
        rows = [
            {"name": c, "path": c, "task": c, "finetune_accuracy": i / 3, **dict.fromkeys(SCORE_NAMES, i)}
            for i, c in enumerate(candidates)
        ]
        return {"target": target, "candidates": rows, "weighted_tau": dict.fromkeys(SCORE_NAMES, 1.0)}

    def lps_scores(set_dir, cands, task, cfg):
        seen["variant"].append(cfg)
        return [float(i) for i in range(len(cands))]

    monkeypatch.setattr(lpsbench, "build_modelset", lambda **kwargs: None)
    monkeypatch.setattr(lpsbench, "read_index", lambda directory: entries)
    monkeypatch.setattr(lpsbench, "evaluate_modelset", evaluate)
    monkeypatch.setattr(lpsbench, "rank_sources", rank_sources)
    monkeypatch.setattr(lpsbench, "plot_lps", lambda summary, path: None)
    monkeypatch.setattr(rank, "lps_scores", lps_scores)
    monkeypatch.setattr(store, "load_model", lambda path: types.SimpleNamespace(in_shape=(1, 28, 28)))
    monkeypatch.setattr(task_module, "load_task", lambda *args, **kwargs: None)
    summary = run_lps_bench(config, tmp_path, progress=False)

    evaluated = seen["eval"][0]  # the evaluation, then its two LPS variants
    assert len(seen["eval"]) == 4 and evaluated["epochs"] == 30 == config["eval"]["epochs"]
    assert len(seen["rank"]) == 6 and len(seen["variant"]) == 18  # 3 targets x 2 seeds (x 3 variants)
    keys = ("epochs", "lr", "batch_size", "embed_dim", "filters", "seed")
    expected = {k: evaluated[k] for k in keys}
    for cfg in seen["rank"] + seen["variant"]:  # the eval's settings, but where a variant sets its own
        own = {"epochs": 100} if cfg.lps.lps_weights == [0, 0, 1, 0] else {}
        assert {k: getattr(cfg.lps, k) for k in keys} == {**expected, **own}
    assert [e["epochs"] for e in seen["eval"]] == [30, 30, 30, 100]
    assert all({k: e[k] for k in keys} == {**expected, "epochs": e["epochs"]} for e in seen["eval"])
    assert sorted({tuple(cfg.lps.lps_weights) for cfg in seen["variant"]}) == [
        (0, 0, 1, 0),
        (0, 1, 0, 0),
        (1, 1, 1, 1),
    ]
    assert all(cfg.lps.lps_weights is None for cfg in seen["rank"])
    assert summary["rank"]["second_order"]["epochs"] == 30  # disclosed in results.json
    assert dataclasses.asdict(seen["rank"][0].lps)["momentum"] == 0.9


def _summary(lps: float, best: float, n: int) -> dict:
    methods = {"random": {"top1": 0.01}, "flat_fc": {"top1": best}, "lps": {"top1": lps}}
    return {"eval": {"classification": {"test_models": n, "methods": methods}}}


@pytest.mark.parametrize(
    ("lps", "best", "n", "verdict"),
    [
        (0.8, 0.05, 100, "agree"),  # +75 points, noise ~4.3
        (0.05, 0.3, 100, "disagree"),  # -25 points, noise ~4.8
        (0.3, 0.25, 20, "inconclusive"),  # +5 points, noise ~14
    ],
)
def test_claim_verdicts(lps: float, best: float, n: int, verdict: str) -> None:
    (claim,) = lps_claims(_summary(lps, best, n))
    assert claim["verdict"] == verdict
    noise = 100 * ((lps * (1 - lps) + best * (1 - best)) / n) ** 0.5
    assert claim["noise"] == pytest.approx(noise) and claim["diff"] == pytest.approx(100 * (lps - best))
    assert claim["worse"][0] == "only one FC layer top1"  # the best baseline, not random prediction


def test_config_errors() -> None:
    with pytest.raises(UserError, match="sections build, eval, rank, timing"):
        LPSBenchConfig.from_dict({"kind": "lps", "bulid": {}})
    with pytest.raises(UserError, match="build"):
        LPSBenchConfig.from_dict({"build": {"models": 3}})
    assert LPSBenchConfig.from_dict({"rank": None}).rank is None


def test_the_lps_bench_adds_the_new_scores_to_a_stored_ranking_without_training(tmp_path: Path, monkeypatch):
    """A ranking stored by an earlier version (no TransRate, no shrinkage H-score) is completed on the next
    run: nothing is trained again, and the bench's tau table gets the two scores."""
    from paramtransfer.bench import lps as lpsbench

    config = {
        **TINY,
        "eval": {"epochs": 1, "ari_images": 30, "sections": ["classification"]},
        "timing": None,
    }
    first = lpsbench.run_lps_bench(config, tmp_path, progress=False)
    stored = next((tmp_path / "rank").rglob("rank.json"))
    report = json.loads(stored.read_text())
    for row in report["candidates"]:
        for s in ("transrate", "hscore_shrinkage"):
            del row[s], row[f"{s}_rank"]
    report["scores"] = ["lps", "logme", "leep", "nce", "hscore"]
    for s in ("transrate", "hscore_shrinkage"):
        del report["weighted_tau"][s]
    stored.write_text(json.dumps(report))

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage was redone")

    monkeypatch.setattr(modelset, "train_model", refuse)
    monkeypatch.setattr(lpsbench, "evaluate_modelset", refuse)
    monkeypatch.setattr(lpsbench, "rank_sources", refuse)
    monkeypatch.setattr(rank, "lps_scores", refuse)
    again = lpsbench.run_lps_bench(config, tmp_path, progress=False)
    assert again["rank"] == first["rank"]
    assert {"transrate", "hscore_shrinkage"} <= set(again["rank"]["targets"]["digits[5-9]"]["weighted_tau"])
    assert json.loads(stored.read_text())["scores"][-2:] == ["hscore_shrinkage", "transrate"]
    assert "TransRate" in lpsbench.format_lps_bench(again, {})
