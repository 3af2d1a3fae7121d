"""The thinking switch and the two reasoning fields, on the server processes of conftest.py (the model that
reasons, tests/helpers.py) through the official client: `reasoning_content` and `reasoning` in messages and
stream deltas; thinking on and off in each spelling (`thinking`, `chat_template_kwargs`, `reasoning_effort`),
checked on the rendered prompt (its token count) and on the answer; which spelling wins; r1_zero, which cannot
stop thinking; bad values. Without a server: the templates' `thinking` variable as transformers renders it, and
the reasoning split when the prompt opened or closed `<think>`."""

from __future__ import annotations

import httpx
import openai
import pytest
import transformers
from test_server import ask

from nanoseek.checkpoint.tokenizer import ASSISTANT, THINK_CLOSE, THINK_OPEN, Tokenizer, render_chat
from nanoseek.engine.text import ReasoningSplitter, split_reasoning

from helpers import R1_SYSTEM

Q, REASONING, ANSWER = "What is 2+3?", "2 plus 3 makes 5.", "5"
ON = [
    {"extra_body": {"thinking": {"type": "enabled"}}},
    {"extra_body": {"chat_template_kwargs": {"thinking": True}}},
    {"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}},
    {"reasoning_effort": "high"},
    {"reasoning_effort": "minimal"},
]
OFF = [
    {"extra_body": {"thinking": {"type": "disabled"}}},
    {"extra_body": {"chat_template_kwargs": {"thinking": False}}},
    {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},
    {"reasoning_effort": "none"},
]
# (spellings together, thinking on?): chat_template_kwargs.thinking > .enable_thinking > thinking > reasoning_effort
PRECEDENCE = [
    ({"chat_template_kwargs": {"thinking": False}, "thinking": {"type": "enabled"}, "reasoning_effort": "high"}, False),
    ({"chat_template_kwargs": {"thinking": True, "enable_thinking": False}}, True),
    ({"chat_template_kwargs": {"enable_thinking": False}, "thinking": {"type": "enabled"}}, False),
    ({"thinking": {"type": "disabled"}, "reasoning_effort": "high"}, False),
    ({"thinking": {"type": "enabled"}, "reasoning_effort": "none"}, True),
]


# ---- without a server ------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["deepseek", "r1_zero"])
def test_the_thinking_variable_renders_as_transformers_renders_it(tok, tmp_path, template):
    tok.with_chat_template(template).save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    convo = [{"role": "system", "content": "Be brief."}, *ask(Q), {"role": "assistant", "content": "<think>a</think>5"}]
    for messages in (ask(Q), convo):
        for thinking in (None, True, False):
            for gen in (True, False):
                kw = {} if thinking is None else {"thinking": thinking}
                if template == "r1_zero" and thinking is False:  # it always thinks: both refuse
                    with pytest.raises(Exception, match="always thinks"):
                        hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw)
                    with pytest.raises(Exception, match="always thinks"):
                        ours.apply_chat_template(messages, add_generation_prompt=gen, thinking=thinking)
                    continue
                theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw)
                assert theirs == ours.apply_chat_template(messages, add_generation_prompt=gen, thinking=thinking)
    default = render_chat(ask(Q), template)
    assert render_chat(ask(Q), template, thinking=None) == default  # unset: unchanged
    if template == "deepseek":
        assert default.endswith(ASSISTANT)
        assert render_chat(ask(Q), template, thinking=True) == default + THINK_OPEN
        assert render_chat(ask(Q), template, thinking=False) == default + THINK_CLOSE
    else:
        assert render_chat(ask(Q), template, thinking=True) == default  # r1_zero thinks anyway


@pytest.mark.parametrize(
    "text,thinking,expect",
    [
        ("2 plus 3 makes 5.</think>5", True, ("2 plus 3 makes 5.", "5")),
        ("cut inside the reasoning", True, ("cut inside the reasoning", "")),
        ("</think>5", True, ("", "5")),
        ("<think>a</think>5", False, (None, "<think>a</think>5")),  # thinking off: all of it is content
        ("5", False, (None, "5")),
    ],
)
def test_reasoning_split_after_a_prompt_that_opened_or_closed_think(text, thinking, expect):
    assert split_reasoning(text, "deepseek", thinking) == expect
    for cut in range(len(text) + 1):
        s = ReasoningSplitter("deepseek", thinking)
        parts = [s.feed(text[:cut]), s.feed(text[cut:]), s.finish()]
        got = ("".join(r for r, _ in parts) if s.has_reasoning else None, "".join(c for _, c in parts))
        assert got == expect


# ---- through the server ----------------------------------------------------------------------------------
def _stream(client, **kw) -> tuple[str | None, str | None, str, list]:
    """(reasoning_content, reasoning, content, deltas) of a streamed chat completion (None: no delta had it)."""
    deltas = [c.choices[0].delta for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    joined = {}
    for name in ("reasoning_content", "reasoning", "content"):
        got = [getattr(d, name, None) for d in deltas if getattr(d, name, None)]
        joined[name] = "".join(got) if got else None
    return joined["reasoning_content"], joined["reasoning"], joined["content"] or "", deltas


@pytest.mark.slow
def test_both_reasoning_fields_in_messages_and_stream_deltas(server):
    client = server.client()
    msg = client.chat.completions.create(model="think", messages=ask(Q), temperature=0).choices[0].message
    assert (msg.reasoning_content, msg.reasoning, msg.content) == (REASONING, REASONING, ANSWER)
    rc, r, content, deltas = _stream(client, model="think", messages=ask(Q), temperature=0)
    assert (rc, r, content) == (REASONING, REASONING, ANSWER)
    for d in deltas:  # every delta that carries reasoning carries it under both names
        assert getattr(d, "reasoning_content", None) == getattr(d, "reasoning", None)
    raw = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "think", "messages": ask(Q)}, timeout=30)
    assert {"reasoning_content", "reasoning"} <= set(raw.json()["choices"][0]["message"])


