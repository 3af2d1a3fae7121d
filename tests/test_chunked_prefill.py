"""Chunked prefill: prompts prefilled in chunks under a per-step token budget (ragged batches of several
prompts) decode exactly what whole-prompt prefill decodes (MLA, MTP, V3.2), and running streams keep getting
a token every step while a long prompt is prefilled."""

import pytest

from nanoseek.cli import main
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams

from helpers import CONFIGS, random_model, token_ids

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
PROMPTS = [list(range(10, 70)), [5, 17, 99], list(range(100, 137)), [7], list(range(3, 50, 2))]


@pytest.mark.parametrize("budget", [5, 13, 64])
def test_chunked_equals_whole_prompts(model_and_mtp, budget):
    model, mtp = model_and_mtp
    whole = token_ids(Engine(model, block_size=4, use_mtp=mtp, prefix_caching=False).generate(PROMPTS, GREEDY))
    for caching in (False, True):
        engine = Engine(model, block_size=4, use_mtp=mtp, prefix_caching=caching, max_num_batched_tokens=budget)
        params = [GREEDY, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, n=2), GREEDY, GREEDY, GREEDY]
        outs = token_ids(engine.generate(PROMPTS, params))
        assert outs[1] == whole[1] * 2
        assert [o for i, o in enumerate(outs) if i != 1] == [o for i, o in enumerate(whole) if i != 1]
        assert engine.cache.n_free == engine.cache.n_blocks and not any(engine.cache.blocks.refs)


def test_running_streams_keep_flowing_during_a_long_prefill():
    model = random_model(CONFIGS["v3"]).eval()
    engine = Engine(model, block_size=8, max_num_batched_tokens=32)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True), "short")
    engine.step()
    engine.add_request(list(range(200)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), "long")
    steps = 0
    while "long" not in (got := [e.request_id for e in engine.step()]):
        steps += 1
        assert got == ["short"]  # a token for the running stream every step
    # 200 prompt tokens at 31 a step (32 minus the one decode token): 7 steps, the last one samples
    assert steps == 6
    assert engine.prefilling == [] and len(engine.running) == 2


def test_unchunked_prefills_every_admitted_prompt_before_decoding():
    """Without a budget, a long prompt's whole prefill happens in the step that admits it (as before)."""
    model = random_model(CONFIGS["v3"]).eval()
    engine = Engine(model, block_size=8)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), "short")
    engine.step()
    engine.add_request(list(range(200)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), "long")
    assert sorted(e.request_id for e in engine.step()) == ["long", "short"]


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Engine(random_model(CONFIGS["v3"]).eval(), max_num_batched_tokens=0)


def test_a_chunk_mostly_padding_waits_for_the_next_step():
    """A ragged chunk pads every row to the first one's length: a prompt whose chunk would be under half of it
    waits a step rather than cost the forward its padding."""
    engine = Engine(random_model(CONFIGS["v3"]).eval(), block_size=8, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    for rid, n in (("long", 200), ("short", 20), ("tiny", 10)):
        engine.add_request(list(range(3, 3 + n)), params, rid)
    engine.step()
    done = {g[0].request_id: g[0].n_cached for g in engine.prefilling}
    assert done == {"long": 64, "short": 0, "tiny": 0}
    engine.step()
    engine.step()
    engine.step()  # long's last 8 tokens; beside them 8 of short's and of tiny's (rows are capped at the first's)
    assert {g[0].request_id: g[0].n_cached for g in engine.prefilling} == {"short": 8, "tiny": 8}
    engine.step()  # short's last 12 (63 budget left beside long's decode); tiny's last 2 would be mostly padding
    assert {g[0].request_id: g[0].n_cached for g in engine.prefilling} == {"tiny": 8}


def test_bench_prefill_reports_each_budget(capsys):
    argv = ["bench", "prefill", "--preset", "tiny", "--running", "2", "--arrivals", "2", "--prompt-len", "96"]
    assert main([*argv, "--budgets", "0", "32", "--rounds", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 streams running, 2 prompts of 96 tokens arrive" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["whole"], ["32"])]
    assert [r[0] for r in rows] == ["whole", "32"] and all(float(x) > 0 for r in rows for x in r[1:6])
    assert main(["bench", "prefill", "--preset", "tiny", "--budgets", "-1"]) == 2
