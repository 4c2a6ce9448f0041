"""Spec-Bench in ``lookahead bench``: reading question.jsonl (a small file of our own in its format), conversations,
the nodraft method and the leaderboard-shaped table, on a tiny random model (the plumbing, not speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FLAT_CURVE, save_chat_model

from lookahead.bench.report import format_factors, format_table, summarize
from lookahead.bench.runner import BenchRunner, CaseResult, turn_case
from lookahead.bench.spec_bench import cap_per_task, load_spec_bench, rag_parts, read_questions, summary_article
from lookahead.bench.spec_table import factor_rows, spec_report, spec_rows, turn_rows
from lookahead.cli import main
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator

pytestmark = pytest.mark.usefixtures("single_thread")

QUESTIONS = Path(__file__).parent / "data" / "spec_bench_questions.jsonl"
TASKS = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama + tokenizer with a chat template, saved like any local HF model."""
    return save_chat_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=3)


@pytest.fixture(scope="module")
def runner(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    bench = BenchRunner(model, tokenizer, LookaheadGenerator(model, tokenizer, LookaheadConfig(),
                                                             cost_curve=FLAT_CURVE))
    yield bench
    bench.close()


# ---------------------------------------------------------------------------------------------------- reading


def test_every_category_becomes_a_task_case():
    cases = load_spec_bench(QUESTIONS, max_new_tokens=7)
    assert [c["task"] for c in cases] == ["mt_bench", "mt_bench", *TASKS[1:]]
    assert [c["id"] for c in cases][:3] == ["mt_bench-81", "mt_bench-91", "translation-161"]
    assert all(c["max_new_tokens"] == 7 for c in cases)
    talk = cases[0]
    assert talk["category"] == "writing" and len(talk["turns"]) == 2 and talk["documents"] == []
    rag = next(c for c in cases if c["task"] == "rag")
    assert rag["question"] == "What is a forest?" and len(rag["documents"]) == 3
    assert rag["documents"][0].startswith("Forest A forest is")
    assert rag["turns"] == read_questions(QUESTIONS)[-1]["turns"]
    summary = next(c for c in cases if c["task"] == "summarization")
    assert summary["documents"] == [summary["turns"][0].removeprefix("Summarize: ")]


def test_rag_and_summary_splits():
    assert rag_parts("p one\n\np two \nthe question?\n") == (["p one", "p two"], "the question?")
    assert summary_article("Summarize: the text") == "the text"
    assert summary_article("Tell me about it") is None and summary_article("Summarize:  ") is None


def test_categories_pick_tasks_or_categories_and_unknown_ones_are_listed():
    assert {c["task"] for c in load_spec_bench(QUESTIONS, ["rag", "qa"])} == {"rag", "qa"}
    assert [c["category"] for c in load_spec_bench(QUESTIONS, ["mt_bench"])] == ["writing", "roleplay"]
    assert [c["category"] for c in load_spec_bench(QUESTIONS, ["roleplay"])] == ["roleplay"]
    with pytest.raises(ValueError, match="unknown Spec-Bench category chat") as info:
        load_spec_bench(QUESTIONS, ["rag", "chat"])
    assert "mt_bench, translation, summarization, qa, math_reasoning, rag" in str(info.value)
    assert "roleplay" in str(info.value) and "writing" in str(info.value)


def test_questions_per_task_spread_over_a_tasks_categories():
    questions = [{"question_id": i, "category": c, "turns": ["q"]}
                 for i, c in enumerate(["writing", "writing", "roleplay", "roleplay", "rag", "rag", "rag"])]
    kept = cap_per_task(questions, 2)
    assert [q["question_id"] for q in kept] == [0, 2, 4, 5]  # one writing, one roleplay; the first two rag
    assert cap_per_task(questions, None) == questions
    assert len(load_spec_bench(QUESTIONS, per_task=1)) == 6


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"category": "qa", "turns": ["q"]}), "'question_id'"),
    (json.dumps({"question_id": 1, "category": "", "turns": ["q"]}), "'category'"),
    (json.dumps({"question_id": 1, "category": "qa", "turns": []}), "'turns'"),
    (json.dumps({"question_id": 1, "category": "qa", "turns": ["q", 3]}), "'turns'"),
])
def test_malformed_lines_are_refused_with_their_line_number(tmp_path, line, message):
    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps({"question_id": 0, "category": "qa", "turns": ["fine"]}) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        read_questions(path)
    assert "question.jsonl:3" in str(info.value)


