"""flash-linear-attention's op API (`fla.ops`) on ttr's pure-PyTorch ops: code written against fla, whose
kernels need Triton and a GPU, runs unchanged on any device, CPU included.

Mirrors fla-core 0.6.0 (the PyPI release; each op checked against its source): the same names, parameters
(names, order, defaults), returns and shapes. Shared conventions, as fla:
- q, k [B, T, H, K], v [B, T, H, V]; o [B, T, H, V] in the input dtype; states [N, H, K, V], in float32
  (float64 for float64 inputs, which no fla kernel takes), N = B, or N sequences packed by
  cu_seqlens [N + 1] into one row (B == 1), each starting from its own initial state.
- scale defaults to K^-1/2 (MesaNet: none, q is read as is). Gates are logs, alpha = exp(g), applied to the
  state before the token's write. use_qk_l2norm_in_kernel normalizes q and k as fla does,
  x / sqrt(||x||^2 + 1e-6) (ttr's own l2 feature clamps the norm instead: another number), and the scale
  multiplies q after it.
- fused_recurrent_* run ttr's token-by-token form (mode="recurrent"), chunk_* its chunkwise form: the same
  sums in another order, as in fla. `reverse` scans each sequence from its end (the inputs are reversed in
  time per sequence around the forward op). `state_v_first` (and its deprecated alias
  transpose_state_layout) stores states [N, H, V, K]. Where fla takes `chunk_size` in **kwargs it sets ttr's
  chunk size; cu_seqlens_cpu and chunk_indices are fla's tiling hints, derived here from cu_seqlens.
- What ttr cannot honor raises ValueError naming the argument: head_first (removed in fla too), unknown
  **kwargs (which fla drops silently), value-side gates gv, per-channel gates gk on the delta rule,
  cp_context, log-gates > 0, and the delta rule's beta ||k||^2 > 2 (ttr keeps its step a contraction).

Op mapping (S_t the [K, V] state of one head):
chunk_linear_attn, fused_recurrent_linear_attn -> ttr.ops.linear_attention without gate:
    S_t = S_{t-1} + k_t v_t^T, o_t = S_t^T (scale q_t). fla's normalize is not ttr's normalize=True (which
    needs non-negative features and folds the initial state into the normalizer): it divides by
    scale q_t . z_t + 1e-10 with z_t = z_0 + sum_{s<=t} k_s (sum_{s>=t} when reverse), the initial kv state
    counting in the numerator only. ttr computes the denominator as one more value column of ones; the state is
    then the pair (S [N, H, K, V] or None unless output_final_state, z [N, 1, H, K] in k's dtype), returned
    whenever normalize=True, and initial_state may be such a pair (a bare tensor is S with z_0 = 0).
chunk_simple_gla, fused_recurrent_simple_gla -> linear_attention with the scalar log-gate g [B, T, H] and/or
    the fixed g_gamma [H] (both given: both apply, as fla).
chunk_gla, fused_recurrent_gla -> linear_attention with the vector log-gate g / gk [B, T, H, K] (decays the
    state's rows).
chunk_retention, fused_recurrent_retention -> simple GLA with fla's fixed per-head decay
    g_gamma_h = log(1 - 2^(-5 - h)), computed in float32 as fla does.
chunk_rwkv6, fused_recurrent_rwkv6 -> linear_attention with the vector log-gate w [B, T, H, K] and RWKV-6's
    bonus u [H, K] (r is fla's name for q): o_t = (S_{t-1} + diag(u) k_t v_t^T)^T (scale q_t), then
    S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T; token t reads the state before its own gate and write (the
    initial state undecayed), its own association weighted by u. As in fla, only the fused recurrent form
    takes `reverse`, and neither takes state_v_first.
chunk_delta_rule, fused_recurrent_delta_rule, chunk_gated_delta_rule, fused_recurrent_gated_delta_rule ->
    ttr.ops.delta_rule: S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T (scale q_t),
    g [B, T, HV] a log-gate (decay first, then the delta step at the decayed state). beta is [B, T, H] for the
    chunk forms (fla's chunk_delta_rule requires it) and may be [B, T, H, V] for the fused recurrent ones
    (one beta per value channel: each channel is its own delta rule, run as its own head); beta=None is all
    ones. GVA: v with HV = G H heads, value head j reading q/k head j // G. The gated forms' extras as fla:
    use_gate_in_kernel g -> -exp(A_log) softplus(g + dt_bias); use_beta_sigmoid_in_kernel beta -> sigmoid(beta),
    times 2 with allow_neg_eigval.
chunk_mesa_net -> ttr.ops.mesa with scale=1 (MesaNet reads the memory at q itself) and the exact solve:
    H_kk,t = alpha_t H_kk,t-1 + beta_t k_t k_t^T, H_kv,t likewise with v, o_t = H_kv,t^T (H_kk,t + diag(lamb))^-1 q_t,
    lamb [H, K]; returns (o, h_kk [N, H, K, K], h_kv [N, H, K, V]), or (o, None, None). fla solves by
    max_CG_iteration steps of plain conjugate gradients from x = 0 (with 1e-5 added to each step's
    denominators), an approximation of this solve that its own tests hold to fla's naive_mesa_net_exact;
    ttr's CG (Jacobi-preconditioned, started from the Jacobi guess) takes other steps, so its iterates would
    not be fla's either. The exact solve is the number fla's kernel converges to; max_CG_iteration is checked
    (an int >= 0) and otherwise has no effect. fla also rounds q and k to float16 in that kernel; not here.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops

__all__ = [
    "chunk_delta_rule", "chunk_gated_delta_rule", "chunk_gla", "chunk_linear_attn", "chunk_mesa_net",
    "chunk_retention", "chunk_rwkv6", "chunk_simple_gla", "fused_recurrent_delta_rule",
    "fused_recurrent_gated_delta_rule", "fused_recurrent_gla", "fused_recurrent_linear_attn",
    "fused_recurrent_retention", "fused_recurrent_rwkv6", "fused_recurrent_simple_gla",
]

L2NORM_EPS = 1e-6      # fla's l2norm: x / sqrt(||x||^2 + eps)
NORMALIZE_EPS = 1e-10  # fla's normalized linear attention: o / (scale q . z + eps)


# ---------------------------------------------------------------------------------------------------------
# shared pieces


def _scale(scale: float | None, k: Tensor) -> float:
    return k.shape[-1] ** -0.5 if scale is None else scale


def _state_dtype(x: Tensor) -> torch.dtype:
    """fla keeps states in float32; float64 inputs keep float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _l2norm(x: Tensor) -> Tensor:
    """fla's in-kernel l2norm, computed in float32 at least and returned in x's dtype."""
    y = x.to(_state_dtype(x))
    return (y * torch.rsqrt((y * y).sum(-1, keepdim=True) + L2NORM_EPS)).to(x.dtype)


