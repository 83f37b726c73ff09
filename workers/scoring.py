"""Scoring: log-odds of target tokens at the last position, and the induction strength.

``logodds(T) = log p(T) - log(1 - p(T))`` in float32, exact to float32's range at both ends:
for the top token, ``1 - p`` is the mass of every *other* token, summed directly and shifted by
their own maximum (so it neither underflows when it is 1e-60 of the top nor overflows the log-odds);
for any other token p <= 1/2 and ``log(-expm1(log p))`` is exact. The full ``[batch, pos, vocab]``
logits are never built: one position is unembedded.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workers import models
from workers.fast import CompactForward, target_logits
from workers.sequences import SEQ_LEN

PRECISIONS = ("fp32", "tf32", "bf16")


# The most a scorer's log-odds may differ from TransformerLens' float64 forward of the same weights, per
# precision: the load-time check (workers/load_check.py), the bench and the parity tests hold every path to it.
ACCURACY_BOUNDS = {"fp32": 1e-3, "tf32": 0.1, "bf16": 0.1}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` is bf16 on a GPU and fp32 on a CPU (docs/PERFORMANCE.md has the errors and speeds
    behind that choice)."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose auto, {', '.join(PRECISIONS)}")
    return precision


# What measured fastest, per device type and precision, at accuracy within the bench's bounds
# (docs/PERFORMANCE.md, "GPU scorer"; ``bench`` measures every combination on the machine at hand).
# ``logits``: the dtype torch's unembedding writes (LOGITS); ``lse``:
# what reduces them (LSE).
# ``query``: how the last layer's query side is made (fast.QUERY); ``table``: layer 0's Q/K/V table's dtype
# (fast.TABLES). Their Triton kernel and float16 table are not yet measured on a GPU: torch and float32 until then.
_ALONE = {"query": "torch", "table": "float32"}
FASTEST = {
    "cuda": {"fp32": {"attention": "products", "logits": "float32", "lse": "torch", **_ALONE},  # the others tie
             "tf32": {"attention": "triton", "logits": "float32", "lse": "triton", **_ALONE},
             "bf16": {"attention": "triton", "logits": "bf16", "lse": "triton", **_ALONE}},
    "cpu": {p: {"attention": "sdpa", "logits": "float32", "lse": "torch", **_ALONE} for p in PRECISIONS},
}
# bf16 logits (bf16 precision only): the product's float32 sums rounded once, as bf16 tensor cores
# return them, so half the memory traffic of float32 logits. The top token and the targets are
# recomputed in float32; the rest's mass sums roundings of both signs (toy-2l on the CPU: max
# |Δ strength| 0.0815 against 0.0830 with float32 logits, mean 0.0016 against 0.0015).
LOGITS = ("float32", "bf16")
# torch: softmax_parts (compiled where the scorer compiles); triton: unembed_lse.logits_lse, one read of each row
LSE = ("torch", "triton")


def fastest_path(device: torch.device, precision: str) -> dict:
    return FASTEST.get(device.type, FASTEST["cpu"])[precision]


def compiles_by_default(device: torch.device) -> bool:
    """torch.compile by default on CUDA only: on a CPU it gains 10–25 % but costs each actor ~15 s
    of compilation (docs/PERFORMANCE.md)."""
    return device.type == "cuda"


def runs_default(options: dict, device: torch.device) -> bool:
    """Whether a scorer's options (``Scorer.options`` with its precision, as ``bench`` reports them)
    are the path the scorer takes by default on ``device``: compiled on CUDA only, and FASTEST's
    variant. Reports from before the logits and lse options ran float32 logits reduced by torch, and
    from before the query and table options torch's query side and a float32 table."""
    default = fastest_path(device, options["precision"])
    if options.get("attention") != default["attention"]:
        return False
    if (options.get("query") or "torch", options.get("table") or "float32") != (default["query"], default["table"]):
        return False
    if "compiled" in options and options["compiled"] != compiles_by_default(device):
        return False
    return (options.get("logits") or "float32", options.get("lse") or "torch") == (
        default["logits"], default["lse"])


def native_bf16(device: torch.device) -> bool:
    """bf16 products on the hardware: CUDA. CPUs round inputs to bf16 and multiply in float32: on
    AVX2 bf16 products are far slower than float32, and where they are fast (AMX) torch's CPU
    product rounds its float32 sums to bf16, which toy-2l's sharp attention does not tolerate
    (both measured in docs/PERFORMANCE.md)."""
    return device.type == "cuda"


