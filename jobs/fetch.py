"""``fetch``: copy a run's results into a local directory, as `aws s3 sync` would.

Every key is mapped to a path under the target and checked to stay there before anything is
written; a key that would leave it (``..``, an absolute path, a symlink in the target) refuses the
whole fetch. In a local run, symlinks are not followed: they are skipped, and said so. A file
already present with the same size and content (the S3 ETag, an MD5 for single-part uploads) is
skipped. Each file goes to a temporary name and is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from jobs import manifest
from jobs.errors import ConfigError
from storage import LocalStore, Store, open_store
from storage.store import check_directory

FETCH_THREADS = 16  # S3 GETs are latency-bound: many at once
FETCHED = ("manifest.json", "report.html", "vocab.parquet", "neighbors.parquet", "aggregates/", "plots/")


@dataclass
class Item:
    key: str
    size: int
    path: Path
    action: str  # "fetch", "present" (same size and content) or "symlink" (skipped)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def target_path(root: Path, key: str) -> Path:
    """``key``'s path under ``root`` (resolved); ConfigError where it would leave it."""
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ConfigError(f"refusing to fetch: the key {key!r} would be written outside --to {root}")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root):
        raise ConfigError(f"refusing to fetch: the key {key!r} leads outside --to {root} (through a symlink there)")
    blocking = next((p for p in reversed(path.parents) if p.is_relative_to(root) and p.exists() and not p.is_dir()), None)
    if blocking is not None or path.is_dir():
        raise ConfigError(f"cannot fetch {key!r} into --to {root}: {blocking or path} is in the way (a "
                          f"{'file' if blocking else 'directory'} where the other is needed)")
    return path


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_link_under(store: Store, key: str) -> bool:
    """Whether the local run's ``key`` goes through a symlink (file or directory) under its root."""
    if not isinstance(store, LocalStore):
        return False
    path = store.root
    for part in key.split("/"):
        path = path / part
        if path.is_symlink():
            return True
    return False


def _same(store: Store, key: str, size: int, etag: str | None, path: Path) -> bool:
    if not path.is_file() or path.is_symlink() or path.stat().st_size != size:
        return False
    if etag is None and isinstance(store, LocalStore):
        return _md5(path) == _md5(store.root / key)
    return etag is not None and "-" not in etag and _md5(path) == etag  # a multipart ETag is no MD5: fetched again


def plan(store: Store, to: str, shards: bool = False) -> list[Item]:
    """What a fetch of ``store`` into ``to`` does, key by key; ConfigError before any write for a
    target that cannot take it or a key that would leave it."""
    if not str(to).strip():
        raise ConfigError("--to must name a directory (an empty path would fetch into the current one)")
    root = Path(to).expanduser()
    check_directory(root, "cannot fetch into")
    root = root.resolve()
    manifest.require(store)
    entries = {}
    for prefix in FETCHED + (("shards/",) if shards else ()):
        entries.update(store.entries(prefix))
    items = []
    for key in sorted(entries):
        size, etag = entries[key]
        path = target_path(root, key)
        action = "symlink" if _is_link_under(store, key) else "present" if _same(store, key, size, etag, path) else "fetch"
        items.append(Item(key, size, path, action))
    return items


def fetch(uri: str, to: str, shards: bool = False, dry_run: bool = False, echo=print) -> list[Item]:
    """Copy aggregates, plots, report, vocabulary and manifest (and shards with ``shards``) into ``to``,
    printing each file with its size and a total; with ``dry_run`` only say what would be copied."""
    store = open_store(uri)
    items = plan(store, to, shards)

    def copy(item: Item) -> Item:
        if item.action == "fetch" and not dry_run:
            item.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = item.path.with_name(f".{item.path.name}.{uuid.uuid4().hex[:8]}.part")
            try:
                tmp.write_bytes(store.get(item.key))
                os.replace(tmp, item.path)
            finally:
                tmp.unlink(missing_ok=True)
        return item

    verb = {"fetch": "would fetch" if dry_run else "fetched", "present": "present (same size and ETag), skipped",
            "symlink": "a symlink in the run, not followed: skipped"}
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        for item in pool.map(copy, items):
            echo(f"{human(item.size):>10}  {item.path}  {verb[item.action]}")
    moved = [i for i in items if i.action == "fetch"]
    kept = [i for i in items if i.action == "present"]
    skipped = len(items) - len(moved) - len(kept)
    echo(f"total: {len(moved)} file(s), {human(sum(i.size for i in moved))} {verb['fetch']}; "
         f"{len(kept)} already present ({human(sum(i.size for i in kept))})"
         + (f"; {skipped} symlink(s) skipped" if skipped else ""))
    return items
