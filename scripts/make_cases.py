"""Build the benchmark case files in ``lookahead/bench/cases/`` from Python standard-library docstrings.

Deterministic: a fixed module list, sorted candidates and a fixed random seed. Docstrings differ slightly between
Python versions, so the files are generated once (with Python 3.11) and committed; the benchmark reads the committed
files, and ``--check`` only matches on the Python version that generated them.

    python scripts/make_cases.py            # (re)write the three files
    python scripts/make_cases.py --check    # exit 1 if the committed files differ from a fresh build
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 20240607
OUT_DIR = Path(__file__).resolve().parent.parent / "lookahead" / "bench" / "cases"

RAG_COUNT = 30
SUMMARIZE_COUNT = 15
RAG_MAX_NEW_TOKENS = 96
SUMMARIZE_MAX_NEW_TOKENS = 128
OPEN_MAX_NEW_TOKENS = 96
RAG_DOC_CHARS = (300, 1500)
SUMMARY_DOC_CHARS = (800, 2500)

# Modules whose documentation is mostly prose.
RAG_MODULES = (
    "base64",
    "bisect",
    "calendar",
    "codecs",
    "collections",
    "dataclasses",
    "difflib",
    "email.utils",
    "filecmp",
    "fnmatch",
    "functools",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html",
    "importlib.util",
    "inspect",
    "json",
    "mimetypes",
    "os.path",
    "pickle",
    "pkgutil",
    "re",
    "runpy",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "tempfile",
    "textwrap",
    "tokenize",
    "traceback",
    "typing",
    "urllib.parse",
    "warnings",
)
SUMMARY_MODULES = (
    "argparse",
    "ast",
    "collections",
    "configparser",
    "copy",
    "doctest",
    "filecmp",
    "ftplib",
    "heapq",
    "http.server",
    "imaplib",
    "io",
    "json",
    "logging",
    "sched",
    "shlex",
    "struct",
    "subprocess",
    "textwrap",
    "timeit",
    "traceback",
    "typing",
    "urllib.parse",
    "zipfile",
)
# Present on some of the supported Python versions only (checked against 3.10 to 3.13).
EXCLUDE = frozenset({"importlib.util.module_for_loader", "inspect.getmembers_static"})

RAG_QUESTIONS = (
    "What does `{name}` do and what does it return?",
    "How do I use `{name}`? Explain its arguments.",
    "Which arguments does `{name}` accept, and what are their defaults?",
    "Summarize the behavior of `{name}` in two or three sentences.",
    "When would I use `{name}`, and what should I watch out for?",
    "According to the documentation, what is `{name}` for?",
    "Explain `{name}` to a beginner, using only the documentation provided.",
    "What does `{name}` return, and which special cases does its documentation mention?",
)

OPEN_PROMPTS = (
    "Write a short poem about autumn.",
    "Explain what a hash table is and why lookups in it are fast.",
    "Give three tips for writing readable Python code.",
    "Describe the water cycle in simple terms.",
    "What are the pros and cons of working from home?",
    "Write a friendly email inviting a colleague to lunch next week.",
    "Explain the difference between a list and a tuple in Python.",
    "Tell a short story about a robot who learns to paint.",
    "Why is the sky blue? Answer for a ten-year-old.",
    "List five healthy breakfast ideas and say briefly why each is good.",
)


@dataclass(frozen=True)
class Doc:
    """A documented object: its qualified name, a heading line and its cleaned docstring."""

    name: str
    heading: str
    text: str

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    def document(self) -> str:
        return f"{self.heading}\n\n{self.text}"


def is_plain_english(doc: str, max_code_fraction: float = 0.15) -> bool:
    """Whether ``doc`` reads as prose: no doctests, few indented (code) lines, mostly letters and spaces."""
    if ">>>" in doc or " at 0x" in doc:
        return False
    lines = [line for line in doc.splitlines() if line.strip()]
    code = sum(1 for line in lines if line.startswith(("    ", "\t")))
    letters = sum(ch.isalpha() or ch.isspace() for ch in doc)
    return code <= max_code_fraction * len(lines) and letters >= 0.88 * len(doc)


def _public(module: Any) -> list[tuple[str, Any]]:
    names = getattr(module, "__all__", None) or [name for name in dir(module) if not name.startswith("_")]
    return [(name, getattr(module, name)) for name in sorted(set(names)) if hasattr(module, name)]


def function_docs(modules: tuple[str, ...], bounds: tuple[int, int]) -> list[Doc]:
    """Public functions of ``modules`` with a signature and a plain-English docstring of ``bounds`` characters."""
    docs: dict[str, Doc] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for attr, obj in _public(module):
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj)) or getattr(obj, "__name__", None) != attr:
                continue  # skip classes, aliases (bisect.insort) and re-exports under another name
            doc = inspect.getdoc(obj)
            if not doc or not bounds[0] <= len(doc) <= bounds[1] or not is_plain_english(doc):
                continue
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                continue
            if " at 0x" in signature:
                continue
            name = f"{module_name}.{attr}"
            if name in EXCLUDE:
                continue
            docs[name] = Doc(name=name, heading=f"{name}{signature}", text=doc)
    return [docs[name] for name in sorted(docs)]


def summary_docs(modules: tuple[str, ...], bounds: tuple[int, int]) -> list[Doc]:
    """Module docstrings and public class docstrings of ``modules`` that are long, plain-English prose."""
    docs: dict[str, Doc] = {}
    seen_texts: set[str] = set()
    for module_name in modules:
        module = importlib.import_module(module_name)
        candidates = [(module_name, f"The {module_name} module", module)]
        for attr, obj in _public(module):
            if inspect.isclass(obj) and obj.__module__ == module.__name__ and obj.__name__ == attr:
                candidates.append((f"{module_name}.{attr}", f"The {module_name}.{attr} class", obj))
        for name, heading, obj in candidates:
            if name in EXCLUDE:
                continue
            doc = obj.__doc__ and inspect.cleandoc(obj.__doc__)  # its own docstring, never an inherited one
            if not doc or not bounds[0] <= len(doc) <= bounds[1] or not is_plain_english(doc, 0.25):
                continue
            if doc in seen_texts:
                continue
            seen_texts.add(doc)
            docs[name] = Doc(name=name, heading=heading, text=doc)
    return [docs[name] for name in sorted(docs)]


def mentions(text: str, word: str) -> bool:
    """Whether ``word`` occurs in ``text`` as a whole identifier."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def rag_cases(rng: random.Random) -> list[dict[str, Any]]:
    pool = function_docs(RAG_MODULES, RAG_DOC_CHARS)
    if len(pool) < RAG_COUNT + 2:
        raise SystemExit(f"only {len(pool)} candidate functions for rag_qa")
    answers = sorted(rng.sample(pool, RAG_COUNT), key=lambda doc: doc.name)
    rng.shuffle(answers)
    cases = []
    for index, answer in enumerate(answers):
        # Distractors must not name the answer's function, so exactly one document is about it.
        others = [
            doc
            for doc in pool
            if doc.name != answer.name
            and not mentions(doc.document(), answer.short_name)
            and not mentions(answer.document(), doc.short_name)
        ]
        documents = [answer.document()] + [doc.document() for doc in rng.sample(others, 2)]
        rng.shuffle(documents)
        question = RAG_QUESTIONS[index % len(RAG_QUESTIONS)].format(name=answer.name)
        cases.append(
            {
                "id": f"rag-{index:03d}",
                "task": "rag_qa",
                "question": question,
                "documents": documents,
                "max_new_tokens": RAG_MAX_NEW_TOKENS,
            }
        )
    return cases


