"""TTRLayer in real batches: padding masks (left, right, holes), packed sequences, GQA and value expansion,
the state as a cache (select, reorder, to, detach, save and load), and every bad input."""

import io

import pytest
import torch

import ttr
from ttr.ops import MiniBatchState

from conftest import causal_presets

D_MODEL = 16
LENGTHS = [11, 4, 1, 7]   # per row of the batch; T = 11, mini-batches of 16 and chunks of 4 are cut mid-way


def _tensors(memory):
    if isinstance(memory, torch.Tensor):
        return [memory]
    if isinstance(memory, MiniBatchState):
        return [*memory.weights, *memory.start]
    return [t for m in memory for t in _tensors(m)]


def _layer(name, **kw):
    torch.manual_seed(0)
    return ttr.TTRLayer(D_MODEL, 2, name, chunk_size=4, **kw).double()


def _padded(side, x):
    """x [B, T, d] and a mask with LENGTHS real tokens per row, padding on `side`, garbage at the pads."""
    B, T, _ = x.shape
    pos = torch.arange(T)
    lengths = torch.tensor(LENGTHS)
    mask = pos[None] < lengths[:, None] if side == "right" else pos[None] >= (T - lengths)[:, None]
    if side == "holes":  # real tokens scattered: every other position first, then the rest
        order = torch.cat([pos[::2], pos[1::2]])
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, n in enumerate(LENGTHS):
            mask[b, order[:n]] = True
    return x.masked_fill(~mask[..., None], 1e3), mask


@pytest.mark.parametrize("side", ["left", "right", "holes"])
@pytest.mark.parametrize("name", causal_presets())
def test_padded_batch_equals_each_row_alone(name, side):
    """Outputs at real tokens, zeros at padding, final states, and one more decoded token, against each row run
    alone on its real tokens."""
    layer = _layer(name)
    B, T = len(LENGTHS), max(LENGTHS)
    x, mask = _padded(side, torch.randn(B, T, D_MODEL, dtype=torch.float64))
    nxt = torch.randn(B, 1, D_MODEL, dtype=torch.float64)
    y, state = layer(x, attention_mask=mask.long())
    y2, state2 = layer(nxt, state)                               # decoding continues every row from its own state
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    assert state.lengths.tolist() == LENGTHS and state2.lengths.tolist() == [n + 1 for n in LENGTHS]
    for b in range(B):
        alone, s_alone = layer(x[b:b + 1, mask[b]])
        assert (y[b, mask[b]] - alone[0]).abs().max() < 1e-10
        one, s_one = layer(nxt[b:b + 1], s_alone)
        assert (y2[b] - one[0]).abs().max() < 1e-10
        for got, want in ((state.select([b]), s_alone), (state2.select([b]), s_one)):
            assert (got.conv - want.conv).abs().max() < 1e-12
            for a, w in zip(_tensors(got.memory), _tensors(want.memory), strict=True):
                assert (a - w).abs().max() < 1e-10
            if isinstance(want.memory, MiniBatchState):
                assert got.memory.offset.tolist() == want.memory.offset.tolist()


