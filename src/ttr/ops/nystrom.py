"""Nystrom kernel attention: SOFT (Lu et al. 2021) and Skyformer (Chen et al. 2021), non-causal (encoders).

What the papers compute. Both replace softmax attention by the unnormalized Gaussian kernel smoother over the whole
sequence, y_t = sum_i kappa(q_t, k_i) v_i with kappa(a, b) = exp(-scale ||a - b||^2 / 2), scale = Dk^-1/2 (SOFT:
exp(-||q - k||^2 / (2 sqrt d)) with W_q = W_k; Skyformer: the same kernel on q, k scaled by p^-1/4), and approximate
its T x T matrix by the Nystrom method with m landmarks L:

    kappa(Q, K) ~ kappa(Q, L) (kappa(L, L) + ridge I)^+ kappa(L, K),
    y = kappa(Q, L) [(kappa(L, L) + ridge I)^+ (kappa(L, K) V)]                  (O(T m) instead of O(T^2)).

Neither inverts a Gram matrix over the tokens: they approximate the kernel *smoother* (the kernel regression of
ops/kernel.py with its inverse dropped: one gradient step from 0 in the RKHS), not the kernel ridge regression the
`intention` preset solves (with the exp kernel exp(scale q.k); the Gaussian kernel is it times
exp(-scale ||q||^2 / 2) exp(-scale ||k||^2 / 2)); `nystrom_error` measures the distance to both (Gaussian kernel).

Objective   the whole sequence's regression 1/2 sum_i || v_i - f(k_i) ||^2 (padding and other packed sequences excluded)
Weights     uniform over every real token of the sequence: both papers define encoder attention and no causal form
Function    the landmarks' span in the Gaussian RKHS: f(x) = W kappa(L, x), W in R^{Dv x m}
Optimizer   one preconditioned gradient step from f = 0. The gradient at W = 0 is -V^T kappa(K, L); preconditioned by
            the RKHS metric of the span, (kappa(L, L) + ridge I)^+ (Levenberg-Marquardt damped where ridge > 0):
                W_1 = V^T kappa(K, L) (kappa(L, L) + ridge I)^+,    y_t = W_1 kappa(L, q_t).
            With ridge 0 this is the full RKHS gradient step projected onto the span; when every key is a landmark the
            span holds that step and y is the exact smoother. Read the other way, y_t is kernel ridge regression over
            the m landmarks with targets the exact smoother's values at them, sum_i kappa(l, k_i) v_i: a regression
            over the landmarks, but not of the values v (Nystrom kernel ridge regression would be
            kappa(q, L) (kappa(L, K) kappa(K, L) + ridge kappa(L, L))^-1 kappa(L, K) V).

The two papers differ in the landmarks and in how the m x m pseudo-inverse is taken:
- SOFT: landmarks are averages of m consecutive segments of the keys (the 1-D form of its strided sampling; the
  released model learns a strided convolution + LayerNorm + GELU: pass such landmarks as `landmarks`); q = k in the
  paper (pass the same tensor), with q != k the same step reads the keys' fit at the queries. Pseudo-inverse: the
  Newton iteration V <- 2V - V A V from V_0 = alpha A, 20 steps. The paper's alpha = 2 / ||A||_1^2 puts the largest
  eigenvalue of alpha A^2 at 2 when the landmarks coincide (A all ones), where the iteration sends that direction to
  0; the released code's 0.9 * 2 / ||A||_1^2 is used. Its released inverse adds 0.01 I: ridge defaults to 0.01.
- Skyformer: landmarks are m rows of [Q; K] (half queries, half keys: the Nystrom method on the PSD matrix
  kappa([Q; K], [Q; K]) whose off-diagonal block is kappa(Q, K)); the paper samples them uniformly at random at every
  call (sampling="random", shared across heads); the default "strided" takes evenly spaced rows, deterministic.
  Pseudo-inverse: Nystromformer's cubic iteration V <- V (13 I - AV (15 I - AV (7 I - AV))) / 4, 6 steps, on the
  symmetrically normalized D^-1/2 A D^-1/2 (D the row sums; its spectral radius is 1, so V_0 = A / ||A||_1 converges),
  A = kappa(L, L) + 0.1 I as released (ridge 0.1).
newton_steps=None takes the exact Moore-Penrose inverse (torch.linalg.pinv) instead: in float64 with every token a
landmark and ridge 0, both ops then equal the exact smoother (tests/test_nystrom.py).

Cost O(T m (Dk + Dv) + m^3) per head, memory O(T m). Computed in float32 at least (float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_mode, check_qkv, check_tensor, compute_dtype, finite_answer, is_int, is_number, scale_or
from ._varlen import CACHE_QUANTUM, check_cu_seqlens, padded_groups
from .kernel import kern

SAMPLINGS = ("strided", "random")


def soft_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    n_landmarks: int = 49,
    newton_steps: int | None = 20,
    ridge: float = 0.01,
    landmarks: Tensor | None = None,
    scale: float | None = None,
    attention_mask: Tensor | None = None,
    causal: bool = False,
    initial_state: None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    mode: str = "chunk",
) -> tuple[Tensor, None]:
    """SOFT's softmax-free attention (Lu et al. 2021): y = kappa(Q, L) (kappa(L, L) + ridge I)^+ kappa(L, K) V with
    the Gaussian kernel kappa(a, b) = exp(-scale ||a - b||^2 / 2), scale = Dk^-1/2 by default, and landmarks L the
    averages of n_landmarks consecutive segments of the keys (49 landmarks as published, at most T). q, k: [B, T, H, Dk]
    (the paper ties them: pass k = q), v: [B, T, H, Dv]. newton_steps: Newton iterations for the pseudo-inverse (None:
    exact). landmarks [B, m, H, Dk] ([N, m, H, Dk] with cu_seqlens) replaces the pooled ones (a learned sampler).
    attention_mask [B, T] (1 real, 0 padding) or cu_seqlens [N + 1] (B = 1): each sequence is answered as alone,
    padding answers 0. Non-causal only. Returns (o [B, T, H, Dv], None)."""
    _check_options("soft_attention", causal, initial_state, output_final_state, mode, n_landmarks, newton_steps, ridge)

    def find(qh: Tensor, kh: Tensor, mask: Tensor | None, rows: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if landmarks is None:
            return _segment_means(kh, mask, min(n_landmarks, kh.shape[2]))
        given = landmarks if rows is None else landmarks[rows]
        return given.transpose(1, 2).to(kh.dtype), None

    return _run("soft_attention", q, k, v, find, _newton_pinv, newton_steps, ridge, scale, attention_mask, cu_seqlens,
                landmarks)


def skyformer(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    n_landmarks: int = 128,
    newton_steps: int | None = 6,
    ridge: float = 0.1,
    sampling: str = "strided",
    generator: torch.Generator | None = None,
    landmarks: Tensor | None = None,
    scale: float | None = None,
    attention_mask: Tensor | None = None,
    causal: bool = False,
    initial_state: None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    mode: str = "chunk",
) -> tuple[Tensor, None]:
    """Skyformer (Chen et al. 2021): y = kappa(Q, L) (kappa(L, L) + ridge I)^+ kappa(L, K) V with the Gaussian kernel
    kappa(a, b) = exp(-scale ||a - b||^2 / 2), scale = Dk^-1/2 by default, and landmarks L n_landmarks rows of [Q; K]
    (128 as published, at most 2T): n_landmarks // 2 queries and the rest keys, evenly spaced (sampling="strided") or
    drawn uniformly with replacement as the paper does (sampling="random", from `generator`, shared across heads).
    newton_steps: cubic Newton-Schulz iterations on the normalized landmark matrix (None: exact pseudo-inverse).
    landmarks [B, m, H, Dk] ([N, m, H, Dk] with cu_seqlens) replaces the sampled ones. attention_mask [B, T] or
    cu_seqlens [N + 1] (B = 1): each sequence is answered as alone (with strided landmarks), padding answers 0.
    Non-causal only. Returns (o [B, T, H, Dv], None)."""
    _check_options("skyformer", causal, initial_state, output_final_state, mode, n_landmarks, newton_steps, ridge)
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")

    def find(qh: Tensor, kh: Tensor, mask: Tensor | None, rows: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if landmarks is None:
            # as many as asked whatever the length, rows repeating in short sequences: a cap at the padded length
            # would give a sequence other landmarks when packed with a longer one
            return _sampled_rows(qh, kh, mask, n_landmarks, sampling, generator), None
        given = landmarks if rows is None else landmarks[rows]
        return given.transpose(1, 2).to(kh.dtype), None

    return _run("skyformer", q, k, v, find, _normalized_newton_pinv, newton_steps, ridge, scale, attention_mask,
                cu_seqlens, landmarks)


def nystrom_error(q: Tensor, k: Tensor, v: Tensor, method: str, n_landmarks: int, *, regression_ridge: float = 1.0,
                  scale: float | None = None, **options) -> dict[str, float]:
    """Relative errors ||y - y_exact||_F / ||y_exact||_F of `method` ("soft" or "skyformer", called on q, k, v as
    given with n_landmarks and `options`) against, in float64: "smoother", the exact Gaussian kernel smoother
    kappa(Q, K) V the method approximates; "regression", the exact kernel ridge regression over the whole sequence
    with the same kernel, kappa(Q, K) (kappa(K, K) + regression_ridge I)^-1 V; and "smoother_vs_regression", the gap
    between the two exact answers, below which the second error cannot go however many landmarks."""
    ops = {"soft": soft_attention, "skyformer": skyformer}
    if method not in ops:
        raise ValueError(f"method must be one of {tuple(ops)}, got {method!r}")
    if not (is_number(regression_ridge) and regression_ridge > 0):
        raise ValueError(f"regression_ridge must be a positive finite number, got {regression_ridge!r}")
    y, _ = ops[method](q, k, v, n_landmarks=n_landmarks, scale=scale, **options)
    qh, kh, vh = (x.detach().transpose(1, 2).to(torch.float64) for x in (q, k, v))
    s = scale_or(scale, q.shape[-1] ** -0.5, positive=True)
    cross = kern(qh, kh, "rbf", s, 0)
    smoother = cross @ vh
    gram = kern(kh, kh, "rbf", s, 0) + regression_ridge * torch.eye(kh.shape[2], dtype=torch.float64, device=kh.device)
    regression = cross @ torch.linalg.solve(gram, vh)
    y = y.detach().transpose(1, 2).to(torch.float64)

    def rel(a: Tensor, b: Tensor) -> float:
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))

    return {"smoother": rel(y, smoother), "regression": rel(y, regression),
            "smoother_vs_regression": rel(smoother, regression)}


def _check_options(op: str, causal: bool, initial_state: object, output_final_state: bool, mode: str,
                   n_landmarks: int, newton_steps: int | None, ridge: float) -> None:
    if causal or mode == "recurrent" or initial_state is not None or output_final_state:
        seen = ("causal=True" if causal else "mode='recurrent'" if mode == "recurrent"
                else "an initial_state" if initial_state is not None else "output_final_state=True")
        raise ValueError(f"{op} attends over the whole sequence: its paper defines no causal form and no state to "
                         f"carry, got {seen}")
    check_mode(mode, ("chunk",))
    if not is_int(n_landmarks, 1):
        raise ValueError(f"n_landmarks must be a positive int, got {n_landmarks!r}")
    if newton_steps is not None and not is_int(newton_steps, 0):
        raise ValueError(f"newton_steps must be a non-negative int or None (the exact pseudo-inverse), got "
                         f"{newton_steps!r}")
    if not (is_number(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")


def _check_mask(mask: Tensor, B: int, T: int) -> Tensor:
    """attention_mask [B, T] of 0/1 (or bool) as bool."""
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (B, T):
        raise ValueError(f"attention_mask must be a tensor [B, T] = [{B}, {T}], got "
                         f"{list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"attention_mask must be bool or integer (1: token, 0: padding), got dtype {mask.dtype}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"attention_mask must hold only 0 and 1, got values {mask.unique().tolist()[:8]}")
        mask = mask.bool()
    return mask


def _run(op: str, q: Tensor, k: Tensor, v: Tensor, find, pinv, newton_steps: int | None, ridge: float,
         scale: float | None, attention_mask: Tensor | None, cu_seqlens: Tensor | None,
         landmarks: Tensor | None) -> tuple[Tensor, None]:
    """Checks, then the Nystrom step on each padded batch (a packed call runs its sequences as padded rows, the
    padding masked), in float32 at least."""
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    scale = scale_or(scale, Dk ** -0.5, positive=True)
    if attention_mask is not None and cu_seqlens is not None:
        raise ValueError("pass attention_mask or cu_seqlens, not both")
    rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if landmarks is not None:
        check_tensor("landmarks", landmarks, 4)
        if landmarks.shape[0] != rows or landmarks.shape[2:] != (H, Dk) or landmarks.shape[1] == 0:
            raise ValueError(f"landmarks must be [{'N' if cu_seqlens is not None else 'B'}, m, H, Dk] = [{rows}, m, "
                             f"{H}, {Dk}] with m >= 1, got {list(landmarks.shape)}")
    dt = compute_dtype(q.dtype)

    def core(qp: Tensor, kp: Tensor, vp: Tensor, mask: Tensor | None, rows: Tensor | None) -> Tensor:
        qh, kh, vh = (x.transpose(1, 2).to(dt) for x in (qp, kp, vp))   # [b, H, T, D]
        L, active = find(qh, kh, mask, rows)
        return _nystrom(qh, kh, vh, L, active, mask, scale, ridge, pinv, newton_steps, same=q is k).transpose(1, 2)

    if cu_seqlens is None:
        mask = None if attention_mask is None else _check_mask(attention_mask, B, T)
        o = core(q, k, v, mask, None)
    else:
        cu = check_cu_seqlens(cu_seqlens, B, T)
        pieces: list[Tensor | None] = [None] * rows
        for layout, (qp, kp, vp) in padded_groups(cu, CACHE_QUANTUM, [q, k, v]):
            index = torch.tensor(layout.rows, dtype=torch.long, device=q.device)
            for n, piece in zip(layout.rows, layout.pieces(core(qp, kp, vp, layout.mask, index))):
                pieces[n] = piece
        o = torch.cat([p for p in pieces if p is not None])[None]
    return finite_answer(op, o.to(q.dtype)), None


def _nystrom(qh: Tensor, kh: Tensor, vh: Tensor, L: Tensor, active: Tensor | None, mask: Tensor | None,
             scale: float, ridge: float, pinv, newton_steps: int | None, same: bool) -> Tensor:
    """kappa(Q, L) (kappa(L, L) + ridge I)^+ kappa(L, K) V for qh, kh [b, H, T, Dk], vh [b, H, T, Dv], L [b, H, m, Dk].
    Landmarks marked inactive ([b, m], False: an empty segment) become an identity block of A and zero columns of
    kappa(Q, L), so they add nothing; padded keys (mask [b, T] False) write nothing and padded queries answer 0."""
    m = L.shape[2]
    eye = torch.eye(m, dtype=L.dtype, device=L.device)
    to_query = kern(qh, L, "rbf", scale, 0)                                          # [b, H, T, m]
    to_key = to_query if same else kern(kh, L, "rbf", scale, 0)
    A = kern(L, L, "rbf", scale, 0)
    if active is not None:
        keep = active[:, None, :, None] & active[:, None, None, :]
        A = torch.where(keep, A, eye)
        to_key = to_key * active[:, None, None, :]
    if mask is not None:
        to_key = to_key * mask[:, None, :, None]
    A = A + ridge * eye
    inverse = torch.linalg.pinv(A, hermitian=True) if newton_steps is None else pinv(A, newton_steps)
    o = to_query @ (inverse @ (to_key.transpose(-1, -2) @ vh))
    return o if mask is None else o * mask[:, None, :, None]


def _segment_means(kh: Tensor, mask: Tensor | None, m: int) -> tuple[Tensor, Tensor]:
    """SOFT's landmarks: the means of m consecutive segments of each row's real keys ([b, H, m, Dk]), the n real keys
    of a row split at floor(r m / n), and which segments hold a key ([b, m]; all, unless a row has fewer than m)."""
    b, _, T, _ = kh.shape
    if mask is None:
        mask = torch.ones(b, T, dtype=torch.bool, device=kh.device)
    rank = mask.long().cumsum(1) - 1                                                 # the key's index among real keys
    n = mask.long().sum(1, keepdim=True).clamp_min(1)
    segment = (rank.clamp_min(0) * m) // n
    member = F.one_hot(segment, m).to(kh.dtype) * mask[..., None]                    # [b, T, m]
    count = member.sum(1)                                                            # [b, m]
    means = torch.einsum("btm,bhtd->bhmd", member, kh) / count.clamp_min(1)[:, None, :, None]
    return means, count > 0


def _sampled_rows(qh: Tensor, kh: Tensor, mask: Tensor | None, m: int, sampling: str,
                  generator: torch.Generator | None) -> Tensor:
    """Skyformer's landmarks: m // 2 rows of Q and m - m // 2 rows of K at the same positions for every head, among
    each row's real tokens: evenly spaced (the i-th of c at rank floor((i + 1/2) n / c)) or uniform with replacement."""
    b, H, T, D = kh.shape
    if mask is None:
        mask = torch.ones(b, T, dtype=torch.bool, device=kh.device)
    n = mask.long().sum(1, keepdim=True)                                             # [b, 1]
    positions = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices      # real tokens first, in order

    def rows(x: Tensor, c: int) -> Tensor:
        if sampling == "strided":
            u = (torch.arange(c, device=x.device, dtype=torch.float64) + 0.5)[None] / c
        else:
            u = torch.rand(b, c, generator=generator, dtype=torch.float64, device="cpu" if generator is None
                           else generator.device).to(x.device)
        rank = (u * n).floor().long().clamp(min=0, max=T - 1).expand(b, c)
        where = positions.gather(1, rank)                                            # [b, c]
        return x.gather(2, where[:, None, :, None].expand(b, H, c, D))

    return torch.cat([rows(qh, m // 2), rows(kh, m - m // 2)], 2)


def _newton_pinv(A: Tensor, steps: int) -> Tensor:
    """SOFT's Newton iteration for the Moore-Penrose inverse of a symmetric A: V <- 2V - V A V from V_0 = alpha A,
    alpha = 0.9 * 2 / ||A||_1^2 (the released code's margin below the paper's bound, see the module's notes)."""
    alpha = 1.8 / A.abs().sum(-2).amax(-1)[..., None, None] ** 2
    V = alpha * A
    for _ in range(steps):
        V = 2 * V - V @ A @ V
    return V


def _normalized_newton_pinv(A: Tensor, steps: int) -> Tensor:
    """Skyformer's inverse: with D the row sums of A (positive: a Gaussian kernel matrix), A_n = D^-1/2 A D^-1/2 has
    spectral radius 1; Nystromformer's cubic iteration V <- V (13 I - A_n V (15 I - A_n V (7 I - A_n V))) / 4 from
    V_0 = A_n / ||A_n||_1 approximates A_n^+, and A^+ ~ D^-1/2 A_n^+ D^-1/2."""
    d = A.sum(-1).rsqrt()
    An = d[..., :, None] * A * d[..., None, :]
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    V = An / An.abs().sum(-2).amax(-1)[..., None, None]
    for _ in range(steps):
        AV = An @ V
        V = 0.25 * V @ (13 * eye - AV @ (15 * eye - AV @ (7 * eye - AV)))
    return d[..., :, None] * V * d[..., None, :]
