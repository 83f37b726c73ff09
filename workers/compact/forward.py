"""A compact forward for transformers (attention, then an optional MLP, per block, or both side by
side from the block's input; LayerNorm or RMSNorm; added, shortformer or rotary positions; plain or
gated MLPs) that computes only what the last position needs.

Against TransformerLens' full forward (all positions, all logits) it
  * fuses Q, K and V into one matrix product per layer, and looks layer 0's up per token where the
    residual stream there is the token embedding alone (layers.Attention);
  * computes no keys or values in the last layer, folding them into the query side (layers.LastAttention);
  * runs the last block's MLP at the last position only;
  * unembeds one position, and recomputes the target logits in float32 for the log-odds.
It is checked against TransformerLens' own forward in tests/test_compact.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workers.compact.layers import MLP, Attention, Embed, LastAttention, Numerics, Rotary, Stream, Unembed
from workers.model.folds import CompactWeights


class Trace(NamedTuple):
    """The last layer at the last position, for per-head measures (workers/heads.py)."""
    pattern: Float[Tensor, "batch heads pos"]
    head_out: Float[Tensor, "batch heads d_model"]  # each head's output through W_O, before b_O
    resid: Float[Tensor, "batch d_model"]  # the residual stream before the final normalisation


class Block(torch.nn.Module):
    """A block before the last: attention, then the MLP, or both from the block's input (``parallel``)."""

    def __init__(self, attn: Attention, mlp: MLP | None, parallel: bool):
        super().__init__()
        self.attn, self.mlp, self.parallel = attn, mlp, parallel

    def forward(self, x: Float[Tensor, "batch pos d_model"], tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        out = self.attn(x, tokens).add_(self.attn.b_O)  # out is this layer's own: in place, one pass fewer in eager
        if self.parallel:
            return x + out + self.mlp(x)
        x = x + out
        return x + self.mlp(x) if self.mlp is not None else x

    def stream(self, x: Float[Tensor, "batch pos d_model"], tokens: Int[Tensor, "batch pos"],
               W_E: Float[Tensor, "vocab d_model"]) -> Stream:
        """The block's output left as a sum for the last layer's kernel (an attention-only block)."""
        out = self.attn(x, tokens)
        return Stream(W_E, tokens, out, self.attn.b_O) if self.attn.table else Stream(x, None, out, self.attn.b_O)


class LastBlock(torch.nn.Module):
    """The last block at the last position only."""

    def __init__(self, attn: LastAttention, mlp: MLP | None, parallel: bool):
        super().__init__()
        self.attn, self.mlp, self.parallel = attn, mlp, parallel

    def forward(self, x: Float[Tensor, "batch pos d_model"] | Stream
                ) -> tuple[Float[Tensor, "batch d_model"], Float[Tensor, "batch heads pos"], Float[Tensor, "batch heads d_head"]]:
        """(the residual stream after the block, the attention pattern, each head's z) at the last position."""
        x_last = x.last() if isinstance(x, Stream) else x[:, -1]
        out, pattern, z = self.attn(x, x_last)
        if self.parallel:
            return x_last + out + self.mlp(x_last), pattern, z
        x = x_last + out
        return (x + self.mlp(x) if self.mlp is not None else x), pattern, z


class CompactForward(torch.nn.Module):
    def __init__(self, w: CompactWeights, dtype: torch.dtype = torch.float32, compute: torch.dtype | None = None,
                 attention: str = "sdpa", align: int = 1):
        """``dtype`` rounds the projections' inputs, ``compute`` runs them (default ``dtype``; see
        layers.Numerics). ``attention``: how layers attend (scoring.variant.ATTENTIONS). ``align``: W_U's
        rows and columns padded to a multiple of it (layers.Unembed)."""
        super().__init__()
        self.num = num = Numerics(w, dtype, compute or dtype, attention)
        n_layers, mlps = len(w.W_Q), bool(w.W_in)
        rotary = (lambda: Rotary(len(w.W_pos), w.rotary_dim, w.rotary_base, w.rotary_adjacent_pairs)) if w.rotary_dim else (lambda: None)
        self.embed = Embed(w)
        self.blocks = torch.nn.ModuleList(Block(Attention(num, w, i, rotary()), MLP(num, w, i) if mlps else None, w.parallel)
                                          for i in range(n_layers - 1))
        self.last = LastBlock(LastAttention(num, w, rotary()), MLP(num, w, n_layers - 1) if mlps else None, w.parallel)
        self.unembed = Unembed(num, w, align)
        # what a compiled graph and a batch's memory depend on (scoring.scorer.shapes, shard.sequence_bytes)
        self.shape = {"layers": n_layers, "heads": num.n_heads, "d_head": num.d_head, "d_model": w.W_E.shape[1],
                      "d_vocab": w.W_E.shape[0], "shortformer": w.shortformer, "layer_norm": w.layer_norm, "act_fn": w.act_fn,
                      "mlp_layer_norm": w.mlp_layer_norm, "d_mlp": w.W_in[0].shape[1] if mlps else 0, "rms": w.rms,
                      "parallel": w.parallel, "rotary_dim": w.rotary_dim, "gated": bool(w.W_gate)}

    @property
    def attention(self) -> str:
        return self.num.attention

    @attention.setter
    def attention(self, value: str) -> None:
        self.num.attention = value

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch d_model"]:
        """The final-normalised residual stream at the last position, in float32."""
        return self.num.ln(self.run(tokens)[0])

    def traced(self, tokens: Int[Tensor, "batch pos"]) -> tuple[Float[Tensor, "batch d_model"], Trace]:
        """``forward``, and the last layer's pattern, heads' outputs and residual stream."""
        resid, pattern, z = self.run(tokens)
        return self.num.ln(resid), Trace(pattern, self.last.attn.head_out(z), resid)

    def run(self, tokens: Int[Tensor, "batch pos"]
            ) -> tuple[Float[Tensor, "batch d_model"], Float[Tensor, "batch heads pos"], Float[Tensor, "batch heads d_head"]]:
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            if self.last.attn.fused and block.mlp is None and i == len(self.blocks) - 1:
                x = block.stream(x, tokens, self.embed.W_E)  # the last layer's kernel adds it up as it reads it
            else:
                x = block(x, tokens)
        return self.last(x)

    def logits(self, h: Float[Tensor, "batch d_model"], dtype: torch.dtype = torch.float32) -> Float[Tensor, "batch vocab"]:
        """Every logit of the last position (layers.Unembed)."""
        return self.unembed(h, dtype)
