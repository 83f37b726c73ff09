"""How many shards a second one driver absorbs: the real driver (jobs/driver.py run: pool, the
footer partials' decoding, progress, merging, aggregates, manifest) fed by stand-in actors.

The stand-ins replace only the model: each returns, for the spec it is sent, a shard summary whose
partials are a real shard's accumulator (workers/accumulator.py shard_partials of a token-powers
shard of the asked size, its tokens moved to the spec's), encoded as a footer holds it, at an offered
rate (--rate, shards/s over all stand-ins; 0: as fast as they are asked). They write no rows, so the
end of the run (aggregation, report) reads nothing from storage either. Prints the absorbed rate,
the driver's CPU and memory, and how many H200s that rate feeds on the post's model.

    python scripts/driver_ceiling.py --shard-size 1048576 --shards 600
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from jobs import driver, pool  # noqa: E402
from jobs.config import RunConfig, parse_experiments, plan_shards, resolve  # noqa: E402
from jobs.phases import Phases  # noqa: E402
from workers import experiments, models  # noqa: E402
from workers.accumulator import Accumulator, shard_partials  # noqa: E402
from workers.rows import ScoredBatch  # noqa: E402

# one H200 on the post's model (attn-only-2l, bf16): 2.65 M forwards/s (docs/PERFORMANCE.md), two per sequence pair
H200_SEQ_PER_S = 2.65e6 / 2
TARGET_GPUS = 64


def template(cfg: RunConfig, spec, seed: int = 0) -> Accumulator:
    """A real shard's partials for ``spec``: random log-odds through the real accumulator."""
    rng = np.random.default_rng(seed)
    experiment = experiments.get(spec.experiment)
    names = experiment.target_names(cfg.n_neighbors)
    tokens = np.arange(spec.token_lo, spec.token_hi)
    n = spec.n_sequences
    fixed = np.repeat(tokens, spec.seq_hi - spec.seq_lo)
    batch = ScoredBatch(fixed=fixed, seq=np.tile(np.arange(spec.seq_lo, spec.seq_hi), len(tokens)),
                        a=fixed, b=rng.integers(4, 1000, n), targets=rng.integers(4, 1000, (n, len(names))),
                        induction=rng.normal(0, 3, (n, len(names))).astype(np.float32),
                        shuffled=rng.normal(-5, 3, (n, len(names))).astype(np.float32))
    return shard_partials(experiment, spec.scenario, batch, names)


def partials_for(cfg: RunConfig, specs: list) -> dict[str, bytes]:
    """Every spec's partials: one real template per scenario, its tokens moved to each spec's."""
    templates, out = {}, {}
    for spec in specs:
        if spec.scenario not in templates:
            templates[spec.scenario] = (spec.token_lo, template(cfg, spec).frame)
        lo, frame = templates[spec.scenario]
        moved = frame.copy()
        per_token = moved["token"] >= 0
        moved.loc[per_token, "token"] += spec.token_lo - lo
        if spec.token_hi - spec.token_lo < frame.loc[per_token, "token"].nunique():  # the last, shorter shard
            moved = moved[~per_token | (moved["token"] < spec.token_hi)]
        out[spec.key] = Accumulator(moved.reset_index(drop=True)).to_bytes()
    return out


