"""SOFT and Skyformer: with every token a landmark (float64, ridge 0) they equal the exact Gaussian kernel smoother
they approximate; with fewer they equal the literal preconditioned GD step on the landmarks' span (oracle); the error
falls as landmarks are added, towards the smoother and not the kernel ridge regression; packed sequences and padding
answer each sequence as alone; gradients; bad input."""

import math

import pytest
import torch

from ttr import oracle
from ttr.ops import nystrom_error, skyformer, soft_attention
from ttr.ops.nystrom import _sampled_rows, _segment_means

from conftest import F64_ATOL, make_qkv, max_rel

OPS = {"soft": soft_attention, "skyformer": skyformer}


def smoother(q, k, v, scale=None):
    """sum_i kappa(q_t, k_i) v_i over the whole sequence, kappa(a, b) = exp(-scale ||a - b||^2 / 2), per pair."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sq = ((q[:, :, None] - k[:, None]) ** 2).sum(-1)                     # [B, Tq, Tk, H]
    return torch.einsum("bsth,bthd->bshd", torch.exp(-0.5 * scale * sq), v)


def landmarks_of(method, q, k, m, mask=None):
    """The landmarks the op picks, [B, m, H, Dk], differentiable in q and k."""
    if method == "soft":
        return _segment_means(k.transpose(1, 2), mask, m)[0].transpose(1, 2)
    return _sampled_rows(q.transpose(1, 2), k.transpose(1, 2), mask, m, "strided", None).transpose(1, 2)


def smooth_inputs(T=64, H=2, D=16, seed=0, dtype=torch.float64):
    """Queries and keys of neighbouring tokens close (a smooth walk in a 4-d latent, read by correlated maps): the
    kernel matrix has a decaying spectrum, as projected hidden states give, so landmarks can capture it."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(1, T, H, 4, generator=gen, dtype=dtype).cumsum(1)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)
    Wq = 0.5 * torch.randn(H, 4, D, generator=gen, dtype=dtype)
    Wk = Wq + 0.1 * torch.randn(H, 4, D, generator=gen, dtype=dtype)
    q = torch.einsum("bthz,hzd->bthd", z, Wq)
    k = torch.einsum("bthz,hzd->bthd", z, Wk)
    return q, k, torch.randn(1, T, H, 3, generator=gen, dtype=dtype)


@pytest.mark.parametrize("steps", [None, 60])
@pytest.mark.parametrize("tied", [True, False])
def test_soft_with_every_key_a_landmark_is_the_exact_smoother(steps, tied):
    """T segments of one key each: the landmarks are the keys, and kappa(Q, K) kappa(K, K)^+ kappa(K, K) V =
    kappa(Q, K) V, by the exact pseudo-inverse or by enough Newton steps. The paper ties q = k."""
    q, k, v = make_qkv(2, 11, 2, 6, 3)
    q = k if tied else q
    o, state = soft_attention(q, k, v, n_landmarks=11, ridge=0.0, newton_steps=steps)
    assert state is None and max_rel(o, smoother(q, k, v)) < 1e-9


@pytest.mark.parametrize("steps", [None, 30])
def test_skyformer_with_every_row_a_landmark_is_the_exact_smoother(steps):
    """All 2T rows of [Q; K] as landmarks: the Nystrom approximation of kappa([Q; K], [Q; K]) is exact, and so its
    off-diagonal block kappa(Q, K)."""
    q, k, v = make_qkv(2, 9, 2, 6, 3)
    o, _ = skyformer(q, k, v, n_landmarks=18, ridge=0.0, newton_steps=steps, scale=0.3)
    assert max_rel(o, smoother(q, k, v, scale=0.3)) < 1e-9


@pytest.mark.parametrize("method, m, ridge", [("soft", 4, 0.01), ("soft", 3, 0.0), ("skyformer", 5, 0.1)])
def test_few_landmarks_equal_the_literal_preconditioned_gd_step(method, m, ridge):
    """With m < T landmarks (and the exact pseudo-inverse) each op is one step of batch GD from 0 on the whole
    sequence's regression in the landmarks' span, preconditioned by (kappa(L, L) + ridge I)^+: the oracle."""
    q, k, v = make_qkv(2, 10, 2, 4, 3)
    o, _ = OPS[method](q, k, v, n_landmarks=m, ridge=ridge, newton_steps=None)
    assert max_rel(o, oracle.nystrom_step(q, k, v, landmarks_of(method, q, k, m), ridge=ridge)) < F64_ATOL


