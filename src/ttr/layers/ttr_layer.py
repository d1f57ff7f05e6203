"""TTRLayer: x -> q, k, v (+ short conv) -> test-time regression memory -> (norm, gate) -> output."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..recipe import Preset, Recipe, get_preset
from .conv import ShortConv
from .gates import make_gate


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
        self.qkv = nn.Linear(d_model, 3 * inner, bias=False)
        self.conv = ShortConv(3 * inner, conv_size) if conv_size > 0 else None
        self.gate = make_gate(memory.weights, d_model, n_heads, self.head_dim)
        self.norm = nn.RMSNorm(self.head_dim) if norm else None
        self.out_gate = nn.Linear(d_model, inner, bias=False) if output_gate else None
        self.out = nn.Linear(inner, d_model, bias=False)
        self.op = memory.op()
        self.chunk_size, self.mode = chunk_size, mode

    def forward(self, x: Tensor, state: LayerState | None = None) -> tuple[Tensor, LayerState]:
        B, T, _ = x.shape
        state = state or LayerState()
        qkv = self.qkv(x)
        conv_cache = None
        if self.conv is not None:
            qkv, conv_cache = self.conv(qkv, state.conv)
        q, k, v = qkv.view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        g = None if self.gate is None else self.gate(x)
        mode = "recurrent" if T == 1 else self.mode
        kwargs = {"chunk_size": self.chunk_size} if mode == "chunk" else {}
        o, memory = self.op(q, k, v, g, initial_state=state.memory, output_final_state=True, mode=mode, **kwargs)
        if self.norm is not None:
            o = self.norm(o)
        o = o.reshape(B, T, -1)
        if self.out_gate is not None:
            o = o * F.silu(self.out_gate(x))
        return self.out(o), LayerState(conv=conv_cache, memory=memory)
