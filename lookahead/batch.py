"""The decoding loop: requests decoded together, one tree-masked forward pass per step for all of them.

Each row keeps its own draft tree, prefix length, sampler and stop condition. :meth:`Batch.add` queues a prepared
:class:`~lookahead.outputs.Request`; the next :meth:`Batch.step` prefills it alone, emits its first token and merges
its KV cache into the batch cache. Every later step reads top to bottom:

    propose  each row's drafter counts its new output and proposes a draft tree (trie + budget)
    verify   one pass of the model over every row's tree (:class:`~lookahead.runner.ModelRunner`)
    accept   each row walks its tree: greedy argmax or sample-then-match (:mod:`lookahead.verify`)
    compact  the cache keeps each row's prefix plus its accepted path
    learn    the budget learns what was accepted
    emit     the accepted tokens go through the row's stop condition and out as stream chunks

A row whose request ends leaves the batch in the same step (its output is learned by the trie);
:meth:`Batch.remove` drops one early (a cancelled request). A single request is a batch of one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from .drafter import Drafter, Proposal
from .emitter import Emitter
from .kvcache import append_rows, cache_length, crop, select_rows
from .outputs import GenerationStats, Request, StreamChunk
from .provenance import Attribution
from .runner import ModelRunner, RowLayout
from .sampling import TokenChooser
from .tree import build_tree
from .verify import Acceptance, greedy_accept, walk_accept

#: makes the drafter of a request from its request id and its own trie (None: the engine's current trie; the engine
#: binds its budget and config): ``new_drafter(request_id, trie=request.trie)``
DrafterFactory = Callable[..., Drafter]


def count_prediction(stats: GenerationStats, proposal: Proposal, path: Sequence[int]) -> None:
    """Add one step's prediction nodes to ``stats``: those on the accepted ``path`` (tree indices) were accepted,
    the other verified ones rejected."""
    if not proposal.predicted:
        return
    drafted = sum(proposal.predicted)
    taken = sum(1 for i in path if proposal.predicted[i - 1])
    stats.accepted_prediction_tokens += taken
    stats.rejected_prediction_tokens += drafted - taken


class Row:
    """The state of one request inside a batch."""

    def __init__(self, key: Hashable, request: Request, emitter: Emitter, drafter: Drafter, chooser: TokenChooser
                 ) -> None:
        self.key = key
        self.request = request
        self.emitter = emitter
        self.drafter = drafter
        self.chooser = chooser
        self.stats = GenerationStats(prompt_tokens=len(request.prompt_ids))
        self.attribution = Attribution(request.source_ids, request.source_names or None)
        self.length = 0  # valid positions of this row in the batch cache
        self.pending = -1  # last emitted token, not in the cache yet (the root of the next tree)
        self.last_accepted = 0
        self.start = time.perf_counter()
        self.cache: DynamicCache | None = None  # the row's own cache while it is prefilled, before it joins
        self.prefilled = 0  # prompt tokens in ``cache``
        self.slice_seconds = 0.0  # how long its last prefill slice took

    @property
    def ready(self) -> bool:
        """Prefilled whole, first token chosen: it joins the batch at the end of this step."""
        return self.prefilled == len(self.request.prompt_ids)

    def history(self) -> list[int]:
        """Prompt + output so far: what the sampler's repetition penalty looks at."""
        return self.request.prompt_ids + self.emitter.generated

    def close(self) -> None:
        """Release the row's request-local trie counts; learn its output if it ended normally."""
        self.drafter.finish(self.emitter.generated if self.emitter.finish is not None else None)
        self.stats.time_trie = self.drafter.trie_seconds


