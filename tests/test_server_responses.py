"""POST /v1/responses through the official client's `client.responses.create`, on the server processes of
conftest.py (the model that reasons, tests/helpers.py): reasoning and message items, usage, instructions and
message-list input (earlier output passed back), streaming events in order, max_output_tokens -> incomplete,
`reasoning.effort` as the thinking switch, refused parameters (400 naming them, nothing generated), /metrics
and the schema; in-process, a failing engine step mid-stream."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from test_server import KEY, ask

from nanoseek.checkpoint.tokenizer import render_chat
from nanoseek.engine.engine import Engine
from nanoseek.server.app import ServerConfig, create_app

from helpers import QA

EVENTS = [  # the event types of a response that reasons and answers, in order (deltas collapsed)
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.reasoning_text.delta",
    "response.reasoning_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def _texts(r) -> tuple[str | None, str]:
    """(reasoning text or None, output_text) of a Response."""
    reasoning = [o.content[0].text for o in r.output if o.type == "reasoning"]
    return (reasoning[0] if reasoning else None), r.output_text


@pytest.mark.slow
def test_responses_create_reasoning_and_message_items_and_usage(server, tok):
    client = server.client()
    for q, reasoning, answer in QA:
        r = client.responses.create(model="think", input=q, temperature=0)
        chat = client.chat.completions.create(model="think", messages=ask(q), temperature=0)
        assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed" and r.model == "think"
        assert [o.type for o in r.output] == ["reasoning", "message"] and r.incomplete_details is None
        assert _texts(r) == (reasoning, answer) and r.output[1].status == "completed"
        assert r.usage.input_tokens == chat.usage.prompt_tokens == len(tok.encode(render_chat(ask(q))))
        assert r.usage.output_tokens == chat.usage.completion_tokens
        assert r.usage.output_tokens_details.reasoning_tokens == chat.usage.completion_tokens_details.reasoning_tokens
        assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # instructions are a system message; a message list with the earlier output passed back (its reasoning is
    # left out of the prompt, as in chat)
    r = client.responses.create(model="think", instructions="Be brief.", input="Say hi.", temperature=0)
    system = [{"role": "system", "content": "Be brief."}, *ask("Say hi.")]
    assert r.usage.input_tokens == len(tok.encode(render_chat(system)))
    first = client.responses.create(model="think", input="What is 2+3?", temperature=0)
    history = [
        {"role": "user", "content": [{"type": "input_text", "text": "What is 2+3?"}]},
        *[o.model_dump(exclude_none=True) for o in first.output],
        {"type": "message", "role": "user", "content": "Say hi."},
    ]
    r = client.responses.create(model="think", input=history, temperature=0, metadata={"k": "v"})
    convo = [*ask("What is 2+3?"), {"role": "assistant", "content": "5"}, *ask("Say hi.")]
    assert r.usage.input_tokens == len(tok.encode(render_chat(convo))) and r.metadata == {"k": "v"}


@pytest.mark.slow
def test_responses_stream_events(server):
    client = server.client()
    for q, reasoning, answer in QA[:2]:
        whole = client.responses.create(model="think", input=q, temperature=0)
        events = list(client.responses.create(model="think", input=q, temperature=0, stream=True))
        types = [e.type for e in events]
        collapsed = [t for i, t in enumerate(types) if not (t.endswith(".delta") and types[i - 1] == t)]
        assert collapsed == EVENTS
        assert [e.sequence_number for e in events] == list(range(len(events)))
        rs, msg = [e.item.id for e in events if e.type == "response.output_item.added"]
        deltas = lambda kind, item: "".join(e.delta for e in events if e.type == kind and e.item_id == item)  # noqa: E731
        assert deltas("response.reasoning_text.delta", rs) == reasoning
        assert deltas("response.output_text.delta", msg) == answer
        assert [e.output_index for e in events if e.type == "response.output_item.done"] == [0, 1]
        assert next(e.text for e in events if e.type == "response.reasoning_text.done") == reasoning
        assert events[0].response.status == "in_progress" and events[0].response.usage is None
        final = events[-1].response
        assert final.status == "completed" and _texts(final) == _texts(whole) == (reasoning, answer)
        assert final.usage.model_dump() == whole.usage.model_dump() and final.id == events[0].response.id
        assert [o.id for o in final.output] == [rs, msg]


@pytest.mark.slow
def test_max_output_tokens_makes_an_incomplete_response(server):
    client = server.client()
    r = client.responses.create(model="think", input="What is 2+3?", temperature=0, max_output_tokens=4)
    assert (r.status, r.incomplete_details.reason, r.usage.output_tokens) == ("incomplete", "max_output_tokens", 4)
    assert [(o.type, o.status) for o in r.output] == [("reasoning", "incomplete")]  # cut inside the reasoning
    assert r.output_text == "" and r.max_output_tokens == 4
    events = list(
        client.responses.create(model="think", input="What is 2+3?", temperature=0, max_output_tokens=4, stream=True)
    )
    assert (
        events[-1].type == "response.incomplete"
        and events[-1].response.incomplete_details.reason == "max_output_tokens"
    )
    assert _texts(events[-1].response) == _texts(r)


@pytest.mark.slow
def test_reasoning_effort_switches_thinking(server, tok):
    client = server.client()
    on = client.responses.create(model="think", input="What is 2+3?", temperature=0, reasoning={"effort": "low"})
    assert on.usage.input_tokens == len(tok.encode(render_chat(ask("What is 2+3?"), thinking=True)))
    assert _texts(on) == ("2 plus 3 makes 5.", "5") and on.reasoning.effort == "low"
    off = client.responses.create(model="think", input="What is 2+3?", temperature=0, reasoning={"effort": "none"})
    chat = client.chat.completions.create(
        model="think", messages=ask("What is 2+3?"), temperature=0, reasoning_effort="none"
    )
    assert off.usage.input_tokens == len(tok.encode(render_chat(ask("What is 2+3?"), thinking=False)))
    assert [o.type for o in off.output] == ["message"] and off.usage.output_tokens_details.reasoning_tokens == 0
    assert off.output_text == chat.choices[0].message.content  # the whole text is the answer


REFUSED = [  # (extra fields, param, status)
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", 400),
    ({"tool_choice": "required"}, "tool_choice", 400),
    ({"previous_response_id": "resp_123"}, "previous_response_id", 400),
    ({"conversation": "conv_123"}, "conversation", 400),
    ({"store": True}, "store", 400),
    ({"background": True}, "background", 400),
    ({"include": ["reasoning.encrypted_content"]}, "include", 400),
    ({"prompt": {"id": "pmpt_123"}}, "prompt", 400),
    ({"truncation": "auto"}, "truncation", 400),
    ({"top_logprobs": 2}, "top_logprobs", 400),
    ({"text": {"format": {"type": "json_object"}}}, "text.format", 400),
    ({"stream_options": {"include_obfuscation": False}}, "stream_options", 400),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]}, "input.0", 400),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0", 400),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input", 400),
    ({"input": []}, "input", 400),
    ({"input": 5}, "input", 400),
    ({"max_output_tokens": 0}, "max_output_tokens", 400),
    ({"max_output_tokens": 10_000}, "max_output_tokens", 400),
    ({"temperature": 3}, "temperature", 400),
    ({"reasoning": {"effort": "max", "summary": "verbose"}}, "reasoning.summary", 400),
    ({"model": "gpt-5"}, "model", 404),
]


@pytest.mark.slow
def test_unsupported_and_bad_parameters_are_refused_naming_them(server):
    before = server.metrics()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for extra, param, status in REFUSED:
            r = http.post("/v1/responses", json={"model": "think", "input": "hi", **extra})
            err = r.json()["error"]
            assert r.status_code == status and err["param"] == param, (extra, r.text)
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:  # as the official client reports it
        server.client().responses.create(model="think", input="hi", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id" and "stores no responses" in e.value.body["message"]
    after = server.metrics()
    assert after["nanoseek_generation_tokens_total"] == before["nanoseek_generation_tokens_total"]  # nothing ran
    # /metrics counts the endpoint like the others: its answers by status, and its generated tokens
    key = 'nanoseek_http_requests_total{path="/v1/responses",status="%d"}'
    assert after[key % 400] - before.get(key % 400, 0) == sum(status == 400 for *_, status in REFUSED) + 1
    server.client().responses.create(model="think", input="Say hi.", temperature=0)
    m = server.metrics()
    assert m[key % 200] >= 1 and m["nanoseek_generation_tokens_total"] > after["nanoseek_generation_tokens_total"]


@pytest.mark.slow
def test_the_schema_describes_the_endpoint(servers):
    spec = httpx.get(f"{servers['locked'].url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    op = spec["paths"]["/v1/responses"]["post"]
    assert set(op["responses"]) == {"200", "400", "401", "404", "413", "429", "500", "503"}
    events = op["responses"]["200"]["content"]["text/event-stream"]["schema"]["properties"]["data"]["contentSchema"]
    names = {ref["$ref"].rsplit("/", 1)[1] for ref in events["anyOf"]}
    assert {"ReasoningTextDeltaEvent", "OutputTextDeltaEvent", "ResponseCompletedEvent"} <= names
    schemas = spec["components"]["schemas"]
    request = schemas["ResponsesRequest"]["properties"]
    assert {"input", "instructions", "max_output_tokens", "reasoning", "previous_response_id"} <= set(request)
    assert request["model"]["enum"] == ["small"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert {"thinking", "chat_template_kwargs", "reasoning_effort"} <= set(chat)
    assert {"reasoning_content", "reasoning"} <= set(schemas["ChatCompletionMessage"]["properties"])


def test_a_failing_step_mid_stream_is_an_error_event_then_response_failed(checkpoints):
    engine = Engine(str(checkpoints["think"]))
    fail = [False]

    def explode(module, args, output):  # inside the model's forward, in the middle of a step
        if fail[0]:
            fail[0] = False
            raise RuntimeError("injected failure")

    engine.model.lm_head.register_forward_hook(explode)
    body = {"model": "think", "input": "What is 2+3?", "temperature": 0}
    with TestClient(create_app(ServerConfig(model=str(checkpoints["think"])), engine=engine)) as http:
        fail[0] = True
        r = http.post("/v1/responses", json=body)
        assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
        fail[0] = True
        lines = http.post("/v1/responses", json={**body, "stream": True}).text.splitlines()
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        assert [e["type"] for e in events] == ["response.created", "response.in_progress", "error", "response.failed"]
        assert "injected failure" in events[2]["message"] and events[3]["response"]["status"] == "failed"
        assert "data: [DONE]" not in lines and lines[0] == "event: response.created"
        r = http.post("/v1/responses", json=body)
        assert r.status_code == 200 and r.json()["output"][1]["content"][0]["text"] == "5"
