#!/usr/bin/env bash
# The bench figures of today's families on a GPU, in one call (about 6 minutes on an H200): the compact
# forward's defaults (`induction-sweep bench`) and TransformerLens' path (scripts/bench_lab.py, fast=false)
# against the plain loop, for the pythia-160m shape and the llama-like 1B shape (jobs/bench.py SHAPES).
# Prepare as for scripts/device/gpu.sh (.whl carried). Logs and JSON under $OUT (or ./families-out).
# A smoke test on a CPU: PYTHON=.venv/bin/python FAMILIES_SMALL=1 scripts/device/families.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
root="${OUT:-families-out}"
py="${PYTHON:-python3}"
mkdir -p "$root"
if [ -d .whl ] && [ -z "${FAMILIES_SMALL:-}" ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/scripts/device/stubs:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
if [ -n "${FAMILIES_SMALL:-}" ]; then
    device=(--device cpu --seconds 0.05 --batches 16 --layers 1 --precisions fp32)
else
    device=(--device cuda --seconds 1 --precisions bf16)
fi
for shape in pythia-160m llama-1b; do
    echo "== bench $shape"
    timeout 200 $py -m jobs.cli bench --shape "$shape" "${device[@]}" --json > "$root/bench-$shape.log" 2>&1
    echo "== bench $shape: exit $?"; grep -v '^{' "$root/bench-$shape.log" | tail -n 4
    echo "== transformer_lens path $shape"
    timeout 150 $py scripts/bench_lab.py --shape "$shape" "${device[@]}" --only fast=false --json > "$root/tl-$shape.log" 2>&1
    echo "== transformer_lens path $shape: exit $?"; grep -v '^{' "$root/tl-$shape.log" | tail -n 4
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null > "$root/gpu.txt" || true
