"""Input validation shared by every op: bad input raises ValueError naming the argument and what was seen.

Shapes, dtypes and devices are checked always (they cost nothing). Value checks (finite, in range) read a
reduction back to the host, so they are kept to one pass each over the small tensors (gates, step sizes) and
one over the answer, which shows every non-finite q, k or v (a nan or inf spreads to the answer) and is only then
traced back to the argument that caused it (finite_answer). They are skipped while torch.compile traces (a value
read back breaks the graph), and can be turned off: ttr.set_checks(False), `with ttr.checks(False):`, or the
environment variable TTR_CHECKS=0.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import weakref
from typing import Iterator

import torch
from torch import Tensor


def is_int(x: object, low: int | None = None) -> bool:
    """x is an int (a bool is not), and at least `low` if given."""
    return isinstance(x, int) and not isinstance(x, bool) and (low is None or x >= low)


def is_number(x: object) -> bool:
    """x is a finite real number (a bool is not)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_positive_ints(config: object, names: tuple[str, ...]) -> None:
    """A config's fields `names` are positive ints, else a ValueError naming the first that is not."""
    for name in names:
        if not is_int(getattr(config, name), 1):
            raise ValueError(f"{name} must be a positive int, got {getattr(config, name)!r}")


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _not_meta(name: str, x: Tensor) -> None:
    if x.is_meta:
        raise ValueError(f"{name} is a meta tensor (a shape without values); ttr's ops compute and check values: "
                         "materialize it on a real device first")


_CHECKS = os.environ.get("TTR_CHECKS", "1") != "0"


def set_checks(enabled: bool) -> bool:
    """Turns ttr's value checks (finite, in range) on or off for the process; returns the previous setting.
    Off, bad values are not caught: a nan in goes out as a nan."""
    global _CHECKS
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be a bool, got {enabled!r}")
    previous, _CHECKS = _CHECKS, enabled
    return previous


@contextlib.contextmanager
def checks(enabled: bool) -> Iterator[None]:
    """Value checks on or off inside a with block (set_checks), as they were after it."""
    previous = set_checks(enabled)
    try:
        yield
    finally:
        set_checks(previous)


def checking() -> bool:
    """Whether value checks run: on unless turned off, and never while torch.compile traces."""
    return _CHECKS and not torch.compiler.is_compiling()


def _bounds(name: str, x: Tensor) -> tuple[float, float]:
    """(min, max) of x in one pass and one read-back: nan and inf show in them (min and max propagate nan)."""
    _not_meta(name, x)
    if x.numel() == 0:
        return 0.0, 0.0
    lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()
    return lo, hi


def all_finite(x: Tensor) -> bool:
    """Whether every value of x is finite, in one pass: nan and inf show in the bounds. Measured (2 cores,
    float32): 6 us for a token's q [1, 1, 16, 64], 15 us for a state [1, 16, 64, 64], 0.12 ms for a cache of
    2048 tokens [1, 2048, 16, 64]; isfinite(x).all() took 21 us, 0.13 ms and 3.5 ms."""
    lo, hi = _bounds("x", x)
    return math.isfinite(lo) and math.isfinite(hi)


def check_tensor(name: str, x: Tensor, rank: int, values: bool = True) -> None:
    """x a real floating-point tensor of this rank, with finite values (unless values=False: the caller vouches
    for them)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {_shape(x)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    _not_meta(name, x)
    if values and checking() and not all_finite(x):
        raise ValueError(f"{name} has non-finite values (nan or inf), which would poison the state")


# States an op returned, computed from checked inputs: id -> (weak reference, version counter at return). A state
# handed back unchanged (the same tensor, its version counter not moved by an in-place write) is not checked again,
# so a decoding step checks its new token and not the whole state. Inference tensors keep no version counter:
# there the state is trusted as returned.
_VOUCHED: dict[int, tuple[weakref.ref, int | None]] = {}


def _version(t: Tensor) -> int | None:
    return None if t.is_inference() else t._version


def vouch(*tensors: Tensor | None) -> None:
    """Records tensors an op computed from checked inputs (its final state): checks of them can be skipped while
    they stay as they are (vouched)."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if isinstance(t, Tensor):
            key = id(t)

            def forget(ref: weakref.ref, key: int = key) -> None:
                if _VOUCHED.get(key, (None,))[0] is ref:
                    del _VOUCHED[key]

            _VOUCHED[key] = (weakref.ref(t, forget), _version(t))


