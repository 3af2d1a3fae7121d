"""A paged cache of MLA latents: what each layer caches per token is c_kv (kv_lora_rank) and the rotated
k_pe (qk_rope_head_dim), 576 values for V3, stored in fixed-size blocks handed out from one pool.

The engine gives each sequence a block table (list of block ids). Before a forward it calls `prepare`
with the sequences of the step; MLA then calls `update(layer, c_kv, k_pe)` (the `LatentCache` protocol in
model.py), which writes the new tokens into their slots and gathers each sequence's cached latents,
padded to the longest, with the matching attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CacheFull(RuntimeError):
    """No free block: the scheduler must wait or preempt."""


@dataclass
class StepLayout:
    write_slots: torch.Tensor  # (B*T,) pool rows that receive the step's new tokens
    gather_slots: torch.Tensor  # (B, S) pool rows each sequence attends over (padded with row 0)
    mask: torch.Tensor  # (B, 1, T, S) bool: key j visible to query t


class PagedLatentCache:
    """Pool of `n_blocks` blocks of `block_size` tokens for `n_layers` layers (MTP layers included)."""

    def __init__(self, n_layers: int, n_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.block_size, self.n_blocks, self.kv_lora_rank = block_size, n_blocks, kv_lora_rank
        # (layers, slots, r + rope): one row per cached token per layer
        self.pool = torch.zeros(n_layers, n_blocks * block_size, kv_lora_rank + rope_dim, dtype=dtype, device=device)
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
        """Copy the first n_tokens cached entries of one sequence into another's blocks (n > 1 samples)."""
        rows_src, rows_dst = self._slots(src, 0, n_tokens), self._slots(dst, 0, n_tokens)
        self.pool[:, rows_dst] = self.pool[:, rows_src]

    def _slots(self, table: list[int], start: int, stop: int) -> torch.Tensor:
        pos = torch.arange(start, stop)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return (blocks * self.block_size + pos % self.block_size).to(self.pool.device)

    # ---- one forward step -------------------------------------------------------------------------
    def prepare(self, tables: list[list[int]], starts: list[int], n_new: int, absorb: bool) -> None:
        """Lay out a step where sequence b writes n_new tokens at positions starts[b].. and attends
        over positions 0..starts[b]+n_new-1 (causally among the new ones)."""
        lengths = [s + n_new for s in starts]
        S = max(lengths)
        write = torch.cat([self._slots(t, s, s + n_new) for t, s in zip(tables, starts)])
        gather = torch.zeros(len(tables), S, dtype=torch.long, device=self.pool.device)
        for b, (t, n) in enumerate(zip(tables, lengths)):
            gather[b, :n] = self._slots(t, 0, n)
        key_pos = torch.arange(S, device=self.pool.device)
        query_pos = torch.tensor(starts, device=self.pool.device)[:, None] + torch.arange(n_new, device=self.pool.device)
        mask = key_pos[None, None, :] <= query_pos[:, :, None]  # causal; also hides padding past each length
        self.layout = StepLayout(write, gather, mask[:, None])
        self.absorb = absorb

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        lay = self.layout
        pool = self.pool[layer_idx]
        pool[lay.write_slots] = torch.cat((c_kv, k_pe), dim=-1).reshape(-1, pool.shape[-1]).to(pool.dtype)
        seen = pool[lay.gather_slots]  # (B, S, r + rope)
        return seen[..., : self.kv_lora_rank].to(c_kv.dtype), seen[..., self.kv_lora_rank :].to(c_kv.dtype), lay.mask
