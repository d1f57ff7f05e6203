"""The feature-mapped and kernel presets (issue 16) as layers: each against its paper's equations written out from
the layer's own parameters, the whole-sequence encoders (SOFT, Skyformer) on padded and packed batches, and the
limits each one states (cosFormer's maximum length, no state for an encoder, no encoder in a causal model)."""

import math

import pytest
import torch
import torch.nn.functional as F

import ttr
from ttr.models import LanguageModel, LMConfig

D_MODEL, H = 32, 2


def _layer(name, **kw):
    torch.manual_seed(0)
    return ttr.TTRLayer(D_MODEL, H, name, conv_size=0, output_gate=False, norm=False, **kw).double()


def _qkv(layer, x):
    """The layer's q, k, v [B, T, H, D] (no convolution) and its memory's output, through forward's own path."""
    q, k, v = layer.qkv(x).split(layer.widths, dim=-1)
    B, T = x.shape[:2]
    return (q.view(B, T, H, layer.head_dim), k.view(B, T, H, layer.head_dim), v.view(B, T, H, layer.value_dim))


def _memory_output(layer, x):
    """Undo the output projection: o [B, T, H, Dv] of the memory (norm and output gate are off)."""
    y, _ = layer(x)
    W = layer.out.weight  # [d_model, H Dv]
    return torch.linalg.lstsq(W, y.reshape(-1, D_MODEL).T).solution.T.reshape(*x.shape[:2], H, layer.value_dim)


def _normalized(weights, v):
    """sum_i w_ti v_i / sum_i w_ti per head: weights [B, H, T, T], v [B, T, H, Dv]."""
    num = torch.einsum("bhts,bshd->bthd", weights, v)
    return num / weights.sum(-1).transpose(1, 2)[..., None]


def test_based_is_the_taylor_kernel_on_16_dim_keys():
    layer = _layer("based")
    assert layer.head_dim == 16 and layer.value_dim == D_MODEL // H
    x = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    q, k, v = _qkv(layer, x)
    s = torch.einsum("bthd,bshd->bhts", q, k) / 4.0
    w = (1 + s + s ** 2 / 2) * torch.ones(23, 23, dtype=torch.bool).tril()
    assert (_memory_output(layer, x) - _normalized(w, v)).abs().max() < 1e-9


def test_cosformer_is_relu_attention_reweighted_by_the_cosine_of_the_distance():
    layer = _layer("cosformer")
    x = torch.randn(2, 29, D_MODEL, dtype=torch.float64)
    q, k, v = _qkv(layer, x)
    t = torch.arange(29, dtype=torch.float64)
    M = layer.max_len
    cos = torch.cos(math.pi / 2 * (t[:, None] - t[None, :]) / M) * (t[:, None] >= t[None, :])
    w = torch.einsum("bthd,bshd->bhts", F.relu(q), F.relu(k)) * cos
    got = _memory_output(layer, x)
    want = _normalized(w, v)
    seen = w.sum(-1).transpose(1, 2) > 0
    assert (got - want)[seen].abs().max() < 1e-9


def test_cosformer_refuses_a_context_beyond_its_maximum_length():
    layer = _layer("cosformer")
    layer.max_len = 16
    x = torch.randn(1, 10, D_MODEL, dtype=torch.float64)
    _, state = layer(x)
    with pytest.raises(ValueError, match="holds for 16 tokens per sequence; a sequence reached 20"):
        layer(x, state)


