"""Model sets for LPS (Wang et al., "Learnable Parameter Similarity", Sec. 5): build one, evaluate on it.

The paper's ModelSet500 splits CIFAR-100 into 50 two-class tasks and trains 10 ResNet-20s per task.
Here a model set holds every pair of classes of Fashion-MNIST or digits (45 tasks, in a fixed order)
with ``M`` models per task, trained from scratch, each with its own seed (its own initialisation and
batch order; the task's data split is the same for all of them)::

    DIR/modelset.json            the build settings (a re-run must use the same ones)
    DIR/index.json               one entry per finished model: path, task, task_id, seed, arch, accuracies
    DIR/models/<task>/<seed>/    model.safetensors + meta.json (see paramtransfer.models.store)

:func:`evaluate_modelset` trains second-order networks on the models' weights and writes ``eval.json``:

* ``classification`` (Sec. 5.1, Table 1): 80% of each task's models train, 20% test; top-1/5/10;
* ``retrieval`` (Sec. 5.2, Table 2): 4/5 of the tasks train, 2 query models per held-out task, the
  other models of the held-out tasks are the gallery; rank-1/5/10 and mAP;
* ``transferability`` (Sec. 5.3, Fig. 3a): Spearman correlation between a query model's similarity to
  every other model and that model's k-means ARI on the query task's test images, reported twice: over
  every other model (``mean_spearman``, which includes the other models of the query's own task) and
  over the models of the other tasks only (``mean_spearman_other_tasks``, the paper's setting: a model
  trained on one task applied to another);
* ``branches`` (Sec. 5.4, Fig. 3b): task classification top-1 with one branch at a time;
* ``alignment`` (Sec. 5.5, Fig. 3c): the same on branches >= 2 with both / filter / channel / no alignment.

No two models share an initialisation, not even across tasks (model seed ``seed + 1000 * task_id + k``).
Short training on a two-class task leaves a lenet's weights within ~10-25% (relative norm) of their
initial values, so with seeds shared across tasks (``seed + k``) the nearest model by raw weights was
always the same seed's model of another task (digits, 45 x 6 lenets) and task classification fell far
below chance.

Every table compares LPS with the baselines of Tables 1-2: random prediction, "only one FC layer"
(:class:`FlatFC`) and "Frobenius + FC, w/o alignment" (:class:`FrobeniusFC`).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paramtransfer.data.task import load_task
from paramtransfer.errors import UserError
from paramtransfer.experiments.executors import Executor, make_executor
from paramtransfer.experiments.run import train_model
from paramtransfer.models.store import META, WEIGHTS, load_model, save_model
from paramtransfer.models.zoo import build_model
from paramtransfer.selection.lps import (
    ALIGNMENTS,
    FlatFC,
    FrobeniusFC,
    SecondOrderNet,
    model_parameters,
    similarity_matrix,
)
from paramtransfer.train.checkpoint import atomic_write_json

INDEX = "index.json"
SETTINGS = "modelset.json"
EVAL = "eval.json"
DATASET_CLASSES = {"fashion": 10, "digits": 10}
# Two-class Fashion pairs are near 99% after an epoch or two over ~10,800 images; a digits pair has ~220
# training images, so it needs more passes for a comparable number of steps.
DEFAULT_EPOCHS = {"fashion": 3, "digits": 20}
SECTIONS = ("classification", "retrieval", "transferability", "branches", "alignment")
METHODS = ("random", "flat_fc", "frobenius_fc", "lps")
TOP_K = (1, 5, 10)
SEEDS_PER_TASK = 1000  # model k of task t has seed ``seed + 1000 * t + k``

Job = dict[str, Any]


# ---- building --------------------------------------------------------------------------------------


def task_pairs(dataset: str) -> list[str]:
    """Every pair of classes of ``dataset`` as a task spec, in a fixed (lexicographic) order.

    Example:
        >>> task_pairs("digits")[:3], len(task_pairs("digits"))
        (['digits[0,1]', 'digits[0,2]', 'digits[0,3]'], 45)
    """
    if dataset not in DATASET_CLASSES:
        raise UserError(
            f"unknown dataset {dataset!r} for a model set; use one of {', '.join(DATASET_CLASSES)}"
        )
    pairs = itertools.combinations(range(DATASET_CLASSES[dataset]), 2)
    return [f"{dataset}[{a},{b}]" for a, b in pairs]


def build_modelset(
    dataset: str,
    out: str | Path,
    *,
    tasks: str = "pairs",
    models_per_task: int = 10,
    arch: str = "lenet",
    epochs: int | None = None,
    max_tasks: int | None = None,
    shots: int | None = None,
    limit: int | None = None,
    lr: float = 0.02,
    seed: int = 0,
    arch_kwargs: dict[str, Any] | None = None,
    train_options: dict[str, Any] | None = None,
    progress: bool = True,
    executor: str | Executor | None = None,
) -> list[dict[str, Any]]:
    """Train ``models_per_task`` models on every task of ``dataset`` and index them (Sec. 5, ModelSet500).

    Each model is a ``arch`` 2-class classifier trained from scratch (method ``scratch``, SGD with
    momentum and a cosine schedule, no early stop; the best validation epoch is kept) with seed
    ``seed + 1000 * task_id + k`` for the ``k``-th model of the ``task_id``-th task (never shared across
    tasks, see the module docstring), saved under ``out/models/<task>/<seed>/``. ``out/index.json`` is
    rewritten atomically after each finished model; a re-run skips the models it lists (whose files
    exist) and trains the rest, so a build killed part-way resumes, and a larger ``models_per_task`` or
    ``max_tasks`` extends an existing set.

    Args:
        dataset: ``fashion`` or ``digits`` (10 classes each, hence 45 pair tasks).
        out: the model set directory.
        tasks: how tasks are formed; only ``"pairs"`` (the paper's two-class tasks).
        models_per_task: ``M``, models per task (the paper: 10).
        epochs: training epochs per model (default: 3 for fashion, 20 for digits, see ``DEFAULT_EPOCHS``).
        max_tasks: keep only the first ``max_tasks`` tasks.
        shots, limit: training examples per class / in total (default: all); see :func:`load_task`.
        lr: learning rate.
        seed: the data split's seed and the base of the model seeds.
        arch_kwargs: architecture options, e.g. ``{"width": 8, "hidden": 32}`` for a small lenet.
        train_options: :class:`TrainConfig` fields (default batch size 32, no early stopping).
        executor: ``"local"`` (default) trains in this process, one model after another; ``"ray"`` (or a
            :class:`~paramtransfer.experiments.executors.RayExecutor`) trains each model as one Ray task,
            and the index grows as they finish.

    Returns:
        The index entries, sorted by task and seed.
    """
    runner = make_executor(executor)
    specs = _select_tasks(dataset, tasks, max_tasks)
    if not 1 <= models_per_task <= SEEDS_PER_TASK:
        raise UserError(f"models_per_task must lie in [1, {SEEDS_PER_TASK}] (got {models_per_task})")
    settings = {
        "dataset": dataset,
        "tasks": tasks,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "epochs": epochs if epochs is not None else DEFAULT_EPOCHS[dataset],
        "lr": lr,
        "shots": shots,
        "limit": limit,
        "seed": seed,
        "train_options": {"batch_size": 32, "patience": None, **(train_options or {})},
    }
    root = Path(out)
    done = {e["path"]: e for e in read_index(root, missing_ok=True) if _files_exist(root / e["path"])}
    _check_settings(root, settings, has_models=bool(done))
    jobs = [j for j in _jobs(root, specs, models_per_task, settings) if j["path"] not in done]
    atomic_write_json(root / INDEX, _sorted(done.values()))  # drops entries whose files are gone
    bar = _bar(progress, total=len(done) + len(jobs), initial=len(done), desc="models")
    for _, entry in runner.map(train_job, jobs):
        done[entry["path"]] = entry
        atomic_write_json(root / INDEX, _sorted(done.values()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(task=entry["task"], test=f"{entry['test_accuracy']:.3f}")
    if bar is not None:
        bar.close()
    return _sorted(done.values())


def parse_build_sets(items: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--set`` items of ``modelset build``: ``arch.FIELD=V`` goes to the architecture (e.g.
    ``arch.width=8``), ``train.FIELD=V`` or a bare :class:`TrainConfig` field to training.

    Returns:
        ``(arch_kwargs, train_options)``.
    """
    from paramtransfer.methods.base import parse_value
    from paramtransfer.train.trainer import TrainConfig

    train_fields = {f.name for f in fields(TrainConfig)}
    arch_kwargs: dict[str, Any] = {}
    train_options: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        scope, _, name = key.strip().rpartition(".")
        if not eq or not name or not raw.strip():
            raise UserError(f"malformed --set {item!r}; write KEY=VALUE, e.g. --set arch.width=8")
        if scope == "arch":
            arch_kwargs[name] = parse_value(raw.strip())
        elif scope in ("train", "") and name in train_fields:
            train_options[name] = parse_value(raw.strip())
        else:
            raise UserError(
                f"--set {key.strip()}: use arch.FIELD (e.g. arch.width=8, arch.hidden=64) or train.FIELD "
                f"with FIELD one of {', '.join(sorted(train_fields))}"
            )
    return arch_kwargs, train_options


def _select_tasks(dataset: str, tasks: str, max_tasks: int | None) -> list[str]:
    if tasks != "pairs":
        raise UserError(f"unknown task layout {tasks!r}; use pairs (every pair of classes, Sec. 5)")
    specs = task_pairs(dataset)
    if max_tasks is not None:
        if max_tasks < 1:
            raise UserError(f"max_tasks must be at least 1 (got {max_tasks})")
        specs = specs[:max_tasks]
    return specs


def _check_settings(root: Path, settings: dict[str, Any], has_models: bool) -> None:
    """Check that a set with finished models was built with the same settings; else (re)write them."""
    build_model(settings["arch"], 2, **settings["arch_kwargs"])  # an unknown arch or option fails here
    path = root / SETTINGS
    if has_models and path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            what = ", ".join(f"{k}={old.get(k)!r}" for k in changed)
            raise UserError(
                f"{root} was built with {what}; use the same settings to extend it, or a new --out"
            )
        return
    atomic_write_json(path, settings)


def _jobs(root: Path, specs: Sequence[str], models_per_task: int, settings: dict[str, Any]) -> list[Job]:
    """One job per model, as plain data (an executor may send it to another process)."""
    training = ("arch", "arch_kwargs", "epochs", "lr", "shots", "limit", "train_options")
    common = {k: settings[k] for k in training}
    common.update(root=str(root.resolve()), split_seed=settings["seed"])
    jobs = []
    for task_id, spec in enumerate(specs):
        first = settings["seed"] + SEEDS_PER_TASK * task_id
        for model_seed in range(first, first + models_per_task):
            path = f"models/{spec}/{model_seed}"
            jobs.append({**common, "path": path, "task": spec, "task_id": task_id, "seed": model_seed})
    return jobs


def train_job(job: Job) -> dict[str, Any]:
    """Train and save one model of a model set; return its index entry. Self-contained (only plain data
    in and out), so that an executor can run it in another process."""
    task = load_task(job["task"], job["shots"], job["split_seed"], limit=job["limit"])
    result, model = train_model(
        "scratch",
        source=None,
        target=task,
        arch=job["arch"],
        arch_kwargs=job["arch_kwargs"],
        seed=job["seed"],
        lr=job["lr"],
        epochs=job["epochs"],
        train_options=job["train_options"],
    )
    if result.status != "ok" or model is None:
        raise UserError(
            f"training {job['arch']} on {job['task']} (seed {job['seed']}) diverged at lr={job['lr']}; "
            "pass a smaller --lr (finished models are kept)"
        )
    entry = {
        "path": job["path"],
        "task": job["task"],
        "task_id": job["task_id"],
        "seed": job["seed"],
        "arch": job["arch"],
        "classes": list(task.classes),
        "val_accuracy": result.val_accuracy,
        "test_accuracy": result.test_accuracy,
        "wall_time_s": result.wall_time_s,
    }
    save_model(model.to(memory_format=torch.contiguous_format), Path(job["root"]) / job["path"], entry)
    return entry


def _files_exist(directory: Path) -> bool:
    return (directory / WEIGHTS).is_file() and (directory / META).is_file()


def _sorted(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda e: (e["task_id"], e["seed"]))


def read_index(directory: str | Path, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """The entries of ``directory/index.json``."""
    path = Path(directory) / INDEX
    if not path.is_file():
        if missing_ok:
            return []
        raise UserError(
            f"no model set at {directory} (no {INDEX}); build one with "
            f"`paramtransfer modelset build --dataset digits --out {directory}`"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(
            f"{path} is not valid JSON; delete it and build again (finished models retrain)"
        ) from None


def _bar(progress: bool, **kwargs: Any) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(leave=False, **kwargs)


# ---- loading ---------------------------------------------------------------------------------------


@dataclass
class ModelSet:
    """A loaded model set: every model's LPS layer weights, stacked, and its task label.

    ``params[l]`` is ``[N, g, c, kh, kw]`` (:func:`model_parameters` of the ``N`` models), ``labels``
    ``[N]`` indexes ``tasks``.
    """

    root: Path
    entries: list[dict[str, Any]]
    tasks: list[str]
    labels: torch.Tensor
    params: list[torch.Tensor]
    in_shape: tuple[int, ...]

    @property
    def layer_shapes(self) -> list[torch.Size]:
        return [p.shape[1:] for p in self.params]

    def scaled(self, params: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``params`` (default: the whole set's; one model's or a batch) with each layer divided by the
        root mean square of that layer's weights over the set, as :func:`evaluate_modelset` feeds them to
        the second-order networks, whose initialisation assumes unit-variance weights. A positive constant
        per layer leaves every alignment's invariance (max over channels, sort) untouched."""
        rms = [p.square().mean().sqrt() for p in self.params]
        return [p / r for p, r in zip(self.params if params is None else params, rms)]


def load_modelset(directory: str | Path) -> ModelSet:
    """Load the weights of every model listed in ``directory/index.json``."""
    root = Path(directory)
    entries = _sorted(read_index(root))
    if not entries:
        raise UserError(
            f"the model set at {root} has no finished model yet; run `paramtransfer modelset build`"
        )
    tasks = list(dict.fromkeys(e["task"] for e in entries))  # in task_id order
    per_layer: list[list[torch.Tensor]] = []
    first: dict[str, Any] | None = None
    for e in entries:
        model = load_model(root / e["path"])
        described = {k: v for k, v in model.describe().items() if k != "num_classes"}
        if first is None:
            first = described
        elif described != first:
            raise UserError(
                f"{e['path']} is a {described} but the set's first model is a {first}; a model set "
                "must hold one architecture (LPS compares models of the same network, Sec. 6)"
            )
        layers = model_parameters(model)
        per_layer = per_layer or [[] for _ in layers]
        for acc, w in zip(per_layer, layers):
            acc.append(w)
    labels = torch.tensor([tasks.index(e["task"]) for e in entries])
    assert first is not None
    return ModelSet(
        root, entries, tasks, labels, [torch.stack(ws) for ws in per_layer], tuple(first["in_shape"])
    )


# ---- evaluation settings and second-order training -------------------------------------------------


@dataclass
class EvalConfig:
    """How the second-order networks are trained and evaluated.

    The paper (Sec. 5) uses SGD with batch 1 and lr 1e-3, divided by 10 after 40 and 80 of 100 epochs
    (300 epochs for single branches). The defaults are smaller so that a 45-task x 6-model lenet set is
    evaluated in minutes on 2 cores: batches of 8, 20 epochs at lr 0.01 (momentum 0.9) with the same
    steps at 40% and 80%, and the gradient norm clipped to ``grad_clip`` (Eq. 6 sums ``c`` maxima, so
    channel-matched responses grow with the channel count: lenet's first linear layer, 64 channels,
    diverged at lr 0.01 without clipping).
    """

    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 8
    momentum: float = 0.9
    grad_clip: float | None = 5.0
    embed_dim: int = 64
    filters: int = 8
    seed: int = 0
    ari_images: int = 500
    random_trials: int = 100
    lps_weights: list[float] | None = None
    methods: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        for name in ("epochs", "batch_size", "embed_dim", "filters", "ari_images", "random_trials"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.momentum < 0:
            raise UserError(f"need lr > 0 and momentum >= 0; got lr={self.lr}, momentum={self.momentum}")


def _make_net(kind: str, ms: ModelSet, num_classes: int, cfg: EvalConfig, **lps: Any) -> nn.Module:
    """A freshly initialised (seeded) second-order network: ``lps`` or one of the Table 1-2 baselines."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if kind == "flat_fc":
            return FlatFC(ms.layer_shapes, cfg.embed_dim, num_classes)
        if kind == "frobenius_fc":
            return FrobeniusFC(ms.layer_shapes, cfg.embed_dim, num_classes, filters=cfg.filters, **lps)
        if cfg.lps_weights is not None and "weights" not in lps:
            lps["weights"] = cfg.lps_weights
        return SecondOrderNet(ms.layer_shapes, cfg.embed_dim, num_classes, filters=cfg.filters, **lps)


def _train_net(
    net: nn.Module,
    params: list[torch.Tensor],
    labels: torch.Tensor,
    cfg: EvalConfig,
    desc: str,
    progress: bool,
) -> nn.Module:
    """Minimise the net's loss (Eq. 9 for LPS) with SGD, the learning rate divided by 10 after 40% and
    80% of the epochs (the paper's 40/80 of 100)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    milestones = (round(0.4 * cfg.epochs), round(0.8 * cfg.epochs))
    shuffle = torch.Generator().manual_seed(cfg.seed)
    bar = _bar(progress, total=cfg.epochs, desc=desc)
    net.train()
    for epoch in range(cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * 0.1 ** sum(epoch >= m for m in milestones)
        for idx in torch.randperm(len(labels), generator=shuffle).split(cfg.batch_size):
            loss = net.loss([p[idx] for p in params], labels[idx])
            if not torch.isfinite(loss):
                raise UserError(f"{desc}: the loss became non-finite at lr={cfg.lr}; pass a smaller --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            optimizer.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    return net.eval()


def train_second_order(ms: ModelSet, config: EvalConfig | None = None, progress: bool = False) -> nn.Module:
    """An LPS second-order network trained on every model of ``ms`` with its task labels (Eq. 9), on the
    scaled weights (:meth:`ModelSet.scaled`); embed other models with ``net.embed(ms.scaled(params))``."""
    config = config or EvalConfig()
    net = _make_net("lps", ms, len(ms.tasks), config)
    return _train_net(net, ms.scaled(), ms.labels, config, "LPS", progress)


@torch.no_grad()
def _in_chunks(
    fn: Callable[[list[torch.Tensor]], torch.Tensor], params: list[torch.Tensor], chunk: int = 64
) -> torch.Tensor:
    """``fn`` over the models in chunks (channel matching above layer 1 is memory-hungry)."""
    n = params[0].shape[0]
    return torch.cat([fn([p[i : i + chunk] for p in params]) for i in range(0, n, chunk)])


def _select(params: list[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    return [p[idx] for p in params]


# ---- metrics ---------------------------------------------------------------------------------------


def _top_k(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-k accuracy for k in 1, 5, 10, ties broken at random (in expectation: a net that gives every
    task the same score scores like random prediction, not 100%). Shape: ``[n, C]``, ``[n]``."""
    true = logits.gather(1, labels[:, None])
    ahead, tied = (logits > true).sum(1), (logits == true).sum(1)
    return {f"top{k}": float(((k - ahead) / tied).clamp(0, 1).mean()) for k in TOP_K}


def _random_top_k(num_classes: int) -> dict[str, float]:
    """Random prediction: the expected top-k accuracy is ``min(k, C) / C``."""
    return {f"top{k}": min(k, num_classes) / num_classes for k in TOP_K}


def _retrieval_metrics(
    sim: torch.Tensor, query_labels: torch.Tensor, gallery_labels: torch.Tensor, seed: int = 0
) -> dict[str, float]:
    """Rank-k (CMC: a model of the query's task among the k most similar) and mAP.

    Tied similarities are ranked in a random order (seeded), not in the gallery's order (which is sorted
    by task and would favour some tasks).

    Shape: ``sim [Q, G]``, ``query_labels [Q]``, ``gallery_labels [G]``.
    """
    shuffle = torch.randperm(sim.shape[1], generator=torch.Generator().manual_seed(seed))
    order = sim[:, shuffle].argsort(dim=1, descending=True, stable=True)
    relevant = (gallery_labels[shuffle][order] == query_labels[:, None]).float()  # [Q, G], best first
    first_hit = torch.where(relevant.any(1), relevant.argmax(1), relevant.shape[1])
    precision = relevant.cumsum(1) / torch.arange(1, relevant.shape[1] + 1)
    average_precision = (precision * relevant).sum(1) / relevant.sum(1).clamp(min=1)
    out = {f"rank{k}": float((first_hit < k).float().mean()) for k in TOP_K}
    out["map"] = float(average_precision.mean())
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, tied values sharing the mean of their ranks."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    return ((last - counts + 1 + last) / 2)[inverse]


def _spearman(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float | None:
    """Spearman's rank correlation: the Pearson correlation of the ranks (ties averaged); ``None`` when
    either side is constant (undefined)."""
    rx = _ranks(torch.as_tensor(x, dtype=torch.float64))
    ry = _ranks(torch.as_tensor(y, dtype=torch.float64))
    if len(rx) != len(ry):
        raise ValueError(f"spearman needs two sequences of one length, got {len(rx)} and {len(ry)}")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else None


def _rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rho with scipy when it is installed, else :func:`_spearman`."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if len(x) < 2 or bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return None
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return _spearman(x, y)
    rho = float(spearmanr(x.numpy(), y.numpy()).statistic)
    return rho if math.isfinite(rho) else None


# ---- the sections of eval.json ---------------------------------------------------------------------


@dataclass
class _Splits:
    """Which models train and test in Sec. 5.1 (per task) and 5.2 (per task set)."""

    cls_train: torch.Tensor
    cls_test: torch.Tensor
    ret_train: torch.Tensor  # models of the training tasks
    query: torch.Tensor
    gallery: torch.Tensor
    ret_train_tasks: list[int]
    ret_test_tasks: list[int]


def _splits(ms: ModelSet, seed: int) -> _Splits:
    """Sec. 5.1: per task 80% train / 20% test (8/2 of 10, at least 1 test model). Sec. 5.2: 4/5 of the
    tasks train, the rest are held out; 2 query models per held-out task (1 when it has only 2), the
    others the gallery."""
    gen = torch.Generator().manual_seed(seed)
    num_tasks = len(ms.tasks)
    cls_train, cls_test, query, gallery, ret_train = [], [], [], [], []
    held_out = sorted(torch.randperm(num_tasks, generator=gen)[: max(1, round(num_tasks / 5))].tolist())
    for t in range(num_tasks):
        idx = torch.nonzero(ms.labels == t).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = max(1, round(0.2 * len(idx)))
        cls_test.append(idx[:n_test])
        cls_train.append(idx[n_test:])
        if t in held_out:
            n_query = min(2, len(idx) - 1)
            query.append(idx[:n_query])
            gallery.append(idx[n_query:])
        else:
            ret_train.append(idx)
    cat = torch.cat
    train_tasks = [t for t in range(num_tasks) if t not in held_out]
    return _Splits(
        cat(cls_train), cat(cls_test), cat(ret_train), cat(query), cat(gallery), train_tasks, held_out
    )


def _check_evaluable(ms: ModelSet) -> None:
    counts = torch.bincount(ms.labels, minlength=len(ms.tasks))
    smallest = int(counts.argmin())
    if int(counts[smallest]) < 2:
        raise UserError(
            f"task {ms.tasks[smallest]} has {int(counts[smallest])} model; evaluation needs at least 2 per "
            "task (train and test, Sec. 5.1); build with --models-per-task 2 or more"
        )
    if len(ms.tasks) < 3:
        raise UserError(
            f"the model set has {len(ms.tasks)} tasks; evaluation needs at least 3 (retrieval holds one "
            "out and trains on the others, Sec. 5.2); build with a larger --max-tasks"
        )


class _Evaluator:
    """Trains each second-order network once and shares it between the sections that use it; the
    networks read the weights scaled per layer (:meth:`ModelSet.scaled`)."""

    def __init__(self, ms: ModelSet, cfg: EvalConfig, progress: bool) -> None:
        self.ms, self.cfg, self.progress = ms, cfg, progress
        self.params = ms.scaled()
        self.splits = _splits(ms, cfg.seed)
        self._retrieval_nets: dict[str, nn.Module] = {}
        self._branch_top1: dict[tuple[int, str], float] = {}

    def _fit(self, kind: str, train_idx: torch.Tensor, desc: str, **lps: Any) -> nn.Module:
        labels = self.ms.labels[train_idx]
        classes, labels = torch.unique(labels, return_inverse=True)
        net = _make_net(kind, self.ms, len(classes), self.cfg, **lps)
        return _train_net(net, _select(self.params, train_idx), labels, self.cfg, desc, self.progress)

    def _classify(self, net: nn.Module) -> dict[str, float]:
        test = self.splits.cls_test
        logits = _in_chunks(lambda p: net(p).logits, _select(self.params, test))
        return _top_k(logits, self.ms.labels[test])

    def _second_order(self) -> list[str]:
        """The second-order methods asked for (``random`` needs no network and is always reported)."""
        return [m for m in METHODS[1:] if m in self.cfg.methods]

    def classification(self) -> dict[str, Any]:
        """Sec. 5.1 / Table 1."""
        methods = {"random": _random_top_k(len(self.ms.tasks))}
        for kind in self._second_order():
            methods[kind] = self._classify(self._fit(kind, self.splits.cls_train, f"{kind}: classification"))
        return {
            "train_models": len(self.splits.cls_train),
            "test_models": len(self.splits.cls_test),
            "num_tasks": len(self.ms.tasks),
            "methods": methods,
        }

    def retrieval_net(self, kind: str) -> nn.Module:
        if kind not in self._retrieval_nets:
            self._retrieval_nets[kind] = self._fit(kind, self.splits.ret_train, f"{kind}: retrieval")
        return self._retrieval_nets[kind]

    def embeddings(self, kind: str) -> torch.Tensor:
        """Every model's embedding by the retrieval-trained network (random ones for ``random``)."""
        if kind == "random":
            gen = torch.Generator().manual_seed(self.cfg.seed)
            return torch.randn(len(self.ms.labels), self.cfg.embed_dim, generator=gen)
        return _in_chunks(self.retrieval_net(kind).embed, self.params)

    def retrieval(self) -> dict[str, Any]:
        """Sec. 5.2 / Table 2: rank the gallery by cosine similarity of the embeddings."""
        s, labels = self.splits, self.ms.labels
        methods = {"random": self._random_retrieval()}
        for kind in self._second_order():
            emb = self.embeddings(kind)
            sim = similarity_matrix(emb[s.query], emb[s.gallery])
            methods[kind] = _retrieval_metrics(sim, labels[s.query], labels[s.gallery], self.cfg.seed)
        return {
            "train_tasks": [self.ms.tasks[t] for t in s.ret_train_tasks],
            "test_tasks": [self.ms.tasks[t] for t in s.ret_test_tasks],
            "queries": len(s.query),
            "gallery": len(s.gallery),
            "methods": methods,
        }

    def _random_retrieval(self) -> dict[str, float]:
        """Random prediction: the metrics of random similarities, averaged over ``random_trials`` draws."""
        s, labels = self.splits, self.ms.labels
        gen = torch.Generator().manual_seed(self.cfg.seed)
        draws = [
            _retrieval_metrics(
                torch.rand(len(s.query), len(s.gallery), generator=gen), labels[s.query], labels[s.gallery]
            )
            for _ in range(self.cfg.random_trials)
        ]
        return {k: statistics.fmean(d[k] for d in draws) for k in draws[0]}

    def transferability(self) -> dict[str, Any]:
        """Sec. 5.3 / Fig. 3a: per query model, Spearman(similarity to each other model, that model's ARI of
        k-means with 2 clusters on its penultimate features of the query task's test images).

        Two candidate pools per query: every other model (``mean_spearman``), and only the models of the
        other tasks (``mean_spearman_other_tasks``). The query's own task's models were trained on the
        very task they cluster, so they have both a high ARI and (if LPS works at all) a high similarity;
        in the first pool they alone can make rho positive. The paper applies a model of one task to
        another, i.e. the second pool."""
        s = self.splits
        key = (
            str(self.ms.root.resolve()),
            len(self.ms.entries),
            tuple(s.ret_test_tasks),
            self.cfg.ari_images,
        )
        key += (self.cfg.seed,)
        if key not in _ARI_MEMO:  # the same table for every evaluation of this set in this process
            _ARI_MEMO[key] = _ari_table(self.ms, s.ret_test_tasks, self.cfg, self.progress)
        ari = _ARI_MEMO[key]  # [held-out tasks, N]
        methods = {}
        labels = self.ms.labels.tolist()
        for kind in ("random", *self._second_order()):
            emb = self.embeddings(kind)
            queries = s.query.tolist()
            ari_rows = [ari[s.ret_test_tasks.index(labels[q])] for q in queries]
            methods[kind] = {
                **_query_rhos(emb, queries, ari_rows, labels, own_task=True),
                **_query_rhos(emb, queries, ari_rows, labels, own_task=False, suffix="_other_tasks"),
            }
        mean_ari = {self.ms.tasks[t]: float(ari[i].mean()) for i, t in enumerate(s.ret_test_tasks)}
        return {"ari_images": self.cfg.ari_images, "mean_ari_per_task": mean_ari, "methods": methods}

    def branch_top1(self, branch: int, alignment: str = "both") -> float:
        """Task classification top-1 with only ``branch`` (0-based) weighted (Secs. 5.4-5.5)."""
        key = (branch, alignment)
        if key not in self._branch_top1:
            weights = [float(i == branch) for i in range(len(self.params))]
            desc = f"lps: branch {branch + 1}, {alignment}"
            net = self._fit("lps", self.splits.cls_train, desc, weights=weights, alignment=alignment)
            self._branch_top1[key] = self._classify(net)["top1"]
        return self._branch_top1[key]

    def branches(self) -> dict[str, Any]:
        """Sec. 5.4 / Fig. 3b."""
        top1 = [self.branch_top1(b) for b in range(len(self.params))]
        return {"top1": top1, "chance": 1 / len(self.ms.tasks)}

    def alignment(self) -> dict[str, Any]:
        """Sec. 5.5 / Fig. 3c, on branches >= 2 (branch 1 has one alignment only: Eq. 7 and the sort)."""
        branches = range(1, len(self.params))
        top1 = {a: [self.branch_top1(b, a) for b in branches] for a in ALIGNMENTS}
        return {"branches": [b + 1 for b in branches], "top1": top1, "chance": 1 / len(self.ms.tasks)}


_ARI_MEMO: dict[tuple, torch.Tensor] = {}


def _query_rhos(
    emb: torch.Tensor,
    queries: Sequence[int],
    ari_rows: Sequence[torch.Tensor],
    labels: Sequence[int],
    *,
    own_task: bool,
    suffix: str = "",
) -> dict[str, Any]:
    """Mean and (population) std over the queries of Spearman(cosine similarity of the query's embedding
    to each candidate's, the candidate's ARI on the query task). Candidates: every model but the query;
    without ``own_task``, also none of the query's task. Keys ``mean_spearman``, ``std_spearman``,
    ``queries`` (those with a defined rho), each with ``suffix``."""
    rhos = []
    for q, ari_row in zip(queries, ari_rows, strict=True):
        pool = [j for j in range(len(emb)) if j != q and (own_task or labels[j] != labels[q])]
        others = torch.tensor(pool, dtype=torch.long)
        sims = similarity_matrix(emb[q : q + 1], emb[others])[0]
        rho = _rank_correlation(sims, ari_row[others])
        if rho is not None:
            rhos.append(rho)
    return {
        f"mean_spearman{suffix}": statistics.fmean(rhos) if rhos else None,
        f"std_spearman{suffix}": statistics.pstdev(rhos) if rhos else None,
        f"queries{suffix}": len(rhos),
    }


def _ari_table(ms: ModelSet, tasks: Sequence[int], cfg: EvalConfig, progress: bool) -> torch.Tensor:
    """ARI of 2-means on each model's penultimate features of each task's test images, ``[tasks, N]``."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    images = [load_task(ms.tasks[t], test_limit=cfg.ari_images, in_shape=ms.in_shape).test for t in tasks]
    out = torch.zeros(len(tasks), len(ms.entries))
    bar = _bar(progress, total=len(ms.entries), desc="transferability: k-means")
    for j, entry in enumerate(ms.entries):
        model = load_model(ms.root / entry["path"]).eval()
        for i, split in enumerate(images):
            with torch.no_grad():
                features = model.embed(split.x).numpy()
            kmeans = KMeans(n_clusters=2, n_init=3, random_state=cfg.seed)
            out[i, j] = adjusted_rand_score(split.y.numpy(), kmeans.fit_predict(features))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


# ---- the entry point -------------------------------------------------------------------------------


def evaluate_modelset(
    directory: str | Path,
    *,
    out: str | Path | None = None,
    epochs: int = 20,
    lr: float = 0.01,
    batch_size: int = 8,
    embed_dim: int = 64,
    filters: int = 8,
    seed: int = 0,
    ari_images: int = 500,
    sections: Sequence[str] = SECTIONS,
    lps_weights: Sequence[float] | None = None,
    methods: Sequence[str] = METHODS,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate LPS and its baselines on a model set (Secs. 5.1-5.5) and write ``out/eval.json``.

    ``eval.json`` is rewritten after every section (``"complete": false`` until the last one), so an
    evaluation stopped part-way keeps the sections it finished. Measured on 45 x 6 digits lenets with
    the defaults, one busy core: classification ~2.5 min, retrieval ~2 min (both mostly FlatFC's
    347k-input layer), transferability ~2 min (2,430 k-means), branches + alignment ~15 min, two thirds
    of it Eq. 6 on lenet's first linear layer (256 filters x 64 channels of 4 x 4, ~0.07 s per model
    per epoch); ``sections`` can leave those out.

    Args:
        directory: a model set built by :func:`build_modelset` (at least 3 tasks, 2 models per task).
        out: where ``eval.json`` goes (default: ``directory``).
        epochs, lr, batch_size: SGD for every second-order network (see :class:`EvalConfig`).
        embed_dim: size of a branch's parameter feature (the embedding compared by cosine similarity).
        filters: second-order filters ``g'_l`` per layer.
        seed: seeds the splits, the networks' initialisation and batch order, k-means.
        ari_images: test images per task for the k-means ARI of Sec. 5.3.
        sections: which of ``SECTIONS`` to run.
        lps_weights: Eq. 9's ``w_l`` for the LPS network of classification, retrieval and
            transferability (default: the paper's ``(1, 0, ..., 0)``; branches and alignment always
            weight one branch).
        methods: the second-order methods to train (default: all of ``METHODS``; ``random`` is always
            reported).

    Returns:
        The report written to ``eval.json``: one dict per section (metrics in [0, 1], ``time_s``), the
        settings and the total time. Methods are ``random``, ``flat_fc``, ``frobenius_fc``, ``lps``.
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise UserError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    cfg = EvalConfig(
        epochs,
        lr,
        batch_size,
        embed_dim=embed_dim,
        filters=filters,
        seed=seed,
        ari_images=ari_images,
        lps_weights=list(lps_weights) if lps_weights is not None else None,
        methods=tuple(methods),
    )
    start = time.perf_counter()
    ms = load_modelset(directory)
    _check_evaluable(ms)
    evaluator = _Evaluator(ms, cfg, progress)
    report: dict[str, Any] = {
        "modelset": str(Path(directory)),
        "arch": ms.entries[0]["arch"],
        "num_tasks": len(ms.tasks),
        "num_models": len(ms.entries),
        "layer_shapes": [list(s) for s in ms.layer_shapes],
        "settings": asdict(cfg),
    }
    target = Path(out) if out is not None else Path(directory)
    for name in SECTIONS:
        if name in sections:
            t0 = time.perf_counter()
            report[name] = {**getattr(evaluator, name)(), "time_s": time.perf_counter() - t0}
            # written after every section, so that a long evaluation stopped part-way keeps its results
            report.update(complete=False, time_s=time.perf_counter() - start)
            atomic_write_json(target / EVAL, report)
    report.update(complete=True, time_s=time.perf_counter() - start)
    atomic_write_json(target / EVAL, report)
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A short plain-text table of an ``eval.json`` report."""
    names = {
        "random": "random prediction",
        "flat_fc": "only one FC layer",
        "frobenius_fc": "Frobenius+FC, w/o align",
        "lps": "LPS (Frobenius+FC, aligned)",
    }
    size = f"{report['num_models']} {report['arch']} models, {report['num_tasks']} tasks"
    lines = [f"{size}, evaluated in {report['time_s']:.0f} s"]

    def table(title: str, section: dict[str, Any], keys: Sequence[str]) -> None:
        lines.append(f"\n{title:<30}" + "".join(f"{k:>9}" for k in keys))
        for kind, metrics in section["methods"].items():
            cells = "".join(_cell(metrics[k]) for k in keys)
            lines.append(f"{names[kind]:<30}{cells}")

    if "classification" in report:
        table("task classification (%)", report["classification"], [f"top{k}" for k in TOP_K])
    if "retrieval" in report:
        table("task retrieval (%)", report["retrieval"], [*(f"rank{k}" for k in TOP_K), "map"])
    if "transferability" in report:
        lines.append(f"\n{'transferability (Spearman)':<30}{'all':>9}{'other tasks':>13}")
        for kind, m in report["transferability"]["methods"].items():
            rho = _rho(m.get("mean_spearman"))
            other = _rho(m.get("mean_spearman_other_tasks"))
            lines.append(f"{names[kind]:<30}{rho:>9}{other:>13}")
    if "branches" in report:
        b = report["branches"]
        lines.append(
            f"\n{'LPS top-1 per branch (%)':<30}" + "".join(f"{i + 1:>7}" for i in range(len(b["top1"])))
        )
        lines.append(f"{'one branch, both alignments':<30}" + "".join(_cell(v, 7) for v in b["top1"]))
    if "alignment" in report:
        a = report["alignment"]
        lines.append(f"\n{'alignment ablation, top-1 (%)':<30}" + "".join(f"{i:>7}" for i in a["branches"]))
        for alignment, values in a["top1"].items():
            lines.append(f"{alignment:<30}" + "".join(_cell(v, 7) for v in values))
    return "\n".join(lines)


def _rho(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _cell(value: float, width: int = 9) -> str:
    return f"{100 * value:>{width}.1f}"
