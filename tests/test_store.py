import io

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from storage import StorageInputError, open_store
from storage.arrow import filesystem, parquet_footer


def exercise(store):
    store.put("a/b/one.bin", b"hello world")
    store.put("a/two.bin", b"xyz")
    store.put("a/b/one.bin", b"hello again")  # replaced whole
    assert store.get("a/b/one.bin") == b"hello again"
    assert store.get_range("a/b/one.bin", 6, 9) == b"aga"
    assert store.list("a/") == {"a/b/one.bin": 11, "a/two.bin": 3}
    assert store.exists("a/two.bin") and not store.exists("a/three.bin")
    with pytest.raises(FileNotFoundError):
        store.get("missing")
    table = pa.table({"x": list(range(1000)), "y": [float(i) for i in range(1000)]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    store.put("t/part-0.parquet", buffer.getvalue())
    size = store.list("t/")["t/part-0.parquet"]
    assert parquet_footer(store, "t/part-0.parquet", size).num_rows == 1000
    ds = pads.dataset(["t/part-0.parquet"], format="parquet", filesystem=filesystem(store))
    assert ds.to_table(columns=["x"]).column("x").to_pylist() == list(range(1000))
    store.delete_prefix("a/")
    assert store.list("a/") == {}


def test_local_store(tmp_path):
    store = open_store(str(tmp_path / "run"))
    exercise(store)
    assert not (tmp_path / "run" / ".tmp").exists() or not list((tmp_path / "run" / ".tmp").iterdir())


def test_s3_store(bucket):
    store = open_store(f"s3://{bucket}/some/prefix")
    store.check()
    exercise(store)


def test_truncated_parquet_is_detected(tmp_path):
    store = open_store(str(tmp_path))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"x": list(range(100))}), buffer)
    store.put("p.parquet", buffer.getvalue()[:-10])
    with pytest.raises(pa.ArrowInvalid):
        parquet_footer(store, "p.parquet", store.list("p.parquet")["p.parquet"])


@pytest.mark.parametrize("uri", ["s3://", "s3://Bad_Bucket/x", "gs://bucket/x", "http://host/x", ""])
def test_malformed_uris(uri):
    with pytest.raises(StorageInputError):
        open_store(uri)


def test_missing_bucket_is_an_input_error(moto_server):
    with pytest.raises(StorageInputError, match="does not exist"):
        open_store("s3://no-such-bucket-here/x").check()


@pytest.mark.parametrize("env, sends", [({}, 4), ({"AWS_MAX_ATTEMPTS": "2"}, 2), ({"AWS_MAX_ATTEMPTS": "3"}, 3)])
def test_retries_follow_the_aws_variables(monkeypatch, env, sends):
    """AWS_MAX_ATTEMPTS wins over the project's default (INDUCTION_SWEEP_S3_ATTEMPTS, here 4), as in the
    AWS tools: counted as requests sent to an endpoint that refuses connections."""
    import socket

    from storage.store import s3_client

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("INDUCTION_SWEEP_S3_ATTEMPTS", "4")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = s3_client()
    count = []
    client.meta.events.register("before-send.s3", lambda **kw: count.append(1))
    with pytest.raises(Exception, match="Could not connect"):
        client.head_bucket(Bucket="b")
    assert len(count) == sends and client.meta.config.retries["mode"] == "standard"


def shard_like(n: int, offset: int) -> pa.Table:
    """Rows shaped like a shard's: dictionary strings, int32 and float32 columns."""
    import numpy as np

    rng = np.random.default_rng(offset)
    targets = pa.DictionaryArray.from_arrays(np.arange(n, dtype=np.int16) % 3, pa.array(["B", "A", "N1"]))
    return pa.table({"target": targets, "fixed_token": pa.array(np.arange(offset, offset + n, dtype=np.int32)),
                     "strength": pa.array(rng.normal(size=n).astype(np.float32))})


def put_shards(store, tables) -> list[str]:
    keys = []
    for i, table in enumerate(tables):
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        keys.append(f"shards/neighbors/part-{i:06d}.parquet")
        store.put(keys[-1], buffer.getvalue())
    return keys


