"""DeepSeek-V4 in the engine (nanoseek/engine/v4_cache.py): a sliding-window ring per sequence, compressed
entries (CSA, HCA, the indexer's keys) paged by block, and the compressors' pending tokens.

- Greedy decoding equals transformers' `generate` for 64 tokens, past several compression boundaries and well
  past the window, with requests joining a running batch.
- Prefill then decode equals the full forward (hidden states within 1e-5), for every split of a sequence
  around the window and the compression boundaries, in ragged batches of rows at different positions.
- Chunked prefill, preemption under a full cache, n samples of one prompt: the plain greedy tokens.
- The cache's bytes: the ring does not grow with the context, the entries do, at the rate derived by hand.
- MTP speculation gives the plain greedy tokens; `nanoseek chat` and `nanoseek serve` run a V4 checkpoint.

Configs are test_v4.py's: `v4_sparse` (window 6, CSA 4 with an indexer keeping 3 entries, HCA 8) and
`v4_yarn_dense` (window 8, CSA 4 with a dense indexer, HCA 16, two mHC streams). fp32 throughout.
"""

import openai
import pytest
import torch
import torch.nn.functional as F
from test_v4 import CONFIGS

from nanoseek.bench.serve import ServerProcess
from nanoseek.cli.chat import ChatSession
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.v4_cache import PagedV4Cache, v4_block_size
from nanoseek.model.v4_config import CSA, HCA

from helpers import (
    QA,
    greedy_with_requests_joining,
    random_model,
    think_checkpoint_v4,
    token_ids,
    transformers_greedy,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 99, 3], [42] * 9, list(range(20, 45)), [7]]  # 1 to 25 tokens
LONG = [list(range(i, i + 20)) for i in range(6)]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return random_model(CONFIGS[request.param]).eval()


def test_greedy_equals_transformers_generate_with_requests_joining(model, tmp_path):
    engine = Engine(model, max_batch_size=8)
    assert greedy_with_requests_joining(engine, PROMPTS, GREEDY) == transformers_greedy(model, tmp_path, PROMPTS, 64)
    assert engine.cache.n_free == engine.cache.n_blocks and len(engine.cache.free_slots) == engine.cache.n_slots


@torch.no_grad()
def test_prefill_then_decode_equals_the_full_forward(model):
    """Three sequences of 41 tokens, split at every prefix length 1..40 in turn (the rows of one batch at
    different positions), prefilled as a ragged batch, then decoded a token at a time up to the end: every
    position's hidden state equals the full forward's within 1e-5. The splits fall before, on and after the
    window's end and the compression boundaries."""
    cfg = model.config
    g = torch.Generator().manual_seed(4)
    seqs = torch.randint(0, cfg.vocab_size, (3, 41), generator=g)
    full = model.hidden_states(seqs)  # (3, 41, D)
    n_layers = cfg.num_hidden_layers + len(model.mtp)
    worst = 0.0
    for first in range(1, 41, 3):
        splits = [first, min(first + 1, 40), max(first - 5, 1)]  # ragged: each row its own prefill length
        cache = PagedV4Cache(cfg, n_layers, n_slots=3, n_blocks=12, block_size=16)
        tables = [[] for _ in seqs]
        for table in tables:
            cache.grow(table, 41)
        T = max(splits)
        cache.prepare(tables, [0, 0, 0], T, absorb=False, lengths=splits)
        h = model.hidden_states(seqs[:, :T], torch.arange(T)[None].expand(3, -1), cache)
        for b, n in enumerate(splits):
            worst = max(worst, (h[b, :n] - full[b, :n]).abs().max().item())
        pos = list(splits)
        while min(pos) < 41:
            rows = [b for b in range(3) if pos[b] < 41]
            cache.prepare([tables[b] for b in rows], [pos[b] for b in rows], 1, absorb=True)
            ids = torch.stack([seqs[b, pos[b] : pos[b] + 1] for b in rows])
            h = model.hidden_states(ids, torch.tensor([[pos[b]] for b in rows]), cache)
            for i, b in enumerate(rows):
                worst = max(worst, (h[i, 0] - full[b, pos[b]]).abs().max().item())
                pos[b] += 1
    assert worst < 1e-5, worst


