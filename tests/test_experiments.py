"""The experiment registry: one declaration (plus its sequence rule) is a whole new experiment,
planned, scored on Ray actors, aggregated and reported with no other edit."""

import sys

import pytest
import torch
from jaxtyping import Int
from torch import Tensor

from jobs import driver, results
from jobs.config import RunConfig, parse_experiments, plan_shards
from storage import open_store
from tests.helpers import resolved
from workers import experiments
from workers.experiments import CONTROL, FREE, Experiment, pair_targets
from workers.sequences import A_POS, B_POS


def b_as_a(tokens: Int[Tensor, "batch pos"], keys: Int[Tensor, " batch"], d_vocab: int) -> Int[Tensor, "batch pos"]:
    """The first B replaced by A: the sequence holds A, A, ..., A."""
    out = tokens.clone()
    out[:, B_POS] = tokens[:, A_POS]
    return out


B_AS_A = Experiment("b-as-a", 90, FREE, pair_targets, CONTROL, rule=b_as_a)


@pytest.fixture
def declared():
    """Registered here; Ray ships the declaration to the actors by value (pytest's module name for this
    file is not importable there, as a user's module inside a Ray Job's working_dir would be)."""
    from ray import cloudpickle

    experiments.register(B_AS_A)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield B_AS_A
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    experiments.REGISTRY.pop(B_AS_A.name)


def test_the_post_experiments_and_controls_are_declared_once():
    assert experiments.group("all") == ("token-powers", "fixed-pair", "neighbors")
    assert experiments.group("controls") == ("no-b", "b-elsewhere", "no-first-a")
    codes = [e.code for e in experiments.REGISTRY.values()]
    assert len(set(codes)) == len(codes)  # a code names an experiment's sequences
    with pytest.raises(ValueError, match="already 'neighbors'"):
        experiments.register(Experiment("other", experiments.get("neighbors").code, FREE, pair_targets, CONTROL))
    assert experiments.get("token-powers").key == ("scenario", "target", "token")
    with pytest.raises(ValueError, match="already shows 'neighbors'"):
        experiments.register(Experiment("more-neighbors", 91, FREE, pair_targets, experiments.NEIGHBORS))
    with pytest.raises(ValueError, match="does not score"):
        experiments.register(Experiment("a-only", 92, FREE, lambda k: ("A",), CONTROL, logodds=True))
    assert "more-neighbors" not in experiments.REGISTRY and "a-only" not in experiments.REGISTRY
    assert experiments.get("fixed-pair").target_names(20) == ("B", "A", "N1", "N2", "N3", "R")
    assert experiments.get("neighbors").target_names(2) == ("B", "N1", "N2", "R")


def test_a_newly_declared_experiment_runs_end_to_end(declared, ray_cluster, tmp_path):
    assert parse_experiments("neighbors,b-as-a") == ("neighbors", "b-as-a")
    out = str(tmp_path / "run")
    cfg = resolved(RunConfig(model="toy-2l", out=out, experiments=("neighbors", "b-as-a"), pairs=96, neighbors=3,
                             shard_size=64, actors=2, batch_size=32))
    assert [s.key for s in plan_shards(cfg) if s.experiment == "b-as-a"] == [
        "shards/b-as-a/part-000000.parquet", "shards/b-as-a/part-000001.parquet"]
    summary = driver.run(cfg, progress=False)

    run = results.open_run(out)
    rows = run.shards("b-as-a").to_table().to_pandas()
    assert len(rows) == 96 * 6 and set(rows.target) == {"B", "A", "N1", "N2", "N3", "R"}
    controls = run.aggregates.controls  # the CONTROL view's table, with no edit to aggregation
    assert list(controls.experiment.unique()) == ["b-as-a"] and (controls.n == 96).all()
    # B is gone from the context (it is A now): no induction on B, unlike plain induction
    assert summary.controls["b-as-a"]["B"] < 1 < summary.neighbors["B"]
    report = open_store(out).get("report.html").decode()
    assert "b-as-a" in report and "The first B replaced by A" in report
    assert "plots/controls.png" in open_store(out).list("plots/")


def test_the_rule_of_a_new_experiment_changes_its_sequences_only(declared):
    from workers.sequences import make_batch, sequence_keys

    seq = torch.arange(50)
    none = torch.full_like(seq, -1)
    keys = sequence_keys(0, declared.code, 0, none, seq)
    altered, plain = make_batch(keys, 500, 1, none, none, declared.rule), make_batch(keys, 500, 1, none, none)
    assert (altered.tokens[:, B_POS] == altered.a).all()
    keep = [p for p in range(altered.tokens.shape[1]) if p != B_POS]
    assert torch.equal(altered.tokens[:, keep], plain.tokens[:, keep])
