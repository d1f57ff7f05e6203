"""Property-based battery (hypothesis): random shapes, lengths (1 and non-multiples of the chunk included), chunk
sizes, gate strengths, scales and offsets of q, k, v, for every op. Each drawn problem must satisfy:

- chunk == recurrent in float64: outputs, final states and the gradients of every input (1e-8, relative to
  the largest magnitude: the forms sum the same terms in another order);
- float32 within FLOAT32_TOL of float64 (relative to the output's largest magnitude), finite outputs and
  gradients;
- a clear ValueError, and no other exception, for an illegal variant of the same problem.

The default suite draws PROFILES["default"] examples per property; `make test-slow` draws the "thorough" count
(HYPOTHESIS_PROFILE=thorough). Legal ranges follow each op's docstring and the stable ranges its
parameterization keeps (unit keys for the online and mini-batch learners, whose mini-batch is the drawn chunk
size; theta below 0.25 / b with momentum at most 0.9 for Titans); mesa starts from a drawn state.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttr import ops

pytestmark = pytest.mark.property

FLOAT32_TOL = 2e-3
OPS = ["linear_attention", "linear_attention_normalized", "delta_rule", "longhorn", "delta_product", "ttt_linear",
       "ttt_mlp", "titans", "mesa", "mesa_cg", "local_polynomial_attention", "kernel_regression"]
GATED = {"linear_attention": ("scalar", "vector"), "delta_rule": ("scalar",), "delta_product": ("scalar",),
         "titans": ("scalar",), "mesa": ("scalar",), "mesa_cg": ("scalar",)}


@dataclass(frozen=True)
class Problem:
    op: str
    B: int
    T: int
    H: int
    D: int
    chunk: int
    gate: str | None
    strength: float      # how far below 0 the log-gates reach
    qk_scale: float      # q and k are drawn at this size
    v_scale: float
    offset: float        # a common offset of q and k
    order: int           # local_polynomial_attention's order
    seed: int


@st.composite
def problems(draw, op: str) -> Problem:
    gates = (None, *GATED.get(op, ()))
    D = draw(st.integers(1, 16 if op == "local_polynomial_attention" else 8))
    order = draw(st.integers(0, 2)) if op == "local_polynomial_attention" else 0
    if order == 2:
        D = min(D, 4)
    longest = 160 if op == "local_polynomial_attention" else 40  # local: past its first block of 128 queries
    return Problem(op=op, B=draw(st.integers(1, 2)), T=draw(st.integers(1, longest)), H=draw(st.integers(1, 2)), D=D,
                   chunk=draw(st.sampled_from([1, 2, 4, 8, 16])), gate=draw(st.sampled_from(gates)),
                   strength=draw(st.sampled_from([0.01, 0.5, 5.0])),
                   qk_scale=draw(st.sampled_from([0.1, 1.0, 3.0])),
                   # TTT-MLP's stable range shrinks with the targets' size (its update is not linear in them)
                   v_scale=draw(st.sampled_from([1e-2, 1.0] if op == "ttt_mlp" else [1e-2, 1.0, 1e2])),
                   offset=draw(st.sampled_from([0.0, 0.0, 2.0])), order=order, seed=draw(st.integers(0, 2 ** 16)))


def _tensors(p: Problem) -> dict[str, torch.Tensor]:
    """Every tensor the op takes, in float64, as leaves."""
    gen = torch.Generator().manual_seed(p.seed)

    def rand(*shape, lo=None, hi=None):
        if lo is None:
            return torch.randn(*shape, generator=gen, dtype=torch.float64)
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    B, T, H, D = p.B, p.T, p.H, p.D
    n = 2 if p.op == "delta_product" else None
    per_step = (B, T, H, n) if n else (B, T, H)
    t = {"q": p.qk_scale * rand(B, T, H, D) + p.offset,
         "k": p.qk_scale * rand(*((B, T, H, n, D) if n else (B, T, H, D))) + p.offset,
         "v": p.v_scale * rand(*((B, T, H, n, D) if n else (B, T, H, D)))}
    if p.gate == "scalar":
        t["g"] = rand(B, T, H, lo=-p.strength, hi=0.0)
    elif p.gate == "vector":
        t["g"] = rand(B, T, H, D, lo=-p.strength, hi=0.0)
    b = p.chunk if p.op in ("ttt_linear", "ttt_mlp", "titans") else 1  # the mini-batch is the chunk
    steps = {"delta_rule": ("beta", 0.0, 2.0), "delta_product": ("beta", 0.0, 2.0), "longhorn": ("delta", 0.0, 5.0),
             "ttt_linear": ("lr", 0.0, 1.0 / b), "ttt_mlp": ("lr", 0.0, 0.1 / b),
             "titans": ("theta", 0.0, 0.25 / b), "mesa": ("beta", 0.0, 2.0), "mesa_cg": ("beta", 0.0, 2.0)}
    if p.op in steps:
        name, lo, hi = steps[p.op]
        t[name] = rand(*per_step, lo=lo, hi=hi)
    if p.op == "titans":
        t["momentum"] = rand(B, T, H, lo=0.05, hi=0.9)
    if p.op == "ttt_mlp":
        t["W1"], t["W2"] = 0.5 * rand(B, H, 2 * D, D), 0.5 * rand(B, H, D, 2 * D)
    if p.op in ("mesa", "mesa_cg"):
        X = rand(B, H, D, D)
        t["H_kk"], t["H_kv"] = X @ X.transpose(-1, -2) / D, rand(B, H, D, D)
    return t


def _call(p: Problem, t: dict[str, torch.Tensor], mode: str):
    """The op on tensors t: (o, final state as a tuple of tensors)."""
    q, k, v, g = t["q"], t["k"], t["v"], t.get("g")
    common = {"mode": mode, "output_final_state": True}
    chunked = {**common, "chunk_size": p.chunk}
    unit = {"qk_l2norm": True}
    if p.op == "linear_attention":
        o, s = ops.linear_attention(q, k, v, g, **chunked)
    elif p.op == "linear_attention_normalized":
        o, s = ops.linear_attention(q, k, v, feature_map="elu1", normalize=True, **chunked)
    elif p.op == "delta_rule":
        o, s = ops.delta_rule(q, k, v, t["beta"], g, **unit, **chunked)
    elif p.op == "delta_product":
        o, s = ops.delta_product(q, k, v, t["beta"], g, **unit, **chunked)
    elif p.op == "longhorn":
        o, s = ops.longhorn(q, k, v, t["delta"], **unit, **chunked)
    elif p.op == "ttt_linear":
        o, s = ops.ttt_linear(q, k, v, t["lr"], batch_size=p.chunk, **unit, **common)
    elif p.op == "ttt_mlp":
        o, s = ops.ttt_mlp(q, k, v, t["lr"], initial_state=(t["W1"], t["W2"]), batch_size=p.chunk, **unit, **common)
    elif p.op == "titans":
        o, s = ops.titans(q, k, v, t["theta"], t["momentum"], g, batch_size=p.chunk, **unit, **common)
    elif p.op in ("mesa", "mesa_cg"):  # keys of norm up to 3 qk_scale: conditioning T (3 qk_scale)^2 / lamb
        o, s = ops.mesa(q, k / max(1.0, p.offset), v, g, t["beta"], lamb=0.5, initial_state=(t["H_kk"], t["H_kv"]),
                        **chunked, solver="cg" if p.op == "mesa_cg" else "exact")
    elif p.op == "local_polynomial_attention":
        o, s = ops.local_polynomial_attention(q, k, v, order=p.order, **common)
    else:
        o, s = ops.kernel_regression(q, k, v, scale=0.5 / max(1.0, p.qk_scale ** 2 * p.D), **common)
    if isinstance(s, ops.MiniBatchState):
        s = (*s.weights, *s.start)
    return o, (s if isinstance(s, tuple) else (s,))


def _leaves(t: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: x.detach().to(dtype).requires_grad_() for name, x in t.items()}


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-8) -> float:
    """Largest difference relative to b's largest magnitude; a b that is 0 up to rounding (below floor, as the
    gradient in q of a memory with one token) is compared absolutely."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor)) if b.numel() else 0.0


