"""One shard: a deterministic unit of work, computed by one model replica and written as one Parquet file.

``ShardRunner`` is a plain class (no Ray here): the driver wraps it as a Ray actor, and the
benchmark and tests use it directly. Its constructor loads the model once (and times each step);
``run`` does one shard and stores its rows with its partial aggregates in the file's footer.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
import torch
from jaxtyping import Int
from torch import Tensor

from storage import open_store
from workers import neighbors
from workers.accumulator import FOOTER_KEY, shard_partials
from workers.experiments import Experiment, Scenario
from workers.model import hooked, source
from workers.rows import ScoredBatch
from workers.scoring import check as load_check
from workers.scoring import compile_cache
from workers.scoring.check import Reference, prove
from workers.scoring.variant import Variant
from workers.sequences import FIRST_TOKEN, SEQ_LEN, SequenceBatch, make_batch, sequence_keys, target_tokens
from workers.work import NEIGHBORS_KEY, ShardSpec, ShardSummary, WorkParams

if TYPE_CHECKING:
    from workers.scoring.scorer import Scorer

SCORER_KEY = b"induction_sweep.scorer"
ORIGIN_KEY = b"induction_sweep.origin"  # host, pid and (in Ray) node and actor ids of the computing actor


def identities(spec: ShardSpec, lo: int, hi: int, device: torch.device) -> tuple[Int[Tensor, " batch"], Int[Tensor, " batch"]]:
    """(fixed token or -1, sequence index) of flat sequences ``lo..hi`` of the shard, token-major."""
    flat = torch.arange(lo, hi, device=device)
    n_seq = spec.seq_hi - spec.seq_lo
    fixed = spec.token_lo + flat // n_seq if spec.token_lo >= 0 else torch.full_like(flat, -1)
    return fixed, spec.seq_lo + flat % n_seq


def sequences(params: WorkParams, d_vocab: int, neighbors: Int[Tensor, "vocab k"] | None, experiment: Experiment,
              scenario: Scenario, fixed: Int[Tensor, " batch"], seq: Int[Tensor, " batch"]
              ) -> tuple[SequenceBatch, Int[Tensor, "batch n_targets"]]:
    """The sequences of (fixed token, sequence index) pairs, and their targets (the neighbours' only
    where ``neighbors`` is given)."""
    keys = sequence_keys(params.seed, experiment.code, scenario.code, fixed, seq)
    none = torch.full_like(seq, -1)
    if experiment.per_token:  # the swept token plays A or B
        a_fixed, b_fixed = (fixed if scenario.fix_a else none), (fixed if scenario.fix_b else none)
    else:  # the run's fixed pair
        pair_a, pair_b = params.pair
        a_fixed = torch.full_like(seq, pair_a) if scenario.fix_a else none
        b_fixed = torch.full_like(seq, pair_b) if scenario.fix_b else none
    batch = make_batch(keys, d_vocab, params.bos, a_fixed, b_fixed, experiment.rule)
    names = experiment.target_names(params.n_neighbors if neighbors is not None else 0)
    return batch, target_tokens(names, batch, neighbors)


def check_batches(params: WorkParams, d_vocab: int, device: torch.device) -> list[tuple[str, Tensor, Tensor]]:
    """The load-time check's sequences (from load_check.SEED), known before the model loads: load_check.SEQUENCES split across
    the run's experiments (the first scenario of each, the first fixed token of a per-token one), each
    with its shuffled control, and the experiment's targets but the neighbours (they come from the
    weights; a neighbour's log-odds take the same path as B's): (experiment, tokens, targets)."""
    out, params = [], dataclasses.replace(params, seed=load_check.SEED)
    per = max(2, load_check.SEQUENCES // len(params.experiments))
    for experiment in params.experiments:
        token = (FIRST_TOKEN, FIRST_TOKEN + 1) if experiment.per_token else (-1, -1)
        spec = ShardSpec(experiment.name, experiment.scenarios[0].name, 0, 0, per, *token)
        batch, targets = sequences(params, d_vocab, None, experiment, experiment.scenarios[0], *identities(spec, 0, per, device))
        out.append((experiment.name, torch.cat([batch.tokens, batch.shuffled]), torch.cat([targets, targets])))
    return out


class ShardRunner:
    """One model replica on one device: ``run(spec)`` computes a shard and writes it to ``out``."""

    def __init__(self, params: WorkParams, out: str, device: str | None = None, batch_size: int | None = None,
                 threads: int | None = None, compile: bool | None = None):
        """``compile``: torch.compile the forward (default: on CUDA)."""
        self.timings = {"started": time.time()}
        if threads:
            torch.set_num_threads(threads)
        self.params = params
        self.experiments = {e.name: e for e in params.experiments}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cfg = check_fits(params.model, self.device, params.precision)
        checks = check_batches(params, cfg.d_vocab, self.device)
        # the load-time check's reference (TransformerLens' forward of the stored weights) builds in the
        # background while the scorer loads and compiles
        reference = Reference(params.model, cfg, params.processing, self.device, checks)
        # checkpoints the compact forward computes load without TransformerLens (seconds of imports saved per actor)
        self.model, self.loading = self._timed("load", hooked.load_for_scoring, params.model, self.device, params.processing)
        from workers.scoring.scorer import scorer_for

        self.scorer = scorer_for(self.model, params.precision, compile=compile, device=self.device)
        self.batch_size = batch_size or default_batch_size(self.device, self.scorer)
        self.d_vocab = self.model.W_E.shape[0]
        self.neighbors = None
        if params.n_neighbors > 0:  # on the device, once per actor, from the stored weights (docs/DESIGN.md §1)
            unembedding = neighbors.centred_unembedding(hooked.unembedding_of(self.model).to(self.device))
            self.neighbors = self._timed("neighbors", neighbors.cosine_neighbors, unembedding, params.n_neighbors, FIRST_TOKEN)
        self.store = open_store(out)
        if self.neighbors is not None and not self.store.exists(NEIGHBORS_KEY):  # the same table from every actor
            self._timed("neighbors save", save_neighbors, self.store, self.neighbors)
        # kernels that another actor of the run compiled already; the warm-up compiles the rest
        cache = None
        if self.scorer.options["compiled"]:
            cache = compile_cache.cache_key(self.device, self.scorer.precision, self.scorer.shapes)
        loaded = cache is not None and self._timed("cache load", compile_cache.load, self.store, cache)
        self._timed("warm-up", self.warm_up)  # compiles here, not inside the first shard
        if cache is not None and not loaded and self.scorer.options["compiled"]:  # still compiled: no fallback
            self._timed("cache save", compile_cache.save, self.store, cache)
        self.check = self._timed("check", prove, self.scorer, reference, checks, params.model, params.processing)
        self.timings["reference"] = reference.build_s  # in the background, from the start
        if source.transformer_lens_import_seconds():  # the TransformerLens import (the loader's or the reference's)
            self.timings["import"] = source.transformer_lens_import_seconds()
        self._compute = threading.Lock()  # one shard computes while the previous one uploads

    @functools.cached_property
    def origin(self) -> dict:
        """Where this actor runs: its host and, inside Ray, its node and actor ids (each shard records them)."""
        where = {"host": socket.gethostname(), "pid": os.getpid()}
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            context = sys.modules["ray"].get_runtime_context()
            where.update(node=context.get_node_id(), actor=context.get_actor_id())
        return where

    def _timed(self, name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[name] = time.perf_counter() - start
        return out

    def ready(self) -> dict:
        """Start-up timings (seconds per step, ``started`` as a Unix time) and where this actor runs."""
        return {**self.timings, "device": str(self.device), "host": socket.gethostname(), "pid": os.getpid(),
                "loading": self.loading, "check": self.check}

    def warm_up(self) -> None:
        """Sequences of the run's first experiment: compiles and loads kernels. On a GPU a whole batch
        (milliseconds there), so that kernels are tuned for the size the shards run at."""
        experiment = self.params.experiments[0]
        n = self.batch_size if self.device.type == "cuda" else 2
        spec = ShardSpec(experiment.name, experiment.scenarios[0].name, 0, 0, n)
        with torch.inference_mode():
            self.score(experiment, experiment.scenarios[0], *self.identities(spec, 0, n))

    def run(self, spec: ShardSpec | dict) -> ShardSummary:
        spec = ShardSpec(**spec) if isinstance(spec, dict) else spec
        experiment = self.experiments[spec.experiment]
        names = experiment.target_names(self.params.n_neighbors)
        with self._compute:
            start = time.perf_counter()
            batch = self.compute(spec)
            computed = time.perf_counter()
        partials = shard_partials(experiment, spec.scenario, batch, names)
        nonfinite, example = partials.nonfinite()
        partials = partials.to_bytes()
        table = batch.to_table(spec.experiment, spec.scenario, names)
        # which path computed these rows (after any compiler fallback), and what they add to the aggregates
        scorer = {"path": self.scorer.path, "precision": self.scorer.precision, **self.scorer.options,
                  "device": str(self.device), "torch": torch.__version__}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), SCORER_KEY: json.dumps(scorer).encode(),
                                               ORIGIN_KEY: json.dumps(self.origin).encode(), FOOTER_KEY: partials})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.store.put(spec.key, buffer.getvalue())
        return ShardSummary(spec.key, table.num_rows, spec.n_sequences, computed - start,
                            time.perf_counter() - computed, partials, nonfinite, example)

    def identities(self, spec: ShardSpec, lo: int, hi: int) -> tuple[Int[Tensor, " batch"], Int[Tensor, " batch"]]:
        return identities(spec, lo, hi, self.device)

    @torch.inference_mode()
    def compute(self, spec: ShardSpec) -> ScoredBatch:
        experiment = self.experiments[spec.experiment]
        scenario = experiment.scenario(spec.scenario)
        parts = [self.score(experiment, scenario, *self.identities(spec, lo, min(lo + self.batch_size, spec.n_sequences)))
                 for lo in range(0, spec.n_sequences, self.batch_size)]
        return ScoredBatch.concat(parts)

    def sequences(self, experiment: Experiment, scenario: Scenario, fixed: Int[Tensor, " batch"],
                  seq: Int[Tensor, " batch"]) -> tuple[SequenceBatch, Int[Tensor, "batch n_targets"]]:
        return sequences(self.params, self.d_vocab, self.neighbors, experiment, scenario, fixed, seq)

    def score(self, experiment: Experiment, scenario: Scenario, fixed: Int[Tensor, " batch"],
              seq: Int[Tensor, " batch"]) -> ScoredBatch:
        batch, targets = self.sequences(experiment, scenario, fixed, seq)
        induction, shuffled = self.scorer.strength(batch.tokens, batch.shuffled, targets)
        scored = ScoredBatch(fixed, seq, batch.a, batch.b, targets, induction, shuffled)
        if self.params.save_tokens:
            scored.tokens, scored.shuffled_tokens = batch.tokens, batch.shuffled
        if self.params.heads:
            from workers.heads import head_measures

            scored.heads = head_measures(self.scorer.compact, batch)
        return scored

    def circuit_scores(self, tokens: list[int]) -> dict[str, np.ndarray]:
        """Per-token OV/QK circuit scores from this replica's weights, on its device (workers/circuits.py)."""
        from workers.circuits import model_scores

        return model_scores(self.model, tokens, self.device)


