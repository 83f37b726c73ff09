"""A compact forward for transformers (attention, then an optional MLP, per block, or both side by
side from the block's input; LayerNorm or RMSNorm; added, shortformer or rotary positions; plain or
gated MLPs) that computes only what the last position needs.

Against TransformerLens' full forward (all positions, all logits) it
  * fuses Q, K and V into one matrix product per layer;
  * for shortformer models (positions enter queries and keys only, as in attn-only-Nl), looks up
    layer 0's Q/K/V per token from a table made once per vocabulary, since the residual stream
    there is the token embedding alone;
  * in the last layer, computes no keys or values at all: with one query per head,
    ``q · (W_K h_j)`` is ``(W_K^T q) · h_j`` and ``Σ_j p_j W_V h_j`` is ``W_V (Σ_j p_j h_j)``, so
    each position costs two dot products per head instead of a row of the K/V projection. Rotary
    embeddings rotate each key by its own position, which breaks the key fold: there the last layer
    computes its keys at every position (the value fold still holds);
  * runs the last block's MLP at the last position only;
  * unembeds one position, and recomputes the target logits in float32 for the log-odds.
It is checked against TransformerLens' own forward in tests/test_compact.py.
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


def rotary_tables(n_pos: int, rotary_dim: int, base: float, adjacent_pairs: bool
                  ) -> tuple[Float[Tensor, "pos rotary_dim"], Float[Tensor, "pos rotary_dim"], Int[Tensor, " rotary_dim"]]:
    """(cos, signed sin, partner) of TransformerLens' rotary embedding at positions 0..n_pos-1, so that
    a rotated row is ``x * cos + x[partner] * sin``: GPT-J pairs dimensions (2i, 2i+1), GPT-NeoX
    (i, i + rotary_dim/2); each pair turns by position / base^(2i/rotary_dim)."""
    half = rotary_dim // 2
    freq = base ** (torch.arange(half, dtype=torch.float64) / half)
    freq = freq.repeat_interleave(2) if adjacent_pairs else freq.repeat(2)
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] / freq
    if adjacent_pairs:
        partner, sign = torch.arange(rotary_dim).view(-1, 2).flip(-1).flatten(), torch.tensor([-1.0, 1.0]).repeat(half)
    else:
        partner = torch.cat([torch.arange(half, rotary_dim), torch.arange(half)])
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).double()
    return angles.cos().float(), (angles.sin() * sign).float(), partner


def _heads(w: Float[Tensor, "heads d_model d_head"]) -> Float[Tensor, "d_model heads_x_d_head"]:
    return w.permute(1, 0, 2).reshape(w.shape[1], -1)


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


def _solu(x: Float[Tensor, "rows d_mlp"]) -> Float[Tensor, "rows d_mlp"]:
    return x * x.softmax(-1)


_TANH_GELU = functools.partial(F.gelu, approximate="tanh")  # TransformerLens' gelu_new and gelu_fast are this formula
# MLP activations by TransformerLens' act_fn name (model/fields.py routes these here); SoLU's
# LayerNorm (solu_ln) is applied after it by CompactForward.mlp
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "gelu_new": _TANH_GELU, "gelu_fast": _TANH_GELU,
               "gelu_pytorch_tanh": _TANH_GELU, "solu": _solu, "solu_ln": _solu}


class CompactForward(torch.nn.Module):
    def __init__(self, w: CompactWeights, dtype: torch.dtype = torch.float32, compute: torch.dtype | None = None,
                 attention: str = "sdpa", align: int = 1):
        """``dtype`` rounds the weights and inputs of the projections (Q/K/V, O, V and O of the last
        layer, the MLPs' W_in and W_out, unembedding); ``compute`` runs them (default ``dtype``);
        their sums, and the MLPs' hidden layer between its two products, are float32. Attention over
        the 24 positions (the last layer's query and ``W_K^T q`` included), biases, the layer-0 table
        and the residual stream stay float32: they cost little and carry most of the bf16 error
        otherwise. bf16 rounding with float32 compute gives bf16 tensor-core numerics on CPUs, where
        bf16 products are far slower than float32.
        ``attention``: how the layers before the last attend (scoring.variant.ATTENTIONS; with triton,
        the last layer's folded attention too). ``align``: W_U's rows and columns padded to a multiple
        of it (64 on CUDA, see below)."""
        super().__init__()
        self.attention = attention
        self.n_layers, self.n_heads, self.d_head = len(w.W_Q), w.W_Q[0].shape[0], w.W_Q[0].shape[2]
        self.shortformer, self.layer_norm, self.eps, self.scale = w.shortformer, w.layer_norm, w.eps, w.attn_scale
        self.rms, self.parallel, self.rotary_dim = w.rms, w.parallel, w.rotary_dim
        # the Triton kernel of the last layer computes LNPre and the folded keys: not RMSNorm, nor rotated keys
        self.fused_last = attention == "triton" and not self.rms and not self.rotary_dim
        if self.rotary_dim:
            cos, sin, partner = rotary_tables(len(w.W_pos), w.rotary_dim, w.rotary_base, w.rotary_adjacent_pairs)
            self.register_buffer("rotary_cos", cos)
            self.register_buffer("rotary_sin", sin)
            self.register_buffer("rotary_partner", partner)
        self.dtype, self.compute = dtype, compute or dtype
        # bf16 tensor cores sum in float32; torch returns those sums rounded to bf16 unless asked (mm/bmm's
        # out_dtype). Keeping them float32 is what keeps toy-2l's bf16 error within its bound.
        if self.compute != torch.float32 and "dtype" not in torch.ops.aten.mm.overloads():
            raise ValueError(f"bf16 products with float32 sums need torch's mm out_dtype, which torch {torch.__version__} lacks")
        # Shortformer positions are added to the query and key inputs (not values): (h + pos) @ W.
        pos = w.W_pos if self.shortformer else torch.zeros_like(w.W_pos)
        for i in range(self.n_layers - 1):
            W_QKV = torch.cat([_heads(w.W_Q[i]), _heads(w.W_K[i]), _heads(w.W_V[i])], dim=1)
            b_QKV = torch.cat([w.b_Q[i].flatten(), w.b_K[i].flatten(), w.b_V[i].flatten()])
            # positions meet the weights as trained (W_*_pos: before the LayerNorm's weights were folded in)
            pos_QKV = torch.cat([pos @ _heads(w.W_Q_pos[i]), pos @ _heads(w.W_K_pos[i]),
                                 pos.new_zeros(len(pos), W_QKV.shape[1] // 3)], 1)
            self.register_buffer(f"W_QKV{i}", self.cast(W_QKV))
            if i == 0 and self.shortformer:  # layer 0 reads the token embedding alone: one Q/K/V row per token
                self.register_buffer("tok_QKV0", self.ln(w.W_E) @ W_QKV.float())
            self.register_buffer(f"pos_QKV{i}", (pos_QKV + b_QKV).float())
            self.register_buffer(f"W_O{i}", self.cast(w.W_O[i].flatten(0, 1)))
            self.register_buffer(f"b_O{i}", w.b_O[i].float())
        last = self.n_layers - 1
        self.register_buffer("W_Q_last", _heads(w.W_Q[last]).float())  # float32: the query decides where induction looks
        self.register_buffer("q_bias", (pos @ _heads(w.W_Q_pos[last]) + w.b_Q[last].flatten()).float())  # pos heads_x_d_head
        self.register_buffer("W_K_last", w.W_K[last].float())  # heads d_model d_head
        if self.rotary_dim:  # the keys of every position, float32 as the query (where induction looks)
            self.register_buffer("W_K_rows", _heads(w.W_K[last]).float())
        self.register_buffer("k_bias", (torch.einsum("pd,hde->phe", pos, w.W_K_pos[last]) + w.b_K[last]).float())
        self.register_buffer("W_V_last", self.cast(w.W_V[last]))
        self.register_buffer("b_V_last", w.b_V[last].float())
        self.register_buffer("W_O_last", self.cast(w.W_O[last].flatten(0, 1)))
        self.register_buffer("b_O_last", w.b_O[last].float())
        self.register_buffer("W_E", w.W_E.float())
        self.register_buffer("W_pos", w.W_pos.float())
        # b_U is added by the unembedding's product (addmm: cuBLASLt's bias epilogue on CUDA), not as one more
        # row of W_U, which would take 512 rows to 576 once aligned. On CUDA W_U is padded to multiples of 64
        # (zero rows; zero columns, sliced off the logits): cuBLAS takes its fast kernels only for aligned
        # leading dimensions, which 48262 is not. On a CPU the padding would only add arithmetic.
        self.d_vocab = w.W_U.shape[1]
        columns = (0, -self.d_vocab % align)
        self.register_buffer("W_U", self.cast(F.pad(w.W_U, columns + (0, -w.W_U.shape[0] % align))))
        self.register_buffer("b_U_padded", self.cast(F.pad(w.b_U, columns)))
        self.register_buffer("W_U_rows", w.W_U.T.float().contiguous())  # float32 target logits
        self.register_buffer("b_U", w.b_U.float())
        self.act_fn, self.mlp_layer_norm, self.n_mlps = w.act_fn, w.mlp_layer_norm, len(w.W_in)
        self.d_mlp, self.gated = (w.W_in[0].shape[1] if w.W_in else 0), bool(w.W_gate)
        for i in range(self.n_mlps):
            if self.gated:  # the gate and the linear side in one product
                self.register_buffer(f"W_in{i}", self.cast(torch.cat([w.W_gate[i], w.W_in[i]], 1)))
                self.register_buffer(f"b_gate_up{i}", torch.cat([w.b_gate[i], w.b_up[i]]).float())
            else:
                self.register_buffer(f"W_in{i}", self.cast(w.W_in[i]))
            self.register_buffer(f"b_in{i}", w.b_in[i].float())
            self.register_buffer(f"W_out{i}", self.cast(w.W_out[i]))
            self.register_buffer(f"b_out{i}", w.b_out[i].float())

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
        if not self.layer_norm:
            return x.float()
        return rms_norm_pre(x, self.eps) if self.rms else layer_norm_pre(x, self.eps)

    def rotate(self, t: Float[Tensor, "batch pos heads d_head"], start: int) -> Float[Tensor, "batch pos heads d_head"]:
        """Queries or keys at positions start.. with their first rotary_dim dimensions rotated."""
        r, end = self.rotary_dim, start + t.shape[1]
        cos, sin = self.rotary_cos[start:end, None], self.rotary_sin[start:end, None]
        x = t[..., :r]
        return torch.cat([x * cos + x[..., self.rotary_partner] * sin, t[..., r:]], -1)

    def rotate_qk(self, qkv: Float[Tensor, "batch pos three_x_heads_x_d_head"]) -> Float[Tensor, "batch pos three_x_heads_x_d_head"]:
        """Q, K and V side by side (biases added: rotary turns them too), Q and K rotated."""
        q, k, v = qkv.view(*qkv.shape[:2], 3, self.n_heads, self.d_head).unbind(2)
        return torch.stack([self.rotate(q, 0), self.rotate(k, 0), v], 2).flatten(2)

    def heads(self, t: Float[Tensor, "batch pos heads_x_d_head"]) -> Float[Tensor, "batch heads pos d_head"]:
        return t.view(t.shape[0], t.shape[1], self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, tokens: Int[Tensor, "batch pos"], trace: dict | None = None) -> Float[Tensor, "batch d_model"]:
        """The final-LayerNorm'd residual stream at the last position, in float32.

        ``trace`` (a dict) receives the last layer's attention pattern of the last position, each
        head's output there and the residual stream before the final LayerNorm (workers/heads.py).
        """
        x = self.W_E[tokens] if self.shortformer else self.W_E[tokens] + self.W_pos[: tokens.shape[1]]
        for i in range(self.n_layers - 1):
            out, b_O = self.attend_all(i, x, tokens), getattr(self, f"b_O{i}")
            if self.fused_last and i == self.n_layers - 2 and not self.n_mlps:
                # the last layer's kernel adds it up: layer 0 of a shortformer read the table alone
                table = i == 0 and self.shortformer
                x = Stream(self.W_E if table else x, tokens if table else None, out, b_O)
            elif self.parallel:  # the MLP reads the block's input, as attention does
                x = x + out.add_(b_O) + self.mlp(i, x)
            else:
                x = x + out.add_(b_O)  # out is this layer's own: in place, one pass fewer in eager
            if self.n_mlps and not self.parallel:
                x = x + self.mlp(i, x)
        x_last = x.last() if isinstance(x, Stream) else x[:, -1]
        last = self.n_layers - 1
        if self.parallel:  # the last block's MLP at the last position only
            x = x_last + self.attend_last(x, x_last, trace) + self.mlp(last, x_last)
        else:
            x = x_last + self.attend_last(x, x_last, trace)
            if self.n_mlps:
                x = x + self.mlp(last, x)  # the last block's MLP at the last position only
        if trace is not None:
            trace["resid"] = x
        return self.ln(x)

    def attend_all(
        self, i: int, x: Float[Tensor, "batch pos d_model"], tokens: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """A causal attention layer's output at every position, before its bias b_O."""
        batch, n_pos = tokens.shape
        bias = getattr(self, f"pos_QKV{i}")[:n_pos]  # b_QKV + positions
        table = i == 0 and self.shortformer  # layer 0 reads the token embedding alone: a table lookup
        qkv = self.tok_QKV0 if table else self.project(self.ln(x).flatten(0, 1), getattr(self, f"W_QKV{i}"))
        if self.rotary_dim:  # rotary turns queries and keys after their biases: they reach attention complete
            qkv, bias = self.rotate_qk(qkv.view(batch, n_pos, -1) + bias), torch.zeros_like(bias)
        if self.attention == "triton":  # the lookup, the bias and the attention in one kernel
            z = self.attention_kernels().causal_attention(qkv.view(batch * n_pos, -1) if self.rotary_dim else qkv,
                                                          tokens, bias, table, self.n_heads, self.d_head,
                                                          self.scale, self.compute, tf32=self.dtype == torch.bfloat16)
        else:
            if table:
                qkv = qkv[tokens].float().add_(bias)
            elif not self.rotary_dim:
                qkv = qkv.view(batch, n_pos, -1) + bias
            q, k, v = (self.heads(t) for t in qkv.chunk(3, dim=-1))
            z = self.causal_attention(q, k, v).transpose(1, 2).reshape(batch * n_pos, -1)
        return self.project(z, getattr(self, f"W_O{i}")).view(batch, n_pos, -1)

    def causal_attention(
        self, q: Float[Tensor, "batch heads pos d_head"], k: Float[Tensor, "batch heads pos d_head"],
        v: Float[Tensor, "batch heads pos d_head"],
    ) -> Float[Tensor, "batch heads pos d_head"]:
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / self.scale)
        # one [pos, pos] product per sequence and head, in float32 (bf16 scores in layer 0 triple
        # toy-2l's bf16 error): SDPA's float32 kernels are tuned for long sequences, not 24 positions
        scores = q @ k.transpose(-1, -2) / self.scale
        future = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).triu(1)
        return scores.masked_fill_(future, float("-inf")).softmax(-1) @ v

    @staticmethod
    def attention_kernels():
        import workers.kernels.attention  # Triton: imported only where it runs

        return workers.kernels.attention

    def attend_last(
        self, x: Float[Tensor, "batch pos d_model"] | Stream, x_last: Float[Tensor, "batch d_model"], trace: dict | None
    ) -> Float[Tensor, "batch d_model"]:
        """The last layer's output at the last position (``x_last``: the stream there), values folded
        into the query side, and keys too where positions do not rotate them."""
        n_pos = (x.added if isinstance(x, Stream) else x).shape[1]
        if self.fused_last:
            u, c = self.query_side(self.ln(x_last), n_pos)
            rows = dict(x=x.base, tokens=x.tokens, added=x.added, bias=x.bias) if isinstance(x, Stream) else dict(x=x)
            mixed, pattern = self.attention_kernels().last_attention(u=u, c=c, layer_norm=self.layer_norm, eps=self.eps,
                                                                     scale=self.scale, mixed_dtype=self.dtype, **rows)
        else:
            h = self.ln(x)
            if self.rotary_dim:
                pattern = self.rotary_pattern(h, n_pos)
            else:
                u, c = self.query_side(h[:, -1], n_pos)
                # one row of attention per head (the last position sees every position): a plain softmax
                pattern = ((torch.einsum("bpd,bhd->bhp", h, u) + c) / self.scale).softmax(-1)
            mixed = torch.einsum("bhp,bpd->hbd", pattern, h)  # Σ_j p_j h_j, so W_V is applied once per head
        z = self.project(mixed, self.W_V_last).transpose(0, 1) + self.b_V_last  # batch heads d_head
        if trace is not None:
            W_O = self.W_O_last.float().view(self.n_heads, self.d_head, -1)
            trace["pattern"] = pattern
            trace["head_out"] = torch.einsum("bhe,hed->bhd", z, W_O)
        return self.project(z.flatten(1), self.W_O_last) + self.b_O_last

    def rotary_pattern(self, h: Float[Tensor, "batch pos d_model"], n_pos: int) -> Float[Tensor, "batch heads pos"]:
        """The last position's attention over every position, from rotated keys computed at each."""
        batch = len(h)
        q = (h[:, -1] @ self.W_Q_last + self.q_bias[n_pos - 1]).view(batch, 1, self.n_heads, self.d_head)
        k = (h @ self.W_K_rows).view(batch, n_pos, self.n_heads, self.d_head) + self.k_bias[:n_pos]
        q, k = self.rotate(q, n_pos - 1)[:, 0], self.rotate(k, 0)
        return (torch.einsum("bhe,bphe->bhp", q, k) / self.scale).softmax(-1)

    def query_side(
        self, h: Float[Tensor, "batch d_model"], n_pos: int
    ) -> tuple[Float[Tensor, "batch heads d_model"], Float[Tensor, "batch heads pos"]]:
        """(W_Kᵀq per head: what each position's LN'd stream is scored by, what each position's key bias
        adds) of the last position's query ``q = h W_Q + b_Q + positions``, all float32."""
        q_bias, k_bias = self.q_bias[n_pos - 1], self.k_bias[:n_pos]
        q = (h @ self.W_Q_last + q_bias).view(len(h), self.n_heads, self.d_head)
        return torch.einsum("bhe,hde->bhd", q, self.W_K_last), torch.einsum("bhe,phe->bhp", q, k_bias)

    def mlp(self, i: int, x: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_model"]:
        """Layer ``i``'s MLP: both products in the projection precision, the hidden layer float32 between them."""
        rows = x.shape[:-1]
        pre = self.project(self.ln(x).flatten(0, -2), getattr(self, f"W_in{i}"))
        if self.gated:  # act(x W_gate) * (x W_in) + b_in
            gate, up = (pre + getattr(self, f"b_gate_up{i}")).chunk(2, -1)
            post = ACTIVATIONS[self.act_fn](gate) * up + getattr(self, f"b_in{i}")
        else:
            post = ACTIVATIONS[self.act_fn](pre + getattr(self, f"b_in{i}"))
        if self.mlp_layer_norm:
            post = layer_norm_pre(post, self.eps)
        return (self.project(post, getattr(self, f"W_out{i}")) + getattr(self, f"b_out{i}")).view(*rows, -1)

    def unembed_input(self, h: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch k_padded"]:
        """``h`` in the projection precision, with zero columns up to W_U's rows."""
        return self.cast(F.pad(h, (0, self.W_U.shape[0] - h.shape[1])))

    def logits(self, h: Float[Tensor, "batch d_model"], dtype: torch.dtype = torch.float32) -> Float[Tensor, "batch vocab"]:
        """Every logit of the last position (for the log-sum-exp): float32, or bf16 (the float32 sums
        rounded once, as a bf16 tensor-core product without out_dtype returns them). The product adds
        b_U to its sums before it rounds them, wherever it returns the logits' dtype."""
        x = self.unembed_input(h)
        if self.compute in (torch.float32, dtype):
            return torch.addmm(self.b_U_padded, x, self.W_U).to(dtype)[:, : self.d_vocab]
        return (self.matmul(x, self.W_U) + self.b_U_padded)[:, : self.d_vocab]  # bf16 products, float32 sums

