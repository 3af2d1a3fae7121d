"""`nanoseek chat`: talk to a checkpoint in the terminal, through the engine, with the reasoning shown apart.

    nanoseek chat --model runs/tiny [--system "..."] [--temperature 0.6] [--max-tokens 512]

Tokens stream as they are decoded; the text inside `<think>…</think>` is printed dimmed (on a terminal)
under a "thinking" label, then the answer (engine/text.py: the same text pipeline as the server).
The conversation is kept: each turn is rendered with the checkpoint's chat template, and earlier answers
enter the prompt without their reasoning, as DeepSeek's API asks. Ctrl-C while the model writes stops that
answer (the turn is dropped); Ctrl-C or Ctrl-D at the prompt leaves. /reset starts over, /exit leaves.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TextIO

from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.text import ReasoningSplitter, SampleText
from nanoseek.errors import NanoseekError

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ChatError(NanoseekError):
    """A turn that cannot be generated (the conversation outgrew the context)."""


class ChatSession:
    """A conversation with one engine: `reply(text)` streams ("reasoning" | "content", text) pieces."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        if engine.tokenizer is None:
            raise ChatError("the checkpoint has no tokenizer.json; chat needs one")
        self.engine, self.params, self.system = engine, params, system
        self.interrupted = False  # set (by a signal handler) to stop the answer being written
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str) -> Iterator[tuple[str, str]]:
        tok = self.engine.tokenizer
        messages = self.messages + [{"role": "user", "content": user_text}]
        ids = tok.encode(tok.apply_chat_template(messages))
        room = self.engine.max_len - len(ids)
        if room <= 0:
            raise ChatError(
                f"the conversation has {len(ids)} tokens and the context holds {self.engine.max_len}; "
                "/reset to start over"
            )
        params = replace(self.params, max_tokens=min(self.params.max_tokens, room))
        text, split = SampleText(tok, params.stop), ReasoningSplitter(tok.chat_template)
        content = []
        self.interrupted = False
        stream = self.engine.stream(ids, params)
        try:
            for ev in stream:
                pieces = [split.feed(text.add(ev.token_id))]
                if ev.finish_reason:
                    pieces += [split.feed(text.finish()), split.finish()]
                for reasoning, answer in pieces:
                    if reasoning:
                        yield "reasoning", reasoning
                    if answer:
                        content.append(answer)
                        yield "content", answer
                if self.interrupted:
                    raise KeyboardInterrupt
        finally:
            stream.close()  # an unfinished request is aborted: its cache blocks come back
        self.messages = messages + [{"role": "assistant", "content": "".join(content)}]


@contextmanager
def _deferred_sigint(session: ChatSession):
    """While an answer streams, Ctrl-C sets a flag checked between engine steps, so the engine is never
    interrupted in the middle of one."""
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: setattr(session, "interrupted", True))
    except ValueError:  # not the main thread: plain KeyboardInterrupt semantics
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_chat(
    session: ChatSession,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    color: bool | None = None,
    banner: str = "",
) -> None:
    """The read-reply loop; returns on /exit, Ctrl-D or Ctrl-C at the prompt."""
    if color is None:
        color = out.isatty() and "NO_COLOR" not in os.environ
    dim, reset = (DIM, RESET) if color else ("", "")
    out.write(f"{banner}Ctrl-D or /exit to leave, /reset to start over.\n")
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
            continue
        shown = None
        try:
            with _deferred_sigint(session):
                for kind, text in session.reply(line):
                    if kind != shown:
                        if kind == "reasoning":
                            out.write(f"{dim}thinking: ")
                        else:
                            out.write(f"{reset}\n\n" if shown == "reasoning" else "")
                        shown = kind
                    out.write(text)
                    out.flush()
            out.write(f"{reset}\n")
        except KeyboardInterrupt:
            out.write(f"{reset}\n(stopped; this turn is dropped)\n")
        except ChatError as e:
            out.write(f"{reset}error: {e}\n")
        out.flush()


def main(
    model: str,
    params: SamplingParams,
    system: str | None = None,
    device: str = "cpu",
    allow_nonfinite: bool = False,
    weights: str = "fp32",
    compile: bool | None = None,
) -> None:
    try:
        import readline  # noqa: F401  (optional, not on every platform: line editing and history for input())
    except ImportError:
        pass
    engine = Engine(
        model, max_batch_size=1, device=device, allow_nonfinite=allow_nonfinite, weights=weights, compile=compile
    )
    session = ChatSession(engine, params, system)
    run_chat(session, banner=f"nanoseek chat: {model} ({engine.tokenizer.chat_template} template). ")
