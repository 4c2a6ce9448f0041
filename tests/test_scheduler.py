"""The serving scheduler: concurrent requests are batched, each answer equals the request run alone."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import hf_greedy, make_generator, random_prompt

from lookahead.sampling import SamplingParams
from lookahead.scheduler import QueueFullError, Scheduler, SchedulerClosedError

pytestmark = pytest.mark.usefixtures("single_thread")


def test_concurrent_requests_are_batched_and_exact():
    gen = make_generator(seed=2)
    prompts = [random_prompt(seed, 6 + seed % 5) for seed in range(12)]
    refs = [hf_greedy(gen.model, p, 16) for p in prompts]
    scheduler = Scheduler(gen, max_batch_size=4, max_queue=32)
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        results[i] = scheduler.submit(prompts[i], max_new_tokens=16).result().token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    scheduler.close()
    assert [results[i] for i in range(len(prompts))] == refs
    stats = scheduler.stats
    assert stats.requests_finished == len(prompts) and stats.requests_failed == 0
    assert stats.tokens_generated == sum(len(r) for r in refs)
    assert stats.decoding_steps < sum(len(r) for r in refs)  # batched (and drafted): fewer passes than tokens
    assert gen.trie.live_requests() == []


def test_async_iteration_and_sampling():
    gen = make_generator(seed=2)
    prompt = random_prompt(3, 10)
    alone = gen.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.5, seed=5).token_ids
    scheduler = Scheduler(gen)

    async def consume() -> list[int]:
        handle = scheduler.submit(prompt, max_new_tokens=12, sampling=SamplingParams(do_sample=True, temperature=0.5,
                                                                                     seed=5))
        return [t async for chunk in handle for t in chunk.token_ids]

    assert asyncio.run(consume()) == alone
    scheduler.close()


def test_bad_requests_are_refused_before_queueing():
    gen = make_generator(seed=2)
    scheduler = Scheduler(gen, max_queue=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        scheduler.submit("abc", max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        scheduler.submit("  ")
    assert scheduler.queued == 0 and scheduler.stats.requests_submitted == 0
    scheduler.close()


def test_full_queue_raises_and_cancel_frees_the_slot():
    gen = make_generator(seed=2)
    gate = threading.Event()
    original = gen.new_batch

    def slow_batch():  # the worker's batch waits for the gate at every step
        batch = original()
        step = batch.step

        def gated_step():
            gate.wait(10)
            return step()

        batch.step = gated_step
        return batch

    gen.new_batch = slow_batch
    scheduler = Scheduler(gen, max_batch_size=1, max_queue=2)
    first = scheduler.submit("abc abc", max_new_tokens=50)
    time.sleep(0.3)  # the worker admits the first request and blocks in its step
    waiting = [scheduler.submit("abd", max_new_tokens=3), scheduler.submit("abe", max_new_tokens=3)]
    with pytest.raises(QueueFullError, match="queue is full"):
        scheduler.submit("abf", max_new_tokens=3)
    assert scheduler.stats.requests_rejected == 1
    first.cancel()
    gate.set()
    chunks = list(first)
    assert sum(len(c.token_ids) for c in chunks) < 50
    for handle in waiting:
        assert len(handle.result().token_ids) == 3
    scheduler.close()
    assert scheduler.stats.requests_cancelled == 1
    assert gen.trie.live_requests() == []


def test_closed_scheduler_refuses():
    scheduler = Scheduler(make_generator(seed=2))
    scheduler.close()
    with pytest.raises(SchedulerClosedError):
        scheduler.submit("abc", max_new_tokens=2)


def test_bad_sizes():
    with pytest.raises(ValueError, match="max_batch_size"):
        Scheduler(make_generator(seed=2), max_batch_size=0)


def test_many_async_readers_hold_no_threads():
    """More concurrent ``async for`` readers than executor threads: every one still gets its whole answer."""
    gen = make_generator(seed=2)
    prompts = [random_prompt(100 + i, 7) for i in range(20)]
    refs = [hf_greedy(gen.model, p, 10) for p in prompts]
    scheduler = Scheduler(gen, max_batch_size=4, max_queue=32)

    async def read(prompt: list[int]) -> list[int]:
        handle = scheduler.submit(prompt, max_new_tokens=10)
        return [t async for chunk in handle for t in chunk.token_ids]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(read(p) for p in prompts))

    before = threading.active_count()
    assert asyncio.run(main()) == refs
    assert threading.active_count() <= before + 1  # no thread per waiting reader
    scheduler.close()
