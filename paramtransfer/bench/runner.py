"""``paramtransfer bench``: run the benchmark suites under ``benchmarks/`` and write one report.

A *suite* is a folder ``benchmarks/<suite>/`` (``ptu``, ``dtnh``, ``spottune``, ``lps``); its *settings*
are its ``*.yaml`` files (``paper.yaml``, the paper's numbers and claims, is not a setting); see
:mod:`paramtransfer.bench.suites`. A NAME is a suite,
a setting (``ptu/s1_lenet_20shots``), ``all`` (every setting of every suite) or ``speed`` (the speed
suite, :func:`paramtransfer.bench.speedsuite.run_speed_suite`; not part of ``all``, because
timings want an otherwise idle machine).

Output (``OUT``, default ``runs/bench``)::

    OUT/<suite>/<name>/results.json, table.md, config.yaml, *.png   one setting (compare's output)
    OUT/speed/results.json                                           bench speed
    OUT/bench.json                                                   where the suites' YAMLs are
    OUT/report.md, OUT/figures/*.png                                 the report (paramtransfer.bench.report)

``record=True`` also copies each setting's results.json, table.md, config.yaml and PNGs to
``benchmarks/<suite>/results/<name>/`` (as ``benchmarks/run.sh`` does), the speed results to
``benchmarks/speed/results.json``, and rebuilds ``benchmarks/report.md`` from everything recorded.

**Kinds.** A setting YAML may name its kind with a top-level ``kind:`` key (default ``compare``: the
rest of the file is a :class:`~paramtransfer.experiments.compare.CompareConfig`). A kind is a runner and
a report renderer, registered by name from its own module (``compare``: :mod:`paramtransfer.bench.compare`,
``lps``: :mod:`paramtransfer.bench.lps`, ``auto``: :mod:`paramtransfer.bench.autobench`); list that module
in ``paramtransfer.bench.suites.KIND_MODULES`` (one line) so that it is imported the first time a setting
names the kind::

    from paramtransfer.bench.suites import Section, register_kind

    def run_lps(config: dict, out: Path, executor, progress: bool) -> dict:
        ...  # do the work, write out / "results.json" (the summary) and any PNGs; return the summary

    def render_lps(summary: dict, paper: dict | None, results_dir: Path) -> Section:
        ...  # Section: markdown, figures to show, ClaimResults

    register_kind("lps", run_lps, render_lps)

The runner gets the YAML mapping without ``kind``; it must write ``out/results.json`` because the
report (and ``paramtransfer report``) rebuilds every section from that file alone. A runner should
reuse finished work, as ``compare`` does, so that an interrupted bench continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paramtransfer.bench.paper import load_paper
from paramtransfer.bench.report import BenchLayout, BenchReport, write_bench_report
from paramtransfer.bench.suites import (
    ALL,
    DEFAULT_OUT,
    MANIFEST,
    PAPER_FILE,
    RECORDED_FILES,
    SPEED,
    get_kind,
    load_setting,
    resolve_name,
    setting_kind,
    suites_root,
)
from paramtransfer.errors import UserError
from paramtransfer.train.checkpoint import atomic_write_bytes, atomic_write_json


def run_bench(
    name: str,
    *,
    out: str | Path = DEFAULT_OUT,
    suites: str | Path | None = None,
    record: bool = False,
    executor: Any = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    imagenet: bool = True,
) -> BenchReport:
    """Run NAME's settings (or the speed suite), then write ``OUT/report.md`` (see the module docstring).

    ``imagenet``: the speed suite also measures its EfficientNet-Lite0 rows (ignored by other NAMEs).

    Returns the report written to ``OUT`` (with ``record``, ``benchmarks/report.md`` is rebuilt too).
    """
    root = suites_root(suites)
    out = Path(out)
    # a bad NAME, YAML or kind fails before any work
    todo = [] if name == SPEED else [(s, n, *load_setting(root, s, n)) for s, n in resolve_name(name, root)]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MANIFEST, {"suites": str(root.resolve())})
    if name == SPEED:
        _run_speed(out, root, record=record, progress=progress, imagenet=imagenet)
    for suite, setting, kind, config in todo:
        start = time.perf_counter()
        target = out / suite / setting
        try:
            get_kind(kind).run(config, target, executor, progress)
        except UserError as err:
            raise UserError(f"{suite}/{setting}: {err}") from None
        if record:
            record_setting(target, root / suite / "results" / setting)
        if log is not None:
            log(f"{suite}/{setting}: {time.perf_counter() - start:.0f} s")
    report = write_bench_report(BenchLayout(out, root, recorded=False))
    if record:
        write_bench_report(BenchLayout(root, root, recorded=True))
    return report


# Per-channel detail that a recorded results.json leaves out (the run files under runs/ keep it): PTU's
# gate means per channel and DELTA's channel attention, thousands of floats per EfficientNet-Lite0 run,
# which no table or plot reads (the per-unit gate means stay), and DTNH's per-step angles in the history,
# which ``diagnostics.angles`` holds once more for the whole run.
UNRECORDED_DIAGNOSTICS = ("attention",)
UNRECORDED_GATES = ("r_per_channel", "z_per_channel")
UNRECORDED_HISTORY = ("dtnh_angles",)


def recorded_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` (a comparison's results.json) without the per-channel diagnostics of its runs and the
    per-step DTNH angles of their histories."""
    runs = []
    for run in summary.get("runs", []):
        diag = {k: v for k, v in (run.get("diagnostics") or {}).items() if k not in UNRECORDED_DIAGNOSTICS}
        if isinstance(diag.get("gates"), dict):
            diag["gates"] = {k: v for k, v in diag["gates"].items() if k not in UNRECORDED_GATES}
        run = {**run, "diagnostics": diag} if "diagnostics" in run else run
        if isinstance(run.get("history"), list):
            history = [
                {k: v for k, v in rec.items() if k not in UNRECORDED_HISTORY} for rec in run["history"]
            ]
            run = {**run, "history": history}
        runs.append(run)
    return {**summary, "runs": runs} if "runs" in summary else dict(summary)


