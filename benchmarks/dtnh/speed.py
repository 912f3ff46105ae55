"""DTNH training-step time relative to its base regulariser (and to fine-tuning), in one process.

Run: `.venv/bin/python benchmarks/dtnh/speed.py [REPEATS]` -> benchmarks/dtnh/results/speed.json.
Targets (issue 5): dtnh:l2sp <= 1.10x l2sp, dtnh:knowdist <= 1.5x knowdist.
"""

import json
import sys
from pathlib import Path

import torch

from paramtransfer.bench.speed import step_time_ratios

torch.set_num_threads(2)
repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 30
bases = ["l2sp", "knowdist", "delta"]
methods = [m for b in bases for m in (b, f"dtnh:{b}", f"dtnh:{b}[granularity=tensor]")]
result: dict = {"command": "python benchmarks/dtnh/speed.py", "dtnh_over_base": {}}
for arch, n in (("lenet", repeats), ("resnet20", max(5, repeats // 3))):
    r = step_time_ratios([arch], methods, repeats=n)
    result[arch] = r
    ms = r["train_step_ms"][arch]
    result["dtnh_over_base"][arch] = {
        m: ms[m] / ms[m.split(":")[1].split("[")[0]] for m in methods if m.startswith("dtnh:")
    }
out = Path(__file__).parent / "results" / "speed.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
for arch, ratios in result["dtnh_over_base"].items():
    for m, ratio in ratios.items():
        print(f"{arch:9s} {m:32s} train step {ratio:.2f}x its base regulariser")
