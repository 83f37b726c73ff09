"""Induction sequences and their shuffled controls, generated on the model's device.

Layout (docs/DESIGN.md §1): ``BOS, r×10, A, B, r×10, A`` — 24 tokens. The shuffled control permutes
the 22 tokens between BOS and the final A, each sequence with its own permutation.

Every random draw is a counter-based hash (splitmix64) of
``(seed, experiment, scenario, fixed token, sequence index, draw number)``, so a sequence is the
same whatever the batch, shard, actor or device that makes it, and a resumed run regenerates
exactly the same work. Integer arithmetic wraps identically on every device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from workers.experiments import neighbor_rank
from workers.layout import A_POS, B_POS, FILLER_POS, FIRST_TOKEN, N_FILLER, N_INNER, SEQ_LEN  # noqa: F401 (re-exported)

# Draw numbers (the hash counter) for each random quantity of one sequence.
DRAW_FILLER = 0  # 20 draws
DRAW_A = 20
DRAW_B = 21
DRAW_SHUFFLE = 22  # 22 draws
DRAW_R = 44
DRAW_CONTROL = 45  # draws reserved for control experiments

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(x: Int[Tensor, "*shape"], s: int) -> Int[Tensor, "*shape"]:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: Int[Tensor, "*shape"]) -> Int[Tensor, "*shape"]:
    """The splitmix64 step on int64 tensors (two's-complement wrap-around = mod 2**64)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def sequence_keys(
    seed: int, experiment: int, scenario: int, fixed_token: Int[Tensor, " batch"], seq: Int[Tensor, " batch"]
) -> Int[Tensor, " batch"]:
    """One 64-bit key per sequence, a function of its identity alone (``experiment``, ``scenario``:
    the registry's codes, workers/experiments.py)."""
    head = splitmix64(torch.tensor(_signed(seed), dtype=torch.int64, device=seq.device))
    head = splitmix64(head ^ experiment)
    head = splitmix64(head ^ scenario)
    return splitmix64(splitmix64(head ^ (fixed_token + 1)) ^ seq)


def draws(keys: Int[Tensor, " batch"], first: int, n: int) -> Int[Tensor, "batch n"]:
    """Draws ``first .. first+n-1`` of each sequence: non-negative 63-bit integers."""
    counter = torch.arange(first + 1, first + n + 1, dtype=torch.int64, device=keys.device)
    return _shr(splitmix64(keys[:, None] + counter * _GOLDEN), 1)


def uniform_tokens(bits: Int[Tensor, "*shape"], d_vocab: int) -> Int[Tensor, "*shape"]:
    """Map 63-bit draws to ids uniform on ``FIRST_TOKEN .. d_vocab-1`` (multiply-shift)."""
    return FIRST_TOKEN + ((_shr(bits, 32) * (d_vocab - FIRST_TOKEN)) >> 31)


@dataclass
class SequenceBatch:
    tokens: Int[Tensor, "batch 24"]  # BOS, r×10, A, B, r×10, A
    shuffled: Int[Tensor, "batch 24"]  # BOS, permuted 22 inner tokens, A
    a: Int[Tensor, " batch"]
    b: Int[Tensor, " batch"]
    r: Int[Tensor, " batch"]  # a fresh random target token per sequence
    keys: Int[Tensor, " batch"]


def make_batch(
    keys: Int[Tensor, " batch"],
    d_vocab: int,
    bos: int,
    a_fixed: Int[Tensor, " batch"],
    b_fixed: Int[Tensor, " batch"],
    rule: Rule | None = None,
) -> SequenceBatch:
    """Build induction sequences and shuffled controls from per-sequence keys.

    ``a_fixed``/``b_fixed`` hold the fixed A/B id of each sequence, or -1 where it is drawn.
    ``rule`` (a control experiment's) alters the sequence before it is shuffled.
    """
    batch = keys.shape[0]
    filler = uniform_tokens(draws(keys, DRAW_FILLER, 2 * N_FILLER), d_vocab)
    drawn_ab = uniform_tokens(draws(keys, DRAW_A, 2), d_vocab)
    a = torch.where(a_fixed >= 0, a_fixed, drawn_ab[:, 0])
    b = torch.where(b_fixed >= 0, b_fixed, drawn_ab[:, 1])
    bos_col = torch.full((batch, 1), bos, dtype=torch.int64, device=keys.device)
    tokens = torch.cat(
        [bos_col, filler[:, :N_FILLER], a[:, None], b[:, None], filler[:, N_FILLER:], a[:, None]], dim=1
    )
    if rule is not None:
        tokens = (RULES[rule] if isinstance(rule, str) else rule)(tokens, keys, d_vocab)
    return SequenceBatch(
        tokens=tokens,
        shuffled=shuffle_inner(tokens, keys),
        a=a,
        b=b,
        r=uniform_tokens(draws(keys, DRAW_R, 1)[:, 0], d_vocab),
        keys=keys,
    )


