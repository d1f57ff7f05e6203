"""LayerState: what a TTRLayer carries between calls, one object whatever the memory.

The memory part is the op's state: a tensor (linear attention, the delta rule), a pair (the exact memory's
statistics), a MiniBatchState (TTT, Titans), the cache of keys and values (nonparametric memories: a KVCache,
preallocated buffers written in place, one batched buffer whatever each row's length; a tuple, or a list with
one cache per row, as earlier versions kept it, is still taken). Every form has its rows first, so one function
maps row selection, device and dtype moves over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

from ..ops import MiniBatchState
from ..ops.kv_cache import KVCache


def _map(memory: Any, fn: Callable[[Tensor], Tensor], rows: Callable[[list], list] | None = None,
         index: Tensor | None = None) -> Any:
    """fn on every tensor of a memory state; `rows` on a per-row list (where fn cannot reach the rows); index: the
    rows fn selects (a KVCache keeps each row's length)."""
    if memory is None or isinstance(memory, int):  # an int offset is every row's
        return memory
    if isinstance(memory, Tensor):
        return fn(memory)
    if isinstance(memory, KVCache):  # before tuple: a KVCache is one, over its buffers
        return memory.map(fn, index)
    if isinstance(memory, MiniBatchState):
        return MiniBatchState(_map(memory.weights, fn), _map(memory.start, fn), _map(memory.offset, fn))
    if isinstance(memory, list):  # one cache per row
        return rows(memory) if rows is not None else [_map(m, fn) for m in memory]
    return tuple(_map(m, fn) for m in memory)


def dtype_name(dtype: torch.dtype) -> str:
    """How a state records its input dtype: "float32" (a string, which torch.load's weights_only accepts)."""
    return str(dtype).removeprefix("torch.")


@dataclass
class LayerState:
    """A TTRLayer's decoding state (its cache): the short convolution's last inputs conv [B, K-1, C], the
    memory's state, the last token's input for a token shift (shift [B, d_model], RWKV-6), how many tokens each row has seen (lengths [B]), which memory made it (kind) and for
    which input dtype. Rows can be selected or reordered (beam search, dropping finished rows), moved with
    .to, detached, and saved with torch.save / loaded with torch.load (weights_only=True works)."""

    conv: Tensor | None = None
    memory: Any = None
    lengths: Tensor | None = None
    kind: str = ""
    dtype: str = ""
    shift: Tensor | None = None  # the last token's input [B, d_model], for a token shift (RWKV-6)

    @property
    def batch_size(self) -> int:
        return 0 if self.lengths is None else self.lengths.shape[0]

    def select(self, index: Tensor | list[int] | list[bool]) -> LayerState:
        """The rows `index`: row numbers (a list or an int tensor, repeats allowed, in that order) or a bool mask
        over the rows (state.select(~done) keeps the unfinished ones)."""
        index = torch.as_tensor(index).cpu()
        if index.dtype == torch.bool:
            if tuple(index.shape) != (self.batch_size,):
                raise ValueError(f"a bool index must mask the {self.batch_size} rows, got shape {list(index.shape)}")
            index = index.nonzero()[:, 0]
        if index.dim() != 1 or index.is_floating_point() or index.is_complex():
            raise ValueError(f"index must be a 1-D list or tensor of row numbers, got {index!r}")
        index = index.long()
        if index.numel() and (int(index.min()) < -self.batch_size or int(index.max()) >= self.batch_size):
            raise ValueError(f"index must hold row numbers below the batch size {self.batch_size}, got "
                             f"{index.tolist()}")
        pick = lambda t: t[index.to(t.device)] if t.dim() else t  # noqa: E731  (a 0-d offset is every row's)
        return replace(self, conv=None if self.conv is None else pick(self.conv), lengths=pick(self.lengths),
                       shift=None if self.shift is None else pick(self.shift),
                       memory=_map(self.memory, pick, rows=lambda caches: [caches[i] for i in index.tolist()],
                                   index=index))

    def reorder(self, beam_idx: Tensor) -> LayerState:
        """Hugging Face's name for select: the rows in the order beam search keeps them."""
        return self.select(beam_idx)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LayerState:
        """Moves every tensor to `device`; with `dtype`, the tensors in the input dtype follow it, while those a
        memory keeps in a dtype of its own (float32 accumulators under bf16 inputs, the exact memory's float64
        statistics under float32 ones) stay as they are."""
        old = getattr(torch, self.dtype, None) if self.dtype else None

        def move(t: Tensor) -> Tensor:
            cast = dtype if dtype is not None and t.is_floating_point() and t.dtype == old else None
            return t.to(device=device, dtype=cast)

        return replace(self, conv=None if self.conv is None else move(self.conv), memory=_map(self.memory, move),
                       shift=None if self.shift is None else move(self.shift),
                       lengths=None if self.lengths is None else self.lengths.to(device),
                       dtype=dtype_name(dtype) if dtype is not None else self.dtype)

    def detach(self) -> LayerState:
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return replace(self, conv=None if self.conv is None else self.conv.detach(),
                       memory=_map(self.memory, Tensor.detach), shift=None if self.shift is None else self.shift.detach())


torch.serialization.add_safe_globals([LayerState, MiniBatchState])  # torch.load(weights_only=True) may rebuild them
