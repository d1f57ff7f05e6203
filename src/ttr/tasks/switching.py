"""The slides' switching process: a slowly drifting key that switches to a fast-mixing one at T/4.

    k_{t+1} = 0.999 k_t + 0.02 eps_t   (t < T/4)
    k_{t+1} = 0.9   k_t + 0.02 eps_t   (t >= T/4),      eps_t ~ N(0, Sigma),   v_t = k_{t+1} / ||k_{t+1}||
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def switching_keys(n_seq: int, length: int, dim: int, *, seed: int = 0, noise: float = 0.02,
                   slow: float = 0.999, fast: float = 0.9, sigma: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Returns keys [n_seq, length, dim] and values [n_seq, length, dim] (float64).

    k_1 is drawn from the slow regime's stationary law N(0, noise^2 / (1 - slow^2) Sigma), so the first
    quarter is stationary; `sigma` (default identity) is the noise covariance.
    """
    gen = torch.Generator().manual_seed(seed)
    chol = torch.eye(dim, dtype=torch.float64) if sigma is None else torch.linalg.cholesky(sigma.double())
    eps = torch.randn(n_seq, length + 1, dim, generator=gen, dtype=torch.float64) @ chol.T
    keys = torch.empty(n_seq, length + 1, dim, dtype=torch.float64)
    keys[:, 0] = eps[:, 0] * noise / math.sqrt(1.0 - slow ** 2)
    switch = length // 4
    for t in range(length):
        a = slow if t < switch else fast
        keys[:, t + 1] = a * keys[:, t] + noise * eps[:, t + 1]
    values = keys[:, 1:] / keys[:, 1:].norm(dim=-1, keepdim=True)
    return keys[:, :-1], values
