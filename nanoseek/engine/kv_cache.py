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

DeepSeek-V3.2 (DSA) layers cache one more thing per token, the lightning indexer's key (`index_dim` values), in
pools of their own under the same block ids. A sparse decode step reads every cached indexer key
(`update_index`) but only the top-k latents its queries select (`gather`, rows fetched by slot), which is
where its cost per token stops growing with the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.engine.prefix_cache import BlockPool


class CacheFull(RuntimeError):
    """No free block: the scheduler must wait or preempt."""


@dataclass
class StepLayout:
    write_slots: torch.Tensor  # (B*T,) pool rows that receive the step's new tokens
    read_blocks: torch.Tensor | None  # (B, nb) blocks each sequence attends over, padded; None: only the new tokens
    mask: torch.Tensor | None  # (B, 1, T, nb*block_size) bool, key j visible to query t; None: causal over the new


class PagedLatentCache:
    """Pool of `n_blocks` blocks of `block_size` tokens for `n_layers` layers (MTP layers included)."""

    shares_blocks = True  # a request's n samples reference its prompt's full blocks (scheduler.py)

    def __init__(
        self,
        n_layers: int,
        n_blocks: int,
        block_size: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        index_dim: int = 0,
        prefix_caching: bool = False,
    ):
        self.block_size, self.n_blocks, self.kv_lora_rank = block_size, n_blocks, kv_lora_rank
        self.width = kv_lora_rank + rope_dim
        # Per layer (blocks, block_size, r + rope): one row per cached token. Separate tensors, not one, so a
        # compiled block sees each layer's pool as an input of the same kind (see `layer`).
        # One block more than n_blocks: the last is scratch, where a ragged batch's padding tokens are written.
        self.pools = [
            torch.zeros(n_blocks + 1, block_size, self.width, dtype=dtype, device=device) for _ in range(n_layers)
        ]
        # DSA's indexer keys (n_blocks, block_size, index_dim) per layer; none for MLA-only models.
        self.index_dim = index_dim
        self.index_pools = [
            torch.zeros(n_blocks + 1, block_size, index_dim, dtype=dtype, device=device)
            for _ in range(n_layers * (index_dim > 0))
        ]
        self.device, self.dtype = torch.device(device), dtype
        self.blocks = BlockPool(n_blocks, prefix_caching)
        self.absorb = False
        self.layout: StepLayout | None = None

    # ---- block bookkeeping ------------------------------------------------------------------------
    @property
    def n_free(self) -> int:
        """Blocks that can be had: never cached, or cached and referenced by no sequence (evictable)."""
        return self.blocks.n_free

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def grow(self, table: list[int], n_tokens: int) -> None:
        """Extend a block table so it can hold n_tokens; raises CacheFull (and changes nothing) if it can't."""
        need = self.blocks_for(n_tokens) - len(table)
        if need > self.blocks.n_free:
            raise CacheFull(f"need {need} blocks, {self.blocks.n_free} free")
        for _ in range(max(need, 0)):
            table.append(self.blocks.take())

    def release(self, table: list[int]) -> None:
        self.blocks.release(table)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks src[i] -> dst[i] in every pool (an n > 1 sample's private last prompt block).
        Slots past the cached tokens are rewritten before anything reads them."""
        if not src:
            return
        src_idx, dst_idx = (torch.tensor(t, device=self.device) for t in (src, dst))
        for pool in self.pools + self.index_pools:
            pool.index_copy_(0, dst_idx, pool.index_select(0, src_idx))

    def bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers: its latent row, plus the indexer key for DSA."""
        return (self.width + self.index_dim) * len(self.pools) * self.dtype.itemsize

    # ---- one forward step -------------------------------------------------------------------------
    def prepare(
        self, tables: list[list[int]], starts: list[int], n_new: int, absorb: bool, lengths: list[int] | None = None
    ) -> None:
        """Lay out a step where sequence b writes n_new tokens at positions starts[b].. and attends
        over positions 0..starts[b]+n_new-1 (causally among the new ones). With `lengths` (a ragged batch:
        prefill chunks of several prompts), only the first lengths[b] new tokens of row b are real: the rest
        are padding, written to the scratch block; a real token never sees them (they come after it)."""
        dev, bs = self.device, self.block_size
        B = len(tables)
        # At least two blocks: torch.compile specializes a size of 1, so a one-block context would be a graph
        # of its own (the padding block is masked).
        nb = max(self.blocks_for(max(starts) + n_new), 2)
        padded = [t[:nb] + [0] * (nb - len(t[:nb])) for t in tables]  # block 0 pads; the mask hides it
        table = torch.tensor(padded, device=dev)  # (B, nb)
        pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(n_new, device=dev)  # (B, T) positions written
        write = table.gather(1, pos // bs) * bs + pos % bs  # (B, T)
        if lengths is not None:
            pad = torch.arange(n_new, device=dev) >= torch.tensor(lengths, device=dev)[:, None]
            write = write.masked_fill(pad, self.n_blocks * bs)  # the scratch block's first row
        write = write.flatten()
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
        seen, mask = self._write_read(pool, torch.cat((c_kv, k_pe), dim=-1))
        seen = seen.to(c_kv.dtype)
        return seen[..., : self.kv_lora_rank], seen[..., self.kv_lora_rank :], mask

    def update_index(self, layer_idx: int, keys: torch.Tensor):
        """Store the step's (B, T, index_dim) indexer keys of one DSA layer; return every key the queries
        may score, (B, S, index_dim), and the keep-mask (B, 1, T, S) or None (causal), as `update` does."""
        return self.update_index_pool(self.index_pools[layer_idx], keys)

    def update_index_pool(self, pool: torch.Tensor, keys: torch.Tensor):
        seen, mask = self._write_read(pool, keys)
        return seen.to(keys.dtype), mask

    def gather(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor):
        """Store the step's latents like `update`, but return only the rows at `positions` (B, T, k) of each
        sequence (positions index the keys `update_index` returned): c_kv (B, T, k, r), k_pe (B, T, k, rope)."""
        return self.gather_pool(self.pools[layer_idx], c_kv, k_pe, positions)

    def gather_pool(self, pool: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor):
        lay, bs = self.layout, self.block_size
        new = torch.cat((c_kv, k_pe), dim=-1)
        flat = self._write(pool, new)
        B, T, k = positions.shape
        if lay.read_blocks is None:  # the new tokens are all there is: pick among them
            rows = new.gather(1, positions.view(B, T * k, 1).expand(-1, -1, new.shape[-1]))
        else:
            pos = positions.view(B, T * k)
            slots = lay.read_blocks.gather(1, pos // bs) * bs + pos % bs
            rows = flat.index_select(0, slots.flatten()).to(c_kv.dtype)
        rows = rows.view(B, T, k, -1)
        return rows[..., : self.kv_lora_rank], rows[..., self.kv_lora_rank :]

    def _write(self, pool: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Write the step's rows (B, T, w) into their slots; returns the pool as rows (slots, w)."""
        flat = pool.view(-1, pool.shape[-1])
        flat.index_copy_(0, self.layout.write_slots, new.flatten(0, 1).to(pool.dtype))
        return flat

    def _write_read(self, pool: torch.Tensor, new: torch.Tensor):
        """`_write`, then return what the queries see (B, S, w) and the mask.
        Shapes come from the layout's tensors only (no Python ints), so a compiled step sees one graph for
        every length."""
        lay = self.layout
        self._write(pool, new)
        if lay.read_blocks is None:
            return new, None
        seen = pool.index_select(0, lay.read_blocks.flatten()).view(lay.read_blocks.shape[0], -1, pool.shape[-1])
        return seen, lay.mask

    def layer(self, layer_idx: int) -> LayerCache:
        """This cache seen by one layer only. A compiled block gets these: the layer's pool is then an input
        tensor rather than `pools[layer_idx]`, whose index torch.compile would specialize (a graph per layer)."""
        return LayerCache(self, self.pools[layer_idx], self.index_pools[layer_idx] if self.index_pools else None)


class LayerCache:
    """One layer's view of a PagedLatentCache, for compiled blocks: `update` ignores the layer index it is
    given and writes this layer's pool under the parent's current layout."""

    def __init__(self, cache: PagedLatentCache, pool: torch.Tensor, index_pool: torch.Tensor | None = None):
        self.cache, self.pool, self.index_pool = cache, pool, index_pool

    @property
    def absorb(self) -> bool:
        return self.cache.absorb

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        return self.cache.update_pool(self.pool, c_kv, k_pe)

    def update_index(self, layer_idx: int, keys: torch.Tensor):
        return self.cache.update_index_pool(self.index_pool, keys)

    def gather(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor):
        return self.cache.gather_pool(self.pool, c_kv, k_pe, positions)
