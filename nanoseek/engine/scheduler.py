"""Admission and prefill for the Engine (engine.py mixes this in): waiting requests get blocks, reuse the
cached blocks of their prompt's prefix (prefix_cache.py), and are prefilled whole or in chunks under a
per-step token budget.

- **Admission** moves a waiting sequence (with its request's other samples that have the same tokens) to
  `prefilling` while the batch and the cache have room. Its prompt's leading full blocks found in the cache
  are referenced, not recomputed: its prefill starts at the first uncached position (at least the last
  prompt token is always computed, for the logits of the first sample).
- **Prefill**: with `max_num_batched_tokens=None` every admitted prompt is prefilled whole in this step, one
  forward each. With a budget, one forward per step takes a chunk of as many prefilling prompts as fit in
  the budget left after the step's decode tokens (at least one block's worth, so prefill never stalls), as a
  ragged batch (kv_cache.py pads the shorter chunks into a scratch block); the decode of the running
  sequences follows in the same step, as a forward of its own. A long prompt thus costs the running
  streams a bounded delay per step instead of its whole prefill.
- When a prompt is all cached, the engine samples the first tokens (`_prefill_done`): the `n` samples share
  the prompt's final full blocks by reference and get a private copy of its last partial block.
- A full block is registered for sharing once its latents are final (`_register`): with MTP, its key also
  holds the next token, because the MTP layer's entry at the block's last position pairs it with that token.
"""

from __future__ import annotations

import torch

from nanoseek.engine.kv_cache import CacheFull
from nanoseek.engine.prefix_cache import block_hashes


