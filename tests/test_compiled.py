"""The compiled decode step: the same tokens as the eager step, and no recompiles as the batch changes.

Compiling costs tens of seconds on 2 cores, so each configuration compiles once (module-scoped engines) and
every test here reuses those graphs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.compiled import compiled_graphs

from helpers import CONFIGS, random_model

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (int(L),), generator=g).tolist() for L in torch.randint(4, 20, (n,), generator=g)]


@pytest.fixture(scope="module", params=["v3", "v2_greedy"])
def engines(request):
    model = random_model(CONFIGS[request.param])
    return Engine(model, max_batch_size=8, compile=False), Engine(model, max_batch_size=8, compile=True)


def test_compiled_greedy_equals_eager(engines):
    """64 greedy tokens at batch 1 and batch 5 (the few-token and the sorted expert paths, batch 1's own
    graph): token for token the eager engine's output."""
    eager, compiled = engines
    assert compiled.compiled and not eager.compiled
    for batch in (prompts(1), prompts(5, seed=1)):
        want = [o.outputs[0].token_ids for o in eager.generate(batch, GREEDY)]
        got = [o.outputs[0].token_ids for o in compiled.generate(batch, GREEDY)]
        assert got == want
    assert compiled.compile_seconds > 0


def test_no_recompiles_as_the_batch_changes(engines):
    """After one warm-up run per graph variant, 100 decode steps with requests joining and leaving (batch
    sizes 1 to 8, contexts growing) compile nothing new."""
    _, compiled = engines
    for n in (1, 3, 8):  # batch 1, few tokens per expert, many
        compiled.generate(prompts(n, seed=n), SamplingParams(max_tokens=3, temperature=0))
    graphs, seconds = compiled_graphs(), compiled.compile_seconds
    lengths = torch.Generator().manual_seed(7)
    steps = 0
    while steps < 100:
        if len(compiled.running) + len(compiled.waiting) < 8:
            max_tokens = int(torch.randint(2, 30, (1,), generator=lengths))
            compiled.add_request(prompts(1, seed=steps)[0], SamplingParams(max_tokens=max_tokens, temperature=0))
        compiled.step()
        steps += 1
    while compiled.has_unfinished():
        compiled.step()
    assert compiled_graphs() == graphs
    assert compiled.compile_seconds == seconds


def test_compiled_speculation_equals_plain_greedy():
    """MTP verify (two tokens a row) and draft steps through the compiled blocks: greedy output is plain
    greedy decoding's, token for token."""
    model = random_model(dataclasses.replace(CONFIGS["v3"], num_nextn_predict_layers=1))
    plain = Engine(model, max_batch_size=4, compile=False)
    speculative = Engine(model, max_batch_size=4, use_mtp=True, compile=True)
    for batch in (prompts(1, seed=3), prompts(3, seed=4)):
        want = [o.outputs[0].token_ids for o in plain.generate(batch, GREEDY)]
        assert [o.outputs[0].token_ids for o in speculative.generate(batch, GREEDY)] == want
    assert speculative.stats.draft_tokens > 0


def test_compiled_int8_equals_eager_int8():
    """The quantized experts run as custom ops inside the compiled blocks (no graph break): batch 1 takes the
    few-token op, batch 5 the sorted one; the tokens are the eager int8 engine's."""
    model = random_model(CONFIGS["v3"])
    eager = Engine(model, max_batch_size=8, weights="int8", compile=False)
    compiled = Engine(model, max_batch_size=8, weights="int8", compile=True)
    for batch in (prompts(1, seed=5), prompts(5, seed=6)):
        want = [o.outputs[0].token_ids for o in eager.generate(batch, GREEDY)]
        assert [o.outputs[0].token_ids for o in compiled.generate(batch, GREEDY)] == want
