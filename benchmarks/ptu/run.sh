#!/usr/bin/env bash
# Reproduces benchmarks/ptu/results/: `bash benchmarks/ptu/run.sh [NAME ...]` (default: every setting).
# Each setting is one `paramtransfer compare --config benchmarks/ptu/NAME.yaml`; finished runs are reused,
# so an interrupted benchmark continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(s1_lenet_20shots rnn_fashion_to_digits s3_mobilenet_20shots s1_lenet_100shots s2_resnet20_20shots)
for n in "${names[@]}"; do
  start=$(date +%s)
  .venv/bin/paramtransfer compare --config "benchmarks/ptu/$n.yaml" --out "runs/bench/ptu/$n" --quiet
  mkdir -p "benchmarks/ptu/results/$n"
  cp "runs/bench/ptu/$n"/{results.json,table.md,config.yaml} "benchmarks/ptu/results/$n/"
  cp "runs/bench/ptu/$n"/*.png "benchmarks/ptu/results/$n/"
  echo "$n: $(( $(date +%s) - start )) s"
done
