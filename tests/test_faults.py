"""Faults while serving: KV-cache admission, out-of-memory eviction and clients that hang up before their answer."""

from __future__ import annotations

import argparse
import json
import socket
import threading
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import hf_greedy, make_generator, random_prompt, tiny_config
from fastapi.testclient import TestClient
from langchain_core.callbacks import BaseCallbackHandler
from langchain_lookahead import LookaheadLLM
from lookahead_server.app import ServeSettings, create_app
from lookahead_server.cli import add_parser
from prometheus_client.parser import text_string_to_metric_families
from serve_utils import LiveServer, new_generator, slow_factory, sse_events, wait_until

import lookahead.batch
from lookahead.engine import LookaheadGenerator
from lookahead.scheduler import (
    CUDA_KV_SHARE,
    OutOfMemoryRequestError,
    Scheduler,
    is_out_of_memory,
    kv_cache_bytes_per_token,
)

pytestmark = pytest.mark.usefixtures("single_thread")

N = 16
BYTES_PER_TOKEN = 2 * 2 * 16 * 2 * 4  # the tiny llama: 2 layers x 2 KV heads x head dim 16 x (K, V) x float32


def full_length_prompts(gen: LookaheadGenerator, count: int, length: int = 8
                        ) -> tuple[list[list[int]], list[list[int]]]:
    """``count`` prompts whose greedy answers run the whole N tokens (no early end of sequence), and the answers."""
    prompts, refs = [], []
    seed = 0
    while len(prompts) < count:
        prompt = random_prompt(500 + seed, length)
        ref = hf_greedy(gen.model, prompt, N)
        seed += 1
        if len(ref) == N:
            prompts.append(prompt)
            refs.append(ref)
    return prompts, refs


def need(gen: LookaheadGenerator, prompt: list[int], max_new_tokens: int = N) -> int:
    return (len(prompt) + max_new_tokens + gen.config.decoding_length + 1) * BYTES_PER_TOKEN


class Recorder:
    """Wraps the generator's batches: waits for ``gate`` before every step and records the batch keys of each step."""

    def __init__(self, gen: LookaheadGenerator) -> None:
        self.gate = threading.Event()
        self.steps: list[list[Any]] = []
        self._new_batch = gen.new_batch
        gen.new_batch = self.new_batch  # type: ignore[method-assign]

    def new_batch(self) -> Any:
        batch = self._new_batch()
        step = batch.step

        def recorded_step() -> Any:
            self.gate.wait(30)
            self.steps.append(list(batch.keys()))
            return step()

        batch.step = recorded_step
        return batch


# ---------------------------------------------------------------------------------------------------- KV bytes


def test_kv_cache_bytes_per_token():
    assert kv_cache_bytes_per_token(tiny_config("llama"), torch.float32) == BYTES_PER_TOKEN
    assert kv_cache_bytes_per_token(tiny_config("llama"), torch.bfloat16) == BYTES_PER_TOKEN // 2
    # no num_key_value_heads / head_dim: all heads, hidden_size // heads
    plain = SimpleNamespace(num_hidden_layers=3, num_attention_heads=4, hidden_size=64)
    assert kv_cache_bytes_per_token(plain, torch.float16) == 3 * 4 * 16 * 2 * 2
    explicit_none = SimpleNamespace(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=None,
                                    head_dim=None, hidden_size=64)
    assert kv_cache_bytes_per_token(explicit_none, torch.float16) == 3 * 4 * 16 * 2 * 2
    nested = SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=5, num_attention_heads=8,
                                                         num_key_value_heads=1, head_dim=32, hidden_size=128))
    assert kv_cache_bytes_per_token(nested, torch.float32) == 5 * 1 * 32 * 2 * 4
    with pytest.raises(ValueError, match="num_hidden_layers"):
        kv_cache_bytes_per_token(SimpleNamespace(num_attention_heads=4, hidden_size=64), torch.float32)
    with pytest.raises(TypeError, match="torch.dtype"):
        kv_cache_bytes_per_token(tiny_config("llama"), "float32")  # type: ignore[arg-type]


