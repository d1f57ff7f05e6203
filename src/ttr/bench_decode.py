"""`ttr decode-bench`: decoding speed as users see it, per token, against the context length.

One layer (or a stack of `layers`) of each memory at d_model 1024, 16 heads (configurable) decodes one token per
step after a context of 1k to 16k tokens, next to a plain PyTorch attention layer of the same size: qkv and output
projections, a key/value cache preallocated and written in place, SDPA over the filled prefix (the reference a
Transformer's decoding step is). It reports the latency per token (min, median and max over repeats), tokens/s
and the ratio to the plain layer at the same context, writes the rows as it goes (JSON and CSV), draws one PNG
and prints an 80-column table.

The context is built as a prefill leaves it, without paying for what decoding does not read:
- fixed-state memories (gated DeltaNet, GLA, MesaNet, ...) prefill the context through the layer in its chunk
  form, once, growing from one context to the next (pieces equal the whole);
- cache memories (softmax attention, local linear attention, intention) hold every key and value: those are the
  layer's own projections (and short convolution) of the context tokens, computed in one pass, so the cache is
  exactly the one a prefill leaves, but the quadratic prefill itself is skipped (intention factorizes its
  keys at the first, untimed step);
- the plain layer's cache is its own projections of the same tokens.
Every repeat restarts each system from its context state with one untimed step (where a cache is copied into
preallocated buffers) and then times `steps` single-token steps; the systems are interleaved and their order
rotates from repeat to repeat, so that a slow spell of a shared machine falls on all of them, and the ratio to
the plain layer is the median over repeats of the ratio within each repeat (the two measured moments apart).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._files import write_atomically
from .layers import LayerState, TTRLayer
from .layers.cache import dtype_name
from .ops.kv_cache import KVCache

PLAIN = "plain_attention"
FIXED_STATE = ("gated_deltanet", "gla", "mesanet")
CACHES = ("softmax_attention", "local_linear", "intention")
MEMORIES = FIXED_STATE + CACHES
# per-token cost grows with the context by design: O(t D^2) for local linear attention (measured at every
# context), O(t^2) for intention, whose cache holds a t x t matrix per head (16 heads x 8 bytes x t^2: 0.5 GB at
# 2k, and 1.5^2 that in capacity) and factorizes the context's keys once, O(t^3): measured only up to this
MAX_CONTEXT = {"intention": 2048}
TARGET_S = 0.25  # a timed block lasts about this long (steps adapt to the system's speed, within [2, steps])


@dataclass
class DecodeConfig:
    memories: tuple[str, ...] = MEMORIES
    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    d_model: int = 1024
    heads: int = 16
    batch: int = 1
    layers: int = 1
    steps: int = 32           # timed single-token steps per repeat, at most
    repeats: int = 7
    threads: int | None = None  # torch's CPU threads (None: as torch has them)
    max_context: dict[str, int] = field(default_factory=lambda: dict(MAX_CONTEXT))
    seed: int = 0
    out: str = "runs/decode_bench"
    plot: bool = True


@dataclass
class DecodeRow:
    system: str
    context: int
    min_ms: float          # per token, over repeats (each the mean of its steps)
    median_ms: float
    max_ms: float
    tokens_per_s: float    # batch / median
    ratio_median: float    # median over repeats of (this repeat / the plain layer's in the same repeat)
    ratio_min: float       # min over the plain layer's min
    steps: int
    repeats: int


class PlainAttention(nn.Module):
    """A plain attention layer for reference: qkv and output projections, a key/value cache [B, H, capacity, D]
    preallocated and written in place, scaled_dot_product_attention over the filled prefix."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.h, self.dh = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.k_cache = self.v_cache = None
        self.n = 0

    def prefill(self, x: Tensor, capacity: int) -> None:
        """The cache a prefill of x [B, T, d] leaves (its keys and values), in buffers of `capacity` tokens."""
        B, T, _ = x.shape
        _, k, v = self.qkv(x).view(B, T, 3, self.h, self.dh).unbind(2)
        self.k_cache = x.new_zeros(B, self.h, capacity, self.dh)
        self.v_cache = x.new_zeros(B, self.h, capacity, self.dh)
        self.k_cache[:, :, :T] = k.transpose(1, 2)
        self.v_cache[:, :, :T] = v.transpose(1, 2)
        self.n = T

    def forward(self, x: Tensor) -> Tensor:
        """One step: x [B, 1, d] -> y [B, 1, d], its key and value written at position n."""
        B = x.shape[0]
        q, k, v = self.qkv(x).view(B, 1, 3, self.h, self.dh).unbind(2)
        self.k_cache[:, :, self.n] = k[:, 0]
        self.v_cache[:, :, self.n] = v[:, 0]
        self.n += 1
        o = F.scaled_dot_product_attention(q.transpose(1, 2), self.k_cache[:, :, :self.n], self.v_cache[:, :, :self.n])
        return self.out(o.transpose(1, 2).reshape(B, 1, -1))


