"""Trie persistence for the server: load at start, save periodically and at shutdown (``--trie PATH``).

:meth:`DraftStore.save` writes atomically (``lookahead.files``: a temporary file in the same folder, fsync, then a
rename), so a crash mid-save leaves the previous snapshot intact. A file that cannot be read as a trie (corrupt,
foreign, another version, token ids outside the vocabulary) is moved aside to ``PATH.corrupt-<UTC time>`` (never
deleted, never overwritten) and the server starts with an empty trie. A sound file of another tokenizer or config
(:class:`~lookahead.store.StoreMismatchError`) is left where it is and refused: the server does not start.

One process writes one path: :meth:`TrieStore.load` takes an exclusive ``flock`` on ``PATH.lock`` (released by
:meth:`TrieStore.close`, or by the process's end), so a second server or hub on the same ``--trie`` fails at start
with a message naming the path, instead of the last writer silently winning.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import IO, Any

from lookahead.files import move_aside
from lookahead.store import DraftStore, Fingerprint, StoreMismatchError, tokenizer_fingerprint

log = logging.getLogger("lookahead_server")


class TrieFileError(RuntimeError):
    """The trie path cannot be used at all (a folder, unreadable, not writable)."""


def engine_identity(generator: Any) -> tuple[Fingerprint, dict[str, Any]]:
    """What a generator's trie file must have been written for: its tokenizer's fingerprint (with the model's
    vocabulary size) and the config values that shape drafts."""
    fingerprint = tokenizer_fingerprint(generator.tokenizer, int(generator.model.config.vocab_size))
    config = generator.config
    return fingerprint, {"branch_length": config.branch_length, "max_query_length": config.max_query_length}


class TrieStore:
    """Where the shared trie lives between runs.

    Args:
        path: the trie file.
        expect: the tokenizer's fingerprint: a file of another is refused; a trie saved here is bound to it.
        config: the reader's ``branch_length`` and ``max_query_length``: a file with others is refused.
        lock: hold ``PATH.lock`` from :meth:`load` (or the first :meth:`save`) to :meth:`close` (False: for files
            that another path's lock already guards, such as a tenant's file next to the global one).
    """

    def __init__(self, path: str | os.PathLike[str], expect: Fingerprint | None = None,
                 config: dict[str, Any] | None = None, lock: bool = True) -> None:
        self.path = Path(path)
        self.expect = expect
        self.config = config
        self.lock = lock
        self.quarantined: Path | None = None  # where a refused file was moved
        self._lock_file: IO[str] | None = None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def acquire(self) -> None:
        """Take the exclusive lock on ``PATH.lock`` (no-op when held or ``lock`` is off); raises
        :class:`TrieFileError` naming the path when another process (or another TrieStore here) holds it."""
        if not self.lock or self._lock_file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_path, "a+")  # noqa: SIM115 - held open until close()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise TrieFileError(f"--trie {str(self.path)!r} is in use by {holder} (it holds {str(self.lock_path)!r}): "
                                f"two servers or hubs on one trie file would overwrite each other's saves. Give each "
                                f"its own path, or stop the other first") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

    def close(self) -> None:
        """Release the lock (the lock file stays: removing it would race with a process taking it)."""
        handle, self._lock_file = self._lock_file, None
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def check(self) -> None:
        """Refuse a path that can never work (before a model is loaded)."""
        if self.path.is_dir():
            raise TrieFileError(f"--trie {str(self.path)!r} is a folder; give a file path (e.g. store.bin)")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if parent.exists() and not parent.is_dir():
            raise TrieFileError(f"--trie {str(self.path)!r}: {str(parent)!r} is not a folder")
        if parent.exists() and not os.access(parent, os.W_OK):
            raise TrieFileError(f"--trie {str(self.path)!r}: folder {str(parent)!r} is not writable")
        if self.lock and self._lock_file is None and parent.exists():  # in use elsewhere: fail now, not at load
            self.acquire()
            self.close()

    def load(self) -> DraftStore | None:
        """The saved trie, or None (no file yet, or a refused file that was moved aside); takes the path's lock.
        Raises :class:`TrieFileError` for a file of another tokenizer or config (left in place), or a path in use."""
        self.check()
        self.acquire()
        if not self.path.exists():
            log.info("trie file %s does not exist yet: starting with an empty trie (it is written there)", self.path)
            return None
        try:
            trie = DraftStore.load(self.path, expect=self.expect, config=self.config)
        except StoreMismatchError as error:
            self.close()
            raise TrieFileError(f"refused trie file {str(self.path)!r}: {error}") from error
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
        """Write ``trie`` atomically (parent folders are created), bound to ``expect`` first (so the file says
        which tokenizer wrote it); takes the path's lock when not held yet."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.acquire()
        if self.expect is not None and trie.fingerprint is None:
            trie.bind(self.expect)
        t0 = time.perf_counter()
        trie.save(self.path)
        log.info("saved store %s: %d tokens in %.2fs", self.path, len(trie), time.perf_counter() - t0)
