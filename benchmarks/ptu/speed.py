"""PTU training-step and evaluation time relative to fine-tuning, measured in one process.

Run: `.venv/bin/python benchmarks/ptu/speed.py` -> benchmarks/ptu/results/speed.json (target: PTU train
step <= 1.8x fine-tuning for lenet and resnet20).
"""

import json
import sys
from pathlib import Path

import torch

from paramtransfer.bench.speed import step_time_ratios

torch.set_num_threads(2)
methods = [
    "ptu",
    "ptu[depthwise=per_channel]",
    "ptu[source_cache_mb=0]",
    "ptu[separable=false]",
    "ptu[kernel_size=1]",
    "ptu[layers=[1,2,3]]",
    "scratch",
]
result = {
    "lenet": step_time_ratios(["lenet"], methods, repeats=int(sys.argv[1]) if len(sys.argv) > 1 else 30),
    "resnet20": step_time_ratios(
        ["resnet20"],
        [
            "ptu",
            "ptu[depthwise=per_channel]",
            "ptu[source_cache_mb=0]",
            "ptu[kernel_size=1]",
            "ptu[layers=[3,6,9]]",
        ],
        repeats=10,
    ),
    "command": "python benchmarks/ptu/speed.py",
}
out = Path(__file__).parent / "results" / "speed.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
for arch in ("lenet", "resnet20"):
    r = result[arch]
    for m, ratio in r["train_step_ratio"][arch].items():
        print(f"{arch:9s} {m:22s} train step {ratio:.2f}x finetune, eval {r['eval_ratio'][arch][m]:.2f}x")
