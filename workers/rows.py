"""A scored batch and its rows: the one place where shard columns are named.

``ScoredBatch`` is what scoring produces for a batch of sequences (one value per sequence, or per
sequence and target). ``to_table`` lays it out as Parquet rows, one per (sequence, target),
sequence-major; ``from_table`` reads such rows back (for ``report --from-rows``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # torch-free at run time: the driver reads rows without it
    from jaxtyping import Float, Int
    from torch import Tensor

    Array = Tensor | np.ndarray  # tensors while scoring, numpy once a shard is assembled

ROW_SCHEMA = pa.schema([
    ("experiment", pa.dictionary(pa.int8(), pa.string())),
    ("scenario", pa.dictionary(pa.int8(), pa.string())),
    ("fixed_token", pa.int32()),
    ("seq", pa.int32()),
    ("a", pa.int32()),
    ("b", pa.int32()),
    ("target", pa.dictionary(pa.int16(), pa.string())),  # B, A, N1..NK, R: K may pass 126
    ("target_token", pa.int32()),
    ("logodds_induction", pa.float32()),
    ("logodds_shuffled", pa.float32()),
    ("strength", pa.float32()),
])
TOKEN_COLUMNS = ("tokens", "shuffled_tokens")  # with --save-tokens: the exact model inputs
# --heads columns (workers/heads.py): per head of the last layer, and ``rest`` for the logit attribution
REST = "rest"  # embeddings, earlier layers and biases: only a logit attribution
MEASURES = ("attn_b", "attn_a", "dla_b")
SHUFFLED = "_shuf"


def head_column(head: str, measure: str, shuffled: bool = False) -> str:
    """The row column of one measure of one head (``h<k>`` or ``rest``): ``h2_attn_b_shuf``."""
    return f"{head}_{measure}{SHUFFLED if shuffled else ''}"


def parse_head_column(name: str) -> tuple[str, str, bool] | None:
    """(head, measure, shuffled) of a column written by ``head_measures``; None for any other column."""
    head, _, rest = name.partition("_")
    shuffled = rest.endswith(SHUFFLED)
    measure = rest.removesuffix(SHUFFLED)
    is_head = head == REST or (head[:1] == "h" and head[1:].isdigit())
    return (head, measure, shuffled) if is_head and measure in MEASURES else None


@dataclass
class ScoredBatch:
    fixed: Int[Array, " batch"]  # the fixed token of per-token experiments, else -1
    seq: Int[Array, " batch"]
    a: Int[Array, " batch"]
    b: Int[Array, " batch"]
    targets: Int[Array, "batch n_targets"]
    induction: Float[Array, "batch n_targets"]  # log-odds after the induction sequence
    shuffled: Float[Array, "batch n_targets"]  # ... and after its shuffled control
    heads: dict[str, Float[Array, " batch"]] = field(default_factory=dict)  # workers/heads.py columns
    tokens: Int[Array, "batch pos"] | None = None
    shuffled_tokens: Int[Array, "batch pos"] | None = None

    @functools.cached_property
    def strength(self) -> Float[np.ndarray, "batch n_targets"]:
        """Induction minus shuffled log-odds, in float32 as stored (numpy batches)."""
        return (self.induction.astype(np.float32) - self.shuffled.astype(np.float32)).astype(np.float32)

    @staticmethod
    def concat(parts: list[ScoredBatch]) -> ScoredBatch:
        """One numpy batch from tensor batches (moved off the device once)."""

        import torch

        def cat(values: list) -> np.ndarray:
            return torch.cat(values).cpu().numpy()

        out = {f.name: cat([getattr(p, f.name) for p in parts]) for f in fields(ScoredBatch)
               if f.name != "heads" and getattr(parts[0], f.name) is not None}
        return ScoredBatch(**out, heads={k: cat([p.heads[k] for p in parts]) for k in parts[0].heads})

    def to_table(self, experiment: str, scenario: str, names: tuple[str, ...]) -> pa.Table:
        """One row per (sequence, target), sequence-major."""
        n_seq, n_t = self.targets.shape
        n = n_seq * n_t

        def per_seq(x: np.ndarray) -> pa.Array:
            return pa.array(np.repeat(x, n_t, axis=0).astype(x.dtype if x.dtype.kind == "f" else np.int32))

        def constant(value: str) -> pa.DictionaryArray:
            return pa.DictionaryArray.from_arrays(np.zeros(n, dtype=np.int8), pa.array([value]))

        arrays = [
            constant(experiment), constant(scenario),
            per_seq(self.fixed), per_seq(self.seq), per_seq(self.a), per_seq(self.b),
            pa.DictionaryArray.from_arrays(np.tile(np.arange(n_t, dtype=np.int16), n_seq), pa.array(list(names))),
            pa.array(self.targets.reshape(-1).astype(np.int32)),
            pa.array(self.induction.reshape(-1).astype(np.float32)),
            pa.array(self.shuffled.reshape(-1).astype(np.float32)),
            pa.array(self.strength.reshape(-1)),
        ]
        schema = list(ROW_SCHEMA)
        for name, values in self.heads.items():  # one value per sequence, repeated on its rows
            arrays.append(per_seq(values.astype(np.float32)))
            schema.append((name, pa.float32()))
        for name in TOKEN_COLUMNS:
            values = getattr(self, name)
            if values is not None:
                seqs = np.repeat(values.astype(np.int32), n_t, axis=0)
                arrays.append(pa.FixedSizeListArray.from_arrays(seqs.reshape(-1), seqs.shape[1]).cast(pa.list_(pa.int32())))
                schema.append((name, pa.list_(pa.int32())))
        return pa.Table.from_arrays(arrays, schema=pa.schema(schema))

    @staticmethod
    def from_table(table: pa.Table, n_targets: int) -> ScoredBatch:
        """The numpy batch behind rows written by ``to_table`` (token columns left out)."""

        def column(name: str) -> np.ndarray:
            return table[name].to_numpy()

        def per_seq(name: str) -> np.ndarray:
            return column(name)[::n_targets]

        def grid(name: str) -> np.ndarray:
            return column(name).reshape(-1, n_targets)

        return ScoredBatch(
            fixed=per_seq("fixed_token"), seq=per_seq("seq"), a=per_seq("a"), b=per_seq("b"),
            targets=grid("target_token"), induction=grid("logodds_induction"), shuffled=grid("logodds_shuffled"),
            heads={n: per_seq(n) for n in table.column_names if parse_head_column(n)})
