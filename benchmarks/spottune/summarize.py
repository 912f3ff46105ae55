"""SpotTune paper Table 2 at our scale, with the Visual Decathlon score over our three targets.

Run: `.venv/bin/python benchmarks/spottune/summarize.py > benchmarks/spottune/results/summary.md`.
Test accuracy (mean ± std over 3 seeds, learning rate chosen on validation) of every baseline and
SpotTune variant on each target, the paper's row names first. The score is
``S = sum_i 1000 / E_max^2 * max(0, E_max - E_i)^2`` (``paramtransfer.metrics.decathlon_score``) with
``E_max = 2 x`` standard fine-tuning's error on the target, the Decathlon's convention (Rebuffi et al.
2017) that gives fine-tuning 250 per target; 1000 per target is a perfect classifier. It also draws the
paper's Figs. 3-4 with one row per target (``results/spottune_targets.png``) for the default ``spottune``.
"""

import json
from pathlib import Path

from paramtransfer.experiments.compare import variant_name
from paramtransfer.metrics import decathlon_score
from paramtransfer.report.plots import plot_spottune_rows, spottune_rows

RESULTS = Path(__file__).parent / "results"
TARGETS = [("fashion_20shots", "Fashion [5-9], 20 shots"), ("fashion_100shots", "Fashion [5-9], 100 shots")]
TARGETS.append(("digits_20shots", "digits, 20 shots"))
# (method spec, the paper's row name)
ROWS = [
    ("linear_probe", "Feature Extractor"),
    ("finetune", "Standard Fine-tuning"),
    ("finetune[stochastic=true]", "Stochastic Fine-tuning"),
    ("finetune[last_k=3]", "Fine-tuning last-3"),
    ("finetune[last_k=2]", "Fine-tuning last-2"),
    ("finetune[last_k=1]", "Fine-tuning last-1"),
    ("finetune[arch.depth=38]", "Fine-tuning ResNet-38 (the paper's ResNet-101)"),
    ("l2sp", "L2-SP"),
    ("spottune[eval_route=finetuned]", "SpotTune (running fine-tuned blocks)"),
    ("spottune_global", "SpotTune (global-k)"),
    ("spottune[policy_lr_mult=0.1]", "SpotTune, the paper's policy learning rate (0.1x)"),
    ("spottune", "SpotTune (our default: policy learning rate 10x)"),
]


def main() -> None:
    loaded, figure_rows = [], []
    for name, title in TARGETS:
        path = RESULTS / name / "results.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            loaded.append((title, summary["selected"]))
            figure_rows += [(f"{title}, {v}", d) for v, d in spottune_rows(summary, ["spottune"])]
    if not loaded:
        raise SystemExit(f"no results under {RESULTS}; run: bash benchmarks/run.sh spottune")
    print(f"| method | {' | '.join(t for t, _ in loaded)} | Decathlon score |")
    print(f"|---|{'---|' * len(loaded)}---|")
    e_max = [2 * (1 - sel["finetune"]["test_mean"]) for _, sel in loaded]
    for spec, row in ROWS:
        variant = variant_name(spec)
        entries = [sel.get(variant) for _, sel in loaded]
        ok = [e if e and e.get("status") == "ok" else None for e in entries]
        cells = [f"{100 * e['test_mean']:.2f} ± {100 * e['test_std']:.2f}" if e else "—" for e in ok]
        score = "—"
        if all(ok):
            score = f"{decathlon_score([1 - e['test_mean'] for e in ok], e_max):.0f}"
        print(f"| {row} | {' | '.join(cells)} | {score} |")
    print()
    if figure_rows:
        plot_spottune_rows(figure_rows, RESULTS / "spottune_targets.png")
    n = len(loaded)
    print(f"Decathlon score: E_max = 2 × fine-tuning's test error; {n} targets, at most {1000 * n}.")


if __name__ == "__main__":
    main()
