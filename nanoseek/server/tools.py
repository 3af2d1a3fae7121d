"""Tool calls in DeepSeek-V3.1's format, as OpenAI's `tool_calls`: the request's messages and tools as the chat
template takes them, and each choice's calls parsed out of its answer as it streams.

The model calls tools by writing (checkpoint/tokenizer.py renders the same in the history)

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{"json": "arguments"}<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>…<｜tool▁call▁end｜><｜tool▁calls▁end｜>        (more calls, no separator, then the end)

`ToolCallParser` turns the content of one choice into text and calls, fed piece by piece:

- enforced (tool_choice `required` or a named function: a grammar made the calls well formed, see
  structured.py): each call streams as it is written, a first delta with its id, type, name and empty
  arguments once the name is complete, then its argument text as it comes.
- `auto` (the model decides, nothing enforced): text before the calls streams as content (a tail that could
  still become the opening marker is held back); the calls block is held until it closes (or the output
  ends), then checked: every call names one of the request's tools and its arguments are a JSON object.
  Well formed, it becomes tool_calls (a first delta, then the arguments in one piece); malformed, its text
  is returned as content, as written.
"""

from __future__ import annotations

import json
import uuid

from nanoseek.checkpoint.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP
from nanoseek.server import protocol as P
from nanoseek.server.errors import APIError


def template_messages(messages: list) -> list[dict]:
    """Request messages as the chat template takes them (content as text, an assistant's tool calls)."""
    out = []
    for i, m in enumerate(messages):
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in m.tool_calls
            ]
        elif d["content"] is None:
            raise APIError(400, "An assistant message needs content unless it has tool_calls.", f"messages.{i}.content")
        out.append(d)
    return out


def template_tools(tools: list[P.Tool] | None) -> list[dict] | None:
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


def _held(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker` (it may still become one)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """One choice's content split into text and tool calls as it streams; see the module docstring."""

    def __init__(self, names: frozenset[str], enforced: bool):
        self.names, self.enforced = names, enforced
        self.state = "text"  # text, calls (between two calls), name, args, after (the block closed)
        self.buf = ""  # text not yet decided
        self.block = ""  # auto: the calls block as written so far
        self.calls: list[list[str]] = []  # [id, name, arguments]

    def feed(self, text: str, final: bool = False) -> tuple[str, list[P.ToolCallDelta]]:
        """(content, tool-call deltas) decided by this piece; `final`: the output ended, decide everything."""
        self.buf += text
        content, deltas = "", []
        while True:
            if self.state in ("text", "after"):
                marker = TOOL_CALLS_BEGIN if self.state == "text" else None
                at = self.buf.find(marker) if marker else -1
                if at < 0:
                    keep = 0 if final or not marker else _held(self.buf, marker)
                    content, self.buf = content + self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
                    return content, deltas
                content += self.buf[:at]
                self.buf, self.state = self.buf[at + len(TOOL_CALLS_BEGIN) :], "calls"
                self.block = TOOL_CALLS_BEGIN
            elif not self.enforced:  # auto: hold the block until it closes or the output ends
                end = self.buf.find(TOOL_CALLS_END)
                if end < 0 and not final:
                    return content, deltas
                cut = len(self.buf) if end < 0 else end + len(TOOL_CALLS_END)
                self.block, self.buf, self.state = self.block + self.buf[:cut], self.buf[cut:], "after"
                calls = self._parse(self.block)
                if calls is None:
                    content += self.block
                else:
                    for name, args in calls:
                        deltas += self._open(name) + [self._args(args)]
            elif not self._step(deltas, final):
                return content, deltas

    def finish(self) -> tuple[str, list[P.ToolCallDelta]]:
        return self.feed("", final=True)

    def _step(self, deltas: list, final: bool) -> bool:
        """One move of the enforced parser (calls, name, args); False when it needs more text."""
        if self.state == "calls":
            for marker, state in ((TOOL_CALL_BEGIN, "name"), (TOOL_CALLS_END, "after")):
                if self.buf.startswith(marker):
                    self.buf, self.state = self.buf[len(marker) :], state
                    return True
            if final or not (TOOL_CALL_BEGIN.startswith(self.buf) or TOOL_CALLS_END.startswith(self.buf)):
                self.state = "after"  # not the format (cut short): what is left is content
                return True
            return False
        if self.state == "name":
            at = self.buf.find(TOOL_SEP)
            if at < 0:
                return False
            deltas += self._open(self.buf[:at])
            self.buf, self.state = self.buf[at + len(TOOL_SEP) :], "args"
            return True
        at = self.buf.find(TOOL_CALL_END)  # args
        piece = self.buf if at < 0 else self.buf[:at]
        if at < 0 and not final:
            piece = piece[: len(piece) - _held(piece, TOOL_CALL_END)]
        if piece:
            deltas.append(self._args(piece))
        if at < 0:
            self.buf = self.buf[len(piece) :] if not final else ""
            return False
        self.buf, self.state = self.buf[at + len(TOOL_CALL_END) :], "calls"
        return True

    def _open(self, name: str) -> list[P.ToolCallDelta]:
        self.calls.append([f"call_{uuid.uuid4().hex[:24]}", name, ""])
        i = len(self.calls) - 1
        fn = P.FunctionDelta(name=name, arguments="")
        return [P.ToolCallDelta(index=i, id=self.calls[i][0], type="function", function=fn)]

    def _args(self, piece: str) -> P.ToolCallDelta:
        self.calls[-1][2] += piece
        return P.ToolCallDelta(index=len(self.calls) - 1, function=P.FunctionDelta(arguments=piece))

    def _parse(self, block: str) -> list[tuple[str, str]] | None:
        """A whole calls block as [(name, arguments)], or None if it is not well formed."""
        if not (block.startswith(TOOL_CALLS_BEGIN) and block.endswith(TOOL_CALLS_END)):
            return None
        body, calls = block[len(TOOL_CALLS_BEGIN) : -len(TOOL_CALLS_END)], []
        while body:
            if not body.startswith(TOOL_CALL_BEGIN) or TOOL_CALL_END not in body:
                return None
            call, body = body[len(TOOL_CALL_BEGIN) :].split(TOOL_CALL_END, 1)
            name, sep, args = call.partition(TOOL_SEP)
            try:
                ok = sep and name in self.names and isinstance(json.loads(args), dict)
            except ValueError:
                ok = False
            if not ok:
                return None
            calls.append((name, args))
        return calls or None

    def tool_calls(self) -> list[P.ToolCall] | None:
        """The calls as the message carries them (None: the model called nothing)."""
        if not self.calls:
            return None
        return [P.ToolCall(id=i, function=P.ToolCallFunction(name=n, arguments=a)) for i, n, a in self.calls]
