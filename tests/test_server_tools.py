"""Structured output and tool calls through real `nanoseek serve` processes and the official client:
`response_format` json_object / json_schema and tool calls under `required` / a named function hold on a model
with random weights for every seed (the grammar enforces them), the client's tool-calling loop runs end to end,
streamed tool-call deltas reassemble into the calls of the non-streamed answer, `auto` parses a well-formed
call and returns a malformed one as content (a model trained here, in seconds, to write one of each), and bad
schemas, tool names and messages are 400s naming the field. Without a server: the streaming parser, and the
templates' tool rendering as transformers renders it."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema_rs
import pytest
import torch
import transformers
from test_server import Server
from tokenizers import AddedToken

from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.checkpoint.tokenizer import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
    TOOL_SEP,
    render_chat,
    train_tokenizer,
)
from nanoseek.model.transformer import Transformer
from nanoseek.server.tools import ToolCallParser

from helpers import chat_model_config, memorize

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}
TIME["additionalProperties"] = False
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
PARIS = '{"city": "Paris", "unit": "c"}'
GOOD = f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}get_weather{TOOL_SEP}{PARIS}{TOOL_CALL_END}{TOOL_CALLS_END}"
BAD = f'{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}get_weather{TOOL_SEP}{{"city": "Oslo"{TOOL_CALL_END}{TOOL_CALLS_END}'
ASK_PARIS, ASK_OSLO = (
    [{"role": "user", "content": "Weather in Paris?"}],
    [{"role": "user", "content": "Weather in Oslo?"}],
)
CALLED = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}}]
AFTER_TOOL = [*ASK_PARIS, {"role": "assistant", "content": None, "tool_calls": CALLED}]
AFTER_TOOL += [{"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
SUNNY = "It is sunny in Paris."


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`random` (random weights; the markers are text, as in every nanoseek tokenizer) and `trained` (its
    tokenizer has the markers as tokens, as a tokenizer made for tools would: the grammar and the parser take
    both), trained to call get_weather for Paris and to answer after the tool's output."""
    root = tmp_path_factory.mktemp("tools")
    pairs = [(render_chat(ASK_PARIS, tools=TOOLS), GOOD), (render_chat(AFTER_TOOL, tools=TOOLS), SUNNY)]
    texts = [p + r for p, r in pairs] + [json.dumps({"name": "ab", "age": 7, "tags": ["a"]})] * 3
    plain = train_tokenizer(texts * 10, vocab_size=1024)
    tok = train_tokenizer(texts * 10, vocab_size=1024)
    markers = (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP, TOOL_OUTPUT_BEGIN)
    tok.tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in (*markers, TOOL_OUTPUT_END)])
    cfg = chat_model_config(tok, 1024, max_position_embeddings=2048)
    trained = memorize(tok, cfg, pairs, max_new_tokens=80)
    torch.manual_seed(1)
    out = {}
    for name, model, t in (("trained", trained, tok), ("random", Transformer(cfg), plain)):
        save_pretrained(model, root / name)
        t.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    logs = tmp_path_factory.mktemp("tools-logs")
    started = {
        name: Server(path, "--served-model-name", name, log=logs / f"{name}.log") for name, path in checkpoints.items()
    }
    try:
        yield {k: s.wait_ready() for k, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


def check_calls(message, names=("get_weather", "get_time"), n: int | None = None) -> list[tuple[str, dict]]:
    """The message's calls as (name, arguments), each valid against its tool's schema."""
    schemas = {"get_weather": WEATHER, "get_time": TIME}
    assert message.tool_calls and (n is None or len(message.tool_calls) == n), message
    out = []
    for c in message.tool_calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names, c
        args = json.loads(c.function.arguments)
        assert jsonschema_rs.validator_for(schemas[c.function.name]).is_valid(args), c.function.arguments
        out.append((c.function.name, args))
    return out


# ---- through the official client ---------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_the_clients_tool_loop_on_random_weights(servers, choice):
    client = servers["random"].client()
    names = ("get_weather", "get_time") if choice == "required" else ("get_time",)
    r = client.chat.completions.create(
        model="random", messages=ASK_PARIS, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, seed=3
    )
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    [(name, _)] = check_calls(r.choices[0].message, names, n=1)
    call = r.choices[0].message.tool_calls[0]
    messages = [*ASK_PARIS, r.choices[0].message]  # the message object itself, as OpenAI's docs do
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny" if name == "get_weather" else "noon"})
    r2 = client.chat.completions.create(
        model="random", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=24, seed=3
    )
    assert r2.choices[0].message.tool_calls is None and isinstance(r2.choices[0].message.content, str)
    assert r2.choices[0].finish_reason in ("stop", "length")


def test_required_calls_validate_for_20_seeds(servers):
    r = (
        servers["random"]
        .client()
        .chat.completions.create(
            model="random", messages=ASK_OSLO, tools=TOOLS, tool_choice="required", n=20, seed=11, max_tokens=600
        )
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls", choice
        check_calls(choice.message)


@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
def test_json_output_validates_for_20_seeds(servers, kind):
    schema = PERSON if kind == "json_schema" else {"type": "object"}
    fmt = {"type": kind}
    if kind == "json_schema":
        fmt["json_schema"] = {"name": "person", "schema": PERSON, "strict": True}
    client = servers["random"].client()
    r = client.chat.completions.create(
        model="random", messages=ASK_PARIS, response_format=fmt, n=20, seed=5, max_tokens=1500
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        assert jsonschema_rs.validator_for(schema).is_valid(json.loads(choice.message.content)), choice.message.content


def test_streamed_tool_call_deltas_reassemble_into_the_same_calls(servers):
    client = servers["random"].client()
    kw = dict(model="random", messages=ASK_PARIS, tools=TOOLS, tool_choice="required", n=2, seed=7, max_tokens=600)
    whole = client.chat.completions.create(**kw)
    calls: dict[int, dict[int, dict]] = {}
    finish = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                if d.id is not None:  # a call's first delta: id, type, name, empty arguments
                    assert d.type == "function" and d.function.name and d.function.arguments == ""
                    calls.setdefault(c.index, {})[d.index] = {"name": d.function.name, "arguments": ""}
                else:
                    assert d.function.name is None and d.function.arguments
                    calls[c.index][d.index]["arguments"] += d.function.arguments
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    for choice in whole.choices:
        streamed = [calls[choice.index][i] for i in sorted(calls[choice.index])]
        assert streamed == [
            {"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls
        ]


def test_auto_parses_a_call_and_returns_a_malformed_one_as_content(servers):
    """The trained model calls get_weather under auto; cut short (a stop string, max_tokens), the call is not
    well formed, and its text comes back as content, streamed or not."""
    client = servers["trained"].client()
    r = client.chat.completions.create(model="trained", messages=ASK_PARIS, tools=TOOLS, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert check_calls(r.choices[0].message, n=1) == [("get_weather", json.loads(PARIS))]
    cut = GOOD[: GOOD.index('"unit"')].rstrip()  # content is stripped at its ends
    for kw in ({"stop": ['"unit']}, {"max_tokens": len(GOOD) // 20}):
        bad = client.chat.completions.create(model="trained", messages=ASK_PARIS, tools=TOOLS, temperature=0, **kw)
        choice = bad.choices[0]
        assert choice.message.tool_calls is None and GOOD.startswith(choice.message.content), choice
        assert choice.finish_reason == ("stop" if "stop" in kw else "length")
        if "stop" in kw:
            assert choice.message.content == cut
        chunks = client.chat.completions.create(
            model="trained", messages=ASK_PARIS, tools=TOOLS, temperature=0, stream=True, **kw
        )
        chunks = [c for c in chunks if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
        assert not any(c.choices[0].delta.tool_calls for c in chunks)
    # the loop's second turn: the answer after the tool's output (auto: the model decides to answer)
    r2 = client.chat.completions.create(model="trained", messages=AFTER_TOOL, tools=TOOLS, temperature=0)
    assert (r2.choices[0].message.content, r2.choices[0].finish_reason) == (SUNNY, "stop")


def test_constrained_and_free_requests_share_the_engine(servers):
    client = servers["random"].client()

    def ask(i: int):
        fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}} if i % 2 else None
        extra = {"response_format": fmt} if fmt else {}
        return client.chat.completions.create(model="random", messages=ASK_PARIS, seed=i, max_tokens=200, **extra)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(6)))
    for i, r in enumerate(results):
        if i % 2:
            assert jsonschema_rs.validator_for(PERSON).is_valid(json.loads(r.choices[0].message.content))
        else:
            assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


BAD_REQUESTS = [
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
        "response_format.json_schema.schema",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "a"}}}},
        "response_format.json_schema.schema",
    ),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!"}}},
        "response_format.json_schema.name",
    ),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
        "tools.0.function.parameters",
    ),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
    ({"messages": [*ASK_PARIS, {"role": "tool", "content": "sunny"}]}, "messages.1.tool_call_id"),
    ({"messages": [*ASK_PARIS, {"role": "assistant"}]}, "messages.1.content"),
    (
        {"messages": [*ASK_PARIS, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]},
        "messages.1.tool_calls.0.function",
    ),
]


