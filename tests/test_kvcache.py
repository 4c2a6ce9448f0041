"""Tests for lookahead.kvcache on real DynamicCaches filled by a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, random_prompt, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, StaticCache

from lookahead.kvcache import SpareLayer, cache_length, check_compactable, compact_cache, crop, select_rows, spare_cache
from lookahead.runner import cache_argument, full_cache
from lookahead.tree import attention_mask, build_tree, position_ids

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = random_prompt(3, length=9)
# root -> 1 -> 2 -> 4 -> 6 ; root -> 3 -> 5 ; 1 -> 7
TREE_TOKENS = [11, 40, 41, 50, 42, 51, 43, 60]
TREE_PARENTS = [-1, 0, 1, 0, 2, 3, 4, 1]


def with_cache(model, cache: DynamicCache) -> dict[str, DynamicCache]:
    """The cache keyword the installed transformers accepts (no deprecation warning)."""
    return {cache_argument(model): cache}


def filled_cache(model) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill PROMPT, then run TREE as one tree-masked pass; returns the cache and the tree pass logits [n, vocab]."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([PROMPT]), **with_cache(model, cache), use_cache=True)
        tree = build_tree(TREE_TOKENS, TREE_PARENTS)
        out = model(input_ids=tree.input_ids[None], position_ids=position_ids(tree, len(PROMPT)),
                    attention_mask=attention_mask(tree, len(PROMPT)), **with_cache(model, cache), use_cache=True)
    return cache, out.logits[0]


def causal_cache(model, tokens: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """The cache and logits of plain causal decoding of ``tokens``."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([tokens]), **with_cache(model, cache), use_cache=True)
    return cache, out.logits[0]


def snapshot(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


@pytest.mark.parametrize(
    "keep",
    [
        [0],  # nothing accepted: crop to the root
        [0, 1, 2],  # a contiguous path: crop
        [0, 1, 2, 4, 6],  # the deepest branch: node 3 lies between 2 and 4 -> gather
        [0, 3, 5],  # the second branch: gather
        [0, 1, 7],  # a late sibling: gather
    ],
)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compact_equals_selected_slices_and_causal_run(arch, keep):
    model = make_model(arch, 0)
    cache, tree_logits = filled_cache(model)
    prefix = len(PROMPT)
    before = snapshot(cache)
    assert cache.get_seq_length() == prefix + len(TREE_TOKENS)

    with torch.inference_mode():  # as in the engine: the cache holds inference tensors
        compact_cache(cache, prefix, keep)

    assert cache.get_seq_length() == prefix + len(keep)
    index = torch.tensor(list(range(prefix)) + [prefix + k for k in keep])
    for (keys, values), layer in zip(before, cache.layers):
        assert torch.equal(layer.keys, keys.index_select(-2, index))
        assert torch.equal(layer.values, values.index_select(-2, index))

    # the kept nodes form a root-to-node path, so the compacted cache is the one plain decoding of that path builds
    path_tokens = [TREE_TOKENS[k] for k in keep]
    reference, ref_logits = causal_cache(model, PROMPT + path_tokens)
    for layer, ref in zip(cache.layers, reference.layers):
        torch.testing.assert_close(layer.keys, ref.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.values, ref.values, rtol=1e-4, atol=1e-5)
    # and the tree pass predicted, at each kept node, what causal decoding predicts there
    torch.testing.assert_close(tree_logits[keep], ref_logits[prefix:], rtol=1e-4, atol=1e-5)

    # decoding continues correctly on the compacted cache
    nxt = 123
    with torch.inference_mode():
        cont = model(input_ids=torch.tensor([[nxt]]), **with_cache(model, cache), use_cache=True,
                     position_ids=torch.tensor([[prefix + len(keep)]])).logits[0, -1]
    _, full_logits = causal_cache(model, PROMPT + path_tokens + [nxt])
    torch.testing.assert_close(cont, full_logits[-1], rtol=1e-4, atol=1e-5)


def test_compact_contiguous_keep_is_a_crop_without_copy():
    model = make_model("llama", 0)
    cache, _ = filled_cache(model)
    prefix = len(PROMPT)
    storage = [layer.keys.untyped_storage().data_ptr() for layer in cache.layers]
    with torch.inference_mode():
        compact_cache(cache, prefix, [0, 1, 2])
    assert [layer.keys.untyped_storage().data_ptr() for layer in cache.layers] == storage
    assert all(layer.keys.shape[-2] == prefix + 3 for layer in cache.layers)


def test_compact_gather_keeps_given_order():
    """``keep`` is honoured in the order given, even when it is not increasing."""
    model = make_model("llama", 0)
    cache, _ = filled_cache(model)
    prefix = len(PROMPT)
    before = snapshot(cache)
    with torch.inference_mode():
        compact_cache(cache, prefix, [5, 0, 3])
    for (keys, values), layer in zip(before, cache.layers):
        assert torch.equal(layer.keys[..., :prefix, :], keys[..., :prefix, :])
        for slot, node in enumerate([5, 0, 3]):
            assert torch.equal(layer.keys[..., prefix + slot, :], keys[..., prefix + node, :])
            assert torch.equal(layer.values[..., prefix + slot, :], values[..., prefix + node, :])


def test_check_compactable_accepts_full_attention_dynamic_cache():
    model = make_model("llama", 0)
    check_compactable(DynamicCache(config=model.config))
    cache, _ = filled_cache(model)
    check_compactable(cache)


@pytest.mark.parametrize("bad", [object(), None, [], {"keys": 1}])
def test_check_compactable_rejects_non_dynamic_cache(bad):
    with pytest.raises(TypeError, match="DynamicCache"):
        check_compactable(bad)


def test_check_compactable_rejects_static_cache():
    cache = StaticCache(config=tiny_config("llama"), max_cache_len=32)
    with pytest.raises(TypeError, match="StaticCache"):
        check_compactable(cache)


def test_check_compactable_rejects_sliding_window_layers():
    cache = DynamicCache(config=tiny_config("mistral", sliding_window=16))
    assert any(type(layer).__name__ == "DynamicSlidingWindowLayer" for layer in cache.layers)
    with pytest.raises(TypeError, match="layer 0 is a DynamicSlidingWindowLayer"):
        check_compactable(cache)


# ---------------------------------------------------------------------------------------------- SpareLayer

def _states(seed: int, n: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 2, n, 4, generator=torch.Generator().manual_seed(seed))  # [batch, heads, n, dim]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("add"), st.integers(1, 40)), st.tuples(st.just("crop"), st.integers(0, 80)),
                          st.tuples(st.just("compact"), st.integers(0, 3)), st.tuples(st.just("rows"), st.just(0))),
                min_size=1, max_size=25))