def softmax_parts(
    logits: Float[Tensor, "batch vocab"], in_place: bool = True,
) -> tuple[Float[Tensor, "batch 1"], Int[Tensor, "batch 1"], Float[Tensor, "batch 1"]]:
    """(top logit, its token, log Σ exp over every *other* token), in float32 whatever the logits'
    dtype (bf16 logits are copied in eager, read as they are under torch.compile).

    The rest is summed without the top token and shifted by its own maximum, so it is exact however
    far below the top it lies (float32's exp underflows 103 nats down). ``in_place`` (eager): no new
    [batch, vocab] tensor, ``logits`` is consumed. Otherwise (under torch.compile) the top is masked
    out instead of scattered, so that the passes fuse into reads of the logits. The Triton kernel
    (workers/unembed_lse.py logits_lse) returns the same.
    """
    if logits.dtype == torch.bfloat16:  # bf16 logits, summed in float32 (under torch.compile the cast fuses into the reads)
        logits = logits.float()
    top_value, top = logits.max(-1, keepdim=True)
    if in_place:
        others = logits.scatter_(1, top, float("-inf"))
    else:
        ids = torch.arange(logits.shape[-1], device=logits.device)
        others = torch.where(ids == top, float("-inf"), logits)
    shift = others.amax(-1, keepdim=True)
    shift = torch.where(shift == float("-inf"), 0.0, shift)  # no other token at all: the rest is log 0
    mass = (others.sub_(shift).exp_() if in_place else (others - shift).exp()).sum(-1, keepdim=True)
    return top_value, top, shift + mass.log()


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


def exact_logodds(
    h: Float[Tensor, "batch d_model"], targets: Int[Tensor, "batch n_targets"], top: Int[Tensor, "batch 1"],
    rest: Float[Tensor, "batch 1"], W_U_rows: Float[Tensor, "vocab d_model"], b_U: Float[Tensor, " vocab"],
) -> Float[Tensor, "batch n_targets"]:
    """``logodds_from_parts`` with the targets' logits and the top token's (it dominates the
    log-sum-exp) recomputed in float32 from the final residual ``h``, whatever precision summed the rest."""
    exact = functools.partial(target_logits, h, W_U_rows, b_U)
    return logodds_from_parts(targets, exact(targets), top, exact(top), rest)


