"""The seed post's three experiments (DESIGN §1): what each fixes, and which targets it scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from workers.sequences import SequenceBatch

EXPERIMENTS = ("token-powers", "fixed-pair", "neighbors")  # the seed post's
CONTROLS = ("no-b", "b-elsewhere", "no-first-a")  # mechanism controls (workers/sequences.py apply_control)
FIXED_PAIR_NEIGHBORS = 3  # the post's fixed-pair study scores N1..N3


@dataclass(frozen=True)
class Scenario:
    experiment: str
    name: str
    code: int  # part of every sequence key
    fix_a: bool
    fix_b: bool


# token-powers: the fixed token plays A ("A power") or B ("B power")
TOKEN_POWER_ROLES = (
    Scenario("token-powers", "A", 0, True, False),
    Scenario("token-powers", "B", 1, False, True),
)
FIXED_PAIR_SCENARIOS = (
    Scenario("fixed-pair", "A+B", 0, True, True),
    Scenario("fixed-pair", "A only", 1, True, False),
    Scenario("fixed-pair", "B only", 2, False, True),
    Scenario("fixed-pair", "none", 3, False, False),
)
NEIGHBORS_SCENARIO = Scenario("neighbors", "free", 0, False, False)
CONTROL_SCENARIOS = tuple(Scenario(c, "free", 0, False, False) for c in CONTROLS)
SCENARIOS = {s.experiment + "/" + s.name: s
             for s in TOKEN_POWER_ROLES + FIXED_PAIR_SCENARIOS + (NEIGHBORS_SCENARIO,) + CONTROL_SCENARIOS}


def scenarios(experiment: str) -> tuple[Scenario, ...]:
    return tuple(s for s in SCENARIOS.values() if s.experiment == experiment)


def target_names(experiment: str, n_neighbors: int) -> list[str]:
    if experiment == "token-powers":
        return ["B"]
    if experiment == "fixed-pair" or experiment in CONTROLS:
        return ["B", "A"] + [f"N{k}" for k in range(1, min(FIXED_PAIR_NEIGHBORS, n_neighbors) + 1)] + ["R"]
    return ["B"] + [f"N{k}" for k in range(1, n_neighbors + 1)] + ["R"]


def neighbor_rank(name: str) -> int:
    """k of a target name: 0 for B, k for Nk, -1 for A and R."""
    return 0 if name == "B" else int(name[1:]) if name.startswith("N") else -1


def target_tokens(names: list[str], batch: SequenceBatch, neighbors: Int[Tensor, "vocab k"] | None) -> Int[Tensor, "batch n_targets"]:
    columns = []
    for name in names:
        if name == "B":
            columns.append(batch.b)
        elif name == "A":
            columns.append(batch.a)
        elif name == "R":
            columns.append(batch.r)
        else:
            columns.append(neighbors[batch.b, neighbor_rank(name) - 1])
    return torch.stack(columns, dim=1)
