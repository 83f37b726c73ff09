"""Per-head measurements of the last attention layer, at the last position, in the scoring forward.

For each head: its attention from the final A to the slot right after the first A (B, in plain
induction) and to the first A, in the induction sequence and in its shuffled control (following
those two tokens to wherever the shuffle put them); and its direct logit attribution to B — its
output through the final LayerNorm's scale and the unembedding, against the mean logit. The heads'
attributions plus ``rest`` (embeddings, earlier layers, biases) add up to logit(B) − mean logit.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workers.compact.forward import CompactForward, Trace
from workers.rows import REST, head_column
from workers.sequences import A_POS, B_POS, SequenceBatch, shuffled_positions


def attribution(compact: CompactForward, trace: Trace, b: Int[Tensor, " batch"]) -> Float[Tensor, "batch heads_plus_1"]:
    """Direct logit attribution to ``b`` of each head, then of everything else (last column): each
    part of the residual stream through the final normalisation's scale (fixed by the whole stream)."""
    unembed, num = compact.unembed, compact.num
    u = unembed.W_U_rows[b] - unembed.W_U_rows.mean(0)  # logit(B) - mean logit, per unit of normalised stream
    bias = unembed.b_U[b] - unembed.b_U.mean()
    resid, head_out, scale = trace.resid, trace.head_out, torch.ones_like(trace.resid[:, :1])
    if num.layer_norm and not num.rms:  # LayerNorm centres each part; RMSNorm only scales
        resid, head_out = resid - resid.mean(-1, keepdim=True), head_out - head_out.mean(-1, keepdim=True)
    if num.layer_norm:
        scale = torch.sqrt(resid.pow(2).mean(-1, keepdim=True) + num.eps)
    heads = torch.einsum("bhd,bd->bh", head_out, u) / scale
    total = torch.einsum("bd,bd->b", resid, u) / scale[:, 0] + bias
    return torch.cat([heads, (total - heads.sum(1))[:, None]], dim=1)


@torch.inference_mode()
def head_measures(compact: CompactForward, batch: SequenceBatch) -> dict[str, Tensor]:
    """Per-sequence, per-head columns (float32), for the induction sequence and its shuffled control."""
    out: dict[str, Tensor] = {}
    rows = torch.arange(len(batch.b), device=batch.b.device)
    moved = shuffled_positions(batch.keys, [A_POS, B_POS])
    for shuffled, tokens, a_pos, b_pos in ((False, batch.tokens, A_POS, B_POS), (True, batch.shuffled, moved[:, 0], moved[:, 1])):
        _, trace = compact.traced(tokens)
        dla = attribution(compact, trace, batch.b)
        for h in range(compact.num.n_heads):
            out[head_column(f"h{h}", "attn_b", shuffled)] = trace.pattern[rows, h, b_pos]
            out[head_column(f"h{h}", "attn_a", shuffled)] = trace.pattern[rows, h, a_pos]
            out[head_column(f"h{h}", "dla_b", shuffled)] = dla[:, h]
        out[head_column(REST, "dla_b", shuffled)] = dla[:, -1]
    return out
