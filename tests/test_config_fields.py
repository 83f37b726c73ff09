"""The table of HookedTransformerConfig fields (workers/model/fields.py) against the installed
TransformerLens: every field classified, TransformerLens' defaults and derivations, the parameters it
builds; and how configs route or are refused."""

import dataclasses
import math
import re

import pytest
import torch

from workers.model import fields as cf
from workers.model.fields import ConfigFieldError

transformer_lens = pytest.importorskip("transformer_lens")
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS  # noqa: E402

BASE = dict(n_layers=2, d_model=16, d_head=4, n_ctx=32, d_vocab=50)


def test_every_field_of_the_installed_transformer_lens_is_classified():
    """A new TransformerLens field fails here until the table says what it does to the function."""
    installed = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    assert installed - set(cf.FIELDS) == set(), "fields the table does not classify"
    assert set(cf.FIELDS) - installed == set(), "fields the table lists that TransformerLens no longer has"


def test_defaults_are_transformer_lens_own():
    for f in dataclasses.fields(HookedTransformerConfig):
        if f.default is dataclasses.MISSING:
            assert cf.FIELDS[f.name].default is None, f.name
        elif f.name == "dtype":
            assert f.default == torch.float32 and cf.FIELDS[f.name].default == "float32"
        else:
            assert cf.FIELDS[f.name].default == f.default, f.name
    assert cf.TL_ACTIVATIONS == tuple(SUPPORTED_ACTIVATIONS)
    from workers.compact.layers import ACTIVATIONS

    assert set(cf.COMPACT_ACTIVATIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize("extra", [
    {"attn_only": True},
    {"act_fn": "gelu", "attn_scale": -1.0},
    {"act_fn": "gelu", "n_heads": -1, "d_mlp": None, "d_vocab_out": -1},
    {"act_fn": "silu", "positional_embedding_type": "rotary"},
    {"act_fn": "silu", "positional_embedding_type": "rotary", "rotary_dim": 2, "use_attn_scale": False},
])
def test_resolved_as_transformer_lens_resolves(extra):
    """n_heads, d_mlp, d_vocab_out, rotary_dim and attn_scale (-1 is TransformerLens' sentinel for √d_head)."""
    mine = cf.resolve({**BASE, **extra})
    theirs = HookedTransformerConfig(**BASE, **extra, device="cpu")
    for name in ("n_heads", "d_mlp", "d_vocab_out", "rotary_dim", "attn_scale", "use_attn_scale"):
        if name == "d_mlp" and mine.attn_only:
            continue
        assert getattr(mine, name) == pytest.approx(getattr(theirs, name)), name
    assert math.isfinite(mine.attn_scale) and (mine.attn_scale > 0 or not mine.use_attn_scale)


GRID = [
    {"attn_only": True, "normalization_type": "LN"},
    {"attn_only": True, "normalization_type": "LNPre", "positional_embedding_type": "shortformer"},
    {"act_fn": "gelu", "normalization_type": None},
    {"act_fn": "solu_ln", "normalization_type": "LN"},
    {"act_fn": "solu_ln", "normalization_type": "LNPre"},
    {"act_fn": "gelu", "d_vocab_out": 60},
    {"act_fn": "gelu", "normalization_type": "LN", "final_rms": True},
    {"act_fn": "gelu", "parallel_attn_mlp": True, "positional_embedding_type": "rotary", "rotary_dim": 2},
    {"act_fn": "silu", "gated_mlp": True, "normalization_type": "RMS", "positional_embedding_type": "rotary", "n_key_value_heads": 2},
    {"act_fn": "silu", "gated_mlp": True, "normalization_type": "RMSPre", "n_key_value_heads": 4},
    {"act_fn": "gelu_new", "parallel_attn_mlp": True, "positional_embedding_type": "rotary", "rotary_dim": 2,
     "rotary_adjacent_pairs": True},
    {"act_fn": "gelu", "gated_mlp": True, "normalization_type": "LN", "n_key_value_heads": 1},
    {"act_fn": "relu", "positional_embedding_type": "alibi"},
]


@pytest.mark.parametrize("extra", GRID)
def test_expected_tensors_are_the_parameters_transformer_lens_builds(extra):
    cfg = HookedTransformerConfig(**BASE, **extra, device="meta")
    with torch.device("meta"):
        model = HookedTransformer(cfg, move_to_device=False)
    built = {k: tuple(v.shape) for k, v in model.named_parameters()}
    assert cf.expected_tensors(cf.resolve({**BASE, **extra})) == built


@pytest.mark.parametrize("extra, path, fields", [
    ({"attn_only": True, "normalization_type": "LNPre", "positional_embedding_type": "shortformer"}, "compact", []),
    ({"act_fn": "gelu_new", "attn_scale": -1.0}, "compact", []),
    ({"act_fn": "gelu", "attention_dir": "bidirectional"}, "transformer_lens", ["attention_dir"]),
    ({"act_fn": "gelu", "normalization_type": "RMS"}, "compact", []),
    ({"act_fn": "silu", "gated_mlp": True, "positional_embedding_type": "rotary", "normalization_type": "RMSPre"}, "compact", []),
    ({"act_fn": "gelu", "parallel_attn_mlp": True, "positional_embedding_type": "rotary", "rotary_dim": 2,
      "rotary_adjacent_pairs": True, "rotary_base": 500000}, "compact", []),
    ({"act_fn": "gelu", "n_key_value_heads": 4}, "compact", []),
    ({"act_fn": "gelu", "n_key_value_heads": 1}, "compact", []),
    ({"act_fn": "gelu", "positional_embedding_type": "rotary", "rotary_dim": 3}, "transformer_lens", ["rotary_dim"]),
    ({"act_fn": "gelu", "positional_embedding_type": "rotary", "use_NTK_by_parts_rope": True}, "transformer_lens",
     ["use_NTK_by_parts_rope"]),
    ({"act_fn": "gelu", "final_rms": True}, "transformer_lens", ["final_rms"]),
    ({"act_fn": "solu_ln", "normalization_type": "RMS"}, "transformer_lens", ["act_fn"]),
    ({"act_fn": "solu_ln", "gated_mlp": True}, "transformer_lens", ["act_fn"]),
    ({"act_fn": "relu2"}, "transformer_lens", ["act_fn"]),
    ({"act_fn": "gelu", "d_vocab_out": 60}, "transformer_lens", ["d_vocab_out"]),
    # fields that no forward reads where they appear are not a reason to leave the compact forward
    ({"attn_only": True, "act_fn": "xielu", "rotary_base": 500000, "window_size": 8}, "compact", []),
])
def test_route(extra, path, fields):
    assert cf.route(cf.resolve({**BASE, **extra})) == (path, fields)


@pytest.mark.parametrize("extra, match", [
    ({"act_fn": "gelu", "positional_embedding_type": "rotary", "rotary_scaling_factor": 8.0}, "rotary_scaling_factor 8.0: "
     "TransformerLens' HookedTransformer does not compute it"),
    ({"act_fn": "gelu", "relative_attention_num_buckets": 32}, "relative_attention_num_buckets"),
    ({"act_fn": "gelu", "normalization_type": "BatchNorm"}, "normalization_type 'BatchNorm' is not one of"),
    ({"act_fn": "gelu", "positional_embedding_type": "learned"}, "positional_embedding_type 'learned' is not one of"),
    ({"act_fn": "swish"}, "act_fn 'swish' is not an activation TransformerLens knows"),
    ({"act_fn": "gelu", "n_ctx": 16}, "n_ctx 16 is shorter than the sweep's 24-token sequences"),
    ({"act_fn": "gelu", "n_layers": -2}, "n_layers must be an integer in 1..1024, not -2"),
    ({"act_fn": "gelu", "d_model": 16.5}, "d_model must be an integer"),
    ({"act_fn": "gelu", "eps": float("nan")}, "eps must be a finite number"),
    ({"act_fn": "gelu", "attn_scale": 0.0}, "attn_scale must be positive"),
    ({"act_fn": "gelu", "d_vocab": 10**12}, "d_vocab must be an integer in 6..4194304"),
    ({"act_fn": "gelu", "n_key_value_heads": 3}, "n_key_value_heads 3 does not divide n_heads 4"),
    ({"act_fn": "gelu", "positional_embedding_type": "rotary", "rotary_base": 0}, "rotary_base must be positive"),
    ({"act_fn": "gelu", "colour": "red"}, "config field 'colour' is not a HookedTransformerConfig field"),
])
def test_configs_no_path_scores_are_refused_naming_the_field(extra, match):
    with pytest.raises(ConfigFieldError, match=match):
        cf.route(cf.resolve({**BASE, **extra}))


def header(tensors: dict[str, tuple[list[int], str]]) -> tuple[dict, int]:
    out, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        size = cf.DTYPES.get(dtype, 8) * math.prod(shape)
        out[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return out, offset


def test_check_tensors_names_what_does_not_fit():
    cfg = cf.resolve({**BASE, "attn_only": True})
    expected = cf.expected_tensors(cfg)
    good = {k: (list(v), "F32") for k, v in expected.items()}
    h, size = header(good)
    cf.check_tensors(h, size, expected)
    cases = [
        ({**good, "blocks.1.attn.W_Q": ([4, 16, 5], "F32")}, None,
         "blocks.1.attn.W_Q has shape [4, 16, 5], config.json implies [4, 16, 4]"),
        ({k: v for k, v in good.items() if k != "unembed.b_U"}, None, "lacks unembed.b_U"),
        ({**good, "blocks.0.mlp.W_gate": ([16, 64], "F32")}, None, "holds blocks.0.mlp.W_gate, which config.json's architecture"),
        ({**good, "embed.W_E": ([50, 16], "I64")}, None, "embed.W_E has dtype 'I64', not a float"),
        (good, -4000, "lie outside the file"),  # truncated after its header
    ]
    for tensors, shrink, match in cases:
        h, size = header(tensors)
        with pytest.raises(ConfigFieldError, match=re.escape(match)):
            cf.check_tensors(h, size + (shrink or 0), expected)
    forged, size = header(good)
    forged["embed.W_E"]["data_offsets"][1] += 10**12  # a forged size: far beyond the file
    with pytest.raises(ConfigFieldError, match="lie outside the file"):
        cf.check_tensors(forged, size, expected)
