"""The report: the post's figures from stored aggregates (histogram counts, what fell outside, axes),
tables with mean, SE and n, the run header, and the token explorer's data, all in one file."""

import html
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from jobs import cli, report, results
from jobs.aggregate import Histogram
from tests.helpers import copy_run
from workers.accumulator import LOGODDS_BINS, STRENGTH_BINS, bin_edges


@pytest.fixture(scope="module")
def run(toy_runs):
    return results.open_run(toy_runs["seed0"])


def rows(run, experiment):
    return run.shards(experiment).to_table().to_pandas()


def test_neighbour_histograms_are_the_posts_five_with_what_fell_outside(run):
    got = rows(run, "neighbors")
    edges = bin_edges(STRENGTH_BINS)
    for target in ("B", "N1", "N5", "N15", "R"):
        h = run.aggregates.histogram(f"neighbors/free/{target}")
        values = got[got.target == target].strength.to_numpy()
        inside = (values >= edges[0]) & (values <= edges[-1])
        assert len(h.counts) == 30 and np.array_equal(h.counts, np.histogram(values[inside], edges)[0])
        assert h.outside == (~inside).sum() and h.counts.sum() + h.outside == len(values) == 64
    assert run.aggregates.histogram("neighbors/free/B").outside > 0  # toy-2l's strength on B passes 20


def test_the_2d_histogram_puts_induction_on_x_and_counts_what_it_leaves_out(run):
    got = rows(run, "fixed-pair")
    on_b = got[(got.target == "B") & (got.scenario == "A+B")]
    grid = next(h for h in run.aggregates.logodds if h.scenario == "A+B")
    edges = bin_edges(LOGODDS_BINS)
    x, y = on_b.logodds_induction.to_numpy(), on_b.logodds_shuffled.to_numpy()
    inside = (x >= edges[0]) & (x <= edges[-1]) & (y >= edges[0]) & (y <= edges[-1])
    assert np.array_equal(grid.counts, np.histogram2d(x[inside], y[inside], [edges, edges])[0])
    assert grid.outside == (~inside).sum() and grid.counts.sum() + grid.outside == 64
    strength = run.aggregates.histogram("fixed-pair/A+B/B")
    assert strength.counts.sum() + strength.outside == 64


def test_the_report_has_tables_with_se_and_n_a_header_definitions_and_the_manifest_folded(run):
    page = run.store.get("report.html").decode()
    header = re.search(r"<table class='header'>.*?</table>", page).group(0)
    for field, value in (("model", "toy-2l"), ("BOS id", "1"), ("processing", "exact"), ("precision", "fp32"), ("seed", "0"),
                         ("sequences per token and role", "256"), ("version", run.manifest["code_version"])):
        assert f"<th>{field}</th><td>{value}</td>" in header
    for term in ("Log-odds", "Induction strength", "A power, B power", "Mean, SE, n", "Neighbours</b> N1…N15", "Load-time check"):
        assert term in page
    table = re.search(r"<table.*?</table>", page.split("<h2>Fixed pair</h2>")[1], re.S).group(0)
    heads = re.findall(r"<th>(.*?)</th>", table)
    assert heads == ["scenario", "target", "mean", "SE", "n"] and table.count("</tr>") == 1 + 4 * 6  # every scenario and target
    assert re.search(r"<details><summary>Manifest</summary><pre>", page)
    assert page.count("<img") == page.count(' alt="') == 5
    assert "<script src" not in page and "http" not in page.split("<h2>Files</h2>")[0]  # nothing fetched from anywhere


def test_the_explorer_holds_every_token_with_its_neighbours(run):
    page = run.store.get("report.html").decode()
    blob = json.loads(html.unescape(re.search(r'<script type="application/json" id="tokens-data">(.*?)</script>', page)
                                    .group(1)).replace("<\\/", "</"))
    values, table = blob["values"], run.aggregates.token_powers
    assert values["token"] == table.token.tolist() and values["b_power"] == pytest.approx(table.b_power.tolist(), abs=1e-4)
    stored = pd.read_parquet(io.BytesIO(run.store.get("neighbors.parquet")))
    assert values["neighbors"][0] == list(stored.neighbors.iloc[0][:5])
    assert [p["label"] for p in blob["presets"]][:4] == ["weakest as A", "strongest as A", "weakest as B", "strongest as B"]
    for link in ("vocab.parquet", "aggregates/token_powers.parquet", "shards/token-powers/"):
        assert f'href="{link}"' in page


def test_token_strings_are_drawn_as_written():
    hist = Histogram("fixed-pair/A+B/B", bin_edges(STRENGTH_BINS), np.arange(30), 3)
    title = report.literal("Fixed pair A='$\\frac' B='$'")  # unbalanced mathtext: matplotlib would raise on it
    image = Image.open(io.BytesIO(report.strength_hist_plot([hist], ["A+B"], title, "fixed")))
    assert image.size[0] > 300


def test_a_run_of_an_older_layout_is_refused_in_one_line(toy_runs, tmp_path, capsys):
    old = copy_run(toy_runs["seed1"], str(tmp_path / "old"), lambda found: {**found, "config_hash": "0123456789abcdef"})
    before = old.get("report.html")
    assert cli.main(["report", str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another version" in err and old.get("report.html") == before
