"""Memory capacity: how many key-value pairs each memory recalls, with no learned parameters.

N pairs (k_i, v_i) are written into a memory with key dimension d, then every stored key is read back:
r_j = m(k_j). Keys are random unit vectors or orthonormal (N <= d); values are random unit vectors. The
recall error is ||r_j - v_j||^2 (values have norm 1), and a recall is correct when v_j is the stored value
nearest to r_j in cosine. The claim (the slides): the outer-product memory sum_i v_i k_i^T (linear attention)
recalls v_j exactly only while the keys are orthonormal, its crosstalk sum_{i != j} v_i (k_i . k_j) growing
with N / d, while the exact least-squares memory (mesa, ridge -> 0) accounts for the keys' covariance and
recalls every pair while N <= d (the keys are then independent).

Memories and settings, and why:
- linear attention: S = sum_i k_i v_i^T, read r = S^T k (scale 1);
- gated linear attention, decay 0.9 per pair: old pairs fade, so recall falls with the pair's age;
- the delta rule with beta = 1 on unit keys: each write makes the newest pair exact, and 3 passes over the
  pairs (state carried) approach the least-squares fit;
- mesa with ridge 1e-6: the regression solved exactly;
- softmax attention and local linear attention (nonparametric, the cache of every pair) with scale sqrt(d)
  on unit keys, the usual 1/sqrt(d) on keys of norm sqrt(d). The query reads the cache without writing: its
  own token carries the key -10 q, whose weight exp(-10 sqrt(d)) vanishes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .._checks import check_positive_ints
from .._files import write_atomically

MEMORIES = ("linear_attention", "gated_linear_attention", "delta_rule", "delta_rule_3_passes", "mesa",
            "softmax_attention", "local_linear")


@dataclass(frozen=True)
class CapacityConfig:
    dim: int = 16
    trials: int = 32
    seed: int = 0
    out: str = "runs/capacity"

    def __post_init__(self) -> None:
        check_positive_ints(self, ("dim", "trials"))

    def pair_counts(self) -> list[int]:
        """N from 1 to 4d: every integer up to 4, then steps of d / 4."""
        d = self.dim
        return sorted({n for n in (1, 2, 3, 4) if n <= 4 * d} | set(range(max(1, d // 4), 4 * d + 1, max(1, d // 4))))


def headline(counts: list[int], dim: int) -> list[int]:
    """The pair counts a table shows: 1, d/4, d/2, d, 2d and 4d, those that were run."""
    return [n for n in counts if n in {1, dim // 4, dim // 2, dim, 2 * dim, 4 * dim}]


def _keys(kind: str, trials: int, n: int, d: int, gen: torch.Generator) -> Tensor:
    """[trials, n, d] unit keys: random, or orthonormal (n <= d)."""
    if kind == "random":
        return F.normalize(torch.randn(trials, n, d, generator=gen, dtype=torch.float64), dim=-1)
    basis, _ = torch.linalg.qr(torch.randn(trials, d, d, generator=gen, dtype=torch.float64))
    return basis.transpose(-1, -2)[:, :n]


def _recall(memory: str, k: Tensor, v: Tensor) -> Tensor:
    """r_j = m(k_j) for every stored key: k, v [trials, N, d] -> [trials, N, d]."""
    B, N, d = k.shape
    kk, vv = k[:, :, None], v[:, :, None]                                   # one head: [B, N, 1, d]
    if memory in ("linear_attention", "gated_linear_attention"):
        g = torch.full((B, N, 1), math.log(0.9), dtype=k.dtype) if memory.startswith("gated") else None
        _, S = ops.linear_attention(kk, kk, vv, g, output_final_state=True)
        return k @ S[:, 0]
    if memory.startswith("delta_rule"):
        S = None
        for _ in range(3 if memory.endswith("passes") else 1):
            _, S = ops.delta_rule(kk, kk, vv, torch.ones(B, N, 1, dtype=k.dtype), initial_state=S,
                                  output_final_state=True)
        return k @ S[:, 0]
    if memory == "mesa":
        _, (H_kk, H_kv) = ops.mesa(kk, kk, vv, lamb=1e-6, output_final_state=True)
        eye = 1e-6 * torch.eye(d, dtype=k.dtype)
        return torch.linalg.solve(H_kk[:, 0] + eye, H_kv[:, 0]).transpose(-1, -2).matmul(k.transpose(-1, -2)) \
            .transpose(-1, -2)
    order = {"softmax_attention": 0, "local_linear": 1}[memory]
    # every row reads one stored key: batch b * N + j holds the cache of trial b and queries k_j
    cache = (kk.repeat_interleave(N, 0), vv.repeat_interleave(N, 0))
    q = k.reshape(B * N, 1, 1, d)
    o, _ = ops.local_polynomial_attention(q, -10 * q, torch.zeros_like(q), order=order, scale=math.sqrt(d),
                                          initial_state=cache)
    return o.reshape(B, N, d)


@dataclass
class Row:
    keys: str
    memory: str
    pairs: int
    error: float       # mean ||r_j - v_j||^2
    accuracy: float    # fraction of recalls nearest (in cosine) to their own value


def run(cfg: CapacityConfig, progress: Callable[[], None] | None = None) -> list[Row]:
    rows = []
    for kind in ("random", "orthonormal"):
        for n in cfg.pair_counts():
            if kind == "orthonormal" and n > cfg.dim:
                continue
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + n)
            k = _keys(kind, cfg.trials, n, cfg.dim, gen)
            v = F.normalize(torch.randn(cfg.trials, n, cfg.dim, generator=gen, dtype=torch.float64), dim=-1)
            for memory in MEMORIES:
                r = _recall(memory, k, v)
                nearest = (F.normalize(r, dim=-1) @ v.transpose(-1, -2)).argmax(-1)
                rows.append(Row(kind, memory, n, float(((r - v) ** 2).sum(-1).mean()),
                                float((nearest == torch.arange(n)).double().mean())))
            if progress is not None:
                progress()
    return rows


def steps(cfg: CapacityConfig) -> int:
    """How many progress steps run() takes."""
    return sum(1 for kind in ("random", "orthonormal") for n in cfg.pair_counts()
               if kind == "random" or n <= cfg.dim)


def save(cfg: CapacityConfig, rows: list[Row]) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "capacity.json"
    payload = json.dumps({"config": asdict(cfg), "rows": [asdict(r) for r in rows]}, indent=1)
    write_atomically(results, lambda f: f.write_text(payload))
    csv = "keys,memory,pairs,error,accuracy\n" + "".join(
        f"{r.keys},{r.memory},{r.pairs},{r.error:.6g},{r.accuracy:.6g}\n" for r in rows)
    write_atomically(out / "capacity.csv", lambda f: f.write_text(csv))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex="col")
    for col, kind in enumerate(("random", "orthonormal")):
        for i, memory in enumerate(MEMORIES):
            mine = [r for r in rows if r.keys == kind and r.memory == memory]
            x = [r.pairs / cfg.dim for r in mine]
            style = {"color": plt.cm.tab10(i), "lw": 1.5, "marker": "o", "ms": 3}
            axes[0, col].plot(x, [r.accuracy for r in mine], label=memory, **style)
            axes[1, col].plot(x, [max(r.error, 1e-12) for r in mine], label=memory, **style)
        axes[0, col].set_title(f"{kind} unit keys, d = {cfg.dim}")
        axes[0, col].set_ylabel("recall accuracy (nearest stored value)")
        axes[0, col].set_ylim(0, 1.05)
        axes[1, col].set_ylabel("recall error ||m(k_j) - v_j||^2")
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("stored pairs N / d")
        for ax in axes[:, col]:
            ax.axvline(1.0, color="k", ls="--", lw=0.8)
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=9)
    fig.suptitle(f"Memory capacity: N pairs written, every key read back ({cfg.trials} trials per point)")
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    plot = out / "capacity.png"
    write_atomically(plot, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return results, plot
