"""The run's aggregates, derived from the merged accumulator (workers/accumulator.py): typed tables,
histograms with their edges and the headline summary, as ``aggregates/`` stores them (docs/DESIGN.md §4).

Which tables exist follows the experiment registry: each experiment's ``view`` names its table
(POWERS, PAIR and NEIGHBORS one experiment each), so a newly declared CONTROL experiment lands in
the controls table without an edit here.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from jobs.config import RunConfig
from jobs.errors import ConfigError
from storage import Store
from workers import experiments
from workers.accumulator import HIST_LOGODDS, HIST_STRENGTH, LOGODDS_BINS, STRENGTH, STRENGTH_BINS, Accumulator, bin_edges
from workers.experiments import CONTROL, NEIGHBORS, PAIR, POWERS
from workers.layout import FIRST_TOKEN
from workers.rows import MEASURES, REST, head_column, parse_head_column

POWER_BINS = 30


@dataclass
class Histogram:
    name: str  # "<experiment>/<scenario>/<target>": token powers (A and B power) or strength per sequence
    edges: np.ndarray  # bins + 1
    counts: np.ndarray
    outside: int = 0  # values beyond the edges, not counted in any bin

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"name": self.name, "bin_lo": self.edges[:-1], "bin_hi": self.edges[1:], "count": self.counts,
                             "outside": self.outside})


@dataclass
class Histogram2D:
    scenario: str
    x_edges: np.ndarray  # induction log-odds of B
    y_edges: np.ndarray  # shuffled log-odds of B
    counts: np.ndarray  # [x bins, y bins]
    outside: int = 0  # sequences with either log-odds beyond the edges

    def frame(self) -> pd.DataFrame:
        x, y = np.meshgrid(np.arange(len(self.x_edges) - 1), np.arange(len(self.y_edges) - 1), indexing="ij")
        x, y = x.ravel(), y.ravel()
        return pd.DataFrame({"scenario": self.scenario, "induction_lo": self.x_edges[x], "induction_hi": self.x_edges[x + 1],
                             "shuffled_lo": self.y_edges[y], "shuffled_hi": self.y_edges[y + 1],
                             "count": self.counts.ravel(), "outside": self.outside})

    @classmethod
    def from_frame(cls, f: pd.DataFrame) -> Histogram2D:
        x_edges = np.append(np.unique(f.induction_lo), f.induction_hi.max())
        y_edges = np.append(np.unique(f.shuffled_lo), f.shuffled_hi.max())
        counts = f["count"].to_numpy().reshape(len(x_edges) - 1, len(y_edges) - 1)
        return cls(f.scenario.iloc[0], x_edges, y_edges, counts, int(f.outside.iloc[0]))


@dataclass
class Summary:
    """Headline numbers (aggregates/summary.json)."""

    config_hash: str
    model: str
    seed: int
    token_powers: dict | None = None
    fixed_pair: dict | None = None
    neighbors: dict | None = None
    controls: dict | None = None
    circuits: dict | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# tables stored as aggregates/<name>.parquet
TABLES = ("token_powers", "fixed_pair", "neighbors", "controls", "heads", "circuits", "circuit_correlations")


@dataclass
class Aggregates:
    summary: Summary
    token_powers: pd.DataFrame | None = None  # token, token_str, a_power, a_sem, a_n, b_power, b_sem, b_n
    fixed_pair: pd.DataFrame | None = None  # scenario, target, mean, sem, n
    neighbors: pd.DataFrame | None = None  # target, k, mean, sem, n
    controls: pd.DataFrame | None = None  # experiment, target, mean, sem, n
    heads: pd.DataFrame | None = None  # experiment, scenario, head, attn_*, dla_*, contribution, n
    circuits: pd.DataFrame | None = None  # token, powers, ov_rank_h*, qk_rank_h*
    circuit_correlations: pd.DataFrame | None = None  # score, power, spearman
    histograms: list[Histogram] = field(default_factory=list)
    logodds: list[Histogram2D] = field(default_factory=list)  # per fixed-pair scenario

    def tables(self) -> dict[str, pd.DataFrame]:
        out = {name: getattr(self, name) for name in TABLES if getattr(self, name) is not None}
        if self.histograms:
            out["histograms"] = pd.concat([h.frame() for h in self.histograms], ignore_index=True)
        if self.logodds:
            out["fixed_pair_logodds"] = pd.concat([h.frame() for h in self.logodds], ignore_index=True)
        return out

    def histogram(self, name: str) -> Histogram:
        return next(h for h in self.histograms if h.name == name)

    def write(self, store: Store) -> None:
        for name, table in self.tables().items():
            buffer = io.BytesIO()
            table.to_parquet(buffer, index=False)
            store.put(f"aggregates/{name}.parquet", buffer.getvalue())
        store.put("aggregates/summary.json", (json.dumps(self.summary.as_dict(), indent=2) + "\n").encode())

    @classmethod
    def read(cls, store: Store) -> Aggregates:
        frames = {key.rsplit("/", 1)[-1][: -len(".parquet")]: pd.read_parquet(io.BytesIO(store.get(key)))
                  for key in store.list("aggregates/") if key.endswith(".parquet")}
        agg = cls(Summary(**json.loads(store.get("aggregates/summary.json"))),
                  **{name: frames[name] for name in TABLES if name in frames})
        if "histograms" in frames:
            if "name" not in frames["histograms"]:
                raise ConfigError(f"{store.uri} was aggregated by an older version of induction-sweep; rerun its command "
                                  "with --overwrite")
            agg.histograms = [Histogram(name, np.append(h.bin_lo.to_numpy(), h.bin_hi.iloc[-1]), h["count"].to_numpy(),
                                        int(h.outside.iloc[0]))
                              for name, h in frames["histograms"].groupby("name", sort=False)]
        if "fixed_pair_logodds" in frames:
            agg.logodds = [Histogram2D.from_frame(f) for _, f in frames["fixed_pair_logodds"].groupby("scenario", sort=False)]
        return agg


def derive(acc: Accumulator, cfg: RunConfig, token_strings: list[str]) -> Aggregates:
    """Every table, histogram and headline number of the run from its merged accumulator."""
    agg = Aggregates(Summary(cfg.config_hash, cfg.model, cfg.seed))
    controls = []
    for experiment in cfg.experiment_specs:
        strength = acc.select(STRENGTH, experiment.name)
        if experiment.view == POWERS:
            add_powers(agg, experiment, strength, cfg, token_strings)
            continue
        names = experiment.target_names(cfg.n_neighbors)
        table = ordered(strength, experiment, names)
        if experiment.view == PAIR:
            agg.fixed_pair = table[["scenario", "target", "mean", "sem", "n"]]
            agg.summary.fixed_pair = {"pair": list(cfg.pair), "pair_str": [token_strings[t] for t in cfg.pair],
                                      **{s: float(m) for s, m in table[table.target == "B"][["scenario", "mean"]].values}}
        elif experiment.view == NEIGHBORS:
            agg.neighbors = table.assign(k=[experiments.neighbor_rank(t) for t in table.target])[["target", "k", "mean", "sem", "n"]]
            means = dict(zip(table.target, table["mean"]))
            agg.summary.neighbors = {t: float(means[t]) for t in ("B", "N1", "N5", "N15", "R") if t in means}
        elif experiment.view == CONTROL:
            controls.append(table.assign(experiment=experiment.name)[["experiment", "target", "mean", "sem", "n"]])
        add_histograms(agg, acc, experiment, strength, cfg.n_neighbors)
    if controls:
        agg.controls = pd.concat(controls, ignore_index=True)
        agg.summary.controls = {e: {t: float(m) for t, m in g[["target", "mean"]].values if t in ("B", "A", "R")}
                                for e, g in agg.controls.groupby("experiment", sort=False)}
    if cfg.heads:
        agg.heads = heads_table(acc)
    return agg


def ordered(strength: pd.DataFrame, experiment: experiments.Experiment, names: tuple[str, ...]) -> pd.DataFrame:
    """Strength moments in the declared order of scenarios and targets."""
    index = pd.MultiIndex.from_product([[s.name for s in experiment.scenarios], list(names)], names=["scenario", "target"])
    table = strength.set_index(["scenario", "target"]).reindex(index).reset_index()
    return table.assign(n=table.n.fillna(0).astype(np.int64))


def add_powers(agg: Aggregates, experiment: experiments.Experiment, strength: pd.DataFrame, cfg: RunConfig,
               token_strings: list[str]) -> None:
    """The per-token table (one mean, sem and n per scenario: A power, B power), its histograms on a
    common range (the post's figure) and its headline numbers."""
    ids = np.arange(FIRST_TOKEN, FIRST_TOKEN + cfg.tokens)
    table = pd.DataFrame({"token": ids, "token_str": [token_strings[i] for i in ids]})
    roles = [s.name for s in experiment.scenarios]
    for role in roles:
        s = strength[strength.scenario == role].set_index("token").reindex(ids)
        key = role.lower()
        table[f"{key}_power"], table[f"{key}_sem"] = s["mean"].to_numpy(), s["sem"].to_numpy()
        table[f"{key}_n"] = s.n.fillna(0).to_numpy().astype(np.int64)
    agg.token_powers = table
    powers = [table[f"{r.lower()}_power"] for r in roles]
    edges = np.histogram_bin_edges(np.concatenate(powers), POWER_BINS)
    target = experiment.target_names(0)[0]  # the power is the mean strength on this target
    agg.histograms += [Histogram(histogram_name(experiment.name, r, target), edges, np.histogram(p, edges)[0])
                       for r, p in zip(roles, powers)]
    summary = {"tokens": int(cfg.tokens), "seqs": cfg.seqs}
    for r, p in zip(roles, powers):
        summary[f"mean_{r.lower()}_power"], summary[f"std_{r.lower()}_power"] = float(p.mean()), float(p.std())
    for r in roles:
        summary[f"mean_{r.lower()}_sem"] = float(table[f"{r.lower()}_sem"].mean())
    summary["mean_sem"] = float(pd.concat([table[f"{r.lower()}_sem"] for r in roles]).mean())
    if len(powers) == 2:
        summary["corr_a_b"] = float(powers[0].corr(powers[1]))
    agg.summary.token_powers = summary


def histogram_name(experiment: str, scenario: str, target: str) -> str:
    return f"{experiment}/{scenario}/{target}"


def add_histograms(agg: Aggregates, acc: Accumulator, experiment: experiments.Experiment, strength: pd.DataFrame,
                   n_neighbors: int) -> None:
    """The declared strength histograms per scenario and target (fixed edges), and the 2-D log-odds
    histogram of B per scenario; each with the count of values beyond its edges (n less the counts)."""
    hist, grid = acc.select(HIST_STRENGTH, experiment.name), acc.select(HIST_LOGODDS, experiment.name)
    total = strength.groupby(["scenario", "target"]).n.sum()
    n_lo = LOGODDS_BINS[0]
    for scenario in experiment.scenarios:
        for target in experiment.histogram_targets(n_neighbors):
            counts = np.zeros(STRENGTH_BINS[0], dtype=np.int64)
            h = hist[(hist.scenario == scenario.name) & (hist.target == target)]
            counts[h.bin.to_numpy()] = h.n.to_numpy()
            outside = int(total.get((scenario.name, target), 0)) - int(counts.sum())
            agg.histograms.append(Histogram(histogram_name(experiment.name, scenario.name, target), bin_edges(STRENGTH_BINS),
                                            counts, outside))
        if experiment.logodds:
            cells = np.zeros(n_lo * n_lo, dtype=np.int64)
            g = grid[grid.scenario == scenario.name]
            cells[g.bin.to_numpy()] = g.n.to_numpy()
            outside = int(total.get((scenario.name, "B"), 0)) - int(cells.sum())
            agg.logodds.append(Histogram2D(scenario.name, bin_edges(LOGODDS_BINS), bin_edges(LOGODDS_BINS),
                                           cells.reshape(n_lo, n_lo), outside))


def heads_table(acc: Accumulator) -> pd.DataFrame:
    """Mean per-head measurements: one row per (experiment, scenario, head), ``rest`` last."""
    frame = acc.frame[acc.frame.stat.map(lambda s: parse_head_column(s) is not None)]
    rows = []
    for (experiment, scenario), g in frame.groupby(["experiment", "scenario"], sort=False):
        means = dict(zip(g.stat, g["mean"]))
        n = int(g.n.iloc[0])
        heads = sorted({parse_head_column(s)[0] for s in means} - {REST}, key=lambda h: int(h[1:])) + [REST]
        for head in heads:
            get = {(m, shuf): means.get(head_column(head, m, shuf), np.nan) for m in MEASURES for shuf in (False, True)}
            rows.append((experiment, scenario, head, get["attn_b", False], get["attn_a", False], get["attn_b", True],
                         get["attn_a", True], get["dla_b", False], get["dla_b", True],
                         get["dla_b", False] - get["dla_b", True], n))
    return pd.DataFrame(rows, columns=["experiment", "scenario", "head", "attn_b", "attn_a", "attn_b_shuf", "attn_a_shuf",
                                       "dla_b", "dla_b_shuf", "contribution", "n"])


def add_circuits(agg: Aggregates, scores: dict[str, np.ndarray]) -> None:
    """Join per-token circuit scores (workers/circuits.py) with A and B power, and correlate them."""
    table = agg.token_powers[["token", "token_str", "a_power", "b_power"]].copy()
    for name, values in scores.items():
        table[name] = values
    rows = [(score, power, float(table[power].rank().corr(table[score].rank())))  # Spearman, without scipy
            for score in scores for power in ("a_power", "b_power")]
    agg.circuits = table
    agg.circuit_correlations = pd.DataFrame(rows, columns=["score", "power", "spearman"])
    agg.summary.circuits = {f"{s} vs {p}": r for s, p, r in rows if s.endswith("_best")}
