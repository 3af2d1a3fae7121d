"""A paged cache of MLA latents: what each layer caches per token is c_kv (kv_lora_rank) and the rotated
k_pe (qk_rope_head_dim), 576 values for V3, stored in fixed-size blocks handed out from one pool.

The engine gives each sequence a block table (list of block ids). Before a forward it calls `prepare`
with the sequences of the step; MLA then calls `update(layer, c_kv, k_pe)` (the `LatentCache` protocol in
nanoseek/model/mla.py), which writes the new tokens into their slots and returns each sequence's cached latents,
padded to a whole number of blocks, with the matching attention mask.

Everything a step needs (slots to write, blocks to read, mask) is built once in `prepare` with a handful
of tensor ops and shared by every layer; each layer then costs one `index_copy_` and one block-wise
`index_select` (contiguous block_size x 576 rows, a memcpy each) over the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CacheFull(RuntimeError):
    """No free block: the scheduler must wait or preempt."""


@dataclass
class StepLayout:
    write_slots: torch.Tensor  # (B*T,) pool rows that receive the step's new tokens
    read_blocks: torch.Tensor | None  # (B*nb,) blocks each sequence attends over, padded; None: only the new tokens
    n_seqs: int
    n_keys: int  # S: keys per sequence after the gather (trailing padding is masked)
    mask: torch.Tensor | None  # (B, 1, T, S) bool, key j visible to query t; None: causal over the new tokens


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
        # (layers, blocks, block_size, r + rope): one row per cached token per layer
        self.pool = torch.zeros(n_layers, n_blocks, block_size, self.width, dtype=dtype, device=device)
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
        idx = torch.tensor(src[:nb], device=self.pool.device)
        self.pool[:, dst[:nb]] = self.pool.index_select(1, idx)

    # ---- one forward step -------------------------------------------------------------------------
    def prepare(self, tables: list[list[int]], starts: list[int], n_new: int, absorb: bool) -> None:
        """Lay out a step where sequence b writes n_new tokens at positions starts[b].. and attends
        over positions 0..starts[b]+n_new-1 (causally among the new ones)."""
        dev, bs = self.pool.device, self.block_size
        B, S = len(tables), max(starts) + n_new
        nb = self.blocks_for(S)
        padded = [t[:nb] + [0] * (nb - len(t[:nb])) for t in tables]  # block 0 pads; the mask hides it
        table = torch.tensor(padded, device=dev)  # (B, nb)
        start = torch.tensor(starts, device=dev)[:, None]
        pos = start + torch.arange(n_new, device=dev)  # (B, T) positions written
        write = (table.gather(1, pos // bs) * bs + pos % bs).flatten()
        if max(starts) == 0 and B == 1:
            # A fresh prefill: the new tokens are all there is to see, no gather needed.
            self.layout = StepLayout(write, None, B, n_new, None)
        elif n_new == 1 and min(starts) == max(starts):
            # Decode where every sequence has the same length: cut the padding instead of masking it.
            self.layout = StepLayout(write, table.flatten(), B, S, None)
        else:
            mask = torch.arange(nb * bs, device=dev) <= pos[:, :, None]  # (B, T, nb*bs): causal, hides padding
            self.layout = StepLayout(write, table.flatten(), B, nb * bs, mask[:, None])
        self.absorb = absorb

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Store the step's (B, T, r) latents and (B, T, rope) keys of one layer; return what the queries
        see: c_kv (B, S, r), k_pe (B, S, rope) and the keep-mask (B, 1, T, S) or None (causal)."""
        lay = self.layout
        pool = self.pool[layer_idx]  # (blocks, block_size, width)
        new = torch.cat((c_kv, k_pe), dim=-1).view(-1, self.width)  # (B*T, width)
        if new.dtype != pool.dtype:
            new = new.to(pool.dtype)
        pool.view(-1, self.width).index_copy_(0, lay.write_slots, new)
        if lay.read_blocks is None:
            return c_kv, k_pe, None
        seen = pool.index_select(0, lay.read_blocks).view(lay.n_seqs, -1, self.width)[:, : lay.n_keys]
        if seen.dtype != c_kv.dtype:
            seen = seen.to(c_kv.dtype)
        return seen[..., : self.kv_lora_rank], seen[..., self.kv_lora_rank :], lay.mask
