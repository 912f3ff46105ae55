"""``paramtransfer auto``: pick the source and the strategy for a target at a fraction of a grid's cost.

1. **Rank** every candidate source (:mod:`paramtransfer.selection.candidates`) by a fast score
   (:data:`DEFAULT_SCORE` unless ``score``) on the target's training split, converted to that source's
   input: one forward pass, nothing trained on the target. Keep the best ``keep``.
2. **Race** the kept sources x method variants (``finetune[freeze=all]`` expanded as in compare) x learning
   rates by successive halving with factor ``eta`` (:mod:`paramtransfer.experiments.racing`) on the
   validation split. A rung shorter than ``epochs`` trains its configurations on the first of ``seeds``
   *from scratch* with the full recipe (the same schedule, over the rung's epochs): the trainer deletes a
   finished run's checkpoint and its run identity includes the epochs, so continuing a survivor would need
   a schedule that ignores the total (``constant``) and a second kind of run; retraining keeps every rung an
   ordinary, reusable run and its cost is counted in full. Past ``epochs`` a rung's resource is more seeds:
   full runs on the first ``m`` of ``seeds``, scored by their mean validation accuracy (then the lower mean
   validation loss) as the exhaustive grid's choice is; full runs live in ``OUT/full`` and are never
   trained twice (a later rung and the final training reuse them).
3. **Train the winner** fully: ``epochs`` epochs, every seed of ``seeds`` (those the race already trained
   fully are reused), a comparison of one variant under ``OUT/final`` (``results.json``, ``table.md``:
   ``paramtransfer report OUT/final`` reads it). Test accuracy is reported here and never used for a
   decision.

**Budget.** Compute is counted in training examples (epochs x the target's training-set size; the
ranking's forward passes are not training, their time is reported; a reused run counts once). The
exhaustive grid is every candidate source x variant x learning rate x seed, ``epochs`` each. ``budget`` is
the fraction of it that auto may spend, the final training included: the race gets as much of it as leaves
room for what the final training still needs after the race (the race's rungs from
:func:`~paramtransfer.experiments.racing.plan_rungs`). When the race of the ``keep`` best sources does not
fit beside a whole final training, the lowest-ranked kept source is dropped until it does; when not even
one source's race fits, it is a UserError naming the budget needed. The planned total never exceeds the
budget (an early-stopped run uses less; both are reported).

**Resume and determinism.** Every run lives in its own folder (``OUT/race/rung=K/SOURCE/runs/...`` for a
short run, ``OUT/full/SOURCE/runs/...`` for a full one) and
:func:`~paramtransfer.experiments.run.train_model` reuses finished runs and resumes a killed one from its
checkpoint, so a killed auto run again continues where it stopped. Decisions depend only on the results
(mean validation accuracy, then the lower mean validation loss, then the name), never on
the order in which an executor returns them: local and Ray give the same decisions. ``OUT/auto_config.json``
guards the folder against another auto's settings (:mod:`paramtransfer.selection.autoconfig`).

Layer: this lives in ``selection`` (not ``experiments``) because it ranks with
:func:`~paramtransfer.selection.rank.fast_scores`; the race itself is the pure ``experiments.racing``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from paramtransfer.errors import UserError
from paramtransfer.experiments.compare import CompareConfig, PlannedRun, make_job, plan_runs, run_jobs
from paramtransfer.experiments.executors import Executor, make_executor
from paramtransfer.experiments.racing import Rung, min_budget, plan_rungs, successive_halving, trained_cost
from paramtransfer.results import RunResult, best_val_loss, select
from paramtransfer.selection.autoconfig import (  # noqa: F401  (the defaults, re-exported)
    CONFIG_FILE,
    DEFAULT_BUDGET,
    DEFAULT_ETA,
    DEFAULT_KEEP,
    DEFAULT_METHODS,
    DEFAULT_SCORE,
    AutoConfig,
    check_out_dir,
    methods_for,
)
from paramtransfer.selection.candidates import Candidate, load_candidate, rank_candidates, timed_scores
from paramtransfer.train.checkpoint import atomic_write_bytes, atomic_write_json


def _name(c: Candidate, p: PlannedRun) -> str:
    return f"{c.name} · {p.variant}" + (f" · lr={p.lr:g}" if p.lr is not None else "")


def _score(runs: list[RunResult]) -> tuple[float, float] | None:
    """Mean validation accuracy, then minus the mean best validation loss; None if any seed diverged."""
    if not runs or any(r.status != "ok" or r.val_accuracy is None for r in runs):
        return None
    n = len(runs)
    return (sum(r.val_accuracy for r in runs) / n, -sum(best_val_loss(r) for r in runs) / n)


def auto(
    config: AutoConfig, out: str | Path, *, progress: bool = True, executor: str | Executor | None = None
) -> dict[str, Any]:
    """Rank, race and train the winner (module doc); writes ``OUT/auto.json``, ``OUT/auto.md`` and
    ``OUT/final``; returns the content of ``auto.json``."""
    from paramtransfer.report import write_report
    from paramtransfer.report.auto import format_auto

    t_start = time.perf_counter()
    root = Path(out)
    check_out_dir(config, root)
    candidates = config.candidates()
    for c in candidates:  # cheap checks (method options, method x architecture) before anything loads
        if c.arch is not None:
            methods_for(config, c, c.arch)
    runner = make_executor(executor)

    t0 = time.perf_counter()
    kw = {"epochs": config.source_epochs, "seed": config.source_seed, "limit": config.source_limit}
    sources = {c.name: load_candidate(c, progress=progress, **kw) for c in candidates}
    sources_time = time.perf_counter() - t0
    race_seed = config.seeds[0]
    data = {k: config.data.get(k) for k in ("val_shots", "test_limit", "image_size", "memory_mb")}
    rows, n_train, ranking_time = timed_scores(
        candidates,
        sources,
        target=config.target,
        shots=config.shots,
        seed=race_seed,
        data={**{k: v for k, v in data.items() if v is not None}, "limit": None},
        train_options=config.train,
    )
    by_name = {c.name: c for c in candidates}
    ranked = [by_name[r["name"]] for r in rank_candidates(rows, config.score)]

    def plan(c: Candidate, seeds: list[int]) -> tuple[CompareConfig, list[PlannedRun]]:
        methods, _ = methods_for(config, c, sources[c.name].arch)
        cfg = config.compare_config(c, sources[c.name].arch, methods, seeds=seeds)
        return cfg, plan_runs(cfg, sources[c.name])

    grid_epochs = sum(config.epochs for c in candidates for p in plan(c, config.seeds)[1] if p.lr is not None)
    final_reserve = len(config.seeds) * config.epochs
    allowed = math.floor(config.budget * grid_epochs + 1e-9)
    race_budget = allowed - final_reserve
    arms: dict[str, tuple[Candidate, PlannedRun]] = {}
    kept = ranked[: config.keep]
    while kept:
        arms = {_name(c, p): (c, p) for c in kept for p in plan(c, [race_seed])[1]}
        if race_budget >= min_budget(len(arms), config.eta):
            break
        kept = kept[:-1]
    if not kept:
        n_top = len(plan(ranked[0], [race_seed])[1])
        needed = (final_reserve + min_budget(n_top, config.eta)) / max(grid_epochs, 1)
        cure = (
            f"give --budget {math.ceil(needed * 1000) / 1000:g} or fewer --methods/--lr"
            if needed <= 1
            else "that is more than the whole grid: give fewer --methods/--lr or more --epochs"
        )
        raise UserError(
            f"--budget {config.budget:g} is too small: training the winner ({len(config.seeds)} seed(s) x "
            f"{config.epochs} epochs) and racing the {n_top} configurations of the best source need "
            f"{needed:.3g} of the exhaustive grid; {cure}"
        )
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / CONFIG_FILE, dataclasses.asdict(config))
    n_seeds = len(config.seeds)
    rungs: list[Rung] = []
    if len(arms) > 1:
        # the largest race budget that leaves room for what the final training still needs after it
        # (nothing when the last rung trains every seed fully); reserving a whole final always fits
        for reserve in range(0, final_reserve + 1, config.epochs):
            if allowed - reserve < min_budget(len(arms), config.eta):
                continue
            plan_ = plan_rungs(len(arms), config.eta, config.epochs, allowed - reserve, seeds=n_seeds)
            if sum(trained_cost(plan_, config.epochs, n_seeds)) <= allowed:
                rungs = plan_
                break
    race_runs: dict[tuple[int, str], list[RunResult]] = {}

    def job(c: Candidate, p: PlannedRun, epochs: int, seed: int, rung: int) -> dict[str, Any]:
        cfg = config.compare_config(c, sources[c.name].arch, [p.spec], epochs=epochs, seeds=[seed])
        folder = root / "full" if epochs == config.epochs else root / "race" / f"rung={rung}"
        return make_job(cfg, dataclasses.replace(p, seed=seed), sources[c.name], folder / c.folder)

    def evaluate(alive: list[str], rung: Rung) -> dict[str, Any]:
        keys = [(name, s) for name in alive for s in config.seeds[: rung.seeds]]
        jobs = [job(*arms[name], rung.epochs, s, rung.index) for name, s in keys]
        what = f"{rung.epochs} epochs" + (f" x {rung.seeds} seeds" if rung.seeds > 1 else "")
        results = run_jobs(jobs, runner, progress=progress, desc=f"rung {rung.index} ({what})")
        for (name, _), r in zip(keys, results, strict=True):
            race_runs.setdefault((rung.index, name), []).append(r)
        return {name: _score(race_runs[(rung.index, name)]) for name in alive}

    t0 = time.perf_counter()
    race = successive_halving(list(arms), rungs, evaluate)
    race_time = time.perf_counter() - t0
    wc, wp = arms[race.winner]
    final_cfg = config.compare_config(wc, sources[wc.name].arch, [wp.spec])
    t0 = time.perf_counter()
    final_jobs = [job(wc, wp, config.epochs, s, -1) for s in config.seeds]
    final_runs = run_jobs(final_jobs, runner, progress=progress, desc="final")
    final_time = time.perf_counter() - t0
    summary = {
        "config": {**dataclasses.asdict(final_cfg), "lrs": [wp.lr] if wp.lr is not None else []},
        "source": getattr(sources[wc.name], "source_info", None),
        "selected": select(final_runs),
        "runs": [r.to_dict() for r in final_runs],
    }
    atomic_write_json(root / "final" / "results.json", summary)
    write_report(summary, root / "final")

    def identity(name: str, r: RunResult) -> tuple[str, int, int]:
        return (name, r.seed, int(r.config["epochs"]))

    race_trained: dict[tuple[str, int, int], RunResult] = {}  # each run once, however many rungs read it
    for (_, name), rs in sorted(race_runs.items()):
        for r in rs:
            race_trained.setdefault(identity(name, r), r)
    race_used = sum(len(r.history) for r in race_trained.values())
    final_new = [r for r in final_runs if identity(race.winner, r) not in race_trained]
    final_used = sum(len(r.history) for r in final_new)
    planned_race, planned_final = trained_cost(rungs, config.epochs, n_seeds)
    planned = planned_race + (planned_final if wp.lr is not None else 0)
    report = {
        "config": dataclasses.asdict(config),
        "target": config.target,
        "train_examples": n_train,
        "ranking": {
            "score": config.score,
            "candidates": rank_candidates(rows, config.score),
            "kept": [c.name for c in kept],
            "dropped_for_budget": [c.name for c in ranked[len(kept) : config.keep]],
            "skipped_methods": {c.name: methods_for(config, c, sources[c.name].arch)[1] for c in kept},
        },
        "race": {
            "eta": config.eta,
            "seed": race_seed,
            "configurations": len(arms),
            "winner": race.winner,
            "rungs": [_rung_record(rr, arms, race_runs) for rr in race.rungs],
        },
        "decision": {
            "source": wc.name,
            "variant": wp.variant,
            "lr": wp.lr,
            "score_rank": [c.name for c in ranked].index(wc.name) + 1,
            "final": summary["selected"].get(wp.variant, {}),
        },
        "compute": {
            "budget": config.budget,
            "grid_examples": grid_epochs * n_train,
            "planned_examples": planned * n_train,
            "planned_ratio": planned / grid_epochs if grid_epochs else None,
            "race_examples": race_used * n_train,
            "final_examples": final_used * n_train,
            "used_examples": (race_used + final_used) * n_train,
            "ratio": (race_used + final_used) / grid_epochs if grid_epochs else None,
            "wall_time_s": {
                "sources": sources_time,
                "ranking": ranking_time,
                "race": race_time,
                "final": final_time,
                "race_runs": sum(r.wall_time_s for r in race_trained.values()),
                "final_runs": sum(r.wall_time_s for r in final_new),
                "total": time.perf_counter() - t_start,
            },
        },
    }
    atomic_write_json(root / "auto.json", report)
    atomic_write_bytes(root / "auto.md", format_auto(report).encode())
    return report


def _rung_record(rr: Any, arms: dict[str, tuple[Candidate, PlannedRun]], runs: dict) -> dict[str, Any]:
    rows = []
    for position, name in enumerate(rr.order, 1):
        c, p = arms[name]
        rs: list[RunResult] = runs[(rr.rung.index, name)]
        score = rr.scores[name]
        curves = [[h.get("val_accuracy") for h in r.history] for r in rs]
        rows.append(
            {
                "name": name,
                "source": c.name,
                "variant": p.variant,
                "lr": p.lr,
                "place": position,
                "survived": name in rr.survivors,
                "status": next((r.status for r in rs if r.status != "ok"), "ok"),
                "seeds": [r.seed for r in rs],
                "val_accuracy": None if score is None else score[0],  # the mean over the seeds
                "val_loss": None if score is None else -score[1],
                "epochs_trained": max(len(r.history) for r in rs),
                "val_curve": curves[0] if len(curves) == 1 else _mean_curve(curves),
            }
        )
    return {
        "rung": rr.rung.index,
        "epochs": rr.rung.epochs,
        "seeds": rr.rung.seeds,
        "keep": rr.rung.keep,
        "configs": rows,
        "survivors": list(rr.survivors),
    }


def _mean_curve(curves: list[list[float | None]]) -> list[float | None]:
    """The mean validation curve over seeds, epoch by epoch (None where a seed has no value)."""
    out: list[float | None] = []
    for values in zip(*curves, strict=False):
        ok = [v for v in values if v is not None]
        out.append(sum(ok) / len(ok) if len(ok) == len(values) else None)
    return out
