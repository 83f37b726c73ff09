"""Developer tooling: every scorer variant against the plain loop, with errors, Triton tiles and profiles.

    python scripts/bench_lab.py [--model M | --shape S] [--device cuda] [--precisions bf16,tf32]
        [--only attention=triton,lse=triton,compiled=true] [--check toy-2l] [--profile] [--bias TOKENS] [--actors] [--json]

The product's ``induction-sweep bench`` measures the default variant only (workers/scoring/variant.py
``Variant.default``); this measures the others, so that the default follows the figures
(docs/PERFORMANCE.md). Needs no Ray (but ``--actors``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.bench import (  # noqa: E402
    BATCHES,
    PLAIN_BATCH,
    REFERENCE_SEQS,
    SECONDS,
    SHAPES,
    bench_batch,
    random_shape,
    reference_strength,
    throughput,
)
from workers.model import hooked, source  # noqa: E402
from workers.scoring.scorer import scorer_for  # noqa: E402
from workers.scoring.variant import ATTENTIONS, LSES, PRECISIONS, Variant  # noqa: E402

ONLY_KEYS = ("compiled", "attention", "lse", "fast")


def variants(device: torch.device, precision: str, transformer_lens: bool = False) -> list[dict]:
    """The options to try: on CUDA every attention and log-sum-exp, compiled; on a CPU (no Triton but
    under its interpreter) SDPA and products, eager and compiled. ``transformer_lens``: its path too."""
    if device.type == "cuda":
        out = [{"compiled": True, "attention": a, "lse": r} for a, r in itertools.product(ATTENTIONS, LSES)]
    else:
        out = [{"compiled": c, "attention": a, "lse": "torch"} for c, a in itertools.product((False, True), ("sdpa", "products"))]
    return out + ([{"fast": False}] if transformer_lens else [])


def parse_only(text: str) -> dict:
    """``--only lse=triton,compiled=false`` as options (true/false as booleans)."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ONLY_KEYS:
            sys.exit(f"--only {text!r}: give KEY=VALUE pairs of {', '.join(ONLY_KEYS)}")
        out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def triton_kernels(options: dict) -> dict:
    """The Triton kernels (autotuners) a scorer with these options runs, by name."""
    kernels = {}
    if options.get("lse") == "triton":
        from workers.kernels.unembed_lse import _lse_kernel

        kernels["logits_lse"] = _lse_kernel
    if options.get("attention") == "triton":
        from workers.kernels.attention import _causal_attention_kernel, _last_attention_kernel

        kernels.update(causal_attention=_causal_attention_kernel, last_attention=_last_attention_kernel)
    return kernels


