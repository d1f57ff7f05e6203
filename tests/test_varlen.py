"""Packed variable-length sequences: for every op, in both forms, a call with cu_seqlens equals one call per
sequence (outputs, final states, gradients of every input and of the initial states), with lengths that are
not multiples of the chunk (one of them empty), and bad cu_seqlens give clear errors."""

import pytest
import torch
import torch.nn.functional as F

from ttr import ops
from ttr.ops import MiniBatchState

from conftest import F64_ATOL

LENGTHS = [13, 1, 0, 37, 20]   # chunks of 16, mini-batches of 4: every kind of cut, and an empty sequence
H, DK, DV = 2, 6, 5


def _rand(*shape, seed, lo=None, hi=None):
    gen = torch.Generator().manual_seed(seed)
    if lo is None:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)


def _case(name):
    """(op, per-token inputs [1, T, H, ...] by name, a maker of the initial state for sequences [a, b), keywords)."""
    T, N = sum(LENGTHS), len(LENGTHS)
    gate = F.logsigmoid(_rand(1, T, H, seed=11) + 2)
    beta = _rand(1, T, H, seed=12, lo=0.1, hi=1.0)
    l2 = {"qk_l2norm": True}
    S0 = _rand(N, H, DK, DV, seed=13)
    kv = lambda n, s: (_rand(1, s, H, DK, seed=20 + n), _rand(1, s, H, DV, seed=40 + n))  # noqa: E731
    per_row = {  # state of sequence n, or None for an op without one
        "tensor": lambda n: S0[n:n + 1],
        "mesa": lambda n: (_spd(n), _rand(1, H, DK, DV, seed=60 + n)),
        "ttt": lambda n: MiniBatchState((S0[n:n + 1],), (S0[n:n + 1] * 0.5,), n % 4),
        "mlp": lambda n: MiniBatchState(tuple(_mlp(n)), tuple(w * 0.9 for w in _mlp(n)), (n + 1) % 4),
        "titans": lambda n: MiniBatchState((S0[n:n + 1], S0[n:n + 1] * 0.1), (S0[n:n + 1] * 0.5,), (3 * n) % 4),
        "cache": lambda n: kv(n, 3 + n),
        "kernel": lambda n: kv(n, 2 + n),
    }
    cases = {
        "linear_attention": (ops.linear_attention, {}, "tensor", {"chunk_size": 16}),
        "linear_attention_scalar": (ops.linear_attention, {"g": gate}, "tensor", {"chunk_size": 16}),
        "linear_attention_vector": (ops.linear_attention, {"g": F.logsigmoid(_rand(1, T, H, DK, seed=14) + 2)},
                                    "tensor", {"chunk_size": 16}),
        "linear_attention_elu1_normalized": (ops.linear_attention, {}, None,
                                             {"feature_map": "elu1", "normalize": True, "chunk_size": 16}),
        "delta_rule": (ops.delta_rule, {"beta": beta}, "tensor", {**l2, "chunk_size": 16}),
        "gated_delta_rule": (ops.delta_rule, {"beta": beta, "g": gate}, "tensor", {**l2, "chunk_size": 16}),
        "longhorn": (ops.longhorn, {"delta": beta * 3}, "tensor", {**l2, "chunk_size": 16}),
        "delta_product": (ops.delta_product, {"beta": _rand(1, T, H, 2, seed=15, lo=0.1, hi=1.9)}, "tensor",
                          {**l2, "chunk_size": 16}),
        "mesa": (ops.mesa, {"g": gate, "beta": beta}, "mesa", {"lamb": 0.5, "chunk_size": 16}),
        "mesa_uniform": (ops.mesa, {}, "mesa", {"lamb": 0.5, "chunk_size": 16}),
        "mesa_cg": (ops.mesa, {"g": gate, "beta": beta}, "mesa",
                    {"lamb": 0.5, "chunk_size": 16, "solver": "cg"}),
        "ttt_linear": (ops.ttt_linear, {"lr": beta * 0.5}, "ttt", {**l2, "batch_size": 4}),
        "ttt_mlp": (ops.ttt_mlp, {"lr": beta * 0.1}, "mlp", {**l2, "batch_size": 4}),
        "titans": (ops.titans, {"theta": beta * 0.5, "momentum": 1 - beta * 0.5, "g": gate}, "titans",
                   {**l2, "batch_size": 4}),
        "softmax": (ops.local_polynomial_attention, {}, "cache", {"order": 0}),
        "local_linear": (ops.local_polynomial_attention, {}, "cache", {"order": 1}),
        "kernel_regression": (ops.kernel_regression, {}, "kernel", {"kernel": "rbf"}),
        # no caches yet: the sequences run as one right-padded batch
        "softmax_fresh": (ops.local_polynomial_attention, {}, None, {"order": 0}),
        "local_linear_fresh": (ops.local_polynomial_attention, {}, None, {"order": 1}),
        "kernel_regression_fresh": (ops.kernel_regression, {}, None, {"kernel": "rbf"}),
    }
    op, inputs, state, kw = cases[name]
    return op, inputs, per_row.get(state), kw


