"""Finished runs, read through the storage layer: ``status`` and the notebook API.

    from jobs.results import open_run
    run = open_run("s3://bucket/sweeps/attn-only-2l")     # or a local path
    run.manifest, run.aggregates.token_powers              # dict, typed Aggregates (pandas tables)
    run.shards().to_table(columns=["fixed_token", "strength"], filter=...)   # lazy pyarrow dataset
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pyarrow.dataset as pads

from jobs import manifest
from jobs.aggregate import Aggregates
from jobs.phases import format_eta
from storage import Store, open_store
from storage.arrow import filesystem


@dataclass
class Run:
    store: Store
    manifest: dict
    aggregates: Aggregates | None  # None until the run has finished

    def shards(self, experiment: str | None = None) -> pads.Dataset:
        """Every row, as a pyarrow dataset read lazily (footers first, then only the columns asked for)."""
        prefix = f"shards/{experiment}/" if experiment else "shards/"
        keys = sorted(k for k in self.store.list(prefix) if k.endswith(".parquet"))
        return pads.dataset(keys, format="parquet", filesystem=filesystem(self.store))


def open_run(uri: str) -> Run:
    store = open_store(uri)
    found = manifest.require(store)
    return Run(store, found, Aggregates.read(store) if store.exists("aggregates/summary.json") else None)


def status(uri: str) -> dict:
    """Where a run stands, from storage alone: shards done, corrupt and missing, and for a running run
    its latest rate and time left (``progress.json``, written every few seconds by the driver)."""
    store = open_store(uri)
    found, cfg = manifest.read_run(store)
    states = manifest.shard_states(store, cfg)
    out = {"uri": store.uri, "status": found["status"], "model": cfg.model, "config_hash": cfg.config_hash,
           "shards_done": len(states.done), "shards_total": states.total,
           "corrupt": [s.key for s in states.corrupt], "missing": len(states.missing)}
    if found["status"] == "failed" and isinstance(found.get("failure"), dict):
        out["failure"] = found["failure"]
    if found["status"] == "running" and store.exists(manifest.PROGRESS):
        try:
            progress = json.loads(store.get(manifest.PROGRESS))
            out.update(seq_per_s=progress["seq_per_s"], eta_s=progress["eta_s"], actors=progress["actors"],
                       progress_age_s=round(time.time() - progress["updated_unix"], 1))
        except (ValueError, KeyError, TypeError, FileNotFoundError):  # torn or foreign: no rate shown
            pass
    return out


def status_text(uri: str) -> str:
    s = status(uri)
    lines = [f"{s['uri']}: {s['status']}, shards {s['shards_done']}/{s['shards_total']} done"
             f" (model {s['model']}, config {s['config_hash']})"]
    if "failure" in s:
        lines.append(f"failed: {s['failure'].get('reason', 'unknown')}")
    if "seq_per_s" in s:
        lines.append(f"{s['seq_per_s']:,.0f} seq/s on {s['actors']} actor(s), ETA {format_eta(s['eta_s'])} "
                     f"(as of {s['progress_age_s']:.0f} s ago)")
    if s["corrupt"]:
        lines.append(f"corrupt (recomputed by a rerun): {', '.join(s['corrupt'])}")
    if s["missing"] and s["status"] != "complete":
        lines.append(f"missing: {s['missing']}")
    if not s["missing"] and not s["corrupt"] and s["status"] == "complete":
        lines.append("complete")
    return "\n".join(lines)

