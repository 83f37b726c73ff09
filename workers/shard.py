"""One shard: a deterministic unit of work, computed by one model replica and written as one Parquet file.

``ShardRunner`` is a plain class (no Ray here): the driver wraps it as a Ray actor, and the
benchmark and tests use it directly. Its constructor loads the model once; ``run`` does one shard.
"""

from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from jaxtyping import Int
from torch import Tensor

from storage import open_store
from workers import experiments, models
from workers.experiments import Scenario
from workers.heads import head_measures
from workers.scoring import Scorer, cosine_neighbors
from workers.sequences import FIRST_TOKEN, make_batch, sequence_keys


@dataclass(frozen=True)
class WorkParams:
    """Everything that decides a shard's content (and so enters the run's config hash)."""

    model: str
    seed: int = 0
    n_neighbors: int = 20
    pair: tuple[int, int] = models.FALLBACK_PAIR
    save_tokens: bool = False
    precision: str = "auto"
    heads: bool = False  # per-head attention and logit attribution columns (workers/heads.py)


@dataclass(frozen=True)
class ShardSpec:
    experiment: str
    scenario: str
    part: int
    seq_lo: int
    seq_hi: int
    token_lo: int = -1  # fixed tokens [token_lo, token_hi) for token-powers; -1 otherwise
    token_hi: int = -1

    @property
    def key(self) -> str:
        return f"shards/{self.experiment}/part-{self.part:06d}.parquet"

    @property
    def n_sequences(self) -> int:
        return max(1, self.token_hi - self.token_lo) * (self.seq_hi - self.seq_lo)

    def n_rows(self, n_neighbors: int) -> int:
        return self.n_sequences * len(experiments.target_names(self.experiment, n_neighbors))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ShardSummary:
    key: str
    rows: int
    sequences: int
    seconds: float
    device: str = ""
    extra: dict = field(default_factory=dict)


class ShardRunner:
    """One model replica on one device: ``run(spec)`` computes a shard and writes it to ``out``."""

    def __init__(self, params: WorkParams, out: str, device: Optional[str] = None, batch_size: Optional[int] = None,
                 threads: Optional[int] = None):
        if threads:
            torch.set_num_threads(threads)
        self.params = params
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = models.load_model(params.model, self.device)
        self.scorer = Scorer(self.model, params.precision)
        self.batch_size = batch_size or default_batch_size(self.device, self.scorer.path)
        self.d_vocab, self.bos = models.d_vocab(self.model), models.bos_id(self.model)
        self.neighbors = None
        if params.n_neighbors > 0:
            self.neighbors = cosine_neighbors(models.unembedding(self.model), params.n_neighbors, FIRST_TOKEN)
        self.store = open_store(out)
        self._compute = threading.Lock()  # one shard computes while the previous one uploads

    def run(self, spec: ShardSpec | dict) -> ShardSummary:
        spec = ShardSpec(**spec) if isinstance(spec, dict) else spec
        start = time.perf_counter()
        with self._compute:
            table = self.compute(spec)
        # which path computed these rows: after a compiler fallback this is where it shows
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"induction_sweep.scorer": json.dumps(
            {"path": self.scorer.path, "precision": self.scorer.precision, **self.scorer.options,
             "device": str(self.device), "torch": torch.__version__}).encode()})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.store.put(spec.key, buffer.getvalue())
        return ShardSummary(spec.key, table.num_rows, spec.n_sequences, time.perf_counter() - start, str(self.device))

    def identities(self, spec: ShardSpec, lo: int, hi: int) -> tuple[Int[Tensor, "batch"], Int[Tensor, "batch"]]:
        """(fixed token or -1, sequence index) of flat sequences ``lo..hi`` of the shard, token-major."""
        flat = torch.arange(lo, hi, device=self.device)
        n_seq = spec.seq_hi - spec.seq_lo
        fixed = spec.token_lo + flat // n_seq if spec.token_lo >= 0 else torch.full_like(flat, -1)
        return fixed, spec.seq_lo + flat % n_seq

    @torch.inference_mode()
    def compute(self, spec: ShardSpec) -> pa.Table:
        scenario = experiments.SCENARIOS[f"{spec.experiment}/{spec.scenario}"]
        names = experiments.target_names(spec.experiment, self.params.n_neighbors)
        parts = []
        for lo in range(0, spec.n_sequences, self.batch_size):
            fixed, seq = self.identities(spec, lo, min(lo + self.batch_size, spec.n_sequences))
            parts.append(self.score(scenario, fixed, seq, names))
        columns = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}
        return rows_table(spec, names, columns, self.params.save_tokens)

    def score(self, scenario: Scenario, fixed: Int[Tensor, "batch"], seq: Int[Tensor, "batch"], names: list[str]) -> dict[str, Tensor]:
        keys = sequence_keys(self.params.seed, scenario.experiment, scenario.code, fixed, seq)
        pair_a, pair_b = self.params.pair
        if scenario.experiment == "token-powers":
            a_fixed = fixed if scenario.fix_a else torch.full_like(fixed, -1)
            b_fixed = fixed if scenario.fix_b else torch.full_like(fixed, -1)
        else:
            a_fixed = torch.full_like(seq, pair_a if scenario.fix_a else -1)
            b_fixed = torch.full_like(seq, pair_b if scenario.fix_b else -1)
        control = scenario.experiment if scenario.experiment in experiments.CONTROLS else None
        batch = make_batch(keys, self.d_vocab, self.bos, a_fixed, b_fixed, control)
        targets = experiments.target_tokens(names, batch, self.neighbors)
        induction, shuffled = self.scorer.strength(batch.tokens, batch.shuffled, targets)
        out = dict(fixed=fixed, seq=seq, a=batch.a, b=batch.b, targets=targets, induction=induction, shuffled=shuffled)
        if self.params.save_tokens:
            out.update(tokens=batch.tokens, shuffled_tokens=batch.shuffled)
        if self.params.heads:
            out.update(head_measures(self.scorer.compact, batch))
        return out


