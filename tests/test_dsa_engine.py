"""DeepSeek-V3.2 (DSA) in the engine: greedy decoding equals transformers' `generate` in the sparse and the dense
regime, batched and with requests joining a running batch; MTP speculation, the compiled step, preemption under a
full cache and n samples of one prompt give the plain greedy tokens; a decode step over the cache (each query's
top-k latents gathered) gives the logits of the full forward (attention masked to the same top-k).

Configs: helpers' `v32_sparse` (index_topk 8: every decode step here is sparse, since the cache pads a step's
context to at least two blocks, and so are prefills past 8 tokens) and `v32_dense` (index_topk 128, above every
length here: the indexer never narrows anything). Both have 8 indexer heads, so exact zero ties between ReLU'd
index scores, which top-k breaks by position (and two implementations might break differently), are improbable.
fp32 throughout; logits agree within 1e-5 absolute.
"""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.bench.decode import DecodeBenchConfig, run
from nanoseek.cli import main
from nanoseek.engine.engine import Engine
from nanoseek.engine.kv_cache import PagedLatentCache
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model import dsa
from nanoseek.model.presets import get_preset
from nanoseek.model.transformer import Transformer

from helpers import CONFIGS, greedy_with_requests_joining, random_model, transformers_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 99, 3], [42] * 9, list(range(20, 45)), [7]]  # 4 to 25 tokens, and one below index_topk
LONG = [list(range(i, i + 20)) for i in range(8)]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def sparse_model():
    return random_model(CONFIGS["v32_sparse"]).eval()


@pytest.fixture(scope="module")
def mtp_model():
    return random_model(CONFIGS["v32_sparse"].replace(num_nextn_predict_layers=1)).eval()


@pytest.fixture(scope="module")
def trained_mtp():
    """A V3.2 model with MTP trained for 2 s (20 AdamW steps, next-token + 0.3 x MTP loss) on text made of 8
    memorized 12-token phrases in random order, so most drafts are right; and the phrases' first 3 tokens."""
    torch.manual_seed(0)
    model = Transformer(CONFIGS["v32_sparse"].replace(num_nextn_predict_layers=1))
    g = torch.Generator().manual_seed(0)
    phrases = torch.randperm(248, generator=g)[:96].view(8, 12) + 8
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(20):
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


@pytest.fixture
def gathers(monkeypatch):
    """The shapes (B, T, k) of the cache's sparse reads (`gather_pool`: the top-k latents of a decode step)."""
    calls = []
    real = PagedLatentCache.gather_pool

    def counted(self, pool, c_kv, k_pe, positions):
        calls.append(tuple(positions.shape))
        return real(self, pool, c_kv, k_pe, positions)

    monkeypatch.setattr(PagedLatentCache, "gather_pool", counted)
    return calls


@pytest.fixture
def small_chunks(monkeypatch):
    """A sparse prefill of a few queries per chunk (3 to 14 here), so chunk boundaries fall inside every prompt."""
    monkeypatch.setattr(dsa, "PREFILL_SCORES", 1024)


@pytest.mark.parametrize("name", ["v32_sparse", "v32_dense"])
def test_greedy_equals_transformers_generate_with_requests_joining(name, tmp_path, gathers, small_chunks):
    model = random_model(CONFIGS[name]).eval()
    refs = transformers_greedy(model, tmp_path, PROMPTS, 40)
    assert greedy_with_requests_joining(Engine(model, max_batch_size=8), PROMPTS, GREEDY) == refs
    k = CONFIGS[name].index_topk
    if name == "v32_sparse":  # each layer's decode steps read k latents per query, never the whole context
        assert len(gathers) >= 3 * 40 and all(shape[1:] == (1, k) for shape in gathers)
    else:
        assert not gathers  # no step had more than index_topk keys: plain MLA, no indexer


@pytest.mark.parametrize("trained", [False, True])
def test_mtp_speculation_gives_the_plain_greedy_tokens(mtp_model, trained_mtp, gathers, trained):
    """A random MTP module's drafts are all rejected (each verify step's first query decides); a trained one's are
    mostly kept, so the verify step's second query, over its own top-k, gives the next token too."""
    model, prompts = trained_mtp if trained else (mtp_model, PROMPTS)
    plain = Engine(model).generate(prompts, GREEDY)
    engine = Engine(model, use_mtp=True)
    assert token_ids(engine.generate(prompts, GREEDY)) == token_ids(plain)
    assert engine.stats.draft_tokens > 0
    assert engine.stats.acceptance_rate > 0.5 if trained else engine.stats.accepted_tokens == 0
    assert (len(prompts), 2, 8) in gathers  # verify steps: two queries a row, each with its own top-k


def test_compiled_decode_equals_eager():
    """One small case, since compiling costs seconds a graph on 2 cores: every layer an MoE block (one graph), 3
    prompts, 24 sparse decode steps through the compiled blocks."""
    model = random_model(CONFIGS["v32_sparse"].replace(first_k_dense_replace=0)).eval()
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    want = token_ids(Engine(model, max_batch_size=4, compile=False).generate(PROMPTS[:3], params))
    compiled = Engine(model, max_batch_size=4, compile=True)
    assert token_ids(compiled.generate(PROMPTS[:3], params)) == want
    assert compiled.compile_seconds > 0


