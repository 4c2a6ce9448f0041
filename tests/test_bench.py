"""The benchmark harness and CLI on a tiny random model (correctness of the plumbing, not speed)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FLAT_CURVE, save_chat_model

from lookahead.bench.cases import load_cases
from lookahead.bench.report import format_table, plot, summarize, write_json
from lookahead.bench.runner import BenchRunner
from lookahead.cli import main
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator

pytestmark = pytest.mark.usefixtures("single_thread")


CASES = [
    {"id": "q1", "task": "rag_qa", "question": "what is it", "documents": ["the cat sat on the mat", "a dog"],
     "max_new_tokens": 12},
    {"id": "s1", "task": "summarize", "documents": ["the rain in spain stays mainly in the plain"],
     "max_new_tokens": 10},
    {"id": "o1", "task": "open", "question": "tell a tale", "documents": [], "max_new_tokens": 8},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama + tokenizer with a chat template, saved like any local HF model."""
    return save_chat_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=3)


@pytest.fixture()
def case_file(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in CASES) + "\n")
    return path


def test_shipped_case_files_load():
    assert [len(load_cases(n)) for n in ("rag_qa", "summarize", "open")] == [30, 15, 10]
    assert len(load_cases("rag_qa", limit=3)) == 3


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"id": "a", "task": "chat", "documents": []}), "'task' must be one of"),
    (json.dumps({"id": "a", "task": "rag_qa", "documents": []}), "needs a string 'question'"),
    (json.dumps({"id": "a", "task": "open", "question": "q", "max_new_tokens": 0}), "positive integer"),
    (json.dumps({"id": "a", "task": "open", "question": "q", "documents": [1]}), "list of strings"),
    (json.dumps({"id": "", "task": "open", "question": "q"}), "'id' must be"),
])
def test_bad_case_lines_are_refused_with_the_line_number(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_cases(str(path))
    assert "bad.jsonl:1" in str(info.value)


def test_missing_case_file_names_the_builtins():
    with pytest.raises(FileNotFoundError, match="rag_qa, summarize, open"):
        load_cases("/nonexistent/cases.jsonl")


def test_runner_interleaves_methods_and_checks_exactness(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    generator = LookaheadGenerator(model, tokenizer, LookaheadConfig(), cost_curve=FLAT_CURVE)
    runner = BenchRunner(model, tokenizer, generator)
    cases = [dict(c) for c in CASES]
    runner.warm(cases[:1])
    results = runner.run(cases, ["vanilla", "pld", "lookahead"], rounds=2)
    runner.close()
    assert len(results) == 2 * 3 * 3
    assert [r.method for r in results[:3]] == ["vanilla", "pld", "lookahead"]  # interleaved case by case
    assert all(r.exact for r in results)
    assert all(r.steps >= 1 and r.new_tokens >= 1 for r in results)
    vanilla = [r for r in results if r.method == "vanilla"]
    assert all(r.steps == r.new_tokens for r in vanilla)  # one pass per token (prefill gives the first)
    rows = summarize(results)
    assert {(r["round"], r["method"]) for r in rows} >= {(1, "lookahead"), (2, "vanilla")}
    look = next(r for r in rows if r["method"] == "lookahead" and r["task"] == "rag_qa" and r["round"] == 2)
    assert look["exact"] == look["compared"] == 1 and look["speedup_vs_vanilla"] > 0
    for r in results:  # every greedy method measured its prefill; lookahead also its host time per step
        assert r.prefill_seconds is not None and 0 < r.prefill_seconds <= r.seconds
        assert r.decode_seconds == pytest.approx(r.seconds - r.prefill_seconds)
        assert (r.host_seconds_per_step is not None) == (r.method == "lookahead")
    for row in rows:
        assert row["decode_seconds"] == pytest.approx(row["seconds"] - row["prefill_seconds"])
        assert row["speedup_vs_vanilla_decode"] > 0 and row["speedup_vs_pld_decode"] > 0
        assert ("host_ms_per_step" in row) == (row["method"] == "lookahead")
    vanilla_row = next(r for r in rows if r["method"] == "vanilla" and r["round"] == 1 and r["task"] == "rag_qa")
    assert vanilla_row["speedup_vs_vanilla_decode"] == pytest.approx(1.0)
    table = format_table(rows)
    assert "vs vanilla" in table and "| 2 | rag_qa | lookahead |" in table
    assert "| vs vanilla | vs vanilla (decode) | vs pld |" in table
    assert table.splitlines()[0].endswith("| trie % | host ms/step |")
    look_line = next(line for line in table.splitlines() if "| 2 | rag_qa | lookahead |" in line)
    assert look_line.split("|")[-2].strip() == f"{look['host_ms_per_step']:.2f}"
    write_json(tmp_path / "r.json", {"x": 1}, results, rows)
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["results"]) == len(results) and data["meta"] == {"x": 1}
    assert all("decode_seconds" in r and "prefill_seconds" in r for r in data["results"])
    assert all("speedup_vs_vanilla_decode" in r for r in data["summary"])
    plot(tmp_path / "r.png", results)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bench_end_to_end(tiny_dir, case_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out.json"
    code = main(["bench", str(case_file), "--model", str(tiny_dir), "--methods", "vanilla,lookahead",
                 "--rounds", "2", "--json", str(out), "--plot", str(tmp_path / "p.png")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| 1 | open | lookahead |" in printed and "cost curve" in printed
    data = json.loads(out.read_text())
    assert all(r["exact"] for r in data["results"])
    assert (tmp_path / "p.png").exists()


def test_cli_bench_batch_size_writes_the_throughput_table(tiny_dir, case_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "batch.json"
    code = main(["bench", str(case_file), "--model", str(tiny_dir), "--batch-size", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| lookahead-batch | 2 | 3 |" in printed and "vs hf-batch" in printed
    data = json.loads(out.read_text())
    assert data["meta"]["batch_size"] == 2 and data["meta"]["dtype"] == "float32" and "cost_curve" in data["meta"]
    summary = {row["method"]: row for row in data["summary"]}
    assert set(summary) == {"lookahead-alone", "lookahead-batch", "hf-batch", "hf-alone"}
    for row in summary.values():
        assert {"exact", "near_tie", "hard", "requests", "tokens_per_second", "speedup_vs_hf_batch",
                "speedup_vs_lookahead_alone"} <= set(row)
    assert summary["lookahead-batch"]["exact"] == summary["lookahead-batch"]["requests"] == 3
    assert summary["hf-batch"]["speedup_vs_hf_batch"] == pytest.approx(1.0)
    for method, row in summary.items():  # host time per step: lookahead methods only, in the JSON and the table
        assert (row["host_ms_per_step"] is not None and row["host_ms_per_step"] > 0) == method.startswith("lookahead")
        line = next(li for li in printed.splitlines() if li.startswith(f"| {method} |"))
        cell = line.split("|")[-2].strip()
        assert cell == ("-" if row["host_ms_per_step"] is None else f"{row['host_ms_per_step']:.2f}")
    assert "| exact | host ms/step |" in printed
    rows = data["results"]
    assert len(rows) == 4 * 3 and {r["case_id"] for r in rows} == {c["id"] for c in CASES}
    batched = [r for r in rows if r["method"] == "lookahead-batch"]
    assert all(r["exact"] and r["agreement"] == "identical" and r["batch_size"] == 2 for r in batched)
    assert all(r["agreement"] in ("identical", "near-tie", "hard") for r in rows)
    assert sum(r["new_tokens"] for r in batched) == summary["lookahead-batch"]["new_tokens"]


def test_cli_errors_are_messages_not_tracebacks(case_file, capsys):
    assert main(["bench", str(case_file), "--methods", "vanilla,magic"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["bench", "/nonexistent.jsonl"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", "/nonexistent/model/dir"]) == 2
    assert "error:" in capsys.readouterr().err


def test_predicted_method_reports_prediction_counts_and_provenance(tiny_dir):
    """lookahead-predicted gets the case's prediction (here: the text of vanilla's own output, re-encoded: its
    tokens may split otherwise, so part of it is accepted) and reports the prediction token counts; both lookahead
    methods report provenance over the documents; all exact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    generator = LookaheadGenerator(model, tokenizer, LookaheadConfig(), cost_curve=FLAT_CURVE)
    runner = BenchRunner(model, tokenizer, generator)
    rag = {"id": "q2", "task": "rag_qa", "question": "What does `m.f` do?", "max_new_tokens": 16,
           "documents": ["a dog ran in the park", "m.f(x)\n\nthe cat sat on the mat"]}
    edit = {"id": "e1", "task": "open", "question": "the rain in spain", "documents": [], "max_new_tokens": 24}
    expected = runner.run_method("vanilla", edit, 0).token_ids
    edit["prediction"] = tokenizer.decode(expected)
    results = runner.run([rag, edit], ["vanilla", "lookahead", "lookahead-predicted"])
    runner.close()
    assert all(r.exact for r in results)
    got = {(r.case_id, r.method): r for r in results}
    predicted = got["e1", "lookahead-predicted"]
    assert predicted.token_ids == expected
    # the re-encoded text splits into other tokens than the output: drafting it gets some accepted, some rejected
    assert tokenizer(edit["prediction"], add_special_tokens=False)["input_ids"] != expected
    accepted, rejected = predicted.accepted_prediction_tokens, predicted.rejected_prediction_tokens
    assert 0 < accepted < predicted.new_tokens and rejected > 0
    assert accepted + rejected <= predicted.draft_tokens  # every counted token was drafted and verified
    assert predicted.tokens_per_step > got["e1", "vanilla"].tokens_per_step
    for key in [("e1", "lookahead"), ("q2", "lookahead-predicted"), ("q2", "vanilla")]:
        assert got[key].accepted_prediction_tokens is None  # no prediction used
    for method in ("lookahead", "lookahead-predicted"):
        traced = got["q2", method]
        assert traced.question_document == 1
        assert [doc["index"] for doc in traced.provenance] == [0, 1]
        for doc in traced.provenance:
            assert doc["share"] == pytest.approx(doc["tokens"] / traced.new_tokens)
            assert sum(end - start for start, end in doc["spans"]) == doc["tokens"]
        assert sum(doc["tokens"] for doc in traced.provenance) <= traced.new_tokens
        copied = [doc["tokens"] for doc in traced.provenance]
        assert traced.top_document == (copied.index(max(copied)) if max(copied) > copied[1 - copied.index(max(copied))]
                                       else None)
        assert traced.top_is_question_document == (traced.top_document == 1)
        assert got["e1", method].provenance is None  # no documents, no provenance
    assert got["q2", "vanilla"].provenance is None
    rows = summarize(results)
    row = next(r for r in rows if r["method"] == "lookahead-predicted" and r["task"] == "open")
    assert row["accepted_prediction_tokens"] == predicted.accepted_prediction_tokens
    assert row["speedup_vs_vanilla"] > 0 and row["exact"] == row["compared"] == 1
    assert "| pred acc | pred rej |" in format_table(rows)
    rag_row = next(r for r in rows if r["method"] == "lookahead" and r["task"] == "rag_qa")
    assert rag_row["question_document_cases"] == 1
    assert rag_row["question_document_top"] == int(bool(got["q2", "lookahead"].top_is_question_document))


def test_predicted_method_starts_from_lookaheads_warm_trie(tiny_dir):
    """lookahead-predicted's own trie starts as a copy of what the warm-up taught lookahead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    generator = LookaheadGenerator(model, tokenizer, LookaheadConfig(), cost_curve=FLAT_CURVE)
    runner = BenchRunner(model, tokenizer, generator)
    runner.warm([dict(CASES[0])])
    learned = generator.trie.num_nodes()
    assert learned > 0
    assert runner.predicted.trie is not generator.trie and runner.predicted.trie.num_nodes() == learned
    runner.close()
