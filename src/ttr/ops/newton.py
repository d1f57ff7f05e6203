"""The exact (second-order) memory: least squares solved at every step, the mesa layer and MesaNet.

Objective   M_t = argmin_M 1/2 sum_{i<=t} gamma_i^(t) beta_i || v_i - M k_i ||^2 + 1/2 || M Lambda^(1/2) ||_F^2
Weights     gamma_i^(t) = alpha_{i+1} ... alpha_t (g None: uniform, the mesa layer), times an input weight beta_i
Function    linear: m(k) = M k
Optimizer   the exact minimizer, one Newton step from anywhere:
                M_t = H_kv,t^T (H_kk,t + Lambda)^-1,   H_kk,t = alpha_t H_kk,t-1 + beta_t k_t k_t^T,
                                                       H_kv,t = alpha_t H_kv,t-1 + beta_t k_t v_t^T,
            o_t = M_t (scale q_t); Lambda = diag(lamb) > 0 is the ridge, added at read-out. Dropping the
            inverse (H_kk + Lambda ~ I) gives back gated linear attention (ttr.ops.linear_attention).

State: the pair (H_kk [B, H, Dk, Dk], H_kv [B, H, Dk, Dv]).

Chunk form without decay (the Woodbury / leading-principal-block structure): inside a chunk that
starts from A = H_kk,0 + Lambda, S_t = A + Khat_{<=t}^T Khat_{<=t} with Khat = sqrt(beta) K, and
    S_t^-1 q = A^-1 q - A^-1 Khat_{<=t}^T (I + Khat A^-1 Khat^T)_{<=t}^-1 Khat_{<=t} A^-1 q.
Every prefix needs the leading t x t block of one C x C matrix G = I + Khat A^-1 Khat^T; the Cholesky
factor of a leading block is the leading block of the Cholesky factor, so one factorization of A and
one of G serve the whole chunk, and masking the right-hand sides makes one triangular solve with C
columns answer every prefix at once.

With decay the ridge does not decay with the rest, so the base M_t = e^{G_t} H_kk,0 + Lambda changes with t.
One symmetric eigendecomposition per chunk diagonalizes H_kk,0 and Lambda together (V^T Lambda V = I,
V^T H_kk,0 V = diag(mu)), so M_t^-1 = V diag(1 / (e^{G_t} mu + 1)) V^T for every t at once; the Woodbury
matrix of the chunk's associations then still depends on t, so that form factorizes one C x C matrix per
token, on chunks of GATED_CHUNK tokens: no d x d factorization per token, every exponent <= 0.

solver="cg" replaces every solve by `cg_steps` steps of conjugate gradients preconditioned by the
diagonal of S_t and started from q / diag(S_t) (the Jacobi guess); its chunk form applies S_t to every
token's iterate at once with a few matrix products, decay or not. Gradients follow the steps taken.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_log_gate, check_mode, check_qkv, check_state, check_step, compute_dtype
from ._chunk import causal_mask, check_chunk_size, from_chunks, masked_exp, to_chunks

GATED_CHUNK = 16


def _cholesky(M: Tensor, what: str) -> Tensor:
    """Cholesky factor, or a ValueError that says what lost positive definiteness and what to do."""
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info > 0).any()):
        raise ValueError(f"{what} is not positive definite in {M.dtype}: the keys are too ill-conditioned for "
                         "this ridge at this precision; raise lamb, pass float64 inputs, or use solver='cg'")
    return L


def _ridge(lamb: float | Tensor, H: int, Dk: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """lamb as a positive diagonal [H, Dk]: a scalar, one per head [H], or one per channel [H, Dk]."""
    lam = torch.as_tensor(lamb, dtype=dtype, device=device)
    if lam.dim() == 0:
        lam = lam.expand(H, Dk)
    elif tuple(lam.shape) == (H,):
        lam = lam[:, None].expand(H, Dk)
    elif tuple(lam.shape) != (H, Dk):
        raise ValueError(f"lamb must be a scalar, [H] = [{H}] or [H, Dk] = [{H}, {Dk}], got shape {list(lam.shape)}")
    if not bool(torch.isfinite(lam).all()) or float(lam.min()) <= 0:
        raise ValueError(f"lamb is a ridge and must be positive and finite, got min {float(lam.min()):.4g}")
    return lam


def mesa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    lamb: float | Tensor,
    scale: float | None = None,
    initial_state: tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
    solver: str = "exact",
    cg_steps: int = 8,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """The mesa layer (g, beta None) and MesaNet (decay g [B, T, H] <= 0, input weight beta [B, T, H] >= 0).

    q, k: [B, T, H, Dk], v: [B, T, H, Dv]; lamb > 0 a scalar, [H] or [H, Dk]. Returns (o [B, T, H, Dv],
    (H_kk, H_kv) or None). "recurrent" solves a Cholesky system per token (the decoding path).
    solver "exact" or "cg" (cg_steps conjugate-gradient steps, in both forms alike).
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    check_mode(mode, ("chunk", "recurrent"))
    check_chunk_size(chunk_size)
    if solver not in ("exact", "cg"):
        raise ValueError(f"solver must be 'exact' or 'cg', got {solver!r}")
    if solver == "cg" and (not isinstance(cg_steps, int) or cg_steps < 0):
        raise ValueError(f"cg_steps must be a non-negative int, got {cg_steps!r}")
    check_log_gate(g, B, T, H, Dk, scalar_for="mesa")
    if beta is not None:
        check_step("beta", beta, (B, T, H))
    if initial_state is not None:
        if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
            raise ValueError("initial_state must be the pair (H_kk [B, H, Dk, Dk], H_kv [B, H, Dk, Dv])")
        check_state("initial_state (H_kk)", initial_state[0], (B, H, Dk, Dk))
        check_state("initial_state (H_kv)", initial_state[1], (B, H, Dk, Dv))
    out_dtype = q.dtype
    dt = compute_dtype(q.dtype)
    ridge = torch.diag_embed(_ridge(lamb, H, Dk, dt, q.device))  # [H, Dk, Dk]
    q = q.to(dt) * (Dk ** -0.5 if scale is None else float(scale))
    k, v = k.to(dt), v.to(dt)
    beta = torch.ones(B, T, H, dtype=dt, device=q.device) if beta is None else beta.to(dt)
    g = None if g is None else g.to(dt)
    if initial_state is None:
        state = (q.new_zeros(B, H, Dk, Dk), q.new_zeros(B, H, Dk, Dv))
    else:
        state = tuple(s.to(dt) for s in initial_state)
    if solver == "cg":
        o, state = _cg(q, k, v, g, beta, ridge, state, chunk_size if mode == "chunk" else 1, cg_steps)
    elif mode == "recurrent":
        o, state = _recurrent(q, k, v, g, beta, ridge, state)
    elif g is None:
        o, state = _chunked_uniform(q, k, v, beta, ridge, state, chunk_size)
    else:
        o, state = _chunked_gated(q, k, v, g, beta, ridge, state, chunk_size)
    return o.to(out_dtype), (state if output_final_state else None)


