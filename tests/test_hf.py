"""The Hugging Face integration (ttr.models.hf): the config is LMConfig's, the model is LanguageModel (same
initialization, same logits), and transformers' generate, loss and save/load give what ttr's own do."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", minversion="5", reason="the hf extra is not installed: pip install 'ttr[hf]'")

from safetensors.torch import load_file, save_file  # noqa: E402  (after the skip)
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from ttr import get_preset  # noqa: E402
from ttr.models import LanguageModel, LMConfig, generate, pad_prompts  # noqa: E402
from ttr.models.hf import CACHE_FIELD, TTRCache, TTRConfig, TTRForCausalLM  # noqa: E402

V = 64
HYBRID = ("gated_deltanet", "softmax_attention")
# prompts of different lengths, left-padded with 0
PROMPTS = [[5, 6, 7, 8, 9], [9, 10], [3, 1, 4]]


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small only lose to thread synchronization (tenfold on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(memory=HYBRID, **kwargs) -> TTRForCausalLM:
    """A 2-layer model; init_std 0.5 so greedy decoding does not just repeat the last token."""
    kwargs = {"vocab_size": V, "d_model": 32, "n_layers": 2, "n_heads": 2, "memory": memory, "init_std": 0.5,
              "pad_token_id": 0} | kwargs
    torch.manual_seed(0)
    return TTRForCausalLM(TTRConfig(**kwargs)).eval()


def test_config_holds_lmconfig_fields_and_hf_names():
    cfg = TTRConfig(vocab_size=V, d_model=32, n_layers=2, memory=list(HYBRID), tie_word_embeddings=False,
                    eos_token_id=3)
    lm_cfg = cfg.to_lm_config()
    assert lm_cfg == LMConfig(vocab_size=V, d_model=32, n_layers=2, memory=HYBRID, tie_embeddings=False)
    assert {f.name for f in fields(LMConfig)} <= set(cfg.to_dict())
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (32, 2, 4)
    assert cfg.tie_word_embeddings is False and cfg.eos_token_id == 3 and cfg.use_cache
    again = AutoConfig.for_model("ttr", **{k: v for k, v in cfg.to_dict().items() if k != "model_type"})
    assert isinstance(again, TTRConfig) and again.to_lm_config() == lm_cfg and again.eos_token_id == 3
    assert TTRConfig(d_model=32) == TTRConfig(d_model=32) != TTRConfig(d_model=64)


@pytest.mark.parametrize("kwargs, message", [
    ({"memory": ["gated_deltanet", "nope"], "n_layers": 2}, "memory of layer 1: unknown preset 'nope'"),
    ({"d_model": 30, "n_heads": 4}, "n_heads = 4 does not divide d_model = 30"),
    ({"vocab_size": 0}, "vocab_size must be a positive int, got 0"),
    ({"tie_word_embeddings": False, "tie_embeddings": True}, "tie_word_embeddings = False contradicts"),
    ({"memory": get_preset("gla").recipe}, "memory holds a Recipe object, which does not save as data"),
])
def test_bad_config_raises_lmconfig_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TTRConfig(**kwargs)


def test_from_config_is_language_model_with_its_initialization():
    """AutoModelForCausalLM builds it; its weights are the ones LanguageModel draws from the same seed."""
    cfg = TTRConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, memory=HYBRID)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(cfg)
    torch.manual_seed(3)
    reference = LanguageModel(cfg.to_lm_config())
    assert type(model) is TTRForCausalLM and isinstance(model.model, LanguageModel)
    assert model.model.head.weight is model.model.embed.weight
    mine, theirs = model.model.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_loss_is_shifted_cross_entropy_of_language_model_logits():
    model = tiny()
    ids, mask = pad_prompts(PROMPTS)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    logits = model.model(ids, None, mask)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.equal(out.logits, logits) and out.logits.dtype == torch.float32
    assert torch.allclose(out.loss, expected, rtol=1e-6, atol=1e-6)
    loss, tuple_logits, _ = model(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert torch.equal(loss, out.loss) and torch.equal(tuple_logits, logits)
    out.loss.backward()  # trains: the gradient reaches the tied embedding through the head and the input
    assert model.model.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("memory", ["gated_deltanet", "gla", "mesanet", "softmax_attention", "ttt_linear", HYBRID],
                         ids=str)
def test_greedy_generate_equals_ttr_generate(memory):
    """Left-padded prompts of three lengths: the prefill takes the mask, then one token per step through the
    cache; transformers' greedy search gives ttr's tokens."""
    model = tiny(memory)
    ids, mask = pad_prompts(PROMPTS)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, generate(model.model, ids, mask, max_new_tokens=6))
    assert len(out[:, ids.shape[1]:].unique()) > 6  # a real continuation, not one token repeated


def test_rows_that_end_are_padded_as_ttr_generate_pads_them():
    model = tiny()
    ids, mask = pad_prompts(PROMPTS)
    eos = int(model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)[0, -1])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=eos)
    assert torch.equal(out, generate(model.model, ids, mask, max_new_tokens=6, eos_token_id=eos))
    assert int(out[0, -1]) == 0  # row 0 ended at its second token


def test_decode_steps_feed_one_token_and_no_cache_gives_the_same():
    model = tiny()
    ids, mask = pad_prompts(PROMPTS)
    widths = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    hook.remove()
    assert widths == [ids.shape[1], 1, 1, 1]
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False),
                       out)


def test_generate_continues_a_cache_it_was_given():
    """A TTRCache passed in is filled, and a second generate from it continues where the first stopped."""
    model = tiny()
    ids, mask = pad_prompts(PROMPTS)
    whole = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    cache = TTRCache(model.model.new_cache())
    # generate's name for it: cache since transformers 5.24, past_key_values before
    first = model.generate(ids, attention_mask=mask, **{CACHE_FIELD: cache}, max_new_tokens=3, do_sample=False)
    assert cache.get_seq_length() == first.shape[1] - 1  # the last token is not fed yet
    mask = torch.cat([mask, torch.ones_like(first[:, ids.shape[1]:])], dim=1)
    second = model.generate(first, attention_mask=mask, **{CACHE_FIELD: cache}, max_new_tokens=3, do_sample=False)
    assert torch.equal(second, whole)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = tiny()
    ids, mask = pad_prompts(PROMPTS)
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=1.5))
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0][:, :ids.shape[1]], ids)
    assert draws[0].shape == (3, ids.shape[1] + 6) and int(draws[0].min()) >= 0 and int(draws[0].max()) < V
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert not torch.equal(draws[0], greedy)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=1), greedy)


def reference_beam_search(lm: LanguageModel, prompt: list[int], num_beams: int, steps: int) -> tuple[list, float]:
    """Beam search without a cache: every step scores each beam's continuations by a full forward and keeps the
    num_beams best sums of log-probabilities (what transformers does when no sequence ends early)."""
    beams = [(list(prompt), 0.0)]
    for _ in range(steps):
        with torch.no_grad():
            logp = lm(torch.tensor([seq for seq, _ in beams]))[:, -1].double().log_softmax(-1)
        candidates = [(seq + [t], score + float(logp[i, t])) for i, (seq, score) in enumerate(beams) for t in range(V)]
        beams = sorted(candidates, key=lambda c: -c[1])[:num_beams]
    return beams[0]


def test_beam_search_reorders_the_cache():
    """num_beams 1 is greedy; num_beams 3 over left-padded prompts returns, per prompt, the best beam of a
    cache-free beam search, with its score the sum of log-probs a full forward gives the returned sequence."""
    model = tiny()
    ids, mask = pad_prompts(PROMPTS)
    steps = 4
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=steps, num_beams=1), greedy)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, num_beams=3, do_sample=False,
                         length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    T = ids.shape[1]
    logp = model.model(out.sequences, None, torch.cat([mask, torch.ones(3, steps, dtype=mask.dtype)], 1))
    logp = logp[:, T - 1:-1].double().log_softmax(-1).gather(-1, out.sequences[:, T:, None])[..., 0].sum(1)
    assert torch.allclose(out.sequences_scores.double(), logp, atol=1e-4)
    for row, prompt in enumerate(PROMPTS):
        best, score = reference_beam_search(model.model, prompt, num_beams=3, steps=steps)
        assert out.sequences[row, T - len(prompt):].tolist() == best
        assert abs(float(out.sequences_scores[row]) - score) < 1e-4
    assert not torch.equal(out.sequences, greedy)  # the beams found something greedy did not


def test_cache_rows_and_length():
    model = tiny()
    ids, mask = pad_prompts(PROMPTS)
    cache = model(ids, attention_mask=mask)[CACHE_FIELD]
    assert isinstance(cache, TTRCache) and len(cache) == 2 and cache.batch_size == 3
    assert cache.get_seq_length() == ids.shape[1] and cache.model_cache.seen.tolist() == [5, 2, 3]
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert cache.model_cache.seen.tolist() == [3, 5, 5]
    cache.batch_repeat_interleave(2)
    assert cache.model_cache.seen.tolist() == [3, 3, 5, 5, 5, 5]
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.model_cache.seen.tolist() == [3, 5]
    with pytest.raises(ValueError, match="cannot drop tokens"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="cache must be the TTRCache"):
        model(ids, cache=object())


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_round_trip(tmp_path, tied):
    model = tiny(tie_embeddings=tied)
    model.save_pretrained(tmp_path)
    assert {"model.safetensors", "config.json"} <= set(os.listdir(tmp_path))
    assert ("model.head.weight" in load_file(tmp_path / "model.safetensors")) is not tied
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is TTRForCausalLM and loaded.config.to_lm_config() == model.config.to_lm_config()
    assert (loaded.model.head.weight is loaded.model.embed.weight) is tied
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ids, mask = pad_prompts(PROMPTS)
    assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_weight_missing_from_a_checkpoint_gets_language_model_initialization(tmp_path):
    """What a checkpoint lacks is initialized as LanguageModel would (a norm's weight: ones); the rest loads."""
    model = tiny()
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = TTRForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.norm.weight, torch.ones(32))
    assert all(torch.equal(loaded.get_parameter(k), w) for k, w in weights.items())


def test_import_needs_transformers_and_ttr_models_does_not():
    """Without transformers, ttr.models imports and ttr.models.hf says in one line how to install it."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import ttr.models\n"
            "try:\n    import ttr.models.hf\nexcept ImportError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "pip install 'ttr[hf]'" in lines[0]
