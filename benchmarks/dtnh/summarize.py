"""DTNH paper Tables II-IV at our scale, from the recorded results of every pair.

Run: `.venv/bin/python benchmarks/dtnh/summarize.py > benchmarks/dtnh/results/summary.md`. One row per
source -> target pair and regulariser strength: test accuracy (mean ± std over 3 seeds, learning rate
chosen on validation) of the regulariser alone and with DTNH, the difference, and how often the two
gradients conflicted; fine-tuning and scratch for reference. A bold number is below scratch (negative
transfer, marked in red in the paper's tables).
"""

import json
from pathlib import Path

from paramtransfer.methods.base import make_method, parse_method_spec
from paramtransfer.methods.dtnh import dtnh_base
from paramtransfer.report.tables import label

RESULTS = Path(__file__).parent / "results"
PAIRS = ["fashion_to_fashion", "fashion_to_digits", "digits_to_digits", "digits_to_fashion"]


def _order(variant: str) -> tuple:
    """By regulariser, then strength."""
    base = dtnh_base(variant) or variant
    method = make_method(base)
    option = getattr(method, "strength_option", None)
    return (parse_method_spec(base)[0], getattr(method.config, option) if option else 0.0, variant)


def _acc(entry: dict, scratch: float) -> str:
    text = f"{100 * entry['test_mean']:.2f} ± {100 * entry['test_std']:.2f}"
    return f"**{text}**" if entry["test_mean"] < scratch else text


def main() -> None:
    print("| pair | scratch | fine-tune | regulariser | alone | with DTNH | DTNH − alone | conflicts |")
    print("|---|---|---|---|---|---|---|---|")
    recovered, hurt, total = [], [], 0
    gains: dict[str, list[float]] = {}
    for pair in PAIRS:
        path = RESULTS / pair / "results.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        sel = summary["selected"]
        cfg = summary["config"]
        scratch, ft = sel["scratch"], sel["finetune"]
        name = f"{cfg['source']} → {cfg['target']}"
        for variant in sorted((v for v in sel if v.startswith("dtnh:")), key=_order):
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
            print(
                f"| {name} | {100 * floor:.2f} | {100 * ft['test_mean']:.2f} | {label(base)} | "
                f"{_acc(b, floor)} | {_acc(d, floor)} | {gain:+.2f} | "
                f"{100 * d.get('corrected_fraction', 0):.0f} % |"
            )
    print()
    print(f"{total} regulariser settings; DTNH lower than the regulariser alone in {len(hurt)}.")
    print()
    print("| regulariser | mean DTNH − alone over the pairs (points) | per pair |")
    print("|---|---|---|")
    for base in sorted(gains, key=lambda b: _order(b)):
        values = gains[base]
        per_pair = ", ".join(f"{v:+.2f}" for v in values)
        print(f"| {base} | {sum(values) / len(values):+.2f} | {per_pair} |")
    print()
    for name, base, gain, fixed in recovered:
        state = "now at or above scratch" if fixed else "still below scratch"
        print(f"- negative transfer with {base} on {name}: DTNH {gain:+.2f} points, {state}")


if __name__ == "__main__":
    main()
