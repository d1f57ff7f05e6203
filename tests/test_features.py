"""Feature maps: each map's defining kernel identity, the positivity it declares, seeded buffers in checkpoints,
clear errors, and linear_attention with every map == the float64 oracle (chunk and recurrent, initial state)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ttr import oracle
from ttr.features import (FEATURE_MAPS, PositiveRandomFeatures, cosformer_features, feature_dim,
                          get_feature_map, hedgehog_distillation_loss, make_feature_map)
from ttr.ops import linear_attention

from conftest import F64_ATOL, make_gate, make_qkv, max_rel


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _perturb(module, seed=5, size=0.5):
    """Move a learnable map's parameters off their initial values, so that tests see a trained-looking map."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(size * torch.randn(p.shape, generator=gen))
    return module


def _gram(phi, q, k):
    return phi(q) @ phi(k).T


# ---------------------------------------------------------------- each map's kernel

def test_performer_estimates_the_softmax_kernel():
    """E[phi(q)^T phi(k)] = exp(q^T k / sqrt(D)); 2^14 features give ~1% here (the estimate's spread)."""
    q, k = 0.3 * _randn(6, 8, seed=1), 0.3 * _randn(5, 8, seed=2)
    phi = make_feature_map("prf", 8, n_features=2 ** 14, seed=1)
    assert max_rel(_gram(phi, q, k), torch.exp(q @ k.T / 8 ** 0.5)) < 0.03
    # the module and the registry's lazy form draw the same W from the same seed
    x = _randn(3, 8, dtype=torch.float32)
    assert torch.equal(phi(x), PositiveRandomFeatures(n_features=2 ** 14, seed=1)(x))


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_rfa_estimates_the_gaussian_kernel(sigma):
    """E[phi(q)^T phi(k)] = exp(-||q - k||^2 / (2 sigma^2)), within ~1 / sqrt(m)."""
    q, k = 0.5 * _randn(6, 8, seed=1), 0.5 * _randn(5, 8, seed=2)
    phi = make_feature_map("rfa", 8, n_features=2 ** 14, seed=3, sigma=sigma)
    phi.normalize = False
    exact = torch.exp(-torch.cdist(q, k) ** 2 / (2 * sigma ** 2))
    assert (_gram(phi, q, k) - exact).abs().max() < 0.03


def test_rfa_on_the_unit_sphere_is_the_softmax_kernel_up_to_a_constant():
    """RFA normalizes q, k: exp(-||q^ - k^||^2 / 2) = exp(-1) exp(q^T k^): softmax's kernel, up to a factor."""
    q, k = 3 * _randn(6, 8, seed=1), 0.2 * _randn(5, 8, seed=2)
    phi = make_feature_map("rfa", 8, n_features=2 ** 14, seed=4)
    unit = F.normalize
    assert (_gram(phi, q, k) - math.exp(-1) * torch.exp(unit(q) @ unit(k).T)).abs().max() < 0.03
    # the registry's "rfa" is the module with the default seed and feature count, frozen
    x = _randn(2, 3, 8)
    assert torch.equal(FEATURE_MAPS["rfa"](x), make_feature_map("rfa", 8)(x))


@pytest.mark.parametrize("d", [3, 16])
def test_based_is_the_second_order_taylor_polynomial_of_exp(d):
    q, k = _randn(7, d, seed=1), _randn(9, d, seed=2)
    s = q @ k.T / math.sqrt(d)
    assert max_rel(_gram(FEATURE_MAPS["based"], q, k), 1 + s + s ** 2 / 2) < 1e-12
    assert FEATURE_MAPS["based"](q).shape[-1] == feature_dim("based", d) == 1 + d + d * (d + 1) // 2


@pytest.mark.parametrize("degree", [1, 2, 3, 4])
def test_polynomial_map_is_the_polynomial_kernel(degree):
    q, k = _randn(5, 4, seed=1), _randn(6, 4, seed=2)
    phi = make_feature_map("poly", 4, degree=degree)
    assert max_rel(_gram(phi, q, k), (q @ k.T) ** degree) < 1e-12
    assert phi(q).shape[-1] == feature_dim("poly", 4, degree=degree) == math.comb(4 + degree - 1, degree)
    assert get_feature_map(phi).positive == (degree % 2 == 0)


