#!/usr/bin/env bash
# `induction-sweep bench --device cuda` on a bare GPU machine: it has torch (with Triton), pandas and
# pyarrow but no network, Ray or TransformerLens. The bench needs neither Ray nor boto3.
#
#   here (with network):  scripts/device/bench.sh fetch
#       puts the pure-Python wheels TransformerLens 3.9 needs and that machine lacks into .whl/
#       (git-ignored; about 1 MB), to travel with the working tree;
#   there:                scripts/device/bench.sh [bench options, e.g. --shape gelu-2l]
#       (the variants, --check and --bias are scripts/bench_lab.py's; scripts/device/gpu.sh runs them
#       with the end-to-end runs in one call)
#       installs .whl/ into /tmp/site, puts the `datasets` stub (scripts/device/stubs) on the path and
#       runs the bench; the log and the JSON go to $OUT (or ./bench-out).
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=(transformer_lens==3.9.0 better-abc fancy-einsum "typeguard>=4.2,<5" beartype)

if [ "${1:-}" = fetch ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        -d .whl "${WHEELS[@]}"
    ls -l .whl
    exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD/scripts/device/stubs:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt" || true
python3 -m jobs.cli bench --json "$@" 2>&1 | tee "$out/bench.log"
tail -n 1 "$out/bench.log" > "$out/bench.json"
