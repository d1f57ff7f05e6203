"""`ttr bench`: speed and memory of each op and form, as ratios measured in one run.

For every op, gate kind, head dim and length it times the chunk and recurrent forms (forward, and
forward + backward), torch's causal scaled_dot_product_attention as the quadratic reference, and a
large matmul for the machine's attainable GFLOP/s. Peak memory is the growth over the call: on CUDA
max_memory_allocated, on Linux CPUs the process's peak RSS (reset through /proc/self/clear_refs).

Three more ops time variants rather than gates (VARIANT_OPS): linear attention with each feature map, the sliding
windows against the full causal forms, and the non-causal ops (SOFT, Skyformer, linear attention over the whole
sequence) against non-causal SDPA; with them, the Nystrom ops' errors against the exact kernel smoother and
regression at a few landmark counts.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import ops
from ._checks import checks
from ._files import write_atomically
from ._memory import freed_memory_kept, release_freed_memory
from .features import get_feature_map, make_feature_map
from .ops._varlen import Layout

# the weight structures timed: no gate, a scalar or vector log-gate, RWKV-6's bonus (a vector gate with u),
# GateLoop's complex gate (a vector gate with an angle) and Mamba's per-entry gate
GATES = ("none", "scalar", "vector", "bonus", "complex", "entry")
# the ops benchmarked and the gate kinds each takes
CASES: dict[str, tuple[str, ...]] = {
    "linear_attention": GATES,
    "mlstm": ("scalar",),
    "delta_rule": ("none", "scalar"),
    "longhorn": ("none",),
    "delta_product": ("none",),
    "ttt_linear": ("none",),
    "ttt_mlp": ("none",),
    "titans": ("scalar",),
    "mesa": ("none", "scalar"),
    "softmax": ("none",),
    "local_linear": ("none",),
    # the variants below take the gate column's place
    "feature_map": ("rfa", "hedgehog", "rebased", "dijiang", "based", "dpfp", "poly2"),  # linear attention, no gate
    "window": ("linear_attention", "softmax"),  # the op (bench name) timed in a window of WINDOW tokens
    "noncausal": ("soft", "skyformer", "linear_attention"),  # over the whole sequence
}
VARIANT_OPS = ("feature_map", "window", "noncausal")  # not filtered by --gates
# key dim of the quadratic maps (D (D + 1) / 2 features): Based's projected feature dim, and ReBased's (it keeps
# Based's); the other maps take Dk = D. Values keep Dv = D.
FEATURE_KEY_DIM = {"based": 16, "rebased": 16, "poly2": 16}
WINDOW = 64  # Based's sliding window
NYSTROM_LANDMARKS = (16, 64, 256)
NYSTROM_LENGTH = 1024  # at most; T x T float64 kernel solves
# bench names of local_polynomial_attention's orders; their recurrent form answers one query against the
# cache (decoding), not a training path, so it is not timed; order 1 (conjugate gradients from Dk = 32) costs
# T^2 D a step, about 10x SDPA at D = 64, and is timed at D <= 64
LOCAL_ORDERS = {"softmax": 0, "local_linear": 1}
# ops timed at head dims up to a bound only: local_linear for its cost, the variants (VARIANT_OPS) to keep what
# they add to the default grid to minutes on a 2-core CPU
MAX_DIM = {"local_linear": 64, "feature_map": 64, "window": 64, "noncausal": 64}
# a per-entry gate is a [B, T, H, D, D] tensor (2 GB at T = 8192, D = 128, H = 4): timed at D <= 64
ENTRY_MAX_DIM = 64
CG_STEPS = (1, 2, 4, 8, 16, 32)
MINI_BATCH = 16  # TTT's and Titans' mini-batch (their chunk), as in the presets
LONG_CALL_S = 5.0  # see time_ms


@dataclass
class BenchConfig:
    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    head_dims: tuple[int, ...] = (64, 128)
    gates: tuple[str, ...] = GATES
    ops: tuple[str, ...] = tuple(CASES)
    heads: int = 4
    batch: int = 1
    chunk_size: int = 64
    recurrent_lengths: tuple[int, ...] = (1024, 4096)
    conditioning_length: int = 16384  # mesa_conditioning's T
    repeats: int = 3
    device: str = "cpu"
    out: str = "runs/bench/bench.json"
    resume: bool = False
    threads: int | None = None  # torch's CPU threads (None: as torch has them)


@dataclass
class BenchRow:
    op: str
    gate: str
    T: int
    D: int
    chunk_fwd_ms: float
    chunk_fwdbwd_ms: float
    recurrent_fwd_ms: float | None
    recurrent_fwdbwd_ms: float | None
    sdpa_fwd_ms: float
    sdpa_fwdbwd_ms: float
    chunk_gflops: float | None  # None where no flop count is kept (the exact memory's factorizations)
    peak_mb: float | None = None  # measured after all timings; None where it cannot be
    # forward+backward of what a variant is measured against (has_reference): the window's full causal form, or
    # linear_attention(causal=False) for SOFT and Skyformer; None for the other rows
    ref_fwdbwd_ms: float | None = None
    # the *_ms figures above are medians of their repeats; these the minimums, and the largest spread
    # max / min - 1 among the row's repeated figures (a loaded machine shows in it)
    chunk_fwd_min_ms: float | None = None
    chunk_fwdbwd_min_ms: float | None = None
    sdpa_fwdbwd_min_ms: float | None = None
    ref_fwdbwd_min_ms: float | None = None
    spread: float | None = None
    # the chunk forward with ttr's value checks off (ttr.checks(False)), min of its repeats, interleaved with the rest
    unchecked_fwd_min_ms: float | None = None

    @property
    def checks_share(self) -> float | None:
        """What the value checks add to the chunk forward: min with them over min without, minus 1."""
        if self.unchecked_fwd_min_ms is None or self.chunk_fwd_min_ms is None:
            return None
        return self.chunk_fwd_min_ms / self.unchecked_fwd_min_ms - 1

    @property
    def speedup(self) -> float | None:
        """Recurrent over chunk forward+backward (the recurrent form is timed once: seconds per call)."""
        return None if self.recurrent_fwdbwd_ms is None else self.recurrent_fwdbwd_ms / self._chunk

    @property
    def vs_sdpa(self) -> float:
        return _least(self.sdpa_fwdbwd_min_ms, self.sdpa_fwdbwd_ms) / self._chunk

    @property
    def vs_ref(self) -> float | None:
        return None if self.ref_fwdbwd_ms is None else _least(self.ref_fwdbwd_min_ms, self.ref_fwdbwd_ms) / self._chunk

    @property
    def _chunk(self) -> float:
        """The ratios' denominator: the least disturbed run (the minimum) where the row has one."""
        return _least(self.chunk_fwdbwd_min_ms, self.chunk_fwdbwd_ms)

    @property
    def inconsistent(self) -> bool:
        """A forward slower than forward+backward: only a load on the machine can do that."""
        return self.chunk_fwd_ms > self.chunk_fwdbwd_ms


