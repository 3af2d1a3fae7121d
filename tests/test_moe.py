"""DeepSeekMoE: routing rules, the two expert kernels, token counts and load balancing."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model.moe import MoE, update_bias

from helpers import BASE


def moe_config(**kw):
    return ModelConfig(
        **{
            **BASE,
            "hidden_size": 32,
            "moe_intermediate_size": 16,
            "n_routed_experts": 16,
            "num_experts_per_tok": 4,
            "n_group": 4,
            "topk_group": 2,
            **kw,
        }
    )


def test_grouped_mm_and_expert_loop_agree():
    torch.manual_seed(0)
    moe = MoE(moe_config())
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 11, 32, requires_grad=True)
    assert moe.experts.use_grouped_mm, "this torch has _grouped_mm; the fast path should be on"
    y_grouped = moe(x)
    g_grouped = torch.autograd.grad(y_grouped.square().sum(), [x, moe.experts.gate_proj])
    moe.experts.use_grouped_mm = False
    y_loop = moe(x)
    g_loop = torch.autograd.grad(y_loop.square().sum(), [x, moe.experts.gate_proj])
    torch.testing.assert_close(y_grouped, y_loop, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_grouped, g_loop):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [1, 0])
def test_decode_expert_paths_agree(shared):
    """The few-token paths a decode step takes (the CPU's per-token loop, an accelerator's sync-free gather)
    give the sorted path's output."""
    torch.manual_seed(0)
    moe = MoE(moe_config(n_shared_experts=shared)).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(4, 32)
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
        with torch.enable_grad():  # grad mode takes the sorted path
            want = moe(x).detach()
        torch.testing.assert_close(moe._few_tokens(x, weights, indices), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe._gathered(x, weights, indices), want, atol=1e-5, rtol=1e-5)


def test_loop_touches_only_experts_that_received_tokens():
    moe = MoE(moe_config())
    counts = torch.zeros(16, dtype=torch.long)
    counts[3] = 5
    x = torch.randn(5, 32)
    with torch.no_grad():
        moe.experts.gate_proj.fill_(float("nan"))
        moe.experts.gate_proj[3].normal_()  # any other expert used would spread NaN
        moe.experts.up_proj.normal_(), moe.experts.down_proj.normal_()
    moe.experts.use_grouped_mm = False
    assert torch.isfinite(moe.experts(x, counts)).all()


