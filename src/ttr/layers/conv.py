"""Short causal depthwise convolution: lets k_t see x_{t-1}, ..., so the memory can store bigrams (MQAR)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShortConv(nn.Module):
    """y_t = sum_{j<K} w_j * x_{t-j} per channel. The decoding cache holds the last K-1 inputs [B, K-1, C]."""

    def __init__(self, channels: int, kernel_size: int = 4) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [B, T, C] -> (y [B, T, C], new cache [B, K-1, C])."""
        B, T, C = x.shape
        if cache is None:
            cache = x.new_zeros(B, self.kernel_size - 1, C)
        full = torch.cat([cache.to(x.dtype), x], dim=1)
        y = F.conv1d(full.transpose(1, 2), self.weight, self.bias, groups=C).transpose(1, 2)
        return y, full[:, full.shape[1] - (self.kernel_size - 1):]
