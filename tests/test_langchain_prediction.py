"""LangChain classes with ``prediction=`` per call and provenance in ``response_metadata`` / ``generation_info``:
answers equal the engine's (and a call without a prediction), on a tiny float32 model."""

from __future__ import annotations

import copy

import pytest
from conftest import FLAT_CURVE
from langchain_core.messages import HumanMessage
from langchain_lookahead import ChatLookahead, LookaheadLLM

from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
PROMPT = "the cat sat on the mat and the cat ate the rat; "
N = 32


@pytest.fixture(scope="module")
def chat_gen(tiny_model, tok, single_thread) -> LookaheadGenerator:
    tokenizer = copy.deepcopy(tok)
    tokenizer.chat_template = TEMPLATE
    config = LookaheadConfig(learn_outputs=False)
    return LookaheadGenerator(tiny_model("llama"), tokenizer, config, cost_curve=FLAT_CURVE)


def test_chat_prediction_per_call(chat_gen):
    chat = ChatLookahead(generator=chat_gen, max_tokens=N)
    plain = chat.invoke([HumanMessage(PROMPT)])
    expected = chat_gen.generate([{"role": "user", "content": PROMPT}], max_new_tokens=N)
    assert plain.content == expected.text
    assert plain.response_metadata["accepted_prediction_tokens"] == 0
    ids = expected.token_ids
    guided = chat.invoke([HumanMessage(PROMPT)], prediction=ids)
    assert guided.content == expected.text
    meta = guided.response_metadata
    assert meta["accepted_prediction_tokens"] == meta["stats"]["accepted_prediction_tokens"] > 0
    assert meta["rejected_prediction_tokens"] == 0
    wrong = chat.invoke([HumanMessage(PROMPT)], prediction=ids[:6] + [t % 50 + 1 for t in ids[6:]])
    assert wrong.content == expected.text
    streamed = "".join(c.content for c in chat.stream([HumanMessage(PROMPT)], prediction=expected.text))
    assert streamed == expected.text


def test_llm_prediction_and_provenance(chat_gen):
    llm = LookaheadLLM(generator=chat_gen, chat_template=False, max_new_tokens=N)
    expected = chat_gen.generate(PROMPT, max_new_tokens=N)
    result = llm.generate([PROMPT], prediction=expected.token_ids, documents=["a zebra", expected.text])
    info = result.generations[0][0].generation_info
    assert result.generations[0][0].text == expected.text
    assert info["accepted_prediction_tokens"] > 0
    assert [p["source"] for p in info["provenance"]] == ["doc:0", "doc:1"]
    assert info["provenance"][0]["tokens"] == 0
    assert info["provenance"][1]["tokens"] == sum(b - a for a, b in info["provenance"][1]["spans"])


def test_a_bad_prediction_is_a_clear_error(chat_gen):
    chat = ChatLookahead(generator=chat_gen, max_tokens=4)
    with pytest.raises(TypeError, match="prediction must be a string or a list of token ids"):
        chat.invoke(PROMPT, prediction=3.5)
