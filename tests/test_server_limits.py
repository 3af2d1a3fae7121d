"""The server under load it should refuse: requests bounded in work (sequences, tokens), a bounded queue
(429 + Retry-After), text that is not valid Unicode, clients that leave, and who may read what with an API
key (a key from a file or the environment, never on the command line). Real `nanoseek serve` processes on
loopback ports; the engine's O(1) abort is tested on the engine itself."""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from unittest import mock

import httpx
import pytest

from nanoseek.bench.serve import ServerProcess
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams

from helpers import think_checkpoint

KEY, ENV_KEY = "sk-limits-file-key", "sk-limits-env-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROTECTED = ("/metrics", "/openapi.json", "/docs", "/redoc")
GONE = "499: the client closed the connection"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return think_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    """`limited`: key from a file, batch 2 + 4 waiting sequences, 6 sequences and 2,000 tokens a request.
    `public`: key from NANOSEEK_API_KEY, /metrics and the docs public."""
    tmp = tmp_path_factory.mktemp("limits")
    (tmp / "key").write_text(KEY + "\n")
    common = ("--served-model-name", "think", "--threads", "1")
    limited = ServerProcess(
        checkpoint,
        *common,
        "--api-key-file",
        str(tmp / "key"),
        "--max-batch-size",
        "2",
        "--max-waiting-sequences",
        "4",
        "--max-sequences",
        "6",
        "--max-request-tokens",
        "2000",
        log=tmp / "limited.log",
    )
    with mock.patch.dict(os.environ, {"NANOSEEK_API_KEY": ENV_KEY}):
        public = ServerProcess(checkpoint, *common, "--public-docs-and-metrics", log=tmp / "public.log")
    try:
        yield {"limited": limited.wait_ready(), "public": public.wait_ready()}
    finally:
        limited.stop(), public.stop()


@pytest.fixture(scope="module")
def limited(servers):
    return servers["limited"]


def metrics(server: ServerProcess, headers=AUTH) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers=headers, timeout=10).text
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and ln[0] != "#"}


def chat(content: str, **kw) -> dict:
    return {"model": "think", "messages": [{"role": "user", "content": content}], **kw}


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
    return err


def wait_idle(server: ServerProcess) -> dict[str, float]:
    deadline = time.time() + 20
    while time.time() < deadline:
        m = metrics(server)
        if m["nanoseek_requests_running"] == 0 and m["nanoseek_requests_waiting"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"the server did not go idle: {m}")


# ---- work per request ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_flood_request_is_refused_at_once_naming_the_limit(limited):
    flood = {"model": "think", "prompt": ["tell me a story"] * 1000, "n": 128, "max_tokens": 400}
    with httpx.Client(base_url=limited.url, headers=AUTH, timeout=30) as http:
        http.get("/v1/models")  # connected: the time below is the server's answer alone
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = http.post("/v1/completions", json=flood)
            times.append(time.perf_counter() - t0)
            err = error(r, 400)
            assert err["param"] == "n" and err["code"] == "too_many_sequences" and "max_sequences" in err["message"]
        print(f"flood of 1,000 prompts x n=128 refused in {min(times) * 1e3:.1f} ms (best of 3)")
        assert min(times) < 0.1
        # 1,000 prompts alone, token-id prompts, a chat with n: the limit names the field that breaks it
        err = error(http.post("/v1/completions", json={**flood, "n": 1}), 400)
        assert (err["param"], err["code"]) == ("prompt", "too_many_sequences")
        err = error(http.post("/v1/completions", json={**flood, "prompt": [[1, 2]] * 7, "n": 1}), 400)
        assert (err["param"], err["code"]) == ("prompt", "too_many_sequences")
        err = error(http.post("/v1/chat/completions", json=chat("hi", n=7, max_tokens=1)), 400)
        assert (err["param"], err["code"]) == ("n", "too_many_sequences")
        # tokens: 5 x 450 > 2,000 (max_tokens given, or the context's rest when it is not)
        err = error(http.post("/v1/completions", json={**flood, "prompt": "hi", "n": 5, "max_tokens": 450}), 400)
        assert (err["param"], err["code"]) == ("max_tokens", "too_many_tokens") and "max_request_tokens" in err[
            "message"
        ]
        err = error(http.post("/v1/chat/completions", json=chat("hi", n=5)), 400)
        assert (err["param"], err["code"]) == ("max_tokens", "too_many_tokens")
        err = error(http.post("/v1/completions", json={**flood, "prompt": [[1] * 400] * 6, "n": 1}), 400)
        assert (err["param"], err["code"]) == ("prompt", "too_many_tokens")
        assert metrics(limited)["nanoseek_generation_tokens_total"] == 0  # nothing ran
        r = http.post("/v1/chat/completions", json=chat("What is 2+3?", temperature=0, n=2))
        assert r.status_code == 200 and [c["message"]["content"] for c in r.json()["choices"]] == ["5", "5"]


