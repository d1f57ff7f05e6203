"""Feature maps phi: the function class m(k) = M phi(k) (feature-mapped linear regression).

With phi the memory regresses values on features of the keys; phi(k)^T phi(q) is the kernel the
memory implicitly uses. Each map acts on the last dimension and is applied to queries and keys alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


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


def _identity(x: Tensor) -> Tensor:
    return x


def _l2(x: Tensor) -> Tensor:
    """x / ||x||: unit keys keep the delta rule's step beta in (0, 2) a contraction."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _elu_plus_one(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


@dataclass(frozen=True)
class PositiveRandomFeatures:
    """Performer's positive random features (FAVOR+) for the softmax kernel exp(q^T k / sqrt(D)).

    phi(x) = exp(W x' - ||x'||^2 / 2) / sqrt(m) with x' = x D^-1/4 and W ~ N(0, I) of shape [m, D],
    so E[phi(q)^T phi(k)] = exp(q^T k / sqrt(D)). W is drawn once from `seed` (deterministic).
    """

    n_features: int | None = None
    seed: int = 0
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def projection(self, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (dim, str(device), dtype)
        if key not in self._cache:
            m = self.n_features or dim
            gen = torch.Generator().manual_seed(self.seed)
            self._cache[key] = torch.randn(m, dim, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        return self._cache[key]

    def __call__(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        w = self.projection(d, x.device, x.dtype)
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


FEATURE_MAPS: dict[str, FeatureMap] = {
    "identity": FeatureMap("identity", _identity, positive=False),
    "l2": FeatureMap("l2", _l2, positive=False),
    "elu1": FeatureMap("elu1", _elu_plus_one, positive=True, citation="Katharopoulos et al., 2020", strictly=True),
    "relu": FeatureMap("relu", F.relu, positive=True, citation="Kasai et al., 2021"),
    "prf": FeatureMap("prf", PositiveRandomFeatures(), positive=True, citation="Choromanski et al., 2021",
                      strictly=True),
}


def get_feature_map(feature_map: str | Callable[[Tensor], Tensor] | None) -> FeatureMap:
    """Resolve a name, a FeatureMap, or any callable (taken as not known to be positive)."""
    if feature_map is None:
        return FEATURE_MAPS["identity"]
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if isinstance(feature_map, PositiveRandomFeatures):
        return FeatureMap("prf", feature_map, positive=True, citation="Choromanski et al., 2021", strictly=True)
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, got {feature_map!r}")
        return FEATURE_MAPS[feature_map]
    if callable(feature_map):
        return FeatureMap(getattr(feature_map, "__name__", type(feature_map).__name__), feature_map, positive=False)
    raise ValueError(f"feature_map must be a name, a callable or None, got {type(feature_map).__name__}")
