"""Neighbours of B (docs/DESIGN.md §1): tokens whose columns of the effective unembedding, centred
across the vocabulary, are nearest B's by cosine similarity."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def centred_unembedding(W_U: Float[Tensor, "d_model vocab"]) -> Float[Tensor, "d_model vocab"]:
    """An effective unembedding centred across the vocabulary: the space in which neighbours are found."""
    W_U = W_U.detach()
    return W_U - W_U.mean(-1, keepdim=True)


def cosine_neighbors(W_U: Float[Tensor, "d_model vocab"], k: int, first_token: int, chunk: int = 4096) -> Int[Tensor, "vocab k"]:
    """The k nearest ids of every token by cosine similarity of W_U columns (self excluded, ids >= first_token)."""
    unit = torch.nn.functional.normalize(W_U.float().T, dim=-1)
    vocab = unit.shape[0]
    out = torch.empty(vocab, k, dtype=torch.int64, device=W_U.device)
    for lo in range(0, vocab, chunk):
        sim = unit[lo : lo + chunk] @ unit.T
        sim[:, :first_token] = float("-inf")
        rows = torch.arange(lo, min(lo + chunk, vocab), device=W_U.device)
        sim[rows - lo, rows] = float("-inf")
        out[lo : lo + chunk] = sim.topk(k, dim=-1).indices
    return out
