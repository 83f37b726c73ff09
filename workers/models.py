"""Loading, exporting and reading models. Every TransformerLens call of the project lives here,
so that moving to TransformerLens 4's TransformerBridge is a change to this one module.

A model spec is one of
  * ``toy-2l`` — the bundled checkpoint in ``workers/toy_2l`` (trained by ``workers/train_toy.py``);
  * a local checkpoint directory or an ``s3://`` one: ``config.json`` (HookedTransformerConfig
    fields, plus an optional ``induction_sweep`` section) + ``model.safetensors`` + optional
    tokenizer files;
  * a TransformerLens model name (``attn-only-2l``, ``gpt2-small``...), loaded from the hub.
All are loaded with TransformerLens' default processing (LayerNorm folded, writing weights and
unembedding centred, value biases folded), as ``from_pretrained`` does.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workers.sequences import FIRST_TOKEN

TOY_MODEL = "toy-2l"
TOY_DIR = Path(__file__).with_name("toy_2l")
CHECKPOINT_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
DEFAULT_PAIR = (" Fab", "ien")  # the seed post's fixed pair
FALLBACK_PAIR = (1000, 1500)  # ids used where the tokenizer lacks those strings (or there is none)
DEFAULT_BOS = 1  # the attn-only-Nl models' BOS id


class ModelInputError(ValueError):
    """A model spec or token that cannot be used: reported as bad input (exit 2)."""


def _hooked_transformer():
    import warnings

    warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer, HookedTransformerConfig


def is_hub_name(spec: str) -> bool:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(spec)
        return True
    except ValueError:
        return False


def load_model(spec: str, device: str | torch.device = "cpu"):
    """Load a HookedTransformer in eval mode on ``device``; ModelInputError for a bad spec."""
    if spec == TOY_MODEL:
        return load_checkpoint(TOY_DIR, device, name=TOY_MODEL)
    if spec.startswith("s3://"):
        from storage import open_store

        store = open_store(spec)
        with tempfile.TemporaryDirectory(prefix="induction-sweep-model-") as tmp:
            for name in CHECKPOINT_FILES + TOKENIZER_FILES:
                if store.exists(name):
                    (Path(tmp) / name).write_bytes(store.get(name))
            return load_checkpoint(Path(tmp), device, name=spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_checkpoint(path, device, name=spec)
    if is_hub_name(spec):
        HookedTransformer, _ = _hooked_transformer()
        model = HookedTransformer.from_pretrained(spec, device=str(device))
        model.eval()
        model.cfg.model_name = spec
        return model
    raise ModelInputError(
        f"unknown model {spec!r}: not {TOY_MODEL}, not a checkpoint directory, not a TransformerLens model name"
    )


def load_checkpoint(directory: Path, device: str | torch.device, name: Optional[str] = None):
    """HookedTransformer(cfg) + load_and_process_state_dict from a checkpoint directory."""
    HookedTransformer, HookedTransformerConfig = _hooked_transformer()
    missing = [f for f in CHECKPOINT_FILES if not (directory / f).is_file()]
    if missing:
        raise ModelInputError(f"checkpoint {name or directory} lacks {', '.join(missing)}")
    try:
        raw = json.loads((directory / "config.json").read_text())
        fields = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
        cfg_dict = {k: v for k, v in raw.items() if k in fields and k not in ("device", "dtype", "n_params")}
        tokenizer = None
        if any((directory / f).is_file() for f in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        else:
            cfg_dict["tokenizer_name"] = None  # a checkpoint never reaches for the hub
        cfg = HookedTransformerConfig(**cfg_dict, device=str(device))
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        model.load_and_process_state_dict(state, fold_ln=cfg.normalization_type in ("LN", "RMS"))
    except ModelInputError:
        raise
    except Exception as exc:  # corrupt JSON, safetensors or state dict
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelInputError(f"checkpoint {name or directory} cannot be loaded: {reason[:200]}") from None
    model.to(device, print_details=False)
    model.eval()
    model.cfg.model_name = name or str(directory)
    model.induction_sweep_extra = raw.get("induction_sweep", {})  # e.g. bos_token_id
    return model


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
    extra = getattr(model, "induction_sweep_extra", {})
    if "bos_token_id" in extra:
        return int(extra["bos_token_id"])
    if model.tokenizer is not None and model.tokenizer.bos_token_id is not None:
        return int(model.tokenizer.bos_token_id)
    return DEFAULT_BOS


def d_vocab(model) -> int:
    return int(model.cfg.d_vocab)


def token_strings(model) -> list[str]:
    """Printable string of every id: the tokenizer's, or ``#<id>`` where there is none."""
    if model.tokenizer is None:
        return [f"#{i}" for i in range(d_vocab(model))]
    return model.tokenizer.batch_decode([[i] for i in range(d_vocab(model))])


