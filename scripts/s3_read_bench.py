#!/usr/bin/env python
"""Read a large run's shards from S3 (a local moto server) through both pyarrow filesystems.

    .venv/bin/python scripts/s3_read_bench.py [--mb 320] [--shards 60] [--reps 2]

Starts ``moto_server`` on a free port of 127.0.0.1 with fake credentials, writes a run that looks like
a real one (``manifest.json`` and zstd Parquet shards of ``ROW_SCHEMA`` under
``shards/<experiment>/part-NNNNNN.parquet``, laid out by ``ScoredBatch.to_table``, random values), then
times ``pyarrow.dataset`` reads of every shard, built as ``Run.shards`` builds them, through

  boto3   ``storage.arrow.store_filesystem``: ranged GETs through the Store's boto3 client, in Python;
  native  ``storage.arrow.native_s3_filesystem``: pyarrow's ``S3FileSystem`` (the AWS SDK for C++).

and ``open_run(uri).shards().to_table()`` as it stands (whatever ``storage.arrow.filesystem`` picks).
Each read runs ``--reps`` times, the paths interleaved; a fresh filesystem and dataset each time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A local fake S3: fake credentials, never a real account's (set before boto3 or pyarrow look).
for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
    os.environ.pop(name, None)
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                  AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")

import numpy as np  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from jobs.results import open_run  # noqa: E402
from storage import open_store  # noqa: E402
from storage.arrow import filesystem, native_s3_filesystem, store_filesystem  # noqa: E402
from storage.store import s3_client  # noqa: E402
from workers import experiments  # noqa: E402
from workers.rows import ROW_SCHEMA, ScoredBatch  # noqa: E402

D_VOCAB = 48262
N_NEIGHBORS = 8
SUBSET = ["fixed_token", "strength"]


def start_moto() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("moto_server did not start") from None
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shard_bytes(rng: np.random.Generator, experiment: str, part: int, n_seq: int) -> bytes:
    """One shard as the workers write it: ``ScoredBatch.to_table``, zstd, random but plausible values."""
    exp = experiments.get(experiment)
    names = exp.target_names(N_NEIGHBORS)
    n_t = len(names)
    per_token = exp.per_token
    fixed = (np.repeat(4 + part * 64 + np.arange(64), n_seq // 64) if per_token else np.full(n_seq, -1)).astype(np.int32)
    induction = rng.normal(2.0, 3.0, (n_seq, n_t)).astype(np.float32)
    batch = ScoredBatch(
        fixed=fixed, seq=np.arange(n_seq, dtype=np.int32) % 4096,
        a=rng.integers(0, D_VOCAB, n_seq, dtype=np.int32), b=rng.integers(0, D_VOCAB, n_seq, dtype=np.int32),
        targets=rng.integers(0, D_VOCAB, (n_seq, n_t), dtype=np.int32),
        induction=induction, shuffled=(induction - rng.gamma(2.0, 2.0, (n_seq, n_t))).astype(np.float32))
    table = batch.to_table(experiment, exp.scenarios[0].name, names)
    assert table.schema == ROW_SCHEMA
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def write_run(uri: str, target_mb: float, n_shards: int, seed: int) -> dict[str, int]:
    store = open_store(uri)
    rng = np.random.default_rng(seed)
    plan = [("neighbors" if i % 2 == 0 else "token-powers", i // 2) for i in range(n_shards)]
    # Size each experiment's shards from a probe so that the run reaches the target.
    per_seq = {e: len(shard_bytes(rng, e, 0, 16384)) / 16384 for e in {e for e, _ in plan}}
    n_seq = {e: int(target_mb * 1e6 / n_shards / b * 1.02) // 64 * 64 for e, b in per_seq.items()}

    def make(item):
        experiment, part = item
        rng = np.random.default_rng([seed, len(experiment), part])
        data = shard_bytes(rng, experiment, part, n_seq[experiment])
        store.put(f"shards/{experiment}/part-{part:06d}.parquet", data)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(make, plan))
    store.put("manifest.json", json.dumps({"status": "complete", "shards": n_shards,
                                           "note": "synthetic run for scripts/s3_read_bench.py"}).encode())
    return store.list("shards/")


def column_bytes(store_listing: dict[str, int], uri: str, columns: list[str] | None) -> int:
    """Stored bytes a read of ``columns`` must fetch: whole files, or those columns' chunks."""
    if columns is None:
        return sum(store_listing.values())
    fs = store_filesystem(open_store(uri))
    total = 0
    for key in store_listing:
        with fs.open_input_file(key) as f:
            meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            total += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)
                         if rg.column(c).path_in_schema in columns)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=320, help="stored size of the run, MB (default 320)")
    parser.add_argument("--shards", type=int, default=60)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    proc, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        s3_client().create_bucket(Bucket="bench-runs")
        uri = "s3://bench-runs/sweeps/bench"
        t0 = time.perf_counter()
        listing = write_run(uri, args.mb, args.shards, args.seed)
        stored = sum(listing.values())
        print(f"wrote {len(listing)} shards, {stored / 1e6:.1f} MB, in {time.perf_counter() - t0:.1f} s "
              f"(moto at {endpoint})", flush=True)

        store = open_store(uri)
        if native_s3_filesystem(store) is None:
            raise SystemExit("pyarrow's S3FileSystem cannot be built here")
        keys = sorted(k for k in store.list("shards/") if k.endswith(".parquet"))
        column_sets = {"all columns": None, "+".join(SUBSET): SUBSET}
        sizes = {label: column_bytes(listing, uri, cols) for label, cols in column_sets.items()}

        def read_with(make_fs):
            def read(columns):
                fs = make_fs(open_store(uri))
                return pads.dataset(keys, format="parquet", filesystem=fs).to_table(columns=columns)
            return read

        default = type(filesystem(open_store(uri))).__name__
        paths = {
            "boto3 (StoreFileSystem)": read_with(store_filesystem),
            "native (S3FileSystem)": read_with(native_s3_filesystem),
            f"open_run().shards() [{default}]": lambda columns: open_run(uri).shards().to_table(columns=columns),
        }
        times: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[tuple[float, float]]] = {}
        rows: dict[str, int] = {}
        for rep in range(args.reps):
            for label, columns in column_sets.items():
                order = list(paths) if rep % 2 == 0 else list(reversed(paths))
                for name in order:
                    server, client, t = cpu_seconds(proc.pid), time.process_time(), time.perf_counter()
                    table = paths[name](columns)
                    elapsed = time.perf_counter() - t
                    server, client = cpu_seconds(proc.pid) - server, time.process_time() - client
                    times.setdefault((name, label), []).append(elapsed)
                    cpu.setdefault((name, label), []).append((client, server))
                    assert rows.setdefault(label, table.num_rows) == table.num_rows
                    del table
                    print(f"  rep {rep + 1} {name:36s} {label:22s} {elapsed:6.2f} s "
                          f"(CPU s: reader {client:5.2f}, moto {server:5.2f})", flush=True)

        print(f"\n{len(keys)} shards, {stored / 1e6:.1f} MB stored, {rows['all columns'] / 1e6:.1f} M rows; "
              f"{args.reps} reps each; MB/s = stored bytes of the columns read / median seconds\n")
        print("| path | columns | MB read | seconds (each rep) | median s | MB/s | CPU s: reader / moto |")
        print("|---|---|---|---|---|---|---|")
        for (name, label), ts in sorted(times.items(), key=lambda item: (item[0][1] != "all columns", item[0][0])):
            med = statistics.median(ts)
            reader, server = (statistics.median(x) for x in zip(*cpu[name, label]))
            print(f"| {name} | {label} | {sizes[label] / 1e6:.1f} | {', '.join(f'{t:.2f}' for t in ts)} | "
                  f"{med:.2f} | {sizes[label] / 1e6 / med:.0f} | {reader:.1f} / {server:.1f} |")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
