"""Every bad input we know of, through the real CLI entry point (``paramtransfer.cli.main``).

Each case builds its argv (and any broken file it needs) in a scratch folder and states a text the one
stderr line must contain. For every case: exit code 2 (or, for a case marked ``warning``, exit 0 with one
``paramtransfer: warning:`` line naming the problem), exactly one line on stderr, no traceback, and no
file that existed before the command changed. Cases marked ``process`` run in a real subprocess (for
what only a process shows: a closed stdout, an interpreter-level failure). Add every new way to fail here.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


def _data_run(target: str) -> list[str]:
    return ["run", "--method", "scratch", "--target", target, "--shots", "2", "--epochs", "1", "--quiet"]


def _data_xy(n: int = 12) -> dict[str, np.ndarray]:
    """``n`` 8x8 uint8 images (0 to 255) and labels alternating 0/1."""
    x = (np.arange(n * 64) * 255 // (n * 64 - 1)).astype(np.uint8).reshape(n, 8, 8)
    return {"x": x, "y": np.arange(n) % 2}


def _data_npz(tmp: Path, name: str, **change: np.ndarray | None) -> list[str]:
    """argv running on ``tmp/name``: ``_data_xy`` with the arrays in ``change`` replaced (None drops one)."""
    arrays = {**_data_xy(), **change}
    np.savez(tmp / name, **{k: v for k, v in arrays.items() if v is not None})
    return _data_run(f"npz:{tmp / name}")


def _data_nan_x() -> np.ndarray:
    x = _data_xy()["x"].astype(np.float32)
    x[5, 2, 2] = np.nan
    return x


def _data_bytes(tmp: Path, name: str, data: bytes) -> list[str]:
    (tmp / name).write_bytes(data)
    return _data_run(f"npz:{tmp / name}")


def _data_npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **_data_xy())
    return buf.getvalue()


def _data_folder(tmp: Path, bad_name: str, bad: Callable[[bytes], bytes]) -> list[str]:
    """A two-class image folder whose class ``b`` also holds ``bad_name`` = ``bad(valid PNG bytes)``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 200).save(buf, "PNG")
    png = buf.getvalue()
    for cls in ("a", "b"):
        (tmp / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            (tmp / "imgs" / cls / f"{i}.png").write_bytes(png)
    (tmp / "imgs" / "b" / bad_name).write_bytes(bad(png))
    return _data_run(f"folder:{tmp / 'imgs'}")


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
    Case(
        "data-npz-nan-pixels",
        lambda tmp, saved: _data_npz(tmp, "nan.npz", x=_data_nan_x()),
        "nan.npz: x holds NaN",
    ),
    Case(
        "data-npz-inf-test-pixels",
        lambda tmp, saved: _data_npz(
            tmp, "inf.npz", x_test=np.full((2, 8, 8), np.inf), y_test=np.array([0, 1])
        ),
        "inf.npz: x_test holds NaN or infinite",
    ),
    Case(
        "data-npz-fewer-labels-than-images",
        lambda tmp, saved: _data_npz(tmp, "len.npz", y=np.arange(11) % 2),
        "x holds 12 images but y holds 11 labels",
    ),
    Case(
        "data-npz-test-length-mismatch",
        lambda tmp, saved: _data_npz(
            tmp, "tlen.npz", x_test=np.zeros((3, 8, 8), np.uint8), y_test=np.array([0, 1])
        ),
        "x_test holds 3 images but y_test holds 2 labels",
    ),
    Case(
        "data-npz-x-test-without-y-test",
        lambda tmp, saved: _data_npz(tmp, "xt.npz", x_test=np.zeros((2, 8, 8), np.uint8)),
        "has x_test but no y_test",
    ),
    Case(
        "data-npz-fractional-labels",
        lambda tmp, saved: _data_npz(tmp, "frac.npz", y=np.arange(12) / 4),
        "non-integer label 0.25",
    ),
    Case(
        "data-npz-string-labels",
        lambda tmp, saved: _data_npz(tmp, "str.npz", y=np.array(["cat", "dog"] * 6)),
        "not integer class labels",
    ),
    Case(
        "data-npz-one-hot-labels",
        lambda tmp, saved: _data_npz(tmp, "hot.npz", y=np.eye(2)[np.arange(12) % 2]),
        "y.argmax(1)",
    ),
    Case(
        "data-npz-object-array",
        lambda tmp, saved: _data_npz(tmp, "obj.npz", y=np.array([0, 1, None] * 4, dtype=object)),
        "'y' holds Python objects",
    ),
    Case(
        "data-npz-random-bytes",
        lambda tmp, saved: _data_bytes(tmp, "noise.npz", bytes(range(256)) * 4),
        "noise.npz is not an npz archive",
    ),
    Case(
        "data-npz-truncated",
        lambda tmp, saved: _data_bytes(tmp, "cut.npz", _data_npz_bytes()[:-40]),
        "cut.npz is not an npz archive",
    ),
    Case(
        "data-npz-empty-file",
        lambda tmp, saved: _data_bytes(tmp, "empty.npz", b""),
        "empty.npz is not an npz archive",
    ),
    Case(
        "data-npz-is-an-npy-array",
        lambda tmp, saved: _data_bytes(tmp, "arr.npz", b"\x93NUMPY" + bytes(120)),
        "arr.npz holds a single .npy array",
    ),
    Case(
        "data-npz-negative-pixels",
        lambda tmp, saved: _data_npz(tmp, "neg.npz", x=_data_xy()["x"] / 127.5 - 1.0),
        "x has pixel values from -1 to 1",
    ),
    Case(
        "data-npz-pixels-above-255",
        lambda tmp, saved: _data_npz(tmp, "u16.npz", x=_data_xy()["x"].astype(np.uint16) * 257),
        "x has pixel values from 0 to 65535",
    ),
    Case(
        "data-npz-one-class",
        lambda tmp, saved: _data_npz(tmp, "one.npz", y=np.full(12, 3)),
        "at least 2 classes",
    ),
    Case("data-fashion-one-class", _plain(*_data_run("fashion[5-5]")), "select more, e.g. fashion[5-9]"),
    Case("data-digits-one-class", _plain(*_data_run("digits[3]")), "select more, e.g. digits[3-9]"),
    Case(
        "data-folder-text-as-png",
        lambda tmp, saved: _data_folder(tmp, "notes.png", lambda png: b"not an image"),
        "notes.png is not a readable image",
    ),
    Case(
        "data-folder-truncated-png",
        lambda tmp, saved: _data_folder(tmp, "half.png", lambda png: png[: len(png) // 2]),
        "remove or fix it",
    ),
    # ---- sources, caches and weights -------------------------------------------------------------
    # ---- output folders and result files ---------------------------------------------------------
    # ---- methods and models ----------------------------------------------------------------------
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
