"""Build the benchmark case files in ``lookahead/bench/cases/`` from Python standard-library docstrings.

Deterministic: a fixed module list, sorted candidates and a fixed random seed. Docstrings differ slightly between
Python versions, so the files are generated once (with Python 3.11) and committed; the benchmark reads the committed
files, and ``--check`` only matches on the Python version that generated them.

``edit.jsonl`` holds edit tasks with a predicted output: "rewrite this text with this change" over a docstring (fix a
misspelled word, rename a word, change a number, replace a sentence), the text to edit as the case's ``prediction``
(what a caller of a predicted-outputs API sends: the text it already has).

``long_rag.jsonl`` holds long-context questions: many full docstrings of functions and classes (3,000 to 6,000 prompt
tokens with the default model's tokenizer, which building it loads), one of which answers the question. Each of its
cases records the Python version (``python``) and its prompt length in tokens (``prompt_tokens``).

    python scripts/make_cases.py                    # (re)write the five files
    python scripts/make_cases.py --only long_rag    # (re)write one of them
    python scripts/make_cases.py --check            # exit 1 if the committed files differ from a fresh build
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from lookahead.inputs import InputEncoder
from lookahead.models import default_model_dir
from lookahead.prompts import case_messages

SEED = 20240607
OUT_DIR = Path(__file__).resolve().parent.parent / "lookahead" / "bench" / "cases"

RAG_COUNT = 30
SUMMARIZE_COUNT = 15
RAG_MAX_NEW_TOKENS = 96
SUMMARIZE_MAX_NEW_TOKENS = 128
OPEN_MAX_NEW_TOKENS = 96
RAG_DOC_CHARS = (300, 1500)
SUMMARY_DOC_CHARS = (800, 2500)
LONG_COUNT = 8
LONG_MAX_NEW_TOKENS = 128
LONG_PROMPT_TOKENS = (3000, 6000)  # what every long_rag prompt must measure with the default model's tokenizer
LONG_TARGET_TOKENS = (3400, 5600)  # each case draws its length from this range
LONG_DOC_CHARS = (120, 3000)  # full docstrings of the documents around the answer
LONG_SEED_OFFSET = 1  # long_rag draws from its own generator: the other files stay as they were
EDIT_MAX_NEW_TOKENS = 300

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

LONG_QUESTIONS = (
    "What does `{name}` do and what does it return?",
    "What does `{name}` return, and which special cases does its documentation mention?",
    "Which arguments does `{name}` accept, and what do they do?",
    "According to the documentation, what is `{name}` for?",
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


EDIT_INSTRUCTION = ("Rewrite the following text with this change: {change}. Output only the rewritten text.\n\n"
                    "Text: {text}")
EDIT_KINDS = ("typo", "word", "number", "sentence")


@dataclass(frozen=True)
class Edit:
    """One edit task: the documented object ``name`` (module.attr), the kind of change and its two sides. For a
    ``typo``, ``old`` is a word of the docstring and ``new`` the misspelling shown in the text to edit (the model is
    asked to correct it); otherwise the model is asked to replace ``old`` (a word, a number, a sentence) by ``new``."""

    name: str
    kind: str
    old: str
    new: str


EDITS = (
    Edit("codecs.EncodedFile", "word", "Unicode", "text"),
    Edit("shutil.unpack_archive", "typo", "directory", "direcotry"),
    Edit("tempfile.mkstemp", "sentence", "Caller is responsible for deleting the file when done with it.",
         "The caller must delete the file when it is no longer needed."),
    Edit("mimetypes.guess_type", "typo", "guessed", "gussed"),
    Edit("importlib.util.find_spec", "word", "submodule", "child module"),
    Edit("urllib.parse.urlparse", "number", "6", "six"),
    Edit("runpy.run_module", "sentence", "Returns the resulting module globals dictionary.",
         "It returns the globals of the module as a dictionary."),
    Edit("tokenize.detect_encoding", "typo", "encoding", "encodnig"),
    Edit("shutil.make_archive", "word", "archive", "bundle"),
    Edit("codecs.open", "sentence", "encoding specifies the encoding which is to be used for the file.",
         "encoding names the codec used to read and write the file."),
    Edit("ast.NodeVisitor", "typo", "subclassed", "subclased"),
    Edit("email.utils.formatdate", "number", "2822", "5322"),
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


def long_docs(modules: tuple[str, ...], bounds: tuple[int, int]) -> list[Doc]:
    """Public functions and classes of ``modules`` with their own full docstring of ``bounds`` characters (doctests
    and code included: retrieved documentation as it is)."""
    docs: dict[str, Doc] = {}
    seen_texts: set[str] = set()
    for module_name in modules:
        module = importlib.import_module(module_name)
        for attr, obj in _public(module):
            name = f"{module_name}.{attr}"
            is_function = inspect.isfunction(obj) or inspect.isbuiltin(obj)
            if not (is_function or inspect.isclass(obj)) or getattr(obj, "__name__", None) != attr or name in EXCLUDE:
                continue
            doc = obj.__doc__ and inspect.cleandoc(obj.__doc__)  # its own docstring, never an inherited one
            if not doc or not bounds[0] <= len(doc) <= bounds[1] or " at 0x" in doc or doc in seen_texts:
                continue
            seen_texts.add(doc)
            heading = f"{name}{signature_text(obj)}" if is_function else f"class {name}{signature_text(obj)}"
            if " at 0x" in heading:
                continue
            docs[name] = Doc(name=name, heading=heading, text=doc)
    return [docs[name] for name in sorted(docs)]


def signature_text(obj: Any) -> str:
    """``obj``'s signature as text, or ``''`` when it has none that ``inspect`` can read."""
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def mentions(text: str, word: str) -> bool:
    """Whether ``word`` occurs in ``text`` as a whole identifier."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def distractors(pool: list[Doc], answer: Doc) -> list[Doc]:
    """The documents of ``pool`` that may stand beside ``answer``: neither names the other's function, so exactly one
    document of a case is about the answer."""
    return [doc for doc in pool if doc.name != answer.name and not mentions(doc.document(), answer.short_name)
            and not mentions(answer.document(), doc.short_name)]


def rag_cases(rng: random.Random) -> list[dict[str, Any]]:
    pool = function_docs(RAG_MODULES, RAG_DOC_CHARS)
    if len(pool) < RAG_COUNT + 2:
        raise SystemExit(f"only {len(pool)} candidate functions for rag_qa")
    answers = sorted(rng.sample(pool, RAG_COUNT), key=lambda doc: doc.name)
    rng.shuffle(answers)
    cases = []
    for index, answer in enumerate(answers):
        others = distractors(pool, answer)
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


TokenCounter = Callable[[dict[str, Any]], int]


def default_token_counter() -> TokenCounter:
    """Prompt tokens of a case with the default model's tokenizer and chat template, encoded as the bench does."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    encoder = InputEncoder(tokenizer, len(tokenizer), None, None)
    return lambda case: len(encoder.encode_messages(case_messages(case)))


