"""scripts/gpu_check.py end to end on a tiny random model on the CPU (the sections of its report, not speed)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from conftest import load_script, save_chat_model

pytestmark = pytest.mark.usefixtures("single_thread")

QUESTIONS = Path(__file__).parent / "data" / "spec_bench_questions.jsonl"  # Spec-Bench's format, our own questions

CASES = [
    {"id": "q1", "task": "rag_qa", "question": "what is it", "documents": ["the cat sat on the mat", "a dog"],
     "max_new_tokens": 12},
    {"id": "q2", "task": "rag_qa", "question": "where is the cat", "documents": ["the cat sat on the mat"],
     "max_new_tokens": 10},
]


def gpu_check() -> ModuleType:
    """scripts/gpu_check.py as a module."""
    return load_script("gpu_check")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama + tokenizer with a chat template, saved like any local HF model."""
    return save_chat_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=3)


@pytest.fixture()
def case_file(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in CASES) + "\n")
    return path


def test_report_has_every_section(tiny_dir, case_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path / "cache"))
    out, numbers = tmp_path / "report.md", tmp_path / "report.json"
    code = gpu_check().main(["--model", str(tiny_dir), "--device", "cpu", "--cases", str(case_file), "--limit", "2",
                             "--quick", "--batch-size", "2", "--contexts", "16,1000", "--out", str(out),
                             "--json", str(numbers)])
    report = capsys.readouterr().out
    assert code == 0
    assert out.read_text() == report
    for heading in ("# lookahead device check", "## 1. Exactness", "## 2. Tree verification cost",
                    "## 3. Speedups at batch 1", "## 4. Batched throughput at batch 2", "## Verdict"):
        assert heading in report, heading
    assert "dtype float32" in report and "device: cpu" in report
    assert f"| {case_file} | 2 | 2 | 0 | 0 | 0 | 0 |" in report  # float32: lookahead and nodraft equal HF greedy
    assert "| 16 | 1 | " in report and "| 16 | 2 | " in report
    assert "| 447 | 1 | " in report  # 1000 shortened to fit the tiny model's 512 positions (and a 64-token tree)
    assert "| 1 | rag_qa | lookahead |" in report and "vs vanilla (decode)" in report
    assert "| 1 | rag_qa | nodraft |" in report and "| engine: nodraft vs vanilla |" in report
    assert "## 5. Spec-Bench" not in report
    assert "| lookahead-batch | 2 | 2 |" in report and "| hf-batch | 2 | 2 |" in report
    assert "PASS: no hard mismatch" in report
    data = json.loads(numbers.read_text())
    assert data["exactness"][str(case_file)] == {"compared": 2, "identical": 2, "near_tie": 0, "hard": 0,
                                                 "nodraft_hard": 0, "batch_hard": 0}
    assert [(c["context"], c["batch"]) for c in data["tree_cost"]] == [(16, 1), (16, 2), (447, 1), (447, 2)]
    assert data["tree_cost"][0]["sizes"][-1] == 64 and data["tree_cost"][1]["sizes"][-1] == 64  # 2 x 64 <= 256
    assert {r["method"] for r in data["bench"][str(case_file)]} == {"vanilla", "pld", "nodraft", "lookahead"}
    assert {r["method"] for r in data["batch"][str(case_file)]} == {"lookahead-alone", "lookahead-batch", "hf-batch"}
    assert data["meta"]["max_new_tokens"] == 32 and data["failed"] is False


def test_spec_bench_only_runs_the_spec_bench_table(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path / "cache"))
    numbers = tmp_path / "spec.json"
    code = gpu_check().main(["--model", str(tiny_dir), "--device", "cpu", "--spec-bench", str(QUESTIONS),
                             "--spec-bench-only", "--categories", "mt_bench,rag", "--questions-per-task", "1",
                             "--max-new-tokens", "4", "--warm-round", "--json", str(numbers)])
    report = capsys.readouterr().out
    assert code == 0
    assert "## 5. Spec-Bench at batch 1" in report and "## 1. Exactness" not in report and "## 2. Tree" not in report
    assert "| Method | Multi-turn Conversation | Retrieval-aug. Generation | #Mean Accepted Tokens |" in report
    for label in ("vanilla", "pld", "nodraft", "lookahead", "lookahead (warm store)"):
        assert f"\n| {label} | " in report, label
    assert "| engine: nodraft vs vanilla |" in report and "turn 2: speedup" in report
    assert "nodraft 6/6 identical" in report and "lookahead 6/6 identical" in report  # 3 turns, 2 rounds
    assert "PASS: no hard mismatch" in report and "Spec-Bench: `" in report
    data = json.loads(numbers.read_text())
    spec = data["spec_bench"]
    assert spec["tasks"] == ["mt_bench", "rag"] and spec["exactness"]["lookahead"]["hard"] == 0
    assert len(spec["results"]) == 3 * 4 + 3 * 3 and all(r["new_tokens"] <= 4 for r in spec["results"])
    assert data["bench"] == {} and data["tree_cost"] == [] and data["failed"] is False


def test_quick_caps_answers_and_contexts():
    args = gpu_check().parse_args(["--quick"])
    assert args.contexts == gpu_check().QUICK_CONTEXTS and args.max_new_tokens == gpu_check().QUICK_MAX_NEW_TOKENS
    assert args.cases == ["rag_qa"] and args.device == "cuda" and args.dtype == "auto"
    full = gpu_check().parse_args([])
    assert full.cases == ["rag_qa", "long_rag"] and full.max_new_tokens is None
    assert full.contexts == (256, 1024, 4096, 8192)
    capped = gpu_check().capped([{"id": "a", "max_new_tokens": 128}, {"id": "b", "max_new_tokens": 8}], 32)
    assert [c["max_new_tokens"] for c in capped] == [32, 8]


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check().parse_args(["--contexts", "128,zero"])
    assert "--contexts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check().parse_args(["--spec-bench-only", "--categories", "rag"])
    assert "--categories, --spec-bench-only need --spec-bench PATH" in capsys.readouterr().err
    assert gpu_check().main(["--device", "cpu", "--spec-bench", "/nonexistent/question.jsonl"]) == 2
    assert "data/spec_bench/question.jsonl" in capsys.readouterr().err
    assert gpu_check().main(["--model", "/nonexistent/model/dir", "--device", "cpu", "--cases", "rag_qa",
                             "--limit", "1"]) == 2
    assert "error:" in capsys.readouterr().err
