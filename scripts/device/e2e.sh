#!/usr/bin/env bash
# The project's real pipeline end to end on a bare GPU machine (Ray, actors, Parquet, aggregation,
# report), with the phase breakdown each run prints. That machine has torch (with Triton), pandas,
# pyarrow, matplotlib and safetensors, but no network, Ray or TransformerLens:
#
#   here (with network):  ../shared/device/pack-gpu-deps.sh .     (writes .whl/, git-ignored)
#   there:                scripts/device/e2e.sh                    (carry .whl along)
#
# Runs, on a random attn-only-2l-shaped checkpoint (d_model 512, 8 heads, d_vocab 48262):
#   1. the post's token-powers run (10 000 tokens x 256 sequences x 2 roles), Inductor's caches cold;
#   2. the same run again into a fresh directory: Inductor's on-disk caches warm, as on any reuse;
#   3. --experiment all --tokens all (49.4 M forwards);
#   4. `report` of run 3 (footer partials only) and `report --from-rows` of run 1 (every row re-read);
#   5. a gelu-2l-shaped checkpoint (attention + MLP blocks) through Ray: 1 000 tokens, every experiment.
# Logs and each run's manifest.json (with its "phases") go to $OUT (or ./e2e-out). E2E_RUNS picks some
# of them (default "post-cold post-warm all reports gelu").
# A smoke test of the script itself on a CPU machine with the project's venv (a small model, small runs):
#   PYTHON=.venv/bin/python E2E_SMALL=1 scripts/device/e2e.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-e2e-out}"
py="${PYTHON:-python3}"
mkdir -p "$out"
: > "$out/walls.txt"
: > "$out/report.log"
if [ -d .whl ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    mkdir -p /tmp/raysite && tar xJf .whl/ray-slim.tar.xz -C /tmp/raysite
    export PYTHONPATH="/tmp/site:/tmp/raysite:$PWD/scripts/device/stubs:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/e2e-inductor
rm -rf /tmp/e2e-inductor /tmp/e2e
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt" || true

if [ -n "${E2E_SMALL:-}" ]; then  # the smoke test's sizes
    shape="d_vocab=2000, n_ctx=32, d_model=64, n_heads=4, d_head=16"
    gelu="$shape, attn_only=False, d_mlp=256, act_fn='gelu', positional_embedding_type='standard'"
    post=(--tokens 64 --seqs 8 --shard-size 256); all=(--tokens all --seqs 4 --pairs 64 --shard-size 1024)
    mlp=(--tokens 32 --seqs 4 --pairs 64)
else
    shape=""
    gelu="attn_only=False, d_mlp=2048, act_fn='gelu', positional_embedding_type='standard', n_ctx=1024"
    post=(--tokens 10000 --seqs 256 --shard-size 1048576); all=(--tokens all --shard-size 2097152)
    mlp=(--tokens 1000 --shard-size 1048576)
fi
$py -c "from workers.model import hooked; hooked.export_model(hooked.random_model($shape), '/tmp/e2e/model')" 2>&1 | tail -2
sweep() {  # name, then run options
    local name=$1; shift
    local start=$SECONDS
    $py -m jobs.cli run --model /tmp/e2e/model --out "/tmp/e2e/$name" --quiet "$@" 2>&1 | tee "$out/$name.log" | sed -n '/^time:/,$p'
    echo "$name: $((SECONDS - start)) s from command to report" | tee -a "$out/walls.txt"
    cp "/tmp/e2e/$name/manifest.json" "$out/$name.manifest.json"
}
runs="${E2E_RUNS:-post-cold post-warm all reports gelu}"  # a subset, e.g. E2E_RUNS=post-cold
want() { [[ " $runs " == *" $1 "* ]]; }
want post-cold && sweep post-cold --experiment token-powers "${post[@]}"
want post-warm && sweep post-warm --experiment token-powers "${post[@]}"
want all && sweep all --experiment all "${all[@]}"
if want reports; then
    for args in "/tmp/e2e/all" "/tmp/e2e/post-cold --from-rows"; do
        start=$SECONDS
        $py -m jobs.cli report $args 2>&1 | sed -n '/^time:/,$p' | tee -a "$out/report.log"
        echo "report $args: $((SECONDS - start)) s" | tee -a "$out/walls.txt"
    done
fi
if want gelu; then
    $py -c "from workers.model import hooked; hooked.export_model(hooked.random_model($gelu), '/tmp/e2e/gelu')" 2>&1 | tail -2
    start=$SECONDS
    $py -m jobs.cli run --model /tmp/e2e/gelu --out /tmp/e2e/gelu-run --experiment all --quiet "${mlp[@]}" 2>&1 \
        | tee "$out/gelu.log" | sed -n '/^time:/,$p'
    echo "gelu: $((SECONDS - start)) s from command to report" | tee -a "$out/walls.txt"
    cp /tmp/e2e/gelu-run/manifest.json "$out/gelu.manifest.json"
fi
