"""The LPS benchmark (Wang et al., Sec. 5): model set, Tables 1-2, Fig. 3, ranking, embedding time.

One benchmark setting (a YAML with ``kind: lps``, see ``benchmarks/lps/``) runs, in order and resumably:

1. ``build``: a model set (:func:`~paramtransfer.selection.modelset.build_modelset`) under
   ``OUT/modelset``, its models trained by the executor (in-process, or one Ray task per model);
2. ``eval``: :func:`~paramtransfer.bench.modelset.evaluate_modelset` -> ``OUT/eval.json`` (task
   classification and retrieval with all baselines, transferability, branches, alignment);
3. ``rank``: for every target task and seed, the first model of every task is a candidate source,
   ranked by LPS and by LogME, LEEP, NCE, H-score (plain and with shrinkage) and TransRate, then
   fine-tuned on the target; the weighted Kendall tau of each ranking against the fine-tuned accuracies
   -> ``OUT/rank/<target>/seed=<s>/`` (a stored ranking gets the scores added since, without training);
4. ``timing``: the time to embed one model with a trained-size second-order network, for lenets of
   growing width -> part of ``OUT/results.json``.

Everything lands in ``OUT/results.json`` (written atomically at the end; each stage keeps its own
files, so a re-run skips finished models and finished rankings).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from paramtransfer.bench.modelset import SECTIONS, evaluate_modelset
from paramtransfer.bench.paper import ClaimResult, Side
from paramtransfer.bench.suites import KINDS, Section, register_kind
from paramtransfer.errors import UserError
from paramtransfer.methods.base import make_config
from paramtransfer.models.zoo import build_model
from paramtransfer.selection.lps import SecondOrderNet, model_parameters
from paramtransfer.selection.modelset import METHODS, EvalConfig, build_modelset, read_index
from paramtransfer.selection.rank import SCORE_NAMES, RankConfig, add_missing_scores, rank_sources, write_rank
from paramtransfer.train.checkpoint import atomic_write_json

RESULTS = "results.json"
VARIANT_SECTIONS = ("classification", "retrieval", "transferability")
FIGURE = "lps_fig3.png"


@dataclass
class BuildSettings:
    """:func:`build_modelset` arguments (see there)."""

    dataset: str = "fashion"
    models_per_task: int = 6
    max_tasks: int | None = None
    arch: str = "lenet"
    arch_kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 16, "hidden": 64})
    epochs: int = 8
    lr: float = 0.05
    limit: int | None = 1000
    shots: int | None = None
    seed: int = 0
    train_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSettings:
    """:func:`evaluate_modelset` arguments (see there and :class:`EvalConfig`).

    They are the one source of the second-order network's training settings: the ranking stage trains
    its LPS networks with the same ones (:func:`second_order_config`).
    """

    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 8
    embed_dim: int = 64
    filters: int = 8
    seed: int = 0
    ari_images: int = 500
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    # extra LPS rows with other branch weights w_l (Eq. 9), e.g. {"all branches": [1, 1, 1, 1]}, or with
    # their own second-order training too, e.g. {"branch 3": {"weights": [0, 0, 1, 0], "epochs": 100}}:
    # LPS alone re-evaluated on classification, retrieval and transferability, and a ranking score
    variants: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in self.variants.items():
            variant_settings(name, value)  # a bad variant fails when the YAML is read


VARIANT_OPTIONS = ("epochs", "lr", "batch_size", "filters", "embed_dim")


def variant_settings(name: str, value: Any) -> tuple[list[float], dict[str, Any]]:
    """A variant's branch weights and the second-order settings it overrides (a plain list: weights only)."""
    value = {"weights": value} if isinstance(value, list) else value
    bad = not isinstance(value, dict) or set(value) - {"weights", *VARIANT_OPTIONS} or "weights" not in value
    if bad or not isinstance(value["weights"], list):
        raise UserError(
            f"eval variant {name!r} is {value!r}; give its branch weights, [0, 1, 0, 0], or a mapping "
            f"with weights and any of {', '.join(VARIANT_OPTIONS)}: {{weights: [0, 0, 1, 0], epochs: 100}}"
        )
    overrides = {k: v for k, v in value.items() if k != "weights"}
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in overrides.values())
    if not numbers or not all(isinstance(w, (int, float)) for w in value["weights"]):
        raise UserError(f"eval variant {name!r}: its weights and settings must be numbers, got {value!r}")
    try:
        EvalConfig(**overrides)  # the ranges (epochs >= 1, lr > 0, ...) are EvalConfig's
    except UserError as err:
        raise UserError(f"eval variant {name!r}: {err}") from None
    return [float(w) for w in value["weights"]], overrides


