"""The input of ``lookahead summarize``: the text documents named by files and folders on the command line.

A folder is searched without leaving it: a symbolic link whose target lies outside the folder is skipped with a
warning (``follow_symlinks`` follows it), and so is every folder that cannot be read, a broken link, anything that is
not a regular file, and a folder reached a second time (a link loop). Files are checked (readable, UTF-8 text, not
blank) by streaming them in blocks, and a document's text is read only when it is summarized
(:meth:`SourceDocument.read`): memory is bounded by the largest document, not by the folder.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .names import SUMMARY_SUFFIX

#: bytes read at a time while a file is checked
READ_BLOCK = 1 << 20
#: a NUL byte among a file's first this many bytes makes it binary
SNIFF_BYTES = 8192

Warn = Callable[[str], None]


class SummarizeError(ValueError):
    """Bad input for ``summarize``: a missing path, an empty folder, an unreadable or binary file."""


@dataclass
class SourceDocument:
    """One input document; its text is read from ``path`` when needed unless it is given (``text``)."""

    path: Path
    name: str  # output name: the path relative to the argument it came from, separators replaced
    text: str | None = None  # the text when held in memory (a Ray row); None: read from ``path`` by :meth:`read`
    sha256: str = ""  # of the UTF-8 text

    def read(self) -> str:
        """The document's text: ``text`` when given, else the file read now (not kept: each call reads again).
        ``sha256`` then describes what was read (the file may have changed since it was found)."""
        if self.text is not None:
            return self.text
        text = _read_text(self.path)
        self.sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return text


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SummarizeError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if b"\x00" in data[:SNIFF_BYTES]:
        raise SummarizeError(f"{path}: looks like a binary file (NUL bytes); summarize takes UTF-8 text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SummarizeError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc


def _scan(path: Path) -> tuple[str, bool]:
    """Check a file block by block as :func:`_read_text` would, without holding it: returns the SHA-256 of its
    text and whether it holds anything but whitespace."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True  # bytes read so far; no text seen yet
    try:
        with path.open("rb") as file:
            while block := file.read(READ_BLOCK):
                if offset < SNIFF_BYTES and b"\x00" in block[:SNIFF_BYTES - offset]:
                    raise SummarizeError(f"{path}: looks like a binary file (NUL bytes); summarize takes UTF-8 text "
                                         "files")
                digest.update(block)
                text = _decode(decoder, path, block, offset)  # every block: UTF-8 is checked to the end
                offset += len(block)
                blank = blank and (not text or text.isspace())  # (no copy of the block, unlike strip)
                del text, block  # hold one block at a time
            _decode(decoder, path, b"", offset, final=True)
    except OSError as exc:
        raise SummarizeError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    return digest.hexdigest(), not blank


def _decode(decoder: codecs.IncrementalDecoder, path: Path, block: bytes, offset: int, final: bool = False) -> str:
    """The text of the next ``block`` (read at byte ``offset``), or SummarizeError naming the byte where it stops
    being UTF-8."""
    held = len(decoder.getstate()[0])  # bytes of a character begun in the blocks before
    try:
        return decoder.decode(block, final)
    except UnicodeDecodeError as exc:
        raise SummarizeError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {offset - held + exc.start})"
                             ) from exc


def _search(root: Path, out: Path | None, follow_symlinks: bool, warn: Warn) -> list[tuple[Path, str]]:
    """The files under folder ``root`` (names sorted, hidden ones and ``out`` left out) with their paths relative
    to it. What cannot be searched, or lies outside ``root`` behind a link (unless ``follow_symlinks``), is skipped
    with a warning."""
    inside = root.resolve()
    searched = {inside}
    found: list[tuple[Path, str]] = []

    def search(folder: Path) -> None:
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as exc:
            warn(f"skipping the folder {folder}: cannot read it ({exc.strerror or exc})")
            return
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            try:
                target = path.resolve()
                if out is not None and target.is_relative_to(out):
                    continue  # the summaries themselves
                if entry.is_symlink():
                    if not target.exists():
                        warn(f"skipping {path}: a broken symbolic link")
                        continue
                    if not follow_symlinks and not target.is_relative_to(inside):
                        warn(f"skipping {path}: a symbolic link to {target}, outside {root} (pass --follow-symlinks "
                             "to follow it)")
                        continue
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError as exc:
                warn(f"skipping {path}: cannot read it ({exc.strerror or exc})")
                continue
            if is_dir:
                if target in searched:
                    warn(f"skipping {path}: the folder {target} is searched already (a link loop or a second link)")
                    continue
                searched.add(target)
                search(path)
            elif is_file:
                found.append((path, path.relative_to(root).as_posix()))
            else:
                warn(f"skipping {path}: not a regular file")

    search(root)
    return found


def _find_files(paths: Sequence[str | os.PathLike[str]], out: Path | None, follow_symlinks: bool, warn: Warn
                ) -> list[tuple[Path, str]]:
    """Every file named by ``paths`` with its path relative to the argument it came from."""
    found: list[tuple[Path, str]] = []
    for arg in paths:
        root = Path(arg)
        if not root.exists():
            raise SummarizeError(f"{root}: no such file or folder")
        if root.is_dir():
            files = _search(root, out, follow_symlinks, warn)
            if not files:
                raise SummarizeError(f"{root}: the folder holds no files to summarize")
            found.extend(files)
        else:
            found.append((root, root.name))
    return found


def collect_documents(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None,
                      skip_invalid: bool = False, warn: Warn | None = None, follow_symlinks: bool = False
                      ) -> list[SourceDocument]:
    """Text documents named by ``paths`` (files, or folders searched recursively without leaving them unless
    ``follow_symlinks``; hidden files and anything inside ``out_dir`` are left out), checked but not held: each is
    read again by :meth:`SourceDocument.read` when it is summarized. Empty files, and folders or links that cannot
    be searched, are skipped with a warning. A file that cannot be read or is not UTF-8 text is an error, or a
    warning with ``skip_invalid``. No document at all is an error."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise SummarizeError("no input: pass one or more files or folders")
    out = Path(out_dir).resolve() if out_dir is not None else None
    documents: list[SourceDocument] = []
    names: dict[str, Path] = {}
    for path, rel in _find_files(paths, out, follow_symlinks, warn):
        try:
            sha256, has_text = _scan(path)
        except SummarizeError as exc:
            if not skip_invalid:
                raise SummarizeError(f"{exc} (pass --skip-invalid to leave such files out)") from None
            warn(f"skipping {exc}")
            continue
        if not has_text:
            warn(f"skipping {path}: the file is empty")
            continue
        name = rel.replace("/", "__")
        if name in names and names[name] != path:
            raise SummarizeError(f"{path} and {names[name]} would write the same summary file {name}{SUMMARY_SUFFIX}")
        names[name] = path
        documents.append(SourceDocument(path, name, None, sha256))
    if not documents:
        raise SummarizeError("no text documents to summarize in " + ", ".join(str(p) for p in paths))
    return documents