def resolve_token(model, text: str | int, option: str) -> int:
    """An id from an integer (``123`` or ``#123``) or a string that is exactly one token."""
    text = str(text)
    digits = text[1:] if text.startswith("#") else text
    if digits.isdigit():
        token = int(digits)
    elif model.tokenizer is None:
        raise ModelInputError(f"{option} {text!r}: model {model.cfg.model_name} has no tokenizer; give an integer id")
    else:
        ids = model.tokenizer.encode(text, add_special_tokens=False)
        unknown = model.tokenizer.unk_token_id
        if len(ids) == 1 and ids[0] == unknown and text != model.tokenizer.unk_token:
            raise ModelInputError(f"{option} {text!r} is not a token of {model.cfg.model_name} (it encodes to the unknown token)")
        if len(ids) != 1:
            raise ModelInputError(f"{option} {text!r} is not a single token of {model.cfg.model_name} ({len(ids)} tokens)")
        token = ids[0]
    if not FIRST_TOKEN <= token < d_vocab(model):
        raise ModelInputError(f"{option} {text!r}: id {token} outside {FIRST_TOKEN}..{d_vocab(model) - 1}")
    return token


def default_pair(model) -> tuple[int, int]:
    """The post's (" Fab", "ien") where both are single tokens, else FALLBACK_PAIR."""
    try:
        return tuple(resolve_token(model, s, "pair") for s in DEFAULT_PAIR)  # type: ignore[return-value]
    except ModelInputError:
        return FALLBACK_PAIR


def unembedding(model) -> Float[Tensor, "d_model vocab"]:
    """The processed W_U (final LayerNorm folded in, centred across the vocabulary)."""
    return model.W_U.detach()


@torch.no_grad()
def full_logits(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
    """TransformerLens' own full forward: the reference every fast path is checked against."""
    return model(tokens)


@torch.no_grad()
def last_logits(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch vocab"]:
    """TransformerLens path for any architecture: all layers, then only the last position unembedded."""
    resid = model(tokens, stop_at_layer=model.cfg.n_layers)
    return model.unembed(model.ln_final(resid[:, -1:]))[:, 0]


@dataclass
class AttnOnlyWeights:
    """A processed attention-only model's weights, as plain tensors (see workers/fast.py)."""

    W_E: Float[Tensor, "vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"]
    W_Q: list[Float[Tensor, "heads d_model d_head"]]
    W_K: list[Float[Tensor, "heads d_model d_head"]]
    W_V: list[Float[Tensor, "heads d_model d_head"]]
    W_O: list[Float[Tensor, "heads d_head d_model"]]
    b_Q: list[Float[Tensor, "heads d_head"]]
    b_K: list[Float[Tensor, "heads d_head"]]
    b_V: list[Float[Tensor, "heads d_head"]]
    b_O: list[Float[Tensor, "d_model"]]
    W_U: Float[Tensor, "d_model vocab"]
    b_U: Float[Tensor, "vocab"]
    shortformer: bool  # positions enter queries and keys only, not the residual stream
    layer_norm: bool  # LNPre (centre + scale) before each layer and the unembedding
    eps: float
    attn_scale: float


def attn_only_weights(model) -> Optional[AttnOnlyWeights]:
    """Weights for the compact forward, or None where the architecture needs TransformerLens' path."""
    cfg = model.cfg
    supported = (
        cfg.attn_only
        and cfg.normalization_type in ("LNPre", None)
        and cfg.positional_embedding_type in ("standard", "shortformer")
        and not cfg.final_rms
        and cfg.n_key_value_heads in (None, cfg.n_heads)
        and not cfg.use_local_attn
        and not cfg.use_qk_norm
        and not cfg.use_attn_in
        and not cfg.use_split_qkv_input
        and not cfg.use_normalization_before_and_after
        and not cfg.post_embedding_ln
        and not cfg.attn_scores_soft_cap > 0
        and not cfg.output_logits_soft_cap > 0
        and not cfg.use_logn_attn
        and not cfg.scale_attn_by_inverse_layer_idx
        and not cfg.use_attention_sinks
        and cfg.original_architecture not in ("GPTNeoForCausalLM",)  # local attention layers
        and getattr(cfg, "d_vocab_out", cfg.d_vocab) == cfg.d_vocab
    )
    if not supported:
        return None
    blocks = [block.attn for block in model.blocks]

    def per_layer(name: str) -> list[Tensor]:
        return [getattr(attn, name).detach() for attn in blocks]

    return AttnOnlyWeights(
        W_E=model.W_E.detach(),
        W_pos=model.W_pos.detach(),
        W_Q=per_layer("W_Q"),
        W_K=per_layer("W_K"),
        W_V=per_layer("W_V"),
        W_O=per_layer("W_O"),
        b_Q=per_layer("b_Q"),
        b_K=per_layer("b_K"),
        b_V=per_layer("b_V"),
        b_O=per_layer("b_O"),
        W_U=model.W_U.detach(),
        b_U=model.b_U.detach(),
        shortformer=cfg.positional_embedding_type == "shortformer",
        layer_norm=cfg.normalization_type == "LNPre",
        eps=float(cfg.eps),
        attn_scale=float(cfg.attn_scale) if cfg.use_attn_scale else 1.0,
    )


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
