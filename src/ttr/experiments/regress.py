"""The slides' "solving regression with a single forward pass": every memory, no learned parameters.

Keys come from the switching process (ttr.tasks.switching). At step t the memory holds the
associations (k_i, v_i), i < t, and is queried with q_t = k_t to predict v_t = k_{t+1} / ||k_{t+1}||.
The op sees keys and values shifted by one token (what a short convolution does in a layer), so its
own association at t is (k_{t-1}, v_{t-1}). The answer is the regression's, y_t = m_t(q_t): scale 1.

Two errors per step: the squared error ||y_t - v_t||^2, and the direction error 1 - cos(y_t, v_t).
One unpreconditioned GD step (linear attention and its gated variants) overshoots in scale by roughly
sum_i gamma_i ||k_i||^2, which the squared error shows and the direction error factors out; recovery
after the switch is measured on the direction error so that memories of every scale compare.

Defaults, and why:
- dim 16, length 1024, 64 sequences (seed 0), Sigma = I: small enough to run in seconds, with
  several hundred steps in each regime and a smooth average over sequences.
- Gated memories have no data-dependent parameters here, so they get a constant decay: scalar gates
  alpha = `decay` (0.95, a memory of ~20 steps), vector gates a spread of per-channel decays with
  1 - alpha_c from 4 (1 - decay) down to (1 - decay) / 4 (timescales 5 to 80 steps, as GLA learns).
  RetNet keeps its published first-head decay 1 - 2^-5. Complex gates (GateLoop, LRU) take the vector gates'
  decays and turn each channel by 1 - decay radians per token (0.05: old associations dephase over ~20
  steps); Mamba's per-entry gate the vector gates' decays along its key channels; RWKV-6's bonus u = 1 (the
  newest association weighs as a fresh one); mLSTM's input gate 1 (log 0) with the scalar decay.
- Online learners take a constant step `step` (0.5) on unit keys: beta for DeltaNet and Gated DeltaNet,
  each of DeltaProduct's 2 steps (here both on the token's one association), Longhorn's delta = 1 (so
  beta = 0.5). Mini-batch learners sum a mini-batch's gradients, so they take step / b per token (GD on
  the mini-batch's mean loss): TTT-Linear's and TTT-MLP's inner learning rate, Titans' theta (momentum 0.5).
  TTT-MLP starts from random weights (W1 ~ N(0, 1/d), W2 ~ N(0, 1/(4d)), seed 0), as a layer would
  before training.
- The nonparametric memories (softmax attention, with QKNorm, local linear, intention) keep every
  association and never forget. At scale 1 on unit keys the softmax weights exp(q.k) vary only within
  e^(+-1), so order 0 is close to a running mean; local linear adds the slope (ridge 0.1); intention is
  kernel ridge regression with the exp kernel (ridge 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .._files import write_atomically
from ..features import LAYER_MODULES, make_feature_map
from ..layers.gates import COSFORMER_MAX_LEN
from ..oracle import BatchGD, Exact
from ..recipe import MLP, PRESETS, MiniBatchGD, Preset
from ..tasks.switching import switching_keys
from ..weights import ComplexGate, EntryGate, FixedDecay, ScalarGate, Uniform, VectorGate

SMOOTH = 16


@dataclass
class RegressConfig:
    dim: int = 16
    length: int = 1024
    n_seq: int = 64
    seed: int = 0
    decay: float = 0.95
    step: float = 0.5
    out: str = "runs/regress"


@dataclass
class Row:
    memory: str
    recipe: str
    mse_before: float
    mse_final: float
    cos_before: float
    cos_peak: float
    cos_final: float
    recovery_steps: int | None


def parameter_free_gate(preset: Preset, decay: float, n_seq: int, length: int, dim: int) -> Tensor | None:
    """The log-gate a gated memory uses when it has no learned parameters (see the module docstring)."""
    w = preset.recipe.weights
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay}")
    if isinstance(w, Uniform):
        return None
    if isinstance(w, FixedDecay):
        return FixedDecay.log_gamma(1).expand(n_seq, length, 1).clone()
    if isinstance(w, ScalarGate):
        return torch.full((n_seq, length, 1), math.log(decay), dtype=torch.float64)
    if isinstance(w, (VectorGate, ComplexGate, EntryGate)):
        forget = (1.0 - decay) * torch.logspace(math.log10(4.0), math.log10(0.25), dim, dtype=torch.float64)
        g = torch.log1p(-forget).expand(n_seq, length, 1, dim)
        return (g[..., None].expand(-1, -1, -1, -1, dim) if isinstance(w, EntryGate) else g).clone()
    raise ValueError(f"no parameter-free gate for {w!r}")


def parameter_free_inputs(preset: Preset, decay: float, step: float, n_seq: int, length: int,
                          dim: int) -> dict[str, Tensor]:
    """Every per-token input of the preset's op, as constants (see the module docstring)."""
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step must be in (0, 1], got {step}")
    opt = preset.recipe.optimizer
    n = preset.recipe.steps_per_token
    per_batch = step / opt.batch_size if isinstance(opt, MiniBatchGD) else step
    const = {"beta": step, "delta": step / (1.0 - step), "lr": per_batch, "theta": per_batch, "momentum": 0.5,
             "i": 0.0}
    inputs = {}
    for name in preset.recipe.inputs:
        if name == "g" and preset.gate in _OWN_GATES:
            inputs["g"] = _OWN_GATES[preset.gate](n_seq, length, dim)
        elif name == "g":
            inputs["g"] = parameter_free_gate(preset, decay, n_seq, length, dim)
        elif name == "bonus":
            inputs["bonus"] = torch.ones(1, dim, dtype=torch.float64)
        elif name == "angle":
            turn = math.pi / (2 * COSFORMER_MAX_LEN) if preset.gate == "cosformer" else 1.0 - decay
            inputs["angle"] = torch.full((n_seq, length, 1, dim), turn, dtype=torch.float64)
        else:
            shape = (n_seq, length, 1) + ((n,) if name == "beta" and n > 1 else ())
            inputs[name] = torch.full(shape, const[name], dtype=torch.float64)
    return inputs