def _least(minimum: float | None, median: float) -> float:
    return median if minimum is None else minimum


@dataclass(frozen=True)
class Timing:
    """One figure's repeats, ms."""

    min: float
    median: float
    max: float

    @property
    def spread(self) -> float:
        return self.max / self.min - 1.0


def has_recurrent(op: str, gate: str) -> bool:
    """Whether the op has a recurrent training form to time: local softmax's recurrent form answers one query
    against the cache (decoding), and the non-causal ops have none."""
    return op not in LOCAL_ORDERS and op != "noncausal" and (op, gate) != ("window", "softmax")


def has_reference(op: str, gate: str) -> bool:
    """Whether the row is also timed against a reference form (BenchRow.ref_fwdbwd_ms)."""
    return op == "window" or (op == "noncausal" and gate != "linear_attention")


def causal_sdpa(op: str) -> bool:
    """Whether the op's SDPA reference is causal: the non-causal ops compare with non-causal SDPA."""
    return op != "noncausal"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_ms(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    _sync(device)
    return 1e3 * (time.perf_counter() - start)


def interleaved(forms: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, Timing]:
    """Each form timed `repeats` times in rounds that take every form in turn, so that a change in the machine's
    load falls on all of them alike, after one warm-up round. A form whose warm-up takes LONG_CALL_S or more is not
    repeated: that call is its measurement (warm-up effects are lost in it, and repeats would take minutes)."""
    warm = {name: _wall_ms(fn, device) for name, fn in forms.items()}
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):
        for name, fn in forms.items():
            if warm[name] < 1e3 * LONG_CALL_S:
                times[name].append(_wall_ms(fn, device))
    return {name: Timing(min(ts), statistics.median(ts), max(ts)) if ts else Timing(warm[name], warm[name], warm[name])
            for name, ts in times.items()}


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool = True) -> float:
    """Median wall time of fn in ms (interleaved's rules for one form); warmup=False: one call, no warm-up."""
    if not warmup:
        return _wall_ms(fn, device)
    return interleaved({"fn": fn}, device, repeats)["fn"].median


