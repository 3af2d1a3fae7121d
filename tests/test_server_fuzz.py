"""Random bodies against a real `nanoseek serve` process: random JSON values, and valid chat and completions
bodies with fields changed, added or removed (hypothesis), surrogates and NaN included, on the three generation
endpoints (chat, completions, responses); structured output and tools included (schemas that compile, that do
not, and random JSON as a schema). None may get a 5xx, and the server's memory must come back to its level
after warm-up."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from nanoseek.bench.serve import ServerProcess

from helpers import think_checkpoint, variant

CHAT = {"model": "small", "messages": [{"role": "user", "content": "What is 2+3?"}], "max_tokens": 4}
COMPLETION = {"model": "small", "prompt": "The quick brown fox", "max_tokens": 4}
RESPONSE = {"model": "small", "input": "What is 2+3?", "max_output_tokens": 4}
FIELDS = [
    *sorted({*CHAT, *COMPLETION, *RESPONSE}),
    *"n temperature top_p top_k stop seed stream stream_options logprobs top_logprobs echo ignore_eos".split(),
    *"max_completion_tokens presence_penalty logit_bias user tools response_format best_of suffix".split(),
    *"thinking chat_template_kwargs reasoning_effort reasoning instructions metadata tool_choice text".split(),
    *"truncation include store background previous_response_id parallel_tool_calls".split(),
]

# any code point, lone surrogates included (and often: they are rare among all of Unicode)
text = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(["\ud800", "ok \udfff", "\ud83d"])
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | text
plain_values = st.booleans() | st.integers(-2, 2) | st.none()
TOOL_CALLS = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=10
)
schemas = st.one_of(
    st.sampled_from(
        [
            {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]},
            {"type": "object"},
            {"type": "nope"},
            {"type": "string", "pattern": "("},
        ]
    ),
    json_values,
)
plausible = st.one_of(
    json_values,
    st.integers(-2, 60),
    st.floats(-3, 3),
    st.sampled_from(["small", "user", "assistant", "text", "", "5", "<think>", "none", "high", "auto", "disabled"]),
    st.fixed_dictionaries({"type": st.sampled_from(["enabled", "disabled", "text", "json_object", "x"])}),
    st.fixed_dictionaries({"thinking": st.booleans()}) | st.fixed_dictionaries({"enable_thinking": plain_values}),
    st.fixed_dictionaries({"effort": st.sampled_from(["none", "low", "high", "max", "x"])}),
    st.lists(st.integers(0, 600), min_size=1, max_size=6),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]), "content": text}), max_size=3),
    # structured output and tools: schemas that compile, that do not, and random JSON as a schema
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["json_schema", "json_object"]),
            "json_schema": st.fixed_dictionaries({"name": st.sampled_from(["x", "a b"]), "schema": schemas}),
        }
    ),
    st.lists(
        st.fixed_dictionaries(
            {
                "type": st.just("function"),
                "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g", "a b"]), "parameters": schemas}),
            }
        ),
        max_size=2,
    ),
    st.sampled_from(["required", {"type": "function", "function": {"name": "f"}}]),
    st.lists(
        st.sampled_from(
            [
                {"role": "user", "content": "Hi"},
                {"role": "tool", "content": "sunny"},
                {"role": "tool", "content": "sunny", "tool_call_id": "c"},
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]},
                {"role": "assistant", "content": None, "tool_calls": TOOL_CALLS},
            ]
        ),
        min_size=1,
        max_size=3,
    ),
)


@st.composite
def perturbed(draw, base: dict) -> dict:
    body = dict(base)
    for key in draw(st.lists(st.sampled_from(sorted(base)), max_size=2)):
        body.pop(key, None)
    body.update(draw(st.dictionaries(st.sampled_from(FIELDS) | text, plausible, max_size=3)))
    return body


bodies = st.tuples(
    st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/responses"]),
    st.one_of(json_values, perturbed(CHAT), perturbed(COMPLETION), perturbed(RESPONSE)),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    small = variant(think_checkpoint(tmp_path_factory.getbasetemp()), "small", context=48)
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    flags = ("--served-model-name", "small", "--threads", "1", "--max-n", "4", "--max-sequences", "8")
    s = ServerProcess(small, *flags, log=log)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


@pytest.mark.slow
def test_1000_random_bodies_get_no_5xx_and_memory_comes_back(server):
    statuses: dict[int, int] = {}
    failures: list[tuple] = []

    with httpx.Client(base_url=server.url, timeout=60) as http:

        def send(case) -> None:
            path, body = case
            r = http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code >= 500 or (r.status_code >= 400 and "error" not in r.json()):
                failures.append((r.status_code, path, body, r.text[:300]))

        def run(n: int, at: int) -> None:
            cases = settings(
                max_examples=n,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )(given(bodies)(send))
            seed(at)(cases)()

        t0 = time.time()
        run(200, at=1)  # warm-up: every path (validation, refusals, generation, streaming) once at least
        warm = rss_mb(server.proc.pid)
        statuses.clear()
        run(1000, at=2)
        elapsed = time.time() - t0
    after = rss_mb(server.proc.pid)
    print(
        f"fuzz: {sum(statuses.values())} bodies {dict(sorted(statuses.items()))} in {elapsed:.0f} s; "
        f"RSS {warm:.0f} -> {after:.0f} MB"
    )
    assert not failures, failures[:5]
    assert sum(statuses.values()) == 1000 and statuses.get(200, 0) > 50  # some were served, not all refused
    assert after <= warm * 1.10
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
