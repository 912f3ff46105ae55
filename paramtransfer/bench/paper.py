"""A paper's numbers next to ours, and the verdict on each of its claims (``benchmarks/<suite>/paper.yaml``).

Our data (Fashion-MNIST halves, scikit-learn digits) and networks are much smaller than the papers', so
absolute accuracies cannot agree. What can agree is a paper's *claims*: who beats whom. A claim says
``better`` beats ``worse`` (``relation: better``, the default) or that the two are about equal
(``relation: tie``). On our results, with ``d`` = our mean test accuracy of ``better`` minus that of
``worse`` (points, each at its learning rate chosen on validation) and ``noise`` = the larger of the
two standard deviations over seeds:

* ``better``: **agree** if ``d > noise``; **disagree** if ``d < -noise``; **inconclusive** otherwise;
* ``tie``: **agree** if ``|d| <= noise``; **disagree** otherwise;
* **inconclusive** whenever either side has fewer than two seeds (no estimate of the noise), and
  **missing** when a side was not run or diverged at every learning rate.

``paper.yaml`` layout (every key but ``settings`` optional)::

    paper: Parameter Transfer Unit for Deep Neural Networks (Zhang, Zhang, Yang)
    file: ptu-parameter-transfer-unit.md        # in the shared papers folder
    settings:
      s1_lenet_20shots:                         # a setting of the suite (NAME.yaml)
        mirrors: Table 1, S1 (CIFAR-10 -> CIFAR-100)
        scale: fraction                         # the paper prints 0.5392 (fraction) or 53.92 (percent)
        columns: [Greek, Latin]                 # when one row holds several datasets: value is a list
        reference: best_ftl                     # Δ columns are measured against this side
        numbers:                                # paper row, its number as printed, our variant(s)
          - {row: NoTL, value: 0.5392, ours: scratch}
          - {row: FT, value: 0.5428, ours: best_ftl}
        claims:
          - {text: PTU beats the best FT-l, better: ptu, worse: best_ftl, paper: "0.5612 vs 0.5428 (Table 1)"}
          - {text: PTU and FT-l about equal, relation: tie, better: ptu, worse: best_ftl, paper: "S2"}
        notes: free text shown under the table

A *side* (``ours``, ``better``, ``worse``, ``reference``) is a method spec as in the setting's YAML
(``finetune[stochastic=true]`` finds the variant recorded as ``finetune[stochastic=True]``), the
pseudo-variant ``best_ftl`` (the FT-l, l >= 0, with the best validation accuracy: the paper's "FT"
picked without looking at test), or a list of specs: the one of them with the best validation accuracy
(e.g. a regulariser's strength chosen on validation, as the papers tune theirs).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paramtransfer.errors import UserError
from paramtransfer.report.tables import best_ft, label, pct

BEST_FTL = "best_ftl"
AGREE, DISAGREE, INCONCLUSIVE, MISSING = "agree", "disagree", "inconclusive", "missing"
VERDICTS = (AGREE, DISAGREE, INCONCLUSIVE, MISSING)
RELATIONS = ("better", "tie")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")

VERDICT_RULE = (
    'For a claim "A beats B": d = our mean test accuracy of A minus that of B (points; each at its '
    "learning rate chosen on validation), noise = the larger of their two standard deviations over seeds. "
    '**agree**: d > noise; **disagree**: d < −noise; **inconclusive**: |d| ≤ noise. For a claim "A and B '
    'are about equal": **agree** if |d| ≤ noise, else **disagree**. Fewer than two seeds on either side '
    "is always inconclusive; **missing**: a side was not run or diverged."
)


def claim_verdict(diff: float, noise: float, *, relation: str = "better", seeds: int = 2) -> str:
    """The verdict on one claim from our numbers (see the module docstring).

    Args:
        diff: mean test accuracy of the claim's ``better`` side minus its ``worse`` side.
        noise: the larger of the two sides' standard deviations over seeds (same unit as ``diff``).
        relation: ``better`` (the paper says the first side wins) or ``tie`` (about equal).
        seeds: the smaller of the two sides' seed counts.

    Example:
        >>> claim_verdict(2.0, 1.0), claim_verdict(-2.0, 1.0), claim_verdict(0.5, 1.0)
        ('agree', 'disagree', 'inconclusive')
    """
    if relation not in RELATIONS:
        raise UserError(f"unknown claim relation {relation!r}; use one of {', '.join(RELATIONS)}")
    if seeds < 2:
        return INCONCLUSIVE
    if relation == "tie":
        return AGREE if abs(diff) <= noise else DISAGREE
    if diff > noise:
        return AGREE
    if diff < -noise:
        return DISAGREE
    return INCONCLUSIVE


# ---- paper.yaml ------------------------------------------------------------------------------------


def load_paper(path: str | Path) -> dict[str, Any]:
    """``paper.yaml`` checked for the keys the report needs; ``{}`` when the file does not exist."""
    from paramtransfer.experiments.compare import read_yaml_mapping

    p = Path(path)
    if not p.is_file():
        return {}
    holds = "a mapping with a 'settings' mapping (see paramtransfer.bench.paper)"
    data = read_yaml_mapping(p, holds)
    if not isinstance(data.get("settings", {}), dict):
        raise UserError(f"{p} must hold {holds}")
    for name, entry in (data.get("settings") or {}).items():
        _check_entry(entry, f"{p}: setting {name!r}")
    return data


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise UserError(f"{where} must be a mapping (mirrors, numbers, claims, ...)")
    if entry.get("scale", "percent") not in ("percent", "fraction"):
        raise UserError(f"{where}: scale must be percent or fraction, not {entry['scale']!r}")
    columns = entry.get("columns")
    for row in entry.get("numbers") or []:
        if not isinstance(row, dict) or not {"row", "value", "ours"} <= set(row):
            raise UserError(f"{where}: each numbers entry needs row, value and ours, got {row!r}")
        if columns and (not isinstance(row["value"], list) or len(row["value"]) != len(columns)):
            raise UserError(f"{where}: {row['row']!r} needs one value per column ({len(columns)})")
    for claim in entry.get("claims") or []:
        if not isinstance(claim, dict) or not {"text", "better", "worse"} <= set(claim):
            raise UserError(f"{where}: each claim needs text, better and worse, got {claim!r}")
        if claim.get("relation", "better") not in RELATIONS:
            raise UserError(f"{where}: claim relation must be one of {', '.join(RELATIONS)}")


def _percent(value: Any, scale: str) -> float | None:
    """A paper number as printed (``0.5392``, ``"82.68 ± 0.2"``) in percent, or None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        number = float(value)
    else:
        m = _NUMBER.search(str(value))
        if m is None:
            return None
        number = float(m.group())
    return 100 * number if scale == "fraction" else number


