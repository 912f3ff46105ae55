"""Why our LPS task classification stays far below the paper's (issue 17): one factor at a time.

Every row trains a second-order network for Sec. 5.1's task classification (80/20 of each task's
models, :func:`paramtransfer.bench.modelset.classification_top_k`) with one change against the
benchmark's protocol (``benchmarks/lps/fashion_pairs.yaml``, ``eval``), on seeds 0-2 (the seed draws the
split and the network's initialisation), and reports top-1 / top-5 as mean ± std over the seeds:

* the second-order network's training: more epochs, the paper's SGD (batch 1, lr 1e-3, 100 epochs),
  more second-order filters;
* the normalisation of the weights it reads: the benchmark divides each layer by its RMS over the whole
  set; per model, per filter, or none;
* models per task: 2 or 4 of each task's 8 training models;
* which branch is weighted (Eq. 9's w) and, above layer 1, the alignment: ``channel`` is the authors'
  code (filters sorted on layer 1 only, see DESIGN.md's errata), ``both`` ours;
* a diagnostic, not a method: the weights' displacement from their initialisation (theta - theta_0,
  each model's init rebuilt from its seed) -- what the second-order network could read if the random
  initialisation did not hide the task;
* training length of the set's models (``--long``): ``--tasks`` tasks drawn at random are rebuilt with
  the same seeds (hence the same initialisations) and ``--long-epochs`` epochs, and compared with the
  same tasks' 8-epoch models, on the same rows.

Run (about 75 min of one thread on a busy 2-core machine, see benchmarks/lps/README.md)::

    python benchmarks/lps/depth.py --modelset RUNS/lps/fashion_pairs/modelset --out RUNS/lps_depth \\
        --long --more-models 20 --record

``--out/results.json`` holds every seed's numbers and is reused by a re-run (rows already measured
with the same seeds are skipped); ``--record`` copies it and ``depth.md`` to
``benchmarks/lps/depth_study/`` (not under ``results/``, where ``paramtransfer report`` looks for bench
settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from paramtransfer.bench.lps import LPSBenchConfig, second_order_config
from paramtransfer.bench.modelset import classification_top_k
from paramtransfer.errors import UserError
from paramtransfer.models.store import META, WEIGHTS
from paramtransfer.models.zoo import build_model
from paramtransfer.selection.lps import model_parameters
from paramtransfer.selection.modelset import (
    INDEX,
    SETTINGS,
    EvalConfig,
    ModelSet,
    build_modelset,
    load_modelset,
    task_pairs,
)
from paramtransfer.train.checkpoint import atomic_write_json

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)


# ---- the weights the second-order network reads ----------------------------------------------------


def _rms(p: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return p.square().mean(dim=dims, keepdim=True).sqrt().clamp_min(1e-12)


def normalised(ms: ModelSet, mode: str, params: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The set's weights (``[N, g, c, kh, kw]`` per layer) divided by the RMS of: each layer over the
    whole set (``set``, the benchmark's), each model's layer (``model``), each filter (``filter``), or
    nothing (``none``). Every mode keeps the alignments' invariances (a positive factor per filter)."""
    params = ms.params if params is None else params
    if mode == "set":
        return [p / _rms(p, (0, 1, 2, 3, 4)) for p in params]
    if mode == "model":
        return [p / _rms(p, (1, 2, 3, 4)) for p in params]
    if mode == "filter":
        return [p / _rms(p, (2, 3, 4)) for p in params]
    if mode == "none":
        return list(params)
    raise ValueError(mode)


def initial_weights(ms: ModelSet) -> list[torch.Tensor]:
    """Every model's initial weights, rebuilt from its seed as the model set's training built them."""
    settings = json.loads((ms.root / "modelset.json").read_text())
    per_layer: list[list[torch.Tensor]] = []
    for e in ms.entries:
        net = build_model(e["arch"], 2, in_shape=ms.in_shape, seed=e["seed"], **settings["arch_kwargs"])
        layers = model_parameters(net)
        per_layer = per_layer or [[] for _ in layers]
        for acc, w in zip(per_layer, layers):
            acc.append(w)
    return [torch.stack(ws) for ws in per_layer]


def drift(ms: ModelSet, init: list[torch.Tensor]) -> list[float]:
    """Per layer, the mean over models of ||theta - theta_0|| / ||theta_0||."""
    return [
        float(((p - q).flatten(1).norm(dim=1) / q.flatten(1).norm(dim=1)).mean())
        for p, q in zip(ms.params, init)
    ]


