"""Requests decoded together: each row keeps its own draft tree, prefix length, sampler and stop condition, and
all rows are verified in one tree-masked forward pass per step. A single request is a batch of one.

Row lifecycle: :meth:`Batch.add` queues a prepared :class:`Request`; the next :meth:`Batch.step` prefills it alone,
emits its first token and merges its KV cache into the batch cache. Every later step drafts from the trie, runs one
pass over all rows, accepts each row's longest verified path and emits it. A row whose request ends leaves the batch
in the same step; :meth:`Batch.remove` drops one early (a cancelled request).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from .kvcache import append_rows, cache_length, check_compactable, compact_rows, select_rows
from .sampling import SamplingParams, TokenChooser
from .tree import build_tree
from .verify import Acceptance, greedy_accept, walk_accept

if TYPE_CHECKING:  # pragma: no cover
    from .engine import GenerationStats, LookaheadGenerator, StreamChunk, _Emitter


@dataclass(frozen=True)
class Request:
    """A validated request, ready to decode (see :meth:`LookaheadGenerator.prepare`)."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int  # already capped by the model's context
    eos: frozenset[int]
    stop: tuple[str, ...]
    documents: tuple[str, ...]
    sampling: SamplingParams  # resolved against the model's generation config


@dataclass
class _Draft:
    """One row's verified tree for this step and what the budget needs to learn from it."""

    tokens: list[int]  # root (the pending token) first
    tree_parents: list[int]  # -1 for the root
    draft_parents: list[int]  # parents of the draft nodes only (-1: child of the root)
    scores: list[float]
    global_counts: list[float]
    match_length: int


class _Row:
    """The state of one request inside a batch."""

    def __init__(self, key: Hashable, request: Request, emitter: _Emitter, stats: GenerationStats,
                 chooser: TokenChooser) -> None:
        self.key = key
        self.request = request
        self.emitter = emitter
        self.stats = stats
        self.chooser = chooser
        self.length = 0  # valid positions of this row in the batch cache
        self.pending = -1  # last emitted token, not in the cache yet (the root of the next tree)
        self.last_accepted = 0
        self.learned = 0  # generated tokens already counted in the local trie
        self.start = time.perf_counter()
        self.closed = False

    def history(self, extra: Sequence[int] = ()) -> list[int]:
        """Prompt + output so far (+ ``extra``): what the sampler's repetition penalty looks at."""
        return self.request.prompt_ids + self.emitter.generated + list(extra)