def test_bad_schemas_tools_and_messages_are_400s_naming_the_field(servers):
    s = servers["random"]
    for extra, param in BAD_REQUESTS:
        body = {"model": "random", "messages": ASK_PARIS, "max_tokens": 4, **extra}
        r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.json())
    assert "Traceback" not in s.log.read_text()


def test_the_schema_describes_tools_and_response_format(servers):
    spec = httpx.get(f"{servers['random'].url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    req = schemas["ChatCompletionRequest"]["properties"]
    assert {"tools", "tool_choice", "parallel_tool_calls", "response_format"} <= set(req)
    assert (
        "schema" in schemas["JsonSchemaFormat"]["properties"] and "tool_call_id" in schemas["ToolMessage"]["required"]
    )
    assert "tool_calls" in schemas["ChatCompletionMessage"]["properties"]
    assert "tool_calls" in schemas["ChatCompletionChoice"]["properties"]["finish_reason"]["enum"]


# ---- without a server ------------------------------------------------------------------------------------------
def test_the_parser_streams_calls_and_holds_what_could_be_a_marker():
    enforced = ToolCallParser(frozenset({"get_weather"}), enforced=True)
    text = "Let me check. " + GOOD
    content, deltas = "", []
    for i in range(0, len(text), 3):  # three characters at a time: markers arrive split
        c, d = enforced.feed(text[i : i + 3])
        content, deltas = content + c, deltas + d
    c, d = enforced.finish()
    assert content + c == "Let me check. " and deltas[0].id and deltas[0].function.name == "get_weather"
    assert "".join(x.function.arguments for x in deltas + d) == PARIS
    auto = ToolCallParser(frozenset({"get_weather"}), enforced=False)
    for text, calls in ((GOOD, 1), (BAD, 0), (GOOD.replace("get_weather", "get_wether"), 0), (GOOD[:-5], 0)):
        p = ToolCallParser(auto.names, enforced=False)
        c1, d1 = p.feed(text)
        c2, d2 = p.finish()
        assert len(p.calls) == calls and (c1 + c2 == ("" if calls else text)), text
        assert not (d1 + d2) if not calls else p.tool_calls()[0].function.arguments == PARIS


def test_tools_render_as_transformers_renders_them(tmp_path):
    tok = train_tokenizer(["hello world"] * 10, vocab_size=300)
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages in (ASK_PARIS, AFTER_TOOL, [*AFTER_TOOL, {"role": "assistant", "content": SUNNY}, *ASK_OSLO]):
        for thinking in (None, True, False):
            theirs = hf.apply_chat_template(
                messages, tools=TOOLS, tokenize=False, add_generation_prompt=True, thinking=thinking
            )
            assert theirs == tok.apply_chat_template(messages, tools=TOOLS, thinking=thinking)
    assert render_chat(AFTER_TOOL, tools=TOOLS).endswith("sunny<｜tool▁output▁end｜>")  # V3.1: no new prompt
    with pytest.raises(Exception, match="no tool format"):
        tok.with_chat_template("r1_zero").apply_chat_template(ASK_PARIS, tools=TOOLS)
