"""Local polynomial regression around each query: softmax attention is order 0, local linear attention order 1.

Objective   b_t, W_t = argmin 1/2 sum_{i<=t} w_ti || v_i - b - W phi(k_i - q_t) ||^2 + 1/2 ridge omega_t ||W||_F^2,
            phi: the monomials of degree 1..order of (k_i - q_t), omega_t = sum_i w_ti; the answer is y_t = b_t
Weights     query-dependent, w_ti = exp(scale q_t . k_i): the softmax kernel. With qk_norm (unit q and k) it is,
            up to a factor that cancels, the smoothing kernel exp(-scale ||k_i - q_t||^2 / 2)
            (scale = D^-1/2: exp(-||k - q||^2 / (2 sqrt D))), which is why QKNorm makes attention a proper
            kernel smoother
Function    a polynomial of degree `order` in k - q_t, fitted afresh at every query (nonparametric)
Optimizer   the exact weighted least-squares solution. With the design Phi_ti = [1, phi(k_i - q_t)] (p columns),
                G_t = sum_i w_ti Phi_ti Phi_ti^T + ridge omega_t diag(0, 1, ..., 1),   z_t = G_t^-1 e_0,
                y_t = sum_i w_ti (z_t . Phi_ti) v_i,
            so order 0 is z = 1 / omega, softmax attention; order 1 is DESIGN.md's
            y = sum_i w_ti (1 - rho^T (k_i - q)) v_i / delta with z = [1, -rho] / delta.

Computation. The centred design depends on the query, but it is a fixed linear map of the uncentred
monomials psi(k) = [1, k, k_a k_b ...]: Phi_ti = A(q_t) psi(k_i). So G_t = A (sum_i w_ti psi_i psi_i^T) A^T
needs only the weighted moments M_t = P psi psi^T, one matrix product per tile of keys, and the output
is attention with weights w_ti (A^T z_t) . psi(k_i). Both are taken about the mean c of a block's queries,
psi(k - c) and A(q_t - c) (k - q is unchanged): uncentred moments of keys with a common offset cancel in
float32 (order 2 at D = 4 erred by 30-130 % at offset 30). Queries go in blocks: a block's scores are
[block, T] (linear in T), the moments are accumulated over tiles of keys (psi psi^T is [tile, p^2], never
[T, p^2]), and under autograd every block is checkpointed, so memory stays linear in T in backward too.
Weights are shifted by each row's largest score before exp; the answer does not change, because the
ridge scales with omega.

Guard. delta_t = 1 / z_t,0 is the weight the slope leaves unexplained (the Schur complement of the
intercept). When delta_t / omega_t < sqrt(eps) the local design is numerically singular and the answer
would be noise amplified by omega / delta, so that query gets the order-0 answer instead. A float32 block
with such a query is computed again in float64, so the guard acts at float64's threshold whatever the input
dtype (float32's own, 3e-4, made float32 answer order 0 where float64 fits: 9 % apart on offset keys), and
so is a float32 block whose moments cancel (_cancels: queries spread far around the block's mean).

Order 1 by conjugate gradients (solver="cg"; "auto" in chunk form from Dk = CG_MIN_DIM). The moments cost T^2 Dk^2.
Eliminating the intercept instead (its Schur complement) leaves a Dk x Dk system whose products are passes over the
keys, as attention's are. With p_ti = w_ti / omega_t (the softmax weights), mu_t = sum_i p_ti k_i (the weighted key
mean) and C_t = sum_i p_ti (k_i - mu_t)(k_i - mu_t)^T, a slope W's best intercept is b = vbar_t - W (mu_t - q_t)
(vbar_t = sum_i p_ti v_i, the order-0 answer), so W fits the centred pairs, W (C_t + ridge I) =
sum_i p_ti (v_i - vbar_t)(k_i - mu_t)^T, and as sum_i p_ti (k_i - mu_t) = 0,
    y_t = vbar_t + W (q_t - mu_t) = sum_i p_ti (1 + x_t . (k_i - mu_t)) v_i,   (C_t + ridge I) x_t = q_t - mu_t.
It is the order-1 answer above: G_t's slope block is omega_t (C_t + ridge I + (mu_t - q_t)(mu_t - q_t)^T), and
Sherman-Morrison gives rho_t = -x_t / (1 + beta_t), delta_t = omega_t / (1 + beta_t), beta_t = (q_t - mu_t) . x_t.
Conjugate gradients solve every query of a block at once, from x = 0, preconditioned by the diagonal of
C_t + ridge I (Jacobi: keys whose coordinates spread unequally). A product is two passes over the keys the block
sees, through its weights P [n, Tk], formed once per block (BLOCK queries):
    (C_t + ridge I) x_t = ((P * (X Kc^T)) Kc)_t - mu_t (mu_t . x_t) + ridge x_t,   Kc = K - c, mu_t taken about c,
about the block's query mean c, as the moments are. A query stops moving once its relative residual
|q_t - mu_t - (C_t + ridge I) x_t| / |q_t - mu_t| (the recursive one) is at most cg_tol (1e-4 in float32, 1e-10
in float64); a block with a query still short of it after 2 Dk + 8 steps (Dk in exact arithmetic) is answered by
the moments (in backward: by the moments' gradient). A pass costs T^2 Dk / 2 multiply-adds over a causal
sequence; forward takes 2 steps + 5 of them, memory O(BLOCK T). Gradients are implicit (_ImplicitLinear):
backward solves once more with the same operator (2 steps + 10 passes) and differentiates no step; a block keeps
x_t and mu_t (Dk numbers a query) and forms P again, so it needs no checkpoint. The guard reads omega_t / delta_t
= 1 + beta_t. A float32 block goes to float64 where the guard fires, and where eps max_tj (sum_i p_ti (k_ij -
c_j)^2) / (C_t + ridge I)_jj passes 1e-4: the products round by about eps |k_i - c|^2 |x_t|, and the answer errs
by about that ratio (2e-3 on keys drifting 1 a token, as with the moments' _cancels).
Measured (T = 4096, Dk = 64, B = 1, H = 4, float32, N(0, 1) q, k, v as ttr bench draws them, ridge 0.1): late
blocks stop after 6-8 steps (C_t of ~1700 effective keys: kappa ~ 2), the first after ~50 (C_t of rank < Dk: kappa
~ 35). At the default cg_tol the answers are within 9e-5 of the float64 solve (4e-5 with qk_norm; the float32
moments: 3e-4, 6e-6) and the gradients (T = 1024) within 3e-3 (q), 1e-3 (k), 1e-4 (v) of their largest entry,
the error almost all in the first block's few-key systems, where the adjoint's error is kappa times its residual
(cg_tol 1e-5: 3e-4, 1e-4, 5e-5; the float32 moments: 3e-4, 9e-5, 1e-4). Forward + backward on 2 threads, min of
3 interleaved: 3.7 s, against 32 s by the moments and 0.36 s for SDPA (10.4x; forward 1.5 s, SDPA 0.10 s).
CG_MIN_DIM = 32: at Dk = 16 the moments' forward is as fast (T = 1024: 53 vs 62 ms) and agrees with decoding
(which keeps the moments) to float32's 4e-5 where cg_tol leaves 2e-4 (a 2-layer model); at 32 conjugate gradients
are 1.7-1.9x faster forward and 3.5-4.3x in training (T = 1024, 2048). Decoding keeps the moments: one pass over
the cache where conjugate gradients take two a step (Dk = 64, 16 heads: 9 against 15 ms a token at 1k).

Under torch.compile (while it traces) orders 1 and 2 take the path that always serves, as nothing may be read back:
the moments in float64, each query's guard a selection (its design factorized again with the identity in its
place, answered at order 0 where singular), in place of conjugate gradients and the float32 checks that choose.

Order 0 is torch's scaled_dot_product_attention in both forms (a decoding step: one query over the filled
prefix, no mask). The state is the cache of keys and values: the pair (K [B, T, H, Dk], V [B, T, H, Dv]),
concatenated anew at every call, or a KVCache (ttr.ops.kv_cache), preallocated and written in place, whose
rows may hold different numbers of tokens (each row's queries then see its own keys, the padding masked).
Orders 1 and 2 in "recurrent" answer one query at a time against the cache, as decoding does.

Association sets (ttr.weights), order 0. A window of w tokens sums over t - w < i <= t only (sliding-window softmax
attention, as Based's layer uses): queries go in blocks of max(BLOCK, w), each block's keys are the window of keys
it can see (its own and the w - 1 before), and one SDPA call with a band mask answers every block, so time and
memory are O(T max(BLOCK, w)); decoding reads the last w keys. The returned cache keeps the last w - 1 tokens: a
pair of tensors is cut to them, a KVCache keeps at least them (KVCache.recent: compacted once its rows pass
2 (w - 1) + MIN_CAPACITY tokens, so O(1) a token). causal=False sums over the whole sequence (encoders): SDPA
without a mask; it has no recurrent form and no cache.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .._checks import (append_to_cache, check_mode, check_positive, check_qkv, check_step, checking, compute_dtype,
                       finite_answer, scale_or)
from ..weights import check_window
from ._varlen import check_cu_seqlens, per_sequence
from .kv_cache import KVCache

MAX_ORDER2_DIM = 16  # order 2 has 1 + D + D(D+1)/2 monomials and p^2 moments per query
BLOCK = 128          # queries per block, keys per tile
CG_MIN_DIM = 32      # solver="auto" solves order 1 (chunk form) by conjugate gradients from this key dim up


def local_polynomial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    order: int = 0,
    ridge: float = 0.1,
    scale: float | Tensor | None = None,
    qk_norm: bool = False,
    initial_state: tuple[Tensor, Tensor] | KVCache | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    cu_seqlens: Tensor | None = None,
    window: int | None = None,
    causal: bool = True,
    solver: str = "auto",
    cg_tol: float | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor] | KVCache | list | None]:
    """Local polynomial attention (causal by default). q, k: [B, T, H, Dk], v: [B, T, H, Dv]; order 0, 1, 2 (Dk <= 16).

    ridge > 0 penalizes the non-constant coefficients (relative to the weight mass; unused at order 0).
    scale: a number, or a positive tensor [H] (a temperature per head, e.g. learned with QKNorm).
    initial_state: the cache (K [B, T0, H, Dk], V [B, T0, H, Dv]) of earlier tokens, which every query sees, or a
    KVCache (KVCache.empty() to start one), preallocated and written in place (its rows may differ in length).
    Returns (o [B, T, H, Dv], the cache with these tokens appended (a KVCache where one was given), or None).
    scale defaults to Dk^-1/2.
    cu_seqlens [N + 1] (with B = 1) packs N sequences; initial and final states are then lists of N caches.
    window w (order 0): each query's set is its own and the w - 1 keys before it (the cache's included), and the
    returned cache keeps the last w - 1 tokens (module docstring). causal=False (order 0): every query sees the
    whole sequence ("chunk" mode, no cache).
    solver (order 1): "exact" solves by the weighted moments (T^2 Dk^2), "cg" by conjugate gradients to a relative
    residual cg_tol (T^2 Dk per step; default 1e-4 in float32, within about 1e-4 of the exact answer, and 1e-10 in
    float64), "auto" by conjugate gradients in chunk form from Dk = CG_MIN_DIM (32) and by the moments otherwise
    (decoding reads the cache once that way). Module docstring.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    check_window(window, causal)
    if (window is not None or not causal) and (order != 0 or isinstance(order, bool)):
        raise ValueError(f"window and causal=False are offered at order 0 (softmax attention), got order {order!r}")
    if not causal and mode == "recurrent":
        raise ValueError("causal=False has no recurrent form: every query reads tokens not yet seen; use mode='chunk'")
    if not causal and (initial_state is not None or output_final_state):
        raise ValueError("causal=False keeps no cache (its set is one whole sequence): pass initial_state=None, "
                         "output_final_state=False")
    if solver not in ("auto", "exact", "cg"):
        raise ValueError(f"solver must be 'auto', 'exact' or 'cg', got {solver!r}")
    if solver == "cg" and (order != 1 or isinstance(order, bool)):
        raise ValueError(f"solver='cg' is offered at order 1 (local linear attention), got order {order!r}")
    if cg_tol is not None and not (isinstance(cg_tol, numbers.Real) and not isinstance(cg_tol, bool)
                                   and 0 < cg_tol < 1):
        raise ValueError(f"cg_tol must be a number in (0, 1), got {cg_tol!r}")
    kw = dict(order=order, ridge=ridge, scale=scale, qk_norm=qk_norm, mode=mode, window=window, causal=causal,
              solver=solver, cg_tol=cg_tol)
    if isinstance(initial_state, KVCache) and cu_seqlens is not None:  # one cache per sequence
        initial_state = None if initial_state.keys is None else initial_state.rows()
    if cu_seqlens is not None and not causal:  # each sequence its own whole set: right padding would be seen
        bounds = check_cu_seqlens(cu_seqlens, B, T).tolist()
        return torch.cat([_attention(q[:, a:b], k[:, a:b], v[:, a:b], **kw)[0]
                          for a, b in zip(bounds, bounds[1:]) if b > a], 1), None
    if cu_seqlens is not None:
        o, finals = per_sequence(_attention, check_cu_seqlens(cu_seqlens, B, T), q, k, v, initial_state,
                                 (k[:, :0], v[:, :0]), lambda kv, n, L: (kv[0][n:n + 1, :L], kv[1][n:n + 1, :L]),
                                 output_final_state, **kw)
        return o, (None if finals is None else [_recent(kv, window) for kv in finals])
    o, cache = _attention(q, k, v, initial_state=initial_state, output_final_state=output_final_state, **kw)
    return o, (None if cache is None else _recent(cache, window))