def _recurrent(q, k, v, g, beta, ridge, state):
    H_kk, H_kv = state
    outs = []
    for t in range(q.shape[1]):
        if g is not None:
            alpha = torch.exp(g[:, t])[..., None, None]
            H_kk, H_kv = alpha * H_kk, alpha * H_kv
        bk = beta[:, t, :, None] * k[:, t]
        H_kk = H_kk + bk[..., :, None] * k[:, t, :, None, :]
        H_kv = H_kv + bk[..., :, None] * v[:, t, :, None, :]
        x = torch.cholesky_solve(q[:, t, :, :, None], _cholesky(H_kk + ridge, "H_kk + lamb"))
        outs.append((H_kv.transpose(-1, -2) @ x)[..., 0])
    return torch.stack(outs, dim=1), (H_kk, H_kv)


def _chunk_starts(kc, vc, bc, G, state):
    """The statistics (H_kk, H_kv) at the start of every chunk: they do not depend on any solve, so all of
    them come first (a cheap linear recurrence) and every chunk's solves then run at once.
    kc, vc: [B, H, N, C, D]; bc, G: [B, H, N, C]. Returns starts [B, H, N, ...] and the final state."""
    to_end = (torch.exp(G[..., -1:] - G) * bc)[..., None] * kc               # w_{end, i} k_i
    kk, kv = to_end.transpose(-1, -2) @ kc, to_end.transpose(-1, -2) @ vc     # each chunk's own sums
    decay = torch.exp(G[..., -1])[..., None, None]
    H_kk, H_kv = state
    starts_kk, starts_kv = [], []
    for kk_n, kv_n, d_n in zip(kk.unbind(2), kv.unbind(2), decay.unbind(2)):
        starts_kk.append(H_kk)
        starts_kv.append(H_kv)
        H_kk, H_kv = d_n * H_kk + kk_n, d_n * H_kv + kv_n
    return torch.stack(starts_kk, dim=2), torch.stack(starts_kv, dim=2), (H_kk, H_kv)


