"""Benchmark case files: JSON Lines, one case per line, checked by :func:`validate_case` (docs/benchmarks.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from ..prompts import TASKS

#: the shipped case files; ``long_rag`` asks rag_qa questions over 3,000 to 6,000 prompt tokens of documents;
#: ``edit`` asks for a docstring rewritten with one change and gives the text to edit as the ``prediction``
BUILTIN = ("rag_qa", "summarize", "open", "long_rag", "edit")


def builtin_path(name: str) -> Path:
    """Path of a shipped case file: ``rag_qa``, ``summarize``, ``open``, ``long_rag`` or ``edit``."""
    return Path(str(resources.files("lookahead.bench") / "cases" / f"{name}.jsonl"))


def resolve_case_file(name_or_path: str) -> Path:
    """A path, or the name of a shipped case file."""
    if name_or_path in BUILTIN:
        return builtin_path(name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"case file {name_or_path!r} not found; pass a path or one of {', '.join(BUILTIN)}")
    return path


def validate_case(case: Any, where: str) -> dict[str, Any]:
    """Check one case against the schema; raise ValueError naming the line and the problem. ``prediction``
    (optional) is the expected output as text, given to the lookahead-predicted method."""
    if not isinstance(case, dict):
        raise ValueError(f"{where}: a case must be a JSON object, got {type(case).__name__}")
    if not isinstance(case.get("id"), str) or not case["id"]:
        raise ValueError(f"{where}: 'id' must be a non-empty string")
    if case.get("task") not in TASKS:
        raise ValueError(f"{where}: 'task' must be one of {', '.join(TASKS)}, got {case.get('task')!r}")
    docs = case.get("documents", [])
    if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
        raise ValueError(f"{where}: 'documents' must be a list of strings")
    if case["task"] in ("rag_qa", "open") and not isinstance(case.get("question"), str):
        raise ValueError(f"{where}: task {case['task']!r} needs a string 'question'")
    if case["task"] == "summarize" and not docs:
        raise ValueError(f"{where}: task 'summarize' needs at least one document")
    prediction = case.get("prediction")
    if prediction is not None and (not isinstance(prediction, str) or not prediction.strip()):
        raise ValueError(f"{where}: 'prediction' must be a non-empty string (the expected output) when given")
    tokens = case.get("max_new_tokens", 128)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"{where}: 'max_new_tokens' must be a positive integer, got {tokens!r}")
    return {**case, "documents": docs, "max_new_tokens": tokens}


def json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """(``path:line``, parsed value) of every non-blank line of a JSON Lines file; a line that is not JSON is a
    ``ValueError`` naming it."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None

def load_cases(name_or_path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Read and validate a case file; ``limit`` keeps the first cases only."""
    path = resolve_case_file(name_or_path)
    cases = [validate_case(raw, where) for where, raw in json_lines(path)]
    if not cases:
        raise ValueError(f"{path}: no cases")
    ids = [c["id"] for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate case ids")
    return cases[:limit] if limit else cases
