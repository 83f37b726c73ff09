"""``compare``: runs joined per token and correlated against the first; incomparable runs refused."""

import json

import pandas as pd
import pytest

from jobs import cli, compare
from jobs.aggregate import Aggregates, Summary
from jobs.config import RunConfig
from storage import open_store
from tests.helpers import copy_run


def test_two_seeds_of_toy_2l_agree_and_a_random_model_does_not(toy_runs, tmp_path):
    out = tmp_path / "cmp"
    assert cli.main(["compare", toy_runs["seed0"], toy_runs["seed1"], toy_runs["random"], "--out", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    corr = {(c["run"], c["power"]): c["pearson"] for c in summary["correlations"]}
    assert summary["joined_on"] == "token" and summary["tokens"] == 64
    assert corr[1, "A"] > 0.8 and corr[1, "B"] > 0.8  # another seed: the same per-token powers, within noise
    assert abs(corr[2, "A"]) < 0.4 and abs(corr[2, "B"]) < 0.4  # random weights: no induction to share
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert len(tokens) == 64 and (tokens.b_diff_1 == tokens.b_power_1 - tokens.b_power_0).all()
    assert tokens.b_power_2.mean() < 1 < 10 < tokens.b_power_0.mean()
    differing = {d["field"] for d in summary["config_differences"]}
    assert {"seed", "model"} <= differing and "seqs" not in differing
    page = (out / "compare.html").read_text()
    assert page.count("<img") == 1 + 2 and "tokens.parquet" in page and "Config fields that differ" in page


def test_compare_reads_and_writes_s3(toy_runs, bucket):
    local, remote = open_store(toy_runs["seed1"]), open_store(f"s3://{bucket}/runs/seed1")
    for key in local.list():
        if not key.startswith("shards/"):
            remote.put(key, local.get(key))
    summary = compare.compare([toy_runs["seed0"], remote.uri], f"s3://{bucket}/cmp")
    got = open_store(f"s3://{bucket}/cmp")
    assert {"compare.html", "compare.json", "tokens.parquet"} <= set(got.list())
    assert json.loads(got.get("compare.json"))["correlations"] == summary["correlations"]


def test_runs_of_other_experiments_are_refused_in_one_line(toy_runs, tmp_path, capsys):
    other = copy_run(toy_runs["seed1"], str(tmp_path / "other"),
                     lambda found: {**found, "config": {**found["config"], "experiments": ["token-powers"]}})
    found = json.loads(other.get("manifest.json"))
    assert cli.main(["compare", toy_runs["seed0"], str(tmp_path / "other"), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "written by another version" in err  # its config hash no longer matches
    found["config_hash"] = RunConfig.from_science(found["config"], "x").config_hash
    other.put("manifest.json", json.dumps(found).encode())
    assert cli.main(["compare", toy_runs["seed0"], str(tmp_path / "other"), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "same experiments" in err
    assert not (tmp_path / "cmp").exists()


def side(vocab: list[str], tokens: list[int], b_power: list[float]) -> compare.Side:
    table = pd.DataFrame({"token": tokens, "token_str": [vocab[t] for t in tokens], "a_power": b_power, "a_sem": 0.1,
                          "a_n": 4, "b_power": b_power, "b_sem": 0.1, "b_n": 4})
    return compare.Side("mem://", {"config": {"model": "m", "seed": 0}}, Aggregates(Summary("h", "m", 0), table), vocab)


def test_runs_of_other_tokenizers_join_on_token_strings():
    first = side(["<s>", "a", "b", "c", "d", "e"], [1, 2, 3, 4, 5], [1.0, 2.0, 3.0, 4.0, 5.0])
    other = side(["<s>", "e", "d", "c", "x", "a"], [1, 2, 3, 4, 5], [50.0, 40.0, 30.0, 0.0, 10.0])
    joined, key = compare.join([first, other])
    assert key == "token_str"
    assert dict(zip(joined.token_str, joined.b_power_1)) == {"a": 10.0, "c": 30.0, "d": 40.0, "e": 50.0}
    assert dict(zip(joined.token_str, joined.b_power_0)) == {"a": 1.0, "c": 3.0, "d": 4.0, "e": 5.0}
    same, key = compare.join([first, side(first.vocab, [3, 4, 5], [0.0, 0.0, 0.0])])
    assert key == "token" and list(same.token) == [3, 4, 5]


def test_fewer_than_two_runs_is_bad_input(toy_runs, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare", "--out", str(tmp_path / "cmp")])
    assert exit_.value.code == 2
    assert cli.main(["compare", toy_runs["seed0"], "--out", str(tmp_path / "cmp")]) == 2
