"""The post's plots (PNG, matplotlib) and a self-contained ``report.html`` (images inlined)."""

from __future__ import annotations

import base64
import html
import io
import json

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["text.parse_math"] = False  # token strings (a "$", a "_") are drawn as written, never as markup
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from jobs.aggregate import Aggregates, Histogram, Histogram2D  # noqa: E402
from storage import Store  # noqa: E402
from workers import experiments  # noqa: E402


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def token_powers_plot(hists: list[Histogram], summary: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 4))
    for h, color in zip(hists, ("tab:blue", "tab:orange")):
        mean = summary.get(f"mean_{h.name.lower()}_power", float("nan"))
        ax.stairs(h.counts, h.edges, fill=True, alpha=0.5, color=color, label=f"{h.name} power (mean {mean:.2f})")
    ax.set(xlabel="induction strength (nats of log-odds)", ylabel="tokens",
           title=f"A and B power over {summary.get('tokens')} tokens × {summary.get('seqs')} sequences")
    ax.legend()
    return _png(fig)


def fixed_pair_strength_plot(hists: list[Histogram], pair: str) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 4))
    for h in hists:
        ax.stairs(h.counts, h.edges, label=h.name.split(" ", 1)[1])
    ax.set(xlabel="induction strength on B", ylabel="sequences", xlim=(hists[0].edges[0], hists[0].edges[-1]),
           title=f"Fixed pair {pair}: strength on B by scenario")
    ax.legend(title="fixed")
    return _png(fig)


def fixed_pair_logodds_plot(hists: list[Histogram2D]) -> bytes:
    fig, axes = plt.subplots(1, len(hists), figsize=(4 * len(hists), 4), squeeze=False)
    for ax, h in zip(axes[0], hists):
        ax.pcolormesh(h.x_edges, h.y_edges, np.ma.masked_equal(h.counts.T, 0), cmap="viridis")
        ax.plot(h.x_edges[[0, -1]], h.x_edges[[0, -1]], "w--", lw=0.8)
        ax.set(title=f"fixed: {h.scenario}", xlabel="log-odds of B, shuffled", ylabel="log-odds of B, induction")
    return _png(fig)


def neighbors_plot(neigh: pd.DataFrame) -> bytes:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    shown = neigh[neigh.target.isin(["B", "N1", "N5", "N15", "R"])]
    left.bar(shown.target, shown["mean"], yerr=shown["sem"], color="tab:green")
    left.set(ylabel="mean induction strength", title="Strength by target")
    curve = neigh[neigh.k >= 0].sort_values("k")
    right.errorbar(curve.k, curve["mean"], yerr=curve["sem"], marker="o", ms=3)
    r = neigh[neigh.target == "R"]
    if len(r):
        right.axhline(float(r["mean"].iloc[0]), color="gray", ls="--", label="random token R")
        right.legend()
    right.set(xlabel="k (0 = B itself, k = k-th nearest neighbour of B in W_U)", ylabel="mean strength",
              title="Induction bleeding to neighbours of B")
    return _png(fig)


def controls_plot(controls: pd.DataFrame, neighbors: pd.DataFrame | None) -> bytes:
    """Mean strength on B, A and R: plain induction against each control."""
    table = controls.pivot(index="experiment", columns="target", values="mean")
    errors = controls.pivot(index="experiment", columns="target", values="sem")
    if neighbors is not None:  # plain induction with free A and B (the neighbors experiment)
        base = neighbors.set_index("target")
        table.loc["induction"] = {"B": base.loc["B", "mean"], "R": base.loc["R", "mean"]}
        errors.loc["induction"] = {"B": base.loc["B", "sem"], "R": base.loc["R", "sem"]}
    order = [e for e in ("induction", *controls.experiment.unique()) if e in table.index]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    for i, target in enumerate(("B", "A", "R")):
        ax.bar(np.arange(len(order)) + (i - 1) * width, table.loc[order, target], width,
               yerr=errors.loc[order, target], label=f"on {target}")
    ax.set_xticks(np.arange(len(order)), order)
    ax.axhline(0, color="black", lw=0.5)
    ax.set(ylabel="mean induction strength", title="Is it B's presence or the A→B pair?")
    ax.legend()
    return _png(fig)


