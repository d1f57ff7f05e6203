"""The exact (second-order) memory: least squares solved at every step, the mesa layer and MesaNet.

Objective   M_t = argmin_M 1/2 sum_{i<=t} gamma_i^(t) beta_i || v_i - M k_i ||^2 + 1/2 || M Lambda^(1/2) ||_F^2
Weights     gamma_i^(t) = alpha_{i+1} ... alpha_t (g None: uniform, the mesa layer), times an input weight beta_i
Function    linear: m(k) = M k
Optimizer   the exact minimizer, one Newton step from anywhere:
                M_t = H_kv,t^T (H_kk,t + Lambda)^-1,   H_kk,t = alpha_t H_kk,t-1 + beta_t k_t k_t^T,
                                                       H_kv,t = alpha_t H_kv,t-1 + beta_t k_t v_t^T,
            o_t = M_t (scale q_t), scale 1 by default (as MesaNet); Lambda = diag(lamb) > 0 is the ridge, added
            at read-out. Dropping the inverse (H_kk + Lambda ~ I) gives back gated linear attention
            (ttr.ops.linear_attention).

State: the pair (H_kk [B, H, Dk, Dk], H_kv [B, H, Dk, Dv]), in float64 (see Precision).

The ridge is a change of variables: (H_kk + Lambda)^-1 = Lambda^-1/2 (H~_kk + I)^-1 Lambda^-1/2, where H~_kk,
H~_kv are the statistics of the keys Lambda^-1/2 k. So every form scales q and k by Lambda^-1/2 on entry
(and the state on entry and exit) and then solves with the ridge I; below Lambda = I.

Chunk form. The statistics at every chunk's start come first (they depend on no solve): a linear recurrence
over chunks, carried in float64, with a hand-written reverse recurrence as its backward (_Scan). Every
chunk's solves and read-outs then run at once.

Without decay (the Woodbury / leading-principal-block structure): inside a chunk that starts from
A = H_kk,0 + I, S_t = A + Khat_{<=t}^T Khat_{<=t} with Khat = sqrt(beta) K, and
    S_t^-1 q = A^-1 q - A^-1 Khat_{<=t}^T (I + Khat A^-1 Khat^T)_{<=t}^-1 Khat_{<=t} A^-1 q.
Every prefix needs the leading t x t block of one C x C matrix G = I + Khat A^-1 Khat^T; the Cholesky
factor of a leading block is the leading block of the Cholesky factor, so one factorization of A and
one of G serve the whole chunk, and masking the right-hand sides makes one triangular solve with C
columns answer every prefix at once.

With decay the ridge does not decay with the rest, so the base e^{G_t} H_kk,0 + I changes with t and no
single factorization serves a chunk. One symmetric eigendecomposition H_kk,0 = U diag(mu) U^T makes the
base's inverse U diag(1 / (e^{G_t} mu + 1)) U^T for every t at once; the Woodbury matrix of the
associations since H_kk,0 then still depends on t, so that form factorizes one c x c matrix per token.
To keep c small the eigenbases belong to sub-chunks of c tokens (_sub_chunk): each sub-chunk's start is
computed from its chunk's start (no gradient flows through it, see below), while the state, the read-out
and the backward stay at the chunk's size. No d x d factorization per token, every exponent <= 0; the
eigendecompositions are what this form costs (on the CPU _eigh spreads them over the cores).

Gradients of the exact forms are implicit differentiation of the solve (_ImplicitRead): backward solves once
more with the same factors, and the gradient of every input is written out from S_t, x_t and u_t alone, so
no factorization, eigendecomposition or sub-chunk start is differentiated (an eigendecomposition's
derivative is singular at repeated eigenvalues, which low-rank H_kk always has).

Precision. In float32 the statistics are the weak point: rounding H_kv by eps mixes the key null space,
where S_t^-1 q_t is of size |q| / lamb, into the answer, an error of about eps * (number of associations) /
lamb. So the statistics are carried in float64 (STATS) always. The chunk starts, the d x d steps
(factorization, eigenbasis) and the read-out run in the input's precision where the keys are
well-conditioned, and in float64 where they are not (_chunk_starts decides from the largest trace of H~_kk);
there the read-out goes through the eigenbasis with U^T H_kv formed in float64. The per-token c x c work
always runs in the input's precision. The recurrent form works in float64 throughout. Measured at
T = 16384, d = 16, three repeated unit keys, float32: relative error 4e-4 (uniform) and 5e-3 (decay 0.999)
at lamb = 1e-3, 5e-5 and 5e-4 at lamb = 1e-2 (tests/test_mesa.py bounds these); gradients there err by
1e-5 to 4e-2.

solver="cg" replaces every solve by conjugate gradients preconditioned by the diagonal of S_t and started
from q / diag(S_t) (the Jacobi guess); it applies S_t to every token's iterate at once with a few matrix
products, decay or not, in the starts' precision (float64 on ill-conditioned keys, as above). It stops once
every token's relative residual |q_t - S_t x_t| / |q_t| is at most cg_tol (1e-5 in float32, 1e-10 in
float64; or 4 eps max_j (S_t)_jj where the dtype reaches no better), checking the true residual before it
stops (float32's recursive residual drifts, and a restart from the true one recovers), or after cg_steps steps (default 4 Dk: d steps solve a d x d system in exact
arithmetic, and rounding needs more); short of the tolerance it warns with the residual reached. cg_tol=0
runs exactly cg_steps steps with no check (a fixed budget, as MesaNet trains), and autograd follows them: the
gradient of the answer computed. With a tolerance, gradients are the implicit ones of the exact forms with one
more CG solve (as JAX's cg), exact once both solves have converged, and no graph is kept over the steps.
Measured (T = 512, d = 16, lamb = 1, three repeated unit keys or keys of norm 5 ~ 20, float32): 8 fixed steps
err by 24 % and 53 % against the float64 solve; the default reaches the tolerance, and 1e-5 on the output.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import (_bounds, check_log_gate, check_mode, check_qkv, check_state, check_step, checking,
                       compute_dtype, finite_answer, log_gate_as, scale_or, vouch, vouched)
from ._chunk import causal_mask, check_chunk_size, decay_mask, from_chunks, to_chunks
from ._varlen import check_cu_seqlens, run_packed

STATS = torch.float64  # the carried statistics, and the d x d steps on ill-conditioned keys; see "Precision"
Z_SLICE = 2 ** 19  # entries of _eigen's Z formed at once (2 MiB in float32)


def _cholesky(M: Tensor, what: str, why: str = "the keys are too ill-conditioned for this ridge at this "
              "precision; raise lamb or use solver='cg'") -> Tensor:
    """Cholesky factor, or a ValueError that says what lost positive definiteness and what to do."""
    L, info = torch.linalg.cholesky_ex(M)
    if checking() and bool(info.any()):  # info > 0: the order of the leading minor that is not positive
        raise ValueError(f"{what} is not positive definite in {M.dtype}: {why}")
    return L


def _eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh of a batch of symmetric matrices [..., d, d], the batch split over torch's CPU threads.
    On the CPU torch decomposes a batch one matrix after another, each with every thread, which small matrices
    cannot use; these decompositions are most of the gated exact form's cost. So each thread decomposes its part
    of the batch alone (LAPACK releases the GIL), with the caller's grad and inference modes (which torch keeps per
    thread)."""
    flat = A.reshape(-1, *A.shape[-2:])
    threads, grad, inference = torch.get_num_threads(), torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    parts = min(threads, flat.shape[0])
    if A.device.type != "cpu" or parts < 2 or torch.compiler.is_compiling():  # a graph holds no thread pool
        return torch.linalg.eigh(A)
    mu, U = flat.new_empty(flat.shape[:-1]), torch.empty_like(flat)

    def part(a: Tensor, out: tuple[Tensor, Tensor]) -> None:
        # no torch.set_num_threads here: called from a worker thread it leaves MKL's LAPACK broken for the rest of
        # the process (a later batched torch.linalg.solve fails on its pivots); small matrices run on one thread
        # each anyway
        with torch.set_grad_enabled(grad), torch.inference_mode(inference):
            torch.linalg.eigh(a, out=out)

    with ThreadPoolExecutor(parts) as pool:
        done = [pool.submit(part, a, (m, u)) for a, m, u in zip(flat.chunk(parts), mu.chunk(parts), U.chunk(parts))]
    for d in done:
        d.result()                                                       # re-raises a part's error here
    return mu.view(A.shape[:-1]), U.view(A.shape)


