"""The language model as a Hugging Face model (the optional extra: pip install 'ttr[hf]', transformers 5).

    TTRConfig        a PreTrainedConfig whose fields are LMConfig's (model_type "ttr"), with the usual token ids
    TTRForCausalLM   LanguageModel behind PreTrainedModel and GenerationMixin: loss from labels, .generate()
                     (greedy, sampling, beam search, left-padded prompts), save_pretrained / from_pretrained
    TTRCache         a transformers Cache carrying every layer's LayerState (a ModelCache)

Importing this module registers "ttr" with AutoConfig and AutoModelForCausalLM, so
AutoModelForCausalLM.from_config(TTRConfig(...)) and AutoModelForCausalLM.from_pretrained(folder) work.

The cache is a recurrent state, not keys and values to append to: generate is told not to build its DynamicCache,
the first forward (the prefill, with the prompts' attention mask) creates a TTRCache, and later steps feed only
the new tokens. Beam search reorders the cache's rows; a state cannot be cropped back to an earlier length.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

try:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import can_return_tuple
except ImportError as error:  # one line: the cause's first line only (transformers' own checks run to several)
    cause = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise ImportError(f"ttr.models.hf needs Hugging Face transformers 5 ({cause}): pip install 'ttr[hf]'") from None
if int(transformers.__version__.split(".")[0]) != 5:
    raise ImportError(f"ttr.models.hf needs transformers 5, found {transformers.__version__}: pip install 'ttr[hf]'")

from .lm import LanguageModel, LMConfig, ModelCache, _describe

LM_FIELDS = tuple(f.name for f in fields(LMConfig))
# transformers 5.24 renamed the cache argument and output past_key_values -> cache: both are served (the tests
# pass under 5.0, 5.23 and 5.24)
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


class TTRConfig(PreTrainedConfig):
    """LMConfig's fields (names, defaults and checks are LMConfig's: a bad value raises its ValueError), plus
    Hugging Face's bos/eos/pad_token_id and use_cache. tie_word_embeddings is another name for tie_embeddings,
    as hidden_size, num_hidden_layers and num_attention_heads are for d_model, n_layers and n_heads. A config is
    JSON data, so each layer's memory is a preset name (an LMConfig may hold Recipe objects, this cannot)."""

    model_type = "ttr"
    # every field lives in __dict__, none is a dataclass field: compare those (the dataclass __eq__ sees none)
    __eq__ = PreTrainedConfig.__eq__
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "tie_word_embeddings": "tie_embeddings"}

    def __init__(self, *, bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, use_cache: bool = True, **kwargs: Any) -> None:
        lm_kwargs = {name: kwargs.pop(name) for name in LM_FIELDS if name in kwargs}
        if "tie_word_embeddings" in kwargs:
            tie = kwargs.pop("tie_word_embeddings")
            if lm_kwargs.setdefault("tie_embeddings", tie) != tie:
                raise ValueError(f"tie_word_embeddings = {tie!r} contradicts tie_embeddings = "
                                 f"{lm_kwargs['tie_embeddings']!r} (two names of one setting)")
        for name, value in LMConfig(**lm_kwargs).to_dict().items():  # LMConfig checks every value
            setattr(self, name, value)
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.use_cache = use_cache
        super().__init__(**kwargs)

    def to_lm_config(self) -> LMConfig:
        """The LMConfig these fields make (checked again: an attribute may have been set since)."""
        return LMConfig.from_dict({name: getattr(self, name) for name in LM_FIELDS})