def python_version() -> str:
    """The running Python's ``major.minor``: docstrings (and so the long_rag cases) depend on it."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def long_context(answer: Doc, candidates: list[Doc], question: str, target: int, count_tokens: TokenCounter,
                 rng: random.Random) -> tuple[list[str], int]:
    """The answer's document among distractors from ``candidates`` (in order) until the prompt holds ``target``
    tokens, never more than the upper bound of LONG_PROMPT_TOKENS; then shuffled. Returns (documents, tokens)."""
    low, high = LONG_PROMPT_TOKENS
    chosen = [answer.document()]

    def measure(documents: list[str]) -> int:
        return count_tokens({"task": "rag_qa", "question": question, "documents": documents})

    tokens = measure(chosen)
    for doc in candidates:
        if tokens >= target:
            break
        longer = measure([*chosen, doc.document()])
        if longer <= high - 100:  # room for the numbering to change when the documents are shuffled
            chosen, tokens = [*chosen, doc.document()], longer
    rng.shuffle(chosen)
    tokens = measure(chosen)
    if not low <= tokens <= high:
        raise SystemExit(f"long_rag case about {answer.name}: {tokens} prompt tokens, outside {low}..{high}")
    return chosen, tokens


def long_rag_cases(rng: random.Random, count_tokens: TokenCounter, answers: list[Doc], pool: list[Doc],
                   exclude: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Questions about one function each, over many full docstrings: first the other documents of the answer's own
    module, then documents of other modules (as a retriever returns neighbours), none naming the answer."""
    picked = rng.sample([doc for doc in answers if doc.name not in exclude], LONG_COUNT)
    cases = []
    for index, answer in enumerate(picked):
        module = answer.name.rsplit(".", 1)[0]
        others = distractors(pool, answer)
        same = [doc for doc in others if doc.name.rsplit(".", 1)[0] == module]
        rest = [doc for doc in others if doc.name.rsplit(".", 1)[0] != module]
        rng.shuffle(same)
        rng.shuffle(rest)
        question = LONG_QUESTIONS[index % len(LONG_QUESTIONS)].format(name=answer.name)
        documents, tokens = long_context(answer, same + rest, question, rng.randint(*LONG_TARGET_TOKENS),
                                         count_tokens, rng)
        cases.append(
            {
                "id": f"long-{index:03d}",
                "task": "rag_qa",
                "question": question,
                "documents": documents,
                "max_new_tokens": LONG_MAX_NEW_TOKENS,
                "prompt_tokens": tokens,
                "python": python_version(),
            }
        )
    return cases


