"""Batch gradient descent, one step from zero: linear attention and its gated variants.

Objective   M_t = argmin_M 1/2 sum_{i<=t} gamma_i^(t) || v_i - M phi(k_i) ||^2,  answer y_t = M_t (scale phi(q_t))
Weights     gamma_i^(t) = alpha_{i+1} ... alpha_t, alpha = exp(g): uniform (g None), scalar per head
            (g [B, T, H]: RetNet, Mamba-2) or per key channel (g [B, T, H, Dk]: GLA, RWKV-6, HGRN-2)
Function    linear in the features: m(k) = M phi(k) (phi = identity: plain linear attention)
Optimizer   one step of batch GD from M = 0 with learning rate 1. The gradient at zero is
            -sum_i gamma_i^(t) v_i phi(k_i)^T, so M_t = sum_i gamma_i^(t) v_i phi(k_i)^T: the inverse
            key covariance of the exact solution is dropped (no preconditioning). A vector gate weighs
            each association's gradient per key channel.

The state is S_t = M_t^T = sum_i gamma_i^(t) phi(k_i) v_i^T  [B, H, Dk, Dv]:
    S_t = alpha_t S_{t-1} + phi(k_t) v_t^T       (alpha_t scales the rows of S for a vector gate)
    o_t = S_t^T (scale phi(q_t))
normalize=True answers the locally constant fit with weights phi(q)^T (gamma_i phi(k_i)) instead
(Katharopoulos et al.): o_t = S_t^T phi(q_t) / (z_t^T phi(q_t)), z_t = sum_i gamma_i^(t) phi(k_i). The
normalizer z rides along as one more value column, so the state is then [B, H, Dk, Dv + 1].

A bonus u [H, Dk] (RWKV-6) gives the newest association its own weight per key channel: the regression at t
weighs association t by u and the earlier ones i < t by alpha_{i+1} ... alpha_{t-1} (the current gate has not
yet decayed them), so the answer reads the state before this token's update:
    o_t = (S_{t-1} + diag(u) phi(k_t) v_t^T)^T (scale phi(q_t)),   S_t = alpha_t S_{t-1} + phi(k_t) v_t^T.
The state, and so everything carried between calls, is the same as without u.

An angle theta [B, T, H, Dk] makes the gate complex (GateLoop, LRU): alpha_t = exp(g_t + i theta_t) per key channel,
so each channel's memory decays and rotates, gamma_i^(t) = exp(G_t - G_i + i (Theta_t - Theta_i)) with Theta the
cumulative angle, and the answer is the real part: o_t = Re(S_t^T (scale phi(q_t))) with S_t complex. The state
holds Re S_t over Im S_t, [B, H, 2 D_phi, Dv]. The rotation is absorbed into q and k exactly:
    Re(q^T e^(i(Theta_t - Theta_j)) k) = [q cos Theta_t, -q sin Theta_t] . [k cos Theta_j, -k sin Theta_j],
so the chunk form is the real vector-gated one on 2 D_phi channels, in the frame of each chunk's start (angles
turned since then, small), and the carried state turns by the chunk's total angle between chunks. With
normalize=True the normalizer turns too, and the answer is the locally constant fit with the real weights
Re(gamma_i^(t)) phi(q_t)^T phi(k_i): cosFormer's cos(theta (t - i)) re-weighting with a fixed angle theta and no decay.

Association sets (ttr.weights). By default the regression at t sums over the causal prefix i <= t. A window of w
tokens sums over t - w < i <= t only (the gate's decay inside it unchanged): the sum is no longer a running state,
so the chunk form is a banded attention, chunks of C >= w tokens (the window spans at most the previous chunk),
O(T max(C, w) D), and the recurrent form keeps the last w associations, O(w D) a token. The state carried between
calls is that ring: (K [.., w, D_phi], V [.., w, Dv(+1)]), oldest first, each key already weighted by its decay to
the last token (gamma_i^(T) k_i; zero slots are no association), so K^T V is the memory S_T, and a next call's
token t weighs slot i by exp(g_1 + ... + g_t) more, exactly as one call over the whole sequence.
causal=False sums over the whole sequence (encoders, uniform weights: a decay orders associations in time):
o_t = (sum_i phi(k_i) v_i^T)^T phi(q_t) for every t, with no recurrent form and no state.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import (blame, check_log_gate, check_mode, check_qkv, check_state, checking, compute_dtype,
                       finite_answer, log_gate_as, scale_or, vouch)
from ..features import FEATURE_MAPS, get_feature_map
from ..weights import check_window
from ._chunk import (carry_, causal_mask, check_chunk_size, decayed_states, dot, from_chunk_major, from_chunks,
                     masked_exp, to_chunk_major, to_chunks, written_out)
from ._entry import ENTRY_CHUNK, chunked_entry
from ._varlen import check_cu_seqlens, run_packed


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    feature_map: str | Callable[[Tensor], Tensor] | None = None,
    normalize: bool = False,
    scale: float | None = None,
    bonus: Tensor | None = None,
    angle: Tensor | None = None,
    initial_state: Tensor | tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
    window: int | None = None,
    causal: bool = True,
) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor] | None]:
    """Linear attention as one step of batch GD. q, k: [B, T, H, Dk], v: [B, T, H, Dv]; bonus u [H, D_phi]: the
    newest association's weight (RWKV-6); angle [B, T, H, D_phi]: the complex gate's rotation per key channel
    (GateLoop, LRU; module docstring).

    Returns (o [B, T, H, Dv] in the input dtype, final state [B, H, D_phi, Dv(+1)] in float32/64 or None; with an
    angle [B, H, 2 D_phi, Dv], the real over the imaginary part).
    `scale` defaults to Dk^-1/2 (Dk before the feature map), as in fla. Modes: "chunk" (training),
    "recurrent" (token by token, the decoding path). cu_seqlens [N + 1] (with B = 1) packs N sequences:
    states start afresh at each boundary, initial and final states are [N, H, D_phi, Dv(+1)].
    window w: the association set {t - w < i <= t} (uniform, scalar or vector gates, bonus, normalize); the state is
    then the ring (K [rows, H, w, D_phi], V [rows, H, w, Dv(+1)]) of the last w associations (module docstring).
    causal=False: every token's regression sums over the whole sequence (uniform weights, "chunk" mode, no state).
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v, values=False)  # a non-finite value reaches the answer (finite_answer)
    given = {"q": q, "k": k, "v": v, "angle": angle}
    check_window(window, causal)
    cu = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T)
    check_mode(mode, ("chunk", "recurrent"))
    check_chunk_size(chunk_size)
    phi = get_feature_map(feature_map)
    if phi is not FEATURE_MAPS["identity"] and checking():  # a map may send an infinity to a finite feature
        blame(q=q, k=k)
    out_dtype = q.dtype
    dt = compute_dtype(q.dtype)
    q, k, v = phi(q.to(dt)), phi(k.to(dt)), v.to(dt)
    if normalize and not phi.positive and checking():  # the caller's own features (fla's convention): >= 0
        low = min(float(x.detach().min()) for x in (q, k))
        if low < 0:
            raise ValueError(f"normalize=True needs non-negative features phi(q), phi(k) (weights phi(q)^T phi(k) "
                             f">= 0); feature map {phi.name!r} gave a value of {low:.4g}")
    Df = k.shape[-1]
    kind = check_log_gate(g, B, T, H, Df, Dv=Dv)
    if kind == "entry" and (normalize or bonus is not None or angle is not None):
        raise ValueError("a per-entry gate g [B, T, H, D_phi, Dv] (Mamba) is for the unnormalized memory without a "
                         "bonus or an angle: pass normalize=False, bonus=None, angle=None")
    scale = scale_or(scale, Dk ** -0.5)
    q = q * scale
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    rows = B if cu is None else cu.numel() - 1
    theta = _check_angle(angle, (B, T, H, Df), bonus, dt)
    prefix = window is None and causal
    if prefix:
        check_state("initial_state", initial_state, (rows, H, Df if theta is None else 2 * Df, v.shape[-1]))
    u = _check_bonus(bonus, H, Df, normalize, dt)
    # g as [B, T, H, 1 or Dk]: one broadcasting rule serves scalar and vector gates (a per-entry gate keeps its Dv)
    g = log_gate_as(g, dt)
    g = None if g is None else (g.unsqueeze(-1) if kind == "scalar" else g)
    if not prefix:
        o, state = _association_set(q, k, v, g, kind, u, theta, initial_state, output_final_state, mode, chunk_size,
                                    cu, rows, window)
    else:
        s0 = None if initial_state is None else initial_state.to(dt)
        if mode == "recurrent":
            core = functools.partial(_recurrent, u=u)
        elif kind == "entry":
            core = functools.partial(_chunked_entry, C=chunk_size)
        else:
            core = functools.partial(_chunked, C=chunk_size, vector=kind == "vector", u=u)
        if cu is None:
            o, state = core(q, k, v, g, theta, s0)
        else:  # zero features, gates and angles outside the sequences: no association, no decay, no turn
            o, state = run_packed(core, cu, [q, k, v, g, theta], s0, None if mode == "recurrent" else chunk_size)
    if normalize:
        # Non-negative features: a zero normalizer means every weight is zero, and so is the numerator; the
        # answer there is 0, with gradient 0 (dividing by a clamped normalizer would give 0 * inf = NaN)
        numerator, z = o[..., :-1], o[..., -1:]
        if theta is not None and checking() and bool((z < -NEGATIVE_MASS * z.detach().abs().amax()).any()):
            blame(**given)
            raise ValueError("normalize=True with an angle: the real parts of the complex weights summed to a negative "
                             "weight mass for some query (a turn past pi / 2 between a query and its keys: cosFormer's "
                             "re-weighting holds for fewer tokens than its maximum length)")
        seen = z > 0
        if phi.strictly and g is None and checking() and not bool(seen.all()):  # z > 0 but for underflow or nan
            blame(**given)
            raise ValueError(f"normalize=True: every weight phi(q)^T phi(k) of a query underflowed to 0 in {dt} "
                             f"(feature map {phi.name!r}); normalize or rescale q and k")
        o = torch.where(seen, numerator / torch.where(seen, z, torch.ones_like(z)), torch.zeros_like(numerator))
    if output_final_state:
        vouch(*(state if isinstance(state, tuple) else (state,)))
    return finite_answer("linear_attention", o.to(out_dtype), **given), (state if output_final_state else None)


