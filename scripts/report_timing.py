"""Size and time to interactive of report.html's token explorer in headless Chromium, for synthetic
runs of N tokens (docs/PERFORMANCE.md, "Report").

    python scripts/report_timing.py 48262 256000

Each synthetic run is what a token-powers run of N tokens with neighbours stores: A and B power
drawn around 14.7 (SE 0.3, n 256), 20 neighbours per token drawn at random, token strings of 1 to
12 letters; the report is drawn by ``jobs.report.render`` as for a real run. Time to interactive:
from navigation to the explorer's table filled (``data-ready``), as Chromium's ``performance.now()``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import torch

from jobs import report
from jobs.aggregate import Aggregates, Histogram, Summary
from storage import open_store
from workers.layout import FIRST_TOKEN
from workers.shard import save_neighbors


def synthetic_run(directory: str, tokens: int) -> float:
    """Store the synthetic run and draw its report; returns the seconds ``report.render`` took."""
    rng = np.random.default_rng(0)
    vocab = ["<unk>", "<s>", "<pad>", "</s>"] + ["".join(rng.choice(list("abcdefghij $"), rng.integers(1, 13)))
                                                  for _ in range(tokens)]
    ids = np.arange(FIRST_TOKEN, FIRST_TOKEN + tokens)
    table = pd.DataFrame({"token": ids, "token_str": vocab[FIRST_TOKEN:], "a_power": rng.normal(14.7, 1.5, tokens),
                          "a_sem": rng.uniform(0.2, 0.4, tokens), "a_n": 256, "b_power": rng.normal(14.7, 1.2, tokens),
                          "b_sem": rng.uniform(0.2, 0.4, tokens), "b_n": 256})
    edges = np.histogram_bin_edges(np.concatenate([table.a_power, table.b_power]), 30)
    summary = {"tokens": tokens, "seqs": 256, "mean_a_power": table.a_power.mean(), "std_a_power": table.a_power.std(),
               "mean_b_power": table.b_power.mean(), "std_b_power": table.b_power.std(), "mean_a_sem": 0.3, "mean_b_sem": 0.3,
               "mean_sem": 0.3, "corr_a_b": float(table.a_power.corr(table.b_power))}
    agg = Aggregates(Summary("synthetic", "synthetic", 0, token_powers=summary), token_powers=table,
                     histograms=[Histogram(f"token-powers/{r}/B", edges, np.histogram(table[f"{r.lower()}_power"], edges)[0])
                                 for r in ("A", "B")])
    store = open_store(directory)
    store.put("vocab.parquet", pd.DataFrame({"token": range(len(vocab)), "token_str": vocab}).to_parquet(index=False))
    save_neighbors(store, torch.from_numpy(rng.integers(FIRST_TOKEN, len(vocab), (len(vocab), 20))))
    config = {"model": f"synthetic-{tokens}", "experiments": ["token-powers"], "tokens": tokens, "seqs": 256, "seed": 0,
              "precision": "bf16", "bos": 1, "processing": "exact", "neighbors": 20, "pairs": 4096}
    start = time.perf_counter()
    report.render(store, {"config": config, "config_hash": "synthetic", "code_version": "synthetic", "status": "complete"}, agg)
    return time.perf_counter() - start


def time_to_interactive(path: str) -> float:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"))
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"file://{path}")
        page.wait_for_selector(".explorer[data-ready='1']", timeout=120_000)
        ms = float(page.eval_on_selector(".explorer", "e => e.dataset.readyMs"))
        browser.close()
    return ms


def main(counts: list[int]) -> None:
    for tokens in counts:
        directory = tempfile.mkdtemp(prefix="report-timing-")
        drawn = synthetic_run(directory, tokens)
        path = f"{directory}/report.html"
        size = len(open(path, "rb").read())
        runs = [time_to_interactive(path) for _ in range(3)]
        print(json.dumps({"tokens": tokens, "report_bytes": size, "render_s": round(drawn, 2),
                          "time_to_interactive_ms": [round(r) for r in runs]}))
        shutil.rmtree(directory)


if __name__ == "__main__":
    main([int(n) for n in sys.argv[1:]] or [48262, 256000])
