"""Planning and the resolved config, on the CPU: every sequence of a run in exactly one shard, a hash
of the science alone, defaults in one place."""

from dataclasses import replace

import pytest

from jobs.config import DEFAULTS, RunConfig, count_shards, parse_experiments, plan_shards, resolve
from jobs.errors import ConfigError
from workers import experiments
from workers.model import source
from workers.sequences import FIRST_TOKEN

TOY = source.describe("toy-2l")


def cfg(**overrides) -> RunConfig:
    return resolve(RunConfig(model="toy-2l", out="/tmp/unused", **overrides), TOY)


@pytest.mark.parametrize("seqs, shard_size", [(4, 32), (8, 5), (256, 65536), (7, 7), (10, 3)])
def test_every_sequence_is_planned_exactly_once(seqs, shard_size):
    c = replace(cfg(seqs=seqs, pairs=50, shard_size=shard_size, experiments=("token-powers", "fixed-pair")), tokens=37)
    specs = plan_shards(c)
    seen = []
    for s in specs:
        assert s.n_sequences <= max(shard_size, 1) or s.seq_hi - s.seq_lo == min(seqs, shard_size)
        tokens = range(s.token_lo, s.token_hi) if s.token_lo >= 0 else [-1]
        seen += [(s.experiment, s.scenario, t, q) for t in tokens for q in range(s.seq_lo, s.seq_hi)]
    assert len(seen) == len(set(seen)) == 2 * 37 * seqs + 4 * 50
    assert {t for e, _, t, _ in seen if e == "token-powers"} == set(range(FIRST_TOKEN, FIRST_TOKEN + 37))
    assert len({s.key for s in specs}) == len(specs) and plan_shards(c) == specs  # deterministic names
    assert count_shards(c) == len(specs)


def test_runs_too_large_to_plan_are_refused_before_planning():
    with pytest.raises(ConfigError, match=r"--seqs must be an integer in 1\.\.2147483647"):
        cfg(seqs=3_000_000_000)
    with pytest.raises(ConfigError, match="raise --shard-size"):
        cfg(seqs=100_000, shard_size=1)


def test_the_hash_follows_the_science_only():
    base = cfg()
    assert base.config_hash == replace(base, out="s3://else/where", actors=3, batch_size=7, overwrite=True).config_hash
    for change in (dict(seed=1), dict(seqs=9), dict(pair=(5, 6)), dict(bos=0), dict(heads=True), dict(precision="bf16"),
                   dict(processing="tl-default")):
        assert replace(base, **change).config_hash != base.config_hash
    assert set(base.science()) == {"model", "experiments", "tokens", "seqs", "pairs", "neighbors", "seed", "precision",
                                   "save_tokens", "pair", "bos", "shard_size", "heads", "processing"}


def test_resolution_against_the_model():
    c = cfg()
    assert c.tokens == 2048 - FIRST_TOKEN  # the post's 10000, capped at the vocabulary
    assert c.pair == source.FALLBACK_PAIR and c.bos == 1
    assert resolve(RunConfig("toy-2l", "/x"), TOY, "12").tokens == 12
    with pytest.raises(ConfigError, match="d_vocab 2048"):
        resolve(RunConfig("toy-2l", "/x"), TOY, "5000")
    small = source.ModelInfo("small", type("Cfg", (), {"d_vocab": 1200})())  # the fallback B (1500) does not fit
    with pytest.raises(ConfigError, match="give --pair-a and --pair-b"):
        resolve(RunConfig("small", "/x"), small)
    assert resolve(RunConfig("small", "/x", experiments=("fixed-pair",)), small, None, "7", "8").pair == (7, 8)
    assert resolve(RunConfig("small", "/x", experiments=("neighbors",)), small).pair == source.FALLBACK_PAIR  # unused
    assert DEFAULTS["seqs"] == 256 and DEFAULTS["experiments"] == experiments.group("all")


def test_experiment_groups_and_neighbours():
    assert parse_experiments("all,no-b,all") == ("token-powers", "fixed-pair", "neighbors", "no-b")
    assert parse_experiments("controls") == experiments.group("controls")
    with pytest.raises(ConfigError, match="unknown experiment 'x'"):
        parse_experiments("x")
    assert cfg(experiments=("token-powers",)).n_neighbors == 0  # no neighbour table is built
    assert cfg(experiments=("fixed-pair",), neighbors=7).n_neighbors == 7


def test_bos_option():
    assert cfg().bos == 1
    assert resolve(RunConfig("toy-2l", "/x"), TOY, bos="0").bos == 0
    with pytest.raises(ConfigError, match="has no tokenizer with a BOS token"):
        resolve(RunConfig("toy-2l", "/x"), TOY, bos="tokenizer")
    with pytest.raises(ConfigError, match="--bos must be"):
        resolve(RunConfig("toy-2l", "/x"), TOY, bos="2048")
    with pytest.raises(ConfigError, match="unknown processing"):
        cfg(processing="none")