def _check_kwargs(op: str, kwargs: dict[str, Any], known: tuple[str, ...] = ()) -> None:
    """fla's **kwargs: head_first is gone (fla raises too); the known extras are read by the caller; anything
    else fla would drop silently, so it is refused here."""
    if "head_first" in kwargs:
        raise ValueError(f"{op}: head_first has been removed, inputs are [B, T, H, ...]; got head_first="
                         f"{kwargs['head_first']!r}")
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(f"{op}: unsupported keyword argument(s) {unknown}")


def _v_first(op: str, state_v_first: bool, kwargs: dict[str, Any]) -> bool:
    """state_v_first, or its deprecated alias transpose_state_layout (as fla)."""
    if "transpose_state_layout" not in kwargs:
        return state_v_first
    if state_v_first:
        raise ValueError(f"{op}: got both state_v_first and the deprecated transpose_state_layout")
    warnings.warn("`transpose_state_layout` is deprecated and renamed to `state_v_first`.", DeprecationWarning,
                  stacklevel=3)
    return bool(kwargs["transpose_state_layout"])


def _chunk_size(op: str, kwargs: dict[str, Any], choices: tuple[int, ...] | None = None) -> int:
    """fla's optional chunk_size keyword (None: its default); ttr checks it is a power of two."""
    size = kwargs.get("chunk_size")
    if size is None:
        return 64
    if choices is not None and size not in choices:
        raise ValueError(f"{op}: chunk_size must be one of {choices}, got {size!r}")
    return size