@pytest.mark.parametrize("nu", [1, 2, 3])
def test_dpfp_is_its_closed_form(nu):
    d = 3
    x = _randn(4, d, seed=1)
    r = torch.cat([x.clamp_min(0), (-x).clamp_min(0)], -1)
    want = torch.stack([r[:, i] * r[:, (i - j) % (2 * d)] for j in range(1, nu + 1) for i in range(2 * d)], -1)
    phi = make_feature_map("dpfp", d, nu=nu)
    assert torch.equal(phi(x), want)
    assert want.shape[-1] == feature_dim("dpfp", d, nu=nu) == 2 * d * nu


def test_rebased_is_the_square_of_the_affinely_normalized_dot_product():
    H, d = 2, 5
    phi = _perturb(make_feature_map("rebased", d, heads=H))
    q, k = _randn(7, H, d, seed=1), _randn(6, H, d, seed=2)

    def tilde(x):  # normalize each head's x to mean 0, variance 1, then gamma * . + beta per head
        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        return x * phi.gamma.double() + phi.beta.double()

    got = torch.einsum("ihf,jhf->hij", phi(q), phi(k))
    want = torch.einsum("ihd,jhd->hij", tilde(q), tilde(k)) ** 2
    assert max_rel(got, want) < 1e-12


def test_hedgehog_is_the_softmax_pair_of_an_affine_map_per_head():
    H, d, m = 3, 4, 6
    phi = make_feature_map("hedgehog", d, n_features=m, heads=H)
    x = _randn(5, H, d, seed=1)
    eye = torch.eye(d, m, dtype=torch.float64)
    assert torch.allclose(phi(x), torch.cat([(x @ eye).softmax(-1), (-(x @ eye)).softmax(-1)], -1), atol=1e-15)
    _perturb(phi)
    z = torch.einsum("nhd,hdm->nhm", x, phi.weight.double()) + phi.bias.double()
    assert max_rel(phi(x), torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)) < 1e-14


def test_hedgehog_distillation_brings_linear_attention_weights_to_softmax():
    """A few Adam steps on the cross-entropy to causal softmax weights shrink the gap between the weights."""
    torch.manual_seed(0)
    B, T, H, d = 2, 12, 2, 4
    q, k = 1.5 * _randn(B, T, H, d, seed=1, dtype=torch.float32), 1.5 * _randn(B, T, H, d, seed=2, dtype=torch.float32)
    phi_q, phi_k = make_feature_map("hedgehog", d, heads=H), make_feature_map("hedgehog", d, heads=H)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    softmax_w = (torch.einsum("bihd,bjhd->bhij", q, k) / d ** 0.5).masked_fill(~causal, -math.inf).softmax(-1)

    def gap():
        with torch.no_grad():
            w = torch.einsum("bihf,bjhf->bhij", phi_q(q), phi_k(k)) * causal
            return float((w / w.sum(-1, keepdim=True) - softmax_w).abs().sum(-1).mean())  # mean L1 over rows

    def loss():
        return hedgehog_distillation_loss(q, k, phi_q, key_feature_map=phi_k)

    opt = torch.optim.Adam([*phi_q.parameters(), *phi_k.parameters()], lr=0.05)
    gap0, loss0 = gap(), float(loss().detach())
    for _ in range(40):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss().detach()) < loss0 - 0.1
    assert gap() < 0.6 * gap0


