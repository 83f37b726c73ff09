"""Every TransformerLens family scored exactly: loaded as the actors load them (a
checkpoint directory, ``exact`` processing), their strengths match TransformerLens' own full
forward of the weights as saved, for every registered experiment, in fp32 and bf16. Every family
here takes the compact forward, read straight from the checkpoint. ``--heads`` is refused where it
does not apply.

The checkpoints are random weights of each family's real architecture (TransformerLens'
config flags; widths, vocabulary and context reduced), saved as a training script saves them:
LayerNorm weights, biases and the residual stream's writes perturbed, so that every folding and
centring step of the loading changes the tensors and a wrong one shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import BOUNDS, refused
from workers import experiments
from workers.model import folds, hooked, source
from workers.scoring.logodds import logodds
from workers.sequences import FIRST_TOKEN
from workers.shard import ShardRunner
from workers.work import ShardSpec, WorkParams

# Reduced widths shared by every family: d_mlp = 4 d_model as in all four; d_vocab above FALLBACK_PAIR's ids.
SHARED = dict(d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=2048, n_ctx=64, normalization_type="LN", attn_only=False)
# Each family's flags, as TransformerLens' loading_from_pretrained sets them.
FAMILIES = {
    # NeelNanda/GELU_2L512W_C4_Code (convert_neel_model_config): LN, standard positions, gelu
    "gelu-2l": dict(n_layers=2, act_fn="gelu", positional_embedding_type="standard"),
    # NeelNanda/SoLU_2L512W_C4_Code: SoLU with its own LayerNorm inside the MLP (mlp.ln, folded into W_out)
    "solu-2l": dict(n_layers=2, act_fn="solu_ln", positional_embedding_type="standard"),
    # gpt2 (GPT2LMHeadModel): 12 layers, LN, learned positions, gelu_new
    "gpt2-small": dict(n_layers=12, act_fn="gelu_new", positional_embedding_type="standard", original_architecture="GPT2LMHeadModel"),
    # pythia (GPTNeoXForCausalLM): rotary on a quarter of each head, non-adjacent pairs, attention and MLP
    # in parallel with separate LayerNorms
    "pythia-rotary": dict(n_layers=2, act_fn="gelu", positional_embedding_type="rotary", rotary_dim=4,
                          rotary_adjacent_pairs=False, parallel_attn_mlp=True, original_architecture="GPTNeoXForCausalLM"),
    # GPT-J (GPTJForCausalLM): rotary on part of each head with adjacent pairs, parallel blocks, one LayerNorm
    # read by both (two equal ones here), gelu_new
    "gptj": dict(n_layers=2, act_fn="gelu_new", positional_embedding_type="rotary", rotary_dim=8,
                 rotary_adjacent_pairs=True, parallel_attn_mlp=True, original_architecture="GPTJForCausalLM"),
    # Llama (LlamaForCausalLM): RMSNorm, gated SiLU MLP, rotary on every dimension, base 500000 as Llama 3
    "llama": dict(n_layers=2, normalization_type="RMS", act_fn="silu", gated_mlp=True, positional_embedding_type="rotary",
                  rotary_base=500000, original_architecture="LlamaForCausalLM"),
    # ... with grouped-query attention: two heads of queries to each head of keys and values (Llama 3, Mistral)
    "llama-gqa": dict(n_layers=2, normalization_type="RMS", act_fn="silu", gated_mlp=True, positional_embedding_type="rotary",
                      n_key_value_heads=2, original_architecture="LlamaForCausalLM"),
}
# The scorer's path for each: the compact forward computes them all
COMPACT = {family: "compact" for family in FAMILIES}
# Not scored here, but refused --heads all the same: attention-only and computed by the compact forward, but
# with rotary positions, which the heads' circuits do not compute.
ATTN_ONLY_ROTARY = dict(n_layers=2, attn_only=True, positional_embedding_type="rotary", rotary_dim=16)
N_SEQS = 16  # sequences per scenario (per-token experiments: 4 tokens x 4 sequences)
N_NEIGHBORS = 3


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """LayerNorm weights (around 1) and biases (around 0) random, and W_E, W_pos and the output biases
    given a non-zero mean across d_model: what fold_ln and the centring steps act on."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if ".ln" in key or key.startswith("ln_final") or ".b_" in key or "._b_" in key:
            value = value + 0.2 * torch.randn(value.shape, generator=gen)
        if key in ("embed.W_E", "pos_embed.W_pos") or key.endswith(("attn.b_O", "mlp.b_out")):
            value = value + 0.3 + 0.1 * torch.randn(value.shape[:-1] + (1,), generator=gen)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (checkpoint directory, the HookedTransformer that saved it: the unprocessed reference)."""
    HookedTransformer, HookedTransformerConfig = source._hooked_transformer()
    built = {}

    def get(family: str):
        if family not in built:
            flags = FAMILIES.get(family, ATTN_ONLY_ROTARY)
            model = HookedTransformer(HookedTransformerConfig(**{**SHARED, **flags}, seed=11), move_to_device=False)
            model.load_state_dict(perturbed(model.state_dict(), seed=12))  # as saved: nothing folded or centred
            model.cfg.model_name = family
            path = tmp_path_factory.mktemp("families") / family
            hooked.export_model(model.eval(), str(path))
            built[family] = path, model
        return built[family]

    return get


def specs() -> list[ShardSpec]:
    """One shard per scenario of every registered experiment."""
    out = []
    for experiment in experiments.REGISTRY.values():
        for part, scenario in enumerate(experiment.scenarios):
            tokens = (FIRST_TOKEN, FIRST_TOKEN + 4) if experiment.per_token else (-1, -1)
            seqs = N_SEQS // 4 if experiment.per_token else N_SEQS
            out.append(ShardSpec(experiment.name, scenario.name, part, 0, seqs, *tokens))
    return out


_REFERENCES: dict = {}  # (family, shard key, scenario) -> (tokens, shuffled, targets, log-odds, strength); shared by the precisions


def reference(family: str, model, spec: ShardSpec, scored) -> tuple[np.ndarray, np.ndarray]:
    """TransformerLens' full forward of the unprocessed weights, log_softmax at the last position in
    float64 after the forward: (log-odds on the induction sequences, strength), per target."""
    key = (family, spec.key, spec.scenario)
    cached = _REFERENCES.get(key)
    inputs = (scored.tokens, scored.shuffled_tokens, scored.targets)
    if cached is None or not all(np.array_equal(a, b) for a, b in zip(cached[:3], inputs)):
        targets = torch.as_tensor(scored.targets)
        lo = [logodds(torch.log_softmax(hooked.full_logits(model, torch.as_tensor(t))[:, -1].double(), -1), targets).numpy()
              for t in (scored.tokens, scored.shuffled_tokens)]
        cached = _REFERENCES[key] = (*inputs, lo[0], lo[0] - lo[1])
    return cached[3], cached[4]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_experiment_scored_as_transformer_lens_does(checkpoints, tmp_path, family, precision):
    """A ShardRunner (what each actor is) loads the checkpoint with exact processing and scores one
    shard per scenario of every experiment; every strength, per target, within the precision's bound
    of TransformerLens' own forward of the weights as saved. bf16 must show its rounding (above the
    fp32 bound): it really ran in bf16, and the fp32 agreement is not a coincidence of a lax check."""
    path, model = checkpoints(family)
    params = WorkParams(str(path), seed=5, n_neighbors=N_NEIGHBORS, pair=source.FALLBACK_PAIR, bos=source.DEFAULT_BOS,
                        save_tokens=True, precision=precision, heads=False, processing="exact",
                        experiments=tuple(experiments.REGISTRY.values()))
    runner = ShardRunner(params, str(tmp_path / "out"), device="cpu")
    assert runner.scorer.path == COMPACT[family] and runner.scorer.precision == precision
    loading = runner.loading
    if COMPACT[family] == "compact":
        compact = runner.scorer.compact
        assert loading["loader"] == "safetensors"
        assert sum(b.mlp is not None for b in [*compact.blocks, compact.last]) == FAMILIES[family]["n_layers"]
        under_ln = FAMILIES[family].get("normalization_type", "LN") == "LN"  # RMSNorm does not remove the mean
        assert set(loading["steps"]) == {"fold_ln", "fold_value_biases"} | ({folds.CENTRE_WRITES} if under_ln else set())
    else:
        assert loading["loader"] == "transformer_lens" and loading["processing"] == "exact"
        assert {"fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"} <= set(loading["steps"])
        assert loading["max_abs_diff_log_prob"] <= loading["tolerance"] < 2 * hooked.CHECK_TOLERANCE
        assert runner.model.cfg.normalization_type == "LNPre"  # the LayerNorm weights were folded, not kept

    errors = {}
    for spec in specs():
        scored = runner.compute(spec)
        names = experiments.get(spec.experiment).target_names(N_NEIGHBORS)
        assert scored.targets.shape == (spec.n_sequences, len(names))
        ref_induction, ref_strength = reference(family, model, spec, scored)
        strength = scored.induction.astype(np.float64) - scored.shuffled
        errors[spec.experiment, spec.scenario] = float(max(np.abs(strength - ref_strength).max(),
                                                           np.abs(scored.induction - ref_induction).max()))
        assert np.abs(ref_strength).max() > 100 * BOUNDS["fp32"]  # strengths far from 0: the comparison means something
    worst = max(errors.values())
    print(f"{family} {precision}: max |Δ| {worst:.3g}")
    assert worst <= BOUNDS[precision], f"{family} {precision}: max |Δ strength or log-odds| per (experiment, scenario) {errors}"
    if precision == "bf16":
        assert worst > BOUNDS["fp32"], f"{family}: bf16 scores identical to fp32's within {worst:.3g}: bf16 did not run"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_saved_layer_norms_change_the_function(checkpoints, family):
    """The checkpoints' LayerNorm weights and biases matter: a loader that dropped them instead of
    folding them would miss TransformerLens' forward by far more than the fp32 bound."""
    _, model = checkpoints(family)
    plain = type(model)(model.cfg, move_to_device=False)
    plain.load_state_dict({k: (torch.ones_like(v) if k.endswith(".w") else torch.zeros_like(v)) if ".ln" in k or
                           k.startswith("ln_final") else v for k, v in model.state_dict().items()})
    tokens = torch.randint(FIRST_TOKEN, SHARED["d_vocab"], (8, 24), generator=torch.Generator().manual_seed(0))
    diff = (hooked.full_logits(model, tokens)[:, -1].log_softmax(-1) - hooked.full_logits(plain.eval(), tokens)[:, -1].log_softmax(-1))
    assert diff.abs().max() > 100 * BOUNDS["fp32"]