def test_kv_limit_admits_what_fits_fifo_and_exactly():
    """Room for two big requests and a small one: the third big one waits until one ends, and the small one behind
    it waits too (FIFO) although it would fit."""
    gen = make_generator(seed=2)
    prompts, refs = full_length_prompts(gen, 3)
    small = prompts[2][:4]
    small_ref = hf_greedy(gen.model, small, 4)
    limit = need(gen, prompts[0]) + need(gen, prompts[1]) + need(gen, small, 4)
    assert need(gen, small, 4) < need(gen, prompts[2])
    recorder = Recorder(gen)
    scheduler = Scheduler(gen, max_batch_size=8, max_kv_bytes=limit)
    assert scheduler.kv_bytes_per_token == BYTES_PER_TOKEN and scheduler.max_kv_bytes == limit
    handles = [scheduler.submit(p, max_new_tokens=N) for p in prompts]
    handles.append(scheduler.submit(small, max_new_tokens=4))
    wait_until(lambda: scheduler.active == 2, 10, "two admitted requests")
    assert scheduler.queued == 2
    assert scheduler.stats.kv_bytes_reserved == need(gen, prompts[0]) + need(gen, prompts[1])
    recorder.gate.set()
    assert [h.result().token_ids for h in handles] == [*refs, small_ref]
    scheduler.close()
    first_step_of = {h: next(i for i, keys in enumerate(recorder.steps) if h in keys) for h in handles}
    assert first_step_of[handles[0]] == first_step_of[handles[1]] == 0
    assert first_step_of[handles[2]] > 0  # waited for room
    assert first_step_of[handles[3]] >= first_step_of[handles[2]]  # FIFO: the small one never overtakes
    assert all(handles[0] not in keys for keys in recorder.steps[first_step_of[handles[2]]:])  # room came from it
    assert scheduler.stats.kv_bytes_reserved == 0 and scheduler.stats.requests_finished == 4


def test_request_too_big_for_the_kv_limit_is_refused_at_submit():
    gen = make_generator(seed=2)
    prompt = random_prompt(1, 10)
    scheduler = Scheduler(gen, max_kv_bytes=need(gen, prompt) - 1)
    with pytest.raises(ValueError, match=rf"needs {need(gen, prompt)} bytes of KV cache .*10 prompt tokens \+ "
                                         rf"{N} max_new_tokens .*max_kv_bytes={need(gen, prompt) - 1}"):
        scheduler.submit(prompt, max_new_tokens=N)
    assert scheduler.queued == 0 and scheduler.stats.requests_submitted == 0
    assert len(scheduler.submit(prompt, max_new_tokens=N - 1).result().token_ids) > 0  # one token less fits
    scheduler.close()
    with pytest.raises(ValueError, match="max_kv_bytes"):
        Scheduler(gen, max_kv_bytes=0)


def test_cpu_default_has_no_kv_limit():
    scheduler = Scheduler(make_generator(seed=2))
    assert scheduler.max_kv_bytes is None
    scheduler.close()


# ---------------------------------------------------------------------------------------------------- out of memory


def inject(gen: LookaheadGenerator, monkeypatch: pytest.MonkeyPatch, error: BaseException,
           rows: int | None = None) -> list[int]:
    """Make the runner's tree pass raise ``error`` once, at the first pass over ``rows`` rows (any when None);
    returns a list that gets the row count when it fired."""
    fired: list[int] = []
    original = gen.runner.tree_pass

    def tree_pass(cache: Any, trees: Any, layout: Any) -> torch.Tensor:
        if not fired and (rows is None or len(trees) == rows):
            fired.append(len(trees))
            raise error
        return original(cache, trees, layout)

    monkeypatch.setattr(gen.runner, "tree_pass", tree_pass)
    return fired


