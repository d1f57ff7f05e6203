"""Mini-batch gradient descent (TTT, Titans): every gradient of a mini-batch is taken at its first weights.

Objective   the running regression loss L_t(W) = sum_{i<=t} 1/2 || v_i - f_W(k_i) ||^2, visited in mini-batches
Weights     uniform
Function    TTT-Linear: f_W(k) = W k.  TTT-MLP: f_W(k) = W2 gelu(W1 k), a two-layer MLP (nonlinear memory)
Optimizer   mini-batch GD with inner learning rate eta_t and mini-batch size b: for t in a mini-batch that
            starts from W_0,   W_t = W_0 - sum_{i <= t, i in batch} eta_i grad l_i(W_0),   y_t = f_{W_t}(q_t);
            the next mini-batch starts from its last W. b = 1 is online SGD (DeltaNet for TTT-Linear).

The chunk form is TTT's dual form: the chunk is the mini-batch, and y_t needs no per-token weights:
    W1_t q = W1_0 q - sum_i eta_i (k_i . q) delta_i,     W2_t h = W2_0 h - sum_i eta_i (a_i . h) e_i,
with e_i the residual, a_i the hidden activations and delta_i the back-propagated residual at W_0.
The inner model here has no layer norm or residual connection (the TTT paper's f adds both).

Titans (linear memory) adds momentum and decay to the same mini-batch gradients g_t = grad l_t(M_0):
    momentum_t = eta_t momentum_{t-1} - theta_t g_t,     M_t = alpha_t M_{t-1} + momentum_t.
Within a mini-batch both recurrences unroll into decay masks, L_A[t, s] = alpha_{s+1..t} and
L_E[s, i] = eta_{i+1..s}, so M_t = e^{G^A_t} M_0 + c_t momentum_0 - sum_i (L_A L_E)_{ti} theta_i g_i with
c = L_A e^{G^E}: one product of two triangular masks per chunk.

Stability. A mini-batch's update is stale: every gradient is taken at W_0. For TTT-Linear the weights move by
W_0 (I - A), A = sum_i eta_i k_i k_i^T over the mini-batch, which contracts while A's eigenvalues stay below 2
(sum_i eta_i |k_i|^2 <= 2 suffices; it is tight when a mini-batch's keys are alike, as repeated tokens make
them). With Titans' momentum the stale gradients add up over the mini-batch, so the stable range of theta
shrinks with b and vanishes as momentum eta alpha -> 1: for unit keys all alike and constant rates, the
stable range is theta |k|^2 < (1 + alpha)(1 + eta) at b = 1, while at b = 16 the largest stable theta is 0.019
(momentum 0.9), 0.0014 (0.99), 1.3e-4 (0.999); momentum 1 without decay has none for b > 1 and diverges over
long sequences (inf by T = 8192). Random keys in Dk dimensions tolerate about Dk times more. The layer's presets keep
inside this range (ttr.layers.gates). An op whose weights overflow, or read out a million times past its values,
says so rather than return the number; Titans refuses momentum * alpha = 1 with b > 1 up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import (check_log_gate, check_mode, check_qkv, check_state, check_step, compute_dtype, log_gate_as,
                       scale_or, vouch)
from ..features import FEATURE_MAPS
from ._chunk import causal_mask, decay_mask, to_chunks
from ._varlen import check_cu_seqlens, padded_groups


@dataclass
class MiniBatchState:
    """Where a mini-batch learner stands between calls: its weights now, the weights its current
    mini-batch started from (every gradient of that mini-batch is taken there), and how many of the
    mini-batch's tokens are done, per row (an int: the same for every row). Handing it to the next call
    continues the same mini-batch, so a sequence fed in pieces (or token by token) equals the sequence
    fed whole, and rows that have seen different numbers of tokens each keep their own place."""

    weights: tuple[Tensor, ...]
    start: tuple[Tensor, ...]
    offset: Tensor | int = 0


def _prepare(q, k, v, lr, batch_size, mode, qk_l2norm, scale, lr_name="lr"):
    """Checks the rest of the input (q, k, v are checked by the caller) and casts, normalizes, scales."""
    B, T, H, Dk = q.shape
    check_mode(mode, ("chunk", "recurrent"))
    check_step(lr_name, lr, (B, T, H))
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dt = compute_dtype(q.dtype)
    q, k, v, lr = q.to(dt), k.to(dt), v.to(dt), lr.to(dt)
    if qk_l2norm:
        q, k = FEATURE_MAPS["l2"](q), FEATURE_MAPS["l2"](k)
    return q * scale_or(scale, Dk ** -0.5), k, v, lr


def _resume(initial_state, fresh: tuple[Tensor, ...], shapes: list[tuple[int, ...]], names: list[str],
            n_start: int, batch_size: int, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """(weights, start weights, offset [rows]) from an initial state: None, the weights, or a MiniBatchState.
    shapes and names: one per weight (rows first); the first n_start weights are where gradients are taken."""
    rows = shapes[0][0]
    if initial_state is None:
        return list(fresh), list(fresh[:n_start]), torch.zeros(rows, dtype=torch.long, device=fresh[0].device)
    if isinstance(initial_state, MiniBatchState):
        weights, start, offset = initial_state.weights, initial_state.start, initial_state.offset
        if not (isinstance(weights, (tuple, list)) and isinstance(start, (tuple, list))):
            raise ValueError(f"initial_state must be a MiniBatchState of weight tuples, got weights "
                             f"{type(weights).__name__} and start {type(start).__name__}")
    else:
        weights = initial_state if isinstance(initial_state, (tuple, list)) else (initial_state,)
        start, offset = weights, 0
    if len(weights) != len(fresh) or len(start) < n_start:
        raise ValueError(f"initial_state must hold {', '.join(names)}; got {len(weights)} tensors")
    for name, w, shape in zip(names, weights, shapes):
        check_state(f"initial_state ({name})", w, shape)
    for name, w, shape in zip(names, start[:n_start], shapes):
        check_state(f"initial_state.start ({name})", w, shape)
    if not (isinstance(offset, (int, Tensor)) and not isinstance(offset, bool)):
        raise ValueError(f"initial_state.offset must be an int or an int tensor [{rows}], got {offset!r}")
    offset = torch.as_tensor(offset, device=fresh[0].device)
    if offset.is_meta or offset.is_floating_point() or offset.dim() > 1 or offset.numel() not in (1, rows):
        raise ValueError(f"initial_state.offset must be an int or an int tensor [{rows}], got {offset!r}")
    offset = offset.long().expand(rows)
    if bool(((offset < 0) | (offset >= batch_size)).any()):
        raise ValueError(f"initial_state.offset must lie in [0, batch_size={batch_size}), got {offset.tolist()}")
    return [w.to(dtype) for w in weights], [w.to(dtype) for w in start[:n_start]], offset


def _rows(B: int, T: int, cu_seqlens: Tensor | None) -> tuple[int, Tensor | None]:
    """How many sequences (rows of the state) a call holds, and its checked cu_seqlens."""
    if cu_seqlens is None:
        return B, None
    cu = check_cu_seqlens(cu_seqlens, B, T)
    return cu.numel() - 1, cu


def _run(op: str, body, tensors: list[Tensor], batch_size: int, offset: Tensor, weights: list[Tensor],
         start: list[Tensor], cu_seqlens: Tensor | None, chunked: bool) -> tuple[Tensor, MiniBatchState]:
    """Run a mini-batch body over every sequence, each continuing its own mini-batch.

    Sequence n (row n, or the n-th packed sequence) is laid out in a frame with its tokens at offset_n,
    offset_n + 1, ...: the frame's mini-batches of batch_size tokens are then every row's mini-batches.
    The positions around the tokens hold zeros (step size 0: no gradient step) and a mask m = 0, which the
    body uses where zeros alone would not leave the weights as they are. The chunk form runs each group of
    similar frame lengths (length_groups) as one batch, the recurrent form all rows at once.
    body(chunks, weights, start) -> (out [G, H, C, Dv], weights after the chunk), chunks [G, H, C, ...] with
    the mask [G, H, C] last. Returns (o in the input's layout, the final MiniBatchState).
    """
    B, T = tensors[0].shape[:2]
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, B * T + 1, T, device=tensors[0].device)
        tensors = [x.reshape(1, B * T, *x.shape[2:]) for x in tensors]
    N = cu_seqlens.numel() - 1
    end = offset + cu_seqlens[1:] - cu_seqlens[:-1]                    # frame position after each row's last token
    outs: list[Tensor | None] = [None] * N
    final_weights, final_start = list(weights), list(start)            # rows without tokens keep theirs
    for layout, padded in padded_groups(cu_seqlens, batch_size if chunked else None, tensors, shift=offset):
        rows = torch.tensor(layout.rows, dtype=torch.long, device=offset.device)
        mask = layout.mask[..., None].expand(-1, -1, padded[0].shape[2]).to(padded[0].dtype)  # [G, F, H]
        # unbind once: indexing a chunk inside the loop would make backward build a full-size zero gradient per chunk
        chunks = list(zip(*(to_chunks(x, batch_size).unbind(2) for x in padded + [mask])))
        last = (end[rows] - 1).div(batch_size, rounding_mode="floor")  # the mini-batch holding the last token
        w, s = [x[rows] for x in weights], [x[rows] for x in start]
        ends_in = s
        pieces = []
        for n, chunk in enumerate(chunks):
            here = last == n
            if bool(here.any()):  # some rows end in this mini-batch: it started from s
                ends_in = [torch.where(here[:, None, None, None], s_, e) for s_, e in zip(s, ends_in)]
            out, w = body(list(chunk), w, s)
            s = w[: len(s)]
            pieces.append(out)
        o = torch.stack(pieces, 2).flatten(2, 3)[:, :, : layout.frame].movedim(1, 2)  # [G, F, H, Dv]
        for n, piece in zip(layout.rows, layout.pieces(o)):
            outs[n] = piece
        if layout.rows == list(range(N)):  # every row in one group, in order
            final_weights, final_start = w, ends_in
        else:
            final_weights = [f.index_put((rows,), x) for f, x in zip(final_weights, w)]
            final_start = [f.index_put((rows,), x) for f, x in zip(final_start, ends_in)]
    o = torch.cat([piece for piece in outs if piece is not None])
    if _diverged(op, o, final_weights, tensors, weights):
        raise ValueError(f"{op} diverged: its weights overflowed or grew a million times past the values on finite "
                         f"input; {_STABLE_RANGE[op]} (see ttr.ops.minibatch, Stability)")
    complete = (end % batch_size == 0)[:, None, None, None]  # a finished mini-batch starts the next from here
    final_start = [torch.where(complete, w, f) for w, f in zip(final_weights, final_start)]
    vouch(*final_weights, *final_start)
    return o.reshape(B, T, *o.shape[1:]), MiniBatchState(tuple(final_weights), tuple(final_start), end % batch_size)


def _diverged(op: str, o: Tensor, final: list[Tensor], tensors: list[Tensor], start: list[Tensor]) -> bool:
    """Whether the weights overflowed (a non-finite answer or final weight), or a linear memory reads out at
    1e6 times the size its values and starting weights allow: |o| > 1e6 (|v| + |W_0| |q| Dk), all maxima.
    Unstable rates grow the weights geometrically, and an answer that large is the instability's, long before
    it overflows (Titans at momentum 0.999: 6e53 in float64). One maximum per tensor: nan and inf show in it."""
    peaks = [float(x.detach().abs().max()) if x.numel() else 0.0 for x in (o, *final)]
    if not all(math.isfinite(p) for p in peaks):
        return True
    if op == "ttt_mlp":  # a nonlinear memory: no such bound on its answer
        return False
    q, v = tensors[0], tensors[2]
    w0 = max((float(w.detach().abs().max()) for w in start if w.numel()), default=0.0)
    allowed = float(v.detach().abs().max()) + w0 * float(q.detach().abs().max()) * q.shape[-1] if o.numel() else 0.0
    return peaks[0] > 1e6 * allowed + torch.finfo(o.dtype).tiny


_STABLE_RANGE = {
    "ttt_linear": "a mini-batch's update contracts while sum_i lr_i |k_i|^2 <= 2: lower lr or normalize the keys",
    "ttt_mlp": "lower lr",
    "titans": "with momentum the stable theta shrinks with batch_size and vanishes as momentum * alpha -> 1: lower "
              "theta, keep momentum below 1 or add a decay g",
}


def _tokens(chunks: list[Tensor]) -> list[list[Tensor]]:
    """A chunk's tensors [B, H, C, ...] token by token: for the recurrent bodies."""
    return list(zip(*(x.unbind(2) for x in chunks)))


def ttt_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    *,
    batch_size: int = 16,
    qk_l2norm: bool = False,
    scale: float | None = None,
    initial_state: Tensor | MiniBatchState | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, MiniBatchState | None]:
    """TTT-Linear. q, k: [B, T, H, Dk], v: [B, T, H, Dv], lr: [B, T, H] >= 0 (inner learning rate).

    Weights are held as S = W^T [B, H, Dk, Dv]; initial_state is S or a MiniBatchState. The chunk
    form's chunks are the mini-batches. q and k are used as given (qk_l2norm=True normalizes them);
    scale defaults to Dk^-1/2. cu_seqlens [N + 1] (with B = 1) packs N sequences, states per sequence.
    """
    out_dtype = q.dtype
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    rows, cu_seqlens = _rows(B, T, cu_seqlens)
    q, k, v, lr = _prepare(q, k, v, lr, batch_size, mode, qk_l2norm, scale)
    zero = q.new_zeros(rows, H, Dk, Dv)
    weights, start, offset = _resume(initial_state, (zero,), [(rows, H, Dk, Dv)], ["S"], 1, batch_size, q.dtype)

    def recurrent(chunks, weights, start):
        (state,), (start,) = weights, start
        outs = []
        for q_t, k_t, v_t, l_t, _ in _tokens(chunks):
            error = torch.einsum("bhk,bhkv->bhv", k_t, start) - v_t
            state = state - l_t[..., None, None] * k_t[..., :, None] * error[..., None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q_t, state))
        return torch.stack(outs, 2), [state]

    def chunk(chunks, weights, start):
        q_n, k_n, v_n, l_n, _ = chunks
        (state,), (start,) = weights, start
        scores = (q_n @ k_n.transpose(-1, -2)).masked_fill(~causal_mask(q_n.shape[-2], q.device), 0.0)
        step = l_n[..., None] * (k_n @ start - v_n)                       # eta_i times the residual at W_0
        return q_n @ state - scores @ step, [state - k_n.transpose(-1, -2) @ step]

    o, final = _run("ttt_linear", recurrent if mode == "recurrent" else chunk, [q, k, v, lr], batch_size, offset,
                    weights, start, cu_seqlens, mode == "chunk")
    return o.to(out_dtype), (final if output_final_state else None)