@pytest.mark.parametrize("name", ["gated_deltanet", "ttt_linear", "mesanet", "softmax_attention", "gla"])
def test_packed_sequences_equal_separate_calls(name):
    """cu_seqlens through the layer: the short convolution and the memory reset at every boundary; gradients too."""
    layer = _layer(name)
    cu = torch.tensor([0, 5, 6, 15])
    x = torch.randn(1, 15, D_MODEL, dtype=torch.float64, requires_grad=True)
    y, state = layer(x, cu_seqlens=cu)
    y.square().sum().backward()
    g_packed = x.grad.clone()
    x.grad = None
    separate = torch.cat([layer(x[:, a:b])[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    separate.square().sum().backward()
    assert (y - separate).abs().max() < 1e-10 and (x.grad - g_packed).abs().max() < 1e-10
    assert state.batch_size == 3 and state.lengths.tolist() == [5, 1, 9]


def test_mask_of_ones_is_the_plain_call_and_padding_does_not_leak():
    layer = _layer("gated_deltanet")
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    y, _ = layer(x)
    assert torch.equal(layer(x, attention_mask=torch.ones(2, 9, dtype=torch.bool))[0], y)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, :3] = False
    a = layer(x, attention_mask=mask)[0]
    x[:, :3] = torch.randn(2, 3, D_MODEL, dtype=torch.float64) * 100  # what stands at the padding is never read
    assert torch.equal(layer(x, attention_mask=mask)[0], a)


def test_gqa_equals_the_expanded_heads():
    """num_kv_heads = 2 for 4 query heads equals 4 kv heads whose projections repeat each shared head twice."""
    torch.manual_seed(0)
    gqa = ttr.TTRLayer(32, 4, "gated_deltanet", num_kv_heads=2, expand_v=2).double()
    full = ttr.TTRLayer(32, 4, "gated_deltanet", expand_v=2).double()
    Dk, Dv = gqa.head_dim, gqa.value_dim
    assert (Dk, Dv) == (8, 16) and gqa.qkv.out_features == 32 + 2 * 8 + 2 * 16
    state = gqa.state_dict()

    def expand(w):  # rows [q | k (2 heads) | v (2 heads)] -> [q | k (4 heads) | v (4 heads)]
        q, k, v = w.split([32, 16, 32])
        rep = lambda t, d: t.view(2, d, *t.shape[1:]).repeat_interleave(2, 0).reshape(-1, *t.shape[1:])  # noqa: E731
        return torch.cat([q, rep(k, Dk), rep(v, Dv)])

    for key in ("qkv.weight", "conv.weight", "conv.bias"):
        state[key] = expand(state[key])
    full.load_state_dict(state)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    assert (gqa(x)[0] - full(x)[0]).abs().max() < 1e-12
    assert ttr.TTRLayer(32, 4, "gla", num_kv_heads=1)(torch.randn(1, 5, 32))[0].shape == (1, 5, 32)  # MQA


def test_conv_silu_applies_after_the_convolution():
    torch.manual_seed(0)
    plain, silu = _layer("deltanet"), _layer("deltanet", conv_silu=True)
    x = torch.randn(1, 6, D_MODEL, dtype=torch.float64)
    assert not torch.allclose(plain(x)[0], silu(x)[0])
    qkv, _ = silu.conv(silu.qkv(x))
    q = torch.nn.functional.silu(qkv)[..., :D_MODEL].view(1, 6, 2, 8)
    assert torch.equal(q.flatten(2) >= -0.2785, torch.ones_like(q.flatten(2), dtype=torch.bool))  # silu's minimum


@pytest.mark.parametrize("name", ["gated_deltanet", "titans", "mesanet", "intention", "local_linear"])
def test_cache_select_reorder_to_detach_save_load(name):
    layer = _layer(name)
    x = torch.randn(3, 6, D_MODEL, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, :2] = False
    _, state = layer(x, attention_mask=mask)
    assert state.batch_size == 3 and state.lengths.tolist() == [6, 4, 6]
    nxt = torch.randn(3, 1, D_MODEL, dtype=torch.float64)
    y_all, _ = layer(nxt, state)
    picked = state.reorder(torch.tensor([2, 0]))                 # beam search keeps rows 2 and 0, in that order
    y_pick, _ = layer(nxt[[2, 0]], picked)
    assert (y_pick - y_all[[2, 0]]).abs().max() < 1e-12
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)                                   # weights_only=True, torch's default
    assert (layer(nxt, loaded)[0] - y_all).abs().max() == 0
    y32, _ = layer.float()(nxt.float(), state.to(dtype=torch.float32))
    assert (y32.double() - y_all).abs().max() < 2e-3
    layer.double()
    grad_state = layer(x.requires_grad_(), attention_mask=mask)[1]
    assert all(not t.requires_grad for t in _tensors(grad_state.detach().memory))


def test_state_of_another_memory_batch_or_dtype_is_refused():
    layer = _layer("gated_deltanet")
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    _, state = layer(x)
    _, other = _layer("mesanet")(x)
    with pytest.raises(ValueError, match="state was made by a layer with memory 'mesa"):
        layer(x, other)
    with pytest.raises(ValueError, match="state holds 2 rows .* the input has 1"):
        layer(x[:1], state)
    with pytest.raises(ValueError, match="state was made for float64 inputs, x is torch.float32"):
        layer.float()(x.float(), state)
    with pytest.raises(ValueError, match="state must be the LayerState"):
        layer.double()(x, (state.conv, state.memory))
    with pytest.raises(ValueError, match="row numbers below the batch size 2"):
        state.select([0, 2])


@pytest.mark.parametrize("build,match", [
    (lambda: ttr.TTRLayer(64, 3, "gla"), "n_heads = 3 does not divide d_model = 64; pass head_dim"),
    (lambda: ttr.TTRLayer(64, 4, 123), "memory must be a preset name, a Preset or a Recipe, got int"),
    (lambda: ttr.TTRLayer(64, 4, "gla", num_kv_heads=3), "num_kv_heads = 3 must divide n_heads = 4"),
    (lambda: ttr.TTRLayer(64, 4, "gla", expand_v=0.3), "expand_v \\* head_dim must be a positive whole number"),
    (lambda: ttr.TTRLayer(64, 0, "gla"), "n_heads must be a positive int"),
    (lambda: ttr.TTRLayer(64, 4, "gla", mode="parallel"), "mode must be"),
])
def test_bad_construction_is_a_clear_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_head_dim_makes_any_head_count_work():
    layer = ttr.TTRLayer(64, 3, "gla", head_dim=16)
    assert layer(torch.randn(1, 4, 64))[0].shape == (1, 4, 64) and layer.out.in_features == 48


@pytest.mark.parametrize("call,match", [
    (lambda l: l(torch.randn(5, 16)), r"x must be \[B, T, d_model = 16\], got shape \[5, 16\]"),
    (lambda l: l(torch.randn(1, 5, 8)), r"got shape \[1, 5, 8\]"),
    (lambda l: l(torch.randn(1, 0, 16)), "T = 0"),
    (lambda l: l(torch.ones(1, 5, 16, dtype=torch.long)), "floating-point"),
    (lambda l: l([[0.0] * 16]), "must be a torch.Tensor"),
    (lambda l: l(torch.randn(2, 5, 16), attention_mask=torch.ones(2, 4)), r"attention_mask must be a tensor \[B, T\]"),
    (lambda l: l(torch.randn(2, 5, 16), attention_mask=torch.ones(2, 5)), "bool or integer"),
    (lambda l: l(torch.randn(2, 5, 16), attention_mask=torch.full((2, 5), 2)), "only 0 and 1"),
    (lambda l: l(torch.randn(1, 5, 16), cu_seqlens=torch.tensor([0, 3, 4])), "end at T = 5"),
    (lambda l: l(torch.randn(1, 5, 16), cu_seqlens=torch.tensor([0, 4, 3, 5])), "never decrease"),
    (lambda l: l(torch.randn(2, 5, 16), cu_seqlens=torch.tensor([0, 5])), "batch size must be 1"),
    (lambda l: l(torch.randn(1, 5, 16), attention_mask=torch.ones(1, 5), cu_seqlens=torch.tensor([0, 5])),
     "not both"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(ttr.TTRLayer(16, 2, "gated_deltanet"))


@pytest.mark.parametrize("name", ["gated_deltanet", "ttt_linear", "softmax_attention", "intention"])
def test_an_all_padding_row_keeps_an_empty_state_and_decodes(name):
    """A row with no real token: zeros out, its state is the empty one, and decoding starts it afresh."""
    layer = _layer(name)
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    y, state = layer(x, attention_mask=mask)
    assert torch.equal(y[1], torch.zeros_like(y[1])) and state.lengths.tolist() == [6, 0]
    assert (y[0] - layer(x[:1])[0][0]).abs().max() < 1e-10
    nxt = torch.randn(2, 1, D_MODEL, dtype=torch.float64)
    y2, _ = layer(nxt, state)
    assert (y2[1] - layer(nxt[1:])[0][0]).abs().max() < 1e-10


@pytest.mark.parametrize("conv_size", [0, 4])
@pytest.mark.parametrize("name", ["gated_deltanet", "ttt_linear", "softmax_attention"])
def test_a_batch_of_padding_only_reads_and_writes_nothing(name, conv_size):
    """Every row padding (every row finished in a decode step): zeros out, the state as it was."""
    layer = _layer(name, conv_size=conv_size)
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    y, empty = layer(x, attention_mask=torch.zeros(2, 5, dtype=torch.long))
    assert torch.equal(y, torch.zeros_like(y)) and empty.lengths.tolist() == [0, 0]
    assert (layer(x, empty)[0] - layer(x)[0]).abs().max() == 0           # the empty state is a fresh start
    _, state = layer(x)
    y, same = layer(x[:, :2], state, attention_mask=torch.zeros(2, 2, dtype=torch.bool))
    assert torch.equal(y, torch.zeros_like(y)) and same.lengths.tolist() == [5, 5]
    assert (layer(x[:, :1], same)[0] - layer(x[:, :1], state)[0]).abs().max() == 0


def test_select_takes_a_bool_mask_and_refuses_other_indices():
    layer = _layer("titans")
    _, state = layer(torch.randn(3, 5, D_MODEL, dtype=torch.float64))
    done = torch.tensor([True, False, False])
    kept = state.select(~done)
    assert kept.batch_size == 2 and torch.equal(kept.memory.weights[0], state.memory.weights[0][1:])
    with pytest.raises(ValueError, match="a bool index must mask the 3 rows, got shape \\[2\\]"):
        state.select(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="index must be a 1-D list or tensor of row numbers"):
        state.select([0.9, 2.7])
    shared = ttr.LayerState(None, MiniBatchState(state.memory.weights, state.memory.start, 3), state.lengths,
                            state.kind, state.dtype)   # a hand-built state: one int offset for every row
    assert shared.select([2]).memory.offset == 3 and shared.detach().to(dtype=torch.float32).memory.offset == 3


def test_a_state_from_another_configuration_is_refused():
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    _, state = _layer("gated_deltanet")(x)
    for other, what in ((_layer("gated_deltanet", conv_size=2), "conv 2"),
                        (_layer("gated_deltanet", num_kv_heads=1), "kv 1"),
                        (_layer("gated_deltanet", expand_v=2), "of 8 x 16")):
        with pytest.raises(ValueError, match=f"state was made by a layer with memory .*; this layer's memory is .*{what}"):
            other(x, state)
    with pytest.raises(ValueError, match="x holds no rows \\(B = 0"):
        _layer("gated_deltanet")(x[:0])


def test_minibatch_start_weights_are_checked():
    q, k, v = (torch.randn(2, 5, 2, 4, dtype=torch.float64) for _ in range(3))
    S = torch.zeros(2, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"initial_state.start \(S\) must have shape \[2, 2, 4, 4\], got \[1, 2, 4, 4\]"):
        ttr.ops.ttt_linear(q, k, v, torch.full((2, 5, 2), 0.1, dtype=torch.float64),
                           initial_state=MiniBatchState((S,), (S[:1],), 1))