@dataclass
class RankSettings:
    """Ranking candidate sources: the first model of each task is a candidate for every target.

    The LPS second-order network is trained with the ``eval`` section's settings (epochs, lr, batch size,
    embedding size, filters, seed), not with settings of its own.
    """

    targets: list[str] = field(default_factory=lambda: ["fashion[5-9]"])
    seeds: list[int] = field(default_factory=lambda: [0])
    shots: int = 20
    verify_epochs: int = 10
    verify_lr: float = 0.01
    probe_epochs: int = 20
    test_limit: int | None = 2000


@dataclass
class TimingSettings:
    """Embedding time against model size: lenets of these widths (hidden = 4 x width)."""

    widths: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    repeats: int = 20


@dataclass
class LPSBenchConfig:
    build: BuildSettings = field(default_factory=BuildSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    rank: RankSettings | None = field(default_factory=RankSettings)
    timing: TimingSettings | None = field(default_factory=TimingSettings)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LPSBenchConfig:
        data = {k: v for k, v in data.items() if k != "kind"}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"an lps benchmark has sections build, eval, rank, timing; not {sorted(unknown)}")
        parts: dict[str, Any] = {}
        for name, kind in (
            ("build", BuildSettings),
            ("eval", EvalSettings),
            ("rank", RankSettings),
            ("timing", TimingSettings),
        ):
            if name in data and data[name] is None:
                parts[name] = None  # a section switched off
            else:
                parts[name] = make_config(kind, data.get(name) or {}, f"lps benchmark section {name!r}")
        return cls(**parts)


def _eval_options(e: EvalSettings) -> dict[str, Any]:
    """The :func:`evaluate_modelset` keyword arguments of the eval section (all but sections, variants)."""
    return {k: v for k, v in dataclasses.asdict(e).items() if k not in ("sections", "variants")}


def second_order_config(e: EvalSettings, lps_weights: list[float] | None = None) -> EvalConfig:
    """The :class:`EvalConfig` that :func:`evaluate_modelset` builds from the eval section: the ranking
    trains its LPS networks with it, so that both stages use one second-order network setting."""
    return EvalConfig(**_eval_options(e), lps_weights=None if lps_weights is None else list(lps_weights))


def rank_config(r: RankSettings, e: EvalSettings, seed: int) -> RankConfig:
    """The :class:`RankConfig` of one target seed: the rank section's settings, LPS trained as in eval."""
    return RankConfig(
        shots=r.shots,
        seed=seed,
        probe_epochs=r.probe_epochs,
        verify_epochs=r.verify_epochs,
        verify_lr=r.verify_lr,
        test_limit=r.test_limit,
        lps=second_order_config(e),
    )


