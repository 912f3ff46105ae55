"""The baselines every paper compares against: scratch (NoTL), fine-tuning (full, FT-l, last-k,
stochastic), linear probe (feature extractor), K-NN and random guess."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.methods.base import (
    Method,
    MethodConfig,
    fresh_model,
    register_method,
    transfer_copy,
)
from paramtransfer.models.layered import LayeredNet
from paramtransfer.runtime import Runtime


@register_method("scratch")
class Scratch(Method):
    """No transfer (NoTL): the source's architecture, randomly initialised, trained on the target."""

    needs_source = False
    prefix_cacheable = True  # its loss is the model's own forward: a frozen prefix may be cached

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        return fresh_model(source, num_classes, arch, in_shape, seed)


@dataclass
class FinetuneConfig(MethodConfig):
    """Which source blocks train.

    Attributes:
        freeze: FT-l: the first ``l`` blocks stay frozen (0 = full fine-tuning). ``"all"`` stands for
            every l in 1..L-1 (FT-0 is plain ``finetune``, FT-L is ``linear_probe``), one run each.
        last_k: train only the last ``k`` blocks (and the head); exclusive with ``freeze``.
        stochastic: train a random half of the blocks, drawn once per run from its seed (SpotTune's
            "stochastic fine-tuning").
    """

    freeze: int | str = 0
    last_k: int | None = None
    stochastic: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.freeze, bool) or not isinstance(self.freeze, int | str):
            raise UserError(f"finetune freeze={self.freeze!r}: give a whole number of blocks or 'all'")
        if isinstance(self.freeze, str) and self.freeze != "all":
            raise UserError(f"finetune freeze={self.freeze!r}: give a number of blocks or 'all'")
        if isinstance(self.freeze, int) and self.freeze < 0:
            raise UserError(f"finetune freeze={self.freeze} must be >= 0")
        if self.last_k is not None and (isinstance(self.last_k, bool) or not isinstance(self.last_k, int)):
            raise UserError(f"finetune last_k={self.last_k!r}: give a whole number of blocks")
        if self.last_k is not None and self.last_k < 0:
            raise UserError(f"finetune last_k={self.last_k} must be >= 0")
        chosen = (self.freeze != 0) + (self.last_k is not None) + bool(self.stochastic)
        if chosen > 1:
            raise UserError("finetune takes one of freeze=, last_k= or stochastic=true, not several")