class _System:
    """One benchmarked system: restart() puts it back at its context, step(x) decodes one token."""

    def __init__(self, name: str, restart: Callable[[], None], step: Callable[[Tensor], None]) -> None:
        self.name, self.restart, self.step = name, restart, step


def _plain_system(cfg: DecodeConfig, x: Tensor, capacity: int) -> _System:
    """cfg.layers plain attention layers, each with the cache of the context x."""
    torch.manual_seed(cfg.seed)
    layers = [PlainAttention(cfg.d_model, cfg.heads) for _ in range(cfg.layers)]
    for layer in layers:
        layer.prefill(x, capacity)

    def restart() -> None:
        for layer in layers:
            layer.n = x.shape[1]

    def step(token: Tensor) -> None:
        for layer in layers:
            token = layer(token)

    return _System(PLAIN, restart, step)


def _cache_state(layer: TTRLayer, x: Tensor) -> LayerState:
    """The state a prefill of x [B, T, d] leaves in a cache memory: its keys and values and the convolution's last
    inputs, from the layer's projections alone (the attention over the context, quadratic, is not computed)."""
    B, T, _ = x.shape
    qkv = layer.qkv(x)
    conv = None
    if layer.conv is not None:
        conv = qkv[:, T - (layer.conv.kernel_size - 1):]
        qkv, _ = layer.conv(qkv)
        qkv = F.silu(qkv) if layer.conv_silu else qkv
    _, k, v = qkv.split(layer.widths, dim=-1)
    k, v = k.reshape(B, T, layer.n_heads, layer.head_dim), v.reshape(B, T, layer.n_heads, layer.value_dim)
    return LayerState(conv, KVCache.wrap((k, v)), torch.full((B,), T), layer.kind, dtype_name(x.dtype))


CACHE_OPS = ("local_polynomial_attention", "kernel_regression")


def _is_cache(layer: TTRLayer) -> bool:
    return layer.op.func.__name__ in CACHE_OPS


def is_cache_memory(name: str) -> bool:
    """Whether a preset keeps every key and value (its decoding cost grows with the context)."""
    from .recipe import get_preset

    return get_preset(name).recipe.op().func.__name__ in CACHE_OPS


def _ttr_system(cfg: DecodeConfig, name: str, x: Tensor, previous: list[LayerState] | None,
                warm: Tensor) -> tuple[_System, list[LayerState]]:
    """A stack of cfg.layers TTRLayers of memory `name` at the context x. Fixed-state memories prefill through
    the chunk form, continuing `previous` (the states at a shorter context, whose tokens x begins with); caches
    take the context's keys and values (every layer of a stack those of x). One untimed step (warm) then puts
    every cache into preallocated buffers (and factorizes intention's keys). Returns the system and the
    fixed-state memories' states at x."""
    torch.manual_seed(cfg.seed)
    layers = [TTRLayer(cfg.d_model, cfg.heads, name) for _ in range(cfg.layers)]
    states: list[LayerState] = []
    grown = 0 if previous is None else int(previous[0].lengths[0])
    h = x[:, grown:]
    for i, layer in enumerate(layers):
        if _is_cache(layer):
            states.append(_cache_state(layer, x))
        else:
            h, state = layer(h, None if previous is None else previous[i])
            states.append(state)
    context = [layer(warm, state)[1] for layer, state in zip(layers, states)] if any(map(_is_cache, layers)) \
        else states
    box: list[list[LayerState]] = [context]

    def restart() -> None:
        box[0] = list(context)

    def step(token: Tensor) -> None:
        new = []
        for layer, state in zip(layers, box[0]):
            token, state = layer(token, state)
            new.append(state)
        box[0] = new

    return _System(name, restart, step), states