def run_lps_bench(
    config: dict[str, Any] | LPSBenchConfig, out: str | Path, executor: Any = None, progress: bool = True
) -> dict[str, Any]:
    """Run one LPS benchmark setting into ``out`` and return (and write) ``out/results.json``."""
    cfg = config if isinstance(config, LPSBenchConfig) else LPSBenchConfig.from_dict(config)
    root = Path(out)
    set_dir = root / "modelset"
    b = cfg.build
    t0 = time.perf_counter()
    build_modelset(out=set_dir, progress=progress, executor=executor, **dataclasses.asdict(b))
    build_s = time.perf_counter() - t0
    entries = read_index(set_dir)
    e = cfg.eval
    report = _eval(set_dir, root, e, progress)
    variants = {}
    for name, value in e.variants.items():
        weights, overrides = variant_settings(name, value)
        variants[name] = _eval(
            set_dir,
            root / "variants" / _safe(name),
            dataclasses.replace(e, **overrides),
            progress,
            lps_weights=weights,
            methods=("lps",),
            sections=[s for s in VARIANT_SECTIONS if s in e.sections],
        )
    summary: dict[str, Any] = {
        "kind": "lps",
        "config": dataclasses.asdict(cfg),
        "modelset": {
            "models": len(entries),
            "tasks": len({x["task"] for x in entries}),
            "mean_test_accuracy": statistics.fmean(x["test_accuracy"] for x in entries),
            "train_time_s": sum(x["wall_time_s"] for x in entries),
            "wall_time_s": build_s,
        },
        "eval": report,
        "eval_variants": variants,
    }
    if cfg.rank is not None:
        summary["rank"] = _rankings(set_dir, entries, root / "rank", cfg.rank, e, progress)
    if cfg.timing is not None:
        # a measurement, reused like every finished result (a re-run to add a variant keeps it)
        before = _read_if(
            root / RESULTS, lambda r: r.get("config", {}).get("timing") == summary["config"]["timing"]
        )
        if before is not None and before.get("timing"):
            summary["timing"] = before["timing"]
        else:
            summary["timing"] = embedding_time(cfg.timing, e)
    atomic_write_json(root / RESULTS, summary)
    plot_lps(summary, root / FIGURE)
    return summary


def _eval(
    set_dir: Path,
    root: Path,
    e: EvalSettings,
    progress: bool,
    *,
    lps_weights: list[float] | None = None,
    methods: tuple[str, ...] = METHODS,
    sections: list[str] | None = None,
) -> dict[str, Any]:
    """``evaluate_modelset``, or the complete ``eval.json`` of an earlier run with the same settings."""
    path = root / "eval.json"
    sections = e.sections if sections is None else sections
    settings = {k: v for k, v in dataclasses.asdict(e).items() if k != "variants"}
    settings["sections"] = list(sections)
    if lps_weights is not None or tuple(methods) != METHODS:  # a variant
        settings.update(lps_weights=lps_weights, methods=list(methods))
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("complete") and old.get("bench_settings") == settings:
            return old
    options = _eval_options(e)
    report = evaluate_modelset(
        set_dir,
        out=root,
        sections=sections,
        lps_weights=lps_weights,
        methods=methods,
        progress=progress,
        **options,
    )
    report["bench_settings"] = settings
    atomic_write_json(path, report)
    return report


def _rankings(
    set_dir: Path,
    entries: list[dict[str, Any]],
    root: Path,
    r: RankSettings,
    e: EvalSettings,
    progress: bool,
) -> dict[str, Any]:
    """Rank one candidate per task for every target and seed; weighted tau per score, mean over seeds.

    The LPS second-order network is trained with the eval section's settings (:func:`rank_config`).
    Each LPS variant (other branch weights ``w_l``) adds a score ``lps[NAME]``: its similarities to the
    same probe, judged against the same fine-tuned accuracies (``OUT/rank/<target>/seed=<s>/lps_NAME.json``).
    """
    variants = e.variants
    first: dict[str, dict[str, Any]] = {}
    for x in entries:
        first.setdefault(x["task"], x)
    candidates = [str(set_dir / x["path"]) for x in first.values()]
    task_of = dict(zip(candidates, first, strict=True))
    scores = [*SCORE_NAMES, *(f"lps[{name}]" for name in variants)]
    out: dict[str, Any] = {
        "candidates": len(candidates),
        "scores": scores,
        "second_order": dataclasses.asdict(second_order_config(e)),
        "targets": {},
    }
    for target in r.targets:
        per_seed = []
        for seed in r.seeds:
            d = root / _safe(target) / f"seed={seed}"
            config = rank_config(r, e, seed)
            report = _read_if(d / "rank.json", lambda rep, c=config: _same_rank_config(rep.get("config"), c))
            if report is None:
                report = rank_sources(
                    target, candidates, d, config=config, verify=True, lps_set=set_dir, progress=progress
                )
            elif add_missing_scores(report, config):  # scores added since it was ranked: no training
                write_rank(report, d)
            for name, value in variants.items():
                _add_lps_variant(report, d, set_dir, config, name, *variant_settings(name, value))
            per_seed.append(report)
        taus = {s: [p["weighted_tau"].get(s) for p in per_seed] for s in scores}
        accs = [[c["finetune_accuracy"] for c in p["candidates"]] for p in per_seed]
        out["targets"][target] = {
            "weighted_tau": {s: _mean_std([t for t in v if t is not None]) for s, v in taus.items()},
            "finetune_accuracy_range": [min(min(a) for a in accs), max(max(a) for a in accs)],
            "best_by": {
                s: [task_of[max(p["candidates"], key=lambda c, s=s: c[s])["path"]] for p in per_seed]
                for s in scores
            },
            "best_true": [
                task_of[max(p["candidates"], key=lambda c: c["finetune_accuracy"])["path"]] for p in per_seed
            ],
        }
    return out


