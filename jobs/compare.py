"""``induction-sweep compare RUN RUN …``: per-token A and B power of runs side by side (two models, or
checkpoints of one model through training), each against the first.

Writes into ``--out`` (local or ``s3://``): ``compare.html`` (scatter and correlation per run, overlaid
histograms, the tokens that differ most, the config differences, the token explorer),
``tokens.parquet`` (the joined per-token table) and ``compare.json`` (runs, join, correlations,
config differences).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from jobs import manifest
from jobs.aggregate import Aggregates
from jobs.errors import ConfigError
from jobs.explorer import Column, Preset, explorer_html
from jobs.report import figure, img_html, literal, page, png, table_html
from storage import open_store

POWERS = ("a", "b")  # A power and B power: the per-token columns a run has
MOST = 15  # tokens listed per run and power as differing most from the first run


@dataclass
class Side:
    uri: str
    manifest: dict
    agg: Aggregates
    vocab: list[str]

    @property
    def label(self) -> str:
        cfg = self.manifest["config"]
        return f"{cfg['model'].rstrip('/').rsplit('/', 1)[-1]} (seed {cfg['seed']})"  # a checkpoint by its directory's name


def open_side(uri: str) -> Side:
    """A finished run that compare can read, or ConfigError naming why not."""
    store = open_store(uri)
    found, cfg = manifest.read_current(store)
    if found.get("status") != "complete" or not store.exists("aggregates/summary.json"):
        raise ConfigError(f"{store.uri} is not a complete run (status {found.get('status')})")
    agg = Aggregates.read(store)
    if agg.token_powers is None:
        raise ConfigError(f"{store.uri} has no token powers: compare needs runs with the token-powers experiment")
    vocab = pd.read_parquet(io.BytesIO(store.get("vocab.parquet")))["token_str"].tolist()
    return Side(store.uri, found, agg, vocab)


def check_comparable(sides: list[Side]) -> None:
    """Runs whose numbers mean different things are refused: other experiments (the sequence layout
    is the schema's, which ``open_side`` checks)."""
    first = sides[0].manifest["config"]["experiments"]
    for side in sides[1:]:
        other = side.manifest["config"]["experiments"]
        if sorted(other) != sorted(first):
            raise ConfigError(f"{side.uri} runs {','.join(other)} and {sides[0].uri} runs {','.join(first)}: "
                              "compare needs runs of the same experiments")


def join(sides: list[Side]) -> tuple[pd.DataFrame, str]:
    """The per-token powers of every run on the tokens they share: on ids where the runs' vocabularies
    agree on those ids, else on token strings (each string's first id)."""
    tables = [s.agg.token_powers for s in sides]
    shared = set(tables[0].token)
    for t in tables[1:]:
        shared &= set(t.token)
    ids = sorted(shared)
    same = all(all(s.vocab[i] == sides[0].vocab[i] if i < len(s.vocab) and i < len(sides[0].vocab) else False for i in ids)
               for s in sides[1:])
    key = "token" if same and ids else "token_str"
    joined = None
    for i, t in enumerate(tables):
        part = t.drop_duplicates(key)[["token", "token_str", *(f"{p}_{m}" for p in POWERS for m in ("power", "sem", "n"))]]
        part = part.rename(columns={f"{p}_{m}": f"{p}_{m}_{i}" for p in POWERS for m in ("power", "sem", "n")})
        if i:
            part = part.drop(columns=["token_str" if key == "token" else "token"])
        joined = part if joined is None else joined.merge(part, on=key, how="inner")
    for i in range(1, len(sides)):
        for p in POWERS:
            joined[f"{p}_diff_{i}"] = joined[f"{p}_power_{i}"] - joined[f"{p}_power_0"]
    return joined.sort_values("token").reset_index(drop=True), key


def correlations(joined: pd.DataFrame, n_runs: int) -> list[dict]:
    rows = []
    for i in range(1, n_runs):
        for p in POWERS:
            x, y = joined[f"{p}_power_0"], joined[f"{p}_power_{i}"]
            rows.append({"run": i, "power": p.upper(), "pearson": float(x.corr(y)),
                         "spearman": float(x.rank().corr(y.rank())), "tokens": int(len(joined)),
                         "mean_diff": float((y - x).mean())})
    return rows


def config_differences(sides: list[Side]) -> pd.DataFrame:
    """Every config field (and the code version and loader) on which some run differs from another."""
    def fields(side: Side) -> dict:
        m = side.manifest
        return {**{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in m["config"].items()},
                "code_version": m.get("code_version"), "loader": (m.get("model_loading") or {}).get("loader")}

    each = [fields(s) for s in sides]
    keys = list(dict.fromkeys(k for f in each for k in f))
    rows = [{"field": k, **{f"run {i}": str(f.get(k, "–")) for i, f in enumerate(each)}}
            for k in keys if len({str(f.get(k)) for f in each}) > 1]
    return pd.DataFrame(rows, columns=["field", *(f"run {i}" for i in range(len(sides)))])


def scatter_plot(joined: pd.DataFrame, i: int, corr: list[dict], labels: list[str]) -> bytes:
    fig, axes = figure(1, 2, figsize=(10, 4.6))
    for ax, p in zip(axes, POWERS):
        x, y = joined[f"{p}_power_0"], joined[f"{p}_power_{i}"]
        r = next(c for c in corr if c["run"] == i and c["power"] == p.upper())
        ax.scatter(x, y, s=4, alpha=0.4)
        lo, hi = float(np.nanmin([x.min(), y.min()])), float(np.nanmax([x.max(), y.max()]))
        ax.plot([lo, hi], [lo, hi], "--", color="0.3", lw=1, label="equal")
        ax.set(xlabel=literal(f"{p.upper()} power, run 0: {labels[0]}"), ylabel=literal(f"run {i}: {labels[i]}"),
               title=f"{p.upper()} power: Pearson {r['pearson']:.3f}, Spearman {r['spearman']:.3f}")
        ax.legend(loc="upper left")
    return png(fig)


def histograms_plot(joined: pd.DataFrame, labels: list[str]) -> bytes:
    fig, axes = figure(1, 2, figsize=(10, 4))
    for ax, p in zip(axes, POWERS):
        columns = [joined[f"{p}_power_{i}"].dropna() for i in range(len(labels))]
        edges = np.histogram_bin_edges(np.concatenate(columns), 30)
        for i, values in enumerate(columns):
            ax.stairs(np.histogram(values, edges)[0], edges, lw=1.5, label=literal(f"run {i}: {labels[i]}"))
        ax.set(xlabel=f"{p.upper()} power (mean strength on B, nats)", ylabel="tokens", title=f"{p.upper()} power over the joined tokens")
        ax.legend(fontsize=8)
    return png(fig)


def compare(uris: list[str], out: str) -> dict:
    """Compare the runs at ``uris`` (the first is the reference) and write the comparison into ``out``."""
    if len(uris) < 2:
        raise ConfigError("compare needs at least two runs")
    sides = [open_side(u) for u in uris]
    check_comparable(sides)
    joined, key = join(sides)
    if joined.empty:
        raise ConfigError("the runs share no token (by id or by string)")
    corr = correlations(joined, len(sides))
    diffs = config_differences(sides)
    summary = {"runs": [{"run": i, "uri": s.uri, "model": s.manifest["config"]["model"], "config_hash": s.manifest["config_hash"]}
                        for i, s in enumerate(sides)],
               "joined_on": key, "tokens": int(len(joined)), "correlations": corr, "config_differences": diffs.to_dict("records")}
    store = open_store(out)
    buffer = io.BytesIO()
    joined.to_parquet(buffer, index=False)
    store.put("tokens.parquet", buffer.getvalue())
    store.put("compare.json", (json.dumps(summary, indent=2) + "\n").encode())
    store.put("compare.html", compare_html(sides, joined, key, corr, diffs).encode())
    return summary


def compare_html(sides: list[Side], joined: pd.DataFrame, key: str, corr: list[dict], diffs: pd.DataFrame) -> str:
    labels = [s.label for s in sides]
    runs = pd.DataFrame([{"run": i, "model": s.manifest["config"]["model"], "uri": s.uri, "tokens": len(s.agg.token_powers),
                          "sequences per token and role": s.manifest["config"]["seqs"], "config hash": s.manifest["config_hash"]}
                         for i, s in enumerate(sides)])
    joined_on = "token ids (the vocabularies agree)" if key == "token" else "token strings (the vocabularies differ)"
    parts = ["<h1>Induction sweep: comparison</h1>",
             table_html(runs, "Runs (run 0 is the reference)"),
             f"<p>{len(joined)} tokens present in every run, joined on {joined_on}. A (B) power: a token's mean "
             "induction strength on B over its sequences as A (as B); strength is the log-odds of B after the induction "
             "sequence minus after its shuffled control (each run's report defines them).</p>",
             "<h2>What differs between the runs' configs</h2>",
             table_html(diffs, "Config fields that differ") if len(diffs) else "<p>Nothing but the output location.</p>",
             "<h2>Correlation with run 0</h2>",
             table_html(pd.DataFrame(corr), "Per-token power of each run against run 0, over the joined tokens"),
             img_html(histograms_plot(joined, labels), "Overlaid histograms of A and B power, one line per run")]
    for i in range(1, len(sides)):
        parts += [f"<h3>Run {i} against run 0</h3>",
                  img_html(scatter_plot(joined, i, corr, labels), f"Scatter of A and B power per token, run {i} against run 0")]
        for p in POWERS:
            d = joined[f"{p}_diff_{i}"]
            most = joined.loc[d.abs().sort_values(ascending=False).index[:MOST],
                              ["token", "token_str", f"{p}_power_0", f"{p}_power_{i}", f"{p}_diff_{i}"]]
            parts.append(table_html(most, f"Tokens whose {p.upper()} power differs most, run {i} against run 0"))
    columns = [Column("token", "id", "int"), Column("token_str", "token", "str")]
    for i in range(len(sides)):
        columns += [Column(f"a_power_{i}", f"A run {i}", "num", labels[i]),
                    Column(f"b_power_{i}", f"B run {i}", "num", labels[i])]
    presets = []
    for i in range(1, len(sides)):
        columns += [Column(f"a_diff_{i}", f"ΔA run {i}", "num", "A power, run minus run 0"),
                    Column(f"b_diff_{i}", f"ΔB run {i}", "num", "B power, run minus run 0")]
        presets += [Preset(f"A lower in run {i}", f"a_diff_{i}", 1), Preset(f"A higher in run {i}", f"a_diff_{i}", -1),
                    Preset(f"B lower in run {i}", f"b_diff_{i}", 1), Preset(f"B higher in run {i}", f"b_diff_{i}", -1)]
    presets += [Preset("weakest as A, run 0", "a_power_0", 1), Preset("weakest as B, run 0", "b_power_0", 1),
                Preset("by id", "token", 1)]
    parts += ["<h2>Token explorer</h2>",
              explorer_html("tokens", joined, columns, presets, "Every joined token's A and B power per run",
                            [("tokens.parquet", "tokens.parquet"), ("compare.json", "compare.json")])]
    return page("induction-sweep comparison", "".join(parts), True)
