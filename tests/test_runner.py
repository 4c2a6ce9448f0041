"""Tests of lookahead.runner: the cache keyword, the dense single-row decision, and one pass shape per layout."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, random_prompt

from lookahead.runner import ModelRunner, RowLayout, cache_argument
from lookahead.tree import build_tree

pytestmark = pytest.mark.usefixtures("single_thread")


class OldDecoder(torch.nn.Module):
    def forward(self, input_ids, past_key_values=None, use_cache=False):  # transformers before `cache=`
        return input_ids


class NewDecoder(torch.nn.Module):
    def forward(self, input_ids, cache=None, use_cache=False, **kwargs):
        return input_ids


def test_cache_argument_follows_the_decoders_signature():
    assert cache_argument(OldDecoder()) == "past_key_values"
    assert cache_argument(NewDecoder()) == "cache"


@pytest.mark.parametrize("lengths, tree_start, dense", [
    ((5,), 5, True), ((4,), 5, False), ((5, 5), 5, False), ((5, 3), 5, False),
])
def test_row_layout_is_dense_for_one_row_without_stale_positions(lengths, tree_start, dense):
    assert RowLayout(lengths, tree_start).dense is dense


def test_dense_and_batched_paths_agree_on_one_row():
    """The dense fast path (single tree pass, crop/move) and the batched path (padded inputs with a stale cache
    position, per-row moves) give the same hidden states and the same compacted cache."""
    model = make_model("llama", seed=2)
    runner = ModelRunner(model)
    prompt = random_prompt(4, length=7)
    tree = build_tree([5, 6, 7, 8], [-1, 0, 0, 1])
    keep = [0, 1, 3]
    states, caches = [], []
    for stale in (0, 1):
        cache = runner.new_cache()
        with torch.inference_mode(), runner.kernels():
            runner.prefill(cache, prompt + [9] * stale)  # a stale position the batched mask must hide
            layout = RowLayout((len(prompt),), len(prompt) + stale)
            assert layout.dense is (stale == 0)
            hidden = runner.tree_pass(cache, [tree], layout)  # [1, 4, d]
            lengths = runner.compact(cache, layout, [keep])
        assert hidden.shape[:2] == (1, 4)
        assert lengths == [len(prompt) + len(keep)]
        states.append(hidden)
        caches.append([(layer.keys[..., :lengths[0], :].clone(), layer.values[..., :lengths[0], :].clone())
                       for layer in cache.layers])
    torch.testing.assert_close(states[0], states[1], rtol=1e-5, atol=1e-5)
    for (k0, v0), (k1, v1) in zip(*caches):
        torch.testing.assert_close(k0, k1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v0, v1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_step_where_no_row_drafts_takes_the_2d_mask_and_matches_each_row_alone(kind):
    """Rows of different lengths (stale positions in the shorter one), one token each: tree_pass takes the plain
    step (2-D padding mask), and each row's hidden state equals that row decoded alone."""
    model = make_model(kind, seed=3)
    runner = ModelRunner(model)
    prompts = [random_prompt(1, length=9), random_prompt(2, length=6)]
    trees = [build_tree([11], [-1]), build_tree([12], [-1])]
    calls = []
    plain_step = runner.plain_step
    runner.plain_step = lambda *args: calls.append(args) or plain_step(*args)
    cache = runner.new_cache()
    with torch.inference_mode(), runner.kernels():
        runner.prefill(cache, prompts[0])
        short = runner.new_cache()
        runner.prefill(short, prompts[1] + [7] * 3)  # 3 stale positions the mask must hide
        for layer, other in zip(cache.layers, short.layers):
            layer.keys = torch.cat([layer.keys, other.keys])
            layer.values = torch.cat([layer.values, other.values])
        hidden = runner.tree_pass(cache, trees, RowLayout((9, 6), 9))  # [2, 1, d]
    assert len(calls) == 1 and hidden.shape[:2] == (2, 1)
    for b, (prompt, tree) in enumerate(zip(prompts, trees)):
        alone = runner.new_cache()
        with torch.inference_mode(), runner.kernels():
            runner.prefill(alone, prompt)
            expected = runner.tree_pass(alone, [tree], RowLayout((len(prompt),), len(prompt)))  # dense
        torch.testing.assert_close(hidden[b], expected[0], rtol=1e-5, atol=1e-5)


def test_greedy_tokens_equal_the_argmax_of_the_logits():
    model = make_model("qwen2", seed=5)
    runner = ModelRunner(model)
    hidden = torch.randn(6, model.config.hidden_size)
    assert runner.greedy_tokens(hidden).tolist() == runner.logits(hidden).argmax(-1).tolist()
    assert runner.logits(hidden).shape == (6, model.config.vocab_size)


def test_a_model_spread_over_several_devices_is_refused_at_construction():
    model = make_model("llama", seed=2)
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0": 0, "lm_head": 1}
    try:
        with pytest.raises(ValueError, match="one device"):
            ModelRunner(model)
    finally:
        del model.hf_device_map