def _same_rank_config(old: dict[str, Any] | None, config: RankConfig) -> bool:
    """Whether a stored rank report was made with ``config`` (settings added to the LPS network since,
    absent from the stored ones, count as their defaults)."""
    new = json.loads(json.dumps(dataclasses.asdict(config)))
    if old is None or set(old) != set(new):
        return False
    lps_defaults = json.loads(json.dumps(dataclasses.asdict(EvalConfig())))
    return all(old[k] == new[k] for k in new if k != "lps") and {**lps_defaults, **old["lps"]} == new["lps"]


def _read_if(path: Path, ok: Any) -> dict[str, Any] | None:
    """The JSON at ``path`` if it exists and ``ok(it)``; else None (to be recomputed)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if ok(data) else None


def _add_lps_variant(
    report: dict[str, Any],
    d: Path,
    set_dir: Path,
    config: RankConfig,
    name: str,
    weights: list[float],
    overrides: dict[str, Any],
) -> None:
    """Add the score ``lps[name]`` (LPS with branch weights ``weights`` and the second-order settings
    ``overrides``) and its tau to a rank report."""
    from paramtransfer.data.task import load_task
    from paramtransfer.models.store import load_model
    from paramtransfer.selection.rank import Candidate, lps_scores, weighted_tau

    key, path = f"lps[{name}]", d / f"lps_{_safe(name)}.json"
    lps = dataclasses.replace(config.lps, lps_weights=list(weights), **overrides)
    cfg = dataclasses.replace(config, lps=lps)
    # the whole config, second-order settings included, keys the cache (once the seed alone did)
    stored = json.loads(json.dumps(dataclasses.asdict(cfg)))
    cached = _read_if(path, lambda v: v.get("weights") == list(weights) and v.get("config") == stored)
    if cached is None:
        rows = report["candidates"]
        cands = [Candidate(row["name"], Path(row["path"]), row["task"]) for row in rows]
        in_shape = tuple(load_model(cands[0].path).in_shape)
        task = load_task(report["target"], cfg.shots, cfg.seed, test_limit=cfg.test_limit, in_shape=in_shape)
        sims = lps_scores(set_dir, cands, task, cfg)
        tau = weighted_tau(sims, [row["finetune_accuracy"] for row in rows])
        tau = tau if math.isfinite(tau) else None  # undefined: every accuracy (or score) tied
        cached = {"weights": list(weights), "config": stored, "similarity": sims, "tau": tau}
        atomic_write_json(path, cached)
    for row, sim in zip(report["candidates"], cached["similarity"], strict=True):
        row[key] = sim
    report["weighted_tau"][key] = cached["tau"]


def embedding_time(t: TimingSettings, e: EvalSettings) -> list[dict[str, Any]]:
    """Median time to embed one model (all branches, alignment included) for lenets of growing width.

    Every branch is computed (``w_l = 1`` for all layers), the worst case; with the paper's
    ``w = (1, 0, ...)`` only the first layer is read and the time barely grows with the model.
    """
    rows = []
    for width in t.widths:
        net = build_model("lenet", 2, width=width, hidden=4 * width)
        params = [p.unsqueeze(0) for p in model_parameters(net)]
        shapes = [p.shape[1:] for p in params]
        row: dict[str, Any] = {"width": width, "params": sum(p.numel() for p in net.parameters())}
        for label, weights in (("first_branch", None), ("all_branches", [1.0] * len(shapes))):
            lps = SecondOrderNet(shapes, e.embed_dim, 10, filters=e.filters, weights=weights)
            with torch.no_grad():
                lps.embed(params)  # warm-up
                times = []
                for _ in range(t.repeats):
                    start = time.perf_counter()
                    lps.embed(params)
                    times.append(time.perf_counter() - start)
            row[f"{label}_ms"] = 1000 * statistics.median(times)
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _safe(spec: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-=." else "_" for ch in spec).strip("_")


# ---- the report ------------------------------------------------------------------------------------

_NAMES = {
    "random": "random prediction",
    "flat_fc": "only one FC layer",
    "frobenius_fc": "Frobenius+FC, w/o alignment",
    "lps": "Frobenius+FC, w/ alignment (LPS)",
}
_SCORE_LABELS = {
    "lps": "LPS",
    "logme": "LogME",
    "leep": "LEEP",
    "nce": "NCE",
    "hscore": "H-score",
    "hscore_shrinkage": "H-score (shrinkage)",
    "transrate": "TransRate",
}


def _score_label(score: str) -> str:
    """``"lps[all branches]"`` -> ``"LPS (all branches)"``."""
    name, _, variant = score.partition("[")
    return _SCORE_LABELS[name] + (f" ({variant.rstrip(']')})" if variant else "")


def _binomial_noise(p: float, q: float, n: int) -> float:
    """Standard error of the difference of two accuracies measured on the same ``n`` test models."""
    return ((p * (1 - p) + q * (1 - q)) / max(n, 1)) ** 0.5


def _verdict(diff: float, noise: float) -> str:
    if diff > noise:
        return "agree"
    if diff < -noise:
        return "disagree"
    return "inconclusive"


def lps_claims(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's claims (Secs. 5.1-5.5) judged on a benchmark summary.

    Each claim is "A beats B" with A and B fractions (accuracies, or Spearman's rho against 0).
    It *agrees* when our A - B exceeds the noise, *disagrees* when it is below minus the noise, and is
    *inconclusive* in between. The noise is the binomial standard error of the difference of two
    accuracies on the same ``n`` test models, ``sqrt((a(1-a) + b(1-b)) / n)``, and for rho the standard
    error of the mean over the queries.

    Returns:
        One dict per claim: ``text``, ``paper``, ``better`` / ``worse`` (``(label, value)``), ``diff`` and
        ``noise`` (points, i.e. x100), ``verdict``.
    """
    ev = summary["eval"]
    claims = []

    def add(text: str, paper: str, better: tuple[str, float], worse: tuple[str, float], noise: float) -> None:
        diff = 100 * (better[1] - worse[1])
        claims.append(
            {
                "text": text,
                "paper": paper,
                "better": better,
                "worse": worse,
                "diff": diff,
                "noise": 100 * noise,
                "verdict": _verdict(diff, 100 * noise),
            }
        )

    def beats_baselines(section: str, metric: str, n: int, text: str, paper: str) -> None:
        m = ev[section]["methods"]
        best = max((k for k in m if k != "lps"), key=lambda k: m[k][metric])
        a, b = m["lps"][metric], m[best][metric]
        add(text, paper, (f"LPS {metric}", a), (f"{_NAMES[best]} {metric}", b), _binomial_noise(a, b, n))

    if "classification" in ev:
        beats_baselines(
            "classification",
            "top1",
            ev["classification"]["test_models"],
            "LPS classifies tasks better than every baseline",
            "Table 1: top-1 79.8 vs at most 5.5",
        )
    if "retrieval" in ev:
        beats_baselines(
            "retrieval",
            "rank1",
            ev["retrieval"]["queries"],
            "LPS retrieves models of the query's task better than every baseline",
            "Table 2: rank-1 80.7 vs at most 15.0",
        )
    if "transferability" in ev:
        m = ev["transferability"]["methods"]["lps"]
        # the paper applies models of one task to another: judge by rho over the other tasks' models when
        # the report has it (results from before it was added have only rho over every other model)
        suffix, label = (
            ("_other_tasks", "LPS Spearman ρ, other tasks")
            if m.get("queries_other_tasks")
            else (
                "",
                "LPS Spearman ρ",
            )
        )
        mean, std, queries = (m[f"{k}{suffix}"] for k in ("mean_spearman", "std_spearman", "queries"))
        if mean is not None:
            # one query has no spread to judge by: inconclusive
            noise = (std or 0.0) / queries**0.5 if queries > 1 else math.inf
            add(
                "parameter similarity grows with transferability (k-means ARI)",
                "Fig. 3a: roughly proportional",
                (label, mean),
                ("no relation", 0.0),
                noise,
            )
    n = ev.get("classification", {}).get("test_models", 0)
    if "branches" in ev and len(ev["branches"]["top1"]) > 1:
        top1 = ev["branches"]["top1"]
        other = max(range(1, len(top1)), key=lambda i: top1[i])
        add(
            "the first branch is the most discriminative",
            "Fig. 3b: branch 1 79.8, the others far lower",
            ("branch 1 top1", top1[0]),
            (f"branch {other + 1} top1", top1[other]),
            _binomial_noise(top1[0], top1[other], n),
        )
    if "alignment" in ev:
        a = ev["alignment"]["top1"]
        both = statistics.fmean(a["both"])
        for other in ("filter", "channel", "none"):
            value = statistics.fmean(a[other])
            add(
                f"aligning filters and channels beats {other} alignment (branches >= 2)",
                "Fig. 3c: both alignments matter",
                ("both, mean top1", both),
                (f"{other}, mean top1", value),
                _binomial_noise(both, value, n * len(a["both"])),
            )
    return claims


