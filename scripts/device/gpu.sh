#!/usr/bin/env bash
# Everything a GPU machine is needed for, in one call (about 10 minutes on an H200; each part has its own
# time limit so one slow part does not lose the others). Prepare here, with network:
#   ../shared/device/pack-gpu-deps.sh .        (Ray and TransformerLens wheels into .whl/, git-ignored)
# then on the device, carrying .whl:  scripts/device/gpu.sh
# Parts, logs and JSON under $OUT (or ./gpu-out):
#   e2e/     the post's run cold and warm, the full vocabulary with every experiment, `report` and
#            `report --from-rows`, a gelu-2l-shaped checkpoint through Ray (scripts/device/e2e.sh), each
#            run's manifest with its phases (the load-time check's figure under load_checks);
#   bench/   `induction-sweep bench` of the defaults on attn-only-2l, gelu-2l and gpt2-small (every precision),
#            pythia-160m and llama-1b (bf16; with TransformerLens' path beside them), each with its error;
#   lab/     every variant on attn-only-2l with --check toy-2l (each against TransformerLens on the device)
#            and the precision bias (--bias 200).
# GPU_PARTS picks parts (default "e2e bench families lab"; their limits add up to about 14 minutes, so a
# session with less device time runs some of them, e.g. GPU_PARTS="e2e bench").
# A smoke test of the script on a CPU machine with the project's venv: PYTHON=.venv/bin/python GPU_SMALL=1 scripts/device/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
root="${OUT:-gpu-out}"
py="${PYTHON:-python3}"
mkdir -p "$root/e2e" "$root/bench" "$root/lab"
if [ -d .whl ] && [ -z "${GPU_SMALL:-}" ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    mkdir -p /tmp/raysite && tar xJf .whl/ray-slim.tar.xz -C /tmp/raysite
    export PYTHONPATH="/tmp/site:/tmp/raysite:$PWD/scripts/device/stubs:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
parts="${GPU_PARTS:-e2e bench families lab}"
want() { [[ " $parts " == *" $1 "* ]]; }
part() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@"
    echo "== $name: exit $?"
}
if [ -n "${GPU_SMALL:-}" ]; then
    device=(--device cpu --seconds 0.05 --batches 16); shapes=(toy); families=(pythia-160m llama-1b); scale=(--layers 1 --precisions fp32)
    lab=(--precisions fp32 --only compiled=false); bias=4; flimit=600
    want e2e && part e2e 600 env OUT="$root/e2e" PYTHON="$py" E2E_SMALL=1 scripts/device/e2e.sh
else
    device=(--device cuda --seconds 1); shapes=(attn-only-2l gelu-2l gpt2-small); families=(pythia-160m llama-1b); scale=(--precisions bf16)
    lab=(--batches 65536 --seconds 1); bias=200; flimit=90
    want e2e && part e2e 240 env OUT="$root/e2e" PYTHON="$py" scripts/device/e2e.sh
fi
for shape in "${shapes[@]}"; do
    want bench || break
    what=(--shape "$shape"); [ "$shape" = toy ] && what=()
    part "bench $shape" 60 sh -c "$py -m jobs.cli bench ${what[*]} ${device[*]} --json > '$root/bench/$shape.log' 2>&1; tail -n 4 '$root/bench/$shape.log'"
done
for shape in "${families[@]}"; do  # the compact default, then TransformerLens' path on the same shape
    want families || break
    part "bench $shape" "$flimit" sh -c "$py -m jobs.cli bench --shape $shape ${device[*]} ${scale[*]} --json > '$root/bench/$shape.log' 2>&1; tail -n 3 '$root/bench/$shape.log'"
    part "transformer_lens $shape" "$flimit" sh -c "$py scripts/bench_lab.py --shape $shape ${device[*]} ${scale[*]} --only fast=false --json > '$root/bench/$shape-tl.log' 2>&1; grep -v '^{' '$root/bench/$shape-tl.log' | tail -n 2"
done
want lab && part lab 120 sh -c "$py scripts/bench_lab.py ${lab[*]} --check toy-2l --bias $bias --json > '$root/lab/lab.log' 2>&1; grep -v '^{' '$root/lab/lab.log' | tail -n 30"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null > "$root/gpu.txt" || true