def _recent(cache: tuple[Tensor, Tensor] | KVCache, window: int | None) -> tuple[Tensor, Tensor] | KVCache:
    """What a window's next query can see of the cache: its last window - 1 tokens (a KVCache: at least those)."""
    if window is None:
        return cache
    if isinstance(cache, KVCache):
        return cache.recent(window - 1)
    K, V = cache
    cut = max(K.shape[1] - (window - 1), 0)
    return K[:, cut:], V[:, cut:]


def _attention(q: Tensor, k: Tensor, v: Tensor, *, initial_state: tuple[Tensor, Tensor] | KVCache | None = None,
               output_final_state: bool = False, order: int, ridge: float, scale: float | Tensor | None,
               qk_norm: bool, mode: str, window: int | None, causal: bool, solver: str, cg_tol: float | None
               ) -> tuple[Tensor, tuple[Tensor, Tensor] | KVCache | None]:
    """local_polynomial_attention on one batch (no packing), returning the whole cache (the caller trims it)."""
    B, T, H, Dk = q.shape
    check_mode(mode, ("chunk", "recurrent"))
    if order not in (0, 1, 2) or isinstance(order, bool):
        raise ValueError(f"order must be 0, 1 or 2, got {order!r}")
    if order == 2 and Dk > MAX_ORDER2_DIM:
        raise ValueError(f"order 2 needs {1 + Dk + Dk * (Dk + 1) // 2} monomials per key; it is offered for "
                         f"Dk <= {MAX_ORDER2_DIM}, got Dk = {Dk}")
    if order > 0:
        check_positive("ridge", ridge)
    if isinstance(initial_state, KVCache):  # the preallocated cache: the new tokens are written in place
        cache, starts = initial_state.append(k, v)
        S = cache.size
        kh, vh = cache.keys[:, :, :S], cache.values[:, :, :S]            # [B, H, S, D], rows padded to S
    else:
        k_all, v_all = append_to_cache(initial_state, k, v)
        cache = (k_all, v_all)
        kh, vh = k_all.transpose(1, 2), v_all.transpose(1, 2)
        starts = (kh.shape[2] - T,) * B
    out_dtype = q.dtype
    dt = compute_dtype(q.dtype)
    if isinstance(scale, Tensor):
        check_step("scale", scale, (H,))
        if checking() and float(scale.detach().min()) <= 0:  # exp(scale q.k) smooths only for a positive scale
            raise ValueError(f"scale must be positive per head, got min {float(scale.detach().min()):.4g}")
        scale = scale.to(dt)[:, None, None]                   # per head, against scores [B, H, n, T]
    else:
        scale = scale_or(scale, Dk ** -0.5, positive=True)
    qh, kh, vh = q.to(dt).transpose(1, 2), kh.to(dt), vh.to(dt)   # [B, H, T, D]
    if qk_norm:
        qh, kh = F.normalize(qh, dim=-1), F.normalize(kh, dim=-1)
    # position of each row's first query: it sees keys 0..first (an int where every row has the same)
    first = starts[0] if len(set(starts)) == 1 else torch.tensor(starts, device=q.device)
    if not causal:
        o = F.scaled_dot_product_attention(qh * scale, kh, vh, scale=1.0)
    elif window is not None:
        o = _attend_window(qh, kh, vh, first, scale, window)
    elif order == 0:  # SDPA over the filled prefix (decoding: one query, no mask, where the rows are alike)
        o = _attend(qh, kh, vh, first, scale)
    else:
        # decoding (one query a step) keeps the moments: they read the cache once, conjugate gradients twice a step
        cg = order == 1 and (solver == "cg" or solver == "auto" and mode == "chunk" and Dk >= CG_MIN_DIM)
        cg = cg and not torch.compiler.is_compiling()  # its steps and fallbacks are chosen on values read back
        tol = cg_tol if cg_tol is not None else 1e-10 if dt == torch.float64 else 1e-4
        block = BLOCK if mode == "chunk" else 1
        top = starts[0] if isinstance(first, int) else max(starts)
        outs = []
        for s in range(0, T, block):
            e = min(s + block, T)
            args = (qh[:, :, s:e], kh[:, :, : top + e], vh[:, :, : top + e], first + s, order, ridge, scale)
            outs.append(_linear_block(*args, tol) if cg else _checkpointed(_query_block, *args))
        o = torch.cat(outs, 2)
    o = finite_answer("local_polynomial_attention", o.transpose(1, 2).to(out_dtype))
    return o, (cache if output_final_state else None)


