"""Paced stream chunking (lookahead.pacing): the pieces say exactly what the engine said, on a steady cadence, and an
observer of chunk sizes and times can no longer tell a drafted answer from one decoded token by token."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import pytest
from conftest import FLAT_CURVE, make_model, make_tokenizer, random_prompt

from lookahead.bench.leakage import Trace, observer_accuracy
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.outputs import StreamChunk
from lookahead.pacing import Pacer, StreamChunking, TextSplitter, apace, pace

pytestmark = pytest.mark.usefixtures("single_thread")


class FakeClock:
    """A clock that moves only when told (arrivals) or slept on."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def generator() -> LookaheadGenerator:
    return LookaheadGenerator(make_model("llama", 3), make_tokenizer(), LookaheadConfig(), cost_curve=FLAT_CURVE)


@pytest.mark.parametrize("text, tokens, rate", [("run", 0, 0), (None, 0, 0), ("token", 1, 0), ("fixed:1", 1, 0),
                                               ("fixed:7", 7, 0), ("token@20", 1, 20), ("fixed:4@12.5", 4, 12.5),
                                               ("token@.5", 1, 0.5)])
def test_parse_accepts_the_three_forms_and_a_rate(text, tokens, rate):
    chunking = StreamChunking.parse(text)
    assert (chunking.tokens, chunking.rate) == (tokens, rate)
    assert StreamChunking.parse(str(chunking)) == chunking


@pytest.mark.parametrize("text", ["runs", "fixed:0", "fixed:-2", "fixed:", "fixed:x", "tokens", "", "fixed:1234567",
                                  "token@0", "token@", "run@3", "fixed:2@x", "token@1e9", "token@2000000"])
def test_parse_refuses_anything_else_with_the_allowed_forms(text):
    with pytest.raises(ValueError, match="'run'.*'token'.*'fixed:N'"):
        StreamChunking.parse(text)


def test_a_set_rate_paces_every_piece_whatever_the_engine_says():
    """``token@4``: one token every 0.25 s after the first, however long the steps took and whatever the engine's
    plain-step estimate said (a drafted step's run goes out at the same cadence as single tokens)."""
    tok = make_tokenizer()
    ids = tok("the cat sat on the mat and the dog sat too", add_special_tokens=False)["input_ids"]
    chunks = [StreamChunk(ids[:1], tok.decode(ids[:1]), 0, plain_seconds=0.01),
              StreamChunk(ids[1:6], tok.decode(ids[1:6]), 4, plain_seconds=0.03),
              StreamChunk(ids[6:], tok.decode(ids[6:]), len(ids) - 7, finish_reason="length", plain_seconds=0.5)]
    pacer = Pacer(StreamChunking.parse("token@4"), TextSplitter(tok))
    for chunk, now in zip(chunks, (0.0, 0.05, 0.1)):
        pacer.feed(chunk, now)
    times = []
    while not pacer.finished:
        at = pacer.next_due()
        times += [at] * len(pacer.due(at))
    assert times == pytest.approx([0.25 * i for i in range(len(ids))])
    with pytest.raises(ValueError, match="rate must be"):
        StreamChunking(1, -1.0)
    with pytest.raises(ValueError, match="not 'run'"):
        StreamChunking(0, 5.0)


def _arrivals(chunks: list[StreamChunk], step: float = 1.0) -> list[tuple[StreamChunk, float]]:
    return [(c, i * step) for i, c in enumerate(chunks)]


def _timed_steps(chunks: list[StreamChunk], per_node: float = 0.0) -> list[StreamChunk]:
    """The chunks as if a step with ``n`` draft nodes took ``1 + per_node * n``, each saying that without drafts it
    would have taken 0.8 (its ``plain_seconds``, as the engine reports it: 1.0 with the pacer's slack);
    :func:`_arrivals_of` gives their arrival
    times. The generator's cost curve is flat (nodes are free to its budget), so by default they cost nothing here
    either: a budget that paid for nodes would draft only where drafting pays."""
    sizes = chunks[-1].stats.draft_sizes if chunks and chunks[-1].stats else []
    out = []
    for i, chunk in enumerate(chunks):
        took = 1.0 + per_node * (sizes[i - 1] if 0 < i <= len(sizes) else 0)
        out.append(dataclasses.replace(chunk, plain_seconds=0.8 if i else None))
        out[-1].took = took  # type: ignore[attr-defined]
    return out


