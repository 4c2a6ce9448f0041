"""``lookahead summarize --ray``: the same files as the local command, resumable, and a worker killed mid-run loses
no document and duplicates none (tiny Llama on the session's local Ray instance)."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import ray
from lookahead_ray.hub import start_hub, stop_hub, trie_config
from lookahead_ray.summarize import PoolOptions, SummarizeOptions, summarize_documents
from ray_utils import local_ray, save_tiny_model, tiny_spec

from lookahead import argtypes
from lookahead.cli import main
from lookahead.summarize import Summarizer, collect_documents
from lookahead.summarize import summarize_documents as summarize_locally

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def corpus(root: Path, count: int) -> Path:
    """``count`` short documents, one long enough to be summarized map-reduce with --chunk-tokens 48."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8))
        (root / f"doc{i:02d}.txt").write_text(f"Document {i} is about {words}. It ends here.\n", encoding="utf-8")
    (root / "long.txt").write_text("\n\n".join(f"Paragraph {k}: the {WORDS[k]} part of a long text." * 3
                                               for k in range(6)), encoding="utf-8")
    return root


def summaries(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.summary.txt"))}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    local_ray()
    return save_tiny_model(tmp_path_factory.mktemp("tiny-chat-llama"))


def cli(docs: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["summarize", str(docs), "--out", str(out), "--model", str(model), "--device", "cpu", "--dtype",
            "float32", "--max-new-tokens", "12", "--chunk-tokens", "48", "--no-progress", "--fixed-draft", *extra]


def test_ray_output_is_byte_identical_to_the_local_command_and_resumes(model_dir, tmp_path, capsys):
    docs = corpus(tmp_path / "docs", 5)
    assert main(cli(docs, tmp_path / "local", model_dir)) == 0
    local = summaries(tmp_path / "local")
    out = tmp_path / "ray"
    assert main(cli(docs, out, model_dir, "--ray", "--workers", "2", "--worker-batch-size", "2")) == 0
    assert summaries(out) == local and len(local) == 6
    printed = capsys.readouterr().out
    assert "6 documents (6 now, 0 from an earlier run)" in printed
    (out / "doc01.txt.summary.txt").unlink()  # an interrupted run: one summary missing, its record stale
    (out / "doc01.txt.summary.json").unlink()
    assert main(cli(docs, out, model_dir, "--ray", "--workers", "1", "--no-trie-sharing")) == 0
    assert "6 documents (1 now, 5 from an earlier run)" in capsys.readouterr().out
    assert summaries(out) == local


def test_a_worker_killed_mid_run_loses_nothing_and_duplicates_nothing(model_dir, tmp_path):
    docs = collect_documents([corpus(tmp_path / "docs", 14)])
    spec = tiny_spec(model_dir)
    options = SummarizeOptions(max_new_tokens=40, chunk_tokens=48)
    reference = tmp_path / "reference"
    summarizer = Summarizer(replace(spec, threads=None).build(), options.max_new_tokens, options.chunk_tokens)
    summarize_locally(docs, reference, summarizer, progress=False)
    hub = start_hub(trie_config(spec.config), name="kill-test-hub")
    try:
        pool = PoolOptions(workers=2, hub_name="kill-test-hub", sync_interval=0.2)
        out = tmp_path / "out"
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(run=summarize_documents(
            docs, out, spec, options, pool, progress=False)))
        runner.start()
        killed = None
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline and runner.is_alive():
            done = list(out.glob("*.summary.json")) if out.exists() else []
            stats = ray.get(hub.stats.remote())
            live = [w["pid"] for w in stats["workers"]]
            if done and live:
                finished_at_kill = len(done)
                killed = live[-1]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
        runner.join(300)
        assert killed is not None and finished_at_kill < len(docs)  # it died mid-run
        run = result["run"]
    finally:
        stop_hub(hub)
    assert [d.name for d in run.documents] == [d.name for d in docs]  # each once, in order
    assert summaries(out) == summaries(reference) and len(summaries(out)) == len(docs)


def test_summarize_ray_without_ray_installed_says_how(monkeypatch, tmp_path, capsys):
    missing = EntryPoint("ray", "no_such_module_for_lookahead_ray:run", "any")  # registered, not importable
    monkeypatch.setattr(argtypes, "entry_points", lambda group: [missing])
    docs = corpus(tmp_path / "docs", 1)
    assert main(["summarize", str(docs), "--out", str(tmp_path / "out"), "--ray"]) == 2
    assert "pip install 'lookahead-rag[ray]'" in capsys.readouterr().err
