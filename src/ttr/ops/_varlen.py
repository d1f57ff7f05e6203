"""Packed variable-length sequences (cu_seqlens), shared by every op.

A packed call holds N sequences back to back in one row, x [1, total, H, D], with cumulative lengths
cu_seqlens [N + 1] (0, L_0, L_0 + L_1, ..., total), as the field's kernels (fla) take them. The ops run
them as padded batches: sequence n becomes a row, its tokens at positions shift_n, ..., shift_n + L_n - 1
of a frame, zeros elsewhere. Every op makes its zero-filled positions neutral (no association written,
no decay), so each row's state after the frame is its state after its last token. A shift lets a
mini-batch learner line each sequence up with its own mini-batch offset. Sequences of similar lengths
share a batch (length_groups), so padding costs little: measured at 8 sequences of 256 to 2048 tokens
(ttr bench), one packed call is 1.6-2.1x faster than the batch padded to the longest and 1.0-1.4x
faster than one call per sequence.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def check_cu_seqlens(cu_seqlens: Tensor, B: int, T: int) -> Tensor:
    """cu_seqlens as int64 on its device: [N + 1], from 0, non-decreasing, ending at T, with B == 1."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32,
                                                                                                torch.int64):
        what = f"{cu_seqlens.dtype} tensor of shape {list(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor) \
            else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D int32 or int64 tensor [N + 1], got {what}")
    if cu_seqlens.is_meta:
        raise ValueError("cu_seqlens is a meta tensor (a shape without values): the offsets must be known")
    if B != 1:
        raise ValueError(f"cu_seqlens packs sequences into one row: the batch size must be 1, got B = {B}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold N + 1 >= 2 offsets, got {cu_seqlens.tolist()}")
    cu = cu_seqlens.long()
    bounds = cu.cpu()
    if int(bounds[0]) != 0 or int(bounds[-1]) != T or bool((bounds[1:] < bounds[:-1]).any()):
        seen = bounds.tolist() if bounds.numel() <= 12 else bounds[:6].tolist() + ["...", int(bounds[-1])]
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at T = {T}, got {seen}")
    return cu


class Layout:
    """Where packed sequences' tokens sit in a padded batch [N, F, ...]: sequence rows[n] (all of them by
    default) in row n, at positions shift_n .. shift_n + L_n - 1. `pad` and `unpad` move tensors (and their
    gradients) between the two with splits, pads and concatenations, whose backward passes are copies too
    (an index gather's backward scatters, several times slower on the CPU)."""

    def __init__(self, cu_seqlens: Tensor, shift: Tensor | None = None, rows: Tensor | None = None) -> None:
        every = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        self.sizes = every                                                   # every packed sequence's length
        self.rows = list(range(len(every))) if rows is None else rows.tolist()
        self.lengths = torch.tensor([every[n] for n in self.rows], dtype=torch.long, device=cu_seqlens.device)
        self.shift = torch.zeros_like(self.lengths) if shift is None else shift.to(self.lengths)
        self.frame = max(1, int((self.shift + self.lengths).max()))
        pos = torch.arange(self.frame, device=cu_seqlens.device)
        rel = pos[None, :] - self.shift[:, None]                             # [N, F]: index within the sequence
        self.mask = (rel >= 0) & (rel < self.lengths[:, None])

    @property
    def n(self) -> int:
        return len(self.rows)

    def pad(self, x: Tensor | tuple[Tensor, ...]) -> Tensor:
        """[1, total, ...] -> [N, F, ...], zeros outside the sequences. x may be given as its split into
        sequences (x[0].split(layout.sizes)): several layouts over one split share one backward pass."""
        pieces = x[0].split(self.sizes) if isinstance(x, Tensor) else x
        rest = (0, 0) * (pieces[0].dim() - 1)
        rows = [pieces[n] if (s, pieces[n].shape[0]) == (0, self.frame) else
                F.pad(pieces[n], rest + (s, self.frame - s - pieces[n].shape[0]))
                for n, s in zip(self.rows, self.shift.tolist())]
        return rows[0][None] if len(rows) == 1 else torch.stack(rows)  # a view where nothing is padded

    def pieces(self, y: Tensor) -> list[Tensor]:
        """[N, F, ...] -> each row's tokens [L_n, ...]."""
        return [y[i, s:s + L] for i, (s, L) in enumerate(zip(self.shift.tolist(), self.lengths.tolist()))]

    def unpad(self, y: Tensor) -> Tensor:
        """[N, F, ...] -> [1, n_tokens, ...]: the sequences' tokens, sequence after sequence."""
        return torch.cat(self.pieces(y))[None]


# A group of sequences runs as one padded batch while that adds at most (SLACK - 1) to its work. On the CPU a
# wider batch is no faster per token, so any padding is lost time: measured (ttr bench's packed sequences,
# 8 of 256 to 2048 tokens, D = 64), SLACK 1.25 ran at 0.74-1.45x the speed of one call per sequence (median
# 0.92), SLACK 1 at 1.0-1.26x.
SLACK = 1.0
CACHE_QUANTUM = 64  # the nonparametric memories' unit of work when grouping lengths (their query blocks)