def heads_plot(heads: pd.DataFrame) -> bytes:
    """Each last-layer head's share of logit(B) - mean logit (induction minus shuffled), and its attention to B."""
    groups = list(dict.fromkeys(heads.experiment + " / " + heads.scenario))
    names = list(dict.fromkeys(heads["head"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
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
    return _png(fig)


def circuits_plot(table: pd.DataFrame, corr: pd.DataFrame) -> bytes:
    pairs = [(s, p) for s, p in (("ov_rank_best", "b_power"), ("qk_rank_best", "a_power")) if s in table]
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
    for ax, (score, power) in zip(axes[0], pairs):
        rho = corr[(corr.score == score) & (corr.power == power)].spearman.iloc[0]
        ax.scatter(np.log10(1 + table[score]), table[power], s=4, alpha=0.4)
        kind = "OV copying of B" if score.startswith("ov") else "QK prefix matching of A"
        ax.set(xlabel=f"log10(1 + rank) — {kind}, best head (0 = perfect)", ylabel=power.replace("_", " "),
               title=f"{power[0].upper()} power against {kind} (Spearman {rho:.2f})")
    return _png(fig)


def render(store: Store, manifest: dict, agg: Aggregates) -> dict[str, bytes]:
    """Write plots/*.png and report.html; returns the plots."""
    plots: dict[str, bytes] = {}
    if agg.token_powers is not None:
        roles = {s.name for s in experiments.shown_by(experiments.POWERS).scenarios}  # A and B power
        roles = [h for h in agg.histograms if h.name in roles]
        plots["token_powers.png"] = token_powers_plot(roles, agg.summary.token_powers)
    if agg.fixed_pair is not None:
        fp = agg.summary.fixed_pair
        pair = f"A={fp['pair_str'][0]!r} B={fp['pair_str'][1]!r}"
        prefix = experiments.shown_by(experiments.PAIR).name + " "  # histograms named "<experiment> <scenario>"
        plots["fixed_pair_strength.png"] = fixed_pair_strength_plot([h for h in agg.histograms if h.name.startswith(prefix)], pair)
        plots["fixed_pair_logodds.png"] = fixed_pair_logodds_plot(agg.logodds)
    if agg.neighbors is not None:
        plots["neighbors.png"] = neighbors_plot(agg.neighbors)
    if agg.heads is not None:
        plots["heads.png"] = heads_plot(agg.heads)
    if agg.circuits is not None:
        plots["circuits.png"] = circuits_plot(agg.circuits, agg.circuit_correlations)
    if agg.controls is not None:
        plots["controls.png"] = controls_plot(agg.controls, agg.neighbors)
    for name, data in plots.items():
        store.put(f"plots/{name}", data)
    store.put("report.html", report_html(manifest, agg, plots).encode())
    return plots


def loading_text(loading: dict | None) -> str:
    if not loading:
        return ""
    steps = ", ".join(loading.get("steps", [])) or "none"
    check = loading.get("max_abs_diff_log_prob")
    checked = f"; max |Δ log-prob| against the stored weights {check:.1e}" if check is not None else ""
    return f" ({html.escape(loading.get('loader', ''))}: {html.escape(steps)}{checked})"


def rule_text(experiment: str) -> str:
    """A control's sequence rule, in its docstring's words."""
    rule = experiments.get(experiment).rule if experiment in experiments.REGISTRY else None
    if isinstance(rule, str):
        from workers.sequences import RULES  # torch: only for runs with controls

        rule = RULES[rule]
    return (rule.__doc__ or "").strip().splitlines()[0].rstrip(".") if rule is not None else ""


def _img(data: bytes) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def report_html(manifest: dict, agg: Aggregates, plots: dict[str, bytes]) -> str:
    cfg, summary = manifest["config"], agg.summary
    parts = [f"<h1>Induction sweep: {html.escape(str(cfg['model']))}</h1>",
             "<p>Induction strength = log-odds of the target after <code>BOS, r×10, A, B, r×10, A</code> minus its "
             "log-odds after the same 22 inner tokens shuffled (last position only).</p>",
             f"<p>BOS id {cfg.get('bos')}; weights loaded with <b>{html.escape(str(cfg.get('processing')))}</b> processing"
             f"{loading_text(manifest.get('model_loading'))}.</p>"]
    if agg.token_powers is not None:
        tp, table = summary.token_powers, agg.token_powers
        parts += ["<h2>Token powers</h2>",
                  f"<p>For each of {tp['tokens']} tokens, {tp['seqs']} sequences with it as A (A power = mean strength on B) "
                  f"and {tp['seqs']} with it as B (B power). Mean A power <b>{tp['mean_a_power']:.2f}</b> "
                  f"(std {tp['std_a_power']:.2f}), mean B power <b>{tp['mean_b_power']:.2f}</b> (std {tp['std_b_power']:.2f}), "
                  f"mean standard error {tp['mean_sem']:.3f}; correlation of A and B power {tp['corr_a_b']:.2f}.</p>",
                  _img(plots["token_powers.png"]),
                  "<h3>Weakest and strongest tokens as B</h3>",
                  table.nsmallest(10, "b_power").to_html(index=False, float_format="%.2f"),
                  table.nlargest(10, "b_power").to_html(index=False, float_format="%.2f")]
    if agg.fixed_pair is not None:
        parts += ["<h2>Fixed pair</h2>", agg.fixed_pair.pivot(index="scenario", columns="target", values="mean")
                  .to_html(float_format="%.2f"), _img(plots["fixed_pair_strength.png"]), _img(plots["fixed_pair_logodds.png"])]
    if agg.neighbors is not None:
        parts += ["<h2>Neighbours of B</h2>",
                  "<p>Mean strength on B, on its k nearest neighbours in the unembedding (cosine), and on a random token.</p>",
                  _img(plots["neighbors.png"]), agg.neighbors.to_html(index=False, float_format="%.3f")]
    if agg.controls is not None:
        nan = float("nan")
        lines = "".join(f"<li><b>{html.escape(e)}</b> ({html.escape(rule_text(e))}): strength on B {v.get('B', nan):.2f}, "
                        f"on A {v.get('A', nan):.2f}, on a random token {v.get('R', nan):.2f}</li>"
                        for e, v in summary.controls.items())
        parts += ["<h2>Mechanism controls</h2>",
                  "<p>Each control alters the induction sequence before it is shuffled, and is scored against its "
                  "own shuffled control.</p>", f"<ul>{lines}</ul>", _img(plots["controls.png"]),
                  agg.controls.pivot(index="experiment", columns="target", values="mean").to_html(float_format="%.2f")]
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
                  _img(plots["heads.png"]), h.to_html(index=False, float_format="%.3f")]
    if agg.circuits is not None:
        corr = agg.circuit_correlations
        parts += ["<h2>Circuit scores</h2>",
                  "<p>From the weights alone, for every fixed token: the rank of B among the logits its own "
                  "embedding makes through each last-layer head's OV circuit (copying), and the rank of A among "
                  "candidate previous tokens for the last-layer query of A against keys built by layer 0's OV "
                  "circuits (prefix matching). Spearman correlations with A and B power:</p>",
                  corr.pivot(index="score", columns="power", values="spearman").to_html(float_format="%.2f"),
                  _img(plots["circuits.png"])]
    parts += ["<h2>Run</h2>", f"<pre>{html.escape(json.dumps(manifest, indent=2))}</pre>"]
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:2px 6px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>induction-sweep report</title><style>{style}</style></head>" \
           f"<body>{''.join(parts)}</body></html>"