def _ridge(lamb: float | Tensor, H: int, Dk: int, device: torch.device) -> Tensor:
    """lamb as a positive diagonal [H, Dk] (in STATS): a scalar, one per head [H], or one per channel [H, Dk]."""
    if not (isinstance(lamb, Tensor) or (isinstance(lamb, numbers.Real) and not isinstance(lamb, bool))):
        raise ValueError(f"lamb must be a positive number or a tensor [H] or [H, Dk], got {type(lamb).__name__} "
                         f"{lamb!r}")
    if isinstance(lamb, Tensor) and lamb.is_meta:
        raise ValueError("lamb is a meta tensor (a shape without values); the ridge must be known")
    lam = torch.as_tensor(float(lamb) if isinstance(lamb, numbers.Real) else lamb, dtype=STATS, device=device)
    if lam.dim() == 0:
        lam = lam.expand(H, Dk)
    elif tuple(lam.shape) == (H,):
        lam = lam[:, None].expand(H, Dk)
    elif tuple(lam.shape) != (H, Dk):
        raise ValueError(f"lamb must be a scalar, [H] = [{H}] or [H, Dk] = [{H}, {Dk}], got shape {list(lam.shape)}")
    low, high = _bounds("lamb", lam) if checking() else (1.0, 1.0)
    if not math.isfinite(high) or not low > 0:
        raise ValueError(f"lamb is a ridge and must be positive and finite, got min {low:.4g}")
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
    cg_steps: int | None = None,
    cg_tol: float | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """The mesa layer (g, beta None) and MesaNet (decay g [B, T, H] <= 0, input weight beta [B, T, H] >= 0).

    q, k: [B, T, H, Dk], v: [B, T, H, Dv]; lamb > 0 a scalar, [H] or [H, Dk]. Returns (o [B, T, H, Dv],
    (H_kk, H_kv) in float64, or None). "recurrent" solves a Cholesky system per token (the decoding path).
    solver "exact" or "cg": conjugate gradients to a relative residual cg_tol (1e-5 in float32, 1e-10 in float64)
    in at most cg_steps steps (4 Dk), in both forms alike; cg_tol=0 takes exactly cg_steps. scale defaults to 1:
    MesaNet (and fla's op) reads the memory at q itself. cu_seqlens [N + 1] (with B = 1) packs N sequences,
    with states [N, H, Dk, .].
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    cu = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T)
    rows = B if cu is None else cu.numel() - 1
    check_mode(mode, ("chunk", "recurrent"))
    check_chunk_size(chunk_size)
    if solver not in ("exact", "cg"):
        raise ValueError(f"solver must be 'exact' or 'cg', got {solver!r}")
    if cg_steps is not None and (not isinstance(cg_steps, int) or isinstance(cg_steps, bool) or cg_steps < 0):
        raise ValueError(f"cg_steps must be a non-negative int, got {cg_steps!r}")
    if cg_tol is not None and not (isinstance(cg_tol, numbers.Real) and not isinstance(cg_tol, bool)
                                   and 0 <= cg_tol < 1):
        raise ValueError(f"cg_tol must be a number in [0, 1), got {cg_tol!r}")
    check_log_gate(g, B, T, H, Dk, scalar_for="mesa")
    if beta is not None:
        check_step("beta", beta, (B, T, H))
    if initial_state is not None:
        if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2
                and all(isinstance(s, Tensor) for s in initial_state)):
            raise ValueError("initial_state must be the pair (H_kk [B, H, Dk, Dk], H_kv [B, H, Dk, Dv])")
        check_state("initial_state (H_kk)", initial_state[0], (rows, H, Dk, Dk))
        check_state("initial_state (H_kv)", initial_state[1], (rows, H, Dk, Dv))
    out_dtype = q.dtype
    dt = compute_dtype(q.dtype)
    # the ridge as a change of variables (module docstring): every form below solves with the ridge I. A unit
    # ridge (MesaNet's) changes nothing, and the decoding step skips the scalings
    unit = isinstance(lamb, numbers.Real) and not isinstance(lamb, bool) and float(lamb) == 1.0
    root = None if unit else _ridge(lamb, H, Dk, q.device).sqrt()       # Lambda^1/2: [H, Dk]
    if root is None:
        q_scale = scale_or(scale, 1.0)
        q, k, v = (q.to(dt) if q_scale == 1.0 else q.to(dt) * q_scale), k.to(dt), v.to(dt)
    else:
        q = q.to(dt) * (scale_or(scale, 1.0) / root.to(dt))
        k, v = k.to(dt) / root.to(dt), v.to(dt)
    beta = torch.ones(B, T, H, dtype=dt, device=q.device) if beta is None else beta.to(dt)
    g = log_gate_as(g, dt)
    if initial_state is None:
        state = (q.new_zeros(rows, H, Dk, Dk, dtype=STATS), q.new_zeros(rows, H, Dk, Dv, dtype=STATS))
    else:
        H_kk, H_kv = (s.to(STATS) for s in initial_state)
        # a state this op returned (vouched, exactly symmetric and positive semi-definite) is taken as it is;
        # else only H_kk's symmetric part enters the objective (x^T H_kk x): every form reads that, and its
        # gradient, and it must be positive semi-definite
        trusted = all(vouched(s) for s in initial_state) and not (
            torch.is_grad_enabled() and any(s.requires_grad for s in initial_state))
        if not trusted:
            H_kk = 0.5 * (H_kk + H_kk.transpose(-1, -2))
        if root is not None:
            H_kk, H_kv = H_kk / (root[:, :, None] * root[:, None, :]), H_kv / root[:, :, None]
        if not trusted:
            _cholesky(H_kk + torch.eye(Dk, dtype=STATS, device=H_kk.device), "initial_state (H_kk) + lamb",
                      "H_kk, a sum of weighted k k^T, must be positive semi-definite")
        state = (H_kk, H_kv)
    if mode == "recurrent" and solver == "exact":
        core = _recurrent
    else:
        implicit = True
        if solver == "cg":
            default_tol = 1e-10 if dt == torch.float64 else 1e-5
            tol = default_tol if cg_tol is None else float(cg_tol)
            solver = functools.partial(_conjugate_gradients, steps=4 * Dk if cg_steps is None else cg_steps, tol=tol)
            implicit = tol > 0  # a fixed budget is differentiated through its steps
        core = functools.partial(_chunked, C=1 if mode == "recurrent" else chunk_size, solver=solver, dt=dt,
                                 implicit=implicit)
    if cu is None:
        o, state = core(q, k, v, beta, g, state)
    else:  # zero beta and gates outside the sequences: no association, no decay
        o, state = run_packed(core, cu, [q, k, v, beta, g], state, None if mode == "recurrent" else chunk_size)
    if output_final_state:
        H_kk, H_kv = state
        if core is not _recurrent:  # the chunk forms' products round H_kk's two halves differently
            H_kk = 0.5 * (H_kk + H_kk.transpose(-1, -2))
        if root is not None:
            H_kk, H_kv = H_kk * (root[:, :, None] * root[:, None, :]), H_kv * root[:, :, None]
        state = (H_kk, H_kv)
        vouch(*state)
    return finite_answer("mesa", o.to(out_dtype)), (state if output_final_state else None)


def _chunked(q, k, v, beta, g, state, C, solver, dt, implicit):
    """The chunk form: every chunk's start first (_chunk_starts), then every chunk's solves and read-outs.
    solver: "exact", or the conjugate gradients' factory; implicit: differentiate the solve, not its steps."""
    qc, kc, vc, bc = (to_chunks(x, C) for x in (q, k, v, beta))     # padding: k = 0, beta = 0, g = 0
    G = torch.zeros_like(bc) if g is None else to_chunks(g, C).cumsum(-1)
    H_kk, H_kv, state = _chunk_starts(kc, vc, bc, G, state, dt)
    if solver == "exact":
        solver = _woodbury if g is None else _eigen
    if implicit:
        oc = _ImplicitRead.apply(qc, H_kk, H_kv, kc, vc, G, bc, solver)
    else:  # CG's fixed budget: autograd follows the steps, the gradient of the answer actually computed
        solve, read = solver(H_kk, kc, G, bc)
        oc = read(solve(qc), H_kv, vc)[1]
    return from_chunks(oc, q.shape[1]), state