def _grads(p: Problem, t: dict[str, torch.Tensor], mode: str):
    o, s = _call(p, t, mode)
    gen = torch.Generator().manual_seed(p.seed + 1)
    loss = sum((torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) * x).sum() for x in (o, *s))
    return o, s, torch.autograd.grad(loss, list(t.values()), allow_unused=True)


PROFILE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("op", OPS)
@PROFILE
@given(data=st.data())
def test_chunk_equals_recurrent_in_float64(op, data):
    p = data.draw(problems(op))
    t = _tensors(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # e.g. CG short of its tolerance
        o_c, s_c, g_c = _grads(p, _leaves(t, torch.float64), "chunk")
        o_r, s_r, g_r = _grads(p, _leaves(t, torch.float64), "recurrent")
    tol = 1e-6 if op == "mesa_cg" else 1e-8                             # CG stops at a residual of 1e-10
    assert _rel(o_c, o_r) < tol
    for a, b in zip(s_c, s_r):
        assert _rel(a, b) < tol
    # a gradient that is 0 but for rounding (in k, through the normalization of one-dimensional keys) is
    # compared against the largest gradient of the problem
    scale = max(float(b.abs().max()) for b in g_r if b is not None and b.numel())
    for name, a, b in zip(t, g_c, g_r):
        assert (a is None) == (b is None), name
        if a is not None:
            assert bool(torch.isfinite(a).all()) and _rel(a, b, 1e-6 * scale) < 1e3 * tol, name


@pytest.mark.parametrize("op", OPS)
@PROFILE
@given(data=st.data())
def test_float32_is_close_to_float64_and_finite(op, data):
    p = data.draw(problems(op))
    t = _tensors(p)
    o64, _ = _call(p, _leaves(t, torch.float64), "chunk")
    for mode in ("chunk", "recurrent"):
        o32, s32, g32 = _grads(p, _leaves(t, torch.float32), mode)
        assert o32.dtype == torch.float32 and bool(torch.isfinite(o32).all())
        assert all(bool(torch.isfinite(g).all()) for g in g32 if g is not None)
        assert _rel(o32, o64) < FLOAT32_TOL, mode


def _corruptions(p: Problem, t: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Illegal variants of a legal problem, each expected to be a ValueError."""
    out = {}
    for name in ("q", "k", "v"):
        bad = t[name].clone()
        bad.view(-1)[p.seed % bad.numel()] = math.nan
        out[f"nan in {name}"] = {**t, name: bad}
    out["k of another width"] = {**t, "k": t["k"][..., :-1] if p.D > 1 else torch.cat([t["k"], t["k"]], -1)}
    out["integer v"] = {**t, "v": t["v"].long()}
    out["v one token short"] = {**t, "v": t["v"][:, :-1]} if p.T > 1 else {**t, "v": torch.cat([t["v"]] * 2, 1)}
    if "g" in t:
        out["a positive log-gate"] = {**t, "g": t["g"].abs() + 0.5}
        out["a gate of the wrong shape"] = {**t, "g": torch.zeros(p.B, p.T, p.H + 1, dtype=t["g"].dtype)}
    for name in ("beta", "delta", "lr", "theta"):
        if name in t:
            out[f"negative {name}"] = {**t, name: t[name] - 10.0}
            out[f"inf in {name}"] = {**t, name: t[name] + math.inf}
    if "momentum" in t:
        out["momentum above 1"] = {**t, "momentum": t["momentum"] + 1.0}
    return out


@pytest.mark.parametrize("op", OPS)
@PROFILE
@given(data=st.data())
def test_illegal_input_is_a_clear_error(op, data):
    p = data.draw(problems(op))
    t = _tensors(p)
    mode = data.draw(st.sampled_from(["chunk", "recurrent"]))
    for which, variant in sorted(_corruptions(p, t).items()):
        with pytest.raises(ValueError):
            _call(p, variant, mode)
