"""The Triton attention kernels against torch's own attention, and inside the scorer against
TransformerLens' full forward. Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1,
set in conftest.py), about 10 ms per program: the batches here are small. scripts/bench_lab.py --check
runs them on a GPU against TransformerLens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from tests.helpers import check_parity, seed_style  # noqa: E402
from workers.compact.layers import layer_norm_pre  # noqa: E402
from workers.kernels.attention import causal_attention, last_attention  # noqa: E402
from workers.model import hooked  # noqa: E402
from workers.scoring.scorer import scorer_for  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parent.parent


def torch_causal_attention(qkv, n_heads, d_head, scale):
    batch, n_pos, _ = qkv.shape
    q, k, v = (t.view(batch, n_pos, n_heads, d_head).transpose(1, 2) for t in qkv.double().chunk(3, -1))
    z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / scale)
    return z.transpose(1, 2).reshape(batch * n_pos, -1)


@pytest.mark.parametrize("n_pos,n_heads,d_head", [(24, 3, 24), (5, 2, 16), (17, 1, 40)])
def test_causal_attention_from_a_table_and_from_rows(n_pos, n_heads, d_head):
    """Q/K/V gathered from a per-token table (layer 0) or read from each position's row, plus the
    per-position bias; neither the positions nor d_head need be a power of two."""
    g = torch.Generator().manual_seed(0)
    vocab, width = 50, 3 * n_heads * d_head
    table = torch.randn(vocab, width, generator=g) * 2
    bias = torch.randn(n_pos, width, generator=g)
    tokens = torch.randint(0, vocab, (6, n_pos), generator=g)
    tokens[0] = 7  # one token repeated: ties in every score
    want = torch_causal_attention(table[tokens] + bias, n_heads, d_head, d_head**0.5)
    table, bias, tokens = table.to(DEVICE), bias.to(DEVICE), tokens.to(DEVICE)
    got = causal_attention(table, tokens, bias, True, n_heads, d_head, d_head**0.5)
    assert got.shape == (6 * n_pos, n_heads * d_head) and got.dtype == torch.float32
    assert (got.cpu().double() - want).abs().max() < 1e-5
    rows = table[tokens].flatten(0, 1)
    # (the autotuner may pick other warps for the two: sums in another order)
    assert torch.allclose(causal_attention(rows, tokens, bias, False, n_heads, d_head, d_head**0.5), got, atol=1e-6)



def tf32(t: torch.Tensor, nearest: bool = True) -> torch.Tensor:
    """float32 ``t`` with a 10-bit mantissa, rounded to nearest (ties away) or toward zero."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000 if nearest else bits) & -0x2000).view(torch.float32)


def test_tf32_products_round_their_inputs_to_nearest():
    """The bf16 precision's layer 0 (and tf32's): QKᵀ and PV from inputs rounded to TF32 to nearest,
    which a TF32 tensor core given float32 would truncate instead (a bias, docs/PERFORMANCE.md). Under
    the interpreter the rounding is the kernel's own and the products float32: the same arithmetic."""
    g = torch.Generator().manual_seed(2)
    n_pos, n_heads, d_head, vocab = 24, 2, 32, 40
    table = torch.randn(vocab, 3 * n_heads * d_head, generator=g) * 2
    bias = torch.randn(n_pos, 3 * n_heads * d_head, generator=g)
    tokens = torch.randint(0, vocab, (8, n_pos), generator=g)
    got = causal_attention(table.to(DEVICE), tokens.to(DEVICE), bias.to(DEVICE), True, n_heads, d_head, 4.0, tf32=True).cpu()

    def emulated(nearest):
        q, k, v = (tf32(t, nearest).double().view(8, n_pos, n_heads, d_head).transpose(1, 2)
                   for t in (table[tokens] + bias).chunk(3, -1))
        scores = (q @ k.transpose(-1, -2) / 4).masked_fill(torch.ones(n_pos, n_pos, dtype=torch.bool).triu(1), float("-inf"))
        return (tf32(scores.softmax(-1), nearest).double() @ v).transpose(1, 2).reshape(8 * n_pos, -1)

    exact = causal_attention(table, tokens, bias, True, n_heads, d_head, 4.0).double()
    nearest, truncated = ((got.double() - emulated(rule)).abs() for rule in (True, False))
    # The kernel's softmax is float32, the emulation's float64: a weight within that noise of a TF32
    # boundary may round the other way, off by one TF32 step of that weight times a value.
    v_max = (table[tokens] + bias).chunk(3, -1)[2].abs().max().item()
    assert (nearest > 1e-5).double().mean() < 0.01 and nearest.max() < 2**-10 * v_max
    assert (got.double() - exact).abs().max() > 1e-4  # TF32 did round
    assert (truncated > 1e-5).double().mean() > 0.5  # and not toward zero