class Batch:
    """Rows decoded together on one model runner; each row drafts through its own :class:`Drafter`."""

    def __init__(self, runner: ModelRunner, tokenizer: PreTrainedTokenizerBase, new_drafter: DrafterFactory,
                 max_nodes: int, prefill_chunk: int = 512, prefill_share: float = 0.15) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.new_drafter = new_drafter
        self.max_nodes = max_nodes  # the draft size limit of one row in a pass
        self.prefill_chunk = prefill_chunk
        self.prefill_share = prefill_share
        self.rows: list[Row] = []  # rows in the batch cache, in cache row order
        self.new: list[Row] = []  # added, not joined yet (being prefilled)
        self.cache: DynamicCache | None = None
        self.step_seconds = 0.0  # recent wall time of one decoding step (moving average)
        self.prefill_credit = 0.0  # seconds of long-prompt prefill the decoding rows can give up now

    def __len__(self) -> int:
        return len(self.rows) + len(self.new)

    def keys(self) -> list[Hashable]:
        return [row.key for row in self.rows + self.new]

    # ------------------------------------------------------------------ membership

    def add(self, request: Request, key: Hashable) -> None:
        """Queue a request; it is prefilled and emits its first token at the next :meth:`step`."""
        if any(row.key == key for row in self.rows + self.new):
            raise ValueError(f"key {key!r} is already in this batch")
        emitter = Emitter(self.tokenizer, request.eos, request.stop, request.max_new_tokens)
        chooser = TokenChooser(request.sampling, device=self.runner.device)
        drafter = self.new_drafter(request.request_id, trie=request.trie)
        self.new.append(Row(key, request, emitter, drafter, chooser))

    def remove(self, key: Hashable) -> None:
        """Drop a row (a cancelled request, or one that already finished: then nothing happens)."""
        for row in [row for row in self.new if row.key == key]:
            self.new.remove(row)
            row.close()
        for index, row in enumerate(self.rows):
            if row.key == key:
                self._drop_rows([index])
                return

    def close(self) -> None:
        """Drop every row (releases their request-local trie counts)."""
        for row in self.new + self.rows:
            row.close()
        self.rows, self.new, self.cache = [], [], None

    def _drop_rows(self, indices: Sequence[int]) -> None:
        dropped = set(indices)
        for i in sorted(dropped):
            self.rows[i].close()
        keep = [i for i in range(len(self.rows)) if i not in dropped]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None
        elif dropped:
            select_rows(self.cache, keep, max(row.length for row in self.rows))

    # ------------------------------------------------------------------ one step

    def step(self) -> list[tuple[Hashable, StreamChunk]]:
        """Prefill queued rows, then propose, verify (one pass), accept, compact, learn and emit for every row.

        Returns one ``(key, chunk)`` per row that produced tokens; a chunk with a ``finish_reason`` ends its row,
        which has already left the batch. Queued rows join at the end of the step whose prefill completed them.

        A step that raises (an out-of-memory error, say) leaves every row as it was before the step, so the
        caller can drop a row (:meth:`remove`) and step again.
        """
        self._prefill_queued()
        events = self._decode() if self.rows else []
        ready = [row for row in self.new if row.ready]
        if ready:
            self._join(ready)
            events += [(row.key, self._emit(row, [row.pending], 0)) for row in ready]
        finished = [i for i, row in enumerate(self.rows) if row.emitter.finish is not None]
        if finished:
            self._drop_rows(finished)
        return events

    # ------------------------------------------------------------------ joining

    def _prefill_queued(self) -> None:
        """Advance the prefill of queued rows.

        With no row decoding, every queued row is prefilled whole. Otherwise a prompt of at most
        ``prefill_chunk`` tokens is too (as one decoding step costs), while longer prompts are prefilled (and
        their windows counted in the trie) in slices of ``prefill_chunk`` tokens, one row at a time in arrival
        order, one slice per step at most, and only as far as a time credit allows: each decoding step adds
        ``prefill_share`` of its own duration, and a slice runs once the credit covers it (its cost from the
        cost model, then as last timed). The decoding rows then slow down by about ``prefill_share`` while a
        long prompt joins, instead of stalling for its whole prefill."""
        if not self.new:
            return
        if not self.rows:
            for row in self.new:
                self._prefill(row, len(row.request.prompt_ids))
            return
        long_rows = []
        for row in self.new:
            if row.prefilled == 0 and len(row.request.prompt_ids) <= self.prefill_chunk:
                self._prefill(row, len(row.request.prompt_ids))
            elif not row.ready:
                long_rows.append(row)
        if not long_rows:
            self.prefill_credit = 0.0
            return
        row = long_rows[0]
        estimate = row.slice_seconds or self._slice_estimate(row)
        self.prefill_credit = min(self.prefill_credit + self.prefill_share * self.step_seconds,
                                  max(estimate, self.step_seconds))
        if self.prefill_credit >= estimate:  # at most one slice per step: no step stalls for several
            t0 = time.perf_counter()
            self._prefill(row, row.prefilled + self.prefill_chunk)
            row.slice_seconds = time.perf_counter() - t0
            self.prefill_credit -= row.slice_seconds

    def _slice_estimate(self, row: Row) -> float:
        """Seconds of the row's next prefill slice before one was timed: the recent step time, scaled by what the
        draft budget's cost model says a slice costs against a plain step of the batch."""
        budget = self.rows[0].drafter.budget if self.rows else None
        if budget is None or self.cache is None:
            return self.step_seconds
        cost = budget.cost_model.cost
        tokens = min(self.prefill_chunk, len(row.request.prompt_ids) - row.prefilled)
        return self.step_seconds * cost(tokens, row.prefilled) / cost(1, cache_length(self.cache), len(self.rows))

    def _prefill(self, row: Row, upto: int) -> None:
        """Prefill the row's prompt up to position ``upto`` into its own cache (counting those windows in the
        trie first); the whole prompt done, its first token is chosen and the row is ready to join."""
        request = row.request
        prompt = request.prompt_ids
        if row.cache is None:
            row.drafter.begin(prompt, request.document_ids, request.max_new_tokens, request.prediction_ids)
            row.cache = self.runner.new_cache()
        start, end = row.prefilled, min(upto, len(prompt))
        row.drafter.seed(end)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                hidden = self.runner.prefill(row.cache, prompt[start:end], start)  # [1, d]: the slice's last position
                if end == len(prompt):
                    row.pending = self._choose_first(row, hidden)
        except BaseException:
            crop(row.cache, start)  # as before the slice: it can be tried again
            raise
        row.prefilled = end
        row.stats.time_prefill += time.perf_counter() - t0
        row.stats.time_forward = row.stats.time_prefill
        row.stats.time_trie = row.drafter.trie_seconds

    def _join(self, rows: Sequence[Row]) -> None:
        """Move prefilled rows' caches into the batch cache (one concatenation); they decode from the next step."""
        caches = [row.cache for row in rows]
        if self.cache is None:
            self.cache, caches = caches[0], caches[1:]
        if caches:
            append_rows(self.cache, *caches)
        for row in rows:
            row.cache = None
            row.length = len(row.request.prompt_ids)
            self.new.remove(row)
            self.rows.append(row)
            row.stats.steps = 1

    def _choose_first(self, row: Row, hidden: torch.Tensor) -> int:
        """The token chosen after the prompt, from the last prompt position's hidden state [1, d]."""
        if row.chooser.plain_greedy:
            return int(self.runner.greedy_tokens(hidden)[0])
        return row.chooser(self.runner.logits(hidden)[0], row.history())

    def _decode(self) -> list[tuple[Hashable, StreamChunk]]:
        rows, runner = self.rows, self.runner
        trie_before = [row.drafter.trie_seconds for row in rows]
        t0 = time.perf_counter()
        proposals = self._propose()
        t1 = time.perf_counter()
        layout = RowLayout(tuple(row.length for row in rows), cache_length(self.cache))
        try:
            with torch.inference_mode():
                trees = [build_tree(p.tokens, p.parents) for p in proposals]  # on the host: one upload
                with runner.kernels():
                    hidden = runner.tree_pass(self.cache, trees, layout)  # [B, N, d]
                acceptances = self._accept(proposals, hidden)
                lengths = runner.compact(self.cache, layout, [[0] + a.path for a in acceptances])
        except BaseException:
            crop(self.cache, layout.tree_start)  # every layer as before the pass (stale tails are masked anyway)
            raise
        t2 = time.perf_counter()
        for row, proposal, acceptance, length in zip(rows, proposals, acceptances, lengths):
            row.drafter.observe(proposal, acceptance.path)
            row.length, row.pending, row.last_accepted = length, acceptance.bonus, len(acceptance.path)
        events = [(row.key, self._emit(row, a.tokens, len(a.path))) for row, a in zip(rows, acceptances)]
        t3 = time.perf_counter()
        for row, proposal, acceptance, trie0 in zip(rows, proposals, acceptances, trie_before):
            stats = row.stats
            trie_step = row.drafter.trie_seconds - trie0
            stats.steps += 1
            stats.draft_sizes.append(proposal.size - 1)
            stats.accepted_lengths.append(len(acceptance.path))
            count_prediction(stats, proposal, acceptance.path)
            stats.time_trie = row.drafter.trie_seconds
            stats.time_forward += t2 - t1
            stats.time_other += (t1 - t0) + (t3 - t2) - trie_step
        self.step_seconds = t3 - t0 if not self.step_seconds else 0.8 * self.step_seconds + 0.2 * (t3 - t0)
        return events

    def _propose(self) -> list[Proposal]:
        """Count every row's new output in its trie, draft, and size all drafts with one joint budget choice."""
        found = []
        for row in self.rows:
            generated = row.emitter.generated
            row.drafter.extend(generated)
            found.append(row.drafter.candidates(generated, last_accepted=row.last_accepted))
        budget = self.rows[0].drafter.budget
        assert budget is not None
        counts = budget.sizes([f.ranking for f in found], context=cache_length(self.cache), max_nodes=self.max_nodes)
        return [Drafter.proposal(f, n) for f, n in zip(found, counts)]

    def _accept(self, proposals: Sequence[Proposal], hidden: torch.Tensor) -> list[Acceptance]:
        """Walk every row's verified tree; ``hidden`` [B, N, d] holds the nodes' last hidden states."""
        rows = self.rows
        greedy = [b for b, row in enumerate(rows) if row.chooser.plain_greedy]
        predictions: dict[int, list[int]] = {}
        if greedy:  # one head product for every greedy row
            argmax = self.runner.greedy_tokens(hidden[greedy].flatten(0, 1)).view(len(greedy), -1)  # [b, N]
            predictions = {b: row[:proposals[b].size] for b, row in zip(greedy, argmax.tolist())}
        acceptances = []
        for b, (row, proposal) in enumerate(zip(rows, proposals)):
            if b in predictions:
                acceptances.append(greedy_accept(proposal.tokens, proposal.parents, predictions[b]))
                continue
            logits = self.runner.logits(hidden[b, :proposal.size])  # [n, V]
            history = row.history()
            acceptances.append(walk_accept(proposal.tokens, proposal.parents,
                                           lambda node, path, logits=logits, row=row, history=history:
                                           row.chooser(logits[node], history + path)))
        return acceptances

    def _emit(self, row: Row, tokens: list[int], accepted: int) -> StreamChunk:
        start = len(row.emitter.generated)
        run, delta = row.emitter.push(tokens)
        generated = row.emitter.generated
        row.stats.new_tokens = len(generated)
        source = None
        if accepted and row.attribution.texts:  # where this step's accepted draft tokens were copied from
            found = row.attribution.add(generated, start, min(start + accepted, len(generated)))
            source = row.attribution.source(found.document)
        if row.emitter.finish is None:
            return StreamChunk(run, delta, accepted, source=source)
        row.stats.time_total = time.perf_counter() - row.start
        row.stats.provenance = row.attribution.uses()
        return StreamChunk(run, delta, accepted, row.emitter.finish, source=source, stats=row.stats)
