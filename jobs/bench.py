"""``induction-sweep bench``: the scorer against the post's plain loop, in the same run.

Plain loop: ``model(tokens)[:, -1].log_softmax(-1)``, fp32, batch 256 (full logits at every
position). Scorer: the project's path for the model (the compact forward where it computes the architecture)
at its best batch, for each precision. Every figure is a ratio to the plain loop measured in
this run; every error is the max |Δ strength| against a float64 TransformerLens forward on the
same tokens. A "sequence" is one 24-token forward (a strength needs two). Needs no Ray.
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import time
from collections.abc import Callable

import torch

from jobs.errors import ConfigError
from workers import experiments, models
from workers.fast import QUERY, TABLES, attentions
from workers.scoring import ACCURACY_BOUNDS, LSE, PRECISIONS, Scorer, compiles_by_default, fastest_path, logodds, runs_default
from workers.sequences import make_batch, sequence_keys

PLAIN_BATCH = 256
REFERENCE_SEQS = 256


def bench_batch(n: int, d_vocab: int, bos: int, device, offset: int = 0):
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


# in bench --json: earlier reports synced after every step (``synced_seq_per_s``: one step timed so)
TIMING = "back to back, one sync at the end"


def throughput(step: Callable[[], None], n_seqs: int, device: torch.device, seconds: float) -> tuple[float, float, float]:
    """(sequences per second, peak MB, sequences per second of one step synced on its own) of ``step``
    (``n_seqs`` forwards) repeated back to back, as a shard runs its batches: one sync at the end, so that
    Python launches each step while the GPU still runs the one before. (Synced after every step, call 7's
    bf16 step took 24.7 ms against 23.5 ms of kernels on an H200.) The synced step, after the warm-up,
    says how many steps fill ``seconds``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()  # warm-up (and compilation)
    sync()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        step()
        sync()
        once = time.perf_counter() - start
        count = max(2, math.ceil(seconds / once))
        start = time.perf_counter()
        for _ in range(count):
            step()
        sync()
        elapsed = time.perf_counter() - start
    return count * n_seqs / elapsed, mem.mb, n_seqs / once


def reference_strength(model, batch, device) -> torch.Tensor:
    """Strength on B from a float64 copy of the model's full forward."""
    ref = copy.deepcopy(model).to(torch.float64, print_details=False)
    out = []
    for tokens in (batch.tokens, batch.shuffled):
        logits = models.full_logits(ref, tokens)[:, -1]
        out.append(logodds(torch.log_softmax(logits, -1), batch.b[:, None])[:, 0])
    return out[0] - out[1]


TOKEN_POWERS_SEQS = 10_000 * 256 * 2 * 2  # the post's run: tokens × seqs × roles (A, B) × (induction, shuffled)
# Random-weight shapes (``--shape``): TransformerLens' configs of the hub models, biases and LayerNorm weights random too
SHAPES = {
    "attn-only-2l": {},
    "gelu-2l": dict(attn_only=False, d_mlp=2048, act_fn="gelu", positional_embedding_type="standard", n_ctx=1024),
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, act_fn="gelu_new", attn_only=False,
                       positional_embedding_type="standard", n_ctx=1024, d_vocab=50257),
}
DEFAULT_SHAPE = "attn-only-2l"
# per shape and device: × plain on a CPU, seq/s on CUDA (issues 11 and 13)
TARGETS = {"attn-only-2l": {"cpu": {"fp32": 10.0, "bf16": 25.0}, "cuda": {"tf32": 1.5e6, "bf16": 3.0e6}},
           "gelu-2l": {"cuda": {"bf16": 8.0e5}}, "gpt2-small": {"cuda": {"bf16": 6.5e4}}}
BOUNDS = ACCURACY_BOUNDS


def variants(device: torch.device, precision: str, attention: list[str] | None = None,
             transformer_lens: bool = False) -> list[dict]:
    """Scorer options to try: the attention of the layers before the last (SDPA or small products)
    and, on CUDA (compiled), the unembeddings of ``unembeddings``; on a CPU eager against
    torch.compile (Inductor's C++ backend).
    ``scoring.FASTEST`` holds the winners. ``transformer_lens``: also TransformerLens' path (a model
    with MLPs: what scored it before the compact forward took MLPs)."""
    if device.type == "cuda":
        compact = [{"compile": True, "attention": a, **k, **u} for a in attention or attentions(device)
                   for k in kernel_options(precision, a) for u in unembeddings(precision)]
    else:
        compact = [{"compile": c, "attention": a} for c in (False, True) for a in attention or attentions(device)]
    return compact + ([{"fast": False}] if transformer_lens else [])


