"""From token ids to the text a client sees: incremental detokenizing, stop strings, reasoning vs content.

Used by the server (streaming and not, through one path, so both modes return the same text) and by
`nanoseek chat`; stop strings are found by `StopStrings` alone, incrementally:

    out = SampleText(tokenizer, stop=["\\n\\n"])
    split = ReasoningSplitter("deepseek")
    for event in engine.stream(prompt, params):
        reasoning, content = split.feed(out.add(event.token_id))
    reasoning, content = split.feed(out.finish()) + split.finish()  (element-wise)

The reasoning rule (DeepSeek's API returns `reasoning_content` apart from `content`):
- an output that begins (after whitespace) with `<think>` has reasoning: the text up to `</think>`;
  content is the text after it. An output that does not begin with `<think>` is all content.
- checkpoints trained with the R1-Zero template answer `<think> … </think> <answer> … </answer>`: their
  content is the answer with the `<answer>`/`</answer>` tags removed.
- reasoning and content are stripped of the whitespace at their ends (the template's separators).
A generation cut inside `<think>` (max_tokens) has reasoning and an empty content.
When the prompt itself switched thinking (a template rendered with `thinking`, see checkpoint/tokenizer.py),
the splitter is told so: `thinking=True` (the prompt ends with `<think>`) starts inside the reasoning,
`thinking=False` (the prompt ends with `</think>`) makes the whole output content.
"""

from __future__ import annotations

from functools import lru_cache

from nanoseek.checkpoint.tokenizer import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

ANSWER_TAGS = (ANSWER_OPEN, ANSWER_CLOSE)


def _held_suffix(text: str, prefixes_of: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `prefixes_of` (text that might
    still become a tag or a stop string once the next token arrives)."""
    best = 0
    for tag in prefixes_of:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best


class _Section:
    """One output field (reasoning or content) that is stripped at both ends while it streams: leading
    whitespace is dropped, trailing whitespace is held until more text follows it."""

    def __init__(self) -> None:
        self.started = False
        self.pending_ws = ""

    def emit(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending_ws + text
        body = text.rstrip()
        self.pending_ws = text[len(body) :]
        return body


class ReasoningSplitter:
    """Splits a completion's text into (reasoning, content) increments as it streams; see the module doc.
    thinking: None, the output says (a leading `<think>`); True, the prompt opened `<think>`; False, it closed it."""

    def __init__(self, template: str = "deepseek", thinking: bool | None = None):
        self.answer_tags = ANSWER_TAGS if template == "r1_zero" else ()
        # start -> reasoning -> content, or start -> content
        self.state = "reasoning" if thinking is True else "content" if thinking is False else "start"
        self.buf = ""
        self.reasoning, self.content = _Section(), _Section()
        self.has_reasoning = thinking is True

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        return self._process(final=False)

    def finish(self) -> tuple[str, str]:
        return self._process(final=True)

    def _process(self, final: bool) -> tuple[str, str]:
        reasoning, content = [], []
        while True:
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(THINK_OPEN):
                    self.buf, self.state, self.has_reasoning = s[len(THINK_OPEN) :], "reasoning", True
                    continue
                if not s or (THINK_OPEN.startswith(s) and not final):
                    self.buf = s
                    break  # only whitespace, or maybe the start of `<think>`: wait for more
                self.buf, self.state = s, "content"
                continue
            section, out, tags = (
                (self.reasoning, reasoning, (THINK_CLOSE,))
                if self.state == "reasoning"
                else (self.content, content, self.answer_tags)
            )
            hits = [(self.buf.find(t), t) for t in tags if t in self.buf]
            if hits:
                i, tag = min(hits)
                out.append(section.emit(self.buf[:i]))
                self.buf = self.buf[i + len(tag) :]
                if tag == THINK_CLOSE:
                    self.state = "content"
                continue
            keep = 0 if final else _held_suffix(self.buf, tags)
            out.append(section.emit(self.buf[: len(self.buf) - keep]))
            self.buf = self.buf[len(self.buf) - keep :]
            break
        return "".join(reasoning), "".join(content)


def split_reasoning(text: str, template: str = "deepseek", thinking: bool | None = None) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole completion: the same rule as the streaming splitter."""
    s = ReasoningSplitter(template, thinking)
    r1, c1 = s.feed(text)
    r2, c2 = s.finish()
    return (r1 + r2 if s.has_reasoning else None), c1 + c2


class StopStrings:
    """Stop strings in text that arrives piece by piece: the text ends before the first match, which is not
    part of it. Incremental: each piece is searched together with only the characters before it that a
    match ending in it could start in, and text that could be the start of a stop string is held back until
    the next piece decides.

        stops = StopStrings(["\\n\\n"])
        for piece in pieces:
            show(stops.feed(piece))   # the text that is now safe to show
            if stops.stopped:
                break
        show(stops.finish())
    """

    def __init__(self, stop: list[str] | None = None):
        self.stop = tuple(s for s in (stop or []) if s)
        self.longest = max(map(len, self.stop), default=0)
        self.text = ""  # everything fed so far, cut at the first match once there is one
        self.sent = 0  # how much of `text` has been returned
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add text; returns the text that is now safe to show ("" once stopped)."""
        if self.stopped:
            return ""
        searched = len(self.text)
        self.text += piece
        if self.stop and piece:
            # earlier matches would have stopped the text: a new one ends inside `piece`
            start = max(0, searched - self.longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
        safe = len(self.text) if self.stopped else len(self.text) - _held_suffix(self.text, self.stop)
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out

    def finish(self) -> str:
        """The rest of the text (what was held back) once no more pieces will come."""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


class SampleText:
    """The text of one sample as its tokens arrive: UTF-8-safe incremental decoding (byte-level BPE splits
    characters across tokens), then the stop strings (`StopStrings`). The one text path of the server and
    `nanoseek chat`."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tk = tokenizer.tk
        self.stream = tokenizer.decode_stream(skip_special_tokens=True)
        self.stops = StopStrings(stop)
        self.offsets: list[int] = []  # where each token's text starts in `text` (legacy logprobs' text_offset)

    @property
    def text(self) -> str:
        return self.stops.text

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text that is now safe to show."""
        self.offsets.append(len(self.stops.text))
        if self.stops.stopped:
            return ""
        return self.stops.feed(self.stream.step(self.tk, token_id) or "")

    def finish(self) -> str:
        """The rest of the text once the sample has finished."""
        return self.stops.finish()


class TokenPieces:
    """What OpenAI's logprobs report for one token: its raw bytes (a token may hold part of a character)
    and its text."""

    def __init__(self, tokenizer):
        self.tk = tokenizer.tk
        self.added = set(self.tk.get_added_tokens_decoder())  # `<think>` etc. are stored as plain text
        self.byte_of = _unicode_to_byte()

    def bytes(self, token_id: int) -> bytes:
        piece = self.tk.id_to_token(token_id) or ""
        if token_id in self.added or any(ch not in self.byte_of for ch in piece):
            return piece.encode("utf-8")
        return bytes(self.byte_of[ch] for ch in piece)

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Byte-level BPE writes each byte as a printable character (GPT-2's table); this inverts it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table