def test_out_of_memory_evicts_the_newest_row_and_the_others_are_exact(monkeypatch):
    """Three rows, then a step runs out of memory: the newest leaves with OutOfMemoryRequestError, the other two
    finish exactly, and the waiting fourth request joins only once one of them has left."""
    gen = make_generator(seed=2)
    prompts, refs = full_length_prompts(gen, 4)
    fired = inject(gen, monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), rows=3)
    recorder = Recorder(gen)
    scheduler = Scheduler(gen, max_batch_size=3)
    first = scheduler.submit(prompts[0], max_new_tokens=N)
    wait_until(lambda: scheduler.active == 1, 10, "the first request to be admitted")
    later = [scheduler.submit(p, max_new_tokens=N) for p in prompts[1:]]
    recorder.gate.set()  # the next cycle admits two more: the batch holds three rows, joined in submit order
    assert first.result().token_ids == refs[0]
    assert later[0].result().token_ids == refs[1]
    with pytest.raises(OutOfMemoryRequestError, match="did not fit in device memory together with the 2 other") as e:
        later[1].result()
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    assert later[2].result().token_ids == refs[3]
    scheduler.close()
    assert fired == [3]
    three = [i for i, keys in enumerate(recorder.steps) if keys == [first, *later[:2]]]
    assert len(three) >= 2  # the step(s) that prefilled the two (in slices when the cost model asks), then the
    assert recorder.steps[three[-1] + 1] == [first, later[0]]  # one that ran out of memory
    joined = next(keys for keys in recorder.steps if later[2] in keys)
    assert first not in joined or later[0] not in joined  # admission waited for a row to leave
    stats = scheduler.stats
    assert (stats.requests_finished, stats.requests_failed, stats.requests_out_of_memory) == (3, 1, 1)
    assert stats.kv_bytes_reserved == 0 and gen.trie.live_requests() == []


def test_out_of_memory_of_a_single_row_fails_it_and_serving_goes_on(monkeypatch):
    gen = make_generator(seed=2)
    prompts, refs = full_length_prompts(gen, 1)
    fired = inject(gen, monkeypatch, RuntimeError("CUDA error: out of memory"))
    scheduler = Scheduler(gen)
    with pytest.raises(OutOfMemoryRequestError, match="did not fit in device memory even alone .* may be retried"):
        scheduler.submit(prompts[0], max_new_tokens=N).result()
    assert scheduler.submit(prompts[0], max_new_tokens=N).result().token_ids == refs[0]
    scheduler.close()
    assert fired == [1] and scheduler.stats.requests_out_of_memory == 1 and scheduler.stats.requests_finished == 1


