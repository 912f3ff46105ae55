"""Tables over several settings of one suite, written by the benchmark report as ``summary.md``.

A suite's ``paper.yaml`` asks for one with a ``summary:`` mapping whose ``kind`` names a function of
``SUMMARIES``; the rest of the mapping is its arguments. :func:`write_suite_summary` writes the table to
``<suite>/results/summary.md`` (a bench output: ``OUT/<suite>/summary.md``) each time the report is
rebuilt, from the settings' ``results.json`` alone:

* ``dtnh_pairs`` (DTNH Tables II-IV at our scale): per source -> target pair and regulariser strength,
  the regulariser alone and with DTNH, the difference and how often the gradients conflicted; then the
  mean difference over the pairs per regulariser, and what DTNH did to negative transfer;
* ``decathlon`` (SpotTune Table 2): every baseline and SpotTune variant on each target, with the Visual
  Decathlon score over the targets (``E_max`` = 2 x fine-tuning's error, the Decathlon's convention that
  gives fine-tuning 250 per target), and Figs. 3-4 with one row per target;
* ``auto_oracle`` (issue 18): ``paramtransfer auto`` against the exhaustive oracle on each target, the
  mean regret and compute ratio against the goal, and the mean weighted tau of each ranking score.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paramtransfer.errors import UserError
from paramtransfer.experiments.compare import variant_name
from paramtransfer.methods.base import make_method, parse_method_spec
from paramtransfer.methods.dtnh import dtnh_base
from paramtransfer.metrics import decathlon_score
from paramtransfer.report.plots import plot_spottune_rows, spottune_rows
from paramtransfer.report.tables import label
from paramtransfer.train.checkpoint import atomic_write_bytes

SUMMARY = "summary.md"

# (the suite's summary arguments, setting name -> its results.json content, folder for figures) -> lines
Summary = Callable[[dict[str, Any], dict[str, dict[str, Any]], Path], list[str]]


def _regulariser_order(variant: str) -> tuple:
    """By regulariser, then strength."""
    base = dtnh_base(variant) or variant
    method = make_method(base)
    option = getattr(method, "strength_option", None)
    return (parse_method_spec(base)[0], getattr(method.config, option) if option else 0.0, variant)


def _accuracy(entry: dict[str, Any], scratch: float) -> str:
    """Mean ± std in %, bold below scratch (negative transfer, red in the paper's tables)."""
    text = f"{100 * entry['test_mean']:.2f} ± {100 * entry['test_std']:.2f}"
    return f"**{text}**" if entry["test_mean"] < scratch else text


def dtnh_pairs(args: dict[str, Any], results: dict[str, dict[str, Any]], figures: Path) -> list[str]:
    """DTNH against its regulariser alone, per pair (``args["settings"]``, in order) and strength."""
    lines = [
        "| pair | scratch | fine-tune | regulariser | alone | with DTNH | DTNH − alone | conflicts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    recovered, hurt, total = [], [], 0
    gains: dict[str, list[float]] = {}
    for pair in args["settings"]:
        if pair not in results:
            continue
        sel, cfg = results[pair]["selected"], results[pair]["config"]
        scratch, ft = sel["scratch"], sel["finetune"]
        name = f"{cfg['source']} → {cfg['target']}"
        for variant in sorted((v for v in sel if v.startswith("dtnh:")), key=_regulariser_order):
            base = dtnh_base(variant)
            if base is None or base not in sel or "granularity" in variant:
                continue
            d, b = sel[variant], sel[base]
            if d.get("status") != "ok" or b.get("status") != "ok":
                continue
            total += 1
            gain = 100 * (d["test_mean"] - b["test_mean"])
            if b["test_mean"] < scratch["test_mean"]:
                recovered.append((name, label(base), gain, d["test_mean"] >= scratch["test_mean"]))
            if gain < 0:
                hurt.append((name, label(base), gain))
            gains.setdefault(label(base), []).append(gain)
            floor = scratch["test_mean"]
            lines.append(
                f"| {name} | {100 * floor:.2f} | {100 * ft['test_mean']:.2f} | {label(base)} | "
                f"{_accuracy(b, floor)} | {_accuracy(d, floor)} | {gain:+.2f} | "
                f"{100 * d.get('corrected_fraction', 0):.0f} % |"
            )
    lines += ["", f"{total} regulariser settings; DTNH lower than the regulariser alone in {len(hurt)}.", ""]
    lines += ["| regulariser | mean DTNH − alone over the pairs (points) | per pair |", "|---|---|---|"]
    for base in sorted(gains, key=_regulariser_order):
        values = gains[base]
        per_pair = ", ".join(f"{v:+.2f}" for v in values)
        lines.append(f"| {base} | {sum(values) / len(values):+.2f} | {per_pair} |")
    lines.append("")
    for name, base, gain, fixed in recovered:
        state = "now at or above scratch" if fixed else "still below scratch"
        lines.append(f"- negative transfer with {base} on {name}: DTNH {gain:+.2f} points, {state}")
    return lines


def decathlon(args: dict[str, Any], results: dict[str, dict[str, Any]], figures: Path) -> list[str]:
    """One row per ``args["rows"]`` ([method spec, the paper's row name]), one column per target
    (``args["settings"]``: setting -> column title), then the Decathlon score; draws ``args["figure"]``."""
    loaded, figure_rows = [], []
    for name, title in args["settings"].items():
        if name in results:
            loaded.append((title, results[name]["selected"]))
            figure_rows += [(f"{title}, {v}", d) for v, d in spottune_rows(results[name], ["spottune"])]
    lines = [f"| method | {' | '.join(t for t, _ in loaded)} | Decathlon score |"]
    lines.append(f"|---|{'---|' * len(loaded)}---|")
    e_max = [2 * (1 - sel["finetune"]["test_mean"]) for _, sel in loaded]
    for spec, row in args["rows"]:
        variant = variant_name(spec)
        entries = [sel.get(variant) for _, sel in loaded]
        ok = [e if e and e.get("status") == "ok" else None for e in entries]
        cells = [f"{100 * e['test_mean']:.2f} ± {100 * e['test_std']:.2f}" if e else "—" for e in ok]
        score = "—"
        if all(ok):
            score = f"{decathlon_score([1 - e['test_mean'] for e in ok], e_max):.0f}"
        lines.append(f"| {row} | {' | '.join(cells)} | {score} |")
    lines.append("")
    if figure_rows and args.get("figure"):
        plot_spottune_rows(figure_rows, figures / str(args["figure"]))
    n = len(loaded)
    lines.append(f"Decathlon score: E_max = 2 × fine-tuning's test error; {n} targets, at most {1000 * n}.")
    return lines


def auto_oracle(args: dict[str, Any], results: dict[str, dict[str, Any]], figures: Path) -> list[str]:
    """``paramtransfer auto`` against the exhaustive oracle over the targets (``args["settings"]``):
    :func:`paramtransfer.bench.autobench.oracle_summary`."""
    from paramtransfer.bench.autobench import oracle_summary

    return oracle_summary({name: results[name] for name in args["settings"] if name in results})


SUMMARIES: dict[str, Summary] = {"dtnh_pairs": dtnh_pairs, "decathlon": decathlon, "auto_oracle": auto_oracle}


def write_suite_summary(
    spec: dict[str, Any], results_dir: Callable[[str], Path], out: Path, where: str
) -> Path | None:
    """Write ``out/summary.md`` as ``spec`` (a paper.yaml's ``summary:``) asks, from the results of its
    settings (``results_dir(name)``); None when none of them has results. ``where`` names the paper.yaml."""
    if not isinstance(spec, dict) or spec.get("kind") not in SUMMARIES or not spec.get("settings"):
        kinds = ", ".join(SUMMARIES)
        raise UserError(f"{where}: summary needs a kind ({kinds}) and its settings, got {spec!r}")
    results = {}
    for name in spec["settings"]:
        path = results_dir(name) / "results.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    if not results:
        return None
    out.mkdir(parents=True, exist_ok=True)
    lines = SUMMARIES[spec["kind"]](spec, results, out)
    path = out / SUMMARY
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
