"""Feature maps phi: the function class m(k) = M phi(k) (feature-mapped linear regression).

With phi the memory regresses values on features of the keys, 1/2 sum_i gamma_i ||v_i - M phi(k_i)||^2, and reads
M phi(q); one step of batch GD from 0 answers sum_i gamma_i v_i phi(k_i)^T phi(q), so phi(k)^T phi(q) is the kernel
the memory implicitly uses (linear attention with that kernel; normalized, a Nadaraya-Watson fit). Each map acts
on the last dimension and is applied to queries and keys alike.

Parameter-free maps are `FeatureMap`s in the string registry `FEATURE_MAPS`; maps with random features or
learnable parameters (Performer, RFA, Hedgehog, ReBased, DiJiang) are `nn.Module`s built for one input dim by
`make_feature_map`, their random features seeded and kept as buffers (they go into checkpoints). Every map
declares `positive` (phi(q)^T phi(k) >= 0 for all q, k, whatever its parameters) and `strictly` (> 0), which
`linear_attention(normalize=True)` reads. cosFormer's map depends on token positions: `cosformer_features`.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.quasirandom import SobolEngine

from ._checks import check_positive, is_int


@dataclass(frozen=True)
class FeatureMap:
    """A named feature map. `positive` maps give phi(q)^T phi(k) >= 0, as a normalizer needs; `strictly` positive
    ones give phi(q)^T phi(k) > 0, so a zero there is underflow."""

    name: str
    fn: Callable[[Tensor], Tensor]
    positive: bool
    citation: str = ""
    strictly: bool = False

    def __call__(self, x: Tensor) -> Tensor:
        y = self.fn(x)
        if not isinstance(y, Tensor) or y.shape[:-1] != x.shape[:-1] or not y.is_floating_point():
            what = f"shape {list(y.shape)} {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"feature map {self.name!r} must return a floating-point tensor [..., D'] for input "
                             f"{list(x.shape)}, got {what}")
        return y


def _check_int(name: str, value: object) -> None:
    if not is_int(value, 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _identity(x: Tensor) -> Tensor:
    return x


L2_FLOOR = 1e-6  # the smallest norm l2 divides by: a zero vector stays zero


def _l2(x: Tensor) -> Tensor:
    """x / ||x||: unit keys keep the delta rule's step beta in (0, 2) a contraction."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(L2_FLOOR)


