"""``paramtransfer bench`` and ``paramtransfer report`` on a bench: a tiny real suite in a temporary
folder (digits, one epoch), the paper column, the claim verdicts, rebuilding from results alone,
--record, the kind registry, and the verdict rule on hand-made numbers."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import yaml

from paramtransfer.bench.paper import (
    ClaimResult,
    claim_verdict,
    evaluate_claims,
    load_paper,
    resolve_side,
)
from paramtransfer.bench.report import speed_section
from paramtransfer.bench.suites import KIND_MODULES, KINDS, Section, register_kind, resolve_name
from paramtransfer.cli import main
from paramtransfer.errors import UserError

SETTING = {
    "arch": "lenet",
    "source": "digits[0-4]",
    "source_epochs": 1,
    "source_limit": 200,
    "target": "digits[5-9]",
    "shots": 5,
    "methods": ["scratch", "finetune"],
    "lrs": [0.1],
    "seeds": [0, 1],
    "epochs": 1,
    "data": {"val_shots": 5, "test_limit": 50},
}
PAPER = {
    "paper": "A tiny paper (Someone)",
    "settings": {
        "digits": {
            "mirrors": "Table 9, digits",
            "numbers": [
                {"row": "FT", "value": "80.00", "ours": "finetune"},
                {"row": "NoTL", "value": "70.00", "ours": "scratch"},
                {"row": "K-NN", "value": "60.00", "ours": "knn"},
            ],
            "claims": [
                {"text": "Fine-tuning beats scratch", "better": "finetune", "worse": "scratch", "paper": "T9"}
            ],
        },
        "never": {"mirrors": "Table 10, never run"},
    },
}


def _suites(root: Path) -> Path:
    (root / "tiny").mkdir(parents=True)
    (root / "tiny" / "digits.yaml").write_text(yaml.safe_dump(SETTING))
    (root / "tiny" / "never.yaml").write_text(yaml.safe_dump({**SETTING, "methods": ["scratch"]}))
    (root / "tiny" / "paper.yaml").write_text(yaml.safe_dump(PAPER, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``paramtransfer bench tiny/digits`` run once: (suites folder, OUT)."""
    root = _suites(tmp_path_factory.mktemp("suites"))
    out = tmp_path_factory.mktemp("bench") / "out"
    assert main(["bench", "tiny/digits", "--suites", str(root), "--out", str(out), "--quiet"]) == 0
    return root, out


def _claim_line(report: str) -> str:
    [line] = [ln for ln in report.splitlines() if "Fine-tuning beats scratch" in ln and ln.startswith("- ")]
    return line


def test_bench_writes_the_table_beside_the_paper_and_a_verdict(bench: tuple[Path, Path]) -> None:
    root, out = bench
    report = (out / "report.md").read_text()
    selected = json.loads((out / "tiny" / "digits" / "results.json").read_text())["selected"]
    ft, scratch = selected["finetune"], selected["scratch"]
    assert ft["n_seeds"] == 2 and scratch["n_seeds"] == 2
    # the row: ours, the chosen lr, the paper's number, Δ to fine-tuning (ours, paper)
    d = 100 * (scratch["test_mean"] - ft["test_mean"])
    row = (
        f"| scratch (NoTL) | {100 * scratch['test_mean']:.2f} ± {100 * scratch['test_std']:.2f} (2) | 0.1 | "
        f"70.00 (NoTL) | {d:+.2f} | -10.00 |"
    )
    assert row in report
    assert "| fine-tune (FT-0) | " in report and "| 80.00 (FT) | ref. | ref. |" in report
    assert "Paper rows with no counterpart in our results: K-NN 60.00." in report
    diff = 100 * (ft["test_mean"] - scratch["test_mean"])
    noise = 100 * max(ft["test_std"], scratch["test_std"])
    line = _claim_line(report)
    assert line.startswith(f"- **{claim_verdict(diff, noise)}** — Fine-tuning beats scratch.")
    assert f"{diff:+.2f} points (noise ±{noise:.2f})" in line and line.endswith("Paper: T9.")
    verdicts = {v: int(v == claim_verdict(diff, noise)) for v in ("agree", "disagree", "inconclusive")}
    counts = " | ".join(str(verdicts[v]) for v in ("agree", "disagree", "inconclusive"))
    assert f"| tiny | A tiny paper (Someone) | 1 of 2 | {counts} | 0 |" in report
    # figures compare drew are linked where they are, inside OUT
    assert "![tiny_digits: ft_layers](tiny/digits/ft_layers.png)" in report
    assert "[learning_curves](tiny/digits/learning_curves.png)" in report
    assert (out / "tiny" / "digits" / "ft_layers.png").is_file()
    assert (out / "bench.json").is_file() and not (out / "tiny" / "never").exists()