def reflow(text: str) -> str:
    """``text`` with each paragraph on one line (docstrings wrap at ~72 columns; an edited text need not)."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n") if paragraph.strip())


def own_docstring(name: str) -> str:
    """The cleaned docstring of ``module.attr`` (a module, class or function), reflowed; SystemExit if it has none."""
    module_name, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        obj = importlib.import_module(name)
    doc = obj.__doc__ and inspect.cleandoc(obj.__doc__)
    if not doc:
        raise SystemExit(f"edit case: {name} has no docstring")
    return reflow(doc)


def edit_change(edit: Edit) -> str:
    """The instruction's change, in words."""
    if edit.kind == "typo":
        return f'correct the misspelled word "{edit.new}"'
    if edit.kind == "word":
        return f'replace the word "{edit.old}" with "{edit.new}"'
    if edit.kind == "number":
        return f"change the number {edit.old} to {edit.new}"
    if edit.kind == "sentence":
        return f'replace the sentence "{edit.old}" with "{edit.new}"'
    raise SystemExit(f"edit case {edit.name}: unknown kind {edit.kind!r}; allowed: {', '.join(EDIT_KINDS)}")


def edit_case(index: int, edit: Edit) -> dict[str, Any]:
    """One edit case: the text to edit (a typo's misspelling put in) in the question and as the prediction."""
    original = own_docstring(edit.name)
    if not mentions(original, edit.old):
        raise SystemExit(f"edit case {edit.name}: {edit.old!r} is not in its docstring")
    text = re.sub(rf"(?<!\w){re.escape(edit.old)}(?!\w)", edit.new, original, count=1) if edit.kind == "typo" \
        else original
    return {
        "id": f"edit-{index:03d}",
        "task": "open",
        "question": EDIT_INSTRUCTION.format(change=edit_change(edit), text=text),
        "documents": [],
        "max_new_tokens": EDIT_MAX_NEW_TOKENS,
        "prediction": text,
    }


def edit_cases(edits: tuple[Edit, ...] = EDITS) -> list[dict[str, Any]]:
    """The edit cases, in the order of ``edits``."""
    return [edit_case(index, edit) for index, edit in enumerate(edits)]


def rag_answer_names(cases: list[dict[str, Any]]) -> frozenset[str]:
    """The functions the rag_qa questions ask about (long_rag asks about others)."""
    return frozenset(m.group(1) for case in cases if (m := re.search(r"`([\w.]+)`", case["question"])))


FILES = ("rag_qa", "summarize", "open", "long_rag", "edit")


def build(names: tuple[str, ...] = FILES, count_tokens: TokenCounter | None = None) -> dict[str, str]:
    """Return the text of each case file in ``names``, keyed by file name. long_rag measures its prompts with
    ``count_tokens`` (default: the default model's tokenizer, loaded only then)."""
    rng = random.Random(SEED)
    rag = rag_cases(rng)
    splits = {"rag_qa": rag, "summarize": summarize_cases(rng), "open": open_cases(), "edit": edit_cases()}
    if "long_rag" in names:
        answers = function_docs(RAG_MODULES, RAG_DOC_CHARS)
        pool = long_docs(tuple(sorted(set(RAG_MODULES) | set(SUMMARY_MODULES))), LONG_DOC_CHARS)
        splits["long_rag"] = long_rag_cases(random.Random(SEED + LONG_SEED_OFFSET),
                                            count_tokens or default_token_counter(), answers, pool,
                                            rag_answer_names(rag))
    return {
        f"{name}.jsonl": "".join(json.dumps(case, ensure_ascii=False) + "\n" for case in splits[name])
        for name in names
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    parser.add_argument("--only", action="append", choices=FILES,
                        help="build this file only (repeatable; default: all of them)")
    args = parser.parse_args(argv)
    files = build(tuple(args.only) if args.only else FILES)
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
