"""The run's manifest (``manifest.json``) and the state of its shards, read from storage alone.

Importing this module imports neither torch nor Ray (``status`` relies on it): the config and the
shard plan are imported where they are used."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.errors import ConfigError
from storage import Store
from storage.arrow import parquet_footer

if TYPE_CHECKING:
    from jobs.config import RunConfig
    from workers.shard import ShardSpec

MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # a running run's rate and time left (jobs/pool.py Progress), read by ``status``
RUN_PREFIXES = ("shards/", "aggregates/", "plots/", "report.html", "vocab.parquet", PROGRESS, MANIFEST)


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("induction-sweep")
    except PackageNotFoundError:
        v = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{v}+{commit}" if commit else v


def read(store: Store) -> dict | None:
    try:
        return json.loads(store.get(MANIFEST))
    except FileNotFoundError:
        return None


def write(store: Store, cfg: RunConfig, n_shards: int, status: str, **extra) -> dict:
    manifest = build(cfg, n_shards, status, **extra)
    store.put(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def build(cfg: RunConfig, n_shards: int, status: str, **extra) -> dict:
    return {
        "config": cfg.science(),
        "config_hash": cfg.config_hash,
        "code_version": code_version(),
        "shards": n_shards,
        "status": status,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def check_compatible(store: Store, cfg: RunConfig) -> dict | None:
    """The existing manifest if it is this config's; ConfigError for another config (unless --overwrite)."""
    existing = read(store)
    if existing is None or existing.get("config_hash") == cfg.config_hash or cfg.overwrite:
        return existing
    raise ConfigError(f"{store.uri} holds a run with another config (hash {existing.get('config_hash')}, "
                      f"this one {cfg.config_hash}); use another --out or --overwrite")


def clear(store: Store) -> None:
    """Remove a previous run's files (for --overwrite)."""
    for prefix in RUN_PREFIXES:
        store.delete_prefix(prefix)


@dataclass
class ShardStates:
    done: list[ShardSpec]
    missing: list[ShardSpec]
    corrupt: list[ShardSpec]
    partials: dict[str, bytes]  # each done shard's partial aggregates, from its footer

    @property
    def total(self) -> int:
        return len(self.done) + len(self.missing) + len(self.corrupt)


def shard_states(store: Store, cfg: RunConfig, specs: list[ShardSpec] | None = None) -> ShardStates:
    """Which planned shards are stored whole (a readable footer with the expected row count and its
    partial aggregates), and those partials: footers only, kilobytes per shard."""
    from jobs.config import plan_shards
    from workers.accumulator import FOOTER_KEY

    specs = plan_shards(cfg) if specs is None else specs
    listing = store.list("shards/")

    def partials(spec: ShardSpec) -> bytes | None:
        try:
            footer = parquet_footer(store, spec.key, listing[spec.key])
        except Exception:
            return None
        ok = footer.num_rows == spec.n_rows(cfg.n_neighbors) and FOOTER_KEY in (footer.metadata or {})
        return footer.metadata[FOOTER_KEY] if ok else None

    present = [s for s in specs if s.key in listing]
    with ThreadPoolExecutor(max_workers=16) as pool:
        found = dict(zip((s.key for s in present), pool.map(partials, present)))
    return ShardStates(
        done=[s for s in present if found[s.key] is not None],
        missing=[s for s in specs if s.key not in listing],
        corrupt=[s for s in present if found[s.key] is None],
        partials={k: v for k, v in found.items() if v is not None},
    )


def require(store: Store) -> dict:
    """The run's manifest; ConfigError where there is no run."""
    manifest = read(store)
    if manifest is None:
        raise ConfigError(f"no run at {store.uri} (no {MANIFEST})")
    return manifest


def read_run(store: Store) -> tuple[dict, RunConfig]:
    """The run's manifest and its config, from one read; ConfigError where there is no run."""
    from jobs.config import RunConfig

    manifest = require(store)
    return manifest, RunConfig.from_science(manifest["config"], out=store.uri)


def config_of(store: Store) -> RunConfig:
    return read_run(store)[1]
