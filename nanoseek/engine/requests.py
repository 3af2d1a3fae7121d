"""What the engine hands back: a request's completions, the per-token events streaming is built from, and the
engine's counters."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Completion:
    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None  # "stop" (EOS, stop string or id) or "length" (max_tokens or context)
    logprobs: list[float] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion] = field(default_factory=list)
    error: str | None = None  # set when the request was refused; the others are served regardless
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (not prefilled)


@dataclass
class TokenEvent:
    """One decoded token of one sample, as `step()` reports it (what streaming is built from)."""

    request_id: str
    index: int
    token_id: int
    finish_reason: str | None
    logprob: float | None = None  # with params.logprobs or params.top_logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, those found in the prefix cache
    generated_tokens: int = 0
    preemptions: int = 0
    decode_steps: int = 0  # batched decode forwards (a speculative step verifies and drafts in one)
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0
