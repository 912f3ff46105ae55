"""SpotTune training-step time and evaluation throughput relative to fine-tuning, in one process.

Run: `.venv/bin/python benchmarks/spottune/speed.py [REPEATS]` -> benchmarks/spottune/results/speed.json.
ResNet-20, batch 128, steps of all methods interleaved, median of the repeats (see
``paramtransfer.experiments.speed``). SpotTune trains both copies of every block (the straight-through
gradient needs both outputs); at evaluation each copy runs only on the examples routed through it. The
source and policy are untrained here, so the evaluation routes are the initial policy's (a mix).
"""

import json
import sys
from pathlib import Path

import torch

from paramtransfer.bench.speed import step_time_ratios

torch.set_num_threads(2)
repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 10
methods = [
    "spottune",
    "spottune[eval_route=finetuned]",
    "spottune[eval_route=frozen]",
    "spottune_global",
    "finetune[arch.depth=38]",
]
r = step_time_ratios(["resnet20"], methods, repeats=repeats)
batch = r["batch"]
result = {
    "command": "python benchmarks/spottune/speed.py",
    **r,
    "eval_images_per_s": {m: 1000 * batch / ms for m, ms in r["eval_ms"]["resnet20"].items()},
}
out = Path(__file__).parent / "results" / "speed.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
for m, ratio in r["train_step_ratio"]["resnet20"].items():
    print(f"{m:34s} train step {ratio:.2f}x fine-tuning, evaluation {r['eval_ratio']['resnet20'][m]:.2f}x")
