"""Where a model comes from, and what the driver knows of it before any weights are read.

A model spec is one of
  * ``toy-2l`` — the bundled checkpoint in ``workers/toy_2l`` (trained by ``workers/train_toy.py``);
  * a local checkpoint directory or an ``s3://`` one: ``config.json`` (HookedTransformerConfig
    fields, plus an optional ``induction_sweep`` section) + ``model.safetensors`` + optional
    tokenizer files;
  * a TransformerLens model name (``attn-only-2l``, ``gpt2-small``...), loaded from the hub.
``describe`` checks a checkpoint whole (config fields, every tensor in the safetensors header)
without reading its weights, and without importing torch for checkpoint directories.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

from workers.layout import FIRST_TOKEN
from workers.model import fields as config_fields
from workers.model.fields import ConfigFieldError

TOY_MODEL = "toy-2l"


TOY_DIR = Path(__file__).parent.parent / "toy_2l"


CHECKPOINT_FILES = ("config.json", "model.safetensors")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


DEFAULT_PAIR = (" Fab", "ien")  # the seed post's fixed pair


FALLBACK_PAIR = (1000, 1500)  # ids used where the tokenizer lacks those strings (or there is none)


DEFAULT_BOS = 1  # the attn-only-Nl models' BOS id
# how weights are loaded: as trained (exact folds only), or with TransformerLens' default processing (workers/model/hooked.py)
PROCESSING = ("exact", "tl-default")


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


FLOAT64_PARAMETERS = 400_000_000  # above this, checks against the stored weights run in float32 (float64 copies cost too much)


def parameter_count(cfg: SimpleNamespace) -> int:
    """About how many weights a resolved config has: enough to decide whether float64 copies are affordable."""
    attention = 4 * cfg.d_model * cfg.d_head * cfg.n_heads
    mlp = 0 if cfg.attn_only else (3 if cfg.gated_mlp else 2) * cfg.d_model * cfg.d_mlp
    return cfg.n_layers * (attention + mlp) + cfg.d_model * (cfg.d_vocab + cfg.d_vocab_out)


def unknown_model(spec: str) -> str:
    return f"unknown model {spec!r}: not {TOY_MODEL}, not a checkpoint directory, not a TransformerLens model name"


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
        """Whether the actors will score this model with the compact forward (workers/compact/forward.py)."""
        return compact_supported(self.cfg)

    @property
    def attn_only_compact(self) -> bool:
        """The compact forward of an attention-only model: what --heads and the circuit scores read
        (which compute LayerNorms and added positions, not RMSNorm or rotary embeddings)."""
        return (self.compact and self.cfg.attn_only and self.cfg.normalization_type in ("LN", "LNPre", None)
                and self.cfg.positional_embedding_type != "rotary")

    def token_strings(self) -> list[str]:
        """Printable string of every id: the tokenizer's, or ``#<id>`` where there is none."""
        if self.tokenizer is None:
            return [f"#{i}" for i in range(self.d_vocab)]
        return self.tokenizer.batch_decode([[i] for i in range(self.d_vocab)])

    def resolve_token(self, text: str | int, option: str) -> int:
        """An id from an integer (``123`` or ``#123``) or a string that is exactly one token."""
        text = str(text)
        digits = text[1:] if text.startswith("#") else text
        if re.fullmatch(r"[+-]?[0-9]+", digits):  # ASCII digits: "¹²".isdigit() is true, int() refuses it
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
    import torch

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


def compact_supported(cfg: SimpleNamespace) -> bool:
    """Whether workers/compact/forward.py computes this (resolved) config exactly: ``config_fields.route``."""
    return config_fields.route(cfg)[0] == "compact"
