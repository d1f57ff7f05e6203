"""A decoder-only language model of TTR layers.

    x = embed(tokens);  for each block:  x = x + layer(norm(x)),  x = x + swiglu(norm(x));  logits = head(norm(x))

Any preset or Recipe per layer, so hybrids are a list (softmax attention every 4th layer, say). The field's
initialization: every linear and embedding weight normal(0, 0.02), the projections that write into the residual
stream (each layer's output, each MLP's down projection) normal(0, 0.02 / sqrt(2 n_layers)) (GPT-2). No
positional embedding: each layer's short convolution tells a token its neighbours, and the memories are causal.

One cache carries every layer's LayerState (its memory, its convolution's last inputs, its key/value cache for
attention layers): prefill in chunk form, then one token at a time in recurrent form (ttr.models.generate).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_ints, is_int, is_number
from ..layers import LayerState, TTRLayer
from ..ops import MiniBatchState
from ..layers.gates import DT_RANGE
from ..recipe import PRESETS, Recipe

Memory = str | Recipe


def _swiglu_width(d_model: int) -> int:
    """LLaMA's SwiGLU width: 8/3 d_model (the parameters of a 4 d_model GELU MLP), rounded up to a multiple of 16."""
    return 16 * math.ceil(8 * d_model / 3 / 16)


