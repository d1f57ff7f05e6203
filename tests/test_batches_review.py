"""Review of real batches (packed sequences, padding masks, GQA, the layer cache): behaviour that a mutation
pass found unpinned by the other test files. Each test names what it pins down."""

import dataclasses
import io
import re

import pytest
import torch

import ttr
from ttr import ops
from ttr.ops import MiniBatchState

D_MODEL = 16


def _layer(name, **kw):
    torch.manual_seed(0)
    return ttr.TTRLayer(D_MODEL, 2, name, chunk_size=4, **kw).double()


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _qkv(T, seed=0, Dv=3):
    return _rand(1, T, 2, 4, seed=seed), _rand(1, T, 2, 4, seed=seed + 1), _rand(1, T, 2, Dv, seed=seed + 2)


# ------------------------------------------------------------------------------------------ packed caches

@pytest.mark.parametrize("op", [ops.local_polynomial_attention, ops.kernel_regression])
def test_packed_cache_list_must_hold_one_cache_per_sequence(op):
    """A list of caches shorter or longer than the number of sequences is refused (not an IndexError, not
    silently ignored)."""
    q, k, v = _qkv(10)
    cu = torch.tensor([0, 4, 10])
    want = re.escape("initial_state with cu_seqlens must be a list of the 2 sequences' caches (None for a sequence "
                     "without one), got list")
    for caches in ([None], [None, None, None]):
        with pytest.raises(ValueError, match=want):
            op(q, k, v, cu_seqlens=cu, initial_state=caches)


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("op", [ops.local_polynomial_attention, ops.kernel_regression])
def test_an_empty_packed_sequence_gets_an_empty_cache(op, cached):
    """A sequence with no tokens and no cache ends with an empty cache (K [1, 0, H, Dk], V [1, 0, H, Dv], and the
    kernel memory's factor [1, H, 0, 0] in float64), not None, whether or not other sequences bring caches; the
    others' caches are their own tokens after their cache; and a call that continues from the empty cache equals
    a fresh call."""
    q, k, v = _qkv(7)
    K0, V0 = _rand(1, 2, 2, 4, seed=20), _rand(1, 2, 2, 3, seed=21)
    caches = [(K0, V0), None, None] if cached else None
    _, final = op(q, k, v, cu_seqlens=torch.tensor([0, 3, 3, 7]), initial_state=caches, output_final_state=True)
    assert len(final) == 3
    shapes = [tuple(t.shape) for t in final[1]]
    want = [(1, 0, 2, 4), (1, 0, 2, 3)] + ([(1, 2, 0, 0)] if op is ops.kernel_regression else [])
    assert shapes == want
    if op is ops.kernel_regression:
        assert final[1][2].dtype == torch.float64
    assert torch.equal(final[0][0], torch.cat([K0, k[:, :3]], 1) if cached else k[:, :3])
    assert torch.equal(final[2][1], v[:, 3:])
    q2, k2, v2 = _qkv(4, seed=10)
    cont, _ = op(q2, k2, v2, initial_state=final[1])
    fresh, _ = op(q2, k2, v2)
    assert (cont - fresh).abs().max() < 1e-12


# ------------------------------------------------------------------------------------------ mini-batch offsets

def test_minibatch_offset_outside_the_batch_is_refused():
    """A MiniBatchState's offset counts the tokens done in the current mini-batch: it must lie in [0, batch_size)
    and be an int or one int per row."""
    q, k, v = (_rand(2, 6, 2, 4, seed=s) for s in range(3))
    lr = torch.full((2, 6, 2), 0.1, dtype=torch.float64)
    S = torch.zeros(2, 2, 4, 4, dtype=torch.float64)
    cases = [(4, "initial_state.offset must lie in [0, batch_size=4), got [4, 4]"),
             (torch.tensor([0, -1]), "initial_state.offset must lie in [0, batch_size=4), got [0, -1]"),
             (torch.tensor([1, 1, 1]),
              "initial_state.offset must be an int or an int tensor [2], got tensor([1, 1, 1])")]
    for offset, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            ops.ttt_linear(q, k, v, lr, batch_size=4, initial_state=MiniBatchState((S,), (S,), offset))


