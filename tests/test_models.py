import json
import re

import pytest
import torch

from workers import experiments, neighbors
from workers.model import folds, hooked, source
from workers.scoring.scorer import scorer_for
from workers.sequences import make_batch, sequence_keys
from workers.train_toy import CONFIG


def mean_b_strength(model, n: int = 1024) -> float:
    seq = torch.arange(n)
    keys = sequence_keys(99, experiments.get("neighbors").code, 0, torch.full_like(seq, -1), seq)
    batch = make_batch(keys, model.cfg.d_vocab, hooked.bos_id(model), torch.full_like(seq, -1), torch.full_like(seq, -1))
    ind, shuf = scorer_for(model, "fp32").strength(batch.tokens, batch.shuffled, batch.b[:, None])
    return float((ind - shuf).mean())


def test_toy_2l_shows_induction_and_random_init_does_not(toy_model):
    trained = mean_b_strength(toy_model)
    untrained = mean_b_strength(_untrained_toy())
    assert trained >= 3.0, trained
    assert abs(untrained) < 0.5, untrained


def _untrained_toy():
    """toy-2l's config with its initial (untrained) weights, processed the same way."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(**CONFIG, seed=0))
    model.load_and_process_state_dict(model.state_dict())
    return model.eval()


def test_toy_2l_is_a_real_hooked_transformer(toy_model):
    cfg = toy_model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_vocab, cfg.attn_only) == (2, 128, 4, 2048, True)
    assert cfg.normalization_type == "LNPre"  # default processing folded its LayerNorms
    assert hooked.bos_id(toy_model) == 1
    info = source.describe("toy-2l")  # what the driver reads: config.json, no weights
    assert toy_model.tokenizer is None and info.tokenizer is None and info.token_strings()[7] == "#7"
    assert (info.d_vocab, info.bos, info.compact) == (2048, 1, True)


def test_export_round_trip(tmp_path, toy_model):
    hooked.export_model(toy_model, str(tmp_path / "ckpt"))
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["n_layers"] == 2
    again = hooked.load_model(str(tmp_path / "ckpt"))
    tokens = torch.randint(4, 2048, (4, 24))
    assert torch.allclose(hooked.full_logits(again, tokens), hooked.full_logits(toy_model, tokens), atol=1e-5)

    # the documented way: HookedTransformer(cfg) + load_and_process_state_dict
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    raw.pop("induction_sweep")
    plain = HookedTransformer(HookedTransformerConfig(**{k: v for k, v in raw.items() if k != "tokenizer_name"}))
    plain.load_and_process_state_dict(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    assert torch.allclose(plain(tokens), hooked.full_logits(toy_model, tokens), atol=1e-5)


def test_export_to_s3_and_load_from_s3(bucket, toy_model):
    hooked.export_model(toy_model, f"s3://{bucket}/models/toy")
    again = hooked.load_model(f"s3://{bucket}/models/toy")
    tokens = torch.randint(4, 2048, (2, 24))
    assert torch.allclose(hooked.full_logits(again, tokens), hooked.full_logits(toy_model, tokens), atol=1e-5)


def test_bad_models_are_input_errors(tmp_path):
    with pytest.raises(source.ModelInputError, match="unknown model"):
        hooked.load_model("no-such-model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(source.ModelInputError, match="lacks"):
        hooked.load_model(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(CONFIG))
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(source.ModelInputError, match="cannot be loaded"):
        hooked.load_model(str(bad))


def test_hub_names_are_recognised_offline():
    assert source.is_hub_name("attn-only-2l") and source.is_hub_name("gpt2-small")
    assert not source.is_hub_name("attn-only-77l")


def test_resolve_token():
    toy = source.describe("toy-2l")
    assert toy.resolve_token("123", "--pair-a") == 123
    assert toy.resolve_token("#124", "--pair-a") == 124
    with pytest.raises(source.ModelInputError, match="no tokenizer"):
        toy.resolve_token(" Fab", "--pair-a")
    with pytest.raises(source.ModelInputError, match="outside"):
        toy.resolve_token("3", "--pair-a")
    with pytest.raises(source.ModelInputError, match="outside"):
        toy.resolve_token("2048", "--pair-b")
    assert toy.default_pair() == source.FALLBACK_PAIR


def test_checkpoint_with_a_tokenizer(tokenized_checkpoint):
    model = hooked.load_model(str(tokenized_checkpoint))
    assert model.tokenizer is not None and hooked.bos_id(model) == 1
    info = source.describe(str(tokenized_checkpoint))
    assert info.bos == 1 and info.token_strings()[4:6] == [" Fab", "ien"]
    assert info.default_pair() == (4, 5)  # the post's " Fab" / "ien"
    assert info.resolve_token(" w7", "--pair-a") == 13
    with pytest.raises(source.ModelInputError, match="not a single token"):
        info.resolve_token(" Fab ien", "--pair-a")
    with pytest.raises(source.ModelInputError, match="not a token"):
        info.resolve_token("Fabien", "--pair-b")


def test_describe_refuses_bad_checkpoints_without_loading(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(CONFIG))
    (bad / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(source.ModelInputError, match="cannot be loaded: not a safetensors file"):
        source.describe(str(bad))
    hooked.export_model(hooked.random_model(d_vocab=64, n_ctx=32, d_model=32, n_heads=2, d_head=16), str(tmp_path / "small"))
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    (tmp_path / "small" / "config.json").write_text(json.dumps({**config, "d_vocab": 99, "d_vocab_out": 99}))
    with pytest.raises(source.ModelInputError, match="embed.W_E has shape"):
        source.describe(str(tmp_path / "small"))


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + data


BROKEN = {  # what a broken checkpoint holds -> what the one line says
    "normalization": (dict(config={"normalization_type": "BatchNorm"}), "normalization_type 'BatchNorm' is not one of"),
    "positions": (dict(config={"positional_embedding_type": "learned"}), "positional_embedding_type 'learned' is not one of"),
    "truncated": (dict(truncate=True), "lie outside the file's"),
    "wrong shape": (dict(tensors={"blocks.1.attn.W_Q": torch.zeros(4, 128, 16)}), "blocks.1.attn.W_Q has shape [4, 128, 16]"),
    "missing tensor": (dict(drop="blocks.0.attn.W_O"), "lacks blocks.0.attn.W_O"),
    "short context": (dict(config={"n_ctx": 16}), "n_ctx 16 is shorter than the sweep's 24-token sequences"),
    "negative layers": (dict(config={"n_layers": -2}), "n_layers must be an integer in 1..1024, not -2"),
    "unknown field": (dict(config={"n_lyaers": 3}), "config field 'n_lyaers' is not a HookedTransformerConfig field"),
    "a gate with no place": (dict(tensors={"blocks.0.mlp.W_gate": torch.zeros(128, 512)}), "holds blocks.0.mlp.W_gate"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoints_are_refused_by_describe_naming_what_is_wrong(tmp_path, case):
    """Before any actor: every tensor present, of its shape and inside the file; config values known and in range."""
    import shutil

    from safetensors.torch import load_file, save_file

    change, message = BROKEN[case]
    path = tmp_path / "ckpt"
    shutil.copytree(source.TOY_DIR, path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change.get("config", {})}))
    state = load_file(str(path / "model.safetensors"))
    state.update(change.get("tensors", {}))
    state.pop(change.get("drop", ""), None)
    save_file(state, str(path / "model.safetensors"))
    if change.get("truncate"):
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(source.ModelInputError, match=re.escape(message)):
        source.describe(str(path))


def test_a_forged_header_is_refused_without_building_its_vocabulary(tmp_path):
    """A safetensors header claiming a 10^12-token embedding in a file of a few bytes: refused from the
    header, before any token string is made."""
    path = tmp_path / "forged"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**json.loads((source.TOY_DIR / "config.json").read_text()), "d_vocab": 10**12}))
    (path / "model.safetensors").write_bytes(_safetensors({"embed.W_E": {"dtype": "F32", "shape": [10**12, 128],
                                                                           "data_offsets": [0, 4 * 128 * 10**12]}}, b"\0" * 64))
    with pytest.raises(source.ModelInputError, match=re.escape("d_vocab must be an integer in 6..4194304, not 1000000000000")):
        source.describe(str(path))
    (path / "config.json").write_text((source.TOY_DIR / "config.json").read_text())
    with pytest.raises(source.ModelInputError, match="lie outside the file"):
        source.describe(str(path))


@pytest.mark.parametrize("shape", [
    dict(normalization_type="LNPre", positional_embedding_type="shortformer"),
    dict(normalization_type=None, positional_embedding_type="standard", n_layers=3),
    dict(normalization_type="LNPre", positional_embedding_type="standard", attn_only=False, d_mlp=128, act_fn="gelu_new"),
])
def test_weights_read_without_transformer_lens_score_as_transformer_lens_does(tmp_path, shape):
    """An actor reads the checkpoints the compact forward computes (attention-only, or with MLPs)
    straight from safetensors, unprocessed (value biases folded): its scores match TransformerLens'
    own full forward of the same weights. (TransformerLens'
    loading would centre a shortformer's W_pos, which changes the function: docs/DESIGN.md §2.)"""
    from workers.scoring.logodds import logodds

    model = hooked.random_model(d_vocab=300, n_ctx=32, d_model=64, n_heads=4, d_head=16, seed=4, **shape)
    gen = torch.Generator().manual_seed(1)
    state = {k: v + 0.2 * torch.randn(v.shape, generator=gen) if k.endswith(("b_V", "W_pos", "b_O", "W_E")) else v
             for k, v in model.state_dict().items()}  # uncentred, unfolded: as a training script saves them
    assert source.compact_supported(source.resolved(model.cfg))
    model.load_state_dict(state)
    hooked.export_model(model, str(tmp_path / "ckpt"))
    weights = folds.load_weights(str(tmp_path / "ckpt"))
    assert weights is not None and all(b.abs().max() == 0 for b in weights.b_V)  # folded into b_O
    reference = model  # the weights as saved, in TransformerLens' own forward
    tokens = torch.randint(4, 300, (32, 24), generator=gen)
    targets = torch.randint(4, 300, (32, 3), generator=gen)
    ref = logodds(torch.log_softmax(hooked.full_logits(reference, tokens)[:, -1].double(), -1), targets)
    assert (scorer_for(weights, "fp32").logodds(tokens, targets).double() - ref).abs().max() < 1e-4
    assert folds.load_weights("toy-2l") is not None and folds.load_weights("no-such-dir") is None


@pytest.fixture(scope="module")
def shortformer_ln_checkpoint(tmp_path_factory):
    """A shortformer LN model saved as a training script saves it: unprocessed, W_pos with a non-zero mean."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=300, n_ctx=32, attn_only=True,
                                  normalization_type="LN", positional_embedding_type="shortformer", seed=3)
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.pos_embed.W_pos.add_(0.5 + 0.3 * torch.randn(model.pos_embed.W_pos.shape, generator=gen))
        for name, p in model.named_parameters():
            if ".b_" in name or ".ln" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("ckpt") / "shortformer-ln"
    hooked.export_model(model.eval(), str(path))
    return path, model


def test_exact_loading_keeps_the_trained_function_and_says_how(shortformer_ln_checkpoint):
    path, trained = shortformer_ln_checkpoint
    exact = hooked.load_model(str(path))
    loading = exact.induction_sweep_loading
    assert loading["processing"] == "exact"
    assert loading["steps"] == ["center_unembed", "fold_value_biases", folds.CENTRE_WRITES]
    assert loading["max_abs_diff_log_prob"] <= loading["tolerance"] < 2 * hooked.CHECK_TOLERANCE
    tokens = torch.randint(4, 300, (16, 24), generator=torch.Generator().manual_seed(5))
    targets = tokens[:, :3]
    from workers.scoring.logodds import logodds

    ref = logodds(torch.log_softmax(hooked.full_logits(trained, tokens)[:, -1].double(), -1), targets)
    assert (scorer_for(exact, "fp32").logodds(tokens, targets).double() - ref).abs().max() < 1e-4  # what was trained
    weights = folds.load_weights(str(path))  # the actors: straight from safetensors, LN folded with positions unscaled
    assert source.describe(str(path)).compact and weights is not None
    assert (scorer_for(weights, "fp32").logodds(tokens, targets).double() - ref).abs().max() < 1e-4
    default = hooked.load_model(str(path), processing="tl-default")  # TransformerLens' defaults: centres W_pos
    assert {"fold_ln", "center_writing_weights"} <= set(default.induction_sweep_loading["steps"])
    assert default.induction_sweep_loading["max_abs_diff_log_prob"] > 0.05  # recorded, not refused


def test_a_processing_step_that_changes_the_function_is_named(shortformer_ln_checkpoint, monkeypatch):
    path, _ = shortformer_ln_checkpoint
    monkeypatch.setattr(hooked, "processing_steps", lambda cfg, processing="exact": {
        "fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True,
        folds.CENTRE_WRITES: False})
    with pytest.raises(source.ModelInputError, match="(fold_ln|center_writing_weights) changes this model's function"):
        hooked.load_model(str(path))


def test_bos_defaults_and_choices():
    class Tok:
        bos_token_id = 0

    assert source.default_bos("attn-only-2l", Tok()) == 1 and source.default_bos("NeelNanda/Attn_Only_2L512W_C4_Code", Tok()) == 1
    assert source.default_bos("gpt2-small", Tok()) == 0 and source.default_bos("x", None, {"bos_token_id": 7}) == 7
    assert source.default_bos("x") == source.DEFAULT_BOS


@pytest.mark.parametrize("family", [dict(normalization_type="LN", act_fn="gelu"),
                                    dict(normalization_type="LN", attn_only=True, positional_embedding_type="shortformer"),
                                    dict(normalization_type="RMS", act_fn="silu", gated_mlp=True)])
def test_neighbours_are_defined_once_from_the_stored_weights(tmp_path, family):
    """N1..N20 of every token are the same whether the checkpoint is read directly or through
    TransformerLens, under exact or tl-default processing: cosine similarity in the effective
    unembedding (ln_final's weight folded into W_U), centred across the vocabulary. TransformerLens'
    fold_ln also centres W_U across d_model, which moved N1-N3 for half the tokens."""
    from workers.neighbors import cosine_neighbors

    HookedTransformer, HookedTransformerConfig = source._hooked_transformer()
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=32, n_heads=4, d_head=8, d_vocab=400, n_ctx=32,
                                                      **family, seed=5))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.ln_final.w.copy_(1 + 0.5 * torch.randn(32, generator=gen))  # a final weight that the fold must apply
        model.unembed.W_U.add_(0.2 * torch.randn(400, generator=gen))  # per-token means across d_model, which its fold removes
    hooked.export_model(model.eval(), str(tmp_path / "ckpt"))
    path = str(tmp_path / "ckpt")
    tables = {}
    loaders = {"tl-exact": lambda: hooked.load_model(path), "tl-default": lambda: hooked.load_model(path, processing="tl-default")}
    if source.describe(path).compact:
        loaders["direct"] = lambda: hooked.load_for_scoring(path, "cpu")[0]
    for name, load in loaders.items():
        tables[name] = cosine_neighbors(neighbors.centred_unembedding(hooked.unembedding_of(load())), 20, 4)
    first = next(iter(tables.values()))
    assert all(torch.equal(t, first) for t in tables.values()), {k: (t != first).any(1).float().mean() for k, t in tables.items()}
    if family["normalization_type"] == "LN":  # the definition matters: TransformerLens' folded W_U ranks otherwise
        processed = hooked.load_model(path, processing="tl-default").W_U  # what the neighbours were found in before
        moved = cosine_neighbors(neighbors.centred_unembedding(processed), 3, 4) != first[:, :3]
        assert moved.any(1).float().mean() > 0.2


@pytest.mark.parametrize("normalization, listed", [("LN", {"center_writing_weights", "fold_ln"}), ("RMS", {"fold_ln"}), (None, set())])
def test_model_loading_lists_only_the_steps_that_changed_the_weights(tmp_path, normalization, listed):
    """TransformerLens skips centring the writing weights without a LayerNorm, and folds nothing where
    there is no norm: the manifest does not list them as applied."""
    HookedTransformer, HookedTransformerConfig = source._hooked_transformer()
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=32, n_heads=4, d_head=8, d_vocab=400, n_ctx=32,
                                                      act_fn="gelu", normalization_type=normalization,
                                                      positional_embedding_type="rotary", seed=6))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".b_" in name or ".ln" in name or "ln_final" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(6)))
    hooked.export_model(model.eval(), str(tmp_path / "ckpt"))
    steps = set(hooked.load_model(str(tmp_path / "ckpt")).induction_sweep_loading["steps"])
    assert steps - {"center_unembed", "fold_value_biases"} == listed
    assert {"center_unembed", "fold_value_biases"} <= steps  # random W_U and biases: both changed them
