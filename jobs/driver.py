"""The driver: start the actors, plan shards while they load, run the shards, merge their partial
aggregates, report.

Only shard specs go to the actors and only small summaries (with each shard's partial aggregates)
come back; rows go from the actors straight to storage. A shard whose file is stored whole is
done, so rerunning the same command resumes, merging the kept shards' partials from their
footers. The actors are an elastic pool (jobs/pool.py): a lost actor's shards go to the others
and a replacement is asked for.
"""

from __future__ import annotations

import importlib
import io
import os
import signal
import sys
import threading
from dataclasses import replace

import pandas as pd

from jobs import aggregate, manifest
from jobs.config import RunConfig, plan_shards
from jobs.errors import ConfigError, RunFailed, Terminated
from jobs.inputs import redact
from jobs.phases import Phases
from jobs.pool import ActorPool, failure, plan_actors, reachable_resources
from storage import Store, open_store
from storage.store import TMP_DIR
from workers import experiments
from workers.accumulator import Accumulator, shard_partials
from workers.model import source
from workers.rows import ScoredBatch
from workers.scoring.variant import resolve_precision
from workers.work import ShardSpec


def run(cfg: RunConfig, info: source.ModelInfo | None = None, progress: bool = True,
        phases: Phases | None = None) -> aggregate.Summary:
    """The whole run of a resolved config (jobs/config.py resolve); ConfigError before any work for bad input."""
    phases = phases or Phases()
    info = info or source.describe(cfg.model)
    token_strings = info.token_strings()
    store = open_store(cfg.out)
    with phases.phase("ray start"):
        ray = connect(cfg.address)
        plan = plan_actors(cfg, ray.cluster_resources(), reachable_resources(ray))  # ConfigError before any write
    if plan.count > plan.fit_now:
        print(f"induction-sweep: {plan.count} actors asked for, room for {plan.fit_now} now; the rest are "
              "pending (the autoscaler's demand) and join as the cluster grows", file=sys.stderr, flush=True)
    # ``auto`` resolved where the cluster's devices are known: the config hash names the precision that runs
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, plan.device))
    existing = manifest.check_compatible(store, cfg)
    requested = phases.now()
    pool = ActorPool(ray, cfg, plan)  # the actors import and load while the driver plans
    # the report's plotting library loads while the driver waits on the actors (ray.wait frees the GIL)
    threading.Thread(target=importlib.import_module, args=("jobs.report",), daemon=True).start()

    specs: list[ShardSpec] = []
    try:
        with phases.phase("plan"):
            specs = plan_shards(cfg)
            if existing is not None and cfg.overwrite:
                manifest.clear(store)
                existing = None
            manifest.write(store, cfg, len(specs), "running")
            write_vocab(store, token_strings)
            states = manifest.shard_states(store, cfg, specs)
        merges = BlockMerge(specs, ray.remote(num_cpus=1, max_retries=3)(merge_block).remote)
        for key, data in states.partials.items():  # kept shards
            merges.add(key, data)
        todo = states.missing + states.corrupt
        circuits = wants_circuits(cfg)
        if todo or circuits:  # each shard's partials go to its block's merge, away from the driver
            for summary in pool.execute(todo, phases, requested, progress, len(states.done), len(specs),
                                        sum(s.n_sequences for s in states.done)):
                merges.add(summary.key, summary.partials)
                if summary.nonfinite:  # fails now: the rest of the run cannot make it valid
                    raise nonfinite_failure(summary.nonfinite, summary.nonfinite_example, summary.key)
        scores = None
        if circuits:
            with phases.phase("circuits"):
                try:
                    scores = ray.get(pool.any_ready().circuit_scores.remote(circuit_tokens(cfg)))
                except Exception as exc:  # an actor lost here, or its error: rerunning resumes
                    raise RunFailed(failure(exc)) from None
        pool.kill()
        with phases.phase("merge"):
            merged = merges.result(ray.get)
        return finish(store, cfg, merged, len(specs), scores, phases, token_strings,
                      model_loading=phases.model_loading or (existing or {}).get("model_loading"),
                      load_checks=phases.load_checks or (existing or {}).get("load_checks"))
    except BaseException as exc:
        pool.kill()
        if specs:  # the manifest says "running": it says what stopped it instead
            mark_failed(store, cfg, len(specs), exc, phases, existing)
        raise


