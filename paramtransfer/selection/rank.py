"""Which of my trained models should I transfer from? Rank candidate sources for a target task.

Every candidate is scored on the target's labelled training examples by

* ``lps``: the cosine similarity (LPS, Wang et al., Sec. 4) between the candidate's embedding and the
  embedding of a *probe*, a network of the same architecture trained briefly on the target from scratch.
  The second-order network is trained on a model set's task labels (Eq. 9), by default the candidates'
  own model set;
* ``logme``, ``hscore``, ``hscore_shrinkage`` (H-score with Ledoit-Wolf shrinkage), ``transrate``: on the
  candidate's penultimate features (:mod:`paramtransfer.selection.scores`);
* ``leep``: on the candidate's softmax outputs; ``nce``: on its predicted (hard) source labels.

Higher is better for all of them. With ``verify`` every candidate is also fine-tuned briefly on the
target (the project's ``finetune`` method) and each ranking is compared with the fine-tuned test
accuracies by the weighted Kendall tau (Vigna 2015, hyperbolic weights, as LogME reports it), so that
agreeing on the best candidates counts more than agreeing on the worst.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from paramtransfer.data.task import Split, Task, load_task
from paramtransfer.errors import UserError
from paramtransfer.experiments.run import input_spec_of, runtime_of
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.store import WEIGHTS, load_model
from paramtransfer.models.zoo import build_model
from paramtransfer.runtime import Runtime, module_device
from paramtransfer.selection.lps import model_parameters, similarity
from paramtransfer.selection.modelset import INDEX, EvalConfig, ModelSet, load_modelset, train_second_order
from paramtransfer.selection.scores import hscore, hscore_shrinkage, leep, logme, nce, transrate
from paramtransfer.train.checkpoint import atomic_write_bytes, atomic_write_json

# The scores computed from one forward pass (fast_scores), and every score a ranking reports, in its order.
FAST_SCORES = ("logme", "leep", "nce", "hscore", "hscore_shrinkage", "transrate")
SCORE_NAMES = ("lps", *FAST_SCORES)


@dataclass
class RankConfig:
    """Attributes:
    shots: labelled target examples per class used to score (and to train the probe and verify).
    seed: the target split, the probe's and the fine-tuning's seed.
    probe_epochs, probe_lr: training of the LPS probe (from scratch, the candidates' architecture).
    verify_epochs, verify_lr: the brief fine-tuning of every candidate with ``verify``.
    lps: how the second-order network is trained (see :class:`EvalConfig`).
    device, precision: where and how the candidates run (see :mod:`paramtransfer.runtime`).
    image_size: the side the target's images are resized to (default: the candidates' input size).
    """

    shots: int | None = 20
    seed: int = 0
    probe_epochs: int = 20
    probe_lr: float = 0.01
    verify_epochs: int = 10
    verify_lr: float = 0.01
    test_limit: int | None = 2000
    lps: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    precision: str = "32"
    image_size: int | None = None

    def train_options(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision}


@dataclass
class Candidate:
    name: str
    path: Path
    task: str | None = None


def find_candidates(sources: list[str | Path]) -> tuple[list[Candidate], Path | None]:
    """Candidates from a model set directory (its ``index.json``) or from saved model paths.

    Returns the candidates and the model set directory (None for loose model files).
    """
    if not sources:
        raise UserError("give candidate sources: a model set directory or saved model directories")
    if len(sources) == 1 and (Path(sources[0]) / INDEX).is_file():
        root = Path(sources[0])
        ms_entries = load_modelset(root).entries
        return [Candidate(f"{e['task']}#{e['seed']}", root / e["path"], e["task"]) for e in ms_entries], root
    out = []
    for s in sources:
        p = Path(s).expanduser()
        d = p.parent if p.suffix == ".safetensors" else p
        if not (d / WEIGHTS).is_file():
            raise UserError(f"{s} is neither a model set (no {INDEX}) nor a saved model (no {WEIGHTS})")
        out.append(Candidate(d.name if d.name not in ("", ".") else str(d), d))
    return out, None


@torch.no_grad()
def _outputs(
    model: LayeredNet, split: Any, runtime: Runtime | None = None, batch: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and softmax outputs of ``model`` on a split (a Split, or model inputs)."""
    rt = runtime or Runtime(module_device(model))
    model.eval()
    if isinstance(split, torch.Tensor):
        split = Split(split, torch.zeros(len(split), dtype=torch.long))

    def both(x: torch.Tensor) -> torch.Tensor:
        f = model.embed(x)
        return torch.cat([f, torch.softmax(model.head(f), dim=1)], dim=1)

    out = rt.map(both, split, batch)
    d = out.shape[1] - model.num_classes
    return out[:, :d].double(), out[:, d:].double()


