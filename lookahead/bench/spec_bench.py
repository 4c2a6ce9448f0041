"""Spec-Bench (hemingkx/Spec-Bench, Apache-2.0) as benchmark cases: the user's copy of its
``data/spec_bench/question.jsonl`` read as published (nothing is downloaded, nothing is shipped).

Each line is ``{"question_id": int, "category": str, "turns": [str, ...], "reference": [...]}``. The eight MT-bench
categories (writing, roleplay, ...) form the task ``mt_bench``, two-turn conversations; every other category is a
task of its own (translation, summarization, qa, math_reasoning, rag). A question becomes one case whose ``turns``
are asked in order as a conversation (:func:`lookahead.bench.runner.turn_case`); the user's message is the turn's
text as written, through the model's chat template. A RAG turn gives its retrieved passages one per line and the
question on the last line, a summarization turn ``Summarize: <article>``: those passages and that article become the
case's ``documents`` (provenance per passage; the drafter already counts them as part of the prompt).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from itertools import chain, zip_longest
from pathlib import Path
from typing import Any

from .cases import json_lines

#: Spec-Bench's tasks in its leaderboard's column order, with the column headings
TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
HEADINGS = {"mt_bench": "Multi-turn Conversation", "translation": "Translation", "summarization": "Summarization",
            "qa": "Question Answering", "math_reasoning": "Mathematical Reasoning",
            "rag": "Retrieval-aug. Generation"}
#: the categories of the ``mt_bench`` task (Spec-Bench's evaluation/speed.py)
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SUMMARIZE_PREFIX = "Summarize:"
DEFAULT_MAX_NEW_TOKENS = 128  # Spec-Bench uses 1024; 128 keeps a CPU run in minutes


def task_of(category: str) -> str:
    """The Spec-Bench task of a question category (an MT-bench category is ``mt_bench``)."""
    return "mt_bench" if category in MT_BENCH else category


def check_question(raw: Any, where: str) -> dict[str, Any]:
    """One line of question.jsonl checked; raise ValueError naming the line and the problem."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a question must be a JSON object, got {type(raw).__name__}")
    qid = raw.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        raise ValueError(f"{where}: 'question_id' must be an integer or a non-empty string, got {qid!r}")
    category = raw.get("category")
    if not isinstance(category, str) or not category.strip():
        raise ValueError(f"{where}: 'category' must be a non-empty string, got {category!r}")
    turns = raw.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    return raw


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """Every question of a Spec-Bench question.jsonl, checked line by line (blank lines skipped)."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"Spec-Bench question file {str(path)!r} not found; pass your copy of Spec-Bench's "
                                "data/spec_bench/question.jsonl (github.com/hemingkx/Spec-Bench)")
    questions, seen = [], set()
    for where, raw in json_lines(source):
        question = check_question(raw, where)
        if question["question_id"] in seen:
            raise ValueError(f"{where}: duplicate question_id {question['question_id']!r}")
        seen.add(question["question_id"])
        questions.append(question)
    if not questions:
        raise ValueError(f"{source}: no questions")
    return questions


def ordered_tasks(tasks: Sequence[str]) -> list[str]:
    """The distinct tasks in leaderboard order; tasks Spec-Bench does not have follow, sorted."""
    present = set(tasks)
    return [t for t in TASKS if t in present] + sorted(present - set(TASKS))


def pick_categories(questions: Sequence[dict[str, Any]], categories: Sequence[str] | None) -> list[dict[str, Any]]:
    """The questions of the named tasks or categories (``mt_bench`` or ``writing`` ...; None: all). An unknown name
    raises ValueError listing the tasks and categories the file has."""
    if not categories:
        return list(questions)
    present = {q["category"] for q in questions}
    tasks = {task_of(c) for c in present}
    unknown = [c for c in categories if c not in present and c not in tasks]
    if unknown:
        raise ValueError(f"unknown Spec-Bench categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                         f"this file has the tasks {', '.join(ordered_tasks(list(tasks)))} and the categories "
                         f"{', '.join(sorted(present))}")
    wanted = set(categories)
    return [q for q in questions if q["category"] in wanted or task_of(q["category"]) in wanted]


def cap_per_task(questions: Sequence[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """At most ``limit`` questions per task (None: all), taken in turn from its categories (mt_bench: a writing
    question, a roleplay question, ...) so a few questions still span the task; file order otherwise."""
    if limit is None:
        return list(questions)
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for q in questions:
        by_task[task_of(q["category"])][q["category"]].append(q)
    kept: set[int] = set()
    for categories in by_task.values():
        spread = [q for q in chain.from_iterable(zip_longest(*categories.values())) if q is not None]
        kept.update(id(q) for q in spread[:limit])
    return [q for q in questions if id(q) in kept]


def rag_parts(turn: str) -> tuple[list[str], str]:
    """(passages, question) of a RAG turn: the passages one per line, the question on the last line."""
    lines = [line.strip() for line in turn.strip().split("\n") if line.strip()]
    return lines[:-1], lines[-1]


def summary_article(turn: str) -> str | None:
    """The article of a ``Summarize: <article>`` turn (None when the turn is not so written)."""
    text = turn.strip()
    if not text.startswith(SUMMARIZE_PREFIX):
        return None
    return text[len(SUMMARIZE_PREFIX):].strip() or None


def question_case(question: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """One benchmark case of a question: ``turns`` (the user's messages), ``documents`` and, for RAG, the
    ``question``; ``id`` is ``<task>-<question_id>``."""
    category, turns = question["category"], list(question["turns"])
    task = task_of(category)
    case: dict[str, Any] = {"id": f"{task}-{question['question_id']}", "task": task, "category": category,
                            "turns": turns, "documents": [], "max_new_tokens": max_new_tokens}
    if category == "rag":
        case["documents"], case["question"] = rag_parts(turns[0])
    elif category == "summarization":
        article = summary_article(turns[0])
        case["documents"] = [article] if article else []
    return case


def load_spec_bench(path: str | Path, categories: Sequence[str] | None = None, per_task: int | None = None,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[dict[str, Any]]:
    """The cases of a Spec-Bench question file: the chosen tasks or categories, at most ``per_task`` questions each,
    every turn answered with at most ``max_new_tokens`` new tokens."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    picked = cap_per_task(pick_categories(read_questions(path), categories), per_task)
    return [question_case(q, max_new_tokens) for q in picked]


def parse_categories(text: str | None) -> list[str] | None:
    """A comma list of tasks or categories (None or blank: all)."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return names or None