def _visible(first: int | Tensor, n: int, Tk: int, device: torch.device) -> Tensor:
    """Which keys each query sees: query j (at position first + j) sees keys 0 .. first + j. [n, Tk], or
    [B, 1, n, Tk] where first is a tensor [B] (rows of different lengths, keys padded to Tk)."""
    if isinstance(first, int):
        return torch.ones(n, Tk, dtype=torch.bool, device=device).tril(first)
    last = first[:, None] + torch.arange(n, device=device)                     # [B, n]
    return (torch.arange(Tk, device=device) <= last[..., None])[:, None]


def _attend(q: Tensor, k: Tensor, v: Tensor, first: int | Tensor, scale: float | Tensor) -> Tensor:
    """Softmax attention of queries q [B, H, n, D] at positions first + j over keys k, v [B, H, Tk, .]: torch's
    scaled_dot_product_attention, causal where the queries start at 0, unmasked for one query of rows alike."""
    n, Tk = q.shape[2], k.shape[2]
    per_head = isinstance(scale, Tensor)  # SDPA takes one number: a per-head scale goes into q
    alike = isinstance(first, int)                                            # every row at the same position
    mask = None if alike and (first == 0 or n == 1) else _visible(first, n, Tk, q.device)
    return F.scaled_dot_product_attention(q * scale if per_head else q, k, v, attn_mask=mask,
                                          is_causal=alike and first == 0 and n > 1,
                                          scale=1.0 if per_head else scale)


