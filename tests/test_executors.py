"""Executors: the same sweep on local Ray as in-process, dead workers retried, killed sweeps completed.

* ``make_executor``: names, the ``--address`` misuse, unknown names;
* a 4-run comparison (2 learning rates x 2 seeds) on a local Ray with 2 CPUs gives the same runs, the
  same selected learning rate and the same test accuracies as the local executor, and re-running it
  trains nothing;
* a job whose worker process dies (``os._exit``) is retried by Ray and its result comes back; a job that
  raises stops the sweep with its message;
* a ``paramtransfer compare`` killed with SIGKILL after its first finished run leaves only complete
  ``result.json`` files; the same command then completes the sweep, with the uninterrupted results;
* a model set built on Ray equals the in-process one;
* an address where no Ray answers (``HOST:PORT`` or ``ray://``) ends in seconds with one error line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paramtransfer.errors import UserError
from paramtransfer.experiments.compare import CompareConfig, compare
from paramtransfer.experiments.executors import LocalExecutor, make_executor
from paramtransfer.models.store import WEIGHTS
from paramtransfer.selection.modelset import build_modelset

SWEEP = dict(
    arch="lenet",
    source="digits[0-4]",
    target="digits[5-9]",
    shots=5,
    methods=["scratch"],
    lrs=[0.05, 0.01],
    seeds=[0, 1],
    epochs=2,
)


def _runs(summary: dict) -> dict[tuple, tuple]:
    return {
        (r["method"], r["config"]["lr"], r["seed"]): (r["val_accuracy"], r["test_accuracy"])
        for r in summary["runs"]
    }


# ---- no Ray needed -----------------------------------------------------------------------------------


def test_local_executor_runs_in_order() -> None:
    assert list(LocalExecutor().map(lambda j: j * j, [3, 1, 2])) == [(0, 9), (1, 1), (2, 4)]


def test_make_executor_names_and_errors() -> None:
    assert make_executor("local").name == "local" and make_executor(None).name == "local"
    ex = LocalExecutor()
    assert make_executor(ex) is ex
    with pytest.raises(UserError, match="unknown executor 'dask'; use one of local, ray"):
        make_executor("dask")
    with pytest.raises(UserError, match="--address is the address of a Ray cluster"):
        make_executor("local", address="auto")


def _compare_cmd(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "paramtransfer",
        "compare",
        "--arch",
        "lenet",
        "--source",
        "digits[0-4]",
        "--target",
        "digits[5-9]",
        "--shots",
        "5",
        "--methods",
        "scratch",
        "--lr",
        "0.05,0.01",
        "--seeds",
        "0,1",
        "--epochs",
        "2",
        "--quiet",
        "--out",
        str(out),
    ]


def _results(out: Path) -> list[Path]:
    return sorted(out.glob("runs/**/result.json"))


@pytest.mark.slow
def test_a_killed_compare_leaves_whole_files_and_the_rerun_completes_it(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_compare_cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _results(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = _results(out)
    assert 1 <= len(finished) < 4, "the kill should land after the first run and before the last"
    for path in finished:  # never half-written: every result that exists parses and is complete
        assert json.loads(path.read_text())["status"] == "ok"
    assert not (out / "results.json").exists()

    subprocess.run(_compare_cmd(out), env=env, check=True, capture_output=True)
    resumed = json.loads((out / "results.json").read_text())
    assert len(resumed["runs"]) == 4 and len(_results(out)) == 4
    assert not list(out.glob("**/*.tmp"))
    torch.set_num_threads(1)  # the subprocesses ran with one thread: compare like with like
    try:
        clean = compare(CompareConfig(**SWEEP), tmp_path / "clean", progress=False)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    assert _runs(resumed) == _runs(clean)


# ---- on a local Ray ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_executor():
    pytest.importorskip("ray")
    old = os.environ.get("PYTHONPATH")
    # the workers import this module's job functions (_die_once, _fail) by name
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), old) if p)
    try:
        ex = make_executor("ray", num_cpus=2)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    yield ex
    ex.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_an_unreachable_ray_address_fails_fast_in_one_line(address: str, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PARAMTRANSFER_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "paramtransfer", "compare", "--executor", "ray", "--address", address]
    t0 = time.monotonic()
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - t0 < 30
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr  # none of Ray's own log lines
    assert lines[0].startswith("paramtransfer: error: ") and address in lines[0], proc.stderr
    assert "paramtransfer[ray]" in lines[0] or "ray start --head" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def _die_once(job: dict) -> int:
    """Kill the worker process on the first attempt (a marker file remembers it), then succeed."""
    marker = Path(job["marker"])
    if not marker.exists():
        marker.write_text("died")
        os._exit(1)
    return job["value"] * 10


def _fail(job: int) -> int:
    if job == 2:
        raise UserError("job 2 is broken")
    return job


@pytest.mark.slow
def test_ray_sweep_equals_the_local_sweep(ray_executor, tmp_path: Path) -> None:
    torch.set_num_threads(1)  # Ray runs each task with one thread (num_cpus=1)
    try:
        local = compare(CompareConfig(**SWEEP), tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    on_ray = compare(CompareConfig(**SWEEP), tmp_path / "ray", progress=False, executor=ray_executor)
    assert len(on_ray["runs"]) == 4
    assert _runs(on_ray) == _runs(local)
    assert on_ray["selected"] == local["selected"]
    assert len(_results(tmp_path / "ray")) == 4

    class Refuse:  # a re-run sends nothing to the executor: every result is complete
        name = "refuse"

        def map(self, fn, jobs):
            assert not jobs, f"{len(jobs)} runs were sent again"
            return iter(())

    again = compare(CompareConfig(**SWEEP), tmp_path / "ray", progress=False, executor=Refuse())
    assert _runs(again) == _runs(on_ray)


@pytest.mark.slow
def test_ray_retries_a_job_whose_worker_died(ray_executor, tmp_path: Path) -> None:
    jobs = [{"marker": str(tmp_path / f"m{i}"), "value": i} for i in range(3)]
    results = dict(ray_executor.map(_die_once, jobs))
    assert results == {0: 0, 1: 10, 2: 20}
    assert all((tmp_path / f"m{i}").read_text() == "died" for i in range(3))


@pytest.mark.slow
def test_ray_job_errors_stop_the_sweep_with_their_message(ray_executor) -> None:
    with pytest.raises(UserError, match="job 2 is broken"):
        list(ray_executor.map(_fail, [0, 1, 2, 3]))


@pytest.mark.slow
def test_a_model_set_built_on_ray_equals_the_local_one(ray_executor, tmp_path: Path) -> None:
    settings = dict(
        models_per_task=2, max_tasks=2, epochs=1, arch_kwargs={"width": 2, "hidden": 8}, progress=False
    )
    torch.set_num_threads(1)
    try:
        local = build_modelset("digits", tmp_path / "local", **settings)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    on_ray = build_modelset("digits", tmp_path / "ray", executor=ray_executor, **settings)

    def key(entries):
        return [(e["task"], e["seed"], e["val_accuracy"], e["test_accuracy"]) for e in entries]

    assert key(on_ray) == key(local) and len(on_ray) == 4
    for e in on_ray:
        assert (tmp_path / "ray" / e["path"] / WEIGHTS).is_file()
