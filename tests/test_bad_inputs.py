"""Every bad input we know of, through the real CLI entry point (``paramtransfer.cli.main``).

Each case builds its argv (and any broken file it needs) in a scratch folder and states a text the one
stderr line must contain. For every case: exit code 2 (or, for a case marked ``warning``, exit 0 with one
``paramtransfer: warning:`` line naming the problem), exactly one line on stderr, no traceback, and no
file that existed before the command changed. Cases marked ``process`` run in a real subprocess (for
what only a process shows: a closed stdout, an interpreter-level failure). Add every new way to fail here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
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


def _store_copy(tmp: Path, saved: Path, edit: Callable[[Path], object] | None = None) -> Path:
    """A copy of the saved source in ``tmp`` (the fixture's is shared), changed by ``edit``."""
    d = shutil.copytree(saved, tmp / "model")
    if edit is not None:
        edit(d)
    return d


def _store_meta(**changes: object) -> Callable[[Path], object]:
    """An edit of meta.json: top-level keys, or ``arch_kwargs`` entries given as ``kw_NAME=V``."""

    def edit(d: Path) -> None:
        meta = json.loads((d / "meta.json").read_text())
        kwargs = {k[3:]: v for k, v in changes.items() if k.startswith("kw_")}
        meta.update({k: v for k, v in changes.items() if not k.startswith("kw_")})
        meta["arch_kwargs"] = {**meta["arch_kwargs"], **kwargs}
        (d / "meta.json").write_text(json.dumps(meta))

    return edit


def _store_truncate(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _store_flip_a_bit(d: Path) -> None:
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (d / "model.safetensors").write_bytes(bytes(data))


def _store_source(edit: Callable[[Path], object] | None = None) -> Callable[[Path, Path], list[str]]:
    """``run finetune`` from a damaged copy of the saved source."""
    return lambda tmp, saved: [*RUN, "--method", "finetune", "--source", str(_store_copy(tmp, saved, edit))]


_STORE_RAY = importlib.util.find_spec("ray") is not None


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
    Case("saved-weights-truncated", _store_source(_store_truncate), "model.safetensors"),
    Case("saved-weights-hash-mismatch", _store_source(_store_flip_a_bit), "sha256"),
    Case(
        "saved-weights-truncated-old-meta",
        _store_source(lambda d: (_store_meta(weights_sha256=None)(d), _store_truncate(d))),
        "not a readable safetensors file",
    ),
    Case(
        "saved-meta-garbage",
        _store_source(lambda d: (d / "meta.json").write_text("{not json")),
        "meta.json is not valid JSON",
    ),
    Case(
        "saved-meta-missing-keys",
        _store_source(lambda d: (d / "meta.json").write_text('{"arch": "lenet"}')),
        "lacks num_classes, in_shape, arch_kwargs",
    ),
    Case("saved-meta-absurd-hidden", _store_source(_store_meta(kw_hidden=20_000_000)), "parameters"),
    Case("saved-meta-float-hidden", _store_source(_store_meta(kw_hidden=2e7)), "positive integer"),
    Case("saved-meta-unknown-arch-kwarg", _store_source(_store_meta(kw_depth=38)), "'depth'"),
    Case("saved-meta-unknown-arch", _store_source(_store_meta(arch="vgg99")), "vgg99"),
    Case("saved-weights-wrong-shapes", _store_source(_store_meta(kw_hidden=32)), "does not fit"),
    Case(
        "source-path-missing",
        _plain(*RUN, "--method", "finetune", "--source", "./nope"),
        "no saved model at ./nope",
    ),
    Case("source-unknown-spec", _plain(*RUN, "--method", "finetune", "--source", "nosuchspec"), "nosuchspec"),
    Case("pretrain-on-a-path", _plain("pretrain", "--source", "./nope"), "pretrain trains on a task spec"),
    # ---- output folders and result files ---------------------------------------------------------
    # ---- methods and models ----------------------------------------------------------------------
    # ---- processes and executors -----------------------------------------------------------------
    Case(
        "ray-unreachable-address",
        _plain("compare", "--executor", "ray", "--address", "127.0.0.1:1", "--quiet"),
        "127.0.0.1:1" if _STORE_RAY else "paramtransfer[ray]",
    ),
    Case(
        "ray-client-unreachable-address",
        _plain("compare", "--executor", "ray", "--address", "ray://127.0.0.1:1", "--quiet"),
        "ray://127.0.0.1:1" if _STORE_RAY else "paramtransfer[ray]",
    ),
    Case(
        "ray-unreadable-address",
        _plain("compare", "--executor", "ray", "--address", "host:port", "--quiet"),
        "--address host:port" if _STORE_RAY else "paramtransfer[ray]",
    ),
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
