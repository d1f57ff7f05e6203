"""Mini-batch gradient descent (TTT, Titans): every gradient of a mini-batch is taken at its first weights.

Objective   the running regression loss L_t(W) = sum_{i<=t} 1/2 || v_i - f_W(k_i) ||^2, visited in mini-batches
Weights     uniform
Function    TTT-Linear: f_W(k) = W k.  TTT-MLP: f_W(k) = W2 gelu(W1 k), a two-layer MLP (nonlinear memory)
Optimizer   mini-batch GD with inner learning rate eta_t and mini-batch size b: for t in a mini-batch that
            starts from W_0,   W_t = W_0 - sum_{i <= t, i in batch} eta_i grad l_i(W_0),   y_t = f_{W_t}(q_t);
            the next mini-batch starts from its last W. b = 1 is online SGD (DeltaNet for TTT-Linear).

TTT-MLP's chunk form is TTT's dual form: the chunk is the mini-batch, and y_t needs no per-token weights:
    W1_t q = W1_0 q - sum_i eta_i (k_i . q) delta_i,     W2_t h = W2_0 h - sum_i eta_i (a_i . h) e_i,
with e_i the residual, a_i the hidden activations and delta_i the back-propagated residual at W_0. Each
mini-batch's W_0 is a nonlinear function of the last, so its loop over mini-batches stays sequential: one pass
each way with the backward written out (_MLPPass), whose steps read each mini-batch's weights once.
The inner model here has no layer norm or residual connection (the TTT paper's f adds both).

Titans (linear memory) adds momentum and decay to the same mini-batch gradients g_t = grad l_t(M_0):
    momentum_t = eta_t momentum_{t-1} - theta_t g_t,     M_t = alpha_t M_{t-1} + momentum_t.
Within a mini-batch both recurrences unroll into decay masks, L_A[t, s] = alpha_{s+1..t} and
L_E[s, i] = eta_{i+1..s}, so M_t = e^{G^A_t} M_0 + c_t momentum_0 - sum_i (L_A L_E)_{ti} theta_i g_i with
c = L_A e^{G^E}: one product of two triangular masks per chunk.

Chunks of mini-batches (TTT-Linear, Titans). Both are linear in their weights, so a chunk of C tokens holding
several whole mini-batches needs no loop over them. Write S = M^T and u_i = theta_i (v_i - S_{p(i)}^T k_i),
with p(i) the last token before i's mini-batch: the step is -theta_i g_i = k_i u_i^T, taken at S_{p(i)}. Unrolled
from the chunk's start (S_0, P_0), with P the momentum (TTT-Linear: no momentum, a = 1, c = 0, D = ones, i <= t),
    S_t = a_t S_0 + c_t P_0 + sum_{i<=t} D_ti k_i u_i^T,    a = e^{G^A}, c = L_A e^{G^E}, D = L_A L_E,
so the u's solve one unit lower-triangular system per chunk, as the delta rule's (which is b = 1):
    (I + diag(theta) (K K^T * D')) U = diag(theta) (V - diag(a') K S_0 - diag(c') K P_0),
    D'_ij = D_{p(i) j},  a'_i = a_{p(i)},  c'_i = c_{p(i)}   (zero rows for the chunk's first mini-batch, whose
gradients are taken at S_0, or at the start weights of a mini-batch a call resumed inside). D' is zero on and
above the diagonal blocks of the mini-batches. U = U' - W_S S_0 - W_P P_0 with U', W_S, W_P from one batched
triangular solve over all chunks; only the pass of (S, P) from chunk to chunk is sequential.

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

from .._checks import (blame, check_log_gate, check_mode, check_qkv, check_state, check_step, checking,
                       compute_dtype, is_int, log_gate_as, scale_or, vouch)
from ..features import FEATURE_MAPS
from ._chunk import causal_mask, decay_mask, dot, solved_pass, solved_pass_backward, to_chunks, written_out
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


def _span(batch_size: int, chunk_size: int, mode: str) -> int:
    """Tokens per chunk of _run: whole mini-batches, as many as fit in chunk_size (one in the recurrent form)."""
    if not is_int(chunk_size, 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return batch_size * (max(1, chunk_size // batch_size) if mode == "chunk" else 1)


def _resume(initial_state, fresh: tuple[Tensor, ...], shapes: list[tuple[int, ...]], names: list[str],
            n_start: int, batch_size: int, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor], Tensor | int]:
    """(weights, start weights, offset) from an initial state: None, the weights (offset 0), or a MiniBatchState
    (offset [rows]).
    shapes and names: one per weight (rows first); the first n_start weights are where gradients are taken."""
    rows = shapes[0][0]
    if initial_state is None:
        return list(fresh), list(fresh[:n_start]), 0
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
    if not isinstance(initial_state, MiniBatchState):  # the weights alone: a mini-batch starts here, from them
        weights = [w.to(dtype) for w in weights]
        return weights, weights[:n_start], 0
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


def _run(op: str, sweep, tensors: list[Tensor], batch_size: int, span: int, offset: Tensor | int,
         weights: list[Tensor], start: list[Tensor], cu_seqlens: Tensor | None, prepare=None
         ) -> tuple[Tensor, MiniBatchState]:
    """Run a mini-batch learner over every sequence, each continuing its own mini-batch.

    Sequence n (row n, or the n-th packed sequence) is laid out in a frame with its tokens at offset_n,
    offset_n + 1, ...: the frame's mini-batches of batch_size tokens are then every row's mini-batches.
    The positions around the tokens hold zeros (step size 0: no gradient step) and a mask m = 0, which the
    learner uses where zeros alone would not leave the weights as they are. Each group of similar frame
    lengths (length_groups) runs as one batch, in chunks of `span` tokens (whole mini-batches); rows that all
    start a mini-batch (offset 0, no packing) run as they are, with nothing read back from the device (the path
    torch.compile traces). prepare and sweep: see _chunk_loop. Returns (o in the input's layout, the final
    MiniBatchState).
    """
    B, T = tensors[0].shape[:2]
    if cu_seqlens is None and isinstance(offset, int):  # every row from a mini-batch's start, to T
        mask = tensors[0].new_ones(B, T, tensors[0].shape[2])
        o, w, ends_in = _chunk_loop(sweep, prepare, tensors + [mask], weights, start, (T - 1) // batch_size,
                                      batch_size, span)
        o = o[:, :, :T].movedim(1, 2)
        end = torch.full((B,), T, dtype=torch.long, device=o.device)
        final_weights, final_start = w, (w[: len(start)] if T % batch_size == 0 else ends_in)
    else:
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, B * T + 1, T, device=tensors[0].device)
            tensors = [x.reshape(1, B * T, *x.shape[2:]) for x in tensors]
        N = cu_seqlens.numel() - 1
        if isinstance(offset, int):
            offset = torch.full((N,), offset, dtype=torch.long, device=cu_seqlens.device)
        end = offset + cu_seqlens[1:] - cu_seqlens[:-1]                # frame position after each row's last token
        outs: list[Tensor | None] = [None] * N
        final_weights, final_start = list(weights), list(start)        # rows without tokens keep theirs
        for layout, padded in padded_groups(cu_seqlens, span, tensors, shift=offset):
            rows = torch.tensor(layout.rows, dtype=torch.long, device=offset.device)
            mask = layout.mask[..., None].expand(-1, -1, padded[0].shape[2]).to(padded[0].dtype)  # [G, F, H]
            last = (end[rows] - 1).div(batch_size, rounding_mode="floor")  # the mini-batch holding the last token
            group = [x[rows] for x in weights]
            o, w, ends_in = _chunk_loop(sweep, prepare, padded + [mask], group,
                                        [group[i] if x is weights[i] else x[rows] for i, x in enumerate(start)],
                                        last, batch_size, span)
            for n, piece in zip(layout.rows, layout.pieces(o[:, :, : layout.frame].movedim(1, 2))):
                outs[n] = piece
            if layout.rows == list(range(N)):  # every row in one group, in order
                final_weights, final_start = w, ends_in
            else:
                final_weights = [f.index_put((rows,), x) for f, x in zip(final_weights, w)]
                final_start = [f.index_put((rows,), x) for f, x in zip(final_start, ends_in)]
        o = torch.cat([piece for piece in outs if piece is not None])
        complete = (end % batch_size == 0)[:, None, None, None]  # a finished mini-batch starts the next from here
        final_start = [torch.where(complete, w, f) for w, f in zip(final_weights, final_start)]
        o = o.reshape(B, T, *o.shape[1:])
    if checking() and _diverged(op, o, final_weights, tensors, weights):
        blame(q=tensors[0], k=tensors[1], v=tensors[2])
        raise ValueError(f"{op} diverged: its weights overflowed or grew a million times past the values on finite "
                         f"input; {_STABLE_RANGE[op]} (see ttr.ops.minibatch, Stability)")
    vouch(*final_weights, *final_start)
    return o, MiniBatchState(tuple(final_weights), tuple(final_start), end % batch_size)


def _chunk_loop(sweep, prepare, frames: list[Tensor], w: list[Tensor], s: list[Tensor], last: Tensor | int,
                batch_size: int, span: int) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """A batch of frames [G, F, H, ...] (the mask last) through the learner, in chunks of `span` tokens.
    last: the mini-batch holding each row's last token ([G], or an int where it is every row's).
    prepare(chunks) -> per-chunk tensors [G, H, N, ...]: the work that needs no weights, batched over all chunks
    (chunks [G, H, N, span, ...]; by default the chunks themselves).
    sweep(prepared, weights, start, last, mini-batches per chunk) -> (o [G, H, N * span, Dv], the final weights,
    the start weights of each row's last mini-batch): _per_chunk, or _stale's pass."""
    chunks = [to_chunks(x, span) for x in frames]
    return sweep(chunks if prepare is None else prepare(chunks), w, s, last, span // batch_size)


def _per_chunk(step):
    """A sweep for _chunk_loop that takes the chunks one at a time: step(prepared chunk, weights, start,
    boundaries) -> (out [G, H, span, Dv], weights after the chunk, and where `boundaries` asks for them, the start
    weights of each of the chunk's mini-batches [G, span // batch_size, H, ...])."""
    def sweep(pre: list[Tensor], w: list[Tensor], s: list[Tensor], last: Tensor | int, per_span: int):
        # unbind once: indexing a chunk inside the loop would make backward build a full-size zero gradient per chunk
        prepared = list(zip(*(x.unbind(2) for x in pre)))
        ends_in, pieces = s, []
        for n, chunk in enumerate(prepared):
            if isinstance(last, int):
                boundaries = last // per_span == n
            else:
                here = last.div(per_span, rounding_mode="floor") == n
                boundaries = bool(here.any())  # some rows end in this chunk: the start of their last mini-batch is kept
            out, w_next, starts = step(list(chunk), w, s, boundaries)
            if boundaries and isinstance(last, int):
                ends_in = [x[:, last % per_span] for x in starts]
            elif boundaries:
                rows = torch.arange(here.shape[0], device=here.device)
                ends_in = [torch.where(here[:, None, None, None], x[rows, last % per_span], e)
                           for x, e in zip(starts, ends_in)]
            w, s = w_next, w_next[: len(s)]  # a chunk ends on a mini-batch boundary
            pieces.append(out)
        return torch.stack(pieces, 2).flatten(2, 3), w, ends_in
    return sweep


def _diverged(op: str, o: Tensor, final: list[Tensor], tensors: list[Tensor], start: list[Tensor]) -> bool:
    """Whether the weights overflowed (a non-finite answer or final weight), or a linear memory reads out at
    1e6 times the size its values and starting weights allow: |o| > 1e6 (|v| + |W_0| |q| Dk), all maxima.
    Unstable rates grow the weights geometrically, and an answer that large is the instability's, long before
    it overflows (Titans at momentum 0.999: 6e53 in float64). One pass per tensor and one read-back for all:
    nan and inf show in the maxima."""
    q, v = tensors[0], tensors[2]
    peaks = torch.stack([torch.stack(torch.aminmax(x.detach())).abs().amax().double() if x.numel() else
                         torch.zeros((), dtype=torch.float64, device=o.device) for x in (o, *final, v, q, *start)])
    o_peak, *final_peaks, v_peak, q_peak = peaks[: len(final) + 3].tolist()
    if not all(math.isfinite(p) for p in (o_peak, *final_peaks)):
        return True
    if op == "ttt_mlp":  # a nonlinear memory: no such bound on its answer
        return False
    w0 = max(peaks[len(final) + 3:].tolist(), default=0.0)
    allowed = v_peak + w0 * q_peak * q.shape[-1] if o.numel() else 0.0
    return o_peak > 1e6 * allowed + torch.finfo(o.dtype).tiny


_STABLE_RANGE = {
    "ttt_linear": "a mini-batch's update contracts while sum_i lr_i |k_i|^2 <= 2: lower lr or normalize the keys",
    "ttt_mlp": "lower lr",
    "titans": "with momentum the stable theta shrinks with batch_size and vanishes as momentum * alpha -> 1: lower "
              "theta, keep momentum below 1 or add a decay g",
}


def _tokens(chunks: list[Tensor]) -> list[list[Tensor]]:
    """A chunk's tensors [B, H, C, ...] token by token: for the recurrent bodies."""
    return list(zip(*(x.unbind(2) for x in chunks)))


def _minus(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x - a @ b in one fused product, over the leading dims [B, H]."""
    return torch.baddbmm(x.flatten(0, 1), a.flatten(0, 1), b.flatten(0, 1), alpha=-1).view(*a.shape[:-1], b.shape[-1])


def _one_batch(body):
    """A sweep for _run from body(chunk, weights, start) -> (out, weights) over one mini-batch (span = batch_size):
    each chunk's only mini-batch starts where the chunk does."""
    def step(chunk, weights, start, boundaries):
        out, weights = body(chunk, weights, start)
        return out, weights, ([x[:, None] for x in start] if boundaries else None)
    return _per_chunk(step)


def _stale(batch_size: int, momentum: bool):
    """The chunk form of TTT-Linear and Titans over chunks of whole mini-batches (module docstring, Chunks of
    mini-batches): a sweep for _run, with no prepare. The chunks are q, k, v, theta (for Titans then g and log eta)
    and the mask; the weights are S (and P with momentum), the start weights S_start. The chunks' algebra and the
    pass over them run in _StaleChunks; here are a call resumed inside a mini-batch and the start weights of the
    mini-batch holding each row's last token."""
    def sweep(chunks, weights, start, last, per_span):
        q, k, v, theta, *gates, m = chunks
        (S, *_), (S_start,) = weights, start
        G, H, N, C, Dk = k.shape
        if N == 0:
            return q.new_zeros(G, H, 0, v.shape[-1]), list(weights), [S_start]
        shift = None
        if S_start is not S:  # a call that resumes inside a mini-batch: its first gradients are taken at S_start
            first = (torch.arange(C, device=q.device) < batch_size)[:, None]
            shift = -((theta[:, :, 0, :, None] * k[:, :, 0]).masked_fill(~first, 0.0) @ (S_start - S))
        X0 = torch.cat(weights, -2) if momentum else S
        gA, log_eta = gates if momentum else (None, None)
        o, u, X, final, *at_ends = _StaleChunks.apply(q, k, v, theta, gA, log_eta, m if momentum else None, X0, shift,
                                                      batch_size)
        if momentum:
            a_ends, D_ends, c_ends = at_ends
        else:  # no decay: the memory's weights are 1
            ends = torch.arange(batch_size - 1, C, batch_size, device=q.device)
            a_ends = q.new_ones(()).expand(G, H, N, len(ends))
            D_ends = causal_mask(C, q.device)[ends].to(q.dtype).expand(G, H, N, -1, -1)
        final = [final[..., :Dk, :], final[..., Dk:, :]] if momentum else [final]  # [S, P] (sliced: writable views)
        # the start weights of the mini-batch holding each row's last token: S after mini-batch j - 1 of its chunk
        if isinstance(last, int):
            rows, n_l, j = slice(None), last // per_span, last % per_span
            before = max(j - 1, 0)
        else:
            rows, j = torch.arange(G, device=last.device), last % per_span
            n_l = last.div(per_span, rounding_mode="floor")
            before = (j - 1).clamp_min(0)
        X_l = X[rows, :, n_l]
        k_l = D_ends[rows, :, n_l, before][..., None] * k[rows, :, n_l]  # [G, H, C, Dk]
        S_l = a_ends[rows, :, n_l, before][..., None, None] * X_l[:, :, :Dk] + k_l.transpose(-1, -2) @ u[rows, :, n_l]
        if momentum:
            S_l = S_l + c_ends[rows, :, n_l, before][..., None, None] * X_l[:, :, Dk:]
        if isinstance(last, int):
            ends_in = S_l if j else (S_start if n_l == 0 else X_l[:, :, :Dk])
        else:
            at_start = torch.where((n_l == 0)[:, None, None, None], S_start, X_l[:, :, :Dk])
            ends_in = torch.where((j == 0)[:, None, None, None], at_start, S_l)
        return o.flatten(2, 3), final, [ends_in]
    return None, sweep


def _stale_forward(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, gA: Tensor | None, log_eta: Tensor | None,
                   m: Tensor | None, X0: Tensor, shift: Tensor | None, b: int) -> tuple[tuple, dict]:
    """_StaleChunks's forward, in autograd ops where grad mode is on (its reference for gradients of gradients):
    chunks [G, H, N, C, ...] in, worked chunk-major ([N * G * H, C, ...]). Returns (o, u, the chunks' start states
    X, the final state, and with momentum a, D and c at each mini-batch's last token, all [G, H, N, ...]) and what the
    written-out backward reads."""
    G, H, N, C, Dk = k.shape
    R, Dv, momentum = N * G * H, v.shape[-1], gA is not None
    qc, kc, vc, tc = (x.movedim(2, 0).reshape(R, *x.shape[3:]) for x in (q, k, v, theta))
    steps = torch.arange(C, device=q.device)
    at = (steps.div(b, rounding_mode="floor") * b - 1).clamp_min(0)  # token i's gradient point: the token before its
    first = steps < b                                                 # mini-batch (the chunk's start in the first)
    ends = steps[b - 1::b]
    KK, QK = kc @ kc.transpose(-1, -2), qc @ kc.transpose(-1, -2)
    if momentum:
        GA, GE = (x.movedim(2, 0).reshape(R, C).cumsum(-1) for x in (gA, log_eta))
        L_A, L_E, a, eE = decay_mask(GA), decay_mask(GE), GA.exp(), GE.exp()
        L_Am = L_A * m.movedim(2, 0).reshape(R, 1, C)                # P_s reaches the memory where m_s = 1
        D = L_Am @ L_E                                                # weights of u_i in S_t
        c = (L_Am @ eE[..., None])[..., 0]                            # weight of P_0 in S_t
        D_at = D[:, at].masked_fill(first[:, None], 0.0)
        a_at, c_at = a[:, at].masked_fill(first, 1.0), c[:, at].masked_fill(first, 0.0)
    else:
        D = causal_mask(C, q.device).to(q.dtype)
        D_at = D[at].masked_fill(first[:, None], 0.0)
    Msys = KK * D_at                                                  # zero on and above the mini-batches' blocks
    tk = tc[..., None] * kc
    v_side = tc[..., None] * vc
    if shift is not None:
        v_side = torch.cat([v_side[:G * H] + shift.reshape(G * H, C, Dv), v_side[G * H:]])
    if momentum:  # U = U' - W [S_0; P_0]: the columns reading S_0 and P_0 side by side
        rhs = torch.cat([v_side, a_at[..., None] * tk, c_at[..., None] * tk], -1)
        read = torch.cat([a[..., None] * qc, c[..., None] * qc], -1)
        k_out = torch.cat([D[:, -1, :, None] * kc, L_E[:, -1, :, None] * kc], -1)  # u_i -> S_C, P_C
        mix = torch.stack([a[:, -1], c[:, -1], eE[:, -1]], 1)[..., None, None]  # [S; P] -> [a S + c P; e P]
    else:
        rhs, read, k_out, mix = torch.cat([v_side, tk], -1), qc, kc, None
    scores = QK * D
    Dx = read.shape[-1]
    o, u, starts, final, (inverse, w, states) = solved_pass(Msys, tc[..., None], rhs, scores, read, k_out, mix,
                                                            X0.reshape(G * H, Dx, Dv))

    def back(x):
        return x.reshape(N, G, H, *x.shape[1:]).movedim(0, 2)
    outs = (back(o), back(u), back(starts.reshape(R, Dx, Dv)), final.reshape(G, H, Dx, Dv).clone())
    if momentum:
        outs += (back(a[:, ends]), back(D[:, ends]), back(c[:, ends]))
    saved = dict(qc=qc, kc=kc, vc=vc, tc=tc, KK=KK, QK=QK, D=D, D_at=D_at, Msys=Msys, inverse=inverse, tk=tk,
                 rhs=rhs, w=w, k_out=k_out, mix=mix, read=read, scores=scores, u=u, states=states)
    if momentum:
        saved.update(L_A=L_A, L_E=L_E, L_Am=L_Am, a=a, c=c, eE=eE, a_at=a_at, c_at=c_at,
                     m=m.movedim(2, 0).reshape(R, 1, C))
    return outs, saved


def _stale_reference(*inputs) -> tuple:
    """_StaleChunks in autograd ops (for gradients of gradients: written_out)."""
    return _stale_forward(*inputs)[0]


class _StaleChunks(torch.autograd.Function):
    """TTT-Linear's and Titans' chunks (_stale_forward) with the backward written out. Past the pass and the
    read-out (as the delta rule's, _DeltaChunks), the masks: with A = diag(theta) (K K^T * D') the system's lower
    part and D' = D at the gradient points (the row of the token before each mini-batch),
        dD' = diag(theta) dA * K K^T, summed over each mini-batch's rows into its gradient point's row of D,
        dD += dscores * Q K^T,   D = L_A diag(m) L_E:
        dL_A = (dD L_E^T + dc e^{G^E}^T) diag(m),   dL_E = (L_A diag(m))^T dD,
    and each decay mask L = e^{G_t - G_s} gives dG_t by rows minus columns of dL * L; a, c and e^{G^E} add theirs."""

    @staticmethod
    def forward(ctx, q, k, v, theta, gA, log_eta, m, X0, shift, b):
        outs, saved = _stale_forward(q, k, v, theta, gA, log_eta, m, X0, shift, b)
        ctx.names = list(saved)
        ctx.save_for_backward(*saved.values())
        ctx.inputs = q, k, v, theta, gA, log_eta, m, X0, shift, b
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    @written_out(_stale_reference)
    def backward(ctx, do, du, dX, dfinal, *d_ends):
        s = dict(zip(ctx.names, ctx.saved_tensors))
        q, k, v, theta, gA, log_eta, m, X0, shift, b = ctx.inputs
        G, H, N, C, Dk = k.shape
        R, GH, momentum, u = N * G * H, G * H, gA is not None, s["u"]
        Dv = u.shape[-1]
        qc, kc, tc = s["qc"], s["kc"], s["tc"]

        def cm(x):  # [G, H, N, ...] -> chunk-major
            return x.movedim(2, 0).reshape(R, *x.shape[3:])

        def back(x):
            return x.reshape(N, G, H, *x.shape[1:]).movedim(0, 2)
        dscores, dread, d_v_side, d_x_side, dA, dk_out, dmix, dX0 = solved_pass_backward(
            cm(do) if do is not None else u.new_zeros(R, C, Dv), s["scores"], s["read"], s["inverse"], s["rhs"],
            s["w"], s["k_out"], s["mix"], u, s["states"], dfinal, None if du is None else cm(du),
            None if dX is None else cm(dX))
        dshift = None if shift is None else d_v_side[:GH].reshape(G, H, C, Dv).clone()
        dtheta = dot(dA, s["Msys"]) + dot(d_v_side, s["vc"])
        dMsys = dA.mul_(tc[..., None])
        dv = d_v_side.mul_(tc[..., None])
        D = s["D"]
        dQK = dscores * D
        if momentum:
            tk, a, c = s["tk"], s["a"], s["c"]
            d_xa, d_xc = d_x_side[..., :Dk], d_x_side[..., Dk:]
            dtk = d_xa * s["a_at"][..., None] + d_xc * s["c_at"][..., None]
            da_at, dc_at = dot(d_xa, tk), dot(d_xc, tk)
            dread_a, dread_c = dread[..., :Dk], dread[..., Dk:]
            dq = dread_a * a[..., None] + dread_c * c[..., None]
            da, dc = dot(dread_a, qc), dot(dread_c, qc)
            dko_S, dko_P = dk_out[..., :Dk], dk_out[..., Dk:]
            dk = dko_S * D[:, -1, :, None] + dko_P * s["L_E"][:, -1, :, None]
            ends = torch.arange(b - 1, C, b, device=q.device)
            nb = len(ends)
            dD = dscores.mul_(s["QK"])
            dD[:, ends[:-1]] += (dMsys * s["KK"]).view(R, nb, b, C).sum(2)[:, 1:]
            da[:, ends[:-1]] += da_at.view(R, nb, b).sum(-1)[:, 1:]
            dc[:, ends[:-1]] += dc_at.view(R, nb, b).sum(-1)[:, 1:]
            dD[:, -1] += dot(dko_S, kc)
            da[:, -1] += dmix[:, 0, 0, 0]
            dc[:, -1] += dmix[:, 1, 0, 0]
            for grad, full in zip(d_ends, (da, dD, dc)):
                if grad is not None:
                    full[:, ends] += cm(grad)
            L_A, L_E, L_Am, eE = s["L_A"], s["L_E"], s["L_Am"], s["eE"]
            dL_A = torch.bmm(dD, L_E.transpose(-1, -2)).add_(dc[:, :, None] * eE[:, None, :]).mul_(s["m"])
            dL_E = torch.bmm(L_Am.transpose(-1, -2), dD)
            dL_E[:, -1] += dot(dko_P, kc)
            deE = (L_Am.transpose(-1, -2) @ dc[..., None])[..., 0]
            deE[:, -1] += dmix[:, 2, 0, 0]
            through_A, through_E = dL_A.mul_(L_A), dL_E.mul_(L_E)
            dGA = da * a + through_A.sum(-1) - through_A.sum(-2)
            dGE = deE * eE + through_E.sum(-1) - through_E.sum(-2)
            dgA, dlog_eta = (back(x.flip(-1).cumsum(-1).flip(-1)) for x in (dGA, dGE))
        else:
            dtk, dq, dk, dgA, dlog_eta = d_x_side, dread, dk_out.clone(), None, None
        dtheta += dot(dtk, kc)
        dk.addcmul_(dtk, tc[..., None])
        dKK = dMsys.mul_(s["D_at"])
        dk.baddbmm_(dKK + dKK.transpose(-1, -2), kc).baddbmm_(dQK.transpose(-1, -2), qc)
        dq.baddbmm_(dQK, kc)
        return (back(dq), back(dk), back(dv), back(dtheta), dgA, dlog_eta, None, dX0.view_as(X0), dshift, None)


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
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, MiniBatchState | None]:
    """TTT-Linear. q, k: [B, T, H, Dk], v: [B, T, H, Dv], lr: [B, T, H] >= 0 (inner learning rate).

    Weights are held as S = W^T [B, H, Dk, Dv]; initial_state is S or a MiniBatchState. The chunk
    form's chunks hold chunk_size // batch_size whole mini-batches (at least one). q and k are used as given
    (qk_l2norm=True normalizes them); scale defaults to Dk^-1/2. cu_seqlens [N + 1] (with B = 1) packs N
    sequences, states per sequence.
    """
    out_dtype = q.dtype
    B, T, H, Dk, Dv = check_qkv(q, k, v, values=False)  # checked with the answer (_run)
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

    prepare, sweep = (None, _one_batch(recurrent)) if mode == "recurrent" else _stale(batch_size, momentum=False)
    o, final = _run("ttt_linear", sweep, [q, k, v, lr], batch_size, _span(batch_size, chunk_size, mode), offset,
                    weights, start, cu_seqlens, prepare)
    return o.to(out_dtype), (final if output_final_state else None)


def gelu_derivative(z: Tensor) -> Tensor:
    """d/dz [z Phi(z)] = Phi(z) + z phi(z) (exact GELU)."""
    return 0.5 * (1.0 + torch.erf(z * 0.5 ** 0.5)) + z * torch.exp(-0.5 * z * z) * (2 * torch.pi) ** -0.5


def _gelu_curvature(z: Tensor) -> Tensor:
    """d^2/dz^2 [z Phi(z)] = phi(z) (2 - z^2)."""
    return torch.exp(-0.5 * z * z) * (2 * torch.pi) ** -0.5 * (2.0 - z * z)


def _mlp_step(k: Tensor, q: Tensor, v: Tensor, lr: Tensor, scores: Tensor, W1: Tensor, W2: Tensor, W1_0: Tensor,
              W2_0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One TTT-MLP mini-batch in autograd ops (the dual form, module docstring): k, q [.., b, Dk], v [.., b, Dv],
    lr [.., b, 1], scores tril(q k^T); gradients at the start weights (W1_0, W2_0), the read-out at the weights
    (W1, W2) each token has reached. Returns (o [.., b, Dv], W1 and W2 after the mini-batch)."""
    z = k @ W1_0.transpose(-1, -2)
    a = F.gelu(z)                                                          # [.., b, Dh], at W_0
    step2 = lr * (a @ W2_0.transpose(-1, -2) - v)                          # eta_i e_i
    step1 = torch.ops.aten.gelu_backward(step2 @ W2_0, z)                  # eta_i delta_i = eta_i gelu'(z) W2^T e_i
    hidden = F.gelu(q @ W1.transpose(-1, -2) - scores @ step1)             # gelu(W1_t q_t)
    out = hidden @ W2.transpose(-1, -2) - (hidden @ a.transpose(-1, -2)).tril() @ step2  # W2_t gelu(W1_t q_t)
    return out, W1 - step1.transpose(-1, -2) @ k, W2 - step2.transpose(-1, -2) @ a


def _mlp_reference(k: Tensor, q: Tensor, v: Tensor, lr: Tensor, scores: Tensor, W1: Tensor, W2: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """_mlp_pass in autograd ops, mini-batch by mini-batch (for gradients of gradients: written_out)."""
    outs, starts = [], []
    for n in range(k.shape[0]):
        starts.append((W1, W2))
        out, W1, W2 = _mlp_step(k[n], q[n], v[n], lr[n], scores[n], W1, W2, W1, W2)
        outs.append(out)
    W1s, W2s = (torch.stack(x) for x in zip(*starts))
    return torch.stack(outs), W1s, W2s, W1, W2


def _mlp_pass(k: Tensor, q: Tensor, v: Tensor, lr: Tensor, scores: Tensor, W1: Tensor, W2: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """TTT-MLP over N mini-batches in sequence, each from its start (chunk-major: [N, B * H, b, ..]): k, q
    [N, BH, b, Dk], v [N, BH, b, Dv], lr [N, BH, b, 1], scores tril(q k^T) [N, BH, b, b], W1 [BH, Dh, Dk],
    W2 [BH, Dv, Dh]. Returns (o [N, BH, b, Dv], each mini-batch's start weights W1 [N, BH, Dh, Dk] and
    W2 [N, BH, Dv, Dh], the final W1 and W2)."""
    return _MLPPass.apply(k, q, v, lr, scores, W1, W2)


class _MLPPass(torch.autograd.Function):
    """_mlp_pass with its backward written out, step by step in both directions: each mini-batch's weights are
    read while they are in cache, and only they are kept (one buffer). Forward, from W1, W2:
        [z; p] = [k; q] W1^T,  a = gelu(z),  e = a W2^T - v,  s2 = eta e,  r = s2 W2,  s1 = gelu'(z) r,
        pre = p - scores s1,  h = gelu(pre),  mix = tril(h a^T),  o = h W2^T - mix s2,
        W1' = W1 - s1^T k,  W2' = W2 - s2^T a.
    Backward, with R1, R2 the gradients reaching W1', W2' (running sums) and dmix = tril(do s2^T):
        dpre = gelu'(pre) (do W2 - dmix a),  dq = dpre W1,  dscores = -dpre s1^T,
        ds1 = -scores^T dpre - k R1^T,  dr = gelu'(z) ds1,  ds2 = -mix^T do - a R2^T + dr W2^T,  de = eta ds2,
        da = -dmix^T h - s2 R2 + de W2,  dz = gelu''(z) r ds1 + gelu'(z) da,  dk = dz W1 - s1 R1,
        R1 <- R1 + dz^T k + dpre^T q,  R2 <- R2 + s2^T dr + de^T a + do^T h.
    The forward keeps gelu'(z), which the backward reads twice.
    The loops index pre-split views (unbind): a Python index per tensor per step costs as much as a small product."""

    @staticmethod
    def forward(ctx, k: Tensor, q: Tensor, v: Tensor, lr: Tensor, scores: Tensor, W1: Tensor, W2: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        N, BH, b, Dk = k.shape
        Dh, Dv = W1.shape[1], W2.shape[1]
        W1s, W2s = W1.new_empty(N + 1, BH, Dh, Dk), W2.new_empty(N + 1, BH, Dv, Dh)  # each step writes the next
        W1s[0].copy_(W1)
        W2s[0].copy_(W2)
        kq = torch.cat([k, q], -2)
        zp = k.new_empty(N, BH, 2 * b, Dh)  # [z; p], one product
        a, h, pre, r, s1, gz = (k.new_empty(N, BH, b, Dh) for _ in range(6))  # contiguous: gelu's out= (float32)
        e, s2, o = (v.new_empty(N, BH, b, Dv) for _ in range(3))
        mix = k.new_empty(N, BH, b, b)
        one = k.new_ones(()).expand(BH, b, Dh)
        steps = zip(*(x.unbind(0) for x in (W1s[:N], W2s[:N], W1s[1:], W2s[1:], k, v, lr, scores, kq, zp, a, h, pre,
                                             r, s1, gz, e, s2, o, mix)))
        for W1_, W2_, W1n, W2n, k_, v_, lr_, scores_, kq_, zp_, a_, h_, pre_, r_, s1_, gz_, e_, s2_, o_, mix_ in steps:
            z = zp_[:, :b]
            torch.bmm(kq_, W1_.transpose(-1, -2), out=zp_)
            torch.ops.aten.gelu.out(z, out=a_)
            torch.ops.aten.gelu_backward.grad_input(one, z, grad_input=gz_)
            torch.baddbmm(v_, a_, W2_.transpose(-1, -2), beta=-1, out=e_)
            torch.mul(e_, lr_, out=s2_)
            torch.bmm(s2_, W2_, out=r_)
            torch.mul(r_, gz_, out=s1_)
            torch.baddbmm(zp_[:, b:], scores_, s1_, alpha=-1, out=pre_)
            torch.ops.aten.gelu.out(pre_, out=h_)
            torch.bmm(h_, a_.transpose(-1, -2), out=mix_).tril_()
            torch.bmm(h_, W2_.transpose(-1, -2), out=o_).baddbmm_(mix_, s2_, alpha=-1)
            torch.baddbmm(W1_, s1_.transpose(-1, -2), k_, alpha=-1, out=W1n)
            torch.baddbmm(W2_, s2_.transpose(-1, -2), a_, alpha=-1, out=W2n)
        ctx.save_for_backward(kq, lr, scores, W1s, W2s, zp, a, h, pre, r, s1, gz, e, s2, mix)
        ctx.inputs = k, q, v, lr, scores, W1, W2
        ctx.set_materialize_grads(False)  # the start weights' gradients are mostly absent: no zeros the size of W1s
        return o, W1s[:N], W2s[:N], W1s[N].clone(), W2s[N].clone()

    @staticmethod
    @written_out(_mlp_reference)
    def backward(ctx, do: Tensor | None, dW1s: Tensor | None, dW2s: Tensor | None, dW1: Tensor | None,
                 dW2: Tensor | None) -> tuple[Tensor | None, ...]:
        kq, lr, scores, W1s, W2s, zp, a, h, pre, r, s1, gz, e, s2, mix = ctx.saved_tensors
        N, BH, b2, Dv = *kq.shape[:3], s2.shape[-1]
        b = b2 // 2
        R1 = dW1.clone() if dW1 is not None else W1s.new_zeros(W1s.shape[1:])
        R2 = dW2.clone() if dW2 is not None else W2s.new_zeros(W2s.shape[1:])
        do = s2.new_zeros(s2.shape) if do is None else do
        dkq, dscores, ds2, de = (torch.empty_like(x) for x in (kq, scores, s2, e))
        dzp = zp.new_empty(zp.shape[1:])  # [dz; dpre]
        dz, dpre = dzp[:, :b], dzp[:, b:]
        ds1, dr, da, dhidden = (r.new_empty(r.shape[1:]) for _ in range(4))
        dmix = mix.new_empty(mix.shape[1:])
        none = (None,) * N
        steps = zip(*(x.unbind(0) for x in (W1s[:N], W2s[:N], kq, zp, do, lr, scores, a, h, pre, r, s1, gz, s2, mix,
                                             dkq, dscores, ds2, de)),
                    none if dW1s is None else dW1s.unbind(0), none if dW2s is None else dW2s.unbind(0))
        for (W1_, W2_, kq_, zp_, do_, lr_, scores_, a_, h_, pre_, r_, s1_, gz_, s2_, mix_, dkq_, dscores_, ds2_,
             de_, dW1_, dW2_) in reversed(list(steps)):  # R1, R2: the gradients reaching W1_{n+1}, W2_{n+1}
            k_, z = kq_[:, :b], zp_[:, :b]
            torch.bmm(do_, s2_.transpose(-1, -2), out=dmix).tril_()
            torch.bmm(do_, W2_, out=dhidden).baddbmm_(dmix, a_, alpha=-1)
            torch.ops.aten.gelu_backward.grad_input(dhidden, pre_, grad_input=dpre)
            torch.bmm(dpre, s1_.transpose(-1, -2), out=dscores_).neg_()
            torch.bmm(scores_.transpose(-1, -2), dpre, out=ds1).baddbmm_(k_, R1.transpose(-1, -2), beta=-1, alpha=-1)
            torch.bmm(mix_.transpose(-1, -2), do_, out=ds2_).baddbmm_(a_, R2.transpose(-1, -2), beta=-1, alpha=-1)
            torch.bmm(dmix.transpose(-1, -2), h_, out=da).baddbmm_(s2_, R2, beta=-1, alpha=-1)
            torch.mul(ds1, gz_, out=dr)
            ds2_.baddbmm_(dr, W2_.transpose(-1, -2))
            torch.mul(ds2_, lr_, out=de_)
            da.baddbmm_(de_, W2_)
            dz.copy_(da).mul_(gz_).addcmul_(_gelu_curvature(z).mul_(r_), ds1)  # torch.mul(out=view): compile refuses
            torch.bmm(dzp, W1_, out=dkq_)[:, :b].baddbmm_(s1_, R1, alpha=-1)
            R1.baddbmm_(dzp.transpose(-1, -2), kq_)
            R2.baddbmm_(de_.transpose(-1, -2), a_).baddbmm_(do_.transpose(-1, -2), h_)
            R2.baddbmm_(s2_.transpose(-1, -2), dr)
            if dW1_ is not None:
                R1.add_(dW1_)
            if dW2_ is not None:
                R2.add_(dW2_)
        dk, dq = dkq.split(b, -2)
        return dk, dq, de.neg_(), dot(ds2, e)[..., None], dscores, R1, R2


def _mlp_sweep(pre: list[Tensor], weights: list[Tensor], start: list[Tensor], last: Tensor | int, per_span: int
               ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """TTT-MLP's sweep for _chunk_loop (a chunk is a mini-batch): a call that resumes inside a mini-batch takes
    that one in autograd ops (its gradients at the start weights, its read-out at the weights), then every
    mini-batch from its start through _mlp_pass."""
    (W1, W2), (W1_0, W2_0) = weights, start
    G, H, N = pre[0].shape[:3]
    outs, first = [], 0  # N >= 1: calls hold tokens
    if W1 is not W1_0:
        out, W1, W2 = _mlp_step(*(x[:, :, 0] for x in pre), W1, W2, W1_0, W2_0)
        outs, first = [out], 1
    W1s, W2s = W1[None], W2[None]  # no pass (one mini-batch, resumed): every row's last is the first
    if N > first:
        chunk_major = [x[:, :, first:].movedim(2, 0).flatten(1, 2).contiguous() for x in pre]  # [N', G * H, b, ..]
        o, W1s, W2s, W1, W2 = _mlp_pass(*chunk_major, W1.flatten(0, 1), W2.flatten(0, 1))
        outs.append(o.unflatten(1, (G, H)).permute(1, 2, 0, 3, 4).flatten(2, 3))
        W1s, W2s, W1, W2 = (x.unflatten(-3, (G, H)) for x in (W1s, W2s, W1, W2))
    # the start weights of the mini-batch holding each row's last token: mini-batch j starts from W*s[j - first]
    if isinstance(last, int):
        ends_in = [W1_0, W2_0] if last == 0 else [W1s[last - first], W2s[last - first]]
    else:
        rows, j = torch.arange(G, device=last.device), (last - first).clamp_min(0)
        at_start = (last == 0)[:, None, None, None]
        ends_in = [torch.where(at_start, s, x[j, rows]) for s, x in zip((W1_0, W2_0), (W1s, W2s))]
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0], [W1, W2], ends_in


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
    B, T, H, Dk, Dv = check_qkv(q, k, v, values=False)  # checked with the answer (_run)
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

    def prepare(chunks):  # what needs no weights, for every mini-batch at once
        q_n, k_n, v_n, l_n, _ = chunks
        return [k_n, q_n, v_n, l_n[..., None], (q_n @ k_n.transpose(-1, -2)).tril()]

    o, final = _run("ttt_mlp", _one_batch(recurrent) if mode == "recurrent" else _mlp_sweep, [q, k, v, lr], batch_size,
                    batch_size, offset, weights, start, cu_seqlens, None if mode == "recurrent" else prepare)
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
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, MiniBatchState | None]:
    """Titans' linear memory: mini-batch gradients with momentum and decay. q, k: [B, T, H, Dk],
    v: [B, T, H, Dv]; theta [B, T, H] >= 0 (learning rate), momentum [B, T, H] in (0, 1], g a log-gate
    [B, T, H] (memory decay alpha = exp(g)) or None. Weights: (memory M^T, momentum^T), each [B, H, Dk, Dv].
    q, k as given unless qk_l2norm; scale defaults to Dk^-1/2; the chunk form's chunks hold
    chunk_size // batch_size whole mini-batches (at least one); cu_seqlens [N + 1] (with B = 1) packs N
    sequences, the weights then [N, H, Dk, Dv].
    """
    out_dtype = q.dtype
    B, T, H, Dk, Dv = check_qkv(q, k, v, values=False)  # checked with the answer (_run)
    rows, cu_seqlens = _rows(B, T, cu_seqlens)
    check_step("momentum", momentum, (B, T, H), upper=1.0)
    if checking() and float(momentum.detach().min()) <= 0:
        raise ValueError("momentum must lie in (0, 1]: a zero momentum coefficient is the plain TTT-Linear update")
    check_log_gate(g, B, T, H, Dk, scalar_for="titans")
    q, k, v, theta = _prepare(q, k, v, theta, batch_size, mode, qk_l2norm, scale, lr_name="theta")
    damping = momentum.detach().double().log() + (0.0 if g is None else g.detach().double())
    if batch_size > 1 and checking() and float(damping.max()) >= 0:
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

    prepare, sweep = (None, _one_batch(recurrent)) if mode == "recurrent" else _stale(batch_size, momentum=True)
    o, final = _run("titans", sweep, [q, k, v, theta, g, log_eta], batch_size, _span(batch_size, chunk_size, mode),
                    offset, weights, start, cu_seqlens, prepare)
    return o.to(out_dtype), (final if output_final_state else None)
