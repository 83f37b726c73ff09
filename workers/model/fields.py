"""What every HookedTransformerConfig field means for the function that is scored: one table.

Each field is
  * ``SHAPE``: a size, checked for range here and against the safetensors header (``check_tensors``);
  * ``INERT``: cannot change the function of the stored weights (names, devices, initialisation,
    hooks, checkpoint labels, tokenizer flags, how TransformerLens lays out its own computation);
  * ``COMPACT``: the compact forward (workers/compact/forward.py) computes the values in ``compact``; other
    values TransformerLens knows (``known``) send the model to TransformerLens' path;
  * ``TRANSFORMER_LENS``: only TransformerLens' path computes it: any value but the default sends
    the model there;
  * ``REFUSED``: TransformerLens' HookedTransformer ignores it (it is read by other model classes or
    by no forward at all), so no path scores what the value says: any value but the default is refused.
A field whose ``when`` is false for the config is not read by either forward (a rotary base on a
model without rotary embeddings) and counts as inert there.

``resolve`` fills absent fields with TransformerLens' defaults and derives what its
``__post_init__`` derives (n_heads, d_mlp, d_vocab_out, rotary_dim, attn_scale), so both paths read
the same numbers. ``route`` says which path scores a resolved config, or refuses it in one line.
No torch here: the driver reads it before any weights exist. tests/test_config_fields.py fails
when the installed TransformerLens has a field this table does not classify, or another default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from workers.layout import FIRST_TOKEN, SEQ_LEN

SHAPE, INERT, COMPACT, TRANSFORMER_LENS, REFUSED = "shape", "inert", "compact", "transformer_lens", "refused"

MAX_VOCAB = 1 << 22  # 4.2 M ids: beyond any tokenizer in use; guards memory against a forged header
MAX_SIZE = 1 << 20  # any other dimension
MAX_LAYERS = 1024

NORMALIZATIONS = ("LN", "LNPre", "RMS", "RMSPre", None)  # what HookedTransformer builds
POSITIONS = ("standard", "shortformer", "rotary", "alibi")
# TransformerLens' SUPPORTED_ACTIVATIONS (the test checks this copy against the installed one)
TL_ACTIVATIONS = ("solu", "solu_ln", "gelu_new", "gelu_fast", "silu", "relu", "gelu", "gelu_pytorch_tanh", "xielu", "relu2")
# the compact forward's (compact/forward.py ACTIVATIONS has one function per name)
COMPACT_ACTIVATIONS = ("relu", "gelu", "silu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "solu", "solu_ln")
# architectures whose blocks HookedTransformer changes by name (post-norm, OLMo's QK norms, GPT-Neo's local layers)
TL_ARCHITECTURES = ("Olmo2ForCausalLM", "Olmo3ForCausalLM", "OlmoeForCausalLM", "GPTNeoForCausalLM")


def _rotary(c) -> bool:
    return c.positional_embedding_type == "rotary"


def _mlp(c) -> bool:
    return not c.attn_only


@dataclass(frozen=True)
class Field:
    role: str
    default: Any
    compact: tuple | Callable[[Any], bool] | None = None  # COMPACT: values the compact forward computes
    known: tuple | None = None  # values TransformerLens accepts, where it is a closed set
    when: Callable[[Any], bool] | None = None  # where the forward reads the field at all

    def computes(self, value) -> bool:
        return self.compact(value) if callable(self.compact) else value in self.compact


FIELDS: dict[str, Field] = {
    # sizes
    "d_model": Field(SHAPE, None), "d_head": Field(SHAPE, None), "n_layers": Field(SHAPE, None),
    "n_ctx": Field(SHAPE, None), "n_heads": Field(SHAPE, -1), "d_mlp": Field(SHAPE, None), "d_vocab": Field(SHAPE, -1),
    "d_vocab_out": Field(SHAPE, -1),  # at least d_vocab; the compact forward unembeds d_vocab columns (``route``)
    "n_key_value_heads": Field(COMPACT, None, compact=lambda v: True),  # keys and values repeated per query head at load
    # the blocks
    "attn_only": Field(COMPACT, False, compact=(True, False)),
    "act_fn": Field(COMPACT, "relu", compact=COMPACT_ACTIVATIONS, known=TL_ACTIVATIONS, when=_mlp),
    "normalization_type": Field(COMPACT, "LN", compact=NORMALIZATIONS, known=NORMALIZATIONS),
    "positional_embedding_type": Field(COMPACT, "standard", compact=("standard", "shortformer", "rotary"),
                                       known=POSITIONS),
    "attention_dir": Field(COMPACT, "causal", compact=("causal",), known=("causal", "bidirectional")),
    "eps": Field(COMPACT, 1e-5, compact=lambda v: True),
    "use_attn_scale": Field(COMPACT, True, compact=(True, False)),
    "attn_scale": Field(COMPACT, -1.0, compact=lambda v: True),  # resolved: √d_head for TransformerLens' -1
    "original_architecture": Field(COMPACT, None, compact=lambda v: v not in TL_ARCHITECTURES),
    "gated_mlp": Field(COMPACT, False, compact=(True, False), when=_mlp),
    "parallel_attn_mlp": Field(COMPACT, False, compact=(True, False), when=_mlp),
    "final_rms": Field(TRANSFORMER_LENS, False),
    "num_experts": Field(TRANSFORMER_LENS, None, when=_mlp),
    "experts_per_token": Field(TRANSFORMER_LENS, None, when=lambda c: _mlp(c) and c.num_experts is not None),
    "norm_topk_prob": Field(TRANSFORMER_LENS, False, when=lambda c: _mlp(c) and c.num_experts is not None),
    "use_qk_norm": Field(TRANSFORMER_LENS, False),
    "clip_qkv": Field(TRANSFORMER_LENS, None),
    "use_logn_attn": Field(TRANSFORMER_LENS, False),
    "train_seq_length": Field(TRANSFORMER_LENS, None, when=lambda c: c.use_logn_attn),
    "use_local_attn": Field(TRANSFORMER_LENS, False),
    "window_size": Field(TRANSFORMER_LENS, None, when=lambda c: c.use_local_attn),
    "attn_types": Field(TRANSFORMER_LENS, None, when=lambda c: c.use_local_attn),
    "scale_attn_by_inverse_layer_idx": Field(TRANSFORMER_LENS, False),
    "post_embedding_ln": Field(TRANSFORMER_LENS, False),
    "use_normalization_before_and_after": Field(TRANSFORMER_LENS, False),
    "attn_scores_soft_cap": Field(TRANSFORMER_LENS, -1.0),
    "output_logits_soft_cap": Field(TRANSFORMER_LENS, -1.0),
    "use_attention_sinks": Field(TRANSFORMER_LENS, False),
    "rotary_dim": Field(COMPACT, None, compact=lambda v: v % 2 == 0, when=_rotary),  # resolved: d_head where unset
    "rotary_base": Field(COMPACT, 10000, compact=lambda v: True, when=_rotary),
    "rotary_base_local": Field(TRANSFORMER_LENS, None, when=lambda c: _rotary(c) and c.use_local_attn),
    "rotary_adjacent_pairs": Field(COMPACT, False, compact=(True, False), when=_rotary),
    "use_dynamic_ntk_rope": Field(TRANSFORMER_LENS, False, when=_rotary),
    "use_NTK_by_parts_rope": Field(TRANSFORMER_LENS, False, when=_rotary),
    **{name: Field(TRANSFORMER_LENS, default, when=lambda c: _rotary(c) and c.use_NTK_by_parts_rope) for name, default in (
        ("NTK_by_parts_low_freq_factor", 1.0), ("NTK_by_parts_high_freq_factor", 4.0), ("NTK_by_parts_factor", 8.0),
        ("NTK_original_ctx_len", 8192))},
    "use_yarn_rope": Field(TRANSFORMER_LENS, False, when=_rotary),
    **{name: Field(TRANSFORMER_LENS, default, when=lambda c: _rotary(c) and c.use_yarn_rope) for name, default in (
        ("yarn_factor", 1.0), ("yarn_attention_factor", 1.0), ("yarn_beta_fast", 32.0), ("yarn_beta_slow", 1.0),
        ("yarn_original_max_position_embeddings", 4096), ("yarn_truncate", True), ("yarn_global_attn_only", False))},
    # HookedTransformer reads none of these, so a value other than the default would go unscored
    "rotary_scaling_factor": Field(REFUSED, 1.0, when=_rotary),
    "relative_attention_max_distance": Field(REFUSED, None),  # T5's encoder-decoder
    "relative_attention_num_buckets": Field(REFUSED, None),
    "load_in_4bit": Field(REFUSED, False),  # quantised weights are not what the checkpoint stores in float
    "quantization_method": Field(REFUSED, None),
    # no bearing on the function of the stored weights
    **{name: Field(INERT, default) for name, default in (
        ("model_name", "custom"), ("device", None), ("dtype", "float32"), ("n_devices", 1), ("seed", None),
        ("init_mode", "gpt2"), ("initializer_range", -1.0), ("init_weights", True), ("n_params", None),
        ("tokenizer_name", None), ("tokenizer_prepends_bos", None), ("default_prepend_bos", True),
        ("trust_remote_code", False), ("from_checkpoint", False), ("checkpoint_index", None),
        ("checkpoint_label_type", None), ("checkpoint_value", None), ("decoder_start_token_id", None),
        ("use_hook_tokens", False), ("use_hook_mlp_in", False), ("use_attn_result", False),
        ("use_split_qkv_input", False), ("use_attn_in", False), ("ungroup_grouped_query_attention", False),
        ("tie_word_embeddings", False),  # the checkpoint stores W_E and W_U both
        ("uses_rms_norm", False), ("layer_norm_folding", False))},  # the bridge's, not HookedTransformer's
}
SECTION = "induction_sweep"  # config.json's own section (bos_token_id, source, training): not a model field


class ConfigFieldError(ValueError):
    """A config that no path scores faithfully, or that is malformed: one line, naming the field."""


def _int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigFieldError(f"{name} must be an integer in {lo}..{hi}, not {value!r}")
    return value


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigFieldError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def resolve(raw: dict) -> SimpleNamespace:
    """config.json's fields (or a HookedTransformerConfig's) with TransformerLens' defaults and
    derivations, checked for type and range; ConfigFieldError for an unknown field or a bad value."""
    unknown = sorted(set(raw) - set(FIELDS) - {SECTION})
    if unknown:
        raise ConfigFieldError(f"config field {unknown[0]!r} is not a HookedTransformerConfig field this tool knows "
                               f"(move notes under {SECTION!r})")
    c = SimpleNamespace(**{name: f.default for name, f in FIELDS.items()})
    c.__dict__.update({k: v for k, v in raw.items() if k != SECTION})
    for name in ("d_model", "d_head", "n_layers", "n_ctx", "d_vocab"):
        if c.__dict__.get(name) is None or c.__dict__.get(name) == -1:
            raise ConfigFieldError(f"config field {name!r} is required")
    _int("n_layers", c.n_layers, 1, MAX_LAYERS)
    _int("d_model", c.d_model, 1, MAX_SIZE)
    _int("d_head", c.d_head, 1, MAX_SIZE)
    if _int("n_ctx", c.n_ctx, 1, 1 << 24) < SEQ_LEN:
        raise ConfigFieldError(f"n_ctx {c.n_ctx} is shorter than the sweep's {SEQ_LEN}-token sequences")
    _int("d_vocab", c.d_vocab, FIRST_TOKEN + 2, MAX_VOCAB)  # at least two ids to draw
    if c.n_heads == -1:  # TransformerLens: d_model // d_head, which must divide
        if c.d_model % c.d_head:
            raise ConfigFieldError(f"n_heads is unset and d_head {c.d_head} does not divide d_model {c.d_model}")
        c.n_heads = c.d_model // c.d_head
    _int("n_heads", c.n_heads, 1, MAX_SIZE)
    for name in ("attn_only", "use_attn_scale", "gated_mlp", "parallel_attn_mlp", "final_rms"):
        if not isinstance(getattr(c, name), bool):
            raise ConfigFieldError(f"{name} must be true or false, not {getattr(c, name)!r}")
    if c.d_mlp is None:
        c.d_mlp = 4 * c.d_model
    if not c.attn_only:
        _int("d_mlp", c.d_mlp, 1, MAX_SIZE)
        if c.act_fn not in TL_ACTIVATIONS:
            raise ConfigFieldError(f"act_fn {c.act_fn!r} is not an activation TransformerLens knows ({', '.join(TL_ACTIVATIONS)})")
    if c.d_vocab_out in (-1, None):
        c.d_vocab_out = c.d_vocab
    _int("d_vocab_out", c.d_vocab_out, c.d_vocab, MAX_VOCAB)
    if c.n_key_value_heads is not None:
        _int("n_key_value_heads", c.n_key_value_heads, 1, c.n_heads)
        if c.n_heads % c.n_key_value_heads:
            raise ConfigFieldError(f"n_key_value_heads {c.n_key_value_heads} does not divide n_heads {c.n_heads}")
    for name in ("normalization_type", "positional_embedding_type", "attention_dir"):
        if getattr(c, name) not in FIELDS[name].known:
            raise ConfigFieldError(f"{name} {getattr(c, name)!r} is not one of "
                                   f"{', '.join(map(repr, FIELDS[name].known))}")
    if _rotary(c) and c.rotary_dim is None:
        c.rotary_dim = c.d_head
    if _rotary(c):
        _int("rotary_dim", c.rotary_dim, 2, c.d_head)
        if _real("rotary_base", c.rotary_base) <= 0:
            raise ConfigFieldError(f"rotary_base must be positive, not {c.rotary_base!r}")
    if _real("eps", c.eps) <= 0:
        raise ConfigFieldError(f"eps must be positive, not {c.eps!r}")
    _real("attn_scale", c.attn_scale)
    if c.use_attn_scale and c.attn_scale == -1.0:  # TransformerLens' sentinel: √d_head
        c.attn_scale = math.sqrt(c.d_head)
    if c.use_attn_scale and not c.attn_scale > 0:
        raise ConfigFieldError(f"attn_scale must be positive, not {c.attn_scale!r}")
    return c


def route(c: SimpleNamespace) -> tuple[str, list[str]]:
    """(``"compact"`` or ``"transformer_lens"``, the fields that send it to TransformerLens) for a
    resolved config; ConfigFieldError naming the first field no path scores."""
    to_tl = []
    for name, f in FIELDS.items():
        value = getattr(c, name)
        if f.role in (SHAPE, INERT) or (f.when is not None and not f.when(c)):
            continue
        if f.role == REFUSED:
            if value != f.default:
                raise ConfigFieldError(f"{name} {value!r}: TransformerLens' HookedTransformer does not compute it, "
                                       "so no path here scores this model as it was trained")
        elif f.role == TRANSFORMER_LENS:
            if value != f.default:
                to_tl.append(name)
        elif not f.computes(value):
            to_tl.append(name)
    if c.d_vocab_out != c.d_vocab:
        to_tl.append("d_vocab_out")
    # SoLU's LayerNorm after the activation is computed as a LayerNorm: not as an RMSNorm, nor inside a
    # gated MLP (where TransformerLens drops the W_in side)
    if not c.attn_only and c.act_fn.endswith("_ln") and (c.gated_mlp or c.normalization_type in ("RMS", "RMSPre")):
        to_tl.append("act_fn")
    return ("transformer_lens" if to_tl else "compact"), to_tl


def expected_tensors(c: SimpleNamespace) -> dict[str, tuple[int, ...]] | None:
    """The parameters HookedTransformer holds for a resolved config, by name and shape; None for the
    architectures whose extra modules this does not list (mixtures of experts, QK norms, sinks, post-norm
    and post-embedding norms: checked by building the model instead)."""
    if (c.num_experts or c.use_qk_norm or c.use_attention_sinks or c.use_normalization_before_and_after
            or c.post_embedding_ln or c.original_architecture in TL_ARCHITECTURES[:3]):
        return None
    D, H, E, V = c.d_model, c.n_heads, c.d_head, c.d_vocab
    kv = c.n_key_value_heads
    norm = {"LN": ("w", "b"), "RMS": ("w",)}.get(c.normalization_type, ())
    out: dict[str, tuple[int, ...]] = {"embed.W_E": (V, D)}
    if not _rotary(c):
        out["pos_embed.W_pos"] = (c.n_ctx, D)
    for i in range(c.n_layers):
        p = f"blocks.{i}."
        out.update({f"{p}ln1.{x}": (D,) for x in norm})
        out.update({f"{p}attn.W_Q": (H, D, E), f"{p}attn.W_O": (H, E, D), f"{p}attn.b_Q": (H, E), f"{p}attn.b_O": (D,)})
        k = "_" if kv is not None else ""
        for m in "KV":
            out[f"{p}attn.{k}W_{m}"] = (kv or H, D, E)
            out[f"{p}attn.{k}b_{m}"] = (kv or H, E)
        if not c.attn_only:
            out.update({f"{p}ln2.{x}": (D,) for x in norm})
            out.update({f"{p}mlp.W_in": (D, c.d_mlp), f"{p}mlp.b_in": (c.d_mlp,), f"{p}mlp.W_out": (c.d_mlp, D),
                        f"{p}mlp.b_out": (D,)})
            if c.gated_mlp:
                out[f"{p}mlp.W_gate"] = (D, c.d_mlp)
            if c.act_fn.endswith("_ln") and c.normalization_type == "LN":
                out.update({f"{p}mlp.ln.w": (c.d_mlp,), f"{p}mlp.ln.b": (c.d_mlp,)})
    final = ("w",) if c.final_rms and c.normalization_type == "LN" else norm
    out.update({f"ln_final.{x}": (D,) for x in final})
    out.update({"unembed.W_U": (D, c.d_vocab_out), "unembed.b_U": (c.d_vocab_out,)})
    return out


BUFFERS = ("IGNORE", "mask", "rotary_sin", "rotary_cos")  # recomputed by HookedTransformer; a checkpoint may hold them
DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # floating weights HookedTransformer loads


def check_tensors(header: dict, data_bytes: int, expected: dict[str, tuple[int, ...]]) -> None:
    """A safetensors header against the parameters ``expected`` and the bytes that follow the header:
    every parameter present, of its shape and a floating dtype, no other parameter, every tensor's
    bytes inside the file; ConfigFieldError naming the first that is not."""
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, entry in tensors.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or len(entry.get("data_offsets", ())) != 2:
            raise ConfigFieldError(f"model.safetensors: entry {name!r} is malformed")
        begin, end = entry["data_offsets"]
        size = DTYPES.get(entry.get("dtype"), 0) * math.prod(entry["shape"])
        if entry.get("dtype") not in DTYPES and not name.endswith(BUFFERS):
            raise ConfigFieldError(f"model.safetensors: {name} has dtype {entry.get('dtype')!r}, not a float "
                                   f"({', '.join(DTYPES)})")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_bytes):
            raise ConfigFieldError(f"model.safetensors: {name}'s bytes {begin}..{end} lie outside the file's "
                                   f"{data_bytes} (truncated or forged)")
        if entry.get("dtype") in DTYPES and end - begin != size:
            raise ConfigFieldError(f"model.safetensors: {name} holds {end - begin} bytes, its shape needs {size}")
    for name, shape in expected.items():
        if name not in tensors:
            raise ConfigFieldError(f"model.safetensors lacks {name} (shape {list(shape)}), which config.json implies")
        if tuple(tensors[name]["shape"]) != shape:
            raise ConfigFieldError(f"model.safetensors: {name} has shape {tensors[name]['shape']}, config.json implies "
                                   f"{list(shape)}")
    extra = sorted(k for k in tensors if k not in expected and not k.endswith(BUFFERS))
    if extra:
        raise ConfigFieldError(f"model.safetensors holds {extra[0]}, which config.json's architecture has no place for "
                               "(it would be ignored)")