def _shape(op: str, name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    """A shape check for tensors this module reshapes itself (ttr checks what it receives)."""
    if tuple(x.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(x.shape)}")


def _time_reversal(T: int, cu_seqlens: Tensor | None, device: torch.device) -> Tensor:
    """The token order that reverses every sequence in place (an involution)."""
    pos = torch.arange(T, device=device)
    if cu_seqlens is None:
        return pos.flip(0)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    # clamped so that malformed cu_seqlens reach ttr's check (a ValueError) rather than an IndexError here
    seq = (torch.searchsorted(cu, pos, right=True) - 1).clamp(0, cu.numel() - 2)
    return (cu[seq] + cu[seq + 1] - 1 - pos).clamp(0, max(T - 1, 0))


def _gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, *, scale: float | None,
         initial_state: Tensor | None, output_final_state: bool, cu_seqlens: Tensor | None, mode: str,
         reverse: bool = False, state_v_first: bool = False, chunk_size: int = 64,
         bonus: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = S_t^T (scale q_t), g a log-gate [B, T, H] or [B, T, H, K].
    With RWKV-6's bonus u [H, K]: o_t = (S_{t-1} + diag(u) k_t v_t^T)^T (scale q_t) instead."""
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    if reverse:
        order = _time_reversal(q.shape[1], cu_seqlens, q.device)
        q, k, v, g = (None if x is None else x[:, order] for x in (q, k, v, g))
    o, state = ops.linear_attention(q, k, v, g, scale=_scale(scale, k), bonus=bonus, initial_state=initial_state,
                                    output_final_state=output_final_state, mode=mode, chunk_size=chunk_size,
                                    cu_seqlens=cu_seqlens)
    if reverse:
        o = o[:, order]
    if state is not None:
        state = state.to(_state_dtype(q))
        state = state.transpose(-1, -2) if state_v_first else state
    return o, state


def _head_gate(g: Tensor | None, g_gamma: Tensor | None, q: Tensor) -> Tensor | None:
    """simple GLA's log-gate: g [B, T, H] per token plus g_gamma [H] fixed per head."""
    if g_gamma is None:
        return g
    gamma = g_gamma.to(_state_dtype(q)).expand(q.shape[:3])
    return gamma if g is None else g.to(gamma.dtype) + gamma


def _retention_gamma(q: Tensor) -> Tensor:
    """RetNet's per-head decay log(1 - 2^(-5 - h)), in float32 as fla computes it."""
    return (1 - 2.0 ** (-5.0 - torch.arange(q.shape[2], dtype=torch.float32, device=q.device))).log()


def _linear_attn(op: str, q: Tensor, k: Tensor, v: Tensor, scale: float | None,
                 initial_state: Tensor | tuple[Tensor | None, Tensor | None] | None, output_final_state: bool,
                 normalize: bool, cu_seqlens: Tensor | None, mode: str, reverse: bool = False) -> tuple[Tensor, Any]:
    """Plain linear attention, fla's normalize included (module docstring)."""
    if not normalize:
        if isinstance(initial_state, tuple):
            raise ValueError(f"{op}: initial_state is the pair (kv_state, z_state) only with normalize=True; "
                             "pass the kv state [N, H, K, V]")
        return _gla(q, k, v, None, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                    cu_seqlens=cu_seqlens, mode=mode, reverse=reverse)
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    kv0, z0 = initial_state if isinstance(initial_state, tuple) else (initial_state, None)
    s0 = None
    if kv0 is not None or z0 is not None:  # the denominator's sum rides along as one more value column
        N = (kv0 if kv0 is not None else z0).shape[0]
        kv0 = k.new_zeros(N, H, K, V) if kv0 is None else kv0
        z0 = k.new_zeros(N, 1, H, K) if z0 is None else z0
        _shape(op, "initial_state's kv_state", kv0, (N, H, K, V))
        _shape(op, "initial_state's z_state", z0, (N, 1, H, K))
        dt = _state_dtype(q)
        s0 = torch.cat([kv0.to(dt), z0.to(dt)[:, 0, :, :, None]], dim=-1)
    o, s = _gla(q, k, torch.cat([v, torch.ones_like(v[..., :1])], dim=-1), None, scale=scale, initial_state=s0,
                output_final_state=True, cu_seqlens=cu_seqlens, mode=mode, reverse=reverse)
    o = o[..., :V] / (o[..., V:] + NORMALIZE_EPS)
    return o, (s[..., :V] if output_final_state else None, s[:, None, :, :, V].to(k.dtype))


def _gdn_inputs(op: str, g: Tensor | None, beta: Tensor, use_gate_in_kernel: bool, A_log: Tensor | None,
                dt_bias: Tensor | None, use_beta_sigmoid_in_kernel: bool,
                allow_neg_eigval: bool) -> tuple[Tensor | None, Tensor]:
    """The gated delta rule's in-kernel activations, as fla: the log-gate from raw g and the step from logits."""
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError(f"{op}: allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True")
    if use_gate_in_kernel:
        if A_log is None or g is None:
            raise ValueError(f"{op}: use_gate_in_kernel=True needs the raw g and A_log, got g "
                             f"{'None' if g is None else 'given'}, A_log {'None' if A_log is None else 'given'}")
        dt = _state_dtype(g)
        raw = g.to(dt) if dt_bias is None else g.to(dt) + dt_bias.to(dt)
        g = -torch.exp(A_log.to(dt)) * F.softplus(raw)
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(beta.to(_state_dtype(beta))) * (2.0 if allow_neg_eigval else 1.0)
    return g, beta


def _delta(op: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, *,
           scale: float | None, initial_state: Tensor | None, output_final_state: bool, qk_l2norm: bool,
           cu_seqlens: Tensor | None, mode: str, state_v_first: bool = False,
           chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """The (gated) delta rule on ttr.ops.delta_rule, with fla's GVA, per-value-channel beta and V-first states."""
    scale = _scale(scale, k)
    if qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    if HV % H:
        raise ValueError(f"{op}: v's {HV} heads must be a multiple of q and k's {H} (grouped value attention)")
    if HV != H:  # value head j reads q/k head j // (HV / H)
        q, k = (x.repeat_interleave(HV // H, dim=2) for x in (q, k))
    beta = v.new_ones(B, T, HV) if beta is None else beta
    s0 = initial_state.transpose(-1, -2) if initial_state is not None and state_v_first else initial_state
    per_channel = beta.dim() == 4
    if per_channel:  # each value channel is its own delta rule: channel c of head j becomes head j V + c
        _shape(op, "beta", beta, (B, T, HV, V))
        if s0 is not None:
            _shape(op, "initial_state", s0, (s0.shape[0], HV, K, V))
            s0 = s0.transpose(-1, -2).reshape(-1, HV * V, K, 1)
        q, k = (x.repeat_interleave(V, dim=2) for x in (q, k))
        g = None if g is None else g.repeat_interleave(V, dim=2)
        v, beta = v.reshape(B, T, HV * V, 1), beta.reshape(B, T, HV * V)
    o, state = ops.delta_rule(q, k, v, beta, g, scale=scale, initial_state=s0, output_final_state=output_final_state,
                              mode=mode, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
    if per_channel:
        o = o.reshape(B, T, HV, V)
        state = None if state is None else state.reshape(-1, HV, V, K).transpose(-1, -2)
    if state is not None:
        state = state.to(_state_dtype(q))
        state = state.transpose(-1, -2) if state_v_first else state
    return o, state


# ---------------------------------------------------------------------------------------------------------
# linear attention


def chunk_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state: Tensor | tuple | None = None,
    output_final_state: bool = False,
    normalize: bool = True,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[Tensor, Any]:
    """fla.ops.linear_attn.chunk_linear_attn. Returns (o, final_state), final_state the pair
    (kv_state or None, z_state [N, 1, H, K]) when normalize=True (the default)."""
    return _linear_attn("chunk_linear_attn", q, k, v, scale, initial_state, output_final_state, normalize,
                        cu_seqlens, "chunk")


def fused_recurrent_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state: Tensor | tuple | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    normalize: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[Tensor, Any]:
    """fla.ops.linear_attn.fused_recurrent_linear_attn (normalize defaults to False here, as fla)."""
    return _linear_attn("fused_recurrent_linear_attn", q, k, v, scale, initial_state, output_final_state,
                        normalize, cu_seqlens, "recurrent", reverse)


# ---------------------------------------------------------------------------------------------------------
# simple GLA, GLA, retention


def chunk_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.simple_gla.chunk_simple_gla: g [B, T, H] and/or g_gamma [H] log-gates. kwargs: chunk_size."""
    del cu_seqlens_cpu  # a tiling hint for fla's kernels
    _check_kwargs("chunk_simple_gla", kwargs, ("chunk_size",))
    return _gla(q, k, v, _head_gate(g, g_gamma, q), scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, mode="chunk",
                state_v_first=state_v_first, chunk_size=_chunk_size("chunk_simple_gla", kwargs))


def fused_recurrent_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.simple_gla.fused_recurrent_simple_gla. kwargs: transpose_state_layout (deprecated)."""
    _check_kwargs("fused_recurrent_simple_gla", kwargs, ("transpose_state_layout",))
    return _gla(q, k, v, _head_gate(g, g_gamma, q), scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, mode="recurrent", reverse=reverse,
                state_v_first=_v_first("fused_recurrent_simple_gla", state_v_first, kwargs))


def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: int | None = None,
    initial_state: Tensor = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.gla.chunk_gla: g the per-channel log-gate [B, T, H, K]."""
    del cu_seqlens_cpu  # a tiling hint for fla's kernels
    if g is None or g.dim() != 4:
        raise ValueError(f"chunk_gla: g must be the per-channel log-gate [B, T, H, K], got "
                         f"{None if g is None else list(g.shape)}")
    return _gla(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, mode="chunk", state_v_first=state_v_first)


def fused_recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    scale: int | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.gla.fused_recurrent_gla: gk [B, T, H, K] decays the state's rows; gv (its columns) is refused."""
    _check_kwargs("fused_recurrent_gla", kwargs, ("transpose_state_layout",))
    if gv is not None:
        raise ValueError(f"fused_recurrent_gla: gv (a value-side gate, shape {list(gv.shape)}) is not supported; "
                         "ttr's gates decay the state per key channel only (gk)")
    if gk is not None and gk.dim() != 4:
        raise ValueError(f"fused_recurrent_gla: gk must be the per-channel log-gate [B, T, H, K], "
                         f"got shape {list(gk.shape)}")
    return _gla(q, k, v, gk, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, mode="recurrent", reverse=reverse,
                state_v_first=_v_first("fused_recurrent_gla", state_v_first, kwargs))


def chunk_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.retention.chunk_retention: decay log(1 - 2^(-5 - h)) per head h. kwargs: chunk_size."""
    _check_kwargs("chunk_retention", kwargs, ("chunk_size",))
    return _gla(q, k, v, _head_gate(None, _retention_gamma(q), q), scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, mode="chunk",
                chunk_size=_chunk_size("chunk_retention", kwargs))


def fused_recurrent_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.retention.fused_recurrent_retention. kwargs: transpose_state_layout (deprecated)."""
    _check_kwargs("fused_recurrent_retention", kwargs, ("transpose_state_layout",))
    return _gla(q, k, v, _head_gate(None, _retention_gamma(q), q), scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, mode="recurrent", reverse=reverse,
                state_v_first=_v_first("fused_recurrent_retention", state_v_first, kwargs))


# ---------------------------------------------------------------------------------------------------------
# RWKV-6


def _rwkv6(op: str, r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, *, scale: float | None,
           initial_state: Tensor | None, output_final_state: bool, cu_seqlens: Tensor | None, mode: str,
           reverse: bool = False, chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """RWKV-6 as GLA with a bonus (module docstring); w and u checked here, as fla has no other form of them."""
    if not isinstance(w, Tensor) or w.dim() != 4:
        raise ValueError(f"{op}: w must be the per-channel log decay [B, T, H, K], got "
                         f"{list(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    if not isinstance(u, Tensor):
        raise ValueError(f"{op}: u must be the bonus [H, K], got {type(u).__name__}")
    _shape(op, "u", u, (k.shape[2], k.shape[3]))
    return _gla(r, k, v, w, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, mode=mode, reverse=reverse, chunk_size=chunk_size, bonus=u)


def chunk_rwkv6(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.rwkv6.chunk_rwkv6: r (q) [B, T, H, K], w the log decay [B, T, H, K], u the bonus [H, K].
    kwargs: chunk_size (a power of two)."""
    del cu_seqlens_cpu  # a tiling hint for fla's kernels
    _check_kwargs("chunk_rwkv6", kwargs, ("chunk_size",))
    return _rwkv6("chunk_rwkv6", r, k, v, w, u, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, mode="chunk",
                  chunk_size=_chunk_size("chunk_rwkv6", kwargs))


def fused_recurrent_rwkv6(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.rwkv6.fused_recurrent_rwkv6: r (q) [B, T, H, K], w the log decay [B, T, H, K], u the bonus
    [H, K]."""
    return _rwkv6("fused_recurrent_rwkv6", r, k, v, w, u, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, mode="recurrent", reverse=reverse)


# ---------------------------------------------------------------------------------------------------------
# delta rule, gated delta rule


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.delta_rule.chunk_delta_rule: beta [B, T, H]. kwargs: chunk_size (16, 32 or 64)."""
    del cu_seqlens_cpu  # a tiling hint for fla's kernels
    _check_kwargs("chunk_delta_rule", kwargs, ("chunk_size",))
    if beta.dim() != 3:
        raise ValueError(f"chunk_delta_rule: beta must be [B, T, H], got shape {list(beta.shape)}")
    return _delta("chunk_delta_rule", q, k, v, None, beta, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, qk_l2norm=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens,
                  mode="chunk", chunk_size=_chunk_size("chunk_delta_rule", kwargs, (16, 32, 64)))


def fused_recurrent_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor = None,
    scale: float = None,
    initial_state: Tensor = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.delta_rule.fused_recurrent_delta_rule: beta [B, T, H], [B, T, H, V] or None (ones)."""
    return _delta("fused_recurrent_delta_rule", q, k, v, None, beta, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, qk_l2norm=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens,
                  mode="recurrent")


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    cp_context: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.gated_delta_rule.chunk_gated_delta_rule: g [B, T, HV] log-gate, beta [B, T, HV].
    kwargs: use_gate_in_kernel, A_log, dt_bias, chunk_size (16, 32 or 64), transpose_state_layout (deprecated)."""
    op = "chunk_gated_delta_rule"
    del cu_seqlens_cpu, chunk_indices  # tiling hints for fla's kernels
    _check_kwargs(op, kwargs, ("use_gate_in_kernel", "A_log", "dt_bias", "chunk_size", "transpose_state_layout"))
    if cp_context is not None:
        raise ValueError(f"{op}: cp_context (context parallelism across devices) is not supported, "
                         f"got {type(cp_context).__name__}")
    if beta.dim() != 3:
        raise ValueError(f"{op}: beta must be [B, T, HV], got shape {list(beta.shape)}")
    g, beta = _gdn_inputs(op, g, beta, bool(kwargs.get("use_gate_in_kernel", False)), kwargs.get("A_log"),
                          kwargs.get("dt_bias"), use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return _delta(op, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, qk_l2norm=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens,
                  mode="chunk", state_v_first=_v_first(op, state_v_first, kwargs),
                  chunk_size=_chunk_size(op, kwargs, (16, 32, 64)))


def fused_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    beta: Tensor | None = None,
    scale: float = None,
    initial_state: Tensor = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule: g [B, T, HV] log-gate (or None), beta
    [B, T, HV], [B, T, HV, V] or None (ones). gk and gv (per-channel decays) are refused.
    kwargs: transpose_state_layout (deprecated)."""
    op = "fused_recurrent_gated_delta_rule"
    _check_kwargs(op, kwargs, ("transpose_state_layout",))
    for name, gate in (("gk", gk), ("gv", gv)):
        if gate is not None:
            raise ValueError(f"{op}: {name} (a per-channel decay, shape {list(gate.shape)}) is not supported; "
                             "ttr's delta rule decays by one scalar log-gate g per head")
    beta = v.new_ones(v.shape[:3]) if beta is None else beta
    g, beta = _gdn_inputs(op, g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel,
                          allow_neg_eigval)
    return _delta(op, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, qk_l2norm=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens,
                  mode="recurrent", state_v_first=_v_first(op, state_v_first, kwargs))


# ---------------------------------------------------------------------------------------------------------
# MesaNet


def chunk_mesa_net(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    lamb: Tensor,
    h_kk_init: Tensor | None = None,
    h_kv_init: Tensor | None = None,
    output_final_state: bool = False,
    max_CG_iteration: int = 30,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """fla.ops.mesa_net.chunk_mesa_net: g [B, T, H] log-gate, beta [B, T, H], lamb [H, K] > 0. Returns
    (o, h_kk [N, H, K, K], h_kv [N, H, K, V]), the states None unless output_final_state. Solved exactly:
    max_CG_iteration is checked but has no effect (module docstring)."""
    del cu_seqlens_cpu  # a tiling hint for fla's kernels
    if not isinstance(max_CG_iteration, int) or isinstance(max_CG_iteration, bool) or max_CG_iteration < 0:
        raise ValueError(f"chunk_mesa_net: max_CG_iteration must be an int >= 0, got {max_CG_iteration!r}")
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    init = None
    if h_kk_init is not None or h_kv_init is not None:  # fla starts a missing half from zero
        H, K, V = k.shape[2], k.shape[3], v.shape[3]
        N = (h_kk_init if h_kk_init is not None else h_kv_init).shape[0]
        init = (q.new_zeros(N, H, K, K) if h_kk_init is None else h_kk_init,
                q.new_zeros(N, H, K, V) if h_kv_init is None else h_kv_init)
    o, state = ops.mesa(q, k, v, g, beta, lamb=lamb, scale=1.0, initial_state=init,
                        output_final_state=output_final_state, mode="chunk", solver="exact", cu_seqlens=cu_seqlens)
    if state is None:
        return o, None, None
    dt = _state_dtype(q)
    return o, state[0].to(dt), state[1].to(dt)
