"""The paged KV-cache block manager: allocation, growth, freeing, prefix caching, fork; and a
stateful property test that replays random admit/compute/extend/fork/free sequences against a
simulated KV cache (page -> per slot, the token prefix its KV depends on), so a shared page
overwritten with other tokens, or a prefix hit on a page of another prefix, fails."""

import copy

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from qwentrt.engine import block_manager
from qwentrt.engine.block_manager import BlockManager, NoFreeBlocks

BS = 4


def state(bm: BlockManager) -> dict:
    return copy.deepcopy(vars(bm))


def test_blocks_needed_and_allocate():
    bm = BlockManager(8, BS)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert bm.allocate(0, list(range(9))) == 0
    assert len(bm.block_table(0)) == 3 and bm.has(0) and not bm.has(1)
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 3
    assert bm.prefix_cache_query_tokens == 9 and bm.prefix_cache_hit_tokens == 0
    bm.check_invariants()
    with pytest.raises(ValueError):
        bm.allocate(0, [1])
    with pytest.raises(ValueError):
        bm.allocate(1, [])


def test_append_slots_crosses_page_boundary():
    bm = BlockManager(4, BS)
    bm.allocate(0, [1, 2, 3])
    table = list(bm.block_table(0))
    bm.append_slots(0, 4)  # fills the first page: no new one
    assert bm.block_table(0) == table
    assert bm.can_append(0, 5)
    bm.append_slots(0, 5)
    assert len(bm.block_table(0)) == 2 and bm.block_table(0)[0] == table[0]
    bm.append_slots(0, 3)  # already covered: no-op
    assert len(bm.block_table(0)) == 2 and bm.num_free_blocks == 2
    bm.check_invariants()


def test_free_returns_pages():
    bm = BlockManager(4, BS)
    bm.allocate(0, list(range(10)))
    bm.allocate(1, [7])
    assert bm.num_free_blocks == 0
    bm.free(0)
    assert bm.num_free_blocks == 3 and not bm.has(0)
    bm.free(1)
    assert bm.num_free_blocks == 4
    bm.check_invariants()
    with pytest.raises(KeyError):
        bm.free(1)


def test_no_free_blocks_changes_nothing():
    bm = BlockManager(3, BS)
    bm.allocate(0, list(range(8)))
    bm.mark_computed(0, list(range(8)), 8)
    before = state(bm)
    assert not bm.can_allocate(list(range(100, 109)))
    with pytest.raises(NoFreeBlocks):
        bm.allocate(1, list(range(100, 109)))
    assert state(bm) == before
    assert not bm.can_append(0, 13)
    with pytest.raises(NoFreeBlocks):
        bm.append_slots(0, 13)
    assert state(bm) == before
    bm.append_slots(0, 9)
    with pytest.raises(NoFreeBlocks):
        bm.fork(0, 1)  # the partial last page needs a copy, and no page is free
    bm.check_invariants()


def test_prefix_cache_hit():
    bm = BlockManager(10, BS)
    a = list(range(8)) + [50, 51]
    b = list(range(8)) + [60, 61, 62, 63, 64]
    assert bm.allocate(0, a) == 0
    bm.mark_computed(0, a, len(a))
    assert bm.allocate(1, b) == 2 * BS
    assert bm.block_table(1)[:2] == bm.block_table(0)[:2]
    assert bm.block_table(1)[2] != bm.block_table(0)[2]
    assert bm.prefix_cache_hit_tokens == 2 * BS
    assert bm.prefix_cache_query_tokens == len(a) + len(b)
    assert bm.num_used_blocks == 3 + 2
    bm.check_invariants()
    # Same tokens in the second page but a different first page: the chain hash does not match.
    c = [99, 1, 2, 3] + list(range(4, 8)) + [0]
    assert bm.allocate(2, c) == 0


def test_hit_on_freed_cached_page():
    bm = BlockManager(4, BS)
    a = list(range(9))
    bm.allocate(0, a)
    bm.mark_computed(0, a, 9)
    pages = bm.block_table(0)[:2]
    bm.free(0)
    assert bm.num_free_blocks == 4
    assert bm.can_allocate(a)
    assert bm.allocate(1, a[:8] + [42, 43]) == 2 * BS
    assert bm.block_table(1)[:2] == pages
    assert bm.num_free_blocks == 1
    bm.check_invariants()


def test_cached_free_pages_still_cost_free_pages():
    bm = BlockManager(3, BS)
    a = list(range(8)) + [1]
    bm.allocate(0, a)
    bm.mark_computed(0, a, 9)
    bm.free(0)
    bm.allocate(1, [77] * 5)  # takes the uncached page, then evicts the LRU cached one (a's tail)
    assert bm.num_free_blocks == 1
    # a needs 3 pages; only its first is still cached (a hit that still takes a free page).
    assert not bm.can_allocate(a)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(2, a)
    bm.check_invariants()