# ------------------------------------------------------------------------------------------ the layer

class _Spy:
    """Stands in for a layer's op and records the mode of every call."""

    def __init__(self, op):
        self.op, self.func, self.modes = op, op.func, []

    def __call__(self, *args, **kwargs):
        self.modes.append(kwargs["mode"])
        return self.op(*args, **kwargs)


@pytest.mark.parametrize("name", ["gated_deltanet", "softmax_attention"])
def test_one_token_per_sequence_runs_the_recurrent_form(name):
    """Decoding (every row or packed sequence one token long, however many rows) runs the op's recurrent form,
    not a chunk padded to chunk_size per token; anything longer runs the layer's mode."""
    layer = _layer(name)
    spy = layer.op = _Spy(layer.op)
    with torch.no_grad():  # inference, as decoding runs
        x = _rand(3, 5, D_MODEL, seed=0)
        mask = torch.ones(3, 5, dtype=torch.bool)
        mask[1, :3] = False
        _, state = layer(x, attention_mask=mask)                                           # longest 5
        _, state = layer(_rand(3, 1, D_MODEL, seed=1), state)                              # one token per row
        _, state = layer(_rand(3, 2, D_MODEL, seed=2), state,
                         attention_mask=torch.tensor([[1, 1], [0, 1], [1, 0]]))            # longest 2
        _, state = layer(_rand(3, 2, D_MODEL, seed=3), state,
                         attention_mask=torch.tensor([[0, 1], [1, 0], [0, 1]]))            # 3 rows of 1 token
        layer(_rand(1, 3, D_MODEL, seed=4), cu_seqlens=torch.tensor([0, 1, 2, 3]))         # 3 packed tokens
    assert spy.modes == ["chunk", "recurrent", "chunk", "recurrent", "recurrent"]
    assert state.lengths.tolist() == [9, 5, 8]


@pytest.mark.parametrize("name", ["softmax_attention", "intention"])
def test_a_batched_cache_continues_under_a_padding_mask(name):
    """A nonparametric memory's cache from an unmasked call (one batched (K, V) tuple) goes on under a mask: each
    row continues from its own rows of the cache, as it would alone."""
    layer = _layer(name)
    _, state = layer(_rand(2, 5, D_MODEL, seed=0))
    assert isinstance(state.memory, tuple)
    nxt = _rand(2, 3, D_MODEL, seed=1)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    y, state2 = layer(nxt, state, attention_mask=mask)
    assert state2.lengths.tolist() == [8, 7]
    for b in range(2):
        alone, s_alone = layer(nxt[b:b + 1, mask[b]], state.select([b]))
        assert (y[b, mask[b]] - alone[0]).abs().max() < 1e-10
        for got, want in zip(state2.memory[b], s_alone.memory, strict=True):
            assert got.shape == want.shape and (got - want).abs().max() < 1e-10


@pytest.mark.parametrize("name,memory", [("ttt_linear", lambda s: s.memory.weights[0]),
                                         ("gated_deltanet", lambda s: MiniBatchState((s.memory,), (s.memory,), 0))])
def test_a_state_holding_the_wrong_kind_of_memory_is_refused(name, memory):
    """A LayerState of the right kind string whose memory is not what that memory keeps (a bare tensor for a
    mini-batch learner, a MiniBatchState for the delta rule) is refused by name."""
    layer = _layer(name)
    x = _rand(2, 4, D_MODEL, seed=0)
    _, state = layer(x)
    bad = dataclasses.replace(state, memory=memory(state))
    what = type(bad.memory).__name__
    with pytest.raises(ValueError, match=re.escape(f"state.memory is a {what}, not what memory {layer.kind!r} keeps")):
        layer(x, bad)


