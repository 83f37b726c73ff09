"""A run's configuration: resolved once against the model, validated before any work, hashed,
and cut into shards (docs/DESIGN.md §3).

``RunConfig``'s field defaults are the run's defaults (the command line shows them); fields with
``compare=False`` are execution settings, the others define the science and enter the hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from jobs.errors import ConfigError
from jobs.inputs import integer, number, shown_value
from workers import experiments
from workers.layout import FIRST_TOKEN
from workers.model import source
from workers.scoring import variant
from workers.work import ShardSpec, WorkParams

SCHEMA_VERSION = 3  # bump when a change alters what shards hold (3: histograms per declared target, 2-D histogram as induction × shuffled)
DEFAULT_TOKENS = 10000  # the post's "first 10000 tokens"
MAX_SEQUENCE_INDEX = 2**31 - 1  # the rows' seq column is int32
MAX_SHARDS = 1_000_000  # a plan beyond this is a mistake (or needs a larger --shard-size)
PRECISIONS = ("auto", *variant.PRECISIONS)
MAX_ACTORS = 10_000
MAX_SHARD_SIZE = 1 << 24  # sequences in one shard file (an actor holds a shard's rows in memory)
MAX_BATCH_SIZE = 1 << 20  # sequences per forward: beyond any device's memory for the last position's logits
MAX_GPUS_PER_ACTOR = 1024.0
# the bounds of the numeric options, for the command line and a manifest's config alike
INT_BOUNDS = {"tokens": (1, None), "seqs": (1, MAX_SEQUENCE_INDEX), "pairs": (1, MAX_SEQUENCE_INDEX),
              "neighbors": (1, None), "seed": (0, 2**64 - 1),  # the sequence keys take the seed mod 2**64
              "shard_size": (1, MAX_SHARD_SIZE), "batch_size": (1, MAX_BATCH_SIZE), "actors": (1, MAX_ACTORS)}


@dataclass(frozen=True)
class RunConfig:
    model: str
    out: str = field(compare=False)
    experiments: tuple[str, ...] = experiments.group("all")
    tokens: int = DEFAULT_TOKENS  # fixed tokens are ids FIRST_TOKEN .. FIRST_TOKEN+tokens-1
    seqs: int = 256  # sequences per fixed token and scenario
    pairs: int = 4096  # sequences per scenario of the other experiments
    neighbors: int = 20
    seed: int = 0
    precision: str = "auto"  # resolved against the cluster's devices by the driver
    save_tokens: bool = False
    pair: tuple[int, int] = source.FALLBACK_PAIR
    bos: int = source.DEFAULT_BOS
    shard_size: int = 65536  # sequences per shard
    heads: bool = False  # per-head measurements in every row
    processing: str = "exact"  # how the weights are loaded (workers/model/ processing_steps)
    # execution only: not part of the config hash
    batch_size: int | None = field(default=None, compare=False)
    actors: int | None = field(default=None, compare=False)  # None: auto
    gpus_per_actor: float | None = field(default=None, compare=False)
    resources_per_actor: tuple[tuple[str, float], ...] = field(default=(), compare=False)  # Ray custom resources
    address: str | None = field(default=None, compare=False)
    overwrite: bool = field(default=False, compare=False)

    def science(self) -> dict:
        d = asdict(self)
        return {f.name: (list(d[f.name]) if isinstance(d[f.name], tuple) else d[f.name])
                for f in fields(self) if f.compare}

    def hashed(self) -> dict:
        """The science fields that change what the run's experiments compute: --tokens and --seqs only
        with a per-token experiment, --pairs only with another one, --neighbors only where neighbours
        are scored, the pair only where an experiment fixes it."""
        specs = self.experiment_specs
        unused = set()
        if not any(e.per_token for e in specs):
            unused |= {"tokens", "seqs"}
        if all(e.per_token for e in specs):
            unused.add("pairs")
        if not self.n_neighbors:
            unused.add("neighbors")
        if not self.fixes_pair:
            unused.add("pair")
        return {k: v for k, v in self.science().items() if k not in unused}

    @property
    def config_hash(self) -> str:
        blob = json.dumps({"schema": SCHEMA_VERSION, **self.hashed()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def hashes(self) -> tuple[str, str]:
        """``config_hash``, and the hash of every science field, which runs stored before the hash left
        out unused fields carry: both name this config's shards."""
        blob = json.dumps({"schema": SCHEMA_VERSION, **self.science()}, sort_keys=True)
        return self.config_hash, hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def fixes_pair(self) -> bool:
        """Whether an experiment of the run puts the run's pair (A, B) in its sequences."""
        return any(not e.per_token and any(s.fix_a or s.fix_b for s in e.scenarios) for e in self.experiment_specs)

    @property
    def experiment_specs(self) -> list[experiments.Experiment]:
        return [experiments.get(e) for e in self.experiments]

    @property
    def n_neighbors(self) -> int:
        """K where an experiment of the run scores neighbours, else 0 (no neighbour table is built)."""
        return self.neighbors if any(e.uses_neighbors(self.neighbors) for e in self.experiment_specs) else 0

    @property
    def work_params(self) -> WorkParams:
        return WorkParams(self.model, self.seed, self.n_neighbors, self.pair, self.bos, self.save_tokens,
                          self.precision, self.heads, self.processing, tuple(self.experiment_specs))

    @classmethod
    def from_science(cls, science: dict, out: str, **execution) -> RunConfig:
        s = {k: v for k, v in science.items() if k in {f.name for f in fields(cls)}}
        s["experiments"], s["pair"] = tuple(s["experiments"]), tuple(s["pair"])
        return cls(out=out, **s, **execution)