# presets whose published gate is parameter-free: cosFormer's (no decay, a fixed turn) and DiJiang's (its first
# head's fixed decay)
_OWN_GATES = {
    "cosformer": lambda n_seq, length, dim: torch.zeros(n_seq, length, 1, dim, dtype=torch.float64),
    "dijiang": lambda n_seq, length, dim: torch.full((n_seq, length, 1), math.log1p(-1 / 32), dtype=torch.float64),
}


def feature_map(preset: Preset, dim: int) -> Callable[[Tensor], Tensor] | None:
    """The map a preset's layer would build for a learnable (or random-feature) name, as initialized (seed 0), in
    float64; None where the op resolves the name itself."""
    name = getattr(preset.recipe.regressor, "feature_map", None)
    if name not in LAYER_MODULES:
        return None
    return make_feature_map(name, dim, **({"heads": 1} if name in ("hedgehog", "rebased") else {})).double()


def initial_state(preset: Preset, n_seq: int, dim: int) -> tuple[Tensor, Tensor] | None:
    """Starting weights for memories that need them (TTT-MLP), seeded; None for the others."""
    r = preset.recipe.regressor
    if not isinstance(r, MLP):
        return None
    gen = torch.Generator().manual_seed(0)
    hidden = r.expansion * dim
    return (torch.randn(n_seq, 1, hidden, dim, generator=gen, dtype=torch.float64) * dim ** -0.5,
            torch.randn(n_seq, 1, dim, hidden, generator=gen, dtype=torch.float64) * hidden ** -0.5)


def memory_errors(preset: Preset, keys: Tensor, values: Tensor, decay: float, step: float) -> tuple[Tensor, Tensor]:
    """Squared error ||m_t(k_t) - v_t||^2 and direction error 1 - cos(m_t(k_t), v_t): [n_seq, length] each."""
    n_seq, length, dim = keys.shape
    shift = torch.nn.functional.pad
    k_mem = shift(keys, (0, 0, 1, 0))[:, :-1, None]     # association t is (k_{t-1}, v_{t-1})
    v_mem = shift(values, (0, 0, 1, 0))[:, :-1, None]
    n = preset.recipe.steps_per_token
    if n > 1:
        k_mem, v_mem = (x.unsqueeze(3).expand(-1, -1, -1, n, -1) for x in (k_mem, v_mem))
    inputs = {name: None if x is None else x.float()
              for name, x in parameter_free_inputs(preset, decay, step, n_seq, length, dim).items()}
    init = initial_state(preset, n_seq, dim)
    phi = feature_map(preset, dim)
    if phi is not None:
        inputs["feature_map"] = phi.float()
    # float32, as a layer runs: the data need no more, and the float64 batched triangular solve of some
    # BLAS builds is orders of magnitude slower
    y, _ = preset.recipe.op()(keys[:, :, None].float(), k_mem.float(), v_mem.float(), **inputs, scale=1.0,
                              initial_state=None if init is None else tuple(w.float() for w in init), mode="chunk")
    y = y[:, :, 0].double()
    cos = torch.nn.functional.cosine_similarity(y, values, dim=-1)
    return ((y - values) ** 2).sum(-1), 1.0 - cos


