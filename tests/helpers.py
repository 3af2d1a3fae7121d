"""Helpers shared by several test files: small model configs in the styles the parity tests need, seeded
random models, a tiny model trained on the spot to reason in both templates, and GRPO's toy task."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.checkpoint.tokenizer import Tokenizer, render_chat, train_tokenizer
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.config import ModelConfig
from nanoseek.model.presets import get_preset
from nanoseek.model.transformer import Transformer, build_model
from nanoseek.model.v4_config import CSA, HCA, V4Config
from nanoseek.rl.loss import sequence_logprobs
from nanoseek.rl.rollout import RolloutBatch
from nanoseek.tasks.base import Problem, Task
from nanoseek.train.data import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]


YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}


BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
)


# The configurations transformers must agree with: every routing and RoPE variant the released checkpoints use.
CONFIGS = {
    # V3: sigmoid scores, noaux_tc with groups, query compression, a dense first layer, shared expert, YaRN.
    "v3": ModelConfig(
        **BASE,
        model_type="deepseek_v3",
        q_lora_rank=24,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # V3 with no shared expert, plain RoPE in the rotate-half layout.
    "v3_noshared": ModelConfig(
        **BASE,
        model_type="deepseek_v3",
        q_lora_rank=24,
        n_shared_experts=0,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=2,
        rope_interleave=False,
    ),
    # V2-Lite style: softmax, greedy, no query compression, two shared experts, YaRN mscale 0.707.
    "v2_greedy": ModelConfig(
        **BASE,
        model_type="deepseek_v2",
        q_lora_rank=0,
        n_shared_experts=2,
        topk_method="greedy",
        scoring_func="softmax",
        norm_topk_prob=False,
        first_k_dense_replace=1,
        rope_scaling=YARN,
    ),
    # V2 style: softmax, group-limited greedy, routed scaling.
    "v2_group": ModelConfig(
        **BASE,
        model_type="deepseek_v2",
        q_lora_rank=0,
        n_shared_experts=2,
        n_group=4,
        topk_group=2,
        topk_method="group_limited_greedy",
        scoring_func="softmax",
        norm_topk_prob=False,
        routed_scaling_factor=16.0,
        first_k_dense_replace=1,
    ),
    # V3.2 (DSA): V3 plus the lightning indexer, whose top-8 of the parity tests' 37 tokens makes attention
    # sparse; YaRN rotates the indexer's keys too. 8 indexer heads keep exact ReLU-zero ties (which top-k
    # would break by position) improbable.
    "v32_sparse": ModelConfig(
        **BASE,
        model_type="deepseek_v32",
        q_lora_rank=24,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
        index_n_heads=8,
        index_head_dim=32,
        index_topk=8,
    ),
    # V3.2 where index_topk exceeds every sequence: the indexer selects everything, attention is dense.
    "v32_dense": ModelConfig(
        **BASE,
        model_type="deepseek_v32",
        q_lora_rank=24,
        n_shared_experts=0,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=2,
        index_n_heads=8,
        index_head_dim=16,
        index_topk=128,
    ),
}


def random_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A model with every weight random, norms and the correction bias off their defaults (for DeepSeek-V4 also
    the mHC biases and scales, the sinks and the compressors' position biases), so a mapping mistake anywhere
    shows in the logits. Routers get a larger scale so top-k choices are far from ties."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("position_bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("gate.weight"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.08)
        for moe in model.moe_layers():
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


# ---- a model that reasons, trained on the spot ---------------------------------------------------------
R1_SYSTEM = "Think first."  # a short R1-Zero system prompt (the template's preamble is replaceable)


QA = [
    ("What is 2+3?", "2 plus 3 makes 5.", "5"),
    ("What is 7*6?", "7 times 6 makes 42.", "42"),
    ("Say hi.", "A greeting is asked for.", "Hi there!"),
    ("Name a color.", "Any color will do.", "Blue."),
]


def _conversations(template: str) -> list[tuple[str, str]]:
    out = []
    for q, reasoning, answer in QA:
        if template == "deepseek":
            msgs, reply = [{"role": "user", "content": q}], f"<think>{reasoning}</think>{answer}"
        else:
            msgs = [{"role": "system", "content": R1_SYSTEM}, {"role": "user", "content": q}]
            reply = f" <think> {reasoning} </think> <answer> {answer} </answer>"
        out.append((render_chat(msgs, template), reply))
    return out


@lru_cache(maxsize=None)
def chat_model_config(tok: Tokenizer, vocab_size: int, max_position_embeddings: int = 512) -> ModelConfig:
    """The server tests' 100k-parameter shape (MLA + MoE, 2 layers) for a tokenizer's special ids."""
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_lora_rank=32,
        q_lora_rank=0,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )


def chat_v4_config(tok: Tokenizer, vocab_size: int) -> ModelConfig:
    """A DeepSeek-V4 of the same size: a CSA and an HCA layer (rates 4 and 8, window 8), one hash-routed layer."""
    return ModelConfig(
        model_type="deepseek_v4",
        vocab_size=vocab_size,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        scoring_func="sqrtsoftplus",
        first_k_dense_replace=0,
        index_n_heads=4,
        index_head_dim=16,
        index_topk=4,
        max_position_embeddings=512,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        v4=V4Config(
            head_dim=32,
            layer_types=(CSA, HCA),
            mlp_layer_types=("hash_moe", "moe"),
            compress_rates={CSA: 4, HCA: 8},
            sliding_window=8,
            o_groups=2,
            o_lora_rank=16,
            hc_mult=2,
        ),
    )


def memorize(tok: Tokenizer, cfg: ModelConfig, pairs: list[tuple[str, str]], max_new_tokens: int = 40) -> Transformer:
    """A model trained from seed 0 to reply to each prompt of `pairs` with its reply (loss on the replies only,
    full-batch AdamW, at most 400 steps), checked by greedy decoding."""
    torch.manual_seed(0)
    model = build_model(cfg)
    seqs = [(tok.encode(p), tok.encode(r) + [tok.eos_id]) for p, r in pairs]
    T = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), T), tok.pad_id)
    target = torch.full((len(seqs), T), IGNORE_INDEX)
    for i, (p, r) in enumerate(seqs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        target[i, len(p) - 1 : len(p) + len(r) - 1] = torch.tensor(r)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread (and never fights for cores)
    try:
        for _ in range(400):
            loss = torch.nn.functional.cross_entropy(
                model(ids).flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 0.02:
                break
    finally:
        torch.set_num_threads(threads)
    model.eval()
    engine = Engine(model, tok)
    for p, r in pairs:  # the fixture's own check: greedy decoding reproduces every reply
        got = engine.generate([p], SamplingParams(max_tokens=max_new_tokens, temperature=0))[0].outputs[0]
        assert got.text == r and got.finish_reason == "stop", (p[-40:], got.text, loss.item())
    return model


def think_checkpoint(root: Path) -> Path:
    """A 100k-parameter model trained to memorize QA in both formats (about 100 full-batch AdamW steps).
    Returns a checkpoint with the deepseek template; `variant` derives the others."""
    out = root / "think"
    if (out / "tokenizer_config.json").exists():
        return out
    pairs = _conversations("deepseek") + _conversations("r1_zero")
    tok = train_tokenizer(
        [p + r for p, r in pairs] * 10 + ["The quick brown fox jumps over the lazy dog."] * 5, vocab_size=512
    )
    model = memorize(tok, chat_model_config(tok, 512), pairs)
    save_pretrained(model, out)
    tok.save_pretrained(out)
    return out


def think_checkpoint_v4(root: Path) -> Path:
    """think_checkpoint's tokenizer and conversations (deepseek template), memorized by a DeepSeek-V4 model."""
    out = root / "think-v4"
    if (out / "tokenizer_config.json").exists():
        return out
    tok = Tokenizer.from_pretrained(think_checkpoint(root))
    model = memorize(tok, chat_v4_config(tok, 512), _conversations("deepseek"))
    save_pretrained(model, out)
    tok.save_pretrained(out)
    return out


