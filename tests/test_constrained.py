"""Grammar-constrained decoding in the engine (nanoseek/engine/constrain.py): a random-weight model's output
parses and validates against its JSON schema for every seed, finishes when the grammar does, shares batches
with free requests (whose tokens do not change), and stays valid and seeded under MTP speculation and
preemption; the sampler's per-row masks; DeepSeek's tool-call grammar; bad schemas are refused."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest
import torch

from nanoseek.checkpoint.tokenizer import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
    train_tokenizer,
)
from nanoseek.engine.constrain import ConstraintError, grammars
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import RowParams, SamplingParams, verify_rows
from nanoseek.engine.text import split_reasoning

from helpers import CONFIGS, random_model

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = [
    json.dumps({"name": f"user{i}", "age": i % 90, "role": ["admin", "user"][i % 2], "tags": ["a", "bc"][: i % 3]})
    for i in range(300)
] + ["What is the weather in Paris? get_weather city unit celsius"] * 20
TOK = train_tokenizer(CORPUS, vocab_size=512)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "home"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
NOARGS = {"type": "object", "properties": {}, "additionalProperties": False}
PROMPT = TOK.encode("Give me JSON:")


@pytest.fixture(scope="module")
def model():
    """Random weights (an MTP module included), a vocabulary the size of the tokenizer's, a long context."""
    cfg = CONFIGS["v3"].replace(
        vocab_size=512,
        num_nextn_predict_layers=1,
        max_position_embeddings=2048,
        bos_token_id=TOK.bos_id,
        eos_token_id=TOK.eos_id,
        pad_token_id=TOK.pad_id,
    )
    return random_model(cfg).eval()


@pytest.fixture(scope="module")
def g():
    return grammars(TOK, 512)


def sampled(seed: int, constraint=None, max_tokens: int = 160, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, seed=seed, constraint=constraint, **kw)


def valid(schema: dict, completion) -> bool:
    assert completion.finish_reason == "stop", (completion.finish_reason, completion.text)
    return jsonschema_rs.validator_for(schema).is_valid(json.loads(completion.text))


@pytest.mark.parametrize("mtp", [False, True])
def test_schema_output_validates_for_20_seeds(model, g, mtp):
    engine = Engine(model, TOK, use_mtp=mtp)
    outs = engine.generate([PROMPT] * 20, [sampled(s, g.json(PERSON)) for s in range(20)])
    assert all(valid(PERSON, o.outputs[0]) for o in outs)
    # the grammar ended each sequence at its closing brace: no EOS spent, no text after it
    assert all(o.outputs[0].text.endswith("}") and TOK.eos_id not in o.outputs[0].token_ids for o in outs)
    if mtp:
        assert engine.stats.acceptance_rate > 0.3  # drafts are masked too: forced tokens are accepted


def test_json_object_output_parses_for_20_seeds(model, g):
    """Any object: nothing bounds its size, so the budget is large; every seed still finishes."""
    outs = Engine(model, TOK).generate([PROMPT] * 20, [sampled(s, g.json(None), 1024) for s in range(20)])
    assert all(valid({"type": "object"}, o.outputs[0]) for o in outs)


def test_constrained_and_free_rows_share_a_batch(model, g):
    """Free rows get exactly the tokens they get alone; constrained ones validate and keep their seeds."""
    free = [sampled(s, max_tokens=24, ignore_eos=True) for s in range(3)]
    constrained = [sampled(s, g.json(PERSON)) for s in range(3)]
    engine = Engine(model, TOK)
    mixed = engine.generate([PROMPT] * 6, [p for pair in zip(free, constrained) for p in pair])
    for i in range(3):
        alone_free = Engine(model, TOK).generate([PROMPT], free[i])[0].outputs[0]
        alone_json = Engine(model, TOK).generate([PROMPT], constrained[i])[0].outputs[0]
        assert mixed[2 * i].outputs[0].token_ids == alone_free.token_ids
        assert mixed[2 * i + 1].outputs[0].token_ids == alone_json.token_ids and valid(PERSON, alone_json)


def test_greedy_mtp_equals_plain_under_a_grammar(model, g):
    params = [SamplingParams(max_tokens=160, temperature=0, constraint=g.json(PERSON)) for _ in range(2)]
    plain = Engine(model, TOK).generate([PROMPT, TOK.encode("Another:")], params)
    spec = Engine(model, TOK, use_mtp=True).generate([PROMPT, TOK.encode("Another:")], params)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert all(valid(PERSON, o.outputs[0]) for o in plain)


@pytest.mark.parametrize("mtp", [False, True])
def test_preemption_keeps_the_grammar_state(model, g, mtp):
    """A cache too small for the batch: sequences are preempted and recomputed; outputs equal the roomy run
    (with MTP, greedy ones: a recomputed sequence drafts afresh, so sampled draws differ, validly)."""
    params = [sampled(s, g.json(PERSON), temperature=0 if mtp and s % 2 else 1.0) for s in range(6)]
    prompts = [TOK.encode(f"Give me JSON {s}:") for s in range(6)]
    roomy = Engine(model, TOK, use_mtp=mtp).generate(prompts, params)
    tight = Engine(model, TOK, use_mtp=mtp, block_size=4, cache_tokens=200)
    outs = tight.generate(prompts, params)
    assert tight.stats.preemptions > 0
    same = [i for i in range(6) if not mtp or i % 2]
    assert [outs[i].outputs[0].token_ids for i in same] == [roomy[i].outputs[0].token_ids for i in same]
    assert all(valid(PERSON, o.outputs[0]) for o in outs)