def test_a_spare_layer_holds_what_a_dynamic_layer_holds(ops):
    """Any run of appends, crops, compactions and replaced rows: a spare layer returns and holds the same keys and
    values as transformers' DynamicLayer (it only writes in place where that one concatenates)."""
    plain, spare = DynamicCache(), spare_cache(DynamicCache())
    with torch.inference_mode():
        for step, (kind, arg) in enumerate(ops):
            if kind == "add":
                keys, values = _states(step, arg), _states(1000 + step, arg)
                got = [cache.update(keys, values, 0) for cache in (plain, spare)]
                torch.testing.assert_close(got[0], got[1], rtol=0, atol=0)
            elif not plain.layers:
                continue
            elif kind == "crop":
                crop(plain, arg)
                crop(spare, arg)
            elif kind == "compact":
                held = cache_length(plain)
                keep = list(range(max(0, held - 4), held))[: arg + 1][::-1]  # reversed: a gather, not a crop
                prefix = max(0, held - 4)
                compact_cache(plain, prefix, [k - prefix for k in keep])
                compact_cache(spare, prefix, [k - prefix for k in keep])
            else:  # the layer gets tensors of its own (rows appended or selected): the next update moves it
                select_rows(plain, [0], cache_length(plain))
                select_rows(spare, [0], cache_length(spare))
            assert type(spare.layers[0]) is SpareLayer
            torch.testing.assert_close(spare.layers[0].keys, plain.layers[0].keys, rtol=0, atol=0)
            torch.testing.assert_close(spare.layers[0].values, plain.layers[0].values, rtol=0, atol=0)


def test_a_spare_layer_appends_in_place_and_keeps_its_room_across_crops():
    cache = spare_cache(DynamicCache())
    with torch.inference_mode():
        cache.update(_states(0, 100), _states(1, 100), 0)
        layer = cache.layers[0]
        buffer = layer.key_buffer.data_ptr()
        for step in range(20):
            cache.update(_states(2 + step, 2), _states(40 + step, 2), 0)
            crop(cache, cache_length(cache) - 1)  # a rejected draft token
        assert layer.key_buffer.data_ptr() == buffer  # never copied: the room was enough
        assert layer.keys.data_ptr() == buffer and layer.keys.shape == (1, 2, 120, 4)


def test_new_caches_of_a_runner_are_spare():
    model = make_model("llama")
    cache = full_cache(model.config)
    check_compactable(cache)
    assert all(type(layer) is SpareLayer for layer in cache.layers)
