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

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_log_gate, check_mode, check_qkv, check_state, check_step, compute_dtype
from ..features import FEATURE_MAPS
from ._chunk import causal_mask, decay_mask, from_chunks, to_chunks


def _prepare(q, k, v, lr, batch_size, mode, qk_l2norm, scale):
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    check_mode(mode, ("chunk", "recurrent"))
    check_step("lr", lr, (B, T, H))
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dt = compute_dtype(q.dtype)
    q, k, v, lr = q.to(dt), k.to(dt), v.to(dt), lr.to(dt)
    if qk_l2norm:
        q, k = FEATURE_MAPS["l2"](q), FEATURE_MAPS["l2"](k)
    return q * (Dk ** -0.5 if scale is None else float(scale)), k, v, lr


def ttt_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    *,
    batch_size: int = 16,
    qk_l2norm: bool = True,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
) -> tuple[Tensor, Tensor | None]:
    """TTT-Linear. q, k: [B, T, H, Dk], v: [B, T, H, Dv], lr: [B, T, H] >= 0 (inner learning rate).

    State S = W^T [B, H, Dk, Dv]. The chunk form uses chunks of `batch_size` tokens (the mini-batches).
    """
    out_dtype = q.dtype
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    check_state("initial_state", initial_state, (B, H, Dk, Dv))
    q, k, v, lr = _prepare(q, k, v, lr, batch_size, mode, qk_l2norm, scale)
    state = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(q.dtype)
    if mode == "recurrent":
        outs = []
        for t in range(T):
            if t % batch_size == 0:
                start = state  # the mini-batch's first weights: every gradient below is taken there
            error = torch.einsum("bhk,bhkv->bhv", k[:, t], start) - v[:, t]
            state = state - lr[:, t, :, None, None] * k[:, t, :, :, None] * error[..., None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
        o = torch.stack(outs, dim=1)
    else:
        qc, kc, vc, lc = (to_chunks(x, batch_size) for x in (q, k, v, lr))  # padding: lr = 0
        lc = lc[..., None]
        scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal_mask(batch_size, q.device), 0.0)
        outs = []
        for q_n, k_n, v_n, l_n, p_n in zip(*(x.unbind(2) for x in (qc, kc, vc, lc, scores))):
            step = l_n * (k_n @ state - v_n)                                # eta_i times the residual at W_0
            outs.append(q_n @ state - p_n @ step)
            state = state - k_n.transpose(-1, -2) @ step
        o = from_chunks(torch.stack(outs, dim=2), T)
    return o.to(out_dtype), (state if output_final_state else None)


def gelu_derivative(z: Tensor) -> Tensor:
    """d/dz [z Phi(z)] = Phi(z) + z phi(z) (exact GELU)."""
    return 0.5 * (1.0 + torch.erf(z * 0.5 ** 0.5)) + z * torch.exp(-0.5 * z * z) * (2 * torch.pi) ** -0.5


