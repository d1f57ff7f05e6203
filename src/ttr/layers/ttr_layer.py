"""TTRLayer: x -> q, k, v (+ short conv) -> test-time regression memory -> (norm, gate) -> output.

Batches as training and serving make them: a padding mask (left, right or holes, as Hugging Face passes
it) or packed sequences (cu_seqlens). A masked batch runs as packed sequences: the real tokens of row b
are sequence b, so a padded position writes nothing into the memory, neither decays nor advances it (a
mini-batch learner's offset counts real tokens only), never reaches the short convolution, and outputs
zeros. Query heads may share key and value heads (GQA / MQA: the slides' shared regression inputs and
outputs), and value heads may be wider than key heads (expand_v).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import is_int
from ..ops import MiniBatchState
from ..ops.kv_cache import KVCache
from ..features import LAYER_MODULES, make_feature_map
from ..ops._varlen import check_cu_seqlens
from ..recipe import MLP, LocalPolynomial, MiniBatchGD, Preset, Recipe, get_preset
from .cache import LayerState, dtype_name
from .conv import ShortConv
from .gates import DT_RANGE, make_inputs

# QKNorm's temperature starts at log2(L^2 - L) for a training length L (Henry et al., 2020), here L = 1024
QKNORM_SCALE_INIT = math.log2(1024 ** 2 - 1024)
NORM_EPS = 1e-5


def _positive_int(name: str, x: object) -> int:
    if not is_int(x, 1):
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return x


class TTRLayer(nn.Module):
    """A sequence layer with test-time associative memory, given by a Recipe or a preset name.

    forward(x [B, T, d_model], state=None, *, attention_mask=None, cu_seqlens=None) -> (y [B, T, d_model],
    new LayerState). Feeding a sequence in pieces, passing the state along, equals feeding it whole.
    n_heads query heads of head_dim (default d_model / n_heads); num_kv_heads key and value heads (default
    n_heads; a divisor of n_heads: GQA, 1: MQA); value heads of expand_v * head_dim; conv_silu applies SiLU
    after the short convolution; dt_range is the initial dt of scalar (Mamba-2) gates, log-uniform (Mamba-2's
    (1e-3, 0.1) by default; a smaller range remembers longer at initialization). A preset that names its own gate
    parameterization (Preset.gate) gets it; where that gate ties the key to it (HGRN-2: k = 1 - f), the key
    projection makes the gate's pre-activation instead (through the short convolution, at the key heads).
    layer_idx and n_layers (0 <= layer_idx < n_layers) tell a depth-dependent gate its depth (HGRN-2's lower bound;
    the LanguageModel passes them); other memories ignore them.
    """

    def __init__(self, d_model: int, n_heads: int, memory: Recipe | Preset | str, *, head_dim: int | None = None,
                 num_kv_heads: int | None = None, expand_v: float = 1.0, conv_size: int = 4, conv_silu: bool = False,
                 output_gate: bool = True, norm: bool = True, chunk_size: int = 64, mode: str = "chunk",
                 dt_range: tuple[float, float] = DT_RANGE, layer_idx: int | None = None,
                 n_layers: int | None = None) -> None:
        super().__init__()
        self.d_model, self.n_heads = _positive_int("d_model", d_model), _positive_int("n_heads", n_heads)
        if isinstance(memory, str):
            memory = get_preset(memory)
        gate = key_dim = None
        if isinstance(memory, Preset):
            memory, gate, key_dim = memory.recipe, memory.gate, memory.key_dim
        elif not isinstance(memory, Recipe):
            raise ValueError(f"memory must be a preset name, a Preset or a Recipe, got {type(memory).__name__} "
                             f"{memory!r}")
        self.recipe = memory
        if head_dim is None and d_model % n_heads:
            raise ValueError(f"n_heads = {n_heads} does not divide d_model = {d_model}; pass head_dim")
        self.head_dim = d_model // n_heads if head_dim is None else _positive_int("head_dim", head_dim)
        if key_dim is not None and head_dim is None:  # the preset's own key (feature) dim; values keep the head dim
            expand_v, self.head_dim = expand_v * self.head_dim / key_dim, key_dim
        self.num_kv_heads = n_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if n_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads = {num_kv_heads} must divide n_heads = {n_heads}")
        value_dim = expand_v * self.head_dim
        if not (isinstance(expand_v, (int, float)) and value_dim >= 1 and float(value_dim).is_integer()):
            raise ValueError(f"expand_v * head_dim must be a positive whole number, got {expand_v!r} * {self.head_dim}")
        if mode not in ("chunk", "recurrent"):
            raise ValueError(f"mode must be 'chunk' or 'recurrent', got {mode!r}")
        self.value_dim = int(value_dim)
        H, Hkv, Dk, Dv = n_heads, self.num_kv_heads, self.head_dim, self.value_dim
        # n keys and values per token for memories that take n steps per token (DeltaProduct)
        self.n_steps = memory.steps_per_token
        self.widths = [H * Dk, self.n_steps * Hkv * Dk, self.n_steps * Hkv * Dv]
        self.qkv = nn.Linear(d_model, sum(self.widths), bias=False)
        self.conv = ShortConv(sum(self.widths), conv_size) if conv_size > 0 else None
        self.conv_silu = conv_silu
        if not (isinstance(dt_range, (tuple, list)) and len(dt_range) == 2 and 0 < dt_range[0] <= dt_range[1]):
            raise ValueError(f"dt_range must be (dt_min, dt_max) with 0 < dt_min <= dt_max, got {dt_range!r}")
        self.inputs = make_inputs(memory, d_model, n_heads, Dk, tuple(dt_range), gate=gate, num_kv_heads=Hkv,
                                  value_dim=self.value_dim, layer_idx=layer_idx, n_layers=n_layers)
        # joint gate modules (make_inputs) make several inputs and may reshape q, k, v; one of them may also mix each
        # token with its predecessor into the projections' inputs (RWKV-6's token shift)
        self.joint = [name for name, m in self.inputs.items() if getattr(m, "joint", False)]
        self.mixer = next((name for name in self.joint if hasattr(self.inputs[name], "mix")), None)
        if isinstance(memory.regressor, MLP):  # the MLP memory's starting weights are learned
            hidden = memory.regressor.expansion * Dk
            self.W1 = nn.Parameter(torch.randn(n_heads, hidden, Dk) * Dk ** -0.5)
            self.W2 = nn.Parameter(torch.randn(n_heads, Dv, hidden) * hidden ** -0.5)
        if isinstance(memory.regressor, LocalPolynomial) and memory.regressor.qk_norm:  # learned temperature
            self.log_qk_scale = nn.Parameter(torch.full((n_heads,), math.log(QKNORM_SCALE_INIT)))
        # a fixed eps (fla's 1e-5): torch's default is the dtype's eps, so float32 and float64 normalized small
        # outputs (a mini-batch learner's first tokens) differently, by up to 60 %
        self.norm = nn.RMSNorm(Dv, eps=NORM_EPS) if norm else None
        self.out_gate = nn.Linear(d_model, H * Dv, bias=False) if output_gate else None
        self.out = nn.Linear(H * Dv, d_model, bias=False)
        self.op = memory.op()
        self.causal = memory.causal
        fm = getattr(memory.regressor, "feature_map", None)
        if fm in LAYER_MODULES:  # a learnable map (or one with random features) is the layer's own module
            self.feature_map = make_feature_map(fm, Dk, **({"heads": H} if fm in ("hedgehog", "rebased") else {}))
        # a joint module valid over a fixed number of tokens (cosFormer's M) says so by its max_len
        self.max_len = min((getattr(m, "max_len") for m in self.inputs.values() if hasattr(m, "max_len")), default=None)
        self.takes_chunk_size = "chunk_size" in inspect.signature(self.op.func).parameters
        self.chunk_size, self.mode = chunk_size, mode
        # what a state must come from: this memory, these heads and this convolution
        own_gate = f" | {gate} gate" if gate else ""
        self.kind = (f"{self.op.func.__name__}: {memory.describe()}{own_gate}; heads {H} (kv {Hkv}) of {Dk} x {Dv}, "
                     f"conv {conv_size if conv_size > 0 else 'none'}")

    def forward(self, x: Tensor, state: LayerState | None = None, *, attention_mask: Tensor | None = None,
                cu_seqlens: Tensor | None = None) -> tuple[Tensor, LayerState]:
        """x [B, T, d_model]; attention_mask [B, T] (1 or True: a real token, 0: padding) or cu_seqlens [N + 1]
        (B = 1: N packed sequences). Returns (y [B, T, d_model], zeros at padding; the state, one row per row
        of x, or per packed sequence)."""
        B, T = self._check_input(x)
        if state is not None and not isinstance(state, LayerState):
            raise ValueError(f"state must be the LayerState a TTRLayer returned, got {type(state).__name__}")
        if attention_mask is not None and cu_seqlens is not None:
            raise ValueError("pass attention_mask or cu_seqlens, not both")
        if cu_seqlens is not None:
            cu = check_cu_seqlens(cu_seqlens, B, T)
            return self._run(x, state, cu)
        mask = None if attention_mask is None else self._check_mask(attention_mask, B, T, x.device)
        # a cache's rows may hold different numbers of tokens (a KVCache masks each row's padding), so only
        # padding in x needs the packed path
        if mask is None or bool(mask.all()):
            return self._run(x, state, None)
        # the real tokens of row b become packed sequence b
        lengths = mask.sum(1)
        if not bool(lengths.any()):  # padding only (every row finished): nothing is read or written
            state = self._check_state(state, B, x.dtype)
            seen = lengths if state.lengths is None else state.lengths
            return x.new_zeros(B, T, self.d_model), LayerState(state.conv, state.memory, seen, self.kind,
                                                               dtype_name(x.dtype), state.shift)
        cu = F.pad(lengths.cumsum(0), (1, 0))
        y, state = self._run(x[mask][None], state, cu)
        return x.new_zeros(B, T, self.d_model).masked_scatter(mask[..., None], y[0]), state

    def _run(self, x: Tensor, state: LayerState | None, cu: Tensor | None) -> tuple[Tensor, LayerState]:
        """The layer on x [B, T, d] (cu None) or on N sequences packed in x [1, T, d]."""
        B, T, _ = x.shape
        rows = B if cu is None else cu.numel() - 1
        state = self._check_state(state, rows, x.dtype)
        x_gate = x_out = x
        shift = None
        if self.mixer is None:
            qkv = self.qkv(x)
        else:  # each projection reads its own mix of the token and its predecessor
            x_prev, shift = _token_shift(x, state.shift, cu)
            mixed = self.inputs[self.mixer].mix(x, x_prev)
            weights = self.qkv.weight.split(self.widths)
            qkv = torch.cat([F.linear(mixed[j], w) for j, w in zip("rkv", weights)], dim=-1)
            x_gate, x_out = mixed["w"], mixed["g"]
        conv_cache = None
        if self.conv is not None:
            qkv, conv_cache = self.conv(qkv, state.conv, cu)
            if self.conv_silu:
                qkv = F.silu(qkv)
        H, Hkv, Dk, Dv, n = self.n_heads, self.num_kv_heads, self.head_dim, self.value_dim, self.n_steps
        q, k, v = qkv.split(self.widths, dim=-1)
        q = q.view(B, T, H, Dk)
        k, v = (t.view(B, T, Hkv, n, d) if n > 1 else t.view(B, T, Hkv, d) for t, d in ((k, Dk), (v, Dv)))
        inputs = {name: module(x) for name, module in self.inputs.items() if name not in self.joint}
        shared = {}
        for name in self.joint:
            q, k, v, made = self.inputs[name](x_gate, q, k, v)
            shared.update(made)
        if Hkv != H:  # each group of H / Hkv query heads reads its own memory of the shared keys and values
            k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
            # a joint module's inputs are at the key heads: per token [B, T, Hkv, ...], per layer [Hkv, ...]
            shared = {name: t.repeat_interleave(H // Hkv, dim=0 if t.dim() == 2 else 2) for name, t in shared.items()}
        inputs.update(shared)
        if self.max_len is not None:
            lengths = torch.full((rows,), T, device=x.device) if cu is None else cu[1:] - cu[:-1]
            longest = int((lengths + (0 if state.lengths is None else state.lengths)).max())
            if longest > self.max_len:
                raise ValueError(f"memory {self.recipe.describe()!r} holds for {self.max_len} tokens per sequence; a "
                                 f"sequence reached {longest}")
        kwargs = {} if not hasattr(self, "feature_map") else {"feature_map": self.feature_map}
        if cu is not None:
            kwargs["cu_seqlens"] = cu
        if not self.causal:  # the whole sequence at once: no state before or after
            if state.lengths is not None:
                raise ValueError(f"memory {self.recipe.describe()!r} reads the whole sequence (non-causal): it has no "
                                 "state to continue from; call the layer once per sequence, without a state")
            o, _ = self.op(q, k, v, **inputs, **kwargs)
            memory = None
        else:
            o, memory = self._memory(q, k, v, inputs, state, rows, cu, T, kwargs)
        if self.norm is not None:
            o = self.norm(o)
        o = o.reshape(B, T, -1)
        if self.out_gate is not None:
            o = o * F.silu(self.out_gate(x_out))
        if cu is None:  # every row saw T tokens
            seen = torch.full((rows,), T, device=x.device) if state.lengths is None else state.lengths + T
        else:
            seen = cu[1:] - cu[:-1] if state.lengths is None else state.lengths + (cu[1:] - cu[:-1])
        return self.out(o), LayerState(conv_cache, memory, seen, self.kind, dtype_name(x.dtype), shift)

    def _memory(self, q: Tensor, k: Tensor, v: Tensor, inputs: dict[str, Tensor], state: LayerState, rows: int,
                cu: Tensor | None, T: int, kwargs: dict) -> tuple[Tensor, object]:
        """The causal memory's op from the state's memory: (o, the memory after these tokens)."""
        memory = state.memory
        if memory is None and hasattr(self, "W1"):
            memory = (self.W1.expand(rows, -1, -1, -1), self.W2.expand(rows, -1, -1, -1))
        cache_op = self.op.func.__name__ in _CACHE_OPS
        if cache_op:  # keys and values in preallocated buffers, appended in place (a cache given as tuples is wrapped)
            memory = KVCache.empty() if memory is None else KVCache.wrap(memory, "state.memory")
        longest = int((cu[1:] - cu[:-1]).max()) if cu is not None else T
        mode = "recurrent" if longest == 1 else self.mode
        if mode == "chunk" and self.takes_chunk_size:
            kwargs["chunk_size"] = self.chunk_size
        if hasattr(self, "log_qk_scale"):
            kwargs["scale"] = self.log_qk_scale.exp()
        o, memory = self.op(q, k, v, **inputs, initial_state=memory, output_final_state=True, mode=mode, **kwargs)
        if cache_op and isinstance(memory, list):  # packed sequences' caches, one per row: one batched buffer
            memory = KVCache.stack(memory, checked=True)
        return o, memory

    def _check_input(self, x: Tensor) -> tuple[int, int]:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor [B, T, d_model], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, T, d_model = {self.d_model}], got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.is_meta or self.qkv.weight.is_meta:  # a layer made on the meta device (every parameter is)
            raise ValueError("the layer or x is on the meta device (shapes without values); the memory computes "
                             "and checks values: materialize the layer (to_empty, then load or initialize) first")
        if x.shape[1] == 0:
            raise ValueError(f"x holds no tokens (T = 0, shape {list(x.shape)}); call the layer with at least one")
        if x.shape[0] == 0:
            raise ValueError(f"x holds no rows (B = 0, shape {list(x.shape)}); call the layer with at least one")
        return x.shape[0], x.shape[1]

    @staticmethod
    def _check_mask(mask: Tensor, B: int, T: int, device: torch.device) -> Tensor:
        if not isinstance(mask, Tensor) or tuple(mask.shape) != (B, T):
            raise ValueError(f"attention_mask must be a tensor [B, T] = [{B}, {T}], got "
                             f"{list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"attention_mask must be bool or integer (1: token, 0: padding), got dtype {mask.dtype}")
        if mask.dtype != torch.bool:
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError(f"attention_mask must hold only 0 and 1, got values {mask.unique().tolist()[:8]}")
            mask = mask.bool()
        return mask.to(device)

    def _check_state(self, state: LayerState | None, rows: int, dtype: torch.dtype) -> LayerState:
        if state is None:
            return LayerState()
        if state.kind != self.kind:
            raise ValueError(f"state was made by a layer with memory {state.kind!r}; this layer's memory is "
                             f"{self.kind!r}")
        if state.batch_size != rows:
            raise ValueError(f"state holds {state.batch_size} rows (sequences), the input has {rows}; use "
                             "state.select(...) to pick rows")
        if state.dtype != dtype_name(dtype):
            raise ValueError(f"state was made for {state.dtype} inputs, x is {dtype}; use state.to(dtype=...)")
        if state.memory is not None and isinstance(state.memory, MiniBatchState) != isinstance(
                self.recipe.optimizer, MiniBatchGD):
            raise ValueError(f"state.memory is a {type(state.memory).__name__}, not what memory {self.kind!r} keeps")
        return state


def _token_shift(x: Tensor, last: Tensor | None, cu: Tensor | None) -> tuple[Tensor, Tensor]:
    """Each token's predecessor in its sequence, x_{t-1}, the first token's being the sequence's last token of the
    previous call (`last` [rows, d]) or zeros; and each row's (sequence's) last token now, for the next call."""
    if cu is None:
        first = x.new_zeros(x.shape[0], 1, x.shape[-1]) if last is None else last[:, None]
        return torch.cat([first, x[:, :-1]], dim=1), x[:, -1]
    starts, ends = cu[:-1], cu[1:]
    first = x.new_zeros(starts.numel(), x.shape[-1]) if last is None else last
    seen = ends > starts  # a sequence without tokens keeps what it had
    x_prev = F.pad(x, (0, 0, 1, 0))[:, :-1].index_put((torch.zeros_like(starts[seen]), starts[seen]), first[seen])
    return x_prev, torch.where(seen[:, None], x[0, (ends - 1).clamp_min(0)], first)


_CACHE_OPS = ("local_polynomial_attention", "kernel_regression")  # nonparametric: the state is a key/value cache
