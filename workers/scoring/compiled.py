"""torch.compile around the scorer's functions, with the fallbacks that keep a run going where a
compiler cannot build on some machine (the fallback computes the same numbers)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def batch_dynamic(fn: Callable, emulate_casts: bool, batch_args: int = 1) -> Callable:
    """``fn`` compiled once for every batch size (a shard's last batch is smaller) and every scorer of
    the same precision; without it each new size recompiles, and Dynamo stops compiling after 8.
    ``emulate_casts`` keeps dtype round trips that Inductor would drop (emulated bf16 on a CPU), for
    this function's compilations only (Inductor reads its config while it compiles, inside the call).
    Past Dynamo's recompile limit the call raises instead of silently running eager, so that
    FirstCallFallback says so. ``batch_args``: how many leading arguments have the batch first."""
    compiled = torch.compile(fn)

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
    """``primary`` unless its first call fails, then ``fallback`` (with a warning) from then on.
    Failures after a first success are raised."""

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


class TF32:
    """TF32 products only where asked for: fp32 means full float32 products on every device."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