@pytest.mark.slow
def test_a_full_queue_answers_429_with_retry_after(limited):
    """Batch 2 + 4 waiting: a streaming request of 4 long sequences holds 4 of the 6 places; 3 more do not fit
    (429), 1 does; once the long one is gone, all fit again."""
    long = chat("Say hi.", n=4, max_tokens=450, ignore_eos=True, stream=True, temperature=0)
    with httpx.Client(base_url=limited.url, headers=AUTH, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=long) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # admitted
            r = http.post("/v1/chat/completions", json=chat("What is 2+3?", n=3, max_tokens=2))
            err = error(r, 429)
            assert r.headers["retry-after"] == "1" and err["code"] == "queue_full", r.headers
            assert "max_waiting_sequences" in err["message"]
            r = http.post("/v1/completions", json={"model": "think", "prompt": ["a", "b", "c"], "max_tokens": 2})
            assert error(r, 429)["code"] == "queue_full"
            with http.stream("POST", "/v1/chat/completions", json=chat("What is 2+3?", max_tokens=2, stream=True)) as r:
                assert r.status_code == 200  # admitted (it waits behind the long one: let it go)
        wait_idle(limited)
        r = http.post("/v1/chat/completions", json=chat("What is 2+3?", n=3, temperature=0))
        assert r.status_code == 200 and r.json()["choices"][2]["message"]["content"] == "5"


