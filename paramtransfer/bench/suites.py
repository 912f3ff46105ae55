"""Benchmark suites, their settings and the kinds of setting (the contract every kind module follows).

A *suite* is a folder ``benchmarks/<suite>/`` (``ptu``, ``dtnh``, ``spottune``, ``lps``); its *settings*
are its ``*.yaml`` files (``paper.yaml``, the paper's numbers and claims, is not a setting). A setting
YAML may name its kind with a top-level ``kind:`` key (default ``compare``). A kind is a runner and a
report renderer, registered by name (:func:`register_kind`) from its own module, which ``KIND_MODULES``
names so that it is imported the first time a setting names the kind (see
:mod:`paramtransfer.bench.runner` for an example).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramtransfer.bench.paper import ClaimResult
from paramtransfer.errors import UserError
from paramtransfer.experiments.compare import read_yaml_mapping
from paramtransfer.registry import Registry

ALL, SPEED = "all", "speed"
PAPER_FILE = "paper.yaml"
MANIFEST = "bench.json"
DEFAULT_OUT = "runs/bench"
RECORDED_FILES = ("results.json", "table.md", "config.yaml")
_NOT_SUITES = {SPEED, "figures"}


@dataclass
class Section:
    """What a kind's renderer returns for one setting: markdown (no heading, no figures), the PNGs to
    show, and the paper's claims judged on the results."""

    markdown: str
    figures: list[Path] = field(default_factory=list)
    claims: list[ClaimResult] = field(default_factory=list)


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

# Kinds are registered by their own modules, imported the first time a setting names them, so that no
# import order matters: kind -> the module whose import calls register_kind.
KIND_MODULES: dict[str, str] = {
    "compare": "paramtransfer.bench.compare",
    "lps": "paramtransfer.bench.lps",
    "auto": "paramtransfer.bench.autobench",
}


def register_kind(name: str, runner: Runner, renderer: Renderer) -> BenchKind:
    """Register a setting kind (``kind: NAME`` in a setting YAML); see the module docstring."""
    return KINDS.register(name)(BenchKind(name, runner, renderer))


def get_kind(name: str) -> BenchKind:
    """The registered kind ``name``, importing its module (``KIND_MODULES``) on first use; an unknown name
    is an error listing the kinds ``compare`` and every kind registered so far."""
    if name not in KINDS:
        module = KIND_MODULES.get(name, KIND_MODULES["compare"])
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UserError(
                f"benchmark kind {name!r} is defined in {module}, which fails to import: {err}"
            ) from None
    return KINDS.get(name)


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
    data = read_yaml_mapping(
        root / suite / f"{name}.yaml", "a mapping (a CompareConfig, or kind: NAME and its fields)"
    )
    kind = str(data.pop("kind", "compare"))
    get_kind(kind)  # unknown kind -> error listing the known ones
    return kind, data


def setting_kind(root: Path | None, suite: str, name: str) -> str:
    """The kind a setting's YAML names (``compare`` when the YAML is gone or unreadable; not checked)."""
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