@torch.no_grad()
def test_a_rejected_draft_leaves_nothing_behind(model):
    """Verify steps of two tokens (MTP's shape) whose second token, the draft, is wrong: the next step starts at
    the draft's position with the right token, and sees nothing of the wrong one (the ring slot it took holds a
    position out of every later window; the entry it completed is recomputed)."""
    cfg = model.config
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, cfg.vocab_size, (1, 41), generator=g)
    full = model.hidden_states(seq)
    cache = PagedV4Cache(cfg, cfg.num_hidden_layers, n_slots=1, n_blocks=4, block_size=16)
    table: list[int] = []
    cache.grow(table, 41)
    cache.prepare([table], [0], 3, absorb=False)
    model.hidden_states(seq[:, :3], torch.arange(3)[None], cache)
    for p in range(3, 39):
        step = seq[:, p : p + 2].clone()
        step[0, 1] = (step[0, 1] + 1) % cfg.vocab_size  # a draft that will be rejected
        cache.prepare([table], [p], 2, absorb=True)
        h = model.hidden_states(step, torch.tensor([[p, p + 1]]), cache)
        assert (h[0, 0] - full[0, p]).abs().max() < 1e-5, p


def test_chunked_prefill_preemption_and_n_samples_give_the_plain_tokens(model):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = token_ids(Engine(model).generate(LONG, params))
    chunked = Engine(model, max_num_batched_tokens=7)  # chunks cut windows and blocks anywhere
    assert token_ids(chunked.generate(LONG, params)) == plain
    tight = Engine(model, cache_tokens=160)  # 10 blocks of 16 tokens for 6 sequences of 60
    assert token_ids(tight.generate(LONG, params)) == plain
    assert tight.stats.preemptions > 0
    assert tight.cache.n_free == tight.cache.n_blocks
    engine = Engine(model)
    out = engine.generate([LONG[0]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, n=3))[0]
    assert engine.stats.prompt_tokens == len(LONG[0])  # prefilled once, its state copied to each sample
    assert [c.token_ids for c in out.outputs] == plain[0] * 3


def test_seeded_samples_are_the_same_alone_or_batched(model):
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=7, n=2)
    alone = token_ids(Engine(model).generate([PROMPTS[2]], params))
    others = SamplingParams(max_tokens=30, seed=1)
    batched = token_ids(Engine(model).generate(PROMPTS[:2] + PROMPTS[2:3], [others, others, params]))
    assert batched[2] == alone[0] and alone[0][0] != alone[0][1]


def test_cache_bytes_ring_per_sequence_entries_per_token(model):
    """Per token, each compressed layer stores head_dim / rate values (+ index_head_dim / 4 for CSA); the window
    is a ring of `sliding_window` keys per layer and sequence, whatever the context."""
    cfg, v4 = model.config, model.config.v4
    engine = Engine(model)
    per_token = sum(
        v4.head_dim / v4.rate(t) + (cfg.index_head_dim / v4.rate(t) if t == CSA else 0)
        for t in v4.layer_types
        if t in (CSA, HCA)
    )
    assert engine.cache.bytes_per_token() == per_token * 4
    assert all(ring.shape[1] == v4.sliding_window for ring in engine.cache.windows)
    assert engine.cache.block_size == v4_block_size(cfg, 16) == 16


