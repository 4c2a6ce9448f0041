"""Acceptance of a verified draft tree: greedy, or sample-then-match with any per-node token choice."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def walk_accept(tokens: Sequence[int], parents: Sequence[int], choose: Callable[[int, list[int]], int]
                ) -> Acceptance:
    """Sample-then-match: at each visited node the model picks its next token; descend while a child carries it.

    Args:
        tokens: token of every tree node, root at 0.
        parents: parent of every node (-1 for the root), parents before children.
        choose: ``choose(node, path_tokens)`` returns the model's next token after ``node``, where ``path_tokens``
            are the accepted draft tokens from the root down to ``node`` (root excluded). Called exactly once per
            emitted token, so a sampler draws from its random stream exactly as plain decoding would.
    """
    children = children_index(tokens, parents)
    node = 0
    path: list[int] = []
    path_tokens: list[int] = []
    while True:
        choice = int(choose(node, path_tokens))
        child = children.get((node, choice))
        if child is None:
            return Acceptance(path=path, tokens=path_tokens + [choice], bonus=choice)
        path.append(child)
        path_tokens.append(int(tokens[child]))
        node = child


def greedy_accept(tokens: Sequence[int], parents: Sequence[int], predictions: Sequence[int]) -> Acceptance:
    """Walk from the root while the model's greedy choice at the current node is one of its children.

    ``predictions`` holds the model's greedy next token after every node (argmax of its logits row).
    """
    return walk_accept(tokens, parents, lambda node, _: int(predictions[node]))