def _recurrent(q, k, v, beta, g, state):
    """Token by token in STATS: accumulate H_kk and H_kv, one Cholesky solve per token. What H_kk gains has two
    halves made of the same products, so a symmetric state stays exactly symmetric."""
    H_kk, H_kv = state
    eye = torch.eye(H_kk.shape[-1], dtype=STATS, device=H_kk.device)
    q, k, v, beta = (x.to(STATS) for x in (q, k, v, beta))
    # without autograd (decoding) H_kk gains (sqrt(beta) k)(sqrt(beta) k)^T in one pass over the state; under
    # autograd beta (k k^T), whose gradient in beta stays finite at beta = 0 (padding)
    tracked = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, beta, g, *state))
    root_beta = None if tracked else beta.sqrt()
    outs = []
    for t in range(q.shape[1]):
        k_t, b_t = k[:, t], beta[:, t, :, None, None]
        alpha = None if g is None else torch.exp(g[:, t].to(STATS))[..., None, None]
        if tracked:
            if alpha is not None:
                H_kk, H_kv = alpha * H_kk, alpha * H_kv
            H_kk = torch.addcmul(H_kk, k_t[..., :, None] * k_t[..., None, :], b_t)
            H_kv = torch.addcmul(H_kv, b_t * k_t[..., :, None], v[:, t, :, None, :])
        else:  # fresh tensors written in place: the state handed in is not touched
            rk = (root_beta[:, t, :, None] * k_t)[..., :, None]
            H_kk = (H_kk.clone() if alpha is None else H_kk * alpha).addcmul_(rk, rk.transpose(-1, -2))
            H_kv = (H_kv.clone() if alpha is None else H_kv * alpha).addcmul_(b_t * k_t[..., :, None],
                                                                             v[:, t, :, None, :])
        # two triangular solves with the factor as it comes (column-major): cholesky_solve copies it first
        L = _cholesky(H_kk + eye, "H_kk + lamb")
        x = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, q[:, t, :, :, None], upper=False),
                                          upper=True)
        outs.append((x.transpose(-1, -2) @ H_kv)[..., 0, :])  # H_kv^T x as a row: 3x faster than as a column
    return torch.stack(outs, dim=1), (H_kk, H_kv)


