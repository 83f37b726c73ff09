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

from jobs.config import RunConfig, check_counts, plan_shards
from jobs.errors import ConfigError
from storage import Store
from storage.arrow import parquet_footer
from workers.accumulator import FOOTER_KEY
from workers.work import ShardSpec

MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # a running run's rate and time left (jobs/pool.py Progress), read by ``status``
PROGRESS_EVERY_S = 10.0  # how often a running driver rewrites it (and prints a line where there is no terminal)
RUN_PREFIXES = ("shards/", "aggregates/", "plots/", "report.html", "vocab.parquet", "neighbors.parquet", PROGRESS, MANIFEST)


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


STATUSES = ("running", "failed", "complete")
REQUIRED = {"config": dict, "config_hash": str, "status": str, "shards": int}


def read(store: Store) -> dict | None:
    """The run's manifest, checked; None where there is none. ConfigError, one line, for one that is
    not a manifest this tool wrote (corrupt, empty, foreign, a directory) or a URI that is a file."""
    where = store.join(MANIFEST)
    try:
        data = store.get(MANIFEST)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise ConfigError(f"{store.uri} is a file, not a run's directory") from None
    except IsADirectoryError:
        raise ConfigError(f"{where} is a directory, not a run's manifest") from None
    except PermissionError:
        raise ConfigError(f"{where} cannot be read: permission denied") from None
    try:
        found = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        found = None
    problem = schema_problem(found)
    if problem:
        raise ConfigError(f"{where} is not an induction-sweep manifest ({problem}); "
                          "move it away, or rerun with another --out")
    return found


def schema_problem(found: object) -> str | None:
    """What makes ``found`` no manifest of this tool's: a missing or mistyped key, a config RunConfig refuses."""
    if not isinstance(found, dict):
        return "not a JSON object" if found is not None else "not JSON"
    for key, kind in REQUIRED.items():
        if not isinstance(found.get(key), kind) or isinstance(found.get(key), bool):
            return f"{key!r} missing or not a {kind.__name__}"
    if found["status"] not in STATUSES:
        return f"unknown status {found['status']!r}"
    try:
        cfg = RunConfig.from_science(found["config"], out="")
        check_counts(cfg)
        cfg.experiment_specs  # noqa: B018 - known experiments
    except (TypeError, ValueError, KeyError) as exc:
        return f"its config: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}"
    return None


def write(store: Store, cfg: RunConfig, n_shards: int, status: str, **extra) -> dict:
    return put(store, build(cfg, n_shards, status, **extra))


def put(store: Store, manifest: dict) -> dict:
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
    if existing is None or existing.get("config_hash") in cfg.hashes or cfg.overwrite:
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


def read_current(store: Store) -> tuple[dict, RunConfig]:
    """As ``read_run``, for a run whose shards this version reads: ConfigError for one written under
    another SCHEMA_VERSION (its config hash, which includes the schema, differs)."""
    found, cfg = read_run(store)
    if found.get("config_hash") != cfg.config_hash:
        raise ConfigError(f"{store.uri} was written by another version of induction-sweep (its shards' layout differs); "
                          "rerun its command with --overwrite")
    return found, cfg


def config_of(store: Store) -> RunConfig:
    return read_run(store)[1]
