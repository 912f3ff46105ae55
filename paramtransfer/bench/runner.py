"""``paramtransfer bench``: run the benchmark suites under ``benchmarks/`` and write one report.

A *suite* is a folder ``benchmarks/<suite>/`` (``ptu``, ``dtnh``, ``spottune``); its *settings* are its
``*.yaml`` files (``paper.yaml``, the paper's numbers and claims, is not a setting). A NAME is a suite,
a setting (``ptu/s1_lenet_20shots``), ``all`` (every setting of every suite) or ``speed`` (the speed
suite, :func:`paramtransfer.experiments.speedsuite.run_speed_suite`; not part of ``all``, because
timings want an otherwise idle machine).

Output (``OUT``, default ``runs/bench``)::

    OUT/<suite>/<name>/results.json, table.md, config.yaml, *.png   one setting (compare's output)
    OUT/speed/results.json                                           bench speed
    OUT/bench.json                                                   where the suites' YAMLs are
    OUT/report.md, OUT/figures/*.png                                 the report (paramtransfer.report.bench)

``record=True`` also copies each setting's results.json, table.md, config.yaml and PNGs to
``benchmarks/<suite>/results/<name>/`` (as ``benchmarks/run.sh`` does), the speed results to
``benchmarks/speed/results.json``, and rebuilds ``benchmarks/report.md`` from everything recorded.

**Kinds.** A setting YAML may name its kind with a top-level ``kind:`` key (default ``compare``: the
rest of the file is a :class:`~paramtransfer.experiments.compare.CompareConfig`). A kind is a runner and
a report renderer, registered by name from any module; list that module in ``KIND_MODULES`` (one line)
so that it is imported the first time a setting names the kind::

    from paramtransfer.experiments.bench import register_kind

    def run_lps(config: dict, out: Path, executor, progress: bool) -> dict:
        ...  # do the work, write out / "results.json" (the summary) and any PNGs; return the summary

    def render_lps(summary: dict, paper: dict | None, results_dir: Path) -> Section:
        ...  # paramtransfer.report.bench.Section: markdown, figures to show, ClaimResults

    register_kind("lps", run_lps, render_lps)

The runner gets the YAML mapping without ``kind``; it must write ``out/results.json`` because the
report (and ``paramtransfer report``) rebuilds every section from that file alone. A runner should
reuse finished work, as ``compare`` does, so that an interrupted bench continues where it stopped.
"""

from __future__ import annotations

import importlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paramtransfer.errors import UserError
from paramtransfer.registry import Registry
from paramtransfer.report.bench import BenchLayout, BenchReport, Section, render_compare, write_bench_report
from paramtransfer.train.checkpoint import atomic_write_json

ALL, SPEED = "all", "speed"
PAPER_FILE = "paper.yaml"
MANIFEST = "bench.json"
DEFAULT_OUT = "runs/bench"
RECORDED_FILES = ("results.json", "table.md", "config.yaml")
_NOT_SUITES = {SPEED, "figures"}

Runner = Callable[[dict[str, Any], Path, Any, bool], dict[str, Any]]
Renderer = Callable[[dict[str, Any], dict[str, Any] | None, Path], Section]


@dataclass(frozen=True)
class BenchKind:
    """How one kind of setting runs (``run(config, out, executor, progress) -> summary``) and how its
    summary becomes a report section (``render(summary, paper_entry, results_dir) -> Section``)."""

    name: str
    run: Runner
    render: Renderer


KINDS: Registry[BenchKind] = Registry("benchmark kind")


# Kinds registered by other modules, imported the first time a setting names them, so that no import
# order matters: kind -> the module whose import calls register_kind.
KIND_MODULES: dict[str, str] = {"lps": "paramtransfer.selection.lpsbench"}


def register_kind(name: str, runner: Runner, renderer: Renderer) -> BenchKind:
    """Register a setting kind (``kind: NAME`` in a setting YAML); see the module docstring."""
    return KINDS.register(name)(BenchKind(name, runner, renderer))


def get_kind(name: str) -> BenchKind:
    """The registered kind ``name``, importing its module (``KIND_MODULES``) on first use."""
    if name not in KINDS and name in KIND_MODULES:
        try:
            importlib.import_module(KIND_MODULES[name])
        except ImportError as err:
            raise UserError(
                f"benchmark kind {name!r} is defined in {KIND_MODULES[name]}, which fails to import: {err}"
            ) from None
    return KINDS.get(name)


def run_compare_setting(config: dict[str, Any], out: Path, executor: Any, progress: bool) -> dict[str, Any]:
    """The ``compare`` kind: the YAML is a CompareConfig; finished runs are reused by compare itself."""
    from paramtransfer.experiments.compare import CompareConfig, compare
    from paramtransfer.methods.base import make_config

    cfg = make_config(CompareConfig, config, "benchmark setting")  # type: ignore[arg-type]
    return compare(cfg, out, executor=executor, progress=progress)  # type: ignore[arg-type]


