"""Prefix caching: a prompt whose leading full blocks are cached skips prefilling them and decodes exactly what
a cold engine decodes (MLA, MTP, V3.2's indexer keys); cached-token accounting; eviction and preemption under
pressure; every block's references return to zero; the n samples of a request share the prompt's blocks."""

import pytest
import torch

from nanoseek.engine.engine import Engine
from nanoseek.engine.prefix_cache import BlockPool, block_hashes
from nanoseek.engine.sampling import SamplingParams

from helpers import CONFIGS, random_model, token_ids

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SYSTEM = list(range(30, 70))  # a 40-token shared prefix
PROMPTS = [SYSTEM + [5, 17, 99], SYSTEM + [8], SYSTEM[:21], SYSTEM + list(range(100, 140)), [7, 8]]


def all_blocks_back(engine: Engine) -> None:
    blocks = engine.cache.blocks
    assert not engine.has_unfinished()
    assert engine.cache.n_free == engine.cache.n_blocks and not any(blocks.refs)
    assert len(blocks.free) + len(blocks.evictable) == engine.cache.n_blocks


def test_hits_decode_what_misses_decode(model_and_mtp):
    model, mtp = model_and_mtp
    cold = Engine(model, block_size=8, use_mtp=mtp, prefix_caching=False)
    want = token_ids(cold.generate(PROMPTS, GREEDY))
    assert cold.stats.cached_prompt_tokens == 0
    warm = Engine(model, block_size=8, use_mtp=mtp)
    first = warm.generate(PROMPTS, GREEDY)  # admitted together: no hits yet among them
    again = warm.generate(PROMPTS, GREEDY)  # every prompt's full blocks (and decoded blocks) are cached now
    assert token_ids(first) == want and token_ids(again) == want
    assert [o.num_cached_tokens for o in first] == [0] * len(PROMPTS)
    # Each prompt reuses its full blocks, short of its last token (always computed, for the first logits).
    assert [o.num_cached_tokens for o in again] == [40, 40, 16, 72, 0]
    assert warm.stats.cached_prompt_tokens == 168
    all_blocks_back(warm)


def test_a_shared_system_prompt_hits_across_requests():
    model = random_model(CONFIGS["v3"]).eval()
    engine = Engine(model, block_size=8)
    engine.generate([SYSTEM + [1, 2]], GREEDY)
    outs = engine.generate([SYSTEM + [3], SYSTEM + [4, 5, 6], SYSTEM[:33]], GREEDY)
    assert [o.num_cached_tokens for o in outs] == [40, 40, 32]
    cold = Engine(model, block_size=8, prefix_caching=False)
    assert token_ids(outs) == token_ids(cold.generate([SYSTEM + [3], SYSTEM + [4, 5, 6], SYSTEM[:33]], GREEDY))
    all_blocks_back(engine)


@pytest.mark.parametrize("use_mtp", [False, True])
def test_eviction_and_preemption_under_pressure_keep_outputs(use_mtp):
    """A cache of 24 blocks of 4 tokens for 8 prompts of 30 tokens + 24 generated: cached blocks are evicted
    (LRU) and running sequences preempted, and every output equals an ample cache's."""
    model = random_model(CONFIGS["v3"].replace(num_nextn_predict_layers=1)).eval()
    prompts = [SYSTEM[:10] + list(range(i * 20, i * 20 + 20)) for i in range(8)]
    want = token_ids(Engine(model, use_mtp=use_mtp, prefix_caching=False).generate(prompts, GREEDY))
    tight = Engine(model, block_size=4, cache_tokens=96, use_mtp=use_mtp)
    for _ in range(2):
        assert token_ids(tight.generate(prompts, GREEDY)) == want
        all_blocks_back(tight)
    assert tight.stats.preemptions > 0 and tight.stats.cached_prompt_tokens > 0


def test_n_samples_share_the_prompt_blocks():
    model = random_model(CONFIGS["v32_sparse"]).eval()
    engine = Engine(model, block_size=8)
    prompt = SYSTEM + [1, 2, 3]  # 43 tokens: 5 full blocks shared, the 6th copied
    engine.add_request(prompt, SamplingParams(max_tokens=20, temperature=0, n=4, ignore_eos=True), "r")
    engine.step()
    tables = [s.blocks for s in engine.running]
    assert len(tables) == 4 and all(t[:5] == tables[0][:5] for t in tables)
    assert len({t[5] for t in tables}) == 4  # the partial block is each sample's own
    assert all(engine.cache.blocks.refs[b] == 4 for b in tables[0][:5])
    assert engine.stats.prompt_tokens == len(prompt)  # prefilled once
    while engine.has_unfinished():
        engine.step()
    out = engine.pop_output("r")
    alone = Engine(model, prefix_caching=False).generate([prompt], SamplingParams(max_tokens=20, temperature=0))
    assert [c.token_ids for c in out.outputs] == [alone[0].outputs[0].token_ids] * 4
    all_blocks_back(engine)


def test_abort_releases_shared_blocks():
    model = random_model(CONFIGS["v3"]).eval()
    engine = Engine(model, block_size=8, max_num_batched_tokens=16)
    engine.generate([SYSTEM + [1]], GREEDY)
    params = SamplingParams(max_tokens=50, temperature=0, n=3, ignore_eos=True)
    engine.add_request(SYSTEM + [9, 9], params, "decoding")
    engine.add_request(list(range(100, 200)), params, "prefilling")
    engine.step()
    assert engine.prefilling and engine.running
    engine.abort("prefilling")
    engine.step()
    engine.abort("decoding")
    all_blocks_back(engine)
    out = engine.generate([SYSTEM + [9, 9]], GREEDY)[0]
    assert out.num_cached_tokens == 40


def test_new_weights_forget_the_cache():
    """An RL policy after an optimizer step: the latents cached with the old weights are never reused."""
    model = random_model(CONFIGS["v3"]).eval()
    engine = Engine(model, block_size=8)
    engine.generate([SYSTEM + [1]], GREEDY)
    with torch.no_grad():
        model.layers[0].self_attn.kv_a_proj_with_mqa.weight.mul_(1.5)
    out = engine.generate([SYSTEM + [1]], GREEDY)[0]
    assert out.num_cached_tokens == 0
    assert (
        out.outputs[0].token_ids
        == Engine(model, prefix_caching=False).generate([SYSTEM + [1]], GREEDY)[0].outputs[0].token_ids
    )


def test_block_pool_lru_and_keys():
    keys = block_hashes(list(range(12)), 4, 0, 3)
    assert keys[:2] == block_hashes(list(range(8)) + [99], 4, 0, 2)  # a key covers its prefix only
    assert block_hashes(list(range(12)), 4, 1, 3, keys[0]) == keys[1:]  # chained from the parent
    assert block_hashes([9] + list(range(1, 12)), 4, 0, 3)[2] != keys[2]  # ... and everything before it
    pool = BlockPool(3)
    a, b = [pool.take(), pool.take()], [pool.take()]
    for block, key in zip(a + b, keys):
        pool.register(block, key)
    pool.release(list(a))
    pool.release(list(b))
    assert pool.n_free == 3 and list(pool.evictable) == [a[1], a[0], b[0]]  # a's tail is evicted first
    assert pool.match(keys[:2]) == a and pool.n_free == 1
    assert pool.take() == b[0] and keys[2] not in pool.by_key  # evicted, its key forgotten
