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

A fault costs one row. Every allocation of a step either belongs to one row (its prefill, drafting, acceptance,
learning, emitting, joining) or is all or nothing (the shared tree pass, the cache compactions), and state is
committed only after it succeeded. A row whose own work raises ends with ``finish_reason`` "error" and a message
(never a shorter answer that looks complete) and leaves the batch; the other rows go on exactly as before. A shared
pass that raises leaves every row as before the step; out of memory, the newest row is failed and the others retry
at the next step, any other error fails every row of that pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from .budget import Ranking
from .drafter import Candidates, Drafter, Proposal
from .emitter import Emitter
from .kvcache import append_rows, cache_length, crop, keep_rows_in_place, select_rows
from .outputs import GenerationStats, Request, StreamChunk
from .provenance import Attribution
from .runner import ModelRunner, RowLayout
from .sampling import TokenChooser
from .tree import build_tree
from .trie import Draft
from .verify import Acceptance, greedy_accept, walk_accept

log = logging.getLogger(__name__)

#: makes the drafter of a request from its request id and its own trie (None: the engine's current trie; the engine
#: binds its budget and config): ``new_drafter(request_id, trie=request.trie, budget=None)``
DrafterFactory = Callable[..., Drafter]
#: one event of a step: the row's key and its chunk
Event = tuple[Hashable, StreamChunk]


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory (``torch.OutOfMemoryError`` or a RuntimeError saying
    "out of memory", as some backends raise)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


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
        self.slice_scale = 1.0  # measured over estimated seconds of its prefill slices (see Batch._next_slice)
        self.failed = False  # a fault ended it (its error chunk is out); it leaves the batch at the end of the step

    @property
    def ready(self) -> bool:
        """Prefilled whole, first token chosen: it joins the batch at the end of this step."""
        return self.prefilled == len(self.request.prompt_ids)

    def history(self) -> list[int]:
        """Prompt + output so far: what the sampler's repetition penalty looks at."""
        return self.request.prompt_ids + self.emitter.generated

    def close(self) -> None:
        """Release the row's request-local trie counts; learn its output if it ended normally."""
        self.drafter.finish(self.emitter.generated if self.emitter.finish is not None and not self.failed else None)
        self.stats.time_trie = self.drafter.trie_seconds