class PrefillScheduler:
    """The admission and prefill half of Engine's step (uses the Engine's attributes)."""

    def _active(self) -> int:
        return len(self.running) + sum(len(g) for g in self.prefilling)

    def _admit(self) -> list:
        """Admit waiting sequences, then run this step's prefill (whole prompts, or a budget of chunks)."""
        if self.cache.blocks.prefix_caching and not self.running and not self.prefilling:
            self._check_weights()
        while self.waiting and self._active() < self.max_batch_size:
            seq = self.waiting[0]
            if seq.finish_reason:  # aborted while waiting
                self.waiting.popleft()
                self._dropped -= 1
                continue
            # It and its request's other waiting samples with the same tokens (found without scanning the queue)
            same = (s for s in self.requests[seq.request_id] if s is not seq and s.tokens == seq.tokens)
            siblings = [seq, *(s for s in same if not s.finish_reason and s not in self.running and not s.blocks)]
            siblings = siblings[: self.max_batch_size - self._active()]
            per_seq = self.cache.blocks_for(len(seq.tokens) + 1)
            if len(siblings) * per_seq > self.cache.n_free:
                siblings = siblings[:1]  # no room to share the prefill: admit one at a time
            if per_seq > self.cache.n_free:
                if self.running or self.prefilling:
                    break  # wait for running sequences to free blocks
                # Alone with the whole cache and still no room: it has grown as long as the cache allows.
                self.waiting.popleft()
                seq.finish_reason = "length"
                continue
            for s in siblings:
                self.waiting.remove(s)
            self._start_prefill(siblings)
        return self._prefill_chunks(len(self.running) * (2 if self.use_mtp else 1))

    def _start_prefill(self, group: list) -> None:
        """Give the group's first sequence its cached prefix and blocks for the rest of its tokens."""
        lead, bs = group[0], self.cache.block_size
        T = len(lead.tokens)
        lead.hashes = []
        if self.cache.blocks.prefix_caching:
            keys = block_hashes(lead.tokens, bs, 0, (T - 1) // bs, b"", int(self.use_mtp))
            lead.blocks = self.cache.blocks.match(keys)
            lead.hashes = keys[: len(lead.blocks)]
        lead.n_cached = len(lead.blocks) * bs
        self.cache.grow(lead.blocks, T)
        self.stats.prompt_tokens += T
        self.stats.cached_prompt_tokens += lead.n_cached
        if len(lead.tokens) == lead.n_prompt:  # first admission (not a preempted one's recomputation)
            for s in group:
                s.cached_prompt = lead.n_cached
        self.prefilling.append(group)

    def _prefill_chunks(self, decode_tokens: int) -> list:
        """This step's prefill forwards; groups whose prompt is then all cached sample their first tokens."""
        events = []
        if self.max_num_batched_tokens is None:  # whole prompts, one forward each
            while self.prefilling:
                lead = self.prefilling[0][0]
                events += self._prefill_forward([self.prefilling[0]], [len(lead.tokens) - lead.n_cached])
            return events
        budget = max(self.max_num_batched_tokens - decode_tokens, self.cache.block_size)
        groups, sizes = [], []
        for group in self.prefilling:
            n = min(len(group[0].tokens) - group[0].n_cached, budget, sizes[0] if sizes else budget)
            if sizes and 2 * n < sizes[0]:
                break  # padded to the first chunk's length, this row would be mostly padding: next step
            groups.append(group)
            sizes.append(n)
            budget -= n
            if budget <= 0:
                break
        return self._prefill_forward(groups, sizes) if groups else events

    def _prefill_forward(self, groups: list[list], sizes: list[int]) -> list:
        """One expanded forward over the next sizes[b] tokens of each group's lead (a ragged batch)."""
        leads, dev = [g[0] for g in groups], self.device
        starts, T = [s.n_cached for s in leads], max(sizes)
        lengths = None if min(sizes) == T else sizes
        self.cache.prepare([s.blocks for s in leads], starts, T, absorb=False, lengths=lengths)
        ids = torch.tensor([s.tokens[a : a + n] + [0] * (T - n) for s, a, n in zip(leads, starts, sizes)], device=dev)
        positions = torch.tensor(starts, device=dev)[:, None] + torch.arange(T, device=dev)  # (B, T)
        h = self._states(ids, positions)  # (B, T, D) (V4: its streams, (B, T, n, D))
        if self.use_mtp:
            # MTP entries of these positions pair h_p with token p+1 (the same for every sample). A prompt's
            # last entry has no next token yet: written here with padding, rewritten per sample in _prefill_done.
            nxt = [s.tokens[a + 1 : a + 1 + T] for s, a in zip(leads, starts)]
            nxt = torch.tensor([t + [0] * (T - len(t)) for t in nxt], device=dev)
            self._mtp_hidden(h, nxt, positions)
        events = []
        for b, (group, n) in enumerate(zip(groups, sizes)):
            group[0].n_cached += n
            if group[0].n_cached == len(group[0].tokens):
                self.prefilling.remove(group)
                events += self._prefill_done(group, h[b : b + 1, n - 1])
        return events

    def _share_prompt(self, group: list) -> list:
        """The samples after the first reference its prompt's full final blocks and copy the rest; those the
        cache has no room for wait again (and will find the prompt cached). Returns the samples that run."""
        lead, bs = group[0], self.cache.block_size
        T = len(lead.tokens)
        # With MTP, the entry at T-1 is each sample's own. V4's per-sequence state is copied whole.
        n_share = (T - int(self.use_mtp)) // bs if self.cache.shares_blocks else 0
        self._register(lead)
        ready = [lead]
        for s in group[1:]:
            s.blocks = [self.cache.blocks.share(b) for b in lead.blocks[:n_share]]
            s.hashes = lead.hashes[:n_share]
            try:
                self.cache.grow(s.blocks, T)
            except CacheFull:
                self.cache.release(s.blocks)
                self.waiting.appendleft(s)
                continue
            self.cache.copy_blocks(lead.blocks[n_share:], s.blocks[n_share:])
            ready.append(s)
        return ready

    def _register(self, seq) -> None:
        """Register the sequence's full blocks whose latents are final (positions < n_cached; with MTP the
        key holds the token after the block, so that token must exist)."""
        bs = self.cache.block_size
        n = min(seq.n_cached, len(seq.tokens) - int(self.use_mtp)) // bs
        done = len(seq.hashes)
        if n <= done or not self.cache.blocks.prefix_caching:
            return
        parent = seq.hashes[-1] if seq.hashes else b""
        seq.hashes += block_hashes(seq.tokens, bs, done, n, parent, int(self.use_mtp))
        for k in range(done, n):
            self.cache.blocks.register(seq.blocks[k], seq.hashes[k])

    def _check_weights(self) -> None:
        """Forget every cached prefix when a parameter was changed in place since they were computed (in-place
        updates bump its version counter). A safety net only: fused optimizers and buffer updates (the router
        bias) leave the counters alone, so whoever changes the weights calls `reset_prefix_cache`."""
        version = sum(p._version for p in self.model.parameters())
        if version != self._weights_version:
            self.cache.blocks.forget()
            self._weights_version = version
