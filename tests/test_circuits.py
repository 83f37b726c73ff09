"""Circuit scores against a direct, token-by-token computation from TransformerLens' own weights."""

import torch

from workers.circuits import circuit_scores
from workers.model import folds, hooked
from workers.sequences import B_POS, FIRST_TOKEN, SEQ_LEN


def lnpre(x):
    x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


def rank_of(scores, t):
    scores = scores.clone()
    scores[:FIRST_TOKEN] = float("-inf")
    return int((scores > scores[t]).sum())


def test_ov_and_qk_scores_match_a_direct_computation(toy_model):
    m = toy_model
    tokens = torch.tensor([4, 77, 500, 1000, 2047])
    got = circuit_scores(folds.compact_weights(m), tokens, chunk=2)
    with torch.no_grad():
        prev = sum((lnpre(m.W_E) @ m.W_V[0, h0] + m.b_V[0, h0]) @ m.W_O[0, h0] for h0 in range(m.cfg.n_heads))
        for h in range(m.cfg.n_heads):
            for i, t in enumerate(tokens.tolist()):
                v = lnpre(m.W_E[t]) @ m.W_V[1, h] + m.b_V[1, h]
                logits = lnpre(v @ m.W_O[1, h]) @ m.W_U
                assert got[f"ov_rank_h{h}"][i] == rank_of(logits, t)
                q = (lnpre(m.W_E[t]) + m.W_pos[SEQ_LEN - 1]) @ m.W_Q[1, h] + m.b_Q[1, h]
                k = (lnpre(prev) + m.W_pos[B_POS]) @ m.W_K[1, h] + m.b_K[1, h]
                assert got[f"qk_rank_h{h}"][i] == rank_of(k @ q, t)
    assert torch.equal(got["ov_rank_best"], torch.stack([got[f"ov_rank_h{h}"] for h in range(4)]).min(0).values)


def test_toy_2l_copies_and_a_random_model_does_not(toy_model):
    tokens = torch.arange(4, 2048, 7)
    trained = circuit_scores(folds.compact_weights(toy_model), tokens)
    random = circuit_scores(folds.compact_weights(hooked.random_model(d_vocab=2048, d_model=128, n_heads=4,
                                                                         d_head=32, n_ctx=64, seed=2)), tokens)
    assert trained["ov_rank_best"].float().median() < 5 < random["ov_rank_best"].float().median()
