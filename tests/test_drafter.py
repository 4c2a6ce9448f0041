"""Literal tests of one request's drafting lifecycle (lookahead.drafter): trie + budget in, tree-space drafts out."""

from __future__ import annotations

import pytest

from lookahead.budget import CostCurve, DraftBudget
from lookahead.config import LookaheadConfig
from lookahead.drafter import Drafter, Proposal, graft, new_trie, top_path
from lookahead.trie import Draft

CONFIG = LookaheadConfig(branch_length=4, max_query_length=2, decoding_length=8, adaptive=False)


class RecordingBudget(DraftBudget):
    """A fixed budget (first nodes up to the limit) that records what it is taught."""

    def __init__(self) -> None:
        super().__init__(CostCurve((1,), (1.0,)), CONFIG.decoding_length, adaptive=False)
        self.observed: list[tuple] = []

    def observe(self, parents, scores, match_length, last_accepted, accepted, global_counts=None, follow=0) -> None:
        self.observed.append((list(parents), list(scores), match_length, last_accepted, list(accepted),
                              list(global_counts or [])))


def make_drafter(prompt: list[int], documents: tuple = (), max_new_tokens: int = 100) -> Drafter:
    drafter = Drafter(new_trie(CONFIG), RecordingBudget(), CONFIG, request_id="r1")
    drafter.start(prompt, documents, max_new_tokens)
    return drafter


def test_propose_returns_the_budgets_choice_in_tree_index_space():
    # prompt windows under [1, 2]: 3 -> 6 -> 1 and 4 (one count each); the best path 3 -> 6 -> 1 reaches the window
    # depth (5 - 2 matched), so it is drafted on after [6, 1]: 2 -> 4, grafted below the 1
    drafter = make_drafter([5, 1, 2, 3, 6, 1, 2, 4])
    proposal = drafter.propose([1, 2])
    assert proposal.tokens == [2, 3, 4, 6, 1, 2, 4]  # root: the last context token, then the draft nodes
    assert proposal.parents == [-1, 0, 0, 1, 3, 4, 5]
    assert proposal.scores == [1.0] * 6
    assert proposal.global_counts == [0.0] * 6
    assert proposal.match_length == 2
    assert proposal.size == 7


def test_propose_after_extra_tokens_and_truncated():
    drafter = make_drafter([5, 1, 2, 3, 6, 1, 2, 4])
    proposal = drafter.propose([9], after=[1, 2], truncate=2, last_accepted=3)
    assert proposal.tokens == [2, 3, 4]
    assert proposal.parents == [-1, 0, 0]
    assert proposal.last_accepted == 3


def test_documents_draft_and_depth_is_capped_by_the_tokens_left():
    drafter = make_drafter([7], documents=[(1, 2, 3, 4, 5)], max_new_tokens=4)
    assert drafter.propose([8, 1]).tokens == [1, 2, 3]  # 4 - 2 generated = 2 tokens deep at most
    assert drafter.propose([8, 1]).parents == [-1, 0, 1]


def test_extend_lets_the_output_draft_at_once():
    drafter = make_drafter([5, 6])
    assert drafter.propose([8, 9]).tokens == [9]  # nothing known after 9
    drafter.extend([8, 9, 8])
    assert drafter.learned == 3
    proposal = drafter.propose([8, 9, 8])
    assert proposal.tokens == [8, 9, 8] and proposal.parents == [-1, 0, 1]
    drafter.extend([8, 9, 8])  # nothing new: no change
    assert drafter.trie.count([8, 9, 8], "r1") == 1.0


def test_observe_teaches_the_budget_in_draft_index_space():
    drafter = make_drafter([5, 1, 2, 3, 6, 1, 2, 4])
    proposal = drafter.propose([1, 2], last_accepted=2)
    drafter.observe(proposal, [1, 3])  # tree nodes 1 (token 3) and 3 (token 6) accepted
    assert drafter.budget.observed == [([-1, -1, 0, 2, 3, 4], [1.0] * 6, 2, 2, [0, 2], [0.0] * 6)]


def test_placed_maps_a_proposal_into_a_larger_tree():
    proposal = Proposal(tokens=[2, 3, 4, 6, 1], parents=[-1, 0, 0, 1, 3], scores=[1.0] * 4,
                        global_counts=[0.0] * 4, match_length=2, last_accepted=0)
    assert proposal.placed(root_at=10, first_at=20) == [10, 10, 20, 22]
    assert proposal.placed(root_at=4, first_at=5) == [4, 4, 5, 7]  # root at 4, draft right after it


def test_finish_releases_local_counts_and_learns_the_output_once():
    drafter = make_drafter([5, 1, 2, 3])
    drafter.finish([1, 2, 7])
    trie = drafter.trie
    assert trie.count([5, 1], "r1") == 0.0 and trie.count([5, 1]) == 0.0
    assert trie.count([1, 2, 7]) == 1.0
    drafter.finish([1, 2, 7])  # a second call changes nothing
    assert trie.count([1, 2, 7]) == 1.0


