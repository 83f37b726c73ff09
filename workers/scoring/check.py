"""The load-time proof: before an actor scores its first shard, the scorer it will score with — the
very path, precision and options, compiled or not — is compared with TransformerLens' own forward
of the stored weights, in float64 where affordable, on sequences in the sweep's layout.

The reference is the function that was trained (``exact``: the stored weights, unprocessed) or,
with ``--processing tl-default``, the function that processing means to score (TransformerLens'
defaults applied to the stored weights, in float64). Its figures are computed in a background thread
from the moment the actor starts, so that importing TransformerLens and loading the weights overlap
the scorer's own loading and compilation, or read from the node's cache of them. Beyond the
precision's bound (``Variant.bound``) the actor refuses to score, in one line naming the model, the
figure and the likely cause.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workers.model import folds, hooked, source
from workers.scoring.logodds import logodds
from workers.scoring.scorer import Scorer, scorer_for
from workers.scoring.variant import ACCURACY_BOUNDS

SEQUENCES = 32  # per check, split across the run's experiments; each is scored with its shuffled control
SEED = 0  # the check's own sequences: the same for every run of a model, whatever its seed, so a node's figures serve them all


class ScorerCheckFailed(source.ModelInputError):
    """The scorer does not compute the model's function within its precision's bound: refused (exit 2)."""


class Reference:
    """TransformerLens' forward of ``spec``'s stored weights on ``device``: its log-odds on ``checks``,
    computed in the background from the moment the actor starts.

    The figures depend only on the weights' bytes, the processing, the sequences and the versions of
    torch and TransformerLens, so a node keeps them (``cache_dir``) keyed by all of those: a later actor
    of the same model and checks (a rerun, a resumed run, another actor starting after the first)
    reads them instead of importing TransformerLens and building the model again. The scorer is
    compared with them anew every time."""

    def __init__(self, spec: str, cfg, processing: str, device: torch.device, checks: list[tuple[str, Tensor, Tensor]]):
        """``cfg``: the model's resolved config (source.model_config)."""
        self.device, self.build_s, self.cached = device, 0.0, False
        self.dtype = torch.float32 if source.parameter_count(cfg) > source.FLOAT64_PARAMETERS else torch.float64
        pool = ThreadPoolExecutor(1, thread_name_prefix="reference")
        self._values = pool.submit(self._compute, spec, processing, checks)
        pool.shutdown(wait=False)

    def values(self) -> list[Float[Tensor, "batch n_targets"]]:
        """The reference log-odds of each check, on the CPU, float64."""
        return self._values.result()

    def _compute(self, spec: str, processing: str, checks: list) -> list[Tensor]:
        start = time.perf_counter()
        path = cached_path(spec, processing, self.dtype, checks)
        if path is not None and path.is_file():
            values, self.cached = torch.load(path, weights_only=True), True
        else:
            model = hooked.reference_model(spec, processing, self.dtype).to(self.device)
            with torch.inference_mode():
                values = [logodds(hooked.last_logits(model, tokens.to(self.device)).double(), targets.to(self.device)).cpu()
                          for _, tokens, targets in checks]
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(f".{os.getpid()}.part")
                torch.save(values, partial)
                partial.replace(path)  # whole or absent: actors of the node may write it at once
        self.build_s = time.perf_counter() - start
        return values


def cache_dir() -> Path | None:
    """Where a node keeps reference figures: ``INDUCTION_SWEEP_CACHE`` (empty: nowhere), else
    ~/.cache/induction-sweep."""
    where = os.environ.get("INDUCTION_SWEEP_CACHE", str(Path.home() / ".cache" / "induction-sweep"))
    return Path(where) / "reference" if where else None


def cached_path(spec: str, processing: str, dtype: torch.dtype, checks: list) -> Path | None:
    """The file of this reference's figures, named by a hash of everything they depend on; None where
    the weights have no bytes here to hash (a hub name: TransformerLens downloads them)."""
    where = cache_dir()
    with source.checkpoint_dir(spec) as directory:
        if where is None or directory is None:
            return None
        digest = hashlib.sha256()
        for name in ("config.json", "model.safetensors"):
            with open(directory / name, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
    versions = f"{torch.__version__} {importlib.metadata.version('transformer_lens')} {processing} {dtype}"
    digest.update(versions.encode())
    for name, tokens, targets in checks:
        digest.update(name.encode() + tokens.cpu().numpy().tobytes() + targets.cpu().numpy().tobytes())
    return where / f"{digest.hexdigest()[:32]}.pt"


def max_error(scorer: Scorer, want: Float[Tensor, "batch n_targets"], tokens: Int[Tensor, "batch pos"],
              targets: Int[Tensor, "batch n_targets"]) -> float:
    """Max |Δ log-odds| of ``scorer`` against the reference's ``want``; inf where the scorer is not finite and the reference is."""
    got = scorer.logodds(tokens, targets).double().cpu()
    diff = (got - want).abs()
    diff = torch.where(torch.isfinite(want), diff, torch.where(got == want, 0.0, float("inf")))
    return float(torch.nan_to_num(diff, nan=float("inf")).max())


def check_errors(scorer: Scorer, reference: Reference, checks: list[tuple[str, Tensor, Tensor]]) -> dict[str, float]:
    """``max_error`` of ``scorer`` on each check, by experiment."""
    return {experiment: max_error(scorer, want, tokens, targets) for (experiment, tokens, targets), want in zip(checks, reference.values())}


def prove(scorer: Scorer, reference: Reference, checks: list[tuple[str, Tensor, Tensor]], name: str, processing: str) -> dict:
    """``checks``: (experiment, tokens, targets) in the sweep's layout. The figure, per experiment and
    overall, against ACCURACY_BOUNDS[precision]; ScorerCheckFailed beyond it, naming the likely cause."""
    start = time.perf_counter()
    errors = check_errors(scorer, reference, checks)
    worst = max(errors.values())
    bound = ACCURACY_BOUNDS[scorer.precision]
    what = "the stored weights" if processing == "exact" else "the stored weights with TransformerLens' default processing"
    result = {"path": scorer.path, "precision": scorer.precision, **scorer.options, "max_abs_diff_logodds": worst,
              "bound": bound, "per_experiment": errors, "sequences": sum(len(t) for _, t, _ in checks),
              "reference": f"TransformerLens' {str(reference.dtype).removeprefix('torch.')} forward of {what}",
              "reference_build_s": round(reference.build_s, 3), "reference_cached": reference.cached,
              "check_s": round(time.perf_counter() - start, 3)}
    if not worst <= bound:
        cause = likely_cause(scorer, reference, checks, bound)
        raise ScorerCheckFailed(f"{name}: the {scorer.path} scorer ({scorer.precision}) differs from {result['reference']} "
                                f"by {worst:.3g} in log-odds, beyond the {scorer.precision} bound {bound:g}; likely cause: {cause}")
    return result


def likely_cause(scorer: Scorer, reference: Reference, checks: list, bound: float) -> str:
    """The first simpler scorer that is within the bound names what the failing one adds."""

    def within(candidate: Scorer) -> bool:
        return max(check_errors(candidate, reference, checks).values()) <= bound

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