# ---- text that cannot be encoded ------------------------------------------------------------------------------
SURROGATE_BODIES = [
    ("/v1/completions", '{"model": "think", "prompt": "a \\ud800 b"}', "prompt"),
    ("/v1/completions", '{"model": "think", "prompt": ["ok", "\\udfff"]}', "prompt.1"),
    ("/v1/completions", '{"model": "think", "prompt": "hi", "stop": "\\ud800"}', "stop"),
    ("/v1/chat/completions", '{"model": "think", "messages": [{"role": "user", "content": "\\ud800"}]}', None),
    (
        "/v1/chat/completions",
        '{"model": "think", "messages": [{"role": "user", "content": "hi"}], "stop": ["x", "\\ud83d"]}',
        "stop.1",
    ),
    ("/v1/chat/completions", '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (
        "/v1/chat/completions",
        '{"model": "think", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
        None,
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("path,body,param", SURROGATE_BODIES)
def test_lone_surrogates_are_a_400_and_the_connection_is_kept(limited, path, body, param):
    headers = {**AUTH, "content-type": "application/json"}
    with httpx.Client(base_url=limited.url, headers=headers, timeout=30) as http:
        err = error(http.post(path, content=body.encode()), 400)
        assert "not valid Unicode" in err["message"] and err["type"] == "invalid_request_error"
        if param:
            assert err["param"] == param
        else:
            assert err["param"].startswith("messages.0.content")
        r = http.post("/v1/chat/completions", json=chat("What is 2+3?", temperature=0))  # the same connection
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "5"


# ---- a client that leaves ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_non_streaming_client_that_leaves_is_logged_once_without_a_traceback(limited):
    before = wait_idle(limited)
    body = chat("Say hi.", max_tokens=450, ignore_eos=True, temperature=0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{limited.url}/v1/chat/completions", json=body, headers=AUTH, timeout=httpx.Timeout(30, read=0.05))
    deadline = time.time() + 10
    while time.time() < deadline and GONE not in limited.log.read_text():
        time.sleep(0.05)
    after = wait_idle(limited)
    assert after["nanoseek_requests_aborted_total"] == before["nanoseek_requests_aborted_total"] + 1
    assert after["nanoseek_generation_tokens_total"] - before["nanoseek_generation_tokens_total"] < 450
    log = limited.log.read_text()
    assert sum(GONE in line for line in log.splitlines()) == 1, log
    assert "Traceback" not in log and "InvalidStateError" not in log, log


# ---- access ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_with_a_key_metrics_and_docs_need_it_unless_made_public(servers):
    limited, public = servers["limited"], servers["public"]
    for path in PROTECTED + ("/v1/models", "/nothing"):
        assert error(httpx.get(f"{limited.url}{path}"), 401)["code"] == "missing_api_key", path
        r = httpx.get(f"{limited.url}{path}", headers={"Authorization": "Bearer wrong"})
        assert error(r, 401)["code"] == "invalid_api_key"
        if path != "/nothing":
            assert httpx.get(f"{limited.url}{path}", headers=AUTH).status_code == 200, path
    assert httpx.get(f"{limited.url}/health").status_code == 200
    for path in PROTECTED:
        assert httpx.get(f"{public.url}{path}").status_code == 200, path
    assert error(httpx.get(f"{public.url}/v1/models"), 401)["code"] == "missing_api_key"
    assert httpx.get(f"{public.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
    assert httpx.get(f"{public.url}/v1/models", headers={"Authorization": f"Bearer {ENV_KEY}"}).status_code == 200
    spec = httpx.get(f"{limited.url}/openapi.json", headers=AUTH).json()
    assert spec["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]
    assert "429" in spec["paths"]["/v1/completions"]["post"]["responses"]
    assert "security" not in spec["paths"]["/health"]["get"]


@pytest.mark.slow
def test_the_key_is_not_on_the_command_line(servers):
    for server, key in ((servers["limited"], KEY), (servers["public"], ENV_KEY)):
        argv = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in argv and not any(key.encode() in a for a in argv), argv


@pytest.mark.slow
def test_the_servers_logged_no_traceback(servers):
    for server in servers.values():
        log = server.log.read_text()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log


# ---- abort in O(1) ------------------------------------------------------------------------------------------
class CountingDeque(deque):
    """A deque that counts full passes over it."""

    passes = 0

    def __iter__(self):
        CountingDeque.passes += 1
        return super().__iter__()


def test_aborting_one_of_20000_queued_requests_does_not_scan_the_others(checkpoint):
    engine = Engine(str(checkpoint), max_batch_size=2)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    rids = [engine.add_request([5, 6, 7], params) for _ in range(20_000)]
    engine.waiting = CountingDeque(engine.waiting)
    scan = min(_timed(lambda: [s for s in engine.waiting if s.request_id == "none"]) for _ in range(5))
    aborts = []
    for k in range(5):  # 50 aborts at a time, spread over the queue; linear aborts cost 50 scans at least
        batch = rids[k + 1 : 20_000 : 400]
        aborts.append(_timed(lambda: [engine.abort(r) for r in batch]))
    CountingDeque.passes -= 5  # the scans timed above
    print(f"50 aborts among 20,000 queued: {min(aborts) * 1e3:.3f} ms; one scan of the queue: {scan * 1e3:.3f} ms")
    assert CountingDeque.passes == 0 and len(engine.waiting) == 20_000  # not swept: marked
    assert min(aborts) < 5 * scan  # 50 linear aborts take 50 scans or more
    # the marked ones are skipped when they come up: the first two live requests run, in order
    engine.abort(rids[0])
    events = engine.step()
    assert [e.request_id for e in events] == [rids[6], rids[7]] and engine.has_unfinished()  # 1-5 aborted
    # once marked ones are half the queue it is swept, once
    for r in rids[4:12_000]:
        engine.abort(r)
    assert CountingDeque.passes == 1 and not isinstance(engine.waiting, CountingDeque)
    assert sum(not s.finish_reason for s in engine.waiting) == 8_000 - 100  # 100 of the last 8,000 aborted before
    for r in rids[:12_000]:
        engine.abort(r)
    for r in rids[12_000:]:
        engine.abort(r)
    assert not engine.has_unfinished() and engine.cache.n_free == engine.cache.n_blocks


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
