"""Tests for lookahead.tree: draft tree -> ids, ancestor mask, positions and the 4-D additive mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lookahead.tree import (
    attention_mask,
    batch_inputs,
    build_tree,
    node_depths,
    position_ids,
    root_to_node_paths,
    validate_tree,
)

# The trie built from [1, 2, 3] and [1, 2, 4]: 1 -> 2 -> {3, 4}.
TOKENS = [1, 2, 3, 4]
PARENTS = [-1, 0, 1, 1]
ANCESTORS = [
    [1, 0, 0, 0],
    [1, 1, 0, 0],
    [1, 1, 1, 0],
    [1, 1, 0, 1],
]


def test_example_ids_depths_and_ancestor_mask():
    tree = build_tree(TOKENS, PARENTS)
    assert tree.size == 4
    assert tree.input_ids.tolist() == [1, 2, 3, 4]
    assert tree.input_ids.dtype == torch.long
    assert tree.parents.tolist() == [-1, 0, 1, 1]
    assert tree.depths.tolist() == [0, 1, 2, 2]
    assert tree.ancestor_mask.dtype == torch.bool
    assert tree.ancestor_mask.int().tolist() == ANCESTORS


@pytest.mark.parametrize("prefix", [0, 1, 7])
def test_example_position_ids(prefix):
    tree = build_tree(TOKENS, PARENTS)
    pos = position_ids(tree, prefix)
    assert pos.shape == (1, 4)
    assert pos.tolist() == [[prefix + 0, prefix + 1, prefix + 2, prefix + 2]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prefix", [0, 5])
def test_example_additive_mask(prefix, dtype):
    tree = build_tree(TOKENS, PARENTS)
    mask = attention_mask(tree, prefix, dtype)
    assert mask.shape == (1, 1, 4, prefix + 4)
    assert mask.dtype == dtype
    low = torch.finfo(dtype).min
    expected = torch.full((4, prefix + 4), low, dtype=dtype)
    expected[:, :prefix] = 0  # the cached prefix is visible to every node
    expected[:, prefix:][torch.tensor(ANCESTORS, dtype=torch.bool)] = 0
    assert torch.equal(mask[0, 0], expected)
    # only two values ever appear
    assert set(mask.unique().tolist()) == {0.0, float(low)}


def test_single_root_tree():
    tree = build_tree([9], [-1])
    assert tree.size == 1
    assert tree.depths.tolist() == [0]
    assert tree.ancestor_mask.tolist() == [[True]]
    assert attention_mask(tree, 3)[0, 0].tolist() == [[0.0, 0.0, 0.0, 0.0]]
    assert position_ids(tree, 3).tolist() == [[3]]


def test_build_tree_device_argument():
    tree = build_tree(TOKENS, PARENTS, device="cpu")
    assert tree.input_ids.device.type == "cpu"
    assert attention_mask(tree, 2).device.type == "cpu"


def test_root_to_node_paths():
    assert root_to_node_paths(PARENTS) == [[0], [0, 1], [0, 1, 2], [0, 1, 3]]
    assert root_to_node_paths([-1]) == [[0]]
    # a wider tree: 0 -> {1, 2}, 1 -> 3, 2 -> 4, 3 -> 5
    assert root_to_node_paths([-1, 0, 0, 1, 2, 3]) == [[0], [0, 1], [0, 2], [0, 1, 3], [0, 2, 4], [0, 1, 3, 5]]


def test_node_depths():
    assert node_depths([-1, 0, 0, 1, 2, 3]) == [0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize(
    ("tokens", "parents", "message"),
    [
        ([], [], "at least its root"),
        ([1, 2], [-1], "same length"),
        ([1, 2], [0, 0], "root"),
        ([1, 2], [1, -1], "root"),
        ([1, 2, 3], [-1, 2, 0], "before their children"),  # parent listed after its child
        ([1, 2], [-1, 1], "before their children"),  # a node is its own parent
        ([1, 2], [-1, -1], "before their children"),  # a second root
        ([1, 2], [-1, 5], "before their children"),  # parent out of range
    ],
)
def test_validate_tree_errors(tokens, parents, message):
    with pytest.raises(ValueError, match=message):
        validate_tree(tokens, parents)
    with pytest.raises(ValueError, match=message):
        build_tree(tokens, parents)


def test_validate_tree_accepts_valid_trees():
    validate_tree([5], [-1])
    validate_tree(TOKENS, PARENTS)
    validate_tree([1, 2, 3, 4, 5], [-1, 0, 0, 0, 0])


@st.composite
def trees(draw):
    n = draw(st.integers(min_value=1, max_value=24))
    parents = [-1] + [draw(st.integers(min_value=0, max_value=i - 1)) for i in range(1, n)]
    tokens = draw(st.lists(st.integers(min_value=0, max_value=1000), min_size=n, max_size=n))
    return tokens, parents


def naive_ancestor_or_self(parents: list[int], i: int, j: int) -> bool:
    node = i
    while node != -1:
        if node == j:
            return True
        node = parents[node]
    return False


@settings(max_examples=150, deadline=None)
@given(trees(), st.integers(min_value=0, max_value=6))
def test_mask_matches_naive_ancestry(tree_spec, prefix):
    tokens, parents = tree_spec
    n = len(tokens)
    tree = build_tree(tokens, parents)
    expected = [[naive_ancestor_or_self(parents, i, j) for j in range(n)] for i in range(n)]
    assert tree.ancestor_mask.tolist() == expected
    assert tree.input_ids.tolist() == tokens
    paths = root_to_node_paths(parents)
    depths = [len(p) - 1 for p in paths]
    assert tree.depths.tolist() == depths
    assert position_ids(tree, prefix).tolist() == [[prefix + d for d in depths]]
    for i, path in enumerate(paths):  # the path to a node is exactly the set of nodes it sees, in order
        assert path == [j for j in range(n) if expected[i][j]]
    mask = attention_mask(tree, prefix)[0, 0]
    assert (mask[:, :prefix] == 0).all()
    assert torch.equal(mask[:, prefix:] == 0, torch.tensor(expected, dtype=torch.bool).reshape(n, n))


def test_trees_reach_another_device_in_one_upload():
    """Host-built trees go to the model's device (here the shape-only meta device) as one packed tensor."""
    trees = [build_tree([5, 6, 7], [-1, 0, 0]), build_tree([8], [-1])]
    moved = trees[0].to("meta")
    assert moved.input_ids.device.type == "meta" and moved.ancestor_mask.shape == (3, 3)
    assert moved.ancestor_mask.dtype == torch.bool and trees[0].to("cpu") is trees[0]
    host = batch_inputs(trees, [4, 2], 6)
    remote = batch_inputs(trees, [4, 2], 6, device="meta")
    for name in ("input_ids", "position_ids", "attention_mask"):
        assert getattr(remote, name).device.type == "meta"
        assert getattr(remote, name).shape == getattr(host, name).shape
    assert host.attention_mask.shape == (2, 1, 3, 9)
