"""The post's plots (PNG, matplotlib) and a self-contained ``report.html`` (images, data and the token
explorer inlined: it works offline)."""

from __future__ import annotations

import base64
import html
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from jobs.aggregate import Aggregates, Histogram, Histogram2D  # noqa: E402
from jobs.explorer import STYLE as EXPLORER_STYLE  # noqa: E402
from jobs.explorer import Column, Preset, explorer_html, script_html  # noqa: E402
from storage import Store  # noqa: E402
from workers import experiments  # noqa: E402
from workers.layout import FIRST_TOKEN  # noqa: E402
from workers.work import NEIGHBORS_KEY  # noqa: E402


def literal(text: str) -> str:
    """A token string as matplotlib text: drawn as written ("$" does not start mathtext)."""
    return text.replace("$", r"\$")


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def figure(*args, **kwargs):
    return plt.subplots(*args, layout="constrained", **kwargs)


def outside_text(h: Histogram) -> str:
    return f", {h.outside} outside" if h.outside else ""


def token_powers_plot(hists: list[Histogram], summary: dict) -> bytes:
    """The post's first figure: histograms of A and B power over the tokens."""
    fig, ax = figure(figsize=(7, 4))
    for h, color in zip(hists, ("tab:blue", "tab:orange")):
        role = h.name.split("/")[1]
        mean = summary.get(f"mean_{role.lower()}_power", float("nan"))
        ax.stairs(h.counts, h.edges, fill=True, alpha=0.5, color=color, label=f"{role} power (mean {mean:.2f})")
    ax.set(xlabel="power: mean induction strength (nats of log-odds)", ylabel="tokens",
           title=f"A and B power over {summary.get('tokens')} tokens × {summary.get('seqs')} sequences")
    ax.legend()
    return png(fig)


def strength_hist_plot(hists: list[Histogram], labels: list[str], title: str, legend_title: str) -> bytes:
    """Strength histograms on one axis, as the post overlays them; each legend entry says how many
    values fell outside the range drawn."""
    fig, ax = figure(figsize=(7, 4))
    for h, label in zip(hists, labels):
        ax.stairs(h.counts, h.edges, lw=1.5, label=f"{label} (n {h.counts.sum() + h.outside}{outside_text(h)})")
    ax.set(xlabel="induction strength (nats of log-odds)", ylabel="sequences", xlim=(hists[0].edges[0], hists[0].edges[-1]),
           title=title)
    ax.legend(title=legend_title, fontsize=8)
    return png(fig)