def _arrivals_of(chunks: list[StreamChunk]) -> list[tuple[StreamChunk, float]]:
    """Arrival times of :func:`_timed_steps` chunks: each after its step's own time."""
    now, out = 0.0, []
    for i, chunk in enumerate(chunks):
        now += chunk.took if i else 0.0  # type: ignore[attr-defined]
        out.append((chunk, now))
    return out


def _run_pacer(chunks: list[StreamChunk], chunking: str, tokenizer, stop=(),
               arrivals: list[tuple[StreamChunk, float]] | None = None) -> list[tuple[StreamChunk, float]]:
    """Feed ``chunks`` (one step apart, or at ``arrivals``) and collect every piece with the time it went out (a
    virtual clock)."""
    pacer = Pacer(StreamChunking.parse(chunking), TextSplitter(tokenizer, stop))
    out: list[tuple[StreamChunk, float]] = []
    if arrivals is None:
        chunks = [dataclasses.replace(c, plain_seconds=None) for c in chunks]  # the gaps are the step time
        arrivals = _arrivals(chunks)
    i = 0
    while not pacer.finished:
        due = pacer.next_due()
        arrival = arrivals[i][1] if i < len(arrivals) else None
        if arrival is not None and (due is None or arrival <= due):
            pacer.feed(arrivals[i][0], arrival)
            out += [(p, arrival) for p in pacer.due(arrival)]
            i += 1
        else:
            assert due is not None
            out += [(p, due) for p in pacer.due(due)]
    return out


@pytest.mark.parametrize("chunking", ["token", "fixed:3"])
@pytest.mark.parametrize("stop", [(), ("e", "ab")])
def test_pieces_say_exactly_what_the_engine_said(generator, chunking, stop):
    tok = generator.tokenizer
    for seed in range(6):
        prompt = random_prompt(seed)
        chunks = list(generator.stream(prompt, max_new_tokens=40, stop=list(stop) or None))
        pieces = [p for p, _ in _run_pacer(chunks, chunking, tok, stop)]
        size = StreamChunking.parse(chunking).tokens
        assert "".join(p.text for p in pieces) == "".join(c.text for c in chunks)
        assert [t for p in pieces for t in p.token_ids] == [t for c in chunks for t in c.token_ids]
        assert all(len(p.token_ids) == size for p in pieces[:-1])
        assert 0 <= len(pieces[-1].token_ids) <= size
        assert pieces[-1].finish_reason == chunks[-1].finish_reason and pieces[-1].stats is chunks[-1].stats
        assert all(p.finish_reason is None for p in pieces[:-1])
        assert all(p.accepted == 0 for p in pieces)  # nothing in a piece tells what was drafted


def test_a_drafted_run_goes_out_one_step_apart():
    tok = make_tokenizer()
    ids = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    chunks = [StreamChunk(ids[:1], tok.decode(ids[:1]), 0), StreamChunk(ids[1:2], tok.decode(ids[1:2]), 0),
              StreamChunk(ids[2:], tok.decode(ids[2:]), len(ids) - 3, finish_reason="length")]
    timed = _run_pacer(chunks, "token", tok)
    times = [t for _, t in timed]
    # the first token at once, then one per step (1.0): the drafted run is spread as if decoded token by token
    assert times == [float(i) for i in range(len(ids))]
    assert [p.token_ids for p, _ in timed] == [[t] for t in ids]


def test_an_error_flushes_what_waits_and_ends_the_stream():
    tok = make_tokenizer()
    ids = tok("the cat sat on", add_special_tokens=False)["input_ids"]
    pacer = Pacer(StreamChunking(1), TextSplitter(tok))
    pacer.feed(StreamChunk(ids[:1], tok.decode(ids[:1]), 0), 0.0)
    assert len(pacer.due(0.0)) == 1
    pacer.feed(StreamChunk(ids[1:], tok.decode(ids[1:]), 2), 1.0)
    assert len(pacer.due(1.0)) == 1  # the rest waits for its cadence
    assert len(ids) >= 4
    pacer.feed(StreamChunk([], "", 0, finish_reason="error", error="boom"), 1.1)
    out = pacer.due(1.1)
    assert [p.token_ids for p in out[:-1]] == [[t] for t in ids[2:]][: len(out) - 1]
    assert out[-1].finish_reason == "error" and out[-1].error == "boom" and pacer.finished
    assert [t for p in out for t in p.token_ids] == ids[2:]


