"""The log-sum-exp of materialised logits in one read (Triton): ``logits_lse``.

It returns what ``workers.scoring.logodds.softmax_parts`` does: the top logit, its token and the log-sum-exp
of every *other* logit, shifted by their own maximum, so that it stays exact however far below the
top they lie (float32's exp underflows 103 nats down). Each column slot of a row keeps its own
running state (top, the tile it came from, the rest's maximum and its sum relative to it), folded
elementwise with one exp a logit; nothing is reduced across threads until the row ends (a reduction
per tile binds the kernel by instructions rather than by reading the logits).

On CUDA the scorer reduces cuBLAS's logits with it at every precision (docs/PERFORMANCE.md).
Elsewhere it runs under Triton's interpreter (``TRITON_INTERPRET=1``, set before this module is
imported), which is how the tests check it without a GPU; the interpreter reads bf16 as float32 values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor

from workers.kernels.common import AUTOTUNE_CACHE, INTERPRET

# BIG_BATCH in the key: tiles tuned on an actor's warm-up or a bench's accuracy sample (a few
# hundred rows) would otherwise serve batches of 65536

LSE_CONFIGS = ([triton.Config({"BLOCK_B": 4, "BLOCK_V": 64})] if INTERPRET else
               [triton.Config({"BLOCK_B": b, "BLOCK_V": v}, num_warps=w) for b, v, w in
                [(1, 1024, 4), (1, 2048, 4), (1, 2048, 8), (1, 4096, 8), (2, 1024, 4), (2, 2048, 8), (4, 1024, 8)]])


# the rest's maximum before any logit joins it: finite, so that a -inf logit joining adds exp(-inf) = 0
# rather than the NaN of -inf - -inf, without a test a logit
NO_REST = tl.constexpr(-3.4028234663852886e38)  # -float32 max


@triton.jit
def _fold_slots(m, tile, r, s, x, t):
    """Fold tile ``t`` of a row (``x``: one logit per slot, -inf past the vocabulary) into each slot's
    running top ``m``, the tile it came from, and the slot's other logits as ``s`` = Σ exp(logit - r)
    with ``r`` their maximum (NO_REST while there is none). Elementwise: no reduction across threads
    until the row ends."""
    new = x > m  # ties keep the earlier logit, as argmax does
    joins = tl.where(new, m, x)  # what joins the rest: the old top, or x
    up = joins > r  # the rest's maximum moves: rescale its sum
    e = tl.exp(-tl.abs(joins - r))  # exp(r - joins) where it moves, else exp(joins - r)
    return (tl.where(new, x, m), tl.where(new, t, tile), tl.where(up, joins, r), tl.where(up, s * e + 1.0, s + e))


@triton.autotune(configs=LSE_CONFIGS, key=["V", "BIG_BATCH"], **AUTOTUNE_CACHE)
@triton.jit
def _lse_kernel(x_ptr, top_value_ptr, top_ptr, rest_ptr, B, V, stride_x,
                BIG_BATCH: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    slots = tl.arange(0, BLOCK_V)
    # rows past the batch read the last row again (not stored): whole tiles need no mask at all
    ptrs = x_ptr + tl.minimum(rows, B - 1)[:, None] * stride_x + slots[None, :]
    # slot j of a row sees columns j, j + BLOCK_V, ...: a [BLOCK_B, BLOCK_V] running state, merged once at the end
    m = tl.full((BLOCK_B, BLOCK_V), float("-inf"), tl.float32)
    tile = tl.zeros((BLOCK_B, BLOCK_V), tl.int32)
    r = tl.full((BLOCK_B, BLOCK_V), NO_REST, tl.float32)
    s = tl.zeros((BLOCK_B, BLOCK_V), tl.float32)
    full = V // BLOCK_V
    for t in range(0, full):  # whole tiles: no column mask, so the loads are 16 bytes wide
        x = tl.load(ptrs + t * BLOCK_V)
        m, tile, r, s = _fold_slots(m, tile, r, s, x.to(tl.float32), t)
    if full * BLOCK_V < V:
        x = tl.load(ptrs + full * BLOCK_V, mask=(full * BLOCK_V + slots < V)[None, :], other=float("-inf"))
        m, tile, r, s = _fold_slots(m, tile, r, s, x.to(tl.float32), full)
    top_value = tl.max(m, axis=1)
    cols = tile * BLOCK_V + slots[None, :]
    top = tl.min(tl.where(m == top_value[:, None], cols, V), axis=1)  # the first column holding the top
    # the rest: every slot's own rest, and the tops of the slots that do not hold the row's top
    m_rest = tl.where(cols == top[:, None], float("-inf"), m)
    shift = tl.maximum(tl.max(m_rest, axis=1), tl.max(r, axis=1))
    shift = shift[:, None]  # NO_REST where no other logit is finite: then every sum is 0, the rest log 0
    rest = tl.sum(tl.exp(m_rest - shift) + s * tl.exp(r - shift), axis=1)
    ok = rows < B
    tl.store(top_value_ptr + rows, top_value, mask=ok)
    tl.store(top_ptr + rows, top, mask=ok)
    tl.store(rest_ptr + rows, tl.sum(shift, axis=1) + tl.log(rest), mask=ok)


def logits_lse(
    logits: Float[Tensor, "batch vocab"],
) -> tuple[Float[Tensor, "batch 1"], Int[Tensor, "batch 1"], Float[Tensor, "batch 1"]]:
    """``workers.scoring.logodds.softmax_parts`` of materialised logits (bf16 or float32, summed in float32)
    in one read: each slot of a row's tiles folded on its own, the slots merged once at the end."""
    if INTERPRET and logits.dtype == torch.bfloat16:
        # the interpreter multiplies bf16 bit patterns (triton-lang/triton#11584); bf16 -> float32 is exact
        logits = logits.float()
    assert logits.stride(1) == 1, "rows must be contiguous"
    B, V = logits.shape
    top_value = torch.empty(B, 1, device=logits.device, dtype=torch.float32)
    top, rest = torch.empty(B, 1, device=logits.device, dtype=torch.int32), torch.empty_like(top_value)
    _lse_kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)](
        logits, top_value, top, rest, B, V, logits.stride(0), BIG_BATCH=B >= 8192)
    return top_value, top.long(), rest
