"""Acceptance of a verified draft tree."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Acceptance:
    """Outcome of one verification step.

    ``path`` holds the accepted draft nodes (root excluded) in root-to-leaf order and ``bonus`` the model's own next
    token after the last accepted node.
    """

    path: list[int]
    tokens: list[int]  # tokens of ``path`` followed by the bonus token
    bonus: int


def children_index(tokens: Sequence[int], parents: Sequence[int]) -> dict[tuple[int, int], int]:
    """Map (parent node, token) -> child node."""
    return {(parents[i], tokens[i]): i for i in range(1, len(tokens))}


def greedy_accept(tokens: Sequence[int], parents: Sequence[int], predictions: Sequence[int]) -> Acceptance:
    """Walk from the root while the model's choice at the current node is one of its children.

    Args:
        tokens: token of every tree node, root at 0.
        parents: parent of every node (-1 for the root), parents before children.
        predictions: the model's greedy next token after every node (argmax of its logits row).
    """
    children = children_index(tokens, parents)
    node = 0
    path: list[int] = []
    while True:
        child = children.get((node, int(predictions[node])))
        if child is None:
            break
        path.append(child)
        node = child
    bonus = int(predictions[node])
    return Acceptance(path=path, tokens=[int(tokens[i]) for i in path] + [bonus], bonus=bonus)
