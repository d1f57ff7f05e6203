"""A sequence layer is fixed by three ingredients: the weights, the function class, the optimizer.

`Recipe(weights, regressor, optimizer)` names them; `recipe.op()` is the op that solves that
regression in the forward pass, and `ttr.oracle` solves it literally. Named systems of the
literature are `Preset`s in one registry, `PRESETS`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from . import ops, oracle
from .ops import generic
from .features import get_feature_map, is_positive
from .oracle import BatchGD, Exact
from .ops.minibatch import MiniBatchState
from .weights import ComplexGate, EntryGate, FixedDecay, ScalarGate, Uniform, VectorGate, Weights


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
        if not is_positive(self.feature_map):
            raise ValueError(f"LocalConstant needs a positive feature map, got {self.feature_map!r}")

    def describe(self) -> str:
        return f"local constant, kernel weights from phi={self.feature_map}"


@dataclass(frozen=True)
class LocalPolynomial:
    """A polynomial of degree `order` in k - q fitted around each query with softmax-kernel weights
    exp(scale q . k_i): order 0 is softmax attention, order 1 local linear attention (ttr.ops.local).
    qk_norm: unit q and k, which makes the weights the smoothing kernel exp(-scale ||k - q||^2 / 2)."""

    order: int = 0
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.order not in (0, 1, 2):
            raise ValueError(f"order must be 0, 1 or 2, got {self.order!r}")

    def describe(self) -> str:
        name = {0: "local constant", 1: "local linear", 2: "local quadratic"}[self.order]
        return f"{name}, softmax kernel" + (", QKNorm" if self.qk_norm else "")


@dataclass(frozen=True)
class RKHS:
    """f in the reproducing-kernel Hilbert space of `kernel` ("exp", "rbf" or "poly"): kernel regression."""

    kernel: str = "exp"

    def __post_init__(self) -> None:
        if self.kernel not in ops.kernel.KERNELS:
            raise ValueError(f"kernel must be one of {ops.kernel.KERNELS}, got {self.kernel!r}")

    def describe(self) -> str:
        return f"RKHS, {self.kernel} kernel"


@dataclass(frozen=True)
class MLP:
    """m(k) = W2 gelu(W1 k): a two-layer MLP memory (nonlinear), hidden width `expansion` x Dk."""

    expansion: int = 4

    def describe(self) -> str:
        return f"2-layer MLP (gelu, {self.expansion}x)"


@dataclass(frozen=True)
class OnlineSGD:
    """One SGD step per token on the newest association (`steps_per_token` steps with their own k, v).

    step="learned": a step size beta_t in [0, 2] per token (DeltaNet); step="implicit": Longhorn's
    proximal step with strength delta_t >= 0, i.e. beta_t = delta_t / (1 + delta_t ||k_t||^2).
    With decaying weights (a gate) it is SGD with weight decay (Gated DeltaNet).
    """

    step: str = "learned"
    steps_per_token: int = 1

    def __post_init__(self) -> None:
        if self.step not in ("learned", "implicit"):
            raise ValueError(f"step must be 'learned' or 'implicit', got {self.step!r}")
        if self.steps_per_token < 1 or (self.step == "implicit" and self.steps_per_token != 1):
            raise ValueError(f"steps_per_token must be >= 1 (1 for the implicit step), got {self.steps_per_token}")


@dataclass(frozen=True)
class MiniBatchGD:
    """Mini-batch GD: inside each mini-batch of `batch_size` tokens, every gradient is taken at its first
    weights (TTT); momentum=True adds a momentum term and the weights' decay as a forget gate (Titans)."""

    batch_size: int = 16
    momentum: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class NormalizedGD:
    """One step of batch GD from zero whose step is 1 / max(|z_t^T q_t|, 1), z_t = sum_i gamma_i^(t) k_i the weight
    mass the query sees (mLSTM's normalizer): the step is capped by that mass, and is 1 where the mass is below 1."""

    def describe(self) -> str:
        return "batch GD, 1 step, lr 1 / max(|z.q|, 1)"


