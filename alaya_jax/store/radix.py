"""A radix tree over token ids: which held sequence shares the longest prefix with a prompt.

Edges carry runs of token ids; every node records the owners (sessions, stored or live)
whose sequence passes through the end of its edge. An owner's set grows down a path, so a
node's owners include all of its children's, and `match` can stop inside an edge: every
owner of that edge's node holds the matched run.
"""

from __future__ import annotations

from typing import Hashable, Sequence


class _Node:
    __slots__ = ("edge", "children", "owners")

    def __init__(self, edge: tuple[int, ...], owners: set | None = None):
        self.edge = edge
        self.children: dict[int, _Node] = {}
        self.owners: set = set() if owners is None else owners


def _common(a: Sequence[int], b: Sequence[int], start: int) -> int:
    """Length of the common prefix of a and b[start:]."""
    n = min(len(a), len(b) - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i


class RadixTree:
    """Owners -> token id sequences, with longest-prefix matching."""

    def __init__(self):
        self.root = _Node(())
        self._seqs: dict[Hashable, tuple[int, ...]] = {}

    def __contains__(self, owner) -> bool:
        return owner in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def owners(self):
        return list(self._seqs)

    def sequence(self, owner) -> tuple[int, ...]:
        return self._seqs[owner]

    def insert(self, owner: Hashable, ids: Sequence[int]):
        """Records that owner holds ids (replacing what it held before)."""
        ids = tuple(int(i) for i in ids)
        old = self._seqs.get(owner)
        if old is not None and ids[:len(old)] != old:
            self.remove(owner)
        self._seqs[owner] = ids
        node, i = self.root, 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                node.children[ids[i]] = _Node(ids[i:], {owner})
                return
            j = _common(child.edge, ids, i)
            if j < len(child.edge):  # split the edge where the new sequence leaves or ends
                mid = _Node(child.edge[:j], set(child.owners))
                child.edge = child.edge[j:]
                mid.children[child.edge[0]] = child
                node.children[ids[i]] = mid
                child = mid
            child.owners.add(owner)
            node, i = child, i + j

    def remove(self, owner: Hashable):
        ids = self._seqs.pop(owner, None)
        if ids is None:
            return
        node, i = self.root, 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                return
            child.owners.discard(owner)
            if not child.owners:  # nobody below either: drop the subtree
                del node.children[ids[i]]
                return
            node, i = child, i + len(child.edge)

    def match(self, ids: Sequence[int]) -> tuple[int, set]:
        """(m, owners): the longest m such that some owner holds ids[:m], and those owners."""
        ids = tuple(int(i) for i in ids)
        node, i, owners = self.root, 0, set()
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                break
            j = _common(child.edge, ids, i)
            owners = child.owners
            i += j
            if j < len(child.edge):
                break
            node = child
        return i, set(owners)