def _log_weights(G: Tensor, bc: Tensor) -> Tensor:
    """log w_ti = G_t - G_i + log beta_i: association i's weight at t, [..., t, i] (mask i <= t to use)."""
    return G[..., :, None] - G[..., None, :] + bc.clamp_min(torch.finfo(bc.dtype).tiny).log()[..., None, :]


def _chunked_uniform(q, k, v, beta, ridge, state, C):
    """Uniform weights (times beta): the leading-principal-block form of the module docstring."""
    T = q.shape[1]
    qc, kc, vc, bc = (to_chunks(x, C) for x in (q, k, v, beta))     # padding: k = 0, beta = 0
    H_kk, H_kv, final = _chunk_starts(kc, vc, bc, torch.zeros_like(bc), state)
    up_to = causal_mask(C, q.device).T                                   # [i, t]: association i seen at t
    khat = kc * bc.sqrt()[..., None]                                     # sqrt(beta) k: [B, H, N, C, Dk]
    chol_A = _cholesky(H_kk + ridge[:, None], "H_kk + lamb")
    Aq = torch.cholesky_solve(qc.transpose(-1, -2), chol_A)              # A^-1 q_t as columns [.., Dk, C]
    Ak = torch.cholesky_solve(khat.transpose(-1, -2), chol_A)            # A^-1 khat_i as columns
    chol_G = _cholesky(torch.eye(C, dtype=q.dtype, device=q.device) + khat @ Ak, "the chunk's Woodbury matrix")
    rhs = (khat @ Aq).masked_fill(~up_to, 0.0)                           # column t: khat_i . A^-1 q_t, i <= t
    y = torch.linalg.solve_triangular(chol_G, rhs, upper=False).masked_fill(~up_to, 0.0)
    z = torch.linalg.solve_triangular(chol_G.transpose(-1, -2), y, upper=True)
    x = Aq - Ak @ z                                                      # S_t^-1 q_t as columns
    seen = (kc @ x).masked_fill(~up_to, 0.0)                             # k_i . x_t for i <= t
    o = x.transpose(-1, -2) @ H_kv + seen.transpose(-1, -2) @ (bc[..., None] * vc)
    return from_chunks(o, T), final