def render_lps(summary: dict[str, Any], paper: dict[str, Any] | None, results_dir: Path) -> Any:
    """The ``lps`` kind's report section (see :mod:`paramtransfer.bench.suites`)."""

    def side(label: str, value: float) -> Side:
        return Side(label, label, label, {"status": "ok", "test_mean": value, "test_std": 0.0})

    claims = [
        ClaimResult(
            c["text"],
            c["verdict"],
            side(*c["better"]),
            side(*c["worse"]),
            paper=c["paper"],
            diff=c["diff"],
            noise=c["noise"],
        )
        for c in lps_claims(summary)
    ]
    text = format_lps_bench(summary, paper)
    return Section(text, sorted(results_dir.glob("*.png")), claims)


def _variant_title(name: str, value: Any) -> str:
    _, overrides = variant_settings(name, value)
    weights = value if isinstance(value, list) else value["weights"]  # as the YAML writes them
    extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in overrides.items())
    return f"LPS, {name} (w = {tuple(weights)}{extra})"


def format_lps_bench(
    summary: dict[str, Any], paper: dict[str, Any] | None = None, *, with_claims: bool = True
) -> str:
    """Markdown: the model set, Tables 1-2 beside the paper's, Fig. 3 as tables, ranking tau, timing."""
    paper = paper or {}
    ev, ms = summary["eval"], summary["modelset"]
    variants = summary.get("eval_variants") or {}
    b = summary["config"]["build"]
    lines = [
        f"Model set: {ms['models']} `{b['arch']}` models ({b['arch_kwargs']}) on {ms['tasks']} "
        f"{b['dataset']} class pairs, {b['epochs']} epochs at lr {b['lr']}"
        + (f" on {b['limit']} training images each" if b.get("limit") else "")
        + f"; mean test accuracy {100 * ms['mean_test_accuracy']:.2f}%; "
        f"{ms['train_time_s'] / 60:.0f} min of training.",
        "",
    ]

    def table(title: str, section: str, keys: list[str], paper_key: str) -> None:
        if section not in ev:
            return
        ref = paper.get(paper_key, {})
        head = [*keys, *(f"paper {k}" for k in keys if ref)]
        lines.extend(
            [f"**{title}**", "", "| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        )
        rows = [(_NAMES[k], m, ref.get(k, [])) for k, m in ev[section]["methods"].items()]
        rows += [
            (
                _variant_title(name, summary["config"]["eval"]["variants"][name]),
                v[section]["methods"]["lps"],
                [],
            )
            for name, v in variants.items()
            if section in v
        ]
        for title_, metrics, paper_values in rows:
            cells = [f"{100 * metrics[k]:.1f}" for k in keys]
            if ref:
                cells += [f"{v:.1f}" for v in paper_values] or ["—"] * len(keys)
            lines.append(f"| {title_} | " + " | ".join(cells) + " |")
        lines.append("")

    n_cls = ev.get("classification", {})
    table(
        f"Task classification (Table 1; %, {n_cls.get('train_models')} train / "
        f"{n_cls.get('test_models')} test models, {n_cls.get('num_tasks')} tasks)",
        "classification",
        ["top1", "top5", "top10"],
        "table1",
    )
    ret = ev.get("retrieval", {})
    table(
        f"Task retrieval (Table 2; %, {len(ret.get('test_tasks', []))} held-out tasks, "
        f"{ret.get('queries')} queries, gallery {ret.get('gallery')})",
        "retrieval",
        ["rank1", "rank5", "rank10"],
        "table2",
    )
    if "transferability" in ev:
        lines += [
            "**Transferability (Fig. 3a):** mean Spearman ρ between a query's similarity to every other "
            "model and that model's k-means ARI on the query task's test images; over all other models "
            "(the query's own task's models included) and over the other tasks' models only (the paper's "
            "setting: a model of one task applied to another)",
            "",
            "| method | mean ρ, all | std over queries | mean ρ, other tasks only | std over queries |",
            "|---|---|---|---|---|",
        ]
        rows = [(_NAMES[k], m) for k, m in ev["transferability"]["methods"].items()]
        rows += [
            (f"LPS, {name}", v["transferability"]["methods"]["lps"])
            for name, v in variants.items()
            if "transferability" in v
        ]
        for title_, m in rows:
            cells = []
            for suffix in ("", "_other_tasks"):
                rho, sd = m.get(f"mean_spearman{suffix}"), m.get(f"std_spearman{suffix}")
                cells += ["—" if rho is None else f"{rho:+.3f}", "—" if sd is None else f"{sd:.3f}"]
            lines.append(f"| {title_} | " + " | ".join(cells) + " |")
        lines.append("")
    if "branches" in ev:
        top1 = ev["branches"]["top1"]
        lines += [
            f"**Per-branch top-1 (Fig. 3b; %, chance {100 * ev['branches']['chance']:.1f})**",
            "",
            "| branch | " + " | ".join(str(i + 1) for i in range(len(top1))) + " |",
            "|---" * (len(top1) + 1) + "|",
            "| top-1 | " + " | ".join(f"{100 * v:.1f}" for v in top1) + " |",
            "",
        ]
    if "alignment" in ev:
        a = ev["alignment"]
        lines += [
            "**Alignment ablation (Fig. 3c; top-1 %, one branch at a time)**",
            "",
            "| alignment | " + " | ".join(f"branch {i}" for i in a["branches"]) + " |",
            "|---" * (len(a["branches"]) + 1) + "|",
        ]
        lines += [
            f"| {k} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + " |" for k, vals in a["top1"].items()
        ]
        lines.append("")
    if "rank" in summary:
        r = summary["rank"]
        scores = r.get("scores", SCORE_NAMES)
        lines += [
            f"**Ranking {r['candidates']} candidate sources (one model per task)**: weighted Kendall τ "
            "between each score and the accuracy after fine-tuning every candidate (mean ± std over seeds)",
            "",
            "| target | " + " | ".join(_score_label(s) for s in scores) + " | fine-tuned accuracy range |",
            "|---" * (len(scores) + 2) + "|",
        ]
        for target, t in r["targets"].items():
            cells = []
            for s in scores:
                v = t["weighted_tau"][s]
                cells.append("—" if v["mean"] is None else f"{v['mean']:+.3f} ± {v['std']:.3f}")
            lo, hi = t["finetune_accuracy_range"]
            lines.append(f"| {target} | " + " | ".join(cells) + f" | {100 * lo:.1f}–{100 * hi:.1f} |")
        lines.append("")
    if "timing" in summary:
        lines += [
            "**Time to embed one model** (median, one process; every branch = all layers aligned)",
            "",
            "| lenet width | parameters | first branch (ms) | every branch (ms) |",
            "|---|---|---|---|",
        ]
        for row in summary["timing"]:
            lines.append(
                f"| {row['width']} | {row['params']:,} | {row['first_branch_ms']:.2f} | "
                f"{row['all_branches_ms']:.1f} |"
            )
        lines.append("")
    claims = lps_claims(summary) if with_claims else []
    if claims:
        lines += [
            "**The paper's claims on our model set** (one evaluation: the noise is the binomial standard "
            "error of the difference of two accuracies on the same test models; for ρ, the standard error "
            "of the mean over the queries)",
            "",
        ]
        for c in claims:
            (bl, bv), (wl, wv) = c["better"], c["worse"]
            lines.append(
                f"- **{c['verdict']}**: {c['text']}. Paper: {c['paper']}. Ours: {bl} {100 * bv:.1f} vs {wl} "
                f"{100 * wv:.1f}: {c['diff']:+.1f} points (noise ±{c['noise']:.1f})."
            )
        lines.append("")
    return "\n".join(lines)


def plot_lps(summary: dict[str, Any], path: Path) -> Path | None:
    """Fig. 3b (top-1 per branch), Fig. 3c (alignment ablation) and the ranking tau per score, side by side
    (only the panels whose results exist); None when there is nothing to draw."""
    from paramtransfer.report.plots import plt, save_figure

    ev = summary["eval"]
    panels = [k for k in ("branches", "alignment") if k in ev] + (["rank"] if "rank" in summary else [])
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "branches":
            top1 = [100 * v for v in ev["branches"]["top1"]]
            ax.bar(range(1, len(top1) + 1), top1, color="tab:blue")
            ax.axhline(100 * ev["branches"]["chance"], color="grey", ls="--", lw=1, label="chance")
            ax.set(
                xlabel="branch (layer)", ylabel="task classification top-1 (%)", title="Fig. 3b: one branch"
            )
            ax.legend()
        elif panel == "alignment":
            a = ev["alignment"]
            width = 0.8 / len(a["top1"])
            for i, (name, values) in enumerate(a["top1"].items()):
                xs = [b + (i - (len(a["top1"]) - 1) / 2) * width for b in a["branches"]]
                ax.bar(xs, [100 * v for v in values], width, label=name)
            ax.axhline(100 * a["chance"], color="grey", ls="--", lw=1)
            ax.set(xlabel="branch (layer)", ylabel="top-1 (%)", title="Fig. 3c: alignment ablation")
            ax.legend(fontsize=7)
        else:
            targets = summary["rank"]["targets"]
            scores = summary["rank"].get("scores", SCORE_NAMES)
            width = 0.8 / len(scores)
            for i, score in enumerate(scores):
                means = [t["weighted_tau"][score]["mean"] for t in targets.values()]
                xs = [j + (i - (len(scores) - 1) / 2) * width for j in range(len(targets))]
                ax.bar(xs, [m if m is not None else 0.0 for m in means], width, label=_score_label(score))
            ax.axhline(0, color="black", lw=0.5)
            ax.set_xticks(range(len(targets)), list(targets), fontsize=7)
            ax.set(ylabel="weighted Kendall τ", title="ranking sources vs fine-tuned accuracy")
            ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=110)


if "lps" not in KINDS.names():  # a re-imported module must not register twice
    register_kind("lps", run_lps_bench, render_lps)