def fixed_pair_logodds_plot(hists: list[Histogram2D], strengths: dict[str, float]) -> bytes:
    """The post's 2-D histograms: log-odds of B after the induction sequence (x) against after its
    shuffled control (y), the diagonal where they are equal, and an arrow as long as the mean
    strength, from the diagonal at the counted sequences' mean shuffled log-odds."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FuncFormatter

    cols = min(2, len(hists))
    rows = -(-len(hists) // cols)
    fig, axes = figure(rows, cols, figsize=(4.3 * cols + 1.2, 4.2 * rows), squeeze=False, sharex=True, sharey=True)
    top = max(1, max(int(h.counts.max()) for h in hists))
    mesh = None
    for ax, h in zip(axes.flat, hists):
        mesh = ax.pcolormesh(h.x_edges, h.y_edges, np.ma.masked_equal(h.counts.T, 0), cmap="viridis", norm=LogNorm(1, top))
        lo, hi = h.x_edges[0], h.x_edges[-1]
        ax.plot([lo, hi], [lo, hi], "--", color="0.15", lw=1, label="induction = shuffled")
        counted = h.counts.sum()
        if counted and np.isfinite(strengths.get(h.scenario, np.nan)):
            y_mid = (h.y_edges[:-1] + h.y_edges[1:]) / 2
            y0 = float((h.counts.sum(axis=0) * y_mid).sum() / counted)
            m = strengths[h.scenario]
            ax.annotate("", xy=(y0 + m, y0), xytext=(y0, y0), arrowprops={"arrowstyle": "->", "color": "crimson", "lw": 2})
            ax.plot([], [], color="crimson", lw=2, label=f"mean strength {m:.2f}")
        ax.set(title=f"fixed: {h.scenario} (n {counted + h.outside}{outside_text(h)})", aspect="equal",
               xlim=(lo, hi), ylim=(h.y_edges[0], h.y_edges[-1]))
        ax.legend(loc="upper left", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("log-odds of B, induction sequence")
    for ax in axes[:, 0]:
        ax.set_ylabel("log-odds of B, shuffled control")
    for ax in axes.flat[len(hists):]:
        ax.set_visible(False)
    bar = fig.colorbar(mesh, ax=axes, label="sequences per cell", shrink=0.7, aspect=30)
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if top < 10:  # no decade inside the range: label every count
        bar.set_ticks(range(1, top + 1))
    return png(fig)


def neighbors_curve_plot(neigh: pd.DataFrame) -> bytes:
    """Mean strength on B's k-th neighbour against k, beside a random token's."""
    fig, ax = figure(figsize=(7, 4))
    curve = neigh[neigh.k >= 0].sort_values("k")
    ax.errorbar(curve.k, curve["mean"], yerr=curve["sem"], marker="o", ms=3, label="B (k = 0) and its neighbours")
    r = neigh[neigh.target == "R"]
    if len(r):
        ax.axhline(float(r["mean"].iloc[0]), color="gray", ls="--", label="random token R")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.legend()
    ax.set(xlabel="k (0 = B itself, k = k-th nearest neighbour of B)", ylabel="mean induction strength (± SE)",
           title="Induction bleeding to neighbours of B")
    return png(fig)


def controls_plot(controls: pd.DataFrame, neighbors: pd.DataFrame | None) -> bytes:
    """Mean strength on B, A and R: plain induction against each control."""
    table = controls.pivot(index="experiment", columns="target", values="mean")
    errors = controls.pivot(index="experiment", columns="target", values="sem")
    if neighbors is not None:  # plain induction with free A and B (the neighbors experiment)
        base = neighbors.set_index("target")
        table.loc["induction"] = {"B": base.loc["B", "mean"], "R": base.loc["R", "mean"]}
        errors.loc["induction"] = {"B": base.loc["B", "sem"], "R": base.loc["R", "sem"]}
    order = [e for e in ("induction", *controls.experiment.unique()) if e in table.index]
    fig, ax = figure(figsize=(8, 4))
    width = 0.27
    for i, target in enumerate(("B", "A", "R")):
        ax.bar(np.arange(len(order)) + (i - 1) * width, table.loc[order, target], width,
               yerr=errors.loc[order, target], label=f"on {target}")
    ax.set_xticks(np.arange(len(order)), order)
    ax.axhline(0, color="black", lw=0.5)
    ax.set(ylabel="mean induction strength", title="Is it B's presence or the A→B pair?")
    ax.legend()
    return png(fig)


def heads_plot(heads: pd.DataFrame) -> bytes:
    """Each last-layer head's share of logit(B) - mean logit (induction minus shuffled), and its attention to B."""
    groups = list(dict.fromkeys(heads.experiment + " / " + heads.scenario))
    names = list(dict.fromkeys(heads["head"]))
    fig, (left, right) = figure(1, 2, figsize=(12, 4))
    width = 0.8 / len(groups)
    for i, group in enumerate(groups):
        g = heads[(heads.experiment + " / " + heads.scenario) == group].set_index("head").loc[names]
        x = np.arange(len(names)) + (i - (len(groups) - 1) / 2) * width
        left.bar(x, g["contribution"], width, label=group)
        right.bar(x[:-1], g["attn_b"].iloc[:-1], width, label=group)
    left.set_xticks(np.arange(len(names)), names)
    left.axhline(0, color="black", lw=0.5)
    left.set(ylabel="Δ direct logit attribution to B", title="Who writes B: heads of the last layer, and the rest")
    right.set_xticks(np.arange(len(names) - 1), names[:-1])
    right.set(ylabel="attention", ylim=(0, 1), title="Attention from the final A to the slot after the first A")
    left.legend(fontsize=8)
    return png(fig)