def stand_in(refs: dict, interval: float):
    """The actor class: ShardRunner's interface (``ready``, ``run``) without a model."""
    class StandIn:
        def __init__(self, *args):
            import socket

            self.host = socket.gethostname()

        def ready(self) -> dict:
            return {"device": "cpu", "host": self.host, "pid": os.getpid(), "loading": None, "check": None}

        def run(self, spec):
            import ray

            from workers.shard import ShardSummary

            start = time.perf_counter()
            partials = ray.get(refs[spec.key][0])
            time.sleep(max(0.0, interval - (time.perf_counter() - start)))
            return ShardSummary(spec.key, spec.n_sequences * 3, spec.n_sequences, 0.0, 0.0, partials)

    return StandIn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shard-size", type=int, default=1_048_576, help="sequences per shard (default %(default)s)")
    p.add_argument("--seqs", type=int, default=256, help="sequences per token (default %(default)s, the post's)")
    p.add_argument("--shards", type=int, default=600, help="shards in the run (token-powers, two scenarios)")
    p.add_argument("--actors", type=int, default=8, help="stand-in actors (default %(default)s)")
    p.add_argument("--rate", type=float, default=0.0, help="shards/s offered by all stand-ins (0: as fast as asked)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp = tempfile.mkdtemp(prefix="dc-", dir="/tmp")
    out = tempfile.mkdtemp(prefix="driver-ceiling-")
    info = models.describe("toy-2l")
    tokens_per_shard = max(1, args.shard_size // args.seqs)
    info.cfg.d_vocab = 4 + tokens_per_shard * args.shards // 2  # a vocabulary as large as the run needs
    cfg = resolve(RunConfig(model="toy-2l", out=out, experiments=parse_experiments("token-powers"), seqs=args.seqs,
                            shard_size=args.shard_size, actors=args.actors), info, "all")
    specs = plan_shards(cfg)
    t = time.perf_counter()
    partials = partials_for(cfg, specs)
    prepared_s = time.perf_counter() - t
    sizes = [len(b) for b in partials.values()]
    sample = list(partials.values())[:20]
    t = time.perf_counter()
    for data in sample:
        Accumulator.from_bytes(data)
    decode_ms = (time.perf_counter() - t) / len(sample) * 1e3

    ray.init(num_cpus=2 * args.actors, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    refs = {key: [ray.put(data)] for key, data in partials.items()}  # a list: Ray resolves no ref inside it
    del partials
    interval = pool.IN_FLIGHT_PER_ACTOR * args.actors / args.rate if args.rate else 0.0
    pool.Runner = stand_in(refs, interval)

    phases = Phases()
    samples, done = [], threading.Event()

    def sample() -> None:  # the driver process's CPU seconds over time (its threads and Ray's included)
        while not done.wait(0.05):
            use = resource.getrusage(resource.RUSAGE_SELF)
            samples.append((phases.now(), use.ru_utime + use.ru_stime))

    threading.Thread(target=sample, daemon=True).start()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    driver.run(cfg, info, progress=False, phases=phases)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    done.set()
    times = [t for t, _ in phases.completions]
    absorbed = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    during = [c for t, c in samples if times[0] <= t <= times[-1]]
    cpu_per_shard = (during[-1] - during[0]) / (len(times) - 1) if len(during) > 1 else float("nan")
    scoring = next((r["seconds"] for r in phases.rows if r["phase"] == "scoring"), None)
    cpu_s = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    per_gpu = H200_SEQ_PER_S / args.shard_size
    result = {
        "shards": len(specs), "shard_size": args.shard_size, "tokens_per_shard": tokens_per_shard,
        "partials_bytes_mean": round(float(np.mean(sizes))), "decode_ms": round(decode_ms, 2),
        "actors": args.actors, "offered_per_s": args.rate or None, "absorbed_per_s": round(absorbed, 1),
        "driver_cpu_s": round(cpu_s, 2), "driver_cpu_ms_per_shard": round(cpu_per_shard * 1e3, 3),
        "cpu_bound_per_s": round(1 / cpu_per_shard, 1), "run_s": round(phases.now(), 2), "scoring_s": scoring,
        "aggregation_s": next((r["seconds"] for r in phases.rows if r["phase"] == "aggregation"), None),
        "report_s": next((r["seconds"] for r in phases.rows if r["phase"] == "report"), None),
        "driver_max_rss_mib": round(cpu1.ru_maxrss / 1024), "prepare_s": round(prepared_s, 1),
        "h200_shards_per_s": round(per_gpu, 3), "h200s_fed": round(absorbed / per_gpu),
        "target_per_s": round(TARGET_GPUS * per_gpu * 10, 1),
    }
    result["ratio_to_target"] = round(absorbed / result["target_per_s"], 2)
    result["cpu_bound_ratio_to_target"] = round(result["cpu_bound_per_s"] / result["target_per_s"], 2)
    ray.shutdown()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['shards']} shards of {args.shard_size:,} sequences ({tokens_per_shard} tokens; partials "
              f"{result['partials_bytes_mean']:,} B, {decode_ms:.1f} ms to decode) from {args.actors} stand-in actors")
        print(f"absorbed {absorbed:,.1f} shards/s (offered: {args.rate or 'unlimited'}); driver CPU {cpu_s:.1f} s over "
              f"{result['run_s']:.1f} s, {result['driver_cpu_ms_per_shard']} ms a shard while they came in (a "
              f"driver with a core of its own: {result['cpu_bound_per_s']:,.0f} shards/s); "
              f"max RSS {result['driver_max_rss_mib']} MiB; aggregation "
              f"{result['aggregation_s']} s, report {result['report_s']} s")
        print(f"one H200 on the post's model finishes {per_gpu:.2f} shards/s of this size: this driver feeds "
              f"{result['h200s_fed']:,} of them; 10x 64 H200s is {result['target_per_s']} shards/s "
              f"(ratio {result['ratio_to_target']}; with a core of its own {result['cpu_bound_ratio_to_target']})")


if __name__ == "__main__":
    main()
