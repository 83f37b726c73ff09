"""Log-odds of target tokens at the last position, exact to float32's range at both ends.

``logodds(T) = log p(T) - log(1 - p(T))``: for the top token, ``1 - p`` is the mass of every
*other* token, summed directly and shifted by their own maximum (so it neither underflows when it
is 1e-60 of the top nor overflows the log-odds); for any other token p <= 1/2 and
``log(-expm1(log p))`` is exact. The full ``[batch, pos, vocab]`` logits are never built.
"""

from __future__ import annotations

import functools

import torch
from jaxtyping import Float, Int
from torch import Tensor


def softmax_parts(
    logits: Float[Tensor, "batch vocab"],
) -> tuple[Float[Tensor, "batch 1"], Int[Tensor, "batch 1"], Float[Tensor, "batch 1"]]:
    """(top logit, its token, log Σ exp over every *other* token), in float32 whatever the logits'
    dtype. The rest is summed without the top token and shifted by its own maximum, so it is exact
    however far below the top it lies (float32's exp underflows 103 nats down). ``logits`` is
    consumed: no new [batch, vocab] tensor. The Triton kernel (workers/kernels/unembed_lse.py) returns the same."""
    if logits.dtype == torch.bfloat16:
        logits = logits.float()
    top_value, top = logits.max(-1, keepdim=True)
    others = logits.scatter_(1, top, float("-inf"))
    shift = others.amax(-1, keepdim=True)
    shift = torch.where(shift == float("-inf"), 0.0, shift)  # no other token at all: the rest is log 0
    return top_value, top, shift + others.sub_(shift).exp_().sum(-1, keepdim=True).log()


def logodds_from_parts(
    targets: Int[Tensor, "batch n_targets"],
    target_logits: Float[Tensor, "batch n_targets"],
    top: Int[Tensor, "batch 1"],
    top_logit: Float[Tensor, "batch 1"],
    rest: Float[Tensor, "batch 1"],
) -> Float[Tensor, "batch n_targets"]:
    """log p/(1-p) of each target: for the top token 1 - p is the mass of the rest; for any other
    p <= 1/2 and ``log(-expm1(log p))`` is exact."""
    eps = -1e-15 if target_logits.dtype == torch.float64 else -1e-7
    lp = (target_logits - torch.logaddexp(top_logit, rest)).clamp(max=eps)
    return torch.where(targets == top, target_logits - rest, lp - torch.log(-torch.expm1(lp)))


def target_logits(
    h: Float[Tensor, "batch d_model"], W_U_rows: Float[Tensor, "vocab d_model"], b_U: Float[Tensor, " vocab"],
    targets: Int[Tensor, "batch n_targets"],
) -> Float[Tensor, "batch n_targets"]:
    """The targets' logits recomputed in float32 from the final residual ``h``: accurate even when the
    rest is bf16. A function of tensors alone, so that one compiled graph serves every scorer."""
    return torch.einsum("bd,btd->bt", h, W_U_rows[targets]) + b_U[targets]


def exact_logodds(
    h: Float[Tensor, "batch d_model"], targets: Int[Tensor, "batch n_targets"], top: Int[Tensor, "batch 1"],
    rest: Float[Tensor, "batch 1"], W_U_rows: Float[Tensor, "vocab d_model"], b_U: Float[Tensor, " vocab"],
) -> Float[Tensor, "batch n_targets"]:
    """``logodds_from_parts`` with the targets' logits and the top token's (it dominates the
    log-sum-exp) recomputed in float32, whatever precision summed the rest."""
    exact = functools.partial(target_logits, h, W_U_rows, b_U)
    return logodds_from_parts(targets, exact(targets), top, exact(top), rest)


def logodds(logits: Float[Tensor, "batch vocab"], targets: Int[Tensor, "batch n_targets"]) -> Float[Tensor, "batch n_targets"]:
    """log p/(1-p) of each target under softmax(logits), in float32 (float64 for float64 logits, the
    references). ``logits`` is consumed."""
    logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    gathered = logits.gather(1, targets)
    top_value, top, rest = softmax_parts(logits)
    return logodds_from_parts(targets, gathered, top, top_value, rest)