def _time(system: _System, tokens: list[Tensor], steps: int) -> float:
    """ms per token over `steps` steps, after a restart and one untimed step."""
    system.restart()
    system.step(tokens[-1])
    start = time.perf_counter()
    for i in range(steps):
        system.step(tokens[i % len(tokens)])
    return 1e3 * (time.perf_counter() - start) / steps


def measured(cfg: DecodeConfig, context: int) -> list[str]:
    """The memories measured at this context (the expensive ones only up to their max_context)."""
    return [m for m in cfg.memories if context <= cfg.max_context.get(m, context)]


def ticks(cfg: DecodeConfig) -> int:
    """How many times run() reports progress: per context, each memory's prefill and every timed block."""
    return sum(len(measured(cfg, c)) + (1 + len(measured(cfg, c))) * (cfg.repeats + 1) for c in cfg.contexts)


def run(cfg: DecodeConfig, progress: Callable[[str], None] | None = None) -> list[DecodeRow]:
    """Every system at every context it is measured at; rows are saved after each context (decode.json, .csv),
    the plot at the end (decode.png)."""
    _check(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tell = progress or (lambda _: None)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows: list[DecodeRow] = []
    grown: dict[str, list[LayerState]] = {}
    with torch.inference_mode():
        x_all = torch.randn(cfg.batch, max(cfg.contexts), cfg.d_model, generator=gen)
        tokens = [torch.randn(cfg.batch, 1, cfg.d_model, generator=gen) for _ in range(8)]
        for context in sorted(set(cfg.contexts)):
            x = x_all[:, :context]
            systems = [_plain_system(cfg, x, context + cfg.steps + 2)]
            for name in measured(cfg, context):
                tell(f"{_k(context)}: prefill {name}")
                system, states = _ttr_system(cfg, name, x, grown.get(name), tokens[-1])
                if not is_cache_memory(name):
                    grown[name] = states
                systems.append(system)
            steps = {}
            for s in systems:  # steps per repeat: about TARGET_S of each system's time, from a timed probe
                tell(f"{_k(context)}: probe {s.name}")
                steps[s.name] = max(2, min(cfg.steps, math.ceil(TARGET_S * 1e3 / max(_time(s, tokens, 2), 1e-3))))
            times: dict[str, list[float]] = {s.name: [] for s in systems}
            for r in range(cfg.repeats):
                turn = r % len(systems)
                for s in systems[turn:] + systems[:turn]:
                    tell(f"{_k(context)}: repeat {r + 1}/{cfg.repeats} {s.name}")
                    times[s.name].append(_time(s, tokens, steps[s.name]))
            plain = times[PLAIN]
            for s in systems:
                t = times[s.name]
                # the ratio of each repeat's two measurements, taken moments apart: a shared machine's slow spells
                # (which move a whole repeat) cancel in it
                paired = statistics.median(a / b for a, b in zip(t, plain))
                rows.append(DecodeRow(s.name, context, min(t), statistics.median(t), max(t),
                                      cfg.batch * 1e3 / statistics.median(t), paired, min(t) / min(plain),
                                      steps[s.name], cfg.repeats))
            save(cfg, rows)
    if cfg.plot and rows:
        plot(rows, out / "decode.png", cfg)
    return rows


def _check(cfg: DecodeConfig) -> None:
    from .recipe import PRESETS

    for name in cfg.memories:
        if name not in PRESETS:
            raise ValueError(f"unknown memory {name!r}; known: {', '.join(PRESETS)}")
    if not cfg.contexts or min(cfg.contexts) < 1:
        raise ValueError(f"contexts must be positive, got {cfg.contexts}")
    if cfg.d_model % cfg.heads:
        raise ValueError(f"heads = {cfg.heads} must divide d_model = {cfg.d_model}")
    for what in ("batch", "layers", "steps", "repeats"):
        if getattr(cfg, what) < 1:
            raise ValueError(f"{what} must be at least 1, got {getattr(cfg, what)}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads must be at least 1, got {cfg.threads}")


def save(cfg: DecodeConfig, rows: list[DecodeRow]) -> Path:
    """decode.json (settings, machine, rows) and decode.csv (rows), each written whole."""
    out = Path(cfg.out)
    settings = asdict(cfg)
    settings.update(threads=torch.get_num_threads(), torch=torch.__version__, dtype="float32")
    payload = {"config": settings, "rows": [asdict(r) for r in rows]}
    write_atomically(out / "decode.json", lambda f: f.write_text(json.dumps(payload, indent=1)))

    def write_csv(f: Path) -> None:
        with open(f, "w", newline="") as handle:
            w = csv.DictWriter(handle, fieldnames=[k for k in asdict(rows[0])])
            w.writeheader()
            w.writerows(asdict(r) for r in rows)

    return write_atomically(out / "decode.csv", write_csv) if rows else out / "decode.json"


def table(rows: list[DecodeRow], width: int = 80) -> list[str]:
    """ms per token (median) and the ratio to the plain layer (median of the repeats' paired ratios), one line
    per system, one column per context."""
    contexts = sorted({r.context for r in rows})
    systems = list(dict.fromkeys(r.system for r in rows))
    at = {(r.system, r.context): r for r in rows}
    name_w = max(8, min(18, width - 12 * len(contexts)))
    lines = [f"{'ms/token, x plain':<{name_w}}" + "".join(f"{_k(c):>12}" for c in contexts)]
    for s in systems:
        cells = []
        for c in contexts:
            r = at.get((s, c))
            if r is None:
                cells.append(f"{'-':>12}")
            elif s == PLAIN:
                cells.append(f"{_num(r.median_ms):>12}")
            else:
                ratio = f"{r.ratio_median:.1f}x" if r.ratio_median < 10 else f"{r.ratio_median:.0f}x"
                cells.append(f"{_num(r.median_ms):>7}{ratio:>5}")
        lines.append(f"{s[:name_w]:<{name_w}}" + "".join(cells))
    return lines


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _num(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def plot(rows: list[DecodeRow], path: Path, cfg: DecodeConfig) -> Path:
    """Latency per token against the context (log-x), median with the min-max band; fixed-state memories and
    caches in two panels, each with the plain layer; tokens/s on the right axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker
    import numpy as np

    systems = list(dict.fromkeys(r.system for r in rows))
    panels = [("fixed-state memories", [s for s in systems if s not in CACHES]),
              ("caches (cost grows with the context)", [PLAIN] + [s for s in systems if s in CACHES])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=False)
    colors = {s: f"C{i}" for i, s in enumerate(systems)}
    for ax, (title, names) in zip(axes, panels):
        for s in names:
            rs = sorted((r for r in rows if r.system == s), key=lambda r: r.context)
            if not rs:
                continue
            xs = [r.context for r in rs]
            ax.plot(xs, [r.median_ms for r in rs], marker="o", color=colors[s], label=s,
                    lw=2.5 if s == PLAIN else 1.5, ls="--" if s == PLAIN else "-")
            ax.fill_between(xs, [r.min_ms for r in rs], [r.max_ms for r in rs], color=colors[s], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        contexts = sorted({r.context for r in rows})
        ax.set_xticks(contexts, [_k(c) for c in contexts])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per token (median; band: min-max)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        per_s = lambda y: cfg.batch * 1e3 / np.maximum(y, 1e-9)  # noqa: E731  (its own inverse)
        right = ax.secondary_yaxis("right", functions=(per_s, per_s))
        right.set_ylabel("tokens/s")
        for axis in (ax.yaxis, right.yaxis):  # plain numbers on the log axes
            axis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            axis.set_minor_formatter(ticker.FuncFormatter(
                lambda y, _: f"{y:g}" if f"{y:.1e}"[0] in "235" else ""))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"decoding one token: d_model {cfg.d_model}, {cfg.heads} heads, {cfg.layers} layer(s), batch "
                 f"{cfg.batch}, float32, {torch.get_num_threads()} CPU threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