@pytest.mark.parametrize("layer_norm", [True, False])
def test_last_attention_matches_torch(layer_norm):
    """The last position's folded attention: each head's pattern over the LayerNorm'd rows and
    their mix, including a head that puts all its weight on one position (a 20-nat lead)."""
    g = torch.Generator().manual_seed(1)
    batch, n_pos, d_model, n_heads = 5, 24, 84, 3  # d_model: 5 chunks of 16 (the interpreter's) and 4 left
    x = torch.randn(batch, n_pos, d_model, generator=g) * 3 + 1
    u = torch.randn(batch, n_heads, d_model, generator=g) / 10
    c = torch.randn(batch, n_heads, n_pos, generator=g)
    c[0, 1, 9] = 80.0  # 20 nats above the rest after the scale
    h = layer_norm_pre(x, 1e-5) if layer_norm else x
    pattern = ((torch.einsum("bpd,bhd->bhp", h.double(), u.double()) + c.double()) / 4).softmax(-1)
    mixed = torch.einsum("bhp,bpd->bhd", pattern, h.double())
    got_mixed, got_pattern = last_attention(x.to(DEVICE), u.to(DEVICE), c.to(DEVICE), layer_norm, 1e-5, 4.0)
    got_mixed = got_mixed.transpose(0, 1)  # heads first, as W_V's product reads it
    assert got_pattern[0, 1, 9] > 1 - 1e-7
    assert (got_pattern.cpu().double() - pattern).abs().max() < 1e-6
    assert (got_mixed.cpu().double() - mixed).abs().max() < 1e-5
    # eps 0 (a model may have it): the padding rows past 24 positions must not bring 0 × inf
    assert torch.isfinite(last_attention(x.to(DEVICE), u.to(DEVICE), c.to(DEVICE), layer_norm, 0.0, 4.0)[0]).all()


def test_last_attention_writes_its_mix_as_w_v_reads_it():
    """The mix heads first, rounded to the projection's dtype in the kernel: the float32 mix's bf16
    rounding to nearest, as torch's cast before W_V's product makes it (and not truncated)."""
    g = torch.Generator().manual_seed(4)
    batch, n_pos, d_model, n_heads = 3, 24, 84, 2
    x, u = torch.randn(batch, n_pos, d_model, generator=g) * 3, torch.randn(batch, n_heads, d_model, generator=g) / 10
    c = torch.randn(batch, n_heads, n_pos, generator=g)
    args = (x.to(DEVICE), u.to(DEVICE), c.to(DEVICE), True, 1e-5, 4.0)
    mixed, pattern = last_attention(*args)
    rounded, same_pattern = last_attention(*args, mixed_dtype=torch.bfloat16)
    assert mixed.shape == rounded.shape == (n_heads, batch, d_model) and rounded.dtype == torch.bfloat16
    assert torch.equal(pattern, same_pattern)
    assert torch.equal(rounded, mixed.to(torch.bfloat16))
    truncated = (mixed.contiguous().view(torch.int32) & -0x10000).view(torch.float32).to(torch.bfloat16)
    assert not torch.equal(rounded, truncated)


