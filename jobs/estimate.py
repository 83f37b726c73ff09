"""``induction-sweep plan``: what a run will do and roughly how long it takes, before anything is written.

Shards, sequences, forwards and rows are exact (they come from the planner's arithmetic, without
planning every shard). Bytes and time are estimates: bytes from the rows' measured compressed
size, time from the bench's measured rates (docs/PERFORMANCE.md) for the attn-only-2l shape,
scaled to the model by arithmetic per forward, over the actors the run will ask for (what the
cluster holds or its autoscaler can reach). A ``bench --json`` output of the machine at hand
(``--rates FILE``) replaces the built-in rates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from jobs.bench import BOUNDS
from jobs.config import RunConfig, count_shards
from jobs.errors import ConfigError
from jobs.pool import ActorPlan
from workers import models
from workers.scoring import runs_default
from workers.sequences import SEQ_LEN

# forwards per second of one actor, attn-only-2l shape (d_model 512, d_vocab 48262), default path:
# an H200 (2026-11-27) and this project's 2-core CPU machines (2026-11-26), docs/PERFORMANCE.md
MEASURED_RATES = {("cuda", "bf16"): 2.65e6, ("cuda", "tf32"): 1.92e6, ("cuda", "fp32"): 5.37e5,
                  ("cpu", "fp32"): 843.0, ("cpu", "bf16"): 1005.0}
REFERENCE_SHAPE = dict(n_layers=2, d_model=512, d_vocab=48262, d_mlp=0)
REFERENCE_MODELS = ("attn-only-2l", "random-2l-v48262")  # what `bench` reports for that shape (the second: before --shape)
# compressed Parquet bytes per row, and what --save-tokens and --heads add (toy-2l, 4 heads,
# --experiment all --tokens 200 --seqs 32 --pairs 512: 27, 57 and 105 bytes; 2026-11-27)
BYTES_PER_ROW = {"base": 27.0, "save_tokens": 30.0, "heads": 78.0}


def flops_per_forward(n_layers: int, d_model: int, d_vocab: int, d_mlp: int) -> float:
    """Matrix arithmetic of one scored forward: every layer at SEQ_LEN positions, one position unembedded."""
    return 2 * (d_model + 1) * d_vocab + n_layers * SEQ_LEN * 2 * (4 * d_model**2 + 2 * d_model * d_mlp)


@dataclass
class Estimate:
    shards: int
    sequences: int  # sequence pairs (induction + shuffled)
    forwards: int
    rows: int
    bytes: float
    actors: int
    device: str
    precision: str
    seq_per_s_per_actor: float
    seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def text(self) -> str:
        hours, rest = divmod(int(self.seconds), 3600)
        return "\n".join([
            f"shards     {self.shards:,}",
            f"sequences  {self.sequences:,} pairs (induction + shuffled)",
            f"forwards   {self.forwards:,}",
            f"rows       {self.rows:,}",
            f"bytes      about {self.bytes / 1e9:,.2f} GB of Parquet",
            f"time       about {hours}h{rest // 60:02d}m{rest % 60:02d}s of scoring on {self.actors} {self.device} actor(s) "
            f"at {self.seq_per_s_per_actor:,.0f} forwards/s each ({self.precision}), plus start-up",
        ])


def estimate(cfg: RunConfig, info: models.ModelInfo, plan: ActorPlan, precision: str,
             rates: dict | None = None) -> Estimate:
    sequences = rows = 0
    for experiment in cfg.experiment_specs:
        n = len(experiment.scenarios) * (cfg.tokens * cfg.seqs if experiment.per_token else cfg.pairs)
        sequences += n
        rows += n * len(experiment.target_names(cfg.neighbors))
    per_row = BYTES_PER_ROW["base"] + (cfg.save_tokens and BYTES_PER_ROW["save_tokens"]) + (cfg.heads and BYTES_PER_ROW["heads"])
    rates = rates or MEASURED_RATES
    if (plan.device, precision) not in rates:
        raise ConfigError(f"no measured rate for {precision} on {plan.device} actors (rates for "
                          f"{', '.join(f'{p} on {d}' for d, p in sorted(rates))})")
    rate = rates[(plan.device, precision)]
    c = info.cfg
    d_mlp = 0 if getattr(c, "attn_only", False) else getattr(c, "d_mlp", None) or 4 * c.d_model
    shape = dict(n_layers=c.n_layers, d_model=c.d_model, d_vocab=c.d_vocab, d_mlp=d_mlp)
    rate *= flops_per_forward(**REFERENCE_SHAPE) / flops_per_forward(**shape)
    forwards = 2 * sequences
    return Estimate(count_shards(cfg), sequences, forwards, rows, rows * per_row, plan.count, plan.device, precision,
                    rate, forwards / (rate * plan.count))


def rates_from_bench(path: str) -> dict:
    """(device type, precision) -> forwards/s of the default variant in a ``bench --json`` output of the
    attn-only-2l shape (the bench's default model; the rates are scaled from that shape)."""
    try:
        with open(path) as f:
            report = json.loads(f.read().strip().splitlines()[-1])
        device = "cpu" if report["device"] == "cpu" else "cuda"
        results, model = report["results"], report["model"]
    except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        raise ConfigError(f"--rates {path}: not a `bench --json` output ({type(exc).__name__})") from None
    if model not in REFERENCE_MODELS:
        raise ConfigError(f"--rates {path}: a bench of {model}; the estimate scales from the attn-only-2l shape "
                          "(`bench` without --model)")
    out = {}
    for r in results:  # the variant the scorer runs by default, where it is within its accuracy bound
        if r["max_abs_err_strength"] <= BOUNDS[r["precision"]] and runs_default(r, torch.device(device)):
            out[(device, r["precision"])] = max(out.get((device, r["precision"]), 0.0), r["seq_per_s"])
    return out
