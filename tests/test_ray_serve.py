"""``lookahead serve --ray``: two Ray Serve replicas of the OpenAI-compatible app sharing the trie hub (tiny Llama on
the session's local Ray instance): answers equal to each request decoded alone under concurrent load, and a
question answered by one replica drafts on the other afterwards."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import replace
from importlib.metadata import EntryPoint
from pathlib import Path

import httpx
import pytest
from lookahead_ray.hub import start_hub, stop_hub, trie_config
from lookahead_ray.serve import REPLICA_HEADER, run_serve
from lookahead_server.app import ServeSettings
from lookahead_server.loadgen import Job, run_load
from ray import serve
from ray_utils import local_ray, save_tiny_model, tiny_spec

from lookahead import argtypes
from lookahead.cli import main

PROMPTS = ["the cat sat on", "a trie of past answers", "ray serve replicas", "one model each",
           "tokens per step", "lossless drafts"]
MAX_TOKENS = 24


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, spec) of two replicas behind Serve's proxy, sharing a hub that syncs every 0.2 s."""
    local_ray()
    spec = tiny_spec(save_tiny_model(tmp_path_factory.mktemp("tiny-serve-llama")))
    hub = start_hub(trie_config(spec.config), name="serve-test-hub")
    settings = ServeSettings(model_name="tiny", max_batch_size=4, max_queue=16, default_max_tokens=MAX_TOKENS,
                             tenant_header="x-tenant")
    try:
        url = run_serve(spec, settings, port=free_port(), replicas=2, hub_name="serve-test-hub", sync_interval=0.2)
        yield url, spec
    finally:
        serve.shutdown()
        stop_hub(hub)


def complete(url: str, prompt: str, tenant: str | None = None) -> tuple[dict, str]:
    headers = {"x-tenant": tenant} if tenant else {}
    reply = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS}, headers=headers,
                       timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json(), reply.headers[REPLICA_HEADER.decode()]


def test_load_on_two_replicas_equals_each_request_alone(served):
    url, spec = served
    local = replace(spec, threads=None).build()
    alone = {p: local.generate(p, max_new_tokens=MAX_TOKENS).text for p in PROMPTS}
    jobs = [Job("/v1/completions", {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS,
                                    "stream": i % 2 == 1}) for i in range(32)]
    report = asyncio.run(run_load(url, jobs, clients=16))
    assert report.errors == [] and len(report.ok) == 32
    assert all(o.text == alone[PROMPTS[o.index % len(PROMPTS)]] for o in report.outcomes)


def test_an_answer_of_one_replica_drafts_on_the_other(served):
    url, _ = served
    question = "what does the hub share between replicas?"
    first, replica = complete(url, question)
    time.sleep(1.5)  # a few sync intervals: the answer reaches the hub, then the other replica
    for _ in range(40):
        again, other = complete(url, question)
        if other != replica:
            break
    assert other != replica, "every request went to the same replica"
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert again["lookahead"]["steps"] < first["lookahead"]["steps"]
    assert again["lookahead"]["tokens_per_step"] > 2 * first["lookahead"]["tokens_per_step"]


def test_a_tenants_answer_drafts_on_the_other_replica_for_that_tenant_only(served):
    url, _ = served
    question = "which tenant asked the hub about replicas?"
    first, replica = complete(url, question, tenant="acme")
    time.sleep(1.5)  # a few sync intervals: acme's trie in the hub, then on the other replica
    for _ in range(40):
        again, other = complete(url, question, tenant="acme")
        if other != replica:
            break
    assert other != replica, "every request went to the same replica"
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert again["lookahead"]["tokens_per_step"] > 2 * first["lookahead"]["tokens_per_step"]
    # Another tenant's first request, on whichever replica (both hold acme's answer in acme's store by now): acme's
    # answer drafts nothing for it. Only its first: its own answer, learned into its own store, would draft for the
    # next one (and reach the other replica through the hub).
    stranger, _ = complete(url, question, tenant="globex")
    assert stranger["choices"][0]["text"] == first["choices"][0]["text"]
    assert stranger["lookahead"]["steps"] > again["lookahead"]["steps"]
    assert stranger["lookahead"]["tokens_per_step"] < again["lookahead"]["tokens_per_step"] / 2


def test_serve_cli_without_ray_installed_says_how(monkeypatch, capsys, tmp_path: Path):
    missing = EntryPoint("ray", "no_such_module_for_lookahead_ray:run", "any")  # registered, not importable
    monkeypatch.setattr(argtypes, "entry_points", lambda group: [missing])
    assert main(["serve", "--ray", "--model", str(tmp_path / "never-loaded")]) == 2
    assert "pip install 'lookahead-rag[ray]'" in capsys.readouterr().err


def test_a_deleted_document_and_the_answers_learned_with_it_are_forgotten_by_every_replica(served):
    url, _ = served
    question = "what happens to a deleted document?"
    body = {"prompt": question, "max_tokens": MAX_TOKENS, "documents": ["a note about the hub"],
            "document_ids": ["note-7"]}

    def ask() -> tuple[dict, str]:
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json(), reply.headers[REPLICA_HEADER.decode()]

    first, replica = ask()  # its answer is learned as derived from note-7
    time.sleep(1.5)
    for _ in range(40):
        again, other = ask()
        if other != replica:
            break
    assert other != replica and again["lookahead"]["tokens_per_step"] > 2 * first["lookahead"]["tokens_per_step"]
    seen: dict[str, dict] = {}  # replica -> its first answer after a deletion
    for _ in range(20):  # each ask is the first after a deletion (its own answer is deleted by the next round)
        deleted = httpx.delete(f"{url}/v1/documents/note-7", timeout=60)
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["durable"] is True  # pushed to the hub before the answer
        time.sleep(1.0)  # a few sync intervals: the removal reaches the other replica
        answer, where = ask()
        seen.setdefault(where, answer)
        time.sleep(1.0)  # its answer (learned with note-7) reaches every replica: the next delete finds it anywhere
        if len(seen) == 2:
            break
    assert len(seen) == 2, "the asks never went to both replicas"
    for answer in seen.values():  # neither replica drafts the deleted answers any more
        assert answer["choices"][0]["text"] == first["choices"][0]["text"]
        assert answer["lookahead"]["tokens_per_step"] < again["lookahead"]["tokens_per_step"] / 2
