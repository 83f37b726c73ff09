"""Scoring: log-odds of target tokens at the last position, and the induction strength.

``logodds(T) = log p(T) - log(1 - p(T))`` in float32, stable for p near 0 and near 1:
for the top token, ``1 - p`` is the mass of every *other* token, summed directly; for any other
token p <= 1/2 and ``log(-expm1(log p))`` is exact. The full ``[batch, pos, vocab]`` logits are
never built: one position is unembedded.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workers import models
from workers.fast import CompactForward

PRECISIONS = ("fp32", "tf32", "bf16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` is bf16 on a GPU (error ~0.02 nats, see docs/PERFORMANCE.md) and fp32 on a CPU."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose auto, {', '.join(PRECISIONS)}")
    return precision


def native_bf16(device: torch.device) -> bool:
    """bf16 products at full speed: CUDA, or a CPU with AVX512-BF16/AMX (not AVX2 ones)."""
    if device.type == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # builds without oneDNN
        return False


def logodds(
    logits: Float[Tensor, "batch vocab"],
    targets: Int[Tensor, "batch n_targets"],
    target_logits: Optional[Float[Tensor, "batch n_targets"]] = None,
    exact_logit: Optional[Callable[[Int[Tensor, "batch k"]], Float[Tensor, "batch k"]]] = None,
) -> Float[Tensor, "batch n_targets"]:
    """log p/(1-p) of each target under softmax(logits), in float32 (float64 for float64 logits).

    ``target_logits`` (float32) may replace the targets' entries of a low-precision ``logits``, and
    ``exact_logit(ids)`` recomputes the top token's logit in float32 (it dominates the log-sum-exp).
    ``logits`` is consumed: its top entry is overwritten (it is a temporary of the forward).
    """
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32  # float64 for references
    if target_logits is None:
        target_logits = logits.gather(1, targets).to(work)
    logits = logits.to(work)
    top_value, top = logits.max(-1, keepdim=True)
    # log of the softmax mass of every token but the top one (exact even when that mass is 1e-30),
    # in place: three passes over the vocabulary and no new [batch, vocab] tensor
    rest = top_value + logits.sub_(top_value).exp_().scatter_(1, top, 0.0).sum(-1, keepdim=True).log()
    top_logit = exact_logit(top) if exact_logit is not None else top_value
    is_top = targets == top
    lp = (target_logits - torch.logaddexp(top_logit, rest)).clamp(max=-1e-7 if work == torch.float32 else -1e-15)
    return torch.where(is_top, target_logits - rest, lp - torch.log(-torch.expm1(lp)))


def cosine_neighbors(W_U: Float[Tensor, "d_model vocab"], k: int, first_token: int, chunk: int = 4096) -> Int[Tensor, "vocab k"]:
    """The k nearest ids of every token by cosine similarity of W_U columns (self excluded, ids >= first_token)."""
    unit = torch.nn.functional.normalize(W_U.float().T, dim=-1)
    vocab = unit.shape[0]
    out = torch.empty(vocab, k, dtype=torch.int64, device=W_U.device)
    for lo in range(0, vocab, chunk):
        sim = unit[lo : lo + chunk] @ unit.T
        sim[:, :first_token] = float("-inf")
        rows = torch.arange(lo, min(lo + chunk, vocab), device=W_U.device)
        sim[rows - lo, rows] = float("-inf")
        out[lo : lo + chunk] = sim.topk(k, dim=-1).indices
    return out


class Scorer:
    """Log-odds at the last position for a batch of token sequences, on the model's device.

    Attention-only models take the compact forward (workers/fast.py); others TransformerLens'
    path, which still unembeds the last position only.
    """

    def __init__(self, model, precision: str = "auto", fast: bool = True, compile: Optional[bool] = None):
        self.model = model
        self.device = model.W_E.device
        self.precision = resolve_precision(precision, self.device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        weights = models.attn_only_weights(model) if fast else None
        compute = self.dtype if native_bf16(self.device) else torch.float32
        self.compact = CompactForward(weights, self.dtype, compute).to(self.device) if weights is not None else None
        self.path = "compact" if self.compact is not None else "transformer_lens"
        use_compile = self.device.type == "cuda" if compile is None else compile
        self._forward = torch.compile(self.compact, dynamic=False) if use_compile and self.compact is not None else self.compact

    def _matmul_precision(self):
        """TF32 only where asked for; fp32 means full float32 products on every device."""
        return _TF32(self.precision == "tf32")

    @torch.inference_mode()
    def logodds(self, tokens: Int[Tensor, "batch pos"], targets: Int[Tensor, "batch n_targets"]) -> Float[Tensor, "batch n_targets"]:
        with self._matmul_precision():
            if self.compact is not None:
                h = self._forward(tokens)
                exact = functools.partial(self.compact.target_logits, h)
                return logodds(self.compact.logits(h), targets, exact(targets), exact)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                logits = models.last_logits(self.model, tokens)
            return logodds(logits.float(), targets)

    def strength(
        self, tokens: Int[Tensor, "batch pos"], shuffled: Int[Tensor, "batch pos"], targets: Int[Tensor, "batch n_targets"]
    ) -> tuple[Float[Tensor, "batch n_targets"], Float[Tensor, "batch n_targets"]]:
        """(logodds on the induction sequences, logodds on their shuffled controls), one forward."""
        both = self.logodds(torch.cat([tokens, shuffled]), torch.cat([targets, targets]))
        return both[: len(tokens)], both[len(tokens) :]


class _TF32:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
