"""The experiment registry (docs/DESIGN.md §1 for the science, §3 for the registry): each experiment declared once.

An ``Experiment`` says what it fixes (its scenarios), which targets it scores, whether it sweeps
the fixed tokens (per token) or scores ``--pairs`` sequences per scenario, how its sequences
differ from plain induction (its sequence rule, for controls), and how the report shows it.
Planning (jobs/config.py), scoring (workers/shard.py), aggregation (workers/accumulator.py,
jobs/aggregate.py) and the report (jobs/report.py) read these declarations; none branches on
an experiment's name. The POWERS, PAIR and NEIGHBORS views show one experiment each; CONTROL
shows any number. Adding an experiment is one ``register(Experiment(...))`` plus, for a
control, its sequence rule: a function of workers/sequences.py's kind, or the name of one in
``sequences.RULES``. Torch-free: the driver plans and reports without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

FIXED_PAIR_NEIGHBORS = 3  # the post's fixed-pair study scores N1..N3
# how Nk are found (docs/DESIGN.md §1), recorded in the manifest of every run that scores them
NEIGHBORS_DEFINITION = ("the k tokens (ids >= 4, B excluded) of highest cosine similarity to B between columns of the "
                        "effective unembedding: W_U with the final LayerNorm's (or RMSNorm's) weight folded in, as the "
                        "model reads its normalised residual stream (W_U as stored where there is no final weight), "
                        "centred across the vocabulary; computed from the stored weights whatever the loader or processing")

# How the report shows an experiment (jobs/report.py has one renderer per view).
POWERS, PAIR, NEIGHBORS, CONTROL = "powers", "pair", "neighbors", "control"


@dataclass(frozen=True)
class Scenario:
    name: str
    code: int  # part of every sequence key
    fix_a: bool  # A is the fixed token (per-token experiments) or the run's pair A
    fix_b: bool


def b_only(k: int) -> tuple[str, ...]:
    return ("B",)


def pair_targets(k: int) -> tuple[str, ...]:
    """B, A, the first neighbours of B (at most three) and a random token."""
    return ("B", "A", *(f"N{i}" for i in range(1, min(FIXED_PAIR_NEIGHBORS, k) + 1)), "R")


def neighbor_targets(k: int) -> tuple[str, ...]:
    return ("B", *(f"N{i}" for i in range(1, k + 1)), "R")


@dataclass(frozen=True)
class Experiment:
    name: str
    code: int  # enters every sequence key: an experiment's sequences change if it changes
    scenarios: tuple[Scenario, ...]
    targets: Callable[[int], tuple[str, ...]]  # target names, given K neighbours
    view: str  # POWERS, PAIR, NEIGHBORS or CONTROL: the report's section
    per_token: bool = False  # each fixed token of the sweep gets --seqs sequences per scenario
    rule: str | Callable | None = None  # alters the induction sequence before it is shuffled (sequences.RULES)
    group: str = ""  # "all" (the post's three) or "controls": what --experiment GROUP selects
    # targets whose strength histogram is stored per scenario (STRENGTH_BINS in workers/accumulator.py;
    # targets the run does not score are skipped), and whether the 2-D log-odds histogram of B is
    logodds: bool = False
    histograms: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, ...]:
        """The aggregation key of its strength moments (workers/accumulator.py shard_partials)."""
        return ("scenario", "target", "token") if self.per_token else ("scenario", "target")

    def target_names(self, n_neighbors: int) -> tuple[str, ...]:
        return self.targets(n_neighbors)

    def histogram_targets(self, n_neighbors: int) -> tuple[str, ...]:
        """The declared histogram targets this run scores (N15 needs --neighbors 15 or more)."""
        names = self.target_names(n_neighbors)
        return tuple(t for t in self.histograms if t in names)

    def uses_neighbors(self, n_neighbors: int) -> bool:
        return any(t.startswith("N") for t in self.targets(n_neighbors))

    def scenario(self, name: str) -> Scenario:
        return next(s for s in self.scenarios if s.name == name)


FREE = (Scenario("free", 0, False, False),)
REGISTRY: dict[str, Experiment] = {}


SINGLE_VIEWS = (POWERS, PAIR, NEIGHBORS)  # one experiment each: their tables have no experiment column


def neighbor_rank(name: str) -> int:
    """k of a target name: 0 for B, k for Nk, -1 for A and R."""
    return 0 if name == "B" else int(name[1:]) if name.startswith("N") else -1


def register(experiment: Experiment) -> Experiment:
    others = [e for e in REGISTRY.values() if e.name != experiment.name]
    clash = [e.name for e in others if e.code == experiment.code]
    if clash:
        raise ValueError(f"experiment code {experiment.code} is already {clash[0]!r}'s")
    taken = [e.name for e in others if e.view == experiment.view and e.view in SINGLE_VIEWS]
    if taken:
        raise ValueError(f"the {experiment.view} view already shows {taken[0]!r}; declare a {CONTROL} experiment instead")
    scored = experiment.targets(max([1, *map(neighbor_rank, experiment.histograms)]))
    missing = [t for t in experiment.histograms + (("B",) if experiment.logodds else ()) if t not in scored]
    if missing:
        raise ValueError(f"{experiment.name}: histograms of {', '.join(missing)}, which it does not score")
    REGISTRY[experiment.name] = experiment
    return experiment


def get(name: str) -> Experiment:
    return REGISTRY[name]


def shown_by(view: str) -> Experiment:
    """The experiment that one of the SINGLE_VIEWS shows."""
    return next(e for e in REGISTRY.values() if e.view == view)


def group(name: str) -> tuple[str, ...]:
    return tuple(e.name for e in REGISTRY.values() if e.group == name)


register(Experiment(
    "token-powers", 1, (Scenario("A", 0, True, False), Scenario("B", 1, False, True)), b_only, POWERS,
    per_token=True, group="all"))
register(Experiment(
    "fixed-pair", 2, (Scenario("A+B", 0, True, True), Scenario("A only", 1, True, False),
                      Scenario("B only", 2, False, True), Scenario("none", 3, False, False)),
    pair_targets, PAIR, group="all", histograms=("B",), logodds=True))
# the post's five histograms of strength: B, its 1st, 5th and 15th neighbours, a random token
register(Experiment("neighbors", 3, FREE, neighbor_targets, NEIGHBORS, group="all", histograms=("B", "N1", "N5", "N15", "R")))
# mechanism controls: is it B's presence, or the A→B pair, that carries the prediction?
register(Experiment("no-b", 4, FREE, pair_targets, CONTROL, rule="no_b", group="controls"))
register(Experiment("b-elsewhere", 5, FREE, pair_targets, CONTROL, rule="b_elsewhere", group="controls"))
register(Experiment("no-first-a", 6, FREE, pair_targets, CONTROL, rule="no_first_a", group="controls"))


