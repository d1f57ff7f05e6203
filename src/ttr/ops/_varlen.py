"""Packed variable-length sequences (cu_seqlens), shared by every op.

A packed call holds N sequences back to back in one row, x [1, total, H, D], with cumulative lengths
cu_seqlens [N + 1] (0, L_0, L_0 + L_1, ..., total), as the field's kernels (fla) take them. The ops run
them as a padded batch: sequence n becomes row n, its tokens at positions shift_n, ..., shift_n + L_n - 1
of a frame of F tokens, zeros elsewhere. Every op makes its zero-filled positions neutral (no
association written, no decay), so each row's state after the frame is its state after its last token.
A shift lets a mini-batch learner line each sequence up with its own mini-batch offset.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def check_cu_seqlens(cu_seqlens: Tensor, B: int, T: int) -> Tensor:
    """cu_seqlens as int64 on its device: [N + 1], from 0, non-decreasing, ending at T, with B == 1."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32,
                                                                                                torch.int64):
        what = f"{cu_seqlens.dtype} tensor of shape {list(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor) \
            else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D int32 or int64 tensor [N + 1], got {what}")
    if B != 1:
        raise ValueError(f"cu_seqlens packs sequences into one row: the batch size must be 1, got B = {B}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold N + 1 >= 2 offsets, got {cu_seqlens.tolist()}")
    cu = cu_seqlens.long()
    bounds = cu.cpu()
    if int(bounds[0]) != 0 or int(bounds[-1]) != T or bool((bounds[1:] < bounds[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at T = {T}, got "
                         f"{bounds.tolist() if bounds.numel() <= 12 else bounds[:6].tolist() + ['...', int(bounds[-1])]}")
    return cu


class Layout:
    """Where each packed sequence's tokens sit in a padded batch [N, F, ...]: row n, positions
    shift_n .. shift_n + L_n - 1. `pad` and `unpad` move tensors (and their gradients) between the two."""

    def __init__(self, cu_seqlens: Tensor, shift: Tensor | None = None) -> None:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        shift = torch.zeros_like(lengths) if shift is None else shift.to(lengths)
        self.lengths, self.shift = lengths, shift
        self.frame = max(1, int((shift + lengths).max()))
        pos = torch.arange(self.frame, device=lengths.device)
        rel = pos[None, :] - shift[:, None]                                  # [N, F]: index within the sequence
        self.mask = (rel >= 0) & (rel < lengths[:, None])
        self.source = (cu_seqlens[:-1, None] + rel).clamp(0, max(int(cu_seqlens[-1]) - 1, 0))  # packed index
        self.flat = self.mask.flatten().nonzero()[:, 0]                      # frame slots of the packed tokens

    @property
    def n(self) -> int:
        return self.lengths.shape[0]

    def pad(self, x: Tensor) -> Tensor:
        """[1, total, ...] -> [N, F, ...], zeros outside the sequences."""
        out = x[0][self.source]
        mask = self.mask.reshape(*self.mask.shape, *([1] * (x.dim() - 2)))
        return torch.where(mask, out, torch.zeros((), dtype=x.dtype, device=x.device))

    def unpad(self, y: Tensor) -> Tensor:
        """[N, F, ...] -> [1, total, ...]: the sequences' tokens in packed order."""
        return y.flatten(0, 1)[self.flat][None]


def per_sequence(op: Callable[..., tuple[Tensor, Any]], cu_seqlens: Tensor, q: Tensor, k: Tensor, v: Tensor,
                 initial_state: list | None, empty: Any, trim: Callable[[Any, int, int], Any],
                 output_final_state: bool, **kwargs: Any) -> tuple[Tensor, list | None]:
    """A nonparametric memory over packed sequences. Each sequence's state is its own cache of keys and values
    (of its own length), so initial_state and the final state are lists of N per-sequence caches. Without
    caches the sequences run as one padded batch: right padding comes after every real query, which never
    sees it, and trim(final, n, L_n) cuts sequence n's cache out of the padded one. With caches, one call per
    sequence; `empty` is the state of a sequence with no tokens and no cache."""
    N = cu_seqlens.numel() - 1
    if initial_state is not None and not (isinstance(initial_state, (list, tuple)) and len(initial_state) == N
                                          and not isinstance(initial_state[0], Tensor)):
        raise ValueError(f"initial_state with cu_seqlens must be a list of the {N} sequences' caches (None for a "
                         f"sequence without one), got {type(initial_state).__name__}")
    if initial_state is None or all(s is None for s in initial_state):
        layout = Layout(cu_seqlens)
        o, final = op(layout.pad(q), layout.pad(k), layout.pad(v), output_final_state=output_final_state, **kwargs)
        finals = None if final is None else [trim(final, n, int(L)) for n, L in enumerate(layout.lengths.tolist())]
        return layout.unpad(o), finals
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for n in range(N):
        a, b = bounds[n], bounds[n + 1]
        state = initial_state[n]
        if a == b:
            finals.append(empty if state is None else state)
            continue
        o, final = op(q[:, a:b], k[:, a:b], v[:, a:b], initial_state=state, output_final_state=True, **kwargs)
        outs.append(o)
        finals.append(final)
    return torch.cat(outs, 1), (finals if output_final_state else None)