def fast_scores(model: LayeredNet, task: Task, runtime: Runtime | None = None) -> dict[str, float]:
    """The :data:`FAST_SCORES` (LogME, LEEP, NCE, H-score, shrinkage H-score, TransRate) of ``model`` on
    the target's training split (on ``runtime``'s device, default the model's)."""
    if runtime is not None:
        model.to(runtime.device)
    feats, probs = _outputs(model, task.train, runtime)
    y = task.train.y
    return {
        "logme": logme(feats, y),
        "leep": leep(probs, y),
        "nce": nce(probs.argmax(1), y),
        "hscore": hscore(feats, y),
        "hscore_shrinkage": hscore_shrinkage(feats, y),
        "transrate": transrate(feats, y),
    }


def _probe(arch: dict[str, Any], task: Task, config: RankConfig) -> LayeredNet:
    """A network of the candidates' architecture trained from scratch on the target (the LPS probe)."""
    from paramtransfer.experiments.run import train_model

    _, model = train_model(
        "scratch",
        source=build_model(arch["arch"], 2, in_shape=tuple(arch["in_shape"]), **arch["arch_kwargs"]),
        target=task,
        seed=config.seed,
        lr=config.probe_lr,
        epochs=config.probe_epochs,
        train_options=config.train_options(),
    )
    assert model is not None
    return model


_SECOND_ORDER: dict[tuple, tuple[ModelSet, torch.nn.Module]] = {}


def _second_order(set_dir: Path, lps: EvalConfig) -> tuple[ModelSet, torch.nn.Module]:
    """The model set and its trained second-order network; trained once per set (as its index stands)
    and settings in this process, since neither depends on the target: ranking several targets, seeds
    or LPS variants of one set reuses it (training is seeded, so the network is the same either way)."""
    index = (Path(set_dir) / INDEX).resolve()
    key = (str(index), index.stat().st_mtime_ns, json.dumps(dataclasses.asdict(lps), sort_keys=True))
    if key not in _SECOND_ORDER:
        ms = load_modelset(set_dir)
        _SECOND_ORDER[key] = (ms, train_second_order(ms, lps))
    return _SECOND_ORDER[key]


def lps_scores(set_dir: Path, candidates: list[Candidate], task: Task, config: RankConfig) -> list[float]:
    """Cosine similarity between each candidate and the target's probe, in a second-order network trained
    on the model set at ``set_dir`` (Eq. 9 on its task labels)."""
    ms, net = _second_order(set_dir, config.lps)
    probe = _probe(load_model(candidates[0].path).describe(), task, config)

    def embed(model: LayeredNet) -> torch.Tensor:
        return net.embed(ms.scaled([w.unsqueeze(0) for w in model_parameters(model)]))[0]

    with torch.no_grad():
        target = embed(probe)
        return [float(similarity(embed(load_model(c.path)), target)) for c in candidates]


def verify_accuracy(candidate: Candidate, task: Task, config: RankConfig) -> float:
    """Test accuracy after briefly fine-tuning ``candidate`` on the target (the ground truth of a ranking)."""
    from paramtransfer.experiments.run import train_model

    result, _ = train_model(
        "finetune",
        source=load_model(candidate.path),
        target=task,
        seed=config.seed,
        lr=config.verify_lr,
        epochs=config.verify_epochs,
        train_options=config.train_options(),
    )
    return float(result.test_accuracy)


def weighted_tau(scores: list[float], truth: list[float]) -> float:
    """Weighted Kendall tau (Vigna 2015, hyperbolic weights on the rank by ``scores``) in [-1, 1]."""
    from scipy.stats import weightedtau

    if len(scores) != len(truth) or len(scores) < 2:
        raise UserError("a rank correlation needs at least two candidates with a score and an accuracy")
    value = weightedtau(scores, truth).statistic
    return float(value)


