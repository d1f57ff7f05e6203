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


class HGRN2Gate(nn.Module):
    """HGRN-2 (Qin et al., 2024): GLA's per-key-channel forget gate with the key tied to it.

    It maps the layer's query projection and the forget gate's pre-activation z (which TTRLayer makes in the key's
    place, so the short convolution and the key heads of GQA apply to it) to the op's q, k and log-gate g:

        f = lb + (1 - lb) sigmoid(z),   g = log f,   k = 1 - f,   q = silu(q)

    (fla's HGRN2Attention; the query is HGRN's output gate). The lower bound lb grows with depth so that deeper
    layers forget slower; HGRN learns one model-level parameter P [n_layers, d] and takes lb = cumsum(softmax(P,
    over layers)) minus its first row, so lb = 0 in the first layer and layer_idx / n_layers at initialization.
    Here each layer learns its own lb = sigmoid(w) per key channel, w starting at logit(layer_idx / n_layers) (a
    documented deviation: the layer stays self-contained, and depth order is not enforced during training); the
    first layer, or a layer not told its depth, has no bound.
    """

    tied_key = True

    def __init__(self, n_heads: int, head_dim: int, layer_idx: int | None = None, n_layers: int | None = None) -> None:
        super().__init__()
        if (layer_idx is None) != (n_layers is None):
            raise ValueError(f"pass both layer_idx and n_layers or neither, got {layer_idx!r} and {n_layers!r}")
        if layer_idx is not None and not (isinstance(layer_idx, int) and isinstance(n_layers, int)
                                          and 0 <= layer_idx < n_layers):
            raise ValueError(f"layer_idx must be an int in [0, n_layers), got {layer_idx!r} with n_layers {n_layers!r}")
        self.layer_idx, self.n_layers = layer_idx, n_layers
        if layer_idx:  # layer 0 (or unknown depth): lb = 0, no parameter
            self.bound_logit = nn.Parameter(torch.full((n_heads, head_dim), math.log(layer_idx / (n_layers - layer_idx))))

    def lower_bound(self) -> Tensor | None:
        """lb [H, Dk] (None: no bound)."""
        return torch.sigmoid(self.bound_logit) if hasattr(self, "bound_logit") else None

    def forward(self, q: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, T, H, Dk], z [B, T, H, Dk] -> (silu(q), k = 1 - f, g = log f), k and g in z's shape."""
        g = F.logsigmoid(z)
        if hasattr(self, "bound_logit"):  # log(lb + (1 - lb) sigmoid(z)) with lb = sigmoid(w), in log space
            w = self.bound_logit.to(z.dtype)
            g = torch.logaddexp(F.logsigmoid(w), F.logsigmoid(-w) + g)
        return F.silu(q), -torch.expm1(g), g


# the presets' own gate modules (Preset.gate), by name
GATES = {"hgrn2": HGRN2Gate}


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
                dt_range: tuple[float, float] = DT_RANGE, *, gate: str | None = None, num_kv_heads: int | None = None,
                layer_idx: int | None = None, n_layers: int | None = None) -> nn.ModuleDict:
    """One module per input the recipe's op takes (recipe.inputs), keyed by the op's argument names. `gate` names a
    preset's own gate parameterization (GATES; None: the weights ingredient's default module); a gate module with
    `tied_key` also makes the key (and the query's activation) from the key projection: TTRLayer calls it as
    gate(q, z) -> (q, k, g), z at the num_kv_heads key heads (default n_heads). layer_idx and n_layers tell a
    depth-dependent gate (HGRN-2) its depth."""
    n_steps = recipe.steps_per_token
    b = getattr(recipe.optimizer, "batch_size", 1)
    if gate is not None:
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; known: {', '.join(GATES)}")
        if not isinstance(recipe.weights, VectorGate) or "g" not in recipe.inputs or n_steps != 1:
            raise ValueError(f"gate {gate!r} parameterizes a per-key-channel gate of one key per token, got "
                             f"{recipe.describe()}")
    makers = {
        "g": lambda: (make_gate(recipe.weights, d_model, n_heads, head_dim, dt_range) if gate is None
                      else GATES[gate](num_kv_heads or n_heads, head_dim, layer_idx, n_layers)),
        # DeltaProduct lets beta reach 2 (negative eigenvalues of the transition), DeltaNet keeps it below 1
        "beta": lambda: StepSize(d_model, n_heads, "sigmoid", n_steps, scale=2.0 if n_steps > 1 else 1.0),
        "delta": lambda: StepSize(d_model, n_heads, "softplus"),
        "lr": lambda: StepSize(d_model, n_heads, "sigmoid", scale=(0.1 if isinstance(recipe.regressor, MLP) else 1.0) / b),
        "theta": lambda: StepSize(d_model, n_heads, "sigmoid", scale=TITANS_THETA_PER_BATCH / b),
        "momentum": lambda: StepSize(d_model, n_heads, "sigmoid", scale=TITANS_MOMENTUM_MAX, floor=1e-4),
    }
    return nn.ModuleDict({name: makers[name]() for name in recipe.inputs})
