"""MTP self-speculative decoding for the Engine (engine.py mixes this in; DeepSeek-V3 §2.2, §5.4.3).

With MTP modules and `use_mtp=True`, every running sequence carries a draft of its next token; a step verifies
all drafts with one main-model forward over [last token, draft] and the MTP module drafts again. The same code
serves V3 (the module reads the main model's normalized hidden states and caches latents) and V4 (it reads the
uncollapsed mHC streams and keeps a sliding-window ring): `Engine._states` and `_head` hide the difference.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from nanoseek.engine.requests import TokenEvent
from nanoseek.engine.sampling import RowParams, row_logprobs, sample_rows, verify_rows


class Speculator:
    """The speculative half of Engine's decode (uses the Engine's attributes)."""

    def _speculate(self, seqs: list) -> list[TokenEvent]:
        """Verify every sequence's draft with one main-model forward over [last token, draft].

        Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): with p the target distribution at
        the last token and q the draft's, the draft d is kept with probability min(1, p(d)/q(d)), else a
        token is drawn from max(p - q, 0) renormalized; after a kept draft the forward's second position
        gives one more token from its own p for free. The output distribution is exactly that of plain
        sampling. Greedy rows have one-hot p and q, which makes this "keep d iff d == argmax p", so greedy
        output equals plain greedy decoding token for token. Then the MTP module drafts the next token.
        """
        seqs = self._reserve(seqs, lambda s: len(s.tokens) + 1)
        if not seqs:
            return []
        dev, B = self.device, len(seqs)
        starts = [s.n_cached for s in seqs]  # = position of each sequence's last token
        self.cache.prepare([s.blocks for s in seqs], starts, 2, absorb=True)
        drafts = torch.tensor([s.draft for s in seqs], device=dev)
        ids = torch.stack((torch.tensor([s.tokens[-1] for s in seqs], device=dev), drafts), dim=1)  # (B, 2)
        pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(2, device=dev)  # (B, 2)
        h = self._decode_forward(ids, pos)  # (B, 2, D) (V4: (B, 2, n, D))
        logits = self._head(h)  # (B, 2, V)
        rows = RowParams.of([s.params for s in seqs], dev, [s.matcher for s in seqs])
        first, keep, second = verify_rows(
            rows, logits, drafts, [s.draft_probs for s in seqs], [s.generator for s in seqs]
        )
        self.stats.decode_steps += 1
        self.stats.draft_tokens += B
        self.stats.accepted_tokens += int(keep.sum())
        params = [s.params for s in seqs]
        lp_first, lp_second = row_logprobs(params, logits[:, 0], first), row_logprobs(params, logits[:, 1], second)
        events = []
        for i, (s, kept, t1, t2) in enumerate(zip(seqs, keep.tolist(), first.tolist(), second.tolist())):
            s.n_cached += 1
            events.append(self._append(s, t1, lp_first[i]))
            if kept and not s.finish_reason:
                s.n_cached += 1
                events.append(self._append(s, t2, lp_second[i]))
        # MTP over the same two positions (the layout is unchanged): entry n-1 pairs h_{n-1} with the
        # verified token, entry n pairs h_n with the bonus token (a placeholder when the draft was
        # rejected; it is overwritten next step). The row that ends the sequence drafts the next token.
        x = self._mtp_hidden(h, torch.stack((first, torch.where(keep, second, first)), dim=1), pos)
        alive = [i for i, s in enumerate(seqs) if not s.finish_reason]
        if alive:
            idx = torch.tensor(alive, device=dev)
            last = x[idx, keep[idx].long()]  # (A, D)
            sub = rows if len(alive) == B else RowParams.of([seqs[i].params for i in alive], dev)
            self._draft([seqs[i] for i in alive], last, sub)
        return events

    def _mtp_hidden(self, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """MTP depth 1 over the prepared cache layout: h the main model's `_states` at `positions` (B, T, ...),
        next_ids (B, T) the token after each. Returns the module's normalized hidden states (B, T, D)."""
        emb, block = self.model.embed_tokens(next_ids), self.model.mtp[0]
        if self._v4:
            return block(h, emb, positions, self.model.rotaries, next_ids, self.cache)[1]
        cos, sin = self.model.rotary(positions)
        if self._compiled_decode is not None and self.cache.absorb:  # decode steps, not the prompt's
            return block.shared_head.norm(self._compiled_decode.mtp(h, emb, cos, sin))
        return block.shared_head.norm(block(h, emb, cos, sin, cache=self.cache))

    def _draft(self, seqs: list, x: torch.Tensor, rows: RowParams) -> None:
        """Draft each sequence's next token from the MTP hidden state x (B, D); keep q for verification."""
        logits = self._logits(x)  # (B, V)
        rows = replace(rows, matchers=[s.matcher for s in seqs]).refreshed()  # grammars: their masks after the step
        if rows.all_greedy:  # q is one-hot on the argmax: keep only the token (draft_probs None)
            for s, d in zip(seqs, rows.masked(logits).argmax(dim=-1).tolist()):
                s.draft, s.draft_probs = d, None
            return
        q = rows.probs(logits)
        drafts = sample_rows(q, rows.uniform([s.generator for s in seqs]))
        for s, d, q_row in zip(seqs, drafts.tolist(), q):
            s.draft, s.draft_probs = d, q_row
