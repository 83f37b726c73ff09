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
