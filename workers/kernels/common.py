"""What every kernel module shares: whether Triton runs interpreted, and how autotuning is cached."""

from __future__ import annotations

import inspect
import os

# FMA contraction on, as every GPU figure was measured; Triton 3.10 turns it off by default
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402 - after the knob above

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # set before Triton is imported: kernels run on the CPU

# the tuning's result kept in Triton's on-disk cache where this Triton can (a later actor on the
# machine skips the configs' compilation and timing); older Tritons lack the option
AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