def _spd(n):
    a = _rand(1, H, DK, DK, seed=70 + n)
    return a @ a.transpose(-1, -2) / DK


def _mlp(n):
    return [_rand(1, H, 2 * DK, DK, seed=80 + n) * 0.4, _rand(1, H, DV, 2 * DK, seed=90 + n) * 0.3]


def _tensors(state):
    if state is None:
        return []
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, MiniBatchState):
        return [*state.weights, *state.start]
    return [t for s in state for t in _tensors(s)]


Tensor = torch.Tensor


def _stack(states, kind):
    """The per-sequence initial states as the packed call takes them."""
    if kind in ("cache", "kernel"):
        return list(states)
    if isinstance(states[0], MiniBatchState):
        cat = lambda xs: tuple(torch.cat(x) for x in zip(*xs))  # noqa: E731
        return MiniBatchState(cat([s.weights for s in states]), cat([s.start for s in states]),
                              torch.tensor([s.offset for s in states]))
    if isinstance(states[0], tuple):
        return tuple(torch.cat(x) for x in zip(*states))
    return torch.cat(states)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("name", ["linear_attention", "linear_attention_scalar", "linear_attention_vector",
                                  "linear_attention_elu1_normalized", "delta_rule", "gated_delta_rule", "longhorn",
                                  "delta_product",
                                  "mesa", "mesa_uniform", "mesa_cg", "ttt_linear", "ttt_mlp", "titans", "softmax",
                                  "local_linear", "kernel_regression", "softmax_fresh", "local_linear_fresh",
                                  "kernel_regression_fresh"])
