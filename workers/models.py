"""Loading, exporting and reading models. Every TransformerLens call of the project lives here,
so that moving to TransformerLens 4's TransformerBridge is a change to this one module.

A model spec is one of
  * ``toy-2l`` — the bundled checkpoint in ``workers/toy_2l`` (trained by ``workers/train_toy.py``);
  * a local checkpoint directory or an ``s3://`` one: ``config.json`` (HookedTransformerConfig
    fields, plus an optional ``induction_sweep`` section) + ``model.safetensors`` + optional
    tokenizer files;
  * a TransformerLens model name (``attn-only-2l``, ``gpt2-small``...), loaded from the hub.
All are loaded with TransformerLens' default processing (LayerNorm folded, writing weights and
unembedding centred, value biases folded), as ``from_pretrained`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workers import config_fields
from workers.config_fields import ConfigFieldError
from workers.layout import FIRST_TOKEN

TOY_MODEL = "toy-2l"
TOY_DIR = Path(__file__).with_name("toy_2l")
CHECKPOINT_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
DEFAULT_PAIR = (" Fab", "ien")  # the seed post's fixed pair
FALLBACK_PAIR = (1000, 1500)  # ids used where the tokenizer lacks those strings (or there is none)
DEFAULT_BOS = 1  # the attn-only-Nl models' BOS id


class ModelInputError(ValueError):
    """A model spec or token that cannot be used: reported as bad input (exit 2)."""


_TL_IMPORT: dict[str, float] = {}  # how long this process took to import TransformerLens, once it has


def _hooked_transformer():
    import time
    import warnings

    start = time.perf_counter()
    warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    _TL_IMPORT.setdefault("seconds", time.perf_counter() - start)  # the first import is the slow one
    return HookedTransformer, HookedTransformerConfig


def transformer_lens_import_seconds() -> float:
    """Seconds this process spent importing TransformerLens (it brings transformers); 0 if it has not."""
    return _TL_IMPORT.get("seconds", 0.0)


def is_hub_name(spec: str) -> bool:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(spec)
        return True
    except ValueError:
        return False


_DOWNLOADS: dict[str, tempfile.TemporaryDirectory] = {}  # s3:// checkpoints this process fetched, fetched once
_DOWNLOADING = threading.Lock()  # the loader and the load-time check's reference ask at the same time


@contextlib.contextmanager
def checkpoint_dir(spec: str) -> Iterator[Path | None]:
    """The local checkpoint directory of ``spec`` (an ``s3://`` one downloaded once per process to a
    temporary directory, removed when the process ends), or None where ``spec`` is not a checkpoint."""
    if spec == TOY_MODEL:
        yield TOY_DIR
    elif spec.startswith("s3://"):
        with _DOWNLOADING:
            if spec not in _DOWNLOADS:
                from storage import open_store

                store, tmp = open_store(spec), tempfile.TemporaryDirectory(prefix="induction-sweep-model-")
                for name in CHECKPOINT_FILES + TOKENIZER_FILES:
                    if store.exists(name):
                        (Path(tmp.name) / name).write_bytes(store.get(name))
                _DOWNLOADS[spec] = tmp
        yield Path(_DOWNLOADS[spec].name)
    elif Path(spec).expanduser().is_dir():
        yield Path(spec).expanduser()
    else:
        yield None


CENTRE_WRITES = "center_residual_writes"  # our step: TransformerLens' centring without a shortformer's W_pos
WRITES = (".attn.W_O", ".attn.b_O", ".mlp.W_out", ".mlp.b_out")  # with embed.W_E: what writes to the residual stream


def centre_residual_writes(state: dict[str, Tensor], include_pos: bool) -> dict[str, Tensor]:
    """Every weight that writes to the residual stream (W_E, W_O and b_O, W_out and b_out, and W_pos
    where positions write there) centred across d_model: exact where every reader of the residual
    stream is a LayerNorm, and it keeps bf16 roundings small (no large common mean for the LayerNorm
    to cancel). A shortformer's W_pos is left alone: it feeds queries and keys after the LayerNorm."""
    keys = [k for k in state if k == "embed.W_E" or k.endswith(WRITES) or (include_pos and k == "pos_embed.W_pos")]
    return {**state, **{k: state[k] - state[k].mean(-1, keepdim=True) for k in keys}}


