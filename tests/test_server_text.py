"""The server's pieces without a server process, on the model that reasons (tests/helpers.py): the text
pipeline (engine/text.py: the reasoning split, stop strings, UTF-8, token bytes), the engine thread (failures
stay with their requests, aborts free the slot) and the app in-process (FastAPI's TestClient)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from nanoseek.checkpoint.tokenizer import Tokenizer
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.text import ReasoningSplitter, SampleText, StopStrings, TokenPieces, split_reasoning
from nanoseek.server.app import ServerConfig, create_app
from nanoseek.server.async_engine import AsyncEngine, GenerationFailed, RequestRefused

from helpers import think_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return think_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def offline(checkpoint):
    return Engine(str(checkpoint))


# ---- the text pipeline ------------------------------------------------------------------------------------
SPLIT_CASES = [
    ("<think>2 plus 3 makes 5.</think>5", "deepseek", ("2 plus 3 makes 5.", "5")),
    ("\n<think>\nlet me see\n</think>\n\nThe answer is 5.", "deepseek", ("let me see", "The answer is 5.")),
    ("The answer is 5.", "deepseek", (None, "The answer is 5.")),
    ("<think>cut short by max_tokens", "deepseek", ("cut short by max_tokens", "")),
    (" <think> 2 plus 3. </think> <answer> 5 </answer>", "r1_zero", ("2 plus 3.", "5")),
    (" <think> 2 plus 3. </think> <answer> 5 </answer>", "deepseek", ("2 plus 3.", "<answer> 5 </answer>")),
    (" <think> a </think> no answer tags", "r1_zero", ("a", "no answer tags")),
    ("<answer>5</answer>", "r1_zero", (None, "5")),
    ("  <thi", "deepseek", (None, "<thi")),  # looked like a tag, was not
    ("x </think> y", "deepseek", (None, "x </think> y")),  # no opening tag: all content
]


@pytest.mark.parametrize("text,template,expect", SPLIT_CASES)
def test_reasoning_split_streams_like_the_whole(text, template, expect):
    assert split_reasoning(text, template) == expect
    for cut in range(len(text) + 1):  # every two-piece split, and one character at a time
        for pieces in ([text[:cut], text[cut:]], list(text)):
            s = ReasoningSplitter(template)
            parts = [s.feed(p) for p in pieces] + [s.finish()]
            got = ("".join(r for r, _ in parts) if s.has_reasoning else None, "".join(c for _, c in parts))
            assert got == expect, (pieces, got)


@pytest.fixture(scope="module")
def tok(checkpoint):
    return Tokenizer.from_pretrained(checkpoint)


@pytest.mark.parametrize("stop", [[], ["fox"], ["o", "lazy"], ["dog."], ["ümlaut"], ["not there"]])
def test_sample_text_streams_utf8_and_cuts_at_stop_strings(tok, stop):
    text = "The quick brown fox — ümlaut, 漢字 and 🦊 — jumps over the lazy dog."
    ids = tok.encode(text)
    out = SampleText(tok, stop)
    shown = []
    for t in ids:
        shown.append(out.add(t))
        assert "".join(shown) == text[: len("".join(shown))]  # never shows a broken character or a stop string
        assert not any(s in "".join(shown) for s in stop)
        if out.stopped:
            break
    shown.append(out.finish())
    cuts = [text.find(s) for s in stop if s in text]
    assert "".join(shown) == text[: min(cuts)] if cuts else text


STOP_TEXT = "say stop, then STOP!\n\nand more after the end"


@pytest.mark.parametrize("stop", [["STOP"], ["\n\n", "op,"], ["end"], ["e"], ["nowhere"], ["after the end", "!"], []])
def test_stop_strings_found_incrementally_as_in_the_whole_text(stop):
    cuts = [STOP_TEXT.find(s) for s in stop if s in STOP_TEXT]
    whole = STOP_TEXT[: min(cuts)] if cuts else STOP_TEXT
    for size in (1, 2, 3, 7, len(STOP_TEXT)):  # pieces of every size: a match may straddle several pieces
        stops, shown = StopStrings(stop), []
        for k in range(0, len(STOP_TEXT), size):
            shown.append(stops.feed(STOP_TEXT[k : k + size]))
            assert whole.startswith("".join(shown))  # nothing shown that a stop string later cuts off
            if stops.stopped:
                break
        shown.append(stops.finish())
        assert "".join(shown) == whole and stops.text == whole and stops.stopped == bool(cuts)
        if cuts:  # a stopped text takes nothing more
            assert stops.feed("STOP more") == "" and stops.finish() == ""


def test_token_pieces_are_the_raw_bytes(tok):
    text = "<think>漢字 🦊</think> done"
    ids = tok.encode(text)
    pieces = TokenPieces(tok)
    assert b"".join(pieces.bytes(t) for t in ids) == text.encode()
    assert pieces.text(tok.token_to_id("<think>")) == "<think>"


def test_engine_events_carry_logprobs(offline):
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, ignore_eos=True)
    events = list(offline.stream(offline.encode("What is 2+3?"), params))
    ref = offline.generate([offline.encode("What is 2+3?")], params)[0].outputs[0]
    assert [e.logprob for e in events] == pytest.approx(ref.logprobs, abs=1e-6)
    for e in events:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0][0] == e.token_id  # greedy: the best one
        assert [lp for _, lp in e.top_logprobs] == sorted((lp for _, lp in e.top_logprobs), reverse=True)


# ---- the engine thread ------------------------------------------------------------------------------


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _drain(stream) -> list[int]:
    return [e.token_id async for events in stream for e in events]


def test_engine_thread_survives_a_failing_step(checkpoint):
    engine = Engine(str(checkpoint))
    aengine = AsyncEngine(engine)
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_step()

    engine.step = flaky_step
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    async def main():
        aengine.start()
        try:
            first = await aengine.add_request("a", engine.encode("What is 2+3?"), params)
            with pytest.raises(GenerationFailed, match="boom"):
                await _drain(first)
            with pytest.raises(RequestRefused, match="empty"):
                await aengine.add_request("bad", [], params)
            later = await aengine.add_request("b", engine.encode("What is 2+3?"), params)
            return await _drain(later)
        finally:
            aengine.stop()

    tokens = _run(main())
    assert len(tokens) == 10 and aengine.snapshot.failed_steps == 1
    assert engine.cache.n_free == engine.cache.n_blocks and not engine.has_unfinished()


def test_closing_a_stream_stops_decoding_within_a_step(checkpoint):
    engine = Engine(str(checkpoint))
    aengine = AsyncEngine(engine)
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def main():
        aengine.start()
        try:
            stream = await aengine.add_request("long", engine.encode("Say hi."), params)
            for _ in range(3):
                await stream.__anext__()
            steps_at_close = aengine.snapshot.steps
            stream.close()
            while engine.has_unfinished() or aengine.snapshot.running_requests:
                await asyncio.sleep(0.01)
            return aengine.snapshot.steps - steps_at_close
        finally:
            aengine.stop()

    extra_steps = _run(main())
    assert extra_steps <= 1  # the step in flight when the abort arrived, at most
    assert engine.cache.n_free == engine.cache.n_blocks and aengine.snapshot.aborted == 1


# ---- the app in-process ------------------------------------------------------------------------------------
def test_a_failing_step_fails_its_request_over_http_and_the_server_goes_on(checkpoint, caplog):
    """In-process (FastAPI's TestClient runs the app and its engine thread): an exception inside a step is a
    500 for a non-streamed request, an error event for a streamed one, and the next request is served."""
    engine = Engine(str(checkpoint))
    fail = [False]

    def explode(module, args, output):  # inside the model's forward, in the middle of a step
        if fail[0]:
            fail[0] = False
            raise RuntimeError("injected failure")

    engine.model.lm_head.register_forward_hook(explode)
    body = {"model": "think", "messages": [{"role": "user", "content": "What is 2+3?"}], "temperature": 0}
    with TestClient(create_app(ServerConfig(model=str(checkpoint)), engine=engine)) as http:
        fail[0] = True
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "injected failure" in r.json()["error"]["message"]
        fail[0] = True
        events = [
            line
            for line in http.post("/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
            if line.startswith("data: ")
        ]
        assert "injected failure" in json.loads(events[-2][6:])["error"]["message"] and events[-1] == "data: [DONE]"
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "5"
        metrics = http.get("/metrics").text
        assert "nanoseek_engine_step_failures_total 2" in metrics and "nanoseek_engine_up 1" in metrics
    assert "engine step failed" in caplog.text