@pytest.mark.parametrize("family", [*FAMILIES, "attn-only-rotary"])
def test_heads_is_refused_where_it_does_not_apply(capsys, checkpoints, tmp_path, family):
    """--heads measures an attention-only compact forward's last layer (its heads' direct effect and
    circuits): any other model is refused before any work, in one line naming the option, what it
    needs and the model."""
    path, _ = checkpoints(family)
    out = tmp_path / "out"
    argv = ["run", "--model", str(path), "--out", str(out), "--heads", "--quiet"]
    refused(capsys, argv, f"--heads needs an attention-only model the compact forward scores (LayerNorm, LNPre or "
                          f"none, standard or shortformer positions); {path} is not one")
    assert not out.exists()
    from jobs.cli import build_parser, run_config

    # the same options without --heads pass every check: the refusal is --heads', not the model's
    cfg, info = run_config(build_parser().parse_args(argv[:-2] + ["--quiet"]))
    assert not cfg.heads and info.compact and not out.exists()  # every model here takes the compact forward


@pytest.mark.parametrize("name", ["gelu-2l", "solu-2l", "gpt2-small", "pythia-70m"])
def test_hub_family_names_without_the_hub_are_one_line(capsys, monkeypatch, tmp_path, name):
    """A family's hub name where the hub cannot be reached (offline, as here): one line, exit 2, as
    for any model that cannot be read, not huggingface_hub's traceback."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    from transformer_lens import loading_from_pretrained

    def offline(*args, **kwargs):  # what huggingface_hub raises offline; no test reaches for the network
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(loading_from_pretrained, "get_pretrained_model_config", offline)
    out = tmp_path / "out"
    refused(capsys, ["run", "--model", name, "--out", str(out), "--heads", "--quiet"],
            f"model {name}: its config cannot be read from the Hugging Face hub (cannot find")
    assert not out.exists()
