"""The source store and run folders against damaged files, absurd settings, ambiguous names and a second
process.

* saved models carry the sha256 of their weights; a changed, truncated or mismatched file, or a broken
  ``meta.json``, is one :class:`UserError` line naming the file and the cure (old files without the hash
  load);
* architecture options are checked before anything is allocated (unknown names, wrong types, a parameter
  count above ``MAX_PARAMS``);
* ``--source``: a task spec always means the task, a saved model is written as a path;
* the same comparison started twice into one ``--out`` (two real processes) ends with whole files equal to
  those of a single run; a source pretrained by both is trained once, under a lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import paramtransfer as pt
from paramtransfer.cli import main
from paramtransfer.cli.run import _effective_arch
from paramtransfer.errors import UserError
from paramtransfer.experiments import pretrain as pretrain_module
from paramtransfer.experiments.pretrain import resolve_source
from paramtransfer.models import store
from paramtransfer.models.store import HASH_KEY, META, WEIGHTS, is_model_path, saved_arch
from paramtransfer.models.zoo import MAX_PARAMS, build_model
from paramtransfer.train import checkpoint

CLI = [sys.executable, "-m", "paramtransfer.cli"]


@pytest.fixture
def saved(tmp_path: Path, tiny_source) -> Path:
    return pt.save_model(tiny_source, tmp_path / "saved")


def _meta(d: Path) -> dict:
    return json.loads((d / META).read_text())


def _write_meta(d: Path, meta: dict) -> None:
    (d / META).write_text(json.dumps(meta))


def _one_line_error(path: Path) -> str:
    with pytest.raises(UserError) as err:
        pt.load_model(path)
    message = str(err.value)
    assert "\n" not in message
    return message


# ---- cache integrity --------------------------------------------------------------------------------


def test_save_records_the_weights_sha256_and_load_checks_it(saved: Path) -> None:
    meta = _meta(saved)
    assert meta[HASH_KEY] == hashlib.sha256((saved / WEIGHTS).read_bytes()).hexdigest()
    pt.load_model(saved)
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor: still a valid safetensors file
    (saved / WEIGHTS).write_bytes(bytes(data))
    message = _one_line_error(saved)
    assert str(saved / WEIGHTS) in message and "sha256" in message and "re-save it" in message


def test_a_meta_json_without_the_hash_still_loads(saved: Path, tiny_source) -> None:
    meta = _meta(saved)
    del meta[HASH_KEY]  # as written before the hash existed
    _write_meta(saved, meta)
    loaded = pt.load_model(saved)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny_source.state_dict().values())
    )


def _truncate(d: Path) -> None:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])


def _drop_hash(d: Path) -> None:
    meta = _meta(d)
    meta.pop(HASH_KEY)
    _write_meta(d, meta)


def _set(d: Path, **changes) -> None:
    _write_meta(d, {**_meta(d), **changes})


def _set_kwargs(d: Path, **changes) -> None:
    meta = _meta(d)
    _write_meta(d, {**meta, "arch_kwargs": {**meta["arch_kwargs"], **changes}})


BROKEN = {
    "truncated-weights": (lambda d: _truncate(d), WEIGHTS, "sha256"),
    "truncated-weights-old-meta": (
        lambda d: (_drop_hash(d), _truncate(d)),
        WEIGHTS,
        "not a readable safetensors",
    ),
    "garbage-weights": (
        lambda d: (_drop_hash(d), (d / WEIGHTS).write_bytes(b"\x00" * 7)),
        WEIGHTS,
        "safetensors",
    ),
    "garbage-meta": (lambda d: (d / META).write_text("{not json"), META, "not valid JSON"),
    "binary-meta": (lambda d: (d / META).write_bytes(b"\xff\xfe\x00"), META, META),
    "meta-not-an-object": (lambda d: (d / META).write_text("[1, 2]"), META, "JSON object"),
    "meta-missing-keys": (
        lambda d: _write_meta(d, {"arch": "lenet"}),
        META,
        "num_classes, in_shape, arch_kwargs",
    ),
    "meta-unknown-arch": (lambda d: _set(d, arch="vgg99"), META, "vgg99"),
    "meta-bad-in-shape": (lambda d: _set(d, in_shape=[1, -28, 28]), META, "in_shape"),
    "meta-huge-in-shape": (lambda d: _set(d, in_shape=[3, 100000, 100000]), META, "in_shape"),
    "meta-bad-num-classes": (lambda d: _set(d, num_classes="five"), META, "num_classes"),
    "meta-bad-hash": (lambda d: _set(d, **{HASH_KEY: "abc"}), META, HASH_KEY),
    "absurd-hidden": (lambda d: _set_kwargs(d, hidden=20_000_000), META, "parameters"),
    "float-hidden": (lambda d: _set_kwargs(d, hidden=2e7), META, "positive integer"),
    "negative-width": (lambda d: _set_kwargs(d, width=-4), META, "positive integer"),
    "unknown-arch-kwarg": (lambda d: _set_kwargs(d, depth=38), META, "'depth'"),
    "resnet-depth": (lambda d: _set(d, arch="resnet20", arch_kwargs={"depth": 21}), META, "6n+2"),
    # the hash matches, the architecture does not: other sizes, other names
    "wrong-shapes": (lambda d: _set_kwargs(d, hidden=32), WEIGHTS, "shape"),
    "wrong-keys": (lambda d: _set(d, arch="mobilenet", arch_kwargs={"width": 4}), WEIGHTS, "missing tensors"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_saved_model_is_one_line_naming_the_file_and_the_cure(saved: Path, name: str) -> None:
    damage, file, needle = BROKEN[name]
    damage(saved)
    t0 = time.perf_counter()
    message = _one_line_error(saved)
    assert time.perf_counter() - t0 < 5, "refused only after building something large"
    assert str(saved / file) in message, message
    assert needle in message, message
    assert "re-save it" in message, message


def test_arch_options_are_checked_before_anything_is_allocated() -> None:
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"would have 2(\.\d+)?e\+14 parameters, above the limit"):
        build_model("lenet", 5, hidden=20_000_000)  # 80 GB of weights if it were built
    with pytest.raises(UserError, match="parameters"):
        build_model("resnet20", 5, width=4096)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(UserError, match=r"lenet has no option 'depth' \(its options: width, hidden\)"):
        build_model("lenet", 5, depth=38)
    for bad in ({"hidden": 2e7}, {"width": 0}, {"width": True}, {"hidden": "64"}):
        with pytest.raises(UserError, match="must be a positive integer"):
            build_model("lenet", 5, **bad)
    with pytest.raises(UserError, match="must be a string"):
        build_model("rnn", 5, cell=1)
    with pytest.raises(UserError, match="16x16"):
        build_model("lenet", 5, in_shape=(1, 8, 8))
    assert MAX_PARAMS >= 10 * sum(p.numel() for p in build_model("resnet20", 10, width=64).parameters())


def test_lenet_flat_size_is_computed_not_run() -> None:
    for shape in [(1, 28, 28), (3, 32, 32), (1, 16, 16), (2, 17, 23)]:
        net = build_model("lenet", 3, in_shape=shape, width=4, hidden=16)
        assert net(torch.zeros(2, *shape)).shape == (2, 3)


def test_a_corrupt_cached_source_names_the_exact_force_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PARAMTRANSFER_HOME", str(tmp_path))
    settings = dict(epochs=1, seed=0, limit=60)
    first = pt.pretrain("lenet", "digits[0-4]", **settings)
    (d,) = (tmp_path / "sources").iterdir()
    _truncate(d)
    flags = "--source-epochs 1 --source-limit 60 --force"
    command = f"paramtransfer pretrain --arch lenet --source 'digits[0-4]' {flags}"
    with pytest.raises(UserError) as err:
        pt.pretrain("lenet", "digits[0-4]", **settings)
    message = str(err.value)
    assert str(d / WEIGHTS) in message and f"`{command}`" in message and "\n" not in message
    # the same cure when the cached folder is given as a path
    assert f"`{command}`" in _one_line_error(d)
    # and the cure works
    assert main(command.replace("'", "").split()[1:]) == 0
    again = pt.pretrain("lenet", "digits[0-4]", **settings)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), first.state_dict().values()))


def test_temporary_files_are_unique_per_writer(tmp_path: Path, monkeypatch) -> None:
    names = []
    real = os.replace

    def spy(src, dst):
        names.append(Path(src).name)
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", spy)
    for _ in range(2):
        checkpoint.save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})
    assert len(set(names)) == 2 and ".checkpoint.pt.tmp" not in names
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint.pt") == {"epoch": 1}
    (tmp_path / ".checkpoint.pt.x1.tmp").write_bytes(b"left by a killed writer")
    checkpoint.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# ---- --source: task spec or path --------------------------------------------------------------------


def test_which_source_strings_are_paths() -> None:
    for spec in ("fashion", "fashion[0-4]", "digits[0,3]", "folder:/data/x", "npz:./a.npz", "mymodel"):
        assert not is_model_path(spec), spec
    for path in ("./fashion", "../m", "~/m", "/abs/m", "runs/ms/models/a", "m.safetensors", ".hidden"):
        assert is_model_path(path), path


def test_a_task_spec_is_never_taken_over_by_a_folder_of_that_name(
    tmp_path: Path, monkeypatch, tiny_resnet_source
) -> None:
    monkeypatch.chdir(tmp_path)
    pt.save_model(tiny_resnet_source, tmp_path / "fashion")
    pretrained = []
    monkeypatch.setattr(
        pretrain_module, "pretrain", lambda arch, spec, **kw: pretrained.append((arch, spec)) or "task"
    )
    assert saved_arch("fashion") is None and _effective_arch("fashion", None) == "lenet"
    assert resolve_source("fashion", "lenet") == "task" and pretrained == [("lenet", "fashion")]
    assert saved_arch("./fashion") == "resnet20" and _effective_arch("./fashion", None) == "resnet20"
    assert resolve_source("./fashion", None).arch == "resnet20"
    # a bare name that is no task spec: the error says how to write the folder
    pt.save_model(tiny_resnet_source, tmp_path / "mymodel")
    with pytest.raises(UserError, match=r"unknown task spec 'mymodel'.*write \./mymodel"):
        resolve_source("mymodel", "resnet20")


def test_a_missing_source_path_and_an_unknown_spec_say_which_they_are(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^no saved model at \./nope \(expected model\.safetensors"):
        resolve_source("./nope", "lenet")
    with pytest.raises(UserError, match=r"^no saved model at .*nope\.safetensors"):
        resolve_source(str(tmp_path / "nope.safetensors"), None)
    with pytest.raises(UserError, match=r"^unknown task spec 'nosuchspec'"):
        resolve_source("nosuchspec", "lenet")
    with pytest.raises(UserError, match=r"pretrain trains on a task spec, and \./nope is a path"):
        pt.pretrain("lenet", "./nope")


# ---- two processes, one --out -----------------------------------------------------------------------

TWICE = [
    "compare",
    "--methods",
    "scratch,finetune",
    "--lr",
    "0.1",
    "--seeds",
    "0",
    "--target",
    "fashion[5-9]",
    "--shots",
    "2",
    "--epochs",
    "2",
    "--set",
    "data.test_limit=50",
    "--source-epochs",
    "1",
    "--source-limit",
    "200",
]


def _comparable(run: dict) -> dict:
    out = {k: v for k, v in run.items() if k != "wall_time_s"}
    out["history"] = [{k: v for k, v in r.items() if k != "time_s"} for r in run["history"]]
    return out


def test_the_same_compare_started_twice_into_one_out_ends_as_one_run(tmp_path: Path, monkeypatch) -> None:
    home, out = tmp_path / "home", tmp_path / "out"
    env = {**os.environ, "PARAMTRANSFER_HOME": str(home), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [*CLI, *TWICE, "--out", str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert "Traceback" not in err, err
    assert len(list((home / "sources").iterdir())) == 1  # the source was cached once, whole
    pt.load_model(next((home / "sources").iterdir()))

    # the reference: one run, same source cache, same thread count
    monkeypatch.setenv("PARAMTRANSFER_HOME", str(home))
    torch.set_num_threads(1)
    try:
        assert main([*TWICE, "--quiet", "--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(2)

    results = sorted(out.glob("runs/**/result.json"))
    single = sorted((tmp_path / "single").glob("runs/**/result.json"))
    assert [p.relative_to(out) for p in results] == [p.relative_to(tmp_path / "single") for p in single]
    assert len(results) == 2
    for mine, ref in zip(results, single):
        assert _comparable(json.loads(mine.read_text())) == _comparable(json.loads(ref.read_text()))
    summary = json.loads((out / "results.json").read_text())
    reference = json.loads((tmp_path / "single" / "results.json").read_text())
    assert [_comparable(r) for r in summary["runs"]] == [_comparable(r) for r in reference["runs"]]
    assert summary["selected"] == reference["selected"]
    assert not list(out.glob("**/*.tmp")) and not list(out.glob("**/checkpoint.pt"))


def _in_thread(fn) -> tuple[threading.Thread, list]:
    box: list = []
    thread = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    thread.start()
    return thread, box


def test_a_run_held_by_another_process_is_waited_for_then_reused(tmp_path: Path, tiny_task) -> None:
    from filelock import FileLock

    from paramtransfer.experiments.run import LOCK, RESULT, train_model

    def job(out: Path):
        return lambda: train_model(
            "scratch", source=None, target=tiny_task, arch="lenet", lr=0.1, epochs=1, out=out
        )

    done, _ = job(tmp_path / "elsewhere")()
    out = tmp_path / "run"
    out.mkdir()
    other = FileLock(str(out / LOCK))  # another holder: flock locks of two open files exclude each other
    other.acquire()
    thread, box = _in_thread(job(out))
    thread.join(timeout=3)
    assert thread.is_alive(), "the run did not wait for the lock"
    assert not (out / RESULT).exists() and not list(out.glob("*checkpoint*"))
    shutil.copy(tmp_path / "elsewhere" / RESULT, out / RESULT)  # the holder finishes the run
    other.release()
    thread.join(timeout=60)
    result, model = box[0]
    assert model is None and result.wall_time_s == done.wall_time_s  # reused, not trained again


def test_a_source_being_pretrained_by_another_process_is_waited_for(tmp_path: Path) -> None:
    from filelock import FileLock

    settings = dict(epochs=1, seed=0, limit=60, cache=tmp_path)
    key = store.source_key("lenet", "digits[0-4]", **store.source_settings("digits[0-4]", 1, 0, 60))
    other = FileLock(str(tmp_path / "locks" / f"{key}.lock"))
    (tmp_path / "locks").mkdir()
    other.acquire()
    thread, box = _in_thread(lambda: pt.pretrain("lenet", "digits[0-4]", **settings))
    thread.join(timeout=3)
    assert thread.is_alive() and not (tmp_path / "sources").exists(), "pretraining did not wait for the lock"
    other.release()
    thread.join(timeout=120)
    assert box and box[0].source_info["source"] == "digits[0-4]"
    assert [p.name for p in (tmp_path / "sources").iterdir()] == [key]
