"""``induction-sweep bench``: what it reports, not how fast (speed is never asserted in tests)."""

import json
import subprocess
import sys

import pytest
import torch

from jobs import bench
from workers.fast import attentions


def test_bench_reports_every_precision_with_errors_against_float64():
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "bench", "--model", "toy-2l", "--device", "cpu", "--seconds", "0.05",
         "--batches", "64", "--json"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])  # the JSON object is the last line (README.md, "Running")
    assert report["model"] == "toy-2l" and report["device"] == "cpu" and report["plain_seq_per_s"] > 0
    # timed back to back, with the rate of one synced step beside it (docs/PERFORMANCE.md)
    assert report["timing"] == bench.TIMING and report["plain_synced_seq_per_s"] > 0
    rows = {(r["precision"], r["compile"], r["attention"]): r for r in report["results"]}
    assert set(rows) == {(p, c, a) for p in ("fp32", "bf16") for c in (False, True)
                         for a in attentions(torch.device("cpu"))}  # no tf32 on a CPU; Triton's attention only on CUDA
    for (precision, compiled, attention), r in rows.items():
        assert r["attention"] == attention
        assert r["path"] == "compact" and r["batch"] == 64 and r["compiled"] == compiled
        assert r["ratio"] == r["seq_per_s"] / report["plain_seq_per_s"] and r["synced_seq_per_s"] > 0
        assert r["max_abs_err_strength"] <= (1e-4 if precision == "fp32" else 0.1)
    # bf16 rounding shows in the error: a path that silently ran float32 would not
    assert rows[("bf16", False, "sdpa")]["max_abs_err_strength"] > 10 * rows[("fp32", False, "sdpa")]["max_abs_err_strength"]
    # the fastest accurate variant per precision is one of those measured, and the scorer's defaults are named
    for precision, best in report["fastest"].items():
        assert best["seq_per_s"] == max(r["seq_per_s"] for r in report["results"] if r["precision"] == precision)
    assert set(report["fastest"]) == set(report["defaults"]) == {"fp32", "bf16"}
    assert report["targets"] == {}  # the issues' targets are for the random shapes, not for a --model
    assert report["gpu"].startswith("not measured")


def test_bench_of_a_shape_with_mlps_measures_transformer_lens_path_too():
    """--shape gelu-2l: random weights of gelu-2l's shape; the compact forward (its MLPs included)
    against the TransformerLens path that scored such models before, both against float64."""
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "bench", "--shape", "gelu-2l", "--device", "cpu", "--seconds", "0.05",
         "--batches", "32", "--precisions", "fp32", "--attention", "sdpa", "--json"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["model"] == "gelu-2l"
    paths = {r["path"]: r for r in report["results"]}
    assert set(paths) == {"compact", "transformer_lens"} and len(report["results"]) == 3  # eager, compiled, TransformerLens
    assert all(r["max_abs_err_strength"] <= 1e-4 for r in report["results"])
    assert set(report["targets"]) == set()  # gelu-2l's target is a CUDA one
    assert report["fastest"]["fp32"]["seq_per_s"] == max(r["seq_per_s"] for r in report["results"] if r["path"] == "compact")


@pytest.mark.parametrize("argv, error", [
    (["--shape", "gelu-9l"], "unknown --shape 'gelu-9l': choose from attn-only-2l, gelu-2l, gpt2-small"),
    (["--shape", "gelu-2l", "--model", "toy-2l"], "--shape benches random weights and --model a given model: give one of them"),
    (["--device", "cpu", "--only", "colour=red"],
     "--only 'colour=red': give KEY=VALUE pairs of compile, attention, query, table, logits, lse, fast"),
    (["--device", "cpu", "--only", "lse=triton"], "--only lse=triton: no fp32, bf16 variant on cpu has these options"),
    (["--device", "cpu", "--attention", "triton"], "unknown triton for cpu: choose from sdpa, products"),
])
def test_bad_options_are_one_line(argv, error):
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "bench", *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith(error)


