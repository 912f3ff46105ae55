"""Evaluating LPS on a model set (Wang et al., "Learnable Parameter Similarity", Secs. 5.1-5.5).

:func:`evaluate_modelset` trains second-order networks on the models' weights
(:mod:`paramtransfer.selection.modelset` builds the set and trains them) and writes ``eval.json``:

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

Every table compares LPS with the baselines of Tables 1-2: random prediction, "only one FC layer"
(:class:`FlatFC`) and "Frobenius + FC, w/o alignment" (:class:`FrobeniusFC`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paramtransfer.data.task import load_task
from paramtransfer.errors import UserError
from paramtransfer.models.store import load_model
from paramtransfer.selection.lps import (
    ALIGNMENTS,
    similarity_matrix,
)
from paramtransfer.selection.modelset import (
    METHODS,
    EvalConfig,
    ModelSet,
    _bar,
    _make_net,
    _train_net,
    load_modelset,
)
from paramtransfer.train.checkpoint import atomic_write_json

EVAL = "eval.json"
SECTIONS = ("classification", "retrieval", "transferability", "branches", "alignment")
TOP_K = (1, 5, 10)


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


def classification_top_k(
    ms: ModelSet,
    cfg: EvalConfig,
    *,
    params: list[torch.Tensor] | None = None,
    train_per_task: int | None = None,
    kind: str = "lps",
    **lps: Any,
) -> dict[str, float]:
    """Sec. 5.1's task classification with one second-order network, for studies of the protocol.

    The split is ``cfg.seed``'s (the one :func:`evaluate_modelset` uses: 80/20 of each task's models),
    the network ``kind`` (``lps``, ``frobenius_fc``, ``flat_fc``) with ``lps`` passed to it (e.g.
    ``weights=[0, 1, 0, 0]``, ``alignment="channel"``).

    Args:
        params: the weights the network reads, one ``[N, g, c, kh, kw]`` tensor per layer in the set's
            model order (default: :meth:`ModelSet.scaled`), e.g. another normalisation of them.
        train_per_task: train on only the first ``n`` of each task's training models (the test models
            stay the same), to measure how top-1 grows with the number of models per task.

    Returns:
        ``top1``, ``top5``, ``top10`` on the split's test models, in [0, 1].
    """
    params = ms.scaled() if params is None else params
    if [p.shape for p in params] != [p.shape for p in ms.params]:
        raise UserError("params must hold one tensor per layer of the set's shape, in the set's model order")
    split = _splits(ms, cfg.seed)
    train = split.cls_train
    if train_per_task is not None:
        if train_per_task < 1:
            raise UserError(f"train_per_task must be at least 1 (got {train_per_task})")
        labels = ms.labels[train]
        train = torch.cat([train[labels == t][:train_per_task] for t in range(len(ms.tasks))])
    net = _make_net(kind, ms, len(ms.tasks), cfg, **lps)
    net = _train_net(net, _select(params, train), ms.labels[train], cfg, f"{kind}: classification", False)
    test = split.cls_test
    return _top_k(_in_chunks(lambda p: net(p).logits, _select(params, test)), ms.labels[test])


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
