"""A compact forward for attention-only transformers that computes only what the last position needs.

Against TransformerLens' full forward (all positions, all logits) it
  * fuses Q, K and V into one matrix product per layer;
  * for shortformer models (positions enter queries and keys only, as in attn-only-Nl), looks up
    layer 0's Q/K/V per token from a table made once per vocabulary, since the residual stream
    there is the token embedding alone;
  * in the last layer, computes the query of the last position only;
  * unembeds one position, and recomputes the target logits in float32 for the log-odds.
It is checked against TransformerLens' own forward in tests/test_fast.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from workers.models import AttnOnlyWeights


def layer_norm_pre(x: Float[Tensor, "... d_model"], eps: float) -> Float[Tensor, "... d_model"]:
    """TransformerLens' LNPre (LayerNorm with its weights folded away), computed in float32."""
    x = x.float()
    x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _heads(w: Float[Tensor, "heads d_model d_head"]) -> Float[Tensor, "d_model heads_x_d_head"]:
    return w.permute(1, 0, 2).reshape(w.shape[1], -1)


class CompactForward(torch.nn.Module):
    def __init__(self, w: AttnOnlyWeights, dtype: torch.dtype = torch.float32, compute: torch.dtype | None = None):
        """``dtype`` rounds the weights and inputs of the projections (Q/K/V, O, unembedding);
        ``compute`` runs them (default ``dtype``). Attention over the 24 positions, biases, the
        layer-0 table and the residual stream stay float32: they cost little and carry most of the
        bf16 error otherwise. bf16 rounding with float32 compute gives bf16 tensor-core numerics on
        CPUs without native bf16, where bf16 products run about 90x slower than float32."""
        super().__init__()
        self.n_layers, self.n_heads, self.d_head = len(w.W_Q), w.W_Q[0].shape[0], w.W_Q[0].shape[2]
        self.shortformer, self.layer_norm, self.eps, self.scale = w.shortformer, w.layer_norm, w.eps, w.attn_scale
        self.dtype, self.compute = dtype, compute or dtype
        zeros = torch.zeros_like(_heads(w.W_V[0]))
        for i in range(self.n_layers):
            W_QKV = torch.cat([_heads(w.W_Q[i]), _heads(w.W_K[i]), _heads(w.W_V[i])], dim=1)
            b_QKV = torch.cat([w.b_Q[i].flatten(), w.b_K[i].flatten(), w.b_V[i].flatten()])
            # Shortformer positions are added to the query and key inputs (not values): (h + pos) @ W.
            pos_W = torch.cat([_heads(w.W_Q[i]), _heads(w.W_K[i]), zeros], dim=1)
            pos_QKV = w.W_pos @ pos_W if self.shortformer else W_QKV.new_zeros(w.W_pos.shape[0], W_QKV.shape[1])
            self.register_buffer(f"W_QKV{i}", self.cast(W_QKV))
            if i == 0 and self.shortformer:  # layer 0 reads the token embedding alone: one Q/K/V row per token
                self.register_buffer("tok_QKV0", self.ln(w.W_E) @ W_QKV.float())
            self.register_buffer(f"pos_QKV{i}", (pos_QKV + b_QKV).float())
            self.register_buffer(f"W_O{i}", self.cast(w.W_O[i].reshape(-1, w.W_O[i].shape[-1])))
            self.register_buffer(f"b_O{i}", w.b_O[i].float())
        self.register_buffer("W_E", w.W_E.float())
        self.register_buffer("W_pos", w.W_pos.float())
        # b_U as one more row of W_U: the bias rides in the product instead of a pass over [batch, vocab]
        self.register_buffer("W_U", self.cast(torch.cat([w.W_U, w.b_U[None]])))
        self.register_buffer("W_U_rows", w.W_U.T.float().contiguous())  # float32 target logits
        self.register_buffer("b_U", w.b_U.float())

    def cast(self, t: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        return t.to(self.dtype).to(self.compute)

    def ln(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return layer_norm_pre(x, self.eps) if self.layer_norm else x.float()

    def heads(self, t: Float[Tensor, "batch pos heads_x_d_head"]) -> Float[Tensor, "batch heads pos d_head"]:
        return t.view(t.shape[0], t.shape[1], self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, tokens: Int[Tensor, "batch pos"], trace: dict | None = None) -> Float[Tensor, "batch d_model"]:
        """The final-LayerNorm'd residual stream at the last position, in float32.

        ``trace`` (a dict) receives the last layer's attention pattern of the last position, each
        head's output there and the residual stream before the final LayerNorm (workers/heads.py).
        """
        batch, n_pos = tokens.shape
        width = self.n_heads * self.d_head
        x = self.W_E[tokens] if self.shortformer else self.W_E[tokens] + self.W_pos[:n_pos]
        for i in range(self.n_layers):
            last = i == self.n_layers - 1
            W, bias = getattr(self, f"W_QKV{i}"), getattr(self, f"pos_QKV{i}")[:n_pos]  # bias: b_QKV + positions
            if i == 0 and self.shortformer:  # a table lookup instead of a matrix product
                qkv = self.tok_QKV0[tokens].add_(bias)
                q, kv = qkv[:, -1:, :width] if last else qkv[..., :width], qkv[..., width:]
            elif last:  # keys and values at every position, the query at the last one only
                h = self.cast(self.ln(x))
                q = h[:, -1:] @ W[:, :width] + bias[-1:, :width]
                kv = h @ W[:, width:] + bias[:, width:]
            else:
                qkv = self.cast(self.ln(x)) @ W + bias
                q, kv = qkv[..., :width], qkv[..., width:]
            q, k, v = self.heads(q), self.heads(kv[..., :width]), self.heads(kv[..., width:])
            if last:  # one row of attention per head: a plain softmax (see docs/PERFORMANCE.md)
                pattern = ((k @ q.transpose(-1, -2)) / self.scale).softmax(-2)  # batch heads pos 1
                z = (pattern.transpose(-1, -2) @ v).reshape(batch, width)
                x = x[:, -1]
                if trace is not None:
                    W_O = getattr(self, f"W_O{i}").float().view(self.n_heads, self.d_head, -1)
                    trace["pattern"] = pattern[..., 0].float()
                    trace["head_out"] = torch.einsum("bhe,hed->bhd", z.float().view(batch, self.n_heads, -1), W_O)
            else:
                z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / self.scale)
                z = z.transpose(1, 2).reshape(batch, n_pos, width)
            out = self.cast(z).flatten(0, -2) @ getattr(self, f"W_O{i}")
            x = x + out.view(x.shape).float().add_(getattr(self, f"b_O{i}"))
        if trace is not None:
            trace["resid"] = x
        return self.ln(x)

    def logits(self, h: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch vocab"]:
        """Every logit of the last position, in the compute precision (for the log-sum-exp)."""
        return self.cast(torch.cat([h, h.new_ones(len(h), 1)], dim=1)) @ self.W_U

    def target_logits(self, h: Float[Tensor, "batch d_model"], targets: Int[Tensor, "batch n_targets"]) -> Float[Tensor, "batch n_targets"]:
        """The targets' logits recomputed in float32: accurate even when the rest is bf16."""
        return torch.einsum("bd,btd->bt", h, self.W_U_rows[targets]) + self.b_U[targets]
