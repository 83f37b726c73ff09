"""The work an actor is given and what it returns: the run's parameters an actor needs, one shard's
spec, and a shard's summary. Torch-free, so that the driver plans and merges without torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from workers import experiments
from workers.experiments import Experiment

NEIGHBORS_KEY = "neighbors.parquet"  # every token's K nearest neighbours (token, neighbors): actors write it, the report reads it


@dataclass(frozen=True)
class WorkParams:
    """What an actor needs of the run's config (jobs/config.py RunConfig.work_params)."""

    model: str
    seed: int
    n_neighbors: int  # 0: no experiment of the run scores neighbours
    pair: tuple[int, int]
    bos: int
    save_tokens: bool
    precision: str
    heads: bool  # per-head attention and logit attribution columns (workers/heads.py)
    processing: str  # "exact" or "tl-default" (workers/model/ processing_steps)
    experiments: tuple[Experiment, ...]  # the run's declarations travel with the work (a new one needs no deploy)


@dataclass(frozen=True)
class ShardSpec:
    experiment: str
    scenario: str
    part: int
    seq_lo: int
    seq_hi: int
    token_lo: int = -1  # fixed tokens [token_lo, token_hi) of per-token experiments; -1 otherwise
    token_hi: int = -1

    @property
    def key(self) -> str:
        return f"shards/{self.experiment}/part-{self.part:06d}.parquet"

    @property
    def n_sequences(self) -> int:
        return max(1, self.token_hi - self.token_lo) * (self.seq_hi - self.seq_lo)

    def n_rows(self, n_neighbors: int) -> int:
        return self.n_sequences * len(experiments.get(self.experiment).target_names(n_neighbors))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ShardSummary:
    key: str
    rows: int
    sequences: int
    compute_s: float  # generating and scoring
    write_s: float  # encoding and storing
    partials: bytes = b""  # the shard's Accumulator (workers/accumulator.py), as in its footer
    nonfinite: int = 0  # strengths that are not finite (the run fails on any)
    nonfinite_example: dict | None = None  # the first: experiment, scenario, target, fixed token, sequence
