"""Chunk form of a per-entry gate (Mamba) with a hand-written backward: no autograd graph, memory linear in T.

The recurrence (gd.py's module docstring), each entry of the state S [Dk, Dv] with its own decay a_t = exp(g_t):
    S_t = a_t * S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t          (q already scaled)
and its reverse, dS_t the gradient reaching S_t (dS_T = the final state's gradient):
    dS_t = q_t do_t^T + a_{t+1} * dS_{t+1}
    dq_t = S_t do_t,   dk_t = dS_t v_t,   dv_t = dS_t^T k_t,   dg_t = dS_t * a_t * S_{t-1},   ds0 = a_1 * dS_1.
No matrix product carries a decay that differs per entry, so every form is a scan, O(T Dk Dv) elementwise work;
what matters on a CPU is the number of torch calls (each costs microseconds) and the bytes each one moves.

Layout. Time is cut into blocks of M chunks of C tokens, run one after the other; within a block the M chunks run
side by side, so one torch call updates M * B * H states ([R, Dk, Dv], R = B M H rows: about CALL_BYTES, a few
hundred KB, near the cache) and a block takes C steps instead of M C. The chunks of a block start from states
the block does not know yet; a block therefore
    1. takes a = exp(g) of the whole block once (a [C, R, Dk, Dv] buffer; exp is the costliest elementwise op),
    2. runs each chunk from zero to its end (C steps of [R, Dk, Dv]), then carries the state across its M chunks
       with the chunks' total decays prod a (M steps of [B, H, Dk, Dv]): the true start of every chunk,
    3. runs each chunk again from its true start, answering every token (C steps).
With B H states of CALL_BYTES or more a block is one chunk (M = 1) and step 2 falls away. exp is only ever taken of
a single log-gate g <= 0, and decays over several tokens are products of such factors <= 1: nothing overflows however
strong the decay (g = -80 per token underflows to 0 in float32, as the recurrence does).

The forward keeps only the inputs (references) and each chunk's start state (T / C states). The backward runs the
blocks last to first, with the gradient reaching the block's end state:
    1. a = exp(g) of the block once;
    2. (M > 1) each chunk's reverse scan from zero, E = a_first * dl_first with dl_t = q_t do_t^T + a_{t+1} dl_{t+1},
       then the reverse carry D_{m-1} = E_m + (prod a over chunk m) * D_m: the gradient reaching each chunk's end;
    3. the forward again from the saved starts, each a_t * S_{t-1} written where dg_t goes (dg is an output anyway,
       so the chunk's states cost no memory of their own), and dq_t = S_t do_t;
    4. the reverse from D: dS_t, dk_t, dv_t, dg_t = dS_t * (a_t S_{t-1}) in place, dS_{t-1} = a_t * dS_t.
Peak memory beyond the inputs and gradients: the start states (T / C states per head) and a block's buffers.

Measured (B = 1, H = 4, T = 4096, Dk = Dv = 64, float32, 2 threads, fwd + bwd): about 0.45 to 0.65 s against 3.6 to
4.3 s for gd._chunked_entry and 2.4 to 2.9 s for the recurrent form; peak memory about 310 MB above the inputs, 268 of
them the gradients (gd._chunked_entry: 1.6 to 2.1 GB, recurrent: 1.1 GB). Of the time, exp (once per pass) takes
about a quarter and first touching dg's fresh pages another quarter. Saving a = exp(g) from the forward and writing
dg over it in the backward would save one exp pass (about 13%) but keep a tensor the size of g between the passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

# bytes of state updated by one torch call: B * H * M states [Dk, Dv] (M chunks side by side). 512 KB (32 states at
# Dk = Dv = 64 in float32) measured best, 256 KB to 1 MB about as good: fewer bytes pay the calls' overhead, more
# spill out of the caches (a block's gates, C such calls, stay in L3 for C <= 32)
CALL_BYTES = 512 * 1024
# tokens per chunk: 16 and 32 measured best at Dk = Dv = 64 (64 up to 15 % slower); the chunk changes no result
ENTRY_CHUNK = 16


def chunked_entry(q: Tensor, k: Tensor, v: Tensor, g: Tensor, s0: Tensor | None, C: int, *,
                  parallel: int | None = None) -> tuple[Tensor, Tensor]:
    """q, k [B, T, H, Dk], v [B, T, H, Dv], g [B, T, H, Dk, Dv] (log-gates), s0 [B, H, Dk, Dv] or None, all in the
    compute dtype (q already scaled). Returns (o [B, T, H, Dv], final state [B, H, Dk, Dv]), differentiable in q, k,
    v, g and s0. C: tokens per chunk (T need not be a multiple; 16 to 32 measured best); parallel: chunks run side by
    side (default: enough for about CALL_BYTES of state per torch call)."""
    B, T, H, Dk = k.shape
    state_bytes = B * H * Dk * v.shape[-1] * v.element_size()
    M = parallel if parallel is not None else max(1, -(-CALL_BYTES // max(1, state_bytes)))
    if not (isinstance(C, int) and C >= 1 and isinstance(M, int) and M >= 1):
        raise ValueError(f"chunked_entry needs a chunk size C >= 1 and parallel >= 1, got C={C!r}, parallel={M!r}")
    return _EntryScan.apply(q, k, v, g, s0, _plan(T, C, M))


def _plan(T: int, C: int, M: int) -> tuple[tuple[int, int, int, int], ...]:
    """Blocks (t0, M, C, j0) covering [0, T): whole blocks of M chunks, then the whole chunks left, then the rest;
    j0 counts the chunks before the block."""
    blocks, t, j = [], 0, 0
    while T - t >= C:
        m = min(M, (T - t) // C)
        blocks.append((t, m, C, j))
        t, j = t + m * C, j + m
    if T - t:
        blocks.append((t, 1, T - t, j))
    return tuple(blocks)


def _block(x: Tensor, t0: int, m: int, c: int) -> Tensor:
    """[B, T, H, ...] -> the block's tokens as [B, m, c, H, ...] (a view)."""
    return x[:, t0:t0 + m * c].unflatten(1, (m, c))


