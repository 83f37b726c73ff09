"""Every TransformerLens call of the project: loading a HookedTransformer processed as asked and
checked against its stored weights, the float64 reference the scorers are proven against,
exporting checkpoints, and random models for tests and benches. Moving to TransformerLens 4's
TransformerBridge is a change to this one module.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workers.model.folds import (
    CENTRE_WRITES,
    CompactWeights,
    centre_residual_writes,
    compact_weights,
    effective_unembedding,
    load_weights,
    step_effects,
)
from workers.model.source import (
    FLOAT64_PARAMETERS,
    TOKENIZER_FILES,
    ModelInputError,
    _as_input_error,
    _hooked_transformer,
    checkpoint_config,
    checkpoint_dir,
    checkpoint_tokenizer,
    default_bos,
    is_hub_name,
    parameter_count,
    resolved,
    unknown_model,
)

# max |Δ log-prob| between the processed model and the weights as stored: 1e-4, plus float32's resolution of
# the largest |log-prob| (TransformerLens processes weights in float32 whatever their dtype)
CHECK_TOLERANCE = 1e-4


CHECK_RELATIVE = 2e-6


def processing_steps(cfg, processing: str = "exact") -> dict[str, bool]:
    """TransformerLens' processing flags for ``cfg``: its defaults (``tl-default``, how the post
    loaded its model), or (``exact``) the same without the two steps that assume positions write to
    the residual stream, for shortformer models, whose positions enter queries and keys after the
    LayerNorm (TransformerLens PR #204): centring W_pos, and folding LayerNorm weights into W_Q and
    W_K (the positions would be scaled too). The load-time check catches any other such step."""
    steps = {"fold_ln": cfg.normalization_type in ("LN", "RMS"), "center_writing_weights": True,
             "center_unembed": True, "fold_value_biases": True, CENTRE_WRITES: False}
    if processing == "exact" and cfg.positional_embedding_type == "shortformer":
        steps["fold_ln"] = steps["center_writing_weights"] = False
        steps[CENTRE_WRITES] = cfg.normalization_type in ("LN", "LNPre")  # the rest of the centring, W_pos left alone
    return steps


def load_processed(build, cfg, name: str, processing: str, device: str | torch.device):
    """``build(steps)`` with ``processing``'s steps, checked against ``build`` with none on 32 random
    sequences. Exact processing over CHECK_TOLERANCE is a ModelInputError naming the step that
    changes the function; TransformerLens' defaults are kept whatever the check says, and recorded.
    The model carries the effective unembedding of its stored weights (neighbours) and the steps that
    changed them."""
    steps = processing_steps(cfg, processing)
    model = build(steps, torch.float32, device)
    # the check in float64 on the CPU (where affordable): float32's own rounding of large logits is not a change
    exact = torch.float64 if parameter_count(cfg) <= FLOAT64_PARAMETERS else torch.float32
    raw = build(dict.fromkeys(steps, False), exact, "cpu")  # the weights as stored
    tokens = torch.randint(0, cfg.d_vocab, (32, min(24, cfg.n_ctx)), generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        stored = raw(tokens).log_softmax(-1)
    tolerance = CHECK_TOLERANCE + CHECK_RELATIVE * float(stored.abs().max())

    @torch.no_grad()
    def diff(a) -> float:
        return float((a(tokens).log_softmax(-1) - stored).abs().max())

    found = diff(build(steps, exact, "cpu"))
    if processing == "exact" and found > tolerance:
        applied = [s for s in steps if steps[s]]
        worst = max(applied, key=lambda s: diff(build({k: k == s for k in steps}, exact, "cpu")))
        raise ModelInputError(f"{name}: TransformerLens' {worst} changes this model's function (max |Δ log-prob| "
                              f"{found:.2g} > {tolerance:.2g} against the stored weights)")
    stored = raw.state_dict()
    effects = step_effects(stored, resolved(cfg))
    model.induction_sweep_unembedding = effective_unembedding(stored)
    model.induction_sweep_loading = {"loader": "transformer_lens", "processing": processing,
                                     "steps": [s for s in steps if steps[s] and effects[s]],
                                     "max_abs_diff_log_prob": found, "tolerance": tolerance,
                                     "checked_in": str(exact).removeprefix("torch.")}
    return model


def load_for_scoring(spec: str, device: str | torch.device, processing: str = "exact") -> tuple[Any, dict]:
    """What a scorer needs, and how it was loaded. Where the compact forward computes the model: its
    weights, float32 on the host (the scorer puts its own copies on ``device``, in the precision's
    dtype), read from the checkpoint directly under ``exact`` processing (no TransformerLens import),
    else from TransformerLens' model loaded on the host. Otherwise TransformerLens' model on ``device``."""
    weights = load_weights(spec, "cpu") if processing == "exact" else None
    if weights is not None:
        return weights, weights.loading
    model = load_model(spec, "cpu", processing)
    weights = compact_weights(model)
    if weights is None:
        return model.to(device), model.induction_sweep_loading
    weights.unembedding, weights.loading = model.induction_sweep_unembedding, model.induction_sweep_loading
    return weights, weights.loading


def unembedding_of(model) -> Float[Tensor, "d_model vocab"]:
    """The effective unembedding of what ``load_for_scoring`` returned (``effective_unembedding``)."""
    return model.unembedding if isinstance(model, CompactWeights) else model.induction_sweep_unembedding


def load_model(spec: str, device: str | torch.device = "cpu", processing: str = "exact"):
    """Load a HookedTransformer in eval mode on ``device``, processed as ``processing`` says and
    checked against its weights as stored (``model.induction_sweep_loading`` records both);
    ModelInputError for a bad spec."""
    build, cfg, name = _builder(spec)
    model = load_processed(build, cfg, name, processing, device)
    model.cfg.model_name = name
    return model


def reference_model(spec: str, processing: str = "exact", dtype: torch.dtype = torch.float64):
    """TransformerLens' model of ``spec`` on the CPU in ``dtype``, from its stored weights: unprocessed
    (``exact``: the function that was trained), or with TransformerLens' defaults (``tl-default``: the
    function that run means to score). What the load-time check compares every scorer with."""
    build, cfg, _ = _builder(spec)
    steps = processing_steps(cfg, processing) if processing == "tl-default" else dict.fromkeys(processing_steps(cfg), False)
    return build(steps, dtype, "cpu")


def _builder(spec: str):
    """(``build(steps, dtype, device)`` → a HookedTransformer of ``spec`` processed by ``steps``, its
    config, its name)."""
    with checkpoint_dir(spec) as directory:
        if directory is not None:
            return _checkpoint_builder(directory, spec)
    if not is_hub_name(spec):
        raise ModelInputError(unknown_model(spec))
    HookedTransformer, _ = _hooked_transformer()
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    def build(steps: dict, dtype: torch.dtype, device: str | torch.device):
        tl_steps = {k: v for k, v in steps.items() if k != CENTRE_WRITES}
        model = HookedTransformer.from_pretrained(spec, device=str(device), dtype=dtype, **tl_steps).eval()
        if steps[CENTRE_WRITES]:
            model.load_state_dict(centre_residual_writes(model.state_dict(), include_pos=False))
        return model

    return build, resolved(get_pretrained_model_config(spec)), spec


def _checkpoint_builder(directory: Path, name: str):
    """HookedTransformer(cfg) + load_and_process_state_dict from a checkpoint directory (read once)."""
    HookedTransformer, HookedTransformerConfig = _hooked_transformer()
    checkpoint = checkpoint_config(directory, name)
    tokenizer = checkpoint_tokenizer(directory, name)
    fields = {k: v for k, v in checkpoint.fields.items() if k not in ("device", "dtype", "n_params")}
    if tokenizer is None:
        fields["tokenizer_name"] = None  # a checkpoint never reaches for the hub
    with _as_input_error(name):
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))

    def build(steps: dict, dtype: torch.dtype, device: str | torch.device):  # processing changes config and tensors: fresh ones
        with _as_input_error(name):
            model = HookedTransformer(HookedTransformerConfig(**fields, device=str(device), dtype=dtype), tokenizer=tokenizer,
                                      move_to_device=False)
            stored = {k: v.to(dtype, copy=True) for k, v in state.items()}
            if steps[CENTRE_WRITES]:
                stored = centre_residual_writes(stored, include_pos=False)
            model.load_and_process_state_dict(stored,
                                              **{k: v for k, v in steps.items() if k != CENTRE_WRITES})
            model = model.to(device, print_details=False).eval()
        model.cfg.model_name = name
        model.induction_sweep_extra = checkpoint.extra  # e.g. bos_token_id
        return model

    return build, checkpoint.cfg, name


def export_model(model, directory: str) -> None:
    """Write ``model`` (processed weights) as a checkpoint directory, local or ``s3://``."""
    from safetensors.torch import save

    cfg = {}
    for key, value in model.cfg.to_dict().items():
        if key in ("device", "dtype", "n_params"):
            continue
        try:
            json.dumps(value)
        except TypeError:
            continue
        cfg[key] = value
    cfg["induction_sweep"] = {"bos_token_id": bos_id(model), "source": model.cfg.model_name}
    files = {
        "config.json": (json.dumps(cfg, indent=2) + "\n").encode(),
        "model.safetensors": save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}),
    }
    if model.tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            model.tokenizer.save_pretrained(tmp)
            files.update({p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.name in TOKENIZER_FILES})
    from storage import open_store

    store = open_store(directory)
    for name, data in files.items():
        store.put(name, data)


