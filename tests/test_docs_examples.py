"""Every example in README.md and docs/*.md runs as written.

Python blocks run in a temporary folder (with ``examples/`` linked in), page by page, in the order they appear and in
one namespace per page, as a reader pasting them into one session would: a later block may use what an earlier one
on the same page made (``gen``). A block whose text already ran on an earlier page (the README repeats each page's
first example) is not run again: what it bound there is taken over. The OpenAI-client blocks talk to a live server
on the address they name, started here on the real default model with the key they use. For every ``lookahead ...``
line of a bash block the real parser must accept its flags (optional ``[--flag value]`` parts included); the cheap
commands (``generate``) also run, once per distinct line.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lookahead import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SERVER_URL = "http://127.0.0.1:8000/v1"
SERVER_KEY = "sekret"
RUN_COMMANDS = ("generate",)  # cheap enough to run as written (one short answer on the default model)
_RAN: dict[str, dict[str, Any]] = {}  # a block's code -> the names it bound, for the same block on a later page


def code_blocks(page: Path, language: str) -> list[tuple[int, str]]:
    """The fenced ``language`` blocks of ``page`` as (first line number, code)."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1) == language]


def command_lines(code: str) -> list[str]:
    """The shell lines of a bash block, continuation lines joined and trailing ``# comments`` dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def lookahead_argv(line: str) -> list[str] | None:
    """The arguments after ``lookahead`` of a documented command line (None when it runs something else).

    Environment assignments before the command are dropped; an optional part ``[--flag value]`` is kept as
    ``--flag value``, and a bracketed phrase that is not a flag (``[the other serve options]``) is dropped."""
    line = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1) if m.group(1).startswith("-") else "", line)
    words = shlex.split(line)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        words.pop(0)
    if not words or Path(words[0]).name != "lookahead":
        return None
    return words[1:]


def documented_commands(only: tuple[str, ...] | None = None) -> list[Any]:
    """One param per documented ``lookahead`` command line (with ``only``: per distinct line of those commands)."""
    params, seen = [], set()
    for page in PAGES:
        for lineno, code in code_blocks(page, "bash"):
            for line in command_lines(code):
                argv = lookahead_argv(line)
                if argv is None or (only is not None and (argv[0] not in only or tuple(argv) in seen)):
                    continue
                seen.add(tuple(argv))
                params.append(pytest.param(argv, id=f"{page.name}:{lineno}:{' '.join(argv[:1])}"))
    return params


def python_pages() -> list[Any]:
    return [pytest.param(page, id=page.name) for page in PAGES if code_blocks(page, "python")]


@contextlib.contextmanager
def in_folder(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A temporary folder with the repository's ``examples/`` and a ``notes.txt`` to answer from."""
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    (tmp_path / "notes.txt").write_text("textwrap.dedent(text)\n\nRemove any common leading whitespace from every "
                                        "line in `text`.\n", encoding="utf-8")
    with in_folder(tmp_path):
        yield tmp_path


@pytest.fixture(scope="module")
def docs_server() -> Iterator[str]:
    """``lookahead serve`` as the docs start it: the default model on 127.0.0.1:8000 with the key ``sekret``.
    Yields the base URL: where port 8000 is taken on this machine, the same server on a free port."""
    from lookahead_server.app import ServeSettings, create_app
    from lookahead_server.background import BackgroundServer

    from lookahead.engine import LookaheadGenerator
    from lookahead.models import load_model

    model, tokenizer = load_model("default")
    app = create_app(LookaheadGenerator(model, tokenizer), ServeSettings(api_key=SERVER_KEY))
    try:
        server = BackgroundServer(app, host="127.0.0.1", port=8000)
    except OSError:  # the port the docs name is taken here: the blocks are pointed at a free one instead
        server = BackgroundServer(app, host="127.0.0.1")
    with server:
        yield f"{server.url}/v1"


def test_every_page_has_examples() -> None:
    assert len(python_pages()) >= 4 and len(documented_commands()) >= 8


@pytest.mark.parametrize("argv", documented_commands())
def test_documented_command_parses(argv: list[str]) -> None:
    try:
        args, unknown = cli.build_parser().parse_known_args(argv)
    except SystemExit as exc:  # argparse printed why
        raise AssertionError(f"lookahead {' '.join(argv)} is refused by the parser") from exc
    assert not unknown, f"lookahead {argv[0]} does not accept {unknown}"
    assert not getattr(args, "accepts_unknown_args", False), f"lookahead {argv[0]} is unavailable here"


@pytest.mark.slow
@pytest.mark.parametrize("argv", documented_commands(only=RUN_COMMANDS))
def test_documented_command_runs(argv: list[str], workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.slow
@pytest.mark.parametrize("page", python_pages())
def test_python_examples_run(page: Path, workdir: Path, request: pytest.FixtureRequest,
                             capsys: pytest.CaptureFixture[str]) -> None:
    blocks = code_blocks(page, "python")
    if any(SERVER_URL in code for _, code in blocks):
        url = request.getfixturevalue("docs_server")
        blocks = [(lineno, code.replace(SERVER_URL, url)) for lineno, code in blocks]
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for lineno, code in blocks:
        if code in _RAN:
            namespace.update(_RAN[code])
            continue
        started = time.perf_counter()
        before = dict(namespace)
        try:
            exec(compile(code, f"{page.name}:{lineno}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"the example at {page.name}:{lineno} failed: {type(exc).__name__}: {exc}") from exc
        _RAN[code] = {k: v for k, v in namespace.items() if k not in before or before[k] is not v}
        print(f"{page.name}:{lineno} ran in {time.perf_counter() - started:.1f}s")
