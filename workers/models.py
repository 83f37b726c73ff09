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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workers.sequences import FIRST_TOKEN

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


@contextlib.contextmanager
def checkpoint_dir(spec: str) -> Iterator[Path | None]:
    """The local checkpoint directory of ``spec`` (an ``s3://`` one downloaded to a temporary
    directory for the duration), or None where ``spec`` is not a checkpoint."""
    if spec == TOY_MODEL:
        yield TOY_DIR
    elif spec.startswith("s3://"):
        from storage import open_store

        store = open_store(spec)
        with tempfile.TemporaryDirectory(prefix="induction-sweep-model-") as tmp:
            for name in CHECKPOINT_FILES + TOKENIZER_FILES:
                if store.exists(name):
                    (Path(tmp) / name).write_bytes(store.get(name))
            yield Path(tmp)
    elif Path(spec).expanduser().is_dir():
        yield Path(spec).expanduser()
    else:
        yield None


CENTRE_WRITES = "center_residual_writes"  # our step: TransformerLens' centring without a shortformer's W_pos
# how load_weights loads: recorded in the manifest like load_processed's check
DIRECT_LOADING = {"loader": "safetensors", "processing": "exact",
                  "steps": [f"{CENTRE_WRITES} (under a LayerNorm)", "fold_ln (LayerNorm weights, where present, SoLU's "
                            "included; positions unscaled)", "fold_value_biases"],
                  "check": "none needed: each step is exact (the LayerNorm removes the residual stream's mean; its "
                           "weights fold into what reads its output; attention rows sum to 1)"}


def centre_residual_writes(state: dict[str, Tensor], include_pos: bool) -> dict[str, Tensor]:
    """Every weight that writes to the residual stream (W_E, W_O and b_O, W_out and b_out, and W_pos
    where positions write there) centred across d_model: exact where every reader of the residual
    stream is a LayerNorm, and it keeps bf16 roundings small (no large common mean for the LayerNorm
    to cancel). A shortformer's W_pos is left alone: it feeds queries and keys after the LayerNorm."""
    writes = (".attn.W_O", ".attn.b_O", ".mlp.W_out", ".mlp.b_out")
    keys = [k for k in state if k == "embed.W_E" or k.endswith(writes) or (include_pos and k == "pos_embed.W_pos")]
    return {**state, **{k: state[k] - state[k].mean(-1, keepdim=True) for k in keys}}


def load_weights(spec: str, device: str | torch.device = "cpu") -> CompactWeights | None:
    """The compact forward's weights read straight from a checkpoint, without TransformerLens, for
    the architectures it computes (``compact_supported``). Exact steps only: under a
    LayerNorm the residual stream's writes are centred (``centre_residual_writes``), then
    ``weights_from_state`` folds LayerNorm weights (positions unscaled) and value biases. None where
    the model needs TransformerLens' loading (hub names, RMS, other architectures)."""
    with checkpoint_dir(spec) as directory:
        if directory is None:
            return None
        cfg, _ = checkpoint_config(directory, spec)  # config.json only: no tokenizer, no transformers import
        if not compact_supported(cfg):  # RMS, rotary, gated or parallel MLPs, or another variant
            return None
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"), device=str(device))
    if getattr(cfg, "normalization_type", "LN") in ("LN", "LNPre"):
        shortformer = getattr(cfg, "positional_embedding_type", "standard") == "shortformer"
        state = centre_residual_writes(state, include_pos=not shortformer)
    return weights_from_state(state, cfg)


PROCESSING = ("exact", "tl-default")
CHECK_TOLERANCE = 1e-4  # max |Δ log-prob| in float32 between the loaded model and the weights as stored