def effective_unembedding(state: dict[str, Tensor]) -> Float[Tensor, "d_model vocab"]:
    """W_U as the model reads its normalised residual stream: the final LayerNorm's (or RMSNorm's)
    weight folded in, W_U as stored where there is none. Neighbours are found among its columns
    (docs/DESIGN.md §1), from the stored weights whatever the loader or its processing."""
    W_U = state["unembed.W_U"].detach().float()
    return state["ln_final.w"].detach().float()[:, None] * W_U if "ln_final.w" in state else W_U


def step_effects(state: dict[str, Tensor], cfg) -> dict[str, bool]:
    """Which processing steps would change these stored weights (TransformerLens' and ours): a step
    that finds nothing to do is not one the manifest lists."""

    def off(t: Tensor, centre: Tensor | float) -> bool:  # beyond float32 noise of ``centre``
        return bool((t.float() - centre).abs().max() > 1e-6 * max(float(t.abs().max()), 1.0))

    def uncentred(keys: list[str], dim: int = -1) -> bool:
        return any(off(state[k].mean(dim), 0.0) for k in keys)

    norms = [k for k in state if re.search(r"(^|\.)ln(1|2|_final)?\.[wb]$|\.mlp\.ln\.[wb]$", k)]
    affine = any(off(state[k], 1.0 if k.endswith(".w") else 0.0) for k in norms)
    writes = [k for k in state if k == "embed.W_E" or k.endswith(WRITES)]
    pos = ["pos_embed.W_pos"] if "pos_embed.W_pos" in state else []
    under_ln = cfg.normalization_type in ("LN", "LNPre")
    return {"fold_ln": cfg.normalization_type in ("LN", "RMS") and affine,
            "center_writing_weights": under_ln and not cfg.final_rms and uncentred(writes + pos),
            CENTRE_WRITES: under_ln and uncentred(writes),
            "center_unembed": uncentred(["unembed.W_U"]),
            "fold_value_biases": any(off(state[k], 0.0) for k in state if k.endswith(("attn.b_V", "attn._b_V")))}


def load_weights(spec: str, device: str | torch.device = "cpu") -> CompactWeights | None:
    """The compact forward's weights read straight from a checkpoint, without TransformerLens, for
    the architectures it computes (``config_fields.route``). Exact steps only: under a LayerNorm the
    residual stream's writes are centred (``centre_residual_writes``), then ``weights_from_state``
    folds LayerNorm weights (positions unscaled) and value biases. None where the model needs
    TransformerLens' loading (hub names, RMS, other architectures)."""
    with checkpoint_dir(spec) as directory:
        if directory is None:
            return None
        cfg = checkpoint_config(directory, spec).cfg  # config.json only: no tokenizer, no transformers import
        if not compact_supported(cfg):
            return None
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"), device=str(device))
    effects = step_effects(state, cfg)
    if cfg.normalization_type in ("LN", "LNPre"):
        state_centred = centre_residual_writes(state, include_pos=cfg.positional_embedding_type != "shortformer")
    else:
        state_centred = state
    weights = weights_from_state(state_centred, cfg)
    weights.unembedding = effective_unembedding(state)
    steps = [s for s, on in ((CENTRE_WRITES, effects[CENTRE_WRITES]), ("fold_ln", effects["fold_ln"]),
                             ("fold_value_biases", effects["fold_value_biases"])) if on]
    weights.loading = {"loader": "safetensors", "processing": "exact", "steps": steps,
                       "exact_because": "the LayerNorm removes the residual stream's mean; its weights fold into "
                                        "what reads its output (a shortformer's positions unscaled); attention rows sum to 1"}
    return weights


PROCESSING = ("exact", "tl-default")
# max |Δ log-prob| between the processed model and the weights as stored: 1e-4, plus float32's resolution of
# the largest |log-prob| (TransformerLens processes weights in float32 whatever their dtype)
CHECK_TOLERANCE = 1e-4
CHECK_RELATIVE = 2e-6


def processing_steps(cfg, processing: str = "exact") -> dict[str, bool]:
    """TransformerLens' processing flags for ``cfg``: its defaults (``tl-default``, how the post
    loaded its model), or (``exact``) the same without the two steps that assume positions write to
    the residual stream, for shortformer models, whose positions enter queries and keys after the
    LayerNorm (TransformerLens PR #204): centring W_pos, and folding LayerNorm weights into W_Q and
    W_K (the positions would be scaled too). The load-time check catches any other such step."""
    steps = {"fold_ln": cfg.normalization_type in ("LN", "RMS"), "center_writing_weights": True,
             "center_unembed": True, "fold_value_biases": True, CENTRE_WRITES: False}
    if processing == "exact" and cfg.positional_embedding_type == "shortformer":
        steps["fold_ln"] = steps["center_writing_weights"] = False
        steps[CENTRE_WRITES] = cfg.normalization_type in ("LN", "LNPre")  # the rest of the centring, W_pos left alone
    return steps


