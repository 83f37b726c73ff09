"""``plan`` (jobs/estimate.py): its counts are the run's, checked against a real run; nothing is written."""

import json
import subprocess
import sys

import pyarrow.dataset as pads

from jobs import driver
from jobs.cli import main
from jobs.config import RunConfig, plan_shards
from jobs.estimate import RATES, flops_per_forward, read_rates
from tests.helpers import resolved

RUN = ["--model", "toy-2l", "--experiment", "all", "--tokens", "40", "--seqs", "8", "--pairs", "64", "--neighbors", "3",
       "--shard-size", "64", "--precision", "fp32"]


def test_plan_counts_what_the_run_then_does(ray_cluster, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["plan", *RUN, "--out", str(out), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not out.exists()  # nothing written
    cfg = resolved(RunConfig(model="toy-2l", out=str(out), experiments=("token-powers", "fixed-pair", "neighbors"), seqs=8,
                             pairs=64, neighbors=3, shard_size=64, precision="fp32"), "40")
    specs = plan_shards(cfg)
    assert plan["shards"] == len(specs) and plan["sequences"] == sum(s.n_sequences for s in specs)
    assert plan["forwards"] == 2 * plan["sequences"]
    driver.run(cfg, progress=False)
    rows = pads.dataset(str(out / "shards"), format="parquet").count_rows()
    assert plan["rows"] == rows
    assert plan["device"] == "cpu" and plan["actors"] >= 1 and plan["seconds"] > 0


def test_time_scales_with_the_arithmetic_of_the_model(capsys, tmp_path):
    """The attn-only-2l shape takes the measured rate as it is; a bigger model proportionally less."""
    assert flops_per_forward(2, 512, 48262, 0) < flops_per_forward(12, 768, 50257, 3072)
    assert main(["plan", *RUN, "--out", str(tmp_path / "o"), "--json"]) == 0
    toy = json.loads(capsys.readouterr().out)
    assert toy["seq_per_s_per_actor"] > read_rates(RATES)[("cpu", "fp32")][0]  # toy-2l is far smaller than the benched shape


def test_plan_refuses_bad_input_like_run(capsys, tmp_path):
    assert main(["plan", "--model", "toy-2l", "--out", str(tmp_path / "o"), "--seqs", "3000000000"]) == 2
    assert "--seqs must be an integer in 1..2147483647" in capsys.readouterr().err


def test_rates_from_a_bench_that_is_not_one_are_refused(capsys, tmp_path):
    (tmp_path / "log.txt").write_text("bench: toy-2l\nnot json\n")
    for path, match in ((tmp_path / "log.txt", "not a `bench --json` output"), (tmp_path / "none.json", "not a `bench")):
        assert main(["plan", *RUN, "--out", str(tmp_path / "o"), "--rates", str(path)]) == 2
        assert match in capsys.readouterr().err


def test_rates_from_a_bench_scale_by_the_shape_it_measured(capsys, tmp_path):
    """`bench --json` feeds `plan --rates`: the plan runs at the default variant's measured rate, scaled
    from the benched shape (here toy-2l itself, so unscaled) to the model's."""
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "bench", "--device", "cpu", "--seconds", "0.05", "--batches", "64",
                           "--precisions", "fp32", "--json"], capture_output=True, text=True, timeout=600, check=True)
    (tmp_path / "bench.log").write_text(done.stdout)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["model"] == "toy-2l" and [r["precision"] for r in report["rates"]] == ["fp32"]
    base = ["plan", "--model", "toy-2l", "--tokens", "40", "--precision", "fp32", "--out", str(tmp_path / "o"), "--json"]
    assert main([*base, "--rates", str(tmp_path / "bench.log")]) == 0
    assert json.loads(capsys.readouterr().out)["seq_per_s_per_actor"] == report["rates"][0]["forwards_per_s"]
    bigger = {**report["rates"][0], "shape": {"n_layers": 2, "d_model": 512, "d_vocab": 48262, "d_mlp": 0}}
    (tmp_path / "rates.json").write_text(json.dumps({"rates": [bigger]}, indent=1))
    assert main([*base, "--rates", str(tmp_path / "rates.json")]) == 0
    scaled = json.loads(capsys.readouterr().out)["seq_per_s_per_actor"]
    toy = flops_per_forward(2, 128, 2048, 0)
    assert abs(scaled / bigger["forwards_per_s"] - flops_per_forward(2, 512, 48262, 0) / toy) < 1e-9