def test_s3_datasets_read_through_pyarrows_s3_client(bucket):
    """``filesystem`` of an S3 store is pyarrow's S3FileSystem under the store's prefix, and reads the
    rows, a column subset and a dictionary filter as the boto3 path does."""
    import pyarrow.fs as pafs

    from storage.arrow import store_filesystem

    store = open_store(f"s3://{bucket}/sweeps/run")
    tables = [shard_like(5000, 0), shard_like(3000, 5000)]
    keys = put_shards(store, tables)
    fs = filesystem(store)
    assert isinstance(fs, pafs.SubTreeFileSystem) and isinstance(fs.base_fs, pafs.S3FileSystem)
    assert fs.base_path == f"{bucket}/sweeps/run/"
    ds = pads.dataset(keys, format="parquet", filesystem=fs)
    assert ds.to_table().equals(pa.concat_tables(tables))
    subset = ds.to_table(columns=["fixed_token", "strength"])
    assert subset.column("fixed_token").to_pylist() == list(range(8000))
    assert subset.column("strength").equals(pa.concat_tables(tables).column("strength"))
    only_a = ds.to_table(filter=pads.field("target") == "A")
    assert only_a.num_rows == sum(t.column("target").to_pylist().count("A") for t in tables)
    boto3_ds = pads.dataset(keys, format="parquet", filesystem=store_filesystem(store))
    assert boto3_ds.to_table(filter=pads.field("target") == "A").equals(only_a)
    with pytest.raises(FileNotFoundError):
        pads.dataset(["shards/neighbors/missing.parquet"], format="parquet", filesystem=fs).to_table()


def test_open_run_reads_s3_shards_natively(bucket):
    import pyarrow.fs as pafs

    from jobs.results import open_run

    store = open_store(f"s3://{bucket}/run")
    from jobs import manifest
    from jobs.config import RunConfig

    manifest.write(store, RunConfig(model="toy-2l", out=store.uri), 2, "complete")
    tables = [shard_like(100, 0), shard_like(50, 100)]
    put_shards(store, tables)
    run = open_run(f"s3://{bucket}/run")
    ds = run.shards("neighbors")
    assert isinstance(ds.filesystem, pafs.SubTreeFileSystem)
    assert ds.to_table(columns=["fixed_token"]).column("fixed_token").to_pylist() == list(range(150))


def test_native_s3_options_follow_boto3(bucket, monkeypatch):
    """Endpoint, region, session token and retries as the boto3 client has them (values from the
    environment, never written anywhere)."""
    import os

    import pyarrow.fs as pafs

    from storage.arrow import native_s3_options

    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-for-the-test")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    store = open_store(f"s3://{bucket}/p")
    options = native_s3_options(store)
    assert options["endpoint_override"] == os.environ["AWS_ENDPOINT_URL"].split("://")[1]
    assert options["scheme"] == "http" and options["region"] == "eu-west-3"
    assert options["access_key"] == os.environ["AWS_ACCESS_KEY_ID"]
    assert options["session_token"] == "session-token-for-the-test"
    assert isinstance(options["retry_strategy"], pafs.AwsStandardS3RetryStrategy)
    assert options["retry_strategy"].max_attempts == 7
    monkeypatch.setenv("AWS_RETRY_MODE", "legacy")
    assert isinstance(native_s3_options(open_store(f"s3://{bucket}/p"))["retry_strategy"],
                      pafs.AwsDefaultS3RetryStrategy)


def test_the_boto3_path_remains_where_the_native_client_cannot_be_built(bucket, monkeypatch, tmp_path):
    """No credentials in boto3's chain, or no native client: reads go through the Store as before.
    Local stores always do."""
    import pyarrow.fs as pafs

    import storage.arrow

    store = open_store(f"s3://{bucket}/p")
    keys = put_shards(store, [shard_like(10, 0)])
    with monkeypatch.context() as m:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            m.delenv(name, raising=False)
        m.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        m.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        m.setenv("AWS_EC2_METADATA_DISABLED", "true")
        fs = filesystem(open_store(f"s3://{bucket}/p"))
        assert isinstance(fs, pafs.PyFileSystem) and fs.type_name == "py::induction-sweep-store"
    monkeypatch.setattr(storage.arrow, "native_s3_filesystem", lambda store: None)
    fallback = filesystem(store)
    assert isinstance(fallback, pafs.PyFileSystem)
    assert pads.dataset(keys, format="parquet", filesystem=fallback).to_table().equals(shard_like(10, 0))
    assert isinstance(filesystem(open_store(str(tmp_path / "local"))), pafs.PyFileSystem)