def _rss_mb(field_name: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory the call adds at its peak, in MiB (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    try:
        release_freed_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        base = _rss_mb("VmRSS")
        fn()
        return _rss_mb("VmHWM") - base
    except OSError:
        return None


def matmul_gflops(device: torch.device, repeats: int, n: int = 2048) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n ** 3 / time_ms(lambda: a @ b, device, repeats + 2) / 1e6


def chunk_flops(op: str, T: int, C: int, Dk: int, Dv: int, heads: int, batch: int, gate: str = "none") -> float | None:
    """Matrix-product flops of an op's chunk form, forward (the products as computed, masks included)."""
    # factorizations, SDPA's, elementwise products; the variants are compared by time only
    if op == "mesa" or op in LOCAL_ORDERS or op in VARIANT_OPS or gate == "entry":
        return None
    if gate == "complex":  # real and imaginary key channels
        Dk *= 2
    if op == "mlstm":  # linear attention with the normalizer as one more value column
        op, Dv = "linear_attention", Dv + 1
    b, Dh = MINI_BATCH, 4 * Dk
    delta = C * (5 * Dk + 3 * Dv) + 6 * Dk * Dv  # K K^T, Q K^T, the triangular solve, W S, Q S, P U, K^T U
    per_token = {
        "linear_attention": 2 * (C * (Dk + Dv) + 2 * Dk * Dv),
        "delta_rule": delta,
        "longhorn": delta,
        "delta_product": 2 * delta,  # two sub-steps per token
        "ttt_linear": delta + C * Dk,  # the delta rule's products, and the start weights' solve
        "titans": delta + 2 * C * (Dk + C) + 6 * Dk * Dv,  # and the momentum's: its solve, L_A L_E, P's products
        "ttt_mlp": 6 * Dk * Dh + 8 * Dh * Dv + 2 * b * (2 * Dh + Dv + Dk),
    }[op]
    padded = -(-T // (b if op == "ttt_mlp" else C)) * (b if op == "ttt_mlp" else C)
    return float(batch * heads * padded * per_token)


def _fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for x in leaves:
            x.grad = None
        out = fn()
        out.backward(torch.ones_like(out))
    return run


def _problem(cfg: BenchConfig, op: str, gate: str, T: int, D: int, device: torch.device):
    """Inputs (leaves with gradients) for one op, and a maker of its forward calls for each form."""
    B, H = cfg.batch, cfg.heads
    gen = torch.Generator(device=device).manual_seed(T * D)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    n = (2,) if op == "delta_product" else ()
    Dk = FEATURE_KEY_DIM.get(gate, D) if op == "feature_map" else D
    q, k, v = rand(B, T, H, Dk), rand(B, T, H, *n, Dk), rand(B, T, H, *n, D)
    shape = {"none": None, "scalar": (B, T, H), "entry": (B, T, H, D, D)}.get(gate, (B, T, H, D))
    g = None if shape is None else F.logsigmoid(rand(*shape) + 4)
    extra = {
        "linear_attention": lambda: {"g": g, **({"bonus": rand(H, D)} if gate == "bonus" else {}),
                                     **({"angle": rand(B, T, H, D)} if gate == "complex" else {})},
        "mlstm": lambda: {"i": rand(B, T, H), "g": g},
        "delta_rule": lambda: {"beta": torch.sigmoid(rand(B, T, H)), "g": g},
        "longhorn": lambda: {"delta": F.softplus(rand(B, T, H))},
        "delta_product": lambda: {"beta": 2 * torch.sigmoid(rand(B, T, H, 2))},
        "ttt_linear": lambda: {"lr": torch.sigmoid(rand(B, T, H)) / MINI_BATCH},
        "ttt_mlp": lambda: {"lr": torch.sigmoid(rand(B, T, H)) / MINI_BATCH,
                            "initial_state": (rand(B, H, 4 * D, D) * D ** -0.5, rand(B, H, D, 4 * D) * (4 * D) ** -0.5)},
        "titans": lambda: {"theta": torch.sigmoid(rand(B, T, H)) / MINI_BATCH,
                           "momentum": 0.05 + 0.9 * torch.sigmoid(rand(B, T, H)), "g": g},
        "mesa": lambda: {"g": g, "beta": None if g is None else torch.sigmoid(rand(B, T, H)), "lamb": 1.0},
        "softmax": lambda: {"order": 0},
        "local_linear": lambda: {"order": 1},
        "feature_map": lambda: _feature_map_keywords(gate, Dk, device),
        "window": lambda: {"window": WINDOW, **({"order": 0} if gate == "softmax" else {})},
        "noncausal": lambda: {"causal": False} if gate == "linear_attention" else {},
    }[op]()
    if op == "mesa":  # unit keys, as the layers feed it
        k = F.normalize(k, dim=-1)
    if op in ONLINE_OPS:  # unit q and k, as the presets ask for them
        extra["qk_l2norm"] = True
    tensors = [t for x in (q, k, v, *extra.values()) if isinstance(x, (torch.Tensor, tuple))
               for t in (x if isinstance(x, tuple) else (x,))]
    leaves = [t.requires_grad_() for t in tensors]
    fn = _implementation(op, gate)

    def call(mode: str, cu_seqlens: torch.Tensor | None = None, tensors: list[torch.Tensor] | None = None,
             reference: bool = False) -> Callable[[], torch.Tensor]:
        """The op's forward in `mode`, on the leaves or on `tensors` in their place (same order); with `reference`,
        the form the row is measured against (see has_reference)."""
        given = iter(leaves if tensors is None else tensors)
        q_, k_, v_ = next(given), next(given), next(given)
        kw = {name: tuple(next(given) for _ in x) if isinstance(x, tuple) else
              next(given) if isinstance(x, torch.Tensor) else x for name, x in extra.items()}
        f = fn
        if reference:
            f, kw = ((fn, {name: x for name, x in kw.items() if name != "window"}) if op == "window"
                     else (ops.linear_attention, {"causal": False}))
        if mode == "chunk" and f.__name__ in CHUNKED:
            kw["chunk_size"] = cfg.chunk_size
        if op in MINI_BATCH_OPS:
            kw["batch_size"] = MINI_BATCH
        if cu_seqlens is not None:
            kw["cu_seqlens"] = cu_seqlens
        return lambda: f(q_, k_, v_, **kw, mode=mode)[0]

    return call, leaves


def _implementation(op: str, gate: str) -> Callable:
    """The function of ttr.ops a row times: a variant op's gate column names it (by its bench name)."""
    name = gate if op in ("window", "noncausal") else "linear_attention" if op == "feature_map" else op
    if name in LOCAL_ORDERS:
        return ops.local_polynomial_attention
    return ops.soft_attention if name == "soft" else getattr(ops, name)


def _feature_map_keywords(name: str, dim: int, device: torch.device) -> dict:
    """linear_attention's keywords for feature map `name` (seeded) on keys of dim `dim`: normalized where the map
    is positive, as the presets use them."""
    fmap = make_feature_map(name, dim)
    if isinstance(fmap, torch.nn.Module):
        fmap.to(device)
    return {"feature_map": fmap, "normalize": get_feature_map(fmap).positive}


CHUNKED = ("linear_attention", "mlstm", "delta_rule", "longhorn", "delta_product", "mesa", "ttt_linear",
           "titans")  # take chunk_size
MINI_BATCH_OPS = ("ttt_linear", "ttt_mlp", "titans")  # take batch_size
ONLINE_OPS = ("delta_rule", "longhorn", "delta_product", *MINI_BATCH_OPS)


def _unchecked(fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with checks(False):
            fn()
    return run


def _no_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn()
    return run


def _sdpa(cfg: BenchConfig, T: int, D: int, device: torch.device, causal: bool = True
          ) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """scaled_dot_product_attention's forward on fresh inputs (leaves with gradients): the quadratic reference."""
    qs, ks, vs = (torch.randn(cfg.batch, cfg.heads, T, D, device=device, requires_grad=True) for _ in range(3))
    return lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal), [qs, ks, vs]


def time_sdpa(cfg: BenchConfig, T: int, D: int, device: torch.device, causal: bool = True) -> dict[str, Timing]:
    """SDPA's forward ("fwd") and forward+backward ("fwdbwd")."""
    sdpa, leaves = _sdpa(cfg, T, D, device, causal)
    return interleaved({"fwd": _no_grad(sdpa), "fwdbwd": _fwd_bwd(sdpa, leaves)}, device, cfg.repeats)


def time_op(cfg: BenchConfig, op: str, gate: str, T: int, D: int, device: torch.device,
            sdpa: dict[str, Timing]) -> BenchRow:
    """The chunk form's forward and forward+backward and the reference form interleaved; the recurrent form once
    (thousands of small steps: seconds, no warm-up needed); SDPA's timings as measured once for this size."""
    call, leaves = _problem(cfg, op, gate, T, D, device)
    forms = {"fwd": _no_grad(call("chunk")), "fwdbwd": _fwd_bwd(call("chunk"), leaves),
             "unchecked": _unchecked(_no_grad(call("chunk")))}
    if has_reference(op, gate):
        forms["ref"] = _fwd_bwd(call("chunk", reference=True), leaves)
    t = interleaved(forms, device, cfg.repeats)
    rec_fwd = rec_fb = None
    if T in cfg.recurrent_lengths and has_recurrent(op, gate):
        rec_fwd = time_ms(_no_grad(call("recurrent")), device, 1, warmup=False)
        rec_fb = time_ms(_fwd_bwd(call("recurrent"), leaves), device, 1, warmup=False)
    flops = chunk_flops(op, T, cfg.chunk_size, D, D, cfg.heads, cfg.batch, gate)
    gflops = None if flops is None else 3 * flops / t["fwdbwd"].min / 1e6
    ref = t.get("ref")
    return BenchRow(op, gate, T, D, t["fwd"].median, t["fwdbwd"].median, rec_fwd, rec_fb, sdpa["fwd"].median,
                    sdpa["fwdbwd"].median, gflops, ref_fwdbwd_ms=None if ref is None else ref.median,
                    chunk_fwd_min_ms=t["fwd"].min, chunk_fwdbwd_min_ms=t["fwdbwd"].min,
                    sdpa_fwdbwd_min_ms=sdpa["fwdbwd"].min, ref_fwdbwd_min_ms=None if ref is None else ref.min,
                    spread=max(x.spread for x in [*t.values(), *sdpa.values()]), unchecked_fwd_min_ms=t["unchecked"].min)


# a spread of repeats above this says the machine was loaded while the row was timed
LOADED_SPREAD = 0.25


def load_warning(rows: list[BenchRow]) -> str | None:
    """A warning naming the rows whose repeats spread beyond LOADED_SPREAD or whose forward outran its
    forward+backward, or None where every row looks undisturbed."""
    loaded = [r for r in rows if (r.spread is not None and r.spread > LOADED_SPREAD) or r.inconsistent]
    if not loaded:
        return None
    worst = max(loaded, key=lambda r: r.spread or 0.0)
    return (f"warning: {len(loaded)} of {len(rows)} rows look disturbed by other load (repeats spread up to "
            f"{100 * (worst.spread or 0):.0f}% at {worst.op} {worst.gate} D={worst.D} T={worst.T}"
            f"{', or a forward slower than its forward+backward' if any(r.inconsistent for r in loaded) else ''}); "
            "ratios use each figure's minimum; rerun them on a quiet machine or with more --repeats")


def mesa_solvers(cfg: BenchConfig, device: torch.device) -> list[dict]:
    """The exact memory's solvers on one gated problem (T = min(1024, longest length), the first head dim):
    CG's relative error against the exact float64 solve for a fixed budget of k steps and at its default
    residual tolerance, the exact solve's float32 error, and forward+backward times."""
    T, D = min(1024, max(cfg.lengths)), cfg.head_dims[0]
    call, leaves = _problem(cfg, "mesa", "scalar", T, D, device)
    q, k, v, g, beta = leaves
    with torch.no_grad():
        exact64, _ = ops.mesa(*(x.double() for x in (q, k, v, g, beta)), lamb=1.0)

    def rel(y: torch.Tensor) -> float:
        return float((y.double() - exact64).norm() / exact64.norm())

    rows = [{"solver": "exact float32", "T": T, "D": D, "rel_error_vs_float64": rel(call("chunk")().detach()),
             "fwdbwd_ms": time_ms(_fwd_bwd(call("chunk"), leaves), device, cfg.repeats)}]
    budgets = {f"cg {steps}": {"cg_steps": steps, "cg_tol": 0} for steps in CG_STEPS}  # fixed budgets
    for name, kw in {**budgets, "cg default": {}}.items():  # default: to the residual tolerance
        fn = lambda kw=kw: ops.mesa(q, k, v, g, beta, lamb=1.0, solver="cg", **kw)[0]  # noqa: E731
        rows.append({"solver": name, "rel_error_vs_float64": rel(fn().detach()),
                     "fwdbwd_ms": time_ms(_fwd_bwd(fn, leaves), device, cfg.repeats)})
    return rows


def repeated_keys(T: int, D: int, n_keys: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [1, T, 1, D] whose keys are n_keys unit directions, repeated: H_kk has rank n_keys and grows
    like T, so H_kk + lamb is as ill-conditioned as T / lamb."""
    gen = torch.Generator().manual_seed(seed)
    few = F.normalize(torch.randn(n_keys, D, generator=gen), dim=-1)
    k = few[torch.randint(0, n_keys, (T,), generator=gen)][None, :, None]
    return torch.randn(1, T, 1, D, generator=gen), k, torch.randn(1, T, 1, D, generator=gen)


def mesa_conditioning(cfg: BenchConfig, device: torch.device) -> list[dict]:
    """The exact memory in float32 on ill-conditioned keys (3 repeated unit keys, T = conditioning_length,
    the first head dim), with uniform weights and with decay 0.999, for two ridges: each form's relative error against the
    float64 chunk form (itself equal to per-token least squares in the tests)."""
    T = cfg.conditioning_length
    q, k, v = (x.to(device) for x in repeated_keys(T, cfg.head_dims[0], 3))
    rows = []
    for weights, g in (("uniform", None), ("decay 0.999", torch.full((1, T, 1), -1e-3, device=device))):
        for lamb in (1e-2, 1e-3):
            ref, _ = ops.mesa(q.double(), k.double(), v.double(), None if g is None else g.double(), lamb=lamb)
            row = {"weights": weights, "lamb": lamb, "T": T, "D": cfg.head_dims[0]}
            for mode in ("chunk", "recurrent"):
                o, _ = ops.mesa(q, k, v, g, lamb=lamb, mode=mode)
                row[f"{mode}_rel_error"] = float((o.double() - ref).norm() / ref.norm())
            rows.append(row)
    return rows


SDPA = ("sdpa", "causal")  # the quadratic reference, as a pair's second member
# the ratios the speed targets are stated in (what a gate, a mini-batch learner, the exact memory, local linear
# attention cost over its baseline): (row, over row) by (op, gate)
RATIO_PAIRS = (
    (("linear_attention", "vector"), ("linear_attention", "none")),
    (("ttt_linear", "none"), ("delta_rule", "scalar")),
    (("titans", "scalar"), ("delta_rule", "scalar")),
    (("ttt_mlp", "none"), ("delta_rule", "scalar")),
    (("mesa", "none"), ("delta_rule", "scalar")),
    (("mesa", "scalar"), ("delta_rule", "scalar")),
    (("local_linear", "none"), SDPA),
)


def _chunk_fwd_bwd(cfg: BenchConfig, op: str, gate: str, T: int, D: int, device: torch.device) -> Callable[[], None]:
    """A row's chunk forward+backward on fresh inputs (SDPA's for SDPA)."""
    if (op, gate) == SDPA:
        return _fwd_bwd(*_sdpa(cfg, T, D, device))
    call, leaves = _problem(cfg, op, gate, T, D, device)
    return _fwd_bwd(call("chunk"), leaves)


def paired_ratios(cfg: BenchConfig, device: torch.device, rows: list[BenchRow]) -> list[dict]:
    """Each pair of RATIO_PAIRS whose rows this run timed, at each size where it timed both: the two chunk
    forward+backwards timed again in interleaved rounds, so that a change in the machine's load falls on both alike
    (rows are timed minutes apart). The ratios of their minimums and of their medians."""
    timed = {(r.op, r.gate, r.D, r.T) for r in rows}
    sizes, out = sorted({(r.D, r.T) for r in rows}), []
    for a, b in RATIO_PAIRS:
        for D, T in sizes:
            if (*a, D, T) not in timed or (b != SDPA and (*b, D, T) not in timed):
                continue
            t = interleaved({"a": _chunk_fwd_bwd(cfg, *a, T, D, device), "b": _chunk_fwd_bwd(cfg, *b, T, D, device)},
                            device, cfg.repeats)
            out.append({"row": " ".join(a), "over": " ".join(b), "D": D, "T": T, "min_ratio": t["a"].min / t["b"].min,
                        "median_ratio": t["a"].median / t["b"].median, "row_min_ms": t["a"].min,
                        "over_min_ms": t["b"].min, "row_median_ms": t["a"].median, "over_median_ms": t["b"].median})
    return out


def nystrom_errors(cfg: BenchConfig, device: torch.device) -> list[dict]:
    """SOFT's and Skyformer's relative errors (ops.nystrom_error) against the exact Gaussian kernel smoother they
    approximate and the exact kernel ridge regression (ridge 1), at each of NYSTROM_LANDMARKS landmarks, their other
    options the published ones. One head, T = min(NYSTROM_LENGTH, longest length), the first head dim, q, k ~
    N(0, I / 4): at D = 64 a typical kernel value is e^-2 (unit variance gives e^-8, a nearly diagonal kernel that
    no few landmarks approximate)."""
    T, D = min(NYSTROM_LENGTH, max(cfg.lengths)), cfg.head_dims[0]
    gen = torch.Generator(device=device).manual_seed(T * D)
    q, k, v = (torch.randn(1, T, 1, D, device=device, generator=gen) * s for s in (0.5, 0.5, 1.0))
    return [{"method": method, "n_landmarks": m, "T": T, "D": D, **ops.nystrom_error(q, k, v, method, m)}
            for method in ("soft", "skyformer") for m in NYSTROM_LANDMARKS]


VARLEN_OPS = {"linear_attention": "scalar", "delta_rule": "scalar", "mesa": "scalar", "ttt_linear": "none",
              "softmax": "none"}
VARLEN_SEQUENCES = 8


def varlen_costs(cfg: BenchConfig, device: torch.device) -> list[dict]:
    """Packed sequences: VARLEN_SEQUENCES sequences of lengths spread evenly from T / 8 to T (T = the longest
    length up to 2048, the first head dim), forward+backward three ways: one packed call (cu_seqlens), the
    padded batch [N, T] (what a call without cu_seqlens costs: 44% of it padding), and one call per sequence.
    The three are interleaved, repeats + 1 rounds after a warm-up; min and median in ms."""
    T, D, N = min(2048, max(cfg.lengths)), cfg.head_dims[0], VARLEN_SEQUENCES
    lengths = torch.linspace(T / 8, T, N).round().long()
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(device)
    layout = Layout(cu)
    rows = []
    for op, gate in VARLEN_OPS.items():
        if op not in cfg.ops:
            continue
        call, leaves = _problem(replace(cfg, batch=1), op, gate, int(cu[-1]), D, device)
        padded = [layout.pad(x.detach()).requires_grad_() for x in leaves]
        forms = {
            "packed": _fwd_bwd(lambda: call("chunk", cu_seqlens=cu)(), leaves),
            "padded": _fwd_bwd(lambda: call("chunk", tensors=padded)(), padded),
            "loop": _fwd_bwd(lambda: torch.cat([call("chunk", tensors=[x[:, a:b] for x in leaves])()
                                                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1), leaves),
        }
        row = {"op": op, "gate": gate, "N": N, "T_max": T, "tokens": int(cu[-1]), "D": D}
        for name, t in interleaved(forms, device, cfg.repeats + 1).items():
            row[f"{name}_min_ms"], row[f"{name}_median_ms"] = t.min, t.median
        rows.append(row)
    return rows


_SAME_RUN = ("heads", "batch", "chunk_size", "repeats", "device", "recurrent_lengths", "threads")


def _resumable_rows(cfg: BenchConfig) -> dict[tuple[str, str, int, int], BenchRow]:
    """Rows of an earlier, interrupted run with the same settings, by (op, gate, D, T). A file that is not such
    a run, or one measured with other settings, is a ValueError naming it: resuming never overwrites it."""
    path = Path(cfg.out)
    if not (cfg.resume and path.exists()):
        return {}
    names = {f.name for f in fields(BenchRow)}
    try:
        old = json.loads(path.read_text())
        config, rows = old["config"], old["rows"]
        rows = [BenchRow(**{k: v for k, v in r.items() if k in names}) for r in rows]
        differ = [key for key in _SAME_RUN if config.get(key) != json.loads(json.dumps(getattr(cfg, key)))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--resume: cannot read {str(path)!r} as a ttr bench result ({type(exc).__name__}: {exc}); "
                         "move it away or run without --resume") from None
    if differ:
        raise ValueError(f"--resume: {str(path)!r} was measured with other settings ("
                         + ", ".join(f"{key} {config.get(key)!r}" for key in differ) + "); pass another --out")
    return {(r.op, r.gate, r.D, r.T): r for r in rows}


def grid(cfg: BenchConfig) -> list[tuple[str, str, int, int]]:
    """The rows a run times: (op, gate, D, T)."""
    for gate in cfg.gates:
        if gate not in GATES:
            raise ValueError(f"gates must be among {GATES}, got {gate!r}")
    for op in cfg.ops:
        if op not in CASES:
            raise ValueError(f"ops must be among {tuple(CASES)}, got {op!r}")
    return [(op, gate, D, T) for op in cfg.ops for gate in CASES[op] if gate in cfg.gates or op in VARIANT_OPS
            for D in cfg.head_dims for T in cfg.lengths if D <= MAX_DIM.get(op, ENTRY_MAX_DIM if gate == "entry" else D)]


def run(cfg: BenchConfig, progress: Callable[[str], None] | None = None
        ) -> tuple[float, list[BenchRow], list[dict], list[dict], list[dict], list[dict], list[dict]]:
    """All timings first, then all peak-memory measurements: on the CPU the latter change how the
    allocator returns memory (release_freed_memory), which must not touch the timings.
    The JSON is rewritten after every row, so an interrupted run keeps what it measured (--resume)."""
    rows_to_time = grid(cfg)
    device = torch.device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    cfg = replace(cfg, threads=torch.get_num_threads())  # what the JSON says ran
    torch.manual_seed(0)
    done = _resumable_rows(cfg)
    kept = [row for key, row in done.items() if key not in set(rows_to_time)]  # finished rows of other sizes stay
    mm = matmul_gflops(device, cfg.repeats)
    rows, sdpa = [], {}
    for op, gate, D, T in rows_to_time:
        if progress is not None:
            progress(f"time {op} g={gate} D={D} T={T}")
        row = done.get((op, gate, D, T))
        if row is None:
            key = T, D, causal_sdpa(op)
            if key not in sdpa:  # timed once per size, shared by every op of that size
                sdpa[key] = time_sdpa(cfg, T, D, device, causal=key[2])
            row = time_op(cfg, op, gate, T, D, device, sdpa[key])
        rows.append(row)
        save(cfg, mm, rows + kept)
    if progress is not None:
        progress("ratios, interleaved")
    ratios = paired_ratios(cfg, device, rows)
    save(cfg, mm, rows + kept, ratios=ratios)
    solvers = mesa_solvers(cfg, device) if "mesa" in cfg.ops else []
    conditioning = mesa_conditioning(cfg, device) if "mesa" in cfg.ops else []
    nystrom = nystrom_errors(cfg, device) if "noncausal" in cfg.ops else []
    if progress is not None:
        progress("packed sequences")
    varlen = varlen_costs(cfg, device)
    for row in rows:
        if progress is not None:
            progress(f"memory {row.op} g={row.gate} D={row.D} T={row.T}")
        if row.peak_mb is None:
            row.peak_mb = peak_mb(_chunk_fwd_bwd(cfg, row.op, row.gate, row.T, row.D, device), device)
            save(cfg, mm, rows + kept, solvers, conditioning, varlen, nystrom, ratios)
    save(cfg, mm, rows + kept, solvers, conditioning, varlen, nystrom, ratios)
    return mm, rows, ratios, solvers, conditioning, varlen, nystrom


def save(cfg: BenchConfig, matmul: float, rows: list[BenchRow], solvers: list[dict] | None = None,
         conditioning: list[dict] | None = None, varlen: list[dict] | None = None,
         nystrom: list[dict] | None = None, ratios: list[dict] | None = None) -> Path:
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    payload = {
        "config": asdict(cfg), "device": device, "torch": torch.__version__, "matmul_gflops": matmul,
        "freed_memory_kept": freed_memory_kept(),
        "rows": [asdict(r) | {"speedup_vs_recurrent": r.speedup, "sdpa_over_chunk": r.vs_sdpa, "ref_over_chunk": r.vs_ref}
                 for r in rows],
        "mesa_solvers": solvers or [],
        "mesa_conditioning": conditioning or [],
        "ratios": ratios or [],
        "packed_sequences": varlen or [],
        "nystrom_error": nystrom or [],
    }
    return write_atomically(out, lambda f: f.write_text(json.dumps(payload, indent=1)))


VARIANT_SHORT = {"feature_map": "fm", "window": "win", "noncausal": "nc", "linear_attention": "la", "softmax": "sm"}
VARIANT_LEGEND = (
    f"fm: linear attention with feature map `variant` (no gate; {', '.join(FEATURE_KEY_DIM)} at Dk = "
    f"{min(FEATURE_KEY_DIM.values())}, the others at Dk = D; Dv = D; normalized where the map is positive). win: "
    f"the op (la linear attention, sm softmax) in a sliding window of {WINDOW} tokens; ref: its full causal form. "
    "nc: over the whole sequence (SOFT, Skyformer and linear attention at their defaults); sdpa: non-causal SDPA; "
    "ref: linear_attention(causal=False). fwd, f+b: the row's chunk form, ms; sdpa, ref: forward+backward, ms; "
    "x: the other form's forward+backward over the row's (>1: the row is faster).")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}" if x < 10 else f"{x:.0f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}" if x < 1 else f"{x:.1f}" if x < 10 else f"{x:.0f}"


def variant_table(rows: list[BenchRow]) -> list[str]:
    """The variant ops' rows (VARIANT_OPS), 78 columns: one line each (VARIANT_LEGEND says what is what)."""
    line = "{:<4} {:<9} {:>3} {:>5} {:>6} {:>6} {:>5} {:>6} {:>6} {:>6} {:>5} {:>5}".format
    lines = [line("op", "variant", "D", "T", "fwd", "f+b", "xrec", "sdpa", "xsdpa", "ref", "xref", "MB")]
    for r in rows:
        if r.op in VARIANT_OPS:
            lines.append(line(VARIANT_SHORT[r.op], VARIANT_SHORT.get(r.gate, r.gate), r.D, r.T, _ms(r.chunk_fwd_ms),
                              _ms(r.chunk_fwdbwd_ms), _ratio(r.speedup), _ms(r.sdpa_fwdbwd_ms), _ratio(r.vs_sdpa),
                              _ms(r.ref_fwdbwd_ms), _ratio(r.vs_ref), _ms(r.peak_mb)))
    return lines


def nystrom_table(errors: list[dict]) -> list[str]:
    """nystrom_errors' rows, one line per method and landmark count."""
    e0 = errors[0]
    lines = [f"Nystrom relative error, T={e0['T']}, D={e0['D']}: against the exact Gaussian kernel smoother and kernel "
             "ridge regression (ridge 1); floor: the smoother's own error against the regression",
             f"{'method':<10} {'m':>4} {'smoother':>9} {'regression':>11} {'floor':>9}"]
    lines += [f"{e['method']:<10} {e['n_landmarks']:>4} {e['smoother']:>9.2e} {e['regression']:>11.2e} "
              f"{e['smoother_vs_regression']:>9.2e}" for e in errors]
    return lines
