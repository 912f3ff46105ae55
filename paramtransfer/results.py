"""Run results: :class:`RunResult` (one run's ``result.json``) and what reads them back.

Reading a result file, checking its shape, the settings all runs of one comparison share, and the
hold-out selection of a learning rate per method variant. Runs (``experiments``) write these files and
reports (``report``) read them; this module does neither, so both can import it.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramtransfer.errors import UserError
from paramtransfer.train.checkpoint import atomic_write_json

RESULT = "result.json"
ARCH_PREFIX = "arch."  # method options that change the architecture (see experiments.compare)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass
class RunResult:
    """What one run produced; written as ``result.json``.

    ``status`` is ``"ok"`` or ``"diverged"`` (a non-finite loss stopped the run; accuracies are null).
    ``config`` holds everything that defines the run (``config["lr"]`` is its learning rate).
    """

    method: str
    source: str | None
    target: str
    arch: str
    seed: int
    config: dict[str, Any]
    val_accuracy: float | None
    test_accuracy: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    diagnostics: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    best_epoch: int | None = None
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def best_val_loss(r: RunResult) -> float:
    if r.best_epoch is None or not r.history:
        return 0.0
    return float(r.history[r.best_epoch - 1].get("val_loss", 0.0))


def select(runs: list[RunResult]) -> dict[str, dict[str, Any]]:
    """Per method variant: the learning rate with the best mean validation accuracy, and its test scores."""
    by_variant: dict[str, dict[Any, list[RunResult]]] = {}
    for r in runs:
        by_variant.setdefault(r.method, {}).setdefault(r.config.get("lr"), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for variant, by_lr in by_variant.items():
        per_lr, val_loss, diverged = {}, {}, {}
        for lr, rs in by_lr.items():
            bad = [r for r in rs if r.status != "ok"]
            if bad:
                diverged[str(lr)] = f"{len(bad)}/{len(rs)}"
                continue
            per_lr[lr] = _mean_std([r.val_accuracy for r in rs])[0]
            val_loss[lr] = _mean_std([best_val_loss(r) for r in rs])[0]
        entry: dict[str, Any] = {
            "val_by_lr": {str(k): v for k, v in per_lr.items()},
            "diverged_lrs": diverged,
            "lr": None,
            "status": "diverged" if not per_lr else "ok",
        }
        if per_lr:
            # ties (common on small validation sets) go to the lower validation loss, then the larger
            # learning rate, so the choice never depends on the order in which runs are listed
            best_lr = max(per_lr, key=lambda lr: (per_lr[lr], -val_loss[lr], lr if lr is not None else 0.0))
            chosen = sorted(by_lr[best_lr], key=lambda r: r.seed)
            val_m, val_s = _mean_std([r.val_accuracy for r in chosen])
            test_m, test_s = _mean_std([r.test_accuracy for r in chosen])
            entry.update(
                lr=best_lr,
                val_mean=val_m,
                val_std=val_s,
                test_mean=test_m,
                test_std=test_s,
                n_seeds=len(chosen),
                seeds=[r.seed for r in chosen],
                test_by_seed=[r.test_accuracy for r in chosen],
                arch=chosen[0].arch,
                frozen_blocks=chosen[0].config.get("method", {}).get("freeze"),
            )
            if "corrected_fraction" in chosen[0].diagnostics:  # DTNH: how often the gradients conflicted
                entry["corrected_fraction"] = _mean_std(
                    [r.diagnostics["corrected_fraction"] for r in chosen]
                )[0]
            entry.update(_diagnostic_means(chosen))
        out[variant] = entry
    return out


# DTNH's conflict sizes (methods/dtnh.py SIZE_NAMES), averaged over the seeds of the chosen learning rate
_DTNH_SIZES = ("mean_reg_task_norm_ratio", "mean_cosine", "mean_removed_ratio_corrected")


def _diagnostic_means(chosen: list[RunResult]) -> dict[str, Any]:
    """Means over seeds of what a table shows besides accuracy: DTNH's conflict sizes, and the mean PTU
    gates per unit (``gate_layers``, ``gate_r``, ``gate_z``). Keys missing from any run are left out."""
    out: dict[str, Any] = {}
    diags = [r.diagnostics for r in chosen]
    for key in _DTNH_SIZES:
        values = [d.get(key) for d in diags]
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = sum(values) / len(values)
    gates = [d.get("gates") for d in diags]
    if gates and all(isinstance(g, dict) for g in gates):
        layers = gates[0].get("layers")
        if isinstance(layers, list) and all(g.get("layers") == layers for g in gates):
            try:
                for name in ("r", "z"):
                    out[f"gate_{name}"] = [
                        sum(float(g[name][j]) for g in gates) / len(gates) for j in range(len(layers))
                    ]
                out["gate_layers"] = layers
            except (KeyError, IndexError, TypeError, ValueError):
                out.pop("gate_r", None)
                out.pop("gate_z", None)
    return out


_RESULT_KEYS = {"method": str, "target": str, "arch": str, "seed": int, "config": dict}


def read_result(path: str | Path) -> RunResult:
    """A run's ``result.json``; a file that is not one (invalid or truncated JSON, another shape, missing
    keys) is a :class:`UserError` naming the file and the cure."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as err:  # ValueError: invalid JSON, or bytes that are not text
        raise UserError(
            f"{p} is not a readable result file ({_why(err)}); delete it and re-run the command"
        ) from None
    why = result_problem(data)
    if why:
        raise UserError(f"{p} is not a valid result file ({why}); delete it and re-run the command")
    return RunResult.from_dict(data)


def _why(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def result_problem(data: Any) -> str | None:
    """What makes ``data`` not a run result (None: it is one)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    for key, kind in _RESULT_KEYS.items():
        if key not in data:
            return f"no {key!r}"
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            return f"{key!r} is not a {kind.__name__}"
    for key in ("val_accuracy", "test_accuracy"):
        if key not in data:
            return f"no {key!r}"
        if data[key] is not None and not _is_number(data[key]):
            return f"{key!r} is not a number"
    if not isinstance(data.get("history", []), list) or not isinstance(data.get("diagnostics", {}), dict):
        return "'history' or 'diagnostics' has the wrong type"
    return None


def canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def run_settings(r: RunResult) -> dict[str, Any]:
    """What every run of one comparison shares: not its method, learning rate or seed."""
    cfg = r.config
    out: dict[str, Any] = {"target": r.target, "shots": cfg.get("shots"), "data": cfg.get("data")}
    if r.source is not None:
        out["source"] = r.source
    if ARCH_PREFIX not in r.method and r.arch not in ("custom", "wrapped", "none"):
        out["arch"] = r.arch  # an arch. variant runs on its own architecture
    if isinstance(cfg.get("train"), dict):
        out["epochs"] = cfg.get("epochs")
        out["train"] = {k: v for k, v in cfg["train"].items() if k != "lr"}
    return canonical(out)


def normal_spec(spec: str) -> str:
    from paramtransfer.data.specs import parse_spec

    try:
        return str(parse_spec(spec))
    except UserError:
        return spec


def settings_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first setting both ``a`` and ``b`` (from :func:`run_settings`) have with different values
    (training fields that only one of them knows are not compared)."""
    for key in [k for k in a if k in b]:
        if key == "source":
            x, y = normal_spec(str(a[key])), normal_spec(str(b[key]))
        else:
            x, y = a[key], b[key]
        if isinstance(x, dict) and isinstance(y, dict):
            for field_ in sorted(x.keys() & y.keys()):
                if x[field_] != y[field_]:
                    return f"{key}.{field_}", x[field_], y[field_]
        elif x != y:
            return key, x, y
    return None
