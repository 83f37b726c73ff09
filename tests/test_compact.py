"""The compact forward against TransformerLens' own full forward on the same tokens."""

import pytest
import torch

from tests.helpers import check_parity, seed_style
from workers.compact.forward import CompactForward
from workers.model import folds, hooked, source
from workers.scoring.scorer import scorer_for
from workers.scoring.variant import ATTENTIONS

# triton (an interpreter on a CPU) is checked on smaller batches in tests/test_attention_kernels.py
ON_THIS_DEVICE = ATTENTIONS if torch.cuda.is_available() else ("sdpa", "products")


@pytest.mark.parametrize("attention", ON_THIS_DEVICE)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_toy_2l(toy_model, precision, attention):
    check_parity(toy_model, precision, n=256, attention=attention)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_toy_2l_as_the_actors_load_it(toy_model, precision):
    """The actors read toy-2l from safetensors without TransformerLens: same bounds."""
    check_parity(toy_model, precision, n=256, scored=folds.load_weights("toy-2l"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_random_attn_only_2l_shape_reduced_vocab(precision):
    model = hooked.random_model(d_vocab=4096, n_ctx=64, seed=3, perturb=True)
    check_parity(model, precision)


@pytest.mark.parametrize("shape", [
    dict(n_layers=1),
    dict(n_layers=3, positional_embedding_type="standard"),
    dict(n_layers=2, normalization_type=None),
])
def test_other_attention_only_shapes(shape):
    model = hooked.random_model(d_vocab=1024, n_ctx=32, d_model=64, n_heads=4, d_head=16, seed=4, perturb=True, **shape)
    check_parity(model, "fp32", n=64)


MLP_SHAPE = dict(d_vocab=1024, n_ctx=32, d_model=64, n_heads=4, d_head=16, attn_only=False, d_mlp=256)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("act_fn", ["gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "solu_ln"])
def test_models_with_mlps(act_fn, precision):
    """Attention then MLP in each block (gelu-Nl, SoLU, GPT-2 shapes), TransformerLens-processed."""
    model = hooked.random_model(**MLP_SHAPE, act_fn=act_fn, positional_embedding_type="standard", seed=6)
    assert folds.compact_weights(model).act_fn == act_fn
    check_parity(model, precision)


@pytest.mark.parametrize("shape", [dict(n_layers=3, normalization_type="LNPre"), dict(n_layers=1, normalization_type=None),
                                   dict(n_layers=2, positional_embedding_type="shortformer"),
                                   # plain SoLU: TransformerLens' LayerNorm folding assumes a SoLU LayerNorm, so none here
                                   dict(n_layers=2, normalization_type=None, act_fn="solu")])
def test_other_shapes_with_mlps(shape):
    model = hooked.random_model(**MLP_SHAPE, **{"act_fn": "gelu_new", "positional_embedding_type": "standard", **shape})
    check_parity(model, "fp32")


# Today's families at reduced widths, with TransformerLens' flags for each
FAMILIES = {
    # Pythia (GPT-NeoX): rotary on a quarter of each head, pairs (i, i + rotary_dim/2), parallel blocks, LN, gelu
    "pythia": dict(act_fn="gelu", positional_embedding_type="rotary", rotary_dim=4, parallel_attn_mlp=True),
    # Llama: RMSNorm, gated SiLU MLP, rotary on every dimension
    "llama": dict(normalization_type="RMS", act_fn="silu", gated_mlp=True, positional_embedding_type="rotary"),
    # ... with grouped-query attention (Llama 3, Mistral): four query heads share each key/value head
    "llama-gqa": dict(normalization_type="RMS", act_fn="silu", gated_mlp=True, positional_embedding_type="rotary",
                      n_key_value_heads=1, rotary_base=500000),
    # GPT-J: rotary on part of each head with adjacent pairs (2i, 2i+1), parallel blocks, gelu_new
    "gptj": dict(act_fn="gelu_new", positional_embedding_type="rotary", rotary_dim=8, rotary_adjacent_pairs=True,
                 parallel_attn_mlp=True),
    # Gemma-style MLP: gated, tanh-approximated gelu, RMSNorm, rotary
    "gemma-mlp": dict(normalization_type="RMS", act_fn="gelu_pytorch_tanh", gated_mlp=True,
                      positional_embedding_type="rotary"),
}


@pytest.mark.parametrize("attention", ON_THIS_DEVICE)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_families(family, precision, attention):
    """Rotary embeddings, parallel blocks, gated MLPs, RMSNorm and grouped-query attention,
    TransformerLens-processed, three layers (one in the middle)."""
    model = hooked.random_model(**{**MLP_SHAPE, "n_layers": 3, **FAMILIES[family]}, seed=7)
    check_parity(model, precision, attention=attention)


@pytest.mark.parametrize("flags", [dict(normalization_type="LN", act_fn="gelu", gated_mlp=True, n_key_value_heads=2),
                                   dict(normalization_type="RMS", act_fn="silu", gated_mlp=True,
                                        positional_embedding_type="rotary", rotary_dim=8)])
def test_saved_norm_weights_fold_exactly(flags):
    """The weights as saved (norm weights and biases, shared keys and values, nothing folded by
    TransformerLens): a LayerNorm's bias before a gated MLP acts inside the product, through b_gate
    and b_up; an RMSNorm's weight folds into its readers."""
    HookedTransformer, HookedTransformerConfig = source._hooked_transformer()
    shape = {**MLP_SHAPE, "n_layers": 2, "positional_embedding_type": "standard", **flags}
    raw = HookedTransformer(HookedTransformerConfig(**shape, seed=8), move_to_device=False)
    gen = torch.Generator().manual_seed(9)
    state = {k: v + 0.2 * torch.randn(v.shape, generator=gen) if (".ln" in k or "b_" in k or k.startswith("ln_final"))
             else v for k, v in raw.state_dict().items()}
    raw.load_state_dict(state)
    weights = folds.weights_from_state(state, source.resolved(raw.cfg))
    if flags["normalization_type"] == "LN":
        assert weights.b_gate[0].abs().min() > 0 and weights.b_up[0].abs().min() > 0
    check_parity(raw.eval(), "fp32", scored=weights)


@pytest.mark.parametrize("flags", [dict(act_fn="gelu", final_rms=True),
                                   dict(act_fn="gelu", positional_embedding_type="rotary", use_NTK_by_parts_rope=True)])
def test_other_blocks_take_transformer_lens_path(flags):
    model = hooked.random_model(**MLP_SHAPE, **{"positional_embedding_type": "standard", **flags})
    assert folds.compact_weights(model) is None
    assert scorer_for(model, "fp32").path == "transformer_lens"


# CUDA's fp32 default, and bf16 where Triton is missing or fails to build, with an MLP (each compilation
# takes ~20 s here; bf16 through the Triton attention compiled: test_attention_kernels.py)
@pytest.mark.parametrize("precision, attention, mlp", [("fp32", "products", False), ("bf16", "products", True)])
def test_compiled_forward(precision, attention, mlp):
    """torch.compile of the compact forward and of torch's unembedding + log-sum-exp (the default on
    CUDA), here through Inductor's CPU backend."""
    shape = dict(attn_only=False, d_mlp=1024, act_fn="gelu", positional_embedding_type="standard") if mlp else {}
    model = hooked.random_model(d_vocab=4096, n_ctx=64, seed=3, perturb=True, **shape)
    check_parity(model, precision, compile=True, attention=attention)
    # and the same numbers as eager, up to values that round to bf16 the other way after a
    # reordered float32 sum. Were the roundings dropped, the mean would be ~2e-3 (measured).
    batch = seed_style(128, model.cfg.d_vocab)
    eager, compiled = (scorer_for(model, precision, compile=c, attention=attention).logodds(batch.tokens, batch.b[:, None])
                       for c in (False, True))
    if not mlp or precision == "fp32":
        assert (eager - compiled).abs().mean() < 1e-4 and (eager - compiled).abs().max() < 2e-3
    if precision == "bf16":  # the MLP's hidden layer adds roundings: compiled still sits far closer to eager bf16 than to fp32
        fp32 = scorer_for(model, "fp32", attention=attention).logodds(batch.tokens, batch.b[:, None])
        assert (eager - compiled).abs().mean() < 0.2 * (eager - fp32).abs().mean()


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("shape", [dict(n_layers=1), dict(n_layers=2), dict(n_layers=3, positional_embedding_type="standard"),
                                   dict(n_layers=2, attn_only=False, d_mlp=256, act_fn="solu_ln"),
                                   dict(n_layers=2, attn_only=False, d_mlp=256, act_fn="silu", gated_mlp=True,
                                        normalization_type="RMS", positional_embedding_type="rotary", n_key_value_heads=2),
                                   dict(n_layers=2, attn_only=False, d_mlp=256, act_fn="gelu", parallel_attn_mlp=True,
                                        positional_embedding_type="rotary", rotary_dim=8, rotary_adjacent_pairs=True)])
def test_native_bf16_path_runs_on_meta_tensors(shape, attention):
    """The CUDA bf16 path (bf16 products, float32 sums through mm/bmm out_dtype) cannot run on a
    CPU; on meta tensors every call's shapes and dtypes are still checked."""
    model = hooked.random_model(d_vocab=1024, n_ctx=32, d_model=64, n_heads=4, d_head=16, seed=4, **shape)
    forward = CompactForward(folds.compact_weights(model), torch.bfloat16, torch.bfloat16, attention, align=64).to("meta")
    h = forward(torch.zeros(8, 24, dtype=torch.long, device="meta"))
    assert h.shape == (8, 64) and h.dtype == torch.float32
    logits = forward.logits(h)
    assert logits.shape == (8, 1024) and logits.dtype == torch.float32
    assert forward.logits(h, torch.bfloat16).dtype == torch.bfloat16


def test_compiled_scorer_builds_one_graph_for_every_batch_size(toy_model):
    """A shard's last batch is smaller; recompiling for it costs ~20 s, and Dynamo gives up after 8."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # reset() leaves the counters of earlier tests' graphs
    batch = seed_style(64, toy_model.cfg.d_vocab)
    scorer = scorer_for(toy_model, "fp32", compile=True)
    for n in (64, 40, 17):
        scorer.logodds(batch.tokens[:n], batch.b[:n, None])
    scorer_for(toy_model, "fp32", compile=True).logodds(batch.tokens[:30], batch.b[:30, None])  # another actor's scorer
    # one graph for the forward, one for the exact target logits (the unembedding is compiled where the
    # Triton log-sum-exp reads it: CUDA)
    assert scorer.options["compiled"] and counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("d_model", [64, 48])
def test_padded_unembedding_gives_the_same_logits(d_model):
    """CUDA's aligned W_U (zero rows and columns up to multiples of 64; b_U added by the product) against
    the unpadded one."""
    model = hooked.random_model(d_vocab=1000, n_ctx=32, d_model=d_model, n_heads=4, d_head=d_model // 4, seed=5)
    batch = seed_style(32, 1000)
    plain, padded = (CompactForward(folds.compact_weights(model), align=a) for a in (1, 64))
    assert padded.unembed.W_U.shape == (64, 1024) and plain.unembed.W_U.shape == (d_model, 1000)
    assert padded.unembed.b_U_padded.shape == (1024,)
    h = plain(batch.tokens)
    assert torch.equal(h, padded(batch.tokens))
    assert padded.logits(h).shape == (32, 1000)
    assert torch.allclose(plain.logits(h), padded.logits(h), rtol=0, atol=1e-5)
    w = folds.compact_weights(model)
    assert w.b_U.abs().min() > 0 and torch.allclose(padded.logits(h).double(), h.double() @ w.W_U.double() + w.b_U, atol=1e-5)