def test_gated_rfa_is_the_papers_recurrence():
    """S_t = sigma_t S_{t-1} + (1 - sigma_t) phi(k_t) v_t^T, o_t = S_t^T phi(q_t) scale, from the layer's own gate
    and random Fourier features (their bandwidth moved off its start)."""
    layer = _layer("rfa_gated")
    with torch.no_grad():
        layer.feature_map.log_sigma.add_(0.3)
        layer.inputs["g"].proj.weight.normal_(0, 0.3)
    x = torch.randn(1, 17, D_MODEL, dtype=torch.float64)
    q, k, v = _qkv(layer, x)
    sigma = torch.sigmoid(layer.inputs["g"].proj(x))                 # [B, T, H]
    fq, fk = layer.feature_map(q), layer.feature_map(k)
    S = torch.zeros(1, H, fk.shape[-1], layer.value_dim, dtype=torch.float64)
    outs = []
    for t in range(17):
        S = sigma[:, t, :, None, None] * S + (1 - sigma[:, t, :, None, None]) * fk[:, t, :, :, None] * v[:, t, :, None]
        outs.append(torch.einsum("bhd,bhde->bhe", fq[:, t] * layer.head_dim ** -0.5, S))
    assert (_memory_output(layer, x) - torch.stack(outs, 1)).abs().max() < 1e-9


@pytest.mark.parametrize("name", ["hedgehog", "rebased", "dijiang", "rfa"])
def test_learnable_maps_are_the_layers_own_and_learn(name):
    layer = _layer(name)
    x = torch.randn(2, 19, D_MODEL, dtype=torch.float64)
    y, _ = layer(x)
    y.square().sum().backward()
    own = dict(layer.feature_map.named_parameters())
    assert own and all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in own.values())
    assert any(n.startswith("feature_map.") for n in layer.state_dict())  # parameters and seeded buffers saved


def test_dijiang_decays_are_log_spaced_from_1_over_32_to_1_over_512():
    layer = ttr.TTRLayer(64, 4, "dijiang")
    lam = -torch.expm1(layer.inputs["g"].log_gamma.double())
    assert torch.allclose(lam, torch.tensor([1 / 32, (1 / 32) ** (2 / 3) * (1 / 512) ** (1 / 3),
                                             (1 / 32) ** (1 / 3) * (1 / 512) ** (2 / 3), 1 / 512],
                                            dtype=torch.float64), rtol=1e-5)


def test_sliding_window_layer_forgets_beyond_its_window():
    layer = _layer("sliding_window")
    x = torch.randn(1, 100, D_MODEL, dtype=torch.float64)
    y, _ = layer(x)
    x2 = x.clone()
    x2[:, :30] = torch.randn(1, 30, D_MODEL, dtype=torch.float64)   # tokens more than 64 before t = 94..99
    y2, _ = layer(x2)
    assert (y[:, 94:] - y2[:, 94:]).abs().max() < 1e-12 and (y[:, 90] - y2[:, 90]).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["soft", "skyformer"])
def test_encoders_answer_each_padded_or_packed_sequence_as_alone_and_keep_no_state(name):
    layer = _layer(name)
    x = torch.randn(2, 21, D_MODEL, dtype=torch.float64)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[0, :4] = False
    mask[1, 15:] = False
    y, state = layer(x, attention_mask=mask)
    for b in range(2):
        alone, _ = layer(x[b:b + 1, mask[b]])
        assert (y[b, mask[b]] - alone[0]).abs().max() < 1e-10
    assert y[~mask].abs().max() == 0 and state.memory is None
    packed, _ = layer(x[mask][None], cu_seqlens=torch.tensor([0, 17, 32]))
    assert (packed[0] - y[mask]).abs().max() < 1e-10
    with pytest.raises(ValueError, match="reads the whole sequence"):
        layer(x[:, :1], state)
    x_future = x.clone()
    x_future[:, -1] += 1.0                                          # every answer reads the last token
    assert (layer(x_future)[0][:, 0] - layer(x)[0][:, 0]).abs().max() > 1e-8


def test_a_causal_model_refuses_an_encoder_and_takes_based_with_sliding_windows():
    with pytest.raises(ValueError, match="reads the whole sequence"):
        LMConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, memory="soft")
    model = LanguageModel(LMConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2,
                                   memory=("based", "sliding_window")))
    ids = torch.randint(0, 16, (2, 9))
    logits = model(ids)
    assert logits.shape == (2, 9, 16) and bool(torch.isfinite(logits).all())