@pytest.fixture(scope="module")
def trained_mtp():
    """v4_sparse with an MTP module trained for a few seconds (30 AdamW steps, next-token + 0.3 x MTP loss) on
    text made of 8 memorized 12-token phrases in random order, so most drafts are right; and the phrases'
    first 3 tokens as prompts."""
    torch.manual_seed(0)
    model = random_model(CONFIGS["v4_sparse"].replace(num_nextn_predict_layers=1))
    g = torch.Generator().manual_seed(0)
    phrases = torch.randperm(248, generator=g)[:96].view(8, 12) + 8
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        x = phrases[torch.randint(0, 8, (8, 5), generator=g)].flatten(1)  # (8, 60)
        inputs, targets = x[:, :-1], x[:, 1:]
        streams = model.streams(inputs)
        (mtp,) = model.mtp_logits(streams, inputs)
        logits = model.lm_head(model.norm(model.hc_head(streams)))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + 0.3 * F.cross_entropy(
            mtp.flatten(0, 1), targets[:, 1:].flatten()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), [phrases[i, :3].tolist() for i in range(8)]


@pytest.mark.parametrize("trained", [False, True])
def test_mtp_speculation_gives_the_plain_greedy_tokens(trained_mtp, trained):
    """V4's MTP module (a sliding-window block on the mHC streams, with its own ring in the cache) drafts; one
    forward over [last token, draft] verifies. A random module's drafts are rejected, a trained one's mostly
    kept; the tokens are plain greedy decoding's either way, also with n samples and under preemption."""
    model, prompts = trained_mtp
    if not trained:
        model, prompts = random_model(CONFIGS["v4_sparse"].replace(num_nextn_predict_layers=1)).eval(), PROMPTS
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = token_ids(Engine(model).generate(prompts, params))
    engine = Engine(model, use_mtp=True)
    assert token_ids(engine.generate(prompts, params)) == plain
    assert engine.stats.draft_tokens > 0
    assert engine.stats.acceptance_rate > 0.5 if trained else engine.stats.acceptance_rate < 0.1
    tight = Engine(model, use_mtp=True, cache_tokens=96, max_num_batched_tokens=5)
    assert token_ids(tight.generate(prompts, params)) == plain and tight.stats.preemptions > 0
    n3 = Engine(model, use_mtp=True).generate([prompts[0]], SamplingParams(**{**vars(params), "n": 3}))[0]
    assert [c.token_ids for c in n3.outputs] == plain[0] * 3


def test_what_the_engine_does_not_run_for_v4_is_refused(model):
    for kwargs, what in [(dict(weights="int8"), "fp32"), (dict(compile=True), "compile")]:
        with pytest.raises(ValueError, match=what):
            Engine(model, **kwargs)


# ---- a V4 checkpoint through `nanoseek chat` and `nanoseek serve` ------------------------------------------
@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory):
    return think_checkpoint_v4(tmp_path_factory.getbasetemp())


def test_chat_runs_a_v4_checkpoint(v4_dir):
    """The memorized conversations of think_checkpoint, learned by a V4 model: reasoning apart from the answer."""
    session = ChatSession(Engine(str(v4_dir), max_batch_size=1), SamplingParams(max_tokens=64, temperature=0))
    for q, reasoning, answer in QA:
        pieces = list(session.reply(q))
        assert "".join(t for k, t in pieces if k == "reasoning") == reasoning
        assert "".join(t for k, t in pieces if k == "content") == answer
        session.messages.clear()


def test_serve_runs_a_v4_checkpoint(v4_dir, tmp_path):
    """`nanoseek serve` on the V4 checkpoint: the official client's chat completion, plain and streamed, with
    n = 2 samples (each gets a copy of the prompt's window ring and pending tokens)."""
    server = ServerProcess(v4_dir, "--threads", "1", log=tmp_path / "serve.log").wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        q, reasoning, answer = QA[0]
        out = client.chat.completions.create(
            model="think-v4", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=64, n=2
        )
        assert [c.message.content for c in out.choices] == [answer] * 2
        assert out.choices[0].message.reasoning_content == reasoning
        chunks = client.chat.completions.create(
            model="think-v4", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=64, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    finally:
        server.stop()
