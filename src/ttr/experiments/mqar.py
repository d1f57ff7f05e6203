"""Multi-query associative recall with TTR layers: the model, and one training run of it.

The model (Zoology's setting): token embedding, N blocks x + layer(norm(x)) of a TTRLayer (any preset or Recipe)
with or without its short convolution, each optionally followed by x + mlp(norm(x)), a final norm and a linear
head. No positional embedding: the short convolution is what tells a token its neighbour, and the claim under
test is that with it one layer suffices (k_t from x_{t-1} and v_t from x_t make the bigram association).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..layers import TTRLayer
from ..recipe import Preset, Recipe


class MQARModel(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, memory: str | Preset | Recipe, *, n_layers: int = 1,
                 head_dim: int = 16, conv: bool = True, mlp: bool = False, chunk_size: int = 64) -> None:
        super().__init__()
        if d_model % head_dim:
            raise ValueError(f"head_dim {head_dim} must divide d_model {d_model}")
        self.embed = nn.Embedding(vocab_size, d_model)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, eps=1e-5) for _ in range(n_layers))
        self.layers = nn.ModuleList(
            TTRLayer(d_model, d_model // head_dim, memory, conv_size=4 if conv else 0, chunk_size=chunk_size)
            for _ in range(n_layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.RMSNorm(d_model, eps=1e-5), nn.Linear(d_model, 2 * d_model), nn.GELU(),
                          nn.Linear(2 * d_model, d_model)) for _ in range(n_layers)) if mlp else None
        self.final = nn.RMSNorm(d_model, eps=1e-5)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        for module in self.modules():  # the field's initialization: normal 0.02, output projections by depth
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        for layer in self.layers:
            nn.init.normal_(layer.out.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for i, (norm, layer) in enumerate(zip(self.norms, self.layers)):
            x = x + layer(norm(x))[0]
            if self.mlps is not None:
                x = x + self.mlps[i](x)
        return self.head(self.final(x))

    def state_floats(self, seq_len: int) -> int:
        """Floats in one layer's memory state after seq_len tokens (the convolution's cache excluded): what the
        recall-memory trade-off puts on its x axis. A cache of keys and values grows with seq_len."""
        layer = self.layers[0]
        with torch.no_grad():
            x = torch.zeros(1, seq_len, layer.d_model, device=self.head.weight.device)
            _, state = layer(x)
        tensors = _tensors(state.memory)
        return sum(t.numel() for t in tensors)


def _tensors(x: object) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    if hasattr(x, "weights"):  # MiniBatchState: the weights and the mini-batch's starting weights
        return _tensors(x.weights) + _tensors(x.start)
    return []
