"""Aggregation: stream over the shards once (bounded memory at any vocabulary size) and write
``aggregates/`` (DESIGN §4). Sums are float64 and taken in shard order, so a resumed run's
aggregates equal an uninterrupted run's."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from jobs.config import RunConfig, plan_shards
from storage import Store
from workers import experiments
from workers.heads import is_head_column
from workers.sequences import FIRST_TOKEN

POWER_BINS = 30
FIXED_PAIR_BINS, FIXED_PAIR_RANGE = 30, (-10.0, 20.0)
LOGODDS_BINS, LOGODDS_RANGE = 100, (-18.0, 6.0)
COLUMNS = ["scenario", "fixed_token", "target", "logodds_induction", "logodds_shuffled", "strength"]


class Moments:
    """Count, sum and sum of squares per integer key (float64)."""

    def __init__(self, size: int):
        self.n, self.s, self.ss = np.zeros(size), np.zeros(size), np.zeros(size)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        size = len(self.n)
        v = values.astype(np.float64)
        self.n += np.bincount(keys, minlength=size)
        self.s += np.bincount(keys, weights=v, minlength=size)
        self.ss += np.bincount(keys, weights=v * v, minlength=size)

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.s / self.n

    def sem(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.maximum(self.ss - self.n * self.mean() ** 2, 0) / (self.n - 1)
            return np.sqrt(var / self.n)


def _codes(column, names: list[str]) -> np.ndarray:
    """Dictionary column -> indices into ``names``."""
    col = column.combine_chunks()
    lookup = np.array([names.index(v) for v in col.dictionary.to_pylist()], dtype=np.int64)
    return lookup[col.indices.to_numpy(zero_copy_only=False)]


def aggregate(store: Store, cfg: RunConfig, token_strings: list[str]) -> dict[str, pd.DataFrame | dict]:
    d_vocab = len(token_strings)
    n_neighbors = cfg.work_params.n_neighbors
    roles = [s.name for s in experiments.TOKEN_POWER_ROLES]
    fp_scenarios = [s.name for s in experiments.FIXED_PAIR_SCENARIOS]
    fp_targets = experiments.target_names("fixed-pair", n_neighbors)
    nb_targets = experiments.target_names("neighbors", n_neighbors)
    powers = {r: Moments(d_vocab) for r in roles}
    fixed = Moments(len(fp_scenarios) * len(fp_targets))
    fp_hist = np.zeros((len(fp_scenarios), FIXED_PAIR_BINS), dtype=np.int64)
    fp_hist2d = np.zeros((len(fp_scenarios), LOGODDS_BINS, LOGODDS_BINS), dtype=np.int64)
    neigh = Moments(len(nb_targets))
    ctl_targets = experiments.target_names(experiments.CONTROLS[0], n_neighbors)
    controls = {c: Moments(len(ctl_targets)) for c in experiments.CONTROLS}

    head_sums: dict[tuple[str, str], dict[str, float]] = {}  # (experiment, scenario) -> column -> sum on B rows
    head_n: dict[tuple[str, str], int] = {}
    for spec in plan_shards(cfg):
        f = pq.ParquetFile(io.BytesIO(store.get(spec.key)))
        head_columns = [n for n in f.schema_arrow.names if is_head_column(n)]
        t = f.read(columns=COLUMNS + head_columns)
        strength = t["strength"].to_numpy()
        if head_columns and spec.experiment != "token-powers":
            on_b = _codes(t["target"], experiments.target_names(spec.experiment, n_neighbors)) == 0  # B comes first
            sums = head_sums.setdefault((spec.experiment, spec.scenario), dict.fromkeys(head_columns, 0.0))
            for name in head_columns:
                sums[name] += float(t[name].to_numpy()[on_b].astype(np.float64).sum())
            head_n[(spec.experiment, spec.scenario)] = head_n.get((spec.experiment, spec.scenario), 0) + int(on_b.sum())
        if spec.experiment == "token-powers":
            powers[spec.scenario].add(t["fixed_token"].to_numpy(), strength)
        elif spec.experiment == "fixed-pair":
            scen, target = _codes(t["scenario"], fp_scenarios), _codes(t["target"], fp_targets)
            fixed.add(scen * len(fp_targets) + target, strength)
            on_b = target == 0
            i = fp_scenarios.index(spec.scenario)
            fp_hist[i] += np.histogram(strength[on_b], FIXED_PAIR_BINS, FIXED_PAIR_RANGE)[0]
            fp_hist2d[i] += np.histogram2d(t["logodds_shuffled"].to_numpy()[on_b], t["logodds_induction"].to_numpy()[on_b],
                                           LOGODDS_BINS, [LOGODDS_RANGE, LOGODDS_RANGE])[0].astype(np.int64)
        elif spec.experiment in controls:
            controls[spec.experiment].add(_codes(t["target"], ctl_targets), strength)
        else:
            neigh.add(_codes(t["target"], nb_targets), strength)

    out: dict[str, pd.DataFrame | dict] = {}
    summary: dict = {"config_hash": cfg.config_hash, "model": cfg.model, "seed": cfg.seed}
    hist_rows = []
    if "token-powers" in cfg.experiments:
        ids = np.arange(FIRST_TOKEN, FIRST_TOKEN + cfg.tokens)
        table = pd.DataFrame({"token": ids, "token_str": [token_strings[i] for i in ids]})
        for r in roles:
            m = powers[r]
            key = r.lower()
            table[f"{key}_power"], table[f"{key}_sem"], table[f"{key}_n"] = m.mean()[ids], m.sem()[ids], m.n[ids].astype(np.int64)
        out["token_powers"] = table
        values = np.concatenate([table["a_power"], table["b_power"]])
        edges = np.histogram_bin_edges(values, POWER_BINS)  # the post's common range for A and B
        for r in roles:
            counts = np.histogram(table[f"{r.lower()}_power"], edges)[0]
            hist_rows += [(r, lo, hi, c) for lo, hi, c in zip(edges[:-1], edges[1:], counts)]
        summary["token_powers"] = {
            "tokens": int(cfg.tokens), "seqs": cfg.seqs,
            **{f"mean_{r.lower()}_power": float(table[f"{r.lower()}_power"].mean()) for r in roles},
            **{f"std_{r.lower()}_power": float(table[f"{r.lower()}_power"].std()) for r in roles},
            **{f"mean_{r.lower()}_sem": float(table[f"{r.lower()}_sem"].mean()) for r in roles},
            "mean_sem": float(pd.concat([table["a_sem"], table["b_sem"]]).mean()),
            "corr_a_b": float(table["a_power"].corr(table["b_power"])),
        }
    if "fixed-pair" in cfg.experiments:
        rows = [(s, t, fixed.mean()[i * len(fp_targets) + j], fixed.sem()[i * len(fp_targets) + j],
                 int(fixed.n[i * len(fp_targets) + j])) for i, s in enumerate(fp_scenarios) for j, t in enumerate(fp_targets)]
        out["fixed_pair"] = pd.DataFrame(rows, columns=["scenario", "target", "mean", "sem", "n"])
        edges = np.linspace(*FIXED_PAIR_RANGE, FIXED_PAIR_BINS + 1)
        for i, s in enumerate(fp_scenarios):
            hist_rows += [(f"fixed-pair {s}", lo, hi, c) for lo, hi, c in zip(edges[:-1], edges[1:], fp_hist[i])]
        e2 = np.linspace(*LOGODDS_RANGE, LOGODDS_BINS + 1)
        si, xi, yi = np.nonzero(fp_hist2d)
        out["fixed_pair_logodds"] = pd.DataFrame({
            "scenario": [fp_scenarios[i] for i in si], "shuffled_lo": e2[xi], "shuffled_hi": e2[xi + 1],
            "induction_lo": e2[yi], "induction_hi": e2[yi + 1], "count": fp_hist2d[si, xi, yi]})
        summary["fixed_pair"] = {
            "pair": list(cfg.pair), "pair_str": [token_strings[t] for t in cfg.pair],
            **{s: float(fixed.mean()[i * len(fp_targets)]) for i, s in enumerate(fp_scenarios)}}
    if "neighbors" in cfg.experiments:
        out["neighbors"] = pd.DataFrame({
            "target": nb_targets, "k": [experiments.neighbor_rank(t) for t in nb_targets],
            "mean": neigh.mean(), "sem": neigh.sem(), "n": neigh.n.astype(np.int64)})
        means = dict(zip(nb_targets, neigh.mean()))
        summary["neighbors"] = {t: float(means[t]) for t in ("B", "N1", "N5", "N15", "R") if t in means}
    present = [c for c in experiments.CONTROLS if c in cfg.experiments]
    if present:
        out["controls"] = pd.DataFrame(
            [(c, t, controls[c].mean()[j], controls[c].sem()[j], int(controls[c].n[j]))
             for c in present for j, t in enumerate(ctl_targets)],
            columns=["experiment", "target", "mean", "sem", "n"])
        summary["controls"] = {c: {t: float(controls[c].mean()[ctl_targets.index(t)]) for t in ("B", "A", "R")}
                               for c in present}
    if head_sums:
        out["heads"] = heads_table(head_sums, head_n)
    if hist_rows:
        out["histograms"] = pd.DataFrame(hist_rows, columns=["role", "bin_lo", "bin_hi", "count"])
    out["summary"] = summary
    return out


def heads_table(sums: dict[tuple[str, str], dict[str, float]], counts: dict[tuple[str, str], int]) -> pd.DataFrame:
    """Mean per-head measurements on B: one row per (experiment, scenario, head), then ``rest``."""
    rows = []
    for (experiment, scenario), col in sums.items():
        n = counts[(experiment, scenario)]
        heads = sorted({name.split("_")[0] for name in col if name[0] == "h"}, key=lambda h: int(h[1:])) + ["rest"]
        for head in heads:
            get = lambda key: col.get(f"{head}_{key}", float("nan")) / n  # noqa: E731
            rows.append((experiment, scenario, head, get("attn_b"), get("attn_a"), get("attn_b_shuf"), get("attn_a_shuf"),
                         get("dla_b"), get("dla_b_shuf"), get("dla_b") - get("dla_b_shuf"), n))
    return pd.DataFrame(rows, columns=["experiment", "scenario", "head", "attn_b", "attn_a", "attn_b_shuf", "attn_a_shuf",
                                       "dla_b", "dla_b_shuf", "contribution", "n"])


def add_circuits(agg: dict, model) -> None:
    """Join per-token circuit scores (workers/circuits.py) with A and B power, and correlate them."""
    import torch

    from workers import models
    from workers.circuits import circuit_scores

    weights = models.attn_only_weights(model)
    powers = agg.get("token_powers")
    if weights is None or powers is None:
        return
    scores = circuit_scores(weights, torch.tensor(powers.token.to_numpy()))
    table = powers[["token", "token_str", "a_power", "b_power"]].copy()
    for name, values in scores.items():
        table[name] = values.numpy()
    rows = [(score, power, float(table[power].rank().corr(table[score].rank())))  # Spearman, without scipy
            for score in scores for power in ("a_power", "b_power")]
    agg["circuits"] = table
    agg["circuit_correlations"] = pd.DataFrame(rows, columns=["score", "power", "spearman"])
    agg["summary"]["circuits"] = {f"{s} vs {p}": r for s, p, r in rows if s.endswith("_best")}


def write(store: Store, aggregates: dict[str, pd.DataFrame | dict]) -> None:
    for name, value in aggregates.items():
        if isinstance(value, pd.DataFrame):
            buffer = io.BytesIO()
            value.to_parquet(buffer, index=False)
            store.put(f"aggregates/{name}.parquet", buffer.getvalue())
    store.put("aggregates/summary.json", (json.dumps(aggregates["summary"], indent=2) + "\n").encode())


def read(store: Store) -> dict[str, pd.DataFrame | dict]:
    out: dict[str, pd.DataFrame | dict] = {}
    for key in sorted(store.list("aggregates/")):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".parquet"):
            out[name[: -len(".parquet")]] = pd.read_parquet(io.BytesIO(store.get(key)))
        elif name == "summary.json":
            out["summary"] = json.loads(store.get(key))
    return out