def _smooth(x: Tensor) -> Tensor:
    kernel = torch.ones(1, 1, SMOOTH, dtype=x.dtype) / SMOOTH
    return torch.nn.functional.conv1d(x[None, None], kernel, padding="valid")[0, 0]


def summarize(name: str, preset: Preset, mse: Tensor, cos: Tensor) -> Row:
    """mse, cos: mean errors per step [length]. 'before' averages [T/8, T/4), 'final' the last quarter;
    recovery: steps after the switch until the smoothed direction error, past its peak in the first T/8,
    first comes within 10% of its final level."""
    T = mse.shape[0]
    switch = T // 4
    final = cos[3 * T // 4:].mean().item()
    smooth = _smooth(cos[switch:])
    peak = int(smooth[: T // 8].argmax())
    settled = (smooth[peak:] <= 1.1 * final).nonzero()
    return Row(name, preset.recipe.describe(), mse[T // 8: switch].mean().item(), mse[3 * T // 4:].mean().item(),
               cos[T // 8: switch].mean().item(), smooth[peak].item(), final,
               peak + int(settled[0]) if len(settled) else None)


def causal_presets() -> dict[str, Preset]:
    """The memories this regression runs: at step t each may read the associations up to t only; SOFT's and
    Skyformer's whole-sequence memories (encoders) have no such prefix."""
    return {name: p for name, p in PRESETS.items() if p.recipe.causal}


def run(cfg: RegressConfig, progress=None) -> tuple[list[Row], dict[str, dict[str, list[float]]]]:
    keys, values = switching_keys(cfg.n_seq, cfg.length, cfg.dim, seed=cfg.seed)
    rows, curves = [], {}
    for name, preset in causal_presets().items():
        mse, cos = (e.mean(0) for e in memory_errors(preset, keys, values, cfg.decay, cfg.step))
        if not bool(torch.isfinite(mse).all() and torch.isfinite(cos).all()):
            raise RuntimeError(f"{name}: non-finite error, the memory diverged")
        rows.append(summarize(name, preset, mse, cos))
        curves[name] = {"mse": mse.tolist(), "cos": cos.tolist()}
        if progress is not None:
            progress()
    return rows, curves


def save(cfg: RegressConfig, rows: list[Row], curves: dict[str, list[float]]) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    payload = json.dumps({"config": asdict(cfg), "rows": [asdict(r) for r in rows], "curves": curves})
    write_atomically(results, lambda f: f.write_text(payload))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for metric, ax, label in (("mse", axes[0], "squared error ||y_t - v_t||^2"),
                              ("cos", axes[1], "direction error 1 - cos(y_t, v_t)")):
        for i, (name, c) in enumerate(curves.items()):  # one colour each; first-order batch GD dashed
            style = "--" if isinstance(PRESETS[name].recipe.optimizer, (BatchGD, Exact)) else "-"
            ax.plot(range(SMOOTH - 1, cfg.length), _smooth(torch.tensor(c[metric])).numpy(), style, label=name,
                    lw=1.3, color=plt.cm.tab20(i % 20))
        ax.axvline(cfg.length // 4, color="k", ls="--", lw=0.8, label="switch (T/4)")
        ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_ylabel(f"{label}\n(mean of {cfg.n_seq} sequences, smoothed over {SMOOTH})")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Test-time regression in one forward pass, no learned parameters (d={cfg.dim}, T={cfg.length})")
    fig.tight_layout()
    plot = out / "regress.png"
    write_atomically(plot, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return results, plot
