"""The literal regression solver: the executable form of the paper's claims, slow and in float64.

For every batch b, head h and time t it writes out the weighted regression problem

    min_m  1/2 sum_{i<=t} gamma_i^(t) || v_i - m(k_i) ||^2

over the associations seen so far, hands it to an optimizer, and queries the fitted memory with q_t.
Gradient methods take their steps with autograd on the written-out loss (create_graph=True, so the
result is differentiable in q, k, v and the gates); analytic ones use torch.linalg.

A new family plugs in as a new optimizer (anything with `fit(problem) -> M`) or a new problem builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from .features import get_feature_map
from .weights import gamma_matrix


@dataclass
class Problem:
    """One regression problem: regressors X [n, p] (e.g. phi(k_i)), targets Y [n, Dv], weights gamma
    [n, 1] (a weight per association) or [n, p] (per regressor channel, as a vector gate gives)."""

    X: Tensor
    Y: Tensor
    gamma: Tensor
    # The gradient at zero of associations before this call (a carried linear-attention state), weighted.
    prior_grad: Tensor | None = None

    def losses(self, M: Tensor) -> Tensor:
        """Per-association losses 1/2 ||y_i - M_i x_i||^2 for per-association copies M [n, Dv, p]."""
        residual = self.Y - torch.einsum("nvp,np->nv", M, self.X)
        return 0.5 * (residual ** 2).sum(-1)


class Optimizer(Protocol):
    def fit(self, problem: Problem) -> Tensor: ...


@dataclass(frozen=True)
class BatchGD:
    """`steps` steps of batch gradient descent from M = 0, learning rate `lr`.

    Each association's gradient is weighted by its gamma (per channel if gamma is a vector); that is
    the gradient of the weighted loss when gamma is a scalar.
    """

    steps: int = 1
    lr: float = 1.0

    def fit(self, problem: Problem) -> Tensor:
        n, p = problem.X.shape
        dv = problem.Y.shape[1]
        M = problem.X.new_zeros(dv, p)
        if problem.prior_grad is not None and self.steps != 1:
            raise ValueError("a carried state is the gradient at zero of earlier associations: only for steps=1")
        for step in range(self.steps):
            # One copy of M per association, so autograd hands back each association's own gradient.
            M_i = M.expand(n, dv, p) + torch.zeros(n, dv, p, dtype=M.dtype, requires_grad=True)
            (grads,) = torch.autograd.grad(problem.losses(M_i).sum(), M_i, create_graph=True)
            direction = (problem.gamma[:, None, :] * grads).sum(0)
            if step == 0 and problem.prior_grad is not None:
                direction = direction + problem.prior_grad
            M = M - self.lr * direction
        return M


@dataclass(frozen=True)
class Exact:
    """The exact minimizer (one Newton step): M = Y^T W X (X^T W X + ridge I)^-1, via torch.linalg."""

    ridge: float = 0.0

    def fit(self, problem: Problem) -> Tensor:
        if problem.gamma.shape[1] != 1:
            raise ValueError("Exact needs one weight per association, got per-channel weights")
        if problem.prior_grad is not None:
            raise ValueError("Exact does not take a carried linear-attention state")
        w = problem.gamma
        X, Y = problem.X, problem.Y
        if self.ridge > 0:
            A = X.T @ (w * X) + self.ridge * torch.eye(X.shape[1], dtype=X.dtype)
            return torch.linalg.solve(A, X.T @ (w * Y)).T
        root = w.sqrt()
        return torch.linalg.lstsq(root * X, root * Y).solution.T


def _float64(*xs: Tensor | None) -> list[Tensor | None]:
    return [None if x is None else x.to(torch.float64) for x in xs]


def _start_decay(g: Tensor | None, B: int, T: int, H: int) -> Tensor:
    """exp(G_t): how much of a carried state survives to time t. [B, T, H, 1 or Dk]."""
    if g is None:
        return torch.ones(B, T, H, 1, dtype=torch.float64)
    g = g if g.dim() == 4 else g.unsqueeze(-1)
    return torch.exp(g.cumsum(1))


def parametric(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, optimizer: Optimizer,
               feature_map: str | Callable[[Tensor], Tensor] | None = None, scale: float | None = None,
               initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Memory m(k) = M phi(k) fitted at every t; y_t = M_t (scale phi(q_t)).

    Returns (y [B, T, H, Dv], final state M_T^T [B, H, D_phi, Dv]), float64. `initial_state`, as the
    ops carry it, is the gradient at zero of earlier associations; it decays like any association.
    """
    q, k, v, g, initial_state = _float64(q, k, v, g, initial_state)
    phi = get_feature_map(feature_map)
    B, T, H, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else scale
    X_all, Q_all = phi(k), phi(q) * scale
    gamma = gamma_matrix(g, T, batch=(B, H))
    start = _start_decay(g, B, T, H)
    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    final = torch.zeros(B, H, X_all.shape[-1], v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            row = []
            for t in range(T):
                prior = None
                if initial_state is not None:
                    prior = -(start[b, t, h][:, None] * initial_state[b, h]).T
                problem = Problem(X_all[b, : t + 1, h], v[b, : t + 1, h], gamma[b, h, t, : t + 1], prior)
                M = optimizer.fit(problem)
                row.append(M @ Q_all[b, t, h])
            ys[b, :, h] = torch.stack(row)
            final[b, h] = M.T
    return ys, final


def local_constant(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *,
                   feature_map: str | Callable[[Tensor], Tensor] | None = None,
                   initial_state: Tensor | None = None) -> Tensor:
    """Locally constant fit (Nadaraya-Watson): y_t = argmin_c sum_i w_ti ||v_i - c||^2 with
    query-dependent weights w_ti = phi(q_t)^T (gamma_i^(t) phi(k_i)), solved by Exact on a constant design.

    `initial_state` [B, H, D_phi, Dv + 1] carries (sum gamma phi(k) v^T, sum gamma phi(k)) of earlier
    associations; it enters as one more association with its weight and weighted-mean value.
    """
    q, k, v, g, initial_state = _float64(q, k, v, g, initial_state)
    phi = get_feature_map(feature_map)
    B, T, H, _ = q.shape
    fq, fk = phi(q), phi(k)
    gamma = gamma_matrix(g, T, batch=(B, H))
    start = _start_decay(g, B, T, H)
    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                w = (gamma[b, h, t, : t + 1] * fk[b, : t + 1, h]) @ fq[b, t, h]
                Y = v[b, : t + 1, h]
                if initial_state is not None:
                    carried = (start[b, t, h][:, None] * initial_state[b, h]).T @ fq[b, t, h]  # [Dv + 1]
                    w = torch.cat([w, carried[-1:]])
                    Y = torch.cat([Y, (carried[:-1] / carried[-1])[None]])
                problem = Problem(torch.ones(len(w), 1, dtype=torch.float64), Y, w[:, None])
                ys[b, t, h] = (Exact().fit(problem) @ torch.ones(1, dtype=torch.float64))
    return ys