def test_noaux_tc_selects_only_from_kept_groups_and_weights_ignore_bias():
    cfg = moe_config(topk_method="noaux_tc", scoring_func="sigmoid", routed_scaling_factor=2.5)
    gate = MoE(cfg).gate
    torch.manual_seed(1)
    torch.nn.init.normal_(gate.weight, std=1.0)
    gate.e_score_correction_bias.normal_(0, 0.5)
    x = torch.randn(64, 32)
    weights, idx, scores = gate(x)
    biased = (scores + gate.e_score_correction_bias).view(64, 4, 4)
    group_score = biased.topk(2, dim=-1).values.sum(-1)
    kept = group_score.topk(2, dim=-1).indices
    assert all(set((idx[t] // 4).tolist()) <= set(kept[t].tolist()) for t in range(64))
    # weights: unbiased scores of the chosen experts, normalized to 1, times the scaling factor
    expect = scores.gather(1, idx)
    torch.testing.assert_close(weights, expect / expect.sum(-1, keepdim=True) * 2.5)
    assert gate.e_score_correction_bias.dtype == torch.float32


def test_group_limited_greedy_uses_group_max():
    cfg = moe_config(topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False)
    gate = MoE(cfg).gate
    torch.manual_seed(2)
    torch.nn.init.normal_(gate.weight, std=1.0)
    weights, idx, scores = gate(torch.randn(64, 32))
    kept = scores.view(64, 4, 4).amax(-1).topk(2, dim=-1).indices
    assert all(set((idx[t] // 4).tolist()) <= set(kept[t].tolist()) for t in range(64))
    torch.testing.assert_close(weights, scores.gather(1, idx))


def test_token_counts_exposed_in_training_only():
    model = Transformer(moe_config(num_hidden_layers=2, first_k_dense_replace=1))
    x = torch.randint(0, 256, (2, 10))
    model.eval()
    model(x)
    assert all(m.tokens_per_expert.sum() == 0 for m in model.moe_layers())
    model.train()
    model(x)
    model(x)
    for m in model.moe_layers():
        assert m.tokens_per_expert.sum().item() == 2 * 2 * 10 * 4  # two forwards, B*T tokens, top-4


def test_sequence_balance_loss_matches_definition():
    cfg = moe_config(aux_loss_alpha=0.01)
    moe = MoE(cfg).train()
    torch.manual_seed(3)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 9, 32)
    moe(x)
    # DeepSeek-V3 eq. 17-20, computed directly per sequence
    _, idx, scores = moe.gate(x.reshape(-1, 32))
    total = 0.0
    for b in range(2):
        s, i = scores[b * 9 : (b + 1) * 9], idx[b * 9 : (b + 1) * 9]
        f = torch.stack([(i == e).any(-1).float().sum() for e in range(16)]) * 16 / (4 * 9)
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        total += 0.01 * (f * P).sum()
    torch.testing.assert_close(moe.aux_loss, total / 2)
    assert moe.aux_loss.requires_grad


def test_bias_update_rebalances_a_skewed_router():
    """A router made to favour 4 of 16 experts: the sign-rule bias update (γ = 0.01 here, 1e-3 in
    the paper, for speed) must bring max/mean load down over steps without touching the gate weights."""
    cfg = moe_config(num_hidden_layers=1, first_k_dense_replace=0, n_group=1, topk_group=1)
    model = Transformer(cfg).train()
    moe = model.moe_layers()[0]
    torch.manual_seed(0)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.02)
        moe.gate.weight[:4] += 0.1  # experts 0-3 win almost every token
    weights_before = moe.gate.weight.clone()
    imbalance = []
    for _ in range(60):
        x = torch.randn(8, 32, 32) + 0.2  # a shared direction the skewed rows align with
        with torch.no_grad():
            moe(x)
        imbalance.append(update_bias(model, gamma=0.01)[0])
    assert imbalance[0] > 3.0, imbalance[0]  # skewed at the start
    # The sign rule with a fixed γ hovers around balance rather than settling: judge the last 10 steps.
    late = sum(imbalance[-10:]) / 10
    assert late < 1.5, imbalance[-10:]
    assert late < imbalance[0] / 2
    assert torch.equal(moe.gate.weight, weights_before)
    assert moe.tokens_per_expert.sum() == 0  # counts reset after each update
    assert moe.gate.e_score_correction_bias[:4].max() < moe.gate.e_score_correction_bias[4:].min()


def test_bias_update_sign_rule():
    model = Transformer(moe_config(num_hidden_layers=1, first_k_dense_replace=0, n_group=1, topk_group=1))
    moe = model.moe_layers()[0]
    moe.tokens_per_expert.copy_(torch.arange(16, dtype=torch.float32))  # mean 7.5
    update_bias(model, gamma=0.25)
    expected = torch.where(torch.arange(16) < 7.5, 0.25, -0.25)
    torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)


@pytest.mark.parametrize("kind", ["greedy", "group_limited_greedy"])
def test_softmax_routers_have_no_bias(kind):
    gate = MoE(moe_config(topk_method=kind, scoring_func="softmax")).gate
    assert gate.e_score_correction_bias is None


def test_correction_bias_stays_fp32_through_dtype_casts():
    model = Transformer(moe_config(num_hidden_layers=2, first_k_dense_replace=1))
    gate = model.moe_layers()[0].gate
    gate.e_score_correction_bias.copy_(torch.linspace(0, 1e-3, 16) + 1.0)  # steps bf16 cannot hold
    before = gate.e_score_correction_bias.clone()
    model.to(torch.bfloat16)
    assert gate.weight.dtype == torch.bfloat16
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, before)
    assert model.moe_layers()[0].tokens_per_expert.dtype == torch.float32
    model(torch.randint(0, 256, (1, 5)))  # and a bf16 forward still runs
