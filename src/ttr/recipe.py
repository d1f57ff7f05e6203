"""A sequence layer is fixed by three ingredients: the weights, the function class, the optimizer.

`Recipe(weights, regressor, optimizer)` names them; `recipe.op()` is the op that solves that
regression in the forward pass, and `ttr.oracle` solves it literally. Named systems of the
literature are `Preset`s in one registry, `PRESETS`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from . import ops, oracle
from .features import get_feature_map
from .oracle import BatchGD, Exact
from .weights import FixedDecay, ScalarGate, Uniform, VectorGate, Weights


@dataclass(frozen=True)
class Linear:
    """m(k) = M phi(k): linear regression on features of the key (phi = identity: on the key)."""

    feature_map: str = "identity"

    def describe(self) -> str:
        return "linear" if self.feature_map == "identity" else f"linear, phi={self.feature_map}"


@dataclass(frozen=True)
class LocalConstant:
    """m = c fitted around each query with kernel weights phi(q)^T phi(k_i): a Nadaraya-Watson smoother.

    This is what *normalized* feature-mapped linear attention computes (Katharopoulos, Performer).
    """

    feature_map: str = "elu1"

    def __post_init__(self) -> None:
        if not get_feature_map(self.feature_map).positive:
            raise ValueError(f"LocalConstant needs a positive feature map, got {self.feature_map!r}")

    def describe(self) -> str:
        return f"local constant, kernel weights from phi={self.feature_map}"


Regressor = Linear | LocalConstant
Optimizer = BatchGD | Exact


def _describe_optimizer(opt: Optimizer) -> str:
    if isinstance(opt, BatchGD):
        return f"batch GD, {opt.steps} step" + ("s" if opt.steps != 1 else "") + (f", lr {opt.lr:g}" if opt.lr != 1 else "")
    return "exact" + (f", ridge {opt.ridge:g}" if opt.ridge else "")


@dataclass(frozen=True)
class Recipe:
    """The three ingredients of a test-time regression layer."""

    weights: Weights
    regressor: Regressor
    optimizer: Optimizer

    def op(self) -> Callable:
        """The op solving this regression, with the recipe's own keywords bound.

        Call it as op(q, k, v, g, scale=..., initial_state=..., output_final_state=..., mode=...).
        """
        r, o = self.regressor, self.optimizer
        if isinstance(r, Linear) and isinstance(o, BatchGD) and o.steps == 1 and o.lr == 1.0:
            return functools.partial(ops.linear_attention, feature_map=r.feature_map)
        if isinstance(r, LocalConstant) and isinstance(o, Exact) and o.ridge == 0.0:
            return functools.partial(ops.linear_attention, feature_map=r.feature_map, normalize=True)
        raise ValueError(f"no op implements {self.describe()} yet")

    def oracle(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, scale: float | None = None,
               initial_state: Tensor | None = None) -> Tensor:
        """The same regression solved literally, in float64, by ttr.oracle: [B, T, H, Dv]."""
        r, o = self.regressor, self.optimizer
        if isinstance(r, Linear):
            return oracle.parametric(q, k, v, g, optimizer=o, feature_map=r.feature_map, scale=scale,
                                     initial_state=initial_state)[0]
        if isinstance(r, LocalConstant) and isinstance(o, Exact):
            return oracle.local_constant(q, k, v, g, feature_map=r.feature_map, initial_state=initial_state)
        raise ValueError(f"the oracle has no solver for {self.describe()}")

    @property
    def op_name(self) -> str:
        return self.op().func.__name__

    @property
    def forms(self) -> tuple[str, ...]:
        return ("chunk", "recurrent")

    def describe(self) -> str:
        return f"{self.weights.describe()} | {self.regressor.describe()} | {_describe_optimizer(self.optimizer)}"


@dataclass(frozen=True)
class Preset:
    """A named system: its recipe, the published parameterization of its gates, and where it comes from."""

    name: str
    title: str
    recipe: Recipe
    citation: str
    parameterization: str


_PRESET_LIST = [
    Preset("linear_attention", "Linear attention", Recipe(Uniform(), Linear(), BatchGD()),
           "Katharopoulos et al., 2020", "no gate, identity features"),
    Preset("linear_transformer", "Linear Transformer (elu+1, normalized)",
           Recipe(Uniform(), LocalConstant("elu1"), Exact()),
           "Katharopoulos et al., 2020", "phi = elu + 1, output divided by phi(q)^T sum phi(k)"),
    Preset("performer", "Performer (FAVOR+)", Recipe(Uniform(), LocalConstant("prf"), Exact()),
           "Choromanski et al., 2021", "positive random features of the softmax kernel, normalized"),
    Preset("retnet", "RetNet", Recipe(FixedDecay(), Linear(), BatchGD()),
           "Sun et al., 2023", "gamma_h = 1 - 2^(-5-h) per head"),
    Preset("mamba2", "Mamba-2 (SSD)", Recipe(ScalarGate(), Linear(), BatchGD()),
           "Dao & Gu, 2024", "g = -exp(A_log) softplus(W x + dt_bias), scalar per head"),
    Preset("gla", "Gated Linear Attention", Recipe(VectorGate(), Linear(), BatchGD()),
           "Yang et al., 2024", "g = logsigmoid(W2 W1 x + b) / 16, rank-16, per key channel"),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