def shuffle_permutation(keys: Int[Tensor, " batch"], n_inner: int = N_INNER) -> Int[Tensor, "batch n_inner"]:
    """Per sequence, which inner position each inner slot of the shuffled control takes its token from."""
    return torch.argsort(draws(keys, DRAW_SHUFFLE, n_inner), dim=1, stable=True)


def shuffled_positions(keys: Int[Tensor, " batch"], positions: list[int], n_inner: int = N_INNER) -> Int[Tensor, "batch n"]:
    """Where the tokens at ``positions`` of a sequence sit in its shuffled control."""
    inverse = torch.argsort(shuffle_permutation(keys, n_inner), dim=1)
    return 1 + inverse[:, [p - 1 for p in positions]]


def shuffle_inner(tokens: Int[Tensor, "batch pos"], keys: Int[Tensor, " batch"]) -> Int[Tensor, "batch pos"]:
    """Permute the tokens between the first and the last position, uniformly, per sequence."""
    perm = shuffle_permutation(keys, tokens.shape[1] - 2)
    shuffled = tokens.clone()
    shuffled[:, 1:-1] = tokens[:, 1:-1].gather(1, perm)
    return shuffled


# Sequence rules of the control experiments: each takes the plain induction sequences and returns
# altered ones (a fresh tensor). Their random draws start at DRAW_CONTROL.
Rule = Callable[[Int[Tensor, "batch pos"], Int[Tensor, " batch"], int], Int[Tensor, "batch pos"]]


def _fresh(keys: Int[Tensor, " batch"], d_vocab: int) -> Int[Tensor, " batch"]:
    return uniform_tokens(draws(keys, DRAW_CONTROL, 1)[:, 0], d_vocab)


def no_b(tokens: Int[Tensor, "batch pos"], keys: Int[Tensor, " batch"], d_vocab: int) -> Int[Tensor, "batch pos"]:
    """The first B replaced by a random token: B nowhere in the context, but by chance."""
    out = tokens.clone()
    out[:, B_POS] = _fresh(keys, d_vocab)
    return out


def no_first_a(tokens: Int[Tensor, "batch pos"], keys: Int[Tensor, " batch"], d_vocab: int) -> Int[Tensor, "batch pos"]:
    """The first A replaced by a random token, B kept where it was: B present without the A→B pair."""
    out = tokens.clone()
    out[:, A_POS] = _fresh(keys, d_vocab)
    return out


def b_elsewhere(tokens: Int[Tensor, "batch pos"], keys: Int[Tensor, " batch"], d_vocab: int) -> Int[Tensor, "batch pos"]:
    """B moved to a random filler position, a random token in its place."""
    out = no_b(tokens, keys, d_vocab)
    slots = torch.tensor(FILLER_POS, device=tokens.device)
    slot = slots[(_shr(draws(keys, DRAW_CONTROL + 1, 1)[:, 0], 32) * len(FILLER_POS)) >> 31]
    out[torch.arange(len(out), device=out.device), slot] = tokens[:, B_POS]
    return out


RULES = {"no_b": no_b, "b_elsewhere": b_elsewhere, "no_first_a": no_first_a}  # controls' rules by name (workers/experiments.py)


def target_tokens(names: tuple[str, ...], batch: SequenceBatch,
                  neighbors: Int[Tensor, "vocab k"] | None) -> Int[Tensor, "batch n_targets"]:
    """The token of each named target (B, A, R, Nk) of each sequence."""
    by_name = {"B": batch.b, "A": batch.a, "R": batch.r}
    return torch.stack([by_name[n] if n in by_name else neighbors[batch.b, neighbor_rank(n) - 1] for n in names], dim=1)
