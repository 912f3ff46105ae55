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
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from paramtransfer.cli import main
from paramtransfer.experiments.executors import child_pythonpath
from paramtransfer.models.store import save_model

CLI = [sys.executable, "-m", "paramtransfer.cli"]
RUN = ["run", "--target", "fashion[5-9]", "--shots", "2", "--epochs", "1", "--quiet"]
AUTO = ["auto", "--target", "fashion[5-9]", "--shots", "2", "--epochs", "2", "--quiet"]


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


def _cli_result(method: str = "l2sp", target: str = "fashion[5-9]", epochs: int = 1, **config) -> dict:
    """A finished run's result.json content (as ``run`` writes it), for output folders that hold one."""
    cfg = {"lr": 0.01, "epochs": epochs, "shots": 2, "method": {}, "arch_kwargs": {}, **config}
    cfg.setdefault("train", {"epochs": epochs, "lr": 0.01, "batch_size": 32})
    cfg.setdefault("data", {"val_shots": None, "limit": None, "test_limit": None})
    return {
        "method": method,
        "source": None,
        "target": target,
        "arch": "lenet",
        "seed": 0,
        "config": cfg,
        "val_accuracy": 0.5,
        "test_accuracy": 0.5,
        "history": [{"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5}],
        "wall_time_s": 1.0,
        "diagnostics": {},
        "status": "ok",
        "best_epoch": 1,
        "fingerprint": "0123456789abcdef",
    }


def _cli_write(path: Path, content: dict | list | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _cli_out_with(content: dict | list | str, *argv: str) -> Callable[[Path, Path], list[str]]:
    """argv whose (default) --out tmp/out already holds ``content`` as result.json."""

    def build(tmp: Path, saved: Path) -> list[str]:
        _cli_write(tmp / "out" / "result.json", content)
        return list(argv)

    return build


_CLI_RUN_FILE = "runs/scratch/lr=0.01/seed=0/result.json"


def _cli_compare_with(content: dict | list | str, *argv: str) -> Callable[[Path, Path], list[str]]:
    """compare argv whose --out tmp/out already holds ``content`` as one run's result.json."""

    def build(tmp: Path, saved: Path) -> list[str]:
        _cli_write(tmp / "out" / _CLI_RUN_FILE, content)
        return ["compare", "--methods", "scratch", "--lr", "0.01", "--seeds", "0", *argv, "--quiet"]

    return build


def _cli_file_out(command: Callable[[Path, Path], list[str]], under: bool = False):
    """``command``'s argv with --out a regular file (or, ``under``, a folder below a regular file: not
    writable, also for root)."""

    def build(tmp: Path, saved: Path) -> list[str]:
        _cli_write(tmp / "file", "not a folder")
        return [*command(tmp, saved), "--out", str(tmp / "file" / "sub" if under else tmp / "file")]

    return build


def _cli_report_dir(results: dict | list | str | None, runs: list) -> Callable[[Path, Path], list[str]]:
    """``report tmp/cmp --out tmp/rebuilt`` with the given results.json (None: none) and run files."""

    def build(tmp: Path, saved: Path) -> list[str]:
        if results is not None:
            _cli_write(tmp / "cmp" / "results.json", results)
        for i, run in enumerate(runs):
            method = run["method"] if isinstance(run, dict) else "broken"
            _cli_write(tmp / "cmp" / "runs" / method / "lr=0.01" / f"seed={i}" / "result.json", run)
        return ["report", str(tmp / "cmp"), "--out", str(tmp / "rebuilt")]

    return build


def _cli_report_valid(tmp: Path, saved: Path) -> list[str]:
    return _cli_report_dir(None, [_cli_result("scratch"), _cli_result("finetune")])(tmp, saved)


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
    Case(
        "set-test-limit-negative",
        _plain(*RUN, "--method", "scratch", "--set", "data.test_limit=-5"),
        "test_limit",
    ),
    Case(
        "set-test-limit-zero", _plain(*RUN, "--method", "scratch", "--set", "data.test_limit=0"), "test_limit"
    ),
    Case(
        "set-test-limit-fraction", _plain(*RUN, "--method", "scratch", "--set", "data.test_limit=2.5"), "2.5"
    ),
    Case(
        "set-test-limit-text",
        _plain(*RUN, "--method", "scratch", "--set", "data.test_limit=all"),
        "test_limit",
    ),
    Case(
        "set-val-shots-zero",
        _plain("compare", "--methods", "scratch", "--set", "data.val_shots=0"),
        "val_shots",
    ),
    Case("compare-duplicate-seeds", _plain("compare", "--methods", "scratch", "--seeds", "0,0"), "seed 0"),
    Case("demo-duplicate-seeds", _plain("demo", "--seeds", "1,2,1"), "seed 1"),
    Case("compare-empty-seeds", _plain("compare", "--methods", "scratch", "--seeds", ","), "--seeds"),
    Case("compare-empty-lrs", _plain("compare", "--methods", "scratch", "--lr", ","), "--lr"),
    Case("compare-duplicate-lrs", _plain("compare", "--methods", "scratch", "--lr", "0.1,0.01,0.1"), "0.1"),
    Case("compare-nan-lr", _plain("compare", "--methods", "scratch", "--lr", "nan"), "learning rate"),
    Case(
        "set-option-of-method-not-in-run",
        _plain("compare", "--methods", "scratch,finetune", "--set", "l2sp.alpha=1"),
        "l2sp is not among the methods of this run (scratch, finetune)",
    ),
    Case(
        "set-option-of-base-for-dtnh-twin",
        _plain("compare", "--methods", "dtnh:l2sp", "--set", "l2sp.alpha=1"),
        "dtnh:l2sp.alpha",
    ),
    Case(
        "run-set-option-of-another-method",
        _plain(*RUN, "--method", "scratch", "--set", "l2sp.alpha=1"),
        "l2sp",
    ),
    Case(
        "set-unknown-option-of-method", _plain(*RUN, "--method", "l2sp", "--set", "l2sp.nosuch=1"), "nosuch"
    ),
    Case("bad-flag-value-is-one-line", _plain("run", "--method", "scratch", "--epochs", "0"), "--epochs"),
    Case("unknown-flag-is-one-line", _plain("compare", "--no-such-flag"), "--no-such-flag"),
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
    Case(
        "run-out-holds-another-method",
        _cli_out_with(_cli_result("l2sp"), *RUN, "--method", "scratch"),
        "l2sp",
    ),
    Case(
        "run-out-holds-other-settings",
        _cli_out_with(_cli_result("scratch", epochs=5), *RUN, "--method", "scratch"),
        "epochs 5 there, 1 here",
    ),
    Case(
        "run-out-corrupt-result", _cli_out_with('{"method": "scr', *RUN, "--method", "scratch"), "delete it"
    ),
    Case("run-out-result-wrong-shape", _cli_out_with([1, 2], *RUN, "--method", "scratch"), "result.json"),
    Case("run-out-is-a-file", _cli_file_out(_plain(*RUN, "--method", "scratch")), "is a file"),
    Case("run-out-under-a-file", _cli_file_out(_plain(*RUN, "--method", "scratch"), under=True), "is a file"),
    Case("compare-out-is-a-file", _cli_file_out(_plain("compare", "--methods", "scratch")), "is a file"),
    Case("demo-out-under-a-file", _cli_file_out(_plain("demo"), under=True), "is a file"),
    Case("pretrain-out-is-a-file", _cli_file_out(_plain("pretrain", "--source-limit", "20")), "is a file"),
    Case(
        "rank-out-is-a-file",
        _cli_file_out(lambda tmp, saved: ["rank", "--target", "digits", "--sources", str(saved)]),
        "is a file",
    ),
    Case(
        "modelset-out-under-a-file",
        _cli_file_out(_plain("modelset", "build", "--dataset", "digits"), under=True),
        "is a file",
    ),
    Case("bench-out-is-a-file", _cli_file_out(_plain("bench", "ptu")), "is a file"),
    Case("report-out-is-a-file", _cli_file_out(_cli_report_valid), "is a file"),
    Case(
        "compare-out-holds-another-comparison",
        _cli_compare_with(_cli_result("scratch", target="digits"), "--target", "fashion[5-9]"),
        "another comparison",
    ),
    Case(
        "compare-out-corrupt-run-result",
        _cli_compare_with('{"method": ', "--target", "digits"),
        _CLI_RUN_FILE,
    ),
    Case("report-corrupt-results-json", _cli_report_dir('{"runs": [', []), "delete it and re-run"),
    Case("report-results-json-wrong-shape", _cli_report_dir({"config": {}}, []), "results.json"),
    Case(
        "report-corrupt-run-file", _cli_report_dir(None, [_cli_result("scratch"), "truncated{"]), "delete it"
    ),
    Case(
        "report-runs-of-different-settings",
        _cli_report_dir(None, [_cli_result("scratch"), _cli_result("finetune", target="digits")]),
        "different settings",
    ),
    Case(
        "report-corrupt-results-json-rebuilt-from-runs",
        _cli_report_dir("{not json", [_cli_result("scratch"), _cli_result("finetune")]),
        "rebuilt from the 2 run files",
        warning=True,
    ),
    Case("closed-stdout", _cli_report_valid, "pipe was closed", process=True, stdin_closed_stdout=True),
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
    Case("bss-zero-k", _methods_on_saved("bss[k=0]"), "bss k=0"),
    Case("bss-fractional-k", _methods_on_saved("bss[k=1.5]"), "bss k=1.5"),
    Case("bss-k-not-below-feature-dim", _methods_on_saved("bss[k=8]"), "k <= 7"),
    Case("bss-negative-eta", _methods_on_saved("bss[eta=-1]"), "bss eta=-1"),
    Case("bss-text-eta", _methods_on_saved("bss[eta=abc]"), "bss eta='abc'"),
    Case("dtnh-bss-zero-k", _methods_on_saved("dtnh:bss[k=0]"), "bss k=0"),
    Case(
        "stochnorm-p-above-one", _plain(*RUN, "--method", "stochnorm[p=1.5]", "--arch", "resnet20"), "p=1.5"
    ),
    Case(
        "stochnorm-negative-p", _plain(*RUN, "--method", "stochnorm[p=-0.5]", "--arch", "resnet20"), "p=-0.5"
    ),
    Case("stochnorm-text-p", _plain(*RUN, "--method", "stochnorm[p=abc]", "--arch", "resnet20"), "p='abc'"),
    Case("stochnorm-on-saved-lenet", _methods_on_saved("stochnorm"), "not on lenet"),
    Case(
        "stochnorm-on-rnn", _plain(*RUN, "--method", "stochnorm", "--arch", "rnn"), "lenet and rnn have none"
    ),
    Case("dtnh-on-stochnorm", _methods_on_saved("dtnh:stochnorm"), "dtnh:bss"),
    Case("bi_tuning-negative-cce", _methods_on_saved("bi_tuning[cce=-1]"), "cce=-1"),
    Case("bi_tuning-ccl-text", _methods_on_saved("bi_tuning[ccl=much]"), "ccl='much'"),
    Case("bi_tuning-zero-temperature", _methods_on_saved("bi_tuning[temperature=0]"), "temperature=0"),
    Case(
        "bi_tuning-zero-queue",
        _methods_on_saved("bi_tuning", "--set", "bi_tuning.queue_size=0"),
        "queue_size=0",
    ),
    Case("bi_tuning-fractional-queue", _methods_on_saved("bi_tuning[queue_size=2.5]"), "queue_size=2.5"),
    Case("bi_tuning-momentum-above-1", _methods_on_saved("bi_tuning[momentum=1.5]"), "momentum=1.5"),
    Case(
        "bi_tuning-zero-projection-dim", _methods_on_saved("bi_tuning[projection_dim=0]"), "projection_dim=0"
    ),
    Case("bi_tuning-unknown-projector", _methods_on_saved("bi_tuning[projector=conv]"), "projector='conv'"),
    Case(
        "dtnh-bi_tuning-negative-momentum",
        _methods_on_saved("dtnh:bi_tuning[momentum=-0.1]"),
        "momentum=-0.1",
    ),
    # --save-model of a method that trains no network
    Case("save-model-of-knn", _methods_on_saved("knn", "--save-model"), "no model to save"),
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
    # the ImageNet source
    Case(
        "imagenet-source-for-another-arch",
        _plain(*RUN, "--method", "finetune", "--source", "imagenet", "--arch", "lenet"),
        "no ImageNet weights for 'lenet'",
    ),
    Case(
        "imagenet-pretrain-for-another-arch",
        _plain("pretrain", "--source", "imagenet", "--arch", "resnet20"),
        "no ImageNet weights for 'resnet20'",
    ),
    Case(
        "imagenet-source-with-arch-option",
        _plain(
            "compare",
            "--source",
            "imagenet",
            "--arch",
            "efficientnet_lite0",
            "--methods",
            "finetune[arch.width=2]",
            "--quiet",
        ),
        "arch. options",
    ),
    Case("ptu-unknown-target-init", _methods_on_saved("ptu[target_init=imagenet]"), "target_init"),
    Case("ptu-fixed-gates-text", _methods_on_saved("ptu[fixed_gates=sometimes]"), "fixed_gates"),
    Case(
        "spottune-global-warmup-negative",
        _methods_on_saved("spottune_global[warmup_epochs=-1]"),
        "warmup_epochs",
    ),
    Case(
        "spottune-global-policy-init",
        _methods_on_saved("spottune_global[policy_init=zero]"),
        "policy_init='zero'",
    ),
    Case("lwf-negative-lambda-o", _methods_on_saved("lwf[lambda_o=-1]"), "lambda_o=-1"),
    Case("lwf-zero-temperature", _methods_on_saved("lwf[temperature=0]"), "temperature=0"),
    Case("dtnh-lwf-text-temperature", _methods_on_saved("dtnh:lwf[temperature=warm]"), "temperature='warm'"),
    Case("co_tuning-negative-trade-off", _methods_on_saved("co_tuning[trade_off=-2.3]"), "trade_off=-2.3"),
    Case(
        "co_tuning-unknown-relationship",
        _methods_on_saved("co_tuning[relationship=inverse]"),
        "relationship='inverse'",
    ),
    Case("lora-rank-zero", _methods_on_saved("lora[r=0]"), "lora r=0"),
    Case("lora-rank-fraction", _methods_on_saved("lora[r=2.5]"), "lora r=2.5"),
    Case("lora-alpha-negative", _methods_on_saved("lora[alpha=-1]"), "lora alpha=-1"),
    Case("lora-unknown-targets", _methods_on_saved("lora[targets=attention]"), "targets='attention'"),
    Case("lora-merge-text", _methods_on_saved("lora[merge=maybe]"), "merge='maybe'"),
    Case("lora-unknown-option", _methods_on_saved("lora[rank=4]"), "no option 'rank'"),
    Case("lora-on-rnn", _plain(*RUN, "--method", "lora", "--arch", "rnn"), "use bitfit or finetune for rnn"),
    Case("bitfit-takes-no-options", _methods_on_saved("bitfit[r=4]"), "no option 'r'"),
    Case(
        "spottune-freeze-first-beyond-efficientnet",
        _plain(
            *RUN,
            "--method",
            "spottune[freeze_first=10]",
            "--source",
            "imagenet",
            "--arch",
            "efficientnet_lite0",
        ),
        "freeze_first=10 exceeds the 9 routed blocks",
    ),
    Case(
        "ray-unreadable-address",
        _plain("compare", "--executor", "ray", "--address", "host:port", "--quiet"),
        "--address host:port" if _STORE_RAY else "paramtransfer[ray]",
    ),
    # device, precision, image size, augmentation, the activation caches' budget
    *(
        []
        if torch.cuda.is_available()
        else [
            Case("device-cuda-absent", _plain(*RUN, "--method", "scratch", "--device", "cuda"), "no CUDA"),
            Case(
                "rank-device-cuda-absent",
                lambda tmp, saved: [
                    "rank",
                    "--target",
                    "digits",
                    "--sources",
                    str(saved),
                    "--device",
                    "cuda",
                ],
                "no CUDA",
            ),
            Case(
                "compare-set-device-cuda-absent",
                _plain("compare", "--methods", "finetune", "--set", "train.device=cuda", "--quiet"),
                "no CUDA",
            ),
        ]
    ),
    Case("device-unknown", _plain(*RUN, "--method", "scratch", "--device", "tpu"), "device 'tpu' is unknown"),
    Case("device-cuda-index-text", _plain(*RUN, "--method", "scratch", "--device", "cuda:x"), "cuda:N"),
    Case("precision-unknown", _plain(*RUN, "--method", "scratch", "--precision", "8"), "--precision"),
    Case("image-size-zero", _plain(*RUN, "--method", "scratch", "--image-size", "0"), "--image-size"),
    Case("image-size-huge", _plain(*RUN, "--method", "scratch", "--image-size", "100000"), "image_size"),
    Case(
        "set-image-size-text",
        _plain("compare", "--methods", "scratch", "--set", "data.image_size=big", "--quiet"),
        "image_size",
    ),
    Case(
        "image-size-a-lenet-source-cannot-take",
        lambda tmp, saved: [*RUN, "--method", "finetune", "--source", str(saved), "--image-size", "64"],
        "cannot take 64x64 images",
    ),
    Case(
        "bench-setting-unknown-score",
        lambda tmp, saved: _bench_setting(tmp, "scores: [lps]\n"),
        "scores must be a list of logme, leep, nce, hscore, hscore_shrinkage, transrate",
    ),
    Case(
        "bench-lps-variant-unknown-option",
        lambda tmp, saved: _bench_setting(
            tmp, "kind: lps\neval: {variants: {b3: {weights: [0, 0, 1, 0], epoch: 100}}}\n", common=""
        ),
        "eval variant 'b3' is",
    ),
    Case(
        "bench-auto-setting-no-sources",
        lambda tmp, saved: _bench_setting(tmp, "kind: auto\nsources: []\n"),
        "tiny/one: sources: give the candidate sources as a list",
    ),
    Case(
        "bench-auto-setting-pretrained-without-epochs",
        lambda tmp, saved: _bench_setting(
            tmp, "kind: auto\nsources: [{pretrained: {arch: lenet, images: digits}}]\n"
        ),
        "sources: pretrained needs arch, images and epochs",
    ),
    Case(
        "bench-auto-setting-pretrained-zero-epochs",
        lambda tmp, saved: _bench_setting(
            tmp, "kind: auto\nsources: [{pretrained: {arch: lenet, images: digits, epochs: 0}}]\n"
        ),
        "sources: pretrained epochs=0: give 1 to 1000",
    ),
    Case(
        "bench-auto-setting-budget-above-1",
        lambda tmp, saved: _bench_setting(tmp, "kind: auto\nsources: [lenet@digits]\nbudget: 1.5\n"),
        "--budget 1.5: give the fraction of the exhaustive grid",
    ),
    Case("set-augment-text", _plain(*RUN, "--method", "scratch", "--set", "train.augment=maybe"), "augment"),
    Case("set-bn-unknown", _plain(*RUN, "--method", "finetune", "--set", "train.bn=fixed"), "bn='fixed'"),
    Case(
        "set-prefix-cache-negative",
        _plain(*RUN, "--method", "scratch", "--set", "train.prefix_cache_mb=-1"),
        "prefix_cache_mb",
    ),
    Case(
        "set-precision-unknown",
        _plain(*RUN, "--method", "scratch", "--set", "train.precision=64"),
        "precision",
    ),
    # the memory budget of image folders (a larger folder streams from disk)
    Case(
        "set-memory-mb-zero", _plain(*RUN, "--method", "scratch", "--set", "data.memory_mb=0"), "memory_mb=0"
    ),
    Case(
        "set-memory-mb-negative",
        _plain(*RUN, "--method", "scratch", "--set", "data.memory_mb=-1"),
        "memory_mb=-1",
    ),
    Case(
        "set-memory-mb-text",
        _plain("compare", "--methods", "scratch", "--set", "data.memory_mb=lots", "--quiet"),
        "memory_mb='lots'",
    ),
    Case(
        "streamed-folder-jpeg-cut-past-its-header",
        lambda tmp, saved: _streamed_folder_with_cut_jpeg(tmp),
        "cut.jpg is not a readable image",
    ),
]


def _bench_setting(
    tmp: Path, extra: str, common: str = "methods: [scratch]\nepochs: 1\nshots: 2\n"
) -> list[str]:
    """``bench`` over a one-setting suite in ``tmp`` whose YAML holds ``common`` and ``extra``."""
    suite = tmp / "suites" / "tiny"
    suite.mkdir(parents=True)
    (suite / "one.yaml").write_text(common + extra)
    return ["bench", "tiny/one", "--suites", str(tmp / "suites"), "--out", str(tmp / "bench"), "--quiet"]


def _streamed_folder_with_cut_jpeg(tmp: Path) -> list[str]:
    """A streamed folder (a tiny memory budget) holding a JPEG whose header is whole but whose pixels
    stop half way: it loads, and fails when a batch (in a DataLoader worker) reads it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((32, 32), 40).convert("RGB").save(buf, "JPEG")
    jpeg = buf.getvalue()
    scan = jpeg.index(b"\xff\xda")  # start of scan: the header ends here
    cut = jpeg[: scan + (len(jpeg) - scan) // 2]
    return [*_data_folder(tmp, "cut.jpg", lambda png: cut), "--set", "data.memory_mb=1e-6"]


# ---- the source torchvision:ARCH and --source-weights ----------------------------------------------------


def _tv_file(name: str, make: Callable[[], object] | bytes) -> Callable[[Path], str]:
    """Writes ``tmp/name`` (``make()`` saved with torch.save, or raw bytes) and returns its path."""

    def write(tmp: Path) -> str:
        import torch

        if isinstance(make, bytes):
            (tmp / name).write_bytes(make)
        else:
            torch.save(make(), tmp / name)
        return str(tmp / name)

    return write


def _tv_run(
    arch: str, weights: Callable[[Path], str] | None, *extra: str
) -> Callable[[Path, Path], list[str]]:
    """``run`` (finetune) from ``--source torchvision:ARCH`` with the weights file ``weights`` writes."""

    def argv(tmp: Path, saved: Path) -> list[str]:
        files = ["--source-weights", weights(tmp)] if weights is not None else []
        return [*RUN, "--method", "finetune", "--source", f"torchvision:{arch}", *files, *extra]

    return argv


def _tv_partial(**shapes: tuple[int, ...]) -> Callable[[], object]:
    """A small state_dict of zero tensors named as torchvision names them (``__`` for ``.``)."""

    def make() -> object:
        import torch

        return {k.replace("__", "."): torch.zeros(v) for k, v in shapes.items()}

    return make


def _tensors_list() -> object:
    import torch

    return [torch.zeros(2)]


def _module() -> object:
    import torch

    return torch.nn.Linear(2, 2)


def _with_weights(*argv: str) -> Callable[[Path, Path], list[str]]:
    """``argv`` (the word SAVED standing for the saved lenet source) plus ``--source-weights`` naming a
    small file written in the scratch folder."""
    weights = _tv_file("w.pth", _tv_partial(conv1__weight=(64, 3, 7, 7), fc__weight=(10, 512)))
    return lambda tmp, saved: [
        *(str(saved) if a == "SAVED" else a for a in argv),
        "--source-weights",
        weights(tmp),
    ]


_R18_STEM = {"conv1__weight": (64, 3, 7, 7), "fc__weight": (10, 512)}

CASES += [
    Case(
        "torchvision-unknown-arch",
        _tv_run("resnet19", _tv_file("w.pth", _tv_partial(**_R18_STEM))),
        "unknown torchvision arch 'resnet19' in torchvision:resnet19; known: resnet18",
    ),
    Case(
        "torchvision-without-weights",
        _tv_run("resnet18", None),
        "needs its weights file: give --source-weights",
    ),
    Case(
        "torchvision-pretrain-without-weights",
        _plain("pretrain", "--source", "torchvision:mobilenet_v2"),
        "PATH",
    ),
    Case(
        "torchvision-weights-missing",
        _tv_run("resnet18", lambda tmp: str(tmp / "nope.pth")),
        "does not exist",
    ),
    Case("torchvision-weights-folder", _tv_run("resnet18", lambda tmp: str(tmp)), "is a folder, not a file"),
    Case(
        "torchvision-weights-other-format",
        _tv_run("resnet18", _tv_file("w.npz", b"PK")),
        "neither .pth/.pt (torch.save) nor .safetensors",
    ),
    Case(
        "torchvision-weights-damaged",
        _tv_run("resnet18", _tv_file("w.pth", b"hello" * 20)),
        "is damaged or not a torch file",
    ),
    Case(
        "torchvision-weights-damaged-safetensors",
        _tv_run("resnet18", _tv_file("w.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}")),
        "not a readable safetensors file",
    ),
    Case(
        "torchvision-weights-need-unpickling-code",
        _tv_run("resnet18", _tv_file("w.pth", _module)),
        "loading it would run pickled code (it needs torch.nn.modules.linear.Linear)",
    ),
    Case(
        "torchvision-weights-not-a-state-dict",
        _tv_run("resnet18", _tv_file("w.pth", _tensors_list)),
        "holds no state_dict (found list)",
    ),
    Case(
        "torchvision-weights-of-another-arch",
        _tv_run("resnet18", _tv_file("w.pth", _tv_partial(features__0__0__weight=(32, 3, 3, 3)))),
        "it lacks the task layer fc.weight",
    ),
    Case(
        "torchvision-weights-wrong-shape",
        _tv_run(
            "resnet18", _tv_file("w.pth", _tv_partial(conv1__weight=(64, 3, 5, 5), fc__weight=(10, 512)))
        ),
        "conv1.weight has shape [64, 3, 5, 5], but torchvision's resnet18 needs [64, 3, 7, 7]",
    ),
    Case(
        "torchvision-weights-unknown-tensor",
        _tv_run("resnet18", _tv_file("w.pth", _tv_partial(**_R18_STEM, layer5__0__conv1__weight=(1,)))),
        "has a tensor 'layer5.0.conv1.weight' that torchvision's resnet18 does not have",
    ),
    Case(
        "torchvision-weights-missing-tensor",
        _tv_run("resnet18", _tv_file("w.pth", _tv_partial(**_R18_STEM))),
        "lacks bn1.weight, which torchvision's resnet18 has",
    ),
    Case(
        "torchvision-source-for-another-arch",
        _tv_run("resnet18", _tv_file("w.pth", _tv_partial(**_R18_STEM)), "--arch", "lenet"),
        "the source torchvision:resnet18 is a resnet18, but --arch is lenet",
    ),
    Case(
        "torchvision-no-shipped-weights",
        _plain(*RUN, "--method", "finetune", "--source", "imagenet", "--arch", "resnet18"),
        "--source torchvision:resnet18 --source-weights PATH",
    ),
    # --source-weights with a source that is not torchvision:ARCH (refused before anything loads or trains)
    Case(
        "source-weights-with-a-task-spec",
        _with_weights(*RUN, "--method", "scratch", "--source", "fashion[0-4]"),
        "--source-weights goes with --source torchvision:ARCH, not with --source fashion[0-4]",
    ),
    Case(
        "source-weights-with-imagenet",
        _with_weights("pretrain", "--source", "imagenet"),
        "not with --source imagenet",
    ),
    Case(
        "source-weights-with-a-saved-model",
        _with_weights(*RUN, "--method", "finetune", "--source", "SAVED"),
        "--source-weights goes with --source torchvision:ARCH",
    ),
    Case(
        "compare-source-weights-with-a-task-spec",
        _with_weights("compare", "--methods", "finetune", "--quiet"),
        "not with --source fashion[0-4]",
    ),
    # ---- auto: candidates, budget, race settings (refused before anything trains on the target) ----
    Case("auto-no-sources", _plain(*AUTO), "give the candidate sources with --sources"),
    Case("auto-unknown-source", _plain(*AUTO, "--sources", "nosuch"), "cannot read the candidate source"),
    Case("auto-unknown-arch", _plain(*AUTO, "--sources", "lenet9@fashion[0-4]"), "unknown architecture"),
    Case("auto-unknown-source-task", _plain(*AUTO, "--sources", "lenet@nosuchtask"), "nosuchtask"),
    Case("auto-source-path-missing", _plain(*AUTO, "--sources", "./nope"), "no saved model there"),
    Case(
        "auto-torchvision-without-weights", _plain(*AUTO, "--sources", "torchvision:resnet18"), "weights file"
    ),
    Case(
        "auto-source-does-not-fit-the-target",
        lambda tmp, saved: [*AUTO, "--sources", str(saved), "--image-size", "64"],
        "does not fit the target",
    ),
    Case("auto-source-twice", lambda tmp, saved: [*AUTO, "--sources", f"{saved},{saved}"], "more than once"),
    Case(
        "auto-budget-zero", lambda tmp, saved: [*AUTO, "--sources", str(saved), "--budget", "0"], "--budget 0"
    ),
    Case(
        "auto-budget-above-one",
        lambda tmp, saved: [*AUTO, "--sources", str(saved), "--budget", "1.5"],
        "at most 1",
    ),
    Case(
        "auto-budget-too-small",
        lambda tmp, saved: [*AUTO, "--sources", str(saved), "--budget", "0.01"],
        "is too small",
    ),
    Case("auto-eta-one", lambda tmp, saved: [*AUTO, "--sources", str(saved), "--eta", "1"], "--eta 1"),
    Case(
        "auto-unknown-score",
        lambda tmp, saved: [*AUTO, "--sources", str(saved), "--score", "acc"],
        "unknown score",
    ),
    Case(
        "auto-no-method-fits-a-candidate",
        lambda tmp, saved: [*AUTO, "--sources", str(saved), "--methods", "spottune"],
        "none of the methods runs on it",
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
    # this checkout's paramtransfer, whatever the current folder or an installed copy
    env = {**os.environ, "PYTHONPATH": child_pythonpath()}
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
    if "--out" not in argv and argv[0] in ("run", "compare", "demo", "pretrain", "auto"):
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
        assert "out/result.json" in before or not (scratch / "out" / "result.json").exists()
    after = _snapshot(scratch)
    assert {k: after.get(k) for k in before} == before, "a file that existed before the command changed"


def test_the_table_holds_at_least_forty_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES)
    assert len(CASES) >= 40
