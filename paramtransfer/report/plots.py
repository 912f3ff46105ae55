"""PNG plots: FT-l accuracy against l (PTU paper Fig. 6) and learning curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from paramtransfer.report.tables import ft_level, label  # noqa: E402


def save_figure(fig: Any, path: Path, dpi: int) -> Path:
    """Lay out ``fig``, write it to ``path`` (its folder made if missing) as PNG and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def plot_ft_layers(summary: dict[str, Any], path: Path) -> Path | None:
    """Test accuracy of FT-l for every l (error bars: std over seeds), references as lines."""
    selected = summary["selected"]
    points = sorted(
        (ft_level(v), e) for v, e in selected.items() if ft_level(v) is not None and e.get("status") == "ok"
    )
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [lvl for lvl, _ in points]
    ax.errorbar(
        xs,
        [100 * e["test_mean"] for _, e in points],
        yerr=[100 * e["test_std"] for _, e in points],
        marker="o",
        capsize=3,
        label="FT-l",
    )
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (1, 3))])
    for v, e in selected.items():
        if ft_level(v) is None and e.get("status") == "ok":
            ax.axhline(
                100 * e["test_mean"], linestyle=next(styles, "--"), color="gray", alpha=0.8, label=label(v)
            )
    ax.set_xticks(xs)
    ax.set_xlabel("l (number of frozen source blocks)")
    ax.set_ylabel("test accuracy (%)")
    cfg = summary.get("config", {})
    ax.set_title(f"FT-l: {cfg.get('source')} → {cfg.get('target')} ({cfg.get('arch')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path, dpi=120)


def plot_learning_curves(summary: dict[str, Any], path: Path) -> Path | None:
    """Training loss and validation accuracy per epoch at each variant's chosen learning rate."""
    selected = summary["selected"]
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    for r in summary["runs"]:
        e = selected.get(r["method"], {})
        if (
            r["history"]
            and r["status"] == "ok"
            and e.get("lr") is not None
            and r["config"].get("lr") == e["lr"]
        ):
            curves.setdefault(r["method"], []).append(r["history"])
    if not curves:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for variant, histories in sorted(curves.items()):
        n = max(len(h) for h in histories)  # early stopping may end seeds at different epochs
        epochs = list(range(1, n + 1))
        loss = [_mean([h[i]["train_loss"] for h in histories if i < len(h)]) for i in range(n)]
        acc = [100 * _mean([h[i]["val_accuracy"] for h in histories if i < len(h)]) for i in range(n)]
        (line,) = ax_loss.plot(epochs, loss, label=label(variant))
        ax_acc.plot(epochs, acc, color=line.get_color(), label=label(variant))
    ax_loss.set(xlabel="epoch", ylabel="training loss (all terms)", yscale="log", title="training loss")
    ax_acc.set(
        xlabel="epoch",
        ylabel="validation accuracy (%)",
        title="validation accuracy (mean over seeds still running)",
    )
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path, dpi=120)


def plot_ptu_gates(summary: dict[str, Any], path: Path) -> Path | None:
    """PTU paper Fig. 7: mean gate values r and z per layer beside the FT-l test accuracy per layer.

    Gate means are those of the PTU runs at the chosen learning rate, averaged over seeds; layer l is
    the PTU after block l, compared with FT-l (the first l blocks frozen).
    """
    selected = summary["selected"]
    ptu = next(
        (v for v in sorted(selected) if v.startswith("ptu") and selected[v].get("status") == "ok"), None
    )
    if ptu is None:
        return None
    gates = [
        r["diagnostics"]["gates"]
        for r in summary["runs"]
        if r["method"] == ptu
        and r["status"] == "ok"
        and r["config"].get("lr") == selected[ptu]["lr"]
        and "gates" in r["diagnostics"]
    ]
    if not gates:
        return None
    layers = [i + 1 for i in gates[0]["layers"]]
    r_mean = [_mean([g["r"][j] for g in gates]) for j in range(len(layers))]
    z_mean = [_mean([g["z"][j] for g in gates]) for j in range(len(layers))]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    ax.bar([x - width / 2 for x in layers], z_mean, width, label="update gate z")
    ax.bar([x + width / 2 for x in layers], r_mean, width, label="fine-tune gate r")
    ax.set_xlabel("layer l (PTU after block l)")
    ax.set_ylabel("mean gate value on test")
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    ft = {ft_level(v): e for v, e in selected.items() if ft_level(v) is not None and e.get("status") == "ok"}
    points = [(lvl, ft[lvl]) for lvl in layers if lvl in ft]
    handles, labels = ax.get_legend_handles_labels()
    if points:
        ax2 = ax.twinx()
        (line,) = ax2.plot(
            [p[0] for p in points],
            [100 * p[1]["test_mean"] for p in points],
            "k-o",
            label="FT-l test accuracy",
        )
        ax2.set_ylabel("FT-l test accuracy (%)")
        handles.append(line)
        labels.append(line.get_label())
    ax.legend(handles, labels, fontsize=8, loc="upper right")
    cfg = summary.get("config", {})
    ax.set_title(f"PTU gates vs FT-l: {cfg.get('source')} → {cfg.get('target')} ({cfg.get('arch')})")
    return save_figure(fig, path, dpi=120)


def _chosen_histories(summary: dict[str, Any], variant: str) -> list[dict[str, Any]]:
    """The runs of ``variant`` at its chosen learning rate, by seed."""
    lr = summary["selected"].get(variant, {}).get("lr")
    runs = [
        r
        for r in summary["runs"]
        if r["method"] == variant and r["status"] == "ok" and r["history"] and r["config"].get("lr") == lr
    ]
    return sorted(runs, key=lambda r: r["seed"])