def processing_steps(cfg, processing: str = "exact") -> dict[str, bool]:
    """TransformerLens' processing flags for ``cfg``: its defaults (``tl-default``, how the post
    loaded its model), or (``exact``) the same without the two steps that assume positions write to
    the residual stream, for shortformer models, whose positions enter queries and keys after the
    LayerNorm (TransformerLens PR #204): centring W_pos, and folding LayerNorm weights into W_Q and
    W_K (the positions would be scaled too). The load-time check catches any other such step."""
    normalization = getattr(cfg, "normalization_type", "LN")  # TransformerLens' defaults for absent fields
    steps = {"fold_ln": normalization in ("LN", "RMS"), "center_writing_weights": True,
             "center_unembed": True, "fold_value_biases": True, CENTRE_WRITES: False}
    if processing == "exact" and getattr(cfg, "positional_embedding_type", "standard") == "shortformer":
        steps["fold_ln"] = steps["center_writing_weights"] = False
        steps[CENTRE_WRITES] = normalization in ("LN", "LNPre")  # the rest of the centring, W_pos left alone
    return steps


def load_processed(build, cfg, name: str, processing: str, device: str | torch.device):
    """``build(steps)`` with ``processing``'s steps, checked against ``build`` with none on 32 random
    sequences. Exact processing over CHECK_TOLERANCE is a ModelInputError naming the step that
    changes the function; TransformerLens' defaults are kept whatever the check says, and recorded."""
    steps = processing_steps(cfg, processing)
    model, raw = build(steps), build(dict.fromkeys(steps, False))  # raw: the weights as stored
    tokens = torch.randint(0, cfg.d_vocab, (32, min(24, cfg.n_ctx)), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)

    @torch.no_grad()
    def diff(a, b) -> float:
        return float((a(tokens).log_softmax(-1) - b(tokens).log_softmax(-1)).abs().max())

    found = diff(model, raw)
    if processing == "exact" and found > CHECK_TOLERANCE:
        applied = [s for s in steps if steps[s]]
        worst = max(applied, key=lambda s: diff(build({k: k == s for k in steps}), raw))
        raise ModelInputError(f"{name}: TransformerLens' {worst} changes this model's function (max |Δ log-prob| "
                              f"{found:.2g} > {CHECK_TOLERANCE:g} against the stored weights)")
    model.induction_sweep_loading = {"loader": "transformer_lens", "processing": processing,
                                     "steps": [s for s in steps if steps[s]], "max_abs_diff_log_prob": found,
                                     "tolerance": CHECK_TOLERANCE}
    return model


def load_for_scoring(spec: str, device: str | torch.device, processing: str = "exact") -> tuple[Any, dict]:
    """What a scorer needs, and how it was loaded: the compact forward's weights read from the
    checkpoint directly where ``exact`` processing allows it (no TransformerLens import), else the
    TransformerLens model."""
    weights = load_weights(spec, device) if processing == "exact" else None
    if weights is not None:
        return weights, DIRECT_LOADING
    model = load_model(spec, device, processing)
    return model, model.induction_sweep_loading


def load_model(spec: str, device: str | torch.device = "cpu", processing: str = "exact"):
    """Load a HookedTransformer in eval mode on ``device``, processed as ``processing`` says and
    checked against its weights as stored (``model.induction_sweep_loading`` records both);
    ModelInputError for a bad spec."""
    with checkpoint_dir(spec) as directory:
        if directory is not None:
            return load_checkpoint(directory, device, name=spec, processing=processing)
    if is_hub_name(spec):
        HookedTransformer, _ = _hooked_transformer()
        from transformer_lens.loading_from_pretrained import get_pretrained_model_config

        def build(steps: dict):
            tl_steps = {k: v for k, v in steps.items() if k != CENTRE_WRITES}
            model = HookedTransformer.from_pretrained(spec, device=str(device), **tl_steps).eval()
            if steps[CENTRE_WRITES]:
                model.load_state_dict(centre_residual_writes(model.state_dict(), include_pos=False))
            return model

        model = load_processed(build, get_pretrained_model_config(spec), spec, processing, device)
        model.cfg.model_name = spec
        return model
    raise ModelInputError(
        f"unknown model {spec!r}: not {TOY_MODEL}, not a checkpoint directory, not a TransformerLens model name"
    )