def paper_values(value: Any, scale: str) -> list[float | None]:
    """One percent value per column (a single value is one column)."""
    return [_percent(v, scale) for v in (value if isinstance(value, list) else [value])]


def show_paper_value(value: Any, scale: str) -> str:
    """As printed in the paper (strings verbatim), fractions shown in percent."""

    def one(v: Any) -> str:
        if isinstance(v, str) or scale != "fraction":
            return str(v)
        p = _percent(v, scale)
        return "—" if p is None else f"{p:.2f}"

    return " / ".join(one(v) for v in value) if isinstance(value, list) else one(value)


# ---- sides -----------------------------------------------------------------------------------------


@dataclass
class Side:
    """One side of a claim (or a table's reference), resolved on our results."""

    spec: str  # as written in paper.yaml (a list is shown joined by commas)
    variant: str | None  # the recorded variant it resolved to; None when missing
    label: str
    entry: dict[str, Any] | None  # its ``selected`` entry (None when missing)

    @property
    def ok(self) -> bool:
        return self.entry is not None and self.entry.get("status") == "ok"


def find_variant(spec: str, selected: dict[str, dict[str, Any]]) -> str | None:
    """The recorded variant a spec names: itself, or its normalised name (defaults dropped, options
    canonical: ``l2sp[alpha=0.1]`` -> ``l2sp``); None when it is not in the results."""
    if spec in selected:
        return spec
    try:
        from paramtransfer.experiments.compare import variant_name

        name = variant_name(spec)
    except Exception:  # an unknown method or option: the side is simply missing
        return None
    return name if name in selected else None


