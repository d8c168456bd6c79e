"""Paged KV-cache bookkeeping: which pages (blocks) each sequence owns, and the prefix cache.

The KV cache is ``num_blocks`` pages of ``block_size`` tokens; a sequence's block table lists its
pages, page j holding the KV of token positions [j*block_size, (j+1)*block_size). A page that is
full and computed gets a chain hash, hash((parent page's hash, its token ids)), which names the
whole prefix up to its end; a later prompt starting with the same full pages shares them (ref
count + 1) instead of computing them again. A page whose last owner frees it keeps its hash and
content in the free pool, and can still be hit until it is handed out for new content (least
recently freed first; pages without a hash are handed out before any cached page).

Pure Python, no torch: the model runner turns block tables into slot mappings.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence


class NoFreeBlocks(Exception):
    """Not enough free pages for the request; the block manager is left as it was."""


@dataclass(slots=True)
class Block:
    """One KV page. ``hash``/``token_ids`` are set once the page is full and computed."""
    id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # kept to rule out hash collisions on a hit


@dataclass(slots=True)
class SeqState:
    """A sequence's pages: ``table`` covers ``num_tokens`` tokens; the first ``num_hashed`` are hashed."""
    table: list[int] = field(default_factory=list)
    num_tokens: int = 0
    num_hashed: int = 0


def chain_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    """Hash of a full page given its parent page's hash (None for the first page)."""
    return hash((parent, tuple(token_ids)))


