#!/usr/bin/env bash
# Runs benchmark settings and records their results: `bash benchmarks/run.sh SUITE [NAME ...]`.
# SUITE is a folder under benchmarks/ (ptu, dtnh, ...); each NAME is SUITE/NAME.yaml (default: every
# YAML of the suite, in name order). Each setting is one `paramtransfer compare --config`; finished runs
# are reused, so an interrupted benchmark continues where it stopped. Results are copied (results.json,
# table.md, config.yaml, plots) to benchmarks/SUITE/results/NAME/.
set -euo pipefail
cd "$(dirname "$0")/.."
suite=${1:?usage: bash benchmarks/run.sh SUITE [NAME ...]}
shift
[ -d "benchmarks/$suite" ] || { echo "no benchmark suite benchmarks/$suite" >&2; exit 2; }
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for f in "benchmarks/$suite"/*.yaml; do names+=("$(basename "$f" .yaml)"); done
fi
for n in "${names[@]}"; do
  [ -f "benchmarks/$suite/$n.yaml" ] || { echo "no benchmarks/$suite/$n.yaml" >&2; exit 2; }
  start=$(date +%s)
  .venv/bin/paramtransfer compare --config "benchmarks/$suite/$n.yaml" --out "runs/bench/$suite/$n" --quiet
  mkdir -p "benchmarks/$suite/results/$n"
  cp "runs/bench/$suite/$n"/{results.json,table.md,config.yaml} "benchmarks/$suite/results/$n/"
  cp "runs/bench/$suite/$n"/*.png "benchmarks/$suite/results/$n/"
  echo "$suite/$n: $(( $(date +%s) - start )) s"
done