@register_method("finetune")
class Finetune(Method):
    """Fine-tuning from the source weights with a new head; FT-l / last-k / stochastic variants.

    FT-l (Yosinski et al. 2014; PTU paper Sec. "Experimental Setup") freezes the first ``l`` blocks and
    fine-tunes the rest. Frozen blocks keep their BatchNorm statistics too. Modules of a wrapped model
    that are neither a named block nor the head are frozen whenever any block is (FT-l for l >= 1,
    last-k, stochastic) and train with the blocks otherwise (FT-0), see :class:`LayeredNet`.
    """

    Config = FinetuneConfig
    prefix_cacheable = True  # FT-l, last-k: the frozen first blocks' outputs are computed once

    def frozen_blocks(self, num_blocks: int, seed: int) -> list[int]:
        c: FinetuneConfig = self.config  # type: ignore[assignment]
        if c.freeze == "all":
            raise UserError("finetune[freeze=all] is a sweep; run it with `compare`, or give freeze=<l>")
        if c.last_k is not None:
            if c.last_k > num_blocks:
                raise UserError(f"last_k={c.last_k} but the source has only {num_blocks} blocks")
            return list(range(num_blocks - c.last_k))
        if c.stochastic:
            gen = torch.Generator().manual_seed(10_007 * seed + 1)
            chosen = torch.randperm(num_blocks, generator=gen)[: num_blocks // 2]
            return sorted(int(i) for i in chosen)
        if int(c.freeze) > num_blocks:
            raise UserError(
                f"freeze={c.freeze} but the source has only {num_blocks} blocks (use 0..{num_blocks})"
            )
        return list(range(int(c.freeze)))

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        model = transfer_copy(self._require_source(source), num_classes, seed)
        frozen = self.frozen_blocks(model.num_blocks, seed)
        model.freeze_blocks(frozen)  # with any block, the un-named part of a wrapped model (LayeredNet)
        self.frozen = frozen
        return model

    def diagnostics(self, model: nn.Module, task: Any) -> dict[str, Any]:
        return {"frozen_blocks": list(getattr(self, "frozen", []))}

    @classmethod
    def expand(cls, options: dict[str, Any], source: LayeredNet | None) -> list[dict[str, Any]]:
        if options.get("freeze") != "all":
            return [options]
        if source is None:
            raise UserError("finetune[freeze=all] needs a source to know its number of blocks")
        return [{**options, "freeze": level} for level in range(1, source.num_blocks)]


@register_method("linear_probe")
class LinearProbe(Method):
    """Feature extractor: everything but the new head frozen (weights and BatchNorm statistics): every
    block and, in a wrapped model, the modules that are neither a named block nor the head."""

    prefix_cacheable = True  # every block frozen: the features are computed once, only the head trains

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        model = transfer_copy(self._require_source(source), num_classes, seed)
        model.freeze_blocks(range(model.num_blocks))
        return model


def _embed(model: LayeredNet, split: Any, runtime: Runtime, batch: int = 1024) -> np.ndarray:
    """The penultimate features of ``model`` over a split, in eval mode, as a float64-ready array."""
    was_training = model.training
    model.eval()
    try:
        return runtime.map(model.embed, split, batch).numpy()
    finally:
        model.train(was_training)


@dataclass
class KNNConfig(MethodConfig):
    """Attributes:
    ks: candidate numbers of neighbours; the best on the validation split is used (PTU paper).
    features: ``"source"`` (the frozen source's penultimate features) or ``"raw"`` (pixels).
    """

    ks: tuple[int, ...] = (1, 3, 5, 10)
    features: str = "source"

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in (self.ks if isinstance(self.ks, list | tuple) else [self.ks]))
        if not self.ks or min(self.ks) < 1:
            raise UserError("knn ks must be positive integers, e.g. ks=[1,3,5,10]")
        if self.features not in ("source", "raw"):
            raise UserError(f"knn features={self.features!r}: use 'source' or 'raw'")


@register_method("knn")
class KNN(Method):
    """K-nearest neighbours (scikit-learn) on source features or raw pixels; K chosen on validation."""

    Config = KNNConfig
    trains = False

    def fit_evaluate(self, source: LayeredNet | None, task: Any, seed: int) -> dict[str, Any]:
        from sklearn.neighbors import KNeighborsClassifier

        c: KNNConfig = self.config  # type: ignore[assignment]
        if c.features == "source":
            src = self._require_source(source)
            src.to(self.runtime.device)
            xs = [_embed(src, s, self.runtime) for s in (task.train, task.val, task.test)]
        else:
            xs = [
                torch.cat([x.flatten(1) for x, _ in s.chunks(1024)]).numpy()
                for s in (task.train, task.val, task.test)
            ]
        ys = [s.y.numpy() for s in (task.train, task.val, task.test)]
        scores = {}
        for k in c.ks:
            if k > len(ys[0]):
                continue
            clf = KNeighborsClassifier(n_neighbors=k).fit(xs[0], ys[0])
            scores[k] = float(clf.score(xs[1], ys[1]))
        if not scores:
            raise UserError(f"knn: every K in {list(c.ks)} exceeds the {len(ys[0])} training examples")
        best_k = max(scores, key=lambda k: (scores[k], -k))
        clf = KNeighborsClassifier(n_neighbors=best_k).fit(xs[0], ys[0])
        return {
            "val_accuracy": scores[best_k],
            "test_accuracy": float(clf.score(xs[2], ys[2])),
            "diagnostics": {"k": best_k, "val_accuracy_per_k": {str(k): v for k, v in scores.items()}},
        }


@register_method("random_guess")
class RandomGuess(Method):
    """Random guess (RG): a uniformly random class per example; its expectation is 1/C."""

    trains = False
    needs_source = False

    def fit_evaluate(self, source: LayeredNet | None, task: Any, seed: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(seed)
        acc = {}
        for split in ("val", "test"):
            y = getattr(task, split).y
            guess = torch.randint(0, task.num_classes, (len(y),), generator=gen)
            acc[split] = float((guess == y).float().mean())
        return {
            "val_accuracy": acc["val"],
            "test_accuracy": acc["test"],
            "diagnostics": {"expected_accuracy": 1.0 / task.num_classes},
        }
