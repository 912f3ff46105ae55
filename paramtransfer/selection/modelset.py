"""Model sets for LPS (Wang et al., "Learnable Parameter Similarity", Sec. 5): build and load one, and
train the second-order network on it.

The paper's ModelSet500 splits CIFAR-100 into 50 two-class tasks and trains 10 ResNet-20s per task.
Here a model set holds every pair of classes of Fashion-MNIST or digits (45 tasks, in a fixed order)
with ``M`` models per task, trained from scratch, each with its own seed (its own initialisation and
batch order; the task's data split is the same for all of them)::

    DIR/modelset.json            the build settings (a re-run must use the same ones)
    DIR/index.json               one entry per finished model: path, task, task_id, seed, arch, accuracies
    DIR/models/<task>/<seed>/    model.safetensors + meta.json (see paramtransfer.models.store)

:func:`train_second_order` trains an LPS second-order network on every model of a set (ranking sources
uses it); the paper's evaluations on a model set (Tables 1-2, Fig. 3) are
:mod:`paramtransfer.bench.modelset`.

No two models share an initialisation, not even across tasks (model seed ``seed + 1000 * task_id + k``).
Short training on a two-class task leaves a lenet's weights within ~10-25% (relative norm) of their
initial values, so with seeds shared across tasks (``seed + k``) the nearest model by raw weights was
always the same seed's model of another task (digits, 45 x 6 lenets) and task classification fell far
below chance.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
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
    FlatFC,
    FrobeniusFC,
    SecondOrderNet,
    model_parameters,
)
from paramtransfer.train.checkpoint import atomic_write_json

INDEX = "index.json"
SETTINGS = "modelset.json"
DATASET_CLASSES = {"fashion": 10, "digits": 10}
# Two-class Fashion pairs are near 99% after an epoch or two over ~10,800 images; a digits pair has ~220
# training images, so it needs more passes for a comparable number of steps.
DEFAULT_EPOCHS = {"fashion": 3, "digits": 20}
METHODS = ("random", "flat_fc", "frobenius_fc", "lps")
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
    only: Sequence[str] | None = None,
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
        only: train only these tasks (e.g. ``["fashion[0,1]"]``), with the task ids and hence the seeds
            they have in the whole set, so that a part of a set can be rebuilt with other settings (a
            longer training, say) from the very same initialisations.

    Returns:
        The index entries, sorted by task and seed.
    """
    runner = make_executor(executor)
    specs = _select_tasks(dataset, tasks, max_tasks)
    if only is not None:
        unknown = sorted(set(only) - set(specs))
        if unknown or not only:
            raise UserError(
                f"only={list(only)!r}: {', '.join(unknown) or 'no task'} is not a task of this set; "
                f"choose among {', '.join(specs[:3])}, ... (every pair of classes, in order)"
            )
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
    if only is not None:  # recorded only when used, so that sets built before the option still extend
        settings["only"] = sorted(only, key=specs.index)
    root = Path(out)
    done = {e["path"]: e for e in read_index(root, missing_ok=True) if _files_exist(root / e["path"])}
    _check_settings(root, settings, has_models=bool(done))
    jobs = [
        j
        for j in _jobs(root, specs, models_per_task, settings)
        if j["path"] not in done and (only is None or j["task"] in only)
    ]
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
