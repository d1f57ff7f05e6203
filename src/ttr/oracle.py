"""The literal regression solver: the executable form of the paper's claims, slow and in float64.

For every batch b, head h and time t it writes out the weighted regression problem

    min_m  1/2 sum_{i<=t} gamma_i^(t) || v_i - m(k_i) ||^2

over the associations seen so far, hands it to an optimizer, and queries the fitted memory with q_t.
Gradient methods take their steps with autograd on the written-out loss (through create_graph when
any input requires gradients, so the result is differentiable in q, k, v and the gates); analytic
ones use torch.linalg.

A new family plugs in as a new optimizer (anything with `fit(problem) -> M`) or a new problem builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from .features import get_feature_map
from .weights import association_set, check_window, gamma_matrix


@dataclass
class Problem:
    """One regression problem: regressors X [n, p] (e.g. phi(k_i)), targets Y [n, Dv], weights gamma
    [n, 1] (a weight per association), [n, p] (per regressor channel, as a vector gate gives) or [n, p, Dv] (per
    entry of M^T, as Mamba's gate gives)."""

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
            (grads,) = torch.autograd.grad(problem.losses(M_i).sum(), M_i, create_graph=_keep_graph(
                problem.X, problem.Y, problem.gamma, problem.prior_grad, M))
            gamma = problem.gamma[:, None, :] if problem.gamma.dim() == 2 else problem.gamma.transpose(1, 2)
            direction = (gamma * grads).sum(0)
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
    """exp(G_t): how much of a carried state survives to time t. [B, T, H, 1 or Dk], or [B, T, H, Dk, Dv]."""
    if g is None:
        return torch.ones(B, T, H, 1, dtype=torch.float64)
    g = g.unsqueeze(-1) if g.dim() == 3 else g
    return torch.exp(g.cumsum(1))


def _bonus_weights(g: Tensor | None, u: Tensor, B: int, T: int, H: int) -> tuple[Tensor, Tensor]:
    """RWKV-6's weights, per key channel: gamma_i^(t) = alpha_{i+1} ... alpha_{t-1} for i < t (the gate of t not
    yet applied) and u for i = t; a carried state survives to t as alpha_1 ... alpha_{t-1}. Returns (gamma
    [B, H, T, T, D], start [B, T, H, D])."""
    D = u.shape[-1]
    g = torch.zeros(B, T, H, D, dtype=torch.float64) if g is None else (
        g if g.dim() == 4 else g.unsqueeze(-1)).expand(B, T, H, D)
    G = g.cumsum(1)
    read = G - g                                                          # G_{t-1}: what t has seen decay
    diff = read.transpose(1, 2)[:, :, :, None, :] - G.transpose(1, 2)[:, :, None, :, :]
    earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)[:, :, None]
    gamma = torch.exp(torch.where(earlier, diff, torch.full_like(diff, -torch.inf)))
    gamma = gamma + torch.eye(T, dtype=torch.float64)[:, :, None] * u[None, :, None, None, :]
    return gamma, torch.exp(read)