def test_dijiang_is_a_weighted_softmax_of_scaled_dct_frequencies():
    d, m = 4, 6  # m > d: features d.. reuse frequencies 0.. with their own nodes
    phi = _perturb(make_feature_map("dijiang", d, n_features=m, seed=3))
    n = torch.arange(d, dtype=torch.float64)
    C = torch.stack([math.sqrt((1 if f == 0 else 2) / d) * torch.cos(math.pi * f * (2 * n + 1) / (2 * d))
                     for f in range(d)])
    assert torch.allclose(C @ C.T, torch.eye(d, dtype=torch.float64), atol=1e-12)  # orthonormal DCT-II
    u = torch.quasirandom.SobolEngine(1, scramble=True, seed=3).draw(m, dtype=torch.float64)[:, 0]
    t = torch.special.ndtri(u)  # quasi-Monte-Carlo nodes of N(0, 1)
    x = _randn(5, d, seed=1)
    want = phi.log_weight.double().exp() * (t * (x @ C[torch.arange(m) % d].T)).softmax(-1)
    assert max_rel(phi(x), want) < 1e-6  # the buffer T C is kept in float32


@pytest.mark.parametrize("batched", [False, True])
def test_cosformer_decomposition_is_the_cos_reweighted_relu_kernel(batched):
    B, T, H, d, M = 2, 6, 2, 3, 16
    q, k = _randn(B, T, H, d, seed=1), _randn(B, T, H, d, seed=2)
    pos = torch.tensor([[0, 1, 2, 9, 10, 15], [3, 4, 5, 6, 7, 8]]) if batched else torch.arange(5, 5 + T)
    got = torch.einsum("bihf,bjhf->bhij", cosformer_features(q, pos, M), cosformer_features(k, pos, M))
    p = pos.expand(B, T).double()
    weight = torch.cos(math.pi / 2 * (p[:, :, None] - p[:, None, :]) / M)
    want = torch.einsum("bihd,bjhd->bhij", q.relu(), k.relu()) * weight[:, None]
    assert max_rel(got, want) < 1e-13
    assert bool((cosformer_features(q, pos, M) >= 0).all())


@pytest.mark.parametrize("pos,match", [
    (torch.tensor([0, 1, 2, 16]), r"\[0, max_len\) = \[0, 16\).*from 0 to 16"),
    (torch.tensor([-1, 0, 1, 2]), "from -1 to 2"),
    (torch.arange(4.0), "integer tensor"),
    (torch.arange(5), r"\[T\] = \[4\]"),
])
def test_cosformer_positions_are_checked(pos, match):
    with pytest.raises(ValueError, match=match):
        cosformer_features(_randn(1, 4, 1, 2), pos, 16)


# ---------------------------------------------------------------- flags, buffers, errors

def _all_maps(d=4, H=2):
    """Every map with its parameters moved off their start: (name, resolved FeatureMap)."""
    static = {n: FEATURE_MAPS[n] for n in ("identity", "l2", "elu1", "relu", "silu", "prf", "rfa", "based", "dpfp",
                                           "poly2")}
    static["poly3"] = make_feature_map("poly", d, degree=3)
    static["dpfp_nu2"] = make_feature_map("dpfp", d, nu=2)
    modules = {"prf_module": make_feature_map("prf", d, n_features=8, seed=2),
               "rfa_module": make_feature_map("rfa", d, n_features=8, seed=2),
               "hedgehog": _perturb(make_feature_map("hedgehog", d, heads=H)),
               "rebased": _perturb(make_feature_map("rebased", d, heads=H)),
               "dijiang": _perturb(make_feature_map("dijiang", d, n_features=6))}
    return {name: get_feature_map(fm) for name, fm in {**static, **modules}.items()}


POSITIVE = {"elu1", "relu", "prf", "based", "dpfp", "poly2", "dpfp_nu2", "prf_module", "hedgehog", "rebased",
            "dijiang"}
STRICTLY = {"elu1", "prf", "based", "prf_module", "hedgehog", "dijiang"}


