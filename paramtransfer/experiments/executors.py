"""Where independent runs execute: in this process (the default) or as Ray tasks.

A sweep (methods x learning rates x seeds, a model set's models, a benchmark's settings) is a list of
*jobs*: plain, picklable arguments of one module-level function. An executor maps that function over
the jobs and yields ``(index, result)`` pairs as they finish (in completion order for Ray), so callers
write every result to disk the moment it exists. Callers keep the bookkeeping that makes a re-run
cheap (skipping jobs whose results are complete) and the files atomic; an executor only runs things.

``RayExecutor`` sends each job to Ray as one task (``num_cpus`` each). A task whose worker process dies
(killed, out of memory, a crashed node) is retried by Ray up to ``max_retries`` times; an exception
raised by the job itself is not retried, it stops the sweep with the job's message. Workers must see
the same files as the driver (one machine, or a shared filesystem for ``--address``), because jobs
read the data and write their checkpoints and results under the output directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from paramtransfer.errors import UserError

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Run ``fn(job)`` for every job; yield ``(index into jobs, result)`` as each finishes."""
        ...


class LocalExecutor:
    """In this process, one job after another, in order. Needs nothing beyond the package."""

    name = "local"

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for i, job in enumerate(jobs):
            yield i, fn(job)


class RayExecutor:
    """Each job is one Ray task; results stream back in the order they finish.

    Args:
        address: an existing cluster (``ray.init(address=...)``, e.g. ``auto`` or ``ray://host:10001``);
            ``None`` starts a local Ray on this machine (with ``num_cpus`` CPUs, default all).
        num_cpus: CPUs of the local Ray (ignored with ``address``).
        cpus_per_job: CPUs each task reserves; Ray sets ``OMP_NUM_THREADS`` to it in the worker, so
            torch uses that many threads per run.
        max_retries: retries of a task whose worker died (Ray's system-failure retries).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        cpus_per_job: float = 1,
        max_retries: int = 3,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise UserError(
                "--executor ray needs Ray: pip install 'paramtransfer[ray]' (or pip install ray)"
            ) from None
        self._ray = ray
        self.address = address
        self.cpus_per_job = cpus_per_job
        self.max_retries = max_retries
        target = _parse_address(address) if address is not None else None
        if not ray.is_initialized():
            if target is not None:
                _check_reachable(address, *target)
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,  # a job's failure comes back as its exception, not as log lines
                "logging_level": logging.ERROR,  # no "Started a local Ray instance" and the like
            }
            if address is None:
                kwargs["num_cpus"] = num_cpus
                # workers import paramtransfer from wherever the driver does (a source checkout, too)
                kwargs["runtime_env"] = {"env_vars": _worker_env()}
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, ValueError, RuntimeError, TimeoutError) as err:
                first = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
                if address is None:
                    raise UserError(
                        f"cannot start a local Ray: {first}; check `ray status` or run without --executor ray"
                    ) from None
                raise UserError(
                    f"cannot reach Ray at {address}: {first}; start a cluster there (`ray start --head`), "
                    "fix --address, or drop --address to run a local Ray"
                ) from None

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        ray = self._ray
        if not jobs:
            return
        remote = ray.remote(num_cpus=self.cpus_per_job, max_retries=self.max_retries)(fn)
        pending = {remote.remote(job): i for i, job in enumerate(jobs)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                i = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    cause = err.cause if getattr(err, "cause", None) is not None else err
                    if isinstance(cause, UserError):
                        raise UserError(str(cause)) from None
                    raise cause from None
                except ray.exceptions.WorkerCrashedError:
                    raise UserError(
                        f"job {i} lost its worker {self.max_retries + 1} times (out of memory?); "
                        "re-run the same command to continue"
                    ) from None
                yield i, result
        finally:
            for ref in pending:  # stop what is left when the caller stops early (an error, Ctrl-C)
                ray.cancel(ref, force=True)

    def shutdown(self) -> None:
        if self.address is None and self._ray.is_initialized():
            self._ray.shutdown()


# How long the reachability check of --address waits for a TCP connection; Ray itself retries an address
# nobody answers on for minutes, printing a warning every few seconds.
CONNECT_TIMEOUT_S = 5.0


def _parse_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``--address`` (``None`` for ``auto``, which Ray resolves and fails fast on);
    a :class:`UserError` for an address Ray cannot use, e.g. ``ray://`` without Ray Client installed."""
    if address == "auto":
        return None
    client = address.startswith("ray://")
    if client and importlib.util.find_spec("grpc") is None:
        raise UserError(
            f"--address {address} connects through Ray Client, which needs ray[client] (grpcio); "
            "pip install 'paramtransfer[ray]'"
        )
    rest = address[len("ray://") :] if client else address
    try:
        parts = urllib.parse.urlsplit("//" + rest)
        host, port = parts.hostname, parts.port or (10001 if client else 6379)
    except ValueError:
        host = None
    if not host or "/" in rest:
        raise UserError(f"cannot read --address {address}; write HOST:PORT, ray://HOST:PORT or auto")
    return host, port


def _check_reachable(address: str, host: str, port: int) -> None:
    """Fail fast, in one line, where nothing accepts a TCP connection at ``host:port`` (Ray itself would
    retry for minutes, printing warnings)."""
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        if isinstance(err, TimeoutError):
            reason = f"no answer within {CONNECT_TIMEOUT_S:g} s"
        else:
            reason = (err.strerror or type(err).__name__).lower()
        raise UserError(
            f"cannot reach Ray at {address} ({reason}); start a cluster "
            "there (`ray start --head`), fix --address, or drop --address to run a local Ray"
        ) from None


def child_pythonpath() -> str:
    """``PYTHONPATH`` for other Python processes (Ray workers, measuring children): the package's own root
    first, so that they import this paramtransfer (a source checkout, too), then the driver's entries."""
    # this file is <root>/paramtransfer/experiments/executors.py (importing paramtransfer here would be
    # an import of the whole package from one of its parts)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return os.pathsep.join(dict.fromkeys(paths))


def _worker_env() -> dict[str, str]:
    """Environment of local Ray workers: :func:`child_pythonpath` and the paramtransfer settings (data and
    source-cache locations)."""
    env = {"PYTHONPATH": child_pythonpath()}
    env.update({k: v for k, v in os.environ.items() if k.startswith("PARAMTRANSFER_")})
    return env


def make_executor(
    name: str | Executor | None = "local", address: str | None = None, **ray_options: Any
) -> Executor:
    """An executor by name (``local`` or ``ray``), or ``name`` itself if it already is one.

    ``address`` only applies to Ray; ``ray_options`` are :class:`RayExecutor`'s keyword arguments.
    """
    if name is None or name == "local":
        if address is not None:
            raise UserError("--address is the address of a Ray cluster; use it with --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, **ray_options)
    if hasattr(name, "map"):
        return name  # type: ignore[return-value]
    raise UserError(f"unknown executor {name!r}; use one of {', '.join(EXECUTORS)}")
