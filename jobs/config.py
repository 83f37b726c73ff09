"""A run's configuration: validated against the model before any work, hashed, and cut into shards."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from jobs.errors import ConfigError
from workers import experiments, models
from workers.sequences import FIRST_TOKEN
from workers.shard import ShardSpec, WorkParams

SCHEMA_VERSION = 1  # bump when a change alters what shards hold
DEFAULT_TOKENS = 10000  # the post's "first 10000 tokens"


@dataclass(frozen=True)
class RunConfig:
    model: str
    out: str
    experiments: tuple[str, ...] = experiments.EXPERIMENTS
    tokens: Optional[int] = None  # fixed tokens are ids FIRST_TOKEN .. FIRST_TOKEN+tokens-1; None: all
    seqs: int = 256
    pairs: int = 4096
    neighbors: int = 20
    seed: int = 0
    precision: str = "auto"
    save_tokens: bool = False
    pair: tuple[int, int] = models.FALLBACK_PAIR
    shard_size: int = 65536  # sequences per shard
    heads: bool = False  # per-head measurements in every row
    # execution only: not part of the config hash
    batch_size: Optional[int] = field(default=None, compare=False)
    actors: Optional[int] = field(default=None, compare=False)  # None: auto
    gpus_per_actor: Optional[float] = field(default=None, compare=False)
    address: Optional[str] = field(default=None, compare=False)
    overwrite: bool = field(default=False, compare=False)

    SCIENCE = ("model", "experiments", "tokens", "seqs", "pairs", "neighbors", "seed", "precision",
               "save_tokens", "pair", "shard_size", "heads")

    def science(self) -> dict:
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in self.SCIENCE}

    @property
    def config_hash(self) -> str:
        blob = json.dumps({"schema": SCHEMA_VERSION, **self.science()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def work_params(self) -> WorkParams:
        return WorkParams(self.model, self.seed, self.neighbors if self.needs_neighbors else 0, self.pair,
                          self.save_tokens, self.precision, self.heads)

    @property
    def needs_neighbors(self) -> bool:
        return any(e != "token-powers" for e in self.experiments)

    @classmethod
    def from_science(cls, science: dict, **execution) -> "RunConfig":
        s = dict(science)
        s["experiments"], s["pair"] = tuple(s["experiments"]), tuple(s["pair"])
        return cls(**s, **execution)


def parse_experiments(text: str) -> tuple[str, ...]:
    """``all`` (the post's three), ``controls`` (the mechanism controls), or a comma-separated list."""
    known = experiments.EXPERIMENTS + experiments.CONTROLS
    groups = {"all": experiments.EXPERIMENTS, "controls": experiments.CONTROLS}
    chosen: list[str] = []
    for name in text.split(","):
        name = name.strip()
        if name not in known and name not in groups:
            raise ConfigError(f"unknown experiment {name!r}: choose from {', '.join(known)}, all or controls")
        chosen += [e for e in groups.get(name, (name,)) if e not in chosen]
    return tuple(chosen)


def check_options(experiment: str, tokens: str | None, seqs: int, pairs: int, neighbors: int,
                  batch_size: Optional[int], actors: Optional[str], gpus_per_actor: Optional[float],
                  shard_size: int, precision: str) -> None:
    """Checks that need no model."""
    parse_experiments(experiment)
    if tokens is not None and tokens != "all" and (not tokens.lstrip("-").isdigit() or int(tokens) <= 0):
        raise ConfigError(f"--tokens must be a positive integer or 'all', not {tokens!r}")
    for name, value in (("--seqs", seqs), ("--pairs", pairs), ("--shard-size", shard_size)):
        if value <= 0:
            raise ConfigError(f"{name} must be positive, not {value}")
    if neighbors < 1:
        raise ConfigError(f"--neighbors must be at least 1, not {neighbors}")
    if batch_size is not None and batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, not {batch_size}")
    if actors is not None and actors != "auto" and (not actors.isdigit() or int(actors) <= 0):
        raise ConfigError(f"--actors must be a positive integer or 'auto', not {actors!r}")
    if gpus_per_actor is not None and gpus_per_actor <= 0:
        raise ConfigError(f"--gpus-per-actor must be positive, not {gpus_per_actor}")
    if precision not in ("auto", "fp32", "tf32", "bf16"):
        raise ConfigError(f"unknown precision {precision!r}: choose auto, fp32, tf32 or bf16")


def resolve(cfg: RunConfig, model, tokens: str | None, pair_a: Optional[str], pair_b: Optional[str]) -> RunConfig:
    """Fill in what depends on the model (token count, pair ids); ConfigError where it does not fit."""
    vocab = models.d_vocab(model)
    available = vocab - FIRST_TOKEN
    if tokens == "all":
        n = available
    elif tokens is None:
        n = min(DEFAULT_TOKENS, available)
    else:
        n = int(tokens)
        if n > available:
            raise ConfigError(f"--tokens {n} is beyond the vocabulary: {cfg.model} has d_vocab {vocab}, "
                              f"so at most {available} tokens (ids {FIRST_TOKEN}..{vocab - 1}); use --tokens all")
    if cfg.neighbors > available - 1:
        raise ConfigError(f"--neighbors {cfg.neighbors} exceeds the {available - 1} candidate neighbours of {cfg.model}")
    if cfg.heads and models.attn_only_weights(model) is None:
        raise ConfigError(f"--heads needs an attention-only model; {cfg.model} is not one")
    default_a, default_b = models.default_pair(model)
    try:
        a = models.resolve_token(model, pair_a, "--pair-a") if pair_a is not None else default_a
        b = models.resolve_token(model, pair_b, "--pair-b") if pair_b is not None else default_b
    except models.ModelInputError as exc:
        raise ConfigError(str(exc)) from None
    return replace(cfg, tokens=n, pair=(a, b))


def plan_shards(cfg: RunConfig) -> list[ShardSpec]:
    """Every shard of the run, in a deterministic order with deterministic names."""
    specs: list[ShardSpec] = []
    for experiment in cfg.experiments:
        part = 0
        if experiment == "token-powers":
            tokens_per_shard = max(1, cfg.shard_size // cfg.seqs)
            seqs_per_shard = min(cfg.seqs, cfg.shard_size)
            for role in experiments.scenarios(experiment):
                for lo in range(FIRST_TOKEN, FIRST_TOKEN + cfg.tokens, tokens_per_shard):
                    hi = min(lo + tokens_per_shard, FIRST_TOKEN + cfg.tokens)
                    for s in range(0, cfg.seqs, seqs_per_shard):
                        specs.append(ShardSpec(experiment, role.name, part, s, min(s + seqs_per_shard, cfg.seqs), lo, hi))
                        part += 1
        else:
            for scenario in experiments.scenarios(experiment):
                for s in range(0, cfg.pairs, cfg.shard_size):
                    specs.append(ShardSpec(experiment, scenario.name, part, s, min(s + cfg.shard_size, cfg.pairs)))
                    part += 1
    return specs
