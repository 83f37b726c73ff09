"""Finished runs, read through the storage layer: ``status`` and the notebook API.

    from jobs.results import open_run
    run = open_run("s3://bucket/sweeps/attn-only-2l")     # or a local path
    run.manifest, run.aggregates.token_powers              # dict, typed Aggregates (pandas tables)
    run.shards().to_table(columns=["fixed_token", "strength"], filter=...)   # lazy pyarrow dataset
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jobs import manifest
from jobs.fetch import FETCH_THREADS
from jobs.phases import format_eta
from storage import Store, open_store
from storage.arrow import parquet_footer

if TYPE_CHECKING:
    import pyarrow.dataset as pads

    from jobs.aggregate import Aggregates

STALE_S = 6 * manifest.PROGRESS_EVERY_S  # a running run's progress.json older than this: is the driver there?
JOBS_API_TIMEOUT_S = 3.0


@dataclass
class Run:
    store: Store
    manifest: dict
    aggregates: Aggregates | None  # None until the run has finished

    def shards(self, experiment: str | None = None) -> pads.Dataset:
        """Every row, as a pyarrow dataset read lazily (footers first, then only the columns asked for)."""
        import pyarrow.dataset as pads

        from storage.arrow import filesystem

        prefix = f"shards/{experiment}/" if experiment else "shards/"
        keys = sorted(k for k in self.store.list(prefix) if k.endswith(".parquet"))
        return pads.dataset(keys, format="parquet", filesystem=filesystem(self.store))


def open_run(uri: str) -> Run:
    from jobs.aggregate import Aggregates

    store = open_store(uri)
    found = manifest.require(store)
    return Run(store, found, Aggregates.read(store) if store.exists("aggregates/summary.json") else None)


def status(uri: str) -> dict:
    """Where a run stands, from storage alone (no torch, no Ray): shards done, pending and corrupt
    (a stored shard whose footer cannot be read; the driver checks more at a rerun), and for a running
    run its latest progress (``progress.json``: the whole run's shard and sequence counts, this driver's
    rate and time left) and, where that progress is stale, whether its driver is still there."""
    store = open_store(uri)
    found = manifest.require(store)
    listing = {k: n for k, n in store.list("shards/").items() if k.endswith(".parquet")}

    def readable(key: str) -> bool:
        try:
            parquet_footer(store, key, listing[key])
            return True
        except Exception:  # noqa: BLE001 - truncated, foreign or unreadable: the rerun recomputes it
            return False

    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        ok = dict(zip(listing, pool.map(readable, listing)))
    corrupt = sorted(k for k, good in ok.items() if not good)
    total = int(found.get("shards", 0))
    done = len(listing) - len(corrupt)
    out = {"uri": store.uri, "status": found["status"], "model": found.get("config", {}).get("model"),
           "config_hash": found.get("config_hash"), "shards_done": done, "shards_total": total,
           "shards_pending": max(0, total - done - len(corrupt)), "corrupt": corrupt}
    if found["status"] == "failed" and isinstance(found.get("failure"), dict):
        out["failure"] = found["failure"]
    if found["status"] == "running":
        out.update(running_progress(store))
    return out


def running_progress(store: Store) -> dict:
    """A running run's latest progress.json figures and, when they are stale, its driver's state."""
    try:
        progress = json.loads(store.get(manifest.PROGRESS))
        out = {k: progress[k] for k in ("sequences_done", "sequences_total", "seq_per_s", "eta_s", "actors")}
        out["progress_age_s"] = round(time.time() - progress["updated_unix"], 1)
    except (ValueError, KeyError, TypeError, FileNotFoundError):  # none yet, torn or foreign: no figures
        return {}
    if out["progress_age_s"] > STALE_S:
        out["stale"] = True
        out["driver"] = driver_state(progress.get("driver") or {})
    return out


def driver_state(driver: dict) -> dict:
    """``driver`` (host, pid, job id from progress.json) with ``state``: the Ray Job's status where a
    Jobs API is known here (RAY_API_SERVER_ADDRESS or an http:// RAY_ADDRESS), else on this host
    whether the pid lives: ``alive``, ``gone`` or ``unknown``."""
    out = dict(driver, state="unknown")
    address = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
    if driver.get("job_id") and address.startswith(("http://", "https://")):
        try:
            url = f"{address.rstrip('/')}/api/jobs/{driver['job_id']}"
            with urllib.request.urlopen(url, timeout=JOBS_API_TIMEOUT_S) as answer:
                out.update(state=json.loads(answer.read())["status"].lower(), address=address)
            return out
        except (OSError, ValueError, KeyError):
            pass
    if driver.get("host") == socket.gethostname() and isinstance(driver.get("pid"), int):
        try:
            os.kill(driver["pid"], 0)
            out["state"] = "alive"
        except ProcessLookupError:
            out["state"] = "gone"
        except PermissionError:  # another user's process
            out["state"] = "alive"
    return out


def status_text(uri: str) -> str:
    s = status(uri)
    lines = [f"{s['uri']}: {s['status']}, shards {s['shards_done']}/{s['shards_total']} done"
             + (f", {s['shards_pending']} pending" if s["shards_pending"] else "")
             + f" (model {s['model']}, config {s['config_hash']})"]
    if "failure" in s:
        lines.append(f"failed: {s['failure'].get('reason', 'unknown')}")
    if "seq_per_s" in s:
        lines.append(f"{s['sequences_done']:,}/{s['sequences_total']:,} sequences; {s['seq_per_s']:,.0f} seq/s on "
                     f"{s['actors']} actor(s), ETA {format_eta(s['eta_s'])} (as of {s['progress_age_s']:.0f} s ago)")
    elif s["status"] == "running":
        lines.append("starting: no progress reported yet")
    if s.get("stale"):
        lines.append(stale_text(s["driver"], s["progress_age_s"]))
    if s["corrupt"]:
        lines.append(f"corrupt (recomputed by a rerun): {', '.join(s['corrupt'])}")
    if not s["shards_pending"] and not s["corrupt"] and s["status"] == "complete":
        lines.append("complete")
    return "\n".join(lines)


def stale_text(driver: dict, age: float) -> str:
    where = f"driver pid {driver.get('pid')} on {driver.get('host')}"
    job = driver.get("job_id")
    head = f"no progress for {format_eta(age)}: "
    if job and driver["state"] not in ("unknown", "running", "pending"):
        return (head + f"job {job} is {driver['state']} at {driver['address']}, so the run is not going on; "
                "submitting it again resumes")
    if driver["state"] == "gone":
        return head + f"the {where} is gone, so the run is not going on; rerunning the same command resumes"
    if driver["state"] == "alive" or driver["state"] in ("running", "pending"):
        return head + f"the {where} is still there (job {job})" if job else head + f"the {where} is still there"
    hint = f" (job {job}: `ray job status --address http://HEAD:8265 {job}`)" if job else ""
    return head + f"the {where} cannot be checked from here{hint}; if it is gone, rerunning the same command resumes"