def gelu_derivative(z: Tensor) -> Tensor:
    """d/dz [z Phi(z)] = Phi(z) + z phi(z) (exact GELU)."""
    return 0.5 * (1.0 + torch.erf(z * 0.5 ** 0.5)) + z * torch.exp(-0.5 * z * z) * (2 * torch.pi) ** -0.5


def ttt_mlp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    *,
    initial_state: tuple[Tensor, Tensor] | MiniBatchState,
    batch_size: int = 16,
    qk_l2norm: bool = False,
    scale: float | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, MiniBatchState | None]:
    """TTT-MLP: the memory f(k) = W2 gelu(W1 k) learned by mini-batch GD. q, k: [B, T, H, Dk],
    v: [B, T, H, Dv], lr: [B, T, H]. initial_state = (W1 [B, H, Dh, Dk], W2 [B, H, Dv, Dh]) or a
    MiniBatchState is required: the starting weights are what a layer learns (from zero weights W1
    would get no gradient). q, k as given unless qk_l2norm; scale defaults to Dk^-1/2; cu_seqlens
    [N + 1] (with B = 1) packs N sequences, the weights then [N, H, ., .].
    """
    out_dtype = q.dtype
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    rows, cu_seqlens = _rows(B, T, cu_seqlens)
    first = initial_state.weights[0] if isinstance(initial_state, MiniBatchState) else (
        initial_state[0] if isinstance(initial_state, (tuple, list)) and initial_state else None)
    if not isinstance(first, Tensor) or first.dim() != 4:
        raise ValueError("initial_state must be (W1 [B, H, Dh, Dk], W2 [B, H, Dv, Dh]) or a MiniBatchState for ttt_mlp")
    Dh = first.shape[2]
    q, k, v, lr = _prepare(q, k, v, lr, batch_size, mode, qk_l2norm, scale)
    weights, start, offset = _resume(initial_state, (first, first), [(rows, H, Dh, Dk), (rows, H, Dv, Dh)],
                                     ["W1", "W2"], 2, batch_size, q.dtype)

    def recurrent(chunks, weights, start):
        (W1, W2), (W1_0, W2_0) = weights, start
        outs = []
        for q_t, k_t, v_t, l_t, _ in _tokens(chunks):
            z = torch.einsum("bhdk,bhk->bhd", W1_0, k_t)
            a = F.gelu(z)
            e = torch.einsum("bhvd,bhd->bhv", W2_0, a) - v_t
            delta = torch.einsum("bhvd,bhv->bhd", W2_0, e) * gelu_derivative(z)
            eta = l_t[..., None, None]
            W2 = W2 - eta * e[..., :, None] * a[..., None, :]
            W1 = W1 - eta * delta[..., :, None] * k_t[..., None, :]
            outs.append(torch.einsum("bhvd,bhd->bhv", W2, F.gelu(torch.einsum("bhdk,bhk->bhd", W1, q_t))))
        return torch.stack(outs, 2), [W1, W2]

    def chunk(chunks, weights, start):
        q_n, k_n, v_n, l_n, _ = chunks
        (W1, W2), (W1_0, W2_0) = weights, start
        mask = causal_mask(q_n.shape[-2], q.device)
        scores = (q_n @ k_n.transpose(-1, -2)).masked_fill(~mask, 0.0)
        z = k_n @ W1_0.transpose(-1, -2)                                   # [B, H, C, Dh], at W_0
        a = F.gelu(z)
        step2 = l_n[..., None] * (a @ W2_0.transpose(-1, -2) - v_n)        # eta_i e_i
        step1 = (step2 @ W2_0) * gelu_derivative(z)                        # eta_i delta_i
        hidden = F.gelu(q_n @ W1.transpose(-1, -2) - scores @ step1)       # gelu(W1_t q_t)
        read = (hidden @ a.transpose(-1, -2)).masked_fill(~mask, 0.0)
        out = hidden @ W2.transpose(-1, -2) - read @ step2                 # W2_t gelu(W1_t q_t)
        return out, [W1 - step1.transpose(-1, -2) @ k_n, W2 - step2.transpose(-1, -2) @ a]

    o, final = _run("ttt_mlp", recurrent if mode == "recurrent" else chunk, [q, k, v, lr], batch_size, offset,
                    weights, start, cu_seqlens, mode == "chunk")
    return o.to(out_dtype), (final if output_final_state else None)


