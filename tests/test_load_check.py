"""Numbers a scientist can trust: every actor's scorer proves itself against TransformerLens' own
forward of the stored weights before its first shard, config fields are read as TransformerLens reads
them, and a scorer or run that would be wrong says so instead of writing numbers."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers import experiments
from workers.model import folds, hooked, source
from workers.scoring import check as load_check
from workers.scoring.check import ScorerCheckFailed
from workers.scoring.logodds import logodds
from workers.scoring.scorer import scorer_for
from workers.scoring.variant import ACCURACY_BOUNDS
from workers.sequences import make_batch, sequence_keys
from workers.shard import ShardRunner
from workers.work import WorkParams


def variant(tmp_path, name: str, config: dict | None = None, edit=None):
    """toy-2l's checkpoint with config.json fields set and its tensors edited (``edit(state)``)."""
    path = tmp_path / name
    shutil.copytree(source.TOY_DIR, path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if edit is not None:
        state = load_file(str(path / "model.safetensors"))
        edit(state)
        save_file(state, str(path / "model.safetensors"))
    return str(path)


def params(model: str, precision: str = "fp32", processing: str = "exact", names=("token-powers", "neighbors")) -> WorkParams:
    return WorkParams(model, seed=3, n_neighbors=5, pair=source.FALLBACK_PAIR, bos=1, save_tokens=False, precision=precision,
                      heads=False, processing=processing, experiments=tuple(experiments.get(n) for n in names))


def sequences(d_vocab: int, n: int = 32):
    seq = torch.arange(n)
    keys = sequence_keys(11, experiments.get("neighbors").code, 0, torch.full_like(seq, -1), seq)
    batch = make_batch(keys, d_vocab, 1, torch.full_like(seq, -1), torch.full_like(seq, -1))
    return torch.cat([batch.tokens, batch.shuffled]), torch.stack([batch.b, batch.a, batch.r], 1).repeat(2, 1)


def float64_logodds(model, tokens, targets):
    return logodds(hooked.full_logits(model, tokens)[:, -1].double(), targets)


def test_every_actor_proves_its_scorer_and_records_the_figure(tmp_path):
    runner = ShardRunner(params("toy-2l"), str(tmp_path / "out"), device="cpu")
    check = runner.ready()["check"]
    assert check["path"] == "compact" and check["precision"] == "fp32" and check["bound"] == ACCURACY_BOUNDS["fp32"]
    assert 0 < check["max_abs_diff_logodds"] <= 1e-4  # a real comparison: float32 against float64, not zero
    assert set(check["per_experiment"]) == {"token-powers", "neighbors"} and check["sequences"] == 2 * load_check.SEQUENCES
    assert check["reference"] == "TransformerLens' float64 forward of the stored weights"
    assert runner.timings["check"] > 0 and runner.timings["reference"] > 0


def test_attn_scale_sentinel_is_resolved_as_transformer_lens_resolves_it(tmp_path):
    """HookedTransformerConfig's own default, -1.0, means √d_head: read literally it made every row NaN."""
    path = variant(tmp_path, "sentinel", {"attn_scale": -1.0, "use_attn_scale": True})
    weights = folds.load_weights(path)
    assert weights.attn_scale == pytest.approx(32 ** 0.5)
    tokens, targets = sequences(2048)
    reference = hooked.reference_model(path)
    got = scorer_for(weights, "fp32").logodds(tokens, targets).double()
    assert torch.isfinite(got).all() and (got - float64_logodds(reference, tokens, targets)).abs().max() < 1e-4
    ShardRunner(params(path), str(tmp_path / "out"), device="cpu")  # and the actor's check passes


def test_bidirectional_attention_is_scored_by_transformer_lens(tmp_path):
    """The compact forward is causal: a bidirectional model goes to TransformerLens' path, whose scores
    match its float64 forward; the compact forward would be far off."""
    path = variant(tmp_path, "bidirectional", {"attention_dir": "bidirectional"})
    info = source.describe(path)
    assert not info.compact
    runner = ShardRunner(params(path), str(tmp_path / "out"), device="cpu")
    assert runner.scorer.path == "transformer_lens" and runner.check["max_abs_diff_logodds"] <= 1e-4
    tokens, targets = sequences(2048)
    want = float64_logodds(hooked.reference_model(path), tokens, targets)
    assert (runner.scorer.logodds(tokens, targets).double() - want).abs().max() < 1e-4
    causal = scorer_for(folds.weights_from_state(load_file(f"{path}/model.safetensors"), info.cfg), "fp32")
    assert (causal.logodds(tokens, targets).double() - want).abs().max() > 0.5


def test_a_scorer_beyond_its_bound_is_refused_naming_the_figure_and_the_cause(tmp_path):
    """Unembedding weights 30 times larger: bf16's rounding of the final residual stream moves the
    logits by nats. fp32 passes; bf16 is refused, and the cause names the cure."""
    path = variant(tmp_path, "loud", edit=lambda s: s["unembed.W_U"].mul_(30))
    ShardRunner(params(path, "fp32"), str(tmp_path / "fp32"), device="cpu")
    with pytest.raises(ScorerCheckFailed) as refused:
        ShardRunner(params(path, "bf16"), str(tmp_path / "bf16"), device="cpu")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path}: the compact scorer (bf16) differs from TransformerLens' "
                                                      "float64 forward of the stored weights by ")
    assert "beyond the bf16 bound 0.1; likely cause: bf16 rounding is too coarse for this model: run with --precision fp32" in message