class TTRCache(Cache):
    """Every layer's LayerState, as a transformers Cache: `model_cache` (a ModelCache) and `length`, the columns
    of input fed so far (left padding included: what generate slices its inputs by). TTRForCausalLM creates one
    when called with use_cache; TTRCache(model.model.new_cache()) is an empty one to pass to generate. Beam
    search reorders the rows in place; rows can be repeated or selected; a recurrent state cannot drop tokens
    (crop)."""

    def __init__(self, model_cache: ModelCache) -> None:
        if not isinstance(model_cache, ModelCache):
            raise ValueError(f"model_cache must be a ModelCache (LanguageModel.new_cache()), got "
                             f"{type(model_cache).__name__}")
        super().__init__(layers=[])  # the states are the ModelCache's, not key/value layers
        self.model_cache = model_cache
        self.length = 0

    def __len__(self) -> int:
        return len(self.model_cache.states)

    def __repr__(self) -> str:
        return f"TTRCache({len(self)} layers, {self.batch_size} rows, {self.length} columns seen)"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no maximum: a memory's state has the same size at any length

    @property
    def batch_size(self) -> int:
        seen = self.model_cache.seen
        return -1 if seen is None else seen.shape[0]

    # generate slices its inputs by get_seq_length only where some layer is not "linear" (Mamba's cache layers,
    # which keep no length); this cache counts the columns it has seen
    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.model_cache = self.model_cache.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.batch_size > 0:  # an empty cache has no rows to repeat
            self.model_cache = self.model_cache.select(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        self.model_cache = self.model_cache.select(indices)

    def reset(self) -> None:
        self.model_cache = ModelCache([None] * len(self))
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(f"a TTRCache holds recurrent states, which cannot drop tokens: crop({tokens_to_remove}) "
                             "is impossible (assisted generation and rollbacks need a key/value cache)")


class TTRForCausalLM(PreTrainedModel, GenerationMixin):
    """A LanguageModel (`.model`) as a Hugging Face causal LM. forward(input_ids [B, T], attention_mask=None,
    cache=None, labels=None, use_cache=None) -> CausalLMOutputWithPast: logits [B, T, V] (float32), the loss
    when labels are given (next-token cross-entropy, labels shifted inside, -100 ignored), and the TTRCache
    (created when use_cache and none is passed; updated in place; past_key_values is its name before
    transformers 5.24). attention_mask is [B, T], or [B, P + T] with the P columns the cache has already seen
    (Hugging Face's convention): its last T columns are used, so decode steps see only their new tokens."""

    config_class = TTRConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    # transformers 5 ties by name, target: source; only when config.tie_word_embeddings (= tie_embeddings)
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}
    _is_stateful = True  # generate refuses assisted decoding, which rolls a cache back

    def __init__(self, config: TTRConfig) -> None:
        super().__init__(config)
        self.model = LanguageModel(config.to_lm_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build a key/value DynamicCache: the first forward creates a TTRCache

    def init_weights(self) -> None:
        # LanguageModel's constructor has initialized every weight (the field's scheme, each gate its published
        # one): drawing them again would only change them; the tie is all that is left to do
        self.tie_weights(recompute_mapping=False)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """LanguageModel's initialization for every weight not loaded (those from_pretrained found no value for,
        or all of them when called by hand): drawn by a fresh LanguageModel, so there is one initialization.
        transformers flags what it loaded with _is_hf_initialized."""
        missing = [name for name, p in self.model.named_parameters() if not getattr(p, "_is_hf_initialized", False)]
        if missing:
            fresh = LanguageModel(self.model.config)
            for name in missing:
                self.model.get_parameter(name).copy_(fresh.get_parameter(name))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.head = value

    @can_return_tuple
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: TTRCache | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, past_key_values: TTRCache | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        if past_key_values is not None:  # the name transformers before 5.24 passes the cache by
            if cache is not None and cache is not past_key_values:
                raise ValueError("cache and past_key_values (its older name) are two different caches: pass one")
            cache = past_key_values
        for name in ("inputs_embeds", "output_attentions", "output_hidden_states"):
            if kwargs.pop(name, None):
                raise ValueError(f"{name} is not supported by TTRForCausalLM (it reads token ids and returns logits)")
        if cache is not None and not isinstance(cache, TTRCache):
            raise ValueError(f"cache must be the TTRCache a previous call returned, got {type(cache).__name__}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = TTRCache(self.model.new_cache())
        if attention_mask is not None and isinstance(input_ids, Tensor) and input_ids.dim() == 2:
            T = input_ids.shape[1]
            if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be [B, T] or [B, P + T] (P: the columns the cache has seen), "
                                 f"got {_describe(attention_mask)} for input_ids of shape {list(input_ids.shape)}")
            attention_mask = attention_mask[:, -T:]
        logits = self.model(input_ids, None if cache is None else cache.model_cache, attention_mask)
        if cache is not None:
            cache.length += input_ids.shape[1]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})


AutoConfig.register(TTRConfig.model_type, TTRConfig, exist_ok=True)
AutoModelForCausalLM.register(TTRConfig, TTRForCausalLM, exist_ok=True)

__all__ = ["TTRCache", "TTRConfig", "TTRForCausalLM"]
