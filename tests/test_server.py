"""The OpenAI-compatible server, tested as users meet it: real `nanoseek serve` processes on free loopback
ports, driven by the official `openai` client, httpx and schemathesis.

The model under test is trained here, in a few seconds, to answer four questions in both reasoning formats
(`<think>…</think>answer` after the deepseek template, `<think> … </think> <answer> … </answer>` after the
R1-Zero one), so greedy outputs contain the tags for real and the reasoning/content split is checked on
what a model actually wrote. The text pipeline and the engine thread alone: tests/test_server_text.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from nanoseek.bench.serve import BenchConfig, ServerProcess, run_bench
from nanoseek.checkpoint.tokenizer import render_chat
from nanoseek.engine.sampling import SamplingParams

from helpers import QA, R1_SYSTEM

KEY = "sk-test-key"


# ---- real server processes (the fixtures that start them, `checkpoints`, `servers`, `server`, `offline`,
# `tok`, are in conftest.py: tests/test_server*.py share one set of processes per session) --------------
class Server(ServerProcess):
    """`nanoseek serve` on a free loopback port (one torch thread: three servers share two cores)."""

    def __init__(self, model: Path, *flags: str, log: Path):
        super().__init__(model, "--threads", "1", *flags, log=log)

    def client(self, key: str = "unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }


def ask(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


# ---- the server, through the openai client ------------------------------------------------------------
def _stream_chat(client, **kw):
    """(reasoning, content, finish_reasons by index, chunks) of a streamed chat completion."""
    chunks = list(client.chat.completions.create(stream=True, **kw))
    reasoning, content, finish = {}, {}, {}
    for ch in chunks:
        for c in ch.choices:
            d = c.delta
            reasoning[c.index] = reasoning.get(c.index, "") + (getattr(d, "reasoning_content", None) or "")
            content[c.index] = content.get(c.index, "") + (d.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return reasoning, content, finish, chunks


@pytest.mark.slow
def test_chat_reasoning_content_usage_non_stream_and_stream(server, tok, offline):
    client = server.client()
    for q, reasoning, answer in QA:
        r = client.chat.completions.create(model="think", messages=ask(q), temperature=0)
        msg = r.choices[0].message
        assert (msg.reasoning_content, msg.content, r.choices[0].finish_reason) == (reasoning, answer, "stop")
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "think"
        prompt = tok.apply_chat_template(ask(q))
        alone = offline.generate([prompt], SamplingParams(max_tokens=100, temperature=0))[0].outputs[0]
        assert r.usage.prompt_tokens == len(tok.encode(prompt))
        assert r.usage.completion_tokens == len(alone.token_ids)  # answer, tags and end-of-sentence
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.usage.completion_tokens_details.reasoning_tokens == len(tok.encode(f"<think>{reasoning}</think>"))

        sr, sc, finish, chunks = _stream_chat(
            client, model="think", messages=ask(q), temperature=0, stream_options={"include_usage": True}
        )
        assert (sr[0], sc[0], finish) == (reasoning, answer, {0: "stop"})
        assert chunks[0].choices[0].delta.role == "assistant"
        assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()
        assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.slow
def test_r1_zero_checkpoint_content_is_the_answer(servers):
    client = servers["zero"].client()
    for q, reasoning, answer in QA:
        msgs = [{"role": "system", "content": R1_SYSTEM}, *ask(q)]
        msg = client.chat.completions.create(model="zero", messages=msgs, temperature=0).choices[0].message
        assert (msg.reasoning_content, msg.content) == (reasoning, answer)
        sr, sc, finish, _ = _stream_chat(client, model="zero", messages=msgs, temperature=0)
        assert (sr[0], sc[0], finish[0]) == (reasoning, answer, "stop")
    raw = client.completions.create(
        model="zero",
        prompt=render_chat([{"role": "system", "content": R1_SYSTEM}, *ask("What is 2+3?")], "r1_zero"),
        max_tokens=40,
        temperature=0,
    )
    assert raw.choices[0].text == " <think> 2 plus 3 makes 5. </think> <answer> 5 </answer>"  # the raw text


@pytest.mark.slow
def test_stop_strings(server):
    client = server.client()
    kw = dict(model="think", messages=ask("What is 7*6?"), temperature=0)
    r = client.chat.completions.create(stop=["makes"], **kw)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("7 times 6", "")
    assert r.choices[0].finish_reason == "stop"
    sr, sc, finish, _ = _stream_chat(client, stop="makes", **kw)
    assert (sr[0], sc[0], finish[0]) == ("7 times 6", "", "stop")
    r = client.chat.completions.create(stop=["2", "4"], **kw)  # the earliest match wins: "42" -> ""
    assert r.choices[0].message.content == "" and r.choices[0].message.reasoning_content == "7 times 6 makes"


@pytest.mark.slow
def test_n_samples_and_seeds(server):
    client = server.client()
    kw = dict(
        model="think",
        messages=ask("Tell me something."),
        temperature=1.0,
        max_tokens=12,
        extra_body={"ignore_eos": True},
    )
    a = client.chat.completions.create(n=3, seed=1, **kw)
    b = client.chat.completions.create(n=3, seed=1, **kw)
    c = client.chat.completions.create(n=3, seed=2, **kw)
    texts = lambda r: [(ch.message.reasoning_content, ch.message.content) for ch in r.choices]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1, 2] and texts(a) == texts(b) != texts(c)
    assert len(set(texts(a))) > 1  # the samples differ from each other
    assert a.usage.completion_tokens == 36
    sr, sc, finish, _ = _stream_chat(client, n=3, seed=1, **kw)
    assert [(sr[i] or None, sc[i]) for i in range(3)] == texts(a) and finish == {0: "length", 1: "length", 2: "length"}


@pytest.mark.slow
def test_logprobs(server, tok):
    r = server.client().chat.completions.create(
        model="think", messages=ask("What is 2+3?"), temperature=0, logprobs=True, top_logprobs=2
    )
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in entries).decode().startswith("<think>2 plus 3 makes 5.</think>5")
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob) and e.logprob <= 0


@pytest.mark.slow
def test_completions(server, tok, offline):
    client = server.client()
    r = client.completions.create(
        model="think",
        prompt="The quick brown",
        max_tokens=6,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    alone = offline.generate(["The quick brown"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    ch = r.choices[0]
    assert r.object == "text_completion" and ch.text == alone.outputs[0].text and ch.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode("The quick brown")) and r.usage.completion_tokens == 6
    assert len(ch.logprobs.tokens) == 6 and ch.logprobs.text_offset[0] == 0
    # token-id prompts, several prompts times n, echo, and streaming give the same text
    ids = tok.encode("The quick brown")
    r2 = client.completions.create(
        model="think", prompt=[ids, ids], n=2, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in r2.choices] == [0, 1, 2, 3] and {c.text for c in r2.choices} == {ch.text}
    e = client.completions.create(
        model="think", prompt="The quick brown", echo=True, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert e.choices[0].text == "The quick brown" + ch.text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="think",
            prompt="The quick brown",
            max_tokens=6,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        if c.choices
    )
    assert streamed == ch.text


BAD_REQUESTS = [
    # (path, body or raw bytes, headers, expected status, expected param)
    ("chat", b'{"model": "think", "messages": [', {}, 400, None),
    ("chat", {"model": "think"}, {}, 400, "messages"),
    ("chat", {"model": "think", "messages": []}, {}, 400, "messages"),
    ("chat", {"model": "think", "messages": "hi"}, {}, 400, "messages"),
    ("chat", {"model": "think", "messages": [{"role": "wizard", "content": "x"}]}, {}, 400, "messages.0.role"),
    ("chat", {"model": "think", "messages": [{"role": "user", "content": 5}]}, {}, 400, "messages.0.content"),
    ("chat", {"model": "think", "messages": ask("hi"), "max_tokens": "7"}, {}, 400, "max_tokens"),
    ("chat", {"model": "think", "messages": ask("hi"), "stream": "yes"}, {}, 400, "stream"),
    ("chat", {"model": "gpt-4o", "messages": ask("hi")}, {}, 404, "model"),
    ("chat", {"model": "think", "messages": ask("hi"), "max_tokens": 0}, {}, 400, "max_tokens"),
    ("chat", {"model": "think", "messages": ask("hi"), "max_tokens": -5}, {}, 400, "max_tokens"),
    ("chat", {"model": "think", "messages": ask("hi"), "max_tokens": 10_000}, {}, 400, "max_tokens"),
    ("chat", {"model": "think", "messages": ask("word " * 600)}, {}, 400, "messages"),
    ("chat", {"model": "think", "messages": ask("hi"), "temperature": -0.5}, {}, 400, "temperature"),
    ("chat", {"model": "think", "messages": ask("hi"), "top_p": 0}, {}, 400, "top_p"),
    ("chat", {"model": "think", "messages": ask("hi"), "n": 10**9}, {}, 400, "n"),
    ("chat", {"model": "think", "messages": ask("hi"), "presence_penalty": 1.0}, {}, 400, "presence_penalty"),
    ("chat", {"model": "think", "messages": ask("hi"), "top_logprobs": 3}, {}, 400, "top_logprobs"),
    (
        "chat",
        {"model": "think", "messages": ask("hi"), "stream_options": {"include_usage": True}},
        {},
        400,
        "stream_options",
    ),
    ("chat", {"model": "think", "messages": ask("hi"), "tools": [{"type": "function"}]}, {}, 400, "tools.0.function"),
    ("chat", b"[1, 2, 3]", {}, 400, None),
    ("chat", b"NaN", {}, 400, None),
    ("completions", {"model": "think", "prompt": [99999]}, {}, 400, "prompt"),
    ("completions", {"model": "think", "prompt": []}, {}, 400, "prompt"),
    ("completions", {"model": "think", "prompt": "hi", "suffix": "x"}, {}, 400, "suffix"),
    ("completions", {"model": "think", "prompt": "hi", "max_tokens": 600}, {}, 400, "max_tokens"),
]


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    before = server.metrics()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, headers, status, param in BAD_REQUESTS:
            url = f"/v1/{'chat/completions' if path == 'chat' else 'completions'}"
            if isinstance(body, bytes):
                r = http.post(url, content=body, headers={"content-type": "application/json", **headers})
            else:
                r = http.post(url, json=body, headers=headers)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
            assert err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
        # 50 MB: refused by its Content-Length, unread
        r = http.post("/v1/chat/completions", content=b" " * (50 << 20), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        # unknown routes and methods are OpenAI errors too
        assert http.get("/v1/nothing").json()["error"]["code"] == "not_found"
        assert http.get("/v1/chat/completions").status_code == 405
    after = server.metrics()
    assert after["nanoseek_generation_tokens_total"] == before["nanoseek_generation_tokens_total"]  # nothing ran
    r = server.client().chat.completions.create(model="think", messages=ask("What is 2+3?"), temperature=0)
    assert r.choices[0].message.content == "5" and httpx.get(f"{server.url}/health").json() == {"status": "ok"}


@pytest.mark.slow
def test_chunked_body_over_the_limit_is_refused(servers, tmp_path):
    """No Content-Length (chunked upload): the limit is enforced as the body arrives."""

    def chunks():
        for _ in range(20):
            yield b" " * (1 << 20)

    r = httpx.post(
        f"{servers['think'].url}/v1/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


@pytest.mark.slow
def test_api_key(servers):
    s = servers["locked"]
    before = s.metrics()["nanoseek_generation_tokens_total"]
    body = {"model": "small", "messages": ask("What is 2+3?"), "temperature": 0}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(f"{s.url}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error", r.text
        assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        s.client("wrong").models.list()
    assert s.metrics()["nanoseek_generation_tokens_total"] == before  # nothing was generated
    r = s.client(KEY).chat.completions.create(**body)
    assert r.choices[0].message.content == "5"
    assert httpx.get(f"{s.url}/health").status_code == 200  # probes need no key


@pytest.mark.slow
def test_openapi_schema_describes_the_wire_format(servers):
    spec = httpx.get(f"{servers['locked'].url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]) == {"200", "400", "401", "404", "413", "429", "500", "503"}
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    schemas = spec["components"]["schemas"]
    assert "reasoning_content" in schemas["ChatCompletionMessage"]["properties"]
    assert (
        "HTTPValidationError" not in schemas and spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    )


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors_or_schema_violations(servers, tmp_path):
    s = servers["locked"]
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{s.url}/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance,response_headers_conformance,negative_data_rejection",
        "--max-examples",
        "25",
        "--max-time",
        "30",
        "--seed",
        "7",
        "--phases",
        "examples,coverage,fuzzing",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--request-timeout",
        "30",
        "--workers",
        "2",
        "--suppress-health-check",
        "all",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert httpx.get(f"{s.url}/health").status_code == 200


@pytest.mark.slow
def test_32_concurrent_streams_equal_each_request_alone(server):
    prompts = [f"Tell me about the number {i}." for i in range(32)]
    kw = dict(model="think", temperature=0, max_tokens=24, extra_body={"ignore_eos": True})

    async def one(client, prompt):
        text = []
        async for ch in await client.chat.completions.create(messages=ask(prompt), stream=True, **kw):
            for c in ch.choices:
                text.append((getattr(c.delta, "reasoning_content", None) or "", c.delta.content or "", c.finish_reason))
        return text

    async def together():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    t0 = time.time()
    batched = asyncio.run(together())
    elapsed = time.time() - t0
    client = server.client()
    for prompt, got in zip(prompts, batched):
        alone = client.chat.completions.create(messages=ask(prompt), **kw).choices[0]
        assert "".join(r for r, _, _ in got) == (alone.message.reasoning_content or "")
        assert "".join(c for _, c, _ in got) == alone.message.content
        assert got[-1][2] == alone.finish_reason == "length"
    m = server.metrics()
    assert m["nanoseek_requests_running"] == 0 and m["nanoseek_kv_cache_blocks_used"] == 0
    assert elapsed < 60


@pytest.mark.slow
def test_prefix_cache_hits_are_reported_and_decode_as_misses_do(server):
    """The same long system prompt twice: the second request finds its blocks in the cache, says so in
    usage (chat's prompt_tokens_details, the Responses API's input_tokens_details) and on /metrics, and
    returns exactly what the first did (greedy)."""
    system = "Prefix cache check. " + "The quick brown fox jumps over the lazy dog. " * 6
    messages = [{"role": "system", "content": system}, *ask("What is 2+2?")]
    kw = dict(model="think", messages=messages, temperature=0, max_tokens=12)
    client = server.client()
    before = server.metrics()
    first, again = (client.chat.completions.create(**kw) for _ in range(2))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 32 <= cached < again.usage.prompt_tokens and cached % 16 == 0  # whole 16-token blocks, not the last
    assert again.choices[0].message == first.choices[0].message
    after = server.metrics()
    assert after["nanoseek_prefix_cache_hits_total"] - before["nanoseek_prefix_cache_hits_total"] == cached
    assert 0 < after["nanoseek_prefix_cache_hit_rate"] <= 1
    r1, r2 = (client.responses.create(model="think", instructions=system, input="Say hi.", temperature=0) for _ in "12")
    assert r2.usage.input_tokens_details.cached_tokens >= 32 and r2.output_text == r1.output_text


@pytest.mark.slow
def test_client_that_disconnects_frees_its_slot(server):
    body = {
        "model": "think",
        "messages": ask("Say hi."),
        "max_tokens": 450,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    before = server.metrics()
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(8)]  # a few chunks, then hang up
    assert all(line.startswith("data: ") or line == "" for line in got)
    deadline = time.time() + 10
    while time.time() < deadline:
        m = server.metrics()
        if m["nanoseek_requests_running"] == 0 and m["nanoseek_requests_aborted_total"] > before.get(
            "nanoseek_requests_aborted_total", 0
        ):
            break
        time.sleep(0.05)
    generated = m["nanoseek_generation_tokens_total"] - before["nanoseek_generation_tokens_total"]
    assert m["nanoseek_requests_running"] == 0 and m["nanoseek_kv_cache_blocks_used"] == 0
    assert m['nanoseek_requests_finished_total{finish_reason="abort"}'] >= 1
    assert generated < 450  # stopped long before max_tokens
    time.sleep(0.3)
    assert server.metrics()["nanoseek_generation_tokens_total"] == m["nanoseek_generation_tokens_total"]
    # a non-streaming request whose client gives up is aborted too: 450 tokens (EOS ignored) take far longer
    # than the 50 ms the client waits for its answer, on any machine (connecting has its usual time)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/chat/completions", json={**body, "stream": False}, timeout=httpx.Timeout(30, read=0.05)
        )
    deadline = time.time() + 10
    while time.time() < deadline:
        after = server.metrics()
        if after["nanoseek_requests_aborted_total"] > m["nanoseek_requests_aborted_total"]:
            break
        time.sleep(0.05)
    assert after["nanoseek_requests_aborted_total"] == m["nanoseek_requests_aborted_total"] + 1
    assert after["nanoseek_requests_running"] == 0 and after["nanoseek_kv_cache_blocks_used"] == 0
    assert after["nanoseek_generation_tokens_total"] - m["nanoseek_generation_tokens_total"] < 450


@pytest.mark.slow
def test_bench_serve_reports_throughput_latency_and_cost(server, capsys):
    summary = run_bench(
        BenchConfig(url=f"{server.url}/v1", clients=3, requests=6, max_tokens=12, rounds=1, price_per_hour=3.6)
    )
    assert summary["output_tokens_per_s"] > 0 and 0 < summary["ttft_p50_s"] <= summary["ttft_p99_s"]
    assert 0 < summary["itl_p50_s"] <= summary["itl_p99_s"]
    assert summary["usd_per_million_output_tokens"] == pytest.approx(1e3 / summary["output_tokens_per_s"])
    assert "cost per 1M output tokens" in capsys.readouterr().out
