"""Provenance: which document each accepted draft run of an output was copied from.

A decoding step emits the draft tokens it accepted, then one token of the model's own. The first output token comes
from the prefill, so step ``k`` (0-based) of ``accepted_lengths`` covers the output tokens
``1 + sum(a[:k]) + k ... `` and its accepted run is the first ``a[k]`` of them. A run is attributed to the document
that contains it together with the output token before it (a trie drafts after a matched context token, so a run
drafted from a document always is; a lone common token found anywhere is not), extended backwards over the output
as far as the document still contains it: the longest match decides between documents, the lowest index wins a tie.
A run no document contains so came from elsewhere (the prompt, or past outputs) and has no source.

Pure functions over token ids: nothing here runs a model or touches a trie.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: token ids are mapped to characters to search with ``str.find``; ids must be below this
MAX_TOKEN_ID = 0x110000


@dataclass(frozen=True)
class AcceptedRun:
    """One step's accepted draft tokens: output token offsets ``start`` (included) to ``end`` (excluded), and the
    index of the document it was copied from (None: no document contains it)."""

    start: int
    end: int
    document: int | None


@dataclass
class DocumentUse:
    """What one document gave an output: ``tokens`` accepted draft tokens in ``spans`` (output token offsets,
    ``[start, end)``, in output order). ``id`` is the document's id when the caller gave one."""

    index: int
    id: str | None = None
    tokens: int = 0
    spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def source(self) -> str:
        """How a response names the document: its id, else ``doc:<index>``."""
        return self.id if self.id is not None else f"doc:{self.index}"

    def to_dict(self) -> dict[str, Any]:
        """As responses report it (JSON-safe): ``index``, ``source``, ``tokens`` and ``spans`` (lists)."""
        return {"index": self.index, "source": self.source, "tokens": self.tokens,
                "spans": [list(span) for span in self.spans]}


def accepted_runs(accepted_lengths: Sequence[int], output_length: int) -> list[tuple[int, int]]:
    """Output token offsets ``[start, end)`` of every non-empty accepted draft run, cut at ``output_length`` (the
    emitted output may stop inside a step: an EOS, a stop string or the token limit)."""
    runs = []
    position = 1  # the prefill's token
    for accepted in accepted_lengths:
        if accepted < 0:
            raise ValueError(f"accepted lengths must be >= 0, got {accepted}")
        end = min(position + accepted, output_length)
        if end > position:
            runs.append((position, end))
        position += accepted + 1
    return runs


def _text(tokens: Sequence[int]) -> str:
    """Token ids as a string of one character each (so ``str.find`` searches token sequences)."""
    try:
        return "".join(map(chr, tokens))
    except (ValueError, OverflowError):
        bad = [t for t in tokens if not 0 <= t < MAX_TOKEN_ID]
        raise ValueError(f"token ids must be in 0..{MAX_TOKEN_ID - 1}, got {bad[:5]}") from None


def _match_length(document: str, output: str, start: int, end: int) -> int:
    """How far the run ``output[start:end]`` extends backwards while ``document`` still contains it: the number of
    output tokens before ``start`` included (-1 when the document does not contain the run itself)."""
    if output[start:end] not in document:
        return -1
    low, high = 0, start  # invariant: output[start - low:end] is in the document
    while low < high:  # containment shrinks as the needle grows: binary search the longest extension
        middle = (low + high + 1) // 2
        if output[start - middle:end] in document:
            low = middle
        else:
            high = middle - 1
    return low


class Attribution:
    """Attributes one output's accepted runs as they come (:meth:`add`), then sums them up per document
    (:meth:`uses`). ``documents`` are token ids, ``ids`` an id per document (None: known by its index)."""

    def __init__(self, documents: Sequence[Sequence[int]], ids: Sequence[str | None] | None = None) -> None:
        if ids is not None and len(ids) != len(documents):
            raise ValueError(f"got {len(ids)} ids for {len(documents)} documents: give one id per document (or None)")
        self.texts = [_text(doc) for doc in documents]
        self.ids = list(ids) if ids is not None else [None] * len(documents)
        self.runs: list[AcceptedRun] = []

    def find(self, output: Sequence[int] | str, start: int, end: int) -> int | None:
        """The index of the document the run ``output[start:end]`` was copied from (None: no document holds it with
        the token before it)."""
        out = output if isinstance(output, str) else _text(output[:end])
        best, best_length = None, 0
        for index, text in enumerate(self.texts):
            length = _match_length(text, out, start, end)
            if length > best_length:
                best, best_length = index, length
        return best

    def add(self, output: Sequence[int] | str, start: int, end: int) -> AcceptedRun:
        """Attribute and record the run ``output[start:end]`` (an empty run is recorded with no document)."""
        run = AcceptedRun(start, end, self.find(output, start, end) if end > start else None)
        self.runs.append(run)
        return run

    def source(self, index: int | None) -> str | None:
        """How a response names document ``index``: its id, else ``doc:<index>`` (None for no document)."""
        return None if index is None else DocumentUse(index, self.ids[index]).source

    def uses(self) -> list[DocumentUse]:
        """Per document, in order: the accepted draft tokens recorded from it and their spans."""
        uses = [DocumentUse(index, name) for index, name in enumerate(self.ids)]
        for run in self.runs:
            if run.document is not None and run.end > run.start:
                use = uses[run.document]
                use.tokens += run.end - run.start
                use.spans.append((run.start, run.end))
        return uses


def attribute_runs(documents: Sequence[Sequence[int]], output: Sequence[int], accepted_lengths: Sequence[int]
                   ) -> list[AcceptedRun]:
    """Every accepted draft run of ``output`` with the index of the document it was copied from (see the module
    docstring), in output order."""
    attribution = Attribution(documents)
    out = _text(output)
    return [attribution.add(out, start, end) for start, end in accepted_runs(accepted_lengths, len(output))]


def provenance(documents: Sequence[Sequence[int]], output: Sequence[int], accepted_lengths: Sequence[int],
               ids: Sequence[str | None] | None = None) -> list[DocumentUse]:
    """Per document (in order, every document listed): how many accepted draft tokens of ``output`` were copied from
    it, and where (see :func:`attribute_runs`).

    Args:
        documents: each document's token ids.
        output: the output's token ids.
        accepted_lengths: draft tokens accepted per decoding step (``GenerationStats.accepted_lengths``).
        ids: an id per document (None for one known by its index only).
    """
    attribution = Attribution(documents, ids)
    out = _text(output)
    for start, end in accepted_runs(accepted_lengths, len(output)):
        attribution.add(out, start, end)
    return attribution.uses()
