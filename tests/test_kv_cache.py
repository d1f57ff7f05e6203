"""KVCache: the nonparametric memories' preallocated cache equals the tuples' path and a full forward (prefill and
many single-token steps, growth past the capacity, ragged rows after left-padded prompts, select / reorder and
branching mid-decode, save and load, dtype moves, detach, autograd); states an op vouched for are checked again
once they are written into."""

import functools
import io

import pytest
import torch

import ttr
from ttr.ops import kernel_regression, local_polynomial_attention
from ttr.ops.kv_cache import MIN_CAPACITY, KVCache

D_MODEL = 16
OPS = {
    "softmax": (local_polynomial_attention, {"order": 0}),
    "local_linear": (local_polynomial_attention, {"order": 1, "ridge": 0.2}),
    "kernel": (kernel_regression, {"ridge": 0.7}),
}
CACHES = ["softmax_attention", "local_linear", "intention"]


def _qkv(B, T, H=2, D=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g, dtype=dtype) for _ in range(3)]


@pytest.fixture(params=[False, True], ids=["no_grad", "grad"])
def grad(request):
    """Decoding without autograd (in place) and with it (concatenated)."""
    with torch.set_grad_enabled(request.param):
        yield request.param


def _layer(name):
    torch.manual_seed(0)
    return ttr.TTRLayer(D_MODEL, 2, name, chunk_size=4).double()


