"""Files on disk: the cache folder and atomic writes.

Every file the project writes for others to read (tries, cost curves, reports, summaries, indexes, the converted
default model) is written to a temporary name in the target's own folder and renamed into place with
``os.replace``: a reader sees the old file or the complete new one, never a partial write, and a failed write
leaves no temporary file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CACHE_ENV", "atomic_directory", "atomic_path", "atomic_write_bytes", "atomic_write_text", "cache_dir",
           "move_aside"]

CACHE_ENV = "LOOKAHEAD_CACHE"

StrPath = str | os.PathLike[str]


def cache_dir() -> Path:
    """Root of the lookahead cache: ``$LOOKAHEAD_CACHE`` (``~`` expanded) if set, else ``~/.cache/lookahead``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lookahead"


@contextmanager
def atomic_path(path: StrPath, mode: int = 0o644) -> Iterator[Path]:
    """Yield a fresh temporary file path next to ``path``; when the block ends normally the file there (given
    ``mode``) replaces ``path``, and when it raises the temporary file is removed.

    For writers that want a file name rather than a handle (``faiss.write_index``, ``torch.save``).
    """
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp makes owner-only files
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: StrPath, data: bytes, mode: int = 0o644, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``).

    ``fsync`` flushes the data to the disk before the rename, so a crash right after leaves the old file or the
    complete new one (not an empty one). The folder must exist.
    """
    with atomic_path(path, mode) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: StrPath, text: str, mode: int = 0o644, *, encoding: str = "utf-8",
                      fsync: bool = True) -> None:
    """Write ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode(encoding), mode, fsync=fsync)


@contextmanager
def atomic_directory(path: StrPath, *, prefix: str | None = None, mode: int = 0o755) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; when the block ends normally it gets ``mode`` and is renamed
    to ``path`` (which must not exist or be an empty folder: ``os.replace`` raises OSError otherwise). The
    temporary folder is removed whatever happens.

    ``prefix`` names the temporary folder (default ``.<name>.tmp-``), so a caller can find leftovers of crashed
    runs.
    """
    target = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(mode)  # mkdtemp makes owner-only folders
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_aside(path: StrPath, label: str) -> Path:
    """Rename ``path`` to ``<name>.<label>`` in its folder (``<name>.<label>-2``, ``-3``, ... when taken: an
    existing file is never overwritten). Returns the new path."""
    source = Path(path)
    target = source.with_name(f"{source.name}.{label}")
    n = 1
    while target.exists():
        n += 1
        target = source.with_name(f"{source.name}.{label}-{n}")
    os.replace(source, target)
    return target
