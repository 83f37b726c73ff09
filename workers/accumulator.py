"""One keyed, mergeable accumulator for every aggregate of a run (docs/DESIGN.md §3).

Each entry is the count, mean and sum of squared deviations (M2) of one statistic under one key
``(stat, experiment, scenario, target, token, bin)``: strength moments per target or per fixed
token, histogram counts on fixed bins (a count is an entry's n), per-head moments. Every shard
computes its own (``shard_partials``) and stores it in its Parquet footer, written in the same
atomic put as its rows; the driver merges them (the parallel-variance combination of Chan et al.,
over many parts at once, float64), so the
end of a run reads kilobytes per shard. Tables and plots derive from the merged accumulator
(jobs/aggregate.py).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from workers.experiments import Experiment
from workers.rows import ScoredBatch

KEYS = ("stat", "experiment", "scenario", "target", "token", "bin")
VALUES = ("n", "mean", "m2")
FOOTER_KEY = b"induction_sweep.partials"

STRENGTH = "strength"
# strengths that are not finite: one entry per shard and scenario with their count (bin -1), and the first
# NONFINITE_EXAMPLES of them, each keyed by its target, fixed token and sequence index (bin)
NONFINITE = "nonfinite"
NONFINITE_EXAMPLES = 5
# Histograms count only the values inside their range: the values outside are the target's strength
# n (every value that went in) less the counts (jobs/aggregate.py).
HIST_STRENGTH = "hist:strength"  # strength per scenario and declared target (Experiment.histograms)
HIST_LOGODDS = "hist2d:logodds"  # (induction, shuffled) log-odds of B, per scenario; bin = induction bin * bins + shuffled bin
# Fixed bin edges, so that every shard counts into the same bins (the post's figures).
STRENGTH_BINS = (30, -10.0, 20.0)
LOGODDS_BINS = (100, -18.0, 6.0)


def bin_index(values: np.ndarray, bins: tuple[int, float, float]) -> np.ndarray:
    """Bin of each value on ``bins`` = (count, lo, hi): [lo, hi) per bin, hi in the last; -1 outside."""
    n, lo, hi = bins
    v = values.astype(np.float64)
    inside = (v >= lo) & (v <= hi)  # False for NaN
    idx = np.full(len(v), -1, dtype=np.int64)
    idx[inside] = np.minimum(np.floor((v[inside] - lo) / (hi - lo) * n).astype(np.int64), n - 1)
    return idx


def bin_edges(bins: tuple[int, float, float]) -> np.ndarray:
    return np.linspace(bins[1], bins[2], bins[0] + 1)


class Accumulator:
    """Count, mean and M2 per key, as a DataFrame with columns KEYS + VALUES."""

    def __init__(self, frame: pd.DataFrame | None = None):
        self.frame = frame if frame is not None else pd.DataFrame({c: [] for c in KEYS + VALUES}).astype(
            {"token": np.int64, "bin": np.int64, "n": np.int64})

    @classmethod
    def of(cls, stat: str, experiment: str, scenario: str, values: np.ndarray, target: str | np.ndarray = "",
           token: int | np.ndarray = -1, bin: int | np.ndarray = -1) -> Accumulator:
        """Moments of ``values`` grouped by the keys given as arrays (the others are constants)."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        varying = {k: np.asarray(v).reshape(-1) for k, v in (("target", target), ("token", token), ("bin", bin))
                   if isinstance(v, np.ndarray)}
        codes, uniques = [], {}
        for name, column in varying.items():  # hashing, in order of appearance: O(n), no sort
            code, uniques[name] = pd.factorize(column)
            codes.append(code)
        group = np.ravel_multi_index(codes, [len(u) for u in uniques.values()]) if codes else np.zeros(len(values), np.int64)
        inverse, ids = pd.factorize(group)
        n = np.bincount(inverse, minlength=len(ids))
        mean = np.bincount(inverse, weights=values, minlength=len(ids)) / n
        m2 = np.bincount(inverse, weights=(values - mean[inverse]) ** 2, minlength=len(ids))
        index = np.unravel_index(ids, [len(u) for u in uniques.values()]) if codes else ()
        keys = {"target": target, "token": token, "bin": bin}
        keys.update({name: uniques[name][i] for name, i in zip(uniques, index)})
        frame = pd.DataFrame({"stat": stat, "experiment": experiment, "scenario": scenario, **keys,
                              "n": n.astype(np.int64), "mean": mean, "m2": m2}, index=range(len(ids)))
        return cls(frame.astype({"target": str, "token": np.int64, "bin": np.int64}))

    @classmethod
    def counts(cls, stat: str, experiment: str, scenario: str, bins: np.ndarray, target: str = "") -> Accumulator:
        """A histogram: the count of each bin index (values outside, -1, are dropped)."""
        bins = bins[bins >= 0]
        return cls.of(stat, experiment, scenario, np.zeros(len(bins)), target=target, bin=bins)

    @staticmethod
    def concat(parts: Sequence[Accumulator]) -> Accumulator:
        """Entries of disjoint keys side by side (no merging)."""
        frames = [p.frame for p in parts if len(p.frame)]
        return Accumulator(pd.concat(frames, ignore_index=True) if frames else None)

    @staticmethod
    def merge(parts: Sequence[Accumulator]) -> Accumulator:
        """Combine entries with equal keys: n adds, means weight by n, M2 adds plus n·(mean - merged mean)²
        (Chan et al.'s combination, for any number of parts at once: no sum of squares cancels).
        Sums run in the order of ``parts`` (deterministic), and a NaN stays NaN: a mean that met a
        non-finite value is not finite, and n counts every value that went in."""
        df = Accumulator.concat(parts).frame
        if df.empty:
            return Accumulator()
        group = df.groupby(list(KEYS), sort=True).ngroup().to_numpy()
        n_groups = int(group.max()) + 1
        n = df.n.to_numpy()

        def total(weights: np.ndarray) -> np.ndarray:  # bincount adds in order, and NaN + x is NaN
            return np.bincount(group, weights=weights, minlength=n_groups)

        count = total(n.astype(np.float64))
        mean = total(n * df["mean"].to_numpy()) / count
        m2 = total(df.m2.to_numpy() + n * (df["mean"].to_numpy() - mean[group]) ** 2)
        first = np.unique(group, return_index=True)[1]
        keys = df.iloc[first][list(KEYS)].reset_index(drop=True)
        return Accumulator(keys.assign(n=count.astype(np.int64), mean=mean, m2=m2))

    def select(self, stat: str, experiment: str | None = None) -> pd.DataFrame:
        """Entries of one statistic (of one experiment), with the standard error of each mean."""
        f = self.frame[self.frame.stat == stat]
        if experiment is not None:
            f = f[f.experiment == experiment]
        with np.errstate(invalid="ignore", divide="ignore"):
            sem = np.sqrt(f.m2 / (f.n - 1) / f.n)
        return f.assign(sem=sem).reset_index(drop=True)

    def nonfinite(self) -> tuple[int, dict | None]:
        """How many strengths that went in were not finite, and the first recorded one (experiment,
        scenario, target, fixed token, sequence index), from the NONFINITE entries."""
        f = self.frame[self.frame.stat == NONFINITE]
        examples = f[f.bin >= 0]
        first = None if examples.empty else {
            "experiment": str(examples.experiment.iloc[0]), "scenario": str(examples.scenario.iloc[0]),
            "target": str(examples.target.iloc[0]), "token": int(examples.token.iloc[0]), "sequence": int(examples.bin.iloc[0])}
        return int(f[f.bin < 0].n.sum()), first

    def to_bytes(self) -> bytes:
        """Arrow IPC (zstd), base64: a Parquet footer value."""
        sink = pa.BufferOutputStream()
        table = pa.Table.from_pandas(self.frame, preserve_index=False)
        with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
            writer.write_table(table)
        return base64.b64encode(sink.getvalue().to_pybytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> Accumulator:
        return cls(pa.ipc.open_stream(base64.b64decode(data)).read_all().to_pandas())


def shard_partials(experiment: Experiment, scenario: str, batch: ScoredBatch, names: tuple[str, ...]) -> Accumulator:
    """Everything a shard contributes to the run's aggregates, from its scored (numpy) batch."""
    name = experiment.name
    strength = batch.strength
    token = batch.fixed.astype(np.int64) if "token" in experiment.key else -1
    parts = [Accumulator.of(STRENGTH, name, scenario, strength[:, j], target=target, token=token)
             for j, target in enumerate(names)]
    bad_seq, bad_target = np.nonzero(~np.isfinite(strength))
    if len(bad_seq):
        parts.append(Accumulator.of(NONFINITE, name, scenario, np.zeros(len(bad_seq)), target="", token=-1, bin=-1))
        first = slice(0, NONFINITE_EXAMPLES)
        parts.append(Accumulator.of(NONFINITE, name, scenario, np.zeros(len(bad_seq[first])),
                                    target=np.asarray(names)[bad_target[first]], token=batch.fixed[bad_seq[first]].astype(np.int64),
                                    bin=batch.seq[bad_seq[first]].astype(np.int64)))
    for target in experiment.histograms:
        if target in names:
            parts.append(Accumulator.counts(HIST_STRENGTH, name, scenario, bin_index(strength[:, names.index(target)], STRENGTH_BINS),
                                            target=target))
    if experiment.logodds:
        on_b = names.index("B")
        x = bin_index(batch.induction[:, on_b], LOGODDS_BINS)  # the post's axes: induction on x, shuffled on y
        y = bin_index(batch.shuffled[:, on_b], LOGODDS_BINS)
        parts.append(Accumulator.counts(HIST_LOGODDS, name, scenario, np.where((x >= 0) & (y >= 0), x * LOGODDS_BINS[0] + y, -1),
                                        target="B"))
    parts += [Accumulator.of(column, name, scenario, values) for column, values in batch.heads.items()]
    return Accumulator.concat(parts)