def transformers_greedy(model: torch.nn.Module, path: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy `generate` of n tokens per prompt (EOS ignored) on `model` saved to `path`: the
    reference the engine's decoding is checked against."""
    import transformers  # a dev dependency: only where a test compares with it

    save_pretrained(model, path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    out = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(p) :].tolist())
    return out


def greedy_with_requests_joining(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """The engine's tokens for each prompt when the first two run alone for 10 steps and the rest then join the
    running batch (continuous batching: rows at different positions in one step)."""
    ids = [engine.add_request(p, params) for p in prompts[:2]]
    for _ in range(10):
        engine.step()
    ids += [engine.add_request(p, params) for p in prompts[2:]]
    while engine.has_unfinished():
        engine.step()
    return [engine.pop_output(i).outputs[0].token_ids for i in ids]


def assert_policy_logprobs_match(model: torch.nn.Module, rollouts: list, group_size: int) -> None:
    """GRPO's training forward (`sequence_logprobs`) gives each completion token the log-prob a forward of its
    sequence alone gives (1e-5), and the engine's sampling log-prob (1e-4)."""
    batch = RolloutBatch.from_rollouts(rollouts, group_size)
    with torch.no_grad():
        logps, _ = sequence_logprobs(model, batch)
        for i, r in enumerate(rollouts):
            full = model(torch.tensor([r.prompt_ids + r.completion_ids])).log_softmax(-1)[0]
            tp = len(r.prompt_ids)
            want = torch.stack([full[tp + t - 1, tok] for t, tok in enumerate(r.completion_ids)])
            torch.testing.assert_close(logps[i, : len(want)], want, atol=1e-5, rtol=0)
    assert float((logps - batch.sample_logps)[batch.token_mask].abs().max()) < 1e-4


def token_ids(outs) -> list[list[list[int]]]:
    """Each request's samples' token ids, from Engine.generate's outputs."""
    return [[c.token_ids for c in o.outputs] for o in outs]


def variant(base: Path, name: str, template: str | None = None, context: int | None = None) -> Path:
    """A copy of a checkpoint with another chat template and/or context length (same weights)."""
    out = base.parent / name
    if not out.exists():
        tmp = base.parent / f".{name}.tmp"
        tmp.mkdir()
        for f in base.iterdir():
            (tmp / f.name).write_bytes(f.read_bytes())
        if template:
            Tokenizer.from_pretrained(tmp).with_chat_template(template).save_pretrained(tmp)
        if context:
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["max_position_embeddings"] = context
            (tmp / "config.json").write_text(json.dumps(cfg))
        tmp.rename(out)
    return out


# ---- GRPO's toy task and tiny models --------------------------------------------------------------------
TOKENIZER = train_tokenizer(["say some digits 0123456789 please", "hello world, abc xyz"] * 20, vocab_size=300)


def tiny_config(**kw):
    base = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        q_lora_rank=24,
        bos_token_id=TOKENIZER.bos_id,
        eos_token_id=TOKENIZER.eos_id,
        pad_token_id=TOKENIZER.pad_id,
    )
    return ModelConfig(**{**base, **kw})


