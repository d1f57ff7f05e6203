"""Shared inputs. Tolerances: float64 forms must agree to 1e-10 (they compute the same sums in another
order); float32 against the float64 oracle to 1e-4 relative to the output's scale."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from hypothesis import settings

# the property battery (test_properties.py): a few examples per property by default, many under make test-slow
settings.register_profile("default", max_examples=8, derandomize=True)
settings.register_profile("thorough", max_examples=150)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

F64_ATOL = 1e-10


def causal_presets() -> list[str]:
    """The named systems that read only the past (all but the whole-sequence encoders, SOFT and Skyformer): the ones
    that decode, take a state, and run in causal language models."""
    import ttr
    return [name for name, p in ttr.PRESETS.items() if p.recipe.causal]


def make_qkv(B=2, T=37, H=2, Dk=8, Dv=6, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, T, H, d, generator=gen, dtype=dtype) for d in (Dk, Dk, Dv)]
    return [x.requires_grad_(requires_grad) for x in out]


def make_gate(kind, B=2, T=37, H=2, D=8, dtype=torch.float64, seed=1, requires_grad=False, strength=0.0):
    """A log-gate <= 0: kind None, "scalar" [B, T, H] or "vector" [B, T, H, D]. strength shifts it more negative."""
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    shape = (B, T, H) if kind == "scalar" else (B, T, H, D)
    g = F.logsigmoid(torch.randn(shape, generator=gen, dtype=dtype) + 2.0) - strength
    return g.requires_grad_(requires_grad)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, relative to the larger operand's largest magnitude."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