def _chunk_starts(kc, vc, bc, G, state, dt):
    """The statistics (H_kk, H_kv) at the start of every chunk: they do not depend on any solve, so all of them
    come first and every chunk's solves then run at once. The recurrence is carried in STATS; the starts are
    stored in dt where the keys are well-conditioned and in STATS where they are not: in dt the d x d steps
    err by about eps * |H_kk| <= eps * trace(H_kk) against the unit ridge, so dt serves while the largest trace
    stays below 1e-4 / eps. kc, vc: [B, H, N, C, D]; bc, G: [B, H, N, C]. Returns the starts [B, H, N, ...]
    and the final state."""
    decay = torch.exp(G[..., -1].to(STATS))

    def starts(hi):
        return _Scan.apply(_increment(kc, kc, G, bc, hi), _increment(kc, vc, G, bc, hi), decay, *state)

    tracing = torch.compiler.is_compiling()  # a graph cannot read the peak back: the precision that always serves
    out = starts(STATS if tracing else dt)
    if dt != STATS and not tracing:
        peak = max(float(torch.diagonal(H.detach(), dim1=-2, dim2=-1).sum(-1).max()) for H in (out[0], out[2]))
        if peak * torch.finfo(dt).eps > 1e-4:
            out = starts(STATS)
    return out[0], out[1], out[2:]


