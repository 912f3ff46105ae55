"""Report tables and plots from hand-made results: labels, best FT-l on validation, PTU's Delta, Fig. 7."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from paramtransfer.report import comparison_table, write_report
from paramtransfer.report.tables import best_ft, label, relative_gain


def _entry(val: float, test: float, lr: float = 0.01) -> dict:
    return {"status": "ok", "lr": lr, "val_mean": val, "val_std": 0.0, "test_mean": test, "test_std": 0.01}


def _run(method: str, lr: float, seed: int, gates: dict | None = None) -> dict:
    diagnostics = {"gates": gates} if gates else {}
    history = [
        {"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5},
        {"epoch": 2, "train_loss": 0.5, "val_accuracy": 0.6},
    ]
    return {
        "method": method,
        "status": "ok",
        "config": {"lr": lr},
        "seed": seed,
        "history": history,
        "diagnostics": diagnostics,
    }


@pytest.fixture()
def summary() -> dict:
    selected = {
        "scratch": _entry(0.70, 0.71),
        "finetune": _entry(0.80, 0.84),
        "finetune[freeze=1]": _entry(0.85, 0.80),  # best on validation, although FT-0 is better on test
        "ptu": _entry(0.82, 0.88, lr=0.1),
        "l2sp": {"status": "diverged", "lr": None, "diverged_lrs": {"0.1": "3/3"}},
    }
    gates = {"layers": [0, 1], "r": [0.2, 0.4], "z": [0.9, 0.6]}
    runs = [_run("ptu", 0.1, s, gates) for s in (0, 1)] + [_run("finetune", 0.01, 0)]
    config = {"source": "a", "target": "b", "arch": "lenet", "shots": 20, "seeds": [0, 1], "lrs": [0.1, 0.01]}
    return {"config": config, "selected": selected, "runs": runs}


def test_labels() -> None:
    assert label("finetune[freeze=3]") == "FT-3"
    assert label("finetune") == "fine-tune (FT-0)"
    assert label("l2sp") == "l2sp[alpha=0.1]"  # a regulariser at its default strength names it
    assert label("dtnh:knowdist") == "knowdist[beta=0.01]".join(["dtnh:", ""])
    assert label("l2sp[alpha=1]") == "l2sp[alpha=1]"
    assert label("ptu") == "ptu"


def test_best_ft_is_chosen_on_validation_not_test(summary: dict) -> None:
    variant, _ = best_ft(summary["selected"])
    assert variant == "finetune[freeze=1]"


def test_relative_gain_is_the_papers_delta() -> None:
    assert relative_gain({"test_mean": 0.5612}, {"test_mean": 0.5428}) == pytest.approx(3.39, abs=0.01)


def test_table_reports_delta_divergence_and_best_ft(summary: dict) -> None:
    table = comparison_table(summary)
    assert "Δ = +10.00 % vs best FT-l (FT-1)" in table  # (0.88 - 0.80) / 0.80
    assert "every learning rate diverged; diverged at lr=0.1 (3/3 seeds)" in table
    assert "| **best FT-l** = FT-1 | 0.01 | 85.00 ± 0.00 | 80.00 ± 1.00 |" in table
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows[:3] == ["scratch (NoTL)", "fine-tune (FT-0)", "FT-1"]


def test_report_draws_the_gate_figure_only_with_ptu(summary: dict, tmp_path: Path) -> None:
    written = write_report(summary, tmp_path / "with")
    assert written["ptu_gates"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "with" / "table.md").read_text() == comparison_table(summary)
    del summary["selected"]["ptu"]
    assert "ptu_gates" not in write_report(summary, tmp_path / "without")


def test_spottune_rows_pool_the_chosen_runs_and_draw_one_row_per_entry(summary: dict, tmp_path: Path) -> None:
    from paramtransfer.report.plots import plot_spottune, plot_spottune_rows, spottune_rows

    assert plot_spottune(summary, tmp_path / "none.png") is None  # no spottune variant
    summary["selected"]["spottune"] = _entry(0.8, 0.8, lr=0.1)
    summary["selected"]["spottune_global"] = {"status": "diverged", "lr": None}
    for seed, frac in ((0, [1.0, 0.0]), (1, [0.5, 0.5])):
        run = _run("spottune", 0.1, seed)
        run["diagnostics"] = {"finetune_fraction": frac, "blocks_used_histogram": [1, 2, 3]}
        summary["runs"].append(run)
    summary["runs"].append({**_run("spottune", 0.01, 0), "diagnostics": {"finetune_fraction": [9, 9]}})
    rows = spottune_rows(summary)
    assert [v for v, _ in rows] == ["spottune"]  # the diverged variant and the other lr are left out
    assert [d["finetune_fraction"] for d in rows[0][1]] == [[1.0, 0.0], [0.5, 0.5]]
    assert spottune_rows(summary, ["spottune_global", "finetune"]) == []
    path = plot_spottune(summary, tmp_path / "one.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    two = plot_spottune_rows([("target a", rows[0][1]), ("target b", rows[0][1])], tmp_path / "two.png")
    assert two.stat().st_size > path.stat().st_size  # two rows of panels


def test_one_seed_shows_no_spread(summary: dict) -> None:
    from paramtransfer.report.tables import pct

    assert pct(0.85333, 0.0, 1) == "85.33"
    assert pct(0.85333, 0.01, 3) == "85.33 ± 1.00" == pct(0.85333, 0.01)
    for entry in summary["selected"].values():
        if entry["status"] == "ok":
            entry["n_seeds"] = 1
    summary["config"]["seeds"] = [0]
    table = comparison_table(summary)
    assert "±" not in table.split("\n\n", 1)[1]
    assert "| **best FT-l** = FT-1 | 0.01 | 85.00 | 80.00 |" in table
    assert "one seed" in table


def _run_file(root: Path, run: dict, name: str, content: str | None = None) -> Path:
    path = root / "runs" / name / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {
        "source": None,
        "target": "fashion[5-9]",
        "arch": "lenet",
        "val_accuracy": 0.5,
        "test_accuracy": 0.6,
    }
    path.write_text(content if content is not None else json.dumps({**full, **run}))
    return path


def test_load_results_never_uses_a_damaged_results_json_or_mixes_settings(tmp_path: Path, capsys) -> None:
    from paramtransfer.errors import UserError
    from paramtransfer.report import load_results

    d = tmp_path / "cmp"
    (d).mkdir()
    (d / "results.json").write_text('{"runs": [')  # truncated
    with pytest.raises(UserError, match=r"results.json is not a readable results file.*delete it and re-run"):
        load_results(d)
    (d / "results.json").write_text('{"runs": [{"method": "x"}]}')  # another shape
    with pytest.raises(
        UserError, match=r"results.json is not a comparison's results file \(run 0: no 'target'"
    ):
        load_results(d)
    _run_file(d, {**_run("scratch", 0.01, 0), "config": {"lr": 0.01, "shots": 20}}, "a")
    _run_file(d, {**_run("finetune", 0.01, 0), "config": {"lr": 0.01, "shots": 20}}, "b")
    summary = load_results(d)  # falls back to the run files, and says so
    assert set(summary["selected"]) == {"scratch", "finetune"}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rebuilt from the 2 run files" in err
    _run_file(d, {**_run("knn", None, 0), "config": {"lr": None, "shots": 5}}, "c")  # a stale comparison
    with pytest.raises(
        UserError, match=r"mixes runs of different settings \(shots 20 in runs/a/result.json, 5"
    ):
        load_results(d)
    bad = _run_file(d, {}, "c", content="{")
    with pytest.raises(UserError, match=re.escape(str(bad))):
        load_results(d)


def test_selection_averages_gates_and_conflict_sizes_over_the_chosen_seeds() -> None:
    from paramtransfer.results import RunResult, select

    def result(method: str, seed: int, lr: float, val: float, diagnostics: dict) -> RunResult:
        return RunResult.from_dict(
            {
                "method": method,
                "source": "s",
                "target": "t",
                "arch": "lenet",
                "seed": seed,
                "config": {"lr": lr},
                "val_accuracy": val,
                "test_accuracy": 0.5,
                "history": [],
                "wall_time_s": 1.0,
                "diagnostics": diagnostics,
            }
        )

    sizes = {"corrected_fraction": 0.5, "mean_reg_task_norm_ratio": 0.2, "mean_cosine": -0.1}
    runs = [
        result("ptu", 0, 0.1, 0.9, {"gates": {"layers": [1, 3], "r": [0.2, 0.4], "z": [0.6, 0.8]}}),
        result("ptu", 1, 0.1, 0.9, {"gates": {"layers": [1, 3], "r": [0.4, 0.6], "z": [0.8, 1.0]}}),
        result("ptu", 0, 0.01, 0.1, {"gates": {"layers": [1, 3], "r": [0.0, 0.0], "z": [0.0, 0.0]}}),
        result("dtnh:l2sp", 0, 0.1, 0.9, {**sizes, "mean_removed_ratio_corrected": 0.01}),
        result(
            "dtnh:l2sp", 1, 0.1, 0.9, {**sizes, "mean_cosine": -0.3, "mean_removed_ratio_corrected": 0.03}
        ),
    ]
    selected = select(runs)
    ptu = selected["ptu"]  # the other learning rate's gates are not mixed in
    assert ptu["gate_layers"] == [1, 3]
    assert ptu["gate_r"] == pytest.approx([0.3, 0.5]) and ptu["gate_z"] == pytest.approx([0.7, 0.9])
    dtnh = selected["dtnh:l2sp"]
    assert dtnh["mean_cosine"] == pytest.approx(-0.2) and dtnh[
        "mean_removed_ratio_corrected"
    ] == pytest.approx(0.02)
    table = comparison_table({"config": {}, "selected": selected})
    assert "z 0.70 0.90, r 0.30 0.50" in table and "removed 0.02 × ‖∇J‖" in table
    # runs recorded before the sizes existed show no such note
    old = select([result("dtnh:l2sp", 0, 0.1, 0.9, {"corrected_fraction": 0.5})])
    assert "mean_cosine" not in old["dtnh:l2sp"]
    assert "removed" not in comparison_table({"config": {}, "selected": old})
