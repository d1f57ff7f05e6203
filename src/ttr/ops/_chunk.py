"""Pieces every chunkwise form shares: padding to whole chunks, the chunk layout, decay masks.

Chunk layout: [B, T, H, D] -> [B, H, N, C, D] with N = ceil(T / C) chunks of C tokens. Padding uses
zero keys and values (no association) and zero log-gates (no decay), so the state after the padded
tail equals the state after token T.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def to_chunks(x: Tensor, chunk: int) -> Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padded to N * C tokens."""
    B, T = x.shape[:2]
    pad = (-T) % chunk
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.movedim(1, 2)
    return x.reshape(B, x.shape[1], -1, chunk, *x.shape[3:])


def from_chunks(x: Tensor, T: int) -> Tensor:
    """[B, H, N, C, D] -> [B, T, H, D], dropping the padding."""
    B, H, N, C = x.shape[:4]
    return x.reshape(B, H, N * C, *x.shape[4:])[:, :, :T].movedim(2, 1)


def to_chunk_major(x: Tensor, chunk: int, factor: Tensor | float | None = None) -> Tensor:
    """[B, T, H, D] -> [N * B * H, C, D] contiguous, zero-padded to N * C tokens: chunk-major, so a pass over the
    chunks steps through contiguous blocks [B * H, C, D] (the hand-written passes' layout). factor (a number or
    [B, T, H, 1]) scales x in the same pass (no autograd: for the written-out forms' forwards)."""
    B, T, H, D = x.shape
    N = -(-T // chunk)
    if N * chunk != T:
        x = F.pad(x, (0, 0, 0, 0, 0, N * chunk - T))
        factor = F.pad(factor, (0, 0, 0, 0, 0, N * chunk - T)) if isinstance(factor, Tensor) else factor
    blocks = x.reshape(B, N, chunk, H, D).permute(1, 0, 3, 2, 4)
    if factor is None:
        return blocks.reshape(N * B * H, chunk, D)
    if isinstance(factor, Tensor):
        factor = factor.reshape(B, N, chunk, H, 1).permute(1, 0, 3, 2, 4)
    return torch.mul(blocks, factor, out=x.new_empty(N, B, H, chunk, D)).view(N * B * H, chunk, D)


def from_chunk_major(x: Tensor, B: int, T: int, H: int) -> Tensor:
    """[N * B * H, C, D] -> [B, T, H, D] (contiguous), dropping the padding."""
    C, D = x.shape[1:]
    N = -(-T // C)
    x = x.view(N, B, H, C, D).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, D)
    return x[:, :T].contiguous() if N * C != T else x


def written_out(reference: Callable[..., tuple[Tensor, ...]]):
    """Decorates an autograd Function's written-out backward(ctx, *grads). Run as it is where no graph is asked for
    (what once_differentiable gives); where one is (create_graph=True: Hessian-vector products, second-order
    methods), the gradients of `reference`, the same computation in autograd ops, redone from the call's inputs
    (ctx.inputs, in forward's order), so that they can be differentiated again."""
    def decorate(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            if not torch.is_grad_enabled():
                return backward(ctx, *grads)
            # fresh aliases: the gradient reaches each input by its own path only, not also through another input
            # made from it (a decay and the updates it scales)
            inputs = [x.view_as(x) if isinstance(x, Tensor) else x for x in ctx.inputs]
            wanted = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and ctx.needs_input_grad[i]]
            outs = reference(*inputs)
            pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad and g is not None]  # None: not asked for
            got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                      create_graph=True, allow_unused=True)
            result: list[Tensor | None] = [None] * len(inputs)
            for i, g in zip(wanted, got):
                result[i] = g
            return tuple(result)
        return run
    return decorate


def dot(x: Tensor, y: Tensor, dims: int = 1) -> Tensor:
    """sum(x * y) over the last `dims` dims as one batched product, with no temporary the size of x."""
    n = math.prod(x.shape[x.dim() - dims:])
    return torch.bmm(x.reshape(-1, 1, n), y.reshape(-1, n, 1)).view(x.shape[:x.dim() - dims])


