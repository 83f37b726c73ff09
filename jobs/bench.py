"""``induction-sweep bench``: the scorer against the post's plain loop, in the same run.

Plain loop: ``model(tokens)[:, -1].log_softmax(-1)``, fp32, batch 256 (full logits at every
position). Scorer: the project's path for the model (compact forward for attention-only models)
at its best batch, for each precision. Every figure is a ratio to the plain loop measured in
this run; every error is the max |Δ strength| against a float64 TransformerLens forward on the
same tokens. A "sequence" is one 24-token forward (a strength needs two). Needs no Ray.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from typing import Callable

import torch

from workers import models
from workers.scoring import PRECISIONS, Scorer, logodds
from workers.sequences import make_batch, sequence_keys

PLAIN_BATCH = 256
REFERENCE_SEQS = 256


def bench_batch(n: int, d_vocab: int, bos: int, device, offset: int = 0):
    seq = torch.arange(offset, offset + n, device=device)
    keys = sequence_keys(12345, "neighbors", 0, torch.full_like(seq, -1), seq)
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


def throughput(step: Callable[[], None], n_seqs: int, device: torch.device, seconds: float) -> tuple[float, float]:
    """(sequences per second, peak MB) of repeating ``step``, which scores ``n_seqs`` forwards."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()  # warm-up (and compilation)
    sync()
    with PeakMemory(device) as mem:
        start, count = time.perf_counter(), 0
        while True:
            step()
            count += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and count >= 2:
                break
    return count * n_seqs / elapsed, mem.mb


def reference_strength(model, batch, device) -> torch.Tensor:
    """Strength on B from a float64 copy of the model's full forward."""
    ref = copy.deepcopy(model).to(torch.float64)
    out = []
    for tokens in (batch.tokens, batch.shuffled):
        logits = models.full_logits(ref, tokens)[:, -1]
        out.append(logodds(torch.log_softmax(logits, -1), batch.b[:, None])[:, 0])
    return out[0] - out[1]


def main(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seconds = args.seconds or (2.0 if device.type == "cuda" else 3.0)
    model = models.load_model(args.model, device) if args.model else models.random_model(device=device)
    d_vocab, bos = models.d_vocab(model), models.bos_id(model)
    name = args.model or model.cfg.model_name
    print(f"bench: {name} (d_model {model.cfg.d_model}, d_vocab {d_vocab}) on {device}, {torch.get_num_threads()} threads",
          flush=True)

    sample = bench_batch(REFERENCE_SEQS, d_vocab, bos, device)
    reference = reference_strength(model, sample, device)

    # the post's loop
    plain_tokens = bench_batch(PLAIN_BATCH, d_vocab, bos, device).tokens

    @torch.inference_mode()
    def plain_step():
        models.full_logits(model, plain_tokens)[:, -1].log_softmax(-1)

    plain_rate, plain_mem = throughput(plain_step, PLAIN_BATCH, device, seconds)
    with torch.inference_mode():
        plain_lp = [torch.log_softmax(models.full_logits(model, t)[:, -1], -1) for t in (sample.tokens, sample.shuffled)]
        plain_strength = logodds(plain_lp[0], sample.b[:, None])[:, 0] - logodds(plain_lp[1], sample.b[:, None])[:, 0]
    plain_err = float((plain_strength.double() - reference).abs().max())
    print(f"  plain loop  fp32  batch {PLAIN_BATCH:6d}: {plain_rate:12,.0f} seq/s   1.0x   err {plain_err:.1e}   "
          f"{plain_mem:8.0f} MB", flush=True)

    batches = [8192, 32768, 65536] if device.type == "cuda" else [256, 1024, 4096]
    results = []
    for precision in PRECISIONS:
        if precision == "tf32" and device.type != "cuda":
            continue  # TF32 is a CUDA matmul mode; on a CPU it is fp32
        scorer = Scorer(model, precision)
        ind, shuf = scorer.strength(sample.tokens, sample.shuffled, sample.b[:, None])
        err = float(((ind - shuf)[:, 0].double() - reference).abs().max())
        best = None
        for batch in batches:
            data = bench_batch(batch // 2, d_vocab, bos, device, offset=REFERENCE_SEQS)
            targets = data.b[:, None]

            def step():
                scorer.strength(data.tokens, data.shuffled, targets)

            try:
                rate, mem = throughput(step, batch, device, seconds)
            except torch.OutOfMemoryError:
                break
            if best is None or rate > best["seq_per_s"]:
                best = {"precision": precision, "batch": batch, "seq_per_s": rate, "ratio": rate / plain_rate,
                        "max_abs_err_strength": err, "peak_mem_mb": mem, "path": scorer.path}
        results.append(best)
        print(f"  scorer {best['path']:>8} {precision:5} batch {best['batch']:6d}: {best['seq_per_s']:12,.0f} seq/s "
              f"{best['ratio']:6.1f}x   err {err:.1e}   {best['peak_mem_mb']:8.0f} MB", flush=True)
        del scorer

    report = {"model": name, "device": str(device), "threads": torch.get_num_threads(), "plain_seq_per_s": plain_rate,
              "plain_max_abs_err_strength": plain_err, "plain_peak_mem_mb": plain_mem, "results": results}
    if args.actors:  # needs Ray: imported only here
        from jobs.bench_actors import actor_scaling

        report["actors"] = scaling = actor_scaling(args.model or "toy-2l")
        print(f"  run on {scaling['model']}: 1 CPU actor {scaling['pairs_per_s_1_actor']:,.0f} pairs/s, 2 actors "
              f"{scaling['pairs_per_s_2_actors']:,.0f} pairs/s = {scaling['scaling']:.2f} x (2 x one actor)", flush=True)
    if args.json:
        print(json.dumps(report))
    return 0
