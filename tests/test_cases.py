"""Tests for the committed benchmark case files in lookahead/bench/cases/ and the script that builds them."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import load_script

from lookahead.bench.cases import load_cases

CASES = resources.files("lookahead.bench") / "cases"
EXPECTED = {
    "rag_qa.jsonl": ("rag_qa", 30, "rag-", 96),
    "summarize.jsonl": ("summarize", 15, "sum-", 128),
    "open.jsonl": ("open", 10, "open-", 96),
}
ALLOWED_KEYS = {"id", "task", "question", "documents", "max_new_tokens"}
QUICK = ("rag_qa", "summarize", "open")  # the files built without a tokenizer
LONG_KEYS = ALLOWED_KEYS | {"prompt_tokens", "python"}
LONG_COUNT, LONG_MAX_NEW_TOKENS = 8, 128


def load(file_name: str) -> list[dict[str, Any]]:
    text = (CASES / file_name).read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def make_cases() -> ModuleType:
    """scripts/make_cases.py as a module."""
    return load_script("make_cases")


def answer_name(question: str) -> str:
    match = re.search(r"`([\w.]+)`", question)
    assert match, question
    return match.group(1)


def mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


@pytest.mark.parametrize("file_name", sorted(EXPECTED))
def test_case_file_schema(file_name: str) -> None:
    task, count, prefix, max_new_tokens = EXPECTED[file_name]
    cases = load(file_name)
    assert len(cases) == count
    assert [case["id"] for case in cases] == [f"{prefix}{index:03d}" for index in range(count)]
    for case in cases:
        assert set(case) <= ALLOWED_KEYS
        assert {"id", "task", "documents", "max_new_tokens"} <= set(case)
        assert case["task"] == task
        assert type(case["max_new_tokens"]) is int and case["max_new_tokens"] == max_new_tokens
        assert isinstance(case["documents"], list)
        assert all(isinstance(doc, str) and doc.strip() for doc in case["documents"])
        if task in ("rag_qa", "open"):
            assert isinstance(case["question"], str) and case["question"].strip()
        else:
            assert case.get("question") is None


def test_ids_are_unique_across_files() -> None:
    ids = [case["id"] for file_name in EXPECTED for case in load(file_name)]
    assert len(ids) == len(set(ids))


def test_rag_documents_hold_the_answer_exactly_once() -> None:
    cases = load("rag_qa.jsonl")
    names = [answer_name(case["question"]) for case in cases]
    assert len(set(names)) == len(names)
    assert (
        len({case["question"].replace(name, "") for case, name in zip(cases, names, strict=True)}) > 1
    )  # varied templates
    for case, name in zip(cases, names, strict=True):
        docs = case["documents"]
        assert len(docs) == 3
        assert len(set(docs)) == 3
        assert sum(doc.startswith(f"{name}(") for doc in docs) == 1
        assert sum(name in doc for doc in docs) == 1
        assert sum(mentions(doc, name.rsplit(".", 1)[-1]) for doc in docs) == 1
        for doc in docs:
            heading, body = doc.split("\n\n", 1)
            assert re.fullmatch(r"[\w.]+\(.*\)", heading), heading
            assert 300 <= len(body) <= 1500


def test_answers_are_not_always_in_the_same_position() -> None:
    positions = set()
    for case in load("rag_qa.jsonl"):
        name = answer_name(case["question"])
        positions.add(next(i for i, doc in enumerate(case["documents"]) if doc.startswith(f"{name}(")))
    assert positions == {0, 1, 2}


def test_summarize_documents_are_long_and_distinct() -> None:
    cases = load("summarize.jsonl")
    docs = [case["documents"] for case in cases]
    assert all(len(case_docs) == 1 for case_docs in docs)
    assert len({case_docs[0] for case_docs in docs}) == len(docs)
    for (doc,) in docs:
        heading, body = doc.split("\n\n", 1)
        assert heading.startswith("The ")
        assert 800 <= len(body) <= 2500


def test_open_cases_have_no_documents() -> None:
    assert all(case["documents"] == [] for case in load("open.jsonl"))


def test_documents_hold_no_memory_addresses() -> None:
    for file_name in EXPECTED:
        for case in load(file_name):
            assert not any(" at 0x" in doc for doc in case["documents"])


def test_script_is_deterministic() -> None:
    module = make_cases()
    first = module.build(QUICK)
    assert first == module.build(QUICK)
    assert set(first) == set(EXPECTED)
    assert first["open.jsonl"] == (CASES / "open.jsonl").read_text(encoding="utf-8")
    for file_name, (_, count, _, _) in EXPECTED.items():
        assert first[file_name].count("\n") == count


def test_script_check_mode(tmp_path: Path) -> None:
    module = make_cases()
    only = [arg for name in QUICK for arg in ("--only", name)]
    assert module.main(["--out", str(tmp_path), *only]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(EXPECTED)
    assert module.main(["--out", str(tmp_path), "--check", *only]) == 0
    (tmp_path / "open.jsonl").write_text("", encoding="utf-8")
    assert module.main(["--out", str(tmp_path), "--check", *only]) == 1


def test_plain_english_filter() -> None:
    module = make_cases()
    assert module.is_plain_english("Return the sum of the numbers in the given list, or zero when it is empty.")
    assert not module.is_plain_english("Add two numbers.\n\n>>> add(1, 2)\n3")
    assert not module.is_plain_english("x = {'a': [1, 2, 3], 'b': (4, 5, 6)} # 0x1f 0x2e 0x3d")


# ---------------------------------------------------------------------------------------------------- long_rag


@pytest.fixture(scope="module")
def count_tokens():
    """Prompt tokens of a case with the default model's tokenizer (what make_cases.py measured with)."""
    return make_cases().default_token_counter()