def test_pace_with_run_passes_chunks_through_and_paced_matches_the_engine(generator):
    prompt = random_prompt(11)
    chunks = list(generator.stream(prompt, max_new_tokens=30))
    assert list(pace(iter(chunks), "run", generator.tokenizer)) == chunks
    pieces = list(pace(generator.stream(prompt, max_new_tokens=30), "fixed:2", generator.tokenizer))
    assert "".join(p.text for p in pieces) == "".join(c.text for c in chunks)
    assert pieces[-1].finish_reason == chunks[-1].finish_reason


def test_pace_stops_the_engine_when_the_consumer_stops(generator):
    prompt = random_prompt(12)
    pulled = []

    def engine():
        for chunk in generator.stream(prompt, max_new_tokens=60):
            pulled.append(chunk)
            yield chunk

    paced = pace(engine(), "token", generator.tokenizer)
    first = list(itertools.islice(paced, 2))
    paced.close()  # waits for the reader thread: nothing runs on after this
    count = len(pulled)
    assert len(first) == 2 and count < 60
    assert len(pulled) == count


def test_apace_matches_the_engine(generator):
    prompt = random_prompt(13)
    chunks = list(generator.stream(prompt, max_new_tokens=30))

    async def source():
        for chunk in chunks:
            await asyncio.sleep(0.001)
            yield chunk

    async def collect():
        return [p async for p in apace(source(), "token", generator.tokenizer)]

    pieces = asyncio.run(collect())
    assert "".join(p.text for p in pieces) == "".join(c.text for c in chunks)
    assert [len(p.token_ids) for p in pieces[:-1]] == [1] * (len(pieces) - 1)
    assert pieces[-1].finish_reason == chunks[-1].finish_reason


def _chunks(generator: LookaheadGenerator, prompt: list[int], seen: bool) -> list[StreamChunk]:
    """One answer's stream, from a fresh store (``seen``: after the store learned that answer)."""
    generator.trie = generator.empty_trie()
    if seen:
        generator.generate(prompt, max_new_tokens=24)
    return list(generator.stream(prompt, max_new_tokens=24))


def _trace(chunks: list[StreamChunk], chunking: str, tokenizer) -> Trace:
    """The trace when a step takes 1.0 plus a little per draft node (see :func:`_timed_steps`)."""
    steps = _timed_steps(chunks)
    arrivals = _arrivals_of(steps)
    timed = arrivals if chunking == "run" else _run_pacer(steps, chunking, tokenizer, arrivals=arrivals)
    return Trace.of([c for c, _ in timed], [t for _, t in timed])


def test_the_observer_tells_seen_answers_apart_only_without_pacing(generator):
    prompts = [random_prompt(100 + i) for i in range(12)]
    streams = {seen: [_chunks(generator, p, seen) for p in prompts] for seen in (True, False)}
    accuracy = {}
    for chunking in ("run", "token", "fixed:4"):
        traces = {seen: [_trace(c, chunking, generator.tokenizer) for c in streams[seen]] for seen in streams}
        accuracy[chunking] = observer_accuracy(traces[True], traces[False])
    assert accuracy["run"] >= 0.9  # drafted answers come in fewer, larger chunks and sooner
    assert accuracy["token"] <= 0.6  # paced by the plain step: both kinds look alike (paced by the drafted steps'
    assert accuracy["fixed:4"] <= 0.6  # own, longer times, the seen ones would come slower: a leak the other way)


def test_pacing_follows_the_plain_step_time_not_the_drafted_steps():
    tok = make_tokenizer()
    ids = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    chunks = [StreamChunk(ids[:1], tok.decode(ids[:1]), 0),
              StreamChunk(ids[1:], tok.decode(ids[1:]), len(ids) - 2, finish_reason="length", plain_seconds=0.1)]
    pacer = Pacer(StreamChunking(1), TextSplitter(tok))
    pacer.feed(chunks[0], 0.0)
    pacer.feed(chunks[1], 1.0)  # a long drafted step (1.0) that would have taken 0.1 without drafts
    times = []
    while not pacer.finished:
        at = pacer.next_due()
        times += [at] * len(pacer.due(at))
    assert times[1:] == pytest.approx([1.0 + 0.125 * i for i in range(len(ids) - 1)])  # with 1.25x slack


def test_observer_accuracy_is_chance_on_identical_traces_and_one_on_separable_ones():
    a = Trace((1, 1, 1), (0.0, 1.0, 2.0))
    b = Trace((3,), (0.0,))
    assert observer_accuracy([a] * 6, [a] * 6) == 0.5
    assert observer_accuracy([b] * 6, [a] * 6) == 1.0
