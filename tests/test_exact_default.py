"""Exactness on the real embedded default model (SmolLM2-135M-Instruct, float32): lookahead == HF greedy generate.

Every case of the shipped RAG QA, summarization and open-ended files is checked, then the RAG cases again with the
trie warm from the first pass (long accepted drafts), then a few with a fixed, large draft tree.
"""

from __future__ import annotations

import pytest
import torch

from lookahead.bench.cases import load_cases
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.models import load_model
from lookahead.prompts import case_messages
from lookahead.reference import greedy as hf_greedy

pytestmark = pytest.mark.slow

ALL_CASES = load_cases("rag_qa") + load_cases("summarize") + load_cases("open")
_reference: dict[str, list[int]] = {}


@pytest.fixture(scope="module")
def default_model():
    model, tokenizer = load_model("default", dtype="float32", device="cpu")
    assert model.dtype == torch.float32
    return model, tokenizer


@pytest.fixture(scope="module")
def generator(default_model):
    model, tokenizer = default_model
    return LookaheadGenerator(model, tokenizer)


def reference(model, generator, case) -> tuple[list[int], list[int]]:
    ids = generator.encode(case_messages(case))
    if case["id"] not in _reference:
        _reference[case["id"]] = hf_greedy(model, ids, case["max_new_tokens"],
                                           eos_token_id=model.generation_config.eos_token_id)
    return ids, _reference[case["id"]]


@pytest.mark.parametrize("case", ALL_CASES, ids=[c["id"] for c in ALL_CASES])
def test_lookahead_equals_greedy(default_model, generator, case):
    model, _ = default_model
    ids, expected = reference(model, generator, case)
    result = generator.generate(ids, max_new_tokens=case["max_new_tokens"])
    assert result.token_ids == expected
    assert result.stats.new_tokens == len(expected)


RAG = [c for c in ALL_CASES if c["task"] == "rag_qa"]


@pytest.mark.parametrize("case", RAG, ids=[c["id"] for c in RAG])
def test_second_round_warm_trie_equals_greedy(default_model, generator, case):
    """The trie has learned every earlier output: drafts are long and mostly accepted."""
    model, _ = default_model
    ids, expected = reference(model, generator, case)
    result = generator.generate(ids, max_new_tokens=case["max_new_tokens"])
    assert result.token_ids == expected
    assert sum(result.stats.accepted_lengths) > 0  # the warm trie must actually draft and be accepted


@pytest.mark.parametrize("case", RAG[:4], ids=[c["id"] for c in RAG[:4]])
def test_fixed_large_tree_equals_greedy(default_model, generator, case):
    model, tokenizer = default_model
    fixed = LookaheadGenerator(model, tokenizer, LookaheadConfig(adaptive=False, decoding_length=64),
                               trie=generator.trie)
    ids, expected = reference(model, generator, case)
    result = fixed.generate(ids, max_new_tokens=case["max_new_tokens"])
    assert result.token_ids == expected
    assert max(result.stats.draft_sizes) > 8


def test_streaming_text_matches_generate(default_model, generator):
    case = RAG[0]
    ids = generator.encode(case_messages(case))
    chunks = list(generator.stream(ids, max_new_tokens=40))
    whole = generator.generate(ids, max_new_tokens=40)
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason


def test_stop_string_matches_hf(default_model, generator):
    model, tokenizer = default_model
    case = RAG[1]
    ids, expected = reference(model, generator, case)
    text = tokenizer.decode(expected, skip_special_tokens=True)
    words = text.split()
    stop = words[len(words) // 2]  # a word from the middle of the greedy answer
    result = generator.generate(ids, max_new_tokens=case["max_new_tokens"], stop=[stop])
    out = hf_greedy(model, ids, case["max_new_tokens"], stop_strings=[stop], tokenizer=tokenizer,
                           pad_token_id=model.generation_config.eos_token_id)
    assert result.token_ids == out
    assert result.finish_reason == "stop"
    assert stop not in result.text and text.startswith(result.text)
