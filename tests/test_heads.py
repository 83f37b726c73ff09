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


def test_head_attributions_and_rest_add_up_to_the_logit_difference(toy_model):
    batch = batch_for(toy_model)
    measures = head_measures(scorer_for(toy_model, "fp32").compact, batch)
    for suffix, tokens in (("", batch.tokens), ("_shuf", batch.shuffled)):
        logits = hooked.full_logits(toy_model, tokens)[:, -1].double()
        want = logits.gather(1, batch.b[:, None])[:, 0] - logits.mean(-1)
        parts = [measures[f"h{h}_dla_b{suffix}"] for h in range(toy_model.cfg.n_heads)] + [measures[f"rest_dla_b{suffix}"]]
        assert (torch.stack(parts).sum(0).double() - want).abs().max() < 1e-3
        assert torch.stack(parts[:-1]).abs().sum() > 1  # the heads do carry some of it


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
