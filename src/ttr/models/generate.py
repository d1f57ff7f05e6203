"""Generation without Hugging Face: prefill the prompts in chunk form, then one token at a time through the cache.

A batch of prompts of different lengths is left-padded (pad_prompts) and runs with its attention mask, so padding
never enters a memory and every row's next token sits in the last column. Greedy (temperature 0), or sampling
with temperature, top-k and top-p (nucleus); a torch.Generator makes sampling reproducible.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .._checks import is_int, is_number
from .lm import LanguageModel


def pad_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths -> (input_ids [B, T] left-padded with pad_token_id, attention_mask [B, T])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, longest - len(p):] = 1
    return ids, mask


def next_token(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] -> tokens [B]: the argmax at temperature 0, else a draw from softmax(logits / temperature)
    restricted to the top_k most likely tokens (tokens tied with the k-th stay, as in Hugging Face) and to the
    smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    # from the maximum down: the best token's logit is 0 however small the temperature (no inf - inf)
    logits = (logits.float() - logits.float().amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already hold top_p (the most likely one always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                    eos_token_id: int | list[int] | None, pad_token_id: int, vocab_size: int) -> None:
    if not is_int(max_new_tokens, 0):
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if not (is_number(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if top_p is not None and not (is_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    in_vocab = lambda t: is_int(t) and 0 <= t < vocab_size  # noqa: E731
    if not in_vocab(pad_token_id):
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab_size}), got {pad_token_id!r}")
    eos = [eos_token_id] if eos_token_id is None or is_int(eos_token_id) else eos_token_id
    if eos_token_id is not None and not (isinstance(eos, (list, tuple)) and eos and all(map(in_vocab, eos))):
        raise ValueError(f"eos_token_id must be None, a token id in [0, {vocab_size}) or a list of them, got "
                         f"{eos_token_id!r}")


@torch.no_grad()
def generate(model: LanguageModel, input_ids: Tensor, attention_mask: Tensor | None = None, *,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
             generator: torch.Generator | None = None) -> Tensor:
    """Continue input_ids [B, T] (left-padded, with its attention_mask, for prompts of different lengths) by up
    to max_new_tokens tokens. Returns [B, T + n]: the prompts and what each row generated; a row that produced
    eos_token_id (or one of a list of them) is padded with pad_token_id after it, and generation stops once
    every row has."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id, model.config.vocab_size)
    if attention_mask is not None and attention_mask.shape == input_ids.shape and not bool(
            attention_mask.bool()[:, -1].all()):
        raise ValueError("attention_mask has padding in the last column: pad prompts on the left (pad_prompts)")
    eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=input_ids.device).reshape(-1)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache()
        logits = model(input_ids, cache, attention_mask)[:, -1]
        out = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            token = next_token(logits, temperature, top_k, top_p, generator).masked_fill(done, pad_token_id)
            out.append(token[:, None])
            if eos is not None:
                done |= torch.isin(token, eos)
                if bool(done.all()):
                    break
            if i + 1 < max_new_tokens:
                logits = model(token[:, None], cache)[:, -1]
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)