def load_processed(build, cfg, name: str, processing: str, device: str | torch.device):
    """``build(steps)`` with ``processing``'s steps, checked against ``build`` with none on 32 random
    sequences. Exact processing over CHECK_TOLERANCE is a ModelInputError naming the step that
    changes the function; TransformerLens' defaults are kept whatever the check says, and recorded.
    The model carries the effective unembedding of its stored weights (neighbours) and the steps that
    changed them."""
    steps = processing_steps(cfg, processing)
    model = build(steps, torch.float32, device)
    # the check in float64 on the CPU (where affordable): float32's own rounding of large logits is not a change
    exact = torch.float64 if parameter_count(cfg) <= FLOAT64_PARAMETERS else torch.float32
    raw = build(dict.fromkeys(steps, False), exact, "cpu")  # the weights as stored
    tokens = torch.randint(0, cfg.d_vocab, (32, min(24, cfg.n_ctx)), generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        stored = raw(tokens).log_softmax(-1)
    tolerance = CHECK_TOLERANCE + CHECK_RELATIVE * float(stored.abs().max())

    @torch.no_grad()
    def diff(a) -> float:
        return float((a(tokens).log_softmax(-1) - stored).abs().max())

    found = diff(build(steps, exact, "cpu"))
    if processing == "exact" and found > tolerance:
        applied = [s for s in steps if steps[s]]
        worst = max(applied, key=lambda s: diff(build({k: k == s for k in steps}, exact, "cpu")))
        raise ModelInputError(f"{name}: TransformerLens' {worst} changes this model's function (max |Δ log-prob| "
                              f"{found:.2g} > {tolerance:.2g} against the stored weights)")
    stored = raw.state_dict()
    effects = step_effects(stored, resolved(cfg))
    model.induction_sweep_unembedding = effective_unembedding(stored)
    model.induction_sweep_loading = {"loader": "transformer_lens", "processing": processing,
                                     "steps": [s for s in steps if steps[s] and effects[s]],
                                     "max_abs_diff_log_prob": found, "tolerance": tolerance,
                                     "checked_in": str(exact).removeprefix("torch.")}
    return model


FLOAT64_PARAMETERS = 400_000_000  # above this, checks against the stored weights run in float32 (float64 copies cost too much)


def parameter_count(cfg: SimpleNamespace) -> int:
    """About how many weights a resolved config has: enough to decide whether float64 copies are affordable."""
    attention = 4 * cfg.d_model * cfg.d_head * cfg.n_heads
    mlp = 0 if cfg.attn_only else (3 if cfg.gated_mlp else 2) * cfg.d_model * cfg.d_mlp
    return cfg.n_layers * (attention + mlp) + cfg.d_model * (cfg.d_vocab + cfg.d_vocab_out)


def load_for_scoring(spec: str, device: str | torch.device, processing: str = "exact") -> tuple[Any, dict]:
    """What a scorer needs, and how it was loaded: the compact forward's weights read from the
    checkpoint directly where ``exact`` processing allows it (no TransformerLens import), else the
    TransformerLens model."""
    weights = load_weights(spec, device) if processing == "exact" else None
    if weights is not None:
        return weights, weights.loading
    model = load_model(spec, device, processing)
    return model, model.induction_sweep_loading


def unembedding_of(model) -> Float[Tensor, "d_model vocab"]:
    """The effective unembedding of what ``load_for_scoring`` returned (``effective_unembedding``)."""
    return model.unembedding if isinstance(model, CompactWeights) else model.induction_sweep_unembedding


def load_model(spec: str, device: str | torch.device = "cpu", processing: str = "exact"):
    """Load a HookedTransformer in eval mode on ``device``, processed as ``processing`` says and
    checked against its weights as stored (``model.induction_sweep_loading`` records both);
    ModelInputError for a bad spec."""
    build, cfg, name = _builder(spec)
    model = load_processed(build, cfg, name, processing, device)
    model.cfg.model_name = name
    return model


def reference_model(spec: str, processing: str = "exact", dtype: torch.dtype = torch.float64):
    """TransformerLens' model of ``spec`` on the CPU in ``dtype``, from its stored weights: unprocessed
    (``exact``: the function that was trained), or with TransformerLens' defaults (``tl-default``: the
    function that run means to score). What the load-time check compares every scorer with."""
    build, cfg, _ = _builder(spec)
    steps = processing_steps(cfg, processing) if processing == "tl-default" else dict.fromkeys(processing_steps(cfg), False)
    return build(steps, dtype, "cpu")


def _builder(spec: str):
    """(``build(steps, dtype, device)`` → a HookedTransformer of ``spec`` processed by ``steps``, its
    config, its name)."""
    with checkpoint_dir(spec) as directory:
        if directory is not None:
            return _checkpoint_builder(directory, spec)
    if not is_hub_name(spec):
        raise ModelInputError(unknown_model(spec))
    HookedTransformer, _ = _hooked_transformer()
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    def build(steps: dict, dtype: torch.dtype, device: str | torch.device):
        tl_steps = {k: v for k, v in steps.items() if k != CENTRE_WRITES}
        model = HookedTransformer.from_pretrained(spec, device=str(device), dtype=dtype, **tl_steps).eval()
        if steps[CENTRE_WRITES]:
            model.load_state_dict(centre_residual_writes(model.state_dict(), include_pos=False))
        return model

    return build, resolved(get_pretrained_model_config(spec)), spec


def _checkpoint_builder(directory: Path, name: str):
    """HookedTransformer(cfg) + load_and_process_state_dict from a checkpoint directory (read once)."""
    HookedTransformer, HookedTransformerConfig = _hooked_transformer()
    checkpoint = checkpoint_config(directory, name)
    tokenizer = checkpoint_tokenizer(directory, name)
    fields = {k: v for k, v in checkpoint.fields.items() if k not in ("device", "dtype", "n_params")}
    if tokenizer is None:
        fields["tokenizer_name"] = None  # a checkpoint never reaches for the hub
    with _as_input_error(name):
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))

    def build(steps: dict, dtype: torch.dtype, device: str | torch.device):  # processing changes config and tensors: fresh ones
        with _as_input_error(name):
            model = HookedTransformer(HookedTransformerConfig(**fields, device=str(device), dtype=dtype), tokenizer=tokenizer,
                                      move_to_device=False)
            stored = {k: v.to(dtype, copy=True) for k, v in state.items()}
            if steps[CENTRE_WRITES]:
                stored = centre_residual_writes(stored, include_pos=False)
            model.load_and_process_state_dict(stored,
                                              **{k: v for k, v in steps.items() if k != CENTRE_WRITES})
            model = model.to(device, print_details=False).eval()
        model.cfg.model_name = name
        model.induction_sweep_extra = checkpoint.extra  # e.g. bos_token_id
        return model

    return build, checkpoint.cfg, name


