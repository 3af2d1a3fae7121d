"""Shared fixtures: small configs in the styles the parity tests need, and seeded random models."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
            max_position_embeddings=256)

# The configurations transformers must agree with (issue 2, "Must show").
CONFIGS = {
    # V3: sigmoid scores, noaux_tc with groups, query compression, a dense first layer, shared expert, YaRN.
    "v3": ModelConfig(**BASE, model_type="deepseek_v3", q_lora_rank=24, n_shared_experts=1, n_group=4,
                      topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                      routed_scaling_factor=2.5, first_k_dense_replace=1,
                      rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # V3 with no shared expert, plain RoPE in the rotate-half layout.
    "v3_noshared": ModelConfig(**BASE, model_type="deepseek_v3", q_lora_rank=24, n_shared_experts=0,
                               n_group=2, topk_group=1, first_k_dense_replace=2, rope_interleave=False),
    # V2-Lite style: softmax, greedy, no query compression, two shared experts, YaRN mscale 0.707.
    "v2_greedy": ModelConfig(**BASE, model_type="deepseek_v2", q_lora_rank=0, n_shared_experts=2,
                             topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                             first_k_dense_replace=1, rope_scaling=YARN),
    # V2 style: softmax, group-limited greedy, routed scaling.
    "v2_group": ModelConfig(**BASE, model_type="deepseek_v2", q_lora_rank=0, n_shared_experts=2, n_group=4,
                            topk_group=2, topk_method="group_limited_greedy", scoring_func="softmax",
                            norm_topk_prob=False, routed_scaling_factor=16.0, first_k_dense_replace=1),
}


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model with every weight random, norms and the correction bias off their defaults, so a
    mapping mistake anywhere shows in the logits. Routers get a larger scale so top-k choices are
    far from ties."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("gate.weight"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.08)
        for moe in model.moe_layers():
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.fixture(params=sorted(CONFIGS))
def config_name(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run as fast on one thread as on two, and far faster when other work shares the cores
    (a two-thread OpenMP step waits whenever another process holds a core). Modules of tiny-model tests
    use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def zero_smoke_run(tmp_path_factory):
    """One `nanoseek zero --preset smoke` run shared by the zero and distill tests (the run is the slowest
    fixture of the suite; each test that changes it restores what it needs)."""
    from nanoseek.cli import main

    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("zero") / "run"
    try:
        assert main(["zero", "--preset", "smoke", "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(before)
    return out