def circuits_plot(table: pd.DataFrame, corr: pd.DataFrame) -> bytes:
    pairs = [(s, p) for s, p in (("ov_rank_best", "b_power"), ("qk_rank_best", "a_power")) if s in table]
    fig, axes = figure(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
    for ax, (score, power) in zip(axes[0], pairs):
        rho = corr[(corr.score == score) & (corr.power == power)].spearman.iloc[0]
        ax.scatter(np.log10(1 + table[score]), table[power], s=4, alpha=0.4)
        kind = "OV copying of B" if score.startswith("ov") else "QK prefix matching of A"
        ax.set(xlabel=f"log10(1 + rank) — {kind}, best head (0 = perfect)", ylabel=power.replace("_", " "),
               title=f"{power[0].upper()} power against {kind} (Spearman {rho:.2f})")
    return png(fig)


def render(store: Store, manifest: dict, agg: Aggregates) -> dict[str, bytes]:
    """Write plots/*.png and report.html; returns the plots."""
    plots: dict[str, bytes] = {}
    for experiment in experiments.REGISTRY.values():
        if experiment.view == experiments.POWERS and agg.token_powers is not None:
            plots["token_powers.png"] = token_powers_plot(histograms_of(agg, experiment.name), agg.summary.token_powers)
        elif experiment.view == experiments.PAIR and agg.fixed_pair is not None:
            fp = agg.summary.fixed_pair
            hists = histograms_of(agg, experiment.name)
            plots["fixed_pair_strength.png"] = strength_hist_plot(
                hists, [h.name.split("/")[1] for h in hists],
                literal(f"Fixed pair A={fp['pair_str'][0]!r} B={fp['pair_str'][1]!r}: strength on B"), "fixed")
            on_b = agg.fixed_pair[agg.fixed_pair.target == "B"]
            plots["fixed_pair_logodds.png"] = fixed_pair_logodds_plot(agg.logodds, dict(zip(on_b.scenario, on_b["mean"])))
        elif experiment.view == experiments.NEIGHBORS and agg.neighbors is not None:
            hists = histograms_of(agg, experiment.name)
            if hists:
                plots["neighbors_hist.png"] = strength_hist_plot(
                    hists, [h.name.split("/")[2] for h in hists], "Strength on B, its neighbours N1, N5, N15 and a random token R",
                    "target")
            plots["neighbors.png"] = neighbors_curve_plot(agg.neighbors)
    if agg.heads is not None:
        plots["heads.png"] = heads_plot(agg.heads)
    if agg.circuits is not None:
        plots["circuits.png"] = circuits_plot(agg.circuits, agg.circuit_correlations)
    if agg.controls is not None:
        plots["controls.png"] = controls_plot(agg.controls, agg.neighbors)
    for name, data in plots.items():
        store.put(f"plots/{name}", data)
    store.put("report.html", report_html(manifest, agg, plots, token_neighbors(store), vocab_strings(store)).encode())
    return plots


def histograms_of(agg: Aggregates, experiment: str) -> list[Histogram]:
    return [h for h in agg.histograms if h.name.startswith(f"{experiment}/")]


def vocab_strings(store: Store) -> list[str] | None:
    return pd.read_parquet(io.BytesIO(store.get("vocab.parquet")))["token_str"].tolist() if store.exists("vocab.parquet") else None


def token_neighbors(store: Store, shown: int = 5) -> np.ndarray | None:
    """Each token's first neighbours (rows from id FIRST_TOKEN on), where the run scored neighbours."""
    if not store.exists(NEIGHBORS_KEY):
        return None
    column = pq.read_table(io.BytesIO(store.get(NEIGHBORS_KEY))).column("neighbors").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)[:, :shown]