register_kind("compare", run_compare_setting, render_compare)


# ---- suites and settings ---------------------------------------------------------------------------


def default_suites_root() -> Path:
    """The repository's ``benchmarks/`` next to the package, else ``./benchmarks``."""
    here = Path(__file__).resolve().parents[2] / "benchmarks"
    return here if here.is_dir() else Path("benchmarks")


def suites_root(suites: str | Path | None = None) -> Path:
    root = Path(suites) if suites is not None else default_suites_root()
    if not root.is_dir():
        raise UserError(f"no benchmark folder {root}; give the folder of the suites with --suites DIR")
    return root


def list_suites(root: Path) -> list[str]:
    """Folders of ``root`` that hold at least one setting YAML."""
    return [
        d.name
        for d in sorted(root.iterdir())
        if d.is_dir()
        and d.name not in _NOT_SUITES
        and not d.name.startswith(".")
        and suite_settings(root, d.name)
    ]


def suite_settings(root: Path, suite: str) -> list[str]:
    return [p.stem for p in sorted((root / suite).glob("*.yaml")) if p.name != PAPER_FILE]


def load_setting(root: Path, suite: str, name: str) -> tuple[str, dict[str, Any]]:
    """``(kind, config without kind)`` of ``root/suite/name.yaml``."""
    from paramtransfer.experiments.compare import read_yaml_mapping

    data = read_yaml_mapping(
        root / suite / f"{name}.yaml", "a mapping (a CompareConfig, or kind: NAME and its fields)"
    )
    kind = str(data.pop("kind", "compare"))
    get_kind(kind)  # unknown kind -> error listing the known ones
    return kind, data


def setting_kind(root: Path | None, suite: str, name: str) -> str:
    """The kind a setting's YAML names (``compare`` when the YAML is gone or unreadable; not checked)."""
    from paramtransfer.experiments.compare import read_yaml_mapping

    if root is None:
        return "compare"
    try:
        data = read_yaml_mapping(root / suite / f"{name}.yaml", "a mapping")
    except UserError:
        return "compare"
    return str(data.get("kind", "compare"))


def resolve_name(name: str, root: Path) -> list[tuple[str, str]]:
    """``(suite, setting)`` pairs a NAME means (a suite, ``suite/setting`` or ``all``)."""
    suites = list_suites(root)
    hint = f"suites: {', '.join(suites) or 'none'} (or SUITE/SETTING, all, speed; --list shows them)"
    if name == ALL:
        return [(s, n) for s in suites for n in suite_settings(root, s)]
    suite, _, setting = name.strip("/").partition("/")
    if suite not in suites:
        raise UserError(f"unknown benchmark {name!r} under {root}; {hint}")
    settings = suite_settings(root, suite)
    if not setting:
        return [(suite, n) for n in settings]
    setting = setting.removesuffix(".yaml")
    if setting not in settings:
        raise UserError(f"no setting {setting!r} in suite {suite!r}; its settings: {', '.join(settings)}")
    return [(suite, setting)]


# ---- running ---------------------------------------------------------------------------------------


def run_bench(
    name: str,
    *,
    out: str | Path = DEFAULT_OUT,
    suites: str | Path | None = None,
    record: bool = False,
    executor: Any = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> BenchReport:
    """Run NAME's settings (or the speed suite), then write ``OUT/report.md`` (see the module docstring).

    Returns the report written to ``OUT`` (with ``record``, ``benchmarks/report.md`` is rebuilt too).
    """
    root = suites_root(suites)
    out = Path(out)
    # a bad NAME, YAML or kind fails before any work
    todo = [] if name == SPEED else [(s, n, *load_setting(root, s, n)) for s, n in resolve_name(name, root)]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MANIFEST, {"suites": str(root.resolve())})
    if name == SPEED:
        _run_speed(out, root, record=record, progress=progress)
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


def record_setting(results: Path, dest: Path) -> list[Path]:
    """Copy a setting's results.json, table.md, config.yaml and PNGs to ``dest`` (as run.sh does)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = [results / f for f in RECORDED_FILES if (results / f).is_file()] + sorted(results.glob("*.png"))
    for f in files:
        shutil.copy2(f, dest / f.name)
    return [dest / f.name for f in files]


def _run_speed(out: Path, root: Path, *, record: bool, progress: bool) -> None:
    # imported here: the speed suite is its own module (and heavy); only `bench speed` needs it
    from paramtransfer.experiments.speedsuite import run_speed_suite

    path = out / SPEED / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    run_speed_suite(path, progress=progress)
    if record:
        (root / SPEED).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, root / SPEED / "results.json")


def list_lines(root: Path, out: str | Path = DEFAULT_OUT, name: str | None = None) -> list[str]:
    """One line per setting: name, kind, whether it is recorded and whether OUT has its results."""
    from paramtransfer.report.paper import load_paper

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
