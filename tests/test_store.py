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
