"""Gate modules: the weights ingredient of a recipe, as the published systems parameterize it.

Each maps x [B, T, d_model] to a log-gate (or None): [B, T, H] for scalar decays, [B, T, H, Dk] for
per-key-channel decays. The ops know nothing of these; they only take g.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def make_gate(weights: Weights, d_model: int, n_heads: int, head_dim: int) -> nn.Module | None:
    if isinstance(weights, Uniform):
        return None
    if isinstance(weights, FixedDecay):
        return FixedDecayGate(n_heads)
    if isinstance(weights, ScalarGate):
        return Mamba2Gate(d_model, n_heads)
    if isinstance(weights, VectorGate):
        return GLAGate(d_model, n_heads, head_dim)
    raise ValueError(f"no gate module for weights {weights!r}")
