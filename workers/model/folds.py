"""The compact forward's weights (``CompactWeights``): read straight from a checkpoint's
safetensors, or from a HookedTransformer, with exact folds only — LayerNorm and RMSNorm weights
into the products that read them, value biases into b_O, the residual stream's writes centred where
a LayerNorm reads every one of them — and grouped-query attention's keys and values repeated per
query head.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from jaxtyping import Float
from torch import Tensor

from workers.layout import SEQ_LEN
from workers.model.source import checkpoint_config, checkpoint_dir, compact_supported, resolved

CENTRE_WRITES = "center_residual_writes"  # our step: TransformerLens' centring without a shortformer's W_pos


WRITES = (".attn.W_O", ".attn.b_O", ".mlp.W_out", ".mlp.b_out")  # with embed.W_E: what writes to the residual stream


def centre_residual_writes(state: dict[str, Tensor], include_pos: bool) -> dict[str, Tensor]:
    """Every weight that writes to the residual stream (W_E, W_O and b_O, W_out and b_out, and W_pos
    where positions write there) centred across d_model: exact where every reader of the residual
    stream is a LayerNorm, and it keeps bf16 roundings small (no large common mean for the LayerNorm
    to cancel). A shortformer's W_pos is left alone: it feeds queries and keys after the LayerNorm."""
    keys = [k for k in state if k == "embed.W_E" or k.endswith(WRITES) or (include_pos and k == "pos_embed.W_pos")]
    return {**state, **{k: state[k] - state[k].mean(-1, keepdim=True) for k in keys}}


def effective_unembedding(state: dict[str, Tensor]) -> Float[Tensor, "d_model vocab"]:
    """W_U as the model reads its normalised residual stream: the final LayerNorm's (or RMSNorm's)
    weight folded in, W_U as stored where there is none. Neighbours are found among its columns
    (docs/DESIGN.md §1), from the stored weights whatever the loader or its processing."""
    W_U = state["unembed.W_U"].detach().float()
    return state["ln_final.w"].detach().float()[:, None] * W_U if "ln_final.w" in state else W_U


def step_effects(state: dict[str, Tensor], cfg) -> dict[str, bool]:
    """Which processing steps would change these stored weights (TransformerLens' and ours): a step
    that finds nothing to do is not one the manifest lists."""

    def off(t: Tensor, centre: Tensor | float) -> bool:  # beyond float32 noise of ``centre``
        return bool((t.float() - centre).abs().max() > 1e-6 * max(float(t.abs().max()), 1.0))

    def uncentred(keys: list[str], dim: int = -1) -> bool:
        return any(off(state[k].mean(dim), 0.0) for k in keys)

    norms = [k for k in state if re.search(r"(^|\.)ln(1|2|_final)?\.[wb]$|\.mlp\.ln\.[wb]$", k)]
    affine = any(off(state[k], 1.0 if k.endswith(".w") else 0.0) for k in norms)
    writes = [k for k in state if k == "embed.W_E" or k.endswith(WRITES)]
    pos = ["pos_embed.W_pos"] if "pos_embed.W_pos" in state else []
    under_ln = cfg.normalization_type in ("LN", "LNPre")
    return {"fold_ln": cfg.normalization_type in ("LN", "RMS") and affine,
            "center_writing_weights": under_ln and not cfg.final_rms and uncentred(writes + pos),
            CENTRE_WRITES: under_ln and uncentred(writes),
            "center_unembed": uncentred(["unembed.W_U"]),
            "fold_value_biases": any(off(state[k], 0.0) for k in state if k.endswith(("attn.b_V", "attn._b_V")))}