def _elu_plus_one(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


@functools.lru_cache(maxsize=None)
def _monomials(dim: int, degree: int) -> tuple[Tensor, Tensor]:
    """Index tuples i_1 <= ... <= i_p of the degree-p monomials of `dim` variables, and sqrt of their multinomial
    coefficients p! / prod(multiplicity!)."""
    combos = list(itertools.combinations_with_replacement(range(dim), degree))
    coef = [math.sqrt(math.factorial(degree) / math.prod(math.factorial(c.count(i)) for i in set(c))) for c in combos]
    return torch.tensor(combos, dtype=torch.long), torch.tensor(coef, dtype=torch.float64)


def _symmetric_power(x: Tensor, degree: int) -> Tensor:
    """The tensor power x^(x)p on its symmetric part: phi_a(x) = sqrt(p! / a!) x^a over multi-indices |a| = p, so
    phi(q)^T phi(k) = (q^T k)^p with C(D + p - 1, p) features instead of D^p."""
    index, coef = _monomials(x.shape[-1], degree)
    return x[..., index.to(x.device)].prod(-1) * coef.to(device=x.device, dtype=x.dtype)


def _taylor_exp(x: Tensor) -> Tensor:
    """Based: [1, x / D^1/4, x (x) x / sqrt(2 D)], so phi(q)^T phi(k) = 1 + s + s^2 / 2 with s = q^T k / sqrt(D)."""
    d = x.shape[-1]
    return torch.cat([torch.ones_like(x[..., :1]), x * d ** -0.25, _symmetric_power(x, 2) * (2 * d) ** -0.5], dim=-1)


def _dpfp(x: Tensor, nu: int) -> Tensor:
    """DPFP: r = relu([x, -x]), phi = [r * roll(r, j) for j = 1..nu], 2 D nu features."""
    r = F.relu(torch.cat([x, -x], dim=-1))
    return torch.cat([r * r.roll(j, dims=-1) for j in range(1, nu + 1)], dim=-1)


def polynomial_features(degree: int) -> FeatureMap:
    """The polynomial kernel (q^T k)^p as features: the symmetric tensor power of degree p (C(D + p - 1, p)
    features). phi(q)^T phi(k) = (q^T k)^p, non-negative for even p."""
    _check_int("degree", degree)
    return FeatureMap(f"poly{degree}", functools.partial(_symmetric_power, degree=degree), positive=degree % 2 == 0)


def dpfp_features(nu: int = 1) -> FeatureMap:
    """Deterministic parameter-free projection (Schlag et al., 2021): r = relu([x, -x]) in R^{2D} and
    phi(x)_{(j-1) 2D + i} = r_i r_{(i - j) mod 2D}, j = 1..nu: 2 D nu non-negative features, nearly orthogonal
    for different x, so phi(q)^T phi(k) = sum_j sum_i r_i(q) r_{i-j}(q) r_i(k) r_{i-j}(k) >= 0."""
    _check_int("nu", nu)
    return FeatureMap("dpfp", functools.partial(_dpfp, nu=nu), positive=True, citation="Schlag et al., 2021")


def _gaussian(rows: int, dim: int, seed: int) -> Tensor:
    """W ~ N(0, I) [rows, dim] in float64, the same for the same seed."""
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _positive_random_features(x: Tensor, w: Tensor) -> Tensor:
    """FAVOR+ with projection w [m, D] on x [..., D] (see PositiveRandomFeatures)."""
    d = x.shape[-1]
    x = x * d ** -0.25
    m = w.shape[0]
    phi = torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(m)
    # every feature of a long vector underflows (|x'|^2 / 2 outgrows w . x'): its weights would all be 0, a
    # silently wrong answer; the estimate of exp(q.k / sqrt(D)) has lost all meaning there anyway
    if x.numel() and not bool((phi.detach().amax(-1) > 0).all()):
        norm = float(x.detach().norm(dim=-1).max()) * d ** 0.25
        raise ValueError(f"prf features underflow to zero in {x.dtype} for inputs of norm up to {norm:.4g} "
                         f"(at D = {d}): normalize or rescale q and k")
    return phi


@dataclass(frozen=True)
class PositiveRandomFeatures:
    """Performer's positive random features (FAVOR+) for the softmax kernel exp(q^T k / sqrt(D)), for any input dim.

    phi(x) = exp(W x' - ||x'||^2 / 2) / sqrt(m) with x' = x D^-1/4 and W ~ N(0, I) of shape [m, D],
    so E[phi(q)^T phi(k)] = exp(q^T k / sqrt(D)). W is drawn once from `seed` (deterministic); the module form
    with W as a buffer is `PerformerFeatures`.
    """

    n_features: int | None = None
    seed: int = 0
    _cache: dict = field(default_factory=dict, compare=False, repr=False)
    name = "prf"
    positive = True
    strictly = True
    citation = "Choromanski et al., 2021"

    def projection(self, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (dim, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = _gaussian(self.n_features or dim, dim, self.seed).to(device=device, dtype=dtype)
        return self._cache[key]

    def __call__(self, x: Tensor) -> Tensor:
        return _positive_random_features(x, self.projection(x.shape[-1], x.device, x.dtype))


class _ModuleMap(nn.Module):
    """A feature map with buffers or parameters, built for input dim `dim`; its flags are class attributes."""

    name = ""
    positive = False
    strictly = False
    citation = ""

    def __init__(self, dim: int) -> None:
        super().__init__()
        _check_int("dim", dim)
        self.dim = dim

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"feature map {self.name!r} was built for dim {self.dim}, got input {list(x.shape)}")


def _default_dtype(x: Tensor) -> Tensor:
    return x.to(torch.get_default_dtype())


class PerformerFeatures(_ModuleMap):
    """Performer (Choromanski et al., 2021), FAVOR+ as a module: phi(x) = exp(W x' - ||x'||^2 / 2) / sqrt(m),
    x' = x D^-1/4, W ~ N(0, I) [m, D] drawn from `seed` (the draw of PositiveRandomFeatures) and kept as a buffer.
    E[phi(q)^T phi(k)] = exp(q^T k / sqrt(D)); every feature is > 0."""

    name = "prf"
    positive = True
    strictly = True
    citation = "Choromanski et al., 2021"

    def __init__(self, dim: int, n_features: int | None = None, seed: int = 0) -> None:
        super().__init__(dim)
        self.register_buffer("weight", _default_dtype(_gaussian(n_features or dim, dim, seed)))

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return _positive_random_features(x, self.weight.to(x))


class RandomFourierFeatures(_ModuleMap):
    """RFA (Peng et al., 2021): random Fourier features phi(x) = sqrt(1/m) [sin(W x), cos(W x)] (2 m features) with
    W = W~ / sigma, W~ ~ N(0, I) [m, D] a seeded buffer and sigma [D] a parameter (the paper learns the feature
    variance), so E[phi(q)^T phi(k)] = exp(-||(q - k) / sigma||^2 / 2) (Rahimi & Recht, 2007).

    normalize=True (RFA's choice) maps q, k to the unit sphere first: there ||q - k||^2 = 2 - 2 q^T k, and the
    Gaussian kernel is the softmax kernel up to a constant, exp(-1 / sigma^2) exp(q^T k / sigma^2) for a scalar
    sigma, the constant cancelling in the normalized (attention) form. The estimate may be negative: not positive.
    """

    name = "rfa"
    citation = "Peng et al., 2021"

    def __init__(self, dim: int, n_features: int | None = None, seed: int = 0, sigma: float = 1.0,
                 normalize: bool = True) -> None:
        super().__init__(dim)
        check_positive("sigma", sigma)
        self.normalize = normalize
        self.register_buffer("weight", _default_dtype(_gaussian(n_features or dim, dim, seed)))
        self.log_sigma = nn.Parameter(torch.full((dim,), math.log(sigma)))

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if self.normalize:
            x = _l2(x)
        z = (x / self.log_sigma.to(x).exp()) @ self.weight.to(x).T
        return torch.cat([z.sin(), z.cos()], dim=-1) * self.weight.shape[0] ** -0.5


class HedgehogFeatures(_ModuleMap):
    """Hedgehog (Zhang et al., 2024): a learnable map phi(x) = [softmax(W^T x + b), softmax(-(W^T x + b))] (2 m
    features), W [D, m] per head started at the identity and b at 0; trained by distilling softmax attention
    (`hedgehog_distillation_loss`). Every feature is > 0, so phi(q)^T phi(k) > 0.

    heads > 1 gives every head its own W, b and expects input [..., heads, D]."""

    name = "hedgehog"
    positive = True
    strictly = True
    citation = "Zhang et al., 2024"

    def __init__(self, dim: int, n_features: int | None = None, heads: int = 1) -> None:
        super().__init__(dim)
        _check_int("heads", heads)
        m = n_features or dim
        self.weight = nn.Parameter(torch.eye(dim, m).repeat(heads, 1, 1))
        self.bias = nn.Parameter(torch.zeros(heads, m))

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        w, b = self.weight.to(x), self.bias.to(x)
        heads = w.shape[0]
        if heads == 1:
            z = x @ w[0] + b[0]
        elif x.dim() < 2 or x.shape[-2] != heads:
            raise ValueError(f"feature map 'hedgehog' has {heads} heads: input must be [..., {heads}, {self.dim}], "
                             f"got {list(x.shape)}")
        else:
            z = (x.unsqueeze(-2) @ w).squeeze(-2) + b
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)


class ReBasedFeatures(_ModuleMap):
    """ReBased (Aksenov et al., 2024): x~ = gamma * LayerNorm(x) + beta (normalized to mean 0 and variance 1 over
    the D channels, then a learnable affine map, gamma = 1 and beta = 0 at the start), then the quadratic map
    x~ (x) x~ (D (D + 1) / 2 features), so phi(q)^T phi(k) = (q~^T k~)^2 >= 0.

    heads > 1 gives every head its own gamma, beta (input [..., heads, D])."""

    name = "rebased"
    positive = True
    citation = "Aksenov et al., 2024"

    def __init__(self, dim: int, heads: int = 1, eps: float = 1e-5) -> None:
        super().__init__(dim)
        _check_int("heads", heads)
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(heads, dim))
        self.beta = nn.Parameter(torch.zeros(heads, dim))

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        gamma, beta = self.gamma.to(x), self.beta.to(x)
        if gamma.shape[0] == 1:
            gamma, beta = gamma[0], beta[0]
        return _symmetric_power(F.layer_norm(x, (self.dim,), eps=self.eps) * gamma + beta, 2)


