"""Pieces every chunkwise form shares: padding to whole chunks, the chunk layout, decay masks.

Chunk layout: [B, T, H, D] -> [B, H, N, C, D] with N = ceil(T / C) chunks of C tokens. Padding uses
zero keys and values (no association) and zero log-gates (no decay), so the state after the padded
tail equals the state after token T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def to_chunks(x: Tensor, chunk: int) -> Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padded to N * C tokens."""
    B, T = x.shape[:2]
    pad = (-T) % chunk
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.movedim(1, 2)
    return x.reshape(B, x.shape[1], -1, chunk, *x.shape[3:])


def from_chunks(x: Tensor, T: int) -> Tensor:
    """[B, H, N, C, D] -> [B, T, H, D], dropping the padding."""
    B, H, N, C = x.shape[:4]
    return x.reshape(B, H, N * C, *x.shape[4:])[:, :, :T].movedim(2, 1)


def to_chunk_major(x: Tensor, chunk: int) -> Tensor:
    """[B, T, H, D] -> [N * B * H, C, D] contiguous, zero-padded to N * C tokens: chunk-major, so a pass over the
    chunks steps through contiguous blocks [B * H, C, D] (the hand-written passes' layout)."""
    B, T, H, D = x.shape
    N = -(-T // chunk)
    if N * chunk != T:
        x = F.pad(x, (0, 0, 0, 0, 0, N * chunk - T))
    return x.reshape(B, N, chunk, H, D).permute(1, 0, 3, 2, 4).reshape(N * B * H, chunk, D)


def from_chunk_major(x: Tensor, B: int, T: int, H: int) -> Tensor:
    """[N * B * H, C, D] -> [B, T, H, D] (contiguous), dropping the padding."""
    C, D = x.shape[1:]
    N = -(-T // C)
    x = x.view(N, B, H, C, D).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, D)
    return x[:, :T].contiguous() if N * C != T else x


def masked_exp(diff: Tensor, mask: Tensor) -> Tensor:
    """exp(diff) where mask, exactly 0 elsewhere; exp never sees the masked (possibly huge) entries."""
    return torch.exp(torch.where(mask, diff, torch.full_like(diff, -math.inf)))


def decay_mask(G: Tensor) -> Tensor:
    """Within-chunk decay exp(G_i - G_j) for j <= i, else 0. G: [..., C] cumulative log-gates -> [..., C, C]."""
    return masked_exp(G[..., :, None] - G[..., None, :], causal_mask(G.shape[-1], G.device))


def causal_mask(C: int, device: torch.device) -> Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril()


def check_chunk_size(chunk_size: int) -> None:
    """Chunk sizes are powers of two (the vector-gate scores halve blocks down to single tokens)."""
    if (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
            or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size!r}")
