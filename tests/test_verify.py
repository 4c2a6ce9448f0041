"""Tests for lookahead.verify.greedy_accept on hand-built trees."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lookahead.verify import children_index, greedy_accept

# root(10) -> 20 -> {30, 40}; root -> 50 -> 60 -> 70
TOKENS = [10, 20, 30, 40, 50, 60, 70]
PARENTS = [-1, 0, 1, 1, 0, 4, 5]


def test_children_index():
    assert children_index(TOKENS, PARENTS) == {(0, 20): 1, (1, 30): 2, (1, 40): 3, (0, 50): 4, (4, 60): 5, (5, 70): 6}


def test_full_path_accepted_with_bonus():
    # the model predicts 20 after the root, 40 after 20, then 99 after 40
    predictions = [20, 40, 0, 99, 0, 0, 0]
    acc = greedy_accept(TOKENS, PARENTS, predictions)
    assert acc.path == [1, 3]
    assert acc.tokens == [20, 40, 99]
    assert acc.bonus == 99


def test_branch_chosen_by_prediction():
    # same tree, the model goes the other way at node 1
    acc = greedy_accept(TOKENS, PARENTS, [20, 30, 7, 8, 0, 0, 0])
    assert acc.path == [1, 2]
    assert acc.tokens == [20, 30, 7]
    assert acc.bonus == 7
    # and at the root it picks the second subtree, which it follows to its leaf
    acc = greedy_accept(TOKENS, PARENTS, [50, 0, 0, 0, 60, 70, 5])
    assert acc.path == [4, 5, 6]
    assert acc.tokens == [50, 60, 70, 5]
    assert acc.bonus == 5


def test_nothing_accepted_gives_bonus_only():
    acc = greedy_accept(TOKENS, PARENTS, [33, 20, 30, 40, 50, 60, 70])
    assert acc.path == []
    assert acc.tokens == [33]
    assert acc.bonus == 33


def test_root_only_tree():
    acc = greedy_accept([5], [-1], [6])
    assert acc.path == [] and acc.tokens == [6] and acc.bonus == 6


def test_stops_where_the_prediction_leaves_the_tree():
    # accepted 50 and 60 but the model wants 71 where the draft has 70
    acc = greedy_accept(TOKENS, PARENTS, [50, 0, 0, 0, 60, 71, 0])
    assert acc.path == [4, 5]
    assert acc.tokens == [50, 60, 71]


def test_deep_chain_fully_accepted():
    depth = 40
    tokens = list(range(100, 100 + depth + 1))
    parents = [-1] + list(range(depth))
    predictions = tokens[1:] + [7]
    acc = greedy_accept(tokens, parents, predictions)
    assert acc.path == list(range(1, depth + 1))
    assert acc.tokens == tokens[1:] + [7]
    assert acc.bonus == 7


def test_predictions_as_tensor_values():
    acc = greedy_accept(TOKENS, PARENTS, torch.tensor([20, 40, 0, 99, 0, 0, 0]))
    assert acc.tokens == [20, 40, 99]
    assert all(type(t) is int for t in acc.tokens)


@st.composite
def trees_and_predictions(draw):
    n = draw(st.integers(min_value=1, max_value=16))
    parents = [-1] + [draw(st.integers(min_value=0, max_value=i - 1)) for i in range(1, n)]
    tokens = draw(st.lists(st.integers(min_value=0, max_value=5), min_size=n, max_size=n))
    predictions = draw(st.lists(st.integers(min_value=0, max_value=5), min_size=n, max_size=n))
    return tokens, parents, predictions


@settings(max_examples=200, deadline=None)
@given(trees_and_predictions())
def test_accepted_path_is_what_sequential_greedy_would_emit(spec):
    tokens, parents, predictions = spec
    acc = greedy_accept(tokens, parents, predictions)
    # the path is a chain from the root, each node's token is its parent's prediction
    previous = 0
    for node in acc.path:
        assert parents[node] == previous
        assert tokens[node] == predictions[previous]
        previous = node
    last = acc.path[-1] if acc.path else 0
    assert acc.bonus == predictions[last]
    assert acc.tokens == [tokens[i] for i in acc.path] + [acc.bonus]
    # maximal: no child of the last accepted node carries the bonus token
    child_tokens = [tokens[i] for i in range(1, len(tokens)) if parents[i] == last]
    assert acc.bonus not in child_tokens
