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

from ..recipe import MLP, PRESET_GATES, Recipe
from ..weights import ComplexGate, EntryGate, FixedDecay, ScalarGate, Uniform, VectorGate, Weights


class FixedDecayGate(nn.Module):
    """RetNet: a fixed decay per head, log gamma_h = log(1 - 2^(-5-h))."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.register_buffer("log_gamma", FixedDecay.log_gamma(n_heads).float())

    def forward(self, x: Tensor) -> Tensor:
        return self.log_gamma.to(x.dtype).expand(x.shape[0], x.shape[1], -1)


def _dt_bias(size: tuple[int, ...], dt_min: float, dt_max: float) -> Tensor:
    """softplus^-1 of dt drawn log-uniform in [dt_min, dt_max]: Mamba's initial discretization steps."""
    dt = torch.exp(torch.empty(size).uniform_(math.log(dt_min), math.log(dt_max)))
    return dt + torch.log(-torch.expm1(-dt))


class Mamba2Gate(nn.Module):
    """Mamba-2: g = -exp(A_log) * softplus(W x + dt_bias), one scalar per head and token."""

    def __init__(self, d_model: int, n_heads: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, n_heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(n_heads).uniform_(1.0, 16.0)))
        self.dt_bias = nn.Parameter(_dt_bias((n_heads,), dt_min, dt_max))

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

    A joint module (see make_inputs): it maps the layer's query and the forget gate's pre-activation z, which TTRLayer
    makes in the key's place (so the short convolution and the key heads of GQA apply to it), to the op's q, k and
    log-gate g:

        f = lb + (1 - lb) sigmoid(z),   g = log f,   k = 1 - f,   q = silu(q)

    (fla's HGRN2Attention; the query is HGRN's output gate). The lower bound lb grows with depth so that deeper
    layers forget slower; HGRN learns one model-level parameter P [n_layers, d] and takes lb = cumsum(softmax(P,
    over layers)) minus its first row, so lb = 0 in the first layer and layer_idx / n_layers at initialization.
    Here each layer learns its own lb = sigmoid(w) per key channel, w starting at logit(layer_idx / n_layers) (a
    documented deviation: the layer stays self-contained, and depth order is not enforced during training); the
    first layer, or a layer not told its depth, has no bound.
    """

    joint = True
    provides = ("g",)

    def __init__(self, n_heads: int, head_dim: int, layer_idx: int | None = None, n_layers: int | None = None) -> None:
        super().__init__()
        _check_depth(layer_idx, n_layers)
        self.layer_idx, self.n_layers = layer_idx, n_layers
        if layer_idx:  # layer 0 (or unknown depth): lb = 0, no parameter
            self.bound_logit = nn.Parameter(torch.full((n_heads, head_dim), math.log(layer_idx / (n_layers - layer_idx))))

    def lower_bound(self) -> Tensor | None:
        """lb [H, Dk] (None: no bound)."""
        return torch.sigmoid(self.bound_logit) if hasattr(self, "bound_logit") else None

    def forward(self, x: Tensor, q: Tensor, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """q [B, T, H, Dk], z [B, T, H, Dk] -> (silu(q), k = 1 - f, v, {g: log f}), k and g in z's shape."""
        g = F.logsigmoid(z)
        if hasattr(self, "bound_logit"):  # log(lb + (1 - lb) sigmoid(z)) with lb = sigmoid(w), in log space
            w = self.bound_logit.to(z.dtype)
            g = torch.logaddexp(F.logsigmoid(w), F.logsigmoid(-w) + g)
        return F.silu(q), -torch.expm1(g), v, {"g": g}


def _check_depth(layer_idx: int | None, n_layers: int | None) -> None:
    if (layer_idx is None) != (n_layers is None):
        raise ValueError(f"pass both layer_idx and n_layers or neither, got {layer_idx!r} and {n_layers!r}")
    if layer_idx is not None and not (isinstance(layer_idx, int) and isinstance(n_layers, int)
                                      and 0 <= layer_idx < n_layers):
        raise ValueError(f"layer_idx must be an int in [0, n_layers), got {layer_idx!r} with n_layers {n_layers!r}")