def load_weights(spec: str, device: str | torch.device = "cpu") -> CompactWeights | None:
    """The compact forward's weights read straight from a checkpoint, without TransformerLens, for
    the architectures it computes (``config_fields.route``). Exact steps only: under a LayerNorm the
    residual stream's writes are centred (``centre_residual_writes``), then ``weights_from_state``
    folds LayerNorm and RMSNorm weights (positions unscaled) and value biases, and repeats grouped
    keys and values per query head. None where the model needs TransformerLens' loading (hub names,
    other architectures)."""
    with checkpoint_dir(spec) as directory:
        if directory is None:
            return None
        cfg = checkpoint_config(directory, spec).cfg  # config.json only: no tokenizer, no transformers import
        if not compact_supported(cfg):
            return None
        from safetensors.torch import load_file

        # folded in float32 whatever the stored dtype: a fold in bf16 would round every product once more
        state = {k: v.float() if v.is_floating_point() else v
                 for k, v in load_file(str(directory / "model.safetensors"), device=str(device)).items()}
    effects = step_effects(state, cfg)
    if cfg.normalization_type in ("LN", "LNPre"):
        state_centred = centre_residual_writes(state, include_pos=cfg.positional_embedding_type != "shortformer")
    else:
        state_centred = state
    weights = weights_from_state(state_centred, cfg)
    weights.unembedding = effective_unembedding(state)
    steps = [s for s, on in ((CENTRE_WRITES, effects[CENTRE_WRITES]), ("fold_ln", effects["fold_ln"]),
                             ("fold_value_biases", effects["fold_value_biases"])) if on]
    weights.loading = {"loader": "safetensors", "processing": "exact", "steps": steps,
                       "exact_because": "a LayerNorm removes the residual stream's mean; a LayerNorm's or RMSNorm's "
                                        "weights fold into what reads its output (a shortformer's positions unscaled); "
                                        "attention rows sum to 1"}
    return weights


@dataclass
class CompactWeights:
    """A model's weights with its LayerNorms' weights folded in, as plain tensors (see
    workers/compact/forward.py); ``layer_norm``: a LayerNorm without weights (LNPre) before each attention,
    MLP and the unembedding. Attention-only models have no MLP weights (empty lists)."""

    W_E: Float[Tensor, "vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"]
    W_Q: list[Float[Tensor, "heads d_model d_head"]]
    W_K: list[Float[Tensor, "heads d_model d_head"]]
    W_V: list[Float[Tensor, "heads d_model d_head"]]
    W_O: list[Float[Tensor, "heads d_head d_model"]]
    b_Q: list[Float[Tensor, "heads d_head"]]
    b_K: list[Float[Tensor, "heads d_head"]]
    b_V: list[Float[Tensor, "heads d_head"]]
    b_O: list[Float[Tensor, " d_model"]]
    W_U: Float[Tensor, "d_model vocab"]
    b_U: Float[Tensor, " vocab"]
    W_Q_pos: list[Float[Tensor, "heads d_model d_head"]]  # what a shortformer's positions meet: W_Q before any fold
    W_K_pos: list[Float[Tensor, "heads d_model d_head"]]
    shortformer: bool  # positions enter queries and keys only, not the residual stream
    layer_norm: bool  # a normalisation without weights before each layer and the unembedding: LNPre, or RMSPre with ``rms``
    eps: float
    attn_scale: float
    W_in: list[Float[Tensor, "d_model d_mlp"]] = dataclasses.field(default_factory=list)
    b_in: list[Float[Tensor, " d_mlp"]] = dataclasses.field(default_factory=list)
    W_out: list[Float[Tensor, "d_mlp d_model"]] = dataclasses.field(default_factory=list)
    b_out: list[Float[Tensor, " d_model"]] = dataclasses.field(default_factory=list)
    W_gate: list[Float[Tensor, "d_model d_mlp"]] = dataclasses.field(default_factory=list)  # gated MLPs only
    b_gate: list[Float[Tensor, " d_mlp"]] = dataclasses.field(default_factory=list)  # a LayerNorm's bias through W_gate
    b_up: list[Float[Tensor, " d_mlp"]] = dataclasses.field(default_factory=list)  # ... and through W_in, inside the product
    act_fn: str | None = None  # a key of compact.layers.ACTIVATIONS
    mlp_layer_norm: bool = False  # SoLU's LayerNorm after the activation (its weights folded into W_out)
    unembedding: Tensor | None = None  # the stored weights' effective unembedding (``effective_unembedding``)
    loading: dict | None = None  # how they were read (the manifest's model_loading)
    rms: bool = False  # RMSNorm (scale only, no centring) where ``layer_norm`` says a normalisation
    parallel: bool = False  # attention and MLP both read the block's input (Pythia, GPT-J)
    rotary_dim: int = 0  # rotary embeddings of the first rotary_dim dimensions of each query and key; 0: none
    rotary_base: float = 10000.0
    rotary_adjacent_pairs: bool = False  # GPT-J's pairing (2i, 2i+1); else GPT-NeoX's (i, i + rotary_dim/2)