def _increment(kc: Tensor, xc: Tensor, G: Tensor, bc: Tensor, hi: torch.dtype) -> Tensor:
    """What a chunk adds to a statistic by its end: sum_i w_{end, i} k_i x_i^T, in hi. kc, xc: [..., C, D]."""
    to_end = ((torch.exp(G[..., -1:] - G) * bc)[..., None] * kc).to(hi)
    return to_end.transpose(-1, -2) @ xc.to(hi)


class _Scan(torch.autograd.Function):
    """H_{n+1} = a_n H_n + inc_n for the pair (H_kk, H_kv): returns every H_n (in the increments' dtype) and the
    last one (in STATS, where the recurrence is carried). Backward runs the same recurrence in reverse, so the
    scan keeps no per-chunk graph."""

    @staticmethod
    def forward(ctx, kk, kv, a, H_kk, H_kv):
        running = [H_kk.clone(), H_kv.clone()]
        starts = [kk.new_empty(kk.shape), kv.new_empty(kv.shape)]
        for n in range(kk.shape[2]):
            for out, H_n, inc in zip(starts, running, (kk, kv)):
                out[:, :, n] = H_n
                H_n.mul_(a[:, :, n, None, None]).add_(inc[:, :, n])
        ctx.save_for_backward(a, *starts)
        return (*starts, *running)

    @staticmethod
    def backward(ctx, d_starts_kk, d_starts_kv, d_kk, d_kv):
        a, starts_kk, starts_kv = ctx.saved_tensors
        a_dt = a.to(starts_kk.dtype)[..., None, None]
        grads = []
        for d_starts, d_last, starts in ((d_starts_kk, d_kk, starts_kk), (d_starts_kv, d_kv, starts_kv)):
            d_inc = torch.empty_like(starts)                              # d_inc[n] = d / d H_{n+1}
            d_inc[:, :, -1] = d_last
            for n in reversed(range(a.shape[2] - 1)):
                torch.addcmul(d_starts[:, :, n + 1], d_inc[:, :, n + 1], a_dt[:, :, n + 1], out=d_inc[:, :, n])
            d_H = (d_starts[:, :, 0] + a_dt[:, :, 0] * d_inc[:, :, 0]).to(d_last.dtype)
            d_a = (d_inc.flatten(-2)[..., None, :] @ starts.flatten(-2)[..., :, None])[..., 0, 0]  # no d x d product
            grads.append((d_inc, d_H, d_a))
        (d_kk_inc, d_H_kk, d_a_kk), (d_kv_inc, d_H_kv, d_a_kv) = grads
        return d_kk_inc, d_kv_inc, (d_a_kk + d_a_kv).to(a.dtype), d_H_kk, d_H_kv


def _weights(G: Tensor, bc: Tensor) -> Tensor:
    """w_ti = e^{G_t - G_i} beta_i: association i's weight at t, [..., t, i], 0 for i > t."""
    return decay_mask(G) * bc[..., None, :]


def _weighted(P: Tensor, H0: Tensor, a: Tensor, b: Tensor, G: Tensor, bc: Tensor) -> Tensor:
    """Rows p_t -> rows (e^{G_t} H0 + sum_{i<=t} w_ti a_i b_i^T)^T p_t for every token of every chunk. With
    (H_kk, k, k) it applies S_t - I, with (H_kv, k, v) it reads the memory, with (H_kv^T, v, k) it is
    the read-out's transpose."""
    w = _weights(G, bc)
    return torch.exp(G)[..., None] * (P @ H0) + (w * (P @ a.transpose(-1, -2))) @ b