MLP_HIDDEN_BYTES = 8 << 30  # the float32 hidden layer of one MLP at every position, on CUDA
LIVE_ROWS = 4  # float32 copies of a layer's widest rows alive at once in a forward (input, product, activation, sum)
FREE_SHARE = 0.5  # of the memory free after the weights: the rest for the allocator's slack and compiled graphs


def sequence_bytes(scorer: Scorer) -> int:
    """Memory one sequence takes in a compact forward's batch, both of its runs (induction and
    shuffled): its widest layer's float32 rows at every position, and its float32 logits (twice: the
    logits and their exponentials for the log-sum-exp)."""
    s = scorer.compact.shape
    widest = max(3 * s["heads"] * s["d_head"], s["d_model"], (2 if s["gated"] else 1) * s["d_mlp"])
    return 2 * 4 * (SEQ_LEN * widest * LIVE_ROWS + 2 * s["d_vocab"])


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's (the weights already on it), or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def resident_bytes(cfg, device: torch.device, precision: str) -> int:
    """About what a scorer of ``cfg`` keeps on ``device`` (source.parameter_count's weights, from the config
    alone). The compact forward: its layers in the products' dtype (2 bytes a weight for bf16 on CUDA,
    else float32), the embedding and the target logits' rows float32, a shortformer's layer-0 table;
    on a CPU, also the float32 weights it was made from. TransformerLens' path: its float32 model."""
    weights = source.parameter_count(cfg)
    if not source.compact_supported(cfg):
        return 4 * weights
    width = 2 if Variant.default(device.type, precision).native_bf16 else 4
    embed, unembed = cfg.d_model * cfg.d_vocab, cfg.d_model * cfg.d_vocab_out
    table = 4 * cfg.d_vocab * 3 * cfg.n_heads * cfg.d_head if cfg.positional_embedding_type == "shortformer" else 0
    forward = width * (weights - embed - unembed) + 4 * embed + (width + 4) * unembed + table
    return forward + (4 * weights if device.type == "cpu" else 0)


