"""Fused unembedding + log-sum-exp (Triton): the [batch, vocab] logits are never written; and the
same log-sum-exp over logits that were (``logits_lse``: one read of each row).

Each program takes a block of rows and walks the vocabulary in tiles: one tile of logits is made
by ``tl.dot`` in float32 and folded at once into a running (top value, top index, mass of every
other token relative to the top). The mass excludes the top token by index, not by subtracting
1, so it stays exact when it is 1e-30 of the top (p(B) near 1). The output is what
``workers.scoring.softmax_parts`` computes from materialised logits. ``FusedUnembedLSE`` keeps
W_U padded so that every row starts 128-byte aligned, which Triton's loads specialise on.
``logits_lse`` keeps that running state per column slot instead of per row, so that nothing is
reduced across threads until a row ends (it was bound by instructions, not by reading the logits).

On CUDA the scorer's default for bf16 and tf32 is ``logits_lse`` over cuBLAS's logits (measured
faster than the fused kernel, docs/PERFORMANCE.md); the fused kernel stays an option. Elsewhere
both run under Triton's interpreter (``TRITON_INTERPRET=1``, set before this module is imported),
which is how the tests check them without a GPU; the interpreter reads bf16 as float32 values.
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:  # numpy emulation: one small tile, no tuning
    CONFIGS = [triton.Config({"BLOCK_B": 16, "BLOCK_V": 64, "BLOCK_K": 32})]
else:
    # Hopper's wgmma wants 4-warp groups and tiles of at least 64; K (d_model: 512 for attn-only-2l) is
    # short, so deeper K tiles with fewer stages are tried too
    CONFIGS = [
        triton.Config({"BLOCK_B": b, "BLOCK_V": v, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for b, v, k, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                              (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 4), (128, 128, 128, 8, 3),
                              (128, 256, 128, 8, 2), (256, 128, 128, 8, 2)]
    ]


@triton.jit
def _fold_tile(m, idx, s, tile, cols, v0):
    """Fold a [rows, BLOCK_V] tile of logits (-inf outside the vocabulary) into the running top
    value ``m``, its token ``idx`` and ``s`` = Σ exp(logit - m) over every other token."""
    tile_m, tile_idx = tl.max(tile, axis=1, return_indices=True)  # one reduction for both (argmax is a second)
    tile_idx = tile_idx.to(tl.int32)
    others = tl.where(cols[None, :] == (v0 + tile_idx)[:, None], float("-inf"), tile - tile_m[:, None])
    tile_s = tl.sum(tl.exp(others), axis=1)
    # whichever top loses joins the mass of the others; a tile of -inf logits (a banned token's
    # bias, rows past the batch) adds nothing, instead of the NaN of -inf - -inf
    new = tile_m > m
    merged = tl.where(new, (s + 1.0) * tl.exp(m - tile_m) + tile_s, s + (tile_s + 1.0) * tl.exp(tile_m - m))
    s = tl.where(tile_m == float("-inf"), s, merged)
    return tl.where(new, tile_m, m), tl.where(new, v0 + tile_idx, idx), s


# BIG_BATCH in the key: tiles tuned on an actor's warm-up or a bench's accuracy sample (a few
# hundred rows) would otherwise serve batches of 65536
# the tuning's result kept in Triton's on-disk cache where this Triton can (a later actor on the
# machine skips ~10 configs' compilation and timing); older Tritons lack the option
AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@triton.autotune(configs=CONFIGS, key=["K", "V", "PRECISION", "BIG_BATCH"], **AUTOTUNE_CACHE)
@triton.jit
def _unembed_lse_kernel(
    h_ptr, w_ptr, b_ptr, top_value_ptr, top_ptr, rest_ptr, B, K, V, stride_h, stride_w,
    PRECISION: tl.constexpr, BIG_BATCH: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # int64 offsets: k × vocab can pass 2^31
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    m = tl.full((BLOCK_B,), float("-inf"), tl.float32)  # running top logit
    idx = tl.zeros((BLOCK_B,), tl.int32)  # its token
    s = tl.zeros((BLOCK_B,), tl.float32)  # Σ exp(logit - m) over every other token seen
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        # the sums start from b_U (read once a tile of BLOCK_B rows)
        acc = tl.zeros((BLOCK_B, BLOCK_V), tl.float32) + tl.load(b_ptr + cols, mask=cols < V, other=0.0)[None, :]
        for k0 in range(0, K, BLOCK_K):
            ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                        mask=(rows[:, None] < B) & (ks[None, :] < K), other=0.0)
            w = tl.load(w_ptr + ks[:, None] * stride_w + cols[None, :],
                        mask=(ks[:, None] < K) & (cols[None, :] < V), other=0.0)
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
        m, idx, s = _fold_tile(m, idx, s, tl.where(cols[None, :] < V, acc, float("-inf")), cols, v0)
    ok = rows < B
    tl.store(top_value_ptr + rows, m, mask=ok)
    tl.store(top_ptr + rows, idx, mask=ok)
    tl.store(rest_ptr + rows, m + tl.log(s), mask=ok)


def _interpretable(t: Tensor) -> Tensor:
    """Under the interpreter, bf16 as float32: it multiplies bf16 bit patterns (triton-lang/triton#11584).
    bf16 -> float32 is exact and tensor cores multiply bf16 exactly with float32 sums: the same arithmetic."""
    return t.float() if INTERPRET and t.dtype == torch.bfloat16 else t


def _parts(B: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The kernels' outputs: top value (float32), its token (int32), log mass of the rest (float32)."""
    top_value = torch.empty(B, 1, device=device, dtype=torch.float32)
    return top_value, torch.empty(B, 1, device=device, dtype=torch.int32), torch.empty_like(top_value)


def unembed_lse(
    h: Float[Tensor, "batch k"], W_U: Float[Tensor, "k vocab"], b_U: Float[Tensor, " vocab"], tf32: bool = False
) -> tuple[Float[Tensor, "batch 1"], Int[Tensor, "batch 1"], Float[Tensor, "batch 1"]]:
    """(top logit, its token, log Σ exp over every other token) of ``h @ W_U + b_U``, accumulated in
    float32 (``b_U`` float32). float32 inputs multiply in full float32 unless ``tf32``."""
    h, W_U = _interpretable(h), _interpretable(W_U)
    assert h.stride(1) == 1 and W_U.stride(1) == 1 and b_U.stride(0) == 1, "rows must be contiguous"
    assert b_U.dtype == torch.float32, "b_U is added to float32 sums"
    (B, K), V = h.shape, W_U.shape[1]
    top_value, top, rest = _parts(B, h.device)
    # "tf32" is Triton's default; only float32 inputs read it
    precision = "ieee" if h.dtype == torch.float32 and not tf32 else "tf32"
    _unembed_lse_kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)](
        h, W_U, b_U, top_value, top, rest, B, K, V, h.stride(0), W_U.stride(0), PRECISION=precision,
        BIG_BATCH=B >= 8192)
    return top_value, top.long(), rest


