"""What several test modules share (fixtures live in conftest.py): ports, run configs, the parity
check against TransformerLens, and the assertions on runs and refusals."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from jobs import manifest, results
from jobs.cli import main
from jobs.config import RunConfig, plan_shards, resolve
from storage import open_store
from workers import experiments
from workers.model import hooked, source
from workers.scoring.logodds import logodds
from workers.scoring.scorer import scorer_for
from workers.scoring.variant import Variant
from workers.sequences import make_batch, sequence_keys

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def copy_run(source: str, to: str, edit_manifest) -> object:
    """A copy of the run at ``source`` under ``to`` whose manifest is ``edit_manifest(manifest)``: the store."""
    copy, original = open_store(to), open_store(source)
    for key in original.list():
        copy.put(key, original.get(key))
    copy.put("manifest.json", json.dumps(edit_manifest(json.loads(copy.get("manifest.json")))).encode())
    return copy


def resolved(cfg: RunConfig, tokens: str | None = None) -> RunConfig:
    """As the command line does: the config resolved against the model."""
    return resolve(cfg, source.describe(cfg.model), tokens)


def assert_same_aggregates(a, b, exact=True):
    """Every table and histogram equal (bit for bit, or within 1e-6), and the same summary."""
    tables_a, tables_b = a.tables(), b.tables()
    assert tables_a.keys() == tables_b.keys()
    for name in tables_a:
        pd.testing.assert_frame_equal(tables_a[name], tables_b[name], check_exact=exact, rtol=0, atol=1e-6)
    if exact:
        assert a.summary == b.summary
    else:
        pd.testing.assert_series_equal(pd.json_normalize(a.summary.as_dict()).iloc[0],
                                       pd.json_normalize(b.summary.as_dict()).iloc[0], rtol=0, atol=1e-6)


def assert_complete_once(uri: str, tokens: int, seqs: int) -> None:
    store = open_store(uri)
    cfg = manifest.config_of(store)
    states = manifest.shard_states(store, cfg)
    assert not states.missing and not states.corrupt
    assert sorted(store.list("shards/")) == sorted(s.key for s in plan_shards(cfg))  # nothing extra
    rows = results.open_run(uri).shards().to_table(columns=["scenario", "fixed_token", "seq"]).to_pandas()
    assert len(rows) == tokens * seqs * 2 and not rows.duplicated().any()


def refused(capsys, argv, match):
    """Exit 2, exactly one line on stderr containing ``match``, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("induction-sweep: error:"), err
    assert match in lines[0], lines[0]


BOUNDS = {"fp32": 1e-4, "bf16": 0.1}


def seed_style(n: int, d_vocab: int):
    seq = torch.arange(n)
    keys = sequence_keys(7, experiments.get("neighbors").code, 0, torch.full_like(seq, -1), seq)
    return make_batch(keys, d_vocab, 1, torch.full_like(seq, -1), torch.full_like(seq, -1))


def reference_strength(model, batch, targets) -> torch.Tensor:
    """TransformerLens: model(tokens) + log_softmax at the last position, in float64 after the forward."""
    lo = [logodds(torch.log_softmax(hooked.full_logits(model, t)[:, -1].double(), -1), targets)
          for t in (batch.tokens, batch.shuffled)]
    return lo[0] - lo[1]


def check_parity(model, precision: str, n: int = 128, scored=None, **scorer_options):
    """``scored`` (default ``model``): what the scorer runs, e.g. the weights as the actors load them."""
    batch = seed_style(n, model.cfg.d_vocab)
    targets = torch.stack([batch.b, batch.a, batch.r], 1)
    ref = reference_strength(model, batch, targets)
    scorer = scorer_for(model if scored is None else scored, precision, **scorer_options)
    assert scorer.path == "compact"
    ind, shuf = scorer.strength(batch.tokens, batch.shuffled, targets)
    err = ((ind - shuf).double() - ref).abs().max().item()
    assert err <= BOUNDS[precision], f"{precision}: max |Δ strength| {err}"
    # what was asked for ran, rather than the fallback taken when a compiler fails
    options = {"compiled" if k == "compile" else k: v for k, v in scorer_options.items()}
    assert scorer.variant == Variant.default(scorer.device.type, precision).with_options(**options)
    return err
