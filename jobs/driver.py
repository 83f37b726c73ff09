"""The driver: validate, plan shards, run them on Ray actors (one model replica each), aggregate, report.

Only shard specs go to the actors and only small summaries come back; rows go from the actors
straight to storage. A shard whose file is stored whole is done, so rerunning the same command
resumes. Retries come from Ray: actors restart after a crash (``max_restarts``) and their
in-flight shards are re-executed (``max_task_retries``).
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import pandas as pd

from jobs import aggregate, manifest, report
from jobs.config import RunConfig, plan_shards, resolve
from jobs.errors import ConfigError, RunFailed
from storage import Store, open_store
from storage.store import FORWARDED_ENV
from workers import models
from workers.shard import ShardSpec, ShardRunner

IN_FLIGHT_PER_ACTOR = 2  # one shard computing while the previous one encodes and uploads
CPU_THREADS_PER_ACTOR = 2


@dataclass
class ActorPlan:
    count: int
    num_gpus: float
    num_cpus: float
    device: str
    threads: Optional[int]


def run(cfg: RunConfig, pair_a: Optional[str] = None, pair_b: Optional[str] = None, tokens: Optional[str] = None,
        progress: bool = True) -> dict:
    """The whole run; returns the summary. ConfigError before any work for bad input."""
    store = open_store(cfg.out)
    store.check()
    model = models.load_model(cfg.model, "cpu")
    cfg = resolve(cfg, model, tokens, pair_a, pair_b)
    existing = manifest.check_compatible(store, cfg)
    if cfg.address:
        check_reachable(cfg.address)
    specs = plan_shards(cfg)
    ray = connect(cfg.address)
    actors = plan_actors(cfg, ray.cluster_resources())  # ConfigError before anything is written

    if existing is not None and cfg.overwrite and existing.get("config_hash") != cfg.config_hash:
        manifest.clear(store)
    manifest.write(store, cfg, len(specs), "running")
    write_vocab(store, models.token_strings(model))
    states = manifest.shard_states(store, cfg, specs)
    todo = states.missing + states.corrupt
    if todo:
        execute(ray, cfg, todo, actors, progress, already=len(states.done), total=len(specs))
    return finish(store, cfg, model)


def finish(store: Store, cfg: RunConfig, model=None) -> dict:
    """Aggregate every shard, draw the plots, write the report; mark the run complete.

    ``model`` (the driver's CPU copy) is needed for circuit scores with ``--heads``; loaded if absent."""
    states = manifest.shard_states(store, cfg)
    if states.missing or states.corrupt:
        raise RunFailed(f"{len(states.missing)} shards missing and {len(states.corrupt)} corrupt under {store.uri}")
    agg = aggregate.aggregate(store, cfg, read_vocab(store))
    if cfg.heads:
        aggregate.add_circuits(agg, model if model is not None else models.load_model(cfg.model, "cpu"))
    aggregate.write(store, agg)
    done = manifest.write(store, cfg, states.total, "complete")
    report.render(store, done, agg)
    return agg["summary"]


def write_vocab(store: Store, token_strings: list[str]) -> None:
    buffer = io.BytesIO()
    pd.DataFrame({"token": range(len(token_strings)), "token_str": token_strings}).to_parquet(buffer, index=False)
    store.put("vocab.parquet", buffer.getvalue())


def read_vocab(store: Store) -> list[str]:
    return pd.read_parquet(io.BytesIO(store.get("vocab.parquet")))["token_str"].tolist()


def check_reachable(address: str) -> None:
    """A TCP connect first: ray.init on a dead address retries for minutes."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach a Ray cluster at {address}: {exc.strerror or exc}") from None


def connect(address: Optional[str]):
    """Join ``address`` (or $RAY_ADDRESS, as inside a Ray Job); else start an embedded local cluster."""
    import ray

    if ray.is_initialized():
        return ray
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private in-process cluster needs no token
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)
    return ray


def plan_actors(cfg: RunConfig, resources: dict) -> ActorPlan:
    """One actor per GPU (or per ``--gpus-per-actor``); CPU actors where the cluster has no GPU."""
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if cfg.gpus_per_actor is not None and cfg.gpus_per_actor > gpus:
        raise ConfigError(f"--gpus-per-actor {cfg.gpus_per_actor:g} asks for more GPUs than the cluster has ({gpus:g})")
    if gpus > 0:
        per = cfg.gpus_per_actor or 1.0
        most = int(gpus // per + 1e-9)
        count = min(cfg.actors, most) if cfg.actors else most
        if cfg.actors and cfg.actors > most:
            raise ConfigError(f"--actors {cfg.actors} with {per:g} GPU each needs {cfg.actors * per:g} GPUs; the cluster has {gpus:g}")
        return ActorPlan(count, per, 1, "cuda", None)
    count = cfg.actors or max(1, int(cpus) // CPU_THREADS_PER_ACTOR)
    threads = max(1, int(cpus) // count)
    return ActorPlan(count, 0, min(threads, cpus / count), "cpu", threads)


def execute(ray, cfg: RunConfig, todo: list[ShardSpec], plan: ActorPlan, progress: bool, already: int,
            total: int) -> list[tuple[float, int]]:
    """Run ``todo`` on ``plan.count`` actors; returns (time, sequences) of each completed shard."""
    from tqdm import tqdm

    Runner = ray.remote(ShardRunner).options(
        num_gpus=plan.num_gpus, num_cpus=plan.num_cpus, max_restarts=-1, max_task_retries=-1,
        max_concurrency=IN_FLIGHT_PER_ACTOR,
        runtime_env={"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}})
    actors = [Runner.remote(cfg.work_params, cfg.out, plan.device, cfg.batch_size, plan.threads) for _ in range(plan.count)]
    queue, pending = deque(todo), {}

    def submit(actor) -> None:
        if queue:
            spec = queue.popleft()
            pending[actor.run.remote(spec)] = actor

    for actor in actors:
        for _ in range(IN_FLIGHT_PER_ACTOR):
            submit(actor)
    bar = tqdm(total=sum(s.n_sequences for s in todo), unit="seq", unit_scale=True, disable=not progress,
               desc=f"{plan.count} {plan.device} actor(s), shards {already}/{total}", mininterval=1.0)
    done, completed = already, []
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready[0])
            summary = ray.get(ready[0])
            done += 1
            bar.set_description(f"{plan.count} {plan.device} actor(s), shards {done}/{total}", refresh=False)
            bar.update(summary.sequences)
            completed.append((time.perf_counter(), summary.sequences))
            submit(actor)
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc
        raise RunFailed(f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}") from None
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    return completed