def bos_id(model) -> int:
    return default_bos(model.cfg.model_name, model.tokenizer, getattr(model, "induction_sweep_extra", {}))


def d_vocab(model) -> int:
    return int(model.cfg.d_vocab)


@torch.no_grad()
def full_logits(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
    """TransformerLens' own full forward: the reference every fast path is checked against."""
    return model(tokens)


@torch.no_grad()
def last_logits(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch vocab"]:
    """TransformerLens path for any architecture: all layers, then only the last position unembedded."""
    resid = model(tokens, stop_at_layer=model.cfg.n_layers)
    return model.unembed(model.ln_final(resid[:, -1:]))[:, 0]


def random_model(d_vocab: int = 48262, device: str | torch.device = "cpu", seed: int = 0, perturb: bool = True,
                 **overrides):
    """A randomly initialised model of attn-only-2l's shape (or overridden), default-processed.

    ``perturb`` gives the biases and LayerNorm weights random values too (init leaves them 0 and 1),
    so that checks against it exercise every term of the forward.
    """
    HookedTransformer, HookedTransformerConfig = _hooked_transformer()
    shape = dict(
        n_layers=2, d_model=512, n_heads=8, d_head=64, n_ctx=2048, attn_only=True, act_fn=None,
        normalization_type="LN", positional_embedding_type="shortformer", seed=seed,
    )
    shape.update(overrides)
    cfg = HookedTransformerConfig(d_vocab=d_vocab, device=str(device), **shape)
    model = HookedTransformer(cfg, move_to_device=False)
    state = model.state_dict()
    if perturb:
        gen = torch.Generator().manual_seed(seed)
        for key, value in state.items():
            if ".b_" in key or key.startswith("b_") or ".ln" in key or key.startswith("ln_final"):
                state[key] = value + 0.1 * torch.randn(value.shape, generator=gen)
    model.load_and_process_state_dict(state)
    model.cfg.model_name = f"random-{shape['n_layers']}l-v{d_vocab}"
    return model.to(device, print_details=False).eval()