def logodds(logits: Float[Tensor, "batch vocab"], targets: Int[Tensor, "batch n_targets"]) -> Float[Tensor, "batch n_targets"]:
    """log p/(1-p) of each target under softmax(logits), in float32 (float64 for float64 logits).
    ``logits`` is consumed."""
    logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)  # float64 for references
    target_logits = logits.gather(1, targets)
    top_value, top, rest = softmax_parts(logits)
    return logodds_from_parts(targets, target_logits, top, top_value, rest)


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

    Models whose architecture it computes take the compact forward (workers/fast.py: attention-only,
    or attention and an ungated MLP per block); others TransformerLens' path, which still unembeds
    the last position only.
    """

    def __init__(self, model, precision: str = "auto", fast: bool = True, compile: bool | None = None,
                 attention: str | None = None, logits: str | None = None,
                 lse: str | None = None, query: str | None = None, table: str | None = None):
        """``model``: a HookedTransformer, or the compact forward's weights (models.load_weights).
        ``attention``: CompactForward's; ``logits``: the dtype of the unembedding's logits (LOGITS; bf16
        only for bf16); ``lse``: what reduces
        them (LSE); ``query``: how the last layer's query side is made (fast.QUERY); ``table``: layer 0's
        Q/K/V table's dtype (fast.TABLES; float16 with bf16 only). All default to what measured fastest
        for the device and precision (``fastest_path``)."""
        self.model = model
        self.device = model.W_E.device
        self.precision = resolve_precision(precision, self.device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        if isinstance(model, models.CompactWeights):
            weights = model
        else:
            weights = models.compact_weights(model) if fast else None
        compute = self.dtype if native_bf16(self.device) else torch.float32
        best = fastest_path(self.device, self.precision)
        align = 64 if self.device.type == "cuda" else 1  # aligned unembedding for cuBLAS (workers/fast.py)
        self.compact = (CompactForward(weights, self.dtype, compute, attention or best["attention"], align, query or best["query"],
                                       table or best["table"]).to(self.device) if weights is not None else None)
        self.path = "compact" if self.compact is not None else "transformer_lens"
        if self.compact is None:
            return
        use_compile = compiles_by_default(self.device) if compile is None else compile
        has_triton = importlib.util.find_spec("triton") is not None
        if "triton" in (self.compact.attention, self.compact.query):
            if not has_triton:
                raise ValueError("attention or query 'triton' needs Triton, which is not installed")
            self._check_attention_kernels()
        self._forward, self._logits, self._exact_logodds = self.compact, self.compact.logits, exact_logodds
        if use_compile:
            # emulated bf16 (rounded inputs, float32 products): Inductor would fuse the roundings away
            emulate = self.dtype != compute
            compiled = _batch_dynamic(torch.compile(self.compact), emulate_casts=emulate)
            self._forward = FirstCallFallback(compiled, self.compact, "torch.compile")
            # the unembedding's input and the exact logits: eager, ten kernels and two [batch, d_model]
            # gathers of W_U's rows; compiled, two passes and gathers read where they are summed
            compiled = _batch_dynamic(torch.compile(self.compact.logits), emulate_casts=emulate)
            self._logits = FirstCallFallback(compiled, self.compact.logits, "torch.compile")
            compiled = _batch_dynamic(torch.compile(exact_logodds), emulate_casts=False, batch_args=4)
            self._exact_logodds = FirstCallFallback(compiled, exact_logodds, "torch.compile")
        logits = logits or best["logits"]
        if logits not in LOGITS or (logits == "bf16" and self.precision != "bf16"):
            raise ValueError(f"logits {logits!r}: choose float32, or bf16 with bf16 precision")
        self.logits_dtype = torch.bfloat16 if logits == "bf16" else torch.float32
        self.lse = lse or (best["lse"] if has_triton else "torch")
        if self.lse not in LSE:
            raise ValueError(f"unknown lse {self.lse!r}: choose {', '.join(LSE)}")
        # what every faster way below falls back to if it fails on its first call: the same numbers, chunked
        eager = self._softmax_parts = functools.partial(self._chunked, self._torch_softmax_parts)
        if self.lse == "triton":
            self._softmax_parts = FirstCallFallback(functools.partial(self._chunked, self._triton_softmax_parts), eager,
                                                    "the Triton kernel")
        elif use_compile:
            # one compiled pass over each chunk's logits: max, then the rest's exp-sum (eager: five passes)
            compiled = _batch_dynamic(torch.compile(self._compiled_softmax_parts), emulate_casts=self.dtype != compute)
            self._softmax_parts = FirstCallFallback(functools.partial(self._chunked, compiled), eager, "torch.compile")

    @torch.inference_mode()
    def _check_attention_kernels(self):
        """Build the Triton kernels (attention, query side) on one sequence, before anything is compiled
        around them: where they fail to build (some machine's Triton or driver), the products attention
        and torch's query side compute the same numbers, with a warning."""
        c = self.compact
        n_pos = min(SEQ_LEN, len(c.W_pos))
        try:
            with self._matmul_precision():  # TF32 or not: another build of the kernel
                c(torch.zeros(1, n_pos, dtype=torch.long, device=self.device))
        except Exception as e:  # noqa: BLE001 - any compiler error; products compute the same
            replaced = {"attention": "products attention", "query": "torch's query side"}
            on_triton = [k for k in replaced if getattr(c, k) == "triton"]
            warn_fallback(f"the Triton {' and '.join(on_triton)}", e, " and ".join(replaced[k] for k in on_triton))
            c.attention = "products" if c.attention == "triton" else c.attention
            c.query = "torch"

    def _torch_softmax_parts(self, h: Float[Tensor, "batch d_model"]):
        return softmax_parts(self.compact.logits(h, self.logits_dtype))

    def _triton_softmax_parts(self, h: Float[Tensor, "batch d_model"]):
        from workers.unembed_lse import logits_lse  # Triton: imported only where it runs

        return logits_lse(self._logits(h, self.logits_dtype))

    def _compiled_softmax_parts(self, h: Float[Tensor, "batch d_model"]):
        return softmax_parts(self.compact.logits(h, self.logits_dtype), in_place=False)

    @staticmethod
    def _chunked(parts: Callable, h: Float[Tensor, "batch d_model"], rows: int = 16384):
        """``parts`` over row chunks: the float32 logits of 16384 rows of a 48262-token vocabulary are 3 GB."""
        if len(h) <= rows:
            return parts(h)
        return tuple(torch.cat(p) for p in zip(*(parts(h[lo : lo + rows]) for lo in range(0, len(h), rows))))

    @property
    def shapes(self) -> dict:
        """What a compiled graph depends on besides the precision (workers/compile_cache.py)."""
        c = self.compact
        return {"path": self.path, "layers": c.n_layers, "heads": c.n_heads, "d_head": c.d_head,
                "d_model": c.W_E.shape[1], "d_vocab": c.W_E.shape[0], "shortformer": c.shortformer,
                "layer_norm": c.layer_norm, "attention": c.attention,
                "logits": self.options["logits"], "lse": self.options["lse"], "query": self.options["query"],
                "table": self.options["table"],
                "act_fn": c.act_fn, "mlp_layer_norm": c.mlp_layer_norm, "d_mlp": c.d_mlp}

    @property
    def options(self) -> dict:
        """What this scorer runs (after any fallback)."""
        if self.compact is None:
            return {"compiled": False, "attention": None, "logits": None, "lse": None, "query": None, "table": None}
        compiled = all(isinstance(f, FirstCallFallback) and f.primary_ok is not False
                       for f in (self._forward, self._logits, self._exact_logodds))
        logits = "bf16" if self.logits_dtype == torch.bfloat16 else "float32"
        triton_lse = self.lse == "triton" and self._softmax_parts.primary_ok is not False
        lse = "triton" if triton_lse else "torch"
        return {"compiled": compiled, "attention": self.compact.attention, "logits": logits, "lse": lse,
                "query": self.compact.query, "table": self.compact.table}

    def _matmul_precision(self):
        """TF32 only where asked for; fp32 means full float32 products on every device."""
        return _TF32(self.precision == "tf32")

    @torch.inference_mode()
    def logodds(self, tokens: Int[Tensor, "batch pos"], targets: Int[Tensor, "batch n_targets"]) -> Float[Tensor, "batch n_targets"]:
        with self._matmul_precision():
            if self.compact is not None:
                h = self._forward(tokens)
                _, top, rest = self._softmax_parts(h)
                return self._exact_logodds(h, targets, top, rest, self.compact.W_U_rows, self.compact.b_U)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                logits = models.last_logits(self.model, tokens)
            return logodds(logits.float(), targets)

    def strength(
        self, tokens: Int[Tensor, "batch pos"], shuffled: Int[Tensor, "batch pos"], targets: Int[Tensor, "batch n_targets"]
    ) -> tuple[Float[Tensor, "batch n_targets"], Float[Tensor, "batch n_targets"]]:
        """(logodds on the induction sequences, logodds on their shuffled controls), one forward."""
        both = self.logodds(torch.cat([tokens, shuffled]), torch.cat([targets, targets]))
        return both[: len(tokens)], both[len(tokens) :]


def _batch_dynamic(compiled: Callable, emulate_casts: bool, batch_args: int = 1) -> Callable:
    """One compiled graph for every batch size (a shard's last batch is smaller) and every scorer of
    the same precision; without it each new size recompiles, and Dynamo stops compiling after 8.
    ``emulate_casts`` keeps dtype round trips that Inductor would drop, for this scorer's
    compilations only (Inductor reads its config while it compiles, inside the call). Past Dynamo's
    recompile limit (graphs of one function, all scorers of a process together) the call raises
    instead of silently running eager, so that FirstCallFallback says so and ``options`` tells.
    ``batch_args``: how many leading arguments have the batch as their first dimension."""

    def forward(*args):
        for batched in args[:batch_args]:
            torch._dynamo.mark_dynamic(batched, 0)
        with torch._inductor.config.patch(emulate_precision_casts=emulate_casts), \
                torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            return compiled(*args)

    return forward


def warn_fallback(what: str, error: Exception, instead: str) -> None:
    """One line: what failed, the error's first line (a compiler's log follows it), what runs instead."""
    first = str(error).splitlines()[0] if str(error) else ""
    warnings.warn(f"{what} failed ({type(error).__name__}: {first}); using {instead}", stacklevel=3)


class FirstCallFallback:
    """``primary`` unless its first call fails, then ``fallback`` (with a warning) from then on:
    a compiler that cannot build a kernel on some machine must not stop a run, and the fallback
    computes the same numbers. Failures after a first success are raised."""

    def __init__(self, primary: Callable, fallback: Callable, what: str):
        self.primary, self.fallback, self.what, self.primary_ok = primary, fallback, what, None

    def __call__(self, *args):
        if self.primary_ok is False:
            return self.fallback(*args)
        if self.primary_ok:
            return self.primary(*args)
        try:
            out = self.primary(*args)
        except Exception as e:  # noqa: BLE001 - any compiler error; the fallback is exact
            warn_fallback(self.what, e, "the plain torch path")
            self.primary_ok = False
            return self.fallback(*args)
        self.primary_ok = True
        return out


class _TF32:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
