#!/usr/bin/env bash
# One device call for the scorer's figures on every shape the issues name (about 9 minutes on an
# H200): gelu-2l and gpt2-small (compact forward with MLPs against TransformerLens' path, bf16) and
# attn-only-2l (every precision and unembedding), with toy-2l checked on the device against
# TransformerLens. Each part has its own time limit (580 s in all, within a device call's 600), so one
# slow part does not lose the others.
# Logs and JSON go to $OUT/<shape>/ (scripts/device/bench.sh; carry .whl, made by `bench.sh fetch`).
set -uo pipefail
cd "$(dirname "$0")/../.."
root="${OUT:-bench-out}"
part() {  # name, seconds, bench options...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    OUT="$root/$name" timeout "$limit" scripts/device/bench.sh "$@" | grep -v '^{'
    echo "== $name: exit ${PIPESTATUS[0]}"
}
part gelu-2l 150 --shape gelu-2l --precisions bf16 --attention products --batches 16384,65536 --seconds 1 --profile
part gpt2-small 190 --shape gpt2-small --precisions bf16 --attention products --batches 8192,16384 --seconds 1 --profile
part attn-only-2l 240 --precisions bf16,tf32,fp32 --attention products --batches 65536 --seconds 1 --profile --check toy-2l