def profile_step(step: Callable[[], None], device: torch.device, rows: int = 24) -> str:
    """The busiest kernels (CUDA) or operators (CPU) of one step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def scorer_of(model, precision: str, options: dict):
    if options.get("fast") is False:
        return scorer_for(model, precision, fast=False)
    return scorer_for(model, precision, compile=options["compiled"], attention=options["attention"], lse=options["lse"])


def measure(model, precision, options, sample, reference, batches, device, seconds, plain_rate, profile) -> dict:
    scorer = scorer_of(model, precision, options)
    ind, shuf = scorer.strength(sample.tokens, sample.shuffled, sample.b[:, None])
    err = float(((ind - shuf)[:, 0].double() - reference).abs().max())
    best, best_step = None, None
    for batch in batches:
        data = bench_batch(batch // 2, hooked.d_vocab(model), hooked.bos_id(model), device, offset=REFERENCE_SEQS)

        def step(data=data):
            scorer.strength(data.tokens, data.shuffled, data.b[:, None])

        try:
            rate, mem = throughput(step, batch, device, seconds)
        except torch.OutOfMemoryError:
            break
        if best is None or rate > best["forwards_per_s"]:
            best, best_step = {"batch": batch, "forwards_per_s": rate, "peak_mem_mb": mem}, step
    best = {"precision": precision, "path": scorer.path, **scorer.options, **best, "ratio": best["forwards_per_s"] / plain_rate,
            "max_abs_err_strength": err, "default": scorer.path == "compact" and scorer.variant == Variant.default(device.type, precision)}
    if profile:
        print(profile_step(best_step, device), flush=True)
    if kernels := triton_kernels(scorer.options):
        best["triton_configs"] = {name: str(getattr(kernel, "best_config", None)) for name, kernel in kernels.items()}
    return best


def check(spec: str, device: torch.device, plan: dict[str, list[dict]]) -> list[dict]:
    """The error of each variant (eager) on ``spec`` (toy-2l: sharp induction) against its float64 forward."""
    model = hooked.load_model(spec, device)
    sample = bench_batch(REFERENCE_SEQS, hooked.d_vocab(model), hooked.bos_id(model), device)
    reference = reference_strength(model, sample)
    out = []
    for precision, chosen in plan.items():
        eager = [{**o, "compiled": False} for o in chosen]
        for options in [o for i, o in enumerate(eager) if o not in eager[:i]]:
            scorer = scorer_of(model, precision, options)
            ind, shuf = scorer.strength(sample.tokens, sample.shuffled, sample.b[:, None])
            err = float(((ind - shuf)[:, 0].double() - reference).abs().max())
            bound = Variant.default(device.type, precision).bound
            out.append({"model": spec, "precision": precision, **scorer.options, "max_abs_err_strength": err, "within": err <= bound})
            verdict = "within" if err <= bound else "OUTSIDE"
            print(f"  check {spec} {json.dumps(scorer.options)}: err {err:.1e} {verdict} {bound}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--shape", choices=list(SHAPES))
    p.add_argument("--layers", type=int)
    p.add_argument("--device")
    p.add_argument("--precisions", type=lambda v: v.split(","))
    p.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")])
    p.add_argument("--seconds", type=float)
    p.add_argument("--only", type=parse_only)
    p.add_argument("--check", action="append", default=[], metavar="MODEL")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--bias", type=int, default=0, metavar="TOKENS", help="bf16 (and tf32) powers' bias against fp32")
    p.add_argument("--actors", action="store_true", help="1 and 2 CPU actors through Ray")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # every variant is a graph
    seconds, batches = args.seconds or SECONDS[device.type], args.batches or BATCHES[device.type]
    spec = args.model or (None if args.shape else source.TOY_MODEL if device.type == "cpu" else None)
    shape = None if spec else args.shape or "attn-only-2l"
    model = hooked.load_model(spec, device) if spec else random_shape(shape, device, **({"n_layers": args.layers} if args.layers else {}))
    with_mlps = not model.cfg.attn_only
    precisions = args.precisions or [q for q in PRECISIONS if q != "tf32" or device.type == "cuda"]
    plan = {q: [o for o in variants(device, q, with_mlps) if all(o.get(k) == v for k, v in (args.only or {}).items())]
            for q in precisions}
    sample = bench_batch(REFERENCE_SEQS, hooked.d_vocab(model), hooked.bos_id(model), device)
    reference = reference_strength(model, sample)
    plain_tokens = bench_batch(PLAIN_BATCH, hooked.d_vocab(model), hooked.bos_id(model), device).tokens

    @torch.inference_mode()
    def plain_step():
        hooked.full_logits(model, plain_tokens)[:, -1].log_softmax(-1)

    plain_rate, _ = throughput(plain_step, PLAIN_BATCH, device, seconds)
    print(f"lab: {spec or shape} on {device}: plain loop {plain_rate:,.0f} forwards/s", flush=True)
    results = []
    for precision, chosen in plan.items():
        for options in chosen:
            r = measure(model, precision, options, sample, reference, batches, device, seconds, plain_rate, args.profile)
            results.append(r)
            print(f"  {precision:5} {r['path']:16} {json.dumps({k: r.get(k) for k in ONLY_KEYS if k in r}):60} batch {r['batch']:6d}: "
                  f"{r['forwards_per_s']:12,.0f} forwards/s {r['ratio']:6.1f}x  err {r['max_abs_err_strength']:.1e}"
                  f"{'  (default)' if r['default'] else ''}", flush=True)
    report = {"model": spec or shape, "device": device.type, "plain_forwards_per_s": plain_rate, "results": results}
    if args.check:
        report["checks"] = [r for s in args.check for r in check(s, device, plan)]
    if args.bias:
        from scripts.bench_bias import main as bias

        report["bias"] = bias(args.model, device.type, args.bias)
    if args.actors:
        from scripts.bench_actors import actor_scaling

        report["actors"] = actor_scaling(args.model or source.TOY_MODEL)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
