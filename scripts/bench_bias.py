"""``scripts/bench_lab.py --bias``: does a cheaper precision shift the per-token powers? A and B power of the first
tokens (256 sequences each, the sweep's own sequences and scoring path: ``ShardRunner.compute``)
under bf16 and tf32 against fp32, on the same sequences. The mean signed difference over tokens
is the bias that would move the post's histograms; ``--precision auto`` on a GPU should be the
fastest precision whose |bias| stays within BIAS_BOUND (2 % of the post's standard error, 0.23)."""

from __future__ import annotations

import tempfile

import numpy as np

from workers import experiments
from workers.model import hooked, source
from workers.sequences import FIRST_TOKEN
from workers.shard import ShardRunner
from workers.work import ShardSpec, WorkParams

BIAS_BOUND = 0.005  # nats
SPEED_ORDER = ("bf16", "tf32", "fp32")  # fastest first, as measured on an H200 (docs/PERFORMANCE.md)


def powers(spec: str, precision: str, device: str, tokens: int, seqs: int) -> np.ndarray:
    """[role, token] mean strength on B (A power, B power) of tokens FIRST_TOKEN.., as a run computes them."""
    powers_experiment = experiments.get("token-powers")
    params = WorkParams(spec, 0, 0, source.FALLBACK_PAIR, source.DEFAULT_BOS, False, precision, False, "exact",
                        (powers_experiment,))
    with tempfile.TemporaryDirectory() as out:
        runner = ShardRunner(params, out, device)
        return np.stack([runner.compute(ShardSpec(powers_experiment.name, s.name, 0, 0, seqs, FIRST_TOKEN, FIRST_TOKEN + tokens))
                         .strength[:, 0].astype(np.float64).reshape(tokens, seqs).mean(1)
                         for s in powers_experiment.scenarios])


def precision_bias(spec: str, device: str, tokens: int = 200, seqs: int = 256) -> dict:
    """Per precision: mean signed and max |difference| of A and B power against fp32, and the verdict."""
    reference = powers(spec, "fp32", device, tokens, seqs)
    out = {"model": spec, "tokens": tokens, "seqs": seqs, "bound": BIAS_BOUND, "precisions": {}}
    for precision in ("bf16", "tf32") if device == "cuda" else ("bf16",):  # TF32 is a CUDA mode
        diff = powers(spec, precision, device, tokens, seqs) - reference
        out["precisions"][precision] = {
            **{f"{role}_mean_bias": float(d.mean()) for role, d in zip("AB", diff)},
            **{f"{role}_max_abs": float(np.abs(d).max()) for role, d in zip("AB", diff)},
            "within": bool(np.abs(diff.mean(1)).max() <= BIAS_BOUND)}
    ok = [p for p in SPEED_ORDER if p == "fp32" or out["precisions"].get(p, {}).get("within")]
    out["auto"] = ok[0]
    return out


def random_checkpoint(directory: str) -> str:
    """The bench's random attn-only-2l-shaped model as a checkpoint directory, so actors' loading path is used."""
    hooked.export_model(hooked.random_model(), directory)
    return directory


def main(model: str | None, device: str, tokens: int) -> list[dict]:
    """toy-2l and the random attn-only-2l shape (or ``model``)."""
    with tempfile.TemporaryDirectory() as tmp:
        specs = [model] if model else ["toy-2l", random_checkpoint(tmp)]
        results = []
        for spec in specs:
            result = precision_bias(spec, device, tokens)
            result["model"] = model or ("toy-2l" if spec == "toy-2l" else "random attn-only-2l shape")
            for precision, r in result["precisions"].items():
                print(f"  bias {result['model']:>26} {precision}: A power {r['A_mean_bias']:+.4f} (max {r['A_max_abs']:.3f}), "
                      f"B power {r['B_mean_bias']:+.4f} (max {r['B_max_abs']:.3f}) over {tokens} tokens x {result['seqs']} "
                      f"seqs: {'within' if r['within'] else 'OUTSIDE'} {BIAS_BOUND}", flush=True)
            results.append(result)
    return results