def subset(ms: ModelSet, tasks: list[str]) -> ModelSet:
    """The models of ``tasks`` only (labels renumbered in the set's task order)."""
    keep = [t for t in ms.tasks if t in tasks]
    idx = torch.tensor([i for i, e in enumerate(ms.entries) if e["task"] in keep])
    labels = torch.tensor([keep.index(ms.entries[i]["task"]) for i in idx.tolist()])
    return ModelSet(
        ms.root, [ms.entries[i] for i in idx.tolist()], keep, labels, [p[idx] for p in ms.params], ms.in_shape
    )


# ---- the rows --------------------------------------------------------------------------------------


def rows(base: EvalConfig, layers: int) -> dict[str, dict[str, Any]]:
    """Each row: the EvalConfig, the weights (normalisation or displacement), the models per task and
    the second-order network's options (Eq. 9's weights, the alignment)."""

    def branch(b: int) -> list[float]:
        return [float(i == b - 1) for i in range(layers)]

    def row(label: str, **what: Any) -> dict[str, Any]:
        return {"label": label, **what}

    b2, b3 = {"weights": branch(2)}, {"weights": branch(3)}
    return {
        "protocol": row("benchmark protocol (branch 1, w = 1,0,0,0)"),
        "so_100ep": row("2nd-order net: 100 epochs", cfg={"epochs": 100}),
        "so_paper": row(
            "2nd-order net: the paper's SGD (batch 1, lr 1e-3, 100 epochs)",
            cfg={"epochs": 100, "batch_size": 1, "lr": 1e-3},
        ),
        "so_32filters": row("2nd-order net: 32 filters per layer", cfg={"filters": 32}),
        "norm_model": row("weights normalised per model", norm="model"),
        "norm_filter": row("weights normalised per filter", norm="filter"),
        "norm_none": row("weights not normalised", norm="none"),
        "models_2": row("2 of 8 training models per task", per_task=2),
        "models_4": row("4 of 8 training models per task", per_task=4),
        "displacement": row("diagnostic: displacement theta - theta_0", weights="displacement"),
        "branch2": row("branch 2, both alignments (ours)", lps=b2),
        "branch2_authors": row(
            "branch 2, channel alignment only (authors' code: no sort above layer 1)",
            lps={**b2, "alignment": "channel"},
        ),
        "branch3": row("branch 3, both alignments (ours)", lps=b3),
        "branch3_authors": row(
            "branch 3, channel alignment only (authors' code)", lps={**b3, "alignment": "channel"}
        ),
        "branches23": row("branches 2+3 (w = 0,1,1,0)", lps={"weights": [0.0, 1.0, 1.0, 0.0][:layers]}),
        "branch3_norm_filter": row("branch 3, weights normalised per filter", lps=b3, norm="filter"),
        "branch3_100ep": row("branch 3, 2nd-order net 100 epochs", lps=b3, cfg={"epochs": 100}),
        "branch3_models_4": row("branch 3, 4 of 8 training models per task", lps=b3, per_task=4),
        "branch3_displacement": row(
            "diagnostic: branch 3 on the displacement", lps=b3, weights="displacement"
        ),
    }


def measure(
    ms: ModelSet, base: EvalConfig, row: dict[str, Any], init: list[torch.Tensor] | None
) -> dict[str, Any]:
    """The row's top-1/top-5 on every seed, with mean and std, and its time."""
    if row.get("weights") == "displacement":
        assert init is not None
        params = normalised(ms, "set", [p - q for p, q in zip(ms.params, init)])
    else:
        params = normalised(ms, row.get("norm", "set"))
    t0 = time.perf_counter()
    per_seed = []
    for seed in SEEDS:
        cfg = replace(base, seed=seed, **row.get("cfg", {}))
        per_seed.append(
            classification_top_k(
                ms, cfg, params=params, train_per_task=row.get("per_task"), **row.get("lps", {})
            )
        )
    out: dict[str, Any] = {
        "label": row["label"],
        "seeds": list(SEEDS),
        "per_seed": per_seed,
        "time_s": time.perf_counter() - t0,
    }
    for k in ("top1", "top5"):
        values = [100 * r[k] for r in per_seed]
        out[k] = {"mean": statistics.fmean(values), "std": statistics.stdev(values)}
    return out


def run_rows(
    ms: ModelSet, base: EvalConfig, names: list[str], done: dict[str, Any], label: str
) -> dict[str, Any]:
    table = rows(base, len(ms.params))
    unknown = [n for n in names if n not in table]
    if unknown:
        raise UserError(f"unknown row(s) {unknown}; the rows are: {', '.join(table)}")
    init = initial_weights(ms) if any(table[n].get("weights") == "displacement" for n in names) else None
    for name in names:
        if name in done and done[name].get("seeds") == list(SEEDS):
            continue
        done[name] = measure(ms, base, table[name], init)
        _print(label, done[name]["label"], done[name])
        save()
    return done


