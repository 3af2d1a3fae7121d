"""The inference engine: parity with transformers' generate, batching invariance, seeds, the paged
cache under pressure, n samples, streaming, stop rules and bad requests."""

import pytest
import torch
import transformers

from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.checkpoint.tokenizer import train_tokenizer
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams

from helpers import CONFIGS, random_model

GREEDY = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 99, 3], [42] * 9, list(range(20, 45)), [7]]


@pytest.fixture(scope="module")
def v3_model():
    # with one MTP module, unused unless an engine is built with use_mtp=True
    return random_model(CONFIGS["v3"].replace(num_nextn_predict_layers=1)).eval()


@pytest.fixture(scope="module")
def plain(v3_model):
    """Greedy tokens of PROMPTS, decoded together: the reference several tests compare against."""
    return [o.outputs[0].token_ids for o in Engine(v3_model).generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("name", ["v3", "v2_greedy"])
def test_greedy_equals_transformers_generate(name, tmp_path):
    model = random_model(CONFIGS[name]).eval()
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    outs = Engine(model, max_batch_size=8).generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"


def test_batch_equals_alone_greedy_and_seeded(v3_model):
    sampled = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    params = [GREEDY, sampled, GREEDY, sampled]
    batched = Engine(v3_model).generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, batched):
        alone = Engine(v3_model).generate([prompt], p)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
    # the seed matters: another seed gives other tokens
    other = Engine(v3_model).generate([PROMPTS[1]], SamplingParams(**{**sampled.__dict__, "seed": 7}))[0]
    assert other.outputs[0].token_ids != batched[1].outputs[0].token_ids


def test_requests_join_between_decode_steps(v3_model, plain):
    engine = Engine(v3_model)
    first = engine.add_request(PROMPTS[0], GREEDY)
    for _ in range(10):
        engine.step()
    second = engine.add_request(PROMPTS[2], GREEDY)  # joins a running batch
    while engine.has_unfinished():
        engine.step()
    assert engine.pop_output(first).outputs[0].token_ids == plain[0]
    assert engine.pop_output(second).outputs[0].token_ids == plain[2]


LONG = [list(range(i, i + 20)) for i in range(8)]


@pytest.fixture(scope="module")
def ample(v3_model):
    return Engine(v3_model).generate(LONG, GREEDY)


@pytest.mark.parametrize("use_mtp", [False, True])
def test_cache_exhaustion_preempts_and_outputs_are_unchanged(v3_model, ample, use_mtp):
    prompts = LONG
    tight = Engine(v3_model, block_size=4, cache_tokens=200, use_mtp=use_mtp)  # 8 requests x 84 tokens need 672
    outs = tight.generate(prompts, GREEDY)
    assert tight.stats.preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ample]
    assert tight.cache.n_free == tight.cache.n_blocks  # every block came back


def test_n_samples_share_one_prefill(v3_model):
    engine = Engine(v3_model)
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=5, n=4, ignore_eos=True)
    out = engine.generate([PROMPTS[2]], params)[0]
    assert engine.stats.prompt_tokens == len(PROMPTS[2])  # prefilled once
    samples = [c.token_ids for c in out.outputs]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(s) for s in samples}) > 1  # different samples
    again = Engine(v3_model).generate([PROMPTS[2]], params)[0]
    assert [c.token_ids for c in again.outputs] == samples  # and reproducible
    # n greedy samples are all the greedy continuation
    greedy = Engine(v3_model).generate(
        [PROMPTS[2]], SamplingParams(max_tokens=20, temperature=0, n=3, ignore_eos=True)
    )[0]
    assert len({tuple(c.token_ids) for c in greedy.outputs}) == 1


@pytest.mark.parametrize("use_mtp", [False, True])
def test_logprobs_are_those_of_the_full_forward(v3_model, use_mtp):
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, ignore_eos=True)
    engine = Engine(v3_model, use_mtp=use_mtp)
    events = list(engine.stream(PROMPTS[0], params))
    ids = [e.token_id for e in events]
    seq = torch.tensor([PROMPTS[0] + ids])
    with torch.no_grad():
        logp = torch.log_softmax(v3_model(seq)[0], -1)[len(PROMPTS[0]) - 1 : -1]  # (8, V): the step's distributions
    assert [e.logprob for e in events] == pytest.approx([logp[i, t].item() for i, t in enumerate(ids)], abs=1e-4)
    for e, row in zip(events, logp):
        values, top = row.topk(3)
        assert [t for t, _ in e.top_logprobs] == top.tolist()
        assert [v for _, v in e.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
    out = Engine(v3_model, use_mtp=use_mtp).generate([PROMPTS[0]], params)[0].outputs[0]
    assert out.token_ids == ids and out.logprobs == pytest.approx([e.logprob for e in events], abs=1e-6)


def test_stop_token_ids_and_eos(v3_model, plain):
    full = plain[0]
    stop_at = full[5]
    out = (
        Engine(v3_model)
        .generate(
            [PROMPTS[0]], SamplingParams(max_tokens=64, temperature=0, stop_token_ids=[stop_at], ignore_eos=True)
        )[0]
        .outputs[0]
    )
    assert out.finish_reason == "stop" and out.token_ids == full[: full.index(stop_at) + 1]
    engine = Engine(v3_model)
    engine.eos_id = full[3]
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=64, temperature=0))[0].outputs[0]
    assert (
        out.finish_reason == "stop" and out.token_ids[-1] == full[3] and len(out.token_ids) == full.index(full[3]) + 1
    )