def loading_text(loading: dict | None) -> str:
    if not loading:
        return ""
    steps = ", ".join(loading.get("steps", [])) or "none"
    check = loading.get("max_abs_diff_log_prob")
    checked = f"; max |Δ log-prob| against the stored weights {check:.1e}" if check is not None else ""
    return f" ({html.escape(loading.get('loader', ''))}: {html.escape(steps)}{checked})"


def load_checks_text(checks: list | None) -> str:
    """The actors' load-time checks of their scorer against TransformerLens' float64 forward."""
    if not checks:
        return "not recorded for this run"
    items = []
    for c in checks:
        fields = ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
                           if k not in ("host", "pid") and not isinstance(v, (dict, list)))
        items.append(f"<li>{html.escape(fields)}</li>")
    return f"<ul>{''.join(items)}</ul>"


def rule_text(experiment: str) -> str:
    """A control's sequence rule, in its docstring's words."""
    rule = experiments.get(experiment).rule if experiment in experiments.REGISTRY else None
    if isinstance(rule, str):
        from workers.sequences import RULES  # torch: only for runs with controls

        rule = RULES[rule]
    return (rule.__doc__ or "").strip().splitlines()[0].rstrip(".") if rule is not None else ""


def img_html(data: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{html.escape(alt)}">'


def table_html(frame: pd.DataFrame, caption: str) -> str:
    out = frame.rename(columns={"sem": "SE"}).to_html(index=False, float_format="%.3f", na_rep="–", border=0)
    return out.replace(">", f"><caption>{html.escape(caption)}</caption>", 1)  # inside the opening <table ...>


DEFINITIONS = """<dl>
<dt>Log-odds</dt><dd>of a target token T with log-probability lp at the last position: lp − log(1 − exp(lp)),
in nats, computed in float32 and exact to float32's range at both ends.</dd>
<dt>Induction strength</dt><dd>of T in one sequence: its log-odds after the induction sequence
<code>BOS, r×10, A, B, r×10, A</code> minus its log-odds after the shuffled control (BOS first and the final A last,
the 22 tokens between them permuted).</dd>
<dt>A power, B power</dt><dd>of a token: the mean strength on B over the sequences where that token is A
(A power) or B (B power), the other tokens random.</dd>
<dt>Mean, SE, n</dt><dd>the mean over n sequences and its standard error, the sample standard deviation over √n
(a token's power: over its sequences; a table's row: over that scenario's sequences).</dd>
<dt>Outside</dt><dd>a histogram draws a fixed range; the values beyond it are counted and said, never drawn.</dd>
</dl>"""


def header_html(manifest: dict, agg: Aggregates) -> str:
    cfg = manifest["config"]
    rows = [("model", cfg["model"]), ("experiments", ", ".join(cfg.get("experiments", []))),
            ("BOS id", cfg.get("bos")), ("processing", f"{cfg.get('processing')}"),
            ("precision", cfg.get("precision")), ("seed", cfg.get("seed")),
            ("sequences per token and role", cfg.get("seqs")), ("tokens", cfg.get("tokens")),
            ("sequences per scenario (other experiments)", cfg.get("pairs")),
            ("neighbours K", cfg.get("neighbors")), ("version", manifest.get("code_version")),
            ("config hash", manifest.get("config_hash")), ("status", f"{manifest.get('status')} ({manifest.get('updated')})")]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return (f"<table class='header'><caption>Run</caption>{body}</table>"
            f"<p>Weights loaded with <b>{html.escape(str(cfg.get('processing')))}</b> processing"
            f"{loading_text(manifest.get('model_loading'))}.</p>")


def explorer_section(agg: Aggregates, neighbors: np.ndarray | None, links: list[tuple[str, str]],
                     vocab: list[str] | None) -> str:
    table = agg.token_powers
    columns = [Column("token", "id", "int"), Column("token_str", "token", "str"),
               Column("a_power", "A power", "num", "mean strength on B, this token as A"),
               Column("a_sem", "A SE", "num", digits=3), Column("a_n", "A n", "int"),
               Column("b_power", "B power", "num", "mean strength on B, this token as B"),
               Column("b_sem", "B SE", "num", digits=3), Column("b_n", "B n", "int")]
    if neighbors is not None:
        table = table.assign(neighbors=list(neighbors[table.token.to_numpy() - FIRST_TOKEN]))
        columns.append(Column("neighbors", "nearest neighbours", "ids"))
    presets = [Preset("weakest as A", "a_power", 1), Preset("strongest as A", "a_power", -1),
               Preset("weakest as B", "b_power", 1), Preset("strongest as B", "b_power", -1), Preset("by id", "token", 1)]
    return explorer_html("tokens", table, columns, presets, "Every token's A and B power (mean strength on B, SE, n)", links,
                         vocab)


def report_html(manifest: dict, agg: Aggregates, plots: dict[str, bytes], neighbors: np.ndarray | None = None,
                vocab: list[str] | None = None) -> str:
    cfg, summary = manifest["config"], agg.summary
    parts = [f"<h1>Induction sweep: {html.escape(str(cfg['model']))}</h1>", header_html(manifest, agg),
             "<h2>Definitions</h2>", DEFINITIONS]
    neighbour_def = (manifest.get("neighbors") or {}).get("definition")
    if neighbour_def:
        parts.append(f"<p><b>Neighbours</b> N1…N{manifest['neighbors'].get('k')} of B: {html.escape(neighbour_def)}.</p>")
    parts.append(f"<p><b>Load-time check</b> of each actor's scorer against TransformerLens' float64 forward of the "
                 f"stored weights: {load_checks_text(manifest.get('load_checks'))}</p>")
    aggregate_links = [(f"aggregates/{name}.parquet", f"{name}.parquet") for name in agg.tables()]
    if agg.token_powers is not None:
        tp = summary.token_powers
        shard_links = [(f"shards/{e}/", f"shards/{e}/") for e in cfg.get("experiments", [])]
        moments = pd.DataFrame({"power": ["A", "B"],
                                "mean over tokens": [tp["mean_a_power"], tp["mean_b_power"]],
                                "std over tokens": [tp["std_a_power"], tp["std_b_power"]],
                                "mean SE of a token's power": [tp.get("mean_a_sem"), tp.get("mean_b_sem")],
                                "tokens": [tp["tokens"]] * 2, "sequences per token": [tp["seqs"]] * 2})
        parts += ["<h2>Token powers</h2>",
                  f"<p>For each of {tp['tokens']} tokens, {tp['seqs']} sequences with it as A and {tp['seqs']} with it "
                  f"as B. Correlation of A and B power over tokens: {tp['corr_a_b']:.2f}.</p>",
                  table_html(moments, "A and B power over the tokens"),
                  img_html(plots["token_powers.png"], "Histograms of A power and B power over the tokens"),
                  "<h3>Token explorer</h3>",
                  explorer_section(agg, neighbors, [("vocab.parquet", "vocab.parquet"), *aggregate_links, *shard_links], vocab)]
    if agg.fixed_pair is not None:
        fp = summary.fixed_pair
        parts += ["<h2>Fixed pair</h2>",
                  f"<p>A = {html.escape(repr(fp['pair_str'][0]))} (id {fp['pair'][0]}), B = {html.escape(repr(fp['pair_str'][1]))} "
                  f"(id {fp['pair'][1]}); {cfg.get('pairs')} sequences per scenario, the rest random.</p>",
                  table_html(agg.fixed_pair, "Strength per scenario (what is fixed) and target: mean, SE, n"),
                  img_html(plots["fixed_pair_strength.png"], "Histograms of the strength on B per fixed-pair scenario"),
                  img_html(plots["fixed_pair_logodds.png"],
                       "2-D histograms of the log-odds of B after the induction sequence (x) and the shuffled control (y), "
                       "per scenario, with the diagonal and the mean strength")]
    if agg.neighbors is not None:
        parts += ["<h2>Neighbours of B</h2>",
                  "<p>Strength on B, on its k nearest neighbours (defined above), and on a random token R.</p>"]
        if "neighbors_hist.png" in plots:
            parts.append(img_html(plots["neighbors_hist.png"], "Histograms of the strength on B, N1, N5, N15 and R"))
        parts += [img_html(plots["neighbors.png"], "Mean strength against the neighbour rank k"),
                  table_html(agg.neighbors, "Strength per target: mean, SE, n")]
    if agg.controls is not None:
        nan = float("nan")
        lines = "".join(f"<li><b>{html.escape(e)}</b> ({html.escape(rule_text(e))}): strength on B {v.get('B', nan):.2f}, "
                        f"on A {v.get('A', nan):.2f}, on a random token {v.get('R', nan):.2f}</li>"
                        for e, v in summary.controls.items())
        parts += ["<h2>Mechanism controls</h2>",
                  "<p>Each control alters the induction sequence before it is shuffled, and is scored against its "
                  "own shuffled control.</p>", f"<ul>{lines}</ul>",
                  img_html(plots["controls.png"], "Mean strength on B, A and R for plain induction and each control"),
                  table_html(agg.controls, "Strength per control and target: mean, SE, n")]
    if agg.heads is not None:
        h = agg.heads
        top = h[h["head"] != "rest"].sort_values("contribution", ascending=False).iloc[0]
        parts += ["<h2>Heads</h2>",
                  "<p>Per sequence, in the scoring forward: each last-layer head's attention from the final A to the "
                  "slot after the first A (B) and to the first A, in the induction sequence and its shuffled control, "
                  "and its direct logit attribution to B (its output through the final LayerNorm scale and the "
                  "unembedding, against the mean logit). Heads plus <code>rest</code> (embeddings, earlier layers, "
                  "biases) add up to logit(B) − mean logit; <i>contribution</i> is induction minus shuffled. "
                  f"Largest: head {top['head']} of {top['experiment']} / {top['scenario']}, {top['contribution']:.2f} "
                  f"nats of logit, attention to B {top['attn_b']:.2f}.</p>",
                  img_html(plots["heads.png"], "Each last-layer head's contribution to the logit of B, and its attention to B"),
                  table_html(h, "Per-head means over n sequences")]
    if agg.circuits is not None:
        corr = agg.circuit_correlations
        parts += ["<h2>Circuit scores</h2>",
                  "<p>From the weights alone, for every fixed token: the rank of B among the logits its own "
                  "embedding makes through each last-layer head's OV circuit (copying), and the rank of A among "
                  "candidate previous tokens for the last-layer query of A against keys built by layer 0's OV "
                  "circuits (prefix matching). Spearman correlations with A and B power:</p>",
                  table_html(corr.pivot(index="score", columns="power", values="spearman").reset_index(),
                             "Spearman correlation over tokens"),
                  img_html(plots["circuits.png"], "Power against circuit score per token")]
    parts += ["<h2>Files</h2><p>" + " · ".join(f'<a href="{html.escape(h)}">{html.escape(t)}</a>' for h, t in aggregate_links)
              + "</p>",
              f"<details><summary>Manifest</summary><pre>{html.escape(json.dumps(manifest, indent=2))}</pre></details>"]
    return page("induction-sweep report", "".join(parts), agg.token_powers is not None)


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}img{max-width:100%;height:auto}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
         "caption{text-align:left;font-style:italic}table.header th{text-align:left}"
         "pre{white-space:pre-wrap;overflow-wrap:anywhere}dt{font-weight:bold}")


def page(title: str, body: str, with_explorer: bool) -> str:
    script = script_html() if with_explorer else ""
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
            f"<title>{html.escape(title)}</title><style>{STYLE}{EXPLORER_STYLE}</style></head>"
            f"<body>{body}{script}</body></html>")