LSE_CONFIGS = ([triton.Config({"BLOCK_B": 4, "BLOCK_V": 64})] if INTERPRET else
               [triton.Config({"BLOCK_B": b, "BLOCK_V": v}, num_warps=w) for b, v, w in
                [(1, 1024, 4), (1, 2048, 4), (1, 2048, 8), (1, 4096, 8), (2, 1024, 4), (2, 2048, 8), (4, 1024, 8)]])


@triton.jit
def _fold_slots(m, tile, s, x, t):
    """Fold tile ``t`` of a row (``x``: one logit per slot, -inf past the vocabulary) into each slot's
    running top ``m``, the tile it came from and ``s`` = Σ exp(logit - m) over the slot's other logits.
    Elementwise: no reduction across threads until the row ends."""
    new = x > m  # ties keep the earlier logit, as argmax does
    e = tl.exp(-tl.abs(x - m))  # exp(m - x) for a new top (the old one joins the rest), else exp(x - m)
    e = tl.where(x == float("-inf"), 0.0, e)  # nothing to add, and no NaN from -inf - -inf
    return tl.where(new, x, m), tl.where(new, t, tile), tl.where(new, s * e + e, s + e)


@triton.autotune(configs=LSE_CONFIGS, key=["V", "BIG_BATCH"], **AUTOTUNE_CACHE)
@triton.jit
def _lse_kernel(x_ptr, top_value_ptr, top_ptr, rest_ptr, B, V, stride_x,
                BIG_BATCH: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    slots = tl.arange(0, BLOCK_V)
    # rows past the batch read the last row again (not stored): whole tiles need no mask at all
    ptrs = x_ptr + tl.minimum(rows, B - 1)[:, None] * stride_x + slots[None, :]
    # slot j of a row sees columns j, j + BLOCK_V, ...: a [BLOCK_B, BLOCK_V] running state, merged once
    # at the end. Compiled for sm_90 (scripts/kernel_registers.py), folding each tile across threads
    # (max, index, sum) took ~24 instructions a logit and 5 barriers a tile; this takes ~15 and none.
    m = tl.full((BLOCK_B, BLOCK_V), float("-inf"), tl.float32)
    tile = tl.zeros((BLOCK_B, BLOCK_V), tl.int32)
    s = tl.zeros((BLOCK_B, BLOCK_V), tl.float32)
    full = V // BLOCK_V
    for t in range(0, full):  # whole tiles: no column mask, so the loads are 16 bytes wide
        x = tl.load(ptrs + t * BLOCK_V)
        m, tile, s = _fold_slots(m, tile, s, x.to(tl.float32), t)
    if full * BLOCK_V < V:
        x = tl.load(ptrs + full * BLOCK_V, mask=(full * BLOCK_V + slots < V)[None, :], other=float("-inf"))
        m, tile, s = _fold_slots(m, tile, s, x.to(tl.float32), full)
    top_value = tl.max(m, axis=1)
    cols = tile * BLOCK_V + slots[None, :]
    top = tl.min(tl.where(m == top_value[:, None], cols, V), axis=1)  # the first column holding the top
    # the other slots' tops join the rest; slots that saw only -inf add nothing
    scale = tl.where(m == float("-inf"), 0.0, tl.exp(m - top_value[:, None]))
    rest = tl.sum((s + tl.where(cols == top[:, None], 0.0, 1.0)) * scale, axis=1)
    ok = rows < B
    tl.store(top_value_ptr + rows, top_value, mask=ok)
    tl.store(top_ptr + rows, top, mask=ok)
    tl.store(rest_ptr + rows, top_value + tl.log(rest), mask=ok)


def logits_lse(
    logits: Float[Tensor, "batch vocab"],
) -> tuple[Float[Tensor, "batch 1"], Int[Tensor, "batch 1"], Float[Tensor, "batch 1"]]:
    """``workers.scoring.softmax_parts`` of materialised logits (bf16 or float32, summed in float32)
    in one read: each slot of a row's tiles folded on its own, the slots merged once at the end."""
    logits = _interpretable(logits)
    assert logits.stride(1) == 1, "rows must be contiguous"
    B, V = logits.shape
    top_value, top, rest = _parts(B, logits.device)
    _lse_kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)](
        logits, top_value, top, rest, B, V, logits.stride(0), BIG_BATCH=B >= 8192)
    return top_value, top.long(), rest


