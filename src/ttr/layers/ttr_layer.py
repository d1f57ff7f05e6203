"""TTRLayer: x -> q, k, v (+ short conv) -> test-time regression memory -> (norm, gate) -> output."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..recipe import MLP, LocalPolynomial, Preset, Recipe, get_preset
from .conv import ShortConv
from .gates import make_inputs


# QKNorm's temperature starts at log2(L^2 - L) for a training length L (Henry et al., 2020), here L = 1024
QKNORM_SCALE_INIT = math.log2(1024 ** 2 - 1024)


@dataclass
class LayerState:
    """What decoding carries between calls: the conv cache [B, K-1, 3 H D] and the memory state."""

    conv: Tensor | None = None
    memory: Tensor | None = None


class TTRLayer(nn.Module):
    """A sequence layer with test-time associative memory, given by a Recipe or a preset name.

    forward(x [B, T, d_model], state=None) -> (y [B, T, d_model], new LayerState). Feeding a sequence
    in pieces, passing the state along, equals feeding it whole.
    """

    def __init__(self, d_model: int, n_heads: int, memory: Recipe | str, *, head_dim: int | None = None,
                 conv_size: int = 4, output_gate: bool = True, norm: bool = True, chunk_size: int = 64,
                 mode: str = "chunk") -> None:
        super().__init__()
        if isinstance(memory, str):
            memory = get_preset(memory).recipe
        elif isinstance(memory, Preset):
            memory = memory.recipe
        self.recipe = memory
        self.n_heads = n_heads
        self.head_dim = head_dim or d_model // n_heads
        if self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got d_model={d_model}, n_heads={n_heads}")
        inner = n_heads * self.head_dim
        # n keys and values per token for memories that take n steps per token (DeltaProduct)
        self.n_steps = memory.steps_per_token
        width = (1 + 2 * self.n_steps) * inner
        self.qkv = nn.Linear(d_model, width, bias=False)
        self.conv = ShortConv(width, conv_size) if conv_size > 0 else None
        self.inputs = make_inputs(memory, d_model, n_heads, self.head_dim)
        if isinstance(memory.regressor, MLP):  # the MLP memory's starting weights are learned
            hidden = memory.regressor.expansion * self.head_dim
            self.W1 = nn.Parameter(torch.randn(n_heads, hidden, self.head_dim) * self.head_dim ** -0.5)
            self.W2 = nn.Parameter(torch.randn(n_heads, self.head_dim, hidden) * hidden ** -0.5)
        if isinstance(memory.regressor, LocalPolynomial) and memory.regressor.qk_norm:  # learned temperature
            self.log_qk_scale = nn.Parameter(torch.full((n_heads,), math.log(QKNORM_SCALE_INIT)))
        self.norm = nn.RMSNorm(self.head_dim) if norm else None
        self.out_gate = nn.Linear(d_model, inner, bias=False) if output_gate else None
        self.out = nn.Linear(inner, d_model, bias=False)
        self.op = memory.op()
        self.takes_chunk_size = "chunk_size" in inspect.signature(self.op.func).parameters
        self.chunk_size, self.mode = chunk_size, mode

    def forward(self, x: Tensor, state: LayerState | None = None) -> tuple[Tensor, LayerState]:
        B, T, _ = x.shape
        state = state or LayerState()
        qkv = self.qkv(x)
        conv_cache = None
        if self.conv is not None:
            qkv, conv_cache = self.conv(qkv, state.conv)
        H, D, n = self.n_heads, self.head_dim, self.n_steps
        q, k, v = qkv.split([H * D, n * H * D, n * H * D], dim=-1)
        q = q.view(B, T, H, D)
        k, v = (t.view(B, T, H, n, D) if n > 1 else t.view(B, T, H, D) for t in (k, v))
        inputs = {name: module(x) for name, module in self.inputs.items()}
        memory = state.memory
        if memory is None and hasattr(self, "W1"):
            memory = (self.W1.expand(B, -1, -1, -1), self.W2.expand(B, -1, -1, -1))
        mode = "recurrent" if T == 1 else self.mode
        kwargs = {"chunk_size": self.chunk_size} if mode == "chunk" and self.takes_chunk_size else {}
        if hasattr(self, "log_qk_scale"):
            kwargs["scale"] = self.log_qk_scale.exp()
        o, memory = self.op(q, k, v, **inputs, initial_state=memory, output_final_state=True, mode=mode, **kwargs)
        if self.norm is not None:
            o = self.norm(o)
        o = o.reshape(B, T, -1)
        if self.out_gate is not None:
            o = o * F.silu(self.out_gate(x))
        return self.out(o), LayerState(conv=conv_cache, memory=memory)
