"""MTP self-speculative decoding: the same greedy tokens as plain decoding (random and trained models),
speculative sampling keeps the target distribution exactly, acceptance is reported, seeds still hold."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek import Transformer
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams, verify_draft

from helpers import CONFIGS, random_model

MTP_CONFIG = CONFIGS["v3"].replace(num_nextn_predict_layers=1)
GREEDY = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 99, 3], [42] * 9, list(range(20, 45)), [7]]


@pytest.fixture(scope="module")
def random_mtp_model():
    return random_model(MTP_CONFIG).eval()


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained for a few seconds (next-token + 0.3 x MTP loss, AdamW) on text made of 8
    memorized 12-token phrases in random order: its MTP head has something real to predict."""
    torch.manual_seed(0)
    model = Transformer(MTP_CONFIG)
    g = torch.Generator().manual_seed(0)
    phrases = torch.randperm(248, generator=g)[:96].view(8, 12) + 8
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        x = phrases[torch.randint(0, 8, (8, 5), generator=g)].flatten(1)  # (8, 60)
        inputs, targets = x[:, :-1], x[:, 1:]
        h = model.hidden_states(inputs)
        (mtp,) = model.mtp_logits(h, inputs)
        loss = F.cross_entropy(model.lm_head(h).flatten(0, 1), targets.flatten()) + 0.3 * F.cross_entropy(
            mtp.flatten(0, 1), targets[:, 1:].flatten()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), [phrases[i, :3].tolist() for i in range(8)]


def test_speculative_greedy_equals_plain_on_a_random_model(random_mtp_model):
    plain = Engine(random_mtp_model).generate(PROMPTS, GREEDY)
    engine = Engine(random_mtp_model, use_mtp=True)
    spec = engine.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    s = engine.stats
    assert s.draft_tokens > 0 and s.acceptance_rate == s.accepted_tokens / s.draft_tokens
    assert s.generated_tokens == 4 * 48


def test_speculative_greedy_equals_plain_on_a_trained_model(trained):
    model, prompts = trained
    plain_engine = Engine(model)
    plain = plain_engine.generate(prompts, GREEDY)
    engine = Engine(model, use_mtp=True)
    spec = engine.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    # a trained MTP head is mostly right, so most steps yield two tokens
    assert engine.stats.acceptance_rate > 0.7
    assert engine.stats.decode_steps < 0.7 * plain_engine.stats.decode_steps
    # streaming hands out both tokens of a step, in order
    events = list(Engine(model, use_mtp=True).stream(prompts[0], GREEDY))
    assert [e.token_id for e in events] == plain[0].outputs[0].token_ids


def test_speculative_sampling_is_seeded_alone_and_in_a_batch(trained):
    model, prompts = trained
    sampled = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.95, top_k=40, seed=11, ignore_eos=True)
    params = [GREEDY, sampled, sampled, GREEDY]
    engine = Engine(model, use_mtp=True)
    batched = engine.generate(prompts[:4], params)
    assert engine.stats.accepted_tokens > 0
    for prompt, p, out in zip(prompts, params, batched):
        alone = Engine(model, use_mtp=True).generate([prompt], p)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
    n = Engine(model, use_mtp=True).generate([prompts[5]], SamplingParams(**{**sampled.__dict__, "n": 3}))[0]
    again = Engine(model, use_mtp=True).generate([prompts[5]], SamplingParams(**{**sampled.__dict__, "n": 3}))[0]
    assert [c.token_ids for c in n.outputs] == [c.token_ids for c in again.outputs]


def test_verify_draft_keeps_the_target_distribution():
    """Drafts from q, kept with min(1, p/q) or replaced from the residual, are distributed as p (to 5
    standard errors over 200k draws), and are kept with probability sum_v min(p_v, q_v)."""
    g = torch.Generator().manual_seed(0)
    V, N = 6, 200_000
    p = torch.softmax(torch.randn(V, generator=g), 0)
    q = torch.softmax(torch.randn(V, generator=g) * 2, 0)
    drafts = torch.multinomial(q, N, replacement=True, generator=g)
    tokens, kept = verify_draft(
        p.expand(N, V), q.expand(N, V), drafts, torch.rand(N, generator=g), torch.rand(N, generator=g)
    )
    freq = torch.bincount(tokens, minlength=V) / N
    assert (freq - p).abs().max() < 5 * (0.25 / N) ** 0.5
    assert abs(kept.float().mean() - torch.minimum(p, q).sum()) < 5 * (0.25 / N) ** 0.5
    # one-hot distributions (greedy): keep iff the draft is the argmax, else take the argmax
    one_hot = F.one_hot(torch.tensor([2, 2]), V).float()
    tokens, kept = verify_draft(
        one_hot, F.one_hot(torch.tensor([2, 4]), V).float(), torch.tensor([2, 4]), torch.rand(2), torch.rand(2)
    )
    assert tokens.tolist() == [2, 2] and kept.tolist() == [True, False]


def test_use_mtp_without_mtp_modules_decodes_plainly():
    model = random_model(CONFIGS["v2_greedy"]).eval()
    engine = Engine(model, use_mtp=True)
    assert not engine.use_mtp
    out = engine.generate([PROMPTS[0]], GREEDY)[0].outputs[0].token_ids
    assert out == Engine(model).generate([PROMPTS[0]], GREEDY)[0].outputs[0].token_ids


def test_batched_sampler_draws_from_the_processed_distribution():
    """Rows with different temperature / top-k / top-p, sampled together by inverse CDF with one uniform
    each, hit the distribution each row asks for (to 5 standard errors over 100k draws per row)."""
    from nanoseek.engine.sampling import RowParams, sample_rows

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=2.0, top_p=0.7),
        SamplingParams(temperature=0),
    ]
    expected = [
        torch.softmax(logits, 0),
        torch.softmax(logits[:3] / 0.5, 0),
        None,
        F.one_hot(torch.tensor(0), 5).float(),
    ]
    hot = torch.softmax(logits / 2.0, 0)  # nucleus: the smallest top set whose mass reaches 0.7
    keep = (hot.cumsum(0) - hot) < 0.7
    expected[2] = torch.where(keep, hot, 0) / torch.where(keep, hot, 0).sum()
    N = 100_000
    rows = RowParams.of(params)
    probs = rows.probs(logits.expand(4, -1))
    g = torch.Generator().manual_seed(0)
    for r, want in enumerate(expected):
        torch.testing.assert_close(probs[r, : len(want)], want, atol=1e-6, rtol=1e-5)
        draws = sample_rows(probs[r : r + 1].expand(N, -1), torch.rand(N, generator=g))
        freq = torch.bincount(draws, minlength=5).float() / N
        assert (freq[: len(want)] - want).abs().max() < 5 * (0.25 / N) ** 0.5
