"""``induction-sweep bench``: the default scorer against the post's plain loop, in the same run.

Plain loop: ``model(tokens)[:, -1].log_softmax(-1)``, fp32, batch 256 (full logits at every
position). Scorer: ``Variant.default`` for the device and each precision, at its best batch. Every
figure is a ratio to the plain loop measured in this run; every error is the max |Δ strength|
against a float64 TransformerLens forward on the same tokens. A "forward" is one 24-token sequence
(a strength needs two). ``--json`` prints rates that ``plan --rates`` reads. Needs no Ray.
The variants, profiles and precision bias are developer tooling: scripts/bench_lab.py.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from jobs.errors import ConfigError
from jobs.inputs import integer, number
from workers import experiments
from workers.model import hooked, source
from workers.scoring.logodds import logodds
from workers.scoring.scorer import scorer_for
from workers.scoring.variant import PRECISIONS, Variant
from workers.sequences import make_batch, sequence_keys

PLAIN_BATCH = 256
REFERENCE_SEQS = 256
# Random-weight shapes (``--shape``): TransformerLens' configs of the hub models, biases and LayerNorm weights random too
SHAPES = {
    "attn-only-2l": {},
    "gelu-2l": dict(attn_only=False, d_mlp=2048, act_fn="gelu", positional_embedding_type="standard", n_ctx=1024),
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, act_fn="gelu_new", attn_only=False,
                       positional_embedding_type="standard", n_ctx=1024, d_vocab=50257),
    # EleutherAI/pythia-160m: rotary on a quarter of each head, attention and MLP in parallel
    "pythia-160m": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, act_fn="gelu", attn_only=False,
                        positional_embedding_type="rotary", rotary_dim=16, parallel_attn_mlp=True, n_ctx=2048, d_vocab=50304),
    # a Llama-shaped 1.2B model: RMSNorm, gated SiLU MLP, rotary, 4 query heads per key/value head
    "llama-1b": dict(n_layers=16, d_model=2048, n_heads=32, d_head=64, n_key_value_heads=8, d_mlp=8192, act_fn="silu",
                     gated_mlp=True, normalization_type="RMS", attn_only=False, positional_embedding_type="rotary",
                     rotary_base=500000, n_ctx=2048, d_vocab=32000),
}
BATCHES = {"cuda": [8192, 32768, 65536], "cpu": [256, 1024]}
SECONDS = {"cuda": 2.0, "cpu": 1.0}


def bench_batch(n: int, d_vocab: int, bos: int, device, offset: int = 0):
    """``n`` induction sequences (and their shuffled controls) in the sweep's layout, deterministic."""
    seq = torch.arange(offset, offset + n, device=device)
    keys = sequence_keys(12345, experiments.get("neighbors").code, 0, torch.full_like(seq, -1), seq)
    none = torch.full_like(seq, -1)
    return make_batch(keys, d_vocab, bos, none, none)


class PeakMemory:
    """Peak memory above the start: CUDA's allocator counter, or sampled RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.base = device, 0, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


TIMING = "back to back, one sync at the end"


def throughput(step: Callable[[], None], n_seqs: int, device: torch.device, seconds: float) -> tuple[float, float]:
    """(forwards per second, peak MB) of ``step`` (``n_seqs`` forwards) repeated back to back for about
    ``seconds``, as a shard runs its batches: one sync at the end, so that Python launches each step
    while the GPU still runs the one before. A first call warms up (and compiles); a second, timed
    alone, says how many steps fill ``seconds``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()
    sync()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        step()
        sync()
        count = max(2, math.ceil(seconds / (time.perf_counter() - start)))
        start = time.perf_counter()
        for _ in range(count):
            step()
        sync()
        elapsed = time.perf_counter() - start
    return count * n_seqs / elapsed, mem.mb


@torch.inference_mode()
def reference_strength(model, batch) -> torch.Tensor:
    """Strength on B from a float64 copy of TransformerLens' forward (the last position unembedded)."""
    ref = copy.deepcopy(model).to(torch.float64, print_details=False)
    lo = [logodds(hooked.last_logits(ref, t).double(), batch.b[:, None])[:, 0] for t in (batch.tokens, batch.shuffled)]
    return lo[0] - lo[1]


def random_shape(shape: str, device: torch.device, **scale):
    """Random weights of ``shape`` (``scale``: overrides such as fewer layers on a CPU)."""
    overrides = {**SHAPES[shape], **scale}
    model = hooked.random_model(d_vocab=overrides.pop("d_vocab", 48262), device=device, **overrides)
    model.cfg.model_name = shape
    return model