def resolve_side(side: str | list[str], selected: dict[str, dict[str, Any]]) -> Side:
    """A side's variant and entry: a spec, ``best_ftl``, or the best-on-validation of a list."""
    if isinstance(side, list):
        shown = ", ".join(side)
        found = [v for v in (find_variant(str(s), selected) for s in side) if v is not None]
        ok = [v for v in found if selected[v].get("status") == "ok"]
        if not ok:
            return Side(shown, None, f"best on validation of [{shown}]", None)
        best = max(ok, key=lambda v: selected[v]["val_mean"])
        return Side(shown, best, f"{label(best)} (best on val of {len(side)})", selected[best])
    if side == BEST_FTL:
        chosen = best_ft(selected)
        if chosen is None:
            return Side(side, None, "best FT-l", None)
        return Side(side, chosen[0], f"best FT-l = {label(chosen[0])}", chosen[1])
    variant = find_variant(side, selected)
    entry = selected.get(variant) if variant is not None else None
    return Side(side, variant, label(variant or side), entry)


def paper_map(entry: dict[str, Any], selected: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Our variant (or ``best_ftl``) -> its paper row ``{"row", "value"}``, from ``entry["numbers"]``."""
    out: dict[str, dict[str, Any]] = {}
    for row in entry.get("numbers") or []:
        ours = row["ours"] if isinstance(row["ours"], list) else [row["ours"]]
        for spec in ours:
            key = BEST_FTL if spec == BEST_FTL else find_variant(str(spec), selected) or str(spec)
            out.setdefault(key, row)
    return out


def side_paper(side: Side, mapping: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if side.spec == BEST_FTL:
        return mapping.get(BEST_FTL)
    return mapping.get(side.variant) if side.variant is not None else None


# ---- claims ----------------------------------------------------------------------------------------


@dataclass
class ClaimResult:
    """A paper claim checked on our results. ``diff``/``noise`` in points; ``paper_diff`` in points
    (the mean over the paper's columns) when both sides have paper numbers."""

    text: str
    verdict: str
    better: Side
    worse: Side
    relation: str = "better"
    paper: str = ""
    diff: float | None = None
    noise: float | None = None
    paper_diff: float | None = None

    def markdown(self) -> str:
        if not (self.better.ok and self.worse.ok):
            gone = [s for s in (self.better, self.worse) if not s.ok]
            what = "; ".join(
                f"{s.label}: {'diverged at every learning rate' if s.entry else 'not in the results'}"
                for s in gone
            )
            ours = f"Ours: {what}."
        else:
            ours = (
                f"Ours: {self.better.label} {_pm(self.better.entry)} vs {self.worse.label} "
                f"{_pm(self.worse.entry)}: {self.diff:+.2f} points (noise ±{self.noise:.2f})."
            )
        paper = f" Paper: {self.paper}" if self.paper else ""
        if paper and not paper.rstrip().endswith("."):
            paper += "."
        return f"- **{self.verdict}** — {self.text}. {ours}{paper}"


def _pm(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "—"
    return pct(entry["test_mean"], entry["test_std"], entry.get("n_seeds"))


def evaluate_claims(entry: dict[str, Any], selected: dict[str, dict[str, Any]]) -> list[ClaimResult]:
    """Every claim of a paper.yaml setting entry, judged on a comparison's ``selected`` entries."""
    mapping = paper_map(entry, selected)
    scale = entry.get("scale", "percent")
    out = []
    for claim in entry.get("claims") or []:
        better, worse = resolve_side(claim["better"], selected), resolve_side(claim["worse"], selected)
        relation = claim.get("relation", "better")
        result = ClaimResult(
            str(claim["text"]), MISSING, better, worse, relation, str(claim.get("paper", ""))
        )
        pb, pw = side_paper(better, mapping), side_paper(worse, mapping)
        if pb is not None and pw is not None:
            diffs = [
                b - w
                for b, w in zip(paper_values(pb["value"], scale), paper_values(pw["value"], scale))
                if b is not None and w is not None
            ]
            result.paper_diff = sum(diffs) / len(diffs) if diffs else None
        if better.ok and worse.ok:
            b, w = better.entry, worse.entry
            result.diff = 100 * (b["test_mean"] - w["test_mean"])
            result.noise = 100 * max(b["test_std"], w["test_std"])
            seeds = min(b.get("n_seeds", 1), w.get("n_seeds", 1))
            if math.isfinite(result.diff) and math.isfinite(result.noise):
                result.verdict = claim_verdict(result.diff, result.noise, relation=relation, seeds=seeds)
        out.append(result)
    return out
