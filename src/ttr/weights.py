"""The first ingredient: the weight gamma_i^(t) of association i in the regression solved at time t.

Geometric decay is written with log-gates g_t <= 0, alpha_t = exp(g_t):

    gamma_i^(t) = alpha_{i+1} alpha_{i+2} ... alpha_t = exp(G_t - G_i),   G_t = g_1 + ... + g_t,

a scalar per head, or a vector over key channels (each channel forgets at its own rate).

The association set is which i the regression at t sums over: the causal prefix {i <= t} (every op's default),
a sliding window of w tokens {t - w < i <= t} (weights zero outside it, whatever the decay inside), or the whole
sequence {all i} (causal=False: encoders; a decay has no meaning there, so its weights are uniform).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._checks import is_int


@dataclass(frozen=True)
class Uniform:
    """gamma_i^(t) = 1 over the association set: every association counts equally (linear attention, the mesa
    layer). window: only the last w associations, t - w < i <= t (sliding-window attention); causal=False: the
    whole sequence, every i (encoders: SOFT, Skyformer)."""

    kind: str = "uniform"
    window: int | None = field(default=None, kw_only=True)
    causal: bool = field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        check_window(self.window, self.causal)

    def describe(self) -> str:
        if self.window is not None:
            return f"uniform, last {self.window}"
        return "uniform" if self.causal else "uniform, whole sequence"

    @property
    def association_set(self) -> dict[str, object]:
        """The ops' keywords for this association set ({} for the causal prefix)."""
        if self.window is not None:
            return {"window": self.window}
        return {} if self.causal else {"causal": False}


@dataclass(frozen=True)
class FixedDecay:
    """gamma_i^(t) = gamma_h^(t - i) with a fixed decay per head (RetNet: gamma_h = 1 - 2^(-5 - h))."""

    kind: str = "fixed"

    def describe(self) -> str:
        return "fixed decay / head"

    @staticmethod
    def log_gamma(n_heads: int) -> Tensor:
        """RetNet's per-head decays, in log space: [H]."""
        h = torch.arange(n_heads, dtype=torch.float64)
        return torch.log1p(-torch.pow(2.0, -5.0 - h))


@dataclass(frozen=True)
class ScalarGate:
    """Data-dependent geometric decay, one scalar per head and token (Mamba-2). input_gate: each association also
    weighs exp(itilde_i), an exponential input gate (mLSTM): gamma_i^(t) = exp(itilde_i) alpha_{i+1} ... alpha_t."""

    kind: str = "scalar"
    input_gate: bool = field(default=False, kw_only=True)

    def describe(self) -> str:
        return "gate, scalar / head" + (", exp input gate" if self.input_gate else "")


@dataclass(frozen=True)
class VectorGate:
    """Data-dependent geometric decay, one per key channel and token (GLA, HGRN-2). bonus: the newest association
    weighs u per key channel instead, and the earlier ones are not yet decayed by the current gate (RWKV-6):
    gamma_t^(t) = u, gamma_i^(t) = alpha_{i+1} ... alpha_{t-1} for i < t."""

    kind: str = "vector"
    bonus: bool = field(default=False, kw_only=True)

    def describe(self) -> str:
        return "gate, per key channel" + (", bonus u" if self.bonus else "")


@dataclass(frozen=True)
class ComplexGate:
    """A complex decay per key channel, alpha_t = exp(g_t + i theta_t): each channel's memory decays and rotates,
    gamma_i^(t) = exp(G_t - G_i + i (Theta_t - Theta_i)), and the answer is the real part. Data-dependent (GateLoop)
    or fixed (LRU: the same alpha at every token)."""

    kind: str = "complex"
    fixed: bool = field(default=False, kw_only=True)

    def describe(self) -> str:
        return ("fixed " if self.fixed else "") + "complex gate, per key channel"


@dataclass(frozen=True)
class EntryGate:
    """Data-dependent geometric decay per entry of the state, one per key and value channel and token (Mamba:
    alpha_t[n, c] = exp(Delta_t[c] A[n, c]))."""

    kind: str = "entry"

    def describe(self) -> str:
        return "gate, per state entry"


Weights = Uniform | FixedDecay | ScalarGate | VectorGate | ComplexGate | EntryGate


def constant_log_gate(decay: float, shape: tuple[int, ...], **like) -> Tensor:
    """A log-gate of constant decay alpha in (0, 1]: the parameter-free form of a gated memory."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    return torch.full(shape, math.log(decay), **like)


def check_window(window: object, causal: object = True) -> None:
    """window: None (the causal prefix) or a positive int; causal: a bool; a window is a causal set."""
    if window is not None and not is_int(window, 1):
        raise ValueError(f"window must be None or a positive int (tokens), got {window!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if window is not None and not causal:
        raise ValueError("window is a causal association set {t - w < i <= t}: pass causal=True with a window")


def association_set(T: int, *, window: int | None = None, causal: bool = True, device=None) -> Tensor:
    """in_set[t, i]: whether association i enters the regression at t, [T, T] bool: i <= t (causal), and
    t - i < window where a window is given; every i where causal=False."""
    check_window(window, causal)
    if not causal:
        return torch.ones(T, T, dtype=torch.bool, device=device)
    t = torch.arange(T, device=device)
    lag = t[:, None] - t[None, :]
    return (lag >= 0) & (lag < (T if window is None else window))


def gamma_matrix(g: Tensor | None, T: int, *, batch: tuple[int, int] = (1, 1), dtype=torch.float64,
                 device=None, window: int | None = None, causal: bool = True) -> Tensor:
    """All weights at once: gamma[b, h, t, i, ...] = exp(G_t - G_i) for i in the association set of t (the causal
    prefix i <= t; with a window, also t - i < window), else 0; causal=False: 1 for every i (uniform only).

    g is None (uniform), [B, T, H], [B, T, H, Dk] or [B, T, H, Dk, Dv] (per state entry); the trailing axes are
    1, Dk, or Dk and Dv. This is the literal form the oracle uses: quadratic in T, for references only.
    """
    if g is not None and not causal:
        raise ValueError("a decay orders the associations in time: the whole sequence (causal=False) has no "
                         "gamma_i^(t) for i > t; pass g=None")
    in_set = association_set(T, window=window, causal=causal, device=device if g is None else g.device)
    if g is None:
        B, H = batch
        return in_set.to(dtype).expand(B, H, T, T).unsqueeze(-1)
    g = g.to(dtype)
    if g.dim() == 3:
        g = g.unsqueeze(-1)
    G = g.cumsum(1).movedim(1, 2)  # [B, H, T, ...]
    diff = G[:, :, :, None] - G[:, :, None]
    in_set = in_set.view(T, T, *[1] * (G.dim() - 3))
    return torch.exp(torch.where(in_set, diff, torch.full_like(diff, -math.inf)))