@dataclass(frozen=True)
class Nystrom:
    """f(x) = W kappa(L, x): the span of m landmark kernels, kappa(a, b) = exp(-||a - b||^2 / (2 sqrt(D))) (Gaussian),
    fitted over the whole sequence by one step of batch GD from 0 preconditioned by the span's own metric,
    (kappa(L, L) + ridge I)^+: the Gaussian kernel smoother kappa(Q, K) V through the landmarks (ttr.ops.nystrom).
    method "soft" (SOFT: landmarks the keys' segment means, Newton-Schulz pseudo-inverse) or "skyformer" (landmarks
    from the queries and keys together, the symmetrized kernel); n_landmarks None: the paper's (49, 128)."""

    method: str = "soft"
    n_landmarks: int | None = None

    def __post_init__(self) -> None:
        if self.method not in ("soft", "skyformer"):
            raise ValueError(f"method must be 'soft' or 'skyformer', got {self.method!r}")
        if self.n_landmarks is not None and not (isinstance(self.n_landmarks, int) and self.n_landmarks >= 1):
            raise ValueError(f"n_landmarks must be None or a positive int, got {self.n_landmarks!r}")

    def describe(self) -> str:
        return f"Nystrom span of Gaussian kernels ({'SOFT' if self.method == 'soft' else 'Skyformer'})"


Regressor = Linear | LocalConstant | LocalPolynomial | RKHS | MLP | Nystrom
Optimizer = BatchGD | Exact | OnlineSGD | MiniBatchGD | NormalizedGD


def _describe_optimizer(opt: Optimizer) -> str:
    if isinstance(opt, BatchGD):
        return f"batch GD, {opt.steps} step" + ("s" if opt.steps != 1 else "") + (f", lr {opt.lr:g}" if opt.lr != 1 else "")
    if isinstance(opt, Exact):
        return "exact" + (f", ridge {opt.ridge:g}" if opt.ridge else "")
    if isinstance(opt, NormalizedGD):
        return opt.describe()
    if isinstance(opt, OnlineSGD):
        what = "online SGD, implicit step" if opt.step == "implicit" else "online SGD"
        return what + (f", {opt.steps_per_token} steps/token" if opt.steps_per_token > 1 else "")
    return f"mini-batch GD (b={opt.batch_size})" + (", momentum" if opt.momentum else "")