def model_shape(model) -> dict:
    """What ``plan`` scales a rate by (jobs/estimate.py flops_per_forward)."""
    c = source.resolved(model.cfg)
    return {"n_layers": c.n_layers, "d_model": c.d_model, "d_vocab": c.d_vocab, "d_mlp": 0 if c.attn_only else c.d_mlp}


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(args) -> int:
    if args.device not in (None, "cpu", "cuda"):
        raise ConfigError(f"--device {args.device!r}: choose cpu or cuda")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here")
    known = [p for p in PRECISIONS if p != "tf32" or device.type == "cuda"]  # TF32 is a CUDA matmul mode
    if unknown := set(args.precisions or ()) - set(known):
        raise ConfigError(f"unknown precision {', '.join(sorted(unknown))} on {device.type}: choose from {', '.join(known)}")
    if args.shape and args.model:
        raise ConfigError("--shape benches random weights and --model a given model: give one of them")
    if args.shape and args.shape not in SHAPES:
        raise ConfigError(f"unknown --shape {args.shape!r}: choose from {', '.join(SHAPES)}")
    spec = args.model or (None if args.shape else source.TOY_MODEL if device.type == "cpu" else None)
    shape = None if spec else args.shape or "attn-only-2l"
    precisions = args.precisions or known
    batches = [integer("--batches", b, 2, 1 << 24) for b in args.batches.split(",")] if args.batches else BATCHES[device.type]
    seconds = number("--seconds", args.seconds, 0, 3600) if args.seconds else SECONDS[device.type]
    layers = integer("--layers", args.layers, 1, 1000) if args.layers else None
    if layers and not shape:
        raise ConfigError("--layers scales a --shape's random weights; give --shape")

    model = hooked.load_model(spec, device) if spec else random_shape(shape, device, **({"n_layers": layers} if layers else {}))
    name, d_vocab, bos = spec or shape, hooked.d_vocab(model), hooked.bos_id(model)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    steps = 1 + len(precisions)
    print(f"bench: {name} (layers {model.cfg.n_layers}, d_model {model.cfg.d_model}, d_vocab {d_vocab}) on {gpu or device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {steps} measurements of about {seconds:g} s "
          f"x {len(batches)} batches", flush=True)
    sample = bench_batch(REFERENCE_SEQS, d_vocab, bos, device)
    reference = reference_strength(model, sample)

    plain_batch = min(PLAIN_BATCH, *batches)  # the post's 256 sequences, or fewer where only smaller batches are benched
    plain_tokens = bench_batch(plain_batch, d_vocab, bos, device).tokens

    @torch.inference_mode()
    def plain_step():
        hooked.full_logits(model, plain_tokens)[:, -1].log_softmax(-1)

    plain_rate, plain_mem = throughput(plain_step, plain_batch, device, seconds)
    print(f"  [1/{steps}] plain loop fp32 batch {plain_batch}: {plain_rate:,.0f} forwards/s, {plain_mem:,.0f} MB", flush=True)

    results = []
    for i, precision in enumerate(precisions, start=2):
        scorer = scorer_for(model, precision)
        ind, shuf = scorer.strength(sample.tokens, sample.shuffled, sample.b[:, None])
        err = float(((ind - shuf)[:, 0].double() - reference).abs().max())
        best = None
        for batch in batches:
            data = bench_batch(batch // 2, d_vocab, bos, device, offset=REFERENCE_SEQS)
            try:
                rate, mem = throughput(lambda data=data, scorer=scorer: scorer.strength(data.tokens, data.shuffled, data.b[:, None]),
                                       batch, device, seconds)
            except torch.OutOfMemoryError:
                break
            if best is None or rate > best["forwards_per_s"]:
                best = {"batch": batch, "forwards_per_s": rate, "peak_mem_mb": mem}
        if best is None:
            raise ConfigError(f"--batches {batches[0]}: out of memory on {device} at {precision}; give smaller batches")
        bound = Variant.default(device.type, precision).bound
        results.append({"precision": precision, "path": scorer.path, **scorer.options, **best,
                        "ratio": best["forwards_per_s"] / plain_rate, "max_abs_err_strength": err, "bound": bound})
        print(f"  [{i}/{steps}] scorer {precision} {scorer.path} {json.dumps(scorer.options)} batch {best['batch']}: "
              f"{best['forwards_per_s']:,.0f} forwards/s = {results[-1]['ratio']:.1f} x plain, "
              f"error {err:.1e} ({'within' if err <= bound else 'OUTSIDE'} {bound:g}), {best['peak_mem_mb']:,.0f} MB", flush=True)

    report = {"model": name, "shape": model_shape(model), "device": device.type, "gpu": gpu, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "commit": commit(), "timing": TIMING, "plain_forwards_per_s": plain_rate,
              "plain_batch": plain_batch, "results": results,
              "rates": [{"device": device.type, "precision": r["precision"], "forwards_per_s": r["forwards_per_s"],
                         "shape": model_shape(model), "model": name, "machine": gpu or f"{torch.get_num_threads()}-thread CPU",
                         "commit": commit()} for r in results if r["max_abs_err_strength"] <= r["bound"]]}
    if args.json:
        print(json.dumps(report))
    return 0
