"""Sampling parameters and the batched sampler: greedy, temperature, top-k, top-p, per-request seeds.

The sampler works on a whole decode batch at once: one softmax, one sort (only when a row asks for
top-p), one cumulative sum and one `searchsorted` for all rows. Randomness is per row: each sample of
each request owns a `torch.Generator` and draws one uniform number from it per token (inverse-CDF
sampling), so a seeded request gets the same tokens alone or in any batch.

    rows = RowParams.of([seq.params for seq in batch], device)
    tokens = rows.sample(logits, generators)          # (B,) token ids: argmax, or one draw per sampled row
    probs = rows.probs(logits)                        # (B, V), the distribution each row samples from

Speculative decoding (engine.py) uses the same `probs` for the target and the draft distributions.

Constrained rows (`SamplingParams.constraint`, a grammar: constrain.py) carry a mask of the tokens their grammar
allows; `RowParams.of(params, device, matchers)` builds it for the batch, and every path (argmax, top-k, top-p,
the draw, speculative verification) samples from the masked logits, so constrained and free requests share a
batch. Logprobs stay those of the model's own distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from nanoseek.engine.constrain import Constraint, Matcher, token_masks


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None  # same seed -> same tokens, alone or in a batch
    n: int = 1  # samples per prompt, sharing one prefill
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer); not included in the text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # return the log-probability of each chosen token
    top_logprobs: int = 0  # also report the k most likely tokens of each step (TokenEvent.top_logprobs)
    constraint: Constraint | None = None  # a grammar the output must follow (constrain.py); None = free

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0, got {self.top_k}")
        if not isinstance(self.top_logprobs, int) or self.top_logprobs < 0:
            bad(f"top_logprobs must be a non-negative integer, got {self.top_logprobs!r}")
        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be a positive integer, got {self.n!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            bad(f"constraint must be a compiled Constraint (nanoseek.engine.constrain), got {self.constraint!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, sample_index: int) -> torch.Generator:
    """Each sample of a request draws from its own generator, so batching never changes its tokens."""
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed((seed * 1_000_003 + sample_index) % (2**63))
    return g


@dataclass
class RowParams:
    """The sampling settings of a batch's rows as tensors, built once per step."""

    greedy_rows: list[bool]  # temperature 0: the distribution is one-hot on the argmax
    greedy: torch.Tensor  # (B, 1) bool, the same as a tensor
    temperature: torch.Tensor  # (B, 1); greedy rows hold 1
    top_k: torch.Tensor  # (B,) long, 0 = off
    top_p: torch.Tensor  # (B, 1)
    all_greedy: bool
    max_top_k: int  # largest top_k of the batch (0: no row cuts)
    any_top_p: bool
    matchers: list[Matcher | None] | None = None  # each row's grammar state (None: free)
    allowed: torch.Tensor | None = None  # (B, V) bool, the tokens each row's grammar allows; None: all

    @classmethod
    def of(
        cls, params: list[SamplingParams], device: torch.device | str = "cpu", matchers: list | None = None
    ) -> "RowParams":
        """The rows' settings; with `matchers` (one per row, None for free rows), the masks of their grammars now."""
        temps = [p.temperature if p.temperature > 0 else 1.0 for p in params]
        greedy = [p.greedy for p in params]
        allowed = token_masks(matchers, device) if matchers else None
        return cls(
            greedy,
            torch.tensor(greedy, device=device)[:, None],
            torch.tensor(temps, device=device)[:, None],
            torch.tensor([p.top_k for p in params], device=device),
            torch.tensor([p.top_p for p in params], device=device)[:, None],
            all(greedy),
            max(p.top_k for p in params),
            any(p.top_p < 1 for p in params),
            matchers if allowed is not None else None,
            allowed,
        )

    def refreshed(self) -> "RowParams":
        """The same rows with their grammars' masks recomputed (after the rows took tokens)."""
        return self if self.matchers is None else replace(self, allowed=token_masks(self.matchers, self.greedy.device))

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits with the tokens the rows' grammars forbid at -inf."""
        return logits if self.allowed is None else logits.masked_fill(~self.allowed, float("-inf"))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B, V) fp32 probabilities after temperature, top-k and top-p; one-hot on
        the argmax for greedy rows (so speculative sampling needs no greedy special case). Grammar masks first."""
        logits = self.masked(logits)
        one_hot = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        if self.all_greedy:
            return one_hot
        logits = logits.float() / self.temperature
        V = logits.shape[-1]
        if 0 < self.max_top_k:
            k = self.top_k.clamp(max=V)  # (B,)
            top = logits.topk(min(self.max_top_k, V), dim=-1).values  # (B, max k), descending
            kth = top.gather(1, (k - 1).clamp(min=0)[:, None])  # (B, 1): each row's k-th largest logit
            kth = kth.masked_fill(k[:, None] == 0, float("-inf"))  # rows without a cut keep everything
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        if self.any_top_p:
            # Keep the smallest set of most likely tokens whose mass reaches top_p (nucleus sampling).
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return torch.where(self.greedy, one_hot, probs)

    def sample(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """(B, V) logits -> (B,) tokens: the argmax for greedy rows, a draw from `probs` for the others."""
        if self.all_greedy:
            return self.masked(logits).argmax(dim=-1)
        return sample_rows(self.probs(logits), self.uniform(generators))

    def uniform(self, generators: list[torch.Generator]) -> torch.Tensor:
        """(B,) U[0, 1) numbers, each from its row's generator; greedy rows draw nothing (they get 0.5)."""
        u = torch.cat(
            [
                torch.full((1,), 0.5) if greedy else torch.rand(1, generator=gen)
                for greedy, gen in zip(self.greedy_rows, generators)
            ]
        )
        return u.to(self.greedy.device)