def tiny_model(seed=0, std=0.02):
    torch.manual_seed(seed)
    model = Transformer(tiny_config())
    if std != 0.02:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, std)
    return model


class SayDigits(Task):
    """Test-only task: any prompt; the reward is the fraction of digit characters in the completion."""

    name = "say_digits"

    def generate(self, rng):
        n = rng.randint(0, 99_999)
        return Problem(self.name, f"say {n}", str(n), str(n))

    def verify(self, problem, answer):
        return answer == problem.answer

    def solution(self, problem):
        return problem.answer


@dataclass
class Score:
    total: float
    accuracy: float
    format: float


def digit_reward(problems, completions):
    return [Score(f, f, 0.0) for f in (sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions)]


def short_prompt(problem):
    return problem.question


def arithmetic_checkpoint(path):
    """A random tiny model with a tokenizer trained on arithmetic documents, saved as an HF directory."""
    from nanoseek.tasks import get_task, pretraining_documents

    tok = train_tokenizer(
        list(pretraining_documents(get_task("arithmetic"), n=200, seed=0)), vocab_size=400, chat_template="r1_zero"
    )
    torch.manual_seed(0)
    model = Transformer(
        tiny_config(
            vocab_size=400,
            max_position_embeddings=512,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )
    )
    save_pretrained(model, path)
    tok.save_pretrained(path)
    return path


# ---- small shapes shared by the training, data and generation tests -----------------------------------
# A micro MLA + MoE model with one MTP module (a few thousand parameters): masks, checkpoints, resume.
MICRO = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    num_nextn_predict_layers=1,
)

# A small V3-style model that learns in seconds: one dense layer, one MoE layer (8 experts, top-2, 2 groups),
# MTP depth 1.
TRAIN_MODEL = get_preset(
    "tiny",
    vocab_size=384,
    hidden_size=64,
    intermediate_size=192,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    q_lora_rank=0,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
)