def load_checkpoint(directory: Path, device: str | torch.device, name: str | None = None, processing: str = "exact"):
    """HookedTransformer(cfg) + load_and_process_state_dict from a checkpoint directory."""
    HookedTransformer, HookedTransformerConfig = _hooked_transformer()
    name = name or str(directory)
    raw, extra = checkpoint_config(directory, name)
    tokenizer = checkpoint_tokenizer(directory, name)
    with _as_input_error(name):
        fields = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
        cfg_dict = {k: v for k, v in vars(raw).items() if k in fields and k not in ("device", "dtype", "n_params")}
        if tokenizer is None:
            cfg_dict["tokenizer_name"] = None  # a checkpoint never reaches for the hub
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))

        def build(steps: dict):  # processing changes the config (LN becomes LNPre) and the tensors: fresh ones
            model = HookedTransformer(HookedTransformerConfig(**cfg_dict, device=str(device)), tokenizer=tokenizer,
                                      move_to_device=False)
            stored = centre_residual_writes(state, include_pos=False) if steps[CENTRE_WRITES] else state
            model.load_and_process_state_dict({k: v.clone() for k, v in stored.items()},
                                              **{k: v for k, v in steps.items() if k != CENTRE_WRITES})
            return model.to(device, print_details=False).eval()

        model = load_processed(build, HookedTransformerConfig(**cfg_dict), name, processing, device)
    model.cfg.model_name = name
    model.induction_sweep_extra = extra  # e.g. bos_token_id
    return model


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
    cfg: Any  # HookedTransformerConfig, or a namespace of config.json's fields
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
        return self.compact and bool(getattr(self.cfg, "attn_only", False))

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
    for a bad spec (unknown name, missing or corrupt checkpoint)."""
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
            head = store.get_range("model.safetensors", 0, min(size, 8 + (1 << 24)))
            (Path(tmp) / "model.safetensors").write_bytes(head)  # the header is all that is read here
            return describe_checkpoint(Path(tmp), spec)
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
        return ModelInfo(spec, cfg, tokenizer, default_bos(spec, tokenizer))
    raise ModelInputError(
        f"unknown model {spec!r}: not {TOY_MODEL}, not a checkpoint directory, not a TransformerLens model name"
    )


def _safetensors_header(path: Path) -> dict:
    """The tensor names, dtypes and shapes of a safetensors file (its JSON header)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= 1 << 24:
            raise ValueError(f"not a safetensors file (header size {size})")
        return json.loads(f.read(size))


@contextlib.contextmanager
def _as_input_error(name: str) -> Iterator[None]:
    """Corrupt JSON, safetensors or tokenizer files, missing fields: a ModelInputError naming the checkpoint."""
    try:
        yield
    except ModelInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the file's corruption raises
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelInputError(f"checkpoint {name} cannot be loaded: {reason[:200]}") from None


def checkpoint_config(directory: Path, name: str) -> tuple[SimpleNamespace, dict]:
    """config.json's fields (checked against the safetensors header) and its induction_sweep section."""
    missing = [f for f in CHECKPOINT_FILES if not (directory / f).is_file()]
    if missing:
        raise ModelInputError(f"checkpoint {name} lacks {', '.join(missing)}")
    with _as_input_error(name):
        raw = json.loads((directory / "config.json").read_text())
        header = _safetensors_header(directory / "model.safetensors")
        cfg = SimpleNamespace(**{k: v for k, v in raw.items() if k != "induction_sweep"})
        shape = header.get("embed.W_E", {}).get("shape")
        if shape != [cfg.d_vocab, cfg.d_model]:
            raise ValueError(f"embed.W_E has shape {shape}, config.json says [{cfg.d_vocab}, {cfg.d_model}]")
    return cfg, raw.get("induction_sweep") or {}


def checkpoint_tokenizer(directory: Path, name: str):
    """The checkpoint's tokenizer (transformers' AutoTokenizer), or None where it has no tokenizer files."""
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    with _as_input_error(name):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))