def length_groups(cu_seqlens: Tensor, quantum: int | None, shift: Tensor | None = None) -> list[Tensor]:
    """The non-empty sequences in groups of similar length, each to run as one padded batch: one group when
    quantum is None (a recurrent form, whose steps are as many as the longest sequence's tokens), else, from
    the longest down, a group grows while its rows times its longest length (rounded up to quantum, the
    work's unit: a chunk) stays within SLACK of its own lengths (rounded likewise). Padding the whole batch
    to its longest sequence could double the work; one call per sequence costs a call each. Rows shifted by
    `shift` count it in their length."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    order = [n for n, L in enumerate(lengths) if L]
    if shift is not None:  # a shifted sequence's row is as long as its shift and its tokens
        lengths = [L + s for L, s in zip(lengths, shift.tolist())]
    order.sort(key=lambda n: -lengths[n])
    if quantum is None:
        return [torch.tensor(order, dtype=torch.long, device=cu_seqlens.device)] if order else []
    groups: list[list[int]] = []
    top = work = 0
    for n in order:
        size = -(-lengths[n] // quantum) * quantum
        if groups and (len(groups[-1]) + 1) * top <= SLACK * (work + size):
            groups[-1].append(n)
            work += size
        else:
            groups.append([n])
            top = work = size
    return [torch.tensor(g, dtype=torch.long, device=cu_seqlens.device) for g in groups]


def padded_groups(cu_seqlens: Tensor, quantum: int | None, tensors: list[Tensor | None],
                  shift: Tensor | None = None) -> Iterator[tuple[Layout, list[Tensor | None]]]:
    """Each group of similar lengths (length_groups) as (its layout, the tensors [1, total, ...] padded to it).
    Every tensor is split into its sequences once, so that backward is one concatenation for all groups."""
    sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    pieces = [None if x is None else x[0].split(sizes) for x in tensors]
    for rows in length_groups(cu_seqlens, quantum, shift):
        layout = Layout(cu_seqlens, shift=None if shift is None else shift[rows], rows=rows)
        yield layout, [None if p is None else layout.pad(p) for p in pieces]


def _rows_of(state: Any, rows: Tensor) -> Any:
    """Rows of a state: a tensor [N, ...] or a tuple of them; None stays None."""
    if state is None:
        return None
    return state[rows] if isinstance(state, Tensor) else tuple(s[rows] for s in state)


def run_packed(core: Callable[..., tuple[Tensor, Any]], cu_seqlens: Tensor, tensors: list[Tensor | None],
               initial_state: Any, quantum: int | None) -> tuple[Tensor, Any]:
    """A parametric memory over packed sequences: core(*padded tensors, initial state rows) -> (o, final state)
    on each group of similar lengths (length_groups), with zeros outside the sequences, which every op makes
    neutral (no association, no decay). Returns (o [1, total, ...] in packed order, final state [N, ...] (a
    tensor or a tuple), where a sequence without tokens keeps its initial state, or zeros)."""
    N = cu_seqlens.numel() - 1
    outs: list[Tensor | None] = [None] * N
    finals, done = [], []
    for layout, padded in padded_groups(cu_seqlens, quantum, tensors):
        rows = torch.tensor(layout.rows, dtype=torch.long, device=cu_seqlens.device)
        o, final = core(*padded, _rows_of(initial_state, rows))
        for n, piece in zip(layout.rows, layout.pieces(o)):
            outs[n] = piece
        finals.append(final)
        done.append(rows)
    o = torch.cat([piece for piece in outs if piece is not None])[None]
    done = torch.cat(done)
    empty = torch.ones(N, dtype=torch.bool, device=done.device)
    empty[done] = False
    rest = empty.nonzero()[:, 0]
    if rest.numel():  # sequences without tokens keep their initial state, or zeros
        if initial_state is not None:
            finals.append(_rows_of(initial_state, rest))
        else:
            zeros = lambda f: torch.zeros_like(f[:1]).expand(rest.numel(), *f.shape[1:])  # noqa: E731
            finals.append(zeros(finals[0]) if isinstance(finals[0], Tensor) else tuple(map(zeros, finals[0])))
        done = torch.cat([done, rest])
    order = done.argsort()
    if isinstance(finals[0], Tensor):
        return o, torch.cat(finals)[order]
    return o, tuple(torch.cat(parts)[order] for parts in zip(*finals))


def per_sequence(op: Callable[..., tuple[Tensor, Any]], cu_seqlens: Tensor, q: Tensor, k: Tensor, v: Tensor,
                 initial_state: list | None, empty: Any, trim: Callable[[Any, int, int], Any],
                 output_final_state: bool, **kwargs: Any) -> tuple[Tensor, list | None]:
    """A nonparametric memory over packed sequences. Each sequence's state is its own cache of keys and values
    (of its own length), so initial_state and the final state are lists of N per-sequence caches. Without
    caches, each group of similar lengths (length_groups) runs as one padded batch: right padding comes after
    every real query, which never sees it, and trim(final, i, L) cuts row i's cache out of the padded one.
    With caches, one call per sequence. `empty` is the state of a sequence with no tokens and no cache."""
    N = cu_seqlens.numel() - 1
    if initial_state is not None and not (isinstance(initial_state, (list, tuple)) and len(initial_state) == N
                                          and not isinstance(initial_state[0], Tensor)):
        raise ValueError(f"initial_state with cu_seqlens must be a list of the {N} sequences' caches (None for a "
                         f"sequence without one), got {type(initial_state).__name__}")
    if initial_state is None or all(s is None for s in initial_state):
        finals: list = [empty] * N
        outs: list[Tensor | None] = [None] * N
        for layout, padded in padded_groups(cu_seqlens, CACHE_QUANTUM, [q, k, v]):
            o, final = op(*padded, output_final_state=output_final_state, **kwargs)
            for i, (n, piece) in enumerate(zip(layout.rows, layout.pieces(o))):
                outs[n] = piece
                finals[n] = None if final is None else trim(final, i, piece.shape[0])
        return (torch.cat([piece for piece in outs if piece is not None])[None],
                finals if output_final_state else None)
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
