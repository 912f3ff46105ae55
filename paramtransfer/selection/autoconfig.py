"""The settings of ``paramtransfer auto`` (:class:`AutoConfig`, its defaults) and the checks that run before
anything loads: which methods run on which candidate, and whether ``--out`` holds another auto's runs.
See :mod:`paramtransfer.selection.auto` for what the settings do."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramtransfer.errors import UserError
from paramtransfer.experiments.compare import CompareConfig, split_arch_options
from paramtransfer.methods.base import METHODS, check_method, parse_method_spec, split_method_list
from paramtransfer.selection.candidates import Candidate, parse_candidates
from paramtransfer.selection.rank import FAST_SCORES

# The ranking score auto uses unless told, chosen on the weighted Kendall tau of each score's order of the
# sources against the exhaustive oracle's (issue 18, acceptance 3; benchmarks/auto/README.md): over the four
# targets of `paramtransfer bench auto` NCE has the best mean tau (+0.73; LogME +0.51, LEEP +0.26,
# TransRate +0.21, shrinkage H-score +0.19, H-score -0.41) and the best worst case (+0.52).
DEFAULT_SCORE = "nce"
DEFAULT_METHODS = "linear_probe,finetune,l2sp"
DEFAULT_KEEP = 2
DEFAULT_ETA = 3
DEFAULT_BUDGET = 0.2
CONFIG_FILE = "auto_config.json"


@dataclass
class AutoConfig:
    """One auto run; ``sources`` are candidate strings (see :mod:`paramtransfer.selection.candidates`)."""

    target: str = "fashion[5-9]"
    sources: list[str] = field(default_factory=list)
    shots: int | None = 20
    methods: list[str] = field(default_factory=lambda: split_method_list(DEFAULT_METHODS))
    lrs: list[float] = field(default_factory=lambda: [0.1, 0.01, 0.001])
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 30
    budget: float = DEFAULT_BUDGET
    eta: int = DEFAULT_ETA
    keep: int = DEFAULT_KEEP
    score: str = DEFAULT_SCORE
    source_epochs: int = 3
    source_limit: int | None = None
    source_seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = split_method_list(self.methods)
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, int | float) or not (0 < b <= 1 and math.isfinite(b)):
            raise UserError(
                f"--budget {b!r}: give the fraction of the exhaustive grid's compute to spend, above 0 and "
                "at most 1, e.g. --budget 0.2"
            )
        for name, low, example in (("eta", 2, 3), ("keep", 1, 2), ("epochs", 1, 30)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserError(
                    f"--{name} {v!r}: give a whole number of at least {low}, e.g. --{name} {example}"
                )
        if self.score not in FAST_SCORES:
            raise UserError(f"unknown score {self.score!r}; use one of {', '.join(FAST_SCORES)}")
        self.candidates()  # no sources, a source twice, or one of no known form: an error now
        self.compare_config(Candidate("x", "fashion[0-4]", "lenet"), "lenet", self.methods)  # the rest

    def candidates(self) -> list[Candidate]:
        return parse_candidates(list(self.sources))

    def compare_config(
        self,
        c: Candidate,
        arch: str,
        methods: list[str],
        *,
        epochs: int | None = None,
        seeds: list | None = None,
    ) -> CompareConfig:
        """The comparison of ``methods`` on candidate ``c`` whose runs the race and the final training are."""
        return CompareConfig(
            arch=arch,
            source=c.source,
            target=self.target,
            shots=self.shots,
            methods=list(methods),
            lrs=list(self.lrs),
            seeds=list(seeds if seeds is not None else self.seeds),
            epochs=epochs or self.epochs,
            source_weights=c.weights,
            source_epochs=self.source_epochs,
            source_limit=self.source_limit,
            source_seed=self.source_seed,
            train=dict(self.train),
            data=dict(self.data),
            method_options=dict(self.method_options),
        )


def methods_for(config: AutoConfig, c: Candidate, arch: str) -> tuple[list[str], dict[str, str]]:
    """The method specs that run on ``arch`` and, for the others, why not; ``arch.`` options are refused
    (in auto another architecture is another candidate, ``ARCH@SPEC``)."""
    ok, skipped = [], {}
    for spec in config.methods:
        name, options = parse_method_spec(spec)
        options, arch_kwargs = split_arch_options({**config.method_options.get(name, {}), **options})
        if arch_kwargs:
            raise UserError(
                f"{spec}: auto takes no arch. options; add the architecture as a candidate, ARCH@SPEC"
            )
        try:
            check_method(name, arch, **options)
        except UserError as err:
            if name not in METHODS:
                raise
            skipped[spec] = str(err)
            continue
        ok.append(spec)
    if not ok:
        raise UserError(
            f"candidate {c.name} ({arch}): none of the methods runs on it ({next(iter(skipped.values()))})"
        )
    return ok, skipped


def check_out_dir(config: AutoConfig, out: str | Path) -> None:
    """Refuse an output folder that holds an auto run with other settings (its runs would be mixed)."""
    f = Path(out) / CONFIG_FILE
    if not f.is_file():
        return
    try:
        there = json.loads(f.read_text())
    except (OSError, ValueError):
        raise UserError(f"{f} cannot be read; delete it (or use another --out)") from None
    here = json.loads(json.dumps(dataclasses.asdict(config)))
    for key in sorted(set(here) | set(there)):
        if there.get(key) != here.get(key):
            raise UserError(
                f"{out} holds an auto run with other settings ({key} {there.get(key)} there, {here.get(key)} "
                f"here); use another --out or delete {out}"
            )
