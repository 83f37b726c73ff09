"""The keyed accumulator's maths, on the CPU: moments, the merge, histogram bins, the footer round trip."""

import numpy as np
import pandas as pd
import pytest

from workers.accumulator import LOGODDS_BINS, STRENGTH_BINS, Accumulator, bin_edges, bin_index


def moments(acc: Accumulator, **keys) -> pd.Series:
    f = acc.select(keys.pop("stat", "x"))
    for k, v in keys.items():
        f = f[f[k] == v]
    assert len(f) == 1
    return f.iloc[0]


def test_moments_per_key_match_numpy():
    rng = np.random.default_rng(0)
    values, token = rng.normal(3, 2, 5000), rng.integers(4, 40, 5000)
    acc = Accumulator.of("x", "token-powers", "A", values, target="B", token=token)
    assert len(acc.frame) == len(np.unique(token))
    for t in (4, 17, 39):
        m, v = moments(acc, token=t), values[token == t]
        assert m.n == len(v) and m["mean"] == pytest.approx(v.mean(), abs=1e-12)
        assert m.m2 == pytest.approx(((v - v.mean()) ** 2).sum(), rel=1e-12)
        assert m["sem"] == pytest.approx(v.std(ddof=1) / np.sqrt(len(v)), rel=1e-12)


def test_merging_parts_equals_the_whole_in_any_split():
    rng = np.random.default_rng(1)
    values, target = rng.normal(size=3000), rng.choice(np.array(["B", "A", "R"]), 3000)
    whole = Accumulator.of("x", "neighbors", "free", values, target=target)
    cuts = [0, 1, 700, 701, 2500, 3000]
    parts = [Accumulator.of("x", "neighbors", "free", values[a:b], target=target[a:b]) for a, b in zip(cuts, cuts[1:])]
    merged = Accumulator.merge(parts)
    for t in ("B", "A", "R"):
        m, w = moments(merged, target=t), moments(whole, target=t)
        assert m.n == w.n and m["mean"] == pytest.approx(w["mean"], abs=1e-13) and m.m2 == pytest.approx(w.m2, rel=1e-11)


def test_merge_is_stable_far_from_zero():
    """Values 1e9 + N(0, 1): a sum-of-squares formula loses every digit of the variance; deviations from the merged mean keep them."""
    rng = np.random.default_rng(2)
    noise = rng.normal(size=4000)
    parts = [Accumulator.of("x", "e", "s", 1e9 + noise[i : i + 1000]) for i in range(0, 4000, 1000)]
    m = moments(Accumulator.merge(parts))
    assert m.m2 / (m.n - 1) == pytest.approx(noise.var(ddof=1), rel=1e-6)


def test_merge_keeps_distinct_keys_apart_and_is_deterministic():
    a = Accumulator.of("x", "e", "s", np.array([1.0, 2.0]), token=np.array([4, 5]))
    b = Accumulator.of("y", "e", "s", np.array([7.0]))
    merged = Accumulator.merge([a, b, a])
    assert len(merged.frame) == 3 and moments(merged, stat="y")["mean"] == 7
    assert moments(merged, token=4).n == 2
    pd.testing.assert_frame_equal(merged.frame, Accumulator.merge([a, b, a]).frame, check_exact=True)
    assert len(Accumulator.merge([]).frame) == 0


def test_bins_match_numpy_histogram_on_fixed_edges():
    rng = np.random.default_rng(3)
    for bins in (STRENGTH_BINS, LOGODDS_BINS):
        values = np.concatenate([rng.uniform(bins[1] - 5, bins[2] + 5, 20000), [bins[1], bins[2], np.nan]])
        idx = bin_index(values, bins)
        counts = np.bincount(idx[idx >= 0], minlength=bins[0])
        assert np.array_equal(counts, np.histogram(values[np.isfinite(values)], bin_edges(bins))[0])
    hist = Accumulator.counts("h", "e", "s", bin_index(np.array([-10.0, -9.5, 19.99, 20.0, 25.0]), STRENGTH_BINS))
    assert dict(zip(hist.frame.bin, hist.frame.n)) == {0: 2, 29: 2}


def test_footer_round_trip():
    acc = Accumulator.concat([Accumulator.of("x", "e", "s", np.arange(5.0), token=np.arange(5)),
                              Accumulator.counts("h", "e", "s", np.array([3, 3, 1]))])
    back = Accumulator.from_bytes(acc.to_bytes())
    pd.testing.assert_frame_equal(back.frame, acc.frame, check_exact=True)


def test_a_value_that_is_not_finite_is_never_averaged_away():
    """A NaN in one part keeps its key's merged mean NaN, and n counts every value that went in (a
    merge once skipped NaN: mean 0.0, sem 0.0 and a full n for a run of NaN rows)."""
    clean = Accumulator.of("x", "e", "s", np.arange(10.0), target="B")
    dirty = Accumulator.of("x", "e", "s", np.array([1.0, np.nan, 2.0]), target="B")
    merged = moments(Accumulator.merge([clean, dirty]))
    assert merged.n == 13 and np.isnan(merged["mean"]) and np.isnan(merged.m2)
    only_nan = moments(Accumulator.merge([Accumulator.of("x", "e", "s", np.full(64, np.nan), target="B")]))
    assert only_nan.n == 64 and np.isnan(only_nan["mean"]) and np.isnan(only_nan["sem"])


def test_a_shards_strengths_that_are_not_finite_are_counted_with_an_example():
    from workers import experiments
    from workers.accumulator import shard_partials
    from workers.rows import ScoredBatch

    n = 8
    induction = np.zeros((n, 1), np.float32)
    induction[[2, 5], 0] = [np.inf, np.nan]
    batch = ScoredBatch(fixed=np.full(n, 57), seq=np.arange(100, 100 + n), a=np.zeros(n), b=np.full(n, 57),
                        targets=np.full((n, 1), 57), induction=induction, shuffled=np.zeros((n, 1), np.float32))
    acc = shard_partials(experiments.get("token-powers"), "B", batch, ("B",))
    count, example = Accumulator.merge([acc, acc]).nonfinite()
    assert count == 4  # two shards' worth
    assert example == {"experiment": "token-powers", "scenario": "B", "target": "B", "token": 57, "sequence": 102}
    assert Accumulator.merge([Accumulator.of("x", "e", "s", np.ones(3))]).nonfinite() == (0, None)
