"""``induction-sweep plan``: what a run will do and roughly how long it takes, before anything is written.

Shards, sequences, forwards and rows are exact (they come from the planner's arithmetic, without
planning every shard). Bytes and time are estimates: bytes from the rows' measured compressed
size, time from a ``bench --json`` rate (jobs/rates.json, or ``--rates FILE`` from the machine at
hand) scaled from the benched shape to the model by arithmetic per forward, over the actors the
run will ask for (what the cluster holds or its autoscaler can reach). Imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jobs.config import RunConfig, count_shards
from jobs.errors import ConfigError
from jobs.pool import ActorPlan
from workers.layout import SEQ_LEN
from workers.model import source

RATES = Path(__file__).with_name("rates.json")  # the measured rates plan uses by default
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


def estimate(cfg: RunConfig, info: source.ModelInfo, plan: ActorPlan, precision: str,
             rates: dict | None = None) -> Estimate:
    """``rates``: (device, precision) -> (forwards/s, the shape measured), default jobs/rates.json."""
    sequences = rows = 0
    for experiment in cfg.experiment_specs:
        n = len(experiment.scenarios) * (cfg.tokens * cfg.seqs if experiment.per_token else cfg.pairs)
        sequences += n
        rows += n * len(experiment.target_names(cfg.neighbors))
    per_row = BYTES_PER_ROW["base"] + (cfg.save_tokens and BYTES_PER_ROW["save_tokens"]) + (cfg.heads and BYTES_PER_ROW["heads"])
    rates = rates or read_rates(RATES)
    if (plan.device, precision) not in rates:
        raise ConfigError(f"no measured rate for {precision} on {plan.device} actors (rates for "
                          f"{', '.join(f'{p} on {d}' for d, p in sorted(rates))})")
    rate, measured = rates[(plan.device, precision)]
    c = info.cfg
    shape = dict(n_layers=c.n_layers, d_model=c.d_model, d_vocab=c.d_vocab, d_mlp=0 if c.attn_only else c.d_mlp)
    rate *= flops_per_forward(**measured) / flops_per_forward(**shape)
    forwards = 2 * sequences
    return Estimate(count_shards(cfg), sequences, forwards, rows, rows * per_row, plan.count, plan.device, precision,
                    rate, forwards / (rate * plan.count))


def read_rates(path: str | Path) -> dict:
    """(device, precision) -> (forwards/s, shape) of a ``bench --json`` output (its last line) or of
    jobs/rates.json: the fastest where a file holds several."""
    try:
        text = Path(path).read_text().strip()
        try:
            report = json.loads(text)  # jobs/rates.json
        except ValueError:
            report = json.loads(text.splitlines()[-1])  # bench's log: the JSON is its last line
        out = {}
        for r in report["rates"]:
            key = (str(r["device"]), str(r["precision"]))
            shape = {k: int(r["shape"][k]) for k in ("n_layers", "d_model", "d_vocab", "d_mlp")}
            if key not in out or float(r["forwards_per_s"]) > out[key][0]:
                out[key] = (float(r["forwards_per_s"]), shape)
    except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        raise ConfigError(f"--rates {path}: not a `bench --json` output ({type(exc).__name__})") from None
    if not out:
        raise ConfigError(f"--rates {path}: no rate within its accuracy bound")
    return out