def test_max_tokens_cut_is_length(model, g):
    out = Engine(model, TOK).generate([PROMPT], sampled(0, g.json(PERSON), max_tokens=5))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


@pytest.mark.parametrize("template", ["deepseek", "r1_zero"])
def test_reasoning_first_then_the_grammar(model, g, template):
    """`starting_after(</think>)`: free text (never EOS) until `</think>`, then the grammar; r1_zero's JSON sits
    inside <answer> … </answer> (as server/structured.py asks), and the answer split off is the JSON."""
    close = TOK.token_to_id("</think>")
    wrap = ([" ", "<answer>", " "], [" ", "</answer>"]) if template == "r1_zero" else ([], [])
    c = g.json(PERSON, wrap).starting_after(close)
    prompt = TOK.encode("Think:") + [TOK.token_to_id("<think>")]
    with torch.no_grad():  # push the model towards </think> so that it comes soon
        bias = model.lm_head.weight[close].clone()
        model.lm_head.weight[close] += 3.0 * model.lm_head.weight.norm(dim=1).mean() / bias.norm() * bias
    try:
        outs = Engine(model, TOK).generate([prompt] * 5, [sampled(s, c, 600) for s in range(5)])
    finally:
        with torch.no_grad():
            model.lm_head.weight[close] = bias
    for o in outs:
        ids = o.outputs[0].token_ids
        assert close in ids and TOK.eos_id not in ids[: ids.index(close)]
        assert o.outputs[0].finish_reason == "stop"
        _, answer = split_reasoning(o.outputs[0].text, template, thinking=True)
        assert jsonschema_rs.validator_for(PERSON).is_valid(json.loads(answer)), o.outputs[0].text


def test_tool_call_grammar(model, g):
    c = g.tool_calls({"get_weather": WEATHER, "noop": NOARGS}, max_calls=2)
    outs = Engine(model, TOK).generate([PROMPT] * 10, [sampled(s, c, 300) for s in range(10)])
    for o in outs:
        text = o.outputs[0].text
        assert (
            o.outputs[0].finish_reason == "stop" and text.startswith(TOOL_CALLS_BEGIN) and text.endswith(TOOL_CALLS_END)
        )
        calls = text[len(TOOL_CALLS_BEGIN) : -len(TOOL_CALLS_END)].split(TOOL_CALL_END)[:-1]
        assert 1 <= len(calls) <= 2
        for call in calls:
            name, args = call.removeprefix(TOOL_CALL_BEGIN).split(TOOL_SEP)
            assert jsonschema_rs.validator_for(WEATHER if name == "get_weather" else NOARGS).is_valid(
                json.loads(args)
            ), call
    one = g.tool_calls({"get_weather": WEATHER}, max_calls=1)
    text = Engine(model, TOK).generate([PROMPT], sampled(0, one, 300))[0].outputs[0].text
    assert text.count(TOOL_CALL_BEGIN) == 1 and f"{TOOL_CALL_BEGIN}get_weather{TOOL_SEP}" in text


def test_masks_in_the_sampler():
    """Greedy, sampled and top-p rows only ever take allowed tokens; a draft the grammar forbids is rejected."""
    V = 16
    logits = torch.randn(3, V)
    allowed = torch.zeros(3, V, dtype=torch.bool)
    allowed[:, [3, 7]] = True
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(top_p=0.5)]
    rows = RowParams.of(params)
    rows.allowed = allowed
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    for _ in range(20):
        assert set(rows.sample(logits, gens).tolist()) <= {3, 7}
    assert (rows.probs(logits)[~allowed] == 0).all()
    # verification: drafts 5 (forbidden) are never kept, and the token taken instead is allowed
    drafts = torch.tensor([5, 5, 5])
    first, keep, _ = verify_rows(rows, torch.randn(3, 2, V), drafts, [None] * 3, gens)
    assert not keep.any() and set(first.tolist()) <= {3, 7}


def test_bad_schemas_are_refused(g):
    for bad in (
        {"type": 5},
        {"type": "object", "properties": {"a": {"type": "strin"}}},
        {"type": "string", "pattern": "("},
        {"$ref": "#/nope"},
        {"type": "integer", "minimum": 5, "maximum": 1},
    ):
        with pytest.raises(ConstraintError):
            g.json(bad)
    with pytest.raises(ConstraintError):
        g.tool_calls({"f": {"type": "nope"}})
    assert g.json(PERSON) is g.json(PERSON)  # compiled once, cached


def test_a_constraint_for_another_vocabulary_is_refused(model):
    other = grammars(TOK, 640).json(PERSON)
    with pytest.raises(ValueError, match="640"):
        Engine(model, TOK).add_request(PROMPT, sampled(0, other))
