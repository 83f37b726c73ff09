"""The run's merge tree: the same bits whatever order shards finish in and wherever blocks are merged."""

import numpy as np
import pandas as pd
import pytest

from jobs.driver import MERGE_BLOCK, BlockMerge, merge_block
from jobs.errors import RunFailed
from workers.accumulator import Accumulator
from workers.shard import ShardSpec

N = 2 * MERGE_BLOCK + 5  # two whole blocks and a short one


@pytest.fixture(scope="module")
def shards():
    rng = np.random.default_rng(0)
    specs = [ShardSpec("neighbors", "free", i, i * 10, i * 10 + 10) for i in range(N)]
    parts = {s.key: Accumulator.of("strength", "neighbors", "free", rng.normal(3, 2, 50), target=rng.choice(["B", "R"], 50),
                                   token=rng.integers(4, 8, 50)).to_bytes() for s in specs}
    return specs, parts


def merged(specs, parts, order, remote=None) -> pd.DataFrame:
    merges = BlockMerge(specs, remote)
    for i in order:
        merges.add(specs[i].key, parts[specs[i].key])
    return merges.result(getattr(remote, "get", None)).frame


def test_any_completion_order_gives_the_same_bits(shards):
    specs, parts = shards
    first = merged(specs, parts, range(N))
    shuffled = merged(specs, parts, np.random.default_rng(1).permutation(N))
    pd.testing.assert_frame_equal(first, shuffled, check_exact=True)
    flat = Accumulator.merge([Accumulator.from_bytes(parts[s.key]) for s in specs]).frame
    pd.testing.assert_frame_equal(first, flat, check_exact=False, rtol=1e-12)  # the tree only reorders float sums


def test_blocks_merged_by_ray_tasks_equal_those_merged_here(shards, ray_cluster):
    specs, parts = shards
    task = ray_cluster.remote(merge_block)

    class Remote:
        def __call__(self, block):
            return task.remote(block)

        get = staticmethod(ray_cluster.get)

    pd.testing.assert_frame_equal(merged(specs, parts, range(N)), merged(specs, parts, range(N), Remote()), check_exact=True)


def test_a_missing_shard_is_a_failure_not_a_smaller_aggregate(shards):
    specs, parts = shards
    with pytest.raises(RunFailed, match="1 blocks"):
        merged(specs, parts, range(1, N))