def unknown_model(spec: str) -> str:
    return f"unknown model {spec!r}: not {TOY_MODEL}, not a checkpoint directory, not a TransformerLens model name"


def export_model(model, directory: str) -> None:
    """Write ``model`` (processed weights) as a checkpoint directory, local or ``s3://``."""
    from safetensors.torch import save

    cfg = {}
    for key, value in model.cfg.to_dict().items():
        if key in ("device", "dtype", "n_params"):
            continue
        try:
            json.dumps(value)
        except TypeError:
            continue
        cfg[key] = value
    cfg["induction_sweep"] = {"bos_token_id": bos_id(model), "source": model.cfg.model_name}
    files = {
        "config.json": (json.dumps(cfg, indent=2) + "\n").encode(),
        "model.safetensors": save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}),
    }
    if model.tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            model.tokenizer.save_pretrained(tmp)
            files.update({p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.name in TOKENIZER_FILES})
    from storage import open_store

    store = open_store(directory)
    for name, data in files.items():
        store.put(name, data)


ATTN_ONLY_FAMILY = re.compile(r"(attn-only-\d+l(-demo)?|NeelNanda/Attn_Only_\d+L\d+W_\w+)")


def default_bos(name: str, tokenizer=None, extra: dict | None = None) -> int:
    """The post's id 1 for the attn-only-Nl family and the bundled model; else a checkpoint's own
    ``induction_sweep.bos_token_id``, the tokenizer's BOS, or 1 where there is neither."""
    if ATTN_ONLY_FAMILY.fullmatch(name) or name == TOY_MODEL:
        return DEFAULT_BOS
    if extra and extra.get("bos_token_id") is not None:
        return int(extra["bos_token_id"])
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    return DEFAULT_BOS


def bos_id(model) -> int:
    return default_bos(model.cfg.model_name, model.tokenizer, getattr(model, "induction_sweep_extra", {}))


