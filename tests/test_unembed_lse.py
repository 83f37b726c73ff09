"""The fused unembedding + log-sum-exp kernel and the log-sum-exp kernel of materialised logits
against softmax_parts in float64, and inside the scorer against TransformerLens' own forward. Without a GPU they run under Triton's
interpreter (TRITON_INTERPRET=1, set in conftest.py)."""

import pytest
import torch

pytest.importorskip("triton")

from test_fast import check_parity  # noqa: E402

from workers.scoring import Scorer, softmax_parts  # noqa: E402
from workers.unembed_lse import FusedUnembedLSE, aligned, logits_lse, unembed_lse  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor):
    return softmax_parts(h.double() @ W.double() + b.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_materialised_logits(dtype):
    g = torch.Generator().manual_seed(0)
    batch, k, vocab = 70, 97, 1000  # none a multiple of a tile: every edge is masked
    h = torch.randn(batch, k, generator=g)
    h[1] = -h[0]
    W = torch.randn(k, vocab, generator=g) / k**0.5
    W[:, 700] = h[0] * 60 / h[0].dot(h[0])  # row 0: one token 50 nats above the rest (their mass ~1e-22 of it)
    W[:, 3] = W[:, 5] = h[1] * 30 / h[1].dot(h[1])  # row 1: a tie for the top
    b = torch.randn(vocab, generator=g)
    b[[3, 5, 700]] = 0.0
    b[999] = float("-inf")  # a banned token, in the last, partial tile
    h, W, b = h.to(dtype).to(DEVICE), W.to(dtype).to(DEVICE), b.to(DEVICE)
    top_value, top, rest = unembed_lse(h, W, b)
    ref_value, ref_top, ref_rest = reference(h.cpu(), W.cpu(), b.cpu())
    assert top[0, 0] == 700 and (top_value[0] - rest[0]).item() > 40
    assert top[1, 0] in (3, 5)
    assert torch.equal(top.cpu(), ref_top)
    assert (top_value.cpu().double() - ref_value).abs().max() < 1e-4
    assert (rest.cpu().double() - ref_rest).abs().max() < 1e-4  # exact even where the rest is 1e-20 of the top
    # the aligned copies the scorer uses (padded strides, zero rows and columns) give the same
    fused = FusedUnembedLSE(W, b)
    assert fused.W_U.shape == (128, 1000) and fused.W_U.stride(0) == 1024
    for got, want in zip(fused(h), (top_value, top, rest)):
        assert torch.allclose(got, want, atol=1e-5)


def test_aligned_copy_keeps_values():
    t = torch.arange(70 * 97, dtype=torch.float32).view(70, 97)
    a = aligned(t, pad_rows=True)
    assert torch.equal(a[:70], t) and a.shape == (128, 97) and a.stride(0) == 128 and a[70:].abs().sum() == 0
    # already laid out so (the scorer's padded W_U on CUDA, sliced to the vocabulary): no second copy
    assert aligned(a, pad_rows=True) is a


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_scorer_with_fused_kernel_matches_transformer_lens(toy_model, precision):
    scorer = Scorer(toy_model, precision, fused=True)
    assert isinstance(scorer._unembed_lse, FusedUnembedLSE)
    check_parity(toy_model, precision, n=64, fused=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_lse_matches_softmax_parts(dtype):
    """One read of each row of logits (the scorer's lse="triton"): the top, its token and the rest's
    mass as softmax_parts gives them in float64, with a 50-nat top, a tie, whole tiles of -inf (a
    banned token's bias) and a vocabulary that no tile divides. (The interpreter reads bf16 logits as
    their float32 values; the bf16 load itself runs on the GPU only: bench --check.)"""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 1001, generator=g) * 3
    logits[0, 700] = 60.0  # every other token ~1e-22 of the top
    logits[1, 3] = logits[1, 5] = 25.0  # a tie: one is the top, the other stays in the mass
    logits[2, 1000] = 40.0  # the top in the last, partial tile
    logits[3, :300] = float("-inf")  # the first tiles all -inf: the running top is -inf when they fold
    logits[4, 10] = logits[4, 10 + 64] = 30.0  # a tie a tile apart: the same slot of the kernel (interpreter tiles are 64)
    logits[5, 1:] = float("-inf")  # one finite logit: nothing else has mass (rest -inf)
    logits = logits.to(dtype).to(DEVICE)
    top_value, top, rest = logits_lse(logits)
    ref_value, ref_top, ref_rest = softmax_parts(logits.cpu().double())
    assert top[0, 0] == 700 and top[1, 0] == 3 and top[2, 0] == 1000 and top[4, 0] == 10 and top[5, 0] == 0
    assert rest[5, 0] == float("-inf") and ref_rest[5, 0] == float("-inf")
    assert torch.equal(top.cpu(), ref_top) and top_value.dtype == rest.dtype == torch.float32
    assert (top_value.cpu().double() - ref_value).abs().max() < 1e-5
    assert (rest[:5].cpu().double() - ref_rest[:5]).abs().max() < 1e-5 and (rest[6:].cpu().double() - ref_rest[6:]).abs().max() < 1e-5


@pytest.mark.parametrize("logits", ["float32", "bf16"])
def test_scorer_with_triton_log_sum_exp_matches_transformer_lens(toy_model, logits):
    check_parity(toy_model, "bf16", n=64, lse="triton", logits=logits)
    check_parity(toy_model, "fp32", n=64, lse="triton")
    if logits == "bf16":  # as on CUDA: the unembedding's input and the exact logits compiled around the kernel
        check_parity(toy_model, "bf16", n=64, lse="triton", logits=logits, compile=True)