class _ImplicitRead(torch.autograd.Function):
    """o_t = H_kv,t^T S_t^-1 q_t for every token of every chunk, S_t = e^{G_t} H_kk,0 + sum_{i<=t} w_ti k_i k_i^T
    + I with w_ti = e^{G_t - G_i} beta_i. Forward prepares the solver (_woodbury without decay and _eigen with it
    factorize once per chunk; _conjugate_gradients iterates). Backward is implicit differentiation of the solve: with x_t = S_t^-1 q_t and
    u_t = S_t^-1 H_kv,t do_t (S_t is symmetric), dq_t = u_t and every other input gets the gradient of
        f = sum_t do_t . (H_kv,t^T x_t) - u_t . (S_t x_t)
    at fixed x and u, written out below: a few products, no factorization is differentiated."""

    @staticmethod
    def forward(ctx, qc, H_kk, H_kv, kc, vc, G, bc, solver):
        solve, read = solver(H_kk, kc, G, bc)
        x, o = read(solve(qc), H_kv, vc)
        ctx.solve = solve
        ctx.save_for_backward(H_kk, H_kv, kc, vc, G, bc, x)
        return o

    @staticmethod
    def backward(ctx, do):
        H_kk, H_kv, kc, vc, G, bc, x = ctx.saved_tensors
        H_kk, H_kv = H_kk.to(x.dtype), H_kv.to(x.dtype)
        e_G = torch.exp(G)[..., None]
        decay = decay_mask(G)                                            # e^{G_t - G_i}, [.., t, i]
        w = decay * bc[..., None, :]                                     # _weights, with decay kept for d_beta
        do_v = do @ vc.transpose(-1, -2)                                 # do_t . v_i
        H_do = do @ H_kv.transpose(-1, -2)                               # rows H_kv,0 do_t
        u, _ = ctx.solve(e_G * H_do + (w * do_v) @ kc)                   # S_t^-1 H_kv,t do_t
        x_k = x @ kc.transpose(-1, -2)                                   # x_t . k_i
        r = do_v - u @ kc.transpose(-1, -2)                              # d f / d (x_t . k_i), per weight w_ti
        d_beta = decay * x_k * r                                         # d f / d beta_i, per t
        dG = None
        if ctx.needs_input_grad[5]:                                      # only with decay
            d_log_w = d_beta * bc[..., None, :]
            base = (H_do * x).sum(-1) - ((u @ H_kk) * x).sum(-1)         # d f / d e^{G_t}
            dG = d_log_w.sum(-1) - d_log_w.sum(-2) + e_G[..., 0] * base
        w_x_k = w * x_k
        dk = (w * r).transpose(-1, -2) @ x - w_x_k.transpose(-1, -2) @ u
        dv = w_x_k.transpose(-1, -2) @ do
        dH_kk = -(e_G * u).transpose(-1, -2) @ x
        dH_kv = (e_G * x).transpose(-1, -2) @ do
        return u, dH_kk, dH_kv, dk, dv, dG, d_beta.sum(-2), None


def _woodbury(H_kk, kc, G, bc):
    """Uniform weights (times beta): the leading-principal-block form of the module docstring, its d x d steps
    in H_kk's dtype hi. Returns solve(rows) -> (S_t^-1 rows_t, the same in hi) and read(those, H_kv, vc) -> (x, o)."""
    dt, hi, C = kc.dtype, H_kk.dtype, kc.shape[-2]
    up_to = causal_mask(C, kc.device).T                                  # [i, t]: association i seen at t
    khat = (kc * bc.sqrt()[..., None]).to(hi)                            # sqrt(beta) k: [B, H, N, C, Dk]
    chol_A = _cholesky(H_kk + torch.eye(H_kk.shape[-1], dtype=hi, device=kc.device), "H_kk + lamb")
    Ak = torch.cholesky_solve(khat.transpose(-1, -2), chol_A)            # A^-1 khat_i as columns
    eye = torch.eye(C, dtype=hi, device=kc.device)
    chol_G = _cholesky(eye + khat @ Ak, "the chunk's Woodbury matrix").to(dt)

    def solve(rows):
        Aq = torch.cholesky_solve(rows.to(hi).transpose(-1, -2), chol_A)  # A^-1 q_t as columns [.., Dk, C]
        rhs = (khat @ Aq).to(dt).masked_fill(~up_to, 0.0)                # column t: khat_i . A^-1 q_t, i <= t
        y = torch.linalg.solve_triangular(chol_G, rhs, upper=False).masked_fill(~up_to, 0.0)
        z = torch.linalg.solve_triangular(chol_G.transpose(-1, -2), y, upper=True)
        x = (Aq - Ak @ z.to(hi)).transpose(-1, -2)                       # S_t^-1 q_t as rows
        return x.to(dt), x

    def read(xs, H_kv, vc):
        x, x_hi = xs
        return x, _weighted(x_hi, H_kv, *(t.to(hi) for t in (kc, vc, G, bc))).to(dt)

    return solve, read