def ttt_mlp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    *,
    initial_state: tuple[Tensor, Tensor],
    batch_size: int = 16,
    qk_l2norm: bool = True,
    scale: float | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """TTT-MLP: the memory f(k) = W2 gelu(W1 k) learned by mini-batch GD. q, k: [B, T, H, Dk],
    v: [B, T, H, Dv], lr: [B, T, H]. initial_state = (W1 [B, H, Dh, Dk], W2 [B, H, Dv, Dh]) is required: the
    starting weights are what a layer learns (from zero weights W1 would get no gradient).
    """
    out_dtype = q.dtype
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
        raise ValueError("initial_state must be the pair (W1 [B, H, Dh, Dk], W2 [B, H, Dv, Dh]) for ttt_mlp")
    Dh = initial_state[0].shape[2] if initial_state[0].dim() == 4 else -1
    check_state("initial_state[0] (W1)", initial_state[0], (B, H, Dh, Dk))
    check_state("initial_state[1] (W2)", initial_state[1], (B, H, Dv, Dh))
    q, k, v, lr = _prepare(q, k, v, lr, batch_size, mode, qk_l2norm, scale)
    W1, W2 = (w.to(q.dtype) for w in initial_state)
    if mode == "recurrent":
        outs = []
        for t in range(T):
            if t % batch_size == 0:
                W1_0, W2_0 = W1, W2
            z = torch.einsum("bhdk,bhk->bhd", W1_0, k[:, t])
            a = F.gelu(z)
            e = torch.einsum("bhvd,bhd->bhv", W2_0, a) - v[:, t]
            delta = torch.einsum("bhvd,bhv->bhd", W2_0, e) * gelu_derivative(z)
            eta = lr[:, t, :, None, None]
            W2 = W2 - eta * e[..., :, None] * a[..., None, :]
            W1 = W1 - eta * delta[..., :, None] * k[:, t, :, None, :]
            outs.append(torch.einsum("bhvd,bhd->bhv", W2, F.gelu(torch.einsum("bhdk,bhk->bhd", W1, q[:, t]))))
        o = torch.stack(outs, dim=1)
    else:
        qc, kc, vc, lc = (to_chunks(x, batch_size) for x in (q, k, v, lr))
        lc = lc[..., None]
        mask = causal_mask(batch_size, q.device)
        scores = (qc @ kc.transpose(-1, -2)).masked_fill(~mask, 0.0)
        outs = []
        for q_n, k_n, v_n, l_n, p_n in zip(*(x.unbind(2) for x in (qc, kc, vc, lc, scores))):
            z = k_n @ W1.transpose(-1, -2)                                   # [B, H, C, Dh], at W_0
            a = F.gelu(z)
            step2 = l_n * (a @ W2.transpose(-1, -2) - v_n)                   # eta_i e_i
            step1 = (step2 @ W2) * gelu_derivative(z)                        # eta_i delta_i
            hidden = F.gelu(q_n @ W1.transpose(-1, -2) - p_n @ step1)        # gelu(W1_t q_t)
            read = (hidden @ a.transpose(-1, -2)).masked_fill(~mask, 0.0)
            outs.append(hidden @ W2.transpose(-1, -2) - read @ step2)
            W1 = W1 - step1.transpose(-1, -2) @ k_n
            W2 = W2 - step2.transpose(-1, -2) @ a
        o = from_chunks(torch.stack(outs, dim=2), T)
    return o.to(out_dtype), ((W1, W2) if output_final_state else None)


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
    initial_state: tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Titans' linear memory: mini-batch gradients with momentum and decay. q, k: [B, T, H, Dk],
    v: [B, T, H, Dv]; theta [B, T, H] >= 0 (learning rate), momentum [B, T, H] in (0, 1], g a log-gate
    [B, T, H] (memory decay alpha = exp(g)) or None. State: (memory M^T, momentum^T), each [B, H, Dk, Dv].
    """
    out_dtype = q.dtype
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    check_step("momentum", momentum, (B, T, H), upper=1.0)
    if float(momentum.detach().min()) <= 0:
        raise ValueError("momentum must lie in (0, 1]: a zero momentum coefficient is the plain TTT-Linear update")
    if check_log_gate(g, B, T, H, Dk) == "vector":
        raise ValueError(f"g must be a scalar log-gate [B, T, H] for titans, got shape {list(g.shape)}")
    if initial_state is not None:
        if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
            raise ValueError("initial_state must be the pair (memory, momentum), each [B, H, Dk, Dv]")
        for name, s in zip(("memory", "momentum"), initial_state):
            check_state(f"initial_state ({name})", s, (B, H, Dk, Dv))
    q, k, v, theta = _prepare(q, k, v, theta, batch_size, mode, qk_l2norm, scale)
    log_eta = momentum.to(q.dtype).log()
    g = torch.zeros_like(log_eta) if g is None else g.to(q.dtype)
    memory, mom = (q.new_zeros(B, H, Dk, Dv),) * 2 if initial_state is None else (s.to(q.dtype) for s in initial_state)
    if mode == "recurrent":
        outs = []
        for t in range(T):
            if t % batch_size == 0:
                start = memory
            error = torch.einsum("bhk,bhkv->bhv", k[:, t], start) - v[:, t]
            mom = log_eta[:, t, :, None, None].exp() * mom - theta[:, t, :, None, None] * k[:, t, :, :, None] * error[..., None, :]
            memory = g[:, t, :, None, None].exp() * memory + mom
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], memory))
        o = torch.stack(outs, dim=1)
    else:
        qc, kc, vc, tc = (to_chunks(x, batch_size) for x in (q, k, v, theta))    # padding: theta = 0
        GA, GE = to_chunks(g, batch_size).cumsum(-1), to_chunks(log_eta, batch_size).cumsum(-1)
        L_A, L_E = decay_mask(GA), decay_mask(GE)
        D = L_A @ L_E                                       # total weight of g_i in M_t
        c = (L_A @ GE.exp()[..., None])                     # weight of momentum_0 in M_t: [.., C, 1]
        scores = qc @ kc.transpose(-1, -2) * D
        tc = tc[..., None]
        # The state leaves each chunk at its last token; in the padded last chunk that is token T - 1
        # (padding is no no-op here: momentum keeps flowing into the memory).
        N, C = qc.shape[2], batch_size
        rows = torch.full((N,), C - 1, device=q.device)
        rows[-1] = (T - 1) % C
        chunk = torch.arange(N, device=q.device)
        at_end = [x[:, :, chunk, rows] for x in (D, L_E, GE.exp(), GA.exp(), c[..., 0])]
        parts = (qc, kc, vc, tc, scores, GA.exp()[..., None], c, *(x[..., None] for x in at_end))
        outs = []
        for q_n, k_n, v_n, t_n, p_n, a_n, c_n, d_end, e_end, eta_end, alpha_end, c_end in zip(
                *(x.unbind(2) for x in parts)):
            step = t_n * (k_n @ memory - v_n)                                 # theta_i times residual at M_0
            outs.append(a_n * (q_n @ memory) + c_n * (q_n @ mom) - p_n @ step)
            memory, mom = (alpha_end[..., None] * memory + c_end[..., None] * mom
                           - k_n.transpose(-1, -2) @ (d_end * step),
                           eta_end[..., None] * mom - k_n.transpose(-1, -2) @ (e_end * step))
        o = from_chunks(torch.stack(outs, dim=2), T)
    return o.to(out_dtype), ((memory, mom) if output_final_state else None)
