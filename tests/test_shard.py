import dataclasses
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


@pytest.mark.parametrize("shape", [dict(), dict(attn_only=False, d_mlp=256, act_fn="gelu", positional_embedding_type="standard"),
                                   dict(attn_only=False, d_mlp=256, act_fn="silu", gated_mlp=True, normalization_type="RMS",
                                        positional_embedding_type="rotary", n_key_value_heads=2)])
@pytest.mark.parametrize("device, precision", [("cpu", "fp32"), ("cuda", "bf16"), ("cuda", "fp32")])
def test_resident_bytes_are_what_the_scorer_holds(shape, device, precision):
    """The estimate a model is refused by, from its config alone, against the bytes of the forward's
    buffers (on meta tensors for CUDA: only shapes and dtypes are read), plus on a CPU the float32 weights
    the forward was made from: within 10 %."""
    from workers.compact.forward import CompactForward
    from workers.model import folds
    from workers.scoring.variant import Variant
    from workers.shard import resident_bytes

    model = hooked.random_model(d_vocab=4096, n_ctx=32, d_model=128, n_heads=4, d_head=32, n_layers=3, seed=1, **shape)
    variant = Variant.default(device, precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    weights = folds.compact_weights(model)
    forward = CompactForward(weights, dtype, dtype if variant.native_bf16 else torch.float32, variant.attention,
                             64 if device == "cuda" else 1).to("meta")
    held = sum(b.numel() * b.element_size() for b in forward.buffers())
    if device == "cpu":
        held += sum(t.numel() * t.element_size() for name in ("W_E", "W_U", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_gate")
                    for t in ([getattr(weights, name)] if isinstance(getattr(weights, name), torch.Tensor) else getattr(weights, name)))
    estimate = resident_bytes(source.resolved(model.cfg), torch.device(device), precision)
    assert abs(estimate / held - 1) < 0.1, (estimate, held)


def test_a_model_too_big_for_its_device_is_refused_before_it_loads(tmp_path):
    """A checkpoint of 100 billion float32 weights (a sparse file: its header and size are a real
    checkpoint's, its weights never written): the actor refuses it in one line, from its config, before
    it reads a weight or builds the load-time check's reference."""
    from workers.model import fields

    config = {**json.loads((source.TOY_DIR / "config.json").read_text()), "n_layers": 96, "d_model": 16384, "n_heads": 128,
              "d_head": 128}
    header, offset = {}, 0
    for name, shape in fields.expected_tensors(fields.resolve(config)).items():
        size = 4 * int(np.prod(shape))
        header[name], offset = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}, offset + size
    blob = json.dumps(header).encode()
    path = tmp_path / "huge"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    assert source.describe(str(path)).cfg.d_model == 16384  # a checkpoint the driver accepts
    params = WorkParams(str(path), seed=3, n_neighbors=0, pair=source.FALLBACK_PAIR, bos=source.DEFAULT_BOS, save_tokens=False,
                        precision="fp32", heads=False, processing="exact", experiments=(experiments.get("token-powers"),))
    with pytest.raises(source.ModelInputError, match=rf"^model {path} needs about 7\d\d\.\d GiB for its weights on cpu \(fp32\); "
                                                     r"cpu has \d+\.\d GiB free \(a smaller model, or a device with more memory\)$"):
        ShardRunner(params, str(tmp_path / "out"), device="cpu")
    assert not (tmp_path / "out").exists()


def test_the_weights_a_scorer_is_made_from_stay_on_the_host():
    """The float32 weights a compact scorer is made from load on the host whatever the device asked
    for (a 1B model's would be 4 GB more of a GPU); the scorer copies its own there in the precision's
    dtype. No GPU needed: nothing is put on it."""
    weights, loading = hooked.load_for_scoring("toy-2l", "cuda")
    tensors = [v for f in dataclasses.fields(weights) for v in (getattr(weights, f.name) if isinstance(getattr(weights, f.name), list)
                                                                 else [getattr(weights, f.name)]) if isinstance(v, torch.Tensor)]
    assert loading["loader"] == "safetensors" and len(tensors) > 20 and {t.device.type for t in tensors} == {"cpu"}
