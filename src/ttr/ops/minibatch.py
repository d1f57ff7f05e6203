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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_log_gate, check_mode, check_qkv, check_state, check_step, compute_dtype
from ..features import FEATURE_MAPS
from ._chunk import causal_mask, decay_mask, to_chunks


@dataclass
class MiniBatchState:
    """Where a mini-batch learner stands between calls: its weights now, the weights its current
    mini-batch started from (every gradient of that mini-batch is taken there), and how many of the
    mini-batch's tokens are done. Handing it to the next call continues the same mini-batch, so a
    sequence fed in pieces (or token by token) equals the sequence fed whole."""

    weights: tuple[Tensor, ...]
    start: tuple[Tensor, ...]
    offset: int = 0


def _prepare(q, k, v, lr, batch_size, mode, qk_l2norm, scale, lr_name="lr"):
    """Checks the rest of the input (q, k, v are checked by the caller) and casts, normalizes, scales."""
    B, T, H, Dk = q.shape
    check_mode(mode, ("chunk", "recurrent"))
    check_step(lr_name, lr, (B, T, H))
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dt = compute_dtype(q.dtype)
    q, k, v, lr = q.to(dt), k.to(dt), v.to(dt), lr.to(dt)
    if qk_l2norm:
        q, k = FEATURE_MAPS["l2"](q), FEATURE_MAPS["l2"](k)
    return q * (Dk ** -0.5 if scale is None else float(scale)), k, v, lr


def _resume(initial_state, fresh: tuple[Tensor, ...], shapes: list[tuple[int, ...]], names: list[str],
            n_start: int, batch_size: int, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor], int]:
    """(weights, start weights, offset) from an initial state: None, the weights, or a MiniBatchState.
    shapes and names: one per weight; the first n_start weights are the ones gradients are taken at."""
    if initial_state is None:
        return list(fresh), list(fresh[:n_start]), 0
    if isinstance(initial_state, MiniBatchState):
        weights, start, offset = initial_state.weights, initial_state.start, initial_state.offset
        if not 0 <= offset < batch_size:
            raise ValueError(f"initial_state.offset must be in [0, batch_size={batch_size}), got {offset}")
    else:
        weights = initial_state if isinstance(initial_state, (tuple, list)) else (initial_state,)
        start, offset = weights, 0
    if len(weights) != len(fresh) or len(start) < n_start:
        raise ValueError(f"initial_state must hold {', '.join(names)}; got {len(weights)} tensors")
    for name, w, shape in zip(names, weights, shapes):
        check_state(f"initial_state ({name})", w, shape)
    return [w.to(dtype) for w in weights], [w.to(dtype) for w in start[:n_start]], offset


def _run_chunks(body, tensors: list[Tensor], batch_size: int, offset: int, weights: list[Tensor],
                start: list[Tensor], T: int):
    """Run a chunk body over a head that finishes the mini-batch in progress (if any), then over whole
    mini-batches.

    body(chunks, weights, start, row) -> (out [B, H, C, Dv], weights after `row`), with chunks [B, H, C, ...]
    and `row` the chunk's last real token (a padded tail has rows past it). When a chunk completes its
    mini-batch, the next one starts from the new weights.
    """
    outs = []
    pieces = []
    head = min((batch_size - offset) % batch_size, T)
    if head:
        pieces.append(([x[:, :head].movedim(1, 2) for x in tensors], head - 1, head == batch_size - offset))
    rest = T - head
    if rest:
        chunked = [to_chunks(x[:, head:], batch_size) for x in tensors]
        N = chunked[0].shape[2]
        for n in range(N):
            row = batch_size - 1 if n < N - 1 else (rest - 1) % batch_size
            pieces.append(([x[:, :, n] for x in chunked], row, row == batch_size - 1))
    for chunks, row, complete in pieces:
        out, weights = body(chunks, weights, start, row)
        if complete:
            start = weights[: len(start)]
        outs.append(out[..., : row + 1, :])
    return torch.cat(outs, dim=2).movedim(2, 1), weights, start