def test_hit_follows_the_chain():
    bm = BlockManager(12, BS)
    a, b, c = [1] * BS, [2] * BS, [3] * BS
    x, y = a + b + [0], c + b + [0]
    for sid, toks in ((0, x), (1, y)):
        bm.allocate(sid, toks)
        bm.mark_computed(sid, toks, len(toks))
    # b's page after c is not b's page after a, though its tokens are the same.
    assert bm.allocate(2, y) == 2 * BS
    assert bm.block_table(2)[:2] == bm.block_table(1)[:2]
    assert bm.allocate(3, x) == 2 * BS
    assert bm.block_table(3)[:2] == bm.block_table(0)[:2]
    bm.check_invariants()


def test_hash_collision_is_not_a_hit(monkeypatch):
    monkeypatch.setattr(block_manager, "chain_hash", lambda parent, token_ids: 12345)
    bm = BlockManager(6, BS)
    a, b = [1] * BS + [0], [2] * BS + [0]
    bm.allocate(0, a)
    bm.mark_computed(0, a, len(a))
    assert bm.allocate(1, b) == 0
    bm.mark_computed(1, b, len(b))  # same hash as a's page: not the cached copy
    bm.check_invariants()
    bm.free(1)
    assert bm.allocate(2, a) == BS
    bm.check_invariants()


def test_tail_pages_are_evicted_first():
    bm = BlockManager(4, BS)
    a = list(range(8)) + [0]
    bm.allocate(0, a)
    bm.mark_computed(0, a, len(a))
    bm.free(0)
    bm.allocate(1, [5] * 9)  # two uncached pages, then one eviction: a's second page, not its first
    bm.free(1)
    assert bm.allocate(2, a[:5]) == BS
    bm.check_invariants()


def test_never_whole_prompt():
    bm = BlockManager(6, BS)
    a = list(range(8))
    assert bm.allocate(0, a) == 0
    bm.mark_computed(0, a, 8)
    assert bm.allocate(1, a) == BS  # one token must be left to compute, rounded to a page
    assert bm.block_table(1)[0] == bm.block_table(0)[0]
    assert bm.block_table(1)[1] != bm.block_table(0)[1]
    assert bm.allocate(2, a[:5]) == BS
    assert bm.allocate(3, a[:4]) == 0
    bm.check_invariants()


def test_prefix_caching_disabled():
    bm = BlockManager(6, BS, enable_prefix_caching=False)
    a = list(range(9))
    bm.allocate(0, a)
    bm.mark_computed(0, a, 9)
    assert bm.allocate(1, a) == 0
    assert bm.prefix_cache_hit_tokens == 0 and bm.num_used_blocks == 6
    bm.check_invariants()


def test_fork_copies_partial_page():
    bm = BlockManager(8, BS)
    a = list(range(10))
    bm.allocate(0, a)
    bm.mark_computed(0, a, 10)
    copies = bm.fork(0, 1)
    p, c = bm.block_table(0), bm.block_table(1)
    assert c[:2] == p[:2] and c[2] != p[2]
    assert copies == [(p[2], c[2])]
    bm.check_invariants()
    bm.free(0)
    assert bm.num_used_blocks == 3  # the child still holds the shared pages
    bm.append_slots(1, 12)
    assert bm.fork(1, 2) == []  # last page full: everything shared
    assert bm.block_table(2) == bm.block_table(1)
    bm.check_invariants()
    bm.free(1)
    bm.free(2)
    assert bm.num_free_blocks == 8


def test_eviction_when_pool_is_short():
    bm = BlockManager(4, BS)
    a, b = list(range(5)), list(range(100, 105))
    for sid, toks in ((0, a), (1, b)):
        bm.allocate(sid, toks)
        bm.mark_computed(sid, toks, 5)
        bm.free(sid)
    # a's full page was freed before b's, so it is evicted first.
    assert bm.allocate(2, [9] * 12) == 0
    bm.check_invariants()
    bm.free(2)
    assert bm.allocate(3, b) == BS
    assert bm.allocate(4, a) == 0
    bm.check_invariants()
    bm.free(3)
    bm.free(4)
    bm.reset_prefix_cache()
    assert bm.allocate(5, b) == 0
    bm.check_invariants()


