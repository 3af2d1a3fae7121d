"""One choice of a request as its tokens arrive: its text (engine/text.py: detokenizing, stop strings, the
reasoning split), its tool calls (tools.py: parsed out of the content), its logprobs in OpenAI's form, its token
counts and finish reason."""

from __future__ import annotations

from nanoseek.engine.engine import TokenEvent
from nanoseek.engine.text import ReasoningSplitter, SampleText, TokenPieces
from nanoseek.server import protocol as P
from nanoseek.server.tools import ToolCallParser


class Sample:
    """One choice as its tokens arrive: text (stop strings applied), reasoning split, logprobs, counts."""

    def __init__(
        self,
        tokenizer,
        stop: list[str],
        template: str | None,
        pieces: TokenPieces | None,
        thinking: bool | None = None,
        calls: ToolCallParser | None = None,
    ):
        self.text = SampleText(tokenizer, stop)
        self.calls = calls  # with tools: content is parsed for calls; their deltas wait in call_deltas
        self.call_deltas: list[P.ToolCallDelta] = []
        self.split = ReasoningSplitter(template, thinking) if template else None
        self.pieces = pieces
        self.n_tokens = self.reasoning_tokens = 0
        self.finish_reason: str | None = None
        self.reasoning = self.content = ""
        self.events: list[TokenEvent] = []
        self.logprobs: list[P.TokenLogprob] = []  # chat format
        self.logprob_sent = 0  # events whose legacy logprobs have been streamed

    def add(self, ev: TokenEvent) -> tuple[str, str, list[P.TokenLogprob]]:
        """(reasoning, content) increments and the logprob entries of this event's token."""
        self.n_tokens += 1
        self.events.append(ev)
        thinking = self.split is not None and self.split.state != "content"
        text = self.text.add(ev.token_id)
        reasoning, content = self.split.feed(text) if self.split else ("", text)
        content = self._parse(content)
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason
            r, c = self._flush()
            reasoning, content = reasoning + r, content + c
        if thinking and self.split.has_reasoning:
            self.reasoning_tokens += 1
        self.reasoning += reasoning
        self.content += content
        entries = []
        if self.pieces is not None and ev.logprob is not None:
            entries = [self._entry(ev.token_id, ev.logprob, ev.top_logprobs or [])]
            self.logprobs += entries
        return reasoning, content, entries

    def end(self) -> tuple[str, str]:
        """The sample ended without a final event (dropped for lack of cache room): it was cut short."""
        self.finish_reason = self.finish_reason or "length"
        reasoning, content = self._flush()
        self.reasoning += reasoning
        self.content += content
        return reasoning, content

    def _flush(self) -> tuple[str, str]:
        text = self.text.finish()
        if self.split is None:
            return "", self._parse(text, final=True)
        r1, c1 = self.split.feed(text)
        r2, c2 = self.split.finish()
        return r1 + r2, self._parse(c1 + c2, final=True)

    def _parse(self, content: str, final: bool = False) -> str:
        """The content that is text; tool calls found in it go to call_deltas (and the finish reason)."""
        if self.calls is None:
            return content
        content, deltas = self.calls.feed(content, final)
        self.call_deltas += deltas
        if final and self.calls.calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"
        return content

    def take_call_deltas(self) -> list[P.ToolCallDelta]:
        deltas, self.call_deltas = self.call_deltas, []
        return deltas

    def message(self) -> P.ChatCompletionMessage:
        """The whole choice as chat's message: content null only when the answer is calls and nothing else."""
        reasoning = self.reasoning if self.split is not None and self.split.has_reasoning else None
        calls = self.calls.tool_calls() if self.calls is not None else None
        content = None if calls and not self.content else self.content
        return P.ChatCompletionMessage(
            content=content, reasoning_content=reasoning, reasoning=reasoning, tool_calls=calls
        )

    def _entry(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> P.TokenLogprob:
        b = self.pieces.bytes(token_id)
        return P.TokenLogprob(
            token=b.decode("utf-8", errors="replace"),
            logprob=logprob,
            bytes=list(b),
            top_logprobs=[
                P.TopLogprob(token=self.pieces.text(t), logprob=lp, bytes=list(self.pieces.bytes(t))) for t, lp in top
            ],
        )