def test_the_default_newton_steps_approach_the_pseudo_inverse():
    """SOFT's 20 Newton steps and Skyformer's 6 cubic ones (its published count: 2e-3 short here) on the landmarks
    of smooth inputs."""
    q, k, v = smooth_inputs(T=48)
    for method in OPS:
        exact, _ = OPS[method](q, k, v, n_landmarks=8, newton_steps=None)
        newton, _ = OPS[method](q, k, v, n_landmarks=8)
        assert max_rel(newton, exact) < 1e-2, method


@pytest.mark.parametrize("method", ["soft", "skyformer"])
def test_the_error_falls_with_landmarks_towards_the_smoother_not_the_regression(method):
    """On inputs with a decaying kernel spectrum the error against the smoother falls as landmarks are added (to 0
    with every token a landmark); the error against the exact kernel ridge regression stays at the gap between the
    two estimators: SOFT and Skyformer approximate the smoother."""
    q, k, v = smooth_inputs()
    k = q if method == "soft" else k
    top = 64 if method == "soft" else 128
    errors = [nystrom_error(q, k, v, method, m, newton_steps=None, ridge=0.0) for m in (4, 8, 16, 32, top)]
    smooth = [e["smoother"] for e in errors]
    assert all(a > b for a, b in zip(smooth, smooth[1:])), smooth
    assert smooth[0] > 0.05 and smooth[-1] < 1e-8
    gap = errors[-1]["smoother_vs_regression"]
    assert gap > 0.5 and abs(errors[-1]["regression"] - gap) < 1e-6


@pytest.mark.parametrize("method, kwargs", [("soft", dict(n_landmarks=4)), ("skyformer", dict(n_landmarks=6)),
                                            ("soft", dict(n_landmarks=20)), ("skyformer", dict(n_landmarks=40))])
def test_packed_sequences_and_padding_answer_each_sequence_as_alone(method, kwargs):
    op = OPS[method]
    q, k, v = make_qkv(1, 30, 2, 4, 3)
    cu = torch.tensor([0, 7, 7, 19, 30])
    o, _ = op(q, k, v, cu_seqlens=cu, **kwargs)
    bounds = cu.tolist()
    alone = torch.cat([op(q[:, a:b], k[:, a:b], v[:, a:b], **kwargs)[0]
                       for a, b in zip(bounds, bounds[1:]) if b > a], 1)
    assert max_rel(o, alone) < F64_ATOL
    # a key-padding mask, left padding in one row and right in the other
    q2, k2, v2 = (x[0, :24].reshape(2, 12, *x.shape[2:]) for x in (q, k, v))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, 9:] = 0
    o, _ = op(q2, k2, v2, attention_mask=mask, **kwargs)
    first, _ = op(q2[:1, 3:], k2[:1, 3:], v2[:1, 3:], **kwargs)
    second, _ = op(q2[1:, :9], k2[1:, :9], v2[1:, :9], **kwargs)
    assert max_rel(o[:1, 3:], first) < F64_ATOL and max_rel(o[1:, :9], second) < F64_ATOL
    assert o[0, :3].abs().max() == 0 and o[1, 9:].abs().max() == 0


def test_given_landmarks_per_sequence():
    """A learned sampler (SOFT's strided convolution) passes its own landmarks, one set per packed sequence."""
    q, k, v = make_qkv(1, 14, 2, 4, 3)
    L = torch.randn(2, 3, 2, 4, dtype=torch.float64)
    o, _ = soft_attention(q, k, v, landmarks=L, cu_seqlens=torch.tensor([0, 6, 14]), newton_steps=None)
    assert max_rel(o[:, :6], oracle.nystrom_step(q[:, :6], k[:, :6], v[:, :6], L[:1], ridge=0.01)) < F64_ATOL
    assert max_rel(o[:, 6:], oracle.nystrom_step(q[:, 6:], k[:, 6:], v[:, 6:], L[1:], ridge=0.01)) < F64_ATOL


