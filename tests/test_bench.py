"""``induction-sweep bench`` and the developer lab: what they report, not how fast (speed is never
asserted in tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import refused

ROOT = Path(__file__).resolve().parent.parent


def bench(*argv: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "bench", *argv, "--json"], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # the JSON object is the last line


def test_bench_measures_the_default_scorer_of_each_precision_against_float64():
    report = bench("--device", "cpu", "--seconds", "0.05", "--batches", "64")
    assert report["model"] == "toy-2l" and report["device"] == "cpu" and report["plain_forwards_per_s"] > 0
    assert report["shape"] == {"n_layers": 2, "d_model": 128, "d_vocab": 2048, "d_mlp": 0}
    rows = {r["precision"]: r for r in report["results"]}
    assert set(rows) == {"fp32", "bf16"}  # no tf32 on a CPU
    for r in rows.values():
        # the CPU's default: eager SDPA, torch's log-sum-exp
        assert (r["path"], r["compiled"], r["attention"], r["lse"], r["batch"]) == ("compact", False, "sdpa", "torch", 64)
        assert r["ratio"] == r["forwards_per_s"] / report["plain_forwards_per_s"]
        assert r["max_abs_err_strength"] <= r["bound"]
    # bf16 rounding shows in the error: a path that silently ran float32 would not
    assert rows["bf16"]["max_abs_err_strength"] > 10 * rows["fp32"]["max_abs_err_strength"]
    assert [r["forwards_per_s"] for r in report["rates"]] == [rows["fp32"]["forwards_per_s"], rows["bf16"]["forwards_per_s"]]


def test_bench_of_a_shape_with_fewer_layers():
    """--shape gelu-2l --layers 1: random weights of gelu-2l's shape, its MLP through the compact forward."""
    report = bench("--shape", "gelu-2l", "--layers", "1", "--device", "cpu", "--seconds", "0.05", "--batches", "32",
                   "--precisions", "fp32")
    assert report["model"] == "gelu-2l" and report["shape"]["n_layers"] == 1 and report["shape"]["d_mlp"] == 2048
    assert report["plain_batch"] == 32  # the plain loop no larger than the batches benched
    (r,) = report["results"]
    assert r["path"] == "compact" and r["max_abs_err_strength"] <= 1e-4


@pytest.mark.parametrize("argv, error", [
    (["--shape", "gelu-9l"], "unknown --shape 'gelu-9l': choose from attn-only-2l, gelu-2l, gpt2-small, pythia-160m, llama-1b"),
    (["--shape", "gelu-2l", "--model", "toy-2l"], "--shape benches random weights and --model a given model: give one of them"),
    (["--device", "cpu", "--precisions", "tf32"], "unknown precision tf32 on cpu: choose from fp32, bf16"),
])
def test_bad_options_are_one_line(capsys, argv, error):
    refused(capsys, ["bench", *argv], error)


def test_lab_measures_variants_and_checks_them():
    """scripts/bench_lab.py: the variants asked for, each checked on toy-2l against TransformerLens, the
    default marked."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_lab.py"), "--device", "cpu", "--seconds", "0.05",
                           "--batches", "32", "--precisions", "fp32", "--only", "compiled=false", "--check", "toy-2l", "--json"],
                          capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(r["attention"], r["default"]) for r in report["results"]] == [("sdpa", True), ("products", False)]
    assert [(c["attention"], c["within"]) for c in report["checks"]] == [("sdpa", True), ("products", True)]


def test_precision_bias_of_the_powers_against_fp32():
    """bf16 (emulated on a CPU) against fp32 on the same sequences, through the sweep's own scoring path."""
    sys.path.insert(0, str(ROOT))
    from scripts.bench_bias import BIAS_BOUND, powers, precision_bias

    result = precision_bias("toy-2l", "cpu", tokens=6, seqs=16)
    bf16 = result["precisions"]["bf16"]
    assert 0 < bf16["B_max_abs"] < 0.1 and abs(bf16["A_mean_bias"]) <= bf16["A_max_abs"]
    assert result["auto"] == ("bf16" if bf16["within"] else "fp32") and result["bound"] == BIAS_BOUND
    assert (powers("toy-2l", "fp32", "cpu", 6, 16) == powers("toy-2l", "fp32", "cpu", 6, 16)).all()  # deterministic
