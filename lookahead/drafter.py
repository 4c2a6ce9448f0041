"""One request's drafting lifecycle over the shared trie and the draft budget.

``start`` seeds the trie with the prompt and documents under the request's id; ``extend`` counts its new output
tokens, so the output drafts at once; ``propose`` matches the context tail, drafts from the trie and keeps the
budget's choice, as a :class:`Proposal` in tree index space (node 0 is the root); ``observe`` teaches the budget what
was accepted; ``finish`` releases the request-local counts and learns the output into the global trie. The batch
loop, the speculative ensemble and multidraft all draft through this class.

A request with a predicted output (``prediction``: an edit's original text, say) drafts it first: the output so far
is aligned with the prediction (:func:`align_prediction`) and the prediction's continuation is grafted into the
trie's draft as a chain (:func:`with_chain`) whose nodes are priced by how often this request's prediction nodes
were accepted (:class:`PredictionRate`), not by the budget's trie statistics.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from .budget import DraftBudget, Ranking
from .config import LookaheadConfig
from .store import DraftStore, StagedDocuments
from .trie import Draft, TokenTrie

#: what a drafter drafts from: the draft store (the engine's) or the oracle trie (tests)
DraftSource = DraftStore | TokenTrie


@dataclass(frozen=True)
class Candidates:
    """Everything the trie offers for one step, ranked by the budget; :meth:`Drafter.proposal` keeps a prefix."""

    root: int  # the last context token
    draft: Draft
    ranking: Ranking
    last_accepted: int
    follow: int
    predicted: list[bool] | None = None  # per draft node: from the prediction (None: no prediction drafted)


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
    predicted: list[bool] | None = None  # [n - 1]: draft node from the prediction (None: no prediction drafted)

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


def as_text(tokens: Sequence[int]) -> str:
    """Token ids as one character each, so that ``str.find`` searches token sequences."""
    return "".join(map(chr, tokens))


def align_prediction(prediction: str, output: Sequence[int], expected: int, max_query: int = 8) -> int | None:
    """Where the output so far stands in the prediction: the index of the next predicted token, or None.

    ``prediction`` is the predicted token ids as :func:`as_text`. The ``expected`` position (where the last
    alignment, moved on by the tokens emitted since, puts it) wins when the prediction's token before it is the
    output's last token; otherwise the output's longest suffix (``max_query`` down to 2 tokens) found in the
    prediction with a continuation decides, at the occurrence nearest ``expected`` (the later one on a tie)."""
    n = len(prediction)
    if not output or not n:
        return None
    if 0 < expected < n and ord(prediction[expected - 1]) == output[-1]:
        return expected
    tail = as_text(output[-max_query:])
    for q in range(len(tail), 1, -1):
        needle = tail[-q:]
        best = None
        at = prediction.find(needle)
        while 0 <= at and at + q < n:
            j = at + q
            if best is None or abs(j - expected) <= abs(best - expected):
                best = j
            at = prediction.find(needle, at + 1)
        if best is not None:
            return best
    return None


def with_chain(draft: Draft, chain: Sequence[int]) -> tuple[Draft, list[bool]]:
    """``draft`` with ``chain`` (tokens that follow the context, in order) in it, and per node whether it is on the
    chain. The chain follows the draft's nodes while their tokens agree; the rest hangs below as new nodes scored
    above every trie node (their global counts 0)."""
    on_chain = [False] * len(draft)
    child = {(p, t): i for i, (p, t) in enumerate(zip(draft.parents, draft.tokens))}
    node, k = -1, 0
    while k < len(chain) and (node, chain[k]) in child:
        node = child[(node, chain[k])]
        on_chain[node] = True
        k += 1
    rest = list(chain[k:])
    if not rest:
        return draft, on_chain
    top = max(draft.scores, default=0.0) + 1.0
    offset = len(draft)
    parents = [node] + [offset + i for i in range(len(rest) - 1)]
    grown = Draft(draft.tokens + rest, draft.parents + parents, draft.scores + [top] * len(rest),
                  draft.match_length, draft.global_counts + [0.0] * len(rest))
    return grown, on_chain + [True] * len(rest)


def chain_trials(parents: Sequence[int], predicted: Sequence[bool], accepted: Sequence[int]) -> tuple[int, int]:
    """(accepted, tried) prediction nodes of one verified tree: a node was tried when its parent was accepted (or is
    the root). ``parents`` and ``predicted`` cover the draft nodes ``1..n-1`` (tree indices, 0 the root);
    ``accepted`` lists accepted tree indices."""
    taken = set(accepted)
    tried = [i for i, (p, flag) in enumerate(zip(parents, predicted), start=1) if flag and (p == 0 or p in taken)]
    return sum(1 for i in tried if i in taken), len(tried)


def trie_part(parents: Sequence[int], predicted: Sequence[bool], accepted: Sequence[int]
              ) -> tuple[list[int], list[int], list[int]]:
    """The verified tree without its prediction nodes, as the budget learns it: (kept draft node indices, their
    parents among the kept ones (-1: a child of the root), the accepted ones among them). ``parents`` are tree
    indices of the draft nodes ``1..n-1`` (0: the root); a trie node below an accepted prediction node was tried
    and counts as a child of the root, one below a rejected one was not tried and is left out with its subtree."""
    taken = set(accepted)
    new_index: dict[int, int] = {}  # tree index -> index among the kept nodes
    kept, kept_parents = [], []
    for i, (p, flag) in enumerate(zip(parents, predicted), start=1):
        if flag:
            continue
        if p == 0 or (predicted[p - 1] and p in taken):
            parent = -1
        elif p in new_index:
            parent = new_index[p]
        else:
            continue
        new_index[i] = len(kept)
        kept.append(i - 1)
        kept_parents.append(parent)
    return kept, kept_parents, [new_index[i] for i in accepted if i in new_index]


class PredictionRate:
    """How often a tried prediction node is accepted, per request, kept apart for alignments at the expected
    position and elsewhere (a re-found place in the prediction is less sure), the last ``window`` trials weighing
    most. Each kind starts from the rate of both kinds together worth ``strength`` trials, which starts from
    ``prior`` worth ``strength`` trials."""

    def __init__(self, prior: float = 0.9, strength: float = 4.0, window: float = 64.0) -> None:
        self.prior = prior
        self.strength = strength
        self.window = window
        self.counts = {True: [0.0, 0.0], False: [0.0, 0.0]}  # at the expected position -> [accepted, tried]

    def rate(self, expected: bool) -> float:
        pooled_accepted = self.counts[True][0] + self.counts[False][0]
        pooled_tried = self.counts[True][1] + self.counts[False][1]
        pooled = (pooled_accepted + self.strength * self.prior) / (pooled_tried + self.strength)
        accepted, tried = self.counts[expected]
        return (accepted + self.strength * pooled) / (tried + self.strength)

    def observe(self, expected: bool, accepted: int, tried: int) -> None:
        entry = self.counts[expected]
        entry[0] += accepted
        entry[1] += tried
        if entry[1] > self.window:
            entry[0] *= 0.5
            entry[1] *= 0.5


def depths_of(parents: Sequence[int]) -> list[int]:
    """Depth of every draft node (1: a child of the root); ``parents`` index the draft, -1 the root."""
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return depths


def with_predicted_reach(ranking: Ranking, parents: Sequence[int], predicted: Sequence[bool], rate: float,
                         adaptive: bool = True, trie_nodes: int | None = None) -> Ranking:
    """``ranking`` (the budget's, over a draft with a prediction chain in it) with every prediction node's
    acceptance given by ``rate``: a trie node keeps its own acceptance given its parent, so its reach is its
    parent's new reach times that. The first ``trie_nodes`` nodes (None: all) came from the trie; a prediction node
    among them (the prediction and the trie agree) takes the higher of ``rate`` and its trie acceptance. Not
    adaptive: the prediction nodes first, then the others in draft order."""
    nodes = range(len(parents))
    if not adaptive:
        order = [i for i in nodes if predicted[i]] + [i for i in nodes if not predicted[i]]
        return Ranking(order, [1.0] * len(order))
    old = dict(zip(ranking.order, ranking.reach))
    shared = len(parents) if trie_nodes is None else trie_nodes
    reach: list[float] = []
    for i, p in enumerate(parents):
        parent_reach = 1.0 if p < 0 else reach[p]
        parent_old = 1.0 if p < 0 else old[p]
        own = old[i] / parent_old if parent_old > 0 else 0.0  # the budget's acceptance given the parent
        if not predicted[i]:
            accept = own
        elif i < shared:
            accept = max(rate, own)
        else:
            accept = rate
        reach.append(parent_reach * accept)
    depths = depths_of(parents)
    order = sorted(nodes, key=lambda i: (-reach[i], depths[i], i))
    return Ranking(order, [reach[i] for i in order])


def new_trie(config: LookaheadConfig) -> DraftStore:
    """An empty draft store with the knobs of ``config``."""
    return DraftStore(branch_length=config.branch_length, max_query_length=config.max_query_length,
                      store_bytes=config.store_bytes, local_weight=config.local_weight,
                      global_weight=config.global_weight)


class Drafter:
    """Drafts for one request (and for several lines of it: each ``propose`` names its own output so far).

    ``trie_seconds`` adds up the time spent in the trie (seeding, counting, drafting, releasing, learning).
    ``budget`` may be None for a user of the trie counts only (no :meth:`propose`).
    """

    def __init__(self, trie: DraftSource, budget: DraftBudget | None, config: LookaheadConfig,
                 request_id: str | None = None) -> None:
        self.trie = trie
        self.budget = budget
        self.config = config
        self.request_id = request_id or uuid.uuid4().hex
        self.prompt_ids: list[int] = []
        self.documents: Sequence[Sequence[int]] = []  # not counted yet
        self.seeded = 0  # prompt positions whose windows are counted
        self.max_new_tokens = 0
        self.learned = 0  # output tokens already counted in the request-local trie
        self.trie_seconds = 0.0
        self.finished = False
        self.follow = 0  # see follow_length
        self.follow_end = -1  # len(generated) when ``follow`` was computed
        self.derived_from: tuple[str, ...] = ()  # ids of the documents in its prompt (see begin)
        self.prediction = ""  # the predicted output's token ids, as_text
        self.prediction_at = (0, 0)  # (index of the next predicted token, output length) at the last alignment
        self.prediction_rate = PredictionRate()
        self.chain_expected = True  # whether this step's chain was aligned at the expected position

    def start(self, prompt_ids: Sequence[int], documents: Sequence[Sequence[int]] = (),
              max_new_tokens: int = 1 << 30, derived_from: Sequence[str] = ()) -> None:
        """Count the prompt's and the documents' windows as this request's local trie."""
        self.begin(prompt_ids, documents, max_new_tokens, derived_from=derived_from)
        self.seed()

    def begin(self, prompt_ids: Sequence[int], documents: Sequence[Sequence[int]] = (),
              max_new_tokens: int = 1 << 30, prediction: Sequence[int] = (), derived_from: Sequence[str] = ()
              ) -> None:
        """Take the request's prompt and documents without counting anything yet (see :meth:`seed`), and its
        predicted output (drafted first, see :meth:`predicted_chain`). ``derived_from`` names the documents (ids)
        its prompt holds: its answer is learned as derived from them, and goes when any of them is removed."""
        self.derived_from = tuple(sorted({name for name in derived_from if name}))
        self.prediction = as_text(prediction)
        self.prediction_at = (0, 0)
        self.prompt_ids = list(prompt_ids)
        # staged documents (DraftStore.stage_documents, built before the request joined) are swapped in whole
        self.documents = documents if isinstance(documents, StagedDocuments) else [list(doc) for doc in documents]
        self.max_new_tokens = max_new_tokens
        self.seeded = 0

    def seed(self, upto: int | None = None) -> None:
        """Count the prompt's windows that start before position ``upto`` (None: all of them), and the documents
        once the whole prompt is counted. Seeding a long prompt slice by slice leaves the same counts as at once.
        Nothing is counted when the config drafts nothing (``decoding_length`` 0: the engine alone)."""
        if self.config.decoding_length <= 0:
            return
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
            if isinstance(self.trie, DraftStore):  # at most its local_tokens kept, sorted off this thread
                self.trie.insert_documents(self.documents, self.request_id)
            else:
                for doc in self.documents:
                    self.trie.insert(doc, request_id=self.request_id)
            self.documents = []
        self.trie_seconds += time.perf_counter() - t0

    def extend(self, generated: Sequence[int]) -> None:
        """Count the output tokens not counted yet (``generated`` is the whole output so far)."""
        if len(generated) <= self.learned or self.config.decoding_length <= 0:
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
        return self.trie.longest_global_suffix(context, at_most)

    def candidates(self, generated: Sequence[int], *, after: Sequence[int] = (), last_accepted: int = 0
                   ) -> Candidates:
        """Draft from the trie after ``prompt + generated + after`` and rank the nodes (nothing is chosen yet)."""
        if self.budget is None:
            raise RuntimeError("this drafter has no draft budget: it cannot propose")
        config = self.config
        last = (list(after[-1:]) or list(generated[-1:]) or self.prompt_ids[-1:] or [0])[0]
        if config.decoding_length <= 0:  # the engine alone: no store work at all
            return Candidates(last, Draft([], [], [], 0), Ranking([], []), last_accepted, 0)
        t0 = time.perf_counter()
        width = max(config.max_query_length, config.branch_length + 1)
        context = (self.prompt_ids[-width:] + list(generated[-width:]) + list(after))[-width:]  # tails only
        remaining = self.max_new_tokens - len(generated)
        at_most = 0  # the follow feature is computed on the main line only (other lines draft without it)
        if not after:
            end = len(generated)  # the context grew by ``end - self.follow_end`` tokens since the last call
            grown = end - self.follow_end
            at_most = config.branch_length + 1
            if self.follow_end >= 0 and grown >= 0:  # a longer match would have matched before, minus the growth
                at_most = min(at_most, self.follow + grown)
        depth_limit = max(1, min(config.branch_length, remaining))
        if isinstance(self.trie, DraftStore):  # one compiled call does what the lines below do
            draft, follow = self.trie.draft_ahead(context, config.decoding_length, self.request_id, depth_limit,
                                                  min(config.decoding_length, remaining), config.branch_length,
                                                  config.max_query_length, at_most)
        else:
            draft = self.extended(self.trie.draft(context[-config.max_query_length:], config.decoding_length,
                                                  request_id=self.request_id, branch_length=depth_limit),
                                  context, remaining)
            follow = self.follow_length(context, at_most) if not after else 0
        if not after:
            self.follow = follow
            self.follow_end = len(generated)
        chain = self.predicted_chain(generated, min(config.decoding_length, remaining)) if not after else []
        predicted = None
        trie_nodes = len(draft)
        if chain:
            draft, predicted = with_chain(draft, chain)
        self.trie_seconds += time.perf_counter() - t0
        ranking = self.budget.rank(draft.parents, draft.scores, draft.match_length, last_accepted,
                                   draft.global_counts, follow)
        if predicted is not None:
            ranking = with_predicted_reach(ranking, draft.parents, predicted,
                                           self.prediction_rate.rate(self.chain_expected), self.budget.adaptive,
                                           trie_nodes)
        return Candidates(context[-1], draft, ranking, last_accepted, follow, predicted)

    def predicted_chain(self, generated: Sequence[int], limit: int) -> list[int]:
        """The prediction's next ``limit`` tokens after the output so far (empty: no prediction, or the output
        cannot be placed in it; see :func:`align_prediction`)."""
        if not self.prediction or not generated or limit <= 0:
            return []
        index, length = self.prediction_at
        expected = index + len(generated) - length
        found = align_prediction(self.prediction, generated, expected)
        if found is None:
            return []
        self.prediction_at = (found, len(generated))
        self.chain_expected = found == expected
        return [ord(c) for c in self.prediction[found:found + limit]]

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
                        follow=candidates.follow,
                        predicted=None if candidates.predicted is None else [candidates.predicted[i] for i in chosen])

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
        """Teach the budget: ``accepted`` are the accepted draft nodes (tree indices >= 1, path order). Prediction
        nodes teach this request's prediction rate instead; the budget learns the trie's nodes only."""
        if proposal.predicted is not None and any(proposal.predicted):
            self.observe_prediction(proposal, accepted)
            return
        draft_parents = [p - 1 for p in proposal.parents[1:]]  # -1: child of the root
        self.budget.observe(draft_parents, proposal.scores, proposal.match_length, proposal.last_accepted,
                            [i - 1 for i in accepted], proposal.global_counts, proposal.follow)

    def observe_prediction(self, proposal: Proposal, accepted: Sequence[int]) -> None:
        """Learn from a tree with prediction nodes: their rate here, the rest (:func:`trie_part`) in the budget."""
        assert proposal.predicted is not None
        parents = proposal.parents[1:]
        taken, tried = chain_trials(parents, proposal.predicted, accepted)
        self.prediction_rate.observe(self.chain_expected, taken, tried)
        kept, kept_parents, kept_accepted = trie_part(parents, proposal.predicted, accepted)
        if kept:
            self.budget.observe(kept_parents, [proposal.scores[i] for i in kept], proposal.match_length,
                                proposal.last_accepted, kept_accepted, [proposal.global_counts[i] for i in kept],
                                proposal.follow)

    def finish(self, output: Sequence[int] | None = None) -> None:
        """Release the request-local counts; learn ``output`` into the global trie (when given and the config
        learns outputs). Only the first call does anything."""
        if self.finished:
            return
        self.finished = True
        t0 = time.perf_counter()
        self.trie.release(self.request_id)
        if self.config.learn_outputs and output:
            if self.derived_from:
                self.trie.insert(list(output), derived_from=self.derived_from)  # type: ignore[call-arg]
            else:
                self.trie.insert(list(output))
        self.trie_seconds += time.perf_counter() - t0
