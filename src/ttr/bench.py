"""`ttr bench`: speed and memory of each op and form, as ratios measured in one run.

For every gate kind, head dim and length it times the chunk and recurrent forms (forward, and
forward + backward), torch's causal scaled_dot_product_attention as the quadratic reference, and a
large matmul for the machine's attainable GFLOP/s. Peak memory is the growth over the call: on CUDA
max_memory_allocated, on Linux CPUs the process's peak RSS (reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
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
    peak_mb: float
    extra: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return None if self.recurrent_fwdbwd_ms is None else self.recurrent_fwdbwd_ms / self.chunk_fwdbwd_ms

    @property
    def vs_sdpa(self) -> float:
        return self.sdpa_fwdbwd_ms / self.chunk_fwdbwd_ms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of fn after one warm-up call, in ms."""
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


def peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Memory the call adds at its peak, in MiB (nan where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        base = _rss_mb("VmRSS")
        fn()
        return _rss_mb("VmHWM") - base
    except OSError:
        return float("nan")


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


def bench_linear_attention(cfg: BenchConfig, gate: str, T: int, D: int, device: torch.device) -> BenchRow:
    B, H = cfg.batch, cfg.heads
    q, k, v = (torch.randn(B, T, H, D, device=device, requires_grad=True) for _ in range(3))
    g_shape = {"none": None, "scalar": (B, T, H), "vector": (B, T, H, D)}[gate]
    g = None if g_shape is None else F.logsigmoid(torch.randn(g_shape, device=device) + 4).requires_grad_()
    leaves = [x for x in (q, k, v, g) if x is not None]

    def call(mode: str) -> Callable[[], torch.Tensor]:
        extra = {"chunk_size": cfg.chunk_size} if mode == "chunk" else {}
        return lambda: ops.linear_attention(q, k, v, g, mode=mode, **extra)[0]

    def no_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn()
        return run

    chunk_fwd = time_ms(no_grad(call("chunk")), device, cfg.repeats)
    chunk_fb = time_ms(_fwd_bwd(call("chunk"), leaves), device, cfg.repeats)
    rec_fwd = rec_fb = None
    if T <= cfg.recurrent_max_len:
        rec_fwd = time_ms(no_grad(call("recurrent")), device, 1)
        rec_fb = time_ms(_fwd_bwd(call("recurrent"), leaves), device, 1)
    qs, ks, vs = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)  # noqa: E731
    sdpa_fwd = time_ms(no_grad(sdpa), device, cfg.repeats)
    sdpa_fb = time_ms(_fwd_bwd(sdpa, [qs, ks, vs]), device, cfg.repeats)
    peak = peak_mb(_fwd_bwd(call("chunk"), leaves), device)
    gflops = 3 * chunk_flops(T, cfg.chunk_size, D, D, H, B) / chunk_fb / 1e6
    return BenchRow("linear_attention", gate, T, D, chunk_fwd, chunk_fb, rec_fwd, rec_fb, sdpa_fwd, sdpa_fb,
                    gflops, peak)


def run(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> tuple[float, list[BenchRow]]:
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    mm = matmul_gflops(device, cfg.repeats)
    rows = []
    for gate in cfg.gates:
        if gate not in GATES:
            raise ValueError(f"gates must be among {GATES}, got {gate!r}")
        for D in cfg.head_dims:
            for T in cfg.lengths:
                if progress is not None:
                    progress(f"linear_attention g={gate} D={D} T={T}")
                rows.append(bench_linear_attention(cfg, gate, T, D, device))
    return mm, rows


def save(cfg: BenchConfig, matmul: float, rows: list[BenchRow]) -> Path:
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    payload = {
        "config": asdict(cfg), "device": device, "torch": torch.__version__, "matmul_gflops": matmul,
        "rows": [asdict(r) | {"speedup_vs_recurrent": r.speedup, "sdpa_over_chunk": r.vs_sdpa} for r in rows],
    }
    out.write_text(json.dumps(payload, indent=1))
    return out