@pytest.mark.parametrize("use_mtp", [False, True])
def test_cache_exhaustion_preempts_and_outputs_are_unchanged(mtp_model, use_mtp):
    """8 requests of 60 tokens in a 200-token cache: preempted sequences are recomputed, their indexer keys too."""
    ample = Engine(mtp_model).generate(LONG, GREEDY)
    tight = Engine(mtp_model, block_size=4, cache_tokens=200, use_mtp=use_mtp)
    outs = tight.generate(LONG, GREEDY)
    assert tight.stats.preemptions > 0
    assert token_ids(outs) == token_ids(ample)
    assert tight.cache.n_free == tight.cache.n_blocks  # every block came back


def test_n_greedy_samples_share_one_prefill_and_equal_a_lone_request(sparse_model):
    """The prompt's latents and indexer keys are prefilled once and copied to each sample's blocks: a sample
    reading a missing indexer key would select other tokens."""
    params = SamplingParams(max_tokens=30, temperature=0, n=3, ignore_eos=True)
    engine = Engine(sparse_model, block_size=4)
    out = engine.generate([PROMPTS[2]], params)[0]
    assert engine.stats.prompt_tokens == len(PROMPTS[2])  # prefilled once
    alone = Engine(sparse_model).generate([PROMPTS[2]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    assert [c.token_ids for c in out.outputs] == [alone[0].outputs[0].token_ids] * 3


@pytest.mark.parametrize("chunked", [False, True])
@torch.no_grad()
def test_a_decode_step_over_the_cache_equals_the_full_forward(sparse_model, gathers, monkeypatch, chunked):
    """Three sequences (37, 21 and 6 tokens: one with fewer keys than index_topk) prefilled into a paged cache but
    for their last two tokens, then one step of those two tokens each (an MTP verify step's shape): absorbed
    attention over the gathered top-k latents (decode), and expanded attention under the top-k mask over the
    same layout, both give the logits of the model's full forward at those positions within 1e-5."""
    if chunked:
        monkeypatch.setattr(dsa, "PREFILL_SCORES", 1000)  # 3 queries a chunk for the longest prompt
    model, cfg = sparse_model, sparse_model.config
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (37, 21, 6)]
    cache = PagedLatentCache(
        cfg.num_hidden_layers, 20, 8, cfg.kv_lora_rank, cfg.qk_rope_head_dim, index_dim=cfg.index_head_dim
    )
    tables = [[] for _ in seqs]
    for seq, table in zip(seqs, tables):
        n = len(seq) - 2
        cache.grow(table, len(seq))
        cache.prepare([table], [0], n, absorb=False)
        model.hidden_states(seq[None, :n], torch.arange(n)[None], cache)
    starts = [len(s) - 2 for s in seqs]
    ids = torch.stack([s[-2:] for s in seqs])
    pos = torch.tensor(starts)[:, None] + torch.arange(2)
    full = torch.stack([model(s[None])[0, -2:] for s in seqs])  # (3, 2, V)
    for absorb in (True, False):  # rewriting the same two slots with the same values: the step can be repeated
        gathers.clear()
        cache.prepare(tables, starts, 2, absorb=absorb)
        logits = model.lm_head(model.hidden_states(ids, pos, cache))
        assert (logits - full).abs().max().item() < 1e-5, absorb
        assert gathers == ([(3, 2, cfg.index_topk)] * cfg.num_hidden_layers if absorb else [])


def test_bench_context_sweep_puts_v32_beside_its_dense_twin(capsys):
    """`bench decode --context` on tiny-v32 (index_topk 64: both contexts decode sparse): a row per context with
    both models' tok/s and the ratio, and the cache bytes per token of each (V3.2: latent + indexer key)."""
    cfg = DecodeBenchConfig(preset="tiny-v32", context=[80, 160], compare_dense=True, rounds=1, tokens=4, threads=1)
    med = run(cfg)
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["80"], ["160"])]
    assert [r[0] for r in rows] == ["80", "160"] and all(r[-1].endswith("x") for r in rows)
    for n in (80, 160):
        assert med[f"context{n}/ratio"] == med[f"context{n}/decode/V3.2"] / med[f"context{n}/decode/V3"] > 0
    m = get_preset("tiny-v32")
    layers = (m.num_hidden_layers + m.num_nextn_predict_layers) * 4  # fp32 values, MTP layer included
    assert med["cache_bytes/V3"] == (m.kv_lora_rank + m.qk_rope_head_dim) * layers
    assert med["cache_bytes/V3.2"] == med["cache_bytes/V3"] + m.index_head_dim * layers
    assert main(["bench", "decode", "--preset", "tiny", "--context", "80", "--compare-dense"]) == 2
    assert "needs a deepseek_v32 model" in capsys.readouterr().err