@dataclass(frozen=True)
class Recipe:
    """The three ingredients of a test-time regression layer."""

    weights: Weights
    regressor: Regressor
    optimizer: Optimizer

    def op(self) -> Callable:
        """The op solving this regression, with the recipe's own keywords bound.

        Call it as op(q, k, v, **inputs, scale=..., initial_state=..., output_final_state=..., mode=...),
        with `inputs` the per-token tensors named by `self.inputs` (log-gate g, step sizes). It is the fast op
        (chunk and recurrent forms) where one exists, else the generic recurrent executor (ttr.ops.generic);
        a combination that defines no regression problem raises a ValueError saying why (generic.classify).
        """
        plan = generic.classify(self)
        if plan.kind == "chunk":
            return plan.op
        if plan.kind == "recurrent":
            return generic.executor(self)
        raise ValueError(f"{self.describe()} is not a regression problem: {plan.reason}")

    @property
    def inputs(self) -> tuple[str, ...]:
        """The op's per-token inputs besides q, k, v, by name."""
        w = self.weights
        if isinstance(w, ScalarGate) and w.input_gate:
            return ("i", "g")
        if isinstance(w, VectorGate) and w.bonus:
            return ("g", "bonus")
        if isinstance(w, ComplexGate):
            return ("g", "angle")
        gate = () if isinstance(w, Uniform) else ("g",)
        o = self.optimizer
        if isinstance(o, OnlineSGD):
            return ("delta", *gate) if o.step == "implicit" else ("beta", *gate)
        if isinstance(o, MiniBatchGD):
            return ("theta", "momentum", *gate) if o.momentum else ("lr", *gate)
        if isinstance(o, Exact) and isinstance(self.regressor, Linear) and gate:
            return ("g", "beta")  # MesaNet weighs each association's input too
        return gate

    def oracle(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
               initial_state: Tensor | None = None, feature_map: Callable[[Tensor], Tensor] | None = None,
               **inputs: Tensor) -> Tensor:
        """The same regression solved literally, in float64, by ttr.oracle: [B, T, H, Dv]. feature_map: the map
        a layer built for a learnable name (make_feature_map), in place of the name. A Nystrom span takes its
        landmarks [B, m, H, Dk] as an input."""
        r, o, w = self.regressor, self.optimizer, self.weights
        if feature_map is not None:
            r = replace(r, feature_map=feature_map)
        g = inputs.get("g")
        if isinstance(r, Nystrom):
            if "landmarks" not in inputs:
                raise ValueError("the oracle of a Nystrom span needs its landmarks: pass landmarks [B, m, H, Dk]")
            ridge = 0.01 if r.method == "soft" else 0.1
            return oracle.nystrom_step(q, k, v, inputs["landmarks"], ridge=ridge, scale=scale)
        if isinstance(w, Uniform) and (w.window is not None or not w.causal):
            return self._set_oracle(r, q, k, v, scale=scale)
        if isinstance(o, Exact) and isinstance(r, Linear) and o.ridge > 0:
            phi = get_feature_map(r.feature_map)
            return oracle.ridge_regression(phi(q.double()), phi(k.double()), v, g, inputs.get("beta"), lamb=o.ridge,
                                           scale=scale, initial_state=initial_state)[0]
        if isinstance(o, NormalizedGD) and isinstance(r, LocalConstant):
            return oracle.local_constant_fit(q, k, v, g, optimizer=None, feature_map=r.feature_map, scale=scale,
                                             i=inputs.get("i"), initial_state=initial_state)
        if isinstance(o, NormalizedGD):
            phi = get_feature_map(r.feature_map)
            fq, fk = phi(q.double()), phi(k.double())
            zeros = torch.zeros(fq.shape[:3], dtype=torch.float64)
            return oracle.mlstm(fq, fk, v, inputs.get("i", zeros), zeros if g is None else g,
                                scale=q.shape[-1] ** -0.5 if scale is None else scale, initial_state=initial_state)[0]
        if isinstance(o, (BatchGD, Exact)) and isinstance(r, Linear):
            if "beta" in inputs:  # an input weight beta_i on the squared loss is sqrt(beta_i) on the key and value
                root = inputs["beta"].double().sqrt()[..., None]
                fk = get_feature_map(r.feature_map)(k.double())
                return oracle.parametric(get_feature_map(r.feature_map)(q.double()), root * fk, root * v.double(), g,
                                         optimizer=o, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                                         initial_state=initial_state)[0]
            return oracle.parametric(q, k, v, g, optimizer=o, feature_map=r.feature_map, scale=scale,
                                     initial_state=initial_state, bonus=inputs.get("bonus"),
                                     angle=inputs.get("angle"))[0]
        if isinstance(r, LocalPolynomial) and not (isinstance(w, Uniform) and isinstance(o, Exact)):
            return oracle.local_polynomial_fit(q, k, v, g, order=r.order, optimizer=o, scale=scale, qk_norm=r.qk_norm,
                                               initial_state=initial_state)
        if isinstance(o, Exact) and isinstance(r, LocalPolynomial):
            return oracle.local_polynomial(q, k, v, order=r.order, ridge=o.ridge, scale=scale, qk_norm=r.qk_norm,
                                           initial_state=initial_state)
        if isinstance(r, RKHS) and isinstance(o, (OnlineSGD, MiniBatchGD)):
            return self._kernel_lms_oracle(q, k, v, scale=scale, initial_state=initial_state, **inputs)
        if isinstance(r, RKHS) and not (isinstance(w, Uniform) and isinstance(o, Exact)):
            return oracle.kernel_fit(q, k, v, g, kernel=r.kernel, optimizer=o, scale=scale, initial_state=initial_state)
        if isinstance(o, Exact) and isinstance(r, RKHS):
            return oracle.kernel_regression(q, k, v, kernel=r.kernel, ridge=o.ridge, scale=scale,
                                            initial_state=initial_state)
        if isinstance(o, Exact) and isinstance(r, LocalConstant) and o.ridge == 0 and scale is None:
            return oracle.local_constant(q, k, v, g, feature_map=r.feature_map, initial_state=initial_state,
                                         angle=inputs.get("angle"))
        if isinstance(r, LocalConstant):
            return oracle.local_constant_fit(q, k, v, g, optimizer=o, feature_map=r.feature_map, scale=scale,
                                             initial_state=initial_state)
        if generic.classify(self).kind != "chunk":  # the online learners beyond the fast ops' combinations
            return self._online_oracle(q, k, v, scale=scale, initial_state=initial_state, **inputs)
        phi = get_feature_map("l2" if isinstance(r, MLP) else r.feature_map)  # the ops' key normalization
        q, k = phi(q.double()), phi(k.double())
        if isinstance(o, OnlineSGD) and o.step == "implicit":
            return oracle.online_sgd(q, k, v, inputs["delta"], implicit=True, scale=scale,
                                     initial_state=initial_state)[0]
        if isinstance(o, OnlineSGD):
            beta = inputs["beta"].double()
            if g is None:
                return oracle.online_sgd(q, k, v, beta, scale=scale, initial_state=initial_state)[0]
            # Gated DeltaNet is L2-regularized SGD after the map in ttr.ops.sgd's docstring.
            a = g.double().exp()
            if beta.dim() == 4:  # DeltaProduct: the gate acts once per token, before its first step
                a = torch.cat([a[..., None], torch.ones_like(beta[..., 1:])], dim=-1)
            return oracle.online_sgd(q, k, v / a[..., None], a * beta, weight_decay=(1 - a) / (a * beta),
                                     scale=scale, initial_state=initial_state)[0]
        if isinstance(o, MiniBatchGD):
            if o.momentum:
                return oracle.minibatch_gd(q, k, v, inputs["theta"], batch_size=o.batch_size, momentum=inputs["momentum"],
                                           g=g, scale=scale, initial_state=initial_state)[0]
            return oracle.minibatch_gd(q, k, v, inputs["lr"], batch_size=o.batch_size, mlp=isinstance(r, MLP),
                                       scale=scale, initial_state=initial_state)[0]
        raise ValueError(f"the oracle has no solver for {self.describe()}")

    def _online_oracle(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None, initial_state,
                       **inputs: Tensor) -> Tensor:
        """oracle.online_learner on this recipe's keys: the online learners beyond the fast ops' combinations."""
        r, o = self.regressor, self.optimizer
        phi = get_feature_map("l2" if isinstance(r, MLP) else r.feature_map)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        q, k = phi(q.double()), phi(k.double())
        if isinstance(o, OnlineSGD):
            rate = inputs["delta" if o.step == "implicit" else "beta"]
            return oracle.online_learner(q, k, v, rate, inputs.get("g"), mlp=isinstance(r, MLP),
                                         implicit=o.step == "implicit", scale=scale, initial_state=initial_state)
        if isinstance(initial_state, MiniBatchState):
            initial_state = initial_state.weights if isinstance(r, MLP) else initial_state.weights[0]
        return oracle.online_learner(q, k, v, inputs["theta" if o.momentum else "lr"], inputs.get("g"),
                                     mlp=isinstance(r, MLP), batch_size=o.batch_size, momentum=inputs.get("momentum"),
                                     scale=scale, initial_state=initial_state)

    def _kernel_lms_oracle(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None, initial_state,
                           **inputs: Tensor) -> Tensor:
        """oracle.kernel_lms: online learning in an RKHS, from f = 0."""
        if initial_state is not None:
            raise ValueError("the oracle runs kernel LMS from f = 0: pass the whole sequence, not an initial_state")
        o = self.optimizer
        if isinstance(o, OnlineSGD):
            return oracle.kernel_lms(q, k, v, inputs["delta" if o.step == "implicit" else "beta"], inputs.get("g"),
                                     kernel=self.regressor.kernel, implicit=o.step == "implicit", scale=scale)
        return oracle.kernel_lms(q, k, v, inputs["theta" if o.momentum else "lr"], inputs.get("g"),
                                 kernel=self.regressor.kernel, batch_size=o.batch_size, momentum=inputs.get("momentum"),
                                 scale=scale)

    def _set_oracle(self, r: Regressor, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None) -> Tensor:
        """The literal fit over a window or the whole sequence (uniform weights; no carried state)."""
        chosen, o = self.weights.association_set, self.optimizer
        if isinstance(r, Linear) and isinstance(o, NormalizedGD):
            phi = get_feature_map(r.feature_map)
            fq, fk = phi(q.double()), phi(k.double())
            return oracle.mlstm(fq, fk, v, torch.zeros(fq.shape[:3], dtype=torch.float64), None,
                                scale=q.shape[-1] ** -0.5 if scale is None else scale, **chosen)[0]
        if isinstance(r, Linear):
            if isinstance(o, Exact) and o.ridge > 0 and scale is None:
                scale = 1.0  # the mesa layer and MesaNet read the memory at q itself
            return oracle.parametric(q, k, v, optimizer=o, feature_map=r.feature_map, scale=scale, **chosen)[0]
        if isinstance(r, LocalConstant) and isinstance(o, Exact) and o.ridge == 0:
            return oracle.local_constant(q, k, v, feature_map=r.feature_map, **chosen)
        if isinstance(r, LocalConstant):
            return oracle.local_constant_fit(q, k, v, optimizer=None if isinstance(o, NormalizedGD) else o,
                                             feature_map=r.feature_map, scale=scale, **chosen)
        if isinstance(r, LocalPolynomial) and isinstance(o, Exact):
            return oracle.local_polynomial(q, k, v, order=r.order, ridge=o.ridge, scale=scale, qk_norm=r.qk_norm,
                                           **chosen)
        if isinstance(r, LocalPolynomial):
            return oracle.local_polynomial_fit(q, k, v, order=r.order, optimizer=o, scale=scale, qk_norm=r.qk_norm,
                                               **chosen)
        if isinstance(r, RKHS):
            return oracle.kernel_fit(q, k, v, kernel=r.kernel, optimizer=o, scale=scale, **chosen)
        raise ValueError(f"the oracle has no solver for {self.describe()}")

    @property
    def causal(self) -> bool:
        """Whether the answer at t reads only tokens up to t (every memory but the whole-sequence ones)."""
        return not (isinstance(self.weights, Uniform) and not self.weights.causal)

    @property
    def steps_per_token(self) -> int:
        """Associations (keys, values, steps) written per token: n for DeltaProduct, else 1."""
        return self.optimizer.steps_per_token if isinstance(self.optimizer, OnlineSGD) else 1

    @property
    def op_name(self) -> str:
        return self.op().func.__name__

    @property
    def forms(self) -> tuple[str, ...]:
        """The forms its op runs in: ("chunk", "recurrent") for a fast op, ("recurrent",) for the generic executor,
        ("chunk",) over the whole sequence (no token-by-token form), () where the recipe defines no regression
        problem."""
        kind = generic.classify(self).kind
        if kind != "undefined" and not self.causal:
            return ("chunk",)
        return {"chunk": ("chunk", "recurrent"), "recurrent": ("recurrent",)}.get(kind, ())

    @property
    def has_chunk_form(self) -> bool:
        """Whether a fast op with a chunkwise (training) form solves this recipe."""
        return generic.classify(self).kind == "chunk"

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
    # the published parameterization of the per-token inputs where it is more than the weights ingredient's default
    # module (ttr.layers.gates.GATES): None, the default; "hgrn2", HGRN-2's forget gate with the key tied to it;
    # "rwkv6", RWKV-6's token shift with data-dependent interpolation, decay LoRA and bonus; "rfa", gated RFA's
    # forget gate weighing the new association by its complement; "cosformer", the fixed turn pi / 2M per token;
    # "dijiang", DiJiang's per-head decays
    gate: str | None = None
    # the key (feature) dim of each head where the system fixes it below the head dim (Based, ReBased: 16); the
    # value heads keep d_model / n_heads
    key_dim: int | None = None

    def __post_init__(self) -> None:
        if self.gate is not None and not isinstance(self.recipe.weights, PRESET_GATES.get(self.gate, ())):
            raise ValueError(f"gate must be None or one of {sorted(PRESET_GATES)} with its weights "
                             f"({', '.join(f'{k}: {v.__name__}' for k, v in PRESET_GATES.items())}), got {self.gate!r} "
                             f"with {self.recipe.weights!r}")