def carry_(X: Tensor, decay: Tensor | None = None, reverse: bool = False) -> Tensor:
    """In place over X's leading dim, [N + 1, ...]: X_{n+1} += d_n X_n for n = 0 .. N - 1, which turns X_0 (a start)
    and X_{n+1} (chunk n's updates) into the states after each chunk; reverse: X_n += d_n X_{n+1} for n = N - 1 .. 0,
    the same pass's backward. decay [N, ...] broadcasts over X's blocks; None: 1."""
    N = X.shape[0] - 1
    for n in range(N - 1, -1, -1) if reverse else range(N):
        src, dst = (X[n + 1], X[n]) if reverse else (X[n], X[n + 1])
        if decay is None:
            dst.add_(src)
        else:
            dst.addcmul_(src, decay[n])
    return X


def decayed_states(updates: Tensor, decay: Tensor | None, s0: Tensor) -> tuple[Tensor, Tensor]:
    """The linear memories' pass over chunks, X_0 = s0, X_{n+1} = d_n X_n + U_n: updates U [B, H, N, Dk, Dv], decay d
    [B, H, N, Dk or 1, 1] (the state's rows, or all of it) or None (1), s0 [B, H, Dk, Dv]. Returns (the chunks'
    start states X_0 .. X_{N-1} [B, H, N, Dk, Dv], X_N), through one buffer and in-place steps (carry_)."""
    return _DecayedStates.apply(updates, decay, s0)


def _decayed_reference(updates: Tensor, decay: Tensor | None, s0: Tensor) -> tuple[Tensor, Tensor]:
    """decayed_states in autograd ops, step by step (for gradients of gradients: written_out)."""
    X, starts = s0, []
    for n, U in enumerate(updates.unbind(2)):
        starts.append(X)
        X = (X if decay is None else X * decay[:, :, n]) + U
    return torch.stack(starts, 2), X


class _DecayedStates(torch.autograd.Function):
    """decayed_states with its backward: R_N = dX_N, R_n = dX_n + d_n R_{n+1}; dU_n = R_{n+1}, ds0 = R_0,
    dd_n = <X_n, R_{n+1}> over what d_n broadcasts over."""

    @staticmethod
    def forward(ctx, updates: Tensor, decay: Tensor | None, s0: Tensor) -> tuple[Tensor, Tensor]:
        X = updates.new_empty(updates.shape[2] + 1, *s0.shape)  # chunk-major: each step's blocks contiguous
        X[0].copy_(s0)
        X[1:].copy_(updates.movedim(2, 0))
        d = None if decay is None else decay.movedim(2, 0)
        carry_(X, d)
        ctx.save_for_backward(d, X)
        ctx.inputs = updates, decay, s0
        return X[:-1].movedim(0, 2), X[-1].clone()

    @staticmethod
    @written_out(_decayed_reference)
    def backward(ctx, dstarts: Tensor, dfinal: Tensor) -> tuple[Tensor | None, ...]:
        d, X = ctx.saved_tensors
        R = torch.empty_like(X)
        R[-1].copy_(dfinal)
        R[:-1].copy_(dstarts.movedim(2, 0))
        carry_(R, d, reverse=True)
        dd = None
        if d is not None:
            dd = dot(X[:-1], R[1:])[..., None]
            dd = (dd.sum(-2, keepdim=True) if d.shape[-2] == 1 else dd).movedim(0, 2)
        return R[1:].movedim(0, 2), dd, R[0]


