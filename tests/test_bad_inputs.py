"""Every bad input we know of, through the real CLI entry point (``paramtransfer.cli.main``).

Each case builds its argv (and any broken file it needs) in a scratch folder and states a text the one
stderr line must contain. For every case: exit code 2 (or, for a case marked ``warning``, exit 0 with one
``paramtransfer: warning:`` line naming the problem), exactly one line on stderr, no traceback, and no
file that existed before the command changed. Cases marked ``process`` run in a real subprocess (for
what only a process shows: a closed stdout, an interpreter-level failure). Add every new way to fail here.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from paramtransfer.cli import main
from paramtransfer.models.store import save_model

CLI = [sys.executable, "-m", "paramtransfer.cli"]
RUN = ["run", "--target", "fashion[5-9]", "--shots", "2", "--epochs", "1", "--quiet"]


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Path, Path], list[str]]  # (scratch folder, a saved lenet source) -> argv
    needle: str  # a text the stderr line must contain
    warning: bool = False  # exit 0 with one warning line instead of exit 2
    process: bool = False  # run in a subprocess
    stdin_closed_stdout: bool = False  # with process: stdout is a pipe closed at once (as `| head -0`)


def _plain(*argv: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, saved: list(argv)


def _methods_on_saved(method: str, *extra: str) -> Callable[[Path, Path], list[str]]:
    """``run`` with ``method`` from the saved lenet source (no pretraining)."""
    return lambda tmp, saved: [*RUN, "--method", method, "--source", str(saved), *extra]


def _methods_compare(methods: str, arch: str) -> Callable[[Path, Path], list[str]]:
    """``compare`` of ``methods`` on ``arch`` from a source task spec (must fail before pretraining it)."""
    return _plain("compare", "--methods", methods, "--arch", arch, "--shots", "2", "--epochs", "1", "--quiet")


CASES: list[Case] = [
    # ---- flags and specs -----------------------------------------------------------------------
    Case("unknown-method", _plain("run", "--method", "nosuch_method"), "nosuch_method"),
    Case(
        "unknown-arch",
        _plain("run", "--method", "scratch", "--arch", "nosuch_arch", "--shots", "2", "--epochs", "1"),
        "nosuch_arch",
    ),
    Case(
        "class-range-outside-dataset",
        _plain("run", "--method", "scratch", "--target", "fashion[8-12]", "--shots", "2"),
        "fashion",
    ),
    Case(
        "missing-folder",
        _plain("run", "--method", "scratch", "--target", "folder:/nonexistent", "--shots", "2"),
        "/nonexistent",
    ),
    Case("negative-shots", _plain("run", "--method", "scratch", "--shots", "-1"), "shots"),
    Case(
        "too-many-shots",
        _plain("run", "--method", "scratch", "--target", "digits", "--shots", "1000"),
        "shots",
    ),
    Case("malformed-set", _plain(*RUN, "--method", "scratch", "--set", "foo"), "foo"),
    Case(
        "set-unknown-train-field",
        _plain(*RUN, "--method", "scratch", "--set", "train.no_such_field=1"),
        "no_such_field",
    ),
    Case(
        "set-unknown-key", _plain(*RUN, "--method", "scratch", "--set", "no_such_option=1"), "no_such_option"
    ),
    Case(
        "freeze-more-blocks-than-source",
        lambda tmp, saved: [
            *RUN,
            "--method",
            "finetune[freeze=9]",
            "--source",
            str(saved),
            "--arch",
            "lenet",
        ],
        "freeze=9",
    ),
    Case(
        "saved-source-arch-mismatch",
        lambda tmp, saved: [*RUN, "--method", "finetune", "--source", str(saved), "--arch", "resnet20"],
        "resnet20",
    ),
    Case("invalid-momentum", _plain(*RUN, "--method", "scratch", "--set", "train.momentum=-1"), "momentum"),
    # ---- data files (npz, folders) ---------------------------------------------------------------
    # ---- sources, caches and weights -------------------------------------------------------------
    # ---- output folders and result files ---------------------------------------------------------
    # ---- methods and models ----------------------------------------------------------------------
    # arch/method mismatches are refused before a source is pretrained (RUN's source is a task spec)
    Case("ptu-rnn-on-resnet20", _plain(*RUN, "--method", "ptu_rnn", "--arch", "resnet20"), "--arch rnn"),
    Case("ptu-on-rnn", _plain(*RUN, "--method", "ptu", "--arch", "rnn"), "ptu_rnn for rnn"),
    Case("spottune-on-mobilenet", _plain(*RUN, "--method", "spottune", "--arch", "mobilenet"), "resnet20"),
    Case("spottune-on-saved-lenet", _methods_on_saved("spottune"), "not on lenet"),
    Case("dtnh-on-ptu-run-on-lenet", _methods_on_saved("dtnh:ptu"), "dtnh:l2sp"),
    Case("compare-spottune-global-on-lenet", _methods_compare("finetune,spottune_global", "lenet"), "lenet"),
    Case("compare-ptu-rnn-on-lenet", _methods_compare("scratch,ptu_rnn", "lenet"), "ptu_rnn"),
    # method options out of range
    Case("finetune-negative-freeze", _methods_on_saved("finetune[freeze=-1]"), "freeze=-1"),
    Case("finetune-freeze-and-last-k", _methods_on_saved("finetune[freeze=1,last_k=1]"), "not several"),
    Case("l2sp-negative-alpha", _methods_on_saved("l2sp[alpha=-1]"), "alpha"),
    Case("l2sp-negative-alpha-by-set", _methods_on_saved("l2sp", "--set", "l2sp.alpha=-1"), "alpha"),
    Case("spottune-zero-tau", _plain(*RUN, "--method", "spottune[tau=0]", "--arch", "resnet20"), "tau"),
    Case("knowdist-layer-outside-source", _methods_on_saved("knowdist[layers=[7]]"), "[7]"),
    Case("ptu-unknown-activation", _methods_on_saved("ptu[activation=gelu]"), "gelu"),
    # --save-model of a method that trains no network
    Case("save-model-of-knn", _methods_on_saved("knn", "--save-model"), "no model to save"),
    # ---- processes and executors -----------------------------------------------------------------
]


@pytest.fixture(scope="module")
def saved_lenet(tmp_path_factory, tiny_source) -> Path:
    return save_model(tiny_source, tmp_path_factory.mktemp("saved") / "lenet_src")


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _run_in_subprocess(argv: list[str], tmp: Path, close_stdout: bool) -> tuple[int, str, str]:
    env = {**os.environ, "PARAMTRANSFER_HOME": os.environ["PARAMTRANSFER_HOME"]}
    if close_stdout:
        proc = subprocess.Popen(
            [*CLI, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        proc.stdout.close()  # the reader went away, as `| head` does
        err = proc.stderr.read()
        return proc.wait(timeout=300), "", err
    proc = subprocess.run([*CLI, *argv], env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_one_line_exit_2_nothing_changed(case: Case, saved_lenet: Path, tmp_path: Path, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = case.argv(scratch, saved_lenet)
    if "--out" not in argv and argv[0] in ("run", "compare", "pretrain"):
        argv = [*argv, "--out", str(scratch / "out")]
    before = _snapshot(scratch)
    if case.process:
        code, out, err = _run_in_subprocess(argv, scratch, case.stdin_closed_stdout)
    else:
        code, out, err = _run_in_process(argv, capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err + out, err
    if case.warning:
        assert code == 0, err
        warnings = [line for line in lines if line.startswith("paramtransfer: warning: ")]
        assert len(warnings) == 1, err
        assert case.needle in warnings[0], err
    else:
        assert code == 2, err
        assert len(lines) == 1, err
        assert lines[0].startswith("paramtransfer: error: "), err
        assert case.needle in lines[0], err
        assert not (scratch / "out" / "result.json").exists()
    after = _snapshot(scratch)
    assert {k: after.get(k) for k in before} == before, "a file that existed before the command changed"


def test_the_table_holds_at_least_forty_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES)
    assert len(CASES) >= 40
