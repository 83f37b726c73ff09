import json

import pytest
import torch

from workers import models
from workers.scoring import Scorer
from workers.sequences import make_batch, sequence_keys
from workers.train_toy import CONFIG


def mean_b_strength(model, n: int = 1024) -> float:
    seq = torch.arange(n)
    keys = sequence_keys(99, "neighbors", 0, torch.full_like(seq, -1), seq)
    batch = make_batch(keys, model.cfg.d_vocab, models.bos_id(model), torch.full_like(seq, -1), torch.full_like(seq, -1))
    ind, shuf = Scorer(model, "fp32").strength(batch.tokens, batch.shuffled, batch.b[:, None])
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
    assert models.bos_id(toy_model) == 1
    assert toy_model.tokenizer is None and models.token_strings(toy_model)[7] == "#7"


def test_export_round_trip(tmp_path, toy_model):
    models.export_model(toy_model, str(tmp_path / "ckpt"))
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["n_layers"] == 2
    again = models.load_model(str(tmp_path / "ckpt"))
    tokens = torch.randint(4, 2048, (4, 24))
    assert torch.allclose(models.full_logits(again, tokens), models.full_logits(toy_model, tokens), atol=1e-5)

    # the documented way: HookedTransformer(cfg) + load_and_process_state_dict
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    raw.pop("induction_sweep")
    plain = HookedTransformer(HookedTransformerConfig(**{k: v for k, v in raw.items() if k != "tokenizer_name"}))
    plain.load_and_process_state_dict(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    assert torch.allclose(plain(tokens), models.full_logits(toy_model, tokens), atol=1e-5)


def test_export_to_s3_and_load_from_s3(bucket, toy_model):
    models.export_model(toy_model, f"s3://{bucket}/models/toy")
    again = models.load_model(f"s3://{bucket}/models/toy")
    tokens = torch.randint(4, 2048, (2, 24))
    assert torch.allclose(models.full_logits(again, tokens), models.full_logits(toy_model, tokens), atol=1e-5)


def test_bad_models_are_input_errors(tmp_path):
    with pytest.raises(models.ModelInputError, match="unknown model"):
        models.load_model("no-such-model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelInputError, match="lacks"):
        models.load_model(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(CONFIG))
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(models.ModelInputError, match="cannot be loaded"):
        models.load_model(str(bad))


def test_hub_names_are_recognised_offline():
    assert models.is_hub_name("attn-only-2l") and models.is_hub_name("gpt2-small")
    assert not models.is_hub_name("attn-only-77l")


def test_resolve_token(toy_model):
    assert models.resolve_token(toy_model, "123", "--pair-a") == 123
    assert models.resolve_token(toy_model, "#124", "--pair-a") == 124
    with pytest.raises(models.ModelInputError, match="no tokenizer"):
        models.resolve_token(toy_model, " Fab", "--pair-a")
    with pytest.raises(models.ModelInputError, match="outside"):
        models.resolve_token(toy_model, "3", "--pair-a")
    with pytest.raises(models.ModelInputError, match="outside"):
        models.resolve_token(toy_model, "2048", "--pair-b")
    assert models.default_pair(toy_model) == models.FALLBACK_PAIR


def test_checkpoint_with_a_tokenizer(tokenized_checkpoint):
    model = models.load_model(str(tokenized_checkpoint))
    assert model.tokenizer is not None and models.bos_id(model) == 1
    assert models.token_strings(model)[4:6] == [" Fab", "ien"]
    assert models.default_pair(model) == (4, 5)  # the post's " Fab" / "ien"
    assert models.resolve_token(model, " w7", "--pair-a") == 13
    with pytest.raises(models.ModelInputError, match="not a single token"):
        models.resolve_token(model, " Fab ien", "--pair-a")
    with pytest.raises(models.ModelInputError, match="not a token"):
        models.resolve_token(model, "Fabien", "--pair-b")