def mark_failed(store: Store, cfg: RunConfig, n_shards: int, exc: BaseException, phases: Phases, existing: dict | None) -> None:
    """The manifest of a run the driver stopped on ``exc``: status "failed" and the reason (status shows
    it; rerunning the same command resumes). A store that cannot take it leaves the "running" one."""
    reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) if isinstance(exc, Terminated | ConfigError | RunFailed) \
        else f"{type(exc).__name__}: {exc}"
    failed = {"reason": reason.splitlines()[0][:500] if reason else type(exc).__name__, **getattr(exc, "details", {})}
    try:
        manifest.write(store, cfg, n_shards, "failed", failure=failed, phases=phases.as_dict(),
                       model_loading=phases.model_loading or (existing or {}).get("model_loading"),
                       load_checks=phases.load_checks or (existing or {}).get("load_checks"))
    except Exception:  # noqa: BLE001 - storage down: the original error is the one to report
        pass


def nonfinite_failure(count: int, example: dict | None, where: str) -> RunFailed:
    """A run with strengths that are not finite: it fails, naming how many and the first, in the message
    and (``details``) the manifest. Rerunning gives the same numbers."""
    first = ", ".join(f"{k} {v}" for k, v in (example or {}).items())
    exc = RunFailed(f"{count} strength(s) are not finite ({where}; the first: {first}); no aggregate is written. Rerunning "
                    "gives the same: score in fp32 (--precision fp32) or report the model", resumable=False)
    exc.details = {"nonfinite": {"count": count, "example": example, "where": where}}
    return exc


MERGE_BLOCK = 64  # consecutive shards of the plan whose partials are merged together, away from the driver


def merge_block(parts: list[bytes]) -> bytes:
    """The merge of a block's encoded partials, in their order, encoded (a Ray task during a run)."""
    return Accumulator.merge([Accumulator.from_bytes(p) for p in parts]).to_bytes()


class BlockMerge:
    """The run's aggregate, merged in a fixed tree: blocks of MERGE_BLOCK consecutive shards of the
    plan, each merged in plan order as soon as all its shards are in (by ``remote``, a Ray task, so the
    driver only passes bytes on; the last block on the driver), then the blocks in order. A resumed run
    and ``report`` merge the same blocks the same way, so their aggregates equal an undisturbed run's bit
    for bit."""

    def __init__(self, specs: list[ShardSpec], remote=None):
        self.blocks = [[s.key for s in specs[i:i + MERGE_BLOCK]] for i in range(0, len(specs), MERGE_BLOCK)]
        self.block_of = {key: i for i, keys in enumerate(self.blocks) for key in keys}
        self.waiting: list[dict[str, bytes]] = [{} for _ in self.blocks]
        self.merged: list = [None] * len(self.blocks)  # a block's merged bytes, or the ref of its Ray task
        self.open = len(self.blocks)  # blocks with shards still to come
        self.remote = remote or merge_block

    def add(self, key: str, data: bytes) -> None:
        i = self.block_of[key]
        self.waiting[i][key] = data
        if self.merged[i] is None and len(self.waiting[i]) == len(self.blocks[i]):
            parts = [self.waiting[i][k] for k in self.blocks[i]]
            self.open -= 1
            # the run's last block merges here: the driver waits on it anyway, and a task's worker starts in ~1 s
            self.merged[i] = merge_block(parts) if self.open == 0 else self.remote(parts)
            self.waiting[i] = {}

    def result(self, get=None) -> Accumulator:
        missing = sum(m is None for m in self.merged)
        if missing:
            raise RunFailed(f"{missing} blocks of shards have no partials to merge")
        blocks = [m if isinstance(m, bytes) else get(m) for m in self.merged]
        return Accumulator.merge([Accumulator.from_bytes(b) for b in blocks])


def finish(store: Store, cfg: RunConfig, merged: Accumulator, n_shards: int, circuit_scores: dict | None, phases: Phases,
           token_strings: list[str] | None = None, model_loading: dict | None = None,
           load_checks: list | None = None) -> aggregate.Summary:
    """From the run's merged partials (BlockMerge): derive and write the aggregates, draw the report;
    mark the run complete with its phase breakdown."""
    with phases.phase("aggregation"):
        count, example = merged.nonfinite()
        if count:
            raise nonfinite_failure(count, example, "the stored shards")
        agg = aggregate.derive(merged, cfg, token_strings or read_vocab(store))
        if circuit_scores is not None:
            aggregate.add_circuits(agg, circuit_scores)
        agg.write(store)
    done = manifest.build(cfg, n_shards, "complete", model_loading=model_loading, load_checks=load_checks,
                          phases=phases.as_dict(), **neighbors_definition(cfg))
    with phases.phase("report"):
        from jobs import report  # matplotlib (already imported in the background during a run)

        report.render(store, done, agg)
    manifest.put(store, {**done, "phases": phases.as_dict()})  # the report's own phase included
    store.delete_prefix(TMP_DIR)  # a local store's in-flight writes (none are left in flight now)
    return agg.summary