def test_finish_without_output_learns_nothing():
    drafter = make_drafter([5, 1, 2, 3])
    drafter.finish(None)
    assert drafter.trie.count([5, 1]) == 0.0 and drafter.trie.count([1, 2, 3]) == 0.0


def test_a_drafter_without_budget_cannot_propose():
    drafter = Drafter(new_trie(CONFIG), None, CONFIG)
    drafter.start([1, 2, 3])
    with pytest.raises(RuntimeError, match="no draft budget"):
        drafter.propose([1])


def test_follow_length_counts_how_long_the_context_repeats_a_past_output():
    drafter = Drafter(new_trie(CONFIG), RecordingBudget(), CONFIG, request_id="r1")
    drafter.trie.insert([7, 8, 9, 10, 11, 12])  # a past output (global counts)
    drafter.start([1, 2, 3], (), 100)
    assert drafter.follow_length([1, 2, 3], 10) == 0  # the prompt is local, not a past output
    assert drafter.follow_length([1, 7, 8, 9], 10) == 3
    assert drafter.follow_length([1, 7, 8, 9], 2) == 2  # bounded
    drafter.candidates([7, 8])
    assert drafter.follow == 2
    drafter.candidates([7, 8, 9, 10])  # grew by two tokens: follows on
    assert drafter.follow == 4
    drafter.candidates([7, 8, 9, 10, 5])
    assert drafter.follow == 0


def test_top_path_and_graft():
    draft = Draft([3, 4, 6, 7], [-1, -1, 0, 0], [3.0, 1.0, 2.0, 1.0], 2, [0.0, 0.0, 1.0, 0.0])
    assert top_path(draft) == [0, 2]  # best first node, then its first (best) child
    grafted = graft(draft, 2, Draft([8, 9, 5], [-1, 0, -1], [5.0, 1.0, 0.5], 2, [5.0, 1.0, 0.0]))
    assert grafted.tokens == [3, 4, 6, 7, 8, 9, 5]
    assert grafted.parents == [-1, -1, 0, 0, 2, 4, 2]
    assert grafted.scores == [3.0, 1.0, 2.0, 1.0, 2.0, 1.0, 0.5]  # capped at the graft point's score
    assert grafted.global_counts == [0.0, 0.0, 1.0, 0.0, 5.0, 1.0, 0.0]
    assert grafted.match_length == 2
    assert top_path(Draft([], [], [], 0)) == []


def test_a_repeated_long_text_drafts_past_the_window_depth():
    config = LookaheadConfig(branch_length=4, max_query_length=2, decoding_length=12, adaptive=False)
    text = list(range(10, 30))  # 20 distinct tokens: every 2-token suffix has one continuation
    drafter = Drafter(new_trie(config), RecordingBudget(), config, request_id="r1")
    drafter.start([1] + text, (), 100)
    draft = drafter.candidates([10, 11]).draft
    assert draft.tokens == list(range(12, 24))  # 12 deep: the window depth is 3 (5 - 2 matched), the draft chains on
    assert draft.parents == list(range(-1, 11))
    assert drafter.propose([10, 11]).tokens == list(range(11, 20))  # the budget's limit: 8 nodes
    assert drafter.candidates([10, 11] + list(range(12, 26))).draft.tokens == list(range(26, 30))  # the text ends


def test_the_best_path_is_not_drafted_on_when_only_a_shorter_suffix_matches():
    config = LookaheadConfig(branch_length=4, max_query_length=2, decoding_length=12, adaptive=False)
    drafter = Drafter(new_trie(config), RecordingBudget(), config, request_id="r1")
    drafter.start([5, 8, 1, 2, 3, 4, 5], (), 100)  # the text ends after [4, 5]; after [5] alone comes 8
    assert drafter.propose([1, 2]).tokens == [2, 3, 4, 5]


def test_a_config_that_drafts_nothing_does_no_store_work():
    """``decoding_length=0`` (the bench's nodraft: the engine alone) seeds, counts and drafts nothing, and its
    proposals are the root alone."""
    config = LookaheadConfig(decoding_length=0, learn_outputs=False)
    store = new_trie(config)
    drafter = Drafter(store, DraftBudget(CostCurve((1, 64), (1.0, 1.0)), 0), config)
    drafter.start([5, 6, 7, 5, 6], documents=[[1, 2, 3, 1, 2]])
    drafter.extend([7, 5, 6])
    proposal = drafter.propose([7, 5, 6])
    assert proposal.tokens == [6] and proposal.parents == [-1]
    assert store.num_tokens() == 0 and store.live_requests() == []
    drafter.finish([7, 5, 6])
    assert store.num_tokens() == 0
