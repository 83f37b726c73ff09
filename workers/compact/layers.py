"""The compact forward's layers, one class each (workers/compact/forward.py stacks them).

Each layer keeps its weights as buffers, rounded once at load to the precision its products read.
``Numerics`` is what they share: that precision, the normalisation and how attention runs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from workers.model.folds import CompactWeights


def layer_norm_pre(x: Float[Tensor, "... d_model"], eps: float) -> Float[Tensor, "... d_model"]:
    """TransformerLens' LNPre (LayerNorm with its weights folded away), computed in float32."""
    x = x.float()
    x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_pre(x: Float[Tensor, "... d_model"], eps: float) -> Float[Tensor, "... d_model"]:
    """TransformerLens' RMSNormPre (RMSNorm with its weight folded away), computed in float32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _solu(x: Float[Tensor, "rows d_mlp"]) -> Float[Tensor, "rows d_mlp"]:
    return x * x.softmax(-1)


_TANH_GELU = functools.partial(F.gelu, approximate="tanh")  # TransformerLens' gelu_new and gelu_fast are this formula
# MLP activations by TransformerLens' act_fn name (model/fields.py routes these here); SoLU's
# LayerNorm (solu_ln) is applied after it by MLP
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "gelu_new": _TANH_GELU, "gelu_fast": _TANH_GELU,
               "gelu_pytorch_tanh": _TANH_GELU, "solu": _solu, "solu_ln": _solu}


def _heads(w: Float[Tensor, "heads d_model d_head"]) -> Float[Tensor, "d_model heads_x_d_head"]:
    return w.permute(1, 0, 2).reshape(w.shape[1], -1)


def _qk_positions(w: CompactWeights) -> Float[Tensor, "n_ctx d_model"]:
    """What queries' and keys' inputs add per position: a shortformer's positions, (h + pos) @ W with the
    weights as trained (W_*_pos: before the LayerNorm's weights were folded in); nothing otherwise."""
    return w.W_pos if w.shortformer else torch.zeros_like(w.W_pos)


class Numerics:
    """What every layer computes with. ``dtype`` rounds the inputs of the projections (Q/K/V, O, the
    last layer's V and O, the MLPs, the unembedding); ``compute`` runs them; their sums are float32.
    Everything else (attention over the 24 positions, biases, the residual stream) is float32: it
    costs little and would carry most of the bf16 error. bf16 rounding with float32 compute gives
    bf16 tensor-core numerics on CPUs, where bf16 products are far slower than float32.
    ``attention``: how the layers before the last attend (scoring.variant.ATTENTIONS); a scorer
    whose Triton kernel fails to build changes it to "products"."""

    def __init__(self, w: CompactWeights, dtype: torch.dtype, compute: torch.dtype, attention: str):
        self.dtype, self.compute, self.attention = dtype, compute, attention
        self.layer_norm, self.rms, self.eps, self.scale = w.layer_norm, w.rms, w.eps, w.attn_scale
        self.n_heads, self.d_head = w.W_Q[0].shape[0], w.W_Q[0].shape[2]
        # bf16 tensor cores sum in float32; torch returns those sums rounded to bf16 unless asked (mm/bmm's
        # out_dtype). Keeping them float32 is what keeps toy-2l's bf16 error within its bound.
        if compute != torch.float32 and "dtype" not in torch.ops.aten.mm.overloads():
            raise ValueError(f"bf16 products with float32 sums need torch's mm out_dtype, which torch {torch.__version__} lacks")

    def cast(self, t: Float[Tensor, ...]) -> Float[Tensor, ...]:
        return t.to(self.dtype).to(self.compute)

    def project(self, x: Float[Tensor, "*batch rows k"], W: Float[Tensor, "*batch k n"]) -> Float[Tensor, "*batch rows n"]:
        """``x @ W`` with inputs in the projection precision and a float32 result (``W`` is cast already)."""
        return self.matmul(self.cast(x), W)

    def matmul(self, a: Float[Tensor, "*batch rows k"], b: Float[Tensor, "*batch k n"]) -> Float[Tensor, "*batch rows n"]:
        """``a @ b`` of inputs in the compute dtype, with a float32 result."""
        if self.compute == torch.float32:
            return a @ b
        return (torch.mm if b.dim() == 2 else torch.bmm)(a, b, out_dtype=torch.float32)

    def ln(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The normalisation before each layer and the unembedding, weights folded away."""
        if not self.layer_norm:
            return x.float()
        return rms_norm_pre(x, self.eps) if self.rms else layer_norm_pre(x, self.eps)

    def split_heads(self, t: Float[Tensor, "batch pos heads_x_d_head"]) -> Float[Tensor, "batch heads pos d_head"]:
        return t.view(t.shape[0], t.shape[1], self.n_heads, self.d_head).transpose(1, 2)

    @staticmethod
    def kernels():
        import workers.kernels.attention  # Triton: imported only where it runs

        return workers.kernels.attention


class Rotary(torch.nn.Module):
    """TransformerLens' rotary embedding of the first ``rotary_dim`` dimensions of each query and key,
    its cos and sin precomputed for every position: a rotated row is ``x * cos + x[partner] * sin``.
    GPT-J pairs dimensions (2i, 2i+1), GPT-NeoX (i, i + rotary_dim/2); each pair turns by
    position / base^(2i/rotary_dim)."""

    def __init__(self, n_pos: int, rotary_dim: int, base: float, adjacent_pairs: bool):
        super().__init__()
        half, self.dim = rotary_dim // 2, rotary_dim
        freq = base ** (torch.arange(half, dtype=torch.float64) / half)
        freq = freq.repeat_interleave(2) if adjacent_pairs else freq.repeat(2)
        angles = torch.arange(n_pos, dtype=torch.float64)[:, None] / freq
        if adjacent_pairs:
            partner, sign = torch.arange(rotary_dim).view(-1, 2).flip(-1).flatten(), torch.tensor([-1.0, 1.0]).repeat(half)
        else:
            partner = torch.cat([torch.arange(half, rotary_dim), torch.arange(half)])
            sign = torch.cat([-torch.ones(half), torch.ones(half)]).double()
        self.register_buffer("cos", angles.cos().float())
        self.register_buffer("sin", (angles.sin() * sign).float())
        self.register_buffer("partner", partner)

    def forward(self, t: Float[Tensor, "batch pos heads d_head"], start: int = 0) -> Float[Tensor, "batch pos heads d_head"]:
        """Queries or keys at positions start.. with their first rotary_dim dimensions rotated."""
        end = start + t.shape[1]
        cos, sin, x = self.cos[start:end, None], self.sin[start:end, None], t[..., : self.dim]
        return torch.cat([x * cos + x[..., self.partner] * sin, t[..., self.dim :]], -1)


class Stream(NamedTuple):
    """The residual stream before the last layer left as a sum, which the Triton kernel of the last
    layer adds up as it reads it: ``base`` (dense rows, or with ``tokens`` the token embedding's rows of
    each position's token) + (``added`` + ``bias``): the layer before's output and its b_O. Written out
    and read back, the sum costs a write and a read of [batch, pos, d_model] (docs/PERFORMANCE.md)."""
    base: Float[Tensor, "batch pos d_model"] | Float[Tensor, "vocab d_model"]
    tokens: Int[Tensor, "batch pos"] | None
    added: Float[Tensor, "batch pos d_model"]
    bias: Float[Tensor, " d_model"]

    def last(self) -> Float[Tensor, "batch d_model"]:
        """The stream at the last position."""
        base = self.base[self.tokens[:, -1]] if self.tokens is not None else self.base[:, -1]
        return base + (self.added[:, -1] + self.bias)


class Embed(torch.nn.Module):
    """Token embedding, plus the position embedding where positions enter the residual stream."""

    def __init__(self, w: CompactWeights):
        super().__init__()
        self.shortformer = w.shortformer
        self.register_buffer("W_E", w.W_E.float())
        self.register_buffer("W_pos", w.W_pos.float())

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.W_E[tokens] if self.shortformer else self.W_E[tokens] + self.W_pos[: tokens.shape[1]]


class Attention(torch.nn.Module):
    """A causal attention layer before the last: Q, K and V in one product; for layer 0 of a
    shortformer (positions enter queries and keys only), read from a table made once per vocabulary,
    since the residual stream there is the token embedding alone."""

    def __init__(self, num: Numerics, w: CompactWeights, i: int, rotary: Rotary | None):
        super().__init__()
        self.num, self.rotary, self.table = num, rotary, i == 0 and w.shortformer
        W_QKV = torch.cat([_heads(w.W_Q[i]), _heads(w.W_K[i]), _heads(w.W_V[i])], dim=1)
        b_QKV = torch.cat([w.b_Q[i].flatten(), w.b_K[i].flatten(), w.b_V[i].flatten()])
        pos = _qk_positions(w)  # queries and keys only, not values
        pos_QKV = torch.cat([pos @ _heads(w.W_Q_pos[i]), pos @ _heads(w.W_K_pos[i]), pos.new_zeros(len(pos), W_QKV.shape[1] // 3)], 1)
        self.register_buffer("W_QKV", num.cast(W_QKV))
        if self.table:
            self.register_buffer("tok_QKV", num.ln(w.W_E) @ W_QKV.float())
        self.register_buffer("pos_QKV", (pos_QKV + b_QKV).float())  # pos three_x_heads_x_d_head
        self.register_buffer("W_O", num.cast(w.W_O[i].flatten(0, 1)))
        self.register_buffer("b_O", w.b_O[i].float())

    def forward(self, x: Float[Tensor, "batch pos d_model"], tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """The layer's output at every position, before its bias b_O."""
        num, (batch, n_pos) = self.num, tokens.shape
        bias = self.pos_QKV[:n_pos]
        qkv = self.tok_QKV if self.table else num.project(num.ln(x).flatten(0, 1), self.W_QKV)
        if self.rotary is not None:  # rotary turns queries and keys after their biases: they reach attention complete
            qkv, bias = self.rotate_qk(qkv.view(batch, n_pos, -1) + bias), torch.zeros_like(bias)
        if num.attention == "triton":  # the lookup, the bias and the attention in one kernel
            z = num.kernels().causal_attention(qkv.view(batch * n_pos, -1) if self.rotary is not None else qkv,
                                               tokens, bias, self.table, num.n_heads, num.d_head, num.scale, num.compute,
                                               tf32=num.dtype == torch.bfloat16)
        else:
            if self.table:
                qkv = qkv[tokens].float().add_(bias)
            elif self.rotary is None:
                qkv = qkv.view(batch, n_pos, -1) + bias
            q, k, v = (num.split_heads(t) for t in qkv.chunk(3, dim=-1))
            z = self.attend(q, k, v).transpose(1, 2).reshape(batch * n_pos, -1)
        return num.project(z, self.W_O).view(batch, n_pos, -1)

    def rotate_qk(self, qkv: Float[Tensor, "batch pos three_x_heads_x_d_head"]) -> Float[Tensor, "batch pos three_x_heads_x_d_head"]:
        q, k, v = qkv.view(*qkv.shape[:2], 3, self.num.n_heads, self.num.d_head).unbind(2)
        return torch.stack([self.rotary(q), self.rotary(k), v], 2).flatten(2)

    def attend(self, q: Float[Tensor, "batch heads pos d_head"], k: Float[Tensor, "batch heads pos d_head"],
               v: Float[Tensor, "batch heads pos d_head"]) -> Float[Tensor, "batch heads pos d_head"]:
        if self.num.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / self.num.scale)
        # one [pos, pos] product per sequence and head, in float32 (bf16 scores in layer 0 triple
        # toy-2l's bf16 error): SDPA's float32 kernels are tuned for long sequences, not 24 positions
        scores = q @ k.transpose(-1, -2) / self.num.scale
        future = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).triu(1)
        return scores.masked_fill_(future, float("-inf")).softmax(-1) @ v


class LastAttention(torch.nn.Module):
    """The last attention layer at the last position only. With one query per head,
    ``q · (W_K h_j)`` is ``(W_Kᵀ q) · h_j`` and ``Σ_j p_j W_V h_j`` is ``W_V (Σ_j p_j h_j)``: each position
    costs two dot products per head instead of a row of the K/V projection. Rotary embeddings turn
    each key by its own position, which breaks the key fold: there keys are computed at every position
    (the value fold still holds). The query, the keys and the pattern are float32: they decide where
    induction looks."""

    def __init__(self, num: Numerics, w: CompactWeights, rotary: Rotary | None):
        super().__init__()
        self.num, self.rotary, last = num, rotary, len(w.W_Q) - 1
        pos = _qk_positions(w)
        self.register_buffer("W_Q", _heads(w.W_Q[last]).float())
        self.register_buffer("q_bias", (pos @ _heads(w.W_Q_pos[last]) + w.b_Q[last].flatten()).float())  # pos heads_x_d_head
        if rotary is None:
            self.register_buffer("W_K", w.W_K[last].float())  # heads d_model d_head
        else:
            self.register_buffer("W_K", _heads(w.W_K[last]).float())  # d_model heads_x_d_head: keys at every position
        self.register_buffer("k_bias", (torch.einsum("pd,hde->phe", pos, w.W_K_pos[last]) + w.b_K[last]).float())
        self.register_buffer("W_V", num.cast(w.W_V[last]))
        self.register_buffer("b_V", w.b_V[last].float())
        self.register_buffer("W_O", num.cast(w.W_O[last].flatten(0, 1)))
        self.register_buffer("b_O", w.b_O[last].float())

    @property
    def fused(self) -> bool:
        """Whether the Triton kernel runs it: it computes LNPre and the folded keys, not RMSNorm nor rotated keys."""
        return self.num.attention == "triton" and not self.num.rms and self.rotary is None

    def forward(self, x: Float[Tensor, "batch pos d_model"] | Stream, x_last: Float[Tensor, "batch d_model"]
                ) -> tuple[Float[Tensor, "batch d_model"], Float[Tensor, "batch heads pos"], Float[Tensor, "batch heads d_head"]]:
        """(the output after b_O, the pattern, each head's z) at the last position; ``x_last``: the stream there."""
        num = self.num
        n_pos = (x.added if isinstance(x, Stream) else x).shape[1]
        if self.fused:
            u, c = self.query_side(num.ln(x_last), n_pos)
            rows = dict(x=x.base, tokens=x.tokens, added=x.added, bias=x.bias) if isinstance(x, Stream) else dict(x=x)
            mixed, pattern = num.kernels().last_attention(u=u, c=c, layer_norm=num.layer_norm, eps=num.eps, scale=num.scale,
                                                          mixed_dtype=num.dtype, **rows)
        else:
            h = num.ln(x)
            if self.rotary is not None:
                pattern = self.rotary_pattern(h, n_pos)
            else:
                u, c = self.query_side(h[:, -1], n_pos)
                # one row of attention per head (the last position sees every position): a plain softmax
                pattern = ((torch.einsum("bpd,bhd->bhp", h, u) + c) / num.scale).softmax(-1)
            mixed = torch.einsum("bhp,bpd->hbd", pattern, h)  # Σ_j p_j h_j, so W_V is applied once per head
        z = num.project(mixed, self.W_V).transpose(0, 1) + self.b_V  # batch heads d_head
        return num.project(z.flatten(1), self.W_O) + self.b_O, pattern, z

    def query(self, h: Float[Tensor, "batch d_model"], n_pos: int) -> Float[Tensor, "batch heads d_head"]:
        return (h @ self.W_Q + self.q_bias[n_pos - 1]).view(len(h), self.num.n_heads, self.num.d_head)

    def query_side(self, h: Float[Tensor, "batch d_model"], n_pos: int
                   ) -> tuple[Float[Tensor, "batch heads d_model"], Float[Tensor, "batch heads pos"]]:
        """(W_Kᵀq per head: what each position's normalised stream is scored by, what each position's key
        bias adds) of the last position's query ``q = h W_Q + b_Q + positions``."""
        q = self.query(h, n_pos)
        return torch.einsum("bhe,hde->bhd", q, self.W_K), torch.einsum("bhe,phe->bhp", q, self.k_bias[:n_pos])

    def rotary_pattern(self, h: Float[Tensor, "batch pos d_model"], n_pos: int) -> Float[Tensor, "batch heads pos"]:
        """The last position's attention over every position, from rotated keys computed at each."""
        q = self.rotary(self.query(h[:, -1], n_pos)[:, None], n_pos - 1)[:, 0]
        k = self.rotary((h @ self.W_K).view(len(h), n_pos, self.num.n_heads, self.num.d_head) + self.k_bias[:n_pos])
        return (torch.einsum("bhe,bphe->bhp", q, k) / self.num.scale).softmax(-1)

    def head_out(self, z: Float[Tensor, "batch heads d_head"]) -> Float[Tensor, "batch heads d_model"]:
        """Each head's output through W_O (before b_O), float32."""
        return torch.einsum("bhe,hed->bhd", z, self.W_O.float().view(self.num.n_heads, self.num.d_head, -1))


class MLP(torch.nn.Module):
    """Both products in the projection precision, the hidden layer float32 between them; a gated MLP's
    gate and linear side in one product."""

    def __init__(self, num: Numerics, w: CompactWeights, i: int):
        super().__init__()
        self.num, self.act_fn, self.layer_norm, self.gated = num, w.act_fn, w.mlp_layer_norm, bool(w.W_gate)
        if self.gated:
            self.register_buffer("W_in", num.cast(torch.cat([w.W_gate[i], w.W_in[i]], 1)))
            self.register_buffer("b_gate_up", torch.cat([w.b_gate[i], w.b_up[i]]).float())
        else:
            self.register_buffer("W_in", num.cast(w.W_in[i]))
        self.register_buffer("b_in", w.b_in[i].float())
        self.register_buffer("W_out", num.cast(w.W_out[i]))
        self.register_buffer("b_out", w.b_out[i].float())

    def forward(self, x: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_model"]:
        num, rows = self.num, x.shape[:-1]
        pre = num.project(num.ln(x).flatten(0, -2), self.W_in)
        if self.gated:  # act(x W_gate) * (x W_in) + b_in
            gate, up = (pre + self.b_gate_up).chunk(2, -1)
            post = ACTIVATIONS[self.act_fn](gate) * up + self.b_in
        else:
            post = ACTIVATIONS[self.act_fn](pre + self.b_in)
        if self.layer_norm:  # SoLU's LayerNorm after the activation
            post = layer_norm_pre(post, num.eps)
        return (num.project(post, self.W_out) + self.b_out).view(*rows, -1)


class Unembed(torch.nn.Module):
    """Every logit of the last position, and the float32 rows the target logits are recomputed from.

    b_U is added by the product (addmm: cuBLASLt's bias epilogue on CUDA), not as one more row of W_U,
    which would take 512 rows to 576 once aligned. With ``align`` (64 on CUDA) W_U is padded to
    multiples of it (zero rows; zero columns, sliced off the logits): cuBLAS takes its fast kernels
    only for aligned leading dimensions, which 48262 is not. On a CPU padding would only add arithmetic."""

    def __init__(self, num: Numerics, w: CompactWeights, align: int):
        super().__init__()
        self.num, self.d_vocab = num, w.W_U.shape[1]
        columns = (0, -self.d_vocab % align)
        self.register_buffer("W_U", num.cast(F.pad(w.W_U, columns + (0, -w.W_U.shape[0] % align))))
        self.register_buffer("b_U_padded", num.cast(F.pad(w.b_U, columns)))
        self.register_buffer("W_U_rows", w.W_U.T.float().contiguous())  # float32 target logits
        self.register_buffer("b_U", w.b_U.float())

    def forward(self, h: Float[Tensor, "batch d_model"], dtype: torch.dtype = torch.float32) -> Float[Tensor, "batch vocab"]:
        """float32 logits, or bf16 (the float32 sums rounded once, as a bf16 tensor-core product without
        out_dtype returns them). The product adds b_U to its sums before it rounds them, wherever it
        returns the logits' dtype."""
        x = self.num.cast(F.pad(h, (0, self.W_U.shape[0] - h.shape[1])))  # zero columns up to W_U's rows
        if self.num.compute in (torch.float32, dtype):
            return torch.addmm(self.b_U_padded, x, self.W_U).to(dtype)[:, : self.d_vocab]
        return (self.num.matmul(x, self.W_U) + self.b_U_padded)[:, : self.d_vocab]  # bf16 products, float32 sums