def neighbors_definition(cfg: RunConfig) -> dict:
    """The manifest's record of how neighbours were found, where the run scores them."""
    if not cfg.n_neighbors:
        return {}
    return {"neighbors": {"k": cfg.n_neighbors, "definition": experiments.NEIGHBORS_DEFINITION}}


def report(store: Store, from_rows: bool = False, phases: Phases | None = None) -> aggregate.Summary:
    """Aggregates and report of a finished run again: from the shards' footers (kilobytes each), or
    with ``from_rows`` recomputed from every row, as a check of the partials."""
    phases = phases or Phases()
    found, cfg = manifest.read_current(store)
    with phases.phase("read shards"):
        specs = plan_shards(cfg)
        states = manifest.shard_states(store, cfg, specs)
        if states.missing or states.corrupt:
            raise RunFailed(f"{len(states.missing)} shards missing and {len(states.corrupt)} corrupt under {store.uri}")
        merges = BlockMerge(specs)
        for s in specs:
            merges.add(s.key, rows_partials(store, cfg, s).to_bytes() if from_rows else states.partials[s.key])
        merged = merges.result()
    scores = None
    if wants_circuits(cfg):
        from workers.circuits import model_scores

        with phases.phase("circuits"):
            from workers.model import hooked

            scores = model_scores(hooked.load_for_scoring(cfg.model, "cpu", cfg.processing)[0], circuit_tokens(cfg))
    return finish(store, cfg, merged, len(specs), scores, phases, model_loading=found.get("model_loading"),
                  load_checks=found.get("load_checks"))


def rows_partials(store: Store, cfg: RunConfig, spec: ShardSpec) -> Accumulator:
    """A shard's partial aggregates recomputed from its rows."""
    import pyarrow.parquet as pq

    experiment = experiments.get(spec.experiment)
    names = experiment.target_names(cfg.n_neighbors)
    batch = ScoredBatch.from_table(pq.read_table(io.BytesIO(store.get(spec.key))), len(names))
    return shard_partials(experiment, spec.scenario, batch, names)


def wants_circuits(cfg: RunConfig) -> bool:
    return cfg.heads and any(e.view == experiments.POWERS for e in cfg.experiment_specs)


def circuit_tokens(cfg: RunConfig) -> list[int]:
    from workers.layout import FIRST_TOKEN

    return list(range(FIRST_TOKEN, FIRST_TOKEN + cfg.tokens))


def write_vocab(store: Store, token_strings: list[str]) -> None:
    buffer = io.BytesIO()
    pd.DataFrame({"token": range(len(token_strings)), "token_str": token_strings}).to_parquet(buffer, index=False)
    store.put("vocab.parquet", buffer.getvalue())


def read_vocab(store: Store) -> list[str]:
    return pd.read_parquet(io.BytesIO(store.get("vocab.parquet")))["token_str"].tolist()


def connect(address: str | None):
    """Join ``address`` (jobs/address.py cluster_address: --address or $RAY_ADDRESS, checked to answer);
    else start an embedded local cluster."""
    import ray

    if ray.is_initialized():
        return ray
    ours = signal.getsignal(signal.SIGTERM)  # ray.init installs a handler that aborts the process: ours stops cleanly
    _connect(ray, address)
    if callable(ours) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, ours)
    return ray


def _connect(ray, address: str | None) -> None:
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as exc:  # noqa: BLE001 - a version mismatch, a refused connection: nothing was started here
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"cannot join the Ray cluster at {redact(address)}: {reason}") from None
    else:
        os.environ.pop("RAY_ADDRESS", None)  # ray.init would read it
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private in-process cluster needs no token
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)
        _embedded.append(ray)


_embedded: list = []  # the local cluster this process started, if any


def stop_embedded(phases: Phases) -> None:
    """Stop the local cluster ``connect`` started (its processes take a second or two to go)."""
    while _embedded:
        with phases.phase("ray stop"):
            _embedded.pop().shutdown()


