"""Model sets for LPS (Wang et al., Sec. 5): build, resume, evaluate, and the ``modelset`` command.

* the index lists every model with its files and accuracies; tasks are all class pairs in a fixed order;
* a re-run trains nothing when the set is complete, and redoes exactly the models a kill lost;
* eval.json has every section (Secs. 5.1-5.5) with metrics in range and top-10 >= top-5 >= top-1;
* top-k, rank-k / mAP and Spearman's rho by hand;
* clear errors: fewer than 2 models per task, unknown dataset, no index, an unknown executor.

Everything runs on digits with a 2-filter lenet, 3 tasks x 3 models, 1 epoch: mechanics, not accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from paramtransfer.bench.modelset import (
    EVAL,
    SECTIONS,
    _query_rhos,
    _retrieval_metrics,
    _spearman,
    _top_k,
    evaluate_modelset,
)
from paramtransfer.cli import main
from paramtransfer.errors import UserError
from paramtransfer.models.store import META, WEIGHTS, load_model
from paramtransfer.selection import modelset
from paramtransfer.selection.lps import ALIGNMENTS
from paramtransfer.selection.modelset import (
    INDEX,
    METHODS,
    build_modelset,
    load_modelset,
    read_index,
    task_pairs,
)
from paramtransfer.train.checkpoint import atomic_write_json

TINY = {"width": 2, "hidden": 8}
TASKS = ["digits[0,1]", "digits[0,2]", "digits[0,3]"]


def _build(out: Path, **kwargs) -> list[dict]:
    settings = dict(models_per_task=3, max_tasks=3, epochs=1, arch_kwargs=TINY, progress=False)
    return build_modelset("digits", out, **{**settings, **kwargs})


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("modelset") / "set"
    _build(out)
    return out


@pytest.fixture
def set_copy(tiny_set: Path, tmp_path: Path) -> Path:
    """A copy of the tiny set that a test may damage."""
    return Path(shutil.copytree(tiny_set, tmp_path / "set"))


@pytest.fixture(scope="module")
def report(tiny_set: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    result = evaluate_modelset(tiny_set, out=out, epochs=1, ari_images=40, progress=False)
    assert json.loads((out / EVAL).read_text()) == json.loads(json.dumps(result))
    return result


# ---- building ---------------------------------------------------------------------------------------


def test_tasks_are_every_pair_of_classes_in_a_fixed_order() -> None:
    pairs = task_pairs("fashion")
    assert len(pairs) == len(set(pairs)) == 45
    assert pairs[:2] == ["fashion[0,1]", "fashion[0,2]"] and pairs[-1] == "fashion[8,9]"
    assert task_pairs("fashion") == pairs


def test_index_lists_every_model_with_its_files_and_accuracies(tiny_set: Path) -> None:
    entries = read_index(tiny_set)
    assert [(e["task"], e["task_id"], e["seed"]) for e in entries] == [
        (t, i, 1000 * i + k) for i, t in enumerate(TASKS) for k in (0, 1, 2)
    ]  # no two models share a seed, hence an initialisation, not even across tasks
    for e in entries:
        assert e["path"] == f"models/{e['task']}/{e['seed']}" and e["arch"] == "lenet"
        assert 0.0 <= e["val_accuracy"] <= 1.0 and 0.0 <= e["test_accuracy"] <= 1.0
        assert (tiny_set / e["path"] / WEIGHTS).is_file() and (tiny_set / e["path"] / META).is_file()
    first, second = (load_model(tiny_set / e["path"]) for e in entries[:2])
    assert first.num_classes == 2 and first.arch_kwargs == TINY
    # different seeds: different initialisation and batch order, so different weights
    assert not torch.equal(first.blocks[0][0].weight, second.blocks[0][0].weight)


def test_scaled_weights_have_unit_rms_per_layer(tiny_set: Path) -> None:
    ms = load_modelset(tiny_set)
    scaled = ms.scaled()
    assert [float(p.square().mean()) for p in scaled] == pytest.approx([1.0] * len(scaled))
    one = ms.scaled([p[0] for p in ms.params])  # one model (e.g. a probe) gets the set's scale
    assert all(torch.allclose(a, b[0]) for a, b in zip(one, scaled))


def test_a_rerun_trains_nothing_when_every_model_is_finished(set_copy: Path, monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("a finished model was trained again")

    before = read_index(set_copy)
    monkeypatch.setattr(modelset, "train_model", no_training)
    assert _build(set_copy) == before


def test_models_lost_to_a_kill_are_redone(set_copy: Path, monkeypatch) -> None:
    entries = read_index(set_copy)
    # killed after saving but before the index was rewritten: the model is not listed
    atomic_write_json(set_copy / INDEX, entries[:4] + entries[5:])
    # killed while saving, then the files were cleaned up: listed, but its weights are gone
    (set_copy / entries[0]["path"] / WEIGHTS).unlink()
    trained = []
    real = modelset.train_model

    def counting(*args, **kwargs):
        trained.append((kwargs["target"].spec, kwargs["seed"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(modelset, "train_model", counting)
    redone = _build(set_copy)
    assert sorted(trained) == sorted([("digits[0-1]", 0), ("digits[0,2]", 1001)])
    assert [(e["task"], e["seed"]) for e in redone] == [(e["task"], e["seed"]) for e in entries]
    assert all((set_copy / e["path"] / WEIGHTS).is_file() for e in redone)


def test_a_custom_executor_gets_the_jobs(tmp_path: Path) -> None:
    seen: list[dict] = []

    class Executor:
        name = "test"

        def map(self, fn, jobs):
            seen.extend(jobs)
            for i in reversed(range(len(jobs))):  # in any order, as Ray's finish
                yield i, fn(jobs[i])

    executor = Executor()
    entries = _build(tmp_path / "set", models_per_task=2, max_tasks=1, executor=executor)
    assert [(j["task"], j["seed"]) for j in seen] == [("digits[0,1]", 0), ("digits[0,1]", 1)]
    assert len(entries) == 2 and json.loads(json.dumps(seen)) == seen  # plain data, for other processes


def test_a_set_cannot_be_extended_with_other_settings(set_copy: Path) -> None:
    with pytest.raises(UserError, match="epochs=1"):
        _build(set_copy, epochs=2)


# ---- evaluation -------------------------------------------------------------------------------------


def _ordered(values: list[float]) -> bool:
    return all(0.0 <= a <= b <= 1.0 for a, b in zip(values, values[1:]))


def test_eval_json_has_every_section_in_range(report: dict) -> None:
    assert all(name in report for name in SECTIONS) and report["num_models"] == 9 and report["complete"]
    cls = report["classification"]
    assert (cls["train_models"], cls["test_models"]) == (6, 3)  # per task 2 train, 1 test (80/20, >= 1)
    assert set(cls["methods"]) == set(METHODS)
    for metrics in cls["methods"].values():
        assert _ordered([metrics["top1"], metrics["top5"], metrics["top10"]])
    assert cls["methods"]["random"]["top1"] == pytest.approx(1 / 3)
    ret = report["retrieval"]
    assert len(ret["test_tasks"]) == 1 and len(ret["train_tasks"]) == 2  # tasks split 4:1 (at least 1)
    assert (ret["queries"], ret["gallery"]) == (2, 1)
    for metrics in ret["methods"].values():
        assert _ordered([metrics["rank1"], metrics["rank5"], metrics["rank10"]])
        assert 0.0 <= metrics["map"] <= 1.0
    for metrics in report["transferability"]["methods"].values():
        assert metrics["mean_spearman"] is None or -1.0 <= metrics["mean_spearman"] <= 1.0
        rho = metrics["mean_spearman_other_tasks"]
        assert rho is None or -1.0 <= rho <= 1.0
    branches = report["branches"]["top1"]
    assert len(branches) == 4 and all(0.0 <= v <= 1.0 for v in branches)  # lenet: 2 conv + 2 fc layers
    ablation = report["alignment"]
    assert ablation["branches"] == [2, 3, 4] and set(ablation["top1"]) == set(ALIGNMENTS)
    assert ablation["top1"]["both"] == branches[1:]
    assert all(section.get("time_s", 0) >= 0 for section in report.values() if isinstance(section, dict))


def test_top_k_by_hand() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.8, 0.1, 0.0, 0.3]])
    # the true classes rank 3rd (0.2 < 0.5, 0.9) and 1st
    got = _top_k(logits, torch.tensor([2, 0]))
    assert got == {"top1": 0.5, "top5": 1.0, "top10": 1.0}
    assert _top_k(logits[:1], torch.tensor([2]))["top1"] == 0.0
    # ties are broken at random: a net that scores every task alike is as good as random prediction
    constant = torch.zeros(3, 20)
    assert _top_k(constant, torch.tensor([0, 7, 19])) == pytest.approx(
        {"top1": 0.05, "top5": 0.25, "top10": 0.5}
    )


def test_rank_k_and_map_by_hand() -> None:
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.2, 0.1, 0.7, 0.3]])
    # query 0 (task 0): gallery by similarity = idx 0, 1, 3, 2 = tasks 1, 0, 0, 2: first hit at rank 2,
    # AP = (1/2 + 2/3) / 2; query 1 (task 2): idx 2 (its only model) comes first: rank 1, AP = 1
    got = _retrieval_metrics(sim, torch.tensor([0, 2]), torch.tensor([1, 0, 2, 0]))
    assert got["rank1"] == 0.5 and got["rank5"] == 1.0 and got["rank10"] == 1.0
    assert got["map"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1.0) / 2)
    # equal similarities: the gallery's own order (here the query's task last) must not decide
    ranks = [
        _retrieval_metrics(torch.zeros(1, 4), torch.tensor([0]), torch.tensor([1, 2, 3, 0]), s)["rank1"]
        for s in range(40)
    ]
    assert 0 < sum(ranks) < 40


def test_spearman_by_hand() -> None:
    assert _spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert _spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (3, 1, 2) vs (1, 2, 3): 1 - 6 * (4 + 1 + 1) / (3 * 8) = -0.5
    assert _spearman([30, 10, 20], [1, 2, 3]) == pytest.approx(-0.5)
    # tied values share their mean rank: (1, 2.5, 2.5, 4) vs (1, 2, 3, 4) gives 4.5 / sqrt(4.5 * 5)
    assert _spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / 10**0.5)
    assert _spearman([1, 1, 1], [1, 2, 3]) is None  # undefined for a constant


def test_spearman_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 5, (30,), generator=gen), torch.randn(30, generator=gen)
    assert _spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic)


def test_transferability_rho_with_and_without_the_query_tasks_models() -> None:
    """Query 0 (task 0); models 1-2 share its task (high similarity, high ARI), models 3-5 are other tasks
    whose similarity runs against their ARI. Over all five candidates the ranks of similarity (5, 4, 1, 2, 3)
    and ARI (5, 4, 3, 2, 1) give rho = 1 - 6 * 8 / (5 * 24) = 0.6; over the other tasks alone rho = -1."""
    sims = torch.tensor([1.0, 0.95, 0.9, 0.2, 0.5, 0.7])  # cosine similarity to the query (model 0)
    emb = torch.stack([sims, (1 - sims**2).clamp_min(0).sqrt()], dim=1)  # unit vectors at those angles
    ari = torch.tensor([1.0, 0.9, 0.85, 0.3, 0.2, 0.1])
    labels = [0, 0, 0, 1, 1, 2]
    both = _query_rhos(emb, [0], [ari], labels, own_task=True)
    other = _query_rhos(emb, [0], [ari], labels, own_task=False, suffix="_other_tasks")
    assert both["mean_spearman"] == pytest.approx(0.6) and both["queries"] == 1
    assert other["mean_spearman_other_tasks"] == pytest.approx(-1.0) and other["queries_other_tasks"] == 1
    assert both["std_spearman"] == 0.0


# ---- errors -----------------------------------------------------------------------------------------


def test_eval_methods_and_lps_weights_are_checked(tiny_set: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown method.*choose from random, flat_fc, frobenius_fc, lps"):
        evaluate_modelset(tiny_set, out=tmp_path, methods=["lps", "svm"], progress=False)
    with pytest.raises(UserError, match="weights must be 4 non-negative numbers"):
        evaluate_modelset(
            tiny_set, out=tmp_path, lps_weights=[1, 1], sections=["classification"], progress=False
        )


def test_eval_needs_two_models_per_task(set_copy: Path) -> None:
    entries = read_index(set_copy)
    atomic_write_json(set_copy / INDEX, [e for e in entries if not (e["task_id"] == 1 and e["seed"] > 1000)])
    with pytest.raises(UserError, match=r"digits\[0,2\] has 1 model.*--models-per-task 2"):
        evaluate_modelset(set_copy, progress=False)


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown dataset 'cifar'.*fashion, digits"):
        build_modelset("cifar", tmp_path / "a", progress=False)
    with pytest.raises(UserError, match="no model set at .*modelset build"):
        evaluate_modelset(tmp_path / "missing", progress=False)
    with pytest.raises(UserError, match="unknown executor 'dask'; use one of local, ray"):
        _build(tmp_path / "b", executor="dask")
    assert not (tmp_path / "b").exists()  # nothing is written before the executor is known to work


# ---- the command ------------------------------------------------------------------------------------


def test_cli_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["modelset", "build", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--dataset", "--models-per-task", "--executor", "--max-tasks"))


def test_cli_builds_and_evaluates_a_tiny_set(tmp_path: Path, capsys) -> None:
    out, evaluated = tmp_path / "set", tmp_path / "eval"
    build = ["modelset", "build", "--dataset", "digits", "--max-tasks", "3", "--models-per-task", "2"]
    tiny = ["--epochs", "1", "--set", "arch.width=2", "--set", "arch.hidden=8", "--quiet", "--out", str(out)]
    assert main([*build, *tiny]) == 0
    assert len(read_index(out)) == 6
    assert (
        main(
            ["modelset", "eval", str(out), "--epochs", "1", "--ari-images", "40", "--quiet"]
            + ["--out", str(evaluated)]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "task classification" in text and "task retrieval" in text and "alignment ablation" in text
    assert set(SECTIONS) <= set(json.loads((evaluated / EVAL).read_text()))


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert (
        main(["modelset", "build", "--dataset", "digits", "--address", "auto", "--out", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--address is the address of a Ray cluster" in err
    assert main(["modelset", "build", "--dataset", "digits", "--set", "width=2", "--out", str(tmp_path)]) == 2
    assert "arch.FIELD" in capsys.readouterr().err
