"""The ``paramtransfer`` command: a real kill-and-resume, an end-to-end comparison with its report, and
bad input ending with one error line and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paramtransfer.cli import main
from paramtransfer.data import sources
from paramtransfer.report import load_results
from paramtransfer.train.checkpoint import load_checkpoint

CLI = [sys.executable, "-m", "paramtransfer.cli"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    home = tmp_path / "pt_home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "PARAMTRANSFER_HOME": str(home), **extra}


def _comparable(result: dict) -> dict:
    """A result without what legitimately differs between an interrupted and an uninterrupted run."""
    out = {k: v for k, v in result.items() if k != "wall_time_s"}
    out["history"] = [{k: v for k, v in r.items() if k != "time_s"} for r in result["history"]]
    out["diagnostics"] = {k: v for k, v in result["diagnostics"].items() if k != "resumed_from_epoch"}
    return out


# ---- a real kill -9 and restart ------------------------------------------------------------------


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    def cmd(out: Path) -> list[str]:
        return [
            *CLI,
            "run",
            "--method",
            "scratch",
            "--arch",
            "lenet",
            "--target",
            "fashion[5-9]",
            "--shots",
            "5",
            "--epochs",
            "8",
            "--set",
            "data.test_limit=50",
            "--set",
            "train.patience=null",
            "--set",
            "train.batch_size=8",
            "--quiet",
            "--out",
            str(out),
        ]

    env = _env(tmp_path)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    ref = subprocess.Popen(cmd(clean), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoint.pt").exists():
            assert victim.poll() is None, "the run ended before it wrote a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint.pt after 120 s"
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "result.json").exists(), "killed too late: the run had already finished"
    state = load_checkpoint(killed / "checkpoint.pt")
    assert state is not None and state["epoch"] < 7
    done_epochs = state["epoch"] + 1

    again = subprocess.run(cmd(killed), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err

    resumed = json.loads((killed / "result.json").read_text())
    uninterrupted = json.loads((clean / "result.json").read_text())
    assert resumed["diagnostics"]["resumed_from_epoch"] == done_epochs
    assert uninterrupted["diagnostics"]["resumed_from_epoch"] is None
    assert len(resumed["history"]) == 8
    assert resumed["status"] == "ok"
    assert _comparable(resumed) == _comparable(uninterrupted)
    assert not (killed / "checkpoint.pt").exists()
    assert "wrote" in again.stdout and "val" in again.stdout


# ---- end to end: compare, then report ------------------------------------------------------------

VARIANTS = {"scratch", "finetune", "finetune[freeze=1]", "finetune[freeze=2]", "finetune[freeze=3]"}


@pytest.mark.slow
def test_compare_end_to_end_and_report_rebuilds_the_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "--arch",
            "lenet",
            "--source",
            "fashion[0-4]",
            "--source-limit",
            "300",
            "--source-epochs",
            "1",
            "--target",
            "fashion[5-9]",
            "--methods",
            "scratch,finetune,finetune[freeze=all],knn,random_guess",
            "--lr",
            "0.1,0.01",
            "--seeds",
            "0,1",
            "--shots",
            "3",
            "--epochs",
            "2",
            "--set",
            "data.test_limit=50",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    summary = json.loads((out / "results.json").read_text())

    runs = summary["runs"]
    # 5 trained variants x 2 lrs x 2 seeds + (knn, random_guess) x 2 seeds
    assert len(runs) == len(VARIANTS) * 2 * 2 + 2 * 2
    assert {r["method"] for r in runs} == VARIANTS | {"knn", "random_guess"}
    for r in runs:
        assert "lr" in r["config"]
        assert r["status"] == "ok"
        assert r["target"] == "fashion[5-9]" and r["arch"] == "lenet"
        if r["method"] in VARIANTS:
            assert r["config"]["lr"] in (0.1, 0.01)
            assert len(r["history"]) == 2
            assert 0.0 <= r["val_accuracy"] <= 1.0 and 0.0 <= r["test_accuracy"] <= 1.0
        else:
            assert r["config"]["lr"] is None
    grid = {(r["method"], r["config"]["lr"], r["seed"]) for r in runs}
    assert len(grid) == len(runs), "every (variant, lr, seed) ran exactly once"
    for r in runs:
        if r["method"].startswith("finetune"):
            level = int(r["method"][len("finetune[freeze=") : -1]) if "[" in r["method"] else 0
            assert r["diagnostics"]["frozen_blocks"] == list(range(level))

    selected = summary["selected"]
    assert set(selected) == VARIANTS | {"knn", "random_guess"}
    for variant in VARIANTS:
        by_lr: dict[float, list[dict]] = {}
        for r in runs:
            if r["method"] == variant:
                by_lr.setdefault(r["config"]["lr"], []).append(r)
        means = {lr: statistics.fmean(r["val_accuracy"] for r in rs) for lr, rs in by_lr.items()}
        entry = selected[variant]
        assert entry["status"] == "ok"
        assert entry["lr"] in means
        assert means[entry["lr"]] == pytest.approx(max(means.values()))
        assert entry["val_mean"] == pytest.approx(means[entry["lr"]])
        chosen = sorted(by_lr[entry["lr"]], key=lambda r: r["seed"])
        assert entry["test_by_seed"] == [r["test_accuracy"] for r in chosen]
        assert entry["test_mean"] == pytest.approx(statistics.fmean(entry["test_by_seed"]))
    for variant in ("knn", "random_guess"):
        assert selected[variant]["lr"] is None
        assert selected[variant]["n_seeds"] == 2

    table = (out / "table.md").read_text()
    assert table in printed.out
    for name in ("scratch (NoTL)", "fine-tune (FT-0)", "FT-1", "FT-2", "FT-3", "K-NN", "random guess"):
        assert f"| {name} |" in table
    assert "best FT-l" in table
    for png in ("ft_layers.png", "learning_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000

    # report from results.json, into another directory
    rebuilt = tmp_path / "rebuilt"
    assert main(["report", str(out), "--out", str(rebuilt)]) == 0
    printed = capsys.readouterr()
    assert (rebuilt / "table.md").read_text() == table
    assert table in printed.out
    assert (rebuilt / "ft_layers.png").is_file() and (rebuilt / "learning_curves.png").is_file()

    # report from the per-run result.json files alone (results.json lost): the same choices
    runs_only = tmp_path / "runs_only"
    shutil.copytree(out / "runs", runs_only / "runs")
    assert main(["report", str(runs_only)]) == 0
    capsys.readouterr()
    again = load_results(runs_only)["selected"]
    assert {v: e["lr"] for v, e in again.items()} == {v: e["lr"] for v, e in selected.items()}

    def rows(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("| ")]

    assert rows((runs_only / "table.md").read_text()) == rows(table)


# ---- bad input: one line on stderr, exit code 2 --------------------------------------------------


def _clear_fashion_cache() -> None:
    clear = getattr(sources, "clear_cache", None)
    if clear is not None:
        clear()
    else:
        sources.load_fashion.cache_clear()


@pytest.fixture
def no_fashion_cache():
    _clear_fashion_cache()  # an earlier test may have cached the real files in this process
    yield
    _clear_fashion_cache()


RUN = ["run", "--target", "fashion[5-9]", "--shots", "2", "--epochs", "1"]

# The table of bad inputs lives in test_bad_inputs.py.


def test_missing_fashion_data_in_process(tmp_path, monkeypatch, capsys, no_fashion_cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PARAMTRANSFER_DATA", str(empty))
    code = main([*RUN, "--method", "scratch", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paramtransfer: error: ")
    assert str(empty) in lines[0] and "PARAMTRANSFER_DATA" in lines[0]


def test_errors_in_a_real_process_exit_2_without_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["run", "--method", "nosuch_method"], {}),
        ([*RUN, "--method", "scratch", "--set", "foo"], {}),
        ([*RUN, "--method", "scratch"], {"PARAMTRANSFER_DATA": str(empty)}),
    ]
    procs = [
        subprocess.Popen(
            [*CLI, *argv, "--quiet", "--out", str(tmp_path / f"out{i}")],
            env=_env(tmp_path, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, (argv, extra) in enumerate(cases)
    ]
    for (argv, _), p in zip(cases, procs, strict=True):
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 2, (argv, stderr)
        assert "Traceback" not in stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("paramtransfer: error: "), (argv, stderr)
        assert stdout == ""


# ---- flags, --config, output folders ---------------------------------------------------------------


def test_explicit_flags_count_also_when_they_repeat_the_default():
    from paramtransfer.cli import _explicit_flags

    given = _explicit_flags(["compare", "--shots", "20", "--lr", "0.1,0.01,0.001", "--out", "x"])
    assert {"shots", "lr", "out"} <= given
    assert not {"epochs", "seeds", "methods", "target"} & given


def test_config_file_never_wins_over_an_explicit_flag(tmp_path, monkeypatch, capsys):
    from paramtransfer.experiments import compare as compare_module

    seen = []

    def fake_compare(config, out, **kwargs):
        seen.append(config)
        return {"config": {}, "selected": {}, "runs": []}

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("shots: 5\nepochs: 3\nseeds: [4]\nlrs: [0.5]\ntarget: digits\nmethods: [scratch]\n")
    argv = ["compare", "--config", str(cfg), "--shots", "20", "--epochs", "30", "--lr", "0.1,0.01,0.001"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--quiet"]) == 0, capsys.readouterr().err
    (config,) = seen
    assert (config.shots, config.epochs, config.lrs) == (20, 30, [0.1, 0.01, 0.001])  # the flags, = defaults
    assert (config.seeds, config.target, config.methods) == ([4], "digits", ["scratch"])  # the file
    assert main(["compare", "--config", str(cfg), "--seed", "0", "--out", str(tmp_path / "o2")]) == 0
    assert seen[1].seeds == [0] and seen[1].shots == 5


@pytest.mark.parametrize("command", ["run", "compare", "demo", "auto"])
def test_help_lists_task_specs_and_environment(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for needle in (
        "fashion[0-4]",
        "fashion[0,3,7]",
        "digits[5-9]",
        "folder:PATH",
        "one sub-folder per class",
        "npz:PATH",
        "[N,H,W,C]",
        "x_test",
        "$PARAMTRANSFER_HOME",
        "$PARAMTRANSFER_DATA",
    ):
        assert needle in text, needle
    assert "use another" in text  # what an --out holding other results does


def test_out_not_writable_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    import paramtransfer.cli.common as cli  # _check_out asks os.access

    real_access = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    # root writes anywhere, whatever chmod says: ask os.access as a user without write permission would
    monkeypatch.setattr(
        cli.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
    )
    code = main([*RUN, "--method", "scratch", "--quiet", "--out", str(locked / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "not writable" in err and str(locked) in err
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder_for_a_real_user(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main([*RUN, "--method", "scratch", "--out", str(locked / "run")]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_run_reuses_its_own_result_and_refuses_another_methods(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "--target", "digits[0-2]", "--shots", "2", "--epochs", "1", "--quiet", "--out", str(out)]
    assert main([*argv, "--method", "scratch"]) == 0
    first = (out / "result.json").read_bytes()
    assert main([*argv, "--method", "scratch"]) == 0  # the same command: reused, not run again
    assert (out / "result.json").read_bytes() == first
    capsys.readouterr()
    assert main([*argv, "--method", "finetune[freeze=1]", "--arch", "lenet", "--source", "digits[3-5]"]) == 2
    err = capsys.readouterr().err
    assert "holds the finished result of another run (scratch" in err and "use another --out" in err
    assert (out / "result.json").read_bytes() == first


def test_demo_prints_a_second_table_from_the_imagenet_source(tmp_path, monkeypatch, capsys):
    """`demo` ends with the ImageNet source's table (here shrunk: one method, one epoch) in OUT/imagenet;
    --no-imagenet skips it."""
    from paramtransfer.experiments import compare as compare_module

    tiny = compare_module.imagenet_demo_config()
    tiny.methods, tiny.lrs, tiny.epochs, tiny.shots = ["linear_probe"], [0.01], 1, 1
    tiny.data = {**tiny.data, "test_limit": 10, "image_size": 32}
    monkeypatch.setattr(compare_module, "imagenet_demo_config", lambda: tiny)
    argv = ["demo", "--methods", "scratch", "--lr", "0.1", "--seeds", "0", "--epochs", "1", "--shots", "2"]
    argv += ["--source-epochs", "1", "--set", "data.test_limit=20", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "with")]) == 0
    out = capsys.readouterr().out
    assert "ImageNet network" in out and "linear probe" in out
    summary = json.loads((tmp_path / "with" / "imagenet" / "results.json").read_text())
    assert summary["config"]["source"] == "imagenet" and summary["selected"]["linear_probe"]["status"] == "ok"
    assert load_results(tmp_path / "with")["config"]["source"] != "imagenet"  # the tables do not mix
    assert main([*argv, "--no-imagenet", "--out", str(tmp_path / "without")]) == 0
    assert not (tmp_path / "without" / "imagenet").exists()
