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
from conftest import FLAT_CURVE, hf_greedy, make_model, make_tokenizer, random_prompt, tiny_config
from fastapi.testclient import TestClient
from lookahead_server import ServeSettings, create_app
from lookahead_server.cli import add_parser
from prometheus_client.parser import text_string_to_metric_families
from serve_utils import LiveServer, new_generator, slow_factory, sse_events, wait_until

from lookahead.config import LookaheadConfig
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


def make_generator() -> LookaheadGenerator:
    return LookaheadGenerator(make_model("llama", 2), make_tokenizer(), LookaheadConfig(), cost_curve=FLAT_CURVE)


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
    gen = make_generator()
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
    gen = make_generator()
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
    scheduler = Scheduler(make_generator())
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
    gen = make_generator()
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
    assert len(three) == 2  # the step that prefilled the two, then the one that ran out of memory
    assert recorder.steps[three[1] + 1] == [first, later[0]]
    joined = next(keys for keys in recorder.steps if later[2] in keys)
    assert first not in joined or later[0] not in joined  # admission waited for a row to leave
    stats = scheduler.stats
    assert (stats.requests_finished, stats.requests_failed, stats.requests_out_of_memory) == (3, 1, 1)
    assert stats.kv_bytes_reserved == 0 and gen.trie.live_requests() == []


def test_out_of_memory_of_a_single_row_fails_it_and_serving_goes_on(monkeypatch):
    gen = make_generator()
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
    gen = make_generator()
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
    gen = make_generator()
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