class RWKV6Gate(nn.Module):
    """RWKV-6 (Peng et al., 2024; BlinkDL's x060 time mixing): token shift with data-dependent interpolation, the
    decay LoRA and the bonus. A joint module with a mixer: TTRLayer first asks it for the inputs of each projection,

        xx = x_prev - x,   m_j = LoRA_32(x + xx mu_x)_j,   x_j = x + xx (mu_j + m_j)   for j in r, k, v, w, g

    (x_r feeds the query, x_k the key, x_v the value, x_g the output gate), then calls it on x_w for the log-decay
    g = -exp(d + LoRA_64(x_w)) per key channel and the bonus u [H, Dk]. The LoRA ranks are RWKV-6's 32 and 64 from
    d_model 512 up, and d_model / 16 and d_model / 8 below (a documented deviation for small models). Initialization by depth l of L layers, as
    BlinkDL's: mu_{x, w, k} = 1 - (i / d)^(1 - l / L), mu_v the same minus 0.3 l / (L - 1), mu_{r, g} =
    1 - (i / d)^((1 - l / L) / 2); d_n = -6 + 5 (n / (D - 1))^(0.7 + 1.3 l / (L - 1)); u_n = l / (L - 1) (1 - n / (D - 1))
    + 0.1 ((n + 1) mod 3 - 1); each LoRA's first matrix starts at 0 and its second uniform in +-0.01 (RWKV-LM's latest
    x060; earlier versions drew both in +-1e-4). A layer not told its depth is layer 0 of 1.
    """

    joint = True
    provides = ("g", "bonus")
    MIXES = ("r", "k", "v", "w", "g")

    def __init__(self, d_model: int, n_heads: int, head_dim: int, layer_idx: int | None = None,
                 n_layers: int | None = None, mix_rank: int | None = None, decay_rank: int | None = None) -> None:
        super().__init__()
        _check_depth(layer_idx, n_layers)
        # RWKV-6's ranks, 32 and 64, from d_model 512 up (its smallest model has 768); smaller models get d_model / 16
        # and / 8, so that the LoRAs stay a few percent of the layer (at d_model 128 the published ranks would add
        # a quarter to a small language model)
        mix_rank = mix_rank or min(32, max(4, d_model // 16))
        decay_rank = decay_rank or min(64, max(8, d_model // 8))
        layer, layers = (0, 1) if layer_idx is None else (layer_idx, n_layers)
        to_zero = layer / (layers - 1) if layers > 1 else 0.0     # 0 in the first layer, 1 in the last
        to_almost_zero = 1.0 - layer / layers                      # 1 in the first layer
        ddd = torch.arange(d_model) / d_model
        self.n_heads, self.head_dim = n_heads, head_dim
        self.mu_x = nn.Parameter(1.0 - ddd ** to_almost_zero)
        self.mu = nn.Parameter(torch.stack([1.0 - ddd ** (0.5 * to_almost_zero), 1.0 - ddd ** to_almost_zero,
                                            1.0 - (ddd ** to_almost_zero + 0.3 * to_zero), 1.0 - ddd ** to_almost_zero,
                                            1.0 - ddd ** (0.5 * to_almost_zero)]))      # r, k, v, w, g
        self.mix_down = nn.Parameter(torch.zeros(d_model, len(self.MIXES) * mix_rank))
        self.mix_up = nn.Parameter(torch.empty(len(self.MIXES), mix_rank, d_model).uniform_(-0.01, 0.01))
        D = n_heads * head_dim
        n = torch.arange(D) / max(D - 1, 1)
        self.decay = nn.Parameter(-6.0 + 5.0 * n ** (0.7 + 1.3 * to_zero))
        self.decay_down = nn.Parameter(torch.zeros(d_model, decay_rank))
        self.decay_up = nn.Parameter(torch.empty(decay_rank, D).uniform_(-0.01, 0.01))
        zigzag = ((torch.arange(D) + 1) % 3 - 1) * 0.1
        self.bonus = nn.Parameter((to_zero * (1.0 - n) + zigzag).view(n_heads, head_dim))

    def mix(self, x: Tensor, x_prev: Tensor) -> dict[str, Tensor]:
        """x, x_prev (each token's predecessor) [B, T, d] -> the inputs x_j [B, T, d] of r, k, v, w, g."""
        xx = x_prev - x
        low = torch.tanh((x + xx * self.mu_x) @ self.mix_down)                         # [B, T, 5 r]
        m = torch.einsum("btjr,jrd->btjd", low.unflatten(-1, (len(self.MIXES), -1)), self.mix_up)
        return dict(zip(self.MIXES, (x[..., None, :] + xx[..., None, :] * (self.mu + m)).unbind(-2)))

    def forward(self, x_w: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        w = self.decay + torch.tanh(x_w @ self.decay_down) @ self.decay_up
        g = -torch.exp(w).view(*x_w.shape[:2], self.n_heads, self.head_dim)
        return q, k, v, {"g": g, "bonus": self.bonus}


class Bonus(nn.Module):
    """A learned bonus u [H, Dk] (RWKV-6's weight of the newest association), started at 0."""

    def __init__(self, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.u


class GateLoopGate(nn.Module):
    """GateLoop (Katsch, 2023): one complex number z = W x + b per key channel and token, read in polar form as the
    gate alpha = sigmoid(|z|) exp(i arg z): the log-gate g = logsigmoid(|z|) and the angle theta = arg z (the paper's
    sigmoid magnitude and identity phase activations)."""

    joint = True
    provides = ("g", "angle")

    def __init__(self, d_model: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.proj = nn.Linear(d_model, 2 * n_heads * head_dim)

    def forward(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        re, im = self.proj(x).view(*x.shape[:2], self.n_heads, self.head_dim, 2).unbind(-1)
        return q, k, v, {"g": F.logsigmoid(torch.hypot(re, im)), "angle": torch.atan2(im, re)}


class LRUGate(nn.Module):
    """LRU (Orvieto et al., 2023): a fixed complex decay per key channel, lambda = exp(-exp(nu_log) + i exp(theta_log)),
    drawn uniformly on the ring r_min <= |lambda| <= r_max with phase in [0, max_phase], and the gamma normalization
    of the input, k <- exp(gamma_log) k, gamma_log started at log sqrt(1 - |lambda|^2) (so that a white input keeps
    the state's scale whatever |lambda|)."""

    joint = True
    provides = ("g", "angle")

    def __init__(self, n_heads: int, head_dim: int, r_min: float = 0.9, r_max: float = 0.999,
                 max_phase: float = math.pi / 10) -> None:
        super().__init__()
        u1, u2 = torch.rand(n_heads, head_dim), torch.rand(n_heads, head_dim)
        nu = -0.5 * torch.log(u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2)        # -log |lambda|
        self.nu_log = nn.Parameter(torch.log(nu))
        self.theta_log = nn.Parameter(torch.log(max_phase * u2.clamp_min(1e-4)))
        self.gamma_log = nn.Parameter(0.5 * torch.log(-torch.expm1(-2.0 * nu)))    # log sqrt(1 - |lambda|^2)

    def forward(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        shape = (*k.shape[:2], *self.nu_log.shape)
        g, angle = -torch.exp(self.nu_log).expand(shape), torch.exp(self.theta_log).expand(shape)
        return q, k * torch.exp(self.gamma_log).to(k.dtype), v, {"g": g.to(k.dtype), "angle": angle.to(k.dtype)}


class MambaGate(nn.Module):
    """Mamba (Gu & Dao, 2023; S6): the discretization step Delta = softplus(W_up W_down x + dt_bias) per value channel
    (rank ceil(d_model / 16)), the per-entry log-gate g[n, c] = Delta[c] A[n, c] with A = -exp(A_log) started at
    -(n + 1) for state (key) channel n (S4D-real), and the discretized input: v <- Delta v."""

    joint = True
    provides = ("g",)

    def __init__(self, d_model: int, n_heads: int, head_dim: int, value_dim: int,
                 dt_range: tuple[float, float] = (1e-3, 0.1)) -> None:
        super().__init__()
        rank = math.ceil(d_model / 16)
        self.n_heads, self.value_dim = n_heads, value_dim
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, n_heads * value_dim, bias=False)
        nn.init.uniform_(self.up.weight, -rank ** -0.5, rank ** -0.5)
        self.dt_bias = nn.Parameter(_dt_bias((n_heads * value_dim,), *dt_range))
        n = torch.arange(1, head_dim + 1, dtype=torch.float32)
        self.A_log = nn.Parameter(torch.log(n)[:, None].expand(head_dim, value_dim).repeat(n_heads, 1, 1))

    def forward(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        delta = F.softplus(self.up(self.down(x)) + self.dt_bias).view(*x.shape[:2], self.n_heads, self.value_dim)
        g = -torch.exp(self.A_log) * delta[..., None, :]
        return q, k, delta * v, {"g": g}


class MLSTMGate(nn.Module):
    """mLSTM (Beck et al., 2024): the log input gate itilde = W_i x + b_i and the log forget gate
    g = logsigmoid(W_f x + b_f), scalar per head; xLSTM's initialization: weights 0, b_f = linspace(3, 6) over heads
    (forget slowly, at different rates), b_i ~ N(0, 0.1)."""

    joint = True
    provides = ("i", "g")

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.input_gate, self.forget_gate = nn.Linear(d_model, n_heads), nn.Linear(d_model, n_heads)
        for gate in (self.input_gate, self.forget_gate):
            nn.init.zeros_(gate.weight)
        nn.init.normal_(self.input_gate.bias, 0.0, 0.1)
        with torch.no_grad():
            self.forget_gate.bias.copy_(torch.linspace(3.0, 6.0, n_heads))

    def forward(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        return q, k, v, {"i": self.input_gate(x), "g": F.logsigmoid(self.forget_gate(x))}


# the presets' own gate modules (Preset.gate), by name
class RFAGate(nn.Module):
    """Gated RFA (Peng et al., 2021): a scalar forget gate per head, sigma_t = sigmoid(w . x_t + b), whose complement
    weighs the new association, S_t = sigma_t S_{t-1} + (1 - sigma_t) phi(k_t) v_t^T: g = log sigma, v <- (1 - sigma) v
    (on the value, since phi acts on the key inside the op). b starts at 2 (sigma = 0.88, a memory of about 8 tokens;
    the paper states no initialization)."""

    joint = True
    provides = ("g",)

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, n_heads)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, 2.0)

    def forward(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        z = self.proj(x)
        return q, k, v * torch.sigmoid(-z)[..., None], {"g": F.logsigmoid(z)}


class CosformerGate(nn.Module):
    """cosFormer (Qin et al., 2022): the re-weighting cos(pi / 2 (t - i) / M) as the real part of a fixed complex gate
    of unit modulus, alpha = exp(i pi / (2 M)) on every key channel (g = 0, angle pi / (2 M)): the locally constant fit
    with weights Re(alpha^(t - i)) relu(q_t)^T relu(k_i). It holds for t - i < M: max_len = M, which the layer checks."""

    joint = True
    provides = ("g", "angle")

    def __init__(self, head_dim: int, max_len: int) -> None:
        super().__init__()
        self.head_dim, self.max_len = head_dim, max_len

    def forward(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        shape = (*k.shape[:3], self.head_dim)
        angle = k.new_full(shape, math.pi / (2 * self.max_len))
        return q, k, v, {"g": k.new_zeros(shape), "angle": angle}


class DiJiangDecay(nn.Module):
    """DiJiang (Chen et al., 2024): a fixed decay per head, 1 - lambda_h with lambda_h log-spaced from 1/32 to 1/512
    over the heads (its reference code's schedule; RetNet's is 2^(-5 - h))."""

    joint = True
    provides = ("g",)

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        lam = torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), n_heads, dtype=torch.float64))
        self.register_buffer("log_gamma", torch.log1p(-lam).float())

    def forward(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        return q, k, v, {"g": self.log_gamma.to(k.dtype).expand(*k.shape[:2], -1)}


GATES = {"hgrn2": HGRN2Gate, "rwkv6": RWKV6Gate, "rfa": RFAGate, "cosformer": CosformerGate, "dijiang": DiJiangDecay}
# cosFormer's fixed maximum length M: the re-weighting cos(pi / 2 (t - i) / M) stays >= 0 over M tokens
COSFORMER_MAX_LEN = 4096


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
                value_dim: int | None = None, layer_idx: int | None = None, n_layers: int | None = None) -> nn.ModuleDict:
    """One module per input the recipe's op takes (recipe.inputs), keyed by the op's argument names. `gate` names a
    preset's own gate parameterization (GATES; None: the weights ingredient's default module).

    A joint module (attribute `joint`: a preset's own gate, or the published gate of complex, per-entry and
    input-gated weights) makes several inputs at once (its `provides`, keyed by the first) and may reshape q, k and
    v: TTRLayer calls it as module(x, q, k, v) -> (q, k, v, inputs) with k, v at the num_kv_heads key heads (default
    n_heads), at which its per-token inputs come out. A joint module with a `mix` method (RWKV-6) also makes the
    inputs of the layer's projections from each token and its predecessor. value_dim: the value heads' width
    (default head_dim); layer_idx and n_layers tell a depth-dependent gate (HGRN-2, RWKV-6) its depth."""
    n_steps = recipe.steps_per_token
    b = getattr(recipe.optimizer, "batch_size", 1)
    if gate is not None:
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; known: {', '.join(GATES)}")
        kind = PRESET_GATES[gate]
        if not isinstance(recipe.weights, kind) or "g" not in recipe.inputs or n_steps != 1:
            raise ValueError(f"gate {gate!r} parameterizes {kind.__name__} weights of one key per token, got "
                             f"{recipe.describe()}")
    kv_heads = num_kv_heads or n_heads
    joint = _joint_module(recipe.weights, gate, d_model, kv_heads, head_dim, value_dim or head_dim, dt_range,
                          layer_idx, n_layers)
    makers = {
        "g": lambda: make_gate(recipe.weights, d_model, n_heads, head_dim, dt_range),
        "bonus": lambda: Bonus(n_heads, head_dim),
        # DeltaProduct lets beta reach 2 (negative eigenvalues of the transition), DeltaNet keeps it below 1
        "beta": lambda: StepSize(d_model, n_heads, "sigmoid", n_steps, scale=2.0 if n_steps > 1 else 1.0),
        "delta": lambda: StepSize(d_model, n_heads, "softplus"),
        "lr": lambda: StepSize(d_model, n_heads, "sigmoid", scale=(0.1 if isinstance(recipe.regressor, MLP) else 1.0) / b),
        "theta": lambda: StepSize(d_model, n_heads, "sigmoid", scale=TITANS_THETA_PER_BATCH / b),
        "momentum": lambda: StepSize(d_model, n_heads, "sigmoid", scale=TITANS_MOMENTUM_MAX, floor=1e-4),
    }
    modules = {} if joint is None else {joint.provides[0]: joint}
    for name in recipe.inputs:
        if joint is None or name not in joint.provides:
            modules[name] = makers[name]()
    return nn.ModuleDict(modules)


def _joint_module(weights: Weights, gate: str | None, d_model: int, kv_heads: int, head_dim: int, value_dim: int,
                  dt_range: tuple[float, float], layer_idx: int | None, n_layers: int | None) -> nn.Module | None:
    if gate == "rfa":
        return RFAGate(d_model, kv_heads)
    if gate == "cosformer":
        return CosformerGate(head_dim, COSFORMER_MAX_LEN)
    if gate == "dijiang":
        return DiJiangDecay(kv_heads)
    if gate == "hgrn2":
        return HGRN2Gate(kv_heads, head_dim, layer_idx, n_layers)
    if gate == "rwkv6":
        return RWKV6Gate(d_model, kv_heads, head_dim, layer_idx, n_layers)
    if isinstance(weights, ComplexGate):
        return LRUGate(kv_heads, head_dim) if weights.fixed else GateLoopGate(d_model, kv_heads, head_dim)
    if isinstance(weights, EntryGate):
        return MambaGate(d_model, kv_heads, head_dim, value_dim, dt_range)
    if isinstance(weights, ScalarGate) and weights.input_gate:
        return MLSTMGate(d_model, kv_heads)
    return None
