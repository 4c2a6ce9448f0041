"""The input of ``lookahead summarize``: the text documents named by files and folders on the command line."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .names import SUMMARY_SUFFIX


class SummarizeError(ValueError):
    """Bad input for ``summarize``: a missing path, an empty folder, an unreadable or binary file."""


@dataclass
class SourceDocument:
    """One input document."""

    path: Path
    name: str  # output name: the path relative to the argument it came from, separators replaced
    text: str
    sha256: str


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SummarizeError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if b"\x00" in data[:8192]:
        raise SummarizeError(f"{path}: looks like a binary file (NUL bytes); summarize takes UTF-8 text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SummarizeError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc


def _find_files(paths: Sequence[str | os.PathLike[str]], out: Path | None) -> list[tuple[Path, str]]:
    """Every file named by ``paths`` with its path relative to the argument it came from."""
    found: list[tuple[Path, str]] = []
    for arg in paths:
        root = Path(arg)
        if not root.exists():
            raise SummarizeError(f"{root}: no such file or folder")
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and not _is_hidden(p, root)
                           and not (out is not None and p.resolve().is_relative_to(out)))
            if not files:
                raise SummarizeError(f"{root}: the folder holds no files to summarize")
            found.extend((p, p.relative_to(root).as_posix()) for p in files)
        else:
            found.append((root, root.name))
    return found


def collect_documents(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None,
                      skip_invalid: bool = False, warn: Callable[[str], None] | None = None
                      ) -> list[SourceDocument]:
    """Text documents named by ``paths`` (files, or folders searched recursively; hidden files and anything inside
    ``out_dir`` are left out). Empty files are skipped with a warning. A file that cannot be read or is not UTF-8
    text is an error, or a warning with ``skip_invalid``. No document at all is an error."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise SummarizeError("no input: pass one or more files or folders")
    out = Path(out_dir).resolve() if out_dir is not None else None
    documents: list[SourceDocument] = []
    names: dict[str, Path] = {}
    for path, rel in _find_files(paths, out):
        try:
            text = _read_text(path)
        except SummarizeError as exc:
            if not skip_invalid:
                raise SummarizeError(f"{exc} (pass --skip-invalid to leave such files out)") from None
            warn(f"skipping {exc}")
            continue
        if not text.strip():
            warn(f"skipping {path}: the file is empty")
            continue
        name = rel.replace("/", "__")
        if name in names and names[name] != path:
            raise SummarizeError(f"{path} and {names[name]} would write the same summary file {name}{SUMMARY_SUFFIX}")
        names[name] = path
        documents.append(SourceDocument(path, name, text, hashlib.sha256(text.encode("utf-8")).hexdigest()))
    if not documents:
        raise SummarizeError("no text documents to summarize in " + ", ".join(str(p) for p in paths))
    return documents