def _attend_window(q: Tensor, k: Tensor, v: Tensor, first: int | Tensor, scale: float | Tensor, w: int) -> Tensor:
    """Sliding-window softmax attention: query j (at position first + j) over keys first + j - w < i <= first + j.
    Rows alike: in blocks of n = max(BLOCK, w) queries, each over its n + w - 1 keys (unfolded: linear in T), one
    SDPA call with a band mask. Rows of different lengths (a ragged KVCache): one mask over the keys any query sees."""
    n, D = q.shape[2], q.shape[3]
    q = q * scale  # SDPA takes one number: a per-head scale goes into q
    if not isinstance(first, int):
        lo = max(int(first.min()) - w + 1, 0)  # the oldest key any query sees
        pos = torch.arange(lo, k.shape[2], device=q.device)
        last = (first[:, None] + torch.arange(n, device=q.device))[:, None, :, None]  # [B, 1, n, 1]
        mask = (pos <= last) & (pos > last - w)
        return F.scaled_dot_product_attention(q, k[:, :, lo:], v[:, :, lo:], attn_mask=mask, scale=1.0)
    # keys from position first - (w - 1), zeros before the sequence's start (masked); query j sees keys j .. j + w - 1
    front = max(w - 1 - first, 0)
    k, v = (F.pad(x[:, :, max(first - w + 1, 0):], (0, 0, front, 0)) for x in (k, v))
    block = min(max(BLOCK, w), n)
    blocks = -(-n // block)
    span = block + w - 1
    k, v = (F.pad(x, (0, 0, 0, blocks * block + w - 1 - x.shape[2])).unfold(2, span, block).transpose(-1, -2)
            for x in (k, v))                                          # [B, H, blocks, span, D]
    q = F.pad(q, (0, 0, 0, blocks * block - n)).unflatten(2, (blocks, block))
    a, c = torch.arange(block, device=q.device)[:, None], torch.arange(span, device=q.device)
    start = torch.arange(blocks, device=q.device)[:, None, None] * block
    mask = (c >= a) & (c < a + w) & (start + c >= front)                # [blocks, block, span]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return o.flatten(2, 3)[:, :, :n]


def _monomials(x: Tensor, order: int) -> Tensor:
    """psi(x) = [1, x_a, x_a x_b (a <= b)] up to `order`: [..., p]."""
    parts = [torch.ones_like(x[..., :1])]
    if order >= 1:
        parts.append(x)
    if order >= 2:
        a, b = torch.triu_indices(x.shape[-1], x.shape[-1], device=x.device)
        parts.append(x[..., a] * x[..., b])
    return torch.cat(parts, -1)


def _centring(q: Tensor, order: int) -> Tensor:
    """A(q) with phi(k - q) = A(q) psi(k), both in _monomials' order: [..., p, p]."""
    D = q.shape[-1]
    p = 1 + (D if order >= 1 else 0) + (D * (D + 1) // 2 if order >= 2 else 0)
    A = torch.zeros(*q.shape[:-1], p, p, dtype=q.dtype, device=q.device)
    A[..., 0, 0] = 1.0
    if order >= 1:
        lin = torch.arange(1, D + 1, device=q.device)
        A[..., lin, lin] = 1.0
        A[..., lin, 0] = -q                                   # k_a - q_a
    if order >= 2:
        a, b = torch.triu_indices(D, D, device=q.device)
        rows = torch.arange(1 + D, p, device=q.device)
        qa, qb = q[..., a], q[..., b]
        A[..., rows, rows] = 1.0                              # (k_a - q_a)(k_b - q_b) = k_a k_b
        A[..., rows, 1 + b] -= qa                             #   - q_a k_b
        A[..., rows, 1 + a] -= qb                             #   - q_b k_a
        A[..., rows, 0] = qa * qb                             #   + q_a q_b
    return A


def _outer(x: Tensor) -> Tensor:
    """x_i x_i^T for every row, flattened: [..., b, p] -> [..., b, p * p]."""
    return (x[..., :, None] * x[..., None, :]).flatten(-2)


class _Moments(torch.autograd.Function):
    """M_t = sum_i w_ti psi_i psi_i^T (w [..., n, Tk], psi [..., Tk, p]) -> [..., n, p * p], a tile of BLOCK keys at
    a time in forward and in backward alike: autograd would keep every tile's psi psi^T, a [Tk, p * p] tensor."""

    @staticmethod
    def forward(ctx, w: Tensor, psi: Tensor) -> Tensor:
        ctx.save_for_backward(w, psi)
        if w.shape[-2] == 1:  # one query (decoding): a weighted Gram matrix, psi^T diag(w) psi, no [Tk, p * p] tiles
            return ((psi * w.transpose(-1, -2)).transpose(-1, -2) @ psi).flatten(-2).unsqueeze(-2)
        return sum(w[..., i:i + BLOCK] @ _outer(psi[..., i:i + BLOCK, :]) for i in range(0, psi.shape[-2], BLOCK))

    @staticmethod
    def backward(ctx, dM: Tensor) -> tuple[Tensor, Tensor]:
        w, psi = ctx.saved_tensors
        p = psi.shape[-1]
        both = (dM.unflatten(-1, (p, p)) + dM.unflatten(-1, (p, p)).transpose(-1, -2)).flatten(-2)
        dw, dpsi = [], []
        for i in range(0, psi.shape[-2], BLOCK):
            tile = psi[..., i:i + BLOCK, :]
            dw.append(dM @ _outer(tile).transpose(-1, -2))                       # d/dw_ti = <dM_t, psi_i psi_i^T>
            around = (w[..., i:i + BLOCK].transpose(-1, -2) @ both).unflatten(-1, (p, p))
            dpsi.append((around @ tile[..., None])[..., 0])                      # sum_t w_ti (dM_t + dM_t^T) psi_i
        return torch.cat(dw, -1), torch.cat(dpsi, -2)


def _in_float64(q: Tensor, k: Tensor, v: Tensor, pos: int | Tensor, order: int, ridge: float, scale: float | Tensor
                ) -> Tensor:
    """_query_block computed in float64 and answered in q's dtype: for blocks float32 cannot be trusted with."""
    return _query_block(q.double(), k.double(), v.double(), pos, order, ridge,
                        scale.double() if isinstance(scale, Tensor) else scale).to(q.dtype)


def _cancels(A: Tensor, M: Tensor, G: Tensor) -> bool:
    """Whether the system G = A M A^T + ridge loses more than 1e-2 of its diagonal to cancellation in this dtype:
    the terms of A M A^T reach (|A| |M| |A|^T)_jj, so rounding errs by about eps times that. Queries far from
    their block's mean (keys and queries that drift along the sequence) make it so; that block runs in float64.
Measured (float32, T = 1024): with q and k drifting 0.2 per token, order 2 cancels up to 0.95 of the diagonal and
erred by 0.45 in float32; ordinary keys and common offsets stay near 1e-3 or below and run in float32."""
    with torch.no_grad():
        terms = (A.abs() @ M.abs() @ A.abs().transpose(-1, -2)).diagonal(dim1=-2, dim2=-1)
        ratio = terms / G.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(G.dtype).tiny)
        return float(ratio.max()) * torch.finfo(G.dtype).eps > 1e-2


def _query_block(q: Tensor, k: Tensor, v: Tensor, pos: int | Tensor, order: int, ridge: float,
                 scale: float | Tensor) -> Tensor:
    """Answers of queries at positions pos, pos + 1, ... (q [B, H, n, D]) from the keys they see
    (k [B, H, pos + n, D], query j sees keys 0..pos + j; pos a tensor [B]: each row's own, keys padded after
    each row's last): the module docstring's computation."""
    n, Tk = q.shape[2], k.shape[2]
    scores = scale * (q @ k.transpose(-1, -2))
    scores = scores.masked_fill(~_visible(pos, n, Tk, q.device), -math.inf)
    w = torch.exp(scores - scores.amax(-1, keepdim=True))    # [B, H, n, Tk], the row's largest weight is 1
    omega = w.sum(-1)
    if order == 0:
        return (w @ v) / omega[..., None]
    # k - q is unchanged by a common shift c; taking c at the block's queries keeps the monomials of
    # size |k - q| and not |k|, whose float32 moments would cancel (the block is one query when decoding)
    c = q.mean(-2, keepdim=True)
    psi = _monomials(k - c, order)                            # [B, H, Tk, p]
    p = psi.shape[-1]
    A = _centring(q - c, order)
    M = _Moments.apply(w, psi).unflatten(-1, (p, p))
    penalty = torch.ones(p, dtype=q.dtype, device=q.device)
    penalty[0] = 0.0
    G = A @ M @ A.transpose(-1, -2) + torch.diag_embed(ridge * omega[..., None] * penalty)
    tracing = torch.compiler.is_compiling()  # nothing read back: float64, and the guard always a selection
    if q.dtype != torch.float64 and (tracing or _cancels(A, M, G)):
        return _in_float64(q, k, v, pos, order, ridge, scale)
    e0 = torch.zeros(*G.shape[:-1], 1, dtype=q.dtype, device=q.device)
    e0[..., 0, 0] = 1.0
    L, info = torch.linalg.cholesky_ex(G)
    z = torch.cholesky_solve(e0, L)[..., 0]                   # G^-1 e_0: [B, H, n, p]; z_0 = 1 / delta
    # the guard: a singular local design (or a failed factorization) answers order 0. Those queries are
    # factorized again with the identity in their place, so no non-finite value stays in the graph (a zero
    # gradient times a NaN is still NaN); the common case factorizes once
    with torch.no_grad():
        singular = (info > 0) | ~(z[..., 0] * omega * math.sqrt(torch.finfo(q.dtype).eps) < 1.0)
    if not tracing and bool(singular.any()) and q.dtype != torch.float64:  # float32's singular may not be float64's
        return _in_float64(q, k, v, pos, order, ridge, scale)
    if tracing or bool(singular.any()):
        G = torch.where(singular[..., None, None], torch.eye(p, dtype=q.dtype, device=q.device), G)
        z = torch.cholesky_solve(e0, torch.linalg.cholesky(G))[..., 0]
        z = torch.where(singular[..., None], e0[..., 0] / omega[..., None], z)
    coef = (A.transpose(-1, -2) @ z[..., None])[..., 0]      # A^T z: weights on the uncentred monomials
    return (w * (coef @ psi.transpose(-1, -2))) @ v


def _checkpointed(fn, *args):
    """fn(*args), checkpointed under autograd: its intermediates are recomputed in backward, not kept."""
    if torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _linear_system(q: Tensor, k: Tensor, pos: int | Tensor, scale: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A block's softmax weights P [B, H, n, Tk] over the keys its queries see, and q and k about the block's query
    mean c: (P, q - c, k - c)."""
    n, Tk = q.shape[2], k.shape[2]
    scores = (scale * q) @ k.transpose(-1, -2)
    if isinstance(pos, int):  # keys 0..pos are seen by every query: only the last n are masked
        scores[..., pos:].masked_fill_(~_visible(0, n, n, q.device), -math.inf)
    else:
        scores.masked_fill_(~_visible(pos, n, Tk, q.device), -math.inf)
    c = q.mean(-2, keepdim=True)
    return torch.softmax(scores, -1), q - c, k - c


def _covariance(P: Tensor, kc: Tensor, mu: Tensor, ridge: float):
    """X -> rows (C_t + ridge I) x_t for a block's weights P and keys about c, kc (module docstring): two passes
    over the keys, through one [n, Tk] buffer."""
    buf = torch.empty_like(P)
    kc_t = kc.transpose(-1, -2)

    def apply(X: Tensor) -> Tensor:
        torch.matmul(X, kc_t, out=buf)
        return buf.mul_(P) @ kc - mu * (mu * X).sum(-1, keepdim=True) + ridge * X

    return apply


def _conjugate_gradients(apply, b: Tensor, diag: Tensor, tol: float) -> tuple[Tensor, bool]:
    """x with apply(x) = b, row by row (a query each), by conjugate gradients from x = 0 preconditioned by diag:
    (x, whether every row's relative residual |b - apply(x)| / |b| reached tol within 2 Dk + 8 steps). The residual
    is the recursive one; a row that reaches it stops moving (its step is 0, so no 0 / 0 once it is exact)."""
    tiny = torch.finfo(b.dtype).tiny
    goal = tol * b.norm(dim=-1, keepdim=True)
    x, r = torch.zeros_like(b), b
    z = r / diag
    d, rz = z, (r * z).sum(-1, keepdim=True)
    for _ in range(2 * b.shape[-1] + 8):
        moving = ~(r.norm(dim=-1, keepdim=True) <= goal)        # nan counts as moving, and misses
        if not bool(moving.any()):
            return x, True
        Ad = apply(d)
        step = torch.where(moving, rz / (d * Ad).sum(-1, keepdim=True).clamp_min(tiny), 0.0)
        x, r = x + step * d, r - step * Ad
        z = r / diag
        rz_next = (r * z).sum(-1, keepdim=True)
        d, rz = z + rz_next / rz.clamp_min(tiny) * d, rz_next
    return x, bool((r.norm(dim=-1, keepdim=True) <= goal).all())


def _linear_block(q: Tensor, k: Tensor, v: Tensor, pos: int | Tensor, order: int, ridge: float,
                  scale: float | Tensor, tol: float) -> Tensor:
    """Order 1 for a block of queries (as _query_block) by conjugate gradients (module docstring); by the moments
    where a query misses tol in its step budget, and in float64 where float32 cannot be trusted with the block."""
    solved = _solve_linear(q, k, v, pos, ridge, scale, tol)
    if solved == "float64":
        return _linear_block(q.double(), k.double(), v.double(), pos, order, ridge,
                             scale.double() if isinstance(scale, Tensor) else scale, tol).to(q.dtype)
    if solved == "moments":
        return _checkpointed(_query_block, q, k, v, pos, order, ridge, scale)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (q, k, v, scale)):
        return _ImplicitLinear.apply(q, k, v, scale, *solved, pos, ridge, tol)
    return solved[0]


@torch.no_grad()
def _solve_linear(q: Tensor, k: Tensor, v: Tensor, pos: int | Tensor, ridge: float, scale: float | Tensor,
                  tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | str:
    """_linear_block's answer and what its gradient needs, (y, x, mu - c, the preconditioner, which fits stand),
    or who answers instead: "float64" or "moments"."""
    P, qc, kc = _linear_system(q, k, pos, scale)
    mu, terms = (P @ torch.cat([kc, kc.square()], -1)).chunk(2, -1)  # terms: the diagonal of sum_i p_ti kc_i kc_i^T
    eps = torch.finfo(q.dtype).eps
    diag = (terms - mu.square() + ridge).clamp_min(eps * ridge)     # of C_t + ridge I: the preconditioner
    # the products round by about eps |k_i - c|^2 |x_t| and the answer by about eps times this ratio (queries far
    # from c, weights on keys near them; measured on drifting keys): float64 where that passes 1e-4
    if q.dtype != torch.float64 and float((terms / diag).max()) * eps > 1e-4:
        return "float64"
    b = qc - mu
    x, reached = _conjugate_gradients(_covariance(P, kc, mu, ridge), b, diag, tol)
    if not reached:
        return "moments"
    # the guard: 1 + beta_t = omega_t / delta_t (module docstring)
    fit = (1.0 + (b * x).sum(-1, keepdim=True)) * math.sqrt(eps) < 1.0
    if not bool(fit.all()) and q.dtype != torch.float64:
        return "float64"
    x = torch.where(fit, x, 0.0)                                    # x = 0 answers order 0
    weight = (x @ kc.transpose(-1, -2)).sub_((mu * x).sum(-1, keepdim=True)).add_(1.0)
    return weight.mul_(P) @ v, x, mu, diag, fit


class _ImplicitLinear(torch.autograd.Function):
    """y_t = sum_i p_ti weight_ti v_i, weight_ti = 1 + x_t . (k_i - mu_t), (C_t + ridge I) x_t = q_t - mu_t, given
    the solution x (_solve_linear's). Backward is implicit differentiation: with the adjoint
    u_t = (C_t + ridge I)^-1 h_t, h_t = (dy_t / dx_t)^T g_t = sum_i p_ti (g_t . v_i)(k_i - mu_t), every input gets
    the gradient of
        f = sum_t g_t . y_t - u_t . ((C_t + ridge I) x_t - q_t + mu_t)
    at fixed x and u (f = sum_t g_t . y_t wherever x solves its system). Everything about c, with gv_ti = g_t . v_i,
    xk_ti = x_t . k_i, uk_ti = u_t . k_i, vbar_t's share ybar_t = g_t . vbar_t and a_t = u_t . mu_t - ybar_t:
        df/dmu_t = a_t x_t + (mu_t . x_t - 1) u_t,     df/dq_t = u_t (at fixed p),
        df/dp_ti = (gv_ti - uk_ti) weight_ti + a_t xk_ti                      (mu_t's share included),
        df/dk_i = sum_t p_ti ((gv_ti - uk_ti + a_t) x_t - weight_ti u_t)       (at fixed p, mu_t's share included),
        df/dv_i = sum_t p_ti weight_ti g_t,
    and the softmax carries df/dp on to the scores scale q_t . k_i. One more solve and a few [n, Tk] products; where
    that solve misses tol, the moments' gradient (_exact_gradients)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, y, x, mu, diag, fit, pos, ridge, tol):
        ctx.pos, ctx.ridge, ctx.tol = pos, ridge, tol
        ctx.scale = scale if not isinstance(scale, Tensor) else None
        ctx.save_for_backward(q, k, v, x, mu, diag, fit, *([scale] if isinstance(scale, Tensor) else []))
        return y.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable  # the adjoint's steps are not to be differentiated either
    def backward(ctx, g):
        q, k, v, x, mu, diag, fit, *per_head = ctx.saved_tensors
        scale = per_head[0] if per_head else ctx.scale
        P, _, kc = _linear_system(q, k, ctx.pos, scale)
        gv = g @ v.transpose(-1, -2)                                   # g_t . v_i
        Pgv = P * gv
        ybar = Pgv.sum(-1, keepdim=True)                               # g_t . vbar_t
        u, reached = _conjugate_gradients(_covariance(P, kc, mu, ctx.ridge), (Pgv @ kc - ybar * mu) * fit, diag,
                                          ctx.tol)
        if not reached:
            return _exact_gradients(ctx, q, k, v, scale, g)
        one_mx = 1.0 - (mu * x).sum(-1, keepdim=True)                 # weight_ti = xk_ti + one_mx_t
        a = (mu * u).sum(-1, keepdim=True) - ybar                      # df/dmu_t = a_t x_t - one_mx_t u_t
        xk = x @ kc.transpose(-1, -2)
        diff = gv.sub_(u @ kc.transpose(-1, -2))                       # gv_ti - uk_ti
        da = diff + a
        dP = diff.mul_(one_mx).addcmul_(xk, da).mul_(P)                # p_ti df/dp_ti = p_ti (diff weight + a xk)
        dS = dP.addcmul_(P, dP.sum(-1, keepdim=True), value=-1.0)      # through the softmax: df/dscores
        Pw = xk.add_(one_mx).mul_(P)                                   # p_ti weight_ti
        kd = dS @ k
        dq = u + scale * kd
        dk = da.mul_(P).transpose(-1, -2) @ x - Pw.transpose(-1, -2) @ u + dS.transpose(-1, -2) @ (scale * q)
        dv = Pw.transpose(-1, -2) @ g
        dscale = (q * kd).sum((0, 2, 3)).view_as(scale) if per_head and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dscale, *(None,) * 8


def _exact_gradients(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float | Tensor, g: Tensor) -> tuple:
    """_ImplicitLinear.backward's answer from the moments (_query_block) differentiated by autograd."""
    per_head = isinstance(scale, Tensor)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in ((q, k, v, scale) if per_head else (q, k, v))]
        y = _query_block(*leaves[:3], ctx.pos, 1, ctx.ridge, leaves[3] if per_head else scale)
        grads = torch.autograd.grad(y, leaves, g)
    return *grads[:3], (grads[3] if per_head else None), *(None,) * 8
