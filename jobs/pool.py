"""The run's model replicas on Ray: how many to ask for, and feeding them shards.

The pool is elastic. It asks Ray for every actor the run wants, whatever the cluster holds now:
actors that do not fit stay pending, which is the demand Ray's autoscaler acts on, and each one
takes shards from the moment it is ready, mid-run included. An actor lost with its node (or its
process) gives its in-flight shards back to the queue, for the others, and a replacement is
asked for. Ray's own restarts are off for that reason: a restart waits for room on the cluster,
holding the shards it had, while the queue can go on elsewhere.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from jobs.config import RunConfig
from jobs.errors import ConfigError, RunFailed, Terminated
from jobs.manifest import PROGRESS, PROGRESS_EVERY_S
from jobs.phases import Phases, driver_identity, format_eta
from storage import StorageError, Store, open_store
from storage.store import FORWARDED_ENV
from workers.model.source import ModelInputError
from workers.work import ShardSpec, ShardSummary

IN_FLIGHT_PER_ACTOR = 2  # one shard computing while the previous one encodes and uploads
CPU_THREADS_PER_ACTOR = 2
PLACEMENT_WAIT_S = float(os.environ.get("INDUCTION_SWEEP_PLACEMENT_WAIT_S", "60"))  # then say how many are ready
# a run whose every actor is lost fails after this long without one ready (replacements pending)
NO_ACTOR_WAIT_S = float(os.environ.get("INDUCTION_SWEEP_NO_ACTOR_WAIT_S", "900"))
TICK_S = 1.0
RATE_WINDOW_S = 60.0  # the progress rate is over this much recent time
MAX_REACHABLE = 10_000  # an autoscaler maximum this large means "unbounded": room for one actor more


@dataclass
class ActorPlan:
    count: int
    num_gpus: float
    num_cpus: float
    threads: int | None
    resources: dict[str, float]
    fit_now: int  # how many of ``count`` the cluster holds room for at the start

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


def reachable_resources(ray) -> dict | None:
    """The most of each resource the cluster's autoscaler can bring up (its node types' max counts
    times their resources); None without an autoscaler. Ray keeps this behind a private API (used
    by Ray Data in the same way), so any failure to read it means "unknown"."""
    try:
        from ray._private.state import state

        reachable = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - an internal API: unknown rather than a failed run
        return None
    return reachable or None


def plan_actors(cfg: RunConfig, resources: dict, reachable: dict | None = None) -> ActorPlan:
    """One actor per GPU (``--gpus-per-actor`` each), per ``--resources-per-actor`` slot, or per 2 CPUs.
    ``auto`` counts what the cluster can reach: the autoscaler's maximum (``reachable``) where it
    reports one, else what is there now. ``--actors N`` beyond what fits now is asked for anyway
    (elastic). A single actor that fits nowhere the cluster can reach is bad input."""
    custom = dict(cfg.resources_per_actor)
    per = cfg.gpus_per_actor or 1.0
    possible = dict(resources)
    for name, most in (reachable or {}).items():
        # an unbounded node type (a huge maximum) counts as room for one actor more than there is now
        need = custom.get(name, per if name == "GPU" else 0)
        grown = float(resources.get(name, 0)) + need if most >= MAX_REACHABLE else float(most)
        possible[name] = max(float(resources.get(name, 0)), grown)
    gpus, cpus = float(possible.get("GPU", 0)), float(resources.get("CPU", 1))
    for name, need in custom.items():
        if float(possible.get(name, 0)) < need:
            raise ConfigError(f"--resources-per-actor asks for {need:g} {name!r} per actor; the cluster has "
                              f"{float(possible.get(name, 0)):g}")
    if cfg.gpus_per_actor is not None and cfg.gpus_per_actor > gpus:
        raise ConfigError(f"--gpus-per-actor {cfg.gpus_per_actor:g} asks for more GPUs than the cluster has ({gpus:g})")
    if gpus > 0:
        if gpus < per:
            raise ConfigError(f"one actor needs {per:g} GPU; the cluster has {gpus:g} (set --gpus-per-actor)")
        return ActorPlan(cfg.actors or _fit(custom, per, possible), per, 1, None, custom, _fit(custom, per, resources))
    if custom:
        fit = _fit(custom, 0, resources)
        threads = max(1, int(cpus) // max(1, fit, cfg.actors or 0))
        return ActorPlan(cfg.actors or _fit(custom, 0, possible), 0, 1, threads, custom, fit)
    # each CPU actor asks Ray for the CPUs its torch threads use: actors beyond the CPUs stay pending
    count = cfg.actors or max(1, int(cpus) // CPU_THREADS_PER_ACTOR)
    threads = max(1, int(cpus) // count)
    return ActorPlan(count, 0, min(float(threads), cpus), threads, custom, min(count, max(1, int(cpus) // threads)))


def _fit(custom: dict[str, float], gpus_per_actor: float, resources: dict) -> int:
    """How many actors needing ``gpus_per_actor`` GPUs and ``custom`` resources fit in ``resources``."""
    slots = [int(float(resources.get(name, 0)) / need + 1e-9) for name, need in custom.items()]
    if gpus_per_actor:
        slots.append(int(float(resources.get("GPU", 0)) / gpus_per_actor + 1e-9))
    return min(slots)


def refused_or(get, ref):
    """``get(ref)`` of an actor's ``ready``; a refusal it raised is bad input for the whole run (every actor
    would refuse the same model): ConfigError, with the actor's one line."""
    try:
        return get(ref)
    except ModelInputError as exc:  # Ray's task error is an instance of the cause's class too
        raise ConfigError(str(getattr(exc, "cause", None) or exc)) from None