# the presets' own gate parameterizations (Preset.gate) and the weights ingredient each one parameterizes
PRESET_GATES: dict[str, type] = {"hgrn2": VectorGate, "rwkv6": VectorGate, "rfa": ScalarGate, "cosformer": ComplexGate,
                                 "dijiang": FixedDecay}


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
    Preset("hgrn2", "HGRN-2", Recipe(VectorGate(), Linear(), BatchGD()),
           "Qin et al., 2024", "GLA's vector gate with the key tied to it: f = lb + (1 - lb) sigmoid(W_f x) per key "
           "channel, g = log f, k = 1 - f, q = silu(W_q x) (the output gate acting as query), v = W_i x; the lower "
           "bound lb grows with depth (0 in the first layer). Deviations from fla's HGRN2: lb is a learned per-layer, "
           "per-channel sigmoid(w) started at HGRN's init value layer_idx / n_layers, not one model-level "
           "softmax-cumsum (so depth order is not enforced in training); TTRLayer's short convolution (fla's "
           "default has none; conv_size=0), per-head RMSNorm and SiLU output gate (fla: one RMSNorm over all heads, "
           "no output gate)", gate="hgrn2"),
    Preset("rwkv6", "RWKV-6 (Finch)", Recipe(VectorGate(bonus=True), Linear(), BatchGD()),
           "Peng et al., 2024", "token shift with data-dependent interpolation (ddlerp: mu + LoRA_32(x + (x_prev - x) "
           "mu_x), per projection r, k, v, w, g), log-decay w = -exp(d + LoRA_64(x_w)) per key channel, bonus u [H, Dk] "
           "for the newest association, output gate silu(W_g x_g); BlinkDL's initialization by depth (mu from "
           "1 - (i / d)^(1 - l / L), d from -6 + 5 (n / (D - 1))^(0.7 + 1.3 l / (L - 1)), u from a zigzag, LoRAs from 0 and +-0.01). "
           "Deviations: LoRA ranks d_model / 16 and / 8 below d_model 512 (RWKV-6: 32 and 64, its smallest model has "
           "d_model 768), TTRLayer's short convolution (RWKV-6 has the token shift only; conv_size=0 removes it) and "
           "per-head RMSNorm (RWKV-6: per-head GroupNorm); scale Dk^-1/2 (RWKV-6: 1), which the per-head norm cancels",
           gate="rwkv6"),
    Preset("gateloop", "GateLoop", Recipe(ComplexGate(), Linear(), BatchGD()),
           "Katsch, 2023", "a complex gate per key channel from a linear projection z = W x + b (one complex number "
           "per channel): magnitude sigmoid(|z|), phase arg z, so alpha = sigmoid(|z|) exp(i arg z) (the paper's "
           "sigmoid magnitude and identity phase activations); the answer is Re(q^T S). Deviations: TTRLayer's short "
           "convolution, per-head RMSNorm and SiLU output gate"),
    Preset("lru", "LRU (Linear Recurrent Unit)", Recipe(ComplexGate(fixed=True), Linear(), BatchGD()),
           "Orvieto et al., 2023", "a fixed complex decay per key channel, lambda = exp(-exp(nu) + i exp(theta)) "
           "(exponential parameterization), initialized uniformly on the ring 0.9 <= |lambda| <= 0.999 with phase "
           "in [0, pi / 10], and gamma normalization of the input, k <- exp(gamma_log) k with gamma_log started at "
           "log sqrt(1 - |lambda|^2). Exact: the recurrence s_t = lambda s_{t-1} + gamma B u_t and the real part "
           "read out. Approximate: LRU's input matrix B u_t (one complex vector) is the outer product k_t v_t^T "
           "here, and its fixed read-out C is the data-dependent query q_t; no D u skip (the block's residual)"),
    Preset("mamba", "Mamba (S6)", Recipe(EntryGate(), Linear(), BatchGD()),
           "Gu & Dao, 2023", "a decay per key channel n (state) and value channel c: g = Delta_t[c] A[n, c], "
           "A = -exp(A_log) with A_log started at log(n + 1) (S4D-real), Delta = softplus(W_up W_down x + dt_bias) "
           "per value channel (rank ceil(d_model / 16), dt_bias from dt log-uniform in [1e-3, 0.1]), key B = W_B x, "
           "query C = W_C x, value Delta x (the discretized input). Deviations: Delta from the layer input, not the "
           "convolved one; no D x skip (the block's residual); per-head RMSNorm before the SiLU output gate (Mamba: "
           "none); heads of head_dim state channels (Mamba: one head of 16)"),
    Preset("mlstm", "mLSTM (xLSTM)", Recipe(ScalarGate(input_gate=True), Linear(), NormalizedGD()),
           "Beck et al., 2024", "input gate exp(itilde), itilde = W_i x + b_i, forget gate sigmoid(W_f x + b_f), "
           "xLSTM's initialization (gate weights 0, b_f linspace(3, 6) over heads, b_i ~ N(0, 0.1)); answer "
           "C^T q / max(|n^T q|, 1), max-stabilized. Deviations: gates from the layer input (xLSTM: from q, k, v), "
           "TTRLayer's short convolution on q, k and v (xLSTM: on q and k), per-head RMSNorm (xLSTM: per-head "
           "LayerNorm) and SiLU output gate"),
    Preset("rfa", "RFA (random feature attention)", Recipe(Uniform(), Linear("rfa"), BatchGD()),
           "Peng et al., 2021", "random Fourier features phi(x) = m^-1/2 [sin(W x), cos(W x)] of unit-normalized q and k, "
           "W = W~ / sigma with W~ ~ N(0, I) [m, Dk] drawn once from a seed (a buffer) and the bandwidth sigma [Dk] "
           "learned (started at 1), m = Dk. Deviations: no division by phi(q)^T sum phi(k): the per-head RMSNorm is "
           "scale invariant, so that division would change only the sign, and a random-feature estimate of the sum "
           "can reach 0 or below; the features are drawn once (RFA redraws them during training)"),
    Preset("rfa_gated", "Gated RFA", Recipe(ScalarGate(), Linear("rfa"), BatchGD()),
           "Peng et al., 2021", "RFA's features with its forget gate: sigma_t = sigmoid(w . x_t + b) per head, "
           "S_t = sigma_t S_{t-1} + (1 - sigma_t) phi(k_t) v_t^T (b started at 2: not stated in the paper); the same "
           "deviations as rfa", gate="rfa"),
    Preset("cosformer", "cosFormer", Recipe(ComplexGate(fixed=True), LocalConstant("relu"), Exact()),
           "Qin et al., 2022", "ReLU features re-weighted by cos(pi / 2 (t - i) / M), normalized: the real part of a "
           "fixed unit complex gate exp(i pi / 2M) per token (the paper's sin/cos decomposition, carried across calls "
           "by turning the state), M = 4096 (a fixed maximum length, as causal decoding needs; a longer context is "
           "refused)", gate="cosformer"),
    Preset("hedgehog", "Hedgehog", Recipe(Uniform(), LocalConstant("hedgehog"), Exact()),
           "Zhang et al., 2024", "learnable feature map phi(x) = [softmax(W x + b), softmax(-(W x + b))] per head, W started "
           "at the identity, normalized (ttr.features.hedgehog_distillation_loss fits it to softmax weights). "
           "Deviations: one map for q and k (Hedgehog learns one each)"),
    Preset("based", "Based (linear attention part)", Recipe(Uniform(), LocalConstant("based"), Exact()),
           "Arora et al., 2024", "the 2nd-order Taylor map of exp on a 16-dim key projection, phi(q)^T phi(k) = "
           "1 + s + s^2 / 2 with s = q.k / 4, normalized; Based's sliding-window softmax attention is the "
           "sliding_window preset (a hybrid: ttr lm --memories based/sliding_window). Deviation: the symmetric tensor "
           "power (153 features; Based keeps all 16^2 products, 273)", key_dim=16),
    Preset("rebased", "ReBased", Recipe(Uniform(), LocalConstant("rebased"), Exact()),
           "Aksenov et al., 2024", "learnable affine normalization (LayerNorm with gamma, beta per head) then the "
           "quadratic map, phi(q)^T phi(k) = (q~ . k~)^2, on a 16-dim key projection, normalized", key_dim=16),
    Preset("dijiang", "DiJiang", Recipe(FixedDecay(), Linear("dijiang"), BatchGD()),
           "Chen et al., 2024", "frequency-domain kernelization: phi(x) = D softmax(T C x) with C the DCT-II, T the "
           "quasi-Monte-Carlo nodes of N(0, 1) (scrambled Sobol) and learned positive weights D, m = Dk; fixed decays "
           "1 - lambda_h, lambda_h log-spaced from 1/32 to 1/512 over the heads", gate="dijiang"),
    Preset("sliding_window", "Sliding-window attention", Recipe(Uniform(window=64), LocalPolynomial(0), Exact()),
           "Beltagy et al., 2020; Arora et al., 2024", "softmax attention over the last 64 tokens (Based's window); "
           "the cache keeps only those"),
    Preset("soft", "SOFT (softmax-free transformer)", Recipe(Uniform(causal=False), Nystrom("soft"), BatchGD()),
           "Lu et al., 2021", "Gaussian kernel exp(-||q - k||^2 / (2 sqrt D)), 49 landmarks (the keys' segment means), "
           "Newton-Schulz pseudo-inverse (20 steps, ridge 0.01); an encoder (non-causal). Deviations: q and k from "
           "their own projections (SOFT ties them); segment means, not a learned strided convolution"),
    Preset("skyformer", "Skyformer", Recipe(Uniform(causal=False), Nystrom("skyformer"), BatchGD()),
           "Chen et al., 2021", "Gaussian kernel, Nystrom on the symmetrized kernel over [Q; K] with 128 landmarks "
           "(evenly spaced rows; the paper draws them at random), ridge 0.1, 6 steps of its pseudo-inverse iteration; "
           "an encoder (non-causal)"),
    Preset("deltanet", "DeltaNet", Recipe(Uniform(), Linear("l2"), OnlineSGD()),
           "Schlag et al., 2021; Yang et al., 2024", "beta = sigmoid(W x), L2-normalized q and k"),
    Preset("gated_deltanet", "Gated DeltaNet", Recipe(ScalarGate(), Linear("l2"), OnlineSGD()),
           "Yang et al., 2025", "alpha from the Mamba-2 gate (weight decay), beta = sigmoid(W x)"),
    Preset("longhorn", "Longhorn", Recipe(Uniform(), Linear("l2"), OnlineSGD(step="implicit")),
           "Liu et al., 2024", "delta = softplus(W x), beta = delta / (1 + delta ||k||^2)"),
    Preset("deltaproduct", "DeltaProduct (n=2)", Recipe(Uniform(), Linear("l2"), OnlineSGD(steps_per_token=2)),
           "Siems et al., 2025", "2 keys, values, betas per token, beta = 2 sigmoid(W x) in (0, 2)"),
    Preset("ttt_linear", "TTT-Linear", Recipe(Uniform(), Linear("l2"), MiniBatchGD(16)),
           "Sun et al., 2024", "eta = sigmoid(W x) / 16 (TTT's base rate 1 over the mini-batch), mini-batch 16, "
           "no inner layer norm"),
    Preset("ttt_mlp", "TTT-MLP", Recipe(Uniform(), MLP(4), MiniBatchGD(16)),
           "Sun et al., 2024", "eta = 0.1 sigmoid(W x) / 16, mini-batch 16, learned initial MLP, no inner layer norm"),
    Preset("titans", "Titans (linear memory)", Recipe(ScalarGate(), Linear("l2"), MiniBatchGD(16, momentum=True)),
           "Behrouz et al., 2024", "theta = sigmoid(W x) / 64, eta = 0.9 sigmoid(W x) (the stable range), alpha from the Mamba-2 gate, "
           "mini-batch 16"),
    Preset("softmax_attention", "Softmax attention", Recipe(Uniform(), LocalPolynomial(0), Exact()),
           "Vaswani et al., 2017", "weights exp(q.k / sqrt(D)): the locally constant (Nadaraya-Watson) fit"),
    Preset("softmax_qknorm", "Softmax attention + QKNorm", Recipe(Uniform(), LocalPolynomial(0, qk_norm=True), Exact()),
           "Henry et al., 2020", "unit q and k, so the weights are the smoothing kernel exp(-||k - q||^2 scale / 2); "
           "TTRLayer learns the scale per head from log2(L^2 - L), L = 1024"),
    Preset("local_linear", "Local linear attention", Recipe(Uniform(), LocalPolynomial(1), Exact(ridge=0.1)),
           "the slides' order-1 estimator", "weights exp(q.k / sqrt(D)), ridge 0.1 (times the weight mass) on the "
           "slope, order 0 where the local design is singular"),
    Preset("intention", "Intention (kernel regression)", Recipe(Uniform(), RKHS("exp"), Exact(ridge=1.0)),
           "Garnelo & Czarnecki, 2023", "kernel exp(q.k / sqrt(D)), ridge 1, exact solve over the whole prefix"),
    Preset("mesa", "Mesa layer", Recipe(Uniform(), Linear(), Exact(ridge=1.0)),
           "von Oswald et al., 2023", "exact ridge regression at every step, lambda = 1"),
    Preset("mesanet", "MesaNet (exact solve)", Recipe(ScalarGate(), Linear(), Exact(ridge=1.0)),
           "von Oswald et al., 2025", "alpha from the Mamba-2 gate, beta = sigmoid(W x), lambda = 1; the paper "
           "solves with CG (ops.mesa solver='cg')"),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
