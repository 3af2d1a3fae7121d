"""`nanoseek chat`: streamed answers with the reasoning apart (and dimmed on a terminal), a conversation that
is kept, Ctrl-C that stops an answer without breaking the engine, and clean exits on Ctrl-D / Ctrl-C."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from nanoseek.cli.chat import DIM, RESET, ChatSession, run_chat
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams

from helpers import REPO, think_checkpoint

GREEDY = SamplingParams(max_tokens=64, temperature=0)


def script(*lines: str):
    """A `read` for run_chat that types these lines, then Ctrl-D."""
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return think_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine(str(model_dir), max_batch_size=1)


def test_reply_streams_reasoning_then_content_and_keeps_the_conversation(engine):
    session = ChatSession(engine, GREEDY)
    pieces = list(session.reply("What is 2+3?"))
    kinds = [k for k, _ in pieces]
    assert kinds == sorted(kinds, key=["reasoning", "content"].index)  # all reasoning first
    assert len(pieces) > 2  # streamed, not in one piece
    assert "".join(t for k, t in pieces if k == "reasoning") == "2 plus 3 makes 5."
    assert "".join(t for k, t in pieces if k == "content") == "5"
    second = "".join(t for k, t in session.reply("Say hi.") if k == "content")
    # the history holds each answer without its reasoning (the model, trained on single turns, may wander)
    assert session.messages == [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": second},
    ]
    session.reset()
    assert session.messages == []


def test_interrupted_answer_is_dropped_and_the_engine_is_clean(engine):
    session = ChatSession(engine, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(session.reply("Say hi.")):
            if i == 2:
                session.interrupted = True  # what the Ctrl-C handler does
    assert session.messages == [] and not engine.has_unfinished()
    assert engine.cache.n_free == engine.cache.n_blocks


def test_run_chat_shows_reasoning_dimmed_and_apart(engine):
    out = io.StringIO()
    run_chat(
        ChatSession(engine, GREEDY),
        read=script("What is 2+3?", "", "/reset", "Name a color.", "/exit", "x"),
        out=out,
        color=True,
    )
    text = out.getvalue()
    assert f"{DIM}thinking: 2 plus 3 makes 5.{RESET}\n\n5{RESET}\n" in text
    assert "(conversation cleared)" in text and "Any color will do." in text and "Blue." in text
    plain = io.StringIO()
    run_chat(ChatSession(engine, GREEDY), read=script("Say hi."), out=plain, color=False)
    assert "\x1b" not in plain.getvalue() and "thinking: A greeting is asked for.\n\nHi there!" in plain.getvalue()


def test_context_overflow_is_reported_not_raised(engine):
    out = io.StringIO()
    run_chat(ChatSession(engine, GREEDY), read=script("word " * 600, "Say hi."), out=out, color=False)
    assert "error: the conversation has" in out.getvalue() and "Hi there!" in out.getvalue()  # and it goes on


def _chat_process(model_dir, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nanoseek.cli", "chat", "--model", str(model_dir), "--temperature", "0", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )


@pytest.mark.slow
def test_chat_command_answers_and_exits_on_ctrl_d(model_dir):
    p = _chat_process(model_dir)
    # two questions, each in a fresh conversation (the model was trained on single turns), then EOF = Ctrl-D
    out, err = p.communicate("What is 2+3?\n/reset\nSay hi.\n".encode(), timeout=120)
    assert p.returncode == 0, err.decode()
    out = out.decode()
    assert "thinking: 2 plus 3 makes 5.\n\n5\n" in out and "(conversation cleared)" in out and "Hi there!" in out
    assert "\x1b" not in out and b"Traceback" not in err


@pytest.mark.slow
def test_chat_command_exits_cleanly_on_ctrl_c_at_the_prompt(model_dir):
    p = _chat_process(model_dir)
    deadline = time.time() + 120
    seen = b""
    while b">>> " not in seen and time.time() < deadline:  # wait for the prompt
        seen += os.read(p.stdout.fileno(), 4096)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and b"Traceback" not in err, err.decode()