def check_fits(spec: str, device: torch.device, precision: str, free: int | None = None):
    """The model's resolved config; ModelInputError in one line, before anything loads, where the
    scorer's weights (``resident_bytes``) exceed what ``device`` has free (default: ``free_memory``)."""
    cfg = source.model_config(spec)
    need = resident_bytes(cfg, device, precision)
    free = free_memory(device) if free is None else free
    if need > free:
        raise source.ModelInputError(f"model {spec} needs about {need / 2**30:.1f} GiB for its weights on {device} ({precision}); "
                                     f"{device} has {free / 2**30:.1f} GiB free (a smaller model, or a device with more memory)")
    return cfg


def default_batch_size(device: torch.device, scorer: Scorer, free: int | None = None) -> int:
    """Sequences per forward (each is scored twice: induction and shuffled). On CUDA: the compact
    forward at 32768, or for a model with MLPs the largest power of two whose hidden layer (2 × batch
    × 24 × d_mlp float32) fits MLP_HIDDEN_BYTES: 16384 for gelu-2l, 8192 for gpt2-small; 1024 on a
    CPU. Either way no more than FREE_SHARE of ``free`` (default: what the device has free, the
    weights loaded) holds (``sequence_bytes``); ModelInputError in one line where not even one
    sequence fits."""
    if scorer.path != "compact":
        return 2048 if device.type == "cuda" else 1024
    cap = 1024
    if device.type == "cuda":
        cap = 32768
        if scorer.compact.shape["d_mlp"]:
            fits = MLP_HIDDEN_BYTES // (2 * SEQ_LEN * scorer.compact.shape["d_mlp"] * 4)
            cap = min(32768, 1 << max(fits.bit_length() - 1, 8))
    free = free_memory(device) if free is None else free
    fits = int(FREE_SHARE * free) // sequence_bytes(scorer)
    if fits < 1:
        raise source.ModelInputError(
            f"one sequence of this model needs {sequence_bytes(scorer) / 2**20:.0f} MiB beyond its weights; "
            f"{device} has {free / 2**20:.0f} MiB free (a smaller model, or a device with more memory)")
    return min(cap, 1 << (fits.bit_length() - 1))


def save_neighbors(store, neighbors: Int[Tensor, "vocab k"]) -> None:
    import pyarrow as pa

    ids = neighbors[FIRST_TOKEN:].cpu().numpy().astype(np.int32)
    table = pa.table({"token": np.arange(FIRST_TOKEN, FIRST_TOKEN + len(ids), dtype=np.int32),
                      "neighbors": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), ids.shape[1])})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    store.put(NEIGHBORS_KEY, buffer.getvalue())