# a weight mass below -NEGATIVE_MASS times the largest is negative weights, not rounding around zero
NEGATIVE_MASS = 1e-6


def _check_bonus(bonus: Tensor | None, H: int, Df: int, normalize: bool, dt: torch.dtype) -> Tensor | None:
    if bonus is None:
        return None
    if not isinstance(bonus, Tensor) or tuple(bonus.shape) != (H, Df) or not bonus.is_floating_point():
        raise ValueError(f"bonus must be a floating-point tensor [H, D_phi] = [{H}, {Df}], got "
                         f"{list(bonus.shape) if isinstance(bonus, Tensor) else type(bonus).__name__}")
    if normalize:
        raise ValueError("bonus (RWKV-6's weight of the newest association) is for the unnormalized memory: "
                         "pass normalize=False")
    if checking() and not bool(torch.isfinite(bonus).all()):
        raise ValueError("bonus holds non-finite values")
    return bonus.to(dt)


def _check_angle(angle: Tensor | None, shape: tuple[int, ...], bonus: Tensor | None,
                 dt: torch.dtype) -> Tensor | None:
    if angle is None:
        return None
    if not isinstance(angle, Tensor) or tuple(angle.shape) != shape or not angle.is_floating_point():
        raise ValueError(f"angle must be a floating-point tensor [B, T, H, D_phi] = {list(shape)}, got "
                         f"{list(angle.shape) if isinstance(angle, Tensor) else type(angle).__name__}")
    if bonus is not None:
        raise ValueError("angle (a complex gate) is for a memory without a bonus: pass bonus=None")
    return angle.to(dt)  # its values are checked with the answer's, which a non-finite angle reaches


