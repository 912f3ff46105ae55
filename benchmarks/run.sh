#!/usr/bin/env bash
# Runs benchmark settings and records their results: `bash benchmarks/run.sh SUITE [NAME ...]`.
# A thin wrapper over `paramtransfer bench SUITE/NAME --record` (see `paramtransfer bench --help`): each
# setting runs into runs/bench/SUITE/NAME (finished runs are reused, so an interrupted benchmark
# continues where it stopped), its results are copied to benchmarks/SUITE/results/NAME/ and
# benchmarks/report.md is rebuilt. Without NAMEs: every setting of the suite, in name order.
set -euo pipefail
cd "$(dirname "$0")/.."
suite=${1:?usage: bash benchmarks/run.sh SUITE [NAME ...]}
shift
if [ $# -eq 0 ]; then
  exec .venv/bin/paramtransfer bench "$suite" --record --quiet
fi
for n in "$@"; do
  .venv/bin/paramtransfer bench "$suite/$n" --record --quiet
done
