"""Compiled kernels shared by a run's actors. The first actor that compiles stores torch.compiler's
cache artifacts (Inductor's graphs, Triton kernels, autotuning results) under the run's URI; the
others load them before their warm-up, so that one actor per run and machine type pays for the
compilation. On one machine Inductor's own on-disk cache (TORCHINDUCTOR_CACHE_DIR) already
serves later runs; this carries it across the nodes of a cluster.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import torch

from storage import Store


def cache_key(device: torch.device, precision: str, shapes: dict) -> str:
    """Artifacts are reused only by the same torch, device type, precision and model shapes."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    blob = json.dumps({"torch": torch.__version__, "gpu": gpu, "precision": precision, **shapes}, sort_keys=True)
    return f"cache/compile-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.bin"


def load(store: Store, key: str) -> bool:
    """Load stored artifacts into this process's caches; False where there are none (or they do not load)."""
    if not store.exists(key):
        return False
    try:
        return torch.compiler.load_cache_artifacts(store.get(key)) is not None
    except Exception as exc:  # noqa: BLE001 - a stale or foreign cache costs a compilation, not the run
        warnings.warn(f"compile cache {key} not loaded ({type(exc).__name__}); compiling", stacklevel=2)
        return False


def save(store: Store, key: str) -> bool:
    """Store what this process compiled, unless an earlier actor did."""
    if store.exists(key):
        return False
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return False
    store.put(key, artifacts[0])
    return True