def _sub_chunk(C: int, Dk: int) -> int:
    """Tokens per eigenbasis in chunks of C: a sub-chunk's eigendecomposition costs about Dk^3, its tokens'
    c x c Woodbury matrices about c^2 Dk each. Measured (2 cores, T = 4096) the balance is 16 tokens up to
    Dk = 64 and Dk / 4 above it (32 at Dk = 128: about 600 ms against 720 with 16), rounded up to a power of two."""
    return min(C, max(16, 1 << (Dk // 4 - 1).bit_length()))


def _eigen(H_kk, kc, G, bc):
    """Decay: the eigendecomposition form of the module docstring, in H_kk's dtype hi, on sub-chunks of
    _sub_chunk tokens inside each chunk (the chunk keeps the state and the read-out). Returns
    solve(rows) -> (S_t^-1 rows_t, the same in each sub-chunk's eigenbasis) and read(those, H_kv, vc) -> (x, o)."""
    dt, shape = kc.dtype, kc.shape
    c = _sub_chunk(shape[-2], shape[-1])

    def sub(x: Tensor) -> Tensor:                                        # [B, H, M, C, ...] -> [B, H, M, R, c, ...]
        return x.unflatten(3, (-1, c))

    G_rel = sub(G) - F.pad(sub(G)[..., :-1, -1], (1, 0))[..., None]    # log-decay since the sub-chunk's start
    k_sub, b_sub = sub(kc), sub(bc)
    mu, U_hi = _eigh(_sub_starts(H_kk, k_sub, k_sub, G_rel, b_sub))  # H_kk,0 = U diag(mu) U^T
    k_sub, G_sub, b_sub = k_sub.flatten(2, 3), G_rel.flatten(2, 3), b_sub.flatten(2, 3)  # sub-chunks as chunks
    U = U_hi.to(dt)
    D = 1.0 / (torch.exp(G_sub)[..., :, None] * mu.to(dt)[..., None, :] + 1.0)  # the base's inverse: [.., t, d]
    Y = k_sub @ U                                                        # keys in the eigenbasis
    root_w = _weights(G_sub, b_sub).sqrt()                               # sqrt(w_ti), 0 for i > t
    # E_t = I + Z_t Z_t^T with rows z_ti = sqrt(w_ti) y_i sqrt(D_t): token t's c x c Woodbury matrix. Z has
    # c^2 d entries per sub-chunk, so it is formed a slice of sub-chunks at a time, each used while in cache
    E = torch.empty(*G_sub.shape, c, c, dtype=dt, device=kc.device)
    per = max(1, Z_SLICE // (c * c * Y.shape[-1]))
    for E_s, Y_s, D_s, r_s in zip(*(x.flatten(0, 2).split(per) for x in (E, Y, D.sqrt(), root_w))):
        Z = (D_s[..., :, None, :] * Y_s[..., None, :, :]).mul_(r_s[..., None])  # [sub-chunks, t, i, d]
        torch.matmul(Z, Z.transpose(-1, -2), out=E_s)
    E.diagonal(dim1=-2, dim2=-1).add_(1.0)
    chol_E = _cholesky(E, "the chunk's Woodbury matrix")

    def solve(rows):
        r = rows.reshape(*Y.shape[:3], c, -1) @ U
        rhs = root_w * ((D * r) @ Y.transpose(-1, -2))
        z = torch.cholesky_solve(rhs[..., None], chol_E)[..., 0]
        xb = D * (r - (root_w * z) @ Y)                                  # S_t^-1 q_t in the basis, as rows
        return (xb @ U.transpose(-1, -2)).reshape(rows.shape), xb

    def read(xs, H_kv, vc):
        x, xb = xs
        if H_kv.dtype == dt:
            return x, _weighted(x, H_kv, kc, vc, G, bc)
        # ill-conditioned keys: read out in each sub-chunk's basis, where with U^T H_kv formed in hi the large
        # null-space part of S_t^-1 q_t (size |q| / lamb) meets exact zeros instead of the rounding of H_kv to dt
        v_sub = sub(vc)
        H_kv_sub = _sub_starts(H_kv, sub(kc), v_sub, G_rel, sub(bc))
        o = _weighted(xb, (U_hi.transpose(-1, -2) @ H_kv_sub).to(dt), Y, v_sub.flatten(2, 3), G_sub, b_sub)
        return x, o.reshape(*shape[:-1], -1)

    return solve, read


def _sub_starts(H0: Tensor, k_sub: Tensor, x_sub: Tensor, G_sub: Tensor, b_sub: Tensor) -> Tensor:
    """A statistic at every sub-chunk's start from its chunk's start H0 [B, H, M, d, e], in H0's dtype:
    [B, H, M * R, d, e]. k_sub, x_sub: [B, H, M, R, c, .]; G_sub (log-decay since the sub-chunk's start), b_sub:
    [B, H, M, R, c]. Not differentiated: the implicit backward is written in terms of S_t alone."""
    last = slice(None, -1)                                               # the last sub-chunk's increment is unused
    inc = _increment(k_sub[..., last, :, :], x_sub[..., last, :, :], G_sub[..., last, :], b_sub[..., last, :], H0.dtype)
    a = torch.exp(G_sub[..., -1]).to(H0.dtype)[..., None, None]
    starts = inc.new_empty(*inc.shape[:3], k_sub.shape[3], *inc.shape[4:])  # [B, H, M, R, d, e]
    starts[..., 0, :, :] = H0
    for j in range(inc.shape[3]):
        torch.addcmul(inc[..., j, :, :], starts[..., j, :, :], a[..., j, :, :], out=starts[..., j + 1, :, :])
    return starts.flatten(2, 3)


def _conjugate_gradients(H_kk, kc, G, bc, steps, tol):
    """Conjugate gradients on S_t x_t = rows_t for every token at once (C = 1: token by token), with
    S_t p = e^{G_t} H_kk,0 p + sum_{i<=t} w_ti k_i (k_i . p) + p, in H_kk's dtype hi (module docstring).
    Returns solve(rows) -> (x, x) and read(those, H_kv, vc) -> (x, o), as _woodbury and _eigen do."""
    dt, hi = kc.dtype, H_kk.dtype
    kc, G, bc = kc.to(hi), G.to(hi), bc.to(hi)
    tiny = torch.finfo(hi).tiny
    w = _weights(G, bc)
    diag = torch.exp(G)[..., None] * torch.diagonal(H_kk, dim1=-2, dim2=-1)[..., None, :] + w @ (kc * kc) + 1.0

    def apply(P: Tensor) -> Tensor:                                        # rows p_t -> rows (S_t p_t)^T
        return _weighted(P, H_kk, kc, kc, G, bc) + P

    # the tolerance, or what hi can reach: a residual computed in hi errs by about eps |S_t| |x_t|, and the
    # largest diagonal entry of S_t stands in for |S_t| (repeated keys make it ~ the number of associations)
    limit = torch.clamp_min(4 * torch.finfo(hi).eps * diag.amax(-1), tol) if tol > 0 else None

    def worst(r: Tensor, b_norm: Tensor) -> float:                       # the largest |r_t| - limit_t |b_t|
        return float((r.norm(dim=-1) - limit * b_norm).max())

    def solve(rows: Tensor) -> tuple[Tensor, Tensor]:
        b = rows.to(hi)
        b_norm = b.norm(dim=-1)
        x, taken = b / diag, 0
        r = b - apply(x)
        while taken < steps and not (tol > 0 and worst(r, b_norm) <= 0):  # one pass per (re)start
            z = r / diag
            p, rz = z, (r * z).sum(-1, keepdim=True)
            while taken < steps:
                Ap = apply(p)
                step = rz / (p * Ap).sum(-1, keepdim=True).clamp_min(tiny)
                x, r = x + step * p, r - step * Ap
                taken += 1
                if tol > 0 and worst(r, b_norm) <= 0:
                    break
                z = r / diag
                rz_next = (r * z).sum(-1, keepdim=True)
                p, rz = z + rz_next / rz.clamp_min(tiny) * p, rz_next
            if tol > 0:                                                  # the recursive residual drifts: check the
                r = b - apply(x)                                         # true one, and restart from it if need be
        if tol > 0 and worst(r, b_norm) > 0:
            reached = float((r.norm(dim=-1) / b_norm.clamp_min(tiny)).max())
            warnings.warn(f"mesa: conjugate gradients stopped at a relative residual of {reached:.2e} after {taken} "
                          f"steps, above cg_tol = {tol:g} (and above what {hi} reaches on these keys); raise "
                          "cg_steps or use solver='exact'", RuntimeWarning, stacklevel=2)
        return x.to(dt), x

    def read(xs: tuple[Tensor, Tensor], H_kv: Tensor, vc: Tensor) -> tuple[Tensor, Tensor]:
        x, x_hi = xs
        return x, _weighted(x_hi, H_kv.to(hi), kc, vc.to(hi), G, bc).to(dt)

    return solve, read
