"""Compare: methods x learning rates x seeds on one source/target pair, with hold-out selection.

The learning rate of each method variant is the one with the best mean validation accuracy over
seeds; a learning rate at which any seed diverged is not eligible (the table says so). Test accuracy
is reported only at the selected learning rate, as mean ± std over seeds.

Method options prefixed ``arch.`` change the architecture the variant runs on: ``finetune[arch.depth=38]``
fine-tunes a ResNet-38 pretrained on the same source task (cached like the main source), e.g. SpotTune's
"deeper fine-tuned network" baseline next to ResNet-20 methods in one table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramtransfer.errors import UserError, warn_user
from paramtransfer.experiments.executors import Executor, make_executor
from paramtransfer.experiments.pretrain import resolve_source
from paramtransfer.experiments.run import LOCK as RUN_LOCK
from paramtransfer.experiments.run import train_model
from paramtransfer.methods.base import (
    METHODS,
    check_method,
    make_config,
    make_method,
    parse_method_spec,
    split_method_list,
)
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.store import is_model_path, is_source_name, is_torchvision_source
from paramtransfer.results import (
    ARCH_PREFIX,
    RESULT,
    RunResult,
    _is_number,
    canonical,
    normal_spec,
    read_result,
    run_settings,
    select,
    settings_difference,
)
from paramtransfer.train.checkpoint import atomic_write_bytes, atomic_write_json, hold_lock

DEMO_METHODS = "scratch,linear_probe,finetune,finetune[freeze=all],l2sp"


def imagenet_demo_config() -> CompareConfig:
    """The demo's second, short table: the ImageNet source (EfficientNet-Lite0) -> Fashion-MNIST, all 10
    classes, 10 shots per class, 64 px; scratch, linear probe and fine-tuning, one seed, two learning
    rates (about 2-3 minutes on 2 CPU cores; ``benchmarks/imagenet`` has the full, 5-seed version)."""
    return CompareConfig(
        arch="efficientnet_lite0",
        source="imagenet",
        target="fashion",
        shots=10,
        methods=["scratch", "linear_probe", "finetune"],
        lrs=[0.03, 0.01],
        seeds=[0],
        epochs=15,
        train={"batch_size": 16},
        data={"image_size": 64, "test_limit": 1000},
    )


@dataclass
class CompareConfig:
    """One comparison. ``method_options`` maps a method name to option overrides (from ``--set``)."""

    arch: str = "lenet"
    source: str = "fashion[0-4]"
    target: str = "fashion[5-9]"
    shots: int | None = 20
    methods: list[str] = field(default_factory=lambda: split_method_list(DEMO_METHODS))
    lrs: list[float] = field(default_factory=lambda: [0.1, 0.01, 0.001])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 30
    source_weights: str | None = None  # the state_dict file of a source torchvision:ARCH
    source_epochs: int = 3
    source_limit: int | None = None
    source_seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = split_method_list(self.methods)
        if not self.methods:
            raise UserError("no methods to compare; give --methods, e.g. scratch,finetune")
        if not isinstance(self.lrs, list) or not self.lrs:
            raise UserError("give at least one learning rate, e.g. --lr 0.1,0.01,0.001")
        if not all(_is_number(lr) and math.isfinite(lr) and lr > 0 for lr in self.lrs):
            raise UserError(
                f"learning rates must be positive numbers (got {self.lrs}), e.g. --lr 0.1,0.01,0.001"
            )
        _no_twice("learning rate", "--lr 0.1,0.01,0.001", [float(lr) for lr in self.lrs])
        if not isinstance(self.seeds, list) or not self.seeds:
            raise UserError("give at least one seed, e.g. --seeds 0,1,2")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise UserError(f"seeds must be whole numbers (got {self.seeds}), e.g. --seeds 0,1,2")
        _no_twice("seed", "--seeds 0,1,2", self.seeds)
        if not isinstance(self.data, dict):
            raise UserError(f"data must map val_shots/test_limit/memory_mb to numbers (got {self.data!r})")
        if self.source_weights is not None and not is_torchvision_source(self.source):
            raise UserError(
                f"--source-weights goes with --source torchvision:ARCH, not with --source {self.source}; "
                "drop --source-weights or give --source torchvision:ARCH"
            )
        check_data_options(self.data)


def _no_twice(what: str, example: str, values: list) -> None:
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in twice)
        raise UserError(
            f"{what} {shown} is given more than once ({', '.join(f'{v:g}' for v in values)}); "
            f"give each {what} once, e.g. {example}"
        )


DATA_FIELDS = {
    "val_shots": "validation examples per class",
    "test_limit": "test examples",
    "image_size": "pixels per image side",
    "memory_mb": "megabytes of decoded images held in memory",
}
_EXAMPLE = {"val_shots": 10, "test_limit": 1000, "image_size": 64}
MAX_IMAGE_SIZE = 4096


def check_data_options(data: dict[str, Any], where: str = "data") -> None:
    """``data.val_shots`` / ``data.test_limit``: a whole number >= 1 or None (the default);
    ``data.memory_mb``: a number above 0 or None. Anything else (0, negative, fractional counts, text)
    is a :class:`UserError` before any data is loaded."""
    from paramtransfer.data.sources import check_memory_mb

    for key, value in data.items():
        if key not in DATA_FIELDS:
            raise UserError(f"{where}.{key}: data has no field {key!r}; fields: {', '.join(DATA_FIELDS)}")
        if key == "memory_mb":
            if value is not None:
                check_memory_mb(value, f"{where}.{key}")
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(
                f"{where}.{key}={value!r}: give a whole number of {DATA_FIELDS[key]} of at least 1 "
                f"(or null for the default), e.g. --set data.{key}={_EXAMPLE[key]}"
            )
        if key == "image_size" and value is not None and value > MAX_IMAGE_SIZE:
            raise UserError(
                f"{where}.image_size={value}: images larger than {MAX_IMAGE_SIZE} pixels a side are refused; "
                "give the side the network should see, e.g. --image-size 64"
            )


def read_yaml_mapping(path: str | Path, holds: str) -> dict[str, Any]:
    """The mapping in a YAML file (empty file: ``{}``); a missing file, bad YAML or a non-mapping is a
    :class:`UserError` saying that the file ``must hold`` ``holds``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"cannot read {p} as YAML: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p} must hold {holds}")
    return data