DEFAULTS = {f.name: f.default for f in fields(RunConfig) if f.default is not MISSING}


def parse_experiments(text: str) -> tuple[str, ...]:
    """``all`` (the post's three), ``controls`` (the mechanism controls), or a comma-separated list."""
    groups = {g: experiments.group(g) for g in ("all", "controls")}
    chosen: list[str] = []
    for name in text.split(","):
        name = name.strip()
        if name not in experiments.REGISTRY and name not in groups:
            raise ConfigError(f"unknown experiment {name!r}: choose from {', '.join(experiments.REGISTRY)}, all or controls")
        chosen += [e for e in groups.get(name, (name,)) if e not in chosen]
    return tuple(chosen)


def parse_resources(text: str | None) -> tuple[tuple[str, float], ...]:
    """``--resources-per-actor '{"node_type_gpu": 1}'``: Ray custom resources, as Ray's APIs take them."""
    if not text:
        return ()
    def finite(constant: str):
        raise ValueError(constant)  # NaN and Infinity, which Python's json reads

    try:
        given = json.loads(text, parse_constant=finite)
    except ValueError:
        given = None
    if not isinstance(given, dict) or not given or not all(
            isinstance(k, str) and k and isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1e9
            and (v <= 1 or float(v).is_integer()) for k, v in given.items()):
        raise ConfigError("--resources-per-actor must be a JSON object of resource names to finite positive amounts "
                          f"(fractions up to 1, whole numbers beyond, as Ray takes them), not {shown_value(text)}")
    reserved = {"CPU", "GPU", "memory", "object_store_memory"} & set(given)
    if reserved:
        raise ConfigError(f"--resources-per-actor takes custom resources; use --gpus-per-actor for {', '.join(sorted(reserved))}")
    return tuple(sorted((k, float(v)) for k, v in given.items()))


def parse_int(name: str, value: object, word: str | None = None) -> int | None:
    """An integer option (``name`` as in RunConfig) within INT_BOUNDS; None for ``word`` (``all``, ``auto``) or no value."""
    if value is None:
        return None
    return integer(f"--{name.replace('_', '-')}", value, *INT_BOUNDS[name], word=word)


def parse_gpus(value: object) -> float | None:
    """``--gpus-per-actor``: a finite number of GPUs, fractions up to 1, whole numbers beyond (Ray's rule)."""
    if value is None:
        return None
    gpus = number("--gpus-per-actor", value, 0.0, MAX_GPUS_PER_ACTOR)
    if gpus > 1 and not gpus.is_integer():
        raise ConfigError(f"--gpus-per-actor above 1 must be a whole number (Ray's rule), not {gpus:g}")
    return gpus


def check_counts(cfg: RunConfig) -> None:
    """Checks that need no model."""
    for name in INT_BOUNDS:
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, bool):
            parse_int(name, value)
    parse_gpus(cfg.gpus_per_actor)
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {cfg.precision!r}: choose {', '.join(PRECISIONS)}")
    if cfg.processing not in source.PROCESSING:
        raise ConfigError(f"unknown processing {cfg.processing!r}: choose {' or '.join(source.PROCESSING)}")