def _chunked_gated(q, k, v, g, beta, ridge, state, C):
    """Decay and ridge: the per-chunk simultaneous diagonalization of the module docstring."""
    T = q.shape[1]
    C = min(C, GATED_CHUNK)
    qc, kc, vc, bc, gc = (to_chunks(x, C) for x in (q, k, v, beta, g))  # padding: k = 0, g = 0
    G = gc.cumsum(-1)                                                   # [B, H, N, C]
    H_kk, H_kv, final = _chunk_starts(kc, vc, bc, G, state)
    seen = causal_mask(C, q.device)                                     # [t, i]: i <= t
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    lam_isqrt = torch.diagonal(ridge, dim1=-2, dim2=-1).rsqrt()[:, None]  # Lambda^-1/2: [H, 1, Dk]
    mu, U = torch.linalg.eigh(lam_isqrt[..., :, None] * H_kk * lam_isqrt[..., None, :])
    V = lam_isqrt[..., :, None] * U                                      # V^T Lambda V = I, V^T H_kk V = diag(mu)
    D = 1.0 / (torch.exp(G)[..., :, None] * mu.clamp_min(0.0)[..., None, :] + 1.0)  # [B, H, N, t, d]
    Y, Qr = kc @ V, qc @ V                                               # keys and queries in that basis
    # sqrt(w_ti), w_ti = e^{G_t - G_i} beta_i: association i's weight at t (0 for i > t)
    log_w = _log_weights(G, bc)
    root_w = masked_exp(0.5 * log_w, seen)
    gram = torch.einsum("...id,...td,...jd->...tij", Y, D, Y)           # Y diag(D_t) Y^T for every t
    E = eye + root_w[..., :, :, None] * gram * root_w[..., :, None, :]
    rhs = root_w * torch.einsum("...id,...td->...ti", Y, D * Qr)
    z = torch.cholesky_solve(rhs[..., None], _cholesky(E, "the chunk's Woodbury matrix"))[..., 0]
    x = (D * (Qr - (root_w * z) @ Y)) @ V.transpose(-1, -2)              # S_t^-1 q_t as rows
    w = masked_exp(log_w, seen)
    o = torch.exp(G)[..., None] * (x @ H_kv) + (w * (x @ kc.transpose(-1, -2))) @ vc
    return from_chunks(o, T), final


def _cg(q, k, v, g, beta, ridge, state, C, steps):
    """Conjugate gradients on S_t x_t = q_t for every token at once (C = 1: token by token), with
    S_t p = e^{G_t} H_kk,0 p + sum_{i<=t} w_ti k_i (k_i . p) + Lambda p,  w_ti = e^{G_t - G_i} beta_i."""
    T = q.shape[1]
    if g is None:
        g = torch.zeros_like(beta)
    qc, kc, vc, bc, gc = (to_chunks(x, C) for x in (q, k, v, beta, g))
    G = gc.cumsum(-1)
    H_kk, H_kv, final = _chunk_starts(kc, vc, bc, G, state)
    tiny = torch.finfo(q.dtype).tiny
    w = masked_exp(_log_weights(G, bc), causal_mask(C, q.device))
    e_G = torch.exp(G)[..., None]                                          # [B, H, N, C, 1]
    lam = torch.diagonal(ridge, dim1=-2, dim2=-1)[:, None, None, :]        # [H, 1, 1, Dk]

    def apply(P: Tensor) -> Tensor:                                        # rows p_t -> rows (S_t p_t)^T
        return e_G * (P @ H_kk) + (w * (P @ kc.transpose(-1, -2))) @ kc + lam * P

    diag = e_G * torch.diagonal(H_kk, dim1=-2, dim2=-1)[..., None, :] + w @ (kc * kc) + lam
    x = qc / diag
    r = qc - apply(x)
    z = r / diag
    p, rz = z, (r * z).sum(-1, keepdim=True)
    for _ in range(steps):
        Ap = apply(p)
        step = rz / (p * Ap).sum(-1, keepdim=True).clamp_min(tiny)
        x, r = x + step * p, r - step * Ap
        z = r / diag
        rz_next = (r * z).sum(-1, keepdim=True)
        p, rz = z + rz_next / rz.clamp_min(tiny) * p, rz_next
    o = e_G * (x @ H_kv) + (w * (x @ kc.transpose(-1, -2))) @ vc
    return from_chunks(o, T), final
