"""The engine's block allocator and prefix trie (host bookkeeping) against hand-worked cases."""

from __future__ import annotations

import pytest

from kimi_linear.serve.prefix_cache import PrefixCache

BS = 4


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def snapshot(pc: PrefixCache, node: int) -> int | None:
    """A snapshot slot for ``node`` as the engine takes one: reserved, then attached (None if none or refused)."""
    slot = pc.reserve_snapshot()
    return slot if slot is not None and pc.attach_snapshot(node, slot) else None


def test_lookup_needs_a_snapshot_and_leaves_one_token():
    pc = PrefixCache(num_blocks=8, block_size=BS, snapshot_slots=[100, 101])
    seq = tokens(12)
    blocks = pc.allocate(3)
    node = 0
    nodes = []
    for j in range(3):
        node = pc.insert(node, seq[j * BS : (j + 1) * BS], blocks[j])
        nodes.append(node)
    # no snapshot anywhere: no hit, but the blocks are registered as far as 2 (the third needs one token left)
    assert pc.lookup(seq + [99]) == ([], None, 0, 3)
    assert pc.lookup(seq)[3] == 2  # 12 tokens: at most 11 cached, so two full blocks
    assert snapshot(pc, nodes[1]) == 100
    hit_blocks, snap, hit_node, matched = pc.lookup(seq[:10] + [77, 78, 79])  # diverges mid-block 2
    assert (hit_blocks, snap, hit_node, matched) == (blocks[:2], 100, nodes[1], 2)
    # a snapshot further down is preferred when the prompt reaches it
    assert snapshot(pc, nodes[2]) == 101
    assert pc.lookup(seq + [5])[:2] == (blocks, 101)


def test_refcounts_eviction_and_duplicates():
    pc = PrefixCache(num_blocks=3, block_size=BS, snapshot_slots=[7])
    a = pc.allocate(2)
    n1 = pc.insert(0, tokens(4), a[0])
    n2 = pc.insert(n1, tokens(4, 4), a[1])
    snapshot(pc, n2)
    pc.release(a)  # registered: evictable, not free
    assert pc.num_free_blocks() == 3 and len(pc.free) == 1
    # a second sequence with the same first block: its own copy stays unregistered
    b = pc.allocate(1)  # the free block
    assert b != a[:1] and pc.insert(0, tokens(4), b[0]) == n1
    hit = pc.lookup(tokens(9))
    assert hit[0] == a and hit[1] == 7
    pc.acquire(hit[0])
    with pytest.raises(RuntimeError):
        pc.allocate(1)  # everything is held
    pc.release(hit[0])
    pc.release(b)
    assert len(pc.free) == 1  # the duplicate went back to the free list
    # allocation evicts least recently used first; evicting n1 takes n2 (below it) and its snapshot along
    assert pc.allocate(2) == [b[0], a[1]]
    assert pc.free == [a[0]]
    assert pc.lookup(tokens(9)) == ([], None, 0, 0) and pc.free_snapshots == [7]


def test_snapshot_slots_are_recycled_lru():
    pc = PrefixCache(num_blocks=4, block_size=BS, snapshot_slots=[1])
    blocks = pc.allocate(2)
    n1 = pc.insert(0, tokens(4), blocks[0])
    n2 = pc.insert(0, tokens(4, 50), blocks[1])
    assert snapshot(pc, n1) == 1
    assert snapshot(pc, n2) == 1  # the only slot moves to n2
    assert not pc.has_snapshot(n1) and pc.has_snapshot(n2)


def test_reserved_snapshots_attach_to_live_nodes_only():
    """A slot reserved before its node exists (a snapshot written by the prefill forward) attaches to a
    registered node without one; to a node that has one, or one evicted meanwhile, it goes back to the free
    slots. Reserving takes the least recently used snapshot when no slot is free."""
    pc = PrefixCache(num_blocks=4, block_size=BS, snapshot_slots=[50, 51])
    blocks = pc.allocate(3)
    n1 = pc.insert(0, tokens(4), blocks[0])
    n2 = pc.insert(n1, tokens(4, 4), blocks[1])
    s = pc.reserve_snapshot()
    assert s == 50 and pc.free_snapshots == [51]
    assert pc.attach_snapshot(n2, s) and pc.has_snapshot(n2)
    assert pc.lookup(tokens(9))[:3] == (blocks[:2], 50, n2)
    t = pc.reserve_snapshot()
    assert not pc.attach_snapshot(n2, t)  # n2 has one: t is free again
    assert pc.free_snapshots == [51]
    assert snapshot(pc, n1) == 51
    u = pc.reserve_snapshot()  # none free: the least recently used (n2's, looked up before n1's was made) goes
    assert u == 50 and not pc.has_snapshot(n2) and pc.has_snapshot(n1)
    pc.release(blocks)  # all evictable now; allocating 4 evicts the trie
    pc.allocate(4)
    assert not pc.attach_snapshot(n1, u)  # n1 is gone
    assert sorted(pc.free_snapshots) == [50, 51]


def test_a_detached_snapshot_slot_moves_to_another_node():
    pc = PrefixCache(num_blocks=4, block_size=BS, snapshot_slots=[60])
    blocks = pc.allocate(2)
    n1 = pc.insert(0, tokens(4), blocks[0])
    n2 = pc.insert(n1, tokens(4, 4), blocks[1])
    assert snapshot(pc, n1) == 60
    slot = pc.detach_snapshot(n1)
    assert slot == 60 and not pc.has_snapshot(n1) and pc.detach_snapshot(n1) is None
    assert pc.lookup(tokens(9))[1] is None  # nothing to start from while the slot is in flight
    assert pc.attach_snapshot(n2, slot) and pc.lookup(tokens(9))[1:3] == (60, n2)
    assert pc.reserve_snapshot() == 60  # the only slot: reserving again takes it from n2 (LRU)
    assert not pc.has_snapshot(n2)