class _Buffers:
    """Work tensors reused from block to block: a fresh tensor of a few MB is fresh pages from the kernel each
    time, and first touching them costs as much as the arithmetic."""

    def __init__(self, like: Tensor):
        self.like, self.flat = like, {}

    def get(self, name: str, *shape: int) -> Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self.flat.get(name)
        if buf is None or buf.numel() < n:
            buf = self.flat[name] = self.like.new_empty(n)
        return buf[:n].view(shape)

    def steps(self, name: str, x: Tensor, t0: int, m: int, c: int) -> Tensor:
        """[B, T, H, D] -> the block as [c, R, D] (R = B m H rows; step i of every chunk contiguous)."""
        b = _block(x, t0, m, c)  # [B, m, c, H, D]
        B, _, _, H, D = b.shape
        out = self.get(name, c, B, m, H, D)
        out.copy_(b.permute(2, 0, 1, 3, 4))
        return out.view(c, B * m * H, D)

    def gates(self, g: Tensor, t0: int, m: int, c: int) -> Tensor:
        """exp of the block's log-gates as [c, B, m, H, Dk, Dv], in one call."""
        gb = _block(g, t0, m, c)  # [B, m, c, H, Dk, Dv]
        B, _, _, H, Dk, Dv = gb.shape
        return torch.exp(gb.permute(2, 0, 1, 3, 4, 5), out=self.get("a", c, B, m, H, Dk, Dv))

    def chunk_decays(self, a: Tensor) -> Tensor:
        """The product of a block's gates [c, B, m, H, Dk, Dv] over each chunk [B, m, H, Dk, Dv]: a chunk's start
        state to its end (factors <= 1, no exp of a sum)."""
        return torch.prod(a, dim=0, out=self.get("decays", *a.shape[1:]))


def _unsteps(y: Tensor, out: Tensor, t0: int, m: int, c: int) -> None:
    """Writes [c, R, 1, D] back into the block of out [B, T, H, D]."""
    b = _block(out, t0, m, c)
    b.copy_(y.view(c, b.shape[0], m, b.shape[3], -1).permute(1, 2, 0, 3, 4))


