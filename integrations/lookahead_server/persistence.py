"""Trie persistence for the server: load at start, save periodically and at shutdown (``--trie PATH``).

:meth:`DraftStore.save` writes atomically (``lookahead.files``: a temporary file in the same folder, fsync, then a
rename), so a crash mid-save leaves the previous snapshot intact. A file that cannot be read as a trie (corrupt,
foreign, another version) is moved aside to ``PATH.corrupt-<UTC time>`` (never deleted, never overwritten) and the
server starts with an empty trie.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from lookahead.files import move_aside
from lookahead.store import DraftStore

log = logging.getLogger("lookahead_server")


class TrieFileError(RuntimeError):
    """The trie path cannot be used at all (a folder, unreadable, not writable)."""


class TrieStore:
    """Where the shared trie lives between runs."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.quarantined: Path | None = None  # where a refused file was moved

    def check(self) -> None:
        """Refuse a path that can never work (before a model is loaded)."""
        if self.path.is_dir():
            raise TrieFileError(f"--trie {str(self.path)!r} is a folder; give a file path (e.g. store.bin)")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if parent.exists() and not parent.is_dir():
            raise TrieFileError(f"--trie {str(self.path)!r}: {str(parent)!r} is not a folder")
        if parent.exists() and not os.access(parent, os.W_OK):
            raise TrieFileError(f"--trie {str(self.path)!r}: folder {str(parent)!r} is not writable")

    def load(self) -> DraftStore | None:
        """The saved trie, or None (no file yet, or a refused file that was moved aside)."""
        self.check()
        if not self.path.exists():
            log.info("trie file %s does not exist yet: starting with an empty trie (it is written there)", self.path)
            return None
        try:
            trie = DraftStore.load(self.path)
        except ValueError as error:
            self.quarantined = self._move_aside()
            log.error("refused trie file %s: %s. Moved it to %s; starting with an empty trie.", self.path, error,
                      self.quarantined)
            return None
        except OSError as error:
            raise TrieFileError(f"cannot read trie file {str(self.path)!r}: {error}") from error
        log.info("loaded store %s: %d tokens", self.path, len(trie))
        return trie

    def _move_aside(self) -> Path:
        return move_aside(self.path, "corrupt-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))

    def save(self, trie: DraftStore) -> None:
        """Write ``trie`` atomically (parent folders are created)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        trie.save(self.path)
        log.info("saved store %s: %d tokens in %.2fs", self.path, len(trie), time.perf_counter() - t0)