def _print(where: str, what: str, r: dict[str, Any]) -> None:
    top1, top5 = r["top1"], r["top5"]
    print(
        f"[{where}] {what}: top-1 {top1['mean']:.1f} ± {top1['std']:.1f}, "
        f"top-5 {top5['mean']:.1f} ({r['time_s']:.0f} s)",
        flush=True,
    )


_SAVE: dict[str, Any] = {}


def save() -> None:
    """Write the results after every row (a killed study keeps what it measured)."""
    path = _SAVE.get("path")
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_SAVE["results"], indent=1))
        tmp.replace(path)


# ---- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modelset", required=True, type=Path, help="the LPS bench's model set directory")
    parser.add_argument(
        "--out", required=True, type=Path, help="where results.json and the long-trained set go"
    )
    parser.add_argument(
        "--config", type=Path, default=HERE / "fashion_pairs.yaml", help="the LPS bench setting"
    )
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--long", action="store_true", help="also rebuild --tasks tasks with --long-epochs")
    parser.add_argument("--tasks", type=int, default=10, help="tasks rebuilt for the training-length rows")
    parser.add_argument("--long-epochs", type=int, default=32, help="epochs of the rebuilt models")
    parser.add_argument(
        "--more-models", type=int, default=0, help="grow --tasks tasks to this many models each (e.g. 20)"
    )
    parser.add_argument(
        "--record", action="store_true", help="copy results.json and depth.md to benchmarks/lps/depth_study/"
    )
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if not args.config.is_file():
        raise UserError(
            f"{args.config} is not a file; pass --config an LPS bench setting, "
            f"e.g. {HERE / 'fashion_pairs.yaml'}"
        )
    config = LPSBenchConfig.from_dict(yaml.safe_load(args.config.read_text()) or {})
    base = second_order_config(config.eval)
    ms = load_modelset(args.modelset)
    per_task = config.build.models_per_task
    n_tasks = len(task_pairs(config.build.dataset))
    if not 3 <= args.tasks <= n_tasks or args.long_epochs < 1:
        raise UserError(
            f"--tasks must lie in [3, {n_tasks}] and --long-epochs be at least 1 "
            f"(got {args.tasks}, {args.long_epochs})"
        )
    if args.more_models and args.more_models <= per_task:
        raise UserError(
            f"--more-models must exceed the set's {per_task} models per task "
            f"(got {args.more_models}); 0 skips it"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    _SAVE.update(path=path, results=results)
    results["settings"] = {"eval": dataclasses.asdict(config.eval), "build": dataclasses.asdict(config.build)}
    names = list(rows(base, len(ms.params)))
    if args.rows:
        names = [n.strip() for n in args.rows.split(",")]
    results["drift_full_set"] = drift(ms, initial_weights(ms))
    run_rows(ms, base, names, results.setdefault("rows", {}), f"{len(ms.tasks)} tasks")
    if args.long:
        _long(args, config, base, ms, results)
    if args.more_models:
        _many(args, config, base, ms, results)
    save()
    (args.out / "depth.md").write_text(format_tables(results))
    print(format_tables(results))
    if args.record:
        dest = HERE / "depth_study"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / "results.json")
        shutil.copyfile(args.out / "depth.md", dest / "depth.md")
        print(f"recorded {dest / 'results.json'}")
    return 0


def _cell(r: dict[str, Any]) -> str:
    return f"{r['top1']['mean']:.1f} ± {r['top1']['std']:.1f} | {r['top5']['mean']:.1f}"


def format_tables(results: dict[str, Any]) -> str:
    """The study's results as markdown tables (top-1 / top-5 %, mean ± std over the seeds)."""
    table = rows(EvalConfig(), len(results.get("drift_full_set", [0] * 4)))
    lines = ["| row | top-1 | top-5 |", "|---|---|---|"]
    for name, r in results.get("rows", {}).items():
        lines.append(f"| {table.get(name, {}).get('label', name)} | {_cell(r)} |")
    drift = results.get("drift_full_set")
    if drift:
        lines += [
            "",
            "Drift from the initialisation, ||theta - theta_0|| / ||theta_0|| per layer: "
            + ", ".join(f"{d:.2f}" for d in drift),
        ]
    long = results.get("long")
    if long:
        labels = [k for k in long if k != "tasks"]
        lines += [
            "",
            f"Training length, {len(long['tasks'])} tasks (chance {100 / len(long['tasks']):.0f} %):",
            "",
            "| row | " + " | ".join(f"{k}: top-1 | top-5" for k in labels) + " |",
            "|---" * (1 + 2 * len(labels)) + "|",
        ]
        for name in long[labels[0]]["rows"]:
            cells = [_cell(long[k]["rows"][name]) for k in labels if name in long[k]["rows"]]
            lines.append(f"| {table[name]['label']} | " + " | ".join(cells) + " |")
        for k in labels:
            drift = ", ".join(f"{d:.2f}" for d in long[k]["drift"])
            lines.append(f"\n{k}: mean test accuracy {100 * long[k]['test_accuracy']:.2f} %, drift {drift}")
    many = results.get("many")
    if many:
        m = many["models_per_task"]
        test = max(1, round(0.2 * m))  # the split of Sec. 5.1 (classification_top_k)
        lines += [
            "",
            f"Models per task, {len(many['tasks'])} tasks x {m} models ({test} test models per task; "
            f'"all" = the other {m - test}):',
            "",
            "| row | top-1 | top-5 |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {_cell(v)} |" for k, v in many.items() if isinstance(v, dict)]
    return "\n".join(lines) + "\n"


