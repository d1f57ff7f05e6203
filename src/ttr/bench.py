"""`ttr bench`: speed and memory of each op and form, as ratios measured in one run.

For every gate kind, head dim and length it times the chunk and recurrent forms (forward, and
forward + backward), torch's causal scaled_dot_product_attention as the quadratic reference, and a
large matmul for the machine's attainable GFLOP/s. Peak memory is the growth over the call: on CUDA
max_memory_allocated, on Linux CPUs the process's peak RSS (reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import ctypes
import json
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import ops

GATES = ("none", "scalar", "vector")


@dataclass
class BenchConfig:
    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    head_dims: tuple[int, ...] = (64, 128)
    gates: tuple[str, ...] = GATES
    heads: int = 4
    batch: int = 1
    chunk_size: int = 64
    recurrent_max_len: int = 4096
    repeats: int = 3
    device: str = "cpu"
    out: str = "runs/bench/bench.json"
    resume: bool = False


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
    chunk_gflops: float
    peak_mb: float | None = None  # measured after all timings; None where it cannot be

    @property
    def speedup(self) -> float | None:
        return None if self.recurrent_fwdbwd_ms is None else self.recurrent_fwdbwd_ms / self.chunk_fwdbwd_ms

    @property
    def vs_sdpa(self) -> float:
        return self.sdpa_fwdbwd_ms / self.chunk_fwdbwd_ms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool = True) -> float:
    """Median wall time of fn, after one warm-up call unless the call is long enough not to need it, in ms."""
    if warmup:
        fn()
        _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _rss_mb(field_name: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _release_freed_memory() -> None:
    """Make RSS follow live tensors: a fixed mmap threshold (glibc's default one rises after big frees and
    keeps them resident) puts large blocks in mmap, returned to the OS on free; trim hands back the rest."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
    libc.malloc_trim(0)


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
        _release_freed_memory()
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


def chunk_flops(T: int, C: int, Dk: int, Dv: int, heads: int, batch: int) -> float:
    """Matrix-product flops of the chunk form's forward: scores, intra outputs, state updates, inter outputs."""
    Tp = -(-T // C) * C
    return 2.0 * batch * heads * Tp * (C * (Dk + Dv) + 2 * Dk * Dv)


def _fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for x in leaves:
            x.grad = None
        out = fn()
        out.backward(torch.ones_like(out))
    return run


def _linear_attention_problem(cfg: BenchConfig, gate: str, T: int, D: int, device: torch.device):
    """Inputs (with gradients) and a maker of forward calls for each form."""
    B, H = cfg.batch, cfg.heads
    gen = torch.Generator(device=device).manual_seed(T * D)
    q, k, v = (torch.randn(B, T, H, D, device=device, generator=gen).requires_grad_() for _ in range(3))
    g_shape = {"none": None, "scalar": (B, T, H), "vector": (B, T, H, D)}[gate]
    g = None if g_shape is None else F.logsigmoid(torch.randn(g_shape, device=device, generator=gen) + 4)
    g = None if g is None else g.requires_grad_()
    leaves = [x for x in (q, k, v, g) if x is not None]

    def call(mode: str) -> Callable[[], torch.Tensor]:
        extra = {"chunk_size": cfg.chunk_size} if mode == "chunk" else {}
        return lambda: ops.linear_attention(q, k, v, g, mode=mode, **extra)[0]

    return call, leaves


def _no_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn()
    return run


def time_linear_attention(cfg: BenchConfig, gate: str, T: int, D: int, device: torch.device) -> BenchRow:
    call, leaves = _linear_attention_problem(cfg, gate, T, D, device)
    chunk_fwd = time_ms(_no_grad(call("chunk")), device, cfg.repeats)
    chunk_fb = time_ms(_fwd_bwd(call("chunk"), leaves), device, cfg.repeats)
    rec_fwd = rec_fb = None
    if T <= cfg.recurrent_max_len:  # thousands of small steps: long enough to need no warm-up
        rec_fwd = time_ms(_no_grad(call("recurrent")), device, 1, warmup=False)
        rec_fb = time_ms(_fwd_bwd(call("recurrent"), leaves), device, 1, warmup=False)
    qs, ks, vs = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in leaves[:3])
    sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)  # noqa: E731
    sdpa_fwd = time_ms(_no_grad(sdpa), device, cfg.repeats)
    sdpa_fb = time_ms(_fwd_bwd(sdpa, [qs, ks, vs]), device, cfg.repeats)
    gflops = 3 * chunk_flops(T, cfg.chunk_size, D, D, cfg.heads, cfg.batch) / chunk_fb / 1e6
    return BenchRow("linear_attention", gate, T, D, chunk_fwd, chunk_fb, rec_fwd, rec_fb, sdpa_fwd, sdpa_fb,
                    gflops)


_SAME_RUN = ("heads", "batch", "chunk_size", "repeats", "device", "recurrent_max_len")


def _resumable_rows(cfg: BenchConfig) -> dict[tuple[str, int, int], BenchRow]:
    """Rows of an earlier, interrupted run with the same settings, by (gate, D, T)."""
    path = Path(cfg.out)
    if not (cfg.resume and path.exists()):
        return {}
    old = json.loads(path.read_text())
    if any(old["config"].get(key) != getattr(cfg, key) for key in _SAME_RUN):
        return {}
    names = {f.name for f in fields(BenchRow)}
    rows = [BenchRow(**{k: v for k, v in r.items() if k in names}) for r in old["rows"]]
    return {(r.gate, r.D, r.T): r for r in rows}


def run(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> tuple[float, list[BenchRow]]:
    """All timings first, then all peak-memory measurements: on the CPU the latter change how the
    allocator returns memory (see _release_freed_memory), which must not touch the timings.
    The JSON is rewritten after every row, so an interrupted run keeps what it measured (--resume)."""
    for gate in cfg.gates:
        if gate not in GATES:
            raise ValueError(f"gates must be among {GATES}, got {gate!r}")
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    done = _resumable_rows(cfg)
    mm = matmul_gflops(device, cfg.repeats)
    grid = [(gate, D, T) for gate in cfg.gates for D in cfg.head_dims for T in cfg.lengths]
    rows = []
    for gate, D, T in grid:
        if progress is not None:
            progress(f"time g={gate} D={D} T={T}")
        rows.append(done.get((gate, D, T)) or time_linear_attention(cfg, gate, T, D, device))
        save(cfg, mm, rows)
    for row in rows:
        if progress is not None:
            progress(f"memory g={row.gate} D={row.D} T={row.T}")
        if row.peak_mb is None:
            call, leaves = _linear_attention_problem(cfg, row.gate, row.T, row.D, device)
            row.peak_mb = peak_mb(_fwd_bwd(call("chunk"), leaves), device)
            save(cfg, mm, rows)
    return mm, rows


def save(cfg: BenchConfig, matmul: float, rows: list[BenchRow]) -> Path:
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    payload = {
        "config": asdict(cfg), "device": device, "torch": torch.__version__, "matmul_gflops": matmul,
        "rows": [asdict(r) | {"speedup_vs_recurrent": r.speedup, "sdpa_over_chunk": r.vs_sdpa} for r in rows],
    }
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(payload, indent=1))
    partial.replace(out)  # atomic: an interrupted write never leaves a broken file
    return out
