"""Exactness of lookahead on more architectures than the core four, on tiny random models built from configs.

Each model of ``conftest.MORE_ARCHITECTURES`` (dense, mixture-of-experts, sliding-window and hybrid layers, scaled and
soft-capped heads) must decode like Hugging Face: greedy token for token, cold and with a warm trie whose drafts are
accepted and rejected; seeded sampling draw for draw; a batch of prompts row for row as each prompt alone. Settings
that cannot be made exact are refused with a clear error at construction.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    EOS_ID,
    FLAT_CURVE,
    MORE_ARCHITECTURES,
    VOCAB_SIZE,
    hf_greedy,
    make_generator,
    make_model,
    make_tokenizer,
    random_prompt,
    tiny_config,
)
from transformers import AutoModelForCausalLM

from lookahead import reference
from lookahead.engine import SUPPORTED_ARCHITECTURES, LookaheadGenerator
from lookahead.kvcache import SpareLayer
from lookahead.runner import LogitProcessing, ModelRunner

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = tuple(MORE_ARCHITECTURES)
N = 20  # new tokens per run


def prompts() -> list[list[int]]:
    """A random prompt, one that repeats itself (drafts from the prompt) and a short periodic one."""
    twice = random_prompt(31, 9)
    return [random_prompt(30, 14), twice + twice, random_prompt(32, 4) * 4]


def teach(gen: LookaheadGenerator, prompt: list[int], ref: list[int]) -> None:
    """Put the true continuation in the trie once and a wrong copy (changed in its middle) twice, so that drafts
    are both accepted and rejected."""
    wrong = list(ref)
    wrong[len(wrong) // 2] = wrong[len(wrong) // 2] % (VOCAB_SIZE - 1) + 1
    gen.trie.insert(prompt[-3:] + ref)
    gen.trie.insert(prompt[-3:] + wrong)
    gen.trie.insert(prompt[-3:] + wrong)


def test_every_tested_architecture_is_supported():
    assert {MORE_ARCHITECTURES[name][0] for name in NAMES} <= set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_hf(name):
    model, gen = make_model(name), make_generator(name)
    accepted = 0
    for prompt in prompts():
        ref = hf_greedy(model, prompt, N)
        assert gen.generate(prompt, max_new_tokens=N).token_ids == ref  # the trie knows the prompt only
        teach(gen, prompt, ref)
        warm = gen.generate(prompt, max_new_tokens=N)
        assert warm.token_ids == ref
        accepted += sum(warm.stats.accepted_lengths)
    assert accepted > 0  # drafts were verified and accepted


@pytest.mark.parametrize("name", NAMES)
def test_seeded_sampling_equals_hf(name):
    model, gen = make_model(name), make_generator(name)
    settings = [dict(temperature=1.0, top_k=0), dict(temperature=0.7, top_k=0, top_p=0.9)]
    for i, (prompt, params) in enumerate(zip(prompts()[1:], settings)):
        ref = reference.sample(model, prompt, N, seed=7 + i, eos_token_id=EOS_ID, pad_token_id=EOS_ID, **params)
        assert gen.generate(prompt, max_new_tokens=N, do_sample=True, seed=7 + i, **params).token_ids == ref
        teach(gen, prompt, ref)
        again = gen.generate(prompt, max_new_tokens=N, do_sample=True, seed=7 + i, **params)
        assert again.token_ids == ref  # warm trie: drafts of the sampled text are matched against fresh draws


@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_each_prompt_alone(name):
    model, gen = make_model(name), make_generator(name)
    batch = prompts()  # three prompt lengths: shorter rows carry stale cache positions
    refs = [hf_greedy(model, prompt, N) for prompt in batch]
    for prompt, ref in zip(batch, refs):
        teach(gen, prompt, ref)
    results = gen.generate(batch, max_new_tokens=N, batch_size=3)
    assert [r.token_ids for r in results] == refs
    alone = make_generator(name)
    for prompt, ref in zip(batch, refs):
        teach(alone, prompt, ref)
    assert [alone.generate(prompt, max_new_tokens=N).token_ids for prompt in batch] == refs
    assert sum(sum(r.stats.accepted_lengths) for r in results) > 0


@pytest.mark.parametrize("name", NAMES)
def test_runner_logits_are_the_models_own(name):
    """The head applies the model's own post-processing (scaling, soft-capping), greedy tokens included."""
    model = make_model(name)
    runner = ModelRunner(model)
    prompt = torch.tensor([random_prompt(40, 8)])
    with torch.inference_mode():
        expected = model(prompt).logits[0]  # [8, V]
        hidden = runner.decoder(prompt).last_hidden_state[0]  # [8, d]
        assert torch.allclose(runner.logits(hidden), expected, atol=1e-5)
        assert runner.greedy_tokens(hidden).tolist() == expected.argmax(-1).tolist()


