"""Kernel ridge regression: the memory is a function in a kernel's RKHS (intention, Garnelo & Czarnecki 2023).

Objective   f_t = argmin_f 1/2 sum_{i<=t} || v_i - f(k_i) ||^2 + 1/2 ridge || f ||_H^2,   answer y_t = f_t(q_t)
Weights     uniform
Function    the RKHS of a kernel: "exp" exp(scale a . b), "rbf" exp(-scale || a - b ||^2 / 2),
            "poly" (1 + scale a . b)^degree
Optimizer   exact (the representer theorem):
                y_t = V_{<=t}^T (Kern(K_{<=t}, K_{<=t}) + ridge I)^-1 Kern(K_{<=t}, q_t).
            Dropping the inverse with the exp kernel gives unnormalized softmax attention.

Chunk form: one Cholesky factor L of the whole T x T matrix Kern(K, K) + ridge I. The leading t x t block
of L is the factor of prefix t's matrix, and the first t rows of a forward solve with L are those of
the forward solve with that block. So y_t = (L^-1 V)^T_{<=t} (L^-1 [Kern(k_i, q_t), i <= t, else 0])_{<=t}
for every t at once, from two forward solves (one with Dv columns, one with T): T^3 / 3 + T^3 flops and
T x T memory, the nonparametric memory's price, fine for T in the thousands.
The factor is the state next to the cache (K, V): new tokens append rows to it (a blocked Cholesky
append: one triangular solve against the old factor and a factorization of the new corner), so a call
after T0 cached tokens costs O(T0^2 T) and not O((T0 + T)^3). "recurrent" appends one row per token,
O(t^2) each, as decoding does.
Decoding on a KVCache keeps M = L^-1 and U = M V instead, in preallocated buffers: appending a token appends a
row to each (the old rows stay), and a query is Z = M kern(K, q), y = U^T Z: three matrix-vector products over M
per token, read in place, against two triangular solves and a solve for U with Dv columns on the tuples' path.
The factorization runs in float64 whatever the input: kernel Gram matrices with a small ridge are badly
conditioned, and in float32 the answer at T = 400 errs by 3e-5 (exp kernel, ridge 1e-2) to 6e-2 (poly, degree 3,
ridge 1e-4) against 3e-8 from float64 (tests/test_kernel.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import (all_finite, append_to_cache, check_mode, check_positive, check_qkv, check_state, checking,
                       compute_dtype, finite_answer, scale_or)
from ._varlen import check_cu_seqlens, per_sequence
from .kv_cache import KVCache

KERNELS = ("exp", "rbf", "poly")


def kern(a: Tensor, b: Tensor, kernel: str, scale: float, degree: int) -> Tensor:
    """Kern(a_i, b_j) for a [..., n, D], b [..., m, D]: [..., n, m]; a ValueError where it overflows."""
    dot = a @ b.transpose(-1, -2)
    if kernel == "exp":
        value = torch.exp(scale * dot)
    elif kernel == "rbf":
        sq = (a * a).sum(-1)[..., :, None] + (b * b).sum(-1)[..., None, :] - 2.0 * dot
        value = torch.exp(-0.5 * scale * sq.clamp_min(0.0))
    else:
        value = (1.0 + scale * dot) ** degree
    if checking() and not all_finite(value):  # a large scale times large keys: exp overflows even float64
        raise ValueError(f"the {kernel} kernel overflows float64 on these keys and queries (scale {scale:g}): "
                         "lower scale or normalize q and k")
    return value


def kernel_regression(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernel: str = "exp",
    ridge: float = 1.0,
    scale: float | None = None,
    degree: int = 2,
    initial_state: tuple[Tensor, ...] | KVCache | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | KVCache | list | None]:
    """Causal kernel ridge regression. q, k: [B, T, H, Dk], v: [B, T, H, Dv]; kernel "exp", "rbf" or "poly"
    (with `degree`); ridge > 0; scale defaults to Dk^-1/2. initial_state: the cache (K [B, T0, H, Dk],
    V [B, T0, H, Dv]), optionally with the factor L [B, H, T0, T0] a previous call returned (else it is
    recomputed), or a KVCache (KVCache.empty() to start one: keys, values, the inverse factor L^-1 and L^-1 V
    preallocated and appended in place, rows of different lengths allowed; see _in_place). Returns (o [B, T, H, Dv], (K, V, L) with these tokens
    appended (a KVCache where one was given), or None). cu_seqlens [N + 1] (with B = 1) packs N sequences;
    initial and final states are then lists of N caches."""
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    if isinstance(initial_state, KVCache) and cu_seqlens is not None:  # one cache per sequence
        initial_state = None if initial_state.keys is None else initial_state.rows()
    if cu_seqlens is not None:
        empty = (k[:, :0], v[:, :0], k.new_zeros(1, H, 0, 0, dtype=torch.float64))
        # a leading block of the factor is the factor of the leading keys: sequence n's is L[:L_n, :L_n]
        return per_sequence(kernel_regression, check_cu_seqlens(cu_seqlens, B, T), q, k, v, initial_state, empty,
                            lambda c, n, L: (c[0][n:n + 1, :L], c[1][n:n + 1, :L], c[2][n:n + 1, :, :L, :L]),
                            output_final_state, kernel=kernel, ridge=ridge, scale=scale, degree=degree, mode=mode)
    check_mode(mode, ("chunk", "recurrent"))
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    check_positive("ridge", ridge)
    if kernel == "poly" and not (isinstance(degree, int) and degree >= 1):
        raise ValueError(f"degree must be a positive int for the poly kernel, got {degree!r}")
    if isinstance(initial_state, KVCache):
        cached = initial_state
        tensors = (cached.keys, cached.values, cached.inverse)
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, *tensors))):
            o, cache = _in_place(q, k, v, cached, mode, kernel, ridge, scale_or(scale, Dk ** -0.5), degree)
            return finite_answer("kernel_regression", o.to(compute_dtype(q.dtype)).to(q.dtype)), (
                cache if output_final_state else None)
        # under autograd: the tuples' path (concatenations), one row at a time where the rows' lengths differ
        parts = [(q, k, v, None if cached.keys is None else tuple(cached))] if not cached.ragged else [
            (q[b:b + 1], k[b:b + 1], v[b:b + 1], row) for b, row in enumerate(cached.rows())]
        outs, finals = [], []
        for qb, kb, vb, state in parts:
            o, final = kernel_regression(qb, kb, vb, kernel=kernel, ridge=ridge, scale=scale, degree=degree,
                                         initial_state=state, output_final_state=True, mode=mode)
            outs.append(o)
            finals.append(final)
        cache = KVCache.wrap(finals[0]) if len(finals) == 1 else KVCache.stack(finals, checked=True)
        return torch.cat(outs), (cache if output_final_state else None)
    factor = None
    if isinstance(initial_state, (tuple, list)) and len(initial_state) == 3:
        *initial_state, factor = initial_state
    k_all, v_all = append_to_cache(initial_state, k, v)
    out_dtype, dt = q.dtype, compute_dtype(q.dtype)
    scale = scale_or(scale, Dk ** -0.5)
    qh, kh, vh = (x.transpose(1, 2).to(torch.float64) for x in (q, k_all, v_all))  # [B, H, T, D]
    first = kh.shape[2] - T

    def append(L: Tensor, start: int, end: int) -> Tensor:
        """The factor of keys [0, end) from that of keys [0, start): a blocked Cholesky append."""
        new = kh[:, :, start:end]
        corner = kern(new, new, kernel, scale, degree) + ridge * torch.eye(end - start, dtype=torch.float64,
                                                                         device=q.device)
        if start == 0:
            return _factor(corner)
        below = torch.linalg.solve_triangular(L, kern(kh[:, :, :start], new, kernel, scale, degree),
                                              upper=False).transpose(-1, -2)   # [B, H, end - start, start]
        return torch.cat([F.pad(L, (0, end - start)), torch.cat([below, _factor(corner - below @ below.transpose(-1, -2))],
                                                                 -1)], -2)

    if factor is not None:
        check_state("initial_state (L)", factor, (B, H, first, first))
        L = factor.to(torch.float64)
    else:
        L = append(kh.new_zeros(B, H, 0, 0), 0, first) if first else kh.new_zeros(B, H, 0, 0)
    if mode == "chunk":
        L = append(L, first, first + T)
        o = _read(L, kh, vh, qh, first, kernel, scale, degree)
    else:
        outs = []
        for t in range(T):  # one appended row of the factor per token: O(t^2) each
            L = append(L, first + t, first + t + 1)
            n = first + t + 1
            outs.append(_read(L, kh[:, :, :n], vh[:, :, :n], qh[:, :, t:t + 1], n - 1, kernel, scale, degree))
        o = torch.cat(outs, 2)
    o = finite_answer("kernel_regression", o.transpose(1, 2).to(dt).to(out_dtype))
    return o, ((k_all, v_all, L) if output_final_state else None)


def _in_place(q: Tensor, k: Tensor, v: Tensor, cached: KVCache, mode: str, kernel: str, ridge: float, scale: float,
              degree: int) -> tuple[Tensor, KVCache]:
    """kernel_regression on a KVCache, without autograd. It keeps M = L^-1, the inverse of the Cholesky factor of
    Kern(K, K) + ridge I, and U = M V: appending keys appends rows to both and leaves the old rows as they are
    (the inverse of a lower-triangular matrix grown by rows), and y_t = U^T M_{<=t} kern(K_{<=t}, q_t). So a token
    costs three matrix-vector products over M's filled block, read in place (a triangular solve against a block
    of a larger buffer copies it first: 22x slower at 1024 keys), where the tuples' path concatenates L and
    solves for U again, O(t^2 Dv). Rows of different lengths run one at a time. Returns (o [B, T, H, Dv] in
    float64, the cache)."""
    B, T = q.shape[:2]
    fresh_inverse, fresh_solved = cached.inverse is None, cached.solved is None
    cache, starts = cached.append(k, v, kernel=True)
    groups = [(0, B)] if not cache.ragged else [(b, b + 1) for b in range(B)]
    outs = []
    for b0, b1 in groups:
        first = starts[b0]
        end = first + T
        kh, vh = (buf[b0:b1, :, :end].to(torch.float64) for buf in (cache.keys, cache.values))  # [b, H, n, D]
        qh = q[b0:b1].transpose(1, 2).to(torch.float64)
        M, U = cache.inverse[b0:b1], cache.solved[b0:b1]
        if first and fresh_inverse:  # a cache given without its factor: factorize the old keys once
            _extend(M, U, kh, vh, 0, first, kernel, ridge, scale, degree)
        elif first and fresh_solved:
            U[:, :, :first] = M[:, :, :first, :first] @ vh[:, :, :first]
        if mode == "chunk":
            _extend(M, U, kh, vh, first, end, kernel, ridge, scale, degree)
            outs.append(_read_inverse(M[:, :, :end, :end], U[:, :, :end], kh, qh, first, kernel, scale, degree))
        else:
            steps = []
            for t in range(T):  # one appended row per token: O(t^2) each
                n = first + t + 1
                _extend(M, U, kh, vh, n - 1, n, kernel, ridge, scale, degree)
                steps.append(_read_inverse(M[:, :, :n, :n], U[:, :, :n], kh[:, :, :n], qh[:, :, t:t + 1], n - 1,
                                           kernel, scale, degree))
            outs.append(torch.cat(steps, 2))
    return torch.cat(outs).transpose(1, 2), cache


def _extend(M: Tensor, U: Tensor, kh: Tensor, vh: Tensor, start: int, end: int, kernel: str, ridge: float,
            scale: float, degree: int) -> None:
    """Rows [start, end) of M = L^-1 [B, H, >= end, >= end] and of U = M V [B, H, >= end, Dv], in place, from
    their rows [0, start). With the blocked Cholesky append L = [[L0, 0], [W, C]] (W = (L0^-1 k(K0, K1))^T,
    C C^T = k(K1, K1) + ridge - W W^T): M = [[M0, 0], [-C^-1 W M0, C^-1]]. kh, vh: [B, H, >= end, D]."""
    eye = torch.eye(end - start, dtype=torch.float64, device=kh.device)
    new = kh[:, :, start:end]
    corner = kern(new, new, kernel, scale, degree) + ridge * eye
    if start == 0:
        C_inv = torch.linalg.solve_triangular(_factor(corner), eye, upper=False)
        M[:, :, :end, :end] = C_inv
        U[:, :, :end] = C_inv @ vh[:, :, :end]
        return
    M0 = M[:, :, :start, :start]
    W = (M0 @ kern(kh[:, :, :start], new, kernel, scale, degree)).transpose(-1, -2)   # [B, H, end - start, start]
    C_inv = torch.linalg.solve_triangular(_factor(corner - W @ W.transpose(-1, -2)), eye, upper=False)
    M[:, :, start:end, :start] = -C_inv @ (W @ M0)
    M[:, :, start:end, start:end] = C_inv
    U[:, :, start:end] = C_inv @ (vh[:, :, start:end] - W @ U[:, :, :start])


def _read_inverse(M: Tensor, U: Tensor, kh: Tensor, qh: Tensor, first: int, kernel: str, scale: float,
                  degree: int) -> Tensor:
    """_read with M = L^-1 and U = M V given: y_t = sum_{i<=t} U_i Z_it, Z = M [kern(k_i, q_t), i <= t, else 0]."""
    n, Tk = qh.shape[2], kh.shape[2]
    seen = torch.ones(n, Tk, dtype=torch.bool, device=qh.device).tril(first).T   # [i, t]: key i seen by query t
    Z = M @ kern(kh, qh, kernel, scale, degree).masked_fill(~seen, 0.0)
    return Z.masked_fill(~seen, 0.0).transpose(-1, -2) @ U


def _factor(gram: Tensor) -> Tensor:
    L, info = torch.linalg.cholesky_ex(gram)
    if checking() and bool((info > 0).any()):
        raise ValueError("Kern(K, K) + ridge is not positive definite in float64: raise ridge")
    return L


def _read(L: Tensor, kh: Tensor, vh: Tensor, qh: Tensor, first: int, kernel: str, scale: float, degree: int) -> Tensor:
    """Answers of queries qh [B, H, n, D] at positions first, first + 1, ... from the factor L of all keys kh.
    y_t = V_{<=t}^T L_{<=t}^-T L_{<=t}^-1 kern_t, and a forward solve's first t rows are those of the leading
    block's: with U = L^-1 V and Z = L^-1 [kern(k_i, q_t), i <= t, else 0], y_t = sum_{i<=t} U_i Z_it."""
    n, Tk = qh.shape[2], kh.shape[2]
    seen = torch.ones(n, Tk, dtype=torch.bool, device=qh.device).tril(first).T   # [i, t]: key i seen by query t
    U = torch.linalg.solve_triangular(L, vh, upper=False)
    Z = torch.linalg.solve_triangular(L, kern(kh, qh, kernel, scale, degree).masked_fill(~seen, 0.0), upper=False)
    return Z.masked_fill(~seen, 0.0).transpose(-1, -2) @ U
