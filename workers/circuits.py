"""Per-token circuit scores of an attention-only model, from its weights alone (no sequences).

* OV copying score of B, per head h of the last layer: the rank of B among the logits that the
  head's OV circuit makes from B's embedding, ``LN(LN(W_E[B]) @ W_V + b_V) @ W_O) @ W_U``
  (0 = B is the top logit). A head that copies B well is needed for a high B power.
* QK prefix-matching score of A, per head h of the last layer: the rank of A among candidate
  previous tokens x when the query of the final A (its embedding plus the last position) meets
  the key of B's position, whose A-dependent part is what layer 0's OV circuits write there from
  the previous token x (all layer-0 heads summed: a previous-token head's ideal output). 0 = the
  query prefers the key made from A itself. Needs two layers or more.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from workers.compact.layers import layer_norm_pre
from workers.model.folds import CompactWeights, compact_weights, moved
from workers.sequences import B_POS, FIRST_TOKEN, SEQ_LEN


def _rank(scores: Float[Tensor, "n vocab"], own: Int[Tensor, " n"]) -> Int[Tensor, " n"]:
    """How many candidates (ids >= FIRST_TOKEN) score above each row's own token."""
    scores = scores.clone()
    scores[:, :FIRST_TOKEN] = float("-inf")
    return (scores > scores.gather(1, own[:, None])).sum(1)


def model_scores(model, tokens: list[int], device: str | torch.device | None = None) -> dict[str, np.ndarray]:
    """``circuit_scores`` of an attention-only model (a HookedTransformer or its weights), on ``device``
    (default: the model's), as numpy arrays."""
    weights = model if isinstance(model, CompactWeights) else compact_weights(model)
    weights = moved(weights, device) if device is not None else weights
    scores = circuit_scores(weights, torch.tensor(tokens, device=weights.W_E.device))
    return {name: values.cpu().numpy() for name, values in scores.items()}


@torch.inference_mode()
def circuit_scores(w: CompactWeights, tokens: Int[Tensor, " n"], chunk: int = 1024) -> dict[str, Tensor]:
    ln = (lambda x: layer_norm_pre(x, w.eps)) if w.layer_norm else (lambda x: x.float())
    last = len(w.W_Q) - 1
    n_heads = w.W_Q[last].shape[0]
    E = ln(w.W_E)
    out: dict[str, Tensor] = {}
    for h in range(n_heads):
        W_OV = w.W_V[last][h] @ w.W_O[last][h]
        b_OV = w.b_V[last][h] @ w.W_O[last][h]
        ranks = [_rank(ln(E[t] @ W_OV + b_OV) @ w.W_U, t) for t in tokens.split(chunk)]
        out[f"ov_rank_h{h}"] = torch.cat(ranks)
    if last >= 1:
        prev = sum((E @ w.W_V[0][h0] + w.b_V[0][h0]) @ w.W_O[0][h0] for h0 in range(w.W_Q[0].shape[0]))
        q_pos, k_pos = w.W_pos[SEQ_LEN - 1], w.W_pos[B_POS]
        # shortformer: positions join the query/key input after the LayerNorm, meeting the weights
        # before any LayerNorm fold (W_*_pos); otherwise they are part of the residual stream
        keys_in = ln(prev) if w.shortformer else ln(prev + k_pos)
        queries_in = E[tokens] if w.shortformer else ln(w.W_E[tokens] + q_pos)
        for h in range(n_heads):
            q_bias, k_bias = w.b_Q[last][h], w.b_K[last][h]
            if w.shortformer:
                q_bias, k_bias = q_bias + q_pos @ w.W_Q_pos[last][h], k_bias + k_pos @ w.W_K_pos[last][h]
            K = keys_in @ w.W_K[last][h] + k_bias
            ranks = [_rank((q_in @ w.W_Q[last][h] + q_bias) @ K.T, t)
                     for q_in, t in zip(queries_in.split(chunk), tokens.split(chunk))]
            out[f"qk_rank_h{h}"] = torch.cat(ranks)
    for kind in ("ov", "qk"):
        heads = [v for k, v in out.items() if k.startswith(kind)]
        if heads:
            out[f"{kind}_rank_best"] = torch.stack(heads).min(0).values
    return out