def _final(weights, start, offset, T, batch_size) -> MiniBatchState:
    end = (offset + T) % batch_size
    return MiniBatchState(tuple(weights), tuple(weights[: len(start)]) if end == 0 else tuple(start), end)


def ttt_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    *,
    batch_size: int = 16,
    qk_l2norm: bool = True,
    scale: float | None = None,
    initial_state: Tensor | MiniBatchState | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
) -> tuple[Tensor, MiniBatchState | None]:
    """TTT-Linear. q, k: [B, T, H, Dk], v: [B, T, H, Dv], lr: [B, T, H] >= 0 (inner learning rate).

    Weights are held as S = W^T [B, H, Dk, Dv]; initial_state is S or a MiniBatchState. The chunk
    form's chunks are the mini-batches.
    """
    out_dtype = q.dtype
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    q, k, v, lr = _prepare(q, k, v, lr, batch_size, mode, qk_l2norm, scale)
    zero = q.new_zeros(B, H, Dk, Dv)
    (state,), (start,), offset = _resume(initial_state, (zero,), [(B, H, Dk, Dv)], ["S"], 1, batch_size, q.dtype)
    if mode == "recurrent":
        outs = []
        for t in range(T):
            if (offset + t) % batch_size == 0:
                start = state
            error = torch.einsum("bhk,bhkv->bhv", k[:, t], start) - v[:, t]
            state = state - lr[:, t, :, None, None] * k[:, t, :, :, None] * error[..., None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
        o, weights = torch.stack(outs, dim=1), [state]
    else:
        def body(chunks, weights, start, row):
            q_n, k_n, v_n, l_n = chunks
            (state,), (start,) = weights, start
            scores = (q_n @ k_n.transpose(-1, -2)).masked_fill(~causal_mask(q_n.shape[-2], q.device), 0.0)
            step = l_n[..., None] * (k_n @ start - v_n)                       # eta_i times the residual at W_0
            out = q_n @ state - scores @ step
            return out, [state - k_n.transpose(-1, -2) @ step]

        o, weights, (start,) = _run_chunks(body, [q, k, v, lr], batch_size, offset, [state], [start], T)
    final = _final(weights, [start], offset, T, batch_size)
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
    qk_l2norm: bool = True,
    scale: float | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
) -> tuple[Tensor, MiniBatchState | None]:
    """TTT-MLP: the memory f(k) = W2 gelu(W1 k) learned by mini-batch GD. q, k: [B, T, H, Dk],
    v: [B, T, H, Dv], lr: [B, T, H]. initial_state = (W1 [B, H, Dh, Dk], W2 [B, H, Dv, Dh]) or a
    MiniBatchState is required: the starting weights are what a layer learns (from zero weights W1
    would get no gradient).
    """
    out_dtype = q.dtype
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    first = initial_state.weights[0] if isinstance(initial_state, MiniBatchState) else (
        initial_state[0] if isinstance(initial_state, (tuple, list)) and initial_state else None)
    if not isinstance(first, Tensor) or first.dim() != 4:
        raise ValueError("initial_state must be (W1 [B, H, Dh, Dk], W2 [B, H, Dv, Dh]) or a MiniBatchState for ttt_mlp")
    Dh = first.shape[2]
    q, k, v, lr = _prepare(q, k, v, lr, batch_size, mode, qk_l2norm, scale)
    weights, start, offset = _resume(initial_state, (first, first), [(B, H, Dh, Dk), (B, H, Dv, Dh)],
                                     ["W1", "W2"], 2, batch_size, q.dtype)
    if mode == "recurrent":
        (W1, W2), (W1_0, W2_0) = weights, start
        outs = []
        for t in range(T):
            if (offset + t) % batch_size == 0:
                W1_0, W2_0 = W1, W2
            z = torch.einsum("bhdk,bhk->bhd", W1_0, k[:, t])
            a = F.gelu(z)
            e = torch.einsum("bhvd,bhd->bhv", W2_0, a) - v[:, t]
            delta = torch.einsum("bhvd,bhv->bhd", W2_0, e) * gelu_derivative(z)
            eta = lr[:, t, :, None, None]
            W2 = W2 - eta * e[..., :, None] * a[..., None, :]
            W1 = W1 - eta * delta[..., :, None] * k[:, t, :, None, :]
            outs.append(torch.einsum("bhvd,bhd->bhv", W2, F.gelu(torch.einsum("bhdk,bhk->bhd", W1, q[:, t]))))
        o, weights, start = torch.stack(outs, dim=1), [W1, W2], [W1_0, W2_0]
    else:
        def body(chunks, weights, start, row):
            q_n, k_n, v_n, l_n = chunks
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

        o, weights, start = _run_chunks(body, [q, k, v, lr], batch_size, offset, weights, start, T)
    final = _final(weights, start, offset, T, batch_size)
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
    qk_l2norm: bool = True,
    scale: float | None = None,
    initial_state: tuple[Tensor, Tensor] | MiniBatchState | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
) -> tuple[Tensor, MiniBatchState | None]:
    """Titans' linear memory: mini-batch gradients with momentum and decay. q, k: [B, T, H, Dk],
    v: [B, T, H, Dv]; theta [B, T, H] >= 0 (learning rate), momentum [B, T, H] in (0, 1], g a log-gate
    [B, T, H] (memory decay alpha = exp(g)) or None. Weights: (memory M^T, momentum^T), each [B, H, Dk, Dv].
    """
    out_dtype = q.dtype
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    check_step("momentum", momentum, (B, T, H), upper=1.0)
    if float(momentum.detach().min()) <= 0:
        raise ValueError("momentum must lie in (0, 1]: a zero momentum coefficient is the plain TTT-Linear update")
    check_log_gate(g, B, T, H, Dk, scalar_for="titans")
    q, k, v, theta = _prepare(q, k, v, theta, batch_size, mode, qk_l2norm, scale, lr_name="theta")
    log_eta = momentum.to(q.dtype).log()
    g = torch.zeros_like(log_eta) if g is None else g.to(q.dtype)
    zero = q.new_zeros(B, H, Dk, Dv)
    weights, start, offset = _resume(initial_state, (zero, zero), [(B, H, Dk, Dv)] * 2, ["memory", "momentum"],
                                     1, batch_size, q.dtype)
    if mode == "recurrent":
        (memory, mom), (start,) = weights, start
        outs = []
        for t in range(T):
            if (offset + t) % batch_size == 0:
                start = memory
            error = torch.einsum("bhk,bhkv->bhv", k[:, t], start) - v[:, t]
            mom = log_eta[:, t, :, None, None].exp() * mom - theta[:, t, :, None, None] * k[:, t, :, :, None] * error[..., None, :]
            memory = g[:, t, :, None, None].exp() * memory + mom
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], memory))
        o, weights, start = torch.stack(outs, dim=1), [memory, mom], [start]
    else:
        def body(chunks, weights, start, row):
            q_n, k_n, v_n, t_n, g_n, le_n = chunks
            (memory, mom), (start,) = weights, start
            GA, GE = g_n.cumsum(-1), le_n.cumsum(-1)
            L_A, L_E = decay_mask(GA), decay_mask(GE)
            D = L_A @ L_E                                      # weight of g_i in M_t
            c = L_A @ GE.exp()[..., None]                      # weight of momentum_0 in M_t: [B, H, C, 1]
            step = t_n[..., None] * (k_n @ start - v_n)        # theta_i times the residual at M_0
            out = GA.exp()[..., None] * (q_n @ memory) + c * (q_n @ mom) - (q_n @ k_n.transpose(-1, -2) * D) @ step
            # leave at the last real token: in a padded tail, momentum would keep flowing into the memory
            return out, [GA[..., row, None, None].exp() * memory + c[..., row, None, :] * mom
                         - k_n.transpose(-1, -2) @ (D[..., row, :, None] * step),
                         GE[..., row, None, None].exp() * mom - k_n.transpose(-1, -2) @ (L_E[..., row, :, None] * step)]

        o, weights, start = _run_chunks(body, [q, k, v, theta, g, log_eta], batch_size, offset, weights, start, T)
    final = _final(weights, start, offset, T, batch_size)
    return o.to(out_dtype), (final if output_final_state else None)