def d_vocab(model) -> int:
    return int(model.cfg.d_vocab)


@dataclass
class ModelInfo:
    """What the driver needs of a model before any actor loads it: no weights, no TransformerLens
    import for checkpoint directories (their config.json and tokenizer files are read directly)."""

    name: str
    cfg: SimpleNamespace  # every HookedTransformerConfig field, resolved (config_fields.resolve)
    tokenizer: Any = None
    bos: int = DEFAULT_BOS

    @property
    def d_vocab(self) -> int:
        return int(self.cfg.d_vocab)

    @property
    def compact(self) -> bool:
        """Whether the actors will score this model with the compact forward (workers/fast.py)."""
        return compact_supported(self.cfg)

    @property
    def attn_only_compact(self) -> bool:
        """The compact forward of an attention-only model: what --heads and the circuit scores read."""
        return self.compact and self.cfg.attn_only

    def token_strings(self) -> list[str]:
        """Printable string of every id: the tokenizer's, or ``#<id>`` where there is none."""
        if self.tokenizer is None:
            return [f"#{i}" for i in range(self.d_vocab)]
        return self.tokenizer.batch_decode([[i] for i in range(self.d_vocab)])

    def resolve_token(self, text: str | int, option: str) -> int:
        """An id from an integer (``123`` or ``#123``) or a string that is exactly one token."""
        text = str(text)
        digits = text[1:] if text.startswith("#") else text
        if digits.isdigit():
            token = int(digits)
        elif self.tokenizer is None:
            raise ModelInputError(f"{option} {text!r}: model {self.name} has no tokenizer; give an integer id")
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            unknown = self.tokenizer.unk_token_id
            if len(ids) == 1 and ids[0] == unknown and text != self.tokenizer.unk_token:
                raise ModelInputError(f"{option} {text!r} is not a token of {self.name} (it encodes to the unknown token)")
            if len(ids) != 1:
                raise ModelInputError(f"{option} {text!r} is not a single token of {self.name} ({len(ids)} tokens)")
            token = ids[0]
        if not FIRST_TOKEN <= token < self.d_vocab:
            raise ModelInputError(f"{option} {text!r}: id {token} outside {FIRST_TOKEN}..{self.d_vocab - 1}")
        return token

    def default_pair(self) -> tuple[int, int]:
        """The post's (" Fab", "ien") where both are single tokens, else FALLBACK_PAIR."""
        try:
            return tuple(self.resolve_token(s, "pair") for s in DEFAULT_PAIR)  # type: ignore[return-value]
        except ModelInputError:
            return FALLBACK_PAIR


def describe(spec: str) -> ModelInfo:
    """The model's config, tokenizer and BOS, checked without loading its weights; ModelInputError
    for a bad spec (unknown name, missing or corrupt checkpoint, a config no path scores)."""
    if spec == TOY_MODEL:
        return describe_checkpoint(TOY_DIR, TOY_MODEL)
    if spec.startswith("s3://"):
        from storage import open_store

        store = open_store(spec)
        with tempfile.TemporaryDirectory(prefix="induction-sweep-model-") as tmp:
            for name in ("config.json", *TOKENIZER_FILES):
                if store.exists(name):
                    (Path(tmp) / name).write_bytes(store.get(name))
            if not store.exists("model.safetensors"):
                raise ModelInputError(f"checkpoint {spec} lacks model.safetensors")
            size = store.list("model.safetensors")["model.safetensors"]
            head = store.get_range("model.safetensors", 0, min(size, 8 + MAX_HEADER))
            (Path(tmp) / "model.safetensors").write_bytes(head)  # the header is all that is read here
            return describe_checkpoint(Path(tmp), spec, safetensors_size=size)
    path = Path(spec).expanduser()
    if path.is_dir():
        return describe_checkpoint(path, spec)
    if is_hub_name(spec):
        from transformer_lens.loading_from_pretrained import get_pretrained_model_config

        try:
            cfg = get_pretrained_model_config(spec)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name) if cfg.tokenizer_name else None
        except OSError as exc:  # the hub unreachable, offline, or the repository gone: huggingface_hub's errors are OSErrors
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelInputError(f"model {spec}: its config cannot be read from the Hugging Face hub ({reason[:200]})") from None
        with _as_input_error(spec, "model"):
            resolved_cfg = resolved(cfg)
            config_fields.route(resolved_cfg)
        return ModelInfo(spec, resolved_cfg, tokenizer, default_bos(spec, tokenizer))
    raise ModelInputError(unknown_model(spec))