LONG_ROWS = ("protocol", "branch2", "branch3", "displacement", "branch3_displacement")


def _study_tasks(dataset: str, n: int) -> list[str]:
    """``n`` tasks drawn at random (seed 0), in the set's order: the rows of the rebuilt sets."""
    specs = task_pairs(dataset)
    drawn = torch.randperm(len(specs), generator=torch.Generator().manual_seed(0))[:n].tolist()
    return sorted((specs[i] for i in drawn), key=specs.index)


def _build_part(
    config: LPSBenchConfig, root: Path, tasks: list[str], epochs: int, models_per_task: int
) -> ModelSet:
    b = config.build
    print(f"model set {root}: {len(tasks)} tasks x {models_per_task} models, {epochs} epochs", flush=True)
    settings = {**dataclasses.asdict(b), "epochs": epochs, "models_per_task": models_per_task}
    build_modelset(out=root, only=tasks, progress=False, **settings)  # the bench's build, these tasks only
    return load_modelset(root)


def _long(
    args: argparse.Namespace, config: LPSBenchConfig, base: EvalConfig, ms: ModelSet, results: dict[str, Any]
) -> None:
    """Training length: the same tasks and initialisations, the set's epochs vs ``--long-epochs``."""
    b = config.build
    tasks = _study_tasks(b.dataset, args.tasks)
    root = args.out / f"modelset_{args.long_epochs}epochs"
    long_set = _build_part(config, root, tasks, args.long_epochs, b.models_per_task)
    out = results.setdefault("long", {})
    out["tasks"] = tasks
    for label, s in ((f"{b.epochs} epochs", subset(ms, tasks)), (f"{args.long_epochs} epochs", long_set)):
        part = out.setdefault(label, {})
        part["drift"] = drift(s, initial_weights(s))
        part["test_accuracy"] = statistics.fmean(e["test_accuracy"] for e in s.entries)
        run_rows(s, base, list(LONG_ROWS), part.setdefault("rows", {}), f"{len(tasks)} tasks, {label}")
        save()


def _many(
    args: argparse.Namespace, config: LPSBenchConfig, base: EvalConfig, ms: ModelSet, results: dict[str, Any]
) -> None:
    """Models per task beyond the set's: the study's tasks grown to ``--more-models`` models each (the
    set's own models hard-linked, the others trained with the next seeds), trained on 8 of them per task
    or on all of their 80 %, tested on the same 20 %."""
    b = config.build
    tasks = _study_tasks(b.dataset, args.tasks)
    root = args.out / f"modelset_{args.more_models}models"
    if not (root / INDEX).is_file():
        settings = json.loads((ms.root / SETTINGS).read_text())
        mine = [e for e in ms.entries if e["task"] in tasks]
        for e in mine:
            (root / e["path"]).mkdir(parents=True, exist_ok=True)
            for name in (WEIGHTS, META):
                os.link(ms.root / e["path"] / name, root / e["path"] / name)
        atomic_write_json(root / SETTINGS, {**settings, "only": tasks})
        atomic_write_json(root / INDEX, mine)
    many = _build_part(config, root, tasks, b.epochs, args.more_models)
    out = results.setdefault("many", {})
    out.update(tasks=tasks, models_per_task=args.more_models)
    table = rows(base, len(ms.params))
    for name in ("protocol", "branch3"):
        for per_task in (b.models_per_task - 2, None):
            key = f"{name}, {per_task or 'all'} per task"
            if out.get(key, {}).get("seeds") == list(SEEDS):
                continue
            out[key] = measure(many, base, {**table[name], "per_task": per_task}, None)
            _print(f"{len(tasks)} tasks, {args.more_models} models", key, out[key])
            save()


if __name__ == "__main__":
    raise SystemExit(main())
