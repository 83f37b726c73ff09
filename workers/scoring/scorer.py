"""Scorers: log-odds at the last position for a batch of token sequences, on the model's device.

``scorer_for`` picks one behind the ``Scorer`` interface: ``CompactScorer`` for the architectures
the compact forward computes (workers/compact), ``TransformerLensScorer`` for the rest, which still
unembeds the last position only. What a compact scorer runs is a ``Variant`` (workers/scoring/variant.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workers.compact.forward import CompactForward
from workers.layout import SEQ_LEN
from workers.model import folds, hooked
from workers.scoring.compiled import TF32, FirstCallFallback, batch_dynamic, warn_fallback
from workers.scoring.logodds import exact_logodds, logodds, softmax_parts
from workers.scoring.variant import Variant, resolve_precision

CHUNK_ROWS = 16384  # the float32 logits of 16384 rows of a 48262-token vocabulary are 3 GB


class Scorer:
    """The interface: ``logodds`` of targets, ``strength`` of induction against shuffled sequences,
    and what ran (``path``, ``precision``, ``options``)."""

    path: str
    model: object
    device: torch.device
    precision: str

    def logodds(self, tokens: Int[Tensor, "batch pos"], targets: Int[Tensor, "batch n_targets"]) -> Float[Tensor, "batch n_targets"]:
        raise NotImplementedError

    @property
    def options(self) -> dict:
        raise NotImplementedError

    def strength(
        self, tokens: Int[Tensor, "batch pos"], shuffled: Int[Tensor, "batch pos"], targets: Int[Tensor, "batch n_targets"]
    ) -> tuple[Float[Tensor, "batch n_targets"], Float[Tensor, "batch n_targets"]]:
        """(logodds on the induction sequences, logodds on their shuffled controls), one forward."""
        both = self.logodds(torch.cat([tokens, shuffled]), torch.cat([targets, targets]))
        return both[: len(tokens)], both[len(tokens) :]


def scorer_for(model, precision: str = "auto", fast: bool = True, compile: bool | None = None,
               attention: str | None = None, lse: str | None = None, device: str | torch.device | None = None) -> Scorer:
    """``model``: a HookedTransformer, or the compact forward's weights (folds.load_weights).
    ``compile``, ``attention``, ``lse``: a Variant's, each defaulting to ``Variant.default``.
    ``fast=False``: TransformerLens' path even where the compact forward computes the architecture.
    ``device``: where a compact scorer computes (default: the model's); its weights are copied there
    in the precision's dtype, so float32 weights on the host are never on the device."""
    weights = model if isinstance(model, folds.CompactWeights) else folds.compact_weights(model) if fast else None
    if weights is None:
        return TransformerLensScorer(model, precision)
    device = torch.device(device) if device is not None else model.W_E.device
    variant = Variant.default(device.type, precision).with_options(attention=attention, lse=lse, compiled=compile)
    return CompactScorer(model, weights, variant, device)


class TransformerLensScorer(Scorer):
    path = "transformer_lens"

    def __init__(self, model, precision: str = "auto"):
        self.model, self.device = model, model.W_E.device
        self.precision = resolve_precision(precision, self.device.type)

    @property
    def options(self) -> dict:
        return {"precision": self.precision, "compiled": False, "attention": None, "lse": None}

    @torch.inference_mode()
    def logodds(self, tokens: Int[Tensor, "batch pos"], targets: Int[Tensor, "batch n_targets"]) -> Float[Tensor, "batch n_targets"]:
        with TF32(self.precision == "tf32"), \
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = hooked.last_logits(self.model, tokens)
        return logodds(logits.float(), targets)


class CompactScorer(Scorer):
    path = "compact"

    def __init__(self, model, weights: folds.CompactWeights, variant: Variant, device: torch.device):
        self.model, self.device, self.requested = model, device, variant
        self.precision = variant.precision
        dtype = torch.bfloat16 if variant.precision == "bf16" else torch.float32
        compute = dtype if variant.native_bf16 else torch.float32
        align = 64 if variant.device == "cuda" else 1  # aligned unembedding for cuBLAS (workers/compact/forward.py)
        self.compact = CompactForward(weights, dtype, compute, variant.attention, align).to(self.device)
        self.logits_dtype = torch.bfloat16 if variant.bf16_logits else torch.float32
        if variant.attention == "triton":
            self._check_attention_kernel()
        self._forward, self._logits, self._exact_logodds = self.compact, self.compact.logits, exact_logodds
        if variant.compiled:
            emulate = dtype != compute  # emulated bf16 (rounded inputs, float32 products): keep the roundings
            self._forward = FirstCallFallback(batch_dynamic(self.compact, emulate), self.compact, "torch.compile")
            self._logits = FirstCallFallback(batch_dynamic(self.compact.logits, emulate), self.compact.logits, "torch.compile")
            self._exact_logodds = FirstCallFallback(batch_dynamic(exact_logodds, False, batch_args=4), exact_logodds,
                                                    "torch.compile")
        eager = functools.partial(_chunked, self._torch_softmax_parts)
        self._softmax_parts = eager
        if variant.lse == "triton":
            self._softmax_parts = FirstCallFallback(functools.partial(_chunked, self._triton_softmax_parts), eager,
                                                    "the Triton log-sum-exp")

    @torch.inference_mode()
    def _check_attention_kernel(self):
        """Build the Triton attention on one sequence before anything is compiled around it: where it
        fails to build (some machine's Triton or driver), the products attention computes the same numbers."""
        try:
            with TF32(self.precision == "tf32"):  # TF32 or not: another build of the kernel
                self.compact(torch.zeros(1, min(SEQ_LEN, len(self.compact.embed.W_pos)), dtype=torch.long, device=self.device))
        except Exception as e:  # noqa: BLE001 - any compiler error; products compute the same
            warn_fallback("the Triton attention", e, "the products attention")
            self.compact.attention = "products"

    def _torch_softmax_parts(self, h: Float[Tensor, "batch d_model"]):
        return softmax_parts(self.compact.logits(h, self.logits_dtype))

    def _triton_softmax_parts(self, h: Float[Tensor, "batch d_model"]):
        from workers.kernels.unembed_lse import logits_lse  # Triton: imported only where it runs

        return logits_lse(self._logits(h, self.logits_dtype))

    @property
    def variant(self) -> Variant:
        """What runs, after any fallback."""
        compiled = all(isinstance(f, FirstCallFallback) and f.primary_ok is not False
                       for f in (self._forward, self._logits, self._exact_logodds))
        triton_lse = isinstance(self._softmax_parts, FirstCallFallback) and self._softmax_parts.primary_ok is not False
        return self.requested.with_options(attention=self.compact.attention, lse="triton" if triton_lse else "torch",
                                           compiled=compiled)

    @property
    def options(self) -> dict:
        return self.variant.as_dict()

    @property
    def shapes(self) -> dict:
        """What a compiled graph depends on besides the precision (workers/scoring/compile_cache.py)."""
        return {"path": self.path, **self.compact.shape, **self.options}

    @torch.inference_mode()
    def logodds(self, tokens: Int[Tensor, "batch pos"], targets: Int[Tensor, "batch n_targets"]) -> Float[Tensor, "batch n_targets"]:
        with TF32(self.precision == "tf32"):
            h = self._forward(tokens)
            _, top, rest = self._softmax_parts(h)
            return self._exact_logodds(h, targets, top, rest, self.compact.unembed.W_U_rows, self.compact.unembed.b_U)


def _chunked(parts: Callable, h: Float[Tensor, "batch d_model"], rows: int = CHUNK_ROWS):
    """``parts`` over row chunks, concatenated."""
    if len(h) <= rows:
        return parts(h)
    return tuple(torch.cat(p) for p in zip(*(parts(h[lo : lo + rows]) for lo in range(0, len(h), rows))))