MAX_HEADER = 1 << 24  # a safetensors header beyond 16 MB is not a model's


def _safetensors_header(path: Path, size: int | None = None) -> tuple[dict, int]:
    """A safetensors file's JSON header (tensor names, dtypes, shapes, byte offsets) and how many data
    bytes follow it (``size``: the whole file's, where ``path`` holds only its start)."""
    size = path.stat().st_size if size is None else size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 2 <= length <= min(MAX_HEADER, size - 8):
            raise ValueError(f"not a safetensors file (header of {length} bytes in a file of {size})")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (its header is not a JSON object)")
    return header, size - 8 - length


@contextlib.contextmanager
def _as_input_error(name: str, what: str = "checkpoint") -> Iterator[None]:
    """Corrupt JSON, safetensors or tokenizer files, missing fields, a config no path scores: a
    ModelInputError naming the checkpoint."""
    try:
        yield
    except ModelInputError:
        raise
    except ConfigFieldError as exc:
        raise ModelInputError(f"{what} {name}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever the file's corruption raises
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelInputError(f"{what} {name} cannot be loaded: {reason[:200]}") from None


class Checkpoint(NamedTuple):
    cfg: SimpleNamespace  # every HookedTransformerConfig field, resolved as TransformerLens resolves it
    fields: dict  # config.json's model fields as written (what HookedTransformerConfig is built from)
    extra: dict  # config.json's induction_sweep section


def resolved(cfg) -> SimpleNamespace:
    """Every field of a HookedTransformerConfig or config.json, with TransformerLens' defaults (config_fields)."""
    return config_fields.resolve(dict(cfg) if isinstance(cfg, dict) else dict(vars(cfg)))


def checkpoint_config(directory: Path, name: str, safetensors_size: int | None = None) -> Checkpoint:
    """config.json's fields, resolved and routed (``config_fields``), with every tensor of the
    safetensors header checked against them; ModelInputError naming what does not fit."""
    missing = [f for f in CHECKPOINT_FILES if not (directory / f).is_file()]
    if missing:
        raise ModelInputError(f"checkpoint {name} lacks {', '.join(missing)}")
    with _as_input_error(name):
        raw = json.loads((directory / "config.json").read_text())
        if not isinstance(raw, dict):
            raise ValueError("config.json is not a JSON object")
        header, data_bytes = _safetensors_header(directory / "model.safetensors", safetensors_size)
        cfg = config_fields.resolve(raw)
        config_fields.route(cfg)
        config_fields.check_tensors(header, data_bytes, config_fields.expected_tensors(cfg) or _built_tensors(raw))
    extra = raw.get(config_fields.SECTION) or {}
    return Checkpoint(cfg, {k: v for k, v in raw.items() if k != config_fields.SECTION}, extra if isinstance(extra, dict) else {})


def _built_tensors(fields: dict) -> dict[str, tuple[int, ...]]:
    """The parameters of HookedTransformer built for ``fields`` on the meta device (no memory): for
    the architectures ``config_fields.expected_tensors`` does not list."""
    HookedTransformer, HookedTransformerConfig = _hooked_transformer()
    kept = {k: v for k, v in fields.items() if k not in (config_fields.SECTION, "device", "dtype", "n_params")}
    with torch.device("meta"):
        model = HookedTransformer(HookedTransformerConfig(**kept, device="meta"), move_to_device=False)
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


def checkpoint_tokenizer(directory: Path, name: str):
    """The checkpoint's tokenizer (transformers' AutoTokenizer), or None where it has no tokenizer files."""
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    with _as_input_error(name):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))


def model_config(spec: str) -> SimpleNamespace:
    """A model's resolved config alone (no tokenizer, no weights)."""
    with checkpoint_dir(spec) as directory:
        if directory is not None:
            return checkpoint_config(directory, spec).cfg
    if not is_hub_name(spec):
        raise ModelInputError(unknown_model(spec))
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    return resolved(get_pretrained_model_config(spec))


def describe_checkpoint(directory: Path, name: str, safetensors_size: int | None = None) -> ModelInfo:
    checkpoint = checkpoint_config(directory, name, safetensors_size)
    tokenizer = checkpoint_tokenizer(directory, name)
    return ModelInfo(name, checkpoint.cfg, tokenizer, default_bos(name, tokenizer, checkpoint.extra))


def centred_unembedding(W_U: Float[Tensor, "d_model vocab"]) -> Float[Tensor, "d_model vocab"]:
    """An effective unembedding centred across the vocabulary: the space in which neighbours of B are
    found (docs/DESIGN.md §1)."""
    W_U = W_U.detach()
    return W_U - W_U.mean(-1, keepdim=True)