class Batch:
    """Rows decoded together on one model runner; each row drafts through its own :class:`Drafter`."""

    def __init__(self, runner: ModelRunner, tokenizer: PreTrainedTokenizerBase, new_drafter: DrafterFactory,
                 max_nodes: int, prefill_chunk: int = 512, prefill_share: float = 0.15, join_stall: float = 4.0
                 ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.new_drafter = new_drafter
        self.max_nodes = max_nodes  # the draft size limit of one row in a pass
        self.prefill_chunk = prefill_chunk
        self.prefill_share = prefill_share
        self.join_stall = join_stall
        self.rows: list[Row] = []  # rows in the batch cache, in cache row order
        self.new: list[Row] = []  # added, not joined yet (being prefilled)
        self.cache: DynamicCache | None = None
        self.step_seconds = 0.0  # recent wall time of one decoding step (moving average)
        self._plain_key: tuple[int, int, int] | None = None  # (cost model, rows, context // 32) of _plain_cost
        self._plain_cost = 0.0
        self.prefill_credit = 0.0  # seconds of long-prompt prefill the decoding rows can give up now
        self.failed: list[Event] = []  # error chunks of rows that failed outside a step, for the next step

    def __len__(self) -> int:
        return len(self.rows) + len(self.new) + len(self.failed)

    def keys(self) -> list[Hashable]:
        return [row.key for row in self.rows + self.new] + [key for key, _ in self.failed]

    # ------------------------------------------------------------------ membership

    def add(self, request: Request, key: Hashable) -> None:
        """Queue a request; it is prefilled and emits its first token at the next :meth:`step`."""
        if any(row.key == key for row in self.rows + self.new):
            raise ValueError(f"key {key!r} is already in this batch")
        emitter = Emitter(self.tokenizer, request.eos, request.stop, request.max_new_tokens)
        chooser = TokenChooser(request.sampling, device=self.runner.device)
        budget = request.options.budget if request.options is not None else None
        drafter = self.new_drafter(request.request_id, trie=request.trie, budget=budget)
        self.new.append(Row(key, request, emitter, drafter, chooser))

    def remove(self, key: Hashable) -> None:
        """Drop a row (a cancelled request, or one that already finished: then nothing happens)."""
        self.failed = [(k, chunk) for k, chunk in self.failed if k != key]  # its error chunk is not needed now
        for row in [row for row in self.new if row.key == key]:
            self.new.remove(row)
            row.cache = None
            self._close(row)
        for index, row in enumerate(self.rows):
            if row.key == key:
                self._drop_rows([index])
                return

    def close(self) -> None:
        """Drop every row (releases their request-local trie counts)."""
        for row in self.new + self.rows:
            self._close(row)
        self.rows, self.new, self.cache, self.failed = [], [], None, []

    def _close(self, row: Row) -> None:
        """Close a leaving row; its answer is out already, so a failure to learn it is only logged."""
        try:
            row.close()
        except Exception:  # noqa: BLE001 - the row has ended either way
            log.exception("row %r: releasing or learning its output failed", row.key)

    def _fail(self, row: Row, error: BaseException, during: str) -> Event:
        """End ``row`` with finish_reason "error" (it leaves the batch at the end of the step)."""
        row.failed = True
        log.warning("row %r failed while %s: %s: %s", row.key, during, type(error).__name__, error)
        row.stats.new_tokens = len(row.emitter.generated)
        row.stats.time_total = time.perf_counter() - row.start
        message = f"generation failed while {during} ({type(error).__name__}: {error})"
        return row.key, StreamChunk([], "", 0, "error", stats=row.stats, error=message, exception=error)

    def _drop_rows(self, indices: Sequence[int]) -> None:
        """Close rows ``indices`` and shrink the batch cache to the others. The leaving rows are closed first, so
        they complete whatever happens to the cache; if it cannot be shrunk even in place, the rows left in it
        fail (their error chunks go out with the next step)."""
        dropped = set(indices)
        for i in sorted(dropped):
            self._close(self.rows[i])
        keep = [i for i in range(len(self.rows)) if i not in dropped]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None
            return
        if not dropped:
            return
        length = max(row.length for row in self.rows)
        try:
            select_rows(self.cache, keep, length)
        except Exception as error:  # noqa: BLE001 - all or nothing: the cache is as it was
            log.warning("shrinking the batch cache failed (%s: %s); compacting it in place", type(error).__name__,
                        error)
            try:
                keep_rows_in_place(self.cache, keep, length)
            except Exception as error:  # noqa: BLE001 - the cache may be half moved: no row in it can go on
                self.failed += [self._fail(row, error, "shrinking the batch cache") for row in self.rows]
                for row in self.rows:
                    self._close(row)
                self.rows, self.cache = [], None

    # ------------------------------------------------------------------ one step

    def step(self) -> list[tuple[Hashable, StreamChunk]]:
        """Prefill queued rows, then propose, verify (one pass), accept, compact, learn and emit for every row.

        Returns one ``(key, chunk)`` per row that produced tokens; a chunk with a ``finish_reason`` ends its row,
        which has already left the batch. Queued rows join at the end of the step whose prefill completed them.

        A fault ends the row(s) it belongs to with a chunk whose ``finish_reason`` is "error" (and ``error`` says
        what failed); see the module's docstring. Only a KeyboardInterrupt and the like propagate.
        """
        events, self.failed = self.failed, []
        events += self._prefill_queued()
        if self.rows:
            events += self._decode()
        ready = [row for row in self.new if row.ready]
        if ready:
            events += self._join(ready)
        ended = [i for i, row in enumerate(self.rows) if row.failed or row.emitter.finish is not None]
        if ended:
            self._drop_rows(ended)
            events, self.failed = events + self.failed, []
        return events

    # ------------------------------------------------------------------ joining

    def _prefill_queued(self) -> list[Event]:
        """Advance the prefill of queued rows.

        With no row decoding, every queued row is prefilled whole. Otherwise a joining prompt is prefilled in
        slices, so that no decoding step takes much longer than usual: the slices one step runs may add at most
        ``join_stall`` of the recent step time (sized by the draft budget's cost model, corrected by how long the
        row's earlier slices took; the first slice of a step always runs, one token at least). Prompts of at most
        ``prefill_chunk`` tokens join first, in arrival order, slice after slice within that allowance; longer
        ones then, one row at a time, one slice a step of at most ``prefill_chunk`` tokens, and only as far as a
        time credit allows: each decoding step adds ``prefill_share`` of its own duration, and a slice runs once
        the credit covers it. The decoding rows then slow down by about ``prefill_share`` while a long prompt
        joins, instead of stalling for its whole prefill. A row whose prefill fails leaves the batch with an error
        chunk (returned)."""
        events: list[Event] = []
        if not self.new:
            return events
        if not self.rows:
            for row in list(self.new):
                self._try_prefill(row, len(row.request.prompt_ids), events)
            return events
        allowance = self.join_stall * self.step_seconds if self.step_seconds else None
        pending = [row for row in self.new if not row.ready]
        short = [row for row in pending if len(row.request.prompt_ids) <= self.prefill_chunk]
        if short:
            self.prefill_credit = 0.0
            spent = 0.0
            for row in short:
                while not row.ready:
                    left = None if allowance is None else allowance - spent
                    tokens, estimate = self._next_slice(row, left)
                    if spent > 0 and left is not None and estimate > left:
                        return events  # the rest at the next step
                    took = self._timed_slice(row, tokens, estimate, events)
                    if took is None:
                        break  # it failed and left
                    spent += took
            return events
        if not pending:
            self.prefill_credit = 0.0
            return events
        row = pending[0]
        tokens, estimate = self._next_slice(row, allowance)
        self.prefill_credit = min(self.prefill_credit + self.prefill_share * self.step_seconds,
                                  max(estimate, self.step_seconds))
        if self.prefill_credit >= estimate:  # at most one slice per step: no step stalls for several
            took = self._timed_slice(row, tokens, estimate, events)
            if took is not None:
                self.prefill_credit -= took
        return events

    def _try_prefill(self, row: Row, upto: int, events: list[Event]) -> bool:
        """:meth:`_prefill`; if it raises, the row leaves the batch (its own cache is dropped) with an error chunk
        added to ``events``. Returns whether it succeeded."""
        try:
            self._prefill(row, upto)
        except Exception as error:  # noqa: BLE001 - the fault belongs to this row alone
            self.new.remove(row)
            row.cache = None
            events.append(self._fail(row, error, "prefilling the prompt"))
            self._close(row)
            return False
        return True

    def _next_slice(self, row: Row, allowance: float | None) -> tuple[int, float]:
        """(tokens, estimated seconds) of the row's next prefill slice: at most ``prefill_chunk`` tokens, and the
        most whose estimate fits ``allowance`` seconds (None: no limit), or costs no more than one token does. The
        estimate is the recent step time, times what the draft budget's cost model says that many tokens after the
        prefilled ones cost against a plain step of the batch, times the row's ratio of measured to estimated
        seconds so far (the recent step time without a cost model)."""
        limit = min(self.prefill_chunk, len(row.request.prompt_ids) - row.prefilled)
        budget = self.rows[0].drafter.budget if self.rows else None
        if budget is None or self.cache is None:
            return limit, self.step_seconds
        cost, at = budget.cost_model.cost, row.prefilled
        step = row.slice_scale * self.step_seconds / float(cost(1, cache_length(self.cache), len(self.rows)))

        def seconds(n: int) -> float:  # the recent step time, times what the model says n tokens cost against it
            return step * float(cost(n, at))

        if allowance is None or seconds(limit) <= allowance:
            return limit, seconds(limit)
        cap = max(allowance, seconds(1))  # a slice runs anyway: what costs no more than one token rides along
        low, high = 1, limit  # the largest n whose estimate fits (costs grow with n)
        while low < high:
            middle = (low + high + 1) // 2
            if seconds(middle) <= cap:
                low = middle
            else:
                high = middle - 1
        return low, seconds(low)

    def _timed_slice(self, row: Row, tokens: int, estimate: float, events: list[Event]) -> float | None:
        """Prefill the row's next ``tokens`` prompt tokens; returns the seconds it took (None: it failed and
        left the batch with an error chunk in ``events``) and updates the row's measured-to-estimated ratio."""
        t0 = time.perf_counter()
        if not self._try_prefill(row, row.prefilled + tokens, events):
            return None
        took = time.perf_counter() - t0
        if estimate > 0:
            row.slice_scale = 0.5 * row.slice_scale + 0.5 * took / (estimate / row.slice_scale)
        return took

    def _prefill(self, row: Row, upto: int) -> None:
        """Prefill the row's prompt up to position ``upto`` into its own cache (counting those windows in the
        trie first); the whole prompt done, its first token is chosen and the row is ready to join."""
        request = row.request
        prompt = request.prompt_ids
        if row.cache is None:
            row.drafter.begin(prompt, request.document_ids, request.max_new_tokens, request.prediction_ids,
                              derived_from=request.derived_from)
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

    def _join(self, rows: Sequence[Row]) -> list[Event]:
        """Move prefilled rows' caches into the batch cache (one concatenation) and emit their first tokens; they
        decode from the next step. If the concatenation fails, each row is tried alone, and a row that still does
        not fit leaves with an error chunk: the rows already in the batch are untouched either way."""
        events: list[Event] = []
        joined, failed = list(rows), []
        try:
            self._append(rows)
        except Exception as error:  # noqa: BLE001 - all or nothing: the batch cache is as it was
            joined, failed = [], [(rows[0], error)] if len(rows) == 1 else []
            for row in rows if len(rows) > 1 else ():
                try:
                    self._append([row])
                    joined.append(row)
                except Exception as alone:  # noqa: BLE001 - the fault belongs to this row alone
                    failed.append((row, alone))
        for row, error in failed:
            self.new.remove(row)
            row.cache = None
            events.append(self._fail(row, error, "joining the batch"))
            self._close(row)
        for row in joined:
            row.cache = None
            row.length = len(row.request.prompt_ids)
            self.new.remove(row)
            self.rows.append(row)
            row.stats.steps = 1
            events.append(self._emit_or_fail(row, [row.pending], 0))
        return events

    def _append(self, rows: Sequence[Row]) -> None:
        """Concatenate the rows' own caches onto the batch cache: all or nothing (see :func:`append_rows`)."""
        caches = [row.cache for row in rows]
        assert all(cache is not None for cache in caches)
        if self.cache is not None:
            append_rows(self.cache, *caches)
            return
        first, rest = caches[0], caches[1:]
        if rest:
            append_rows(first, *rest)
        self.cache = first

    def _choose_first(self, row: Row, hidden: torch.Tensor) -> int:
        """The token chosen after the prompt, from the last prompt position's hidden state [1, d]."""
        if row.chooser.plain_greedy:
            return int(self.runner.greedy_tokens(hidden)[0])
        return row.chooser(self.runner.logits(hidden)[0], row.history())

    def _decode(self) -> list[Event]:
        """Propose, verify, accept, compact, learn and emit for every row (one tree pass); see :meth:`step`."""
        rows, runner = self.rows, self.runner
        events: list[Event] = []
        trie_before = [row.drafter.trie_seconds for row in rows]
        t0 = time.perf_counter()
        try:
            proposals = self._propose(events)
        except Exception as error:  # noqa: BLE001 - the joint budget choice: nothing is committed yet
            return events + self._pass_failed(error, "sizing the drafts")
        t1 = time.perf_counter()
        layout = RowLayout(tuple(row.length for row in rows), cache_length(self.cache))
        try:
            with torch.inference_mode():
                trees = [build_tree(p.tokens, p.parents) for p in proposals]  # on the host: one upload
                with runner.kernels():
                    hidden = runner.tree_pass(self.cache, trees, layout)  # [B, N, d]
                acceptances = self._accept(proposals, hidden, events)
                lengths = runner.compact(self.cache, layout, [[0] + a.path for a in acceptances])
        except Exception as error:  # noqa: BLE001 - the shared pass: every row as before it, then a policy
            crop(self.cache, layout.tree_start)  # every layer as before the pass (stale tails are masked anyway)
            return events + self._pass_failed(error, "verifying the drafts (the tree pass)")
        except BaseException:
            crop(self.cache, layout.tree_start)
            raise
        t2 = time.perf_counter()
        for row, proposal, acceptance, length in zip(rows, proposals, acceptances, lengths):
            row.length = length  # what the cache holds now, failed or not
            if row.failed:
                continue
            row.pending, row.last_accepted = acceptance.bonus, len(acceptance.path)
            try:
                row.drafter.observe(proposal, acceptance.path)
            except Exception as error:  # noqa: BLE001 - the fault belongs to this row alone
                events.append(self._fail(row, error, "learning from the accepted draft"))
                continue
            events.append(self._emit_or_fail(row, acceptance.tokens, len(acceptance.path)))
        t3 = time.perf_counter()
        for row, proposal, acceptance, trie0 in zip(rows, proposals, acceptances, trie_before):
            if row.failed:
                continue
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
        plain = self._plain_seconds(layout, t2 - t1)
        for _, chunk in events:
            chunk.plain_seconds = plain
        return events

    def _plain_seconds(self, layout: RowLayout, seconds: float) -> float:
        """What a pass without drafts (one token a row) costs at this context and batch: the draft budget's cost
        model, the same for a row whatever it drafted (a stream paced by it shows nothing of the drafts), or the
        pass's own ``seconds`` when they are fewer (a model that is not in this machine's seconds) or there is no
        budget."""
        budget = self.rows[0].drafter.budget if self.rows else None
        if budget is None:
            return seconds
        key = (id(budget.cost_model), len(layout.lengths), layout.tree_start >> 5)  # one model call per 32 positions
        if self._plain_key != key:
            self._plain_key = key
            self._plain_cost = float(budget.cost_model.cost(1, layout.tree_start, len(layout.lengths)))
        return min(seconds, self._plain_cost)

    def _pass_failed(self, error: BaseException, during: str) -> list[Event]:
        """A step's shared work failed (every row is as before it): out of memory with several rows, the newest
        row fails and the others retry at the next step; otherwise every row of the pass fails."""
        live = [row for row in self.rows if not row.failed]
        if is_out_of_memory(error) and len(live) > 1:
            return [self._fail(live[-1], error, f"{during}: out of device memory with {len(live)} rows decoding "
                                                f"together; the newest was stopped so that the others go on")]
        return [self._fail(row, error, during) for row in live]

    def _propose(self, events: list[Event]) -> list[Proposal]:
        """Count every row's new output in its trie, draft, and size all drafts with one joint budget choice. A
        row whose drafting fails gets an error chunk (added to ``events``) and a tree of its root alone."""
        found = []
        for row in self.rows:
            try:
                generated = row.emitter.generated
                row.drafter.extend(generated)
                found.append(row.drafter.candidates(generated, last_accepted=row.last_accepted))
            except Exception as error:  # noqa: BLE001 - the fault belongs to this row alone
                events.append(self._fail(row, error, "drafting"))
                found.append(Candidates(row.pending, Draft([], [], [], 0), Ranking([], []), row.last_accepted, 0))
        budget = self.rows[0].drafter.budget
        assert budget is not None
        counts = budget.sizes([f.ranking for f in found], context=cache_length(self.cache), max_nodes=self.max_nodes)
        return [Drafter.proposal(f, 0 if row.failed else n) for row, f, n in zip(self.rows, found, counts)]

    def _accept(self, proposals: Sequence[Proposal], hidden: torch.Tensor, events: list[Event]
                ) -> list[Acceptance]:
        """Walk every row's verified tree; ``hidden`` [B, N, d] holds the nodes' last hidden states. A row whose
        walk fails (or that failed before) accepts nothing and gets an error chunk (added to ``events``)."""
        rows = self.rows
        greedy = [b for b, row in enumerate(rows) if row.chooser.plain_greedy and not row.failed]
        predictions: dict[int, list[int]] = {}
        if greedy:  # one head product for every greedy row
            argmax = self.runner.greedy_tokens(hidden[greedy].flatten(0, 1)).view(len(greedy), -1)  # [b, N]
            predictions = {b: row[:proposals[b].size] for b, row in zip(greedy, argmax.tolist())}
        acceptances = []
        for b, (row, proposal) in enumerate(zip(rows, proposals)):
            try:
                if row.failed:
                    acceptances.append(Acceptance([], [], row.pending))
                elif b in predictions:
                    acceptances.append(greedy_accept(proposal.tokens, proposal.parents, predictions[b]))
                else:
                    logits = self.runner.logits(hidden[b, :proposal.size])  # [n, V]
                    history = row.history()
                    acceptances.append(walk_accept(proposal.tokens, proposal.parents,
                                                   lambda node, path, logits=logits, row=row, history=history:
                                                   row.chooser(logits[node], history + path)))
            except Exception as error:  # noqa: BLE001 - the fault belongs to this row alone
                events.append(self._fail(row, error, "accepting the draft"))
                acceptances.append(Acceptance([], [], row.pending))
        return acceptances

    def _emit_or_fail(self, row: Row, tokens: list[int], accepted: int) -> Event:
        """:meth:`_emit`, or the row's error chunk if emitting raises."""
        try:
            return row.key, self._emit(row, tokens, accepted)
        except Exception as error:  # noqa: BLE001 - the fault belongs to this row alone
            return self._fail(row, error, "emitting the accepted tokens")

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