class Batch:
    """Rows decoded together by one :class:`LookaheadGenerator` (its trie, budget and model)."""

    def __init__(self, generator: LookaheadGenerator) -> None:
        self.generator = generator
        self.rows: list[_Row] = []  # rows in the batch cache, in cache row order
        self.new: list[_Row] = []  # added, not prefilled yet
        self.cache: DynamicCache | None = None

    def __len__(self) -> int:
        return len(self.rows) + len(self.new)

    def keys(self) -> list[Hashable]:
        return [row.key for row in self.rows + self.new]

    # ------------------------------------------------------------------ membership

    def add(self, request: Request, key: Hashable) -> None:
        """Queue a request; it is prefilled and emits its first token at the next :meth:`step`."""
        from .engine import GenerationStats, _Emitter

        if any(row.key == key for row in self.rows + self.new):
            raise ValueError(f"key {key!r} is already in this batch")
        stats = GenerationStats(prompt_tokens=len(request.prompt_ids))
        emitter = _Emitter(self.generator.tokenizer, set(request.eos), list(request.stop), request.max_new_tokens)
        chooser = TokenChooser(request.sampling, device=self.generator.device)
        self.new.append(_Row(key, request, emitter, stats, chooser))

    def remove(self, key: Hashable) -> None:
        """Drop a row (a cancelled request, or one that already finished: then nothing happens)."""
        for row in list(self.new):
            if row.key == key:
                self.new.remove(row)
                self._close(row)
        for index, row in enumerate(self.rows):
            if row.key == key:
                self._drop_rows([index])
                return

    def close(self) -> None:
        """Drop every row (releases their request-local trie counts)."""
        for row in self.new:
            self._close(row)
        for row in self.rows:
            self._close(row)
        self.rows, self.new, self.cache = [], [], None

    def _drop_rows(self, indices: Sequence[int]) -> None:
        dropped = set(indices)
        for i in sorted(dropped):
            self._close(self.rows[i])
        keep = [i for i in range(len(self.rows)) if i not in dropped]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None
        elif dropped:
            assert self.cache is not None
            select_rows(self.cache, keep, max(row.length for row in self.rows))

    def _close(self, row: _Row) -> None:
        """Release the row's request-local trie counts; learn its output if it ended normally."""
        if row.closed:
            return
        row.closed = True
        generator = self.generator
        t0 = time.perf_counter()
        generator.trie.release(row.request.request_id)
        generated = row.emitter.generated
        if generator.config.learn_outputs and generated and row.emitter.finish is not None:
            generator.trie.insert(generated)
        row.stats.time_trie += time.perf_counter() - t0

    # ------------------------------------------------------------------ one step

    def step(self) -> list[tuple[Hashable, StreamChunk]]:
        """Prefill queued rows, then draft, verify (one pass), accept and emit for every row.

        Returns one ``(key, chunk)`` per row that produced tokens; a chunk with a ``finish_reason`` ends its row,
        which has already left the batch.
        """
        events = self._decode() if self.rows else []
        for row in self.new:
            self._prefill(row)
            events.append((row.key, self._emit(row, [row.pending], 0)))
        self.new = []
        finished = [i for i, row in enumerate(self.rows) if row.emitter.finish is not None]
        if finished:
            self._drop_rows(finished)
        return events

    def _prefill(self, row: _Row) -> None:
        generator = self.generator
        request = row.request
        t0 = time.perf_counter()
        generator.trie.insert(request.prompt_ids, request_id=request.request_id)
        for doc in request.documents:
            generator.trie.insert(generator.tokenizer(doc, add_special_tokens=False)["input_ids"],
                                  request_id=request.request_id)
        t1 = time.perf_counter()
        row.stats.time_trie += t1 - t0
        cache = DynamicCache(config=generator.model.config)
        check_compactable(cache)
        with torch.inference_mode():
            hidden = generator.prefill(cache, request.prompt_ids)  # [1, d]: the last prompt position
            row.pending = self._first_token(row, hidden)
        row.length = len(request.prompt_ids)
        if self.cache is None:
            self.cache = cache
        else:
            append_rows(self.cache, cache)
        self.rows.append(row)
        row.stats.time_prefill = row.stats.time_forward = time.perf_counter() - t1
        row.stats.steps = 1

    def _first_token(self, row: _Row, hidden: torch.Tensor) -> int:
        """The token chosen after the prompt, from the last prompt position's hidden state [1, d]."""
        if row.chooser.plain_greedy:
            return int(self.generator.greedy_tokens(hidden)[0])
        return row.chooser(self.generator.logits(hidden)[0], row.history())

    def _emit(self, row: _Row, tokens: list[int], accepted: int) -> StreamChunk:
        from .engine import StreamChunk

        t0 = time.perf_counter()
        run, delta = row.emitter.push(tokens)
        row.stats.new_tokens = len(row.emitter.generated)
        row.stats.time_other += time.perf_counter() - t0
        if row.emitter.finish is None:
            return StreamChunk(run, delta, accepted)
        row.stats.time_total = time.perf_counter() - row.start
        return StreamChunk(run, delta, accepted, row.emitter.finish, row.stats)

    def _draft(self, row: _Row, max_nodes: int | None, batch_rows: int) -> _Draft:
        generator, config = self.generator, self.generator.config
        generated, prompt_ids = row.emitter.generated, row.request.prompt_ids
        t0 = time.perf_counter()
        if len(generated) > row.learned:  # the row drafts from its own output at once
            tail = max(0, row.learned - config.branch_length)
            before = prompt_ids[-config.branch_length:] + generated[tail:row.learned]
            generator.trie.extend(before, generated[row.learned:], request_id=row.request.request_id)
            row.learned = len(generated)
        query = config.max_query_length
        context = generated[-query:]
        if len(context) < query:
            context = prompt_ids[len(context) - query:] + context
        remaining = row.request.max_new_tokens - len(generated)
        draft = generator.trie.draft(context, config.decoding_length, request_id=row.request.request_id,
                                     branch_length=max(1, min(config.branch_length, remaining)))
        t1 = time.perf_counter()
        row.stats.time_trie += t1 - t0
        chosen = generator.budget.select(draft.parents, draft.scores, draft.match_length, row.last_accepted,
                                         draft.global_counts, max_nodes=max_nodes,
                                         batch_rows=batch_rows)
        remap = {old: new for new, old in enumerate(chosen)}
        parents = [remap.get(draft.parents[i], -1) for i in chosen]  # -1: child of the root
        result = _Draft(tokens=[row.pending] + [draft.tokens[i] for i in chosen],
                        tree_parents=[-1] + [p + 1 for p in parents], draft_parents=parents,
                        scores=[draft.scores[i] for i in chosen],
                        global_counts=[draft.global_counts[i] for i in chosen], match_length=draft.match_length)
        row.stats.time_other += time.perf_counter() - t1
        return result

    def _accept(self, row: _Row, draft: _Draft, hidden: torch.Tensor, predictions: list[int] | None) -> Acceptance:
        """Walk ``row``'s verified tree; ``hidden`` [n, d] are its nodes' last hidden states."""
        if predictions is not None:
            return greedy_accept(draft.tokens, draft.tree_parents, predictions)
        logits = self.generator.logits(hidden)  # [n, V]
        history = row.history()
        return walk_accept(draft.tokens, draft.tree_parents,
                           lambda node, path: row.chooser(logits[node], history + path))

    def _decode(self) -> list[tuple[Hashable, StreamChunk]]:
        generator, rows = self.generator, self.rows
        assert self.cache is not None
        max_nodes = max(1, generator.config.decoding_length // len(rows)) if len(rows) > 1 else None
        drafts = [self._draft(row, max_nodes, len(rows)) for row in rows]
        t0 = time.perf_counter()
        with torch.inference_mode():
            trees = [build_tree(d.tokens, d.tree_parents, device=generator.device) for d in drafts]
            tree_start = cache_length(self.cache)
            hidden = generator.batch_forward(self.cache, trees, [row.length for row in rows], tree_start)  # [B, N, d]
            predictions: list[list[int] | None] = [None] * len(rows)
            greedy = [b for b, row in enumerate(rows) if row.chooser.plain_greedy]
            if greedy:
                argmax = generator.greedy_tokens(hidden[greedy].flatten(0, 1)).view(len(greedy), -1)  # [b, N]
                for b, row_argmax in zip(greedy, argmax.tolist()):
                    predictions[b] = row_argmax[:trees[b].size]
            acceptances = [self._accept(row, d, hidden[b, :trees[b].size], predictions[b])
                           for b, (row, d) in enumerate(zip(rows, drafts))]
            new_lengths = compact_rows(self.cache, tree_start, [row.length for row in rows],
                                       [[0] + a.path for a in acceptances])
        elapsed = time.perf_counter() - t0
        events = []
        for b, (row, draft, acceptance) in enumerate(zip(rows, drafts, acceptances)):
            row.length = new_lengths[b]
            row.stats.time_forward += elapsed
            row.stats.steps += 1
            t1 = time.perf_counter()
            generator.budget.observe(draft.draft_parents, draft.scores, draft.match_length, row.last_accepted,
                                     [i - 1 for i in acceptance.path], draft.global_counts)
            row.last_accepted = len(acceptance.path)
            row.stats.draft_sizes.append(len(draft.tokens) - 1)
            row.stats.accepted_lengths.append(row.last_accepted)
            row.pending = acceptance.bonus
            row.stats.time_other += time.perf_counter() - t1
            events.append((row.key, self._emit(row, acceptance.tokens, row.last_accepted)))
        return events
