"""``scripts/bench_lab.py --actors``: is the driver a bottleneck? Run throughput with 1 and 2 single-threaded CPU
actors on the same scorer, through the real driver (Ray, shards, Parquet, local storage)."""

from __future__ import annotations

import os
import tempfile

from jobs import driver
from jobs.config import RunConfig, plan_shards, resolve
from jobs.phases import Phases
from jobs.pool import ActorPlan, ActorPool
from workers.model import source


def steady_rate(completed: list[tuple[float, int]], actors: int) -> float:
    """Sequences per second once every actor has delivered its first shard (start-up excluded)."""
    times = [t for t, _ in completed]
    return sum(n for _, n in completed[actors:]) / (times[-1] - times[actors - 1])


def actor_scaling(model: str, tokens: int = 256, seqs: int = 256, shard_size: int = 8192) -> dict:
    """Steady sequence pairs/s with 1 and 2 actors, and their ratio to twice the single actor."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray = driver.connect(None)
    rates = {}
    for count in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            cfg = RunConfig(model=model, out=out, experiments=("token-powers",), seqs=seqs, shard_size=shard_size,
                            precision="fp32")
            cfg = resolve(cfg, source.describe(model), str(tokens))
            specs, phases = plan_shards(cfg), Phases()
            pool = ActorPool(ray, cfg, ActorPlan(count, 0, 1, 1, {}, count))
            try:
                for _ in pool.execute(specs, phases, phases.now(), False, 0, len(specs)):
                    pass
            finally:
                pool.kill()
            rates[count] = steady_rate(phases.completions, count)
    return {"model": model, "pairs_per_s_1_actor": rates[1], "pairs_per_s_2_actors": rates[2],
            "scaling": rates[2] / (2 * rates[1])}
