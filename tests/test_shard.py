import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from workers import experiments
from workers.model import hooked, source
from workers.scoring.logodds import logodds
from workers.shard import ShardRunner
from workers.work import ShardSpec, WorkParams


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    params = WorkParams("toy-2l", seed=3, n_neighbors=4, pair=source.FALLBACK_PAIR, bos=source.DEFAULT_BOS,
                        save_tokens=True, precision="fp32", heads=False, processing="exact",
                        experiments=tuple(experiments.REGISTRY.values()))
    return ShardRunner(params, str(out), device="cpu", batch_size=37)


def read(runner, spec):
    return pq.read_table(io.BytesIO(runner.store.get(spec.key))).to_pandas()


def test_token_powers_shard_rows(runner):
    spec = ShardSpec("token-powers", "B", 0, seq_lo=0, seq_hi=8, token_lo=4, token_hi=36)
    summary = runner.run(spec)
    rows = read(runner, spec)
    assert summary.rows == len(rows) == 32 * 8
    assert not rows.duplicated(["scenario", "fixed_token", "seq"]).any()
    assert (rows.b == rows.fixed_token).all() and set(rows.fixed_token) == set(range(4, 36))
    assert (rows.target == "B").all() and (rows.target_token == rows.b).all()
    np.testing.assert_allclose(rows.strength, rows.logodds_induction - rows.logodds_shuffled, atol=1e-6)
    # each file says how it was computed
    scorer = json.loads(pq.read_schema(io.BytesIO(runner.store.get(spec.key))).metadata[b"induction_sweep.scorer"])
    assert scorer == {"path": "compact", "precision": "fp32", "compiled": False, "attention": "sdpa",
                      "lse": "torch", "device": "cpu",
                      "torch": torch.__version__}


def test_saved_tokens_reproduce_strength_through_transformer_lens(runner, toy_model):
    spec = ShardSpec("fixed-pair", "A+B", 1, seq_lo=0, seq_hi=40)
    runner.run(spec)
    rows = read(runner, spec)
    assert list(rows.target.unique()) == ["B", "A", "N1", "N2", "N3", "R"]
    a, b = source.FALLBACK_PAIR
    assert (rows.a == a).all() and (rows.b == b).all()
    tokens = torch.tensor(np.stack(rows.tokens.to_numpy()), dtype=torch.int64)
    shuffled = torch.tensor(np.stack(rows.shuffled_tokens.to_numpy()), dtype=torch.int64)
    targets = torch.tensor(rows.target_token.to_numpy(), dtype=torch.int64)[:, None]
    lo = [logodds(torch.log_softmax(hooked.full_logits(toy_model, t)[:, -1].double(), -1), targets)[:, 0]
          for t in (tokens, shuffled)]
    assert np.abs((lo[0] - lo[1]).numpy() - rows.strength.to_numpy()).max() < 1e-3
    assert np.abs(lo[0].numpy() - rows.logodds_induction.to_numpy()).max() < 1e-3


def test_shard_content_does_not_depend_on_batch_size(runner, tmp_path):
    spec = ShardSpec("neighbors", "free", 2, seq_lo=10, seq_hi=60)
    runner.run(spec)
    other = ShardRunner(runner.params, str(tmp_path), device="cpu", batch_size=1000)
    other.run(spec)
    first, second = read(runner, spec), read(other, spec)
    for column in ("a", "b", "seq", "target_token"):
        assert (first[column] == second[column]).all()
    np.testing.assert_allclose(first.strength, second.strength, atol=1e-4)
    assert list(first.target.unique()) == ["B", "N1", "N2", "N3", "N4", "R"]


def test_default_batch_sizes():
    """CUDA batches: 32768 for an attention-only compact forward, less for MLPs by their hidden width
    (the float32 hidden layer at every position within MLP_HIDDEN_BYTES), 2048 on TransformerLens'
    path; 1024 on a CPU; fewer where the device's free memory holds fewer; refused in one line where
    it holds not one sequence."""
    from workers.model.source import ModelInputError
    from workers.scoring.scorer import scorer_for
    from workers.shard import FREE_SHARE, default_batch_size, sequence_bytes

    def scorer(**shape):
        return scorer_for(hooked.random_model(d_vocab=512, n_ctx=32, d_model=64, n_heads=4, d_head=16, seed=1, **shape), "fp32")

    cuda, cpu, plenty = torch.device("cuda"), torch.device("cpu"), 80 << 30  # only shapes are read: no GPU needed
    attn_only = scorer()
    assert default_batch_size(cuda, attn_only, plenty) == 32768 and default_batch_size(cpu, attn_only, plenty) == 1024
    mlp = dict(attn_only=False, act_fn="gelu", positional_embedding_type="standard")
    assert default_batch_size(cuda, scorer(d_mlp=2048, **mlp), plenty) == 16384  # gelu-2l's width
    assert default_batch_size(cuda, scorer(d_mlp=3072, **mlp), plenty) == 8192  # gpt2-small's
    llama = scorer(d_mlp=256, attn_only=False, act_fn="silu", gated_mlp=True, normalization_type="RMS",
                   positional_embedding_type="rotary")
    one = sequence_bytes(llama)
    assert one == 2 * 4 * (24 * 512 * 4 + 2 * 512)  # the gated MLP's two products side by side are its widest rows
    assert default_batch_size(cuda, llama, int(100 * one / FREE_SHARE)) == 64  # the power of two within 100 sequences
    with pytest.raises(ModelInputError, match=r"^one sequence of this model needs 0 MiB beyond its weights; cpu has 0 MiB free"):
        default_batch_size(cpu, llama, one)
    tl = scorer_for(hooked.random_model(d_vocab=512, n_ctx=32, d_model=64, n_heads=4, d_head=16, seed=1, **mlp), "fp32",
                    fast=False)
    assert tl.path == "transformer_lens" and default_batch_size(cuda, tl) == 2048