def test_empty_input_and_zero_value_width_are_refused_by_the_layer():
    layer = ttr.TTRLayer(D_MODEL, 2, "gated_deltanet")
    with pytest.raises(ValueError, match=re.escape("x holds no tokens (T = 0, shape [1, 0, 16]); call the layer with "
                                                   "at least one")):
        layer(torch.randn(1, 0, D_MODEL))
    with pytest.raises(ValueError, match=re.escape("expand_v * head_dim must be a positive whole number, got 0 * 8")):
        ttr.TTRLayer(D_MODEL, 2, "gated_deltanet", expand_v=0)


# ------------------------------------------------------------------------------------------ LayerState

def test_to_keeps_wide_accumulators_wide():
    """state.to(dtype=...) casts what is in the input dtype (the conv cache) and leaves the wider accumulators as
    they are: the exact memory's float64 statistics under float32 inputs, linear attention's float32 state under
    bfloat16 inputs; their values are untouched."""
    torch.manual_seed(0)
    mesa = ttr.TTRLayer(D_MODEL, 2, "mesanet", chunk_size=4)
    _, state = mesa(torch.randn(2, 5, D_MODEL))
    moved = state.to(dtype=torch.bfloat16)
    assert moved.dtype == "bfloat16" and moved.conv.dtype == torch.bfloat16
    assert [t.dtype for t in moved.memory] == [torch.float64, torch.float64]
    assert all(torch.equal(a, b) for a, b in zip(moved.memory, state.memory))
    gla = ttr.TTRLayer(D_MODEL, 2, "gla", chunk_size=4).bfloat16()
    _, state = gla(torch.randn(2, 5, D_MODEL, dtype=torch.bfloat16))
    moved = state.to(dtype=torch.float16)
    assert moved.conv.dtype == torch.float16 and moved.memory.dtype == torch.float32
    assert torch.equal(moved.memory, state.memory)


def test_select_takes_negative_rows_and_refuses_rows_out_of_range():
    layer = _layer("gated_deltanet")
    _, state = layer(_rand(2, 4, D_MODEL, seed=0))
    last = state.select([-1])
    assert torch.equal(last.memory, state.memory[1:]) and torch.equal(last.conv, state.conv[1:])
    for index in ([-3], [0, 2]):
        with pytest.raises(ValueError, match=re.escape(f"index must hold row numbers below the batch size 2, got "
                                                       f"{index}")):
            state.select(index)


def test_detach_cuts_the_conv_cache_and_the_memory_from_the_graph():
    layer = _layer("titans")
    x = _rand(2, 5, D_MODEL, seed=0).requires_grad_()
    _, state = layer(x)
    assert state.conv.requires_grad
    cut = state.detach()
    assert not cut.conv.requires_grad
    assert not any(t.requires_grad for t in (*cut.memory.weights, *cut.memory.start))
    assert torch.equal(cut.conv, state.conv) and cut.memory.offset.tolist() == state.memory.offset.tolist() == [5, 5]


def test_select_keeps_an_offset_shared_by_every_row():
    """A MiniBatchState's offset may be one number for all rows (a 0-d tensor): select keeps it as it is, and the
    selected rows go on exactly as with per-row offsets."""
    layer = _layer("ttt_linear")
    _, state = layer(_rand(3, 5, D_MODEL, seed=0))
    assert state.memory.offset.tolist() == [5, 5, 5]
    shared = dataclasses.replace(state, memory=dataclasses.replace(state.memory, offset=torch.tensor(5)))
    picked = shared.select([2, 0])
    assert picked.memory.offset.dim() == 0 and int(picked.memory.offset) == 5
    nxt = _rand(2, 3, D_MODEL, seed=1)
    y_shared, s_shared = layer(nxt, picked)
    y_rows, s_rows = layer(nxt, state.select([2, 0]))
    assert (y_shared - y_rows).abs().max() < 1e-12
    assert s_shared.memory.offset.tolist() == s_rows.memory.offset.tolist() == [8, 8]