class BlockManager:
    """Allocates KV pages to sequences, with optional prefix caching (see the module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 0 or block_size <= 0:
            raise ValueError(f"bad block manager shape: {num_blocks} blocks of {block_size} tokens")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free pages, as ordered sets: never-hashed pages first, then cached ones in LRU order.
        self._free_plain: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self._seqs: dict[int, SeqState] = {}
        self.prefix_cache_hit_tokens = 0
        self.prefix_cache_query_tokens = 0

    # -- pool ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Pages with ref count 0 (cached-but-free ones included)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free(self) -> int:
        """A free page for new content; evicts the least recently freed cached page if it must."""
        if self._free_plain:
            bid, _ = self._free_plain.popitem(last=False)
        else:
            bid, _ = self._free_cached.popitem(last=False)
            block = self.blocks[bid]
            del self._hash_to_block[block.hash]
            block.hash = block.token_ids = None
        self.blocks[bid].ref_count = 1
        return bid

    def _ref(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:  # a hit on a cached free page takes it out of the pool
            del self._free_cached[bid]
        block.ref_count += 1

    def _unref(self, bid: int) -> None:
        block = self.blocks[bid]
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.hash is not None and self._hash_to_block.get(block.hash) == bid:
            self._free_cached[bid] = None
        else:  # a duplicate of a page already cached elsewhere: nothing to keep
            block.hash = block.token_ids = None
            self._free_plain[bid] = None

    # -- prefix cache ---------------------------------------------------------------------------
    def _cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Pages holding the longest cached prefix of full pages, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching:
            return []
        bs, parent, hits = self.block_size, None, []
        for j in range((len(token_ids) - 1) // bs):
            page_tokens = tuple(token_ids[j * bs:(j + 1) * bs])
            parent = chain_hash(parent, page_tokens)
            bid = self._hash_to_block.get(parent)
            if bid is None or self.blocks[bid].token_ids != page_tokens:
                break
            hits.append(bid)
        return hits

    def reset_prefix_cache(self) -> None:
        """Forget the hashes of all free pages (pages in use keep theirs)."""
        for bid in self._free_cached:
            block = self.blocks[bid]
            del self._hash_to_block[block.hash]
            block.hash = block.token_ids = None
        self._free_plain.update(self._free_cached)
        self._free_cached.clear()

    # -- sequences ------------------------------------------------------------------------------
    def has(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: int) -> list[int]:
        return self._seqs[seq_id].table

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        hits = self._cached_prefix(token_ids)
        hits_on_free = sum(1 for bid in hits if self.blocks[bid].ref_count == 0)
        fresh = self.blocks_needed(len(token_ids)) - len(hits)
        return fresh + hits_on_free <= self.num_free_blocks

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Pages for a new sequence's prompt. Reuses cached pages for the longest prefix of FULL pages
        whose chain hash matches, but never the whole prompt: at least one prompt token must be left
        to compute (so the model produces logits), i.e. cached tokens <= len(token_ids) - 1, rounded
        down to a page boundary. Allocates fresh pages for the rest of the prompt. Returns the number
        of cached tokens (a multiple of block_size). Raises NoFreeBlocks (and changes nothing) if the
        pages do not fit. Raises ValueError if seq_id already has pages or token_ids is empty."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already has pages")
        if not token_ids:
            raise ValueError("cannot allocate pages for an empty prompt")
        if not self.can_allocate(token_ids):
            raise NoFreeBlocks(f"sequence {seq_id}: {len(token_ids)} tokens do not fit in "
                               f"{self.num_free_blocks} free pages")
        hits = self._cached_prefix(token_ids)
        for bid in hits:  # first, so that no hit page is evicted for the fresh ones
            self._ref(bid)
        table = hits + [self._take_free() for _ in range(self.blocks_needed(len(token_ids)) - len(hits))]
        self._seqs[seq_id] = SeqState(table, len(token_ids), len(hits))
        cached = len(hits) * self.block_size
        self.prefix_cache_query_tokens += len(token_ids)
        self.prefix_cache_hit_tokens += cached
        return cached

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        """Could seq's table grow to hold num_tokens tokens in total?"""
        return self.blocks_needed(num_tokens) - len(self._seqs[seq_id].table) <= self.num_free_blocks

    def append_slots(self, seq_id: int, num_tokens: int) -> None:
        """Grow seq's block table so it covers num_tokens tokens in total (no-op if it already
        does). Raises NoFreeBlocks (changing nothing) if short."""
        if not self.try_append_slots(seq_id, num_tokens):
            raise NoFreeBlocks(f"sequence {seq_id}: no free page to grow to {num_tokens} tokens")

    def try_append_slots(self, seq_id: int, num_tokens: int) -> bool:
        """append_slots, or False (changing nothing) if the pages are short: one call per decode step."""
        seq = self._seqs[seq_id]
        missing = -(-num_tokens // self.block_size) - len(seq.table)
        if missing > 0:
            if missing > len(self._free_plain) + len(self._free_cached):
                return False
            for _ in range(missing):
                seq.table.append(self._take_free())
        if num_tokens > seq.num_tokens:
            seq.num_tokens = num_tokens
        return True

    def mark_computed(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """The KV of token_ids[:num_computed] is now in seq's pages: register the chain hash of
        every page that is now full and computed and not yet hashed (so later prompts can hit it).
        token_ids is the sequence's full token list so far (prompt + generated)."""
        seq = self._seqs[seq_id]
        if num_computed // self.block_size <= seq.num_hashed and 0 <= num_computed <= seq.num_tokens \
                and num_computed <= len(token_ids):
            return  # no page filled since the last call (most decode steps)
        if not 0 <= num_computed <= min(len(token_ids), seq.num_tokens):
            raise ValueError(f"sequence {seq_id}: {num_computed} computed tokens, but it has "
                             f"{len(token_ids)} tokens and pages for {seq.num_tokens}")
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for j in range(seq.num_hashed, num_computed // bs):
            block = self.blocks[seq.table[j]]
            if block.hash is None:  # a page shared with a fork may be hashed already
                parent = self.blocks[seq.table[j - 1]].hash if j else None
                block.token_ids = tuple(token_ids[j * bs:(j + 1) * bs])
                block.hash = chain_hash(parent, block.token_ids)
                self._hash_to_block.setdefault(block.hash, block.id)  # the first copy stays the cached one
        seq.num_hashed = max(seq.num_hashed, num_computed // bs)

    def fork(self, parent_id: int, child_id: int) -> list[tuple[int, int]]:
        """child shares parent's full pages (ref count + 1); the parent's last page, if partial, is
        copied: the child gets a fresh page, and the return value lists (src_page, dst_page) copies
        the caller must perform on the KV tensors. Raises NoFreeBlocks if no page for the copy.
        Call it once the parent's tokens are computed (its pages hold no pending writes)."""
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id} already has pages")
        parent = self._seqs[parent_id]
        num_full = parent.num_tokens // self.block_size
        partial = len(parent.table) > num_full
        if partial and not self.num_free_blocks:
            raise NoFreeBlocks(f"no free page to fork sequence {parent_id}")
        table = parent.table[:num_full]
        for bid in table:
            self._ref(bid)
        copies = []
        if partial:
            table.append(self._take_free())
            copies.append((parent.table[-1], table[-1]))
        self._seqs[child_id] = SeqState(table, parent.num_tokens, min(parent.num_hashed, num_full))
        return copies

    def free(self, seq_id: int) -> None:
        """Drop seq's pages (ref count - 1 each). The tail is freed first, so it is evicted first."""
        seq = self._seqs.pop(seq_id)
        for bid in reversed(seq.table):
            self._unref(bid)

    # -- checks ---------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError with a message if the bookkeeping is inconsistent."""
        refs = [0] * self.num_blocks
        for sid, seq in self._seqs.items():
            assert len(set(seq.table)) == len(seq.table), f"seq {sid} holds a page twice: {seq.table}"
            assert len(seq.table) == self.blocks_needed(seq.num_tokens), \
                f"seq {sid}: {len(seq.table)} pages for {seq.num_tokens} tokens"
            for bid in seq.table:
                assert 0 <= bid < self.num_blocks, f"seq {sid} holds page {bid}, out of range"
                refs[bid] += 1
        free = self._free_plain.keys() | self._free_cached.keys()
        assert len(free) == self.num_free_blocks, "a page is in both free pools"
        for block, ref in zip(self.blocks, refs):
            assert block.ref_count == ref, f"page {block.id}: ref count {block.ref_count}, in {ref} tables"
            assert (block.id in free) == (ref == 0), f"page {block.id}: in {ref} tables, free: {block.id in free}"
        assert all(0 <= bid < self.num_blocks for bid in free), "a free page id is out of range"
        assert self.num_free_blocks + sum(r > 0 for r in refs) == self.num_blocks, "free + used != num_blocks"
        for h, bid in self._hash_to_block.items():
            assert 0 <= bid < self.num_blocks, f"hash table maps to page {bid}, out of range"
            assert self.blocks[bid].hash == h, f"hash {h} maps to page {bid}, whose hash is {self.blocks[bid].hash}"
        for bid in self._free_plain:
            assert self.blocks[bid].hash is None, f"uncached free page {bid} has a hash"
        for bid in self._free_cached:
            h = self.blocks[bid].hash
            assert h is not None and self._hash_to_block.get(h) == bid, f"cached free page {bid} not in the hash table"
