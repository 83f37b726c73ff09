"""A scored batch as Parquet rows and back: one row per (sequence, target), sequence-major."""

import io

import numpy as np
import pyarrow.parquet as pq

from workers.experiments import neighbor_targets
from workers.rows import ScoredBatch


def test_rows_round_trip_with_many_targets_and_head_columns():
    rng = np.random.default_rng(0)
    names = neighbor_targets(130)  # 132 targets: past an int8 dictionary index
    n, t = 5, len(names)
    batch = ScoredBatch(fixed=np.full(n, -1), seq=np.arange(n), a=rng.integers(4, 99, n), b=rng.integers(4, 99, n),
                        targets=rng.integers(4, 99, (n, t)), induction=rng.normal(size=(n, t)).astype(np.float32),
                        shuffled=rng.normal(size=(n, t)).astype(np.float32),
                        heads={"h0_attn_b": rng.random(n).astype(np.float32), "rest_dla_b_shuf": rng.random(n).astype(np.float32)})
    buffer = io.BytesIO()
    pq.write_table(batch.to_table("neighbors", "free", names), buffer)
    table = pq.read_table(io.BytesIO(buffer.getvalue()))
    assert table.num_rows == n * t and table["target"].to_pylist()[: t + 1] == [*names, "B"]
    back = ScoredBatch.from_table(table, t)
    for name in ("seq", "a", "b", "targets", "induction", "shuffled"):
        assert np.array_equal(getattr(back, name), getattr(batch, name)), name
    assert np.array_equal(back.strength, batch.strength) and np.array_equal(table["strength"].to_numpy(), batch.strength.ravel())
    assert back.heads.keys() == batch.heads.keys() and np.array_equal(back.heads["h0_attn_b"], batch.heads["h0_attn_b"])