def _rand(B, T, seed):
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("name", list(OPS))
def test_prefill_then_single_steps_equal_one_call(name, mode):
    """A prefill into KVCache.empty() and 100 single-token steps (the capacity grows past MIN_CAPACITY twice) equal
    one call over the whole sequence, outputs and cache, and the tuples' path step for step."""
    op, kw = OPS[name]
    q, k, v = _qkv(2, 110)
    whole, final = op(q, k, v, output_final_state=True, **kw)
    o, cache = op(q[:, :10], k[:, :10], v[:, :10], initial_state=KVCache.empty(), output_final_state=True,
                  mode=mode, **kw)
    _, old = op(q[:, :10], k[:, :10], v[:, :10], output_final_state=True, mode=mode, **kw)
    outs, capacities = [o], set()
    for t in range(10, 110):
        step = (q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
        o, cache = op(*step, initial_state=cache, output_final_state=True, mode=mode, **kw)
        o_old, old = op(*step, initial_state=old, output_final_state=True, mode=mode, **kw)
        assert (o - o_old).abs().max() < 1e-12
        outs.append(o)
        capacities.add(cache.capacity)
    assert isinstance(cache, KVCache) and cache.lengths == (110, 110)
    assert (torch.cat(outs, 1) - whole).abs().max() < 1e-10
    assert len(capacities) >= 2 and max(capacities) < 2 * 110          # grew, geometrically, not to the end
    for got, want in zip(cache, final[:2], strict=True):                # the cache is the pair of one call
        assert got.shape == want.shape and (got - want).abs().max() < 1e-10
    if name == "kernel":                                                 # and holds the inverse of its factor L
        eye = torch.eye(110, dtype=torch.float64)
        assert (cache.inverse[:, :, :110, :110] @ final[2] - eye).abs().max() < 1e-10


def test_growth_is_geometric_and_keeps_the_values():
    q, k, v = _qkv(1, 1, H=1, D=2)
    cache, caps = KVCache.empty(), []
    for t in range(1000):
        cache, _ = cache.append(k + t, v - t)
        caps.append(cache.capacity)
    grown = sorted(set(caps))
    assert len(grown) <= 2 + 9 and grown[1] == MIN_CAPACITY             # 1.5x each time: 64 .. 1000 in 8 steps
    K, V = cache
    assert torch.equal(K[0, :, 0, 0], k[0, 0, 0, 0] + torch.arange(1000, dtype=k.dtype))
    assert torch.equal(V[0, :, 0, 1], v[0, 0, 0, 1] - torch.arange(1000, dtype=v.dtype))


def test_an_append_writes_in_place_and_a_stale_cache_copies():
    """Appending to the newest cache writes into its buffers; appending to an older one (a second continuation of
    the same state) copies its prefix first, so neither continuation sees the other's tokens."""
    q, k, v = _qkv(1, 8, H=1, D=2)
    _, base = local_polynomial_attention(q, k, v, initial_state=KVCache.empty(), output_final_state=True)
    base, _ = base.append(k[:, :1], v[:, :1])                            # owns a buffer now
    a, _ = base.append(k[:, 1:2] + 1, v[:, 1:2])
    assert a.keys is base.keys                                           # in place
    b, _ = base.append(k[:, 2:3] - 1, v[:, 2:3])                         # base is stale now: copied
    assert b.keys is not base.keys
    assert torch.equal(a[0][:, -1], k[:, 1] + 1) and torch.equal(b[0][:, -1], k[:, 2] - 1)
    assert torch.equal(a[0][:, :-1], b[0][:, :-1]) and a.lengths == b.lengths == (10,)


@pytest.mark.parametrize("name", CACHES)
def test_ragged_rows_decode_in_one_batched_buffer(name, grad, monkeypatch):
    """Left-padded prompts of different lengths, then single tokens without a mask: one op call per step over one
    batched buffer (no per-row lists), and every row as it would be alone; written in place without autograd,
    concatenated under it."""
    layer = _layer(name)
    lengths = [7, 3, 5]
    x = _rand(3, 7, 0)
    mask = torch.arange(7)[None] >= (7 - torch.tensor(lengths))[:, None]
    _, state = layer(x.masked_fill(~mask[..., None], 1e3), attention_mask=mask)
    assert isinstance(state.memory, KVCache) and state.memory.lengths == tuple(lengths)
    assert state.memory.keys.shape[0] == 3
    calls = []
    op = layer.op

    def spy(*a, **kw):
        calls.append(kw.get("cu_seqlens"))
        return op(*a, **kw)

    spy.__name__ = op.func.__name__
    monkeypatch.setattr(layer, "op", functools.partial(spy))
    steps = [_rand(3, 1, 1 + t) for t in range(4)]
    ys = []
    for s in steps:
        y, state = layer(s, state, attention_mask=torch.ones(3, 1, dtype=torch.long))
        ys.append(y)
    assert calls == [None] * 4                                           # batched: no packed sequences
    assert state.memory.capacity >= MIN_CAPACITY if not grad else state.memory.capacity == 7 + 4
    assert state.memory.lengths == tuple(n + 4 for n in lengths) and state.lengths.tolist() == list(state.memory.lengths)
    for b in range(3):
        alone_y, alone = layer(x[b:b + 1, mask[b]])
        for t, s in enumerate(steps):
            y, alone = layer(s[b:b + 1], alone)
            assert (ys[t][b] - y[0]).abs().max() < 1e-10
        for got, want in zip(state.memory[b], alone.memory, strict=True):
            assert got.shape == want.shape and (got - want).abs().max() < 1e-10


@pytest.mark.parametrize("name", CACHES)
def test_several_tokens_per_row_on_ragged_rows(name):
    """T > 1 new tokens for rows of different lengths, unmasked: each row's queries see its own keys."""
    layer = _layer(name)
    x = _rand(2, 5, 0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    _, state = layer(x, attention_mask=mask)
    nxt = _rand(2, 3, 1)
    y, state2 = layer(nxt, state)
    for b in range(2):
        _, alone = layer(x[b:b + 1, mask[b]])
        y_b, alone = layer(nxt[b:b + 1], alone)
        assert (y[b] - y_b[0]).abs().max() < 1e-10


@pytest.mark.parametrize("name", CACHES)
def test_select_reorder_and_branches_mid_decode(name, grad):
    """Rows selected with repeats and reordered (beam search) mid-decode, and two continuations of one state, each
    as if decoded from scratch."""
    layer = _layer(name)
    x = _rand(3, 6, 0)
    _, state = layer(x)
    for t in range(3):
        _, state = layer(_rand(3, 1, 10 + t), state)
    picked = state.reorder(torch.tensor([2, 0, 2]))
    nxt = _rand(3, 1, 20)
    y, _ = layer(nxt, picked)
    y_again, _ = layer(nxt + 1, picked)                                  # a second branch from the same state
    y_first, _ = layer(nxt, picked)                                      # and the first again: not overwritten
    assert torch.equal(y, y_first)
    for i, row in enumerate([2, 0, 2]):
        _, s = layer(x[row:row + 1])
        for t in range(3):
            _, s = layer(_rand(3, 1, 10 + t)[row:row + 1], s)
        assert (layer(nxt[i:i + 1], s)[0] - y[i]).abs().max() < 1e-10
        assert (layer(nxt[i:i + 1] + 1, s)[0] - y_again[i]).abs().max() < 1e-10


@pytest.mark.parametrize("name", CACHES)
@torch.no_grad()
def test_save_and_load_mid_decode(name):
    """torch.save keeps the filled part (not the spare capacity); torch.load(weights_only=True) continues exactly."""
    layer = _layer(name)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    _, state = layer(_rand(2, 5, 0), attention_mask=mask)
    for t in range(3):
        _, state = layer(_rand(2, 1, t + 1), state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert isinstance(loaded.memory, KVCache) and loaded.memory.lengths == state.memory.lengths
    assert loaded.memory.capacity == state.memory.size < state.memory.capacity
    nxt = _rand(2, 1, 9)
    assert torch.equal(layer(nxt, loaded)[0], layer(nxt, state)[0])


@torch.no_grad()
def test_to_and_detach_leave_the_original_cache_intact():
    """A dtype move copies the buffers (and the kernel's inverse factor, left in float64); detach shares them, and
    the original and the detached cache both go on correctly."""
    layer = _layer("intention")
    _, state = layer(_rand(1, 5, 0))
    _, state = layer(_rand(1, 1, 1), state)
    nxt = _rand(1, 1, 2)
    want, _ = layer(nxt, state)
    moved = state.to(dtype=torch.float32)
    assert moved.memory.keys.dtype == torch.float32 and moved.memory.inverse.dtype == torch.float64
    layer.float()(nxt.float(), moved)
    layer.double()
    assert torch.equal(layer(nxt, state)[0], want)
    cut = state.detach()
    y_cut, _ = layer(nxt + 1, cut)
    assert torch.equal(layer(nxt, state)[0], want)
    assert torch.equal(layer(nxt + 1, state)[0], y_cut)


@pytest.mark.parametrize("name", ["softmax", "kernel"])
def test_gradients_through_a_kvcache_equal_the_tuples(name):
    op, kw = OPS[name]
    q, k, v = (t.requires_grad_() for t in _qkv(1, 9))
    w = torch.randn(1, 4, 2, 4, dtype=torch.float64)

    def run(start):
        _, cache = op(q[:, :5], k[:, :5], v[:, :5], initial_state=start, output_final_state=True, **kw)
        o, _ = op(q[:, 5:], k[:, 5:], v[:, 5:], initial_state=cache, output_final_state=True, **kw)
        return torch.autograd.grad((o * w).sum(), (q, k, v))

    for a, b in zip(run(KVCache.empty()), run(None)):
        assert (a - b).abs().max() < 1e-10


def test_a_cache_made_in_inference_mode_goes_on_outside_it():
    q, k, v = _qkv(1, 4)
    with torch.inference_mode():
        _, cache = local_polynomial_attention(q, k, v, initial_state=KVCache.empty(), output_final_state=True)
        _, cache = local_polynomial_attention(q[:, :1], k[:, :1], v[:, :1], initial_state=cache,
                                              output_final_state=True)
    with torch.no_grad():
        o, cache = local_polynomial_attention(q[:, :1], k[:, :1], v[:, :1], initial_state=cache,
                                              output_final_state=True)
    assert cache.lengths == (6,) and torch.isfinite(o).all()


def test_a_cache_given_as_tuples_is_checked_once():
    q, k, v = _qkv(1, 4)
    K = k.clone()
    K[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"state.memory \(K\) has non-finite values"):
        KVCache.wrap((K, v), "state.memory")
    with pytest.raises(ValueError, match="KVCache"):
        KVCache.wrap(k, "state.memory")


@pytest.mark.parametrize("name", ["gated_deltanet", "mesanet", "gla", "ttt_linear"])
def test_a_returned_state_written_into_is_checked_again(name):
    """A state an op returned is not read again to check it, unless something wrote into it since."""
    layer = _layer(name)
    _, state = layer(_rand(1, 5, 0))
    tensors = [state.memory] if isinstance(state.memory, torch.Tensor) else (
        list(state.memory.weights) if hasattr(state.memory, "weights") else list(state.memory))
    layer(_rand(1, 1, 1), state)                                         # vouched: fine
    tensors[0][..., 0, 0] = float("nan")                                 # an in-place write
    with pytest.raises(ValueError, match="non-finite"):
        layer(_rand(1, 1, 1), state)


def test_mesa_checks_a_state_made_indefinite_in_place():
    layer = _layer("mesanet")
    _, state = layer(_rand(1, 5, 0))
    state.memory[0].mul_(-10.0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        layer(_rand(1, 1, 1), state)
