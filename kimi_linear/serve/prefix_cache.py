"""Block allocator and exact prefix cache of the serving engine (host-side bookkeeping only; no tensors).

MLA latent blocks are refcounted: a running sequence holds each block of its block table once. A full block
can be *registered* in a trie keyed by the exact token contents: node = (parent node, the block's tokens), so a
node stands for the whole prefix up to its block's end (comparison is by the tokens themselves, no hash
collisions). A registered block outlives its sequence: when no sequence holds it any more it is *evictable*
and is reused least-recently-used first when free blocks run out (its node and every node below it leave
the trie).

A node may also own a KDA *snapshot slot*: a state-pool slot holding the conv tails and recurrent states after
the node's prefix (the engine copies them there, or the prefill forward writes them there directly: such a slot
is reserved before its node exists and attached once the node is registered). Snapshot slots are few and evicted least-recently-used on their
own. A lookup returns the deepest node along the prompt that has a snapshot, so a hit that ends mid-block (or
at a boundary without a snapshot) falls back to the previous boundary that has one. It also says how far the
registered blocks reach: the engine ends a prefill piece there (the branch point of the two prompts) and
snapshots it, so the next request sharing that prefix hits it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class _Node:
    parent: int
    key: tuple
    block: int
    children: set[int] = field(default_factory=set)
    snapshot: int | None = None


class PrefixCache:
    """Blocks ``0 .. num_blocks - 1`` of ``block_size`` tokens and the snapshot slots ``snapshot_slots``."""

    ROOT = 0

    def __init__(self, num_blocks: int, block_size: int, snapshot_slots: Iterable[int]):
        self.block_size = block_size
        self.refcount = [0] * num_blocks
        self.free = list(range(num_blocks))[::-1]
        self.owner: dict[int, int] = {}  # registered block -> its node
        self.nodes: dict[int, _Node] = {}
        self.index: dict[tuple, int] = {}  # (parent node, block tokens) -> node
        self.evictable: OrderedDict[int, None] = OrderedDict()  # nodes whose block nobody holds, LRU first
        self.free_snapshots = list(snapshot_slots)[::-1]
        self.snapshots: OrderedDict[int, int] = OrderedDict()  # node -> slot, LRU first
        self._next_id = 1

    # ---- blocks ------------------------------------------------------------------------------------------

    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence (free, or registered and evictable)."""
        return len(self.free) + len(self.evictable)

    num_available_blocks = num_free_blocks

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks for one sequence (refcount 1), evicting registered blocks LRU-first when needed.

        Raises:
            RuntimeError: fewer than n blocks are free or evictable (the engine's admission rule prevents it).
        """
        if n > self.num_free_blocks():
            raise RuntimeError(f"{n} MLA blocks requested, {self.num_free_blocks()} free or evictable")
        out = []
        for _ in range(n):
            if not self.free:
                node, _ = self.evictable.popitem(last=False)
                self._remove(node)
            block = self.free.pop()
            self.refcount[block] = 1
            out.append(block)
        return out

    def acquire(self, blocks: Iterable[int]) -> None:
        """One more holder for each block (registered blocks found by ``lookup``)."""
        for b in blocks:
            if self.refcount[b] == 0:
                self.evictable.pop(self.owner[b], None)
            self.refcount[b] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """One holder less; a block nobody holds becomes evictable if registered, else free."""
        for b in blocks:
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                node = self.owner.get(b)
                if node is None:
                    self.free.append(b)
                else:
                    self.evictable[node] = None

    # ---- trie --------------------------------------------------------------------------------------------

    def lookup(self, tokens: list[int]) -> tuple[list[int], int | None, int, int]:
        """The longest cached prefix of ``tokens`` that leaves at least one token to compute and ends at a
        boundary with a snapshot: (its blocks, the snapshot slot or None, its node, the number of leading
        blocks of ``tokens`` registered at all, snapshot or not). Touches what it uses."""
        bs = self.block_size
        node, path = self.ROOT, []
        for j in range((len(tokens) - 1) // bs):
            child = self.index.get((node, tuple(tokens[j * bs : (j + 1) * bs])))
            if child is None:
                break
            node = child
            path.append(node)
        matched = len(path)
        while path and self.nodes[path[-1]].snapshot is None:
            path.pop()
        if not path:
            return [], None, self.ROOT, matched
        for n in path:
            if n in self.evictable:
                self.evictable.move_to_end(n)
        last = path[-1]
        self.snapshots.move_to_end(last)
        return [self.nodes[n].block for n in path], self.nodes[last].snapshot, last, matched

    def insert(self, parent: int, block_tokens: list[int], block: int) -> int:
        """Register ``block`` (held by the caller) as the child of ``parent`` holding ``block_tokens``; returns
        the node (an existing one if another block already holds the same prefix: the caller's block then stays
        unregistered and is freed when released)."""
        key = (parent, tuple(block_tokens))
        existing = self.index.get(key)
        if existing is not None:
            return existing
        if parent != self.ROOT and parent not in self.nodes:
            return parent  # the parent was evicted meanwhile: nothing below it can be found any more
        node = self._next_id
        self._next_id += 1
        self.nodes[node] = _Node(parent, key, block)
        self.index[key] = node
        self.owner[block] = node
        if parent != self.ROOT:
            self.nodes[parent].children.add(node)
        if self.refcount[block] == 0:
            self.evictable[node] = None
        return node

    def has_snapshot(self, node: int) -> bool:
        return node in self.nodes and self.nodes[node].snapshot is not None

    def reserve_snapshot(self) -> int | None:
        """A snapshot slot owned by no node yet (the least recently used snapshot is dropped if none is free),
        for states written before their node exists; ``attach_snapshot`` or ``free_snapshot`` it. None if
        there are no snapshot slots to take."""
        if not self.free_snapshots:
            if not self.snapshots:
                return None
            old, slot = self.snapshots.popitem(last=False)
            self.nodes[old].snapshot = None
            self.free_snapshots.append(slot)
        return self.free_snapshots.pop()

    def attach_snapshot(self, node: int, slot: int) -> bool:
        """Give the reserved ``slot`` to ``node``; if the node is gone or already has a snapshot, the slot is
        freed instead (False)."""
        if node not in self.nodes or self.nodes[node].snapshot is not None:
            self.free_snapshot(slot)
            return False
        self.nodes[node].snapshot = slot
        self.snapshots[node] = slot
        return True

    def detach_snapshot(self, node: int) -> int | None:
        """Take ``node``'s snapshot slot away from it (reserved, as ``reserve_snapshot`` returns one); None if
        the node is gone or has none."""
        if node not in self.nodes or self.nodes[node].snapshot is None:
            return None
        slot = self.nodes[node].snapshot
        self.nodes[node].snapshot = None
        del self.snapshots[node]
        return slot

    def free_snapshot(self, slot: int) -> None:
        """Return a reserved, unattached snapshot slot."""
        self.free_snapshots.append(slot)

    def _remove(self, node: int) -> None:
        """Take ``node`` and everything below it out of the trie; blocks nobody holds become free."""
        stack = [node]
        while stack:
            n = stack.pop()
            entry = self.nodes.pop(n)
            stack.extend(entry.children)
            del self.index[entry.key]
            if entry.parent in self.nodes:
                self.nodes[entry.parent].children.discard(n)
            del self.owner[entry.block]
            self.evictable.pop(n, None)
            if self.refcount[entry.block] == 0:
                self.free.append(entry.block)
            if entry.snapshot is not None:
                del self.snapshots[n]
                self.free_snapshots.append(entry.snapshot)
