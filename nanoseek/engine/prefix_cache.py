"""The cache's block ids: reference counts, and prefix caching (blocks shared by sequences with the same
leading tokens).

    blocks = BlockPool(n_blocks, prefix_caching=True)
    keys = block_hashes(tokens, block_size, 0, n_full)  # one key per full block, chained through its parent
    table = blocks.match(keys)                          # the cached leading blocks, now referenced
    blocks.take()                                       # a block for new tokens (evicts the LRU cached one)
    blocks.register(table[k], keys[k])                  # block k is full and final: others may now share it
    blocks.release(table)                               # drop the references; cached ones stay findable

A full block's key is a hash of its parent block's key and its own token ids, so one key stands for the
whole prefix up to the block's end (the latents of a token depend on every token before it). Only full,
final blocks are registered, and a sequence only ever writes past its last full block, so a shared block is
never written: no copy-on-write. A block nobody references keeps its latents and its key: it sits in an LRU
of evictable blocks, counted as free, and is reused (its key forgotten) only when no never-cached block is
left. The key is blake2b over the token ids (not Python's `hash`, whose collisions a client could craft to
read another prompt's latents).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def block_hashes(
    tokens: list[int], block_size: int, start: int, stop: int, parent: bytes = b"", lookahead: int = 0
) -> list[bytes]:
    """Keys of full blocks start..stop-1 of `tokens`, chained from `parent` (the key of block start-1, b""
    for the first). `lookahead` more tokens after each block enter its key: an MTP layer's entry at a
    block's last position pairs it with the next token (scheduler.py)."""
    keys = []
    for k in range(start, stop):
        chunk = array("q", tokens[k * block_size : (k + 1) * block_size + lookahead])
        parent = hashlib.blake2b(parent + chunk.tobytes(), digest_size=16).digest()
        keys.append(parent)
    return keys


class BlockPool:
    """`n_blocks` block ids with reference counts; with prefix_caching, full blocks findable by key."""

    def __init__(self, n_blocks: int, prefix_caching: bool = True):
        self.n_blocks, self.prefix_caching = n_blocks, prefix_caching
        self.free: list[int] = list(range(n_blocks - 1, -1, -1))  # never cached (or evicted): taken first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.refs = [0] * n_blocks
        self.by_key: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.hits = 0  # blocks found by `match`

    @property
    def n_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def take(self) -> int:
        if self.free:
            block = self.free.pop()
        else:
            block, _ = self.evictable.popitem(last=False)  # the least recently released cached block
            del self.by_key[self.key_of.pop(block)]
        self.refs[block] = 1
        return block

    def share(self, block: int) -> int:
        """One more reference to a block (an evictable one is referenced again)."""
        if self.refs[block] == 0:
            del self.evictable[block]
        self.refs[block] += 1
        return block

    def release(self, table: list[int]) -> None:
        """Drop a table's references, its last block first (so a prefix's tail is evicted before its head)."""
        for block in reversed(table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
        table.clear()

    def match(self, keys: list[bytes]) -> list[int]:
        """The longest run of leading blocks cached under `keys`, each referenced once more."""
        if not self.prefix_caching:
            return []
        out = []
        for key in keys:
            block = self.by_key.get(key)
            if block is None:
                break
            out.append(self.share(block))
        self.hits += len(out)
        return out

    def register(self, block: int, key: bytes) -> None:
        """Make a full, final block findable (a no-op if its key already names another block)."""
        if self.prefix_caching and key not in self.by_key and block not in self.key_of:
            self.by_key[key], self.key_of[block] = block, key

    def forget(self) -> None:
        """Drop every key (the weights changed: cached latents are stale); referenced blocks stay as they are."""
        self.free.extend(reversed(self.evictable))
        self.evictable.clear()
        self.by_key.clear()
        self.key_of.clear()