def plot_dtnh(summary: dict[str, Any], path: Path, max_rows: int = 6) -> Path | None:
    """DTNH paper Figs. 3-5, one row per ``dtnh:X`` variant whose base ``X`` ran too (first seed each).

    Fig. 3: empirical (task) loss and test loss per epoch, X vs dtnh:X (test loss needs
    ``train.trace_test``; without it the validation loss is drawn and labelled so). Fig. 4: Angle 1
    (d vs grad J) against Angle 3 (grad L vs grad J) per logged step. Fig. 5: Angle 2 (d vs grad Omega)
    against Angle 4 (grad L vs grad Omega).
    """
    from paramtransfer.report.tables import corrected_base

    selected = summary["selected"]
    pairs = [
        (base, v)
        for v in sorted(selected)
        if (base := corrected_base(v)) in selected and selected[v].get("status") == "ok"
    ][:max_rows]
    rows = []
    for base, dtnh in pairs:
        b, d = _chosen_histories(summary, base), _chosen_histories(summary, dtnh)
        if b and d and "angles" in d[0]["diagnostics"]:
            rows.append((base, dtnh, b[0], d[0]))
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 3.4 * len(rows)), squeeze=False)
    for (base, dtnh, b, d), (ax3, ax4, ax5) in zip(rows, axes, strict=True):
        held_out = "test_loss" if "test_loss" in d["history"][0] else "val_loss"
        for run, name, style in ((b, label(base), "--"), (d, label(dtnh), "-")):
            epochs = [rec["epoch"] for rec in run["history"]]
            (line,) = ax3.plot(
                epochs, [rec["train_task"] for rec in run["history"]], style, label=f"{name}: empirical"
            )
            ax3.plot(
                epochs,
                [rec.get(held_out) for rec in run["history"]],
                style,
                color=line.get_color(),
                alpha=0.5,
                label=f"{name}: {held_out.replace('_', ' ')}",
            )
        ax3.set(xlabel="epoch", ylabel="loss", yscale="log", title=f"Fig. 3: losses (seed {d['seed']})")
        angles = d["diagnostics"]["angles"]
        steps = angles.get("step") or list(range(len(angles["d_vs_task"])))
        for ax, ours, ref, title in (
            (ax4, "d_vs_task", "sum_vs_task", "Fig. 4: Angle 1 vs Angle 3 (to grad J)"),
            (ax5, "d_vs_reg", "sum_vs_reg", "Fig. 5: Angle 2 vs Angle 4 (to grad Ω)"),
        ):
            ax.plot(steps, angles[ours], lw=0.8, label=f"DTNH direction d ({ours})")
            ax.plot(steps, angles[ref], lw=0.8, alpha=0.7, label=f"plain sum grad L ({ref})")
            ax.axhline(90, color="gray", lw=0.5)
            ax.set(xlabel="step", ylabel="angle (degrees)", title=f"{title}\n{label(dtnh)}")
        for ax in (ax3, ax4, ax5):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="best")
    return save_figure(fig, path, dpi=110)


def spottune_rows(summary: dict[str, Any], variants: Sequence[str] | None = None) -> list[tuple[str, list]]:
    """``(variant, diagnostics of its chosen runs)`` for each ``spottune`` variant (or the given ones)."""
    selected = summary["selected"]
    rows = []
    for variant in sorted(selected) if variants is None else variants:
        if not variant.startswith("spottune") or selected.get(variant, {}).get("status") != "ok":
            continue
        diags = [r["diagnostics"] for r in _chosen_histories(summary, variant)]
        diags = [d for d in diags if "finetune_fraction" in d]
        if diags:
            rows.append((variant, diags))
    return rows


def plot_spottune(summary: dict[str, Any], path: Path) -> Path | None:
    """SpotTune paper Figs. 3-4 for each ``spottune`` variant at its chosen learning rate (seeds pooled)."""
    rows = [(label(v), d) for v, d in spottune_rows(summary)]
    return plot_spottune_rows(rows, path) if rows else None


def plot_spottune_rows(rows: Sequence[tuple[str, list]], path: Path) -> Path:
    """One row per ``(title, diagnostics of runs)``; the paper's figures have one row per target.

    Left: fraction of test examples routed through the fine-tuned copy of each block (Fig. 3).
    Right: how many fine-tuned blocks each test example used (Fig. 4).
    """
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.2 * len(rows)), squeeze=False)
    for (title, diags), (ax3, ax4) in zip(rows, axes, strict=True):
        blocks = list(range(1, len(diags[0]["finetune_fraction"]) + 1))
        frac = [_mean([d["finetune_fraction"][i] for d in diags]) for i in range(len(blocks))]
        ax3.bar(blocks, frac)
        ax3.set(xlabel="routed block", ylabel="fraction fine-tuned", ylim=(0, 1), xticks=blocks)
        ax3.set_title(f"Fig. 3: {title}", fontsize=9)
        hist = [sum(d["blocks_used_histogram"][j] for d in diags) for j in range(len(blocks) + 1)]
        total = sum(hist) or 1
        ax4.bar(range(len(hist)), [h / total for h in hist])
        ax4.set(xlabel="fine-tuned blocks used by an example", ylabel="fraction of test examples")
        ax4.set_title(f"Fig. 4: {title}", fontsize=9)
        for ax in (ax3, ax4):
            ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=110)