def test_stop_strings_cut_the_text_at_the_earliest_match_and_end_the_sample():
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog, 0123456789."] * 50, vocab_size=300)
    model = random_model(CONFIGS["v3"].replace(vocab_size=max(300, tok.vocab_size))).eval()
    engine = Engine(model, tok)
    params = dict(max_tokens=40, temperature=0, ignore_eos=True)
    full = engine.generate(["the quick"], SamplingParams(**params))[0].outputs[0]
    assert len(full.text) > 20
    stop, never = full.text[12:15], "\x00never\x00"  # a stop string that may span tokens, one that cannot match
    later = full.text[16:18]
    got = engine.generate(["the quick"], SamplingParams(**params, stop=[later, never, stop]))[0].outputs[0]
    first = min(i for i in (full.text.find(stop), full.text.find(later)) if i >= 0)
    assert got.finish_reason == "stop" and got.text == full.text[:first]
    # generation ends on the token that completes the match: the shortest prefix whose text holds it
    k = next(
        k
        for k in range(1, len(full.token_ids) + 1)
        if any(s in tok.decode(full.token_ids[:k], skip_special_tokens=True) for s in (stop, later))
    )
    assert got.token_ids == full.token_ids[:k]


def test_stream_yields_the_generated_tokens(v3_model):
    engine = Engine(v3_model)
    events = list(engine.stream(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
    ref = Engine(v3_model).generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [e.token_id for e in events] == ref[0].outputs[0].token_ids
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])


def test_abort_frees_the_slot(v3_model):
    engine = Engine(v3_model)
    rid = engine.add_request(PROMPTS[2], GREEDY)
    engine.step(), engine.step()
    assert engine.cache.n_free < engine.cache.n_blocks
    engine.abort(rid)
    assert not engine.has_unfinished() and engine.cache.n_free == engine.cache.n_blocks


@pytest.mark.parametrize("name", ["v3", "v2_greedy"])
def test_decode_moe_path_equals_the_sorted_one(name):
    """A decode step's MoE (no grad, few tokens: each token's experts called directly) computes what the
    sorted, grouped path of training computes, within fp32 rounding (1e-6 of outputs of size ~1)."""
    moe = random_model(CONFIGS[name]).eval().layers[-1].mlp
    x = torch.randn(1, 3, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(0))
    for n in (1, 2, 3):  # up to n_experts / top_k tokens take the direct path
        expected = moe(x[:, :n]).detach()  # grad enabled: the sorted path
        with torch.no_grad():
            torch.testing.assert_close(moe(x[:, :n]), expected, rtol=0, atol=1e-6)


def test_context_limit_finishes_with_length(v3_model):
    engine = Engine(v3_model)
    engine.max_len = 30
    out = engine.generate([list(range(25))], GREEDY)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


@pytest.mark.parametrize(
    "prompt,params,match",
    [
        ([], GREEDY, "empty"),
        ([1] * 300, GREEDY, "context holds 256"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
        ([1, 2], SamplingParams(temperature=-0.5), "temperature"),
        ([1, 2], SamplingParams(top_p=0.0), "top_p"),
        ([1, 2], SamplingParams(top_p=1.5), "top_p"),
        ([1, 99999], GREEDY, "token ids"),
    ],
)
def test_bad_request_fails_alone(v3_model, plain, prompt, params, match):
    engine = Engine(v3_model)
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, params)
    short = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = engine.generate([PROMPTS[0], prompt, PROMPTS[1]], [short, params, short])
    assert match in outs[1].error and not outs[1].outputs
    assert outs[0].outputs[0].token_ids == plain[0][:16]
    assert outs[2].outputs[0].token_ids == plain[1][:16]
