"""Per-head measurements against TransformerLens' own cache on the same tokens."""

import torch

from workers import experiments
from workers.heads import head_measures
from workers.model import hooked
from workers.scoring.scorer import scorer_for
from workers.sequences import A_POS, B_POS, make_batch, sequence_keys, shuffled_positions


def batch_for(model, n=64, rule=None):
    seq = torch.arange(n)
    keys = sequence_keys(5, experiments.get("neighbors").code, 0, torch.full_like(seq, -1), seq)
    none = torch.full_like(seq, -1)
    return make_batch(keys, model.cfg.d_vocab, hooked.bos_id(model), none, none, rule)


def add_up(model, measures, batch):
    for suffix, tokens in (("", batch.tokens), ("_shuf", batch.shuffled)):
        logits = hooked.full_logits(model, tokens)[:, -1].double()
        want = logits.gather(1, batch.b[:, None])[:, 0] - logits.mean(-1)
        parts = [measures[f"h{h}_dla_b{suffix}"] for h in range(model.cfg.n_heads)] + [measures[f"rest_dla_b{suffix}"]]
        assert (torch.stack(parts).sum(0).double() - want).abs().max() < 1e-3
    return parts


def test_head_attributions_and_rest_add_up_to_the_logit_difference(toy_model):
    batch = batch_for(toy_model)
    parts = add_up(toy_model, head_measures(scorer_for(toy_model, "fp32").compact, batch), batch)
    assert torch.stack(parts[:-1]).abs().sum() > 1  # the heads do carry some of it


def test_head_attributions_under_rmsnorm_are_scaled_not_centred():
    """RMSNorm scales the stream without centring it: a head's share is its output over the stream's
    RMS, and the parts still add up to the logit difference."""
    model = hooked.random_model(d_vocab=512, n_ctx=32, d_model=64, n_heads=4, d_head=16, n_layers=2, attn_only=False, d_mlp=128,
                                act_fn="silu", gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary", seed=3)
    batch = batch_for(model)
    compact = scorer_for(model, "fp32").compact
    _, trace = compact.traced(batch.tokens)
    want = torch.einsum("bhd,bd->bh", trace.head_out, compact.unembed.W_U_rows[batch.b] - compact.unembed.W_U_rows.mean(0))
    want = want / trace.resid.pow(2).mean(-1, keepdim=True).add(compact.num.eps).sqrt()
    measures = head_measures(compact, batch)
    assert torch.allclose(torch.stack([measures[f"h{h}_dla_b"] for h in range(4)], 1), want, atol=1e-5)
    add_up(model, measures, batch)


def test_head_attention_matches_transformer_lens_pattern(toy_model):
    batch = batch_for(toy_model)
    measures = head_measures(scorer_for(toy_model, "fp32").compact, batch)
    last = f"blocks.{toy_model.cfg.n_layers - 1}.attn.hook_pattern"
    _, cache = toy_model.run_with_cache(batch.tokens, names_filter=last)
    _, cache_shuf = toy_model.run_with_cache(batch.shuffled, names_filter=last)
    moved = shuffled_positions(batch.keys, [A_POS, B_POS])
    rows = torch.arange(len(batch.b))
    assert (batch.shuffled[rows, moved[:, 1]] == batch.b).all() and (batch.shuffled[rows, moved[:, 0]] == batch.a).all()
    for h in range(toy_model.cfg.n_heads):
        assert torch.allclose(measures[f"h{h}_attn_b"], cache[last][:, h, -1, B_POS], atol=1e-5)
        assert torch.allclose(measures[f"h{h}_attn_a"], cache[last][:, h, -1, A_POS], atol=1e-5)
        assert torch.allclose(measures[f"h{h}_attn_b_shuf"], cache_shuf[last][rows, h, -1, moved[:, 1]], atol=1e-5)
    # toy-2l has induction heads: some head attends from the final A to B most of the time
    assert max(measures[f"h{h}_attn_b"].mean() for h in range(toy_model.cfg.n_heads)) > 0.5