def default_batch_size(device: torch.device, path: str) -> int:
    """Sequences per forward (each is scored twice: induction and shuffled)."""
    if device.type == "cuda":
        return 32768 if path == "compact" else 2048
    return 1024


ROW_SCHEMA = pa.schema([
    ("experiment", pa.dictionary(pa.int8(), pa.string())),
    ("scenario", pa.dictionary(pa.int8(), pa.string())),
    ("fixed_token", pa.int32()),
    ("seq", pa.int32()),
    ("a", pa.int32()),
    ("b", pa.int32()),
    ("target", pa.dictionary(pa.int8(), pa.string())),
    ("target_token", pa.int32()),
    ("logodds_induction", pa.float32()),
    ("logodds_shuffled", pa.float32()),
    ("strength", pa.float32()),
])
ROW_KEYS = {"fixed", "seq", "a", "b", "targets", "induction", "shuffled", "tokens", "shuffled_tokens"}
TOKEN_FIELDS = [("tokens", pa.list_(pa.int32())), ("shuffled_tokens", pa.list_(pa.int32()))]


def rows_table(spec: ShardSpec, names: list[str], c: dict[str, np.ndarray], save_tokens: bool) -> pa.Table:
    """One row per (sequence, target), sequence-major."""
    n_seq, n_t = c["targets"].shape

    def per_seq(x: np.ndarray) -> np.ndarray:
        return np.repeat(x.astype(np.int32), n_t)

    def constant(value: str, n: int) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(np.zeros(n, dtype=np.int8), pa.array([value]))

    n = n_seq * n_t
    induction, shuffled = c["induction"].reshape(-1), c["shuffled"].reshape(-1)
    arrays = [
        constant(spec.experiment, n),
        constant(spec.scenario, n),
        pa.array(per_seq(c["fixed"])),
        pa.array(per_seq(c["seq"])),
        pa.array(per_seq(c["a"])),
        pa.array(per_seq(c["b"])),
        pa.DictionaryArray.from_arrays(np.tile(np.arange(n_t, dtype=np.int8), n_seq), pa.array(names)),
        pa.array(c["targets"].reshape(-1).astype(np.int32)),
        pa.array(induction.astype(np.float32)),
        pa.array(shuffled.astype(np.float32)),
        pa.array((induction - shuffled).astype(np.float32)),
    ]
    schema = ROW_SCHEMA
    extra = [k for k in c if k not in ROW_KEYS]  # per-head measurements, one value per sequence
    for name in extra:
        arrays.append(pa.array(np.repeat(c[name].astype(np.float32), n_t)))
    schema = pa.schema(list(ROW_SCHEMA) + [(name, pa.float32()) for name in extra])
    if save_tokens:
        for name in ("tokens", "shuffled_tokens"):
            seqs = np.repeat(c[name].astype(np.int32), n_t, axis=0)
            arrays.append(pa.FixedSizeListArray.from_arrays(seqs.reshape(-1), seqs.shape[1]).cast(pa.list_(pa.int32())))
        schema = pa.schema(list(schema) + TOKEN_FIELDS)
    return pa.Table.from_arrays(arrays, schema=schema)