def test_long_rag_schema() -> None:
    cases = load("long_rag.jsonl")
    assert [case["id"] for case in cases] == [f"long-{index:03d}" for index in range(LONG_COUNT)]
    for case in cases:
        assert set(case) == LONG_KEYS
        assert case["task"] == "rag_qa"
        assert type(case["max_new_tokens"]) is int and case["max_new_tokens"] == LONG_MAX_NEW_TOKENS
        assert re.fullmatch(r"3\.\d+", case["python"])  # the docstrings' Python version
        assert len(case["documents"]) >= 15 and len(set(case["documents"])) == len(case["documents"])
        assert all(isinstance(doc, str) and doc.strip() and " at 0x" not in doc for doc in case["documents"])


def test_long_rag_prompts_are_long(count_tokens) -> None:
    low, high = make_cases().LONG_PROMPT_TOKENS
    for case in load("long_rag.jsonl"):
        tokens = count_tokens(case)
        assert tokens == case["prompt_tokens"], case["id"]
        assert low <= tokens <= high, (case["id"], tokens)


def test_long_rag_documents_hold_the_answer_exactly_once() -> None:
    cases = load("long_rag.jsonl")
    names = [answer_name(case["question"]) for case in cases]
    assert len(set(names)) == len(names)
    assert not set(names) & {answer_name(case["question"]) for case in load("rag_qa.jsonl")}
    for case, name in zip(cases, names, strict=True):
        docs = case["documents"]
        assert sum(doc.startswith(f"{name}(") for doc in docs) == 1
        assert sum(mentions(doc, name.rsplit(".", 1)[-1]) for doc in docs) == 1
    positions = {next(i for i, doc in enumerate(case["documents"]) if doc.startswith(f"{name}("))
                 for case, name in zip(cases, names, strict=True)}
    assert len(positions) > 1


def test_long_rag_loads_by_name() -> None:
    cases = load_cases("long_rag", limit=2)
    assert [case["id"] for case in cases] == ["long-000", "long-001"]