def kernel_options(precision: str, attention: str) -> list[dict]:
    """CUDA's ways to the last layer's query side (torch's products; with the Triton attention under
    bf16, where torch's are full float32 on CUDA cores, also the Triton kernel's TF32 products) and
    layer 0's table (float32; with the Triton attention under bf16, also float16)."""
    if precision == "bf16" and attention == "triton":
        return [{"query": q, "table": t} for q in QUERY for t in TABLES]
    return [{"query": "torch", "table": "float32"}]


def only(options: list[dict], wanted: dict | None) -> list[dict]:
    """The variants whose options include every ``key: value`` of ``wanted`` (``--only``)."""
    return [o for o in options if all(k in o and o[k] == v for k, v in (wanted or {}).items())]


ONLY_KEYS = ("compile", "attention", "query", "table", "logits", "lse", "fast")  # the options of ``variants``


def parse_only(text: str) -> dict:
    """``--only logits=bf16,lse=triton,compile=false`` as options (true/false as booleans)."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ONLY_KEYS:
            raise ConfigError(f"--only {text!r}: give KEY=VALUE pairs of {', '.join(ONLY_KEYS)}")
        out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def unembeddings(precision: str) -> list[dict]:
    """CUDA's ways to the log-sum-exp: torch's logits (float32, and bf16 for bf16) reduced by torch
    (compiled) or by the Triton kernel."""
    logits = ["float32"] + (["bf16"] if precision == "bf16" else [])
    return [{"logits": x, "lse": r} for x in logits for r in LSE]


def profile_step(step: Callable[[], None], device: torch.device, rows: int = 24) -> str:
    """The busiest kernels (CUDA) or operators (CPU) of one step (12 rows left 2 ms of a 23.5-ms bf16
    step unnamed: ATen's eager copies and elementwise kernels)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def measure(model, precision: str, options: dict, sample, reference, batches, device, seconds: float,
            plain_rate: float, profile: bool) -> dict:
    """The scorer's error on the reference tokens, and its best throughput over ``batches``."""
    scorer = Scorer(model, precision, **options)
    ind, shuf = scorer.strength(sample.tokens, sample.shuffled, sample.b[:, None])
    err = float(((ind - shuf)[:, 0].double() - reference).abs().max())
    best, best_step = None, None
    d_vocab, bos = models.d_vocab(model), models.bos_id(model)
    for batch in batches:
        data = bench_batch(batch // 2, d_vocab, bos, device, offset=REFERENCE_SEQS)

        def step(data=data):
            scorer.strength(data.tokens, data.shuffled, data.b[:, None])

        try:
            rate, mem, synced = throughput(step, batch, device, seconds)
        except torch.OutOfMemoryError:
            break
        if best is None or rate > best["seq_per_s"]:
            best, best_step = {"precision": precision, **options, "path": scorer.path, "batch": batch, "seq_per_s": rate,
                               "ratio": rate / plain_rate, "synced_seq_per_s": synced, "max_abs_err_strength": err, "peak_mem_mb": mem,
                               "token_powers_s": TOKEN_POWERS_SEQS / rate}, step
    if best is None:
        raise ConfigError(f"--batches {batches[0]}: out of memory on {device} for {precision} {options}; give smaller batches")
    if profile:
        best["profile"] = profile_step(best_step, device)
    best.update(scorer.options)  # what ran, after any fallback from torch.compile or the Triton kernel
    if kernels := triton_kernels(best):
        # the autotuner's pick for the last shape it ran: the profiled (or the largest) batch
        best["triton_configs"] = {name: str(getattr(kernel, "best_config", None)) for name, kernel in kernels.items()}
    return best


def triton_kernels(options: dict) -> dict:
    """The Triton kernels (autotuners) a scorer with these options runs, by name."""
    kernels = {}
    if options.get("lse") == "triton":
        from workers.unembed_lse import _lse_kernel

        kernels["logits_lse"] = _lse_kernel
    if options.get("attention") == "triton":
        from workers.attention_kernels import _causal_attention_kernel, _last_attention_kernel

        kernels.update(causal_attention=_causal_attention_kernel, last_attention=_last_attention_kernel)
    if options.get("query") == "triton":
        from workers.attention_kernels import _query_kernel

        kernels["query_side"] = _query_kernel
    return kernels


def check(spec: str, device: torch.device, plan: dict[str, list[dict]]) -> list[dict]:
    """The error of each variant the bench runs (``plan``: per precision, narrowed as the bench is) on
    ``spec`` (toy-2l: sharp induction) against its float64 TransformerLens forward, eager (the compiled
    graphs are the bench's own, checked there on the random shape)."""
    model = models.load_model(spec, device)
    d_vocab, bos = models.d_vocab(model), models.bos_id(model)
    sample = bench_batch(REFERENCE_SEQS, d_vocab, bos, device)
    reference = reference_strength(model, sample, device)
    out = []
    for precision, chosen in plan.items():
        eager = [{k: v for k, v in options.items() if k != "compile"} for options in chosen]
        for options in [o for i, o in enumerate(eager) if o not in eager[:i]]:  # a CPU benches each eager and compiled
            scorer = Scorer(model, precision, compile=False, **options)
            ind, shuf = scorer.strength(sample.tokens, sample.shuffled, sample.b[:, None])
            err = float(((ind - shuf)[:, 0].double() - reference).abs().max())
            ran = {k: v for k, v in scorer.options.items() if k != "compiled"}
            out.append({"model": spec, "precision": precision, **scorer.options, "max_abs_err_strength": err,
                        "within": err <= BOUNDS[precision]})
            print(f"  check {spec} {precision:5} {json.dumps(ran)}: err {err:.1e} "
                  f"{'within' if out[-1]['within'] else 'OUTSIDE'} {BOUNDS[precision]}", flush=True)
    return out


def precisions(device: torch.device) -> list[str]:
    return [p for p in PRECISIONS if p != "tf32" or device.type == "cuda"]  # TF32 is a CUDA matmul mode


def fastest(results: list[dict], device: torch.device) -> dict:
    """Per precision, the fastest variant within its accuracy bound, and whether the scorer defaults to it
"""
    out = {}
    for precision in {r["precision"] for r in results}:
        ok = [r for r in results if r["precision"] == precision and r["max_abs_err_strength"] <= BOUNDS[precision]
              and r["path"] == "compact"]  # the variants are the compact forward's
        if ok:
            best = max(ok, key=lambda r: r["seq_per_s"])
            out[precision] = {k: best.get(k) for k in ("compiled", "attention", "query", "table", "logits", "lse", "seq_per_s")}
            out[precision]["default"] = runs_default(best, device)
    return out


def targets(shape: str | None, device: torch.device, results: list[dict]) -> dict:
    """Each target of the issues for this shape (none for a --model) and device: reached or not, with the figure."""
    out = {}
    for precision, goal in TARGETS.get(shape, {}).get(device.type, {}).items():
        rows = [r for r in results if r["precision"] == precision]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["seq_per_s"])
        figure = best["ratio"] if device.type == "cpu" else best["seq_per_s"]
        out[precision] = {"goal": goal, "figure": figure, "reached": figure >= goal,
                          "accurate": best["max_abs_err_strength"] <= BOUNDS[precision]}
    return out