@pytest.mark.parametrize("gather", [True, False])
def test_last_attention_adds_up_a_stream_left_as_a_sum(gather):
    """The stream before the last layer as fast.Stream leaves it: the embedding's rows of the tokens
    (or dense rows) + (the layer before's output + its bias), added as the kernel reads them, equal to
    the kernel on the sum written out (and on u laid out back to back)."""
    g = torch.Generator().manual_seed(3)
    batch, n_pos, d_model, n_heads, vocab = 4, 24, 84, 2, 30
    table = torch.randn(vocab, d_model, generator=g) * 2
    tokens = torch.randint(0, vocab, (batch, n_pos), generator=g)
    added, bias = torch.randn(batch, n_pos, d_model, generator=g), torch.randn(d_model, generator=g)
    # u heads first, as W_K^T q comes out of its product: read through its strides
    u, c = torch.randn(n_heads, batch, d_model, generator=g).transpose(0, 1) / 10, torch.randn(batch, n_heads, n_pos, generator=g)
    x = table[tokens] + (added + bias)
    base = dict(x=table, tokens=tokens) if gather else dict(x=table[tokens])
    parts = {k: v.to(DEVICE) for k, v in dict(**base, added=added, bias=bias, u=u, c=c).items()}
    got = last_attention(layer_norm=True, eps=1e-5, scale=4.0, **parts)
    want = last_attention(x.to(DEVICE), u.contiguous().to(DEVICE), c.to(DEVICE), True, 1e-5, 4.0)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    # the parts do count: without the bias the result moves
    parts["bias"] = torch.zeros_like(parts["bias"])
    assert not torch.allclose(last_attention(layer_norm=True, eps=1e-5, scale=4.0, **parts)[0], want[0], atol=1e-3)


# compiled as CUDA runs them: the Triton attention is the default at bf16 (at fp32 the products are)
@pytest.mark.parametrize("precision, compile", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_scorer_with_triton_attention_matches_transformer_lens(toy_model, precision, compile):
    """toy-2l (sharp induction) through the kernels: layer 0 from the table, the last layer folded;
    compiled, they are custom ops inside the graph."""
    check_parity(toy_model, precision, n=12, attention="triton", compile=compile)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [dict(n_layers=3, positional_embedding_type="standard"),
                                   dict(n_layers=2, attn_only=False, d_mlp=256, act_fn="gelu_new",
                                        positional_embedding_type="standard"),
                                   dict(n_layers=1, normalization_type=None),
                                   # rotated queries and keys into the kernel; the last layer through torch
                                   dict(n_layers=2, attn_only=False, d_mlp=256, act_fn="silu", gated_mlp=True,
                                        normalization_type="RMS", positional_embedding_type="rotary", n_key_value_heads=2),
                                   dict(n_layers=2, attn_only=False, d_mlp=256, act_fn="gelu", parallel_attn_mlp=True,
                                        positional_embedding_type="rotary", rotary_dim=4)])
def test_other_shapes_through_triton_attention(shape, precision):
    """Q/K/V from projections (standard positions, a middle layer, MLPs), and no LayerNorm; rotary
    embeddings (llama-like with grouped keys, pythia-like); under bf16 every layer before the last
    takes TF32 products."""
    model = hooked.random_model(d_vocab=512, n_ctx=32, d_model=64, n_heads=4, d_head=16, seed=4, perturb=True, **shape)
    check_parity(model, precision, n=8, attention="triton")


@pytest.mark.parametrize("precision,tf32", [("fp32", False), ("bf16", True)])
def test_bf16_takes_tf32_products_before_the_last_layer(toy_model, monkeypatch, precision, tf32):
    """What the scorer asks of the first kernel: TF32 products under bf16 (docs/PERFORMANCE.md), full
    float32 under fp32 (tf32 reads the CUDA flag, off on a CPU)."""
    import workers.kernels.attention

    asked = []
    real = workers.kernels.attention.causal_attention

    def spy(*args, **kwargs):
        asked.append(kwargs["tf32"])
        return real(*args, **kwargs)

    monkeypatch.setattr(workers.kernels.attention, "causal_attention", spy)
    batch = seed_style(2, toy_model.cfg.d_vocab)
    scorer_for(toy_model, precision, compile=False, attention="triton").logodds(batch.tokens, batch.b[:, None])
    assert asked and set(asked) == {tf32}