def vouched(t: object) -> bool:
    """Whether t is a tensor an op returned (vouch) and nothing has written into it since."""
    if not isinstance(t, Tensor) or torch.compiler.is_compiling():
        return False
    entry = _VOUCHED.get(id(t))
    return entry is not None and entry[0]() is t and entry[1] == _version(t)


def check_qkv(q: Tensor, k: Tensor, v: Tensor, values: bool = True) -> tuple[int, int, int, int, int]:
    """q, k: [B, T, H, Dk]; v: [B, T, H, Dv]. Returns (B, T, H, Dk, Dv). values=False leaves their values to
    the answer's check (finite_answer with q, k, v named): for ops whose answer every value reaches."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4, values)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, Dk], got q {_shape(q)} and k {_shape(k)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must match k in [B, T, H], got k {_shape(k)} and v {_shape(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, T, H, Dk = k.shape
    if T == 0:
        raise ValueError(f"q, k, v hold no tokens (T = 0, shape {_shape(q)}); call the op with at least one")
    return B, T, H, Dk, v.shape[-1]


def check_log_gate(g: Tensor | None, B: int, T: int, H: int, Dk: int, scalar_for: str | None = None,
                   Dv: int | None = None) -> str | None:
    """A log-gate g <= 0 is [B, T, H] (scalar per head) or [B, T, H, Dk] (per key channel), or, for an op that
    passes its value width Dv, [B, T, H, Dk, Dv] (per state entry); an op that takes only scalar gates names
    itself in `scalar_for`.

    Returns "scalar", "vector", "entry" or None.
    """
    if g is None:
        return None
    if not isinstance(g, Tensor) or not g.is_floating_point():
        raise ValueError(f"g must be a floating-point torch.Tensor, got {getattr(g, 'dtype', type(g).__name__)}")
    if scalar_for is not None and g.dim() != 3:
        raise ValueError(f"g must be a scalar log-gate [B, T, H] for {scalar_for}, got shape {_shape(g)}")
    if tuple(g.shape) == (B, T, H):
        kind = "scalar"
    elif tuple(g.shape) == (B, T, H, Dk):
        kind = "vector"
    elif Dv is not None and tuple(g.shape) == (B, T, H, Dk, Dv):
        kind = "entry"
    else:
        entry = "" if Dv is None else f" or [B, T, H, Dk, Dv] = [{B}, {T}, {H}, {Dk}, {Dv}]"
        raise ValueError(f"g must be [B, T, H] = [{B}, {T}, {H}] or [B, T, H, Dk] = [{B}, {T}, {H}, {Dk}]{entry}, "
                         f"got {_shape(g)}")
    if not checking():
        return kind
    lo, hi = _bounds("g", g)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("g has non-finite values; a log-gate must be finite (use a large negative value to forget)")
    gmax = hi
    if gmax > 0:
        raise ValueError(f"g is a log-gate and must be <= 0 (decay alpha = exp(g) <= 1), got max {gmax:.4g}")
    return kind


# exp(-100) < 4e-44: a log-gate below -100 forgets completely in any dtype, and clamping it there keeps the
# cumulative log-gates of the chunk forms finite (finfo.min per token summed to -inf, and -inf - -inf = nan)
LOG_GATE_FLOOR = -100.0


def log_gate_as(g: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A checked log-gate in the compute dtype, clamped at LOG_GATE_FLOOR."""
    return None if g is None else g.to(dtype).clamp_min(LOG_GATE_FLOOR)