@dataclass
class LMConfig:
    """What a LanguageModel is made of. `memory` is one preset name (or Recipe) for every layer, or one per layer;
    mlp_width None is SwiGLU's 8/3 d_model, 0 drops the MLPs. Everything but Recipe objects is plain data, so the
    config saves as JSON (and is the Hugging Face config's content: ttr.models.hf)."""

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    memory: Memory | tuple[Memory, ...] | list[Memory] = "gated_deltanet"
    head_dim: int | None = None
    num_kv_heads: int | None = None
    expand_v: float = 1.0
    conv_size: int = 4
    mlp_width: int | None = None
    tie_embeddings: bool = True
    chunk_size: int = 64
    dt_range: tuple[float, float] = DT_RANGE
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check_positive_ints(self, ("vocab_size", "d_model", "n_layers", "n_heads", "chunk_size"))
        for name in ("head_dim", "num_kv_heads"):
            if getattr(self, name) is not None and not is_int(getattr(self, name), 1):
                raise ValueError(f"{name} must be None or a positive int, got {getattr(self, name)!r}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"n_heads = {self.n_heads} does not divide d_model = {self.d_model}; pass head_dim")
        if self.mlp_width is not None and not is_int(self.mlp_width, 0):
            raise ValueError(f"mlp_width must be None (8/3 d_model), 0 (no MLP) or a positive int, got "
                             f"{self.mlp_width!r}")
        if not is_int(self.conv_size, 0):
            raise ValueError(f"conv_size must be an int >= 0 (0: no short convolution), got {self.conv_size!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        for name in ("norm_eps", "init_std", "expand_v"):
            value = getattr(self, name)
            if not (is_number(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not (isinstance(self.dt_range, (tuple, list)) and len(self.dt_range) == 2):
            raise ValueError(f"dt_range must be a pair (dt_min, dt_max), got {self.dt_range!r}")
        self.dt_range = tuple(self.dt_range)
        if isinstance(self.memory, list):
            self.memory = tuple(self.memory)
        self.layer_memories()  # checks the memories

    def layer_memories(self) -> list[Memory]:
        """The memory of each layer."""
        memories = list(self.memory) if isinstance(self.memory, tuple) else [self.memory] * self.n_layers
        if len(memories) != self.n_layers:
            raise ValueError(f"memory lists {len(memories)} layers, n_layers is {self.n_layers}")
        for i, m in enumerate(memories):
            if isinstance(m, str) and m not in PRESETS:
                raise ValueError(f"memory of layer {i}: unknown preset {m!r}; known: {', '.join(PRESETS)}")
            if not isinstance(m, (str, Recipe)):
                raise ValueError(f"memory of layer {i} must be a preset name or a Recipe, got {type(m).__name__}")
            if not (PRESETS[m].recipe if isinstance(m, str) else m).causal:
                raise ValueError(f"memory of layer {i}: {m if isinstance(m, str) else m.describe()!r} reads the whole "
                                 "sequence (an encoder): a language model predicting the next token must not see it")
        return memories

    @property
    def mlp_hidden(self) -> int:
        return _swiglu_width(self.d_model) if self.mlp_width is None else self.mlp_width

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data; a ValueError if a layer's memory is a Recipe (save it by preset name)."""
        if any(isinstance(m, Recipe) for m in self.layer_memories()):
            raise ValueError("memory holds a Recipe object, which does not save as data: use preset names")
        out = asdict(self)
        out["memory"] = list(self.memory) if isinstance(self.memory, tuple) else self.memory
        out["dt_range"] = list(self.dt_range)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LMConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer, 2020)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, memory: Memory, layer_idx: int = 0) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        # the layer's depth: HGRN-2's forget gates get lower bounds that grow with it
        self.layer = TTRLayer(cfg.d_model, cfg.n_heads, memory, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
                              expand_v=cfg.expand_v, conv_size=cfg.conv_size, chunk_size=cfg.chunk_size,
                              dt_range=cfg.dt_range, layer_idx=layer_idx, n_layers=cfg.n_layers)
        if cfg.mlp_hidden:
            self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: Tensor, state: LayerState | None, attention_mask: Tensor | None) -> tuple[Tensor, LayerState]:
        y, state = self.layer(self.norm(x), state, attention_mask=attention_mask)
        x = x + y
        if hasattr(self, "mlp"):
            x = x + self.mlp(self.mlp_norm(x))
        return x, state


@dataclass
class ModelCache:
    """Every layer's LayerState (None before the first call). A model called with a cache reads and replaces
    them in place. Rows can be selected or reordered (beam search), moved and detached as one."""

    states: list[LayerState | None] = field(default_factory=list)

    @property
    def seen(self) -> Tensor | None:
        """The real tokens each row has seen, [B] (None before the first call)."""
        first = self.states[0] if self.states else None
        return None if first is None else first.lengths

    def select(self, index: Tensor | list[int] | list[bool]) -> ModelCache:
        return ModelCache([None if s is None else s.select(index) for s in self.states])

    def reorder(self, beam_idx: Tensor) -> ModelCache:
        return self.select(beam_idx)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModelCache:
        return ModelCache([None if s is None else s.to(device, dtype) for s in self.states])

    def detach(self) -> ModelCache:
        return ModelCache([None if s is None else s.detach() for s in self.states])


class LanguageModel(nn.Module):
    """forward(input_ids [B, T], cache=None, attention_mask=None) -> logits [B, T, vocab_size] (float32 where the
    model runs in a lower precision). With a ModelCache the call continues the sequences it holds and updates it;
    attention_mask [B, T] (1: token, 0: padding, left padding for a batch of prompts) keeps padding out of every
    memory."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        if not isinstance(config, LMConfig):
            raise ValueError(f"config must be an LMConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, m, i) for i, m in enumerate(config.layer_memories()))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The field's initialization (module docstring); gate constants keep their published initialization."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
        for block in self.blocks:
            residual_writers = [block.layer.out] + ([block.mlp.down] if hasattr(block, "mlp") else [])
            for module in residual_writers:
                nn.init.normal_(module.weight, std=std / math.sqrt(2 * self.config.n_layers))
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    def num_parameters(self, *, embeddings: bool = True) -> int:
        """Parameters, each shared tensor counted once; embeddings=False leaves out the embedding (and the head
        when it is tied to it)."""
        unique = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in unique.values())
        return total if embeddings else total - self.embed.weight.numel()

    def state_floats(self, seq_len: int, layer: int = 0) -> int:
        """Floats in a layer's memory state after seq_len tokens (its convolution's cache excluded): the x axis of
        the recall-memory trade-off. A cache of keys and values grows with seq_len."""
        block = self.blocks[layer]
        with torch.no_grad():
            _, state = block.layer(torch.zeros(1, seq_len, self.config.d_model, device=self.embed.weight.device))
        return sum(t.numel() for t in _tensors(state.memory))

    def new_cache(self) -> ModelCache:
        return ModelCache([None] * len(self.blocks))

    def forward(self, input_ids: Tensor, cache: ModelCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be an integer tensor [B, T], got "
                             f"{_describe(input_ids)}")
        if input_ids.numel():  # one pass over the ids, one read back (every decoding step comes here)
            low, high = (int(x) for x in torch.aminmax(input_ids))
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, vocab_size = {self.config.vocab_size}), got values in "
                                 f"[{low}, {high}]")
        if cache is not None and (not isinstance(cache, ModelCache) or len(cache.states) != len(self.blocks)):
            raise ValueError(f"cache must be the ModelCache of this model's {len(self.blocks)} layers "
                             "(model.new_cache()), got " + _describe(cache))
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x, state = block(x, None if cache is None else cache.states[i], attention_mask)
            if cache is not None:
                cache.states[i] = state
        return self.head(self.norm(x)).float()


def _tensors(x: object) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, MiniBatchState):  # the weights and the mini-batch's starting weights
        return _tensors(x.weights) + _tensors(x.start)
    return []


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    if isinstance(x, ModelCache):
        return f"a ModelCache of {len(x.states)} layers"
    return type(x).__name__