def test_mark_computed_rejects_tokens_past_pages():
    bm = BlockManager(4, BS)
    bm.allocate(0, [1, 2, 3])
    with pytest.raises(ValueError):
        bm.mark_computed(0, [1, 2, 3, 4, 5], 5)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admit/compute/extend/fork/free against a simulated KV cache."""
    prefix_caching = True

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(16, BS, self.prefix_caching)
        # page -> per slot, the tokens [0, i] whose KV slot i holds (KV depends on the whole prefix)
        self.kv: dict[int, list[tuple | None]] = {b: [None] * BS for b in range(16)}
        self.seqs: dict[int, list] = {}  # seq id -> [tokens, num computed]
        self.next_id = 0

    def _write(self, sid: int, start: int, end: int) -> None:
        tokens, table = self.seqs[sid][0], self.bm.block_table(sid)
        for i in range(start, end):
            self.kv[table[i // BS]][i % BS] = tuple(tokens[:i + 1])
        self.seqs[sid][1] = end
        self.bm.mark_computed(sid, tokens, end)

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=14), data=st.data())
    def admit(self, prompt, data):
        sid, self.next_id = self.next_id, self.next_id + 1
        if not self.bm.can_allocate(prompt):
            before = state(self.bm)
            with pytest.raises(NoFreeBlocks):
                self.bm.allocate(sid, prompt)
            assert state(self.bm) == before
            return
        hit_before = self.bm.prefix_cache_hit_tokens
        cached = self.bm.allocate(sid, prompt)
        assert cached % BS == 0 and cached <= len(prompt) - 1
        assert self.bm.prefix_cache_hit_tokens == hit_before + cached
        table = self.bm.block_table(sid)
        assert len(table) == self.bm.blocks_needed(len(prompt))
        for i in range(cached):  # a hit must hold exactly the prompt's tokens
            assert self.kv[table[i // BS]][i % BS] == tuple(prompt[:i + 1])
        self.seqs[sid] = [list(prompt), cached]
        self._write(sid, cached, data.draw(st.integers(cached + 1, len(prompt)), label="computed"))

    @precondition(lambda self: any(c < len(t) for t, c in self.seqs.values()))
    @rule(data=st.data())
    def compute(self, data):  # a chunk of a chunked prefill
        sid = data.draw(st.sampled_from(sorted(s for s, (t, c) in self.seqs.items() if c < len(t))))
        tokens, done = self.seqs[sid]
        self._write(sid, done, data.draw(st.integers(done + 1, len(tokens)), label="computed"))

    @precondition(lambda self: any(c == len(t) for t, c in self.seqs.values()))
    @rule(data=st.data(), new=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def extend(self, data, new):
        sid = data.draw(st.sampled_from(sorted(s for s, (t, c) in self.seqs.items() if c == len(t))))
        tokens = self.seqs[sid][0]
        n = len(tokens) + len(new)
        if not self.bm.can_append(sid, n):
            before = state(self.bm)
            with pytest.raises(NoFreeBlocks):
                self.bm.append_slots(sid, n)
            assert state(self.bm) == before
            return
        self.bm.append_slots(sid, n)
        tokens.extend(new)
        self._write(sid, n - len(new), n)

    @precondition(lambda self: any(c == len(t) for t, c in self.seqs.values()))
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(s for s, (t, c) in self.seqs.items() if c == len(t))))
        child, self.next_id = self.next_id, self.next_id + 1
        try:
            copies = self.bm.fork(parent, child)
        except NoFreeBlocks:
            assert len(self.seqs[parent][0]) % BS and self.bm.num_free_blocks == 0
            return
        for src, dst in copies:
            self.kv[dst] = list(self.kv[src])
        self.seqs[child] = [list(self.seqs[parent][0]), self.seqs[parent][1]]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(sid)
        del self.seqs[sid]

    @rule()
    def reset(self):
        self.bm.reset_prefix_cache()

    @invariant()
    def consistent(self):
        self.bm.check_invariants()
        for sid, (tokens, done) in self.seqs.items():
            table = self.bm.block_table(sid)
            assert len(table) == self.bm.blocks_needed(len(tokens))
            for i in range(done):
                assert self.kv[table[i // BS]][i % BS] == tuple(tokens[:i + 1]), f"seq {sid} slot {i}"

    def teardown(self):
        for sid in list(self.seqs):
            self.bm.free(sid)
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == self.bm.num_blocks and self.bm.num_used_blocks == 0


class NoPrefixCachingMachine(BlockManagerMachine):
    prefix_caching = False


_settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestBlockManagerStateful = BlockManagerMachine.TestCase
TestBlockManagerStateful.settings = _settings
TestNoPrefixCachingStateful = NoPrefixCachingMachine.TestCase
TestNoPrefixCachingStateful.settings = settings(_settings, max_examples=40)
