"""One request's drafting lifecycle over the shared trie and the draft budget.

``start`` seeds the trie with the prompt and documents under the request's id; ``extend`` counts its new output
tokens, so the output drafts at once; ``propose`` matches the context tail, drafts from the trie and keeps the
budget's choice, as a :class:`Proposal` in tree index space (node 0 is the root); ``observe`` teaches the budget what
was accepted; ``finish`` releases the request-local counts and learns the output into the global trie. The batch
loop, the speculative ensemble and multidraft all draft through this class.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from .budget import DraftBudget, Ranking
from .config import LookaheadConfig
from .trie import Draft, TokenTrie


@dataclass(frozen=True)
class Candidates:
    """Everything the trie offers for one step, ranked by the budget; :meth:`Drafter.proposal` keeps a prefix."""

    root: int  # the last context token
    draft: Draft
    ranking: Ranking
    last_accepted: int
    follow: int


@dataclass(frozen=True)
class Proposal:
    """This step's tree: node 0 is the root (the last token of the context), nodes ``1..n-1`` the chosen draft.

    ``parents[i]`` is node ``i``'s parent (-1 for the root; parents come before children). ``scores`` and
    ``global_counts`` describe the draft nodes ``1..n-1`` (index ``i - 1``), ``match_length`` the matched context
    suffix and ``last_accepted`` the accepted length the budget priced it with.
    """

    tokens: list[int]  # [n]
    parents: list[int]  # [n]
    scores: list[float]  # [n - 1]
    global_counts: list[float]  # [n - 1]
    match_length: int
    last_accepted: int
    follow: int = 0  # context tokens that had followed one past output (a budget feature)

    @property
    def size(self) -> int:
        """Nodes in the tree, the root included."""
        return len(self.tokens)

    def placed(self, root_at: int, first_at: int) -> list[int]:
        """Parents of the draft nodes ``1..n-1`` in a larger tree where the root sits at node ``root_at`` and draft
        node ``i`` at node ``first_at + i - 1``."""
        return [root_at if p == 0 else first_at + p - 1 for p in self.parents[1:]]


def top_path(draft: Draft) -> list[int]:
    """Indices of the draft's best path: the best node after the context, then always its best child (a draft is
    best-first, so the first child listed)."""
    first_child: dict[int, int] = {}
    for i, p in enumerate(draft.parents):
        first_child.setdefault(p, i)
    path: list[int] = []
    node = first_child.get(-1)
    while node is not None:
        path.append(node)
        node = first_child.get(node)
    return path


def graft(draft: Draft, at: int, more: Draft) -> Draft:
    """``draft`` with the tree ``more`` hung below its node ``at`` (``more``'s nodes follow, their parents shifted).

    Scores of the grafted nodes are capped at node ``at``'s, so they never rise along a path; the list as a whole is
    no longer best-first (the budget ranks the nodes anyway)."""
    offset = len(draft)
    cap = draft.scores[at]
    return Draft(draft.tokens + more.tokens,
                 draft.parents + [at if p < 0 else p + offset for p in more.parents],
                 draft.scores + [min(s, cap) for s in more.scores],
                 draft.match_length,
                 draft.global_counts + more.global_counts)


def new_trie(config: LookaheadConfig) -> TokenTrie:
    """An empty trie with the knobs of ``config``."""
    return TokenTrie(branch_length=config.branch_length, max_query_length=config.max_query_length,
                     node_budget=config.node_budget, decay=config.decay, local_weight=config.local_weight,
                     global_weight=config.global_weight)


class Drafter:
    """Drafts for one request (and for several lines of it: each ``propose`` names its own output so far).

    ``trie_seconds`` adds up the time spent in the trie (seeding, counting, drafting, releasing, learning).
    ``budget`` may be None for a user of the trie counts only (no :meth:`propose`).
    """

    def __init__(self, trie: TokenTrie, budget: DraftBudget | None, config: LookaheadConfig,
                 request_id: str | None = None) -> None:
        self.trie = trie
        self.budget = budget
        self.config = config
        self.request_id = request_id or uuid.uuid4().hex
        self.prompt_ids: list[int] = []
        self.documents: list[list[int]] = []  # not counted yet
        self.seeded = 0  # prompt positions whose windows are counted
        self.max_new_tokens = 0
        self.learned = 0  # output tokens already counted in the request-local trie
        self.trie_seconds = 0.0
        self.finished = False
        self.follow = 0  # see follow_length
        self.follow_end = -1  # len(generated) when ``follow`` was computed

    def start(self, prompt_ids: Sequence[int], documents: Sequence[Sequence[int]] = (),
              max_new_tokens: int = 1 << 30) -> None:
        """Count the prompt's and the documents' windows as this request's local trie."""
        self.begin(prompt_ids, documents, max_new_tokens)
        self.seed()

    def begin(self, prompt_ids: Sequence[int], documents: Sequence[Sequence[int]] = (),
              max_new_tokens: int = 1 << 30) -> None:
        """Take the request's prompt and documents without counting anything yet (see :meth:`seed`)."""
        self.prompt_ids = list(prompt_ids)
        self.documents = [list(doc) for doc in documents]
        self.max_new_tokens = max_new_tokens
        self.seeded = 0

    def seed(self, upto: int | None = None) -> None:
        """Count the prompt's windows that start before position ``upto`` (None: all of them), and the documents
        once the whole prompt is counted. Seeding a long prompt slice by slice leaves the same counts as at once."""
        t0 = time.perf_counter()
        prompt = self.prompt_ids
        end = len(prompt) if upto is None else min(upto, len(prompt))
        if end > self.seeded:
            if self.seeded == 0:
                self.trie.insert(prompt[:end], request_id=self.request_id)
            else:
                self.trie.extend(prompt[:self.seeded], prompt[self.seeded:end], request_id=self.request_id)
            self.seeded = end
        if end == len(prompt) and self.documents:
            for doc in self.documents:
                self.trie.insert(doc, request_id=self.request_id)
            self.documents = []
        self.trie_seconds += time.perf_counter() - t0

    def extend(self, generated: Sequence[int]) -> None:
        """Count the output tokens not counted yet (``generated`` is the whole output so far)."""
        if len(generated) <= self.learned:
            return
        t0 = time.perf_counter()
        tail = self.config.branch_length  # only the last branch_length counted tokens matter to the trie
        before = (self.prompt_ids[-tail:] + list(generated[max(0, self.learned - tail):self.learned]))[-tail:]
        self.trie.extend(before, generated[self.learned:], request_id=self.request_id)
        self.learned = len(generated)
        self.trie_seconds += time.perf_counter() - t0

    def follow_length(self, context: Sequence[int], at_most: int) -> int:
        """How many of the last tokens of ``context`` follow one past output: the longest suffix (at most
        ``at_most`` tokens) that is a path of the trie with a global count. A context that repeats a past answer
        reaches a whole window within a step, so the budget recognises the repeat and drafts deep."""
        length = min(at_most, len(context))
        while length > 0 and self.trie.count(context[-length:]) <= 0:
            length -= 1
        return length

    def candidates(self, generated: Sequence[int], *, after: Sequence[int] = (), last_accepted: int = 0
                   ) -> Candidates:
        """Draft from the trie after ``prompt + generated + after`` and rank the nodes (nothing is chosen yet)."""
        if self.budget is None:
            raise RuntimeError("this drafter has no draft budget: it cannot propose")
        config = self.config
        t0 = time.perf_counter()
        width = max(config.max_query_length, config.branch_length + 1)
        context = (self.prompt_ids[-width:] + list(generated[-width:]) + list(after))[-width:]  # tails only
        remaining = self.max_new_tokens - len(generated)
        draft = self.extended(self.trie.draft(context[-config.max_query_length:], config.decoding_length,
                                              request_id=self.request_id,
                                              branch_length=max(1, min(config.branch_length, remaining))),
                              context, remaining)
        follow = 0
        if not after:  # the main line, followed step by step (other lines are drafted without the feature)
            end = len(generated)  # the context grew by ``end - self.follow_end`` tokens since the last call
            grown = end - self.follow_end
            at_most = config.branch_length + 1
            if self.follow_end >= 0 and grown >= 0:  # a longer match would have matched before, minus the growth
                at_most = min(at_most, self.follow + grown)
            follow = self.follow = self.follow_length(context, at_most)
            self.follow_end = end
        self.trie_seconds += time.perf_counter() - t0
        ranking = self.budget.rank(draft.parents, draft.scores, draft.match_length, last_accepted,
                                   draft.global_counts, follow)
        return Candidates(context[-1], draft, ranking, last_accepted, follow)

    def extended(self, draft: Draft, context: Sequence[int], remaining: int) -> Draft:
        """``draft`` with its best path drafted on past the trie's window depth.

        A trie window holds ``branch_length + 1`` tokens, so a draft after a match of ``q`` tokens is at most
        ``branch_length + 1 - q`` deep, however long the text it repeats (a past answer asked again). When the best
        path reaches that depth, the trie is asked again after the context plus that path and the answer is
        grafted below its end, until the path is ``decoding_length`` deep (or ``remaining`` tokens long, or the
        trie has nothing more); each call adds at most as many nodes as the path still lacks."""
        config = self.config
        limit = min(config.decoding_length, remaining)
        path = top_path(draft)
        piece_depth, piece_match = len(path), draft.match_length
        while path and len(path) < limit and piece_depth >= config.branch_length + 1 - piece_match:
            tail = (list(context) + [draft.tokens[i] for i in path])[-config.max_query_length:]
            more = self.trie.draft(tail, limit - len(path), request_id=self.request_id,
                                   branch_length=min(config.branch_length, limit - len(path)))
            if more.match_length < len(tail):  # only a shorter suffix matched: not the same text going on
                break
            first = len(draft)
            draft = graft(draft, path[-1], more)
            piece = top_path(more)
            path += [first + i for i in piece]
            piece_depth, piece_match = len(piece), more.match_length
        return draft

    @staticmethod
    def proposal(candidates: Candidates, count: int) -> Proposal:
        """The tree of the first ``count`` ranked candidates (root first)."""
        draft, chosen = candidates.draft, candidates.ranking.chosen(count)
        tree_index = {old: new for new, old in enumerate(chosen, start=1)}  # draft index -> tree index
        return Proposal(tokens=[candidates.root] + [draft.tokens[i] for i in chosen],
                        parents=[-1] + [tree_index.get(draft.parents[i], 0) for i in chosen],
                        scores=[draft.scores[i] for i in chosen],
                        global_counts=[draft.global_counts[i] for i in chosen],
                        match_length=draft.match_length, last_accepted=candidates.last_accepted,
                        follow=candidates.follow)

    def propose(self, generated: Sequence[int], *, after: Sequence[int] = (), last_accepted: int = 0,
                max_nodes: int | None = None, batch_rows: int = 1, truncate: int | None = None, context: int = 0
                ) -> Proposal:
        """The draft tree to verify after ``prompt + generated + after`` (its last token is the root), sized by
        the budget for this row alone.

        ``last_accepted`` (the previous step's accepted length), ``max_nodes``, ``batch_rows`` and ``context`` (the
        cache length) price it (see :meth:`DraftBudget.sizes`); ``truncate`` keeps only the first nodes of its
        choice (still a tree).
        """
        found = self.candidates(generated, after=after, last_accepted=last_accepted)
        count = self.budget.sizes([found.ranking] * batch_rows, context, max_nodes)[0]  # type: ignore[union-attr]
        if truncate is not None:
            count = min(count, truncate)
        return self.proposal(found, count)

    def observe(self, proposal: Proposal, accepted: Sequence[int]) -> None:
        """Teach the budget: ``accepted`` are the accepted draft nodes (tree indices >= 1, path order)."""
        draft_parents = [p - 1 for p in proposal.parents[1:]]  # -1: child of the root
        self.budget.observe(draft_parents, proposal.scores, proposal.match_length, proposal.last_accepted,
                            [i - 1 for i in accepted], proposal.global_counts, proposal.follow)

    def finish(self, output: Sequence[int] | None = None) -> None:
        """Release the request-local counts; learn ``output`` into the global trie (when given and the config
        learns outputs). Only the first call does anything."""
        if self.finished:
            return
        self.finished = True
        t0 = time.perf_counter()
        self.trie.release(self.request_id)
        if self.config.learn_outputs and output:
            self.trie.insert(list(output))
        self.trie_seconds += time.perf_counter() - t0
