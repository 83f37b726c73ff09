"""Attention over a sequence's few positions as Triton kernels, a program per sequence (or a group
of its heads): the compact forward's ``attention="triton"`` (workers/compact/forward.py).

At 24 positions every per-sequence matrix is tiny (24 × 24 scores, 24 × 512 residual rows), and
torch's batched products of them run at a few percent of a GPU's rate. Here each program keeps its
sequence in registers:

* ``causal_attention``: a layer before the last, for one sequence and a group of heads in turn. It
  reads the Q/K/V rows straight from the per-token table of layer 0 (``tokens`` as row indices: the
  ``[batch, pos, 3 × heads × d_head]`` gather is never written) or from a dense Q/K/V, adds the
  position rows, and writes ``softmax(QKᵀ/scale, causal) V`` in the dtype the next projection reads.
* ``last_attention``: the last layer at the last position, keys and values folded into the query
  side (``u = W_Kᵀq`` per head, computed outside). One program LayerNorms its sequence's 24
  residual rows, scores them against every head's ``u`` and mixes them by the pattern: the
  LayerNorm'd ``[batch, pos, d_model]`` is never written, nor the residual rows
  themselves where they are the embedding's rows plus the layer before's output (compact.layers.Stream).

Scores, softmax and mixes are float32 (``input_precision="ieee"``), as the torch path computes them,
except the first kernel's two products under the tf32 and bf16 precisions: TF32 tensor cores, their
inputs rounded to nearest (docs/PERFORMANCE.md has the powers' bias).
Both are ``torch.library`` custom ops, so torch.compile treats them as one opaque call with known output
shapes. Under ``TRITON_INTERPRET=1`` they run on the CPU (tests/test_attention_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor

from workers.kernels.common import AUTOTUNE_CACHE, INTERPRET


def _block(n: int) -> int:
    """A tile side covering ``n``: a power of two, and at least 16 (``tl.dot``'s smallest)."""
    return max(16, triton.next_power_of_2(n))


def _dot_precision(device: torch.device, tf32: bool) -> str:
    """TF32 where asked (the bf16 precision) or where torch's float32 products take it (the scorer's
    tf32 precision sets the flag, as the products attention's batched products read it), else full
    float32."""
    return "tf32" if tf32 or (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32) else "ieee"


RNA_IN_PTX = tl.constexpr(not INTERPRET)  # the interpreter runs no PTX


@triton.jit
def _tf32(x):
    """``x`` rounded to TF32's 10-bit mantissa, to nearest (ties away from zero): a TF32 tensor core
    reads the top 19 bits of the float32 it is given, which alone rounds toward zero (a shift of
    -0.004 nats in toy-2l's powers, emulated on a CPU). On a GPU, PTX's own cvt.rna.tf32.f32; under
    the interpreter the same rounding on the bits, where a NaN is kept apart (the sum would wrap some
    NaNs to zeros)."""
    if RNA_IN_PTX:
        return tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    rounded = ((x.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def _store_rounded(ptr, x, mask):
    """Store float32 ``x`` in ``ptr``'s dtype, a bf16 to nearest even as torch's cast rounds: Triton's
    conversion on a GPU; under the interpreter, which truncates, the same rounding on the bits."""
    if not RNA_IN_PTX and ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
        x = tl.where(x == x, rounded, x)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


def _head_groups(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs whose heads per program divide the model's heads (the interpreter's: its largest)."""
    heads = {**named_args, **kwargs}["N_HEADS"]  # a keyword at the launch
    fits = [c for c in configs if heads % c.kwargs["GROUP"] == 0]
    return fits[-1:] if INTERPRET else fits


# A program takes GROUP heads of a sequence in turn; with 2 stages the next head's rows load (into
# shared memory) while this one's products run: one head a program leaves too few warps an SM to hide
# the table's gather. maxnreg 128: 4 programs an SM for a few spilled bytes; fewer than 4 warps spill
# (sm_90, scripts/kernel_registers.py).
@triton.autotune(configs=[triton.Config({"GROUP": g}, num_warps=w, num_stages=s, maxnreg=m) for g, w, s, m in
                          ([(1, 1, 1, None), (2, 1, 1, None)] if INTERPRET else
                           [(1, 4, 1, None), (1, 8, 1, None), (2, 4, 2, None), (4, 4, 2, None), (4, 4, 2, 128),
                            (8, 4, 2, None), (8, 4, 2, 128), (8, 8, 2, None)])],
                 key=["P", "N_HEADS", "D_HEAD", "GATHER", "BIG_BATCH", "DOT"], prune_configs_by={"early_config_prune": _head_groups},
                 **AUTOTUNE_CACHE)
@triton.jit
def _causal_attention_kernel(
    qkv_ptr, tokens_ptr, bias_ptr, out_ptr, P, HD, stride_qkv, stride_out, scale_inv,
    GATHER: tl.constexpr, BIG_BATCH: tl.constexpr, DOT: tl.constexpr, N_HEADS: tl.constexpr, D_HEAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, GROUP: tl.constexpr,
):
    # one flat axis with a sequence's head groups side by side: they run together and read neighbouring
    # pieces of the same table rows (heads as a grid's first axis would put the batch on its second,
    # which CUDA caps at 65535)
    groups: tl.constexpr = N_HEADS // GROUP
    b = (tl.program_id(0) // groups).to(tl.int64)
    first = (tl.program_id(0) % groups) * GROUP
    pos = tl.arange(0, BLOCK_P)
    e = tl.arange(0, BLOCK_E)
    ok_p = pos < P
    if GATHER:  # layer 0's table: the row of each position's token
        rows = tl.load(tokens_ptr + b * P + pos, mask=ok_p, other=0).to(tl.int64)
    else:
        rows = b * P + pos
    ok = ok_p[:, None] & (e < D_HEAD)[None, :]
    causal = (pos[None, :] <= pos[:, None]) & ok_p[None, :]
    for head in range(first, first + GROUP):
        col = head * D_HEAD + e[None, :]
        src = qkv_ptr + rows[:, None] * stride_qkv + col
        bias = bias_ptr + pos[:, None] * (3 * HD) + col  # b_Q/K/V and positions, per position
        q = tl.load(src, mask=ok, other=0.0).to(tl.float32) + tl.load(bias, mask=ok, other=0.0)
        k = tl.load(src + HD, mask=ok, other=0.0).to(tl.float32) + tl.load(bias + HD, mask=ok, other=0.0)
        v = tl.load(src + 2 * HD, mask=ok, other=0.0).to(tl.float32) + tl.load(bias + 2 * HD, mask=ok, other=0.0)
        if DOT == "tf32":
            q, k, v = _tf32(q), _tf32(k), _tf32(v)
        scores = tl.where(causal, tl.dot(q, tl.trans(k), input_precision=DOT) * scale_inv, float("-inf"))
        p = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        if DOT == "tf32":
            p = _tf32(p)
        z = tl.dot(p, v, input_precision=DOT)
        _store_rounded(out_ptr + (b * P + pos)[:, None] * stride_out + col, z, ok)


@torch.library.custom_op("induction_sweep::causal_attention", mutates_args=())
def _causal_attention(qkv: Tensor, tokens: Tensor, bias: Tensor, gather: bool, n_heads: int, d_head: int, scale: float,
                      out_dtype: torch.dtype, tf32: bool) -> Tensor:
    batch, n_pos = tokens.shape
    # strides as the kernel assumes them (under torch.compile an input's layout is not guaranteed)
    qkv, tokens, bias = (qkv if qkv.stride(1) == 1 else qkv.contiguous()), tokens.contiguous(), bias.contiguous()
    out = torch.empty(batch * n_pos, n_heads * d_head, device=qkv.device, dtype=out_dtype)
    _causal_attention_kernel[lambda meta: (batch * n_heads // meta["GROUP"],)](
        qkv, tokens, bias, out, n_pos, n_heads * d_head, qkv.stride(0), out.stride(0), 1 / scale,
        GATHER=gather, BIG_BATCH=batch >= 8192, DOT=_dot_precision(qkv.device, tf32), N_HEADS=n_heads, D_HEAD=d_head,
        BLOCK_P=_block(n_pos), BLOCK_E=_block(d_head))
    return out


@_causal_attention.register_fake
def _(qkv, tokens, bias, gather, n_heads, d_head, scale, out_dtype, tf32):
    return qkv.new_empty(tokens.shape[0] * tokens.shape[1], n_heads * d_head, dtype=out_dtype)


def causal_attention(
    qkv: Float[Tensor, "rows three_x_heads_x_d_head"], tokens: Int[Tensor, "batch pos"],
    bias: Float[Tensor, "pos three_x_heads_x_d_head"], gather: bool, n_heads: int, d_head: int, scale: float,
    out_dtype: torch.dtype = torch.float32, tf32: bool = False,
) -> Float[Tensor, "batch_x_pos heads_x_d_head"]:
    """Causal attention of every position, heads side by side as W_O reads them. ``qkv``: Q, K and V
    (heads × d_head columns each) of every position (``rows`` = batch × pos), or with ``gather`` of
    every token (a table indexed by ``tokens``); ``bias`` (float32) is added to each
    position's row.
    ``tf32``: QKᵀ and PV from inputs rounded to TF32 (tensor cores), as under the tf32 precision."""
    assert bias.dtype == qkv.dtype == torch.float32
    return _causal_attention(qkv, tokens, bias, gather, n_heads, d_head, scale, out_dtype, tf32)


@triton.jit
def _residual(rows, added, bias_ptr, d0, dc, ok, D, ADD: tl.constexpr):
    """A chunk of the residual rows: the base rows, plus the layer before's output and its bias where
    the stream was left as that sum (ADD), in torch's order: base + (added + bias)."""
    x = tl.load(rows + d0, mask=ok, other=0.0)
    if ADD:
        x += tl.load(added + d0, mask=ok, other=0.0) + tl.load(bias_ptr + d0 + dc, mask=d0 + dc < D, other=0.0)[None, :]
    return x


# d_model in chunks: a program's work per element is then a multiply-add per head, summed across
# threads once per row, half the instructions of a head at a time over whole rows (sm_90,
# scripts/kernel_registers.py).
@triton.autotune(configs=[triton.Config({"CHUNK": c}, num_warps=w) for c, w in
                          ([(16, 1)] if INTERPRET else [(64, 4), (64, 8), (32, 4), (32, 8), (16, 4)])],
                 key=["P", "D", "N_HEADS", "LAYER_NORM", "BIG_BATCH", "GATHER", "ADD"], **AUTOTUNE_CACHE)
@triton.jit
def _last_attention_kernel(
    x_ptr, tokens_ptr, added_ptr, bias_ptr, u_ptr, c_ptr, mixed_ptr, pattern_ptr, B, P, D, stride_ub, stride_uh, eps, scale_inv,
    N_HEADS: tl.constexpr, LAYER_NORM: tl.constexpr, BIG_BATCH: tl.constexpr, GATHER: tl.constexpr, ADD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, CHUNK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pos, hs, dc = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_H), tl.arange(0, CHUNK)
    ok_p, ok_h = pos < P, hs < N_HEADS
    # the sequence's residual rows, a chunk at a time: dense, or the embedding's rows of its tokens
    base = tl.load(tokens_ptr + b * P + pos, mask=ok_p, other=0).to(tl.int64) if GATHER else b * P + pos
    rows = x_ptr + base[:, None] * D + dc[None, :]
    added = added_ptr + (b * P + pos)[:, None] * D + dc[None, :]
    u_rows = u_ptr + b * stride_ub + hs.to(tl.int64)[:, None] * stride_uh + dc[None, :]  # the heads' rows of u
    heads = (hs.to(tl.int64) * B + b)[:, None] * D + dc[None, :]  # and of the mix, heads first as W_V's product reads it
    # LNPre (as compact.layers.layer_norm_pre): the mean from a read of its own, then the rows read less it;
    # 1/σ is applied to the sums, so the rows are never scaled
    mean = tl.zeros((BLOCK_P,), tl.float32)
    if LAYER_NORM:
        sums = tl.zeros((BLOCK_P, CHUNK), tl.float32)
        for d0 in range(0, D, CHUNK):
            sums += _residual(rows, added, bias_ptr, d0, dc, ok_p[:, None] & (d0 + dc < D)[None, :], D, ADD)
        mean = tl.sum(sums, axis=1) / D
    squares = tl.zeros((BLOCK_P, CHUNK), tl.float32)
    dots = tl.zeros((BLOCK_P, BLOCK_H, CHUNK), tl.float32)  # Σ_d (x_pd - mean_p) u_hd, chunk by chunk, elementwise
    for d0 in range(0, D, CHUNK):
        ok = ok_p[:, None] & (d0 + dc < D)[None, :]
        x = tl.where(ok, _residual(rows, added, bias_ptr, d0, dc, ok, D, ADD) - mean[:, None], 0.0)
        u = tl.load(u_rows + d0, mask=ok_h[:, None] & (d0 + dc < D)[None, :], other=0.0)
        squares += x * x
        dots += x[:, None, :] * u[None, :, :]
    rstd = tl.rsqrt(tl.sum(squares, axis=1) / D + eps) if LAYER_NORM else tl.full((BLOCK_P,), 1.0, tl.float32)
    rstd = tl.where(ok_p, rstd, 0.0)  # padding rows: 1/√eps, infinite where eps is 0 (0 × inf in the mix)
    centred_dots = tl.sum(dots, axis=2)
    # score_ph = LN(x_p) · W_K^T q_h + q_h · (b_K + positions)_p (the second term made outside)
    c = tl.load(c_ptr + (b * N_HEADS + hs)[None, :] * P + pos[:, None], mask=ok_h[None, :] & ok_p[:, None], other=0.0)
    scores = tl.where(ok_p[:, None], (centred_dots * rstd[:, None] + c) * scale_inv, float("-inf"))
    p = tl.exp(scores - tl.max(scores, axis=0)[None, :])
    p = p / tl.sum(p, axis=0)[None, :]  # [pos, heads]: each head's softmax over positions
    tl.store(pattern_ptr + (b * N_HEADS + hs)[None, :] * P + pos[:, None], p, mask=ok_h[None, :] & ok_p[:, None])
    weights = p * rstd[:, None]
    for d0 in range(0, D, CHUNK):  # Σ_p pattern_hp LN(x_p)
        ok = ok_p[:, None] & (d0 + dc < D)[None, :]
        x = tl.where(ok, _residual(rows, added, bias_ptr, d0, dc, ok, D, ADD) - mean[:, None], 0.0)
        mixed = tl.sum(weights[:, :, None] * x[:, None, :], axis=0)
        _store_rounded(mixed_ptr + heads + d0, mixed, ok_h[:, None] & (d0 + dc < D)[None, :])


@torch.library.custom_op("induction_sweep::last_attention", mutates_args=())
def _last_attention(x: Tensor, tokens: Tensor | None, added: Tensor | None, bias: Tensor | None, u: Tensor, c: Tensor,
                    layer_norm: bool, eps: float, scale: float, mixed_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    batch, n_heads, n_pos = c.shape
    d_model = x.shape[-1]
    mixed = x.new_empty(n_heads, batch, d_model, dtype=mixed_dtype)
    pattern = x.new_empty(batch, n_heads, n_pos)
    gather, add = tokens is not None, added is not None
    # the kernel assumes rows laid out back to back, but for u's: as W_K^T q comes out of the
    # product, heads first (a copy would cost a pass over it); absent parts are never read (x stands in)
    x, u, c = x.contiguous(), (u if u.stride(2) == 1 else u.contiguous()), c.contiguous()
    tokens, added, bias = (x if t is None else t.contiguous() for t in (tokens, added, bias))
    _last_attention_kernel[(batch,)](
        x, tokens, added, bias, u, c, mixed, pattern, batch, n_pos, d_model, u.stride(0), u.stride(1), eps, 1 / scale,
        N_HEADS=n_heads, LAYER_NORM=layer_norm, BIG_BATCH=batch >= 8192, GATHER=gather, ADD=add, BLOCK_P=_block(n_pos),
        BLOCK_H=triton.next_power_of_2(n_heads))
    return mixed, pattern


@_last_attention.register_fake
def _(x, tokens, added, bias, u, c, layer_norm, eps, scale, mixed_dtype):
    return x.new_empty(c.shape[1], c.shape[0], x.shape[-1], dtype=mixed_dtype), x.new_empty(c.shape)


def last_attention(
    x: Float[Tensor, "batch pos d_model"] | Float[Tensor, "vocab d_model"], u: Float[Tensor, "batch heads d_model"],
    c: Float[Tensor, "batch heads pos"], layer_norm: bool, eps: float, scale: float, tokens: Int[Tensor, "batch pos"] | None = None,
    added: Float[Tensor, "batch pos d_model"] | None = None, bias: Float[Tensor, " d_model"] | None = None,
    mixed_dtype: torch.dtype = torch.float32,
) -> tuple[Float[Tensor, "heads batch d_model"], Float[Tensor, "batch heads pos"]]:
    """(Σ_p pattern[h, p] LN(x_p), pattern) of the last position's query per head, whose scores are
    ``LN(x_p) · u_h + c[h, p]``, divided by ``scale``. ``layer_norm``: LNPre, else ``x`` as it is.
    The residual rows ``x_p``: ``x``'s, or with ``tokens`` the rows of a table (the token embedding) at
    each position's token; with ``added`` and ``bias`` (the layer before's output and b_O, both or
    neither), those rows + (added + bias), summed as they are read.
    The mix comes heads first and rounded to ``mixed_dtype`` (to nearest), as W_V's batched product
    reads it, so that no float32 [batch, heads, d_model] mix is written and transposed; everything
    else is float32."""
    assert (added is None) == (bias is None)
    parts = (None if t is None else t.float() for t in (added, bias))
    return _last_attention(x.float(), tokens, *parts, u.float(), c.float(), layer_norm, eps, scale, mixed_dtype)