def _recorded_json(summary: dict[str, Any]) -> bytes:
    """One line per top-level key and per run: compact, yet a new run is a one-line diff."""
    parts = [f"{json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in summary.items() if k != "runs"]
    if "runs" in summary:
        runs = ",\n".join(json.dumps(r, allow_nan=False) for r in summary["runs"])
        parts.append(f'"runs": [\n{runs}\n]')
    return ("{\n" + ",\n".join(parts) + "\n}\n").encode()


def record_setting(results: Path, dest: Path) -> list[Path]:
    """Copy a setting's results.json (without per-channel diagnostics, :func:`recorded_summary`), table.md,
    config.yaml and PNGs to ``dest`` (as run.sh does)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = [results / f for f in RECORDED_FILES if (results / f).is_file()] + sorted(results.glob("*.png"))
    for f in files:
        if f.name == "results.json":
            summary = json.loads(f.read_text())
            atomic_write_bytes(dest / f.name, _recorded_json(recorded_summary(summary)))
        else:
            shutil.copy2(f, dest / f.name)
    return [dest / f.name for f in files]


def _run_speed(out: Path, root: Path, *, record: bool, progress: bool, imagenet: bool) -> None:
    # imported here: the speed suite is its own module (and heavy); only `bench speed` needs it
    from paramtransfer.bench.speedsuite import run_speed_suite

    path = out / SPEED / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    run_speed_suite(path, progress=progress, imagenet=imagenet)
    if record:
        (root / SPEED).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, root / SPEED / "results.json")


def list_lines(root: Path, out: str | Path = DEFAULT_OUT, name: str | None = None) -> list[str]:
    """One line per setting: name, kind, whether it is recorded and whether OUT has its results."""
    pairs = resolve_name(name, root) if name and name != SPEED else resolve_name(ALL, root)
    width = max((len(f"{s}/{n}") for s, n in pairs), default=10)
    lines = [f"suites under {root} (recorded: {root}/SUITE/results/NAME; ran: {out}/SUITE/NAME)"]
    papers = {s: (load_paper(root / s / PAPER_FILE).get("settings") or {}) for s in {s for s, _ in pairs}}
    for suite, setting in pairs:
        recorded = (root / suite / "results" / setting / "results.json").is_file()
        ran = (Path(out) / suite / setting / "results.json").is_file()
        mirrors = (papers[suite].get(setting) or {}).get("mirrors", "")
        state = f"{'recorded' if recorded else '-':8}  {'ran' if ran else '-':3}"
        lines.append(
            f"  {suite + '/' + setting:{width}}  {setting_kind(root, suite, setting):8}  {state}  {mirrors}"
        )
    speed = "recorded" if (root / SPEED / "results.json").is_file() else "-"
    lines.append(
        f"  {SPEED:{width}}  {'speed':8}  {speed:8}  {'ran' if (Path(out) / SPEED).is_dir() else '-':3}"
    )
    return lines
