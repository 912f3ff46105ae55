"""Markdown tables from comparison results (the content of ``results.json``)."""

from __future__ import annotations

import re
from typing import Any

_FREEZE = re.compile(r"^finetune\[freeze=(\d+)\]$")


def label(variant: str) -> str:
    """A reader's name for a method variant (``finetune[freeze=2]`` -> ``FT-2``; a regulariser at its
    default strength shows it: ``l2sp`` -> ``l2sp[alpha=0.1]``)."""
    m = _FREEZE.match(variant)
    if m:
        return f"FT-{m.group(1)}"
    if "[" not in variant:
        strength = _default_strength(variant)
        if strength is not None:
            return f"{variant}[{strength}]"
    return {
        "scratch": "scratch (NoTL)",
        "finetune": "fine-tune (FT-0)",
        "linear_probe": "linear probe",
        "random_guess": "random guess",
        "knn": "K-NN",
    }.get(variant, variant)


def _default_strength(name: str) -> str | None:
    from paramtransfer.methods.base import METHODS

    if name not in METHODS:
        return None
    cls = METHODS.get(name)
    option = getattr(cls, "strength_option", None)
    return f"{option}={getattr(cls.Config(), option)}" if option else None


def ft_level(variant: str) -> int | None:
    """``l`` of an FT-l variant (plain ``finetune`` is FT-0), else None."""
    if variant == "finetune":
        return 0
    m = _FREEZE.match(variant)
    return int(m.group(1)) if m else None


_FIRST = ("scratch", "random_guess", "knn", "linear_probe")


def row_order(variant: str) -> tuple:
    """Baselines first, then FT-l by l, other fine-tuning variants, then everything else by name."""
    if variant in _FIRST:
        return (0, _FIRST.index(variant), "")
    level = ft_level(variant)
    if level is not None:
        return (1, level, "")
    if variant.startswith("finetune"):
        return (2, 0, variant)
    base = corrected_base(variant)
    if base is not None:  # right below the method it corrects
        return (3, 0, base + "\x01" + variant)
    return (3, 0, variant)


def best_ft(selected: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """The FT-l variant (l >= 0) with the best mean validation accuracy (never chosen on test)."""
    cands = [(v, e) for v, e in selected.items() if ft_level(v) is not None and e.get("status") == "ok"]
    if not cands:
        return None
    return max(cands, key=lambda ve: ve[1]["val_mean"])


def pct(mean: float, std: float, n: int | None = None) -> str:
    """``0.8532, 0.0098`` -> ``'85.32 ± 0.98'`` (fractions shown as percentages); over ``n = 1`` seed there
    is no spread to show: ``'85.32'``."""
    if n == 1:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _acc(entry: dict[str, Any], split: str) -> str:
    return pct(entry[f"{split}_mean"], entry[f"{split}_std"], entry.get("n_seeds"))


def relative_gain(entry: dict[str, Any], reference: dict[str, Any]) -> float:
    """Delta of the PTU paper's Tables 1-2: relative test-accuracy improvement over ``reference``, in %."""
    return 100.0 * (entry["test_mean"] - reference["test_mean"]) / reference["test_mean"]


_NO_TRANSFER = ("scratch", "random_guess", "knn")


def corrected_base(variant: str) -> str | None:
    """The variant a ``dtnh:`` variant corrects (None for others, or when it no longer parses)."""
    from paramtransfer.errors import UserError
    from paramtransfer.methods.dtnh import dtnh_base

    try:
        return dtnh_base(variant)
    except UserError:
        return None


def _notes(
    entry: dict[str, Any],
    variant: str = "",
    best: tuple[str, dict[str, Any]] | None = None,
    selected: dict[str, dict[str, Any]] | None = None,
) -> str:
    div = entry.get("diverged_lrs") or {}
    notes = [f"diverged at lr={lr} ({n} seeds)" for lr, n in div.items()]
    ok = entry.get("status") == "ok"
    if variant.startswith("ptu") and best is not None and ok:
        notes.insert(0, f"Δ = {relative_gain(entry, best[1]):+.2f} % vs best FT-l ({label(best[0])})")
    selected = selected or {}
    base_name = corrected_base(variant)
    base = selected.get(base_name) if base_name is not None else None
    if base is not None and ok and base.get("status") == "ok":
        gain = 100 * (entry["test_mean"] - base["test_mean"])
        notes.append(f"{gain:+.2f} points vs {label(base_name)}")
    if "corrected_fraction" in entry:
        notes.append(f"gradients conflicted in {100 * entry['corrected_fraction']:.0f} % of steps")
    if "mean_removed_ratio_corrected" in entry:
        notes.append(
            f"‖λ∇Ω‖/‖∇J‖ = {entry['mean_reg_task_norm_ratio']:.2g}, cos = {entry['mean_cosine']:+.2f}; "
            f"a correction removed {entry['mean_removed_ratio_corrected']:.2g} × ‖∇J‖"
        )
    if "gate_z" in entry:
        notes.append(
            "mean gates per unit (blocks "
            + ", ".join(str(i) for i in entry["gate_layers"])
            + "): z "
            + " ".join(f"{v:.2f}" for v in entry["gate_z"])
            + ", r "
            + " ".join(f"{v:.2f}" for v in entry["gate_r"])
        )
    scratch = selected.get("scratch")
    if (
        ok
        and scratch is not None
        and scratch.get("status") == "ok"
        and variant not in _NO_TRANSFER
        and entry["test_mean"] < scratch["test_mean"]
    ):
        notes.append("**negative transfer** (below scratch)")
    return "; ".join(notes)


def comparison_table(summary: dict[str, Any]) -> str:
    """A markdown table: one row per method variant, plus the best FT-l (chosen on validation)."""
    selected: dict[str, dict[str, Any]] = summary["selected"]
    cfg = summary.get("config", {})
    header = (
        f"Transfer {cfg.get('source')} → {cfg.get('target')} ({cfg.get('arch')}, "
        f"{cfg.get('shots') or 'all'} shots per class, {len(cfg.get('seeds', []))} seeds). "
        f"Accuracy in %, {'one seed' if len(cfg.get('seeds', [])) == 1 else 'mean ± std over seeds'}; "
        f"learning rate chosen on the validation split from "
        f"{{{', '.join(f'{lr:g}' for lr in cfg.get('lrs', []))}}}.\n\n"
    )
    lines = [
        "| method | lr (chosen on val) | val accuracy | test accuracy | notes |",
        "|---|---|---|---|---|",
    ]
    order = sorted(selected, key=row_order)
    best = best_ft(selected)
    for variant in order:
        e = selected[variant]
        if e.get("status") != "ok":
            lines.append(f"| {label(variant)} | — | — | — | every learning rate diverged; {_notes(e)} |")
            continue
        lr = "—" if e["lr"] is None else f"{e['lr']:g}"
        lines.append(
            f"| {label(variant)} | {lr} | {_acc(e, 'val')} | "
            f"{_acc(e, 'test')} | {_notes(e, variant, best, selected)} |"
        )
    if best is not None:
        v, e = best
        lines.append(
            f"| **best FT-l** = {label(v)} | {e['lr']:g} | {_acc(e, 'val')} | "
            f"{_acc(e, 'test')} | l chosen on validation |"
        )
    return header + "\n".join(lines) + "\n"
