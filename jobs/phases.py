"""Where a run's time goes: wall-clock phases on the driver, each actor's start-up steps, and the
actors' own compute and write seconds. Printed at the end of every run and stored in the manifest."""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager

JOB_ID_ENV = "INDUCTION_SWEEP_JOB_ID"  # set by ``submit`` in the Ray Job's environment


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere): interpreter start-up and imports."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started)
    except (OSError, ValueError, IndexError):
        return 0.0


class Phases:
    def __init__(self):
        self.origin = time.time() - process_age()  # the command's start
        self.rows: list[dict] = []
        self.actors: list[dict] = []
        self.shards = {"count": 0, "compute_s": 0.0, "write_s": 0.0}
        self.completions: list[tuple[float, int]] = []  # (time, sequences) of each finished shard
        self.model_loading: dict | None = None  # how the first ready actor loaded the model (workers/model/)
        self.load_checks: list[dict] = []  # each ready actor's load-time check (workers/scoring/check.py)
        if process_age() > 0:
            self.rows.append({"phase": "python start-up", "start_s": 0.0, "seconds": round(time.time() - self.origin, 3)})

    def now(self) -> float:
        return time.time() - self.origin

    def add(self, name: str, start: float, end: float | None = None) -> None:
        """A phase from ``start`` to ``end`` (default: now), in seconds since the command's start."""
        end = self.now() if end is None else end
        self.rows.append({"phase": name, "start_s": round(start, 3), "seconds": round(end - start, 3)})

    @contextmanager
    def phase(self, name: str):
        start = self.now()
        yield
        self.add(name, start)

    def actor_ready(self, info: dict, requested: float) -> None:
        """One actor's start-up: its constructor's timed steps, and when it was ready."""
        steps = {k: round(v, 3) for k, v in info.items() if isinstance(v, float) and k != "started"}
        self.model_loading = self.model_loading or info.get("loading")
        if info.get("check") is not None:
            self.load_checks.append({"host": info.get("host"), "pid": info.get("pid"), "device": info.get("device"),
                                     **info["check"]})
        self.actors.append({"host": info.get("host"), "device": info.get("device"), "requested_s": round(requested, 3),
                            "ready_s": round(self.now(), 3), **steps})

    def shard_done(self, sequences: int, compute_s: float, write_s: float) -> None:
        self.completions.append((self.now(), sequences))
        self.shards["count"] += 1
        self.shards["compute_s"] += compute_s
        self.shards["write_s"] += write_s

    def as_dict(self) -> dict:
        shards = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.shards.items()}
        return {"total_s": round(self.now(), 3), "phases": self.rows, "actors": self.actors, "shards": shards}

    def text(self) -> str:
        lines = [f"time: {self.now():.1f} s in all"]
        lines += [f"  {r['phase']:<16} {r['seconds']:7.2f} s  (from {r['start_s']:.2f} s)" for r in self.rows]
        for i, a in enumerate(self.actors):
            steps = ", ".join(f"{k} {a[k]:.2f}" for k in ("import", "load", "neighbors", "cache load", "warm-up", "cache save",
                                                          "check") if k in a)
            if "reference" in a:
                steps += f"; the check's reference built in {a['reference']:.2f} s alongside"
            lines.append(f"  actor {i} ({a['device']}): ready {a['ready_s'] - a['requested_s']:.2f} s after its request ({steps})")
        s = self.shards
        if s["count"]:
            lines.append(f"  {s['count']} shards: {s['compute_s']:.2f} s computing, {s['write_s']:.2f} s writing (actor-seconds)")
        return "\n".join(lines)


def format_eta(seconds: float | None) -> str:
    """H:MM:SS, hours unbounded; ``unknown`` without a rate or an actor."""
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def driver_identity() -> dict:
    """Where this driver runs, for ``status`` to tell a stopped run from a running one."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get(JOB_ID_ENV)}
