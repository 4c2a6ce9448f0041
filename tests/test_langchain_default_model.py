"""The LangChain path on the real default model (SmolLM2-135M-Instruct, float32 CPU): text identical to the engine
and to plain greedy decoding, the time the LangChain layer adds (issue 3: at most 3%), and the RAG chain over the
example folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FLAT_CURVE
from langchain_lookahead import ChatLookahead, LookaheadStatsHandler
from langchain_lookahead.overhead import measure_overhead
from langchain_lookahead.rag import build_index, load_folder, rag_chain

from lookahead.bench.cases import load_cases
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.models import load_model
from lookahead.prompts import case_messages

pytestmark = pytest.mark.slow
DOCS = Path(__file__).resolve().parents[1] / "examples" / "docs"


@pytest.fixture(scope="module")
def default_model():
    return load_model("default", dtype="float32", device="cpu")


def test_langchain_adds_under_3_percent(default_model):
    model, tokenizer = default_model
    generator = LookaheadGenerator(model, tokenizer, LookaheadConfig(learn_outputs=False))
    prompts = [case_messages(c) for c in load_cases("rag_qa", limit=2)]
    result = measure_overhead(generator, prompts, max_new_tokens=32, rounds=1)
    assert result.identical, result.mismatches
    assert result.added_overhead < 0.03, result.format()


def test_rag_chain_answers_like_plain_greedy(default_model):
    model, tokenizer = default_model
    # a flat cost curve: how much is drafted depends on the trie, not on this machine's measured pass costs
    generator = LookaheadGenerator(model, tokenizer, cost_curve=FLAT_CURVE)
    store = build_index(load_folder(DOCS))
    fast = ChatLookahead(generator=generator, max_tokens=40)
    plain = ChatLookahead(generator=generator, max_tokens=40, use_lookahead=False)
    question = "What does textwrap.dedent do?"
    expected = rag_chain(store, plain).invoke(question)
    recorder = LookaheadStatsHandler()
    parts = list(rag_chain(store, fast).stream(question, config={"callbacks": [recorder]}))
    answer = "".join(p.get("answer", "") for p in parts)
    assert answer == expected["answer"] and answer.strip()
    sources = [d.metadata["source"] for p in parts for d in p.get("docs", [])]
    assert "textwrap.txt" in sources
    assert recorder.last is not None and recorder.last["new_tokens"] > 0
    again = rag_chain(store, fast).invoke(question, config={"callbacks": [recorder]})
    assert again["answer"] == expected["answer"]
    assert recorder.last["tokens_per_step"] > 2.0  # the global trie learned the first answer
    # the sources say what the answer copied from each retrieved chunk: most from the chunks about textwrap
    streamed_sources = [p["sources"] for p in parts if "sources" in p]
    assert len(streamed_sources) == 1 and len(streamed_sources[0]) == 3
    top = max(streamed_sources[0], key=lambda s: s["copied_tokens"])
    assert top["source"] == "textwrap.txt" and top["copied_tokens"] > 0
    assert all(end - start > 0 for s in streamed_sources[0] for start, end in s["spans"])
    assert [s["source"] for s in again["sources"]] == [s["source"] for s in streamed_sources[0]]