def describe_checkpoint(directory: Path, name: str) -> ModelInfo:
    cfg, extra = checkpoint_config(directory, name)
    tokenizer = checkpoint_tokenizer(directory, name)
    return ModelInfo(name, cfg, tokenizer, default_bos(name, tokenizer, extra))


def centred_unembedding(W_U: Float[Tensor, "d_model vocab"]) -> Float[Tensor, "d_model vocab"]:
    """W_U centred across the vocabulary, as TransformerLens' processing leaves it (exact for
    log-probs): the space in which neighbours of B are found (docs/DESIGN.md §1)."""
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


def compact_weights(model) -> CompactWeights | None:
    """Weights for the compact forward, or None where the architecture needs TransformerLens' path."""
    if not compact_supported(model.cfg):
        return None
    return weights_from_state({k: v.detach() for k, v in model.state_dict().items()}, model.cfg)


def weights_from_state(state: dict[str, Tensor], cfg) -> CompactWeights:
    """A model's weights from its state dict (HookedTransformer's names), with exact folds: LayerNorm
    weights and biases into the projections that read the LayerNorm's output — positions, which a
    shortformer adds after the LayerNorm, keep meeting the unscaled W_Q and W_K (TransformerLens'
    own fold scales them too, so it refuses shortformers) — SoLU's LayerNorm into W_out, and value
    biases into b_O (attention rows sum to 1)."""
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
    mlp = {} if getattr(cfg, "attn_only", False) else mlp_weights(state, cfg)
    use_scale = getattr(cfg, "use_attn_scale", True)
    return CompactWeights(
        W_E=state["embed.W_E"], W_pos=state["pos_embed.W_pos"], W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, b_Q=b_Q, b_K=b_K,
        b_V=[torch.zeros_like(b) for b in b_V], b_O=b_O, W_U=W_U, b_U=b_U, W_Q_pos=W_Q_pos, W_K_pos=W_K_pos,
        shortformer=getattr(cfg, "positional_embedding_type", "standard") == "shortformer",
        layer_norm=getattr(cfg, "normalization_type", "LN") in ("LN", "LNPre"), eps=float(getattr(cfg, "eps", 1e-5)),
        attn_scale=float(getattr(cfg, "attn_scale", None) or cfg.d_head ** 0.5) if use_scale else 1.0, **mlp,
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


def compact_supported(cfg) -> bool:
    """Whether workers/fast.py computes this architecture exactly: attention-only or attention then
    MLP (ungated, an activation in fast.ACTIVATIONS) in each block, LN (its weights folded by
    ``weights_from_state``), LNPre or no normalisation, standard or shortformer positions, none of
    the variants below. ``cfg`` is a HookedTransformerConfig or config.json's fields (absent ones
    take TransformerLens' defaults)."""

    def get(name, default=None):
        return getattr(cfg, name, default)

    from workers.fast import ACTIVATIONS  # fast.py imports this module

    normalization = get("normalization_type", "LN")
    mlp_ok = (get("act_fn") in ACTIVATIONS and not get("gated_mlp", False) and not get("parallel_attn_mlp", False)
              and not get("num_experts"))
    return bool(
        (get("attn_only", False) or mlp_ok)
        and normalization in ("LN", "LNPre", None)
        and get("positional_embedding_type", "standard") in ("standard", "shortformer")
        and not get("final_rms", False)
        and get("n_key_value_heads") in (None, get("n_heads"))
        and not get("use_local_attn", False)
        and not get("use_qk_norm", False)
        and not get("use_attn_in", False)
        and not get("use_split_qkv_input", False)
        and not get("use_normalization_before_and_after", False)
        and not get("post_embedding_ln", False)
        and not (get("attn_scores_soft_cap", -1.0) or -1.0) > 0
        and not (get("output_logits_soft_cap", -1.0) or -1.0) > 0
        and not get("use_logn_attn", False)
        and not get("scale_attn_by_inverse_layer_idx", False)
        and not get("use_attention_sinks", False)
        and get("original_architecture") not in ("GPTNeoForCausalLM",)  # local attention layers
        and (get("d_vocab_out", -1) in (-1, None, get("d_vocab")))
    )


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