def titans(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    momentum: Tensor,
    g: Tensor | None = None,
    *,
    batch_size: int = 16,
    qk_l2norm: bool = False,
    scale: float | None = None,
    initial_state: tuple[Tensor, Tensor] | MiniBatchState | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, MiniBatchState | None]:
    """Titans' linear memory: mini-batch gradients with momentum and decay. q, k: [B, T, H, Dk],
    v: [B, T, H, Dv]; theta [B, T, H] >= 0 (learning rate), momentum [B, T, H] in (0, 1], g a log-gate
    [B, T, H] (memory decay alpha = exp(g)) or None. Weights: (memory M^T, momentum^T), each [B, H, Dk, Dv].
    q, k as given unless qk_l2norm; scale defaults to Dk^-1/2; cu_seqlens [N + 1] (with B = 1) packs N
    sequences, the weights then [N, H, Dk, Dv].
    """
    out_dtype = q.dtype
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    rows, cu_seqlens = _rows(B, T, cu_seqlens)
    check_step("momentum", momentum, (B, T, H), upper=1.0)
    if float(momentum.detach().min()) <= 0:
        raise ValueError("momentum must lie in (0, 1]: a zero momentum coefficient is the plain TTT-Linear update")
    check_log_gate(g, B, T, H, Dk, scalar_for="titans")
    q, k, v, theta = _prepare(q, k, v, theta, batch_size, mode, qk_l2norm, scale, lr_name="theta")
    damping = momentum.detach().double().log() + (0.0 if g is None else g.detach().double())
    if batch_size > 1 and float(damping.max()) >= 0:
        raise ValueError("momentum * alpha reaches 1 (momentum 1 without decay): Titans' mini-batch iteration is "
                         "then undamped and has no stable range for batch_size > 1 (see ttr.ops.minibatch, "
                         "Stability); keep momentum * exp(g) below 1")
    log_eta = log_gate_as(momentum.to(q.dtype).log(), q.dtype)  # 0 outside the sequences: the momentum stays
    g = torch.zeros_like(log_eta) if g is None else log_gate_as(g, q.dtype)
    zero = q.new_zeros(rows, H, Dk, Dv)
    weights, start, offset = _resume(initial_state, (zero, zero), [(rows, H, Dk, Dv)] * 2, ["memory", "momentum"],
                                     1, batch_size, q.dtype)

    # outside the sequences the mask m = 0 keeps the momentum out of the memory: M_t = alpha_t M_{t-1} + m_t momentum_t
    def recurrent(chunks, weights, start):
        (memory, mom), (start,) = weights, start
        outs = []
        for q_t, k_t, v_t, t_t, g_t, le_t, m_t in _tokens(chunks):
            error = torch.einsum("bhk,bhkv->bhv", k_t, start) - v_t
            mom = le_t[..., None, None].exp() * mom - t_t[..., None, None] * k_t[..., :, None] * error[..., None, :]
            memory = g_t[..., None, None].exp() * memory + m_t[..., None, None] * mom
            outs.append(torch.einsum("bhk,bhkv->bhv", q_t, memory))
        return torch.stack(outs, 2), [memory, mom]

    def chunk(chunks, weights, start):
        q_n, k_n, v_n, t_n, g_n, le_n, m_n = chunks
        (memory, mom), (start,) = weights, start
        GA, GE = g_n.cumsum(-1), le_n.cumsum(-1)
        L_A, L_E = decay_mask(GA) * m_n[..., None, :], decay_mask(GE)  # momentum_s reaches the memory where m_s = 1
        D = L_A @ L_E                                      # weight of g_i in M_t
        c = L_A @ GE.exp()[..., None]                      # weight of momentum_0 in M_t: [B, H, C, 1]
        step = t_n[..., None] * (k_n @ start - v_n)        # theta_i times the residual at M_0
        out = GA.exp()[..., None] * (q_n @ memory) + c * (q_n @ mom) - (q_n @ k_n.transpose(-1, -2) * D) @ step
        return out, [GA[..., -1, None, None].exp() * memory + c[..., -1, None, :] * mom
                     - k_n.transpose(-1, -2) @ (D[..., -1, :, None] * step),
                     GE[..., -1, None, None].exp() * mom - k_n.transpose(-1, -2) @ (L_E[..., -1, :, None] * step)]

    o, final = _run("titans", recurrent if mode == "recurrent" else chunk, [q, k, v, theta, g, log_eta], batch_size,
                    offset, weights, start, cu_seqlens, mode == "chunk")
    return o.to(out_dtype), (final if output_final_state else None)