def rank_sources(
    target: str,
    sources: list[str | Path],
    out: str | Path,
    *,
    config: RankConfig | None = None,
    verify: bool = False,
    lps_set: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every candidate, write ``OUT/rank.json`` and ``OUT/rank.md``; return the report."""
    config = config or RankConfig()
    candidates, set_dir = find_candidates(list(sources))
    lps_dir = Path(lps_set) if lps_set is not None else set_dir
    first = load_model(candidates[0].path)
    runtime = runtime_of(config.train_options())
    spec = input_spec_of(first, config.image_size)
    task = load_task(target, config.shots, config.seed, test_limit=config.test_limit, input_spec=spec)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(candidates) * (2 if verify else 1), desc="candidates", unit="model")
    rows: list[dict[str, Any]] = []
    for c in candidates:
        rows.append(
            {
                "name": c.name,
                "path": str(c.path),
                "task": c.task,
                **fast_scores(load_model(c.path), task, runtime),
            }
        )
        if bar is not None:
            bar.update(1)
    if lps_dir is not None:
        for row, sim in zip(rows, lps_scores(lps_dir, candidates, task, config), strict=True):
            row["lps"] = sim
    names = [s for s in SCORE_NAMES if all(s in r for r in rows)]
    _add_ranks(rows, names)
    report: dict[str, Any] = {
        "target": task.spec,
        "config": dataclasses.asdict(config),
        "scores": names,
        "lps_set": str(lps_dir) if lps_dir is not None else None,
        "candidates": rows,
    }
    if verify:
        for row, c in zip(rows, candidates, strict=True):
            row["finetune_accuracy"] = verify_accuracy(c, task, config)
            if bar is not None:
                bar.update(1)
        truth = [r["finetune_accuracy"] for r in rows]
        report["weighted_tau"] = {s: _tau_or_none([r[s] for r in rows], truth) for s in names}
    if bar is not None:
        bar.close()
    write_rank(report, out)
    return report


def write_rank(report: dict[str, Any], out: str | Path) -> None:
    """``OUT/rank.json`` and ``OUT/rank.md``."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "rank.json", report)
    atomic_write_bytes(root / "rank.md", format_rank(report).encode())


def _add_ranks(rows: list[dict[str, Any]], names: list[str]) -> None:
    for s in names:
        order = sorted(range(len(rows)), key=lambda i: -rows[i][s])
        for position, i in enumerate(order, 1):
            rows[i][f"{s}_rank"] = position


def add_missing_scores(report: dict[str, Any], config: RankConfig) -> list[str]:
    """Add to a stored rank report the :data:`FAST_SCORES` it lacks (written before they existed).

    Each candidate's scores are computed on the same target split as :func:`rank_sources` would (one
    forward pass, nothing trained), ranked, and, for a verified report, judged by the weighted tau
    against its stored fine-tuned accuracies. Returns the names added (none: the report is unchanged).
    """
    rows = report["candidates"]
    missing = [s for s in FAST_SCORES if not all(s in r for r in rows)]
    if not missing:
        return []
    runtime = runtime_of(config.train_options())
    spec = input_spec_of(load_model(rows[0]["path"]), config.image_size)
    task = load_task(
        report["target"], config.shots, config.seed, test_limit=config.test_limit, input_spec=spec
    )
    for row in rows:
        values = fast_scores(load_model(row["path"]), task, runtime)
        row.update({s: values[s] for s in missing})
    _add_ranks(rows, missing)
    report["scores"] = [s for s in SCORE_NAMES if all(s in r for r in rows)]
    if "weighted_tau" in report:
        truth = [r["finetune_accuracy"] for r in rows]
        report["weighted_tau"].update({s: _tau_or_none([r[s] for r in rows], truth) for s in missing})
    return missing


def _tau_or_none(scores: list[float], truth: list[float]) -> float | None:
    """None when tau is undefined (every accuracy, or every score, tied)."""
    value = weighted_tau(scores, truth)
    return value if math.isfinite(value) else None


def format_rank(report: dict[str, Any]) -> str:
    """A markdown table of the candidates, best first by the first score, with the verification."""
    names = report["scores"]
    verified = "weighted_tau" in report
    head = ["candidate", *names, *(["fine-tuned accuracy"] if verified else [])]
    lines = [
        f"Candidate sources for {report['target']} (higher is better; rank in brackets).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    key = names[0] if names else None
    rows = (
        sorted(report["candidates"], key=lambda r: r.get(f"{key}_rank", 0)) if key else report["candidates"]
    )
    for r in rows:
        cells = [r["name"], *(f"{r[s]:.4g} ({r[f'{s}_rank']})" for s in names)]
        if verified:
            cells.append(f"{100 * r['finetune_accuracy']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if verified:
        lines += ["", "Weighted Kendall τ between each ranking and the fine-tuned accuracy:", ""]
        taus = report["weighted_tau"]
        lines += [
            f"- {s}: " + (f"{taus[s]:+.3f}" if taus[s] is not None else "undefined (ties)") for s in names
        ]
    return "\n".join(lines) + "\n"