def test_the_check_catches_a_forward_that_computes_another_function(tmp_path, monkeypatch):
    """A compact forward that forgets the unembedding's bias (a bug it once could have had) is caught
    before any shard, and named as the compact forward's."""
    path = variant(tmp_path, "biased", edit=lambda s: s["unembed.b_U"].add_(torch.randn(2048, generator=torch.Generator().manual_seed(0))))
    from workers.scoring import logodds

    forward = logodds.target_logits
    monkeypatch.setattr(logodds, "target_logits", lambda h, W_U_rows, b_U, targets: forward(h, W_U_rows, b_U * 0, targets))
    with pytest.raises(ScorerCheckFailed, match="likely cause: the compact forward reads this architecture differently"):
        ShardRunner(params(path), str(tmp_path / "out"), device="cpu")


def test_tl_default_is_checked_against_the_function_it_means_to_score(tmp_path):
    """--processing tl-default knowingly changes a shortformer LN model (it centres W_pos): its scorer is
    held to TransformerLens' float64 forward of the default-processed weights, and exact to the stored ones."""
    path = str(tmp_path / "shortformer-ln")
    HookedTransformer, HookedTransformerConfig = source._hooked_transformer()
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=300, n_ctx=32,
                                                      attn_only=True, normalization_type="LN",
                                                      positional_embedding_type="shortformer", seed=3))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # saved as a training script saves it: unprocessed, W_pos with a non-zero mean
        model.pos_embed.W_pos.add_(0.5 + 0.3 * torch.randn(model.pos_embed.W_pos.shape, generator=gen))
        for name, p in model.named_parameters():
            if ".b_" in name or ".ln" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    hooked.export_model(model.eval(), path)
    for processing, reference in (("exact", "stored weights"), ("tl-default", "stored weights with TransformerLens' default")):
        runner = ShardRunner(params(path, processing=processing, names=("neighbors",)), str(tmp_path / processing), device="cpu")
        assert reference in runner.check["reference"] and runner.check["max_abs_diff_logodds"] <= 1e-4


def test_log_odds_past_float32_exp_range_are_exact_on_every_path(tmp_path):
    """A model so sure of B that every other token lies more than 103 nats below it: the others' mass
    underflows float32's exp unless it is shifted by its own maximum. The true log-odds (float64) are
    reproduced on the compact and TransformerLens paths, finite."""
    def sharpen(state):
        state["unembed.W_U"].mul_(40)

    path = variant(tmp_path, "sharp", edit=sharpen)
    tokens, targets = sequences(2048)
    reference = hooked.reference_model(path)
    want = float64_logodds(reference, tokens, targets)
    assert want.max() > 110  # the case that used to overflow to +inf
    for scorer in (scorer_for(folds.load_weights(path), "fp32"), scorer_for(hooked.load_model(path), "fp32", fast=False)):
        got = scorer.logodds(tokens, targets).double()
        assert torch.isfinite(got).all() and ((got - want).abs() / want.abs().clamp(min=1)).max() < 1e-4, scorer.path


def test_reference_figures_are_kept_by_content_and_every_scorer_is_checked_anew(tmp_path, monkeypatch):
    """A later actor of the same weights, processing and check sequences (whatever the run's seed) reads
    TransformerLens' figures from the node's cache instead of building the model again; its own scorer
    is still compared with them, so a wrong forward is still refused. Weights that differ by one value,
    or other sequences (another set of experiments), have figures of their own."""
    from workers.scoring import logodds as logodds_module

    monkeypatch.setenv("INDUCTION_SWEEP_CACHE", str(tmp_path / "cache"))
    first = ShardRunner(params("toy-2l"), str(tmp_path / "a"), device="cpu").check
    second = ShardRunner(params("toy-2l"), str(tmp_path / "b"), device="cpu").check
    assert not first["reference_cached"] and second["reference_cached"]
    assert second["per_experiment"] == first["per_experiment"] and 0 < second["max_abs_diff_logodds"] <= 1e-4
    assert len(list((tmp_path / "cache" / "reference").iterdir())) == 1
    reseeded = ShardRunner(dataclasses.replace(params("toy-2l"), seed=4), str(tmp_path / "c"), device="cpu").check
    assert reseeded["reference_cached"] and reseeded["per_experiment"] == first["per_experiment"]
    other = ShardRunner(params("toy-2l", names=("token-powers",)), str(tmp_path / "c"), device="cpu").check
    nudged = variant(tmp_path, "nudged", edit=lambda s: s["unembed.b_U"][7:8].add_(1e-3))
    assert not other["reference_cached"] and not ShardRunner(params(nudged), str(tmp_path / "d"), device="cpu").check["reference_cached"]
    forward = logodds_module.target_logits
    monkeypatch.setattr(logodds_module, "target_logits", lambda h, W_U_rows, b_U, targets: forward(h, W_U_rows, b_U + 1, targets))
    with pytest.raises(ScorerCheckFailed, match="differs from TransformerLens' float64 forward of the stored weights by 1 in log-odds"):
        ShardRunner(params("toy-2l"), str(tmp_path / "e"), device="cpu")