def check_step(name: str, x: Tensor, shape: tuple[int, ...], upper: float | None = None) -> None:
    """A per-token step size: the given shape, finite, >= 0 and <= upper."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if tuple(x.shape) != tuple(shape):
        dims = "[" + ", ".join(str(d) for d in shape) + "]"
        raise ValueError(f"{name} must have shape {dims}, got {_shape(x)}")
    if not checking():
        return
    lo, hi = _bounds(name, x)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} has non-finite values")
    if lo < 0 or (upper is not None and hi > upper):
        raise ValueError(f"{name} must lie in [0, {'inf' if upper is None else format(upper, 'g')}], got values in "
                         f"[{lo:.4g}, {hi:.4g}]")


def check_state(name: str, s: Tensor | None, shape: tuple[int, ...]) -> None:
    """A state tensor of this shape, with finite values; the values of a state an op returned unchanged (vouched)
    are not read again."""
    if s is None:
        return
    check_tensor(name, s, len(shape), values=False)
    if tuple(s.shape) != tuple(shape):
        dims = "[" + ", ".join(str(d) for d in shape) + "]"
        raise ValueError(f"{name} must have shape {dims}, got {_shape(s)}")
    if checking() and not vouched(s) and not all_finite(s):
        raise ValueError(f"{name} has non-finite values (nan or inf), which would poison the state")


def scale_or(scale: object, default: float, positive: bool = False) -> float:
    """The read-out scale: `default` when None, else a finite number (positive where the op needs it)."""
    if scale is None:
        return default
    if not (isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale)
            and (scale > 0 or not positive)):
        raise ValueError(f"scale must be a {'positive ' if positive else ''}finite number, got {scale!r}")
    return float(scale)


def check_positive(name: str, x: object) -> None:
    if not (isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a positive finite number, got {x!r}")


def append_to_cache(initial_state: tuple[Tensor, Tensor] | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The keys and values a nonparametric memory sees: the cache (K [B, T0, H, Dk], V [B, T0, H, Dv]) of earlier
    tokens, checked, followed by these (k, v [B, T, H, .])."""
    if initial_state is None:
        return k, v
    if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
        raise ValueError("initial_state must be the cache pair (K [B, T0, H, Dk], V [B, T0, H, Dv])")
    B, _, H, Dk = k.shape
    K0, V0 = initial_state
    T0 = K0.shape[1] if isinstance(K0, Tensor) and K0.dim() == 4 else 0
    check_state("initial_state (K)", K0, (B, T0, H, Dk))
    check_state("initial_state (V)", V0, (B, T0, H, v.shape[-1]))
    return torch.cat([K0.to(k.dtype), k], 1), torch.cat([V0.to(v.dtype), v], 1)


def blame(**inputs: Tensor | None) -> None:
    """Raises for the first of these inputs with a non-finite value, naming it."""
    for name, x in inputs.items():
        if x is not None and not all_finite(x):
            raise ValueError(f"{name} has non-finite values (nan or inf), which would poison the state")


def finite_answer(op: str, o: Tensor, **inputs: Tensor | None) -> Tensor:
    """o, once it is known to be finite. The inputs named here were not checked up front (check_qkv with
    values=False): a non-finite value among them reaches o, and is named once o shows it. Every other input
    was checked, so a non-finite answer is an overflow inside the op (or in the caller's own feature map),
    never a number to hand back."""
    if not checking() or all_finite(o):
        return o
    blame(**inputs)
    raise ValueError(f"{op}: the answer is not finite in {o.dtype} although every input was: an intermediate "
                     "overflowed (scale, the size of q and k, a small ridge); rescale the inputs or use float64")


def check_mode(mode: str, allowed: tuple[str, ...]) -> None:
    if mode not in allowed:
        raise ValueError(f"mode must be one of {allowed}, got {mode!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32 at least; float64 inputs (references, tests) stay float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