def test_random_sampling_is_the_generators():
    q, k, v = make_qkv(1, 40, 2, 4, 3)
    draw = lambda seed: skyformer(q, k, v, n_landmarks=8, sampling="random",  # noqa: E731
                                  generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


@pytest.mark.parametrize("method", ["soft", "skyformer"])
def test_float32_and_bfloat16(method):
    """Float32 inputs compute in float32 and agree with float64; bfloat16 inputs accumulate in float32."""
    q, k, v = smooth_inputs(T=40)
    ref, _ = OPS[method](q, k, v, n_landmarks=8)
    o32, _ = OPS[method](q.float(), k.float(), v.float(), n_landmarks=8)
    o16, _ = OPS[method](q.bfloat16(), k.bfloat16(), v.bfloat16(), n_landmarks=8)
    assert o32.dtype == torch.float32 and o16.dtype == torch.bfloat16
    assert max_rel(o32, ref) < 1e-4 and max_rel(o16, ref) < 0.1


@pytest.mark.parametrize("method", ["soft", "skyformer"])
def test_gradients(method):
    """The Newton iterations differentiate (gradcheck), and with the exact pseudo-inverse the gradients equal the
    oracle's, whose landmarks are picked from the same q, k."""
    q, k, v = make_qkv(1, 6, 1, 3, 2, requires_grad=True)
    op = OPS[method]
    assert torch.autograd.gradcheck(lambda q, k, v: op(q, k, v, n_landmarks=3)[0], (q, k, v))
    o, _ = op(q, k, v, n_landmarks=3, newton_steps=None)
    ridge = 0.01 if method == "soft" else 0.1
    ref = oracle.nystrom_step(q, k, v, landmarks_of(method, q, k, 3), ridge=ridge)
    w = torch.randn_like(o)
    grads = torch.autograd.grad((o * w).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert all(torch.isfinite(g).all() and max_rel(g, r) < 1e-8 for g, r in zip(grads, refs))


@pytest.mark.parametrize("method", ["soft", "skyformer"])
@pytest.mark.parametrize("kwargs, match", [
    (dict(causal=True), "no causal form.*causal=True"),
    (dict(mode="recurrent"), "no causal form.*recurrent"),
    (dict(initial_state=(1, 2)), "no causal form.*initial_state"),
    (dict(output_final_state=True), "no causal form.*output_final_state"),
    (dict(mode="fused"), "mode must be one of"),
    (dict(n_landmarks=0), "n_landmarks must be a positive int, got 0"),
    (dict(newton_steps=-1), "newton_steps must be"),
    (dict(ridge=-0.1), "ridge must be a finite number >= 0, got -0.1"),
    (dict(scale=0.0), "scale must be a positive"),
    (dict(landmarks=torch.zeros(2, 3, 2, 5, dtype=torch.float64)), r"landmarks must be \[B, m, H, Dk\]"),
    (dict(attention_mask=torch.full((2, 8), 2)), "attention_mask must hold only 0 and 1"),
    (dict(attention_mask=torch.ones(2, 7)), r"attention_mask must be a tensor \[B, T\]"),
    (dict(attention_mask=torch.ones(2, 8)), "attention_mask must be bool or integer"),
])
def test_bad_input(method, kwargs, match):
    q, k, v = make_qkv(2, 8, 2, 4, 3)
    with pytest.raises(ValueError, match=match):
        OPS[method](q, k, v, **kwargs)


def test_bad_input_specific():
    q, k, v = make_qkv(1, 8, 2, 4, 3)
    with pytest.raises(ValueError, match="sampling must be one of"):
        skyformer(q, k, v, sampling="leverage")
    with pytest.raises(ValueError, match="not both"):
        soft_attention(q, k, v, attention_mask=torch.ones(1, 8), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="method must be one of"):
        nystrom_error(q, k, v, "nystromformer", 4)
    assert math.isfinite(nystrom_error(q, k, v, "skyformer", 4)["smoother"])