def sample_rows(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row b takes the first token whose cumulative probability exceeds u[b] times
    the row's total mass (rows need not be normalized). probs (B, V), u (B,) in [0, 1) -> (B,) long."""
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return idx.clamp(max=probs.shape[-1] - 1)


def verify_draft(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u_keep: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling's accept/resample rule (Leviathan et al. 2023, Chen et al. 2023).

    p, q (B, V): the target's and the draft's distributions at the draft's position; drafts (B,) drawn
    from q. Row b keeps its draft with probability min(1, p(d)/q(d)) (u_keep[b] < p(d)/q(d)); otherwise
    it draws from the residual max(p - q, 0), renormalized, with u[b]. Either way the token is
    distributed exactly as p. Returns (token (B,), kept (B,) bool). One-hot p and q (greedy) keep
    d iff d == argmax p and otherwise return argmax p.
    """
    rows = torch.arange(p.shape[0], device=p.device)
    keep = u_keep * q[rows, drafts] < p[rows, drafts]
    residual = (p - q).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q: never rejected anyway
    return torch.where(keep, drafts, sample_rows(residual, u)), keep


def row_logprobs(params: list[SamplingParams], logits: torch.Tensor, tokens: torch.Tensor) -> list[tuple | None]:
    """Per row, (log p(token), top_logprobs or None) under the model's untempered distribution, for the rows
    whose params ask for either; None for the others. One log_softmax for the batch."""
    k = max(p.top_logprobs for p in params)
    if not k and not any(p.logprobs for p in params):
        return [None] * len(params)
    logp = torch.log_softmax(logits.float(), -1)  # (B, V)
    chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
    if k:
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        values, ids = values.tolist(), ids.tolist()
    out = []
    for i, p in enumerate(params):
        n = p.top_logprobs
        wants = p.logprobs or n
        out.append((chosen[i], list(zip(ids[i][:n], values[i][:n])) if n else None) if wants else None)
    return out


def verify_rows(
    rows: RowParams,
    logits: torch.Tensor,
    drafts: torch.Tensor,
    draft_probs: list[torch.Tensor | None],
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token at the last position, draft kept?, token after the draft), each (B,), from a verify forward's
    logits (B, 2, V). draft_probs: each row's draft distribution q, None where it was one-hot on the draft.
    Constrained rows: the first position takes the grammar's mask now (a draft it forbids has p = 0 and is
    rejected), the second the mask after the draft."""
    after = (
        rows
        if rows.matchers is None
        else replace(rows, allowed=token_masks(rows.matchers, drafts.device, drafts.tolist()))
    )
    if rows.all_greedy:  # one-hot p and q: the rule reduces to argmaxes, no (B, V) work
        first, second = rows.masked(logits[:, 0]).argmax(dim=-1), after.masked(logits[:, 1]).argmax(dim=-1)
        return first, first == drafts, second
    p, p_next = rows.probs(logits[:, 0]), after.probs(logits[:, 1])  # (B, V) each
    q = torch.stack(
        [
            q_row if q_row is not None else torch.zeros_like(p[0]).index_fill_(0, drafts[i : i + 1], 1.0)
            for i, q_row in enumerate(draft_probs)
        ]
    )
    u_keep, u = rows.uniform(generators), rows.uniform(generators)
    first, keep = verify_draft(p, q, drafts, u_keep, u)
    return first, keep, sample_rows(p_next, u)  # u serves the residual draw or, after a kept draft, this one
