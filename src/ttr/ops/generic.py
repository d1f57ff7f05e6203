"""The generic recurrent executor: any Recipe that defines a regression problem, one token at a time (the whole
sequence: every query at once).

Objective   m_t = argmin_m 1/2 sum_{i in set(t)} gamma_i^(t) || v_i - m(k_i) ||^2   (with each optimizer's own
            reading of it), answer y_t = m_t(scale q_t); set(t) the causal prefix i <= t, a window t - w < i <= t,
            or the whole sequence
Weights     every real weights ingredient: uniform (over any of the three sets), fixed or gated decay per head, per
            key channel (with RWKV-6's bonus), per state entry, mLSTM's exp input gate (with NormalizedGD)
Function    linear in features phi(k), locally constant (kernel weights phi(q)^T phi(k)), local polynomial
            (softmax-kernel weights), RKHS (kernel regression), two-layer MLP
Optimizer   batch GD (n steps, lr), exact (ridge), NormalizedGD, online SGD (learned, implicit, n steps per token),
            mini-batch GD (with momentum); in an RKHS the online ones too (kernel LMS)

`classify(recipe)` is the one table of which combinations run how (Recipe.op, Recipe.forms, `ttr zoo --all`):

  weights x function x optimizer                          class
  ------------------------------------------------------  -----------------------------------------------------
  the fast ops' combinations (ttr.ops, _fast_op below)    chunk: the op
  linear(phi) x BatchGD(n, lr) / Exact(ridge) /           recurrent, statistics: H_kk, H_kv (and the mass z)
    NormalizedGD, or local constant x the same
  linear(phi) or MLP x OnlineSGD / MiniBatchGD            recurrent, online: the weights (and momentum)
  local polynomial / RKHS x Exact / BatchGD, scalar       recurrent, cache: the keys, values and log-weights
    weights
  RKHS x OnlineSGD / MiniBatchGD (kernel LMS)             recurrent, cache: the keys and their coefficients
  a window or the whole sequence, batch optimizers        recurrent, statistics or cache, over the set
  a window with an online optimizer                       not a regression problem (no step can be taken back)
  the whole sequence with an online optimizer             not a regression problem (no order)
  complex gate beyond one unit GD step on a linear memory not a regression problem (no real loss)
  exp input gate beyond NormalizedGD                      not a regression problem (unbounded weight)
  per-channel weights on a kernel, local or MLP fit;      not a regression problem (no such channels / no
    Exact with per-channel weights                          single weighted loss)
  query-dependent weights with an online optimizer        not a regression problem (the fit follows the query)
  MLP x BatchGD (from 0) / Exact / implicit step          not a regression problem (stuck at 0 / non-convex)
  no ridge where the solve needs one                      not a regression problem (ill-posed)
  Nystrom span beyond one whole-sequence GD step          not a regression problem (no such layer defined)

Every well-defined combination runs: no combination of generic.grid() is left without an op.

What the executor carries, per optimizer (S = M^T, [B, H, D_phi, Dv]; x = phi(k), w the association's weight):
  statistics  H_kk = sum gamma x x^T, H_kv = sum gamma x v^T, z = sum gamma x, updated as
                  H_kk <- H_kk diag(a) + w x x^T,  H_kv <- diag(a) H_kv + w x v^T,  z <- a * z + w x
              with a = exp(g) the decay (scalar, per key channel, or per entry: then H_kk is [D_phi, D_phi, Dv], one
              matrix per value column). Per-channel weights weigh each key channel's gradient on its own (as the
              oracle's BatchGD does): the gradient of M at column b is sum_i gamma_ib (M x_i - v_i) x_ib, which is
              M H_kk[:, b] - H_kv[b]^T with H_kk[a, b] = sum_i x_ia gamma_ib x_ib: the columns of H_kk decay, the
              rows of H_kv. Each answer is then the optimizer's, from the statistics alone:
                BatchGD(n, lr):  S_0 = 0, S_{j+1} = S_j - lr (H_kk^T S_j - H_kv),   y = S_n^T q
                Exact(ridge):    S = (H_kk + ridge I)^-1 H_kv (the pseudo-inverse without a ridge: least norm)
                NormalizedGD:    y = H_kv^T q / max(|z^T q|, 1)
              RWKV-6's bonus reads the statistics before this token's decay, with the newest association weighted
              by u per key channel. The local constant fit has weights w_ti = q^T (gamma_i x_i) and so needs only
              U = H_kv^T q and W = z^T q: c = U / (W + ridge), or n steps c <- c - lr (W c - U), or U / max(|W|, 1).
  online      the weights: S for a linear memory (MiniBatchGD: also its mini-batch's first weights, the momentum
              and the place in the mini-batch, as ttr.ops.MiniBatchState), (W1, W2) for the MLP.
  cache       the keys, values and log-weights L_i = G_t - G_i seen, and a solve at each query. Kernel LMS: the keys
              K_j and a coefficient row A_j each, f = sum_j A_j Kern(K_j, .) (mini-batch GD: also the coefficients
              A0 of its mini-batch's first function, 0 on later keys, its place in the mini-batch, the momentum's M).

Association sets (uniform weights; ttr.weights). A window of w tokens: the statistics family carries the ring of the
last w associations (K [rows, H, w, D_phi], V [rows, H, w, Dv], oldest first, zero slots none, as
ops.linear_attention's window) and sums H_kk, H_kv, z over it afresh at every token, O(w) a token. Uniform weights
would let a running sum subtract the association that leaves; that is O(1) but keeps every rounding error for good
(in float32 a large association leaves eps times itself behind, and the errors random-walk with t), and a difference
of prefix sums S_t - S_{t-w} is worse still (it loses digits as t / w grows): of those two, subtracting is the sound
one, and summing the ring is exact to w roundings whatever t. The cache family keeps its last w keys (K, V, L).
Either state is the last w associations, so a sequence fed in pieces equals the sequence fed whole. The whole
sequence: every query reads the statistics, or the cache, of all the tokens; it has no recurrent form (mode="chunk",
its default) and no state (a ValueError says so), and each packed sequence is its own set. An online learner has no
window: its weights sum steps each taken at the weights the earlier ones left, so none can be taken back.

Derivations.
  Online SGD with a gate: the gate is weight decay, applied as its proximal step before the gradient step (Gated
  DeltaNet's order): M' = a * M_{t-1} (scalar, per key channel on the columns of M, or per entry), then
  M_t = M' - beta_t grad l_t(M'). With a scalar gate this is ttr.ops.delta_rule (its docstring maps it to L2 SGD).
  Longhorn with a gate: the same proximal split, M_t = argmin_M 1/2 ||M - M'||^2 + delta/2 ||v - M k||^2, so
  M (I + delta k k^T) = M' + delta v k^T and by Sherman-Morrison M_t = M' (I - beta k k^T) + beta v k^T with
  beta = delta / (1 + delta ||k||^2): Gated DeltaNet's update at Longhorn's step, exact for every decay.
  Momentum on a feature-mapped memory (Titans): the loss is 1/2 ||v - M phi(k)||^2, so its gradient at the
  mini-batch's first weights M_0 is (M_0 phi(k) - v) phi(k)^T: momentum_t = eta_t momentum_{t-1} - theta_t times
  that, M_t = a_t * M_{t-1} + momentum_t; without momentum (TTT) momentum_t = -lr_t grad_t.
  MLP memories: grad W2 = e h^T, grad W1 = ((W2^T e) * gelu'(z)) x^T with z = W1 x, h = gelu(z), e = W2 h - v;
  a scalar gate decays both layers.
  Kernel LMS: the loss 1/2 ||v - f(k)||^2 reads f only through f(k) = <f, Kern(k, .)>_H, so its gradient in the RKHS
  is (f(k) - v) Kern(k, .): with the gate's proximal step first, f' = a f_{t-1}, f_t = f' - beta_t (f'(k_t) - v_t)
  Kern(k_t, .), one new key in the cache with coefficient -beta_t (f'(k_t) - v_t) and every older coefficient times a
  (n steps per token: n keys, each step at the function the previous left). The implicit step
  f_t = argmin_f 1/2 ||f - f'||_H^2 + delta/2 ||v - f(k)||^2: its optimality condition f - f' = delta (v - f(k))
  Kern(k, .) puts f = f' + c Kern(k, .); evaluating at k, c = delta (v - f'(k) - c Kern(k, k)), so
  c = beta (v - f'(k)) with beta = delta / (1 + delta Kern(k, k)): the explicit step at that beta (Longhorn's, with
  Kern(k, k) for ||k||^2). Mini-batch GD takes each gradient at the mini-batch's first function f_0:
  m_t = eta_t m_{t-1} - theta_t (f_0(k_t) - v_t) Kern(k_t, .) (without momentum m_t is that step alone),
  f_t = a_t f_{t-1} + m_t, all of them coefficient vectors on the same cache of keys.

The executor runs in float32 (float64 for float64 inputs), every step a differentiable torch operation, so autograd
runs through the loop. mode="chunk" runs the same recurrence, with a one-time notice per recipe.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import (check_log_gate, check_mode, check_qkv, check_step, compute_dtype, finite_answer,
                       log_gate_as, scale_or)
from ..features import get_feature_map
from .kernel import kern
from .minibatch import MiniBatchState, gelu_derivative
from ._varlen import check_cu_seqlens, run_packed


@dataclass(frozen=True)
class Plan:
    """How a recipe runs: kind "chunk" (op: the fast op), "recurrent" (family: "statistics", "online" or "cache")
    or "undefined" (reason: why it is no regression problem)."""

    kind: str
    op: Callable | None = None
    family: str | None = None
    reason: str = ""

    @property
    def label(self) -> str:
        if self.kind == "chunk":
            return f"chunk ({self.op.func.__name__})"
        if self.kind == "recurrent":
            return "recurrent executor"
        return "not a regression problem: " + self.reason


def classify(recipe) -> Plan:
    """The single table of how each combination of ingredients runs (module docstring)."""
    reason = _undefined(recipe)
    if reason:
        return Plan("undefined", reason=reason)
    fast = _fast_op(recipe)
    if fast is not None:
        return Plan("chunk", op=fast)
    return Plan("recurrent", family=_family_of(recipe))


def _undefined(recipe) -> str:
    """Why a combination defines no regression problem, or "" where it does."""
    from ..oracle import BatchGD, Exact
    from ..recipe import MLP, RKHS, Linear, LocalConstant, LocalPolynomial, MiniBatchGD, NormalizedGD, OnlineSGD
    from ..weights import ComplexGate, EntryGate, ScalarGate, VectorGate
    from ..recipe import Nystrom
    from ..weights import Uniform
    w, r, o = recipe.weights, recipe.regressor, recipe.optimizer
    online = isinstance(o, (OnlineSGD, MiniBatchGD))
    bonus = isinstance(w, VectorGate) and w.bonus
    per_channel = isinstance(w, (VectorGate, EntryGate))
    whole = isinstance(w, Uniform) and not w.causal
    if isinstance(r, Nystrom) and not (whole and isinstance(o, BatchGD) and o.steps == 1 and o.lr == 1.0):
        return ("a Nystrom span (SOFT, Skyformer) is fitted over the whole sequence by one preconditioned step of batch "
                "GD from zero: their papers define no causal form and no other weights or optimizer")
    if whole and online:
        return "an online learner takes the associations in order: the whole sequence at once has none"
    if isinstance(w, Uniform) and w.window is not None and online:
        return ("an online learner's weights are a running sum of steps, each taken where the earlier ones left "
                "them: no step can be taken back w tokens later, so a window defines no online problem")
    unit_step = isinstance(r, Linear) and isinstance(o, BatchGD) and o.steps == 1 and o.lr == 1.0
    local_fit = isinstance(r, LocalConstant) and isinstance(o, Exact) and o.ridge == 0
    if isinstance(w, ComplexGate) and not (unit_step or local_fit):
        return ("complex weights give no real loss to minimize: they define one unit step of batch GD from zero on a "
                "linear memory, read out by its real part (GateLoop, LRU), and the locally constant fit weighted by "
                "their real parts (cosFormer), and nothing else")
    if isinstance(w, ScalarGate) and w.input_gate and not (isinstance(o, NormalizedGD)
                                                           and isinstance(r, (Linear, LocalConstant))):
        return ("the exp input gate exp(i) is an unbounded weight, defined only inside mLSTM's normalized step "
                "(NormalizedGD on a memory linear in key features), whose stabilizer cancels it; weigh inputs by "
                "the step size or MesaNet's beta instead")
    if isinstance(o, NormalizedGD) and not isinstance(r, (Linear, LocalConstant)):
        return ("NormalizedGD divides by the weight mass z^T phi(q) of a memory linear in key features; local "
                "polynomial, kernel and MLP fits have none")
    if per_channel and isinstance(r, (LocalPolynomial, RKHS, MLP)):
        return ("weights per key channel or state entry weigh the channels of a linear memory; local polynomial, "
                "kernel and MLP fits weigh whole associations")
    if (bonus or isinstance(w, EntryGate)) and isinstance(o, NormalizedGD):
        return "NormalizedGD's mass z^T q is one number per query: weights per state entry or a bonus give several"
    if (bonus or isinstance(w, EntryGate)) and isinstance(r, LocalConstant):
        return ("the kernel weight phi(q)^T (gamma * phi(k)) takes a weight per association or per key channel, "
                "not per state entry or a bonus")
    if isinstance(o, Exact) and per_channel:
        return ("Exact needs one weight per association: per-channel weights weigh each key channel's gradient "
                "on its own, which is no single weighted loss to minimize exactly")
    if bonus and online:
        return "RWKV-6's bonus weighs the newest association in a batch fit; an online learner weighs it by its step"
    if isinstance(r, (LocalConstant, LocalPolynomial)) and online:
        return ("the weights depend on the query: the fit is redone around each query, which an online learner "
                "(that never sees the query) cannot do")
    if isinstance(r, MLP) and isinstance(o, BatchGD):
        return "batch GD from zero never leaves zero on an MLP: every gradient vanishes at W = 0"
    if isinstance(r, MLP) and isinstance(o, Exact):
        return "an MLP's loss is not convex: it has no exact minimizer (Newton step) to solve for"
    if isinstance(r, MLP) and isinstance(o, OnlineSGD) and o.step == "implicit":
        return "the implicit (proximal) step has no closed form on an MLP"
    if isinstance(r, LocalPolynomial) and r.order > 0 and isinstance(o, Exact) and o.ridge <= 0:
        return f"{r.describe()} needs a positive ridge on its slope, got {o.ridge}"
    if isinstance(r, RKHS) and isinstance(o, Exact) and o.ridge <= 0:
        return ("kernel regression needs a ridge > 0: without one it interpolates, through a Gram matrix that is "
                "singular wherever the kernel's features are fewer than the associations")
    return ""


def _fast_op(recipe) -> Callable | None:
    """The fast op (chunk and recurrent forms) for this combination, or None: the combinations ttr.ops implement."""
    from .. import ops
    from ..oracle import BatchGD, Exact
    from ..recipe import MLP, RKHS, Linear, LocalConstant, LocalPolynomial, MiniBatchGD, NormalizedGD, OnlineSGD
    from ..weights import FixedDecay, ScalarGate, Uniform, VectorGate
    from ..recipe import Nystrom
    from ..weights import ComplexGate
    r, o, w = recipe.regressor, recipe.optimizer, recipe.weights
    if isinstance(r, Nystrom):  # over the whole sequence only (_undefined)
        fn = ops.soft_attention if r.method == "soft" else ops.skyformer
        return functools.partial(fn, **({} if r.n_landmarks is None else {"n_landmarks": r.n_landmarks}))
    chosen = w.association_set if isinstance(w, Uniform) else {}
    if chosen:  # a window or the whole sequence: linear and softmax attention, and the normalized linear form
        if isinstance(o, BatchGD) and isinstance(r, Linear) and o.steps == 1 and o.lr == 1.0:
            return functools.partial(ops.linear_attention, feature_map=r.feature_map, **chosen)
        if isinstance(o, Exact) and isinstance(r, LocalConstant) and o.ridge == 0.0:
            return functools.partial(ops.linear_attention, feature_map=r.feature_map, normalize=True, **chosen)
        if isinstance(o, Exact) and isinstance(r, LocalPolynomial) and r.order == 0:
            return functools.partial(ops.local_polynomial_attention, order=0, qk_norm=r.qk_norm, **chosen)
        return None
    if isinstance(w, ComplexGate) and isinstance(r, LocalConstant) and isinstance(o, Exact) and o.ridge == 0.0:
        return functools.partial(ops.linear_attention, feature_map=r.feature_map, normalize=True)  # cosFormer
    if isinstance(w, ScalarGate) and w.input_gate:
        ok = isinstance(o, NormalizedGD) and isinstance(r, Linear) and r.feature_map == "identity"
        return functools.partial(ops.mlstm) if ok else None
    if isinstance(o, BatchGD) and isinstance(r, Linear) and o.steps == 1 and o.lr == 1.0:
        return functools.partial(ops.linear_attention, feature_map=r.feature_map)
    if not isinstance(w, (Uniform, FixedDecay, ScalarGate, VectorGate)) or getattr(w, "bonus", False):
        return None
    if isinstance(o, Exact) and isinstance(r, LocalConstant) and o.ridge == 0.0:
        return functools.partial(ops.linear_attention, feature_map=r.feature_map, normalize=True)
    if (isinstance(o, Exact) and isinstance(r, Linear) and r.feature_map == "identity" and o.ridge > 0
            and isinstance(w, (Uniform, ScalarGate))):
        return functools.partial(ops.mesa, lamb=o.ridge)
    if isinstance(o, Exact) and isinstance(r, LocalPolynomial) and isinstance(w, Uniform):
        ridge = {"ridge": o.ridge} if r.order > 0 else {}
        return functools.partial(ops.local_polynomial_attention, order=r.order, qk_norm=r.qk_norm, **ridge)
    if isinstance(o, Exact) and isinstance(r, RKHS) and isinstance(w, Uniform) and o.ridge > 0:
        return functools.partial(ops.kernel_regression, kernel=r.kernel, ridge=o.ridge)
    on_keys = isinstance(r, Linear) and r.feature_map in ("identity", "l2")
    if isinstance(o, OnlineSGD) and on_keys and isinstance(w, (Uniform, ScalarGate)):
        if o.step == "implicit":
            return functools.partial(ops.longhorn, qk_l2norm=r.feature_map == "l2") if isinstance(w, Uniform) else None
        fn = ops.delta_rule if o.steps_per_token == 1 else ops.delta_product
        return functools.partial(fn, qk_l2norm=r.feature_map == "l2")
    if isinstance(o, MiniBatchGD) and (isinstance(w, Uniform) or (o.momentum and isinstance(w, ScalarGate))):
        if o.momentum and on_keys:
            return functools.partial(ops.titans, batch_size=o.batch_size, qk_l2norm=r.feature_map == "l2")
        if isinstance(r, MLP) and not o.momentum:
            return functools.partial(ops.ttt_mlp, batch_size=o.batch_size, qk_l2norm=True)
        if on_keys and not o.momentum:
            return functools.partial(ops.ttt_linear, batch_size=o.batch_size, qk_l2norm=r.feature_map == "l2")
    return None


# ---------------------------------------------------------------------------------------------------------------
# The executor


_NOTIFIED: set = set()


def executor(recipe) -> Callable:
    """The generic recurrent op of a recipe the executor runs (whether or not a fast op exists: tests force it)."""
    from ..recipe import Nystrom
    plan = classify(recipe)
    if plan.kind == "undefined":
        raise ValueError(f"{recipe.describe()}: {plan.label}")
    if isinstance(recipe.regressor, Nystrom):
        raise ValueError(f"{recipe.describe()}: a Nystrom span (SOFT, Skyformer) runs on its fast op only; the "
                         "executor has no family for its preconditioned step")
    return functools.partial(generic_recurrent, recipe=recipe, family=_family_of(recipe))


def _family_of(recipe) -> str:
    """The executor family of a well-defined combination (module docstring)."""
    from ..recipe import RKHS, LocalPolynomial, MiniBatchGD, OnlineSGD
    if isinstance(recipe.regressor, (LocalPolynomial, RKHS)):  # kernel LMS too: a cache of keys, a coefficient each
        return "cache"
    return "online" if isinstance(recipe.optimizer, (OnlineSGD, MiniBatchGD)) else "statistics"


def generic_recurrent(q: Tensor, k: Tensor, v: Tensor, *, recipe, family: str, scale: float | None = None,
                      initial_state: Any = None, output_final_state: bool = False, mode: str | None = None,
                      cu_seqlens: Tensor | None = None, **inputs: Tensor) -> tuple[Tensor, Any]:
    """Runs `recipe`'s optimizer token by token. q [B, T, H, Dk], k [B, T, H, (n,) Dk], v [B, T, H, (n,) Dv] (n steps
    per token for steps_per_token > 1); `inputs` are the per-token tensors recipe.inputs names. Returns (o [B, T, H,
    Dv] in the input dtype, the final state (module docstring) or None). cu_seqlens [N + 1] (B = 1) packs N sequences:
    states are then [N, ...] (a list of N caches for the cache family). mode None: "recurrent", or for the whole
    sequence (causal=False) "chunk", its only form: every answer reads the whole sequence's statistics or keys."""
    whole = not recipe.causal
    mode = ("chunk" if whole else "recurrent") if mode is None else mode
    check_mode(mode, ("chunk", "recurrent"))
    if whole and mode == "recurrent":
        raise ValueError("the whole sequence (causal=False) has no recurrent form: every answer reads tokens not yet "
                         "seen; use mode='chunk'")
    if whole and (initial_state is not None or output_final_state):
        raise ValueError("the whole sequence (causal=False) carries no state between calls (its set is one whole "
                         "sequence): pass initial_state=None, output_final_state=False")
    if mode == "chunk" and not whole and recipe not in _NOTIFIED:
        _NOTIFIED.add(recipe)
        warnings.warn(f"no chunk form exists for {recipe.describe()}: mode='chunk' runs the generic recurrent "
                      "executor token by token", stacklevel=2)
    expected = set(recipe.inputs)
    if set(inputs) != expected:
        raise ValueError(f"{recipe.describe()} takes the inputs {sorted(expected)}, got {sorted(inputs)}")
    g = inputs.get("g")
    rank = {"fixed": 3, "scalar": 3, "vector": 4, "entry": 5}.get(recipe.weights.kind)
    if isinstance(g, Tensor) and g.dim() != rank:
        raise ValueError(f"g must have rank {rank} for {recipe.weights.describe()} weights, got shape {list(g.shape)}")
    n = recipe.steps_per_token
    q4 = q
    if n > 1:
        if k.dim() != 5 or v.dim() != 5 or k.shape[3] != n or v.shape[3] != n:
            raise ValueError(f"k and v must be [B, T, H, {n}, D] for {n} steps per token, got {list(k.shape)}, "
                             f"{list(v.shape)}")
        check_qkv(q, k[:, :, :, 0], v[:, :, :, 0])
    else:
        check_qkv(q, k, v)
    B, T, H, Dk = q4.shape
    cu = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T)
    dt = compute_dtype(q.dtype)
    core = _Core(recipe, family, dt, Dk, inputs.get("bonus"))
    names = [name for name in recipe.inputs if name != "bonus"]
    tensors = [x.to(dt) for x in (q, k, v)] + [_checked(name, inputs[name], B, T, H, Dk, n, v.shape[-1], dt)
                                                for name in names]
    tensors = [tensors[0], tensors[1], tensors[2], q.new_ones(B, T, dtype=dt)] + tensors[3:]
    core.scale = scale_or(scale, core.default_scale(Dk))
    if family != "cache":  # the cache family weighs q against the raw keys itself
        tensors[0] = core.features(tensors[0]) * core.scale
        tensors[1] = core.features(tensors[1])

    def run(*xs: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        return core(xs[0], xs[1], xs[2], xs[3], dict(zip(names, xs[4:])), state)

    if family == "cache" and cu is not None:  # each sequence's cache is its own length: one sequence at a time
        bounds = cu.tolist()
        outs, finals = [], []
        for j in range(len(bounds) - 1):
            a, b = bounds[j], bounds[j + 1]
            state0 = None if initial_state is None else core.state_in(initial_state[j], 1)
            if a == b:
                finals.append(initial_state[j] if initial_state is not None else None)
                continue
            o, st = run(*[x[:, a:b] for x in tensors], state=state0)
            outs.append(o)
            finals.append(core.state_out(st))
        o, final = torch.cat(outs, 1), finals
    elif cu is not None:
        rows = cu.numel() - 1
        o, st = run_packed(lambda *xs: run(*xs[:-1], state=xs[-1]), cu, tensors,
                           core.state_in(initial_state, rows), None)
        final = core.state_out(st)
    else:
        o, st = run(*tensors, state=core.state_in(initial_state, B))
        final = core.state_out(st)
    return finite_answer(f"generic recurrent executor ({recipe.describe()})", o.to(q.dtype)), (
        final if output_final_state else None)


def _checked(name: str, x: Tensor, B: int, T: int, H: int, Dk: int, n: int, Dv: int, dt: torch.dtype) -> Tensor:
    """A per-token input, checked: g a log-gate (scalar, per key channel or per entry), the rest step sizes >= 0."""
    if name == "g":
        check_log_gate(x, B, T, H, x.shape[3] if isinstance(x, Tensor) and x.dim() >= 4 else Dk,
                       Dv=x.shape[4] if isinstance(x, Tensor) and x.dim() == 5 else None)
        return log_gate_as(x, dt)
    if name == "i":
        check_step("i", x.abs(), (B, T, H))  # any real value; finite and of the right shape
        return x.to(dt)
    check_step(name, x, (B, T, H, n) if name == "beta" and n > 1 else (B, T, H),
               upper=1.0 if name == "momentum" else None)
    return x.to(dt)


class _Core:
    """One family's recurrence over a padded batch; `live` [B, T] is 0 at padding (no update, no decay)."""

    def __init__(self, recipe, family: str, dt: torch.dtype, Dk: int, bonus: Tensor | None) -> None:
        from ..oracle import BatchGD, Exact
        from ..recipe import MLP, LocalConstant, MiniBatchGD, NormalizedGD, OnlineSGD
        from ..weights import Uniform
        self.recipe, self.family, self.dt = recipe, family, dt
        self.window = recipe.weights.window if isinstance(recipe.weights, Uniform) else None
        self.whole = not recipe.causal
        r, o = recipe.regressor, recipe.optimizer
        self.local_constant = isinstance(r, LocalConstant)
        self.mlp = isinstance(r, MLP)
        self.bonus = None if bonus is None else bonus.to(dt)
        self.o = o
        self.batch_gd, self.exact = isinstance(o, BatchGD), isinstance(o, Exact)
        self.normalized = isinstance(o, NormalizedGD)
        self.sgd, self.minibatch = isinstance(o, OnlineSGD), isinstance(o, MiniBatchGD)
        self.lms = family == "cache" and (self.sgd or self.minibatch)  # kernel LMS
        # which statistics the answer needs: the key Gram matrix for n GD steps or a solve on a linear memory
        self.needs_kk = family == "statistics" and not self.local_constant and (self.exact or (
            self.batch_gd and o.steps > 1))
        self.needs_z = family == "statistics" and (self.local_constant or self.normalized)

    # -- feature maps and defaults
    def default_scale(self, Dk: int) -> float:
        from ..recipe import Linear
        if self.exact and isinstance(self.recipe.regressor, Linear) and self.o.ridge > 0:
            return 1.0  # the mesa layer and MesaNet read the memory at q itself (ttr.ops.mesa)
        return 1.0 if self.local_constant else Dk ** -0.5

    def features(self, x: Tensor) -> Tensor:
        r = self.recipe.regressor
        if self.family == "cache":
            return x
        return get_feature_map("l2" if self.mlp else r.feature_map)(x)

    # -- states between calls: internal tuples of tensors with rows first
    def state_in(self, s: Any, rows: int) -> Any:
        if s is None:
            return None
        st = self._state_in(s, rows)
        seen = [tuple(x.shape) for x in st if x.dim() > 0]
        if any(shape[0] != rows for shape in seen):
            raise ValueError(f"initial_state must hold {rows} rows (the batch, or the packed sequences), got shapes "
                             f"{seen}")
        return st

    def _state_in(self, s: Any, rows: int) -> Any:
        if self.family == "statistics":
            if self.window is not None:  # the ring (K, V)
                return tuple(x.to(self.dt) for x in s)
            if self.local_constant:
                return (s[..., :-1].to(self.dt), s[..., -1].to(self.dt))
            if self.normalized:
                C, z, m = s
                return (C.to(self.dt) * torch.exp(m.to(self.dt))[..., None, None],
                        z.to(self.dt) * torch.exp(m.to(self.dt))[..., None])
            if self.needs_kk:
                return tuple(x.to(self.dt) for x in s)
            return (s.to(self.dt),)
        if self.family == "online":
            if self.minibatch:
                if not isinstance(s, MiniBatchState):  # the weights (and momentum), at a mini-batch's start
                    n_w = 2 if self.mlp else 1
                    W = tuple(s) if isinstance(s, (tuple, list)) else (s,)
                    if self.o.momentum and len(W) == n_w:
                        W = W + tuple(torch.zeros_like(w) for w in W)
                    s = MiniBatchState(weights=W, start=W[:n_w])
                offset = torch.as_tensor(s.offset, dtype=torch.long).expand(rows).clone()
                return tuple(x.to(self.dt) for x in (*s.weights, *s.start)) + (offset,)
            return tuple(x.to(self.dt) for x in s) if isinstance(s, (tuple, list)) else (s.to(self.dt),)
        if self.lms:  # (K, A) or (K, A, A0, offset[, M])
            return tuple(x.to(self.dt) if x.is_floating_point() else x for x in s)
        K, V, *L = s
        return (K.to(self.dt), V.to(self.dt), L[0].to(self.dt) if L else torch.zeros(K.shape[:3], dtype=self.dt,
                                                                                      device=K.device))

    def state_out(self, st: tuple[Tensor, ...]) -> Any:
        if self.whole:
            return None
        if self.family == "statistics":
            if self.window is not None:
                return st
            if self.local_constant:
                return torch.cat([st[0], st[1][..., None]], -1)
            if self.normalized:
                return (st[0], st[1], st[0].new_zeros(st[0].shape[:2]))
            return st if self.needs_kk else st[0]
        if self.family == "online":
            if self.minibatch:
                n_w = (2 if self.mlp else 1) * (2 if self.o.momentum else 1)
                return MiniBatchState(weights=st[:n_w], start=st[n_w:-1], offset=st[-1])
            return st if self.mlp else st[0]
        return st

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, live: Tensor, inputs: dict[str, Tensor],
                 state: Any) -> tuple[Tensor, Any]:
        return getattr(self, "_" + self.family)(q, k, v, live, inputs, state)

    # -- the decay a = exp(g) of one token, shaped to act on S [B, H, p, Dv]
    @staticmethod
    def _decay(g: Tensor | None, t: int, live: Tensor) -> Tensor | None:
        if g is None:
            return None
        a = torch.exp(g[:, t] * live[:, t].view(-1, *[1] * (g.dim() - 2)))
        return {3: a[..., None, None], 4: a[..., None], 5: a}[g.dim()]  # [B, H, 1|p, 1|Dv]

    # -- statistics: linear and locally constant memories under batch optimizers
    def _statistics(self, q, k, v, live, inputs, state):
        if self.window is not None or self.whole:
            return self._set_statistics(q, k, v, live, state)
        B, T, H, p = k.shape
        Dv = v.shape[-1]
        g = inputs.get("g")
        entry = g is not None and g.dim() == 5
        E = Dv if entry else 1
        if state is None:
            kv = q.new_zeros(B, H, p, Dv)
            kk = q.new_zeros(B, H, p, p, E) if self.needs_kk else None
            z = q.new_zeros(B, H, p) if self.needs_z else None
        else:
            kv = state[1] if self.needs_kk else state[0]
            kk = None if not self.needs_kk else (state[0] if state[0].dim() == 5 else state[0][..., None])
            z = state[1] if self.needs_z else None
        outs = []
        for t in range(T):
            x, x_q, v_t = k[:, t], q[:, t], v[:, t]                      # [B, H, p], [B, H, p], [B, H, Dv]
            w = live[:, t, None]                                          # [B, 1]
            if "beta" in inputs:
                w = w * inputs["beta"][:, t]
            if "i" in inputs:
                w = w * torch.exp(inputs["i"][:, t])
            w = w[..., None]                                              # [B, H, 1]
            a = self._decay(g, t, live)                                   # [B, H, 1|p, 1|Dv]
            if self.bonus is not None:  # the newest association weighs u per key channel, the rest not yet decayed
                ux = self.bonus * x
                read_kv = kv + ux[..., None] * v_t[..., None, :]
                read_kk = None if kk is None else kk + (x[..., :, None] * ux[..., None, :])[..., None]
            if a is not None:
                kv = a * kv
                if kk is not None:  # column b of H_kk decays with key channel b (and with the value column)
                    kk = kk * a[..., None, :, :]
                if z is not None:
                    z = z * a[..., 0]
            kv = kv + w[..., None] * x[..., None] * v_t[..., None, :]
            if kk is not None:
                kk = kk + (w[..., None] * x[..., :, None] * x[..., None, :])[..., None]
            if z is not None:
                z = z + w * x
            if self.bonus is not None:
                outs.append(self._answer(x_q, read_kk, read_kv, None))
            else:
                outs.append(self._answer(x_q, kk, kv, z))
        state = ((kk if entry else kk[..., 0]), kv) if self.needs_kk else ((kv, z) if self.needs_z else (kv,))
        return torch.stack(outs, 1), state

    def _set_statistics(self, q, k, v, live, state):
        """A window's or the whole sequence's statistics (uniform weights), summed over the set's associations."""
        B, T, H, p = k.shape
        if self.whole:  # one set for every query; padding (live 0) weighs nothing
            stats = self._sums((k * live[..., None, None]).transpose(1, 2), v.transpose(1, 2))
            return torch.stack([self._answer(q[:, t], *stats) for t in range(T)], 1), ()
        w = self.window
        K, V = (k.new_zeros(B, H, w, p), v.new_zeros(B, H, w, v.shape[-1])) if state is None else state
        outs = []
        for t in range(T):  # the ring: this token in, the one w tokens back out (a padded token leaves it)
            keep = live[:, t].bool().view(B, 1, 1, 1)
            K = torch.where(keep, torch.cat([K[:, :, 1:], k[:, t, :, None]], 2), K)
            V = torch.where(keep, torch.cat([V[:, :, 1:], v[:, t, :, None]], 2), V)
            outs.append(self._answer(q[:, t], *self._sums(K, V)))
        return torch.stack(outs, 1), (K, V)

    def _sums(self, K: Tensor, V: Tensor) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """(H_kk, H_kv, z) of the associations K [B, H, n, p], V [B, H, n, Dv], as _answer takes them; a zero key adds
        nothing (the ring's empty slots)."""
        kk = (K.transpose(-1, -2) @ K)[..., None] if self.needs_kk else None
        return kk, K.transpose(-1, -2) @ V, (K.sum(-2) if self.needs_z else None)

    def _answer(self, x_q: Tensor, kk: Tensor | None, kv: Tensor, z: Tensor | None) -> Tensor:
        """One token's answer from the statistics at its time (module docstring). x_q: [B, H, p] (scaled)."""
        o = self.o
        if self.local_constant:
            U = (kv * x_q[..., None]).sum(-2)                             # sum w v  [B, H, Dv]
            W = (z * x_q).sum(-1, keepdim=True)                           # sum w    [B, H, 1]
            if self.exact:
                mass = W + o.ridge
                return torch.where(mass > 0, U / torch.where(mass > 0, mass, torch.ones_like(mass)), 0.0)
            if self.normalized:
                return U / W.abs().clamp_min(1.0)
            c = torch.zeros_like(U)
            for _ in range(o.steps):
                c = c - o.lr * (W * c - U)
            return c
        if self.normalized:
            return (kv * x_q[..., None]).sum(-2) / (z * x_q).sum(-1, keepdim=True).abs().clamp_min(1.0)
        if self.batch_gd and o.steps == 1:
            S = o.lr * kv
        elif self.batch_gd:
            S = torch.zeros_like(kv)
            for _ in range(o.steps):  # grad[b, c] = sum_a H_kk[a, b, c] S[a, c] - H_kv[b, c]
                S = S - o.lr * ((kk * S[..., :, None, :]).sum(-3) - kv)
        else:
            A = kk[..., 0]
            if o.ridge > 0:
                S = torch.linalg.solve(A + o.ridge * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device), kv)
            else:  # least squares of least norm: the pseudo-inverse, relative cut-off far above rounding
                S = torch.linalg.pinv(A, rtol=1e-9 if A.dtype == torch.float64 else 1e-5, hermitian=True) @ kv
        return (S * x_q[..., None]).sum(-2)

    # -- online: linear (S = M^T) and MLP memories under OnlineSGD and MiniBatchGD
    def _f(self, W: tuple[Tensor, ...], x: Tensor) -> Tensor:
        if self.mlp:
            return torch.einsum("bhvd,bhd->bhv", W[1], F.gelu(torch.einsum("bhdk,bhk->bhd", W[0], x)))
        return torch.einsum("bhkv,bhk->bhv", W[0], x)

    def _grad(self, W: tuple[Tensor, ...], x: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        """The gradient of 1/2 ||v - f_W(x)||^2, written out (module docstring)."""
        if self.mlp:
            zh = torch.einsum("bhdk,bhk->bhd", W[0], x)
            h = F.gelu(zh)
            e = torch.einsum("bhvd,bhd->bhv", W[1], h) - v
            back = torch.einsum("bhvd,bhv->bhd", W[1], e) * gelu_derivative(zh)
            return (back[..., :, None] * x[..., None, :], e[..., :, None] * h[..., None, :])
        e = torch.einsum("bhkv,bhk->bhv", W[0], x) - v
        return (x[..., :, None] * e[..., None, :],)

    def _online(self, q, k, v, live, inputs, state):
        B, T, H = q.shape[:3]
        g = inputs.get("g")
        o = self.o
        n_w = 2 if self.mlp else 1
        if state is None:
            if self.mlp:
                raise ValueError("an MLP memory needs its starting weights: initial_state=(W1 [B, H, hidden, Dk], "
                                 "W2 [B, H, Dv, hidden])")
            W = (q.new_zeros(B, H, k.shape[-1], v.shape[-1]),)
            mom = tuple(torch.zeros_like(w) for w in W)
            start, offset = W, torch.zeros(B, dtype=torch.long, device=q.device)
        elif self.minibatch:
            n_mom = n_w if o.momentum else 0
            W, mom = state[:n_w], state[n_w:n_w + n_mom] or tuple(torch.zeros_like(w) for w in state[:n_w])
            start, offset = state[n_w + n_mom:-1], state[-1]
        else:
            W, mom, start, offset = tuple(state), (), (), None
        outs = []
        for t in range(T):
            alive = live[:, t].bool()
            keep = alive.view(B, 1, 1, 1)
            a = self._decay(g, t, live)
            if self.sgd:
                new = W if a is None else tuple(a * w for w in W)  # the weight decay's proximal step first
                if o.step == "implicit":
                    x, d = k[:, t], inputs["delta"][:, t]
                    beta = d / (1.0 + d * (x * x).sum(-1))
                    new = tuple(w - beta[..., None, None] * gr for w, gr in zip(new, self._grad(new, x, v[:, t])))
                else:
                    steps = [(k[:, t], v[:, t], inputs["beta"][:, t])] if k.dim() == 4 else [
                        (k[:, t, :, j], v[:, t, :, j], inputs["beta"][:, t, :, j]) for j in range(k.shape[3])]
                    for x, v_j, beta in steps:
                        new = tuple(w - beta[..., None, None] * gr for w, gr in zip(new, self._grad(new, x, v_j)))
                W = tuple(torch.where(keep, nw, w) for nw, w in zip(new, W))
            else:
                first = (offset % o.batch_size == 0) & alive            # a new mini-batch starts here
                start = tuple(torch.where(first.view(B, 1, 1, 1), w, s) for w, s in zip(W, start))
                grads = self._grad(start, k[:, t], v[:, t])
                rate = inputs["theta" if o.momentum else "lr"][:, t][..., None, None]
                if o.momentum:
                    eta = inputs["momentum"][:, t][..., None, None]
                    new_mom = tuple(eta * m - rate * gr for m, gr in zip(mom, grads))
                else:
                    new_mom = tuple(-rate * gr for gr in grads)
                new = tuple((w if a is None else a * w) + m for w, m in zip(W, new_mom))
                W = tuple(torch.where(keep, nw, w) for nw, w in zip(new, W))
                if o.momentum:
                    mom = tuple(torch.where(keep, nm, m) for nm, m in zip(new_mom, mom))
                offset = offset + alive.long()
            outs.append(self._f(W, q[:, t]))
        if self.minibatch:
            return torch.stack(outs, 1), (*W, *(mom if o.momentum else ()), *start, offset)
        return torch.stack(outs, 1), W

    # -- cache: local polynomial and RKHS fits with scalar weights, solved at each query
    def _cache(self, q, k, v, live, inputs, state):
        from ..recipe import LocalPolynomial
        if self.lms:
            return self._kernel_lms(q, k, v, inputs, state)
        r = self.recipe.regressor
        B, T, H, Dk = q.shape
        g = inputs.get("g")
        K = k.new_zeros(B, 0, H, Dk) if state is None else state[0]
        V = v.new_zeros(B, 0, H, v.shape[-1]) if state is None else state[1]
        L = k.new_zeros(B, 0, H) if state is None else state[2]
        local = isinstance(r, LocalPolynomial)
        unit = F.normalize if local and r.qk_norm else (lambda x, dim: x)
        s = self.scale
        answer = (functools.partial(self._local_answer, s=s, order=r.order) if local else
                  functools.partial(self._kernel_answer, s=s, kernel=r.kernel))
        if self.whole:  # every query's set is the whole sequence: one cache of all its keys
            Kh, Vh = unit(k, dim=-1).transpose(1, 2), v.transpose(1, 2)
            return torch.stack([answer(Kh, Vh, k.new_zeros(B, H, T), unit(q[:, t], dim=-1)[..., None, :])
                                for t in range(T)], 1), ()
        outs = []
        for t in range(T):
            decay = 0.0 if g is None else g[:, t, None, :] * live[:, t, None, None]
            K, V = torch.cat([K, k[:, t, None]], 1), torch.cat([V, v[:, t, None]], 1)
            L = torch.cat([L + decay, torch.where(live[:, t, None, None] > 0, 0.0, -math.inf).expand(B, 1, H)], 1)
            if self.window is not None:  # the set: the last w associations
                K, V, L = K[:, -self.window:], V[:, -self.window:], L[:, -self.window:]
            Kh, Vh, Lh = unit(K, dim=-1).transpose(1, 2), V.transpose(1, 2), L.transpose(1, 2)  # [B, H, n, .]
            outs.append(answer(Kh, Vh, Lh, unit(q[:, t], dim=-1)[..., None, :]))    # x [B, H, 1, Dk]
        return torch.stack(outs, 1), (K, V, L)

    def _kernel_lms(self, q, k, v, inputs, state):
        """Online learners in an RKHS (module docstring): f = sum_j A_j Kern(K_j, .) over a cache of keys K
        [B, H, n, Dk] with a coefficient row A_j each; mini-batch GD also keeps its first function's coefficients A0
        (0 on later keys), its place in the mini-batch and, with momentum, the momentum's coefficients M."""
        o, s, kernel = self.o, self.scale, self.recipe.regressor.kernel
        B, T, H, Dk = q.shape
        g = inputs.get("g")

        def at(K: Tensor, A: Tensor, x: Tensor) -> Tensor:  # f(x), x [B, H, Dk] -> [B, H, Dv]
            return (A * kern(K, x[..., None, :], kernel, s, 2)).sum(-2)

        none = q.new_zeros(B, H, 0, v.shape[-1])  # no key yet: f = 0
        K, A, A0, M, offset = q.new_zeros(B, H, 0, Dk), none, none, none, torch.zeros(B, dtype=torch.long,
                                                                                      device=q.device)
        if state is not None:
            K, A = state[0].transpose(1, 2), state[1].transpose(1, 2)
            if self.minibatch:
                A0, offset = state[2].transpose(1, 2), state[3]
                M = state[4].transpose(1, 2) if o.momentum else M
        outs = []
        for t in range(T):
            a = 1.0 if g is None else torch.exp(g[:, t])[..., None, None]          # the gate: weight decay
            if self.sgd:
                A = a * A  # the decay's proximal step first
                steps = [(k[:, t], v[:, t], inputs["delta" if o.step == "implicit" else "beta"][:, t])] \
                    if k.dim() == 4 else [(k[:, t, :, j], v[:, t, :, j], inputs["beta"][:, t, :, j])
                                          for j in range(k.shape[3])]
                for x, y, rate in steps:
                    if o.step == "implicit":  # the proximal step is the gradient step at beta = d / (1 + d Kern(k, k))
                        rate = rate / (1.0 + rate * kern(x[..., None, :], x[..., None, :], kernel, s, 2)[..., 0, 0])
                    step = -rate[..., None] * (at(K, A, x) - y)                       # on the new key Kern(k, .)
                    K, A = torch.cat([K, x[..., None, :]], -2), torch.cat([A, step[..., None, :]], -2)
            else:
                A0 = torch.where((offset % o.batch_size == 0).view(B, 1, 1, 1), A, A0)  # a mini-batch starts here
                x, y = k[:, t], v[:, t]
                rate = inputs["theta" if o.momentum else "lr"][:, t][..., None, None]
                step = -rate * (at(K, A0, x) - y)[..., None, :]         # the gradient at f_0, on the new key
                zero = torch.zeros_like(step)
                if o.momentum:
                    M = torch.cat([inputs["momentum"][:, t][..., None, None] * M, step], -2)
                    A = torch.cat([a * A, zero], -2) + M
                else:
                    A = torch.cat([a * A, step], -2)
                K, A0 = torch.cat([K, x[..., None, :]], -2), torch.cat([A0, zero], -2)
                offset = offset + 1
            outs.append(at(K, A, q[:, t]))
        final = (K.transpose(1, 2), A.transpose(1, 2))
        if self.minibatch:
            final = final + (A0.transpose(1, 2), offset) + ((M.transpose(1, 2),) if o.momentum else ())
        return torch.stack(outs, 1), final

    def _local_answer(self, K, V, L, x, s, order):
        o = self.o
        logw = s * (K @ x.transpose(-1, -2))[..., 0] + L                        # [B, H, n]
        if self.exact:
            logw = logw - logw.amax(-1, keepdim=True)  # the exact fit is unchanged by a common factor of the weights
        w = torch.exp(logw)
        X = _monomials(K - x, order)                                             # [B, H, n, P]
        XtW = X.transpose(-1, -2) * w[..., None, :]
        A, b = XtW @ X, XtW @ V
        if self.exact:
            if order > 0:
                penalty = torch.ones(X.shape[-1], dtype=X.dtype, device=X.device)
                penalty[0] = 0.0
                A = A + o.ridge * w.sum(-1)[..., None, None] * torch.diag(penalty)
            return torch.linalg.solve(A, b)[..., 0, :]
        theta = torch.zeros_like(b)
        for _ in range(o.steps):
            theta = theta - o.lr * (A @ theta - b)
        return theta[..., 0, :]

    def _kernel_answer(self, K, V, L, x, s, kernel):
        o = self.o
        w = torch.exp(L)[..., None]                                              # [B, H, n, 1]
        gram = kern(K, K, kernel, s, 2)
        kq = kern(K, x, kernel, s, 2)                                            # [B, H, n, 1]
        if self.exact:  # (W Kmat + ridge I) alpha = W V: the weighted representer's normal equations
            n = K.shape[-2]
            alpha = torch.linalg.solve(w * gram + o.ridge * torch.eye(n, dtype=K.dtype, device=K.device), w * V)
        else:  # functional gradient steps from f = 0: alpha <- alpha - lr W (Kmat alpha - V)
            alpha = torch.zeros_like(V)
            for _ in range(o.steps):
                alpha = alpha - o.lr * w * (gram @ alpha - V)
        return (alpha * kq).sum(-2)


def _monomials(d: Tensor, order: int) -> Tensor:
    """The local design row of each association: 1, then the monomials of d = k - q of degree 1..order
    (for order 2, d_a d_b with a <= b). [..., D] -> [..., P]."""
    cols = [torch.ones_like(d[..., :1])]
    if order >= 1:
        cols.append(d)
    if order >= 2:
        a, b = torch.triu_indices(d.shape[-1], d.shape[-1], device=d.device)
        cols.append(d[..., a] * d[..., b])
    return torch.cat(cols, -1)


def grid() -> list:
    """Every combination of ingredients with small default parameters (`ttr zoo --all`, tests): weights x function
    class x optimizer, as Recipes."""
    from ..oracle import BatchGD, Exact
    from ..recipe import (MLP, RKHS, Linear, LocalConstant, LocalPolynomial, MiniBatchGD, NormalizedGD, Nystrom,
                          OnlineSGD, Recipe)
    from ..weights import ComplexGate, EntryGate, FixedDecay, ScalarGate, Uniform, VectorGate
    weights = [Uniform(), Uniform(window=4), Uniform(causal=False), FixedDecay(), ScalarGate(),
               ScalarGate(input_gate=True), VectorGate(), VectorGate(bonus=True), ComplexGate(), ComplexGate(fixed=True),
               EntryGate()]
    regressors = [Linear(), Linear("l2"), Linear("elu1"), LocalConstant("elu1"), LocalPolynomial(0),
                  LocalPolynomial(1), RKHS("exp"), MLP(2), Nystrom("soft", 4)]
    optimizers = [BatchGD(), BatchGD(steps=2), Exact(), Exact(ridge=1.0), NormalizedGD(), OnlineSGD(),
                  OnlineSGD(steps_per_token=2), OnlineSGD(step="implicit"), MiniBatchGD(4), MiniBatchGD(4, momentum=True)]
    return [Recipe(w, r, o) for w in weights for r in regressors for o in optimizers]