def test_cuda_variants_try_the_bf16_kernel_options_with_the_triton_attention():
    """What a device's bench measures (no GPU needed to list it): under bf16 with the Triton attention
    the Triton query side beside torch's, and the float16 table beside float32; every CUDA variant
    names both, so --only can pick them."""
    from jobs.bench import variants

    cuda = torch.device("cuda")
    bf16 = variants(cuda, "bf16")
    kernels = {(v["attention"], v["query"], v["table"]) for v in bf16}
    assert kernels == {("sdpa", "torch", "float32"), ("products", "torch", "float32")} | {
        ("triton", q, t) for q in ("torch", "triton") for t in ("float32", "float16")}
    both = [v for v in bf16 if v["query"] == "triton" and v["table"] == "float16"]
    assert len(both) == len([v for v in bf16 if v["attention"] == "sdpa"])  # every unembedding
    assert {(v["query"], v["table"]) for p in ("fp32", "tf32") for v in variants(cuda, p)} == {("torch", "float32")}


def test_only_the_variants_asked_for():
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "bench", "--model", "toy-2l", "--device", "cpu", "--seconds", "0.05",
         "--batches", "32", "--only", "compile=false,attention=products", "--json"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert [(r["precision"], r["compile"], r["attention"]) for r in report["results"]] == [
        ("fp32", False, "products"), ("bf16", False, "products")]


def test_check_of_the_variants_asked_for():
    """--check on toy-2l against TransformerLens: the variants the bench runs, narrowed as it is (a device
    call's minutes are few), each once though a CPU benches it eager and compiled."""
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "bench", "--model", "toy-2l", "--device", "cpu", "--seconds", "0.05",
         "--batches", "32", "--precisions", "fp32", "--attention", "products", "--check", "toy-2l", "--json"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert [r["compile"] for r in report["results"]] == [False, True]
    checks = report["checks"]
    assert [(c["model"], c["precision"], c["attention"]) for c in checks] == [("toy-2l", "fp32", "products")]
    assert checks[0]["within"] and 0 < checks[0]["max_abs_err_strength"] <= 1e-3


def test_precision_bias_of_the_powers_against_fp32():
    """bf16 (emulated on a CPU) against fp32 on the same sequences, through the sweep's own scoring path."""
    from jobs.bench_bias import BIAS_BOUND, powers, precision_bias

    result = precision_bias("toy-2l", "cpu", tokens=6, seqs=16)
    bf16 = result["precisions"]["bf16"]
    assert 0 < bf16["B_max_abs"] < 0.1 and abs(bf16["A_mean_bias"]) <= bf16["A_max_abs"]
    assert result["auto"] == ("bf16" if bf16["within"] else "fp32") and result["bound"] == BIAS_BOUND
    assert (powers("toy-2l", "fp32", "cpu", 6, 16) == powers("toy-2l", "fp32", "cpu", 6, 16)).all()  # deterministic


def test_triton_kernels_of_a_variant_report_their_tiles(toy_model):
    """bench --json names the tiles the autotuner chose for each Triton kernel a variant ran (the
    device run's record of what the tuner picked); under the interpreter each has its one config."""
    triton = pytest.importorskip("triton")
    from jobs.bench import triton_kernels
    from workers.scoring import Scorer

    assert triton_kernels({"lse": "torch", "attention": "products"}) == {}
    assert list(triton_kernels({"lse": "triton", "attention": "sdpa"})) == ["logits_lse"]
    options = {"lse": "triton", "attention": "triton", "query": "triton"}
    kernels = triton_kernels(options)
    assert list(kernels) == ["logits_lse", "causal_attention", "last_attention", "query_side"]
    scorer = Scorer(toy_model, "fp32", compile=False, **options)
    tokens = torch.randint(1, 2048, (4, 24))
    scorer.logodds(tokens, tokens[:, :1])
    assert [scorer.options[k] for k in ("lse", "attention", "query")] == ["triton"] * 3  # the kernels ran: no fallback
    assert all(isinstance(kernel.best_config, triton.Config) for kernel in kernels.values())
