import math

import pytest
import torch

from workers.model import hooked
from workers.neighbors import cosine_neighbors
from workers.scoring.compiled import FirstCallFallback
from workers.scoring.logodds import logodds, softmax_parts
from workers.scoring.scorer import scorer_for
from workers.sequences import FIRST_TOKEN


def exact_logodds(logits: torch.Tensor, t: int) -> float:
    """log p/(1-p) = x_t - logsumexp_{j != t} x_j, in float64."""
    x = logits.double()
    others = torch.cat([x[:t], x[t + 1 :]])
    return float(x[t] - torch.logsumexp(others, 0))


@pytest.mark.parametrize("gap", [0.0, 5.0, 20.0, 40.0, 80.0, 120.0, 300.0])
def test_logodds_stable_for_p_near_one_and_zero(gap):
    vocab = 5000
    logits = torch.zeros(1, vocab)
    logits[0, 10] = gap  # p(10) -> 1 as the gap grows, p(others) -> 0
    got = logodds(logits.clone(), torch.tensor([[10, 11]]))
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert abs(got[0, 0].item() - exact_logodds(logits[0], 10)) < 1e-4 * max(1, gap)
    assert abs(got[0, 1].item() - exact_logodds(logits[0], 11)) < 1e-4 * max(1, gap)
    # p near 1: float32 log-softmax alone would give lp == 0 and an infinite log-odds; past 103 nats the
    # others' exp underflows float32 unless their sum is shifted by their own maximum
    if gap >= 40:
        assert abs(got[0, 0].item() - (gap - math.log(vocab - 1))) < 1e-3


def test_logodds_random_logits_match_float64():
    torch.manual_seed(0)
    logits = torch.randn(64, 3000) * 6
    targets = torch.randint(0, 3000, (64, 5))
    targets[:, 0] = logits.argmax(-1)  # include the top token
    got = logodds(logits.clone(), targets)
    ref = torch.tensor([[exact_logodds(logits[i], int(t)) for t in targets[i]] for i in range(64)])
    assert (got.double() - ref).abs().max() < 1e-4


def test_neighbors_match_a_direct_cosine_computation():
    torch.manual_seed(1)
    W_U = torch.randn(32, 300)
    got = cosine_neighbors(W_U, 5, FIRST_TOKEN, chunk=64)
    cos = torch.nn.functional.cosine_similarity(W_U.T[:, None, :], W_U.T[None, :, :], dim=-1)
    for t in range(300):
        ranked = [j for j in cos[t].argsort(descending=True).tolist() if j != t and j >= FIRST_TOKEN][:5]
        assert got[t].tolist() == ranked


def test_transformer_lens_path_matches_full_forward(toy_model):
    """The fallback path (architectures the compact forward does not compute) against TransformerLens' own full forward."""
    torch.manual_seed(2)
    tokens = torch.randint(FIRST_TOKEN, 2048, (16, 24))
    targets = torch.randint(FIRST_TOKEN, 2048, (16, 3))
    ref = logodds(torch.log_softmax(hooked.full_logits(toy_model, tokens)[:, -1].double(), -1), targets)
    scorer = scorer_for(toy_model, "fp32", fast=False)
    assert scorer.path == "transformer_lens"
    assert (scorer.logodds(tokens, targets).double() - ref).abs().max() < 1e-4


def test_first_call_fallback_switches_once_and_warns():
    calls = []

    def broken(x):
        calls.append("primary")
        raise RuntimeError("no kernel for this machine\nlong compiler log")

    guarded = FirstCallFallback(broken, lambda x: x + 1, "the compiler")
    with pytest.warns(UserWarning, match="the compiler failed .RuntimeError: no kernel for this machine.; using"):
        assert guarded(1) == 2
    assert guarded(2) == 3 and calls == ["primary"] and guarded.primary_ok is False


def test_past_dynamos_recompile_limit_a_scorer_says_it_runs_eager(toy_model):
    """Dynamo stops compiling a function after its recompile limit (8 graphs: all the scorers of a
    process together) and would run it eager unseen; the scorer warns and reports compiled False."""
    batch_tokens = torch.randint(FIRST_TOKEN, toy_model.cfg.d_vocab, (4, 24))
    with torch._dynamo.config.patch(recompile_limit=1):
        first = scorer_for(toy_model, "fp32", compile=True)
        first.logodds(batch_tokens, batch_tokens[:, :1])
        second = scorer_for(toy_model, "bf16", compile=True)  # another graph of the same forward
        with pytest.warns(UserWarning, match="torch.compile failed .FailOnRecompileLimitHit"):
            second.logodds(batch_tokens, batch_tokens[:, :1])
    assert first.options["compiled"] and not second.options["compiled"]


def test_failure_after_a_first_success_is_raised():
    state = {"n": 0}

    def flaky(x):
        state["n"] += 1
        if state["n"] > 1:
            raise RuntimeError("out of memory")
        return x

    guarded = FirstCallFallback(flaky, lambda x: -x, "the compiler")
    assert guarded(5) == 5
    with pytest.raises(RuntimeError, match="out of memory"):
        guarded(5)


def test_softmax_parts_of_bf16_logits_are_float32_sums_of_their_values():
    """bf16 logits (CUDA's bf16 option) are summed in float32: the same parts as their values in float32."""
    torch.manual_seed(2)
    logits = (torch.randn(16, 3001) * 4).bfloat16()
    got = softmax_parts(logits.clone())
    want = softmax_parts(logits.float())
    assert got[0].dtype == got[2].dtype == torch.float32 and torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0]) and torch.allclose(got[2], want[2], rtol=0, atol=1e-5)