@pytest.mark.slow
def test_each_spelling_switches_thinking_on_and_off(server, tok):
    client = server.client()
    kw = dict(model="think", messages=ask(Q), temperature=0, max_tokens=20)
    n_prompt = {t: len(tok.encode(render_chat(ask(Q), "deepseek", thinking=t))) for t in (None, True, False)}
    assert n_prompt[True] == n_prompt[False] == n_prompt[None] + 1  # `<think>` or `</think>` opens the turn
    off_text = client.completions.create(  # what the model writes after a prompt that closed `<think>`
        model="think", prompt=render_chat(ask(Q), "deepseek", thinking=False), max_tokens=20, temperature=0
    )
    off_text = off_text.choices[0].text.strip()
    for spelling in ON:
        r = client.chat.completions.create(**kw, **spelling)
        msg = r.choices[0].message
        assert r.usage.prompt_tokens == n_prompt[True], spelling
        assert (msg.reasoning_content, msg.reasoning, msg.content) == (REASONING, REASONING, ANSWER), spelling
        assert r.usage.completion_tokens_details.reasoning_tokens == len(tok.encode(f"{REASONING}</think>"))
    for spelling in OFF:
        r = client.chat.completions.create(**kw, **spelling)
        msg = r.choices[0].message
        assert r.usage.prompt_tokens == n_prompt[False], spelling
        assert (msg.reasoning_content, msg.reasoning) == (None, None), spelling
        assert msg.content == off_text and r.usage.completion_tokens_details.reasoning_tokens == 0
    rc, r, content, _ = _stream(client, **kw, **OFF[0])
    assert (rc, r, content) == (None, None, off_text)  # no delta carries reasoning
    rc, r, content, _ = _stream(client, **kw, **ON[1])
    assert (rc, r, content) == (REASONING, REASONING, ANSWER)
    for body, on in PRECEDENCE:
        r = client.chat.completions.create(**kw, extra_body=body)
        assert r.usage.prompt_tokens == n_prompt[on] and (r.choices[0].message.reasoning is None) == (not on), body


@pytest.mark.slow
def test_r1_zero_always_thinks_and_refuses_thinking_off(servers):
    client = servers["zero"].client()
    msgs = [{"role": "system", "content": R1_SYSTEM}, *ask(Q)]
    plain = client.chat.completions.create(model="zero", messages=msgs, temperature=0)
    for spelling in ON[:2]:
        r = client.chat.completions.create(model="zero", messages=msgs, temperature=0, **spelling)
        assert r.usage.prompt_tokens == plain.usage.prompt_tokens  # the template ignores it: it thinks anyway
        assert (r.choices[0].message.reasoning, r.choices[0].message.content) == (REASONING, "5")
    params = ["thinking.type", "chat_template_kwargs.thinking", "chat_template_kwargs.enable_thinking"]
    for spelling, param in zip(OFF, [*params, "reasoning_effort"]):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="zero", messages=msgs, **spelling)
        assert e.value.body["param"] == param and "always thinks" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="zero", input=Q, reasoning={"effort": "none"})
    assert e.value.body["param"] == "reasoning.effort"


BAD_THINKING = [
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"reasoning_effort": 5}, "reasoning_effort"),
    ({"thinking": {"type": "on"}}, "thinking.type"),
    ({"thinking": {}}, "thinking.type"),
    ({"thinking": "enabled"}, "thinking"),
    ({"thinking": True}, "thinking"),
    ({"chat_template_kwargs": {"thinking": "yes"}}, "chat_template_kwargs.thinking"),
    ({"chat_template_kwargs": {"enable_thinking": 1}}, "chat_template_kwargs.enable_thinking"),
    ({"chat_template_kwargs": ["thinking"]}, "chat_template_kwargs"),
]


@pytest.mark.slow
def test_bad_thinking_values_are_400s_naming_the_field(server):
    before = server.metrics()["nanoseek_generation_tokens_total"]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for extra, param in BAD_THINKING:
            r = http.post("/v1/chat/completions", json={"model": "think", "messages": ask(Q), **extra})
            err = r.json()["error"]
            assert r.status_code == 400 and (err["param"], err["type"]) == (param, "invalid_request_error"), extra
        r = http.post("/v1/responses", json={"model": "think", "input": Q, "reasoning": {"effort": "lots"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning.effort"
    assert server.metrics()["nanoseek_generation_tokens_total"] == before  # nothing ran
    # unknown template variables are accepted (no template here reads them), as vLLM passes them on
    r = server.client().chat.completions.create(
        model="think", messages=ask(Q), temperature=0, extra_body={"chat_template_kwargs": {"tools_in_user": 1}}
    )
    assert r.choices[0].message.content == ANSWER