def summarize_cases(rng: random.Random) -> list[dict[str, Any]]:
    pool = summary_docs(SUMMARY_MODULES, SUMMARY_DOC_CHARS)
    if len(pool) < SUMMARIZE_COUNT:
        raise SystemExit(f"only {len(pool)} candidate documents for summarize")
    chosen = rng.sample(pool, SUMMARIZE_COUNT)
    return [
        {
            "id": f"sum-{index:03d}",
            "task": "summarize",
            "documents": [doc.document()],
            "max_new_tokens": SUMMARIZE_MAX_NEW_TOKENS,
        }
        for index, doc in enumerate(chosen)
    ]


def open_cases() -> list[dict[str, Any]]:
    return [
        {
            "id": f"open-{index:03d}",
            "task": "open",
            "question": prompt,
            "documents": [],
            "max_new_tokens": OPEN_MAX_NEW_TOKENS,
        }
        for index, prompt in enumerate(OPEN_PROMPTS)
    ]


def build() -> dict[str, str]:
    """Return the text of each case file, keyed by file name."""
    rng = random.Random(SEED)
    splits = {
        "rag_qa.jsonl": rag_cases(rng),
        "summarize.jsonl": summarize_cases(rng),
        "open.jsonl": open_cases(),
    }
    return {
        file_name: "".join(json.dumps(case, ensure_ascii=False) + "\n" for case in cases)
        for file_name, cases in splits.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        stale = [
            name
            for name, text in files.items()
            if not (args.out / name).is_file() or (args.out / name).read_text(encoding="utf-8") != text
        ]
        for name in stale:
            print(f"{args.out / name} differs from a fresh build", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / name} ({text.count(chr(10))} cases)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