def test_a_setting_never_run_says_not_run_with_the_command(bench: tuple[Path, Path]) -> None:
    root, out = bench
    report = (out / "report.md").read_text()
    section = report.split("### tiny/never", 1)[1]
    assert "Paper: Table 10, never run." in section
    assert (
        f"**Not run.** Run it with `paramtransfer bench tiny/never --suites {root} --out {out}`." in section
    )
    assert "| never | Table 10, never run | not run |" in report


def test_report_rebuilds_the_same_report_from_results_alone(bench: tuple[Path, Path], capsys) -> None:
    _, out = bench
    before = (out / "report.md").read_text()
    (out / "report.md").unlink()
    shutil.rmtree(out / "figures")
    capsys.readouterr()
    assert main(["report", str(out)]) == 0  # the suites folder comes from OUT/bench.json
    assert (out / "report.md").read_text() == before
    assert (out / "figures" / "claims_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tiny |" in capsys.readouterr().out
    # written elsewhere, the figures are copied next to the report
    elsewhere = out.parent / "elsewhere"
    assert main(["report", str(out), "--out", str(elsewhere)]) == 0
    moved = (elsewhere / "report.md").read_text()
    assert "![tiny_digits: ft_layers](figures/tiny_digits_ft_layers.png)" in moved
    assert (elsewhere / "figures" / "tiny_digits_ft_layers.png").is_file()


def test_record_copies_into_the_suite_and_reuses_finished_runs(
    bench: tuple[Path, Path], tmp_path: Path
) -> None:
    root, out = tmp_path / "suites", tmp_path / "out"  # copies: the other tests keep "never" unrun
    shutil.copytree(bench[0], root)
    shutil.copytree(bench[1], out)
    runs = {(r["method"], r["seed"]): r["wall_time_s"] for r in _runs(out / "tiny" / "digits")}
    assert main(["bench", "tiny", "--suites", str(root), "--out", str(out), "--record", "--quiet"]) == 0
    again = {(r["method"], r["seed"]): r["wall_time_s"] for r in _runs(out / "tiny" / "digits")}
    assert again == runs  # reused, not retrained
    recorded = root / "tiny" / "results"
    for f in ("table.md", "config.yaml", "ft_layers.png", "learning_curves.png"):
        assert (recorded / "digits" / f).read_bytes() == (out / "tiny" / "digits" / f).read_bytes()
    # the same summary (no per-channel diagnostics to leave out here), one line per run
    text = (recorded / "digits" / "results.json").read_text()
    assert json.loads(text) == json.loads((out / "tiny" / "digits" / "results.json").read_text())
    # "{", a line per other key, "\"runs\": [", a line per run, "]", "}"
    assert len(text.splitlines()) == len(json.loads(text)) + len(_runs(out / "tiny" / "digits")) + 3
    assert (recorded / "never" / "results.json").is_file()  # `bench tiny` ran the other setting too
    report = (root / "report.md").read_text()
    assert "| tiny | A tiny paper (Someone) | 2 of 2 |" in report
    assert "![tiny_digits: ft_layers](tiny/results/digits/ft_layers.png)" in report
    # the benchmarks folder layout rebuilds the same report from the recorded results
    (root / "report.md").unlink()
    assert main(["report", str(root)]) == 0
    assert (root / "report.md").read_text() == report


def test_recorded_results_leave_out_per_channel_diagnostics_only(tmp_path: Path) -> None:
    from paramtransfer.bench.runner import record_setting

    gates = {
        "layers": [0],
        "r": [0.5],
        "z": [0.4],
        "r_per_channel": [[0.1] * 300],
        "z_per_channel": [[0.2] * 300],
    }
    dtnh = {"method": "dtnh:l2sp", "seed": 0, "history": [{"epoch": 1, "dtnh_angles": [[0, 1, 2, 3, 4]]}]}
    ptu = {
        "method": "ptu",
        "seed": 0,
        "diagnostics": {"gates": gates, "classes": [0, 1]},
        "history": [{"epoch": 1}],
    }
    delta = {"method": "delta", "seed": 0, "diagnostics": {"attention": [[0.3] * 300], "device": "cpu"}}
    summary = {
        "config": {"target": "t"},
        "selected": {},
        "runs": [ptu, delta, {"method": "knn", "seed": 0}, dtnh],
    }
    src, dest = tmp_path / "out", tmp_path / "recorded"
    src.mkdir()
    (src / "results.json").write_text(json.dumps(summary, indent=2))
    record_setting(src, dest)
    got = json.loads((dest / "results.json").read_text())
    assert got["config"] == summary["config"] and got["selected"] == {}
    assert got["runs"][0]["diagnostics"] == {
        "gates": {"layers": [0], "r": [0.5], "z": [0.4]},
        "classes": [0, 1],
    }
    assert got["runs"][0]["history"] == [{"epoch": 1}]
    assert got["runs"][1]["diagnostics"] == {"device": "cpu"}
    assert got["runs"][2] == {"method": "knn", "seed": 0}
    assert got["runs"][3]["history"] == [{"epoch": 1}]  # the angles stay in diagnostics.angles
    assert summary["runs"][0]["diagnostics"]["gates"]["r_per_channel"]  # the input is not changed


def _runs(directory: Path) -> list[dict]:
    return json.loads((directory / "results.json").read_text())["runs"]


def test_unknown_name_is_one_line_listing_the_suites(bench: tuple[Path, Path], capsys) -> None:
    root, _ = bench
    assert main(["bench", "nosuch", "--suites", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown benchmark 'nosuch'" in err and "suites: tiny" in err
    assert main(["bench", "tiny/nosuch", "--suites", str(root)]) == 2
    assert "its settings: digits, never" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown benchmark"):
        resolve_name("ptu", root)
    assert resolve_name("all", root) == [("tiny", "digits"), ("tiny", "never")]


def test_list_shows_settings_and_what_ran(bench: tuple[Path, Path], capsys) -> None:
    root, out = bench
    empty = out.parent / "empty_out"
    assert main(["bench", "--list", "--suites", str(root), "--out", str(empty)]) == 0
    lines = capsys.readouterr().out.splitlines()
    [digits] = [ln for ln in lines if "tiny/digits" in ln]
    assert "compare" in digits and "Table 9, digits" in digits and " ran " not in digits


TOY_KIND_MODULE = """
import json
from pathlib import Path

from paramtransfer.bench.suites import Section, register_kind


def run(config: dict, out: Path, executor: object, progress: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = {"score": config["score"]}
    (out / "results.json").write_text(json.dumps(summary))
    return summary


def render(summary: dict, paper: dict | None, results_dir: Path) -> Section:
    return Section(f"toy score {summary['score']}; paper says {paper['mirrors']}")


register_kind("toy_kind", run, render)
"""


def test_a_kind_registered_in_another_module_runs_and_renders(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "toy_kind_module.py").write_text(TOY_KIND_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(KIND_MODULES, "toy_kind", "toy_kind_module")  # imported on first use
    root = tmp_path / "suites"
    (root / "toys").mkdir(parents=True)
    (root / "toys" / "one.yaml").write_text("kind: toy_kind\nscore: 7\n")
    (root / "toys" / "paper.yaml").write_text("settings:\n  one: {mirrors: Fig. 1}\n")
    try:
        assert main(["bench", "toys", "--suites", str(root), "--out", str(tmp_path / "out"), "--quiet"]) == 0
        assert json.loads((tmp_path / "out" / "toys" / "one" / "results.json").read_text()) == {"score": 7}
        assert "toy score 7; paper says Fig. 1" in (tmp_path / "out" / "report.md").read_text()
        with pytest.raises(ValueError, match="already registered"):
            register_kind("toy_kind", lambda *a: {}, lambda *a: Section(""))
    finally:
        KINDS._items.pop("toy_kind", None)
        sys.modules.pop("toy_kind_module", None)
    (root / "toys" / "one.yaml").write_text("kind: nosuch\n")
    assert main(["bench", "toys", "--suites", str(root), "--out", str(tmp_path / "out")]) == 2


def test_bench_speed_runs_the_speed_suite_and_the_report_shows_it(tmp_path: Path, monkeypatch) -> None:
    calls, flags = [], []

    def run_speed_suite(out: Path, *, progress: bool = True, imagenet: bool = True) -> dict:
        data = {
            "train_step_ratio": {"lenet": {"ptu": 2.0}},
            "eval_ratio": {"lenet": {"ptu": 3.0}},
            "targets": {
                "ptu_train_step_ratio": {"op": "<=", "limit": 1.8, "values": {"lenet": 2.0}, "met": False}
            },
        }
        calls.append(Path(out))
        flags.append(imagenet)
        Path(out).write_text(json.dumps(data))
        return data

    fake = types.ModuleType("paramtransfer.bench.speedsuite")
    fake.run_speed_suite = run_speed_suite  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "paramtransfer.bench.speedsuite", fake)
    root = _suites(tmp_path / "suites")
    out = tmp_path / "out"
    assert main(["bench", "speed", "--suites", str(root), "--out", str(out), "--record", "--quiet"]) == 0
    assert calls == [out / "speed" / "results.json"]
    assert (root / "speed" / "results.json").read_text() == calls[0].read_text()
    for report in (out / "report.md", root / "report.md"):
        text = report.read_text()
        assert "| ptu_train_step_ratio | <= 1.8 | lenet 2.00 | **no** |" in text
        assert "| ptu | — | 2.00 | 3.00 | — |" in text
        assert "| tiny | A tiny paper (Someone) | not run: `paramtransfer bench tiny" in text
    assert flags == [True]  # the EfficientNet-Lite0 rows by default
    assert main(["bench", "speed", "--suites", str(root), "--out", str(out), "--no-imagenet", "--quiet"]) == 0
    assert flags == [True, False]
    # the flag belongs to bench speed: elsewhere it is refused, not ignored
    assert main(["bench", "tiny", "--suites", str(root), "--out", str(out), "--no-imagenet"]) == 2
    assert len(calls) == 2


def test_unreadable_results_are_reported_not_raised(tmp_path: Path) -> None:
    root = _suites(tmp_path / "suites")
    (tmp_path / "out" / "tiny" / "digits").mkdir(parents=True)
    (tmp_path / "out" / "tiny" / "digits" / "results.json").write_text("{half a file")
    assert main(["report", str(tmp_path / "out"), "--suites", str(root)]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "### tiny/digits\n\n**Unreadable results**" in report and "**Not run.**" in report


def test_speed_section_survives_odd_json() -> None:
    text = speed_section(
        {"targets": {"x": 3, "y": {"value": 1.5, "target": "<= 2", "met": True}}, "eval_ratio": 4}
    )
    assert "| x | — | 3.00 | — |" in text and "| y | <= 2 | 1.50 | yes |" in text


# ---- the verdict rule and the sides of a claim, on hand-made numbers ---------------------------------


@pytest.mark.parametrize(
    ("diff", "noise", "relation", "seeds", "verdict"),
    [
        (2.0, 1.0, "better", 3, "agree"),  # same sign, beyond the larger std
        (-2.0, 1.0, "better", 3, "disagree"),  # opposite sign, beyond it
        (0.5, 1.0, "better", 3, "inconclusive"),  # within noise
        (-1.0, 1.0, "better", 3, "inconclusive"),  # exactly the noise is not beyond it
        (5.0, 0.0, "better", 1, "inconclusive"),  # one seed: no noise estimate
        (0.5, 1.0, "tie", 3, "agree"),  # "about equal" and within noise
        (-2.0, 1.0, "tie", 3, "disagree"),
    ],
)
def test_claim_verdict_rule(diff: float, noise: float, relation: str, seeds: int, verdict: str) -> None:
    assert claim_verdict(diff, noise, relation=relation, seeds=seeds) == verdict


def _entry(val: float, test: float, std: float = 0.01) -> dict:
    return {"status": "ok", "lr": 0.1, "val_mean": val, "test_mean": test, "test_std": std, "n_seeds": 3}


def test_claim_sides_best_ftl_lists_and_spec_names() -> None:
    selected = {
        "scratch": _entry(0.70, 0.70),
        "finetune": _entry(0.80, 0.90),
        "finetune[freeze=1]": _entry(0.85, 0.80),  # best FT-l on validation, not on test
        "l2sp": _entry(0.82, 0.84),  # recorded without its default alpha=0.1
        "l2sp[alpha=1]": _entry(0.84, 0.75),
        "ptu": {"status": "diverged", "lr": None},
    }
    assert resolve_side("best_ftl", selected).variant == "finetune[freeze=1]"
    assert resolve_side("l2sp[alpha=0.1]", selected).variant == "l2sp"
    assert resolve_side(["l2sp[alpha=0.1]", "l2sp[alpha=1]"], selected).variant == "l2sp[alpha=1]"
    entry = {
        "numbers": [
            {"row": "FT", "value": 0.5, "ours": "best_ftl"},
            {"row": "NoTL", "value": 0.4, "ours": "scratch"},
        ],
        "scale": "fraction",
        "claims": [
            {"text": "a", "better": "best_ftl", "worse": "scratch"},
            {"text": "b", "better": ["l2sp[alpha=0.1]", "l2sp[alpha=1]"], "worse": "finetune"},
            {"text": "c", "better": "ptu", "worse": "scratch"},
            {"text": "d", "better": "nosuch", "worse": "scratch"},
        ],
    }
    a, b, c, d = evaluate_claims(entry, selected)
    assert (a.verdict, round(a.diff, 6), a.paper_diff) == ("agree", 10.0, pytest.approx(10.0))
    assert (b.verdict, round(b.diff, 6), b.paper_diff) == ("disagree", -15.0, None)
    assert c.verdict == d.verdict == "missing"
    assert "diverged at every learning rate" in c.markdown() and "not in the results" in d.markdown()
    assert isinstance(a, ClaimResult) and a.markdown().startswith(
        "- **agree** — a. Ours: best FT-l = FT-1 80.00"
    )


def test_bad_paper_yaml_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "paper.yaml"
    path.write_text("settings:\n  s: {claims: [{text: x, better: a}]}\n")
    with pytest.raises(UserError, match="each claim needs text, better and worse"):
        load_paper(path)
    path.write_text("settings:\n  s: {columns: [a, b], numbers: [{row: r, value: 1, ours: x}]}\n")
    with pytest.raises(UserError, match="one value per column"):
        load_paper(path)
    assert load_paper(tmp_path / "missing.yaml") == {}


# ---- the repository's paper.yaml files against the recorded results --------------------------------

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("suite", ["ptu", "dtnh", "spottune"])
def test_every_paper_mapping_names_a_recorded_variant(suite: str) -> None:
    """A typo in paper.yaml would silently drop a paper number or turn a claim into "missing"."""
    paper = load_paper(BENCHMARKS / suite / "paper.yaml")
    assert paper, f"benchmarks/{suite}/paper.yaml is missing"
    for name, entry in paper["settings"].items():
        assert (BENCHMARKS / suite / f"{name}.yaml").is_file(), f"{suite}: no setting {name}"
        results = BENCHMARKS / suite / "results" / name / "results.json"
        if not results.is_file():
            continue
        selected = json.loads(results.read_text())["selected"]
        sides = [s for row in entry.get("numbers") or [] for s in _listed(row["ours"])]
        sides += [
            s for c in entry.get("claims") or [] for key in ("better", "worse") for s in _listed(c[key])
        ]
        for side in sides:
            assert resolve_side(side, selected).entry is not None, f"{suite}/{name}: {side!r} not recorded"


def _listed(value: object) -> list:
    return value if isinstance(value, list) else [value]


def test_compare_setting_records_the_source_scores_per_seed(tmp_path):
    """``scores: [logme, leep]`` in a compare setting: the source's scores on each seed's training split,
    in results.json and in the report section; an unknown score is refused before anything runs."""
    import json

    from paramtransfer.bench.compare import render_compare, run_compare_setting
    from paramtransfer.errors import UserError

    setting = {
        "source": "digits[0-4]",
        "source_epochs": 1,
        "target": "digits[5-9]",
        "shots": 3,
        "methods": ["linear_probe"],
        "lrs": [0.01],
        "seeds": [0, 1],
        "epochs": 1,
        "scores": ["logme", "leep"],
    }
    summary = run_compare_setting(setting, tmp_path, None, False)
    scores = json.loads((tmp_path / "results.json").read_text())["source_scores"]
    assert scores == summary["source_scores"]
    assert len(scores["logme"]["per_seed"]) == 2 and scores["leep"]["mean"] < 0  # LEEP is a log-likelihood
    assert scores["logme"]["per_seed"][0] != scores["logme"]["per_seed"][1]  # each seed's own split
    assert "logme" in render_compare(summary, None, tmp_path).markdown
    with pytest.raises(UserError, match="scores must be a list"):
        run_compare_setting({**setting, "scores": ["lps"]}, tmp_path / "bad", None, False)


def test_report_lists_each_settings_margin_over_scratch(tmp_path):
    from paramtransfer.bench.report import _margin_row, _margin_table

    entry = {"status": "ok", "n_seeds": 3, "val_mean": 0.5}
    results = {
        "config": {"source": "imagenet", "target": "fashion", "arch": "efficientnet_lite0", "shots": 10},
        "selected": {
            "scratch": {**entry, "test_mean": 0.60, "test_std": 0.01},
            "finetune": {**entry, "test_mean": 0.70, "test_std": 0.02, "val_mean": 0.6},
            "finetune[freeze=2]": {**entry, "test_mean": 0.75, "test_std": 0.02, "val_mean": 0.4},
        },
    }
    (row,) = _margin_row("imagenet/fashion_10shots", results)
    assert "+10.00" in row and "fine-tune (FT-0)" in row  # the FT-l best on validation, not on test
    assert _margin_row("x", {"selected": {"finetune": results["selected"]["finetune"]}}) == []
    assert "best FT-l over scratch" in _margin_table([row]) and _margin_table([]) == ""
