#!/usr/bin/env bash
# One device call for the scorer's figures on every shape the issues name (each set about 9 minutes
# on an H200). Each part has its own time limit (under 600 s in all, a device call's limit), so one
# slow part does not lose the others. Logs and JSON go to $OUT/<part>/ (scripts/device/bench.sh;
# carry .whl, made by `bench.sh fetch`).
#
#   bench-shapes.sh          gelu-2l and gpt2-small (compact forward with MLPs against TransformerLens'
#                            path, bf16) and attn-only-2l (every precision and unembedding), toy-2l
#                            checked on the device against TransformerLens in every products variant
#                            (--check runs the variants a part benches, eager; call 3 of
#                            docs/PERFORMANCE.md)
#   bench-shapes.sh triton   the Triton attention (workers/attention_kernels.py) against torch's
#                            products on the three shapes: bf16 with its fastest unembedding so far,
#                            tf32 and fp32 with either log-sum-exp of float32 logits; toy-2l checked on
#                            the device in the bf16 variants (tf32 and fp32 are checked by `query`)
#   bench-shapes.sh query    the Triton attention's default path under bf16 with the query side from
#                            torch's float32 products or its Triton kernel (tf32x3), and layer 0's table
#                            in float32 or float16: four variants, each checked on toy-2l; tf32 and fp32
#                            through the Triton attention, checked on toy-2l; gelu-2l bf16 (no table)
#                            with either query side. Then switch scoring.FASTEST to what wins and run
#                            bench.sh --precisions bf16 --attention triton --bias 200 for its bias
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
if [ "${1:-}" = triton ]; then
    both=(--attention products,triton --seconds 1 --profile)
    part attn-only-2l-bf16 150 --precisions bf16 --batches 65536 --only logits=bf16,lse=triton "${both[@]}" --check toy-2l
    part attn-only-2l-tf32-fp32 170 --precisions tf32,fp32 --batches 65536 --only fused=false,logits=float32 "${both[@]}"
    part gelu-2l 120 --shape gelu-2l --precisions bf16 --batches 32768,65536 --only logits=bf16,lse=triton "${both[@]}"
    part gpt2-small 140 --shape gpt2-small --precisions bf16 --batches 8192,16384 --only logits=bf16,lse=triton "${both[@]}"
    exit 0
fi
if [ "${1:-}" = query ]; then
    triton=(--attention triton --batches 65536 --seconds 1 --profile)
    part attn-only-2l-bf16 220 --precisions bf16 --only logits=bf16,lse=triton "${triton[@]}" --check toy-2l
    part attn-only-2l-tf32-fp32 150 --precisions tf32,fp32 --only logits=float32,lse=triton "${triton[@]}" --check toy-2l
    part gelu-2l 130 --shape gelu-2l --precisions bf16 --only logits=bf16,lse=triton,table=float32 "${triton[@]}"
    exit 0
fi
part gelu-2l 150 --shape gelu-2l --precisions bf16 --attention products --batches 16384,65536 --seconds 1 --profile
part gpt2-small 190 --shape gpt2-small --precisions bf16 --attention products --batches 8192,16384 --seconds 1 --profile
part attn-only-2l 240 --precisions bf16,tf32,fp32 --attention products --batches 65536 --seconds 1 --profile --check toy-2l
