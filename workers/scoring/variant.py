"""What a scorer runs — precision, attention, log-sum-exp, compilation — and the only home of its
defaults, fallbacks and accuracy bounds. Everything else (the shard's record, the bench, ``plan``'s
rates, the parity tests) asks ``Variant``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, replace

PRECISIONS = ("fp32", "tf32", "bf16")
# The most a scorer's log-odds may differ from TransformerLens' float64 forward of the same weights, per
# precision: the load-time check, the bench and the parity tests hold every path to it.
ACCURACY_BOUNDS = {"fp32": 1e-3, "tf32": 0.1, "bf16": 0.1}
# how the layers before the last attend over every position: torch's scaled_dot_product_attention, batched
# float32 products of each sequence's [pos, pos] scores, or Triton programs per sequence (workers/kernels)
ATTENTIONS = ("sdpa", "products", "triton")
# what reduces the logits to (top, log-sum-exp of the rest): torch in row chunks, or one Triton read of each row
LSES = ("torch", "triton")


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` is bf16 on a GPU and fp32 on a CPU (docs/PERFORMANCE.md has the errors and speeds behind it)."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose auto, {', '.join(PRECISIONS)}")
    return precision


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class Variant:
    device: str  # "cuda" or "cpu"
    precision: str
    attention: str
    lse: str
    compiled: bool

    @classmethod
    def default(cls, device_type: str, precision: str = "auto", triton: bool | None = None) -> Variant:
        """What measured fastest within the bound (docs/PERFORMANCE.md). On CUDA: compiled, the Triton
        log-sum-exp, and the Triton attention except at fp32, where the products attention ties it at
        IEEE float32 products. On a CPU: eager (torch.compile gains 10–25 % but costs each actor ~15 s
        of compilation) and torch's SDPA."""
        precision = resolve_precision(precision, device_type)
        if device_type != "cuda":
            return cls("cpu", precision, "sdpa", "torch", compiled=False)
        triton = has_triton() if triton is None else triton
        attention = "triton" if triton and precision != "fp32" else "products"
        return cls("cuda", precision, attention, "triton" if triton else "torch", compiled=True)

    def __post_init__(self):
        resolve_precision(self.precision, self.device)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}: choose {', '.join(ATTENTIONS)}")
        if self.lse not in LSES:
            raise ValueError(f"unknown lse {self.lse!r}: choose {', '.join(LSES)}")
        if "triton" in (self.attention, self.lse) and not has_triton():
            raise ValueError("the Triton attention and log-sum-exp need Triton, which is not installed")

    def with_options(self, **options) -> Variant:
        """This variant with the options given (None: unchanged)."""
        return replace(self, **{k: v for k, v in options.items() if v is not None})

    def without_triton(self) -> Variant:
        """What runs where a Triton kernel fails to build on some machine: the same numbers in torch."""
        return replace(self, attention="products" if self.attention == "triton" else self.attention, lse="torch")

    @property
    def bound(self) -> float:
        return ACCURACY_BOUNDS[self.precision]

    @property
    def native_bf16(self) -> bool:
        """bf16 products on the hardware: CUDA. CPUs round inputs to bf16 and multiply in float32: on AVX2
        bf16 products are far slower than float32, and where they are fast (AMX) torch's CPU product rounds
        its float32 sums to bf16, which toy-2l's sharp attention does not tolerate (docs/PERFORMANCE.md)."""
        return self.device == "cuda" and self.precision == "bf16"

    @property
    def bf16_logits(self) -> bool:
        """The unembedding's float32 sums rounded once to bf16, as bf16 tensor cores return them: half the
        memory traffic of float32 logits; the top token and the targets are recomputed in float32."""
        return self.native_bf16

    def is_default(self) -> bool:
        return self == Variant.default(self.device, self.precision)

    def as_dict(self) -> dict:
        """What a shard, the manifest and ``bench --json`` record of the variant."""
        return {k: v for k, v in asdict(self).items() if k != "device"}