def resolve(cfg: RunConfig, info: source.ModelInfo, tokens: str | None = None, pair_a: str | None = None,
            pair_b: str | None = None, bos: str | None = None) -> RunConfig:
    """The full config: token count, pair ids and BOS from the model; ConfigError where they do not fit.
    ``tokens``: a count, ``all``, or None for the post's 10000 (or all, where the vocabulary is smaller).
    ``bos``: an id, ``tokenizer`` (the tokenizer's BOS), or None for the model's default (source.default_bos)."""
    check_counts(cfg)
    available = info.d_vocab - FIRST_TOKEN
    count = parse_int("tokens", tokens, "all")
    n = available if tokens == "all" else min(DEFAULT_TOKENS, available) if count is None else count
    if n > available:
        raise ConfigError(f"--tokens {n} is beyond the vocabulary: {cfg.model} has d_vocab {info.d_vocab}, "
                          f"so at most {available} tokens (ids {FIRST_TOKEN}..{info.d_vocab - 1}); use --tokens all")
    if cfg.n_neighbors > available - 1:
        raise ConfigError(f"--neighbors {cfg.neighbors} is more than {cfg.model} has: its ids {FIRST_TOKEN}..{info.d_vocab - 1} "
                          f"leave B at most {max(available - 1, 0)} candidate neighbours")
    if cfg.heads and not info.attn_only_compact:
        raise ConfigError(f"--heads needs an attention-only model the compact forward scores (LayerNorm, LNPre or none, "
                          f"standard or shortformer positions); {cfg.model} is not one")
    shards = count_shards(replace(cfg, tokens=n))
    if shards > MAX_SHARDS:
        raise ConfigError(f"this run would plan {shards:,} shards (at most {MAX_SHARDS:,}): raise --shard-size")
    default_a, default_b = info.default_pair()
    try:
        a = info.resolve_token(pair_a, "--pair-a") if pair_a is not None else default_a
        b = info.resolve_token(pair_b, "--pair-b") if pair_b is not None else default_b
    except source.ModelInputError as exc:
        raise ConfigError(str(exc)) from None
    outside = [t for t in (a, b) if not FIRST_TOKEN <= t < info.d_vocab]
    if cfg.fixes_pair and outside:  # only the fallback ids can be: given ones are checked above
        raise ConfigError(f"the default pair ids {a} and {b} do not fit {cfg.model}'s vocabulary "
                          f"(ids {FIRST_TOKEN}..{info.d_vocab - 1}): give --pair-a and --pair-b")
    return replace(cfg, tokens=n, pair=(a, b), bos=resolve_bos(info, bos))


def resolve_bos(info: source.ModelInfo, bos: str | None) -> int:
    if bos is None:
        return info.bos
    if bos == "tokenizer":
        if info.tokenizer is None or info.tokenizer.bos_token_id is None:
            raise ConfigError(f"--bos tokenizer: {info.name} has no tokenizer with a BOS token; give an id")
        return int(info.tokenizer.bos_token_id)
    return integer("--bos", bos, 0, info.d_vocab - 1, word="tokenizer")


def per_token_shard(cfg: RunConfig) -> tuple[int, int]:
    """A per-token experiment's shard: how many whole tokens it holds, and how many of one token's
    sequences at most (a shard smaller than --seqs splits each token's sequences instead)."""
    return max(1, cfg.shard_size // cfg.seqs), min(cfg.seqs, cfg.shard_size)


def count_shards(cfg: RunConfig) -> int:
    """len(plan_shards(cfg)), without planning them."""
    total = 0
    for experiment in cfg.experiment_specs:
        if experiment.per_token:
            tokens_per_shard, seqs_per_shard = per_token_shard(cfg)
            total += len(experiment.scenarios) * -(-cfg.tokens // tokens_per_shard) * -(-cfg.seqs // seqs_per_shard)
        else:
            total += len(experiment.scenarios) * -(-cfg.pairs // cfg.shard_size)
    return total


def plan_shards(cfg: RunConfig) -> list[ShardSpec]:
    """Every shard of the run, in a deterministic order with deterministic names."""
    specs: list[ShardSpec] = []
    for experiment in cfg.experiment_specs:
        part = 0
        for scenario in experiment.scenarios:
            if experiment.per_token:  # a shard holds whole fixed tokens, or part of one token's sequences
                tokens_per_shard, seqs_per_shard = per_token_shard(cfg)
                for lo in range(FIRST_TOKEN, FIRST_TOKEN + cfg.tokens, tokens_per_shard):
                    hi = min(lo + tokens_per_shard, FIRST_TOKEN + cfg.tokens)
                    for s in range(0, cfg.seqs, seqs_per_shard):
                        specs.append(ShardSpec(experiment.name, scenario.name, part, s, min(s + seqs_per_shard, cfg.seqs), lo, hi))
                        part += 1
            else:
                for s in range(0, cfg.pairs, cfg.shard_size):
                    specs.append(ShardSpec(experiment.name, scenario.name, part, s, min(s + cfg.shard_size, cfg.pairs)))
                    part += 1
    return specs


def possible_hashes(cfg: RunConfig) -> set[str]:
    """The config hashes a run of ``cfg`` can have: ``--precision auto`` is resolved only where the
    cluster's devices are known (GPU or CPU)."""
    return {replace(cfg, precision=variant.resolve_precision(cfg.precision, device)).config_hash for device in ("cuda", "cpu")}