def _complex_weights(g: Tensor | None, angle: Tensor, B: int, T: int, H: int) -> tuple[Tensor, Tensor]:
    """A complex gate's weights, per key channel: gamma_i^(t) = exp(G_t - G_i + i (Theta_t - Theta_i)) for i <= t,
    and exp(G_t + i Theta_t) for a carried state. Returns (gamma [B, H, T, T, D], start [B, T, H, D]), complex."""
    D = angle.shape[-1]
    g = torch.zeros_like(angle) if g is None else (g if g.dim() == 4 else g.unsqueeze(-1)).expand(B, T, H, D)
    log_alpha = torch.complex(g, angle).cumsum(1)                      # G_t + i Theta_t
    A = log_alpha.transpose(1, 2)
    diff = A[:, :, :, None, :] - A[:, :, None, :, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[:, :, None]
    return torch.where(causal, torch.exp(torch.where(causal, diff, 0)), 0), torch.exp(log_alpha)


def parametric(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, optimizer: Optimizer,
               feature_map: str | Callable[[Tensor], Tensor] | None = None, scale: float | None = None,
               initial_state: Tensor | None = None, bonus: Tensor | None = None,
               angle: Tensor | None = None, window: int | None = None, causal: bool = True) -> tuple[Tensor, Tensor]:
    """Memory m(k) = M phi(k) fitted at every t; y_t = M_t (scale phi(q_t)). g: a log-gate [B, T, H], [B, T, H, D_phi]
    or, per entry of the state (Mamba), [B, T, H, D_phi, Dv].

    Returns (y [B, T, H, Dv], final state M_T^T [B, H, D_phi, Dv]), float64. `initial_state`, as the
    ops carry it, is the gradient at zero of earlier associations; it decays like any association.
    bonus u [H, D_phi] (RWKV-6): association t weighs u at t, and the earlier ones are not yet decayed by
    the gate of t (_bonus_weights). The final state is the memory after the last token's update, as the ops
    carry it: the weights that a next token would read before its own gate.
    angle [B, T, H, D_phi] (GateLoop, LRU): complex weights (_complex_weights), so one step of batch GD gives a
    complex M_t; the answer is its real part, Re(M_t) (scale phi(q_t)), and the state is [Re M_T^T; Im M_T^T]
    [B, H, 2 D_phi, Dv], as is a carried one.
    window w: the regression at t sums over {t - w < i <= t} only; causal=False: over every i (uniform weights).
    Neither takes an initial_state: feed the oracle the whole sequence.
    """
    _literal_set_only(window, causal, initial_state)
    q, k, v, g, initial_state, bonus, angle = _float64(q, k, v, g, initial_state, bonus, angle)
    phi = get_feature_map(feature_map)
    B, T, H, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else scale
    X_all, Q_all = phi(k), phi(q) * scale
    if angle is not None:
        gamma, start = _complex_weights(g, angle, B, T, H)
        if initial_state is not None:  # the carried complex state from its real and imaginary rows
            initial_state = torch.complex(*initial_state.chunk(2, dim=-2))
    elif bonus is None:
        gamma = gamma_matrix(g, T, batch=(B, H), window=window, causal=causal)
        start = _start_decay(g, B, T, H)
    else:
        gamma, start = _bonus_weights(g, bonus, B, T, H)
    if angle is not None or bonus is not None:  # the set's zeros on the gate's (causal) weights
        if not causal:
            raise ValueError("a bonus or an angle is a gate's: the whole sequence (causal=False) takes none")
        gamma = gamma * association_set(T, window=window)[:, :, None]
    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    final = torch.zeros(B, H, X_all.shape[-1] * (1 if angle is None else 2), v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            row = []
            for t in range(T):
                prior = None
                if initial_state is not None:
                    carried = start[b, t, h]
                    prior = -((carried[:, None] if carried.dim() == 1 else carried) * initial_state[b, h]).T
                n = t + 1 if causal else T  # the associations the set may hold; gamma is 0 on the others
                problem = Problem(X_all[b, :n, h], v[b, :n, h], gamma[b, h, t, :n], prior)
                M = optimizer.fit(problem)
                row.append((M @ Q_all[b, t, h].to(M.dtype)).real)
            ys[b, :, h] = torch.stack(row)
            final[b, h] = M.T if angle is None else torch.cat([M.real.T, M.imag.T])
    if bonus is not None:  # what a next token reads before its own gate: the weights of the memory without u at T
        final = parametric(q, k, v, g, optimizer=optimizer, feature_map=feature_map, scale=scale,
                           initial_state=initial_state, window=window)[1]
    return ys, final


def local_constant(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *,
                   feature_map: str | Callable[[Tensor], Tensor] | None = None,
                   initial_state: Tensor | None = None, window: int | None = None, causal: bool = True,
                   angle: Tensor | None = None) -> Tensor:
    """Locally constant fit (Nadaraya-Watson): y_t = argmin_c sum_i w_ti ||v_i - c||^2 with
    query-dependent weights w_ti = phi(q_t)^T (gamma_i^(t) phi(k_i)), solved by Exact on a constant design.

    `initial_state` [B, H, D_phi, Dv + 1] carries (sum gamma phi(k) v^T, sum gamma phi(k)) of earlier
    associations; it enters as one more association with its weight and weighted-mean value.
    window, causal: the association set, as in parametric(). angle [B, T, H, D_phi]: a complex gate, whose real
    parts Re(gamma_i^(t)) weigh the fit (cosFormer: cos(theta (t - i))); a carried state is then [2 D_phi, Dv + 1],
    the real over the imaginary part.
    """
    _literal_set_only(window, causal, initial_state)
    q, k, v, g, initial_state, angle = _float64(q, k, v, g, initial_state, angle)
    phi = get_feature_map(feature_map)
    B, T, H, _ = q.shape
    fq, fk = phi(q), phi(k)
    if angle is None:
        gamma = gamma_matrix(g, T, batch=(B, H), window=window, causal=causal)
        start = _start_decay(g, B, T, H)
    else:
        gamma, start = _complex_weights(g, angle, B, T, H)
        gamma = gamma.real
        if initial_state is not None:  # Re(start * S) for the complex carried state S
            re, im = initial_state.chunk(2, dim=-2)
            start, initial_state = torch.cat([start.real, -start.imag], dim=-1), torch.cat([re, im], dim=-2)
    fq_state = fq if angle is None else torch.cat([fq, fq], dim=-1)  # what reads the carried state's rows
    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                n = t + 1 if causal else T
                w = (gamma[b, h, t, :n] * fk[b, :n, h]) @ fq[b, t, h]
                Y = v[b, :n, h]
                if initial_state is not None:
                    carried = (start[b, t, h][:, None] * initial_state[b, h]).T @ fq_state[b, t, h]  # [Dv + 1]
                    if carried[-1] > 0:  # a carried association of zero weight adds nothing
                        w = torch.cat([w, carried[-1:]])
                        Y = torch.cat([Y, (carried[:-1] / carried[-1])[None]])
                if not bool(w.gt(0).any()):  # no weight at all: the op answers 0
                    continue
                problem = Problem(torch.ones(len(w), 1, dtype=torch.float64), Y, w[:, None])
                ys[b, t, h] = (Exact().fit(problem) @ torch.ones(1, dtype=torch.float64))
    return ys


def _literal_set_only(window: int | None, causal: bool, initial_state: object) -> None:
    if (window is not None or not causal) and initial_state is not None:
        raise ValueError("the oracle writes a window or the whole sequence out literally: pass the whole sequence, "
                         "not an initial_state")


def _uniform_set(window: int | None, causal: bool, g: Tensor | None, initial_state: object) -> None:
    """A window or the whole sequence, written out literally: uniform weights and the whole sequence given."""
    check_window(window, causal)
    _literal_set_only(window, causal, initial_state)
    if g is not None and (window is not None or not causal):
        raise ValueError("a window or the whole sequence takes uniform weights here: pass g=None")


def _set_range(first: int, t: int, T: int, window: int | None, causal: bool) -> tuple[int, int]:
    """The associations [lo, at) of the regression at call token t, after `first` cached ones: the prefix, its last
    `window`, or every one (causal=False)."""
    at = first + t + 1 if causal else first + T
    return (0 if window is None else max(0, at - window)), at


def _keep_graph(*xs: Tensor) -> bool:
    """Differentiate through the steps (create_graph) only when someone will take gradients: otherwise
    every per-token problem's graph would stay alive and the oracle's memory grow with T^2."""
    return torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in xs)


def _loss_gradient(loss: Callable[[Tensor], Tensor], M: Tensor, *inputs: Tensor) -> Tensor:
    """Gradient of a written-out loss at M, by autograd; differentiable itself when inputs need it."""
    M_leaf = M + torch.zeros_like(M, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(M_leaf), M_leaf, create_graph=_keep_graph(M, *inputs))
    return grad


def online_sgd(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, *, weight_decay: Tensor | None = None,
               implicit: bool = False, scale: float | None = None,
               initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Online learning of M, one association at a time, then y_t = M_t (scale q_t).

    Explicit (SGD):  M <- M - lr_t grad[ 1/2 ||v_t - M k_t||^2 + weight_decay_t / 2 ||M||_F^2 ](M), by autograd.
    implicit=True (Longhorn's proximal step):  M <- argmin_M 1/2 ||M - M_prev||_F^2 + lr_t / 2 ||v_t - M k_t||^2,
    solved as the linear system M (I + lr_t k_t k_t^T) = M_prev + lr_t v_t k_t^T.

    k [B, T, H, n, Dk], v [B, T, H, n, Dv], lr [B, T, H, n] take n steps per token (DeltaProduct), read
    after the last; 4-d k, v and 3-d lr mean n = 1. Returns (y [B, T, H, Dv], final M^T [B, H, Dk, Dv]).
    """
    q, k, v, lr, weight_decay, initial_state = _float64(q, k, v, lr, weight_decay, initial_state)
    if k.dim() == 4:
        k, v, lr = k.unsqueeze(3), v.unsqueeze(3), lr.unsqueeze(3)
        weight_decay = None if weight_decay is None else weight_decay.unsqueeze(3)
    B, T, H, n, Dk = k.shape
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    final = torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            M = torch.zeros(v.shape[-1], Dk, dtype=torch.float64) if initial_state is None else initial_state[b, h].T
            for t in range(T):
                for j in range(n):
                    k_j, v_j, lr_j = k[b, t, h, j], v[b, t, h, j], lr[b, t, h, j]
                    if implicit:
                        system = torch.eye(Dk, dtype=torch.float64) + lr_j * torch.outer(k_j, k_j)
                        M = torch.linalg.solve(system, (M + lr_j * torch.outer(v_j, k_j)).T).T  # system is symmetric
                        continue
                    wd = 0.0 if weight_decay is None else weight_decay[b, t, h, j]

                    def loss(M_: Tensor) -> Tensor:
                        return 0.5 * ((v_j - M_ @ k_j) ** 2).sum() + 0.5 * wd * (M_ ** 2).sum()

                    M = M - lr_j * _loss_gradient(loss, M, k_j, v_j, lr_j, wd)
                ys[b, t, h] = M @ (scale * q[b, t, h])
            final[b, h] = M.T
    return ys, final


def _per_sample_gradients(losses: Callable[[list[Tensor]], Tensor], weights: list[Tensor], n: int,
                          *inputs: Tensor) -> list[Tensor]:
    """Each of n losses' own gradient with respect to weights, by autograd on per-sample copies."""
    copies = [w.expand(n, *w.shape) + torch.zeros(n, *w.shape, dtype=w.dtype, requires_grad=True) for w in weights]
    keep = _keep_graph(*weights, *inputs)
    return list(torch.autograd.grad(losses(copies).sum(), copies, create_graph=keep))


def minibatch_gd(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, *, batch_size: int,
                 initial_state: Tensor | tuple[Tensor, Tensor] | None = None, mlp: bool = False,
                 scale: float | None = None, momentum: Tensor | None = None,
                 g: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """Mini-batch GD on 1/2 ||v_i - f_W(k_i)||^2: inside a mini-batch every gradient is taken at its
    first weights W_0 (by autograd, one copy of W per association).

    Plain (TTT):  W_t = W_0 - sum_{i<=t in batch} lr_i grad l_i(W_0).
    With momentum eta and decay alpha = exp(g) (Titans, linear f only):
        m_t = eta_t m_{t-1} - lr_t grad l_t(W_0),  W_t = alpha_t W_{t-1} + m_t.
    f_W(k) = W k, or W2 gelu(W1 k) with mlp=True (initial_state = (W1, W2) then). y_t = f_{W_t}(scale q_t).
    Returns (y, final weights): [W^T] for linear, [W1, W2] for the MLP, [W^T, m^T] with momentum.
    """
    q, k, v, lr, momentum, g = _float64(q, k, v, lr, momentum, g)
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale

    def f(W: list[Tensor], x: Tensor) -> Tensor:
        if mlp:
            return torch.einsum("...vd,...d->...v", W[1], torch.nn.functional.gelu(torch.einsum("...dk,...k->...d", W[0], x)))
        return torch.einsum("...vk,...k->...v", W[0], x)

    ys = torch.zeros(B, T, H, Dv, dtype=torch.float64)
    finals = []
    for b in range(B):
        for h in range(H):
            if mlp:
                W = [initial_state[0][b, h].double(), initial_state[1][b, h].double()]
            elif initial_state is None:
                W = [torch.zeros(Dv, Dk, dtype=torch.float64)]
            else:
                W = [(initial_state[0] if momentum is not None else initial_state)[b, h].double().T]
            m = None
            if momentum is not None:
                m = torch.zeros(Dv, Dk, dtype=torch.float64) if initial_state is None else initial_state[1][b, h].double().T
            for start in range(0, T, batch_size):
                idx = range(start, min(start + batch_size, T))
                K, V = k[b, list(idx), h], v[b, list(idx), h]
                grads = _per_sample_gradients(
                    lambda Ws: 0.5 * ((V - f(Ws, K)) ** 2).sum(-1), W, len(idx), K, V, q, lr)
                W_0 = W
                for j, t in enumerate(idx):
                    if momentum is None:
                        W = [w0 - sum(lr[b, i, h] * gr[i - start] for i in range(start, t + 1))
                             for w0, gr in zip(W_0, grads)]
                    else:
                        m = momentum[b, t, h] * m - lr[b, t, h] * grads[0][j]
                        decay = 1.0 if g is None else torch.exp(g[b, t, h])
                        W = [decay * W[0] + m]
                    ys[b, t, h] = f(W, scale * q[b, t, h])
            finals.append([w.T for w in W] if not mlp else W)
            if m is not None:
                finals[-1].append(m.T)
    stacked = [torch.stack([fin[i] for fin in finals]).reshape(B, H, *finals[0][i].shape) for i in range(len(finals[0]))]
    return ys, stacked


def ridge_regression(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, beta: Tensor | None = None, *,
                     lamb: Tensor | float, scale: float | None = None,
                     initial_state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The exact memory, literally: at every t,
        M_t = argmin_M sum_{i<=t} gamma_i^(t) beta_i ||v_i - M k_i||^2 + ||M Lambda^(1/2)||_F^2,
    by least squares on the stacked system [sqrt(w) K; Lambda^(1/2)] M^T = [sqrt(w) V; 0] (torch.linalg.lstsq).
    A carried state (H_kk, H_kv) adds its decayed normal-equation terms; then the normal equations
    (K^T W K + e^{G_t} H_kk + Lambda) M^T = K^T W V + e^{G_t} H_kv are solved (torch.linalg.solve).
    lamb: scalar, [H] or [H, Dk]. Returns (y [B, T, H, Dv], (H_kk, H_kv) at T).
    """
    q, k, v, g, beta = _float64(q, k, v, g, beta)
    B, T, H, Dk = k.shape
    scale = 1.0 if scale is None else scale  # MesaNet reads the memory at q itself
    lam = torch.as_tensor(lamb, dtype=torch.float64)
    lam = lam.expand(H, Dk) if lam.dim() == 0 else (lam[:, None].expand(H, Dk) if lam.dim() == 1 else lam)
    beta = torch.ones(B, T, H, dtype=torch.float64) if beta is None else beta
    gamma = gamma_matrix(g, T, batch=(B, H))[..., 0]
    start = _start_decay(g, B, T, H)[..., 0]
    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                w = gamma[b, h, t, : t + 1] * beta[b, : t + 1, h]
                K, V = k[b, : t + 1, h], v[b, : t + 1, h]
                if initial_state is None:
                    X = torch.cat([w.sqrt()[:, None] * K, torch.diag(lam[h].sqrt())])
                    Y = torch.cat([w.sqrt()[:, None] * V, torch.zeros(Dk, V.shape[1], dtype=torch.float64)])
                    Mt = torch.linalg.lstsq(X, Y).solution
                else:
                    A = K.T @ (w[:, None] * K) + start[b, t, h] * initial_state[0][b, h].double() + torch.diag(lam[h])
                    Mt = torch.linalg.solve(A, K.T @ (w[:, None] * V) + start[b, t, h] * initial_state[1][b, h].double())
                ys[b, t, h] = Mt.T @ (scale * q[b, t, h])
    G_T = start[:, -1]  # [B, H]
    w_T = gamma[:, :, -1] * beta.transpose(1, 2)  # [B, H, T]
    kk = torch.einsum("bht,bthk,bthl->bhkl", w_T, k, k)
    kv = torch.einsum("bht,bthk,bthv->bhkv", w_T, k, v)
    if initial_state is not None:
        kk = kk + G_T[..., None, None] * initial_state[0].double()
        kv = kv + G_T[..., None, None] * initial_state[1].double()
    return ys, (kk, kv)


def _centred_monomials(diff: Tensor, order: int) -> Tensor:
    """The literal design row of one association: 1, then every monomial of diff = k_i - q_t of degree 1..order
    (for order 2 the products diff_a diff_b, a <= b), written out one by one."""
    row = [diff.new_ones(())]
    D = diff.shape[0]
    if order >= 1:
        row += [diff[a] for a in range(D)]
    if order >= 2:
        row += [diff[a] * diff[b] for a in range(D) for b in range(a, D)]
    return torch.stack(row)


def local_polynomial(q: Tensor, k: Tensor, v: Tensor, *, order: int, ridge: float = 0.0, scale: float | None = None,
                     qk_norm: bool = False, kernel: str = "softmax",
                     initial_state: tuple[Tensor, Tensor] | None = None, window: int | None = None,
                     causal: bool = True) -> Tensor:
    """Local polynomial regression around every query, literally: at every t, with weights
    w_ti = exp(scale q_t . k_i) ("softmax") or exp(-scale ||k_i - q_t||^2 / 2) ("smoothing"),
        min_{b, W} sum_{i<=t} w_ti ||v_i - b - W phi(k_i - q_t)||^2 + ridge (sum_i w_ti) ||W||_F^2
    by weighted least squares on the written-out design [1, phi(k_i - q_t)] (torch.linalg.solve on the
    normal equations), answer b. initial_state: a cache (K, V) of earlier associations, seen by every query.
    window w: the sum runs over the last w associations (the cache's included), t - w < i <= t; causal=False: over
    every i of the sequence (no cache)."""
    check_window(window, causal)
    if not causal:
        _literal_set_only(window, causal, initial_state)
    q, k, v = _float64(q, k, v)
    if initial_state is not None:
        k = torch.cat([initial_state[0].double(), k], 1)
        v = torch.cat([initial_state[1].double(), v], 1)
    if qk_norm:
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    B, T, H, Dk = q.shape
    first = k.shape[1] - T
    scale = Dk ** -0.5 if scale is None else scale
    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                at = first + t + 1 if causal else T                   # the set: the prefix, its last w, or all
                lo = 0 if window is None else max(0, at - window)
                K, V, x = k[b, lo:at, h], v[b, lo:at, h], q[b, t, h]
                if kernel == "softmax":
                    w = torch.exp(scale * (K @ x))
                elif kernel == "smoothing":
                    w = torch.exp(-0.5 * scale * ((K - x) ** 2).sum(-1))
                else:
                    raise ValueError(f"kernel must be 'softmax' or 'smoothing', got {kernel!r}")
                X = torch.stack([_centred_monomials(key - x, order) for key in K])
                penalty = ridge * w.sum() * torch.diag(torch.cat([X.new_zeros(1), X.new_ones(X.shape[1] - 1)]))
                coef = torch.linalg.solve(X.T @ (w[:, None] * X) + penalty, X.T @ (w[:, None] * V))
                ys[b, t, h] = coef[0]
    return ys


def _pair_kernel(kernel: str, scale: float, degree: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Kern(a, c) for one pair of vectors, written out: "exp" exp(scale a . c), "rbf" exp(-scale ||a - c||^2 / 2),
    "poly" (1 + scale a . c)^degree."""
    if kernel not in ("exp", "rbf", "poly"):
        raise ValueError(f"kernel must be 'exp', 'rbf' or 'poly', got {kernel!r}")

    def kern(a: Tensor, c: Tensor) -> Tensor:
        if kernel == "exp":
            return torch.exp(scale * torch.dot(a, c))
        if kernel == "rbf":
            return torch.exp(-0.5 * scale * torch.sum((a - c) ** 2))
        return (1.0 + scale * torch.dot(a, c)) ** degree

    return kern


def kernel_regression(q: Tensor, k: Tensor, v: Tensor, *, kernel: str, ridge: float, scale: float | None = None,
                      degree: int = 2, initial_state: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Kernel ridge regression, literally: at every t, f_t = argmin_f sum_{i<=t} ||v_i - f(k_i)||^2 + ridge ||f||_H^2,
    by the representer theorem alpha = (Kern(K, K) + ridge I)^-1 V solved for that prefix alone, answer
    y_t = alpha^T Kern(K, q_t): kernel_fit with every weight 1 and the exact solve."""
    return kernel_fit(q, k, v, kernel=kernel, optimizer=Exact(ridge), scale=scale, degree=degree,
                      initial_state=initial_state)


def nystrom_step(q: Tensor, k: Tensor, v: Tensor, landmarks: Tensor, *, ridge: float = 0.0,
                 scale: float | None = None, key_mask: Tensor | None = None) -> Tensor:
    """SOFT's and Skyformer's memory, literally: the whole sequence's regression (non-causal; weight 1 on every real
    key, 0 on padding: key_mask [B, T]) over the landmarks' span in the Gaussian RKHS, f(x) = W kappa(L, x) with
    kappa(a, b) = exp(-scale ||a - b||^2 / 2), landmarks L [B, m, H, Dk], fitted by one step of batch GD from W = 0
    (autograd on the written-out loss) preconditioned by the span's RKHS metric (kappa(L, L) + ridge I)^+; every query
    reads it, y_t = W_1 kappa(L, q_t). The kernels are written out per pair. With every key a landmark and ridge 0 it
    is the exact kernel smoother sum_i kappa(q_t, k_i) v_i."""
    q, k, v, landmarks, key_mask = _float64(q, k, v, landmarks, key_mask)
    B, T, H, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else scale
    weight = torch.ones(B, T, dtype=torch.float64) if key_mask is None else key_mask

    def kern(a: Tensor, c: Tensor) -> Tensor:
        return torch.exp(-0.5 * scale * torch.sum((a - c) ** 2))

    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            L = landmarks[b, :, h]
            features = lambda x: torch.stack([kern(x, l) for l in L])  # noqa: E731
            X = torch.stack([features(key) for key in k[b, :, h]])
            M = BatchGD().fit(Problem(X, v[b, :, h], weight[b][:, None]))
            metric = torch.stack([features(l) for l in L]) + ridge * torch.eye(len(L), dtype=torch.float64)
            W = M @ torch.linalg.pinv(metric, hermitian=True)
            for t in range(T):
                ys[b, t, h] = W @ features(q[b, t, h])
    return ys


def mlstm(q: Tensor, k: Tensor, v: Tensor, i: Tensor, g: Tensor | None, *, scale: float | None = None,
          initial_state: tuple[Tensor, Tensor, Tensor] | None = None, window: int | None = None,
          causal: bool = True) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """mLSTM's memory (Beck et al. 2024), literally: at every t, the regression with weights
    gamma_i^(t) = exp(i_i) exp(g_{i+1} + ... + g_t) (an input gate times forget gates) is fitted by one step of batch
    GD from 0 with the query-dependent step 1 / max(|z_t^T s q_t|, 1), z_t = sum_i gamma_i^(t) k_i the weight mass the
    query sees: y_t = M_t (s q_t) / max(|z_t^T s q_t|, 1), with M_t the unit step's fit (the state C_t^T).

    initial_state (C, n, m), stabilized as the op carries it, holds earlier associations' C e^m (a prior gradient, as
    parametric() takes it) and n e^m (their weight mass), both decayed by the forget gates since. Returns (y, final
    state (C_T, n_T, 0)): unstabilized, m = 0. window, causal: the association set, as in parametric() (g None).
    """
    _literal_set_only(window, causal, initial_state)
    q, k, v, i, g = _float64(q, k, v, i, g)
    B, T, H, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else scale
    gamma = gamma_matrix(g, T, batch=(B, H), window=window, causal=causal) * torch.exp(i).transpose(1, 2)[
        :, :, None, :, None]  # [B, H, T, T, 1]
    start = _start_decay(g, B, T, H)[..., 0]  # exp(g_1 + ... + g_t): what survives of the carried state
    if initial_state is not None:
        C0, n0, m0 = _float64(*initial_state)
        C0, n0 = C0 * torch.exp(m0)[..., None, None], n0 * torch.exp(m0)[..., None]
    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    C_T = torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float64)
    n_T = torch.zeros(B, H, Dk, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                n = t + 1 if causal else T  # the associations the set may hold; gamma is 0 on the others
                X, w = k[b, :n, h], gamma[b, h, t, :n]
                z = (w * X).sum(0)
                prior = None
                if initial_state is not None:
                    prior = -(start[b, t, h] * C0[b, h]).T
                    z = z + start[b, t, h] * n0[b, h]
                M = BatchGD().fit(Problem(X, v[b, :n, h], w, prior))
                x = scale * q[b, t, h]
                ys[b, t, h] = M @ x / torch.clamp_min((z @ x).abs(), 1.0)
            C_T[b, h], n_T[b, h] = M.T, z
    return ys, (C_T, n_T, torch.zeros(B, H, dtype=torch.float64))


# --- The generic executor's problems (ttr.ops.generic), literally ---------------------------------------------------


def local_constant_fit(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, optimizer: Optimizer | None,
                       feature_map: str | Callable[[Tensor], Tensor] | None = None, scale: float | None = None,
                       i: Tensor | None = None, initial_state: Tensor | None = None, window: int | None = None,
                       causal: bool = True) -> Tensor:
    """The locally constant fit under any batch optimizer: at every t, c_t = argmin_c 1/2 sum_i w_ti ||v_i - c||^2
    with w_ti = scale phi(q_t)^T (gamma_i^(t) e^(i_i) phi(k_i)) (scale 1 by default; gamma per association or per key
    channel), fitted by `optimizer` (BatchGD, Exact) on the constant design, or, with optimizer None, by NormalizedGD:
    one step from zero at rate 1 / max(|sum_i w_ti|, 1). `initial_state` [B, H, D_phi, Dv + 1] (sum gamma phi(k) v^T,
    sum gamma phi(k)) enters as one more association, its weight and its weighted-mean value. window, causal: the
    association set, as in parametric()."""
    _literal_set_only(window, causal, initial_state)
    q, k, v, g, i, initial_state = _float64(q, k, v, g, i, initial_state)
    phi = get_feature_map(feature_map)
    B, T, H, _ = q.shape
    fq, fk = phi(q) * (1.0 if scale is None else scale), phi(k)
    gamma = gamma_matrix(g, T, batch=(B, H), window=window, causal=causal)
    if i is not None:
        gamma = gamma * torch.exp(i).transpose(1, 2)[:, :, None, :, None]
    start = _start_decay(g, B, T, H)
    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                n = t + 1 if causal else T
                w, Y = (gamma[b, h, t, :n] * fk[b, :n, h]) @ fq[b, t, h], v[b, :n, h]
                if initial_state is not None:
                    carried = (start[b, t, h][:, None] * initial_state[b, h]).T @ fq[b, t, h]
                    if carried[-1] != 0:
                        w, Y = torch.cat([w, carried[-1:]]), torch.cat([Y, (carried[:-1] / carried[-1])[None]])
                problem = Problem(torch.ones(len(w), 1, dtype=torch.float64), Y, w[:, None])
                if optimizer is None:
                    ys[b, t, h] = BatchGD().fit(problem)[:, 0] / w.sum().abs().clamp_min(1.0)
                elif isinstance(optimizer, Exact) and optimizer.ridge == 0 and not bool(w.gt(0).any()):
                    continue  # no weight at all: the answer is 0
                else:
                    ys[b, t, h] = optimizer.fit(problem)[:, 0]
    return ys


def online_learner(q: Tensor, k: Tensor, v: Tensor, rate: Tensor, g: Tensor | None = None, *, mlp: bool = False,
                   implicit: bool = False, batch_size: int | None = None, momentum: Tensor | None = None,
                   scale: float | None = None, initial_state: tuple[Tensor, ...] | None = None) -> Tensor:
    """Online learning of f_W (W k, or W2 gelu(W1 k) with mlp=True) with the gate as weight decay, literally.

    batch_size None (online SGD): per token, the decay's proximal step W <- a * W (a = exp(g): scalar, per key channel,
    or per entry of W^T), then for each of its n associations (k [B, T, H, n, Dk] for n > 1) the gradient step
    W <- W - rate grad 1/2 ||v - f_W(k)||^2 (by autograd), or with implicit=True the proximal step
    W <- argmin_W 1/2 ||W - W'||^2 + rate/2 ||v - W k||^2 solved with torch.linalg.solve.
    batch_size b (mini-batch GD): gradients at the mini-batch's first weights W_0, m_t = momentum_t m_{t-1}
    - rate_t grad l_t(W_0) (momentum None: m_t = -rate_t grad l_t(W_0)), W_t = a_t * W_{t-1} + m_t.
    y_t = f_{W_t}(scale q_t). initial_state: the weights, as the ops hold them (S = W^T for a linear memory; (W1, W2)).
    """
    q, k, v, rate, g, momentum = _float64(q, k, v, rate, g, momentum)
    if k.dim() == 4:
        k, v, rate = k.unsqueeze(3), v.unsqueeze(3), rate.unsqueeze(3)
    B, T, H, n, Dk = k.shape
    Dv = v.shape[-1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def f(W: list[Tensor], x: Tensor) -> Tensor:
        if mlp:
            return W[1] @ torch.nn.functional.gelu(W[0] @ x)
        return W[0] @ x

    def decayed(W: list[Tensor], b: int, t: int, h: int) -> list[Tensor]:
        if g is None:
            return W
        a = torch.exp(g[b, t, h])
        return [a * w for w in W] if a.dim() == 0 else [W[0] * (a[None, :] if a.dim() == 1 else a.T)]

    ys = torch.zeros(B, T, H, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            if mlp:
                W = [initial_state[0][b, h].double(), initial_state[1][b, h].double()]
            else:
                W = [torch.zeros(Dv, Dk, dtype=torch.float64) if initial_state is None else
                     initial_state[b, h].double().T]
            m = [torch.zeros_like(w) for w in W]
            W_0 = W
            for t in range(T):
                if batch_size is None:
                    W = decayed(W, b, t, h)
                    for j in range(n):
                        x, y, lr = k[b, t, h, j], v[b, t, h, j], rate[b, t, h, j]
                        if implicit:
                            system = torch.eye(Dk, dtype=torch.float64) + lr * torch.outer(x, x)
                            W = [torch.linalg.solve(system, (W[0] + lr * torch.outer(y, x)).T).T]
                            continue
                        grads = _per_sample_gradients(lambda Ws: 0.5 * ((y - f([w[0] for w in Ws], x)) ** 2).sum()[None],
                                                      W, 1, x, y, lr)
                        W = [w - lr * gr[0] for w, gr in zip(W, grads)]
                else:
                    if t % batch_size == 0:
                        W_0 = W
                    x, y = k[b, t, h, 0], v[b, t, h, 0]
                    grads = _per_sample_gradients(lambda Ws: 0.5 * ((y - f([w[0] for w in Ws], x)) ** 2).sum()[None],
                                                  W_0, 1, x, y, rate)
                    eta = 0.0 if momentum is None else momentum[b, t, h]
                    m = [eta * m_ - rate[b, t, h, 0] * gr[0] for m_, gr in zip(m, grads)]
                    W = [w + m_ for w, m_ in zip(decayed(W, b, t, h), m)]
                ys[b, t, h] = f(W, scale * q[b, t, h])
    return ys


def _after_cache(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, cache: tuple[Tensor, ...] | None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """A cache-carrying fit's inputs in float64: q, the cached keys and values before this call's (k, v), the
    cumulative log-gate G [B, T, H] of this call, the cached associations' log-weights L [B, first, H] so far, and
    first, the number cached."""
    q, k, v, g = _float64(q, k, v, g)
    B, T, H, _ = q.shape
    L = torch.zeros(B, 0, H, dtype=torch.float64)
    if cache is not None:
        K0, V0, *L0 = _float64(*cache)
        L = L0[0] if L0 else torch.zeros(K0.shape[:3], dtype=torch.float64)
        k, v = torch.cat([K0, k], 1), torch.cat([V0, v], 1)
    G = torch.zeros(B, T, H, dtype=torch.float64) if g is None else g.cumsum(1)
    return q, k, v, G, L, k.shape[1] - T


def local_polynomial_fit(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, order: int,
                         optimizer: Optimizer, scale: float | None = None, qk_norm: bool = False,
                         initial_state: tuple[Tensor, ...] | None = None, window: int | None = None,
                         causal: bool = True) -> Tensor:
    """Local polynomial regression around every query with decaying weights, literally: at every t the design rows
    [1, monomials(k_i - q_t)], weights w_ti = exp(scale q_t . k_i) gamma_i^(t) (scalar gamma), fitted by Exact (ridge
    times the weight mass on the slope, as local_polynomial) or by BatchGD (optimizer.fit); the answer is the
    intercept. initial_state: a cache (K, V) or (K, V, L) of earlier associations, L their log-weights so far.
    window, causal: the association set, as in parametric() (uniform weights)."""
    _uniform_set(window, causal, g, initial_state)
    q, k, v, G, L, first = _after_cache(q, k, v, g, initial_state)
    B, T, H, Dk = q.shape
    if qk_norm:
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    scale = Dk ** -0.5 if scale is None else scale
    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                lo, at = _set_range(first, t, T, window, causal)
                K, V, x = k[b, lo:at, h], v[b, lo:at, h], q[b, t, h]
                # gamma_i^(t) = exp(G_t + L_i) for the cached associations, exp(G_t - G_i) for this call's
                log_gamma = torch.cat([G[b, t, h] + L[b, :first, h], G[b, t, h] - G[b, :, h]])[lo:at]
                w = torch.exp(scale * (K @ x) + log_gamma)
                X = torch.stack([_centred_monomials(key - x, order) for key in K])
                if isinstance(optimizer, Exact):
                    penalty = optimizer.ridge * w.sum() * torch.diag(torch.cat([X.new_zeros(1), X.new_ones(X.shape[1] - 1)]))
                    coef = torch.linalg.solve(X.T @ (w[:, None] * X) + penalty, X.T @ (w[:, None] * V))
                    ys[b, t, h] = coef[0]
                else:
                    ys[b, t, h] = optimizer.fit(Problem(X, V, w[:, None]))[:, 0]
    return ys


def kernel_fit(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, kernel: str, optimizer: Optimizer,
               scale: float | None = None, degree: int = 2, initial_state: tuple[Tensor, ...] | None = None,
               window: int | None = None, causal: bool = True) -> Tensor:
    """Weighted kernel regression, literally: at every t, f_t = argmin_f 1/2 sum_i w_i ||v_i - f(k_i)||^2 + ridge/2
    ||f||_H^2 with w_i = gamma_i^(t) (scalar). By the representer theorem f = sum_i alpha_i Kern(k_i, .), and the
    normal equations Kern (W Kern + ridge I) alpha = Kern W V give alpha = (W Kern + ridge I)^-1 W V (Exact). BatchGD
    takes functional gradient steps from f = 0: the gradient of the loss in the RKHS is sum_i w_i (f(k_i) - v_i)
    Kern(k_i, .), so alpha <- alpha - lr W (Kern alpha - V). The kernels are written out per pair. initial_state: a
    cache (K, V) or (K, V, L), L the log-weights so far. window, causal: the association set, as in parametric()
    (uniform weights)."""
    _uniform_set(window, causal, g, initial_state)
    q, k, v, G, L, first = _after_cache(q, k, v, g, initial_state)
    B, T, H, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else scale

    kern = _pair_kernel(kernel, scale, degree)

    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                lo, at = _set_range(first, t, T, window, causal)
                K, V = k[b, lo:at, h], v[b, lo:at, h]
                w = torch.exp(torch.cat([G[b, t, h] + L[b, :, h], G[b, t, h] - G[b, :, h]])[lo:at])[:, None]
                gram = torch.stack([torch.stack([kern(a, c) for c in K]) for a in K])
                if isinstance(optimizer, Exact):
                    alpha = torch.linalg.solve(w * gram + optimizer.ridge * torch.eye(len(K), dtype=torch.float64), w * V)
                else:
                    alpha = torch.zeros_like(V)
                    for _ in range(optimizer.steps):
                        alpha = alpha - optimizer.lr * w * (gram @ alpha - V)
                ys[b, t, h] = alpha.T @ torch.stack([kern(a, q[b, t, h]) for a in K])
    return ys


def kernel_lms(q: Tensor, k: Tensor, v: Tensor, rate: Tensor, g: Tensor | None = None, *, kernel: str,
               implicit: bool = False, batch_size: int | None = None, momentum: Tensor | None = None,
               scale: float | None = None, degree: int = 2) -> Tensor:
    """Online learning in the RKHS of `kernel` (kernel LMS), literally: f is a list of terms c Kern(key, .), starts at
    0, and follows the module's online learners with the gate as weight decay, a = exp(g) (scalar per head).

    batch_size None (online SGD): per token f' = a f, then for each of its n associations (k [B, T, H, n, Dk]) the
    functional gradient step f <- f - rate (f(k) - v) Kern(k, .), the gradient of 1/2 ||v - f(k)||^2 through the
    evaluation f(k) (by autograd) times the representer Kern(k, .); implicit=True: the proximal step
    f <- argmin_f 1/2 ||f - f'||_H^2 + rate/2 ||v - f(k)||^2, whose minimizer is f' + c Kern(k, .) (any part
    orthogonal to Kern(k, .) only adds to the norm), c solving the written-out quadratic's normal equations
    (Kern(k, k) + rate Kern(k, k)^2) c = rate Kern(k, k) (v - f'(k)) (torch.linalg.solve).
    batch_size b (mini-batch GD): gradients at the mini-batch's first function f_0, m_t = momentum_t m_{t-1} - rate_t
    (f_0(k_t) - v_t) Kern(k_t, .) (momentum None: m_t is that step alone), f_t = a_t f_{t-1} + m_t.
    y_t = f_t(q_t); scale defaults to Dk^-1/2 inside the kernel. The whole sequence from f = 0: no initial state.
    """
    q, k, v, rate, g, momentum = _float64(q, k, v, rate, g, momentum)
    if k.dim() == 4:
        k, v, rate = k.unsqueeze(3), v.unsqueeze(3), rate.unsqueeze(3)
    B, T, H, n, Dk = k.shape
    kern = _pair_kernel(kernel, Dk ** -0.5 if scale is None else scale, degree)

    def at(f: list[tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
        return sum((c * kern(key, x) for c, key in f), torch.zeros(v.shape[-1], dtype=torch.float64))

    def scaled(f: list[tuple[Tensor, Tensor]], a: Tensor | float) -> list[tuple[Tensor, Tensor]]:
        return [(a * c, key) for c, key in f]

    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            f: list[tuple[Tensor, Tensor]] = []
            m: list[tuple[Tensor, Tensor]] = []
            f_0 = f
            for t in range(T):
                a = 1.0 if g is None else torch.exp(g[b, t, h])
                if batch_size is None:
                    f = scaled(f, a)
                    for j in range(n):
                        x, y, lr = k[b, t, h, j], v[b, t, h, j], rate[b, t, h, j]
                        if implicit:
                            kxx = kern(x, x)
                            c = torch.linalg.solve((kxx + lr * kxx ** 2).reshape(1, 1),
                                                   (lr * kxx * (y - at(f, x)))[None])[0]
                            f = f + [(c, x)]
                            continue
                        error = _loss_gradient(lambda fx: 0.5 * ((y - fx) ** 2).sum(), at(f, x), y)
                        f = f + [(-lr * error, x)]
                else:
                    if t % batch_size == 0:
                        f_0 = f
                    x, y = k[b, t, h, 0], v[b, t, h, 0]
                    error = _loss_gradient(lambda fx: 0.5 * ((y - fx) ** 2).sum(), at(f_0, x), y)
                    m = (scaled(m, momentum[b, t, h]) if momentum is not None else []) + [(-rate[b, t, h, 0] * error, x)]
                    f = scaled(f, a) + m
                ys[b, t, h] = at(f, q[b, t, h])
    return ys