def aligned(t: Float[Tensor, "rows k"], pad_rows: bool = False) -> Float[Tensor, "rows_or_more k"]:
    """``t`` with a row stride of a multiple of 64 elements (rows 128-byte aligned on CUDA, whose
    allocations are), and with ``pad_rows`` zero rows up to a multiple of 64 too; same values.
    ``t`` itself where it is laid out so already (the scorer's W_U on CUDA), else a copy. Triton
    specialises on pointers and strides divisible by 16, which the vocabulary (48262) is not."""
    rows, cols = t.shape
    if t.stride(1) == 1 and t.stride(0) % 64 == 0 and t.data_ptr() % 16 == 0 and not (pad_rows and rows % 64):
        return t
    return F.pad(t, (0, -cols % 64, 0, -rows % 64 if pad_rows else 0))[:, :cols]


class FusedUnembedLSE:
    """``unembed_lse`` against one unembedding, kept in an aligned copy (made once), and its bias in float32."""

    def __init__(self, W_U: Float[Tensor, "k vocab"], b_U: Float[Tensor, " vocab"]):
        self.W_U = aligned(W_U, pad_rows=True)  # the extra rows are zero: they add nothing
        self.b_U = b_U.float().contiguous()

    def __call__(self, h: Float[Tensor, "batch k"], tf32: bool = False):
        padded = F.pad(h, (0, self.W_U.shape[0] - h.shape[1]))  # zero columns meet the zero rows
        return unembed_lse(padded, self.W_U, self.b_U, tf32)
