"""DeepSeek-V4's caches for the engine (DeepSeek-V4 tech report §2.3): what a running sequence keeps per layer.

- **The sliding window**: a ring of the last `sliding_window` keys (K = V, `head_dim` each), per sequence slot.
  Its size never grows with the context.
- **Compressed entries** (CSA every `rate` = 4 tokens, HCA every 128; plus the CSA indexer's keys): one entry per
  `rate` tokens, paged like the V3 latents. A block id names `block_size` tokens of the sequence, so in each
  compressed pool it holds that span's `block_size // rate` entries (block_size is a multiple of every rate).
- **The compressors' pending tokens**: an entry pools the projections of a window of `rate` tokens (2·rate for
  CSA's overlapping windows), so the projections of the last window's tokens wait in a ring per slot, and an
  entry is computed in the step that brings its window's last token.

Everything is addressed by absolute position and read before the step writes: ring slot `p % size` holds the
latest position below the step's first with that residue, and a query masks what it may not see by position.
So a step may be of any length (a whole prompt, a prefill chunk, one token, an MTP verify of two), and a token
written speculatively and then rejected (MTP) is simply rewritten at the same position by the next step: the
ring slot it took held a position no later query can see, and the entry it completed is recomputed.

Sequences are known by their block tables: the first block of a table names the sequence's slot in the rings
(its blocks are never shared: no prefix caching for V4, whose window and pending tokens are per sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanoseek.engine.kv_cache import CacheFull
from nanoseek.engine.prefix_cache import BlockPool
from nanoseek.model.config import ModelConfig
from nanoseek.model.csa import Compressor
from nanoseek.model.v4_config import CSA, SLIDING


def v4_block_size(cfg: ModelConfig, block_size: int) -> int:
    """The smallest multiple of `block_size` that every compression rate divides."""
    rates = [cfg.v4.rate(t) for t in set(cfg.v4.layer_types) if t != SLIDING]
    return math.lcm(block_size, *rates)


@dataclass
class _Layout:
    """One step: row b writes tokens at positions starts[b] + t for t < lengths[b] (the rest is padding)."""

    slots: torch.Tensor  # (B,) ring slot of each row
    tables: torch.Tensor  # (B, nb) block ids, padded with block 0 (masked by position)
    starts: torch.Tensor  # (B,)
    lengths: torch.Tensor  # (B,)
    n_new: int
    rings: dict  # ring size -> (read (B, size), write (B, min(T, size)), new index (B, min(T, size)))


class PagedV4Cache:
    """Rings per slot (`n_slots` sequences at once) and paged compressed entries (`n_blocks` of `block_size`
    tokens) for every layer of a DeepSeek-V4 model, MTP layers included."""

    shares_blocks = False  # the scheduler must copy, not reference, a prompt's blocks for a request's n samples
    absorb = False  # (the V3 latent cache's decode flag; V4 attention has one form)

    def __init__(
        self,
        cfg: ModelConfig,
        n_layers: int,
        n_slots: int,
        n_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        v4 = cfg.v4
        if block_size != v4_block_size(cfg, block_size):
            raise ValueError(f"block_size {block_size} must be a multiple of every compression rate")
        self.block_size, self.n_blocks, self.n_slots = block_size, n_blocks, n_slots
        self.window_size, self.device, self.dtype = v4.sliding_window, torch.device(device), dtype
        self.blocks = BlockPool(n_blocks, prefix_caching=False)
        self.free_slots = list(range(n_slots - 1, -1, -1))
        self.slot_of: dict[int, int] = {}  # first block id of a table -> its slot
        hd = v4.head_dim

        def zeros(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        # One slot / block more than needed: the last is scratch, where padding tokens and entries are written.
        self.windows = [zeros(n_slots + 1, self.window_size, hd) for _ in range(n_layers)]
        self.pending: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (layer, kind) -> (kv, gate)
        self.entries: dict[tuple[int, str], torch.Tensor] = {}  # (layer, kind) -> (blocks + 1, bs // rate, d)
        self.rates: dict[tuple[int, str], int] = {}
        for i in range(n_layers):
            kind = v4.attention_type(i)
            if kind == SLIDING:
                continue
            rate, size = v4.rate(kind), 2 * v4.rate(kind) if kind == CSA else v4.rate(kind)
            branches = [("kv", hd, kind == CSA)] + ([("index", cfg.index_head_dim, True)] if kind == CSA else [])
            for name, d, overlap in branches:
                width = 2 * d if overlap else d
                self.pending[i, name] = (zeros(n_slots + 1, size, width), zeros(n_slots + 1, size, width))
                self.entries[i, name] = zeros(n_blocks + 1, block_size // rate, d)
                self.rates[i, name] = rate
        self.layout: _Layout | None = None

    # ---- sequences and their blocks ---------------------------------------------------------------
    @property
    def n_free(self) -> int:
        return self.blocks.n_free if self.free_slots else 0

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def grow(self, table: list[int], n_tokens: int) -> None:
        """Extend a block table to hold n_tokens (a new table also takes a slot); CacheFull changes nothing."""
        need = self.blocks_for(n_tokens) - len(table)
        if need > self.blocks.n_free or (not table and need > 0 and not self.free_slots):
            raise CacheFull(f"need {need} blocks, {self.blocks.n_free} free, {len(self.free_slots)} slots free")
        for _ in range(max(need, 0)):
            table.append(self.blocks.take())
            if len(table) == 1:
                self.slot_of[table[0]] = self.free_slots.pop()

    def release(self, table: list[int]) -> None:
        if table:
            self.free_slots.append(self.slot_of.pop(table[0]))
        self.blocks.release(table)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Make table `dst` a copy of table `src` (a prompt's state for another of its request's samples): its
        blocks' entries and its slot's rings."""
        if not src:
            return
        src_idx, dst_idx = (torch.tensor(t, device=self.device) for t in (src, dst))
        for pool in self.entries.values():
            pool.index_copy_(0, dst_idx, pool.index_select(0, src_idx))
        a, b = self.slot_of[src[0]], self.slot_of[dst[0]]
        for ring in self.windows + [r for pair in self.pending.values() for r in pair]:
            ring[b] = ring[a]

    def bytes_per_token(self) -> int:
        """Bytes of compressed entries one token adds over all layers (the rings are a fixed cost per sequence:
        `bytes_per_sequence`)."""
        return sum(p[0].numel() * p.dtype.itemsize for p in self.entries.values()) // self.block_size

    def bytes_per_sequence(self) -> int:
        rings = self.windows + [r for pair in self.pending.values() for r in pair]
        return sum(r[0].numel() * r.dtype.itemsize for r in rings)

    # ---- one forward step -------------------------------------------------------------------------
    def prepare(
        self, tables: list[list[int]], starts: list[int], n_new: int, absorb: bool, lengths: list[int] | None = None
    ) -> None:
        """Lay out a step where row b writes n_new tokens (the first lengths[b] real) at positions starts[b].."""
        dev = self.device
        nb = self.blocks_for(max(starts) + n_new)
        padded = [t[:nb] + [0] * (nb - len(t[:nb])) for t in tables]
        self.layout = _Layout(
            slots=torch.tensor([self.slot_of[t[0]] for t in tables], device=dev),
            tables=torch.tensor(padded, device=dev),
            starts=torch.tensor(starts, device=dev),
            lengths=torch.tensor(lengths or [n_new] * len(tables), device=dev),
            n_new=n_new,
            rings={},
        )

    def _ring(self, size: int):
        """Rows to read (the positions starts-size .. starts-1, oldest first) and to write (each row's last
        min(T, size) real tokens, at `index` among the new ones; padding to the scratch slot) in rings of `size`."""
        lay = self.layout
        if size not in lay.rings:
            dev, T = self.device, lay.n_new
            base = lay.slots[:, None] * size
            read = base + (lay.starts[:, None] + torch.arange(size, device=dev)) % size  # (B, size)
            n = min(T, size)
            index = lay.lengths[:, None] - n + torch.arange(n, device=dev)  # (B, n)
            write = base + (lay.starts[:, None] + index) % size
            write = write.masked_fill(index < 0, self.n_slots * size)
            lay.rings[size] = (read, write, index.clamp(min=0))
        return lay.rings[size]

    def _read_write(self, ring: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Read what the ring holds before the step (B, size, w), then store the step's tokens `new` (B, T, w)."""
        read, write, index = self._ring(ring.shape[1])
        flat = ring.view(-1, ring.shape[-1])
        old = flat[read]
        flat.index_copy_(
            0, write.flatten(), new.gather(1, index[..., None].expand(-1, -1, new.shape[-1])).flatten(0, 1)
        )
        return old.to(new.dtype)

    def window(self, layer_idx: int, kv: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's keys (B, T, hd); return the window's keys before them followed by them (B, W+T, hd)
        and which each query sees, allowed (B, T, W+T): the last `sliding_window` positions, itself included."""
        W = self.window_size
        old = self._read_write(self.windows[layer_idx], kv)
        held = self.layout.starts[:, None] - W + torch.arange(W, device=kv.device)  # (B, W) positions in the ring
        key_pos = torch.cat((held, positions.expand(kv.shape[0], -1)), dim=1)  # (B, W+T)
        diff = positions[..., :, None] - key_pos[:, None, :]
        return torch.cat((old, kv), dim=1), (diff >= 0) & (diff < W) & (key_pos[:, None, :] >= 0)

    def compress(
        self, key: tuple[int, str], compressor: Compressor, x: torch.Tensor, positions: torch.Tensor, rotary
    ) -> torch.Tensor:
        """Feed the step's tokens x (B, T, D) to a compressor: pool every window whose last token is among them
        and store its entry; return every entry each row has so far (B, nb·block_size/rate, d), entry w at w."""
        lay, rate, dev = self.layout, self.rates[key], x.device
        kv_ring, gate_ring = self.pending[key]
        size = kv_ring.shape[1]
        kv, gate = compressor.project(x, positions)  # (B, T, width)
        kv = torch.cat((self._read_write(kv_ring, kv), kv), dim=1)  # positions starts-size .. starts+T-1
        gate = torch.cat((self._read_write(gate_ring, gate), gate), dim=1)
        first = lay.starts // rate  # the first window this step can complete
        done = (lay.starts + lay.lengths) // rate - first  # (B,) windows completed this step
        n = int(done.max())
        entries = self.entries[key]
        if n > 0:
            w = first[:, None] + torch.arange(n, device=dev)  # (B, n) windows completed
            pos = (w + 1)[..., None] * rate - size + torch.arange(size, device=dev)  # (B, n, size) their tokens
            idx = (pos - lay.starts[:, None, None] + size).clamp(0, kv.shape[1] - 1).flatten(1)
            kv_w = kv.gather(1, idx[..., None].expand(-1, -1, kv.shape[-1])).unflatten(1, (n, size))
            gate_w = gate.gather(1, idx[..., None].expand(-1, -1, gate.shape[-1])).unflatten(1, (n, size))
            before = (pos < 0)[..., None]  # window 0's missing predecessor (overlapping windows)
            kv_w, gate_w = kv_w.masked_fill(before, 0.0), gate_w.masked_fill(before, float("-inf"))
            per_block = self.block_size // rate
            dest = lay.tables.gather(1, (w // per_block).clamp(max=lay.tables.shape[1] - 1)) * per_block + w % per_block
            dest = dest.masked_fill(torch.arange(n, device=dev) >= done[:, None], self.n_blocks * per_block)
            new = compressor.pool(kv_w, gate_w, w * rate, rotary)  # (B, n, d)
            entries.view(-1, entries.shape[-1]).index_copy_(0, dest.flatten(), new.flatten(0, 1).to(entries.dtype))
        return entries[lay.tables].flatten(1, 2).to(x.dtype)  # (B, nb·per_block, d)
