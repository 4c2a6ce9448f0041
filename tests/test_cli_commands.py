"""``lookahead`` subcommands: the core registers its own, plugins come through the ``lookahead.commands`` entry
points, and the core package never imports an integration."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from lookahead import cli

CORE = Path(cli.__file__).resolve().parent
INTEGRATIONS = ("lookahead_server", "langchain_lookahead")


def imported_modules(path: Path) -> list[str]:
    """Absolute module names imported anywhere in ``path`` (relative imports stay inside the package)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_core_never_imports_an_integration():
    files = sorted(CORE.rglob("*.py"))
    assert CORE / "cli.py" in files and len(files) > 10
    offenders = [f"{path.relative_to(CORE.parent)}: {name}" for path in files for name in imported_modules(path)
                 if name.split(".")[0] in INTEGRATIONS]
    assert offenders == []


def test_help_lists_core_and_plugin_commands(capsys):
    assert [ep.name for ep in cli.plugin_commands()] == ["serve"], "run: .venv/bin/pip install --no-deps -e ."
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "{generate,bench,summarize,bench-store,store,bench-leakage,serve}" in out
    assert "OpenAI-compatible HTTP server" in out


def broken(monkeypatch, *extra: EntryPoint) -> None:
    """Make the installed plugins one that cannot be imported, plus ``extra``."""
    missing = EntryPoint(name="broken", value="no_such_lookahead_plugin.cli:add_parser", group=cli.COMMAND_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda group: [missing, *extra] if group == cli.COMMAND_GROUP else [])


def test_a_plugin_that_fails_to_import_is_reported_in_its_place(monkeypatch, capsys):
    serve = EntryPoint(name="serve", value="lookahead_server.cli:add_parser", group=cli.COMMAND_GROUP)
    broken(monkeypatch, serve)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "{generate,bench,summarize,bench-store,store,bench-leakage,broken,serve}" in out and "unavailable" in out
    for argv in (["broken"], ["broken", "--port", "8000", "x"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "lookahead broken is unavailable" in err and "no_such_lookahead_plugin" in err
        assert "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:  # the other commands still parse their own options strictly
        cli.main(["summarize", "docs", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_a_plugin_that_fails_to_register_is_reported(monkeypatch, capsys):
    def add_parser(sub, add_model_args, build):
        sub.add_parser("half")
        raise RuntimeError("no luck")

    half = EntryPoint(name="half", value="x:add_parser", group=cli.COMMAND_GROUP)
    monkeypatch.setattr(EntryPoint, "load", lambda self: add_parser)
    monkeypatch.setattr(cli, "entry_points", lambda group: [half])
    assert cli.main(["half", "--anything"]) == 2
    err = capsys.readouterr().err
    assert "lookahead half is unavailable" in err and "RuntimeError: no luck" in err


def test_a_plugin_cannot_replace_a_core_command(monkeypatch):
    clash = EntryPoint(name="bench", value="no_such_lookahead_plugin:add_parser", group=cli.COMMAND_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda group: [clash])
    assert cli.plugin_commands() == []
    assert cli.build_parser().parse_args(["bench", "cases.jsonl"]).func is cli.cmd_bench


@pytest.mark.slow
def test_generate_prints_the_answer_and_nothing_from_transformers(tmp_path: Path) -> None:
    """``lookahead generate "Say hi." --max-new-tokens 4`` in a fresh process: the answer on stdout, and on stderr
    only the command's own closing line (no weight-loading bar, warning or log line from transformers)."""
    lookahead = Path(sys.executable).with_name("lookahead")
    done = subprocess.run([str(lookahead), "generate", "Say hi.", "--max-new-tokens", "4"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert re.fullmatch(r"\[4 tokens in [^\]]*finish: length\]\n", done.stderr), done.stderr