def load_compare_config(path: str | Path, **overrides: Any) -> CompareConfig:
    """A :class:`CompareConfig` from a YAML file (its keys are the dataclass fields), with overrides."""
    p = Path(path)
    data = read_yaml_mapping(p, "a mapping of CompareConfig fields")
    return make_config(CompareConfig, {**data, **overrides}, f"config file {p}")  # type: ignore[return-value]


def dump_compare_config(config: CompareConfig) -> str:
    import yaml

    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


@dataclass
class PlannedRun:
    variant: str
    spec: str
    options: dict[str, Any]
    lr: float | None
    seed: int
    arch_kwargs: dict[str, Any] = field(default_factory=dict)

    def directory(self, root: Path) -> Path:
        safe = re.sub(r"[^A-Za-z0-9=.+-]+", "_", self.variant).strip("_")
        return (
            root
            / "runs"
            / safe
            / (f"lr={self.lr:g}" if self.lr is not None else "no-lr")
            / f"seed={self.seed}"
        )


def split_arch_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{"lr_mult": 2, "arch.depth": 38}`` -> ``({"lr_mult": 2}, {"depth": 38})``."""
    method = {k: v for k, v in options.items() if not k.startswith(ARCH_PREFIX)}
    arch = {k[len(ARCH_PREFIX) :]: v for k, v in options.items() if k.startswith(ARCH_PREFIX)}
    if "" in arch:
        raise UserError(f"write architecture options as {ARCH_PREFIX}NAME=VALUE, e.g. arch.depth=38")
    return method, arch


def _with_arch(variant: str, arch_kwargs: dict[str, Any]) -> str:
    if not arch_kwargs:
        return variant
    extra = ",".join(f"{ARCH_PREFIX}{k}={v}" for k, v in sorted(arch_kwargs.items()))
    return f"{variant[:-1]},{extra}]" if variant.endswith("]") else f"{variant}[{extra}]"


def variant_name(spec: str) -> str:
    """The name a method spec's runs are recorded under: ``"finetune[stochastic=true]"`` ->
    ``"finetune[stochastic=True]"``, ``"spottune[tau=5.0]"`` -> ``"spottune"`` (defaults dropped)."""
    name, options = parse_method_spec(spec)
    options, arch_kwargs = split_arch_options(options)
    return _with_arch(make_method(name, **options).variant(), arch_kwargs)


def plan_runs(
    config: CompareConfig,
    source: LayeredNet | None,
    source_for: Callable[[dict[str, Any]], LayeredNet | None] | None = None,
) -> list[PlannedRun]:
    """Expand method specs (``finetune[freeze=all]`` -> one variant per l) into the run grid.

    ``source_for(arch_kwargs)`` gives the source of variants with ``arch.`` options (default: ``source``).
    """
    plan: list[PlannedRun] = []
    seen: set[str] = set()
    for spec in config.methods:
        name, options = parse_method_spec(spec)
        cls = METHODS.get(name)
        options, arch_kwargs = split_arch_options({**config.method_options.get(name, {}), **options})
        src = source_for(arch_kwargs) if arch_kwargs and cls.needs_source and source_for else source
        for opts in cls.expand(options, src):
            method = cls(make_config(cls.Config, opts, f"method {name!r}"))
            variant = _with_arch(method.variant(), arch_kwargs)
            if variant in seen:
                continue
            seen.add(variant)
            lrs: list[float | None] = list(config.lrs) if cls.trains else [None]
            plan += [PlannedRun(variant, name, opts, lr, s, arch_kwargs) for lr in lrs for s in config.seeds]
    return plan


def check_methods(config: CompareConfig, arch: str | None) -> None:
    """Validate every method spec's options and, with ``arch``, that it runs on that architecture
    (cheap: no source needed), with the options :func:`plan_runs` gives it."""
    for spec in config.methods:
        name, options = parse_method_spec(spec)
        options, _ = split_arch_options({**config.method_options.get(name, {}), **options})
        check_method(name, arch, **options)


def _expected_settings(config: CompareConfig) -> dict[str, Any]:
    from paramtransfer.train.trainer import TrainConfig

    train = make_config(
        TrainConfig, {"epochs": config.epochs, "lr": config.lrs[0], **config.train}, "training"
    )
    out: dict[str, Any] = {
        "target": normal_spec(config.target),
        "shots": config.shots,
        "data": {
            "val_shots": config.data.get("val_shots"),
            "limit": None,
            "test_limit": config.data.get("test_limit"),
            **({"image_size": config.data["image_size"]} if config.data.get("image_size") else {}),
        },
        "arch": config.arch,
        "epochs": config.epochs,
        "train": {k: v for k, v in dataclasses.asdict(train).items() if k != "lr"},
    }
    if not Path(config.source).expanduser().exists():  # a saved model names its own source task
        out["source"] = normal_spec(config.source)
    return canonical(out)


def check_out_dir(config: CompareConfig, out: str | Path) -> None:
    """Refuse, before anything loads or trains, an output folder that holds a damaged ``result.json`` or
    runs of another comparison (another target, shots, source, architecture, epochs, data or training
    settings): they would be overwritten or mixed into the table. More methods, learning rates or seeds
    in the same folder are fine (finished runs are reused)."""
    root = Path(out)
    expected = _expected_settings(config)
    for f in sorted(root.glob("runs/**/" + RESULT)):
        diff = settings_difference(run_settings(read_result(f)), expected)
        if diff is not None:
            key, there, here = diff
            raise UserError(
                f"{root} holds runs of another comparison ({f.relative_to(root)}: {key} {there} there, "
                f"{here} here); use another --out or delete {root}"
            )


def compare(
    config: CompareConfig,
    out: str | Path,
    *,
    source: LayeredNet | None = None,
    progress: bool = True,
    executor: str | Executor | None = None,
) -> dict[str, Any]:
    """Run the grid, select learning rates on validation, write ``results.json``, ``table.md`` and plots.

    Finished runs (complete ``result.json`` with the same settings) are reused, so re-running a
    killed comparison only does what is missing. The same comparison started twice into one ``out`` is
    safe: each run folder is locked while a process trains it (the other waits and reuses the result).
    ``executor`` runs the missing runs (``local``, the default, in this process; ``ray``, or an
    :class:`Executor`, one Ray task each); each run's ``result.json`` is written as soon as it finishes.
    Returns the content of ``results.json``.
    """
    from paramtransfer.report import write_report

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)

    def pretrained(arch_kwargs: dict[str, Any] | None = None) -> LayeredNet | None:
        return resolve_source(
            config.source,
            config.arch,
            epochs=config.source_epochs,
            seed=config.source_seed,
            limit=config.source_limit,
            arch_kwargs=arch_kwargs,
            progress=progress,
            weights=config.source_weights,
        )

    # before any source is pretrained: a method that cannot run on the architecture fails at once
    check_methods(config, None if source is not None else config.arch)
    src = source
    if src is None and any(METHODS.get(parse_method_spec(s)[0]).needs_source for s in config.methods):
        src = pretrained()
    sources: dict[str, LayeredNet | None] = {}

    def source_for(arch_kwargs: dict[str, Any]) -> LayeredNet | None:
        key = json.dumps(arch_kwargs, sort_keys=True)
        if key not in sources:
            if source is not None or is_model_path(config.source) or is_source_name(config.source):
                raise UserError(
                    "arch. options retrain the source with another architecture; they need the source "
                    f"as a task spec (e.g. fashion[0-4]), not a saved model ({config.source})"
                )
            sources[key] = pretrained(arch_kwargs)
        return sources[key]

    plan = plan_runs(config, src, source_for)
    jobs = []
    for p in plan:
        run_source = src
        if p.arch_kwargs:  # its own source, or none (scratch builds the architecture from arch_kwargs)
            run_source = source_for(p.arch_kwargs) if METHODS.get(p.spec).needs_source else None
        jobs.append(make_job(config, p, run_source, root))
    labels = [f"{p.variant} lr={p.lr} seed={p.seed}" for p in plan]
    done = run_jobs(jobs, make_executor(executor), progress=progress, labels=labels, root=root)
    summary = {
        "config": dataclasses.asdict(config),
        "source": getattr(src, "source_info", None) if src is not None else None,
        "selected": select(done),
        "runs": [r.to_dict() for r in done],
    }
    # one writer at a time: the plots are not written atomically, and two processes of the same
    # comparison (started twice) both end here
    with hold_lock(root / RUN_LOCK):
        atomic_write_json(root / "results.json", summary)
        atomic_write_bytes(root / "config.yaml", dump_compare_config(config).encode())
        write_report(summary, root)
    return summary


def make_job(config: CompareConfig, p: PlannedRun, source: LayeredNet | None, root: Path) -> dict[str, Any]:
    """One run of a comparison as plain arguments of :func:`run_job` (picklable, for Ray)."""
    return {
        "spec": p.spec,
        "options": p.options,
        "variant": p.variant,
        "source": source,
        "target": config.target,
        "arch": config.arch,
        "arch_kwargs": p.arch_kwargs or None,
        "seed": p.seed,
        "lr": p.lr,
        "epochs": config.epochs,
        "shots": config.shots,
        "val_shots": config.data.get("val_shots"),
        "test_limit": config.data.get("test_limit"),
        "image_size": config.data.get("image_size"),
        "memory_mb": config.data.get("memory_mb"),
        "train_options": config.train,
        "out": str(p.directory(root)),
    }


def run_job(job: dict[str, Any]) -> RunResult | None:
    """Train one run of a comparison (or, with ``job["reuse_only"]``, only read its complete result)."""
    args = dict(job)
    method = make_method(args.pop("spec"), **args.pop("options"))
    result, _ = train_model(method, **args)
    return result


def run_jobs(
    jobs: list[dict[str, Any]],
    runner: Executor,
    *,
    progress: bool,
    desc: str = "runs",
    labels: list[str] | None = None,
    root: Path | None = None,
) -> list[RunResult]:
    """The result of every :func:`run_job` job, in order: complete runs are read back here, only the
    missing ones go to ``runner`` (which may finish them in any order); each ``result.json`` is on disk
    as soon as its run ends. With ``root``, warn about finished runs under it that are run again."""
    results: list[RunResult | None] = [run_job({**job, "reuse_only": True}) for job in jobs]
    todo = [i for i, r in enumerate(results) if r is None]
    stale = [i for i in todo if (Path(jobs[i]["out"]) / RESULT).is_file()]
    if stale and root is not None:
        warn_user(
            f"{len(stale)} finished run(s) under {root} (e.g. {Path(jobs[stale[0]]['out']) / RESULT}) were "
            "made with other settings (e.g. a retrained source) or cannot be read, and are run again (their "
            "result.json is replaced); use another --out to keep both"
        )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="run")
    for k, result in runner.map(run_job, [jobs[i] for i in todo]):
        i = todo[k]
        results[i] = result
        if not (Path(jobs[i]["out"]) / RESULT).is_file():  # a worker without our filesystem
            result.save(Path(jobs[i]["out"]) / RESULT)
        if bar is not None:
            if labels is not None:
                bar.set_postfix_str(labels[i])
            bar.update(1)
    if bar is not None:
        bar.close()
    return [r for r in results if r is not None]