def test_packed_equals_separate(name, mode):
    op, inputs, make_state, kw = _case(name)
    T, N = sum(LENGTHS), len(LENGTHS)
    q, k, v = _rand(1, T, H, DK, seed=1), _rand(1, T, H, DK, seed=2), _rand(1, T, H, DV, seed=3)
    if name == "mesa" or name.startswith("mesa_"):
        k = F.normalize(k, dim=-1)
    if name == "delta_product":  # two keys, values and steps per token
        k, v = _rand(1, T, H, 2, DK, seed=2), _rand(1, T, H, 2, DV, seed=3)
    if name == "ttt_mlp" and make_state is None:
        raise AssertionError("ttt_mlp needs a state")
    rows = [make_state(n) for n in range(N)] if make_state else None
    leaves = [q, k, v, *inputs.values(), *(t for r in rows or [] for t in _tensors(r))]
    for x in leaves:
        x.requires_grad_(True)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    packed_state = None if rows is None else _stack(rows, "cache" if name in ("softmax", "local_linear") else
                                                    "kernel" if name == "kernel_regression" else "")
    if name == "linear_attention_elu1_normalized" or name.endswith("_fresh"):
        assert packed_state is None
    o, final = op(q, k, v, **inputs, **kw, initial_state=packed_state, output_final_state=True, mode=mode,
                  cu_seqlens=cu)
    outs, finals = [], []
    for n in range(N):
        a, b = int(cu[n]), int(cu[n + 1])
        if a == b:
            kept = rows[n] if rows else None
            if name.startswith("mesa"):  # mesa keeps H_kk's symmetric part, the part its objective reads
                kept = (0.5 * (kept[0] + kept[0].transpose(-1, -2)), kept[1])
            finals.append(kept)
            continue
        o_n, f_n = op(q[:, a:b], k[:, a:b], v[:, a:b], **{key: x[:, a:b] for key, x in inputs.items()}, **kw,
                      initial_state=None if rows is None else rows[n], output_final_state=True, mode=mode)
        outs.append(o_n)
        finals.append(f_n)
    separate = torch.cat(outs, 1)
    assert o.shape == separate.shape and (o - separate).abs().max() < F64_ATOL
    if isinstance(final, MiniBatchState):
        assert final.offset.tolist() == [int(torch.as_tensor(f.offset)) for f in finals]
        want = _stack(finals, "")
    elif isinstance(final, list):
        assert len(final) == N
        for n in range(N):  # a sequence without tokens or cache keeps an empty cache
            if finals[n] is None:
                assert LENGTHS[n] == 0 and all(t.numel() == 0 for t in final[n])
                finals[n] = final[n]
        want = finals
    else:
        want = _stack([f for f in finals if f is not None], "") if all(f is not None for f in finals) else None
    if name == "linear_attention_elu1_normalized":  # sequences without an initial state: the empty one is zeros
        want = torch.cat([f if f is not None else torch.zeros_like(final[:1]) for f in finals])
    got_t, want_t = _tensors(final), _tensors(want)
    assert len(got_t) == len(want_t) > 0
    for x, y in zip(got_t, want_t):
        assert x.shape == y.shape and (x.numel() == 0 or (x - y).abs().max() < F64_ATOL)
    # gradients through outputs and final states
    weights = [_rand(*t.shape, seed=100 + i) for i, t in enumerate([o, *got_t])]
    grads_p = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, [o, *got_t])), leaves, allow_unused=True,
                                  retain_graph=True)
    grads_s = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, [separate, *want_t])), leaves,
                                  allow_unused=True)
    for gp, gs in zip(grads_p, grads_s):
        assert (gp is None) == (gs is None)
        if gp is not None and gp.numel():
            assert (gp - gs).abs().max() < 1e-9


@pytest.mark.parametrize("cu,match", [
    (torch.tensor([0, 5, 9]), "end at T = 10"),
    (torch.tensor([0, 6, 4, 10]), "never decrease"),
    (torch.tensor([1, 10]), "start at 0"),
    (torch.tensor([0.0, 10.0]), "int32 or int64"),
    ([0, 10], "int32 or int64"),
    (torch.tensor([10]), "N \\+ 1 >= 2"),
])
@pytest.mark.parametrize("op", ["linear_attention", "delta_rule", "mesa", "ttt_linear", "local_polynomial_attention",
                                "kernel_regression"])
def test_bad_cu_seqlens_is_a_clear_error(op, cu, match):
    q, k, v = (torch.randn(1, 10, 2, 4) for _ in range(3))
    extra = {"delta_rule": {"beta": torch.full((1, 10, 2), 0.1)}, "mesa": {"lamb": 1.0},
             "ttt_linear": {"lr": torch.full((1, 10, 2), 0.1)}}.get(op, {})
    with pytest.raises(ValueError, match=match):
        getattr(ops, op)(q, k, v, **extra, cu_seqlens=cu)


def test_cu_seqlens_needs_batch_one():
    q, k, v = (torch.randn(2, 10, 2, 4) for _ in range(3))
    with pytest.raises(ValueError, match="batch size must be 1"):
        ops.linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match=r"initial_state must have shape \[2, 2, 4, 4\]"):
        ops.linear_attention(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 4, 10]),
                             initial_state=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="list of the 2 sequences' caches"):
        ops.local_polynomial_attention(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 4, 10]),
                                       initial_state=(k[:1], v[:1]))