def test_on_cuda_the_default_limit_is_most_of_the_free_memory_and_oom_empties_the_cache(monkeypatch):
    """The CUDA paths, with the device faked (the model stays on the CPU): this machine may have no GPU."""
    gen = make_generator(seed=2)
    prompts, refs = full_length_prompts(gen, 1)
    free = 3 * 2**30
    emptied: list[bool] = []
    monkeypatch.setattr(gen, "device", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 8 * 2**30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    inject(gen, monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    scheduler = Scheduler(gen)
    assert scheduler.max_kv_bytes == int(free * CUDA_KV_SHARE) and CUDA_KV_SHARE == 0.9
    with pytest.raises(OutOfMemoryRequestError):
        scheduler.submit(prompts[0], max_new_tokens=N).result()
    assert emptied == [True]
    assert scheduler.submit(prompts[0], max_new_tokens=N).result().token_ids == refs[0]
    scheduler.close()


def test_other_errors_fail_the_whole_batch(monkeypatch):
    gen = make_generator(seed=2)
    prompts, _ = full_length_prompts(gen, 2)
    inject(gen, monkeypatch, ValueError("broken kernel"), rows=2)
    recorder = Recorder(gen)
    scheduler = Scheduler(gen)
    handles = [scheduler.submit(p, max_new_tokens=N) for p in prompts]
    recorder.gate.set()
    for handle in handles:
        with pytest.raises(ValueError, match="broken kernel"):
            handle.result()
    scheduler.close()
    assert scheduler.stats.requests_failed == 2 and scheduler.stats.requests_out_of_memory == 0


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


# ---------------------------------------------------------------------------------------------------- the server


@pytest.fixture
def oom_client(monkeypatch):
    gen = new_generator()
    inject(gen, monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    with TestClient(create_app(gen, ServeSettings(max_kv_bytes=10**9))) as client:
        yield client


def test_server_answers_out_of_memory_with_503_and_retry_after(oom_client):
    r = oom_client.post("/v1/completions", json={"prompt": "Tell me about tries.", "max_tokens": N})
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    error = r.json()["error"]
    assert error["code"] == "out_of_memory" and error["type"] == "server_error"
    assert "did not fit in device memory" in error["message"] and "may be retried" in error["message"]
    r = oom_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": N, "stream": True})
    assert r.status_code == 200  # the tree pass no longer fails: the stream ends normally
    assert sse_events(r.text)[-1] == "[DONE]"
    metrics = {s.name: s.value for f in text_string_to_metric_families(oom_client.get("/metrics").text)
               for s in f.samples}
    assert metrics["lookahead_out_of_memory_evictions_total"] == 1
    assert metrics["lookahead_kv_cache_limit_bytes"] == 10**9
    assert metrics["lookahead_kv_cache_reserved_bytes"] == 0


def test_streamed_out_of_memory_is_an_error_event(oom_client):
    r = oom_client.post("/v1/completions", json={"prompt": "Tell me about tries.", "max_tokens": N, "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1]["error"]["code"] == "out_of_memory" and "[DONE]" not in events


def test_server_refuses_a_request_over_the_kv_limit():
    gen = new_generator()
    with TestClient(create_app(gen, ServeSettings(max_kv_bytes=100 * BYTES_PER_TOKEN))) as client:
        r = client.post("/v1/completions", json={"prompt": "Tell me about tries.", "max_tokens": 200})
        assert r.status_code == 400 and "bytes of KV cache" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 200, r.text


def test_max_kv_gib_flag():
    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_parser(sub, lambda p: p.add_argument("--model", default="m"), lambda args: ())
    assert parser.parse_args(["--max-kv-gib", "1.5"]).max_kv_gib == 1.5
    assert parser.parse_args([]).max_kv_gib is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-kv-gib", "0"])


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_client_that_hangs_up_before_the_answer_is_cancelled(endpoint):
    app = create_app(new_generator(), ServeSettings(max_batch_size=2), slow_factory(delay=0.02))
    max_tokens = 400
    body = {"prompt": "Tell me about tries and drafts.", "max_tokens": max_tokens} if endpoint == "/v1/completions" \
        else {"messages": [{"role": "user", "content": "Tell me about tries."}], "max_tokens": max_tokens}
    payload = json.dumps(body).encode()
    with LiveServer(app) as server:
        sched = app.state.service.scheduler
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(f"POST {endpoint} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            wait_until(lambda: sched.stats.tokens_generated > 0, 15, "the request to start decoding")
        wait_until(lambda: sched.stats.requests_cancelled == 1 and sched.active == 0, 15, "the request to be cancelled")
        assert sched.stats.tokens_generated < max_tokens and sched.stats.requests_finished == 0
        assert not app.state.service.handles
        metrics = {s.name: s.value for f in text_string_to_metric_families(app.state.service.metrics.render().decode())
                   for s in f.samples if s.labels.get("outcome") == "cancelled"}
        assert metrics == {"lookahead_scheduler_requests_total": 1}


# ---------------------------------------------------------------------------------------------------- fault injection
# Every allocation point of a step, faulted once: the row it belongs to ends with finish_reason "error" and a message,
# every other row's output equals plain greedy decoding, and the batch cache always holds exactly the rows decoding.

#: the rows of the injection runs: key -> (prompt index, max_new_tokens, step it is added at). Row 2 finishes early
#: (a drop while the others decode); row 3 joins while the others decode.
ROWS = {0: (0, N, 0), 1: (1, N, 0), 2: (2, 6, 0), 3: (3, N, 2)}


class Fault:
    """One injected fault: ``fire(keys)`` raises ``error`` once and records the keys of the rows it belongs to."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.hit: list[set[Any]] = []

    def fire(self, keys: Any) -> None:
        self.hit.append(set(keys))
        raise self.error

    @property
    def armed(self) -> bool:
        return not self.hit


def _oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def _inject_prefill(gen, batch, prompts, fault, monkeypatch) -> None:
    original = gen.runner.prefill

    def prefill(cache, token_ids, start=0):
        if fault.armed and list(token_ids) == prompts[3]:  # row 3's prefill, while rows 0-2 decode
            fault.fire([3])
        return original(cache, token_ids, start)

    monkeypatch.setattr(gen.runner, "prefill", prefill)


def _inject_tree_pass(gen, batch, prompts, fault, monkeypatch) -> None:
    original = gen.runner.tree_pass

    def tree_pass(cache, trees, layout):
        hidden = original(cache, trees, layout)  # the cache has grown by every layer's tree block: then it fails
        if fault.armed and len(trees) == 4:
            oom = isinstance(fault.error, torch.OutOfMemoryError)
            fault.fire([batch.rows[-1].key] if oom else [row.key for row in batch.rows])  # OOM: the newest row
        return hidden

    monkeypatch.setattr(gen.runner, "tree_pass", tree_pass)


def _inject_accept(gen, batch, prompts, fault, monkeypatch) -> None:
    calls = {"n": 0}
    original = lookahead.batch.greedy_accept

    def greedy_accept(tokens, parents, predictions):
        calls["n"] += 1
        if fault.armed and calls["n"] == 5:  # the second step's second row: row 1
            fault.fire([batch.rows[1].key])
        return original(tokens, parents, predictions)

    monkeypatch.setattr(lookahead.batch, "greedy_accept", greedy_accept)


def _inject_compaction(gen, batch, prompts, fault, monkeypatch) -> None:
    original = gen.runner.compact

    def compact(cache, layout, keeps):
        lengths = original(cache, layout, keeps)  # every row's accepted nodes moved, the cache cropped: then it fails
        if fault.armed and len(keeps) == 3:
            fault.fire([batch.rows[-1].key])  # out of memory in a shared pass: the newest row
        return lengths

    monkeypatch.setattr(gen.runner, "compact", compact)


def _inject_join(gen, batch, prompts, fault, monkeypatch) -> None:
    original = lookahead.batch.append_rows

    def append_rows(cache, *others):
        if not (fault.armed and batch.rows and len(others) == 1):  # one row joining a running batch
            return original(cache, *others)
        cat, calls = torch.cat, {"n": 0}

        def failing_cat(*args, **kwargs):  # the third concatenation: layer 0 done, layer 1 half done
            calls["n"] += 1
            if calls["n"] == 3:
                fault.fire([row.key for row in batch.new if row.ready])
            return cat(*args, **kwargs)

        monkeypatch.setattr(torch, "cat", failing_cat)
        try:
            return original(cache, *others)
        finally:
            monkeypatch.setattr(torch, "cat", cat)

    monkeypatch.setattr(lookahead.batch, "append_rows", append_rows)


def _inject_drop(gen, batch, prompts, fault, monkeypatch, in_place_too: bool = False) -> None:
    select, in_place = lookahead.batch.select_rows, lookahead.batch.keep_rows_in_place

    def select_rows(cache, rows, length):
        if fault.armed:
            fault.hit.append(set())  # the finishing row still completes: nobody fails
            raise fault.error
        return select(cache, rows, length)

    def keep_rows_in_place(cache, rows, length):
        if in_place_too and len(fault.hit) == 1:
            with torch.inference_mode():  # half moved, then it fails: no row in it can go on
                cache.layers[0].keys[0].copy_(cache.layers[0].keys[rows[0]])
            fault.fire([row.key for row in batch.rows])
        return in_place(cache, rows, length)

    monkeypatch.setattr(lookahead.batch, "select_rows", select_rows)
    monkeypatch.setattr(lookahead.batch, "keep_rows_in_place", keep_rows_in_place)


def _inject_learn_step(gen, batch, prompts, fault, monkeypatch) -> None:
    """The budget learning from row 0's accepted draft (at its third step)."""
    row = next(row for row in batch.new if row.key == 0)
    original, calls = row.drafter.observe, {"n": 0}

    def observe(proposal, accepted):
        calls["n"] += 1
        if fault.armed and calls["n"] == 3:
            fault.fire([0])
        return original(proposal, accepted)

    monkeypatch.setattr(row.drafter, "observe", observe)


def _inject_learn_output(gen, batch, prompts, fault, monkeypatch) -> None:
    """The trie learning row 2's finished output as it leaves: it still completes."""
    original = gen.trie.insert

    def insert(tokens, *args, **kwargs):
        if fault.armed and kwargs.get("request_id") is None:
            fault.hit.append(set())
            raise fault.error
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(gen.trie, "insert", insert)


def _inject_drafting(gen, batch, prompts, fault, monkeypatch) -> None:
    row = next(row for row in batch.new if row.key == 1)
    original, calls = row.drafter.candidates, {"n": 0}

    def candidates(*args, **kwargs):
        calls["n"] += 1
        if fault.armed and calls["n"] == 2:
            fault.fire([1])
        return original(*args, **kwargs)

    monkeypatch.setattr(row.drafter, "candidates", candidates)


def _inject_emit(gen, batch, prompts, fault, monkeypatch) -> None:
    row = next(row for row in batch.new if row.key == 0)
    original, calls = row.emitter.push, {"n": 0}

    def push(tokens):
        calls["n"] += 1
        if fault.armed and calls["n"] == 3:
            fault.fire([0])
        return original(tokens)

    monkeypatch.setattr(row.emitter, "push", push)


FAULT_POINTS = {
    "prefill": (_inject_prefill, _oom),
    "tree pass (OOM)": (_inject_tree_pass, _oom),
    "tree pass (other error)": (_inject_tree_pass, lambda: ValueError("broken kernel (injected)")),
    "accept": (_inject_accept, lambda: RuntimeError("CUDA error: out of memory (injected)")),
    "compaction": (_inject_compaction, _oom),
    "join": (_inject_join, _oom),
    "drop": (_inject_drop, _oom),
    "drop, in place too": (lambda *a: _inject_drop(*a, in_place_too=True), _oom),
    "learn (budget)": (_inject_learn_step, lambda: RuntimeError("budget broke (injected)")),
    "learn (output)": (_inject_learn_output, _oom),
    "drafting": (_inject_drafting, _oom),
    "emit": (_inject_emit, lambda: UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")),
}


@pytest.fixture(scope="module")
def injection_setup() -> tuple[list[list[int]], list[list[int]]]:
    return full_length_prompts(make_generator(seed=2), 4)


@pytest.mark.parametrize("point", list(FAULT_POINTS))
def test_a_fault_costs_only_its_row(point, injection_setup, monkeypatch):
    """Each allocation point of a step (prefill, tree pass, accept, compaction, join, drop, learn; drafting and
    emitting too), faulted once while four rows decode: the rows it belongs to end with finish_reason "error" and a
    message, no row ends short without one, every other row equals plain greedy decoding, and the batch cache holds
    exactly the rows decoding after every step (nothing of a failed or finished row is kept)."""
    prompts, refs = injection_setup
    gen = make_generator(seed=2)
    batch = gen.new_batch()
    install, make_error = FAULT_POINTS[point]
    fault = Fault(make_error())
    tokens: dict[int, list[int]] = {key: [] for key in ROWS}
    last: dict[int, Any] = {}
    for step in range(200):
        for key, (index, max_new, at) in ROWS.items():
            if at == step:
                batch.add(gen.prepare(prompts[index], max_new_tokens=max_new), key)
        if step == 0:
            install(gen, batch, prompts, fault, monkeypatch)
        for key, chunk in batch.step():
            assert key not in last, f"row {key} got a chunk after its last one"
            tokens[key].extend(chunk.token_ids)
            if chunk.finish_reason is not None:
                last[key] = chunk
        held = 0 if batch.cache is None else batch.cache.layers[0].keys.shape[0]
        assert held == len(batch.rows), f"step {step}: the cache holds {held} rows for {len(batch.rows)} decoding"
        if not len(batch) and step >= 2:
            break
    assert len(fault.hit) == 1 + (point == "drop, in place too"), f"{point}: the fault fired {len(fault.hit)} times"
    failed = set().union(*fault.hit)
    assert bool(failed) == (point not in ("drop", "learn (output)"))  # a finishing row completes whatever fails
    assert set(last) == set(ROWS)
    for key, (index, max_new, _) in ROWS.items():
        expected = refs[index][:max_new]
        if key in failed:
            assert last[key].finish_reason == "error" and last[key].error, (point, key)
            assert "generation failed" in last[key].error and type(fault.error).__name__ in last[key].error
            assert tokens[key] == expected[:len(tokens[key])], f"{point}: failed row {key} was corrupted"
        else:  # exact, and never short without an error
            assert last[key].finish_reason == "length" and last[key].error is None, (point, key, last[key])
            assert tokens[key] == expected, f"{point}: row {key} is not exact after the fault"
    assert batch.cache is None and not batch.rows and not batch.new
    assert gen.trie.live_requests() == []  # every row's request-local counts were released


@pytest.mark.parametrize("point", ["join", "drop", "accept"])
def test_a_row_fault_fails_only_its_request_in_the_scheduler(point, injection_setup, monkeypatch):
    """Through the scheduler: the faulting request's handle raises with the message, the others are exact, and
    every KV reservation is released."""
    prompts, refs = injection_setup
    gen = make_generator(seed=2)
    install, make_error = FAULT_POINTS[point]
    fault = Fault(make_error())
    recorder = Recorder(gen)
    batches: list[Any] = []
    new_batch = gen.new_batch

    def installed_batch() -> Any:
        batch = new_batch()
        batches.append(batch)
        monkeypatch.setattr(batch, "add", _installing_add(batch, gen, prompts, fault, monkeypatch, install))
        return batch

    gen.new_batch = installed_batch  # type: ignore[method-assign]
    scheduler = Scheduler(gen, max_batch_size=4)
    handles = {key: scheduler.submit(prompts[index], max_new_tokens=max_new)
               for key, (index, max_new, at) in ROWS.items() if at == 0}
    recorder.gate.set()
    wait_until(lambda: len(recorder.steps) >= 2, 10, "two steps")
    handles[3] = scheduler.submit(prompts[ROWS[3][0]], max_new_tokens=N)
    failed: set[Any] = set()
    for key, handle in handles.items():
        index, max_new, _ = ROWS[key]
        try:
            result = handle.result()
        except Exception as error:  # noqa: BLE001 - checked below
            failed.add(key)
            assert "generation failed" in str(error) or isinstance(error, OutOfMemoryRequestError), error
            continue
        assert result.finish_reason == "length" and result.token_ids == refs[index][:max_new], (point, key)
    scheduler.close()
    assert len(fault.hit) == 1 and len(failed) == len(set().union(*fault.hit))
    stats = scheduler.stats
    assert stats.kv_bytes_reserved == 0 and stats.requests_failed == len(failed)
    assert stats.requests_finished == len(ROWS) - len(failed) and gen.trie.live_requests() == []


def _installing_add(batch, gen, prompts, fault, monkeypatch, install):
    """``batch.add`` that installs the fault once its first request was added (hooks on rows find row 0 there)."""
    add = batch.add
    installed = False

    def added(request, key):
        nonlocal installed
        add(request, key)
        if len(batch.new) == 1 and not installed:
            installed = True
            install(gen, batch, prompts, fault, monkeypatch)

    return added


def _second_drafter_fails(gen: LookaheadGenerator, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The second request's drafter raises at its second draft (a fault of that row alone)."""
    made: list[Any] = []
    original = gen.new_drafter

    def new_drafter(*args: Any, **kwargs: Any) -> Any:
        drafter = original(*args, **kwargs)
        made.append(drafter)
        if len(made) == 2:
            candidates, calls = drafter.candidates, {"n": 0}

            def failing(*a: Any, **k: Any) -> Any:
                calls["n"] += 1
                if calls["n"] == 2:
                    raise RuntimeError("the draft store broke (injected)")
                return candidates(*a, **k)

            drafter.candidates = failing
        return drafter

    monkeypatch.setattr(gen, "new_drafter", new_drafter)
    return made


@pytest.mark.parametrize("stream", [False, True])
def test_server_a_row_fault_is_an_error_to_its_client_only(stream, monkeypatch):
    """Two clients decoded together; the second one's row faults: it gets an error (500 or an error event, never a
    short answer with a normal finish_reason), the first its whole answer."""
    gen = new_generator()
    _second_drafter_fails(gen, monkeypatch)
    results: dict[str, Any] = {}
    with TestClient(create_app(gen, ServeSettings(max_batch_size=2))) as client:
        scheduler = client.app.state.service.scheduler  # type: ignore[attr-defined]

        def post(name: str, body: dict[str, Any]) -> None:
            results[name] = client.post("/v1/completions", json=body)

        first = threading.Thread(target=post, args=("ok", {"prompt": "Tell me about tries.", "max_tokens": 48}))
        first.start()
        wait_until(lambda: scheduler.stats.tokens_generated > 0, 10, "the first request to start")
        post("faulty", {"prompt": "And about drafts?", "max_tokens": 48, "stream": stream})
        first.join(30)
    ok = results["ok"]
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["finish_reason"] == "length" and ok.json()["usage"]["completion_tokens"] == 48
    faulty = results["faulty"]
    if stream:
        assert faulty.status_code == 200
        events = sse_events(faulty.text)
        assert "[DONE]" not in events and all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
        error = events[-1]["error"]
    else:
        assert faulty.status_code == 500
        error = faulty.json()["error"]
    assert "the draft store broke (injected)" in error["message"]
    assert scheduler.stats.requests_failed == 1 and scheduler.stats.kv_bytes_reserved == 0


class ErrorCallbacks(BaseCallbackHandler):
    def __init__(self) -> None:
        self.seen: list[BaseException] = []

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self.seen.append(error)


@pytest.mark.parametrize("how", ["invoke", "stream"])
def test_langchain_raises_the_fault_instead_of_a_short_answer(how, monkeypatch):
    """A fault of the LangChain adapter's row is an exception (and on_llm_error), never a shorter text."""
    gen = make_generator(seed=2)
    llm = LookaheadLLM(generator=gen, chat_template=False, max_new_tokens=N)
    errors = ErrorCallbacks()
    fired = inject(gen, monkeypatch, ValueError("broken kernel (injected)"))
    config: Any = {"callbacks": [errors]}
    with pytest.raises(ValueError, match="broken kernel"):  # the engine raises the fault itself
        llm.invoke("the cat sat", config=config) if how == "invoke" else list(llm.stream("the cat sat", config=config))
    assert fired == [1] and len(errors.seen) == 1
    assert len(llm.invoke("the cat sat")) > 0  # serving goes on


def test_a_list_of_prompts_gets_an_error_result_for_the_faulting_one(monkeypatch):
    """``generate`` over a list: the prompt whose row faults gets finish_reason "error" and its error, the others
    their exact answers (a single prompt raises the fault: see the LangChain test above)."""
    gen = make_generator(seed=2)
    prompts, refs = full_length_prompts(gen, 3)
    _second_drafter_fails(gen, monkeypatch)
    results = gen.generate(prompts, max_new_tokens=N, batch_size=3)
    assert [r.finish_reason for r in results] == ["length", "error", "length"]
    assert results[1].error is not None and "the draft store broke (injected)" in results[1].error
    assert results[0].token_ids == refs[0] and results[2].token_ids == refs[2]
    assert results[1].token_ids == refs[1][:len(results[1].token_ids)]
    assert gen.trie.live_requests() == []


@pytest.mark.parametrize("persistent", [False, True])
def test_rows_joining_together_are_retried_alone(persistent, injection_setup, monkeypatch):
    """Two rows join a running batch in one concatenation that fails: each is tried alone; a row that still does
    not fit fails alone, the other joins, and every other row is exact."""
    prompts, refs = injection_setup
    gen = make_generator(seed=2)
    batch = gen.new_batch()
    batch.add(gen.prepare(prompts[0], max_new_tokens=N), 0)
    original = lookahead.batch.append_rows
    calls: list[int] = []

    def append_rows(cache, *others):
        calls.append(len(others))
        if len(others) == 2 or (persistent and batch.new[-1].cache in others and batch.rows):
            raise _oom()
        return original(cache, *others)

    monkeypatch.setattr(lookahead.batch, "append_rows", append_rows)
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    last: dict[int, Any] = {}
    for step in range(100):
        if step == 1:
            for key in (1, 2):
                batch.add(gen.prepare(prompts[key], max_new_tokens=N), key)
        for key, chunk in batch.step():
            tokens[key].extend(chunk.token_ids)
            if chunk.finish_reason is not None:
                last[key] = chunk
        if not len(batch):
            break
    assert calls[:3] == [2, 1, 1]  # together, then each alone
    assert {key: chunk.finish_reason for key, chunk in last.items()} == \
        {0: "length", 1: "length", 2: "error" if persistent else "length"}
    assert tokens[0] == refs[0] and tokens[1] == refs[1]
    assert tokens[2] == (refs[2][:0] if persistent else refs[2])
    assert batch.cache is None and gen.trie.live_requests() == []