def test_heads_trace_is_the_same(toy_model):
    """Per-head output (workers/heads.py) reads the last layer's pattern: the kernel's equals torch's."""
    batch = seed_style(6, toy_model.cfg.d_vocab)
    traces = []
    for attention in ("products", "triton"):
        scorer = scorer_for(toy_model, "fp32", compile=False, attention=attention)
        with torch.inference_mode():
            traces.append(scorer.compact.traced(batch.tokens.to(scorer.device))[1])
    for key in traces[0]._fields:
        assert torch.allclose(getattr(traces[0], key), getattr(traces[1], key), atol=1e-5), key


@pytest.mark.parametrize("compile", [False, True])
def test_a_kernel_that_fails_to_build_falls_back_to_products(toy_model, monkeypatch, compile):
    """A Triton that cannot build the kernel on some machine: the scorer finds out when it is made,
    before torch.compile wraps the forward, goes on with torch's products (the same numbers, still
    compiled where asked) and reports what runs."""
    import workers.kernels.attention

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed\nlong compiler log")

    monkeypatch.setattr(workers.kernels.attention, "causal_attention", broken)
    monkeypatch.setattr(workers.kernels.attention, "last_attention", broken)  # a Triton that builds neither
    with pytest.warns(UserWarning, match="the Triton attention failed .RuntimeError: PassManager::run failed.; using the products"):
        scorer = scorer_for(toy_model, "fp32", compile=compile, attention="triton")
    batch = seed_style(4, toy_model.cfg.d_vocab)
    got = scorer.logodds(batch.tokens, batch.b[:, None])
    assert scorer.options["attention"] == "products" and scorer.options["compiled"] == compile
    want = scorer_for(toy_model, "fp32", compile=False, attention="products").logodds(batch.tokens, batch.b[:, None])
    assert torch.allclose(got, want, atol=1e-5)


def test_kernels_compile_for_hopper_and_keep_their_tiles_in_registers():
    """scripts/kernel_registers.py compiles every autotune config for sm_90 with Triton's own ptxas, no
    GPU needed. The attention kernels and the log-sum-exp hold a sequence (or a row's slots) in
    registers: a change that makes them spill (a tl.dot over d_model spilled 13-27 KB per thread)
    fails here rather than on a device. The tuner picks among configs, so each kernel needs one that
    spills nothing, and none may spill more than a few words. Two kernels sum elementwise and reduce
    across threads once, which is what keeps their instructions near the arithmetic (docs/PERFORMANCE.md):
    logits_lse's loop stays under 18 instructions a logit (per-tile reductions took ~24), and last_attention's best config under 1.2 M
    instructions a sequence (a head at a time over whole rows took 1.8 M to 2.0 M)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        assert Path(get_ptxas(90).path).is_file()
    except Exception as exc:  # noqa: BLE001 - a Triton without its NVIDIA backend or ptxas
        pytest.skip(f"Triton's ptxas for sm_90 is not available here ({type(exc).__name__})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_registers.py"), "--json"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    kernels = json.loads(done.stdout)
    assert set(kernels) == {"causal_attention table fp32", "causal_attention table bf16/tf32", "last_attention", "logits_lse bf16"}
    for name, configs in kernels.items():
        assert min(c["spill_bytes"] for c in configs) == 0, (name, configs)
        assert all(0 < c["registers"] <= 255 for c in configs), (name, configs)
        assert max(c["spill_bytes"] for c in configs) <= 64, (name, configs)
    for c in kernels["logits_lse bf16"]:
        logits_per_thread = c["config"]["BLOCK_B"] * c["config"]["BLOCK_V"] // (32 * c["config"]["num_warps"])
        assert len(c["loop_instructions"]) == 1 and 0 < c["loop_instructions"][0] / logits_per_thread < 18, c
    # passes over d_model, each a loop the estimate counts: mean, scores, mix
    assert all(len(c["loop_instructions"]) == 3 for c in kernels["last_attention"]), kernels["last_attention"]
    assert min(c["instructions_per_program"] for c in kernels["last_attention"]) < 1.2e6, kernels["last_attention"]
