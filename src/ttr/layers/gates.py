"""The per-token inputs of an op, made from x as the published systems parameterize them.

Gates (the weights ingredient) map x [B, T, d_model] to a log-gate: [B, T, H] for scalar decays,
[B, T, H, Dk] for per-key-channel decays. Step sizes (the optimizer ingredient) map x to [B, T, H]
(or [B, T, H, n] for n steps per token). The ops know nothing of these modules; they take tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..recipe import MLP, Recipe
from ..weights import FixedDecay, ScalarGate, Uniform, VectorGate, Weights


class FixedDecayGate(nn.Module):
    """RetNet: a fixed decay per head, log gamma_h = log(1 - 2^(-5-h))."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.register_buffer("log_gamma", FixedDecay.log_gamma(n_heads).float())

    def forward(self, x: Tensor) -> Tensor:
        return self.log_gamma.to(x.dtype).expand(x.shape[0], x.shape[1], -1)


class Mamba2Gate(nn.Module):
    """Mamba-2: g = -exp(A_log) * softplus(W x + dt_bias), one scalar per head and token."""

    def __init__(self, d_model: int, n_heads: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, n_heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(n_heads).uniform_(1.0, 16.0)))
        dt = torch.exp(torch.empty(n_heads).uniform_(math.log(dt_min), math.log(dt_max)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(self, x: Tensor) -> Tensor:
        return -torch.exp(self.A_log) * F.softplus(self.proj(x) + self.dt_bias)


class GLAGate(nn.Module):
    """GLA: g = logsigmoid(W2 W1 x + b) / normalizer, per key channel; low-rank W2 W1."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, rank: int = 16, normalizer: float = 16.0) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.normalizer = n_heads, head_dim, normalizer
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, n_heads * head_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        g = F.logsigmoid(self.up(self.down(x))) / self.normalizer
        return g.view(*x.shape[:2], self.n_heads, self.head_dim)


# Mamba-2's initial dt range: exp(-A dt) with A in [1, 16] forgets within about 1 / (A dt) tokens at
# initialization, 1 to 1000 tokens here
DT_RANGE = (1e-3, 0.1)


def make_gate(weights: Weights, d_model: int, n_heads: int, head_dim: int,
              dt_range: tuple[float, float] = DT_RANGE) -> nn.Module | None:
    if isinstance(weights, Uniform):
        return None
    if isinstance(weights, FixedDecay):
        return FixedDecayGate(n_heads)
    if isinstance(weights, ScalarGate):
        return Mamba2Gate(d_model, n_heads, *dt_range)
    if isinstance(weights, VectorGate):
        return GLAGate(d_model, n_heads, head_dim)
    raise ValueError(f"no gate module for weights {weights!r}")


class StepSize(nn.Module):
    """A step size per head (and step) and token: scale * act(W x + b), act sigmoid or softplus.
    `floor` keeps it away from zero where the op needs a positive value (a momentum coefficient)."""

    def __init__(self, d_model: int, n_heads: int, act: str, n_steps: int = 1, scale: float = 1.0,
                 floor: float = 0.0) -> None:
        super().__init__()
        if act not in ("sigmoid", "softplus"):
            raise ValueError(f"act must be 'sigmoid' or 'softplus', got {act!r}")
        self.proj = nn.Linear(d_model, n_heads * n_steps)
        self.act, self.n_heads, self.n_steps, self.scale, self.floor = act, n_heads, n_steps, scale, floor

    def forward(self, x: Tensor) -> Tensor:
        z = self.proj(x)
        y = torch.sigmoid(z) if self.act == "sigmoid" else F.softplus(z)
        y = y if self.scale == 1.0 else self.scale * y  # one op less per decoded token where it changes nothing
        y = y.clamp_min(self.floor) if self.floor else y
        shape = (self.n_heads,) if self.n_steps == 1 else (self.n_heads, self.n_steps)
        return y.view(*x.shape[:2], *shape)


# The mini-batch learners' stable range (ttr.ops.minibatch, "Stability"), with unit keys in the worst case (every
# key of a mini-batch alike). TTT: sum_i lr_i <= 1 over a mini-batch (TTT's base rate 1, averaged over the
# mini-batch as its dual form does at the mini-batch's end; 0.1 for TTT-MLP); the update contracts below 2.
# Titans: momentum below 0.9 and theta below 0.25 / b, inside the stable 0.3 / b that momentum 0.9 allows.
TITANS_MOMENTUM_MAX = 0.9
TITANS_THETA_PER_BATCH = 0.25


def make_inputs(recipe: Recipe, d_model: int, n_heads: int, head_dim: int,
                dt_range: tuple[float, float] = DT_RANGE) -> nn.ModuleDict:
    """One module per input the recipe's op takes (recipe.inputs), keyed by the op's argument names."""
    n_steps = recipe.steps_per_token
    b = getattr(recipe.optimizer, "batch_size", 1)
    makers = {
        "g": lambda: make_gate(recipe.weights, d_model, n_heads, head_dim, dt_range),
        # DeltaProduct lets beta reach 2 (negative eigenvalues of the transition), DeltaNet keeps it below 1
        "beta": lambda: StepSize(d_model, n_heads, "sigmoid", n_steps, scale=2.0 if n_steps > 1 else 1.0),
        "delta": lambda: StepSize(d_model, n_heads, "softplus"),
        "lr": lambda: StepSize(d_model, n_heads, "sigmoid", scale=(0.1 if isinstance(recipe.regressor, MLP) else 1.0) / b),
        "theta": lambda: StepSize(d_model, n_heads, "sigmoid", scale=TITANS_THETA_PER_BATCH / b),
        "momentum": lambda: StepSize(d_model, n_heads, "sigmoid", scale=TITANS_MOMENTUM_MAX, floor=1e-4),
    }
    return nn.ModuleDict({name: makers[name]() for name in recipe.inputs})