def test_positivity_flags_are_as_declared_and_hold():
    maps = _all_maps()
    assert {n for n, fm in maps.items() if fm.positive} == POSITIVE
    assert {n for n, fm in maps.items() if fm.strictly} == STRICTLY
    for seed in range(6):
        q, k = (1 + seed) * _randn(40, 2, 4, seed=2 * seed), (1 + seed) * _randn(40, 2, 4, seed=2 * seed + 1)
        for name, fm in maps.items():
            if fm.positive:
                w = torch.einsum("ihf,jhf->hij", fm(0.3 * q), fm(0.3 * k))
                assert bool((w > 0).all() if fm.strictly else (w >= 0).all()), name
    # the maps that do not claim it can go negative
    q, k = _randn(40, 2, 4, seed=1), _randn(40, 2, 4, seed=2)
    for name in set(maps) - POSITIVE - {"l2", "identity"}:
        assert float(torch.einsum("ihf,jhf->hij", maps[name](q), maps[name](k)).detach().min()) < 0, name


def test_get_feature_map_honours_attributes_on_any_callable():
    class Squares:
        name, positive, strictly, citation = "squares", True, False, "me"

        def __call__(self, x):
            return x * x

    fm = get_feature_map(Squares())
    assert (fm.name, fm.positive, fm.strictly, fm.citation) == ("squares", True, False, "me")
    assert not get_feature_map(lambda x: x).positive
    assert get_feature_map(PositiveRandomFeatures(n_features=3)).strictly
    with pytest.raises(ValueError, match=r"make_feature_map\('hedgehog', dim\)"):
        get_feature_map("hedgehog")


def test_random_features_are_seeded_buffers_that_travel_in_checkpoints():
    for name in ("prf", "rfa", "dijiang"):
        a, b, c = (make_feature_map(name, 4, n_features=6, seed=s) for s in (1, 1, 2))
        x = _randn(3, 4)
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
        c.load_state_dict(_perturb(a).state_dict())
        assert torch.equal(a(x), c(x))
        assert any(n for n, _ in a.named_buffers())


