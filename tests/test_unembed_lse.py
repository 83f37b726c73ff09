"""The log-sum-exp kernel of materialised logits against float64's logsumexp, and inside the scorer
against TransformerLens' own forward. Without a GPU it runs under Triton's interpreter
(TRITON_INTERPRET=1, set in conftest.py)."""

import pytest
import torch

pytest.importorskip("triton")

from tests.helpers import check_parity  # noqa: E402
from workers.kernels.unembed_lse import logits_lse  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def float64_parts(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, its first index, logsumexp of every other logit) by torch's float64 logsumexp."""
    x = logits.double()
    top_value, top = x.max(-1, keepdim=True)
    return top_value, top, x.scatter(1, top, float("-inf")).logsumexp(-1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_lse_matches_float64(dtype):
    """One read of each row of logits (the scorer's lse="triton"): the top, its token and the log-sum-exp
    of the others as float64 gives them, with a top 50 and 300 nats above the rest (float32's exp
    underflows 103 nats down), a tie, whole tiles of -inf (a banned token's bias) and a vocabulary that
    no tile divides. (The interpreter reads bf16 logits as their float32 values; the bf16 load itself
    runs on the GPU only.)"""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 1001, generator=g) * 3
    logits[0, 700] = 60.0  # every other token ~1e-22 of the top
    logits[1, 3] = logits[1, 5] = 25.0  # a tie: one is the top, the other stays in the rest
    logits[2, 1000] = 40.0  # the top in the last, partial tile
    logits[3, :300] = float("-inf")  # the first tiles all -inf: the running top is -inf when they fold
    logits[4, 10] = logits[4, 10 + 64] = 30.0  # a tie a tile apart: the same slot of the kernel (interpreter tiles are 64)
    logits[5, 1:] = float("-inf")  # one finite logit: nothing else has mass (rest -inf)
    logits[6, 900] = 300.0  # the rest 300 nats down: exp(rest - top) is 0 in float32
    logits[7, 0] = 250.0  # ... with the top in the first tile and the rest spread over 60 nats
    logits[7, 1:] = torch.linspace(-60, 0, 1000)
    logits = logits.to(dtype).to(DEVICE)
    top_value, top, rest = logits_lse(logits)
    ref_value, ref_top, ref_rest = float64_parts(logits.cpu())
    assert top[0, 0] == 700 and top[1, 0] == 3 and top[2, 0] == 1000 and top[4, 0] == 10 and top[5, 0] == 0
    assert rest[5, 0] == float("-inf") and ref_rest[5, 0] == float("-inf")
    assert torch.equal(top.cpu(), ref_top) and top_value.dtype == rest.dtype == torch.float32
    assert (top_value.cpu().double() - ref_value).abs().max() < 1e-5
    finite = torch.arange(len(logits)) != 5
    assert (rest[finite].cpu().double() - ref_rest[finite]).abs().max() < 1e-5
    assert (top_value - rest)[6].item() > 280  # the log-odds of the top: finite and exact


def test_scorer_with_triton_log_sum_exp_matches_transformer_lens(toy_model):
    check_parity(toy_model, "bf16", n=64, lse="triton")
    check_parity(toy_model, "fp32", n=64, lse="triton")
    # as on CUDA: the unembedding's input and the exact logits compiled around the kernel
    check_parity(toy_model, "bf16", n=64, lse="triton", compile=True)