def test_head_processing_is_read_from_the_config():
    assert LogitProcessing.of(make_model("granite").config) == LogitProcessing(divide=0.25)
    assert LogitProcessing.of(make_model("cohere").config) == LogitProcessing(multiply=4.0)
    assert LogitProcessing.of(make_model("gemma2").config) == LogitProcessing(softcap=3.0)
    assert LogitProcessing.of(make_model("gemma").config) == LogitProcessing()


@pytest.mark.parametrize("name", ["granite", "cohere", "gemma2", "gemma3_text"])
def test_a_head_processing_the_runner_misses_is_refused(name, monkeypatch):
    monkeypatch.setattr(LogitProcessing, "of", classmethod(lambda cls, config: cls()))
    with pytest.raises(ValueError, match="does not reproduce the logits"):
        make_generator(name)


@pytest.mark.parametrize("name", ["mistral_sliding", "qwen2_sliding", "gemma2", "gemma3_text"])
def test_sliding_window_layers_keep_every_position(name):
    """The cache of a sliding-window model is a plain growing cache (the mask applies the window), so compaction
    keeps every layer right."""
    gen = make_generator(name)
    cache = gen.runner.new_cache()
    gen.runner.prefill(cache, random_prompt(41, 20))
    assert all(type(layer) is SpareLayer for layer in cache.layers)  # a full growing layer (appends in place)
    assert {layer.keys.shape[-2] for layer in cache.layers} == {20}  # longer than the window of 6


def build(arch: str, attention: str = "sdpa", **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation=attention).eval()


@pytest.mark.parametrize(("arch", "overrides", "match"), [
    ("phi3", dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8,
                                       long_factor=[2.0] * 8, original_max_position_embeddings=128)),
     "RoPE type 'longrope' is not supported"),
    ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
     "RoPE type 'dynamic' is not supported"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "bidirectional attention is not causal"),
    ("llama", dict(sliding_window=16), "its modeling does not apply it"),
    ("qwen2", dict(sliding_window=0, use_sliding_window=True, max_window_layers=0), "positive integer"),
])
def test_inexact_settings_are_refused(arch, overrides, match):
    model = build(arch, **overrides)
    with pytest.raises(ValueError, match=match):
        LookaheadGenerator(model, make_tokenizer(), cost_curve=FLAT_CURVE)


@pytest.mark.parametrize("name", ["mistral_sliding", "gemma3_text", "qwen2_moe", "cohere"])
def test_eager_attention_equals_hf(name):
    model_type, variant, _ = MORE_ARCHITECTURES[name]
    model = build(model_type, "eager", **variant)
    gen = LookaheadGenerator(model, make_tokenizer(), cost_curve=FLAT_CURVE)
    prompt = prompts()[1]
    ref = hf_greedy(model, prompt, N)
    teach(gen, prompt, ref)
    result = gen.generate(prompt, max_new_tokens=N)
    assert result.token_ids == ref and sum(result.stats.accepted_lengths) > 0