def test_long_rag_builder_fills_the_token_range() -> None:
    """The builder on a synthetic pool with a character-count tokenizer: lengths in range, deterministic."""
    module = make_cases()
    docs = [module.Doc(name=f"mod{i % 3}.func{i}", heading=f"mod{i % 3}.func{i}(x)", text="word " * (40 + 7 * i))
            for i in range(200)]

    def count(case: dict[str, Any]) -> int:
        return sum(len(doc) for doc in case["documents"]) // 4 + len(case["question"])

    def run() -> list[dict[str, Any]]:
        return module.long_rag_cases(module.random.Random(5), count, docs[:20], docs, frozenset({"mod0.func0"}))

    cases = run()
    assert cases == run()
    assert len(cases) == LONG_COUNT
    low, high = module.LONG_PROMPT_TOKENS
    for case in cases:
        assert low <= case["prompt_tokens"] <= high and case["prompt_tokens"] == count(case)
        assert "`mod0.func0`" not in case["question"]
        assert sum(doc.startswith(answer_name(case["question"]) + "(") for doc in case["documents"]) == 1


# ---------------------------------------------------------------------------------------------------- edit

EDIT_KEYS = {"id", "task", "question", "documents", "max_new_tokens", "prediction"}
EDIT_COUNT, EDIT_MAX_NEW_TOKENS = 12, 300
EDIT_PREFIX = "Rewrite the following text with this change: "


def test_edit_schema() -> None:
    cases = load("edit.jsonl")
    assert [case["id"] for case in cases] == [f"edit-{index:03d}" for index in range(EDIT_COUNT)]
    for case in cases:
        assert set(case) == EDIT_KEYS
        assert case["task"] == "open" and case["documents"] == []
        assert type(case["max_new_tokens"]) is int and case["max_new_tokens"] == EDIT_MAX_NEW_TOKENS
        assert case["question"].startswith(EDIT_PREFIX)
        # the prediction is the text to edit, exactly as the question shows it
        assert case["question"].endswith("Text: " + case["prediction"])
        assert 300 <= len(case["prediction"]) <= 1200 and " at 0x" not in case["prediction"]
    assert len({case["prediction"] for case in cases}) == EDIT_COUNT


def test_edit_cases_cover_every_kind_of_change() -> None:
    changes = [case["question"][len(EDIT_PREFIX):].split(". Output only", 1)[0] for case in load("edit.jsonl")]
    kinds = {change.split(" ", 2)[0] + " " + change.split(" ", 2)[1] for change in changes}
    assert kinds == {"correct the", "replace the", "change the"}
    assert any(c.startswith("replace the sentence") for c in changes)
    assert any(c.startswith("replace the word") for c in changes)
    for case, change in zip(load("edit.jsonl"), changes, strict=True):
        if change.startswith("correct the misspelled word"):
            typo = change.split('"')[1]
            assert mentions(case["prediction"], typo)  # the text to edit holds the misspelling
        elif change.startswith(("replace the word", "replace the sentence")):
            assert change.split('"')[1] in case["prediction"]
        else:
            assert mentions(case["prediction"], change.split()[3])  # change the number N to M


def test_edit_loads_by_name_with_its_predictions() -> None:
    cases = load_cases("edit")
    assert len(cases) == EDIT_COUNT and all(isinstance(case["prediction"], str) for case in cases)


def test_edit_script_check_mode(tmp_path: Path) -> None:
    module = make_cases()
    assert module.build(("edit",))["edit.jsonl"] == (CASES / "edit.jsonl").read_text(encoding="utf-8")
    assert module.main(["--out", str(tmp_path), "--only", "edit"]) == 0
    assert module.main(["--out", str(tmp_path), "--check", "--only", "edit"]) == 0
    (tmp_path / "edit.jsonl").write_text("", encoding="utf-8")
    assert module.main(["--out", str(tmp_path), "--check", "--only", "edit"]) == 1


def test_edit_builder_refuses_a_change_its_docstring_lacks() -> None:
    module = make_cases()
    with pytest.raises(SystemExit, match="not in its docstring"):
        module.edit_case(0, module.Edit("textwrap.dedent", "word", "elephant", "mouse"))
    case = module.edit_case(3, module.Edit("textwrap.dedent", "typo", "whitespace", "whitepsace"))
    assert case["id"] == "edit-003" and "whitepsace" in case["prediction"] and case["question"].count("whitepsace") == 2
