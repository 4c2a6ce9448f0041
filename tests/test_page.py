"""The page `lookahead serve` serves at `/`, driven in headless Chromium (Debian's chromium-headless-shell, installed by
`make setup`) through playwright: it streams the answer, highlights every accepted draft run (coloured by source when
the stream names one) and shows tokens per step and speed. The highlighted spans in the page are checked against
the stream a reference server sends for the same request body.

The slow test takes the screenshot on the real default model; ``LOOKAHEAD_PAGE_SCREENSHOT=docs/page.png`` keeps it
there (the picture docs/serving.md shows), otherwise it goes to a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FLAT_CURVE, make_model
from fastapi.testclient import TestClient
from lookahead_server.app import ServeSettings, create_app
from playwright.sync_api import Browser, Page, sync_playwright
from serve_utils import LiveServer, chat_tokenizer, sse_events

from lookahead.bench.cases import load_cases
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.models import load_model
from lookahead.prompts import rag_messages

BROWSERS = ("chromium-headless-shell", "chromium")
DOCS = ["Lighthouses guide ships at night. The lamp turns once every ten seconds.",
        "Harbours shelter ships from storms. Their walls break the waves."]
QUESTION = "How often does the lamp turn?"
N = 48
MARKS = """els => els.map(e => ({text: e.textContent, source: e.dataset.source, accepted: e.dataset.accepted,
                             colour: getComputedStyle(e).backgroundColor}))"""


def chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"no headless Chromium found ({' or '.join(BROWSERS)}): run `make setup`, which installs Debian's "
                f"chromium-headless-shell (apt-get install -y chromium-headless-shell)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium())
        try:
            yield b
        finally:
            b.close()


def fixed_generator() -> LookaheadGenerator:
    return LookaheadGenerator(make_model("llama"), chat_tokenizer(), LookaheadConfig(adaptive=False),
                              cost_curve=FLAT_CURVE)


def ask(page: Page, documents: list[str], question: str, max_tokens: int) -> None:
    page.fill("#documents", "\n---\n".join(documents))
    page.fill("#question", question)
    page.fill("#max-tokens", str(max_tokens))
    page.click("#ask")
    page.wait_for_selector("body[data-done]", timeout=120_000)


def expected_sourced_runs(events: list[Any]) -> tuple[str, list[str], list[str], dict[str, Any]]:
    """The answer, the text and the source ("" for none) of each accepted run, and the final ``lookahead`` object of
    a chat stream."""
    text, runs, sources, final = "", [], [], {}
    for event in events:
        if not isinstance(event, dict) or not event.get("choices"):
            continue
        choice = event["choices"][0]
        content = choice["delta"].get("content") or ""
        text += content
        for run in event.get("lookahead", {}).get("accepted_runs", []) if content else []:
            runs.append(content[run["start"]:run["end"]])
            sources.append(run["source"] or "")
        if choice["finish_reason"] is not None:
            final = event["lookahead"]
    return text, runs, sources, final


def shown(page: Page) -> dict[str, str]:
    return {name: page.text_content(f"#stat-{name}") or "" for name in ("tokens", "steps", "tps", "accepted")}


@pytest.mark.usefixtures("single_thread")
def test_page_streams_and_highlights_the_accepted_draft_runs(browser):
    bodies: list[dict[str, Any]] = []
    with LiveServer(create_app(fixed_generator(), ServeSettings())) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.on("request", lambda r: bodies.append(json.loads(r.post_data or "{}")) if r.method == "POST" else None)
        page.goto(server.url + "/")
        assert page.title() == "lookahead"
        rounds = []
        for _ in range(2):  # the second time the answer drafts from the first one (the trie of past answers)
            ask(page, DOCS, QUESTION, N)
            assert page.get_attribute("body", "data-done") == "length", page.text_content("#error")
            rounds.append((page.text_content("#answer"), page.eval_on_selector_all("#answer mark.run", MARKS),
                           shown(page)))
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    body = bodies[0]
    assert body["stream"] is True and body["documents"] == DOCS and body["max_tokens"] == N
    assert body["messages"] == rag_messages(QUESTION, DOCS)  # the page asks with the project's RAG prompt
    with TestClient(create_app(fixed_generator(), ServeSettings())) as reference:
        streams = [sse_events(reference.post("/v1/chat/completions", json=body).text) for _ in range(2)]
    for (answer, marks, stats), events in zip(rounds, streams):
        text, runs, sources, final = expected_sourced_runs(events)
        assert answer == text and text
        assert [m["text"] for m in marks] == runs and runs  # one highlighted span per accepted run, same text
        assert [m["source"] for m in marks] == sources  # the document each was copied from (doc:<index>), or none
        assert all(int(m["accepted"]) > 0 for m in marks)
        assert stats == {"tokens": str(N), "steps": str(final["steps"]), "tps": f"{final['tokens_per_step']:.2f}",
                         "accepted": str(final["accepted_draft_tokens"])}
    first, warm = (sum(len(m["text"]) for m in marks) / len(answer) for answer, marks, _ in rounds)
    assert warm > 0.9 > first  # the repeated question is drafted almost whole


SYNTHETIC = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": "The lamp "}, "finish_reason": None}],
     "lookahead": {"tokens": 2, "accepted": 0, "accepted_runs": []}},
    {"choices": [{"index": 0, "delta": {"content": "turns once every ten seconds"}, "finish_reason": None}],
     "lookahead": {"tokens": 6, "accepted": 5, "accepted_runs": [{"start": 0, "end": 10, "source": "doc:lighthouse"},
                                                                 {"start": 10, "end": 99, "source": "doc:harbour"}]}},
    {"choices": [{"index": 0, "delta": {"content": " at night."}, "finish_reason": None}],
     "lookahead": {"tokens": 3, "accepted": 2, "accepted_runs": [{"start": 1, "end": 9, "source": None}]}},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
     "lookahead": {"finish_reason": "eos", "steps": 4, "tokens_per_step": 2.75, "draft_tokens": 9,
                   "accepted_draft_tokens": 7, "seconds": 0.5}},
]


@pytest.mark.usefixtures("single_thread")
def test_page_colours_runs_by_their_source(browser):
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in SYNTHETIC) + "data: [DONE]\n\n"
    with LiveServer(create_app(fixed_generator(), ServeSettings())) as server:
        page = browser.new_page()
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, headers={"Content-Type": "text/event-stream"}, body=stream))
        page.goto(server.url + "/")
        ask(page, DOCS, QUESTION, 16)
        marks = page.eval_on_selector_all("#answer mark.run", MARKS)
        legend = page.eval_on_selector_all("#legend div", "els => els.map(e => e.textContent)")
        answer = page.text_content("#answer")
        stats = shown(page)
    assert answer == "The lamp turns once every ten seconds at night."
    assert [(m["text"], m["source"]) for m in marks] == [
        ("turns once", "doc:lighthouse"), (" every ten seconds", "doc:harbour"), ("at night", "")]
    assert len({m["colour"] for m in marks}) == 3  # each source its own colour, unknown sources another
    assert legend == ["drafted and accepted", "doc:lighthouse", "doc:harbour"]
    assert stats == {"tokens": "11", "steps": "4", "tps": "2.75", "accepted": "7"}


@pytest.mark.usefixtures("single_thread")
def test_page_shows_errors(browser):
    with LiveServer(create_app(fixed_generator(), ServeSettings(api_key="k"))) as server:
        page = browser.new_page()
        page.goto(server.url + "/")  # the page itself needs no key
        ask(page, DOCS, QUESTION, 4)
        assert page.get_attribute("body", "data-done") == "error"
        assert "HTTP 401: missing or wrong API key" in (page.text_content("#error") or "")
        page.fill("#api-key", "k")
        ask(page, DOCS, QUESTION, 4)
        assert page.get_attribute("body", "data-done") == "length"
        assert page.text_content("#error") == "" and page.text_content("#stat-tokens") == "4"


@pytest.mark.slow
def test_page_screenshot_on_the_default_model(browser, tmp_path):
    model, tokenizer = load_model("default", dtype="float32", device="cpu")
    generator = LookaheadGenerator(model, tokenizer, cost_curve=FLAT_CURVE)
    case = load_cases("rag_qa", limit=2)[1]  # a public RAG case: base64.b64decode
    target = Path(os.environ.get("LOOKAHEAD_PAGE_SCREENSHOT") or tmp_path / "page.png")
    with LiveServer(create_app(generator, ServeSettings())) as server:
        page = browser.new_page(viewport={"width": 1400, "height": 860})
        page.goto(server.url + "/")
        ask(page, case["documents"], case["question"], 80)
        assert page.get_attribute("body", "data-done") in ("stop", "length"), page.text_content("#error")
        marks = page.eval_on_selector_all("#answer mark.run", MARKS)
        answer = page.text_content("#answer") or ""
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target), full_page=True)
    assert marks and all(m["text"] in answer and int(m["accepted"]) > 0 for m in marks)
    assert target.stat().st_size > 10_000