def _dct_matrix(dim: int) -> Tensor:
    """The orthonormal DCT-II matrix C [dim, dim] (float64): (C x)_f = c_f sum_n x_n cos(pi f (2n + 1) / (2 dim)),
    c_0 = sqrt(1 / dim), c_f = sqrt(2 / dim)."""
    f = torch.arange(dim, dtype=torch.float64)[:, None]
    n = torch.arange(dim, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * f * (2 * n + 1) / (2 * dim)) * math.sqrt(2 / dim)
    c[0] /= math.sqrt(2)
    return c


class DiJiangFeatures(_ModuleMap):
    """DiJiang (Chen et al., 2024): frequency-domain kernelization by a weighted quasi-Monte-Carlo DCT map,
    phi(x) = D * exp(T C x) normalized over the features, i.e. D * softmax(T C x) (m features).

    C: the orthonormal DCT-II (feature f uses frequency f mod D, so m may exceed D); T = diag(t), t_f =
    Phi^-1(u_f) with u the first m points of a scrambled Sobol sequence (seeded): quasi-Monte-Carlo nodes of
    N(0, 1); T C is a buffer. D = exp(log_weight) [m]: the learnable quadrature weights, positive, so
    phi(q)^T phi(k) = sum_f D_f^2 softmax_f(T C q) softmax_f(T C k) > 0. The paper writes D exp(T C x); its
    reference code takes the softmax over features (which also keeps exp finite).
    """

    name = "dijiang"
    positive = True
    strictly = True
    citation = "Chen et al., 2024"

    def __init__(self, dim: int, n_features: int | None = None, seed: int = 0) -> None:
        super().__init__(dim)
        m = n_features or dim
        u = SobolEngine(1, scramble=True, seed=seed).draw(m, dtype=torch.float64)[:, 0]
        t = torch.special.ndtri(u.clamp(1e-9, 1 - 1e-9))  # a node at 0 or 1 would be an infinite frequency
        self.register_buffer("projection", _default_dtype(t[:, None] * _dct_matrix(dim)[torch.arange(m) % dim]))
        self.log_weight = nn.Parameter(torch.zeros(m))

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return self.log_weight.to(x).exp() * (x @ self.projection.to(x).T).softmax(-1)


