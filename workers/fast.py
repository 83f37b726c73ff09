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
    def __init__(self, w: AttnOnlyWeights, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.n_layers, self.n_heads, self.d_head = len(w.W_Q), w.W_Q[0].shape[0], w.W_Q[0].shape[2]
        self.shortformer, self.layer_norm, self.eps, self.scale = w.shortformer, w.layer_norm, w.eps, w.attn_scale
        self.dtype = dtype
        zeros = torch.zeros_like(_heads(w.W_V[0]))
        for i in range(self.n_layers):
            W_QKV = torch.cat([_heads(w.W_Q[i]), _heads(w.W_K[i]), _heads(w.W_V[i])], dim=1)
            b_QKV = torch.cat([w.b_Q[i].flatten(), w.b_K[i].flatten(), w.b_V[i].flatten()])
            # Shortformer positions are added to the query and key inputs (not values): (h + pos) @ W.
            pos_W = torch.cat([_heads(w.W_Q[i]), _heads(w.W_K[i]), zeros], dim=1)
            pos_QKV = w.W_pos @ pos_W if self.shortformer else W_QKV.new_zeros(w.W_pos.shape[0], W_QKV.shape[1])
            self.register_buffer(f"W_QKV{i}", W_QKV.to(dtype))
            self.register_buffer(f"pos_QKV{i}", (pos_QKV + b_QKV).float())
            self.register_buffer(f"W_O{i}", w.W_O[i].reshape(-1, w.W_O[i].shape[-1]).to(dtype))
            self.register_buffer(f"b_O{i}", w.b_O[i].float())
        self.register_buffer("W_E", w.W_E.float())
        self.register_buffer("W_pos", w.W_pos.float())
        if self.shortformer:  # layer 0 reads the token embedding alone: one Q/K/V row per token
            self.register_buffer("tok_QKV0", (self.ln(w.W_E) @ self.W_QKV0.float()).to(dtype))
        self.register_buffer("W_U", w.W_U.to(dtype))
        self.register_buffer("W_U_rows", w.W_U.T.float().contiguous())  # float32 target logits
        self.register_buffer("b_U", w.b_U.float())

    def ln(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return layer_norm_pre(x, self.eps) if self.layer_norm else x.float()

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch d_model"]:
        """The final-LayerNorm'd residual stream at the last position, in float32."""
        batch, n_pos = tokens.shape
        x = self.W_E[tokens] if self.shortformer else self.W_E[tokens] + self.W_pos[:n_pos]
        for i in range(self.n_layers):
            last = i == self.n_layers - 1
            pos_qkv = getattr(self, f"pos_QKV{i}")[:n_pos]
            if i == 0 and self.shortformer:
                qkv = self.tok_QKV0[tokens].float() + pos_qkv
            else:
                qkv = (self.ln(x).to(self.dtype) @ getattr(self, f"W_QKV{i}")).float() + pos_qkv
            q, k, v = qkv.view(batch, n_pos, 3, self.n_heads, self.d_head).to(self.dtype).unbind(2)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # batch heads pos d_head
            if last:  # only the last position's query: one row of attention per head
                scores = torch.einsum("bhd,bhpd->bhp", q[:, -1], k).float() / self.scale
                z = torch.einsum("bhp,bhpd->bhd", scores.softmax(-1).to(self.dtype), v)
                x = x[:, -1] + (z.reshape(batch, -1) @ getattr(self, f"W_O{i}")).float() + getattr(self, f"b_O{i}")
            else:
                z = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, scale=1 / self.scale)
                x = x + (z.transpose(1, 2).reshape(batch, n_pos, -1) @ getattr(self, f"W_O{i}")).float()
                x = x + getattr(self, f"b_O{i}")
        return self.ln(x)

    def logits(self, h: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch vocab"]:
        """Every logit of the last position, in the compute precision (for the log-sum-exp)."""
        return torch.addmm(self.b_U.to(self.dtype), h.to(self.dtype), self.W_U)

    def target_logits(self, h: Float[Tensor, "batch d_model"], targets: Int[Tensor, "batch n_targets"]) -> Float[Tensor, "batch n_targets"]:
        """The targets' logits recomputed in float32: accurate even when the rest is bf16."""
        return torch.einsum("bd,btd->bt", h, self.W_U_rows[targets]) + self.b_U[targets]