def moved(w: CompactWeights, device: str | torch.device) -> CompactWeights:
    """``w`` with every tensor on ``device``."""
    def to(value):
        if isinstance(value, Tensor):
            return value.to(device)
        return [t.to(device) for t in value] if isinstance(value, list) else value

    return dataclasses.replace(w, **{f.name: to(getattr(w, f.name)) for f in dataclasses.fields(w)})


def compact_weights(model) -> CompactWeights | None:
    """Weights for the compact forward, or None where the architecture needs TransformerLens' path."""
    cfg = resolved(model.cfg)
    if not compact_supported(cfg):
        return None
    return weights_from_state({k: v.detach() for k, v in model.state_dict().items()}, cfg)


def weights_from_state(state: dict[str, Tensor], cfg: SimpleNamespace) -> CompactWeights:
    """A model's weights from its state dict (HookedTransformer's names) and resolved config, with
    exact folds: LayerNorm weights and biases into the projections that read the LayerNorm's output —
    positions, which a shortformer adds after the LayerNorm, keep meeting the unscaled W_Q and W_K
    (TransformerLens' own fold scales them too, so it refuses shortformers) — SoLU's LayerNorm into
    W_out, and value biases into b_O (attention rows sum to 1)."""
    W_Q, W_K, W_V, b_Q, b_K, b_V, W_Q_pos, W_K_pos = ([] for _ in range(8))
    for i in range(cfg.n_layers):
        w = {name: attention_weight(state, f"blocks.{i}.attn.", name, cfg) for name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V")}
        W_Q_pos.append(w["W_Q"])
        W_K_pos.append(w["W_K"])
        if f"blocks.{i}.ln1.w" in state:  # LN(x) = norm(x) * g + c feeds x @ W + b (RMSNorm: no c)
            g, c = state[f"blocks.{i}.ln1.w"], state.get(f"blocks.{i}.ln1.b")
            for m in "QKV":
                if c is not None:
                    w[f"b_{m}"] = w[f"b_{m}"] + torch.einsum("d,hde->he", c, w[f"W_{m}"])
                w[f"W_{m}"] = w[f"W_{m}"] * g[None, :, None]
        for out, name in ((W_Q, "W_Q"), (W_K, "W_K"), (W_V, "W_V"), (b_Q, "b_Q"), (b_K, "b_K"), (b_V, "b_V")):
            out.append(w[name])
    W_O = [state[f"blocks.{i}.attn.W_O"] for i in range(cfg.n_layers)]
    b_O = [state[f"blocks.{i}.attn.b_O"] + torch.einsum("he,hed->d", v, o) for i, (v, o) in enumerate(zip(b_V, W_O))]
    W_U, b_U = fold_layer_norm(state, "ln_final", state["unembed.W_U"], state["unembed.b_U"])
    mlp = {} if cfg.attn_only else mlp_weights(state, cfg)
    rotary = cfg.positional_embedding_type == "rotary"
    # rotary positions act inside attention: nothing is added to the stream (24 rows of zeros keep one forward)
    W_pos = state["embed.W_E"].new_zeros(SEQ_LEN, cfg.d_model) if rotary else state["pos_embed.W_pos"]
    return CompactWeights(
        W_E=state["embed.W_E"], W_pos=W_pos, W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, b_Q=b_Q, b_K=b_K,
        b_V=[torch.zeros_like(b) for b in b_V], b_O=b_O, W_U=W_U, b_U=b_U, W_Q_pos=W_Q_pos, W_K_pos=W_K_pos,
        shortformer=cfg.positional_embedding_type == "shortformer", layer_norm=cfg.normalization_type is not None,
        rms=cfg.normalization_type in ("RMS", "RMSPre"), eps=float(cfg.eps),
        attn_scale=float(cfg.attn_scale) if cfg.use_attn_scale else 1.0, parallel=cfg.parallel_attn_mlp,
        rotary_dim=cfg.rotary_dim if rotary else 0, rotary_base=float(cfg.rotary_base),
        rotary_adjacent_pairs=bool(cfg.rotary_adjacent_pairs), **mlp,
    )


def attention_weight(state: dict[str, Tensor], prefix: str, name: str, cfg) -> Tensor:
    """One attention weight by TransformerLens' name, with grouped-query attention's shared keys and
    values (``_W_K``, ``_b_V``, ... over n_key_value_heads) repeated for the query heads that read
    them, as TransformerLens' GroupedQueryAttention does (repeat_interleave over heads)."""
    if prefix + name in state:
        return state[prefix + name]
    shared = state[f"{prefix}_{name}"]
    return shared.repeat_interleave(cfg.n_heads // shared.shape[0], dim=0)


def fold_layer_norm(state: dict[str, Tensor], prefix: str, W: Float[Tensor, "d n"], b: Float[Tensor, " n"]
                    ) -> tuple[Float[Tensor, "d n"], Float[Tensor, " n"]]:
    """The LayerNorm ``prefix``'s weights folded into the product that reads it:
    LN(x) @ W + b = norm(x) @ (g W) + (c @ W + b); an RMSNorm has no c. Unchanged for LNPre, RMSPre
    or no normalisation."""
    if f"{prefix}.w" not in state:
        return W, b
    c = state.get(f"{prefix}.b")
    return state[f"{prefix}.w"][:, None] * W, b if c is None else b + c @ W


def mlp_weights(state: dict[str, Tensor], cfg) -> dict:
    """Each MLP's weights with ln2 folded into W_in and b_in, and SoLU's LayerNorm (over d_mlp)
    into W_out and b_out. A gated MLP, ``act(x W_gate) * (x W_in) + b_in``, takes ln2's weight into
    W_gate and W_in, and its bias (LN only) into b_gate and b_up, which act inside the product."""
    out: dict = {"W_in": [], "b_in": [], "W_out": [], "b_out": [], "W_gate": [], "b_gate": [], "b_up": [],
                 "act_fn": cfg.act_fn, "mlp_layer_norm": cfg.act_fn.endswith("_ln")}
    for i in range(cfg.n_layers):
        W_in, b_in = state[f"blocks.{i}.mlp.W_in"], state[f"blocks.{i}.mlp.b_in"]
        if cfg.gated_mlp:
            zeros = b_in.new_zeros(b_in.shape)
            W_gate, b_gate = fold_layer_norm(state, f"blocks.{i}.ln2", state[f"blocks.{i}.mlp.W_gate"], zeros)
            W_in, b_up = fold_layer_norm(state, f"blocks.{i}.ln2", W_in, zeros)
            out["W_gate"].append(W_gate)
            out["b_gate"].append(b_gate)
            out["b_up"].append(b_up)
        else:
            W_in, b_in = fold_layer_norm(state, f"blocks.{i}.ln2", W_in, b_in)
        W_out, b_out = fold_layer_norm(state, f"blocks.{i}.mlp.ln", state[f"blocks.{i}.mlp.W_out"],
                                       state[f"blocks.{i}.mlp.b_out"])
        for name, value in (("W_in", W_in), ("b_in", b_in), ("W_out", W_out), ("b_out", b_out)):
            out[name].append(value)
    return out