@dataclass(frozen=True)
class _AnyDim:
    """A random map of the string registry: the module for each input dim is built once, from a fixed seed, and
    frozen (nobody trains a registry entry)."""

    build: Callable[[int], nn.Module]
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, x: Tensor) -> Tensor:
        key = (x.shape[-1], str(x.device))
        if key not in self._cache:
            self._cache[key] = self.build(x.shape[-1]).requires_grad_(False).to(x.device)
        return self._cache[key](x)


def cosformer_features(x: Tensor, positions: Tensor, max_len: int) -> Tensor:
    """cosFormer (Qin et al., 2022): ReLU features re-weighted by cos(pi/2 (i - j) / M), through its decomposition
    phi(x_i) = [relu(x_i) cos(pi i / 2M), relu(x_i) sin(pi i / 2M)], so that
    phi(q_i)^T phi(k_j) = relu(q_i)^T relu(k_j) cos(pi/2 (i - j) / M) >= 0 for positions 0 <= i, j < M.

    x [B, T, H, D]; positions [T] or [B, T] integers (offsets across calls and packing are the caller's);
    M = max_len is fixed up front, as causal decoding needs. Returns [B, T, H, 2 D], non-negative.
    """
    _check_int("max_len", max_len)
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor [B, T, H, D], got "
                         f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    B, T = x.shape[:2]
    if (not isinstance(positions, Tensor) or positions.dtype.is_floating_point or positions.is_complex()
            or tuple(positions.shape) not in ((T,), (B, T))):
        raise ValueError(f"positions must be an integer tensor [T] = [{T}] or [B, T] = [{B}, {T}], got "
                         f"{list(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__}"
                         f"{'' if not isinstance(positions, Tensor) else ' ' + str(positions.dtype)}")
    if positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= max_len:
            raise ValueError(f"positions must lie in [0, max_len) = [0, {max_len}) (cos(pi/2 (i - j) / M) stays "
                             f"positive only there), got positions from {lo} to {hi}")
    angle = (positions.to(x.dtype) * (math.pi / (2 * max_len)))[..., None, None]
    r = F.relu(x)
    return torch.cat([r * angle.cos(), r * angle.sin()], dim=-1)


