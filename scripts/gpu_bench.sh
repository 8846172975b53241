#!/usr/bin/env bash
# The GPU check for the triage embedder (scripts/gpu_bench.py): one JSON line on stdout, the same in $OUT if set.
# Prepare first on the development machine: bash scripts/gpu_bench_prepare.sh; then run this where a GPU is, with
# .gpubench carried along. Finishes inside 8 minutes (the stages stop starting after --budget-s, 420 s by default).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec timeout 470 python3 scripts/gpu_bench.py ${OUT:+--json-out "$OUT/gpu_bench.json"} "$@"