def random_shape(shape: str, device: torch.device):
    overrides = dict(SHAPES[shape])
    model = models.random_model(d_vocab=overrides.pop("d_vocab", 48262), device=device, **overrides)
    model.cfg.model_name = shape
    return model


def main(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for given, known in ((args.precisions, precisions(device)), (args.attention, attentions(device))):
        if unknown := set(given or ()) - set(known):
            raise ConfigError(f"unknown {', '.join(sorted(unknown))} for {device.type}: choose from {', '.join(known)}")
    if args.shape and args.model:
        raise ConfigError("--shape benches random weights and --model a given model: give one of them")
    if (args.shape or DEFAULT_SHAPE) not in SHAPES:
        raise ConfigError(f"unknown --shape {args.shape!r}: choose from {', '.join(SHAPES)}")
    wanted = parse_only(args.only) if args.only else None
    # every variant is its own compiled graph of the same forward: more than Dynamo's default limit of 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    seconds = args.seconds or (2.0 if device.type == "cuda" else 3.0)
    shape = None if args.model else args.shape or DEFAULT_SHAPE
    model = models.load_model(args.model, device) if args.model else random_shape(shape, device)
    d_vocab, bos = models.d_vocab(model), models.bos_id(model)
    name = args.model or shape
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    with_mlps = models.compact_supported(model.cfg) and not model.cfg.attn_only
    plan = {p: only(variants(device, p, args.attention, transformer_lens=with_mlps), wanted)
            for p in args.precisions or precisions(device)}
    if missing := [p for p, chosen in plan.items() if not chosen]:
        raise ConfigError(f"--only {args.only}: no {', '.join(missing)} variant on {device.type} has these options")
    print(f"bench: {name} (d_model {model.cfg.d_model}, d_vocab {d_vocab}) on {gpu or device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)

    sample = bench_batch(REFERENCE_SEQS, d_vocab, bos, device)
    reference = reference_strength(model, sample, device)

    # the post's loop
    plain_tokens = bench_batch(PLAIN_BATCH, d_vocab, bos, device).tokens

    @torch.inference_mode()
    def plain_step():
        models.full_logits(model, plain_tokens)[:, -1].log_softmax(-1)

    plain_rate, plain_mem, plain_synced = throughput(plain_step, PLAIN_BATCH, device, seconds)
    with torch.inference_mode():
        plain_lp = [torch.log_softmax(models.full_logits(model, t)[:, -1], -1) for t in (sample.tokens, sample.shuffled)]
        plain_strength = logodds(plain_lp[0], sample.b[:, None])[:, 0] - logodds(plain_lp[1], sample.b[:, None])[:, 0]
    plain_err = float((plain_strength.double() - reference).abs().max())
    print(f"  plain loop  fp32  batch {PLAIN_BATCH:6d}: {plain_rate:12,.0f} seq/s   1.0x   err {plain_err:.1e}   "
          f"{plain_mem:8.0f} MB   (one step synced: {plain_synced:,.0f} seq/s)", flush=True)

    batches = args.batches or ([8192, 32768, 65536] if device.type == "cuda" else [256, 1024, 4096])
    results = []
    for precision, chosen in plan.items():
        for options in chosen:
            best = measure(model, precision, options, sample, reference, batches, device, seconds, plain_rate,
                           args.profile)
            results.append(best)
            ran = {k: best["compiled"] if k == "compile" else best.get(k, v) for k, v in options.items()}  # after any fallback
            print(f"  scorer {best['path']:>8} {precision:5} {json.dumps(ran):60} batch {best['batch']:6d}: "
                  f"{best['seq_per_s']:12,.0f} seq/s {best['ratio']:6.1f}x   err {best['max_abs_err_strength']:.1e}   "
                  f"{best['peak_mem_mb']:8.0f} MB   token-powers {best['token_powers_s']:,.1f} s   "
                  f"(one step synced: {best['synced_seq_per_s']:,.0f} seq/s)", flush=True)
            if "triton_configs" in best:
                print(f"    Triton tiles: {best['triton_configs']}", flush=True)
            if args.profile:
                print(best["profile"], flush=True)

    report = {"model": name, "device": gpu or str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "timing": TIMING,
              "plain_seq_per_s": plain_rate, "plain_max_abs_err_strength": plain_err, "plain_peak_mem_mb": plain_mem,
              "plain_synced_seq_per_s": plain_synced,
              "results": [{k: v for k, v in r.items() if k != "profile"} for r in results],
              "targets": targets(shape, device, results), "fastest": fastest(results, device),
              "defaults": {p: {"compiled": compiles_by_default(device), **fastest_path(device, p)} for p in precisions(device)}}
    if device.type != "cuda":
        report["gpu"] = ("not measured: no CUDA device here; run scripts/device/bench.sh on a GPU machine"
                         if not torch.cuda.is_available() else "not measured: --device cpu")
    for precision, t in report["targets"].items():
        print(f"  target {device.type} {precision}: {t['figure']:,.1f} against {t['goal']:,} "
              f"{'reached' if t['reached'] else 'NOT reached'}, accuracy {'within' if t['accurate'] else 'OUTSIDE'} "
              f"{BOUNDS[precision]}", flush=True)
    for precision, best in report["fastest"].items():
        default = report["defaults"][precision]
        print(f"  fastest {precision}: compiled {best['compiled']}, attention {best['attention']}, query {best['query']}, "
              f"table {best['table']}, logits {best['logits']}, lse {best['lse']} "
              f"({'the default' if best['default'] else f'default is {default}'})", flush=True)
    if args.check:
        report["checks"] = [r for spec in args.check for r in check(spec, device, plan)]
    if args.bias:
        from jobs.bench_bias import main as bias

        report["bias"] = bias(args.model, device.type, args.bias)
    if args.actors:  # needs Ray: imported only here
        from jobs.bench_actors import actor_scaling

        report["actors"] = scaling = actor_scaling(args.model or "toy-2l")
        print(f"  run on {scaling['model']}: 1 CPU actor {scaling['pairs_per_s_1_actor']:,.0f} pairs/s, 2 actors "
              f"{scaling['pairs_per_s_2_actors']:,.0f} pairs/s = {scaling['scaling']:.2f} x (2 x one actor)", flush=True)
    if args.json:
        print(json.dumps(report))
    return 0