class _EntryScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, plan):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        B, T, H, Dk = k.shape
        Dv = v.shape[-1]
        o = q.new_empty(B, T, H, Dv)
        starts = q.new_empty(B, sum(m for _, m, _, _ in plan), H, Dk, Dv)  # every chunk's start state
        buf = _Buffers(q)
        state = q.new_zeros(B, H, Dk, Dv) if s0 is None else s0
        for t0, m, c, j0 in plan:
            R = B * m * H
            qs, ks, vs = (buf.steps(n, x, t0, m, c) for n, x in (("q", q), ("k", k), ("v", v)))
            kc, vr, qr = ks[..., :, None].unbind(0), vs[..., None, :].unbind(0), qs[..., None, :].unbind(0)
            a6 = buf.gates(g, t0, m, c)
            a = a6.view(c, R, Dk, Dv).unbind(0)
            start = starts[:, j0:j0 + m]
            start[:, 0] = state
            S = buf.get("S", R, Dk, Dv)
            S5 = S.view(B, m, H, Dk, Dv)
            if m > 1:  # each chunk from zero to its end, then the carry across the block's chunks
                torch.mul(kc[0], vr[0], out=S)
                for i in range(1, c):
                    S.mul_(a[i]).addcmul_(kc[i], vr[i])
                decays = buf.chunk_decays(a6)
                for j in range(1, m):
                    torch.addcmul(S5[:, j - 1], decays[:, j - 1], start[:, j - 1], out=start[:, j])
            S5.copy_(start)
            os = buf.get("o", c, R, 1, Dv)
            for i, o_i in enumerate(os.unbind(0)):
                S.mul_(a[i]).addcmul_(kc[i], vr[i])
                torch.bmm(qr[i], S, out=o_i)
            _unsteps(os, o, t0, m, c)
            state = S5[:, -1].clone()
        if not plan:  # T = 0: the state passes through (a new tensor, not the input itself)
            state = state.clone()
        ctx.plan, ctx.has_s0 = plan, s0 is not None
        ctx.save_for_backward(q, k, v, g, starts)
        return o, state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dstate):
        q, k, v, g, starts = ctx.saved_tensors
        B, T, H, Dk = k.shape
        Dv = v.shape[-1]
        do = q.new_zeros(B, T, H, Dv) if do is None else do.contiguous()
        dD = q.new_zeros(B, H, Dk, Dv) if dstate is None else dstate  # the gradient reaching the block's end
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dg = torch.empty_like(g) if ctx.needs_input_grad[3] else None
        buf = _Buffers(q)
        for t0, m, c, j0 in reversed(ctx.plan):
            R = B * m * H
            qs, ks, vs, dos = (buf.steps(n, x, t0, m, c) for n, x in (("q", q), ("k", k), ("v", v), ("do", do)))
            qc, dor = qs[..., :, None].unbind(0), dos[..., None, :].unbind(0)
            krow, vrow, dorow = ks[:, :, None, :].unbind(0), vs[:, :, None, :].unbind(0), dos[:, :, None, :].unbind(0)
            a6 = buf.gates(g, t0, m, c)  # [c, B, m, H, Dk, Dv]
            a = a6.view(c, R, Dk, Dv).unbind(0)
            dS = buf.get("dS", R, Dk, Dv)
            dS5 = dS.view(B, m, H, Dk, Dv)
            dS5[:, m - 1] = dD
            if m > 1:  # each chunk's reverse from zero, then the reverse carry: the gradient reaching each end
                E = buf.get("E", R, Dk, Dv)
                torch.mul(qc[c - 1], dor[c - 1], out=E).mul_(a[c - 1])
                for i in range(c - 2, -1, -1):
                    E.addcmul_(qc[i], dor[i]).mul_(a[i])
                E5 = E.view(B, m, H, Dk, Dv)
                decays = buf.chunk_decays(a6)
                for j in range(m - 1, 0, -1):
                    torch.addcmul(E5[:, j], decays[:, j], dS5[:, j], out=dS5[:, j - 1])
            # the forward again from the saved starts: a_t * S_{t-1} kept where dg_t goes, dq_t = S_t do_t
            # (5-d views: dg's block is strided, its rows (b, chunk, h) do not flatten)
            S = buf.get("S", R, Dk, Dv)
            S5, St, dSt = S.view(B, m, H, Dk, Dv), S.mT, dS.mT  # transposed views, made once
            S5.copy_(starts[:, j0:j0 + m])
            dqs, dks, dvs = buf.get("dq", c, R, 1, Dk), buf.get("dk", c, R, 1, Dk), buf.get("dv", c, R, 1, Dv)
            dql, dkl, dvl = dqs.unbind(0), dks.unbind(0), dvs.unbind(0)
            if dg is None:
                kc, vr = ks[..., :, None].unbind(0), vs[..., None, :].unbind(0)
                for i in range(c):
                    S.mul_(a[i]).addcmul_(kc[i], vr[i])
                    torch.bmm(dorow[i], St, out=dql[i])
            else:
                kept = _block(dg, t0, m, c).movedim(2, 0).unbind(0)  # [B, m, H, Dk, Dv] each
                a5 = a6.unbind(0)
                k5 = ks.view(c, B, m, H, Dk, 1).unbind(0)
                v5 = vs.view(c, B, m, H, 1, Dv).unbind(0)
                for i in range(c):
                    torch.mul(S5, a5[i], out=kept[i])
                    torch.addcmul(kept[i], k5[i], v5[i], out=S5)
                    torch.bmm(dorow[i], St, out=dql[i])
            # the reverse: dS_t, then dk_t, dv_t, dg_t = dS_t * (a_t S_{t-1}), and dS_{t-1} = a_t * dS_t
            for i in range(c - 1, -1, -1):
                dS.addcmul_(qc[i], dor[i])
                torch.bmm(vrow[i], dSt, out=dkl[i])
                torch.bmm(krow[i], dS, out=dvl[i])
                if dg is not None:
                    kept[i].mul_(dS5)
                dS.mul_(a[i])
            for y, out in ((dqs, dq), (dks, dk), (dvs, dv)):
                _unsteps(y, out, t0, m, c)
            dD = dS5[:, 0].clone()
        ds0 = (dD if ctx.plan else dD.clone()) if ctx.has_s0 else None  # T = 0: not the incoming gradient itself
        return dq, dk, dv, dg, ds0, None