class ActorPool:
    """``plan.count`` ShardRunner actors, asked for at once; they import and load while the driver plans."""

    def __init__(self, ray, cfg: RunConfig, plan: ActorPlan):
        from jobs.actor import Runner  # torch and the scorer: imported where actors are made

        self.ray, self.plan = ray, plan
        self._runner = ray.remote(Runner).options(
            num_gpus=plan.num_gpus, num_cpus=plan.num_cpus, resources=plan.resources or None,
            max_restarts=0, max_task_retries=0, max_concurrency=IN_FLIGHT_PER_ACTOR,
            runtime_env={"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}})
        # device None: the actor's process decides from what it sees (a GPU where Ray gave it one)
        self._args = (cfg.work_params, cfg.out, None, cfg.batch_size, plan.threads)
        self.store = open_store(cfg.out)
        self.replacements_left = max(4, 2 * plan.count)
        self.starting = {}  # ready() ref -> actor, for actors not ready yet
        self.live: list = []  # ready actors
        self.lost: set = set()
        for _ in range(plan.count):
            self._start()

    def _start(self) -> None:
        actor = self._runner.remote(*self._args)
        self.starting[actor.ready.remote()] = actor

    def lose(self, actor, exc: Exception) -> None:
        """An actor died (or its node did): drop it and ask for another, once per actor (each of its
        in-flight shards reports the death). An actor whose constructor raised while no actor is ready
        fails the run: the model cannot be loaded, and a replacement would raise the same; with ready
        actors it was this one's trouble (a node's), and it is replaced."""
        if getattr(exc, "actor_init_failed", False) and not self.live:
            raise RunFailed(failure(exc)) from None
        if actor in self.lost:
            return
        self.lost.add(actor)
        if actor in self.live:
            self.live.remove(actor)
        self.ray.kill(actor, no_restart=True)
        if self.replacements_left <= 0:
            raise RunFailed(f"actors keep dying, the last with {failure(exc)}")
        self.replacements_left -= 1
        self._start()

    def any_ready(self):
        """A ready actor, waiting for one if none is yet (a resumed run with every shard kept)."""
        from ray.exceptions import RayActorError

        while not self.live:
            ready, _ = self.ray.wait(list(self.starting), num_returns=1)
            actor = self.starting.pop(ready[0])
            try:
                refused_or(self.ray.get, ready[0])
                self.live.append(actor)
            except RayActorError as exc:
                self.lose(actor, exc)
        return self.live[0]

    def kill(self) -> None:
        for actor in [*self.live, *self.starting.values()]:
            self.ray.kill(actor)
        self.live, self.starting = [], {}

    def execute(self, todo: list[ShardSpec], phases: Phases, requested: float, progress: bool,
                already: int, total: int, sequences_before: int = 0) -> Iterator[ShardSummary]:
        """Run ``todo`` on the actors, each from the moment it is ready; yields each shard's summary as it completes."""
        from ray.exceptions import RayActorError

        queue, running = deque(todo), {}  # shard ref -> (actor, spec)
        report = Progress(progress, sum(s.n_sequences for s in todo), already, total, requested, phases, self.store,
                          sequences_before)
        first_ready = None

        def feed(actor) -> None:
            while actor not in self.lost and queue and sum(a is actor for a, _ in running.values()) < IN_FLIGHT_PER_ACTOR:
                spec = queue.popleft()
                running[actor.run.remote(spec)] = (actor, spec)

        try:
            while queue or running:
                ready, _ = self.ray.wait([*running, *self.starting], num_returns=1, timeout=TICK_S)
                report.tick(len(self.live), self.plan.count)
                if not ready:
                    continue
                ref = ready[0]
                if ref in self.starting:  # an actor has loaded its model
                    actor = self.starting.pop(ref)
                    try:
                        info = refused_or(self.ray.get, ref)
                    except RayActorError as exc:
                        self.lose(actor, exc)
                        continue
                    phases.actor_ready(info, requested)
                    if first_ready is None:
                        first_ready = phases.now()
                        phases.add("actor start-up", requested)
                    self.live.append(actor)
                    feed(actor)
                    continue
                actor, spec = running.pop(ref)
                try:
                    result = self.ray.get(ref)
                except RayActorError as exc:  # its process or node is gone: the shard goes to another actor
                    queue.appendleft(spec)
                    self.lose(actor, exc)
                    for other in self.live:
                        feed(other)
                    continue
                report.shard_done(result.sequences)
                phases.shard_done(result.sequences, result.compute_s, result.write_s)
                feed(actor)
                yield result
        except (RunFailed, ConfigError):
            raise
        except Exception as exc:
            raise signal_behind(exc) or RunFailed(failure(exc)) from None
        finally:
            report.close()
        if todo:
            phases.add("scoring", first_ready)


def signal_behind(exc: BaseException) -> BaseException | None:
    """The SIGTERM or Ctrl-C behind ``exc``: a signal handler's exception raised while Ray's C code
    waits comes back wrapped (a SystemError whose context it is)."""
    while exc is not None and not isinstance(exc, Terminated | KeyboardInterrupt):
        exc = exc.__context__
    return exc


def failure(exc: Exception) -> str:
    """The error's last line, from the actor's side where Ray wraps one."""
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}"


class Progress:
    """A progress bar on a terminal; elsewhere (a Ray Job's log) a line every PROGRESS_EVERY_S seconds
    with shards done, sequences per second and the time left. The same figures go to the run's
    ``progress.json`` at that pace (and at the start and the first shard), with the driver's host,
    pid and job id, for ``status``. Shard and sequence counts are the whole run's (``already`` shards
    holding ``sequences_before`` sequences were done before); the rate is this process's. Says once
    how many actors are ready if not all are after PLACEMENT_WAIT_S (a cluster that cannot grow)."""

    def __init__(self, enabled: bool, sequences: int, already: int, total: int, requested: float, phases: Phases,
                 store: Store, sequences_before: int = 0):
        from tqdm import tqdm

        self.sequences, self.done, self.total, self.store = sequences, already, total, store
        self.before = sequences_before
        self.requested, self.phases = requested, phases
        self.lines = enabled and not sys.stderr.isatty()
        self.bar = tqdm(total=sequences, unit="seq", unit_scale=True, disable=not enabled or self.lines,
                        desc=f"shards {already}/{total}", mininterval=1.0)
        self.scored, self.start, self.last, self.placement_said = 0, None, time.monotonic(), False
        self.placed, self.none_since, self.none_lost_at, self.history = 0, None, 0.0, deque()
        self.publish(self.last)  # status knows the driver from the start
        self.history.clear()  # that publish's sample is no rate's start: the rate counts from the first ready actor

    def shard_done(self, sequences: int) -> None:
        self.done += 1
        self.scored += sequences
        self.bar.set_description(f"shards {self.done}/{self.total}", refresh=False)
        self.bar.update(sequences)
        if self.scored == sequences:  # the first shard: status has a rate from here on
            self.publish(time.monotonic())

    def tick(self, placed: int, asked: int) -> None:
        now = time.monotonic()
        if placed and self.start is None:
            self.start = now  # the rate counts from the first ready actor
        if placed == 0 and self.placed > 0:
            self.none_since = self.none_lost_at = now
        self.placed = placed
        if not self.placement_said and placed < asked and self.phases.now() - self.requested > PLACEMENT_WAIT_S:
            self.placement_said = True
            print(f"induction-sweep: {placed} of {asked} actors ready after {PLACEMENT_WAIT_S:.0f} s; going on with "
                  f"those that are (the rest join when the cluster has room)", file=sys.stderr, flush=True)
        if placed == 0 and self.none_since is not None and now - self.none_lost_at >= NO_ACTOR_WAIT_S:
            raise RunFailed(f"no actor ready for {NO_ACTOR_WAIT_S:.0f} s after all were lost (replacements pending: the "
                            "cluster has no room for one); give the cluster room (`ray status` shows it)")
        if placed == 0 and self.none_since is not None and now - self.none_since > PLACEMENT_WAIT_S:
            self.none_since = now  # said again each PLACEMENT_WAIT_S while it lasts
            print(f"induction-sweep: no actor has been ready for {PLACEMENT_WAIT_S:.0f} s (all lost, replacements "
                  "pending); waiting for the cluster. Stopping now loses nothing: rerunning resumes",
                  file=sys.stderr, flush=True)
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self.publish(now)

    def figures(self, now: float) -> dict:
        # the rate over the last RATE_WINDOW_S (the pool grows and shrinks), from the first ready actor
        self.history.append((now, self.scored))
        while len(self.history) > 1 and now - self.history[0][0] > RATE_WINDOW_S:
            self.history.popleft()
        start = self.start if self.start is not None else now
        since, scored_then = self.history[0] if len(self.history) > 1 else (start, 0)
        elapsed = now - max(since, start)
        rate = (self.scored - scored_then) / elapsed if elapsed > 0 else 0.0
        return {"shards_done": self.done, "shards_total": self.total, "sequences_done": self.before + self.scored,
                "sequences_total": self.before + self.sequences, "seq_per_s": round(rate, 1), "actors": self.placed,
                "eta_s": round((self.sequences - self.scored) / rate, 1) if rate > 0 and self.placed else None,
                "updated_unix": round(time.time(), 3), "driver": driver_identity()}

    def publish(self, now: float) -> None:
        f = self.figures(now)
        try:
            self.store.put(PROGRESS, json.dumps(f).encode())
        except (StorageError, OSError):  # only the progress is lost; a shard's write failing is what fails the run
            pass
        if self.lines:
            print(f"progress: shards {f['shards_done']}/{f['shards_total']}, {f['sequences_done']:,}/{f['sequences_total']:,} "
                  f"sequences, {f['seq_per_s']:,.0f} seq/s, ETA {format_eta(f['eta_s'])}, {f['actors']} actor(s)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
        self.publish(time.monotonic())