def test_missing_empty_or_duplicated_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="data/spec_bench/question.jsonl"):
        read_questions(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no questions"):
        read_questions(tmp_path / "empty.jsonl")
    line = json.dumps({"question_id": 5, "category": "qa", "turns": ["q"]})
    (tmp_path / "twice.jsonl").write_text(f"{line}\n{line}\n")
    with pytest.raises(ValueError, match="twice.jsonl:2: duplicate question_id 5"):
        read_questions(tmp_path / "twice.jsonl")


# ---------------------------------------------------------------------------------------------------- running


def test_turn_two_follows_the_methods_own_first_answer():
    case = {"id": "c", "task": "mt_bench", "turns": ["first?", "second?"], "documents": [], "max_new_tokens": 4}
    assert turn_case(case, 0, [])["messages"] == [{"role": "user", "content": "first?"}]
    second = turn_case(case, 1, ["my answer"])
    assert second["turn"] == 2 and second["messages"] == [
        {"role": "user", "content": "first?"}, {"role": "assistant", "content": "my answer"},
        {"role": "user", "content": "second?"}]
    plain = {"id": "p", "task": "open", "question": "q", "documents": [], "max_new_tokens": 4}
    assert turn_case(plain, 0, []) is plain


def test_runner_asks_conversations_turn_by_turn_and_nodraft_drafts_nothing(runner):
    cases = load_spec_bench(QUESTIONS, ["writing", "rag"], max_new_tokens=6)
    results = runner.run(cases, ["vanilla", "nodraft", "lookahead"])
    assert [(r.case_id, r.turn, r.method) for r in results[:6]] == [
        ("mt_bench-81", t, m) for t in (1, 2) for m in ("vanilla", "nodraft", "lookahead")]
    assert all(r.exact for r in results)
    turn2 = next(r for r in results if r.turn == 2 and r.method == "lookahead")
    first = next(r for r in results if r.turn == 1 and r.method == "lookahead")
    answer = runner.answer_text(first.token_ids)
    asked = turn_case(cases[0], 1, [answer])
    assert turn2.prompt_tokens == len(runner.prompt_ids(asked)) > first.prompt_tokens
    assert answer in runner.tokenizer.decode(runner.prompt_ids(asked))
    nodraft = [r for r in results if r.method == "nodraft"]
    assert all(r.draft_tokens == 0 and r.steps == r.new_tokens for r in nodraft)  # one token per pass
    assert all(r.host_seconds_per_step is not None and r.provenance is None for r in nodraft)
    assert runner.nodraft.config.decoding_length == 0 and runner.nodraft.trie is not runner.generator.trie
    rag = next(r for r in results if r.task == "rag" and r.method == "lookahead")
    assert rag.turn == 1 and [doc["index"] for doc in rag.provenance] == [0, 1, 2]
    rows = summarize(results)
    look = next(r for r in rows if r["method"] == "lookahead" and r["task"] == "rag")
    assert look["speedup_vs_nodraft"] > 0
    assert "| vs nodraft |" in format_table(rows)
    factors = format_factors(rows)
    assert "| engine: nodraft vs vanilla | drafting: lookahead vs nodraft |" in factors
    assert "| 1 | mt_bench |" in factors and "| 1 | rag |" in factors


# ---------------------------------------------------------------------------------------------------- the table


def fake(method: str, case_id: str, task: str, tokens: int, seconds: float, steps: int, round_index: int = 1,
         turn: int | None = 1) -> CaseResult:
    return CaseResult(round=round_index, case_id=case_id, task=task, method=method, prompt_tokens=5,
                      new_tokens=tokens, seconds=seconds, steps=steps, token_ids=[1] * tokens, turn=turn,
                      exact=None if method == "vanilla" else True)


def test_table_speedups_are_spec_benchs_mean_tokens_per_second():
    results = [
        fake("vanilla", "rag-1", "rag", 10, 1.0, 10), fake("vanilla", "rag-2", "rag", 10, 2.0, 10),
        fake("nodraft", "rag-1", "rag", 10, 0.5, 10), fake("nodraft", "rag-2", "rag", 10, 1.0, 10),
        fake("lookahead", "rag-1", "rag", 10, 0.25, 4), fake("lookahead", "rag-2", "rag", 10, 0.5, 6),
        fake("vanilla", "mt-1", "mt_bench", 10, 1.0, 10), fake("vanilla", "mt-1", "mt_bench", 10, 1.0, 10, turn=2),
        fake("nodraft", "mt-1", "mt_bench", 10, 1.0, 10), fake("nodraft", "mt-1", "mt_bench", 10, 1.0, 10, turn=2),
        fake("lookahead", "mt-1", "mt_bench", 10, 1.0, 5), fake("lookahead", "mt-1", "mt_bench", 10, 0.25, 2, turn=2),
        fake("vanilla", "rag-1", "rag", 10, 1.0, 10, 2), fake("nodraft", "rag-1", "rag", 10, 0.5, 10, 2),
        fake("lookahead", "rag-1", "rag", 10, 0.1, 2, 2),
    ]
    rows = {r["label"]: r for r in spec_rows(results)}
    assert list(rows) == ["vanilla", "nodraft", "lookahead", "lookahead (warm store)"]
    assert rows["vanilla"]["speedup"]["rag"] == pytest.approx(1.0) and rows["vanilla"]["tokens_per_step"] == 1.0
    assert rows["nodraft"]["speedup"]["rag"] == pytest.approx(2.0)  # (20 + 10) / 2 over (10 + 5) / 2
    assert rows["lookahead"]["speedup"]["rag"] == pytest.approx(4.0)
    assert rows["lookahead"]["speedup"]["mt_bench"] == pytest.approx(1.6)  # 20 tokens in 1.25 s over 20 in 2 s
    assert rows["lookahead"]["speedup"]["overall"] == pytest.approx((40 + 20 + 16) / 3 / ((10 + 5 + 10) / 3))
    assert rows["lookahead"]["tokens_per_step"] == pytest.approx(40 / 17)
    assert rows["lookahead"]["exact"] == rows["lookahead"]["compared"] == 4
    assert rows["lookahead (warm store)"]["speedup"]["rag"] == pytest.approx(10.0)
    factors = {f["label"]: f["speedup"] for f in factor_rows(results)}
    assert factors["engine: nodraft vs vanilla"]["rag"] == pytest.approx(2.0)
    assert factors["drafting: lookahead vs nodraft"]["rag"] == pytest.approx(2.0)
    assert factors["drafting: lookahead (warm store) vs nodraft"]["rag"] == pytest.approx(5.0)
    turns = {t["label"]: t for t in turn_rows(results)}
    assert set(turns) == {"vanilla", "nodraft", "lookahead"}  # only mt-1 has a second turn (round 1 only)
    assert turns["lookahead"]["turn1_speedup"] == pytest.approx(1.0)
    assert turns["lookahead"]["turn2_speedup"] == pytest.approx(4.0)
    assert turns["lookahead"]["turn2_tokens_per_step"] == pytest.approx(5.0)
    text, data = spec_report(results)
    assert data["tasks"] == ["mt_bench", "rag"]
    assert ("| Method | Multi-turn Conversation | Retrieval-aug. Generation | #Mean Accepted Tokens | Overall | exact |"
            in text)
    assert "| lookahead | 1.60x | 4.00x | 2.35 | 3.04x | 4/4 |" in text
    assert "| lookahead (warm store) | - | 10.00x | 5.00 | 10.00x | 1/1 |" in text
    assert "| drafting: lookahead vs nodraft | 1.60x | 2.00x |" in text
    assert "| lookahead | 1.00x | 2.00 | 4.00x | 5.00 |" in text


# ---------------------------------------------------------------------------------------------------- the CLI


def test_cli_spec_bench_prints_the_table_and_keeps_every_case(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "spec.json"
    code = main(["bench", "--spec-bench", str(QUESTIONS), "--model", str(tiny_dir), "--categories",
                 "mt_bench,rag,qa", "--questions-per-task", "1", "--max-new-tokens", "5", "--warm-round",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| Method | Multi-turn Conversation | Question Answering | Retrieval-aug. Generation |" in printed
    for label in ("vanilla", "pld", "nodraft", "lookahead", "lookahead (warm store)"):
        assert f"\n| {label} | " in printed, label
    assert "| engine: nodraft vs vanilla |" in printed and "| drafting: lookahead (warm store) vs nodraft |" in printed
    assert "turn 1: speedup" in printed
    data = json.loads(out.read_text())
    spec = data["meta"]["spec_bench"]
    assert spec["questions"] == 3 and spec["max_new_tokens"] == 5 and spec["tasks"] == ["mt_bench", "qa", "rag"]
    assert [r["label"] for r in spec["rows"]][-1] == "lookahead (warm store)"
    results = data["results"]
    assert len(results) == 4 * 4 + 3 * 4  # round 1: 4 turns x 4 methods; warm round: 4 turns x 3 methods
    assert {r["turn"] for r in results if r["case_id"] == "mt_bench-81"} == {1, 2}
    assert all(r["exact"] for r in results if r["method"] != "vanilla")
    assert all(r["new_tokens"] <= 5 for r in results)


@pytest.mark.parametrize("argv, message", [
    (["--spec-bench", "/nonexistent/question.jsonl"], "not found"),
    (["--spec-bench", str(QUESTIONS), "--categories", "chat"], "unknown Spec-Bench category chat"),
    (["rag_qa", "--spec-bench", str(QUESTIONS)], "not both"),
    (["--spec-bench", str(QUESTIONS), "--limit", "2"], "--questions-per-task"),
    ([], "--spec-bench PATH"),
    (["rag_qa", "--categories", "rag"], "pass --spec-bench PATH"),
    (["--spec-bench", str(QUESTIONS), "--batch-size", "2"], "batch 1"),
    (["--spec-bench", str(QUESTIONS), "--methods", "vanilla,magic"], "unknown method"),
])
def test_cli_spec_bench_errors_are_messages(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err