@pytest.mark.parametrize("call,match", [
    (lambda: make_feature_map("softmax", 4), "feature map name must be one of.*'softmax'"),
    (lambda: make_feature_map("hedgehog", 0), "dim must be a positive int, got 0"),
    (lambda: make_feature_map("poly", 4, degree=0), "degree must be a positive int, got 0"),
    (lambda: make_feature_map("prf", 4, n_features=-3), "n_features must be a positive int, got -3"),
    (lambda: make_feature_map("rfa", 4, n_features=2.5), "n_features must be a positive int, got 2.5"),
    (lambda: make_feature_map("rebased", 4, heads=0), "heads must be a positive int, got 0"),
    (lambda: make_feature_map("dpfp", 4, nu=0), "nu must be a positive int, got 0"),
    (lambda: make_feature_map("rfa", 4, sigma=-1.0), "sigma must be a positive finite number, got -1.0"),
    (lambda: make_feature_map("relu", 4, n_features=8), "n_features does not apply to feature map 'relu'"),
    (lambda: make_feature_map("prf", 4, seed=-1), "seed must be a non-negative int, got -1"),
    (lambda: make_feature_map("cosformer", 4), "cosformer_features"),
    (lambda: feature_dim("based", 4, degree=3), "degree does not apply to feature map 'based'"),
    (lambda: make_feature_map("hedgehog", 4)(torch.zeros(2, 5)), r"built for dim 4, got input \[2, 5\]"),
    (lambda: make_feature_map("hedgehog", 4, heads=3)(torch.zeros(2, 2, 4)), r"\[\.\.\., 3, 4\]"),
    (lambda: cosformer_features(torch.zeros(1, 4, 1, 2), torch.arange(4), 0), "max_len must be a positive int"),
    (lambda: hedgehog_distillation_loss(torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2), "silu"),
     "needs positive feature maps"),
])
def test_bad_arguments_raise_one_line_value_errors(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_feature_dim_matches_every_map():
    x = _randn(2, 5)
    for name, kw in [("identity", {}), ("silu", {}), ("prf", {"n_features": 7}), ("rfa", {"n_features": 7}),
                     ("hedgehog", {"n_features": 3}), ("rebased", {}), ("dijiang", {"n_features": 9}),
                     ("based", {}), ("poly2", {}), ("poly", {"degree": 3}), ("dpfp", {"nu": 2})]:
        assert make_feature_map(name, 5, **kw)(x).shape[-1] == feature_dim(name, 5, **kw), name
    assert feature_dim("cosformer", 5) == 10


# ---------------------------------------------------------------- every map in linear_attention == oracle

def _cases():
    """(id, map factory, normalize): every new map unnormalized, the positive ones also normalized."""
    D, H = 4, 2
    factories = {
        "silu": lambda: "silu", "dpfp": lambda: "dpfp", "poly2": lambda: "poly2", "based": lambda: "based",
        "rfa": lambda: "rfa", "poly3": lambda: make_feature_map("poly", D, degree=3),
        "prf_module": lambda: make_feature_map("prf", D, n_features=6, seed=1),
        "hedgehog": lambda: _perturb(make_feature_map("hedgehog", D, heads=H)),
        "rebased": lambda: _perturb(make_feature_map("rebased", D, heads=H)),
        "dijiang": lambda: _perturb(make_feature_map("dijiang", D, n_features=6)),
    }
    cases = [pytest.param(f, False, id=f"{n}") for n, f in factories.items()]
    cases += [pytest.param(f, True, id=f"{n}-normalized") for n, f in factories.items()
              if get_feature_map(f()).positive]
    return cases


@pytest.mark.parametrize("gate", [None, "scalar"])
@pytest.mark.parametrize("make,normalize", _cases())
def test_linear_attention_with_each_map_equals_the_oracle(make, normalize, gate):
    B, T, H, D, Dv = 1, 11, 2, 4, 3  # T odd, not a multiple of the chunk
    fm = make()
    q, k, v = make_qkv(B, T, H, D, Dv, seed=4)
    g = make_gate(gate, B, T, H, D)
    # the initial state of memories of earlier tokens: sum phi(k) [v, 1]^T, as a normalized memory holds it
    k0, v0 = 0.5 * _randn(B, 3, H, D, seed=7), _randn(B, 3, H, Dv, seed=8)
    phi = get_feature_map(fm)
    s0 = torch.einsum("bthf,bthv->bhfv", phi(k0), torch.cat([v0, torch.ones_like(v0[..., :1])], -1))
    s0 = s0 if normalize else s0[..., :Dv]
    kw = dict(feature_map=fm, normalize=normalize, initial_state=s0, output_final_state=True)
    o_c, s_c = linear_attention(q, k, v, g, mode="chunk", chunk_size=4, **kw)
    o_r, s_r = linear_attention(q, k, v, g, mode="recurrent", **kw)
    assert (o_c - o_r).abs().max() < F64_ATOL and (s_c - s_r).abs().max() < F64_ATOL
    if normalize:
        want = oracle.local_constant(q, k, v, g, feature_map=fm, initial_state=s0)
    else:
        want, s_o = oracle.parametric(q, k, v, g, optimizer=oracle.BatchGD(), feature_map=fm, initial_state=s0)
        assert max_rel(s_c, s_o) < F64_ATOL
    assert max_rel(o_c, want) < F64_ATOL


def test_linear_attention_with_cosformer_features_equals_the_oracle():
    """The layer's path: positions offset by an earlier call, features made outside, identity map in the op."""
    B, T, H, D, Dv, M = 2, 9, 2, 3, 4, 32
    q, k, v = make_qkv(B, T, H, D, Dv, seed=2)
    pos = torch.arange(T) + 5
    fq, fk = cosformer_features(q, pos, M), cosformer_features(k, pos, M)
    o_c, _ = linear_attention(fq, fk, v, normalize=True, scale=1.0, chunk_size=4)
    o_r, _ = linear_attention(fq, fk, v, normalize=True, scale=1.0, mode="recurrent")
    assert (o_c - o_r).abs().max() < F64_ATOL
    assert max_rel(o_c, oracle.local_constant(fq, fk, v)) < F64_ATOL