def state_pass(u_free: Tensor, w: Tensor, k_out: Tensor, mix: Tensor | None, s0: Tensor
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The pass over chunks of the delta rule's family (chunk-major: [N * B * H, ...] in blocks of B * H):
        u_n = U'_n - W_n X_n,   X_{n+1} = mix_n(X_n) + Ko_n^T u_n,
    u_free U' [.., C, Dv], w W [.., C, Dx], k_out Ko [.., C, Dx], s0 X_0 [B * H, Dx, Dv]. mix: None (X_{n+1} = X_n
    + ..), a decay d [.., 1, 1] (d_n X_n), or for a state of two halves X = [S; P] (Titans' memory and momentum)
    the coefficients (a, c, e) [.., 3, 1, 1] of [a S + c P; e P]. Returns (u [N * B * H, C, Dv], the chunks' start
    states X_0 .. X_{N-1} [N, B * H, Dx, Dv], the final state X_N [B * H, Dx, Dv])."""
    return _StatePass.apply(u_free, w, k_out, mix, s0)


def _state_pass_reference(u_free: Tensor, w: Tensor, k_out: Tensor, mix: Tensor | None,
                          s0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """state_pass in autograd ops, chunk by chunk (for gradients of gradients: written_out)."""
    BH = s0.shape[0]
    N = u_free.shape[0] // BH
    Uf, W, Ko = (x.view(N, BH, *x.shape[1:]) for x in (u_free, w, k_out))
    coef = None if mix is None else mix.view(N, BH, *mix.shape[1:])
    X, us, starts = s0, [], []
    for n in range(N):
        starts.append(X)
        us.append(Uf[n] - W[n] @ X)
        if mix is not None and mix.dim() == 4:  # (a, c, e): [a S + c P; e P]
            (S, P), (a, c, e) = X.chunk(2, -2), coef[n].unbind(1)
            X = torch.cat([a * S + c * P, e * P], -2)
        elif coef is not None:
            X = coef[n] * X
        X = X + Ko[n].transpose(-1, -2) @ us[-1]
    return torch.stack(us).view_as(u_free), torch.stack(starts), X


class _StatePass(torch.autograd.Function):
    """state_pass with its backward written out. With R_n the gradient reaching X_n (R_N the final state's),
        du_n = dU_n + Ko_n R_{n+1},   R_n = dX_n + mix_n^T(R_{n+1}) - W_n^T du_n
    is the only other sequential part; dW = -du X^T, dKo = u R_{n+1}^T and the mix's coefficients' gradients
    (<X_n, R_{n+1}> by halves) are batched after it. Each step writes into its slot of one buffer of states, so
    the passes make no stack, copy or autograd node per chunk."""

    @staticmethod
    def forward(ctx, u_free: Tensor, w: Tensor, k_out: Tensor, mix: Tensor | None,
                s0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        u, states = pass_forward(u_free, w, k_out, mix, s0)
        ctx.save_for_backward(w, k_out, mix, u, states)
        ctx.inputs = u_free, w, k_out, mix, s0
        return u.view_as(u_free), states[:-1], states[-1].clone()

    @staticmethod
    @written_out(_state_pass_reference)
    def backward(ctx, du: Tensor, dstarts: Tensor, dfinal: Tensor) -> tuple[Tensor | None, ...]:
        w, k_out, mix, u, states = ctx.saved_tensors
        R = torch.empty_like(states)
        R[-1].copy_(dfinal)
        R[:-1].copy_(dstarts)
        return pass_backward(w, k_out, mix, u, states, du.view_as(u).clone(), R)


def pass_forward(u_free: Tensor, w: Tensor, k_out: Tensor, mix: Tensor | None, s0: Tensor) -> tuple[Tensor, Tensor]:
    """state_pass's forward, for the written-out forms that hold it inside their own: (u [N, B * H, C, Dv], the
    states X_0 .. X_N [N + 1, B * H, Dx, Dv]), each step writing the next slot of one buffer."""
    BH, Dx, Dv = s0.shape
    N = u_free.shape[0] // BH
    Uf, W, Ko = (x.view(N, BH, *x.shape[1:]) for x in (u_free, w, k_out))
    coef = None if mix is None else mix.view(N, BH, *mix.shape[1:])
    u = Uf.new_empty(Uf.shape)
    states = s0.new_empty(N + 1, BH, Dx, Dv)
    states[0].copy_(s0)
    for n in range(N):
        torch.baddbmm(Uf[n], W[n], states[n], alpha=-1, out=u[n])
        if coef is None:
            torch.baddbmm(states[n], Ko[n].transpose(-1, -2), u[n], out=states[n + 1])
        else:
            _mix(states[n], coef[n], states[n + 1]).baddbmm_(Ko[n].transpose(-1, -2), u[n])
    return u, states


def pass_backward(w: Tensor, k_out: Tensor, mix: Tensor | None, u: Tensor, states: Tensor, dU: Tensor,
                  R: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """state_pass's backward (_StatePass) on buffers it may overwrite: dU [N, B * H, C, Dv] the gradient reaching u,
    R [N + 1, B * H, Dx, Dv] the gradients reaching the start states X_0 .. X_{N-1} and the final state, which it
    turns into the gradients of every state. Returns (du_free, dw, dk_out, dmix, ds0), chunk-major."""
    N, BH, Dx, Dv = states.shape[0] - 1, *states.shape[1:]
    W, Ko = (x.view(N, BH, *x.shape[1:]) for x in (w, k_out))
    coef = None if mix is None else mix.view(N, BH, *mix.shape[1:])
    mixed = None if coef is None or coef.dim() == 3 else torch.empty_like(R[0])
    for n in range(N - 1, -1, -1):
        dU[n].baddbmm_(Ko[n], R[n + 1])
        if coef is None:
            R[n].add_(R[n + 1])
        elif mixed is None:
            R[n].addcmul_(R[n + 1], coef[n])
        else:
            R[n].add_(_mix(R[n + 1], coef[n], mixed, transposed=True))
        R[n].baddbmm_(W[n].transpose(-1, -2), dU[n], alpha=-1)
    X, after = states[:N].view(-1, Dx, Dv), R[1:].view(-1, Dx, Dv)
    dU = dU.view(-1, *dU.shape[2:])
    dW = torch.bmm(dU, X.transpose(-1, -2)).neg_()
    dKo = torch.bmm(u.view_as(dU), after.transpose(-1, -2))
    dmix = None
    if mix is not None and mix.shape[1] == 1:
        dmix = dot(X, after, 2)[:, None, None]
    elif mix is not None:  # a, c, e: <S, R_S>, <P, R_S>, <P, R_P>
        (S, P), (R_S, R_P) = X.chunk(2, -2), after.chunk(2, -2)
        dmix = torch.stack([dot(S, R_S, 2), dot(P, R_S, 2), dot(P, R_P, 2)], 1)[..., None, None]
    return dU, dW, dKo, dmix, R[0]


def solved_pass(M: Tensor, rate: Tensor, rhs: Tensor, scores: Tensor, read: Tensor, k_out: Tensor, mix: Tensor | None,
                X0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor | None]]:
    """The delta rule family's chunks past their masks, chunk-major: T = (I + diag(rate) M)^{-1} for M strictly
    lower [R, C, C], [U' | W'] = T rhs (U' the columns before read's width), the pass u_n = U'_n - W'_n X_n over the
    chunks from X_0, and o = scores u + read X_n. In autograd ops (state_pass) where grad mode is on (the references),
    else through pass_forward (the written-out forms' forwards). Returns (o, u [R, C, Dv], the start states
    X_0 .. X_{N-1}, X_N, and (T, W', the states' buffer or None) for solved_pass_backward)."""
    R, C, _ = M.shape
    Dx = read.shape[-1]
    Dv = rhs.shape[-1] - Dx
    eye = torch.eye(C, dtype=M.dtype, device=M.device)
    inverse = torch.linalg.solve_triangular(torch.addcmul(eye, M, rate), eye, upper=False, unitriangular=True)
    uw = inverse @ rhs                                               # one product for U' and W'
    free, w = uw[..., :Dv], uw[..., Dv:]
    states = None
    if torch.is_grad_enabled():
        u, starts, final = state_pass(free, w, k_out, mix, X0)
    else:
        u, states = pass_forward(free, w, k_out, mix, X0)
        starts, final = states[:-1], states[-1]
    u = u.reshape(R, C, Dv)
    o = torch.bmm(scores, u).baddbmm_(read, starts.reshape(R, Dx, Dv))
    return o, u, starts, final, (inverse, w, states)


def solved_pass_backward(doc: Tensor, scores: Tensor, read: Tensor, inverse: Tensor, rhs: Tensor, w: Tensor,
                         k_out: Tensor, mix: Tensor | None, u: Tensor, states: Tensor, dfinal: Tensor | None,
                         du: Tensor | None = None, dstarts: Tensor | None = None) -> tuple[Tensor, ...]:
    """The backward of the delta rule family's chunks past their masks (the written-out forms' shared part): T the
    inverse of the unit lower-triangular system I + A, [U' | W'] = T rhs, u and the states X_n from the pass
    (pass_forward), o = scores u + read X_n; all chunk-major, doc the answer's gradient [R, C, Dv]; du, dstarts
    gradients reaching u and the start states directly (chunk-major) or None. Returns (dscores, dread, the gradients
    of rhs's two sides (U''s columns, W''s), dA below the diagonal, dk_out, dmix, dX_0)."""
    R, C, Dv = doc.shape
    Dx = states.shape[-2]
    dR = torch.empty_like(states)                                    # the states' gradients, dX_n first
    torch.bmm(read.transpose(-1, -2), doc, out=dR[:-1].view(R, Dx, Dv))
    if dstarts is not None:
        dR[:-1].view(R, Dx, Dv).add_(dstarts)
    dR[-1].copy_(dfinal.reshape(dR[-1].shape)) if dfinal is not None else dR[-1].zero_()
    dU = torch.bmm(scores.transpose(-1, -2), doc)
    if du is not None:
        dU.add_(du)
    dscores = torch.bmm(doc, u.view(R, C, Dv).transpose(-1, -2))
    dread = torch.bmm(doc, states[:-1].view(R, Dx, Dv).transpose(-1, -2))
    dfree, dw, dk_out, dmix, dX0 = pass_backward(w, k_out, mix, u, states, dU.view(-1, states.shape[1], C, Dv), dR)
    inv_t = inverse.transpose(-1, -2)
    dT = torch.bmm(dfree, rhs[..., :Dv].transpose(-1, -2)).baddbmm_(dw, rhs[..., Dv:].transpose(-1, -2))
    dA = torch.bmm(torch.bmm(inv_t, dT), inv_t).neg_().tril_(-1)     # the diagonal of I + A is fixed
    return dscores, dread, torch.bmm(inv_t, dfree), torch.bmm(inv_t, dw), dA, dk_out, dmix, dX0


def _mix(X: Tensor, coef: Tensor, out: Tensor, transposed: bool = False) -> Tensor:
    """out = mix(X) (or its transpose): d X for a decay coef [BH, 1, 1]; [a S + c P; e P] (transposed: [a S; c S + e P])
    for X = [S; P] and coef (a, c, e) [BH, 3, 1, 1]."""
    if coef.dim() == 3:
        return torch.mul(X, coef, out=out)
    a, c, e = coef.unbind(1)
    (S, P), (top, bottom) = X.chunk(2, -2), out.chunk(2, -2)  # halves: in place, as out= wants them contiguous
    if transposed:
        top.copy_(S).mul_(a)
        bottom.copy_(P).mul_(e).addcmul_(S, c)
    else:
        top.copy_(S).mul_(a).addcmul_(P, c)
        bottom.copy_(P).mul_(e)
    return out


def masked_exp(diff: Tensor, mask: Tensor) -> Tensor:
    """exp(diff) where mask, exactly 0 elsewhere; exp never sees the masked (possibly huge) entries."""
    return torch.exp(torch.where(mask, diff, torch.full_like(diff, -math.inf)))


def decay_mask(G: Tensor) -> Tensor:
    """Within-chunk decay exp(G_i - G_j) for j <= i, else 0. G: [..., C] cumulative log-gates -> [..., C, C]."""
    return masked_exp(G[..., :, None] - G[..., None, :], causal_mask(G.shape[-1], G.device))


def causal_mask(C: int, device: torch.device) -> Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril()


def check_chunk_size(chunk_size: int) -> None:
    """Chunk sizes are powers of two (the vector-gate scores halve blocks down to single tokens)."""
    if (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
            or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size!r}")