def _association_set(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, kind: str | None, u: Tensor | None,
                     theta: Tensor | None, initial_state: object, output_final_state: bool, mode: str, chunk_size: int,
                     cu: Tensor | None, rows: int, window: int | None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """linear_attention over a window (window w) or the whole sequence (window None, causal=False): checks, then
    the form asked for, per packed sequence where cu is given."""
    if window is None:  # the whole sequence
        if g is not None or u is not None or theta is not None:
            raise ValueError("causal=False sums over the whole sequence, where a decay (g, bonus, angle) has no single "
                             "meaning (it orders associations in time): pass g=None, bonus=None, angle=None")
        if mode == "recurrent":
            raise ValueError("causal=False has no recurrent form: every token's answer reads tokens not yet seen; "
                             "use mode='chunk'")
        if initial_state is not None or output_final_state:
            raise ValueError("causal=False carries no state between calls (its set is one whole sequence): pass "
                             "initial_state=None, output_final_state=False")
        if cu is None:
            return _whole(q, k, v)[0], None
        return run_packed(lambda q_, k_, v_, _: _whole(q_, k_, v_), cu, [q, k, v], None, chunk_size)[0], None
    if kind == "entry" or theta is not None:
        raise ValueError("window is offered with uniform weights and scalar or vector gates: a per-entry gate (Mamba) "
                         "or an angle (complex gate) would make the ring per entry or complex")
    ring = _check_ring(initial_state, (rows, k.shape[2], window), k.shape[-1], v.shape[-1], q.dtype)
    if mode == "recurrent":
        core = functools.partial(_window_recurrent, w=window, u=u)
    else:
        core = functools.partial(_window_chunked, C=chunk_size, w=window, vector=kind == "vector", u=u)
    if cu is None:
        return core(q, k, v, g, None, ring)
    # each token marks its row as real: a sequence's ring is its own last w tokens, not the padding after them
    real = torch.ones(1, q.shape[1], dtype=q.dtype, device=q.device)
    return run_packed(core, cu, [q, k, v, g, real], ring, None if mode == "recurrent" else chunk_size)


def _check_ring(state: object, lead: tuple[int, int, int], Dk: int, Dv: int, dt: torch.dtype
                ) -> tuple[Tensor, Tensor] | None:
    """A window's carried state: the pair (K [rows, H, w, D_phi], V [rows, H, w, Dv(+1)]), in dt."""
    if state is None:
        return None
    if not (isinstance(state, tuple) and len(state) == 2):
        raise ValueError(f"with a window, initial_state is the ring of the last w associations, the pair "
                         f"(K {list(lead) + [Dk]}, V {list(lead) + [Dv]}) a windowed call returned; got "
                         f"{type(state).__name__}")
    check_state("initial_state (K)", state[0], (*lead, Dk))
    check_state("initial_state (V)", state[1], (*lead, Dv))
    return state[0].to(dt), state[1].to(dt)


def _whole(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The whole sequence's memory S = sum_i k_i v_i^T [B, H, Dk, Dv] read at every query: (o_t = S^T q_t, S)."""
    S = torch.einsum("bthk,bthv->bhkv", k, v)
    return torch.einsum("bthk,bhkv->bthv", q, S), S


def _lengths(real: Tensor | None, B: int, T: int, device: torch.device) -> Tensor:
    """Each row's number of tokens: T, or the real ones of a packed sequence's padded row (real [B, T])."""
    return torch.full((B,), T, device=device) if real is None else real.sum(1).long()


def _ring_after(k: Tensor, v: Tensor, g: Tensor | None, lengths: Tensor, ring: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, Tensor]:
    """The window's state after a call: each row's last w associations (of the ring it started from, then its
    `lengths` tokens; k, v [B, T, H, D]), oldest first, keys weighted by their decay to the row's last token."""
    K0, V0 = ring
    n = K0.shape[2]
    at = (lengths[:, None] + torch.arange(n, device=k.device))[:, None, :, None]  # [B, 1, n, 1] in [ring, tokens]
    K = torch.cat([K0, k.transpose(1, 2)], 2).gather(2, at.expand(-1, K0.shape[1], -1, K0.shape[3]))
    V = torch.cat([V0, v.transpose(1, 2)], 2).gather(2, at.expand(-1, V0.shape[1], -1, V0.shape[3]))
    if g is None:
        return K, V
    # the ring's slots need no gate of their own: their keys are already weighted to this call's start
    gs = torch.cat([g.new_zeros(*K0.shape[:3], g.shape[-1]), g.transpose(1, 2)], 2)
    gs = gs.gather(2, at.expand(-1, K0.shape[1], -1, g.shape[-1]))
    later = F.pad(gs.flip(2).cumsum(2).flip(2)[:, :, 1:], (0, 0, 0, 1))  # the log-gates after each slot, <= 0
    return K * torch.exp(later), V


def _window_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, real: Tensor | None,
                      ring: tuple[Tensor, Tensor] | None, w: int, u: Tensor | None = None
                      ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Token by token over a window: the ring of the last w associations (keys weighted to now); token t reads the
    newest w - 1 of them and its own, then decays the ring, appends itself and drops the oldest. A padded token
    (real 0) leaves it."""
    B, T, H, Dk = k.shape
    K, V = (k.new_zeros(B, H, w, Dk), v.new_zeros(B, H, w, v.shape[-1])) if ring is None else ring
    none = [None] * T
    gates = none if g is None else g.unbind(1)
    reals = none if real is None else (real > 0).unbind(1)
    outs = []
    for q_t, k_t, v_t, g_t, real_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), gates, reals):
        decayed = K if g_t is None else K * torch.exp(g_t)[:, :, None, :]
        read = (K if u is not None else decayed)[:, :, 1:]  # RWKV-6 reads the earlier ones before its gate
        newest = (q_t * (k_t if u is None else u * k_t)).sum(-1)  # [B, H]: the token's own association
        outs.append(torch.einsum("bhw,bhwv->bhv", (read @ q_t[..., None])[..., 0], V[:, :, 1:])
                    + newest[..., None] * v_t)
        K_new = torch.cat([decayed, k_t[:, :, None]], 2)[:, :, 1:]
        V_new = torch.cat([V, v_t[:, :, None]], 2)[:, :, 1:]
        if real_t is None:
            K, V = K_new, V_new
        else:
            keep = real_t[:, None, None, None]
            K, V = torch.where(keep, K_new, K), torch.where(keep, V_new, V)
    return torch.stack(outs, 1), (K, V)


def _window_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, real: Tensor | None,
                    ring: tuple[Tensor, Tensor] | None, C: int, w: int, vector: bool, u: Tensor | None = None
                    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Chunkwise form of a window: a carried ring's newest w - 1 slots (those a new token can see) enter as the tokens
    before this call (gate 0: their keys are weighted already), then the banded attention (_banded). A window no
    shorter than the call, with no ring, never binds: the causal prefix's own chunk form."""
    B, T, H, _ = q.shape
    empty = (k.new_zeros(B, H, w, k.shape[-1]), v.new_zeros(B, H, w, v.shape[-1]))
    if ring is None and w >= T:
        o = _chunked(q, k, v, g, None, None, C, vector, u)[0]
    elif ring is None:
        o = _banded(q, k, v, g, C, w, vector, u)
    else:
        before = [x[:, :, 1:].transpose(1, 2) for x in ring]
        ahead = [torch.cat([x0, x], 1) for x0, x in zip([torch.zeros_like(before[0])] + before, (q, k, v))]
        g_all = None if g is None else F.pad(g, (0, 0, 0, 0, w - 1, 0))
        o = _banded(*ahead, g_all, C, w, vector, u)[:, w - 1:]
    return o, _ring_after(k, v, g, _lengths(real, B, T, q.device), empty if ring is None else ring)


def _banded(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, C: int, w: int, vector: bool, u: Tensor | None
            ) -> Tensor:
    """o_i = sum_{i - w < j <= i} gamma_ij (q_i . k_j) v_j in chunks of C' = max(C, w) tokens (powers of two; no more
    than the call needs), so the window reaches back into the previous chunk at most: the chunk's own masked
    (decayed) attention with a band, plus the previous chunk's keys, weighted to its end (exp(G_last - G_j) <= 1),
    read by the queries weighted from their chunk's start (exp(G_i) <= 1). No state: O(T C' D), memory O(T C')."""
    T = q.shape[1]
    C = min(max(C, 1 << (w - 1).bit_length()), max(C, 1 << (T - 1).bit_length()))
    qc, kc, vc = to_chunks(q, C), to_chunks(k, C), to_chunks(v, C)  # [B, H, N, C, D]
    lag = torch.arange(C, device=q.device)
    lag = lag[:, None] - lag[None, :]                                  # i - j within a chunk
    band = (lag >= 0) & (lag < w)
    mask = band if u is None else band & (lag > 0)                     # the diagonal left to u
    leaf = None
    if g is None:
        q_in, k_end = qc, kc
        scores = (qc @ kc.transpose(-1, -2)).masked_fill(~mask, 0.0)
    else:
        G = to_chunks(g, C).cumsum(-2)
        G_read = G if u is None else F.pad(G[..., :-1, :], (0, 0, 1, 0))
        q_in, k_end = qc * torch.exp(G_read), kc * torch.exp(G[..., -1:, :] - G)
        scores, leaf, _ = _gated_scores(qc, kc, q_in, G, G_read, mask, vector, u)
    if u is not None and leaf in (None, C):
        scores = scores + torch.diag_embed(_newest(qc, kc, u))
    o = scores @ vc
    if w > 1:  # token j of the previous chunk is i - j = lag + C back
        k_prev, v_prev = (F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1] for x in (k_end, vc))
        o = o + (q_in @ k_prev.transpose(-1, -2)).masked_fill(~(lag + C < w), 0.0) @ v_prev
    return from_chunks(o, T)


def _rotate(state: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The complex state [..., 2 Dk, Dv] (real over imaginary rows) times exp(i theta) per key channel."""
    re, im = state.chunk(2, dim=-2)
    cos, sin = cos[..., None], sin[..., None]
    return torch.cat([cos * re - sin * im, sin * re + cos * im], dim=-2)


def _recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, theta: Tensor | None, s0: Tensor | None,
               u: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if theta is not None:  # a complex state: k v^T is written into the real rows, the answer reads them
        q, k = F.pad(q, (0, q.shape[-1])), F.pad(k, (0, k.shape[-1]))
        g = None if g is None else g.expand(*q.shape[:3], theta.shape[-1]).repeat(1, 1, 1, 2)  # both rows decay
    B, T, H, Dk = k.shape
    state = q.new_zeros(B, H, Dk, v.shape[-1]) if s0 is None else s0
    # unbind once: indexing x[:, t] would make backward build a full-size zero gradient per token
    none = [None] * T
    gates = none if g is None else g.unbind(1)
    turns = none if theta is None else list(zip(theta.cos().unbind(1), theta.sin().unbind(1)))
    outs = []
    for q_t, k_t, v_t, g_t, turn in zip(q.unbind(1), k.unbind(1), v.unbind(1), gates, turns):
        if u is not None:  # read before this token's update, the newest association weighted by u
            newest = (q_t * u * k_t).sum(-1, keepdim=True) * v_t
            outs.append((q_t[:, :, None, :] @ state)[..., 0, :] + newest)
        if g_t is not None:  # rows of the state ([B, H, 1 or Dk]), or its entries ([B, H, Dk, Dv])
            decay = torch.exp(g_t)
            state = state * (decay if decay.dim() == 4 else decay.unsqueeze(-1))
        if turn is not None:
            state = _rotate(state, *turn)
        state = state + k_t[:, :, :, None] * v_t[:, :, None, :]
        if u is None:
            outs.append((q_t[:, :, None, :] @ state)[..., 0, :])
    return torch.stack(outs, dim=1), state


def _chunked_entry(q: Tensor, k: Tensor, v: Tensor, g: Tensor, theta: None, s0: Tensor | None,
                   C: int) -> tuple[Tensor, Tensor]:
    """Chunkwise form of a per-entry gate (Mamba), g [B, T, H, Dk, Dv]: no matrix product carries a decay that
    differs per entry, so it is a scan over chunks run side by side, with a hand-written backward (ops._entry)."""
    return chunked_entry(q, k, v, g, s0, min(C, ENTRY_CHUNK))


def _chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, theta: Tensor | None, s0: Tensor | None, C: int,
             vector: bool, u: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunkwise form: within a chunk a masked (decayed) attention, across chunks the state.

    With G the within-chunk cumulative log-gate, token i of a chunk sees
        the chunk's start state decayed by exp(G_i)   and   token j <= i decayed by exp(G_i - G_j).
    Every exponent formed is <= 0, or <= SPAN where one reference point serves a block whose log-gates sum to
    at least -SPAN (_vector_gate_scores), so nothing overflows however strong the decay. With a bonus u, token i reads
    before its own gate: exp(G_{i-1}) and exp(G_{i-1} - G_j) for j < i, and u for j = i. With an angle, q and k
    turn by the angle Theta turned since the chunk's start (module docstring) and the state by the chunk's total.
    """
    T = q.shape[1]
    if g is not None:  # the within-chunk cumulative log-gate, [B, N, C, H, 1 or Dk], and as [B, H, N, C, ..] (a view)
        G_tokens = (F.pad(g, (0, 0, 0, 0, 0, (-T) % C)) if T % C else g).unflatten(1, (-1, C)).cumsum(2)
        G = G_tokens.permute(0, 3, 1, 2, 4)
    plain = theta is None and u is None
    # the blocks over which one reference point factors the decays: the vector gate's scores' leaves, or whole chunks
    leaf = _leaf_size(G) if g is not None and (vector or plain) else None
    if plain and g is None:
        return _Plain.apply(q, k, v, s0, C)
    if plain and leaf == C > 1:  # (one token a chunk: _leaf_size checks no span, and the blocked path needs none)
        return _Plain.apply(q, k, v, s0, C, G_tokens.flatten(1, 2))
    qc, kc, vc = to_chunks(q, C), to_chunks(k, C), to_chunks(v, C)  # [B, H, N, C, D]
    B, H, N = qc.shape[:3]
    turns = [None] * N
    framed = _identity  # the complex gate's frame of the chunk's start: x -> [x cos Theta, -x sin Theta]
    if theta is not None:
        Theta = to_chunks(theta, C).cumsum(-2)
        cos, sin = Theta.cos(), Theta.sin()
        turns = list(zip(cos[..., -1, :].unbind(2), sin[..., -1, :].unbind(2)))
        framed = functools.partial(_framed, cos=cos, minus_sin=-sin)
    # j <= i, or j < i with the diagonal (the newest association, weighted by u) added on its own
    mask = causal_mask(C, q.device) if u is None else causal_mask(C, q.device).tril(-1)
    if g is None:
        q_in, k_in = framed(qc), framed(kc)
        scores = (q_in @ k_in.transpose(-1, -2)).masked_fill(~mask, 0.0)
        chunk_decay = None
        updates = k_in.transpose(-1, -2) @ vc  # [B, H, N, Dk, Dv]
    else:
        G = G.contiguous()
        # the decay a query has seen: up to i, or up to i - 1 (the same floats as G_{i-1}: exp(G_{i-1} - G_{i-1}) = 1)
        G_read = G if u is None else F.pad(G[..., :-1, :], (0, 0, 1, 0))
        G_last = G[..., -1:, :]
        q_in = framed(qc * torch.exp(G_read))  # start state -> token i
        chunk_decay = torch.exp(G_last).transpose(-1, -2)  # [B, H, N, 1 or Dk, 1]: rows of the state
        if theta is not None and vector:  # the real and imaginary rows decay alike
            chunk_decay = chunk_decay.repeat(1, 1, 1, 2, 1)
        scores, leaf, k_start = _gated_scores(qc, kc, q_in, G, G_read, mask, vector, u, framed, leaf)
        if k_start is not None:  # exp(G_last - G_j) = exp(G_last) exp(-G_j)
            updates = chunk_decay * (k_start.transpose(-1, -2) @ vc)
        else:
            updates = framed(kc * torch.exp(G_last - G)).transpose(-1, -2) @ vc  # token j -> end of chunk
    if u is not None and leaf in (None, C):  # the scores above leave the diagonal to u
        scores = scores + torch.diag_embed(_newest(qc, kc, u))
    o = scores @ vc
    state = updates.new_zeros(updates[:, :, 0].shape) if s0 is None else s0
    if theta is None:
        starts, state = decayed_states(updates, chunk_decay, state)
    else:  # each chunk's state turns too
        starts = []
        # unbind once: indexing inside the loop would make backward build a full-size zero gradient per chunk
        decays = [None] * N if chunk_decay is None else chunk_decay.unbind(2)
        for update, decay, turn in zip(updates.unbind(2), decays, turns):
            starts.append(state)
            state = _rotate(state + update if decay is None else state * decay + update, *turn)
        starts = torch.stack(starts, dim=2)
    o = o + q_in @ starts
    return from_chunks(o, T), state


def _plain_reference(q: Tensor, k: Tensor, v: Tensor, s0: Tensor | None, C: int,
                     G: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """_Plain in autograd ops, the state passed chunk by chunk (for gradients of gradients: written_out)."""
    B, T, H, Dk = q.shape
    Q, K, V = (to_chunk_major(x, C) for x in (q, k, v))
    N = Q.shape[0] // (B * H)
    decay = None
    if G is not None:
        Gc = to_chunk_major(G, C)
        Q, K, decay = Q * torch.exp(Gc), K * torch.exp(-Gc), torch.exp(Gc[:, -1:]).view(N, B * H, -1, 1)
    updates = (K.transpose(-1, -2) @ V).view(N, B * H, Dk, -1)
    S = Q.new_zeros(updates.shape[1:]) if s0 is None else s0.reshape(updates.shape[1:])
    starts = []
    for n in range(N):
        starts.append(S)
        S = S + updates[n] if decay is None else (S + updates[n]) * decay[n]
    o = (Q @ K.transpose(-1, -2)).tril() @ V + Q @ torch.stack(starts).flatten(0, 1)
    return from_chunk_major(o, B, T, H), S.view(B, H, Dk, -1)


class _Plain(torch.autograd.Function):
    """The chunk form with its backward written out, chunk-major ([N * B * H, C, D]: to_chunk_major), ungated or with
    a gate whose decay within each chunk factors through the chunk's start (_leaf_size(G) == C): with G the
    within-chunk cumulative log-gate, exp(G_i - G_j) = exp(G_i) exp(-G_j), the second <= exp(SPAN), so the form is
    the ungated one on Q = q exp(G), K = k exp(-G) (G = 0 without a gate), with d = exp(G_last) decaying the state
    between chunks and each chunk's associations on their way to its end. With A = tril(Q K^T) per chunk and the
    starts S_{n+1} = d_n (S_n + K_n^T V_n),
        O_n = A_n V_n + Q_n S_n,
    and backward, with R_n = dS_n + d_n R_{n+1} (R_N = dS_N, dS_n = Q_n^T dO_n) the gradient reaching S_n and
    R'_n = d_n R_{n+1} the one reaching chunk n's associations,
        dA = tril(dO V^T),  dQ = dA K + dO S^T,  dK = dA^T Q + V R'^T,  dV = A^T dO + K R',  dS_0 = R_0,
        dd_n = <S_n + K_n^T V_n, R_{n+1}> = <S_n, R_{n+1}> + sum_j K_j * (V R_{n+1}^T)_j   (by the rows d scales),
        dG = dQ * Q - dK * K, and dd d more at each chunk's last token.
    Every product is batched over all chunks; the two passes over chunks are in-place prefix sums (carry_) of
    [B * H, Dk, Dv] blocks, so no per-chunk product, stack or autograd node is made: at D = 128 the state's blocks
    are the largest tensors, and each pass over them is memory-bound."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, s0: Tensor | None, C: int,
                G: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """G: the within-chunk cumulative log-gate [B, N * C, H, 1 or Dk] (padded as the gates were), or None."""
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        Q, K, V = (to_chunk_major(x, C) for x in (q, k, v))
        N = Q.shape[0] // (B * H)
        grow = decay = None
        if G is not None:
            grow = torch.exp(to_chunk_major(G, C))                   # exp(G) [N * B * H, C, 1 or Dk]; kept for dq, dk
            Q, K = Q * grow, K / grow
            decay = grow[:, -1:].reshape(N, B * H, -1, 1)            # [N, B * H, 1 or Dk, 1]: the state's rows
        A = torch.bmm(Q, K.transpose(-1, -2)).tril_()
        starts = Q.new_empty(N + 1, B * H, Dk, Dv)
        if s0 is None:
            starts[0].zero_()
        else:
            starts[0].copy_(s0.reshape(B * H, Dk, Dv))
        torch.bmm(K.transpose(-1, -2), V, out=starts[1:].view(-1, Dk, Dv))
        if decay is not None:
            starts[1:].mul_(decay)
        carry_(starts, decay)
        o = torch.bmm(A, V).baddbmm_(Q, starts[:N].view(-1, Dk, Dv))
        ctx.save_for_backward(Q, K, V, A, starts, grow, decay)
        ctx.shape, ctx.inputs = (B, T, H), (q, k, v, s0, C, G)
        return from_chunk_major(o, B, T, H), starts[N].view(B, H, Dk, Dv).clone()

    @staticmethod
    @written_out(_plain_reference)
    def backward(ctx, do: Tensor, dstate: Tensor) -> tuple[Tensor | None, ...]:
        Q, K, V, A, starts, grow, decay = ctx.saved_tensors
        B, T, H = ctx.shape
        C, Dk, Dv = K.shape[1], K.shape[2], V.shape[2]
        N = starts.shape[0] - 1
        dO = to_chunk_major(do, C)
        dA = torch.bmm(dO, V.transpose(-1, -2)).tril_()
        dQ = torch.bmm(dA, K).baddbmm_(dO, starts[:N].view(-1, Dk, Dv).transpose(-1, -2))
        R = Q.new_empty(N + 1, B * H, Dk, Dv)
        R[N].copy_(dstate.reshape(B * H, Dk, Dv))
        torch.bmm(Q.transpose(-1, -2), dO, out=R[:N].view(-1, Dk, Dv))
        carry_(R, decay, reverse=True)
        after = R[1:].view(-1, Dk, Dv)  # R_{n+1}: what reaches the state each chunk's associations join
        dV = torch.bmm(A.transpose(-1, -2), dO)
        dK = torch.bmm(dA.transpose(-1, -2), Q)
        ds0 = R[0].view(B, H, Dk, Dv).clone() if ctx.needs_input_grad[3] else None
        if decay is None:
            dK.baddbmm_(V, after.transpose(-1, -2))
            dV.baddbmm_(K, after)
            return (*(from_chunk_major(x, B, T, H) for x in (dQ, dK, dV)), ds0, None, None)
        d = decay.view(-1, 1, decay.shape[-2])                      # [N * B * H, 1, 1 or Dk]
        VR = torch.bmm(V, after.transpose(-1, -2))                  # [.., C, Dk]: V R_{n+1}^T
        dd = dot(starts[:N].view_as(after), after)[:, None] + (K * VR).sum(-2, keepdim=True)
        dK.addcmul_(VR, d)
        dV.baddbmm_(K, after * d.transpose(-1, -2))
        dG = (dQ * Q).addcmul_(dK, K, value=-1)
        if grow.shape[-1] == 1:  # a scalar gate: one per token, over every channel
            dG, dd = dG.sum(-1, keepdim=True), dd.sum(-1, keepdim=True)
        dG[:, -1:] += dd * d
        dq, dk = dQ.mul_(grow), dK.div_(grow)  # dQ, dK: fresh, and done with
        return (*(from_chunk_major(x, B, T, H) for x in (dq, dk, dV)), ds0, None,
                from_chunk_major(dG, B, N * C, H))


def _gated_scores(qc: Tensor, kc: Tensor, q_in: Tensor, G: Tensor, R: Tensor, mask: Tensor, vector: bool,
                  u: Tensor | None, framed: Callable[[Tensor], Tensor] | None = None, leaf: int | None = None
                  ) -> tuple[Tensor, int | None, Tensor | None]:
    """A chunk's decayed scores sum_d q_id k_jd exp(R_id - G_jd) on `mask` (the pairs j of query i: causal or a band;
    without the diagonal where a bonus u weighs it, which the caller adds), chunks [..., C, D], q_in = q exp(R)
    (framed). Returns (scores, the vector gate's leaf (None for a scalar gate), k exp(-G) where the chunk's start is
    every pair's reference (leaf == C), else None)."""
    framed = framed or _identity
    leaf = (leaf or _leaf_size(G)) if vector else None
    if leaf == qc.shape[-2]:  # exp(R_i - G_j) = exp(R_i) exp(-G_j), the second <= exp(SPAN)
        k_start = framed(kc * torch.exp(-G))
        return (q_in @ k_start.transpose(-1, -2)).masked_fill(~mask, 0.0), leaf, k_start
    qf, kf = framed(qc), framed(kc)
    if not vector:
        return (qf @ kf.transpose(-1, -2)) * masked_exp(R[..., :, None, 0] - G[..., None, :, 0], mask), None, None
    if qf.shape[-1] != qc.shape[-1]:  # a complex frame: the real and imaginary channels decay alike
        G, R = G.repeat(1, 1, 1, 1, 2), R.repeat(1, 1, 1, 1, 2)
    own = mask | torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)  # the leaves fill the diagonal too
    return _vector_gate_scores(qf, kf, G, R, _newest(qf, kf, u), leaf).masked_fill(~own, 0.0), leaf, None


def _identity(x: Tensor) -> Tensor:
    return x


def _framed(x: Tensor, cos: Tensor, minus_sin: Tensor) -> Tensor:
    """x [..., C, D] in the frame of its chunk's start, [x cos Theta, -x sin Theta] (module docstring)."""
    return torch.cat([x * cos, x * minus_sin], dim=-1)


def _newest(q: Tensor, k: Tensor, u: Tensor | None) -> Tensor:
    """The scores' diagonal: the newest association, weighted by u (RWKV-6's bonus) or 1. [..., C, D] -> [..., C]."""
    return (q * k).sum(-1) if u is None else (q * u[:, None, None, :] * k).sum(-1)


SMALL_BLOCK = 1  # blocks of one token: a dot product each
# How far one reference point may be from the cumulative log-gates it factors: exp(+-SPAN) stays far inside the
# dtype's normal range, so q exp(R - G_ref) and k exp(G_ref - G) neither overflow nor lose precision
SPAN = {torch.float32: 40.0, torch.float64: 300.0}


def _leaf_size(G: Tensor) -> int:
    """The largest block of c = 2^m tokens (c <= C) over which every channel's log-gates sum to at least -SPAN:
    within such a block one reference point factors every pair's decay exactly. G: [..., C, D] cumulative."""
    c, span, G = G.shape[-2], SPAN[G.dtype], G.detach()
    if torch.compiler.is_compiling():  # the size is read back from the gates, which a graph cannot hold
        return SMALL_BLOCK
    while c > 1:
        ends = G[..., c - 1::c, :]
        if float((F.pad(ends[..., :-1, :], (0, 0, 1, 0)) - ends).amax()) <= span:
            break
        c //= 2
    return c


def _vector_gate_scores(q: Tensor, k: Tensor, G: Tensor, R: Tensor, diagonal: Tensor, leaf: int) -> Tensor:
    """A_ij = sum_d q_id k_jd exp(R_id - G_jd) for j < i, and `diagonal` for j = i, within a chunk of C = 2^n
    tokens, without overflow. R is G, or G_{i-1} (RWKV-6's bonus: the query has not yet decayed by its gate).

    Within each leaf block of `leaf` tokens (_leaf_size) the decay factors through the cumulative log-gate G_s
    before the block: exp(R_i - G_j) = exp(R_i - G_s) exp(G_s - G_j), the first <= 1, the second <= exp(SPAN),
    so the block is one matrix product. Above the leaves the blocks are built bottom-up by halving: a block
    [[L, 0], [X, R]] of 2h tokens has its cross part X (right half attending to left half) factor through the
    left half's last token m:
        exp(R_i - G_j) = exp(R_i - G_m) exp(G_m - G_j),   both <= 1 (R_i is G_i or G_{i-1}, i - 1 >= m),
    so X is one matrix product, and no C x C x D tensor is ever formed. Every pair j < i lies in exactly one
    leaf or cross block, so the backward is the same products with dA in the place of A (_GatedScores).
    """
    return _GatedScores.apply(q, k, G, None if R is G else R, diagonal, leaf)  # one tensor, one input (compile)


def _halves(x: Tensor, h: int) -> tuple[Tensor, Tensor]:
    """[..., C, D] -> its blocks of 2h tokens' left and right halves, [..., C / 2h, h, D] each (views)."""
    return x.unflatten(-2, (-1, 2, h)).unbind(-3)


def _cross_blocks(A: Tensor, h: int) -> Tensor:
    """The cross parts X (rows of each 2h-block's right half, columns of its left half) of A [..., C, C], as a view
    [..., h, h, C / 2h]."""
    nb = A.shape[-1] // (2 * h)
    return A.unflatten(-1, (nb, 2, h)).unflatten(-4, (nb, 2, h)).diagonal(dim1=-6, dim2=-3)[..., 1, :, 0, :, :]


def _leaf_blocks(A: Tensor, c: int) -> Tensor:
    """The diagonal blocks of c tokens of A [..., C, C], as a view [..., c, c, C / c]."""
    nb = A.shape[-1] // c
    return A.unflatten(-1, (nb, c)).unflatten(-3, (nb, c)).diagonal(dim1=-4, dim2=-2)


def _cross_factors(q: Tensor, k: Tensor, G: Tensor, R: Tensor, h: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q_right, k_left and their decays exp(R_right - G_m), exp(G_m - G_left), [..., C / 2h, h, D]: both <= 1."""
    (_, q_right), (k_left, _), (G_left, _), (_, R_right) = (_halves(x, h) for x in (q, k, G, R))
    G_m = G_left[..., h - 1:, :]
    return q_right, k_left, torch.exp(R_right - G_m), torch.exp(G_m - G_left)


def _leaf_factors(q: Tensor, k: Tensor, G: Tensor, R: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k in blocks of c tokens [..., C / c, c, D] and their decays exp(R - G_s) <= 1, exp(G_s - G) <= exp(SPAN),
    with G_s the cumulative log-gate before each block (0 for the first)."""
    q, k, G, R = (x.unflatten(-2, (-1, c)) for x in (q, k, G, R))
    G_s = F.pad(G[..., :-1, -1:, :], (0, 0, 0, 0, 1, 0))
    return q, k, torch.exp(R - G_s), torch.exp(G_s - G)


class _GatedScores(torch.autograd.Function):
    """_vector_gate_scores with its backward written out: per leaf and level, dX (dA's block) takes the forward's
    two products in reverse, dq~ = dX k~ and dk~ = dX^T q~, and the factors' exponents pass them on:
    dq = dq~ exp(R - G_m), dR = dq~ q~, dk = dk~ exp(G_m - G), dG = -dk~ k~, and the reference G_m (G_s) gets
    the sum of both."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, G: Tensor, R: Tensor | None, diagonal: Tensor, leaf: int) -> Tensor:
        ctx.save_for_backward(q, k, G, R)
        ctx.leaf = leaf
        R = G if R is None else R  # None: R is G
        A = torch.diag_embed(diagonal)
        C = q.shape[-2]
        if leaf > 1:
            q_b, k_b, q_decay, k_decay = _leaf_factors(q, k, G, R, leaf)
            block = ((q_b * q_decay) @ (k_b * k_decay).transpose(-1, -2)).tril(-1)
            _leaf_blocks(A, leaf).add_(block.movedim(-3, -1))
        h = leaf
        while h < C:
            q_right, k_left, q_decay, k_decay = _cross_factors(q, k, G, R, h)
            q_t, k_t = q_right * q_decay, k_left * k_decay
            cross = (q_t * k_t).sum(-1, keepdim=True) if h <= SMALL_BLOCK else q_t @ k_t.transpose(-1, -2)
            _cross_blocks(A, h).copy_(cross.movedim(-3, -1))
            h *= 2
        return A

    @staticmethod
    def backward(ctx, dA: Tensor) -> tuple[Tensor | None, ...]:
        q, k, G, R = ctx.saved_tensors
        shared, R = R is None, G if R is None else R
        leaf = ctx.leaf
        dq, dk, dG, dR = (torch.zeros_like(x) for x in (q, k, G, R))
        C = q.shape[-2]
        if leaf > 1:
            q_b, k_b, q_decay, k_decay = _leaf_factors(q, k, G, R, leaf)
            q_t, k_t = q_b * q_decay, k_b * k_decay
            dX = _leaf_blocks(dA, leaf).movedim(-1, -3).tril(-1)
            dq_t, dk_t = dX @ k_t, dX.transpose(-1, -2) @ q_t
            dR_t, dG_t = dq_t * q_t, dk_t * k_t
            dq.unflatten(-2, (-1, leaf)).add_(dq_t * q_decay)
            dk.unflatten(-2, (-1, leaf)).add_(dk_t * k_decay)
            dR.unflatten(-2, (-1, leaf)).add_(dR_t)
            dG_b = dG.unflatten(-2, (-1, leaf))
            dG_b.sub_(dG_t)
            dG_b[..., :-1, -1, :] += (dG_t.sum(-2) - dR_t.sum(-2))[..., 1:, :]  # the reference G_s of the next block
        h = leaf
        while h < C:
            q_right, k_left, q_decay, k_decay = _cross_factors(q, k, G, R, h)
            q_t, k_t = q_right * q_decay, k_left * k_decay
            dX = _cross_blocks(dA, h).movedim(-1, -3)  # [..., nb, h, h]
            if h <= SMALL_BLOCK:
                dq_t, dk_t = dX * k_t, dX * q_t
            else:
                dq_t, dk_t = dX @ k_t, dX.transpose(-1, -2) @ q_t
            dR_t, dG_t = dq_t * q_t, dk_t * k_t  # the exponents' gradients: + for R and G_m in q~, - for G in k~
            (_, dq_right), (dk_left, _), (dG_left, _), (_, dR_right) = (_halves(x, h) for x in (dq, dk, dG, dR))
            dq_right += dq_t * q_decay
            dk_left += dk_t * k_decay
            dR_right += dR_t
            dG_left -= dG_t
            dG_left[..., h - 1, :] += dG_t.sum(-2) - dR_t.sum(-2)
            h *= 2
        if shared:
            return dq, dk, dG + dR, None, dA.diagonal(dim1=-2, dim2=-1), None
        return dq, dk, dG, dR, dA.diagonal(dim1=-2, dim2=-1), None