def hedgehog_distillation_loss(q: Tensor, k: Tensor, feature_map: str | Callable[[Tensor], Tensor], *,
                               key_feature_map: str | Callable[[Tensor], Tensor] | None = None,
                               scale: float | None = None) -> Tensor:
    """Hedgehog's attention distillation (Zhang et al., 2024): the cross-entropy -sum_{j<=i} a_ij log a^_ij, averaged
    over queries, between causal softmax attention a_ij = softmax_j(scale q_i^T k_j) (scale = D^-1/2 unless given,
    no gradient to it) and the normalized linear-attention weights a^_ij = phi(q_i)^T psi(k_j) / sum_{l<=i} phi(q_i)^T
    psi(k_l), psi = key_feature_map (default: phi). q, k [B, T, H, D]; a scalar loss to minimize over the maps."""
    if not isinstance(q, Tensor) or not isinstance(k, Tensor) or q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must be tensors [B, T, H, D] of one shape, got "
                         f"{[list(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (q, k)]}")
    phi = get_feature_map(feature_map)
    psi = phi if key_feature_map is None else get_feature_map(key_feature_map)
    if not (phi.positive and psi.positive):
        raise ValueError(f"hedgehog_distillation_loss needs positive feature maps (normalized weights), got "
                         f"{phi.name!r} and {psi.name!r}")
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    with torch.no_grad():
        scores = torch.einsum("bihd,bjhd->bhij", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
        target = scores.masked_fill(~causal, -math.inf).softmax(-1)
    weights = torch.einsum("bihf,bjhf->bhij", phi(q), psi(k)).masked_fill(~causal, 0.0)
    weights = weights / weights.sum(-1, keepdim=True)
    log_weights = weights.clamp_min(torch.finfo(weights.dtype).tiny).log()
    return -(target * log_weights).masked_fill(~causal, 0.0).sum(-1).mean()


FEATURE_MAPS: dict[str, FeatureMap] = {
    "identity": FeatureMap("identity", _identity, positive=False),
    "l2": FeatureMap("l2", _l2, positive=False),
    "elu1": FeatureMap("elu1", _elu_plus_one, positive=True, citation="Katharopoulos et al., 2020", strictly=True),
    "relu": FeatureMap("relu", F.relu, positive=True, citation="Kasai et al., 2021"),
    "silu": FeatureMap("silu", F.silu, positive=False),
    "prf": FeatureMap("prf", PositiveRandomFeatures(), positive=True, citation="Choromanski et al., 2021",
                      strictly=True),
    "rfa": FeatureMap("rfa", _AnyDim(RandomFourierFeatures), positive=False, citation="Peng et al., 2021"),
    # 1 + s + s^2 / 2 = ((1 + s)^2 + 1) / 2 >= 1/2
    "based": FeatureMap("based", _taylor_exp, positive=True, citation="Arora et al., 2024", strictly=True),
    "dpfp": dpfp_features(1),
    "poly2": polynomial_features(2),
}

# the keywords of make_feature_map / feature_dim each map takes, beyond dim (and seed, harmless anywhere)
_OPTIONS: dict[str, tuple[str, ...]] = {
    "prf": ("n_features",), "rfa": ("n_features", "sigma"), "hedgehog": ("n_features", "heads"),
    "rebased": ("heads",), "dijiang": ("n_features",), "poly": ("degree",), "dpfp": ("nu",), "cosformer": (),
}
_MODULES = ("hedgehog", "rebased", "dijiang")
# the maps a layer builds as its own module (make_feature_map): learnable (RFA's bandwidth too) or, for the rest,
# keeping their random features as buffers in the layer's checkpoint
LAYER_MODULES = ("rfa", "hedgehog", "rebased", "dijiang")


def _options(name: str, dim: int, given: dict[str, object]) -> dict[str, object]:
    """Check name, dim and the keywords given (None = not given) for `name`; return those given."""
    if not isinstance(name, str) or name not in set(FEATURE_MAPS) | set(_OPTIONS):
        raise ValueError(f"feature map name must be one of {sorted(set(FEATURE_MAPS) | set(_OPTIONS))}, got {name!r}")
    _check_int("dim", dim)
    given = {key: value for key, value in given.items() if value is not None}
    for key, value in given.items():
        if key not in _OPTIONS.get(name, ()):
            raise ValueError(f"{key} does not apply to feature map {name!r} (it takes {list(_OPTIONS.get(name, ()))}),"
                             f" got {key}={value!r}")
        if key == "sigma":
            check_positive("sigma", value)
        else:
            _check_int(key, value)
    return given


def make_feature_map(name: str, dim: int, *, n_features: int | None = None, seed: int = 0, heads: int | None = None,
                     degree: int | None = None, nu: int | None = None,
                     sigma: float | None = None) -> Callable[[Tensor], Tensor]:
    """A fresh feature map for inputs [..., dim]: an nn.Module (its own parameters and seeded buffers) for "prf",
    "rfa", "hedgehog", "rebased", "dijiang"; the static FeatureMap for the parameter-free ones ("poly" with
    `degree`, "dpfp" with `nu`, and every name of FEATURE_MAPS). n_features: m random or learned features (default
    dim); heads: per-head parameters (Hedgehog, ReBased); sigma: RFA's initial bandwidth."""
    opts = _options(name, dim, dict(n_features=n_features, heads=heads, degree=degree, nu=nu, sigma=sigma))
    if not is_int(seed, 0):
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if name == "cosformer":
        raise ValueError("cosformer's features depend on token positions: call cosformer_features(x, positions, "
                         "max_len) and pass the features with feature_map=None")
    if name == "prf":
        return PerformerFeatures(dim, seed=seed, **opts)
    if name == "rfa":
        return RandomFourierFeatures(dim, seed=seed, **opts)
    if name == "hedgehog":
        return HedgehogFeatures(dim, **opts)
    if name == "rebased":
        return ReBasedFeatures(dim, **opts)
    if name == "dijiang":
        return DiJiangFeatures(dim, seed=seed, **opts)
    if name == "poly":
        return polynomial_features(degree or 2)
    if name == "dpfp":
        return dpfp_features(nu or 1)
    return FEATURE_MAPS[name]


def feature_dim(name: str, dim: int, *, n_features: int | None = None, heads: int | None = None,
                degree: int | None = None, nu: int | None = None, sigma: float | None = None) -> int:
    """D_phi, the output dim of map `name` on inputs of dim `dim` with these options (make_feature_map's)."""
    _options(name, dim, dict(n_features=n_features, heads=heads, degree=degree, nu=nu, sigma=sigma))
    m, p = n_features or dim, degree or 2
    pairs = dim * (dim + 1) // 2
    dims = {"prf": m, "rfa": 2 * m, "hedgehog": 2 * m, "dijiang": m, "based": 1 + dim + pairs, "rebased": pairs,
            "poly2": pairs, "poly": math.comb(dim + p - 1, p), "dpfp": 2 * dim * (nu or 1), "cosformer": 2 * dim}
    return dims.get(name, dim)


def is_positive(feature_map: str | Callable[[Tensor], Tensor]) -> bool:
    """Whether a map (a name, learnable ones included, or a callable) guarantees phi(q)^T phi(k) >= 0."""
    if isinstance(feature_map, str) and feature_map in _MODULES:
        return {"hedgehog": HedgehogFeatures, "rebased": ReBasedFeatures, "dijiang": DiJiangFeatures}[feature_map].positive
    return get_feature_map(feature_map).positive


def get_feature_map(feature_map: str | Callable[[Tensor], Tensor] | None) -> FeatureMap:
    """Resolve a name, a FeatureMap, or any callable: its `name`, `positive`, `strictly` and `citation` attributes
    are honoured where it has them (the module maps do); one without is taken as not known to be positive."""
    if feature_map is None:
        return FEATURE_MAPS["identity"]
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if isinstance(feature_map, str):
        if feature_map in _MODULES:
            raise ValueError(f"feature map {feature_map!r} has learnable parameters: build one with "
                             f"make_feature_map({feature_map!r}, dim) and pass it")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, got {feature_map!r}")
        return FEATURE_MAPS[feature_map]
    if callable(feature_map):
        positive = bool(getattr(feature_map, "positive", False))
        name = getattr(feature_map, "name", None) or getattr(feature_map, "__name__", type(feature_map).__name__)
        return FeatureMap(str(name), feature_map, positive=positive, citation=str(getattr(feature_map, "citation", "")),
                          strictly=positive and bool(getattr(feature_map, "strictly", False)))
    raise ValueError(f"feature_map must be a name, a callable or None, got {type(feature_map).__name__}")
