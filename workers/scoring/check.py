"""The load-time proof: before an actor scores its first shard, the scorer it will score with — the
very path, precision and options, compiled or not — is compared with TransformerLens' own forward
of the stored weights, in float64 where affordable, on sequences in the sweep's layout.

The reference is the function that was trained (``exact``: the stored weights, unprocessed) or,
with ``--processing tl-default``, the function that processing means to score (TransformerLens'
defaults applied to the stored weights, in float64). It is built in a background thread from the
moment the actor starts, so that importing TransformerLens and loading the weights overlap the
scorer's own loading and compilation. Beyond the precision's bound (``Variant.bound``) the
actor refuses to score, in one line naming the model, the figure and the likely cause.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workers.model import folds, hooked, source
from workers.scoring.logodds import logodds
from workers.scoring.scorer import Scorer, scorer_for
from workers.scoring.variant import ACCURACY_BOUNDS

SEQUENCES = 32  # per check, split across the run's experiments; each is scored with its shuffled control


class ScorerCheckFailed(source.ModelInputError):
    """The scorer does not compute the model's function within its precision's bound: refused (exit 2)."""


class Reference:
    """TransformerLens' forward of ``spec``'s stored weights on ``device``, built in the background."""

    def __init__(self, spec: str, processing: str, device: torch.device):
        self.device, self.dtype, self.build_s = device, torch.float64, 0.0
        pool = ThreadPoolExecutor(1, thread_name_prefix="reference")
        self._model = pool.submit(self._build, spec, processing)
        pool.shutdown(wait=False)

    def _build(self, spec: str, processing: str):
        start = time.perf_counter()
        if source.parameter_count(source.model_config(spec)) > source.FLOAT64_PARAMETERS:
            self.dtype = torch.float32
        model = hooked.reference_model(spec, processing, self.dtype).to(self.device)
        self.build_s = time.perf_counter() - start
        return model

    @torch.inference_mode()
    def logodds(self, tokens: Int[Tensor, "batch pos"], targets: Int[Tensor, "batch n_targets"]
                ) -> Float[Tensor, "batch n_targets"]:
        logits = hooked.last_logits(self._model.result(), tokens.to(self.device))
        return logodds(logits.double(), targets.to(self.device)).cpu()


def max_error(scorer: Scorer, reference: Reference, tokens: Int[Tensor, "batch pos"],
              targets: Int[Tensor, "batch n_targets"]) -> float:
    """Max |Δ log-odds| of ``scorer`` against the reference; inf where the scorer is not finite and the reference is."""
    got = scorer.logodds(tokens, targets).double().cpu()
    want = reference.logodds(tokens, targets)
    diff = (got - want).abs()
    diff = torch.where(torch.isfinite(want), diff, torch.where(got == want, 0.0, float("inf")))
    return float(torch.nan_to_num(diff, nan=float("inf")).max())


def prove(scorer: Scorer, reference: Reference, checks: list[tuple[str, Tensor, Tensor]], name: str, processing: str) -> dict:
    """``checks``: (experiment, tokens, targets) in the sweep's layout. The figure, per experiment and
    overall, against ACCURACY_BOUNDS[precision]; ScorerCheckFailed beyond it, naming the likely cause."""
    start = time.perf_counter()
    errors = {experiment: max_error(scorer, reference, tokens, targets) for experiment, tokens, targets in checks}
    worst = max(errors.values())
    bound = ACCURACY_BOUNDS[scorer.precision]
    what = "the stored weights" if processing == "exact" else "the stored weights with TransformerLens' default processing"
    result = {"path": scorer.path, "precision": scorer.precision, **scorer.options, "max_abs_diff_logodds": worst,
              "bound": bound, "per_experiment": errors, "sequences": sum(len(t) for _, t, _ in checks),
              "reference": f"TransformerLens' {str(reference.dtype).removeprefix('torch.')} forward of {what}",
              "reference_build_s": round(reference.build_s, 3), "check_s": round(time.perf_counter() - start, 3)}
    if not worst <= bound:
        cause = likely_cause(scorer, reference, checks, bound)
        raise ScorerCheckFailed(f"{name}: the {scorer.path} scorer ({scorer.precision}) differs from {result['reference']} "
                                f"by {worst:.3g} in log-odds, beyond the {scorer.precision} bound {bound:g}; likely cause: {cause}")
    return result


def likely_cause(scorer: Scorer, reference: Reference, checks: list, bound: float) -> str:
    """The first simpler scorer that is within the bound names what the failing one adds."""

    def within(candidate: Scorer) -> bool:
        return all(max_error(candidate, reference, tokens, targets) <= bound for _, tokens, targets in checks)

    model = scorer.model
    options = scorer.options
    if options.get("compiled") or "triton" in (options.get("attention"), options.get("lse")):
        if within(scorer_for(model, scorer.precision, compile=False, attention="products", lse="torch", device=scorer.device)):
            return "torch.compile or the Triton kernels on this machine (the eager torch path is within the bound)"
    if scorer.precision != "fp32" and within(scorer_for(model, "fp32", compile=False, attention="products", lse="torch",
                                                        device=scorer.device)):
        return f"{scorer.precision} rounding is too coarse for this model: run with --precision fp32"
    if scorer.path == "compact" and isinstance(model, folds.CompactWeights):
        return ("the compact forward reads this architecture differently from TransformerLens "
                "(a config field it misses): please report it with the model's config.json")
    return "TransformerLens' own float32 forward is that far from its float64 one: the model is numerically fragile"