@torch.no_grad()
def full_logits(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
    """TransformerLens' own full forward: the reference every fast path is checked against."""
    return model(tokens)


@torch.no_grad()
def last_logits(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch vocab"]:
    """TransformerLens path for any architecture: all layers, then only the last position unembedded."""
    resid = model(tokens, stop_at_layer=model.cfg.n_layers)
    return model.unembed(model.ln_final(resid[:, -1:]))[:, 0]


@dataclass
class CompactWeights:
    """A model's weights with its LayerNorms' weights folded in, as plain tensors (see
    workers/fast.py); ``layer_norm``: a LayerNorm without weights (LNPre) before each attention,
    MLP and the unembedding. Attention-only models have no MLP weights (empty lists)."""

    W_E: Float[Tensor, "vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"]
    W_Q: list[Float[Tensor, "heads d_model d_head"]]
    W_K: list[Float[Tensor, "heads d_model d_head"]]
    W_V: list[Float[Tensor, "heads d_model d_head"]]
    W_O: list[Float[Tensor, "heads d_head d_model"]]
    b_Q: list[Float[Tensor, "heads d_head"]]
    b_K: list[Float[Tensor, "heads d_head"]]
    b_V: list[Float[Tensor, "heads d_head"]]
    b_O: list[Float[Tensor, " d_model"]]
    W_U: Float[Tensor, "d_model vocab"]
    b_U: Float[Tensor, " vocab"]
    W_Q_pos: list[Float[Tensor, "heads d_model d_head"]]  # what a shortformer's positions meet: W_Q before any fold
    W_K_pos: list[Float[Tensor, "heads d_model d_head"]]
    shortformer: bool  # positions enter queries and keys only, not the residual stream
    layer_norm: bool  # LNPre (centre + scale) before each layer and the unembedding
    eps: float
    attn_scale: float
    W_in: list[Float[Tensor, "d_model d_mlp"]] = dataclasses.field(default_factory=list)
    b_in: list[Float[Tensor, " d_mlp"]] = dataclasses.field(default_factory=list)
    W_out: list[Float[Tensor, "d_mlp d_model"]] = dataclasses.field(default_factory=list)
    b_out: list[Float[Tensor, " d_model"]] = dataclasses.field(default_factory=list)
    act_fn: str | None = None  # a key of fast.ACTIVATIONS
    mlp_layer_norm: bool = False  # SoLU's LayerNorm after the activation (its weights folded into W_out)
    unembedding: Tensor | None = None  # the stored weights' effective unembedding (``effective_unembedding``)
    loading: dict | None = None  # how they were read (the manifest's model_loading)


def compact_weights(model) -> CompactWeights | None:
    """Weights for the compact forward, or None where the architecture needs TransformerLens' path."""
    cfg = resolved(model.cfg)
    if not compact_supported(cfg):
        return None
    return weights_from_state({k: v.detach() for k, v in model.state_dict().items()}, cfg)


def weights_from_state(state: dict[str, Tensor], cfg: SimpleNamespace) -> CompactWeights:
    """A model's weights from its state dict (HookedTransformer's names) and resolved config, with
    exact folds: LayerNorm weights and biases into the projections that read the LayerNorm's output —
    positions, which a shortformer adds after the LayerNorm, keep meeting the unscaled W_Q and W_K
    (TransformerLens' own fold scales them too, so it refuses shortformers) — SoLU's LayerNorm into
    W_out, and value biases into b_O (attention rows sum to 1)."""
    W_Q, W_K, W_V, b_Q, b_K, b_V, W_Q_pos, W_K_pos = ([] for _ in range(8))
    for i in range(cfg.n_layers):
        w = {name: state[f"blocks.{i}.attn.{name}"] for name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V")}
        W_Q_pos.append(w["W_Q"])
        W_K_pos.append(w["W_K"])
        if f"blocks.{i}.ln1.w" in state:  # LN(x) = norm(x) * g + c feeds x @ W + b
            g, c = state[f"blocks.{i}.ln1.w"], state[f"blocks.{i}.ln1.b"]
            for m in "QKV":
                w[f"b_{m}"] = w[f"b_{m}"] + torch.einsum("d,hde->he", c, w[f"W_{m}"])
                w[f"W_{m}"] = w[f"W_{m}"] * g[None, :, None]
        for out, name in ((W_Q, "W_Q"), (W_K, "W_K"), (W_V, "W_V"), (b_Q, "b_Q"), (b_K, "b_K"), (b_V, "b_V")):
            out.append(w[name])
    W_O = [state[f"blocks.{i}.attn.W_O"] for i in range(cfg.n_layers)]
    b_O = [state[f"blocks.{i}.attn.b_O"] + torch.einsum("he,hed->d", v, o) for i, (v, o) in enumerate(zip(b_V, W_O))]
    W_U, b_U = fold_layer_norm(state, "ln_final", state["unembed.W_U"], state["unembed.b_U"])
    mlp = {} if cfg.attn_only else mlp_weights(state, cfg)
    return CompactWeights(
        W_E=state["embed.W_E"], W_pos=state["pos_embed.W_pos"], W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, b_Q=b_Q, b_K=b_K,
        b_V=[torch.zeros_like(b) for b in b_V], b_O=b_O, W_U=W_U, b_U=b_U, W_Q_pos=W_Q_pos, W_K_pos=W_K_pos,
        shortformer=cfg.positional_embedding_type == "shortformer", layer_norm=cfg.normalization_type in ("LN", "LNPre"),
        eps=float(cfg.eps), attn_scale=float(cfg.attn_scale) if cfg.use_attn_scale else 1.0, **mlp,
    )


def fold_layer_norm(state: dict[str, Tensor], prefix: str, W: Float[Tensor, "d n"], b: Float[Tensor, " n"]
                    ) -> tuple[Float[Tensor, "d n"], Float[Tensor, " n"]]:
    """The LayerNorm ``prefix``'s weights folded into the product that reads it:
    LN(x) @ W + b = norm(x) @ (g W) + (c @ W + b). Unchanged for LNPre or no normalisation."""
    if f"{prefix}.w" not in state:
        return W, b
    return state[f"{prefix}.w"][:, None] * W, b + state[f"{prefix}.b"] @ W


def mlp_weights(state: dict[str, Tensor], cfg) -> dict:
    """Each MLP's weights with ln2 folded into W_in and b_in, and SoLU's LayerNorm (over d_mlp)
    into W_out and b_out."""
    out: dict = {"W_in": [], "b_in": [], "W_out": [], "b_out": [], "act_fn": cfg.act_fn,
                 "mlp_layer_norm": cfg.act_fn.endswith("_ln")}
    for i in range(cfg.n_layers):
        W_in, b_in = fold_layer_norm(state, f"blocks.{i}.ln2", state[f"blocks.{i}.mlp.W_in"], state[f"blocks.{i}.mlp.b_in"])
        W_out, b_out = fold_layer_norm(state, f"blocks.{i}.mlp.ln", state[f"blocks.{i}.mlp.W_out"],
                                       state[f"blocks.{i}.mlp.b_out"])
        for name, value in (("W_in", W_in), ("b_in", b_in), ("W_out", W_out), ("b_out", b_out)):
            out[name].append(value)
    return out


def compact_supported(cfg: SimpleNamespace) -> bool:
    """Whether workers/fast.py computes this (resolved) config exactly: ``config_fields.route``."""
    return config_fields.route(cfg)[0] == "compact"


def random_model(d_vocab: int = 48262, device: str | torch.device = "cpu", seed: int = 0, perturb: bool = True,
                 **overrides):
    """A randomly initialised model of attn-only-2l's shape (or overridden), default-processed.

    ``perturb`` gives the biases and LayerNorm weights random values too (init leaves them 0 and 1),
    so that checks against it exercise every term of the forward.
    """
    HookedTransformer, HookedTransformerConfig = _hooked_transformer()
    shape = dict(
        n_layers=2, d_model=512, n_heads=8, d_head=64, n_ctx=2048, attn_only=True, act_fn=None,
        normalization_type="LN", positional_embedding_type="shortformer", seed=seed,
    )
    shape.update(overrides)
    cfg = HookedTransformerConfig(d_vocab=d_vocab, device=str(device), **shape)
    model = HookedTransformer(cfg, move_to_device=False)
    state = model.state_dict()
    if perturb:
        gen = torch.Generator().manual_seed(seed)
        for key, value in state.items():
            if ".b_" in key or key.startswith("b_") or ".ln" in key or key.startswith("ln_final"):
                state[key] = value + 0.1 * torch.randn(value.shape, generator=gen)
    model.load_and_process_state_dict(state)
    model.cfg.model_name = f"random-{shape['n_layers']}l-v{d_vocab}"
    return model.to(device, print_details=False).eval()
