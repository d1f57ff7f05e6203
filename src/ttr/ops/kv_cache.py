"""KVCache: the nonparametric memories' state, keys and values in preallocated buffers written in place.

A nonparametric memory (softmax and local polynomial attention, kernel regression) keeps every key and value
it has seen. Concatenating them anew at every token costs O(t) per token, O(T^2) for T decoded tokens; here
they sit in buffers [B, H, capacity, D] that grow geometrically (by GROWTH, so appends cost O(1) amortized),
and a step writes its new tokens in place. Each row has its own length, so rows that have seen different
numbers of tokens (left-padded prompts, then decoding) share one batched buffer: row b's tokens fill
positions 0 .. lengths[b] - 1, and a reader masks the rest. Kernel regression keeps the inverse M = L^-1 of its
Cholesky factor [B, H, capacity, capacity] and U = M V [B, H, capacity, Dv] (float64) in the same way (appending
a token appends a row to each; see ttr.ops.kernel).

As a tuple a KVCache is what the ops returned before it: the pair (K [B, S, H, Dk], V [B, S, H, Dv]) when every
row holds S tokens, and one pair per row (K_b [1, S_b, H, Dk], V_b [1, S_b, H, Dv]) once the rows' lengths
differ: views of the buffers, no copies. So `K, V = cache`, `cache[b]` of a ragged cache, and the oracle's
initial_state take it as they took the tuples (kernel regression's tuples also held the factor L; its KVCache
holds M instead, which is what decoding reads).

Writing in place is safe for the functional API. A cache is a value: appending to it returns a new cache
over the same buffers, and positions below any existing cache's lengths are never written. Every cache
remembers how many in-place writes its buffers had when it was made; if a later write came from another
cache (two continuations of one state, beam search), appending to the older one copies its prefix into new
buffers first. Under autograd (new tokens or buffers that require grad) appends concatenate, as before, so
no tensor saved for backward is overwritten. Values are checked once, when they enter (the op checks its
new tokens; wrap checks a cache given as tuples); a KVCache is not read again to check it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._checks import all_finite, check_state

GROWTH = 1.5        # capacity grows to max(needed, GROWTH * capacity, MIN_CAPACITY)
MIN_CAPACITY = 64


class _Store:
    """What the caches over one set of buffers share: the number of in-place writes they have had."""

    __slots__ = ("writes",)

    def __init__(self) -> None:
        self.writes = 0


class KVCache(tuple):
    """The key/value cache of a nonparametric memory: buffers keys [B, H, cap, Dk], values [B, H, cap, Dv] (input
    dtype), for kernel regression also inverse [B, H, cap, cap] (M = L^-1) and solved [B, H, cap, Dv] (U = M V),
    in float64, and each row's length. Make one with KVCache.empty() (an op fills it), KVCache.wrap(tuples) (from the tuples the ops
    returned before), or KVCache.stack(per-row tuples). Rows are selected, moved and detached with map (which
    LayerState does); torch.save saves the filled part, torch.load(weights_only=True) rebuilds it."""

    keys: Tensor | None
    values: Tensor | None
    inverse: Tensor | None
    solved: Tensor | None
    lengths: tuple[int, ...]

    def __new__(cls, keys: Tensor | None, values: Tensor | None, lengths: tuple[int, ...],
                inverse: Tensor | None = None, solved: Tensor | None = None, store: _Store | None = None,
                mark: int = 0) -> KVCache:
        lengths = tuple(int(n) for n in lengths)
        self = super().__new__(cls, _views(keys, values, lengths))
        self.keys, self.values, self.inverse, self.solved, self.lengths = keys, values, inverse, solved, lengths
        self._store = _Store() if store is None else store
        self._mark = mark  # the store's writes when this cache was made; -1: borrowed buffers, never written
        return self

    # -- making one -------------------------------------------------------------------------------------------

    @classmethod
    def empty(cls) -> KVCache:
        """A cache without rows or tokens: handed to an op as initial_state, it makes the op return a KVCache."""
        return cls(None, None, ())

    @classmethod
    def wrap(cls, state: Any, name: str = "initial_state") -> KVCache:
        """A KVCache over a cache given as tuples, checked: (K [B, S, H, Dk], V [B, S, H, Dv]) (the buffers are
        these tensors, copied at the first append; kernel regression's (K, V, L): its factor is shape-checked and
        left, the op factorizes the keys again), or a list of per-row tuples (copied into one batched buffer:
        stack). A KVCache is returned as it is."""
        if isinstance(state, KVCache):
            return state
        if isinstance(state, list):
            return cls.stack(state, name)
        if not (isinstance(state, tuple) and len(state) in (2, 3)):
            raise ValueError(f"{name} must be the cache pair (K [B, T0, H, Dk], V [B, T0, H, Dv]) (or with the "
                             f"factor L), a list of per-row caches or a KVCache, got {type(state).__name__}")
        K, V = state[0], state[1]
        if not (isinstance(K, Tensor) and K.dim() == 4):
            raise ValueError(f"{name} (K) must be a tensor [B, T0, H, Dk], got "
                             f"{list(K.shape) if isinstance(K, Tensor) else type(K).__name__}")
        B, S, H, Dk = K.shape
        check_state(f"{name} (K)", K, (B, S, H, Dk))
        check_state(f"{name} (V)", V, (B, S, H, V.shape[-1] if isinstance(V, Tensor) and V.dim() else 0))
        if len(state) == 3:
            check_state(f"{name} (L)", state[2], (B, H, S, S))
        return cls(K.transpose(1, 2), V.transpose(1, 2), (S,) * B, mark=-1)

    @classmethod
    def stack(cls, rows: list, name: str = "initial_state", checked: bool = False) -> KVCache:
        """One batched cache from per-row caches [(K_b [1, S_b, H, Dk], V_b [1, S_b, H, Dv](, L_b)), ...], copied
        into buffers of capacity max S_b (kernel regression's factors are left: the op factorizes again). checked:
        the rows are an op's final states, whose values need no check."""
        if not rows:
            raise ValueError(f"{name}: no rows to stack")
        rows = [r.rows()[0] if isinstance(r, KVCache) and r.batch_size == 1 else r for r in rows]
        for b, r in enumerate(rows):
            if not (isinstance(r, tuple) and len(r) in (2, 3) and all(isinstance(t, Tensor) for t in r)):
                raise ValueError(f"{name}[{b}] must be a row's cache (K [1, S, H, Dk], V [1, S, H, Dv]), got "
                                 f"{type(r).__name__}")
            if r[0].dim() != 4 or r[0].shape[0] != 1:
                raise ValueError(f"{name}[{b}] (K) must be [1, S, H, Dk], got {list(r[0].shape)}")
        _, _, H, Dk = rows[0][0].shape
        Dv = rows[0][1].shape[-1]
        lengths = tuple(r[0].shape[1] for r in rows)
        for b, r in enumerate(rows):
            for what, t, shape in (("K", r[0], (1, lengths[b], H, Dk)), ("V", r[1], (1, lengths[b], H, Dv)),
                                   ("L", r[2] if len(r) == 3 else None, (1, H, lengths[b], lengths[b]))):
                if checked and t is not None and tuple(t.shape) != shape:
                    raise ValueError(f"{name}[{b}] ({what}) must have shape {list(shape)}, got {list(t.shape)}")
                if not checked:
                    check_state(f"{name}[{b}] ({what})", t, shape)
        S, B = max(lengths), len(rows)
        like = rows[0][0]
        keys = like.new_zeros(B, H, S, Dk)
        values = rows[0][1].new_zeros(B, H, S, Dv)
        for b, r in enumerate(rows):
            n = lengths[b]
            keys[b, :, :n] = r[0][0].transpose(0, 1)
            values[b, :, :n] = r[1][0].transpose(0, 1)
        return cls(keys, values, lengths)

    # -- reading ----------------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def size(self) -> int:
        """The longest row's length: the buffers' filled prefix."""
        return max(self.lengths, default=0)

    @property
    def ragged(self) -> bool:
        return len(set(self.lengths)) > 1

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def rows(self) -> list[tuple[Tensor, ...]]:
        """Each row's cache as a pair of views (K_b [1, S_b, H, Dk], V_b [1, S_b, H, Dv])."""
        return [_row(self.keys, self.values, b, n) for b, n in enumerate(self.lengths)]

    # -- appending --------------------------------------------------------------------------------------------

    def append(self, k: Tensor, v: Tensor, *, kernel: bool = False, name: str = "initial_state"
               ) -> tuple[KVCache, tuple[int, ...]]:
        """The cache with k [B, T, H, Dk], v [B, T, H, Dv] appended to every row (row b's at positions
        lengths[b] ..), and where each row's new tokens start (the old lengths). Written in place where this
        cache owns its buffers and they have room; else into new buffers (GROWTH times larger). kernel=True
        keeps room for kernel regression's inverse factor and solved values, whose new rows the caller fills
        (zeros where this cache had none: the caller fills the old rows too). k and v are not checked here (the
        op has)."""
        B, T, H, Dk = k.shape
        Dv = v.shape[-1]
        if self.keys is None:  # empty: these tokens are the cache (no copy until the next append)
            store = None
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
            fac = sol = None
            if kernel:
                fac = k.new_zeros(B, H, T, T, dtype=torch.float64)
                sol = k.new_zeros(B, H, T, Dv, dtype=torch.float64)
                store = _Store()
            # the kernel buffers are this cache's own; the keys and values are the caller's, copied on append
            return KVCache(keys, values, (T,) * B, fac, sol, store=store, mark=-1), (0,) * B
        if self.batch_size != B:
            raise ValueError(f"{name} holds {self.batch_size} rows, k has B = {B}")
        for what, buf, want in (("K", self.keys, (B, H, Dk)), ("V", self.values, (B, H, Dv))):
            if (buf.shape[0], buf.shape[1], buf.shape[3]) != want:
                raise ValueError(f"{name} ({what}) holds [B, H, D] = {[buf.shape[0], buf.shape[1], buf.shape[3]]}, "
                                 f"the new tokens {list(want)}")
        starts = self.lengths
        ends = tuple(n + T for n in starts)
        need = max(ends)
        grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        tracked = grad or self.keys.requires_grad or self.values.requires_grad
        fac, sol = self.inverse, self.solved
        if kernel and fac is None:
            fac = self.keys.new_zeros(B, H, self.capacity, self.capacity, dtype=torch.float64)
        if kernel and sol is None:
            sol = self.keys.new_zeros(B, H, self.capacity, Dv, dtype=torch.float64)
        in_place = (self._mark == self._store.writes and need <= self.capacity and not tracked
                    and self.keys.dtype == k.dtype and self.values.dtype == v.dtype and self.keys.device == k.device
                    and not (self.keys.is_inference() and not torch.is_inference_mode_enabled()))
        if tracked:  # autograd: new tensors, nothing saved for backward is written
            keys, values = _put(self.keys, k, starts, need), _put(self.values, v, starts, need)
            if kernel:
                fac, sol = _resize(fac, need, 2), _resize(sol, need, 1)
            return KVCache(keys, values, ends, fac, sol, mark=-1 if not kernel else 0), starts
        if not in_place:
            cap = max(need, math.ceil(GROWTH * self.capacity), MIN_CAPACITY)
            keys, values = _grown(self.keys, self.size, cap, k.dtype), _grown(self.values, self.size, cap, v.dtype)
            if kernel:
                fac, sol = _grown(fac, self.size, cap, dims=2), _grown(sol, self.size, cap)
            store = _Store()
        else:
            keys, values, store = self.keys, self.values, self._store
        _write(keys, k, starts)
        _write(values, v, starts)
        store.writes += 1
        return KVCache(keys, values, ends, fac, sol, store=store, mark=store.writes), starts

    def recent(self, n: int) -> KVCache:
        """A sliding window's cache: each row's last n tokens at least. This cache while no row holds more than
        2 n + MIN_CAPACITY tokens; past that, new buffers holding each row's last n (at positions 0 .. n - 1, with
        room for n + 2 MIN_CAPACITY more, so the appends until the next cut write in place). A window's cache so
        stays O(n) and is copied once per n + MIN_CAPACITY appended tokens (O(1) a token). Gathered, so autograd
        follows; a kernel cache has no window."""
        if self.keys is None or self.size <= 2 * n + MIN_CAPACITY:
            return self
        if self.inverse is not None:
            raise ValueError("a kernel regression cache holds the inverse factor of all its keys: it cannot be cut")
        B, H = self.keys.shape[:2]
        # row b's last n tokens (a shorter row's first n positions, of which its own length are filled)
        at = (torch.tensor([max(L - n, 0) for L in self.lengths], device=self.keys.device)[:, None]
              + torch.arange(n, device=self.keys.device))[:, None, :, None]
        room = 2 * (n + MIN_CAPACITY)
        keys, values = (torch.nn.functional.pad(buf.gather(2, at.expand(B, H, n, buf.shape[3])), (0, 0, 0, room - n))
                        for buf in (self.keys, self.values))
        tracked = self.keys.requires_grad or self.values.requires_grad
        return KVCache(keys, values, tuple(min(L, n) for L in self.lengths), mark=-1 if tracked else 0)

    # -- rows, devices, autograd --------------------------------------------------------------------------------

    def map(self, fn, index: Tensor | None = None) -> KVCache:
        """fn on every buffer: a row selection (index: the rows it keeps, in order), a move, a detach. Buffers fn
        returns as views of the same memory keep sharing it (and its writes) with this cache."""
        if self.keys is None:
            return self
        old = (self.keys, self.values, self.inverse, self.solved)
        bufs = [None if t is None else fn(t) for t in old]
        for i in (2, 3):  # kernel regression's inverse and solved values stay in float64 whatever the input's dtype
            if bufs[i] is not None and bufs[i].dtype != old[i].dtype:
                bufs[i] = old[i].to(bufs[i].device)
        lengths = self.lengths if index is None else tuple(self.lengths[i] for i in index.tolist())
        shares = [t is not None and t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr()
                  for t, o in zip(bufs, old)]
        if all(shared or t is None for shared, t in zip(shares, bufs)) and not self.keys.requires_grad:
            return KVCache(*bufs[:2], lengths, *bufs[2:], store=self._store, mark=self._mark)
        if any(shares) and not all(shared or t is None for shared, t in zip(shares, bufs)):
            # some buffers moved, some did not (a dtype move leaves the float64 inverse): copy the ones left behind,
            # so that the new cache writes in place into nothing this one reads
            bufs = [t.clone() if shared else t for t, shared in zip(bufs, shares)]
            shares = [False] * len(bufs)
        return KVCache(*bufs[:2], lengths, *bufs[2:], mark=-1 if any(shares) else 0)

    def __reduce__(self):
        S = self.size
        filled = [None if t is None else (t[:, :, :S, :S] if t is self.inverse else t[:, :, :S]).clone()
                  for t in (self.keys, self.values, self.inverse, self.solved)]
        return _rebuild_kv_cache, (*filled, self.lengths)

    def __repr__(self) -> str:
        if self.keys is None:
            return "KVCache(empty)"
        B, H, cap, Dk = self.keys.shape
        return (f"KVCache(rows {B}, heads {H}, Dk {Dk}, Dv {self.values.shape[-1]}, lengths {list(self.lengths)}, "
                f"capacity {cap}, {self.keys.dtype}{', with inverse factor' if self.inverse is not None else ''})")

    # a tuple's equality and hash would compare the views' tensors; a cache is one object
    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__


def _rebuild_kv_cache(keys: Tensor | None, values: Tensor | None, inverse: Tensor | None, solved: Tensor | None,
                      lengths: tuple[int, ...]) -> KVCache:
    """What torch.load (weights_only=True too) rebuilds a saved KVCache with: the filled part, checked."""
    for name, t in (("keys", keys), ("values", values), ("inverse", inverse), ("solved", solved)):
        if t is not None and not all_finite(t):
            raise ValueError(f"a saved KVCache's {name} have non-finite values")
    return KVCache(keys, values, tuple(lengths), inverse, solved)


def _views(keys: Tensor | None, values: Tensor | None, lengths: tuple[int, ...]) -> tuple:
    """The tuple a KVCache is: (K, V) over the filled prefix, or one such pair per row when ragged."""
    if keys is None:
        return ()
    if len(set(lengths)) > 1:
        return tuple(_row(keys, values, b, n) for b, n in enumerate(lengths))
    S = lengths[0] if lengths else 0
    return keys[:, :, :S].transpose(1, 2), values[:, :, :S].transpose(1, 2)


def _row(keys: Tensor, values: Tensor, b: int, n: int) -> tuple[Tensor, Tensor]:
    return keys[b:b + 1, :, :n].transpose(1, 2), values[b:b + 1, :, :n].transpose(1, 2)


def _write(buf: Tensor, x: Tensor, starts: tuple[int, ...]) -> None:
    """x [B, T, H, D] into buf [B, H, cap, D] at row b's positions starts[b] .. starts[b] + T - 1, in place."""
    T = x.shape[1]
    if len(set(starts)) == 1:
        buf[:, :, starts[0]:starts[0] + T] = x.transpose(1, 2)
        return
    rows = torch.arange(len(starts), device=buf.device)[:, None]
    pos = torch.tensor(starts, device=buf.device)[:, None] + torch.arange(T, device=buf.device)
    buf.transpose(1, 2)[rows, pos] = x.to(buf.dtype)                           # [B, T] index -> [B, T, H, D]


def _put(buf: Tensor, x: Tensor, starts: tuple[int, ...], size: int) -> Tensor:
    """A new [B, H, size, D] tensor: buf's first positions, x written at each row's start (autograd follows)."""
    B, T = x.shape[:2]
    if len(set(starts)) == 1:
        return torch.cat([buf[:, :, :starts[0]].to(x.dtype), x.transpose(1, 2)], 2)
    base = _resize(buf.to(x.dtype), size, 1)
    rows = torch.arange(B, device=buf.device)[:, None]
    pos = torch.tensor(starts, device=buf.device)[:, None] + torch.arange(T, device=buf.device)
    return base.transpose(1, 2).index_put((rows, pos), x).transpose(1, 2)


def _resize(buf: Tensor, size: int, dims: int) -> Tensor:
    """A new tensor: buf [B, H, n, D] (dims=1) or [B, H, n, n] (dims=2) cut or zero-padded to n = size."""
    if size <= buf.shape[2]:
        return (buf[:, :, :size] if dims == 1 else buf[:, :, :size, :size]).clone()
    grow = size - buf.shape[2]
    return torch.nn.functional.pad(buf, (0, 0, 0, grow) if dims == 1 else (0, grow, 0, grow))


def _grown(buf: Tensor, filled: int, cap: int, dtype: torch.dtype | None = None, dims: int = 1) -> Tensor:
    """A new zero buffer of capacity cap holding buf's first `filled` positions (a [filled, filled] block for the
    factor, dims=2)."""
    shape = (*buf.shape[:2], cap, cap) if dims == 2 else (*buf.shape[:2], cap, buf.shape[3])
    new = buf.new_zeros(shape, dtype=dtype or buf.dtype)
    with torch.no_grad():
        if dims == 2:
            new[:, :, :filled, :filled] = buf[:, :, :filled, :filled]
        else:
            new[:, :, :filled] = buf[:, :, :filled]
    return new


torch.serialization.add_safe_globals([KVCache, _rebuild_kv_cache])
