"""A paged cache of MLA latents: what each layer caches per token is c_kv (kv_lora_rank) and the rotated
k_pe (qk_rope_head_dim), 576 values for V3, stored in fixed-size blocks handed out from one pool of block
ids (each layer, MTP layers included, has its own tensor of blocks; a block id means the same rows in all).

The engine gives each sequence a block table (list of block ids). Before a forward it calls `prepare`
with the sequences of the step; MLA then calls `update(layer, c_kv, k_pe)` (the `LatentCache` protocol in
nanoseek/model/mla.py), which writes the new tokens into their slots and returns each sequence's cached latents,
padded to a whole number of blocks, with the matching attention mask.

Everything a step needs (slots to write, blocks to read, mask) is built once in `prepare` with a handful
of tensor ops and shared by every layer; each layer then costs one `index_copy_` and one block-wise
`index_select` (contiguous block_size x 576 rows, a memcpy each) over its pool. Every step but a fresh
prefill attends through a mask over whole blocks, so the shapes a layer sees come from tensors alone and a
compiled step (compiled.py, which hands each layer its own `LayerCache`) has one graph for all lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CacheFull(RuntimeError):
    """No free block: the scheduler must wait or preempt."""


@dataclass
class StepLayout:
    write_slots: torch.Tensor  # (B*T,) pool rows that receive the step's new tokens
    read_blocks: torch.Tensor | None  # (B, nb) blocks each sequence attends over, padded; None: only the new tokens
    mask: torch.Tensor | None  # (B, 1, T, nb*block_size) bool, key j visible to query t; None: causal over the new


class PagedLatentCache:
    """Pool of `n_blocks` blocks of `block_size` tokens for `n_layers` layers (MTP layers included)."""

    def __init__(
        self,
        n_layers: int,
        n_blocks: int,
        block_size: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.block_size, self.n_blocks, self.kv_lora_rank = block_size, n_blocks, kv_lora_rank
        self.width = kv_lora_rank + rope_dim
        # Per layer (blocks, block_size, r + rope): one row per cached token. Separate tensors, not one, so a
        # compiled block sees each layer's pool as an input of the same kind (see `layer`).
        self.pools = [
            torch.zeros(n_blocks, block_size, self.width, dtype=dtype, device=device) for _ in range(n_layers)
        ]
        self.device, self.dtype = torch.device(device), dtype
        self.free: list[int] = list(range(n_blocks - 1, -1, -1))
        self.absorb = False
        self.layout: StepLayout | None = None

    # ---- block bookkeeping ------------------------------------------------------------------------
    @property
    def n_free(self) -> int:
        return len(self.free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def grow(self, table: list[int], n_tokens: int) -> None:
        """Extend a block table so it can hold n_tokens; raises CacheFull (and changes nothing) if it can't."""
        need = self.blocks_for(n_tokens) - len(table)
        if need > len(self.free):
            raise CacheFull(f"need {need} blocks, {len(self.free)} free")
        for _ in range(max(need, 0)):
            table.append(self.free.pop())

    def release(self, table: list[int]) -> None:
        self.free.extend(reversed(table))
        table.clear()

    def copy_prefix(self, src: list[int], dst: list[int], n_tokens: int) -> None:
        """Copy the first n_tokens cached entries of one sequence into another's blocks (n > 1 samples).
        Whole blocks are copied: slots past n_tokens are rewritten before anything reads them."""
        nb = self.blocks_for(n_tokens)
        src_idx, dst_idx = (torch.tensor(t[:nb], device=self.device) for t in (src, dst))
        for pool in self.pools:
            pool.index_copy_(0, dst_idx, pool.index_select(0, src_idx))

    # ---- one forward step -------------------------------------------------------------------------
    def prepare(self, tables: list[list[int]], starts: list[int], n_new: int, absorb: bool) -> None:
        """Lay out a step where sequence b writes n_new tokens at positions starts[b].. and attends
        over positions 0..starts[b]+n_new-1 (causally among the new ones)."""
        dev, bs = self.device, self.block_size
        B = len(tables)
        # At least two blocks: torch.compile specializes a size of 1, so a one-block context would be a graph
        # of its own (the padding block is masked).
        nb = max(self.blocks_for(max(starts) + n_new), 2)
        padded = [t[:nb] + [0] * (nb - len(t[:nb])) for t in tables]  # block 0 pads; the mask hides it
        table = torch.tensor(padded, device=dev)  # (B, nb)
        pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(n_new, device=dev)  # (B, T) positions written
        write = (table.gather(1, pos // bs) * bs + pos % bs).flatten()
        if max(starts) == 0 and B == 1:
            self.layout = StepLayout(write, None, None)  # a fresh prefill: the new tokens are all there is to see
        else:
            mask = torch.arange(nb * bs, device=dev) <= pos[:, :, None]  # (B, T, nb*bs): causal, hides padding
            self.layout = StepLayout(write, table, mask[:, None])
        self.absorb = absorb

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Store the step's (B, T, r) latents and (B, T, rope) keys of one layer; return what the queries
        see: c_kv (B, S, r), k_pe (B, S, rope) and the keep-mask (B, 1, T, S) or None (causal). Shapes come
        from the layout's tensors only (no Python ints), so a compiled step sees one graph for every length."""
        return self.update_pool(self.pools[layer_idx], c_kv, k_pe)

    def update_pool(self, pool: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor):
        lay = self.layout
        new = torch.cat((c_kv, k_pe), dim=-1).flatten(0, 1)  # (B*T, width)
        pool.view(-1, self.width).index_copy_(0, lay.write_slots, new.to(pool.dtype))
        if lay.read_blocks is None:
            return c_kv, k_pe, None
        seen = pool.index_select(0, lay.read_blocks.flatten()).view(lay.read_blocks.shape[0], -1, self.width)
        seen = seen.to(c_kv.dtype)
        return seen[..., : self.kv_lora_rank], seen[..., self.kv_lora_rank :], lay.mask

    def layer(self, layer_idx: int) -> LayerCache:
        """This cache seen by one layer only. A compiled block gets these: the layer's pool is then an input
        tensor rather than `pools[layer_idx]`, whose index torch.compile would specialize (a graph per layer)."""
        return LayerCache(self, self.pools[layer_idx])


class LayerCache:
    """One layer's view of a PagedLatentCache, for compiled blocks: `update` ignores the layer index it is
    given and writes this layer's pool under the parent's current layout."""

    def __init__(self, cache: PagedLatentCache, pool: torch.Tensor):
        self.cache, self.pool = cache, pool

    @property
    def absorb(self) -> bool:
        return self.cache.absorb

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        return self.cache.update_pool(self.pool, c_kv, k_pe)
