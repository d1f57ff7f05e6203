"""Models built of TTR layers: a decoder-only language model, its cache and generation (the Hugging Face
wrapper, an optional extra, is ttr.models.hf)."""

from .generate import generate, next_token, pad_prompts
from .lm import LanguageModel, LMConfig, ModelCache

__all__ = ["LMConfig", "LanguageModel", "ModelCache", "generate", "next_token", "pad_prompts"]
