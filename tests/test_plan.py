"""`nanoseek plan`: FLOPs against torch's counter, memory per device against meta-device sizes, layouts that
cannot exist, the published DeepSeek figures, the serving bound by hand, and the command."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nanoseek.cli import main
from nanoseek.model.moe import Experts
from nanoseek.model.presets import get_preset
from nanoseek.model.stats import model_stats
from nanoseek.model.transformer import Transformer
from nanoseek.plan.hardware import ACCELERATORS, Accelerator, PlanError, parse_count
from nanoseek.plan.reference import V3_PRETRAIN_GPU_HOURS, v2_cache_check, v3_implied_mfu
from nanoseek.plan.serve import ServePlanConfig, cache_read, cache_sizes, plan_serving, weights_read
from nanoseek.plan.train import (
    Layout,
    Precision,
    TrainPlanConfig,
    check_layout,
    memory_per_device,
    plan_training,
    smallest_fitting_layout,
    stage_layers,
)
from nanoseek.train.objective import PretrainObjective

from helpers import TRAIN_MODEL

TINY = get_preset("tiny")


def test_parse_count():
    assert parse_count("14.8T") == pytest.approx(14.8e12)
    assert parse_count("500M") == 5e8 and parse_count("1e9") == 1e9 and parse_count("2b") == 2e9
    with pytest.raises(PlanError, match="cannot read"):
        parse_count("lots")


def test_plan_flops_per_token_match_torch_flop_counter():
    """The plan's FLOPs per token (train.objective's formula) against FlopCounterMode on one forward+backward of
    a dense + MoE model without MTP: equal once the norm gains (charged 6 each by the formula, elementwise to
    the counter) and causal vs full math-kernel attention (v zero-padded to d_qk) are accounted for."""
    cfg, B, T = TRAIN_MODEL.replace(num_nextn_predict_layers=0), 2, 32
    torch.manual_seed(0)
    model = Transformer(cfg)
    for m in model.modules():
        if isinstance(m, Experts):
            m.use_grouped_mm = False
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        sums, aux = PretrainObjective(model, 0)(x[:, :-1], [x[:, 1:]], None)
        (sums.sum() + aux).backward()
    H, L, d_qk = cfg.num_attention_heads, cfg.num_hidden_layers, cfg.qk_head_dim
    causal = 6 * H * (d_qk + cfg.v_head_dim) * (T + 1) / 2
    full = 6 * H * 2 * d_qk * T
    gains = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    plan = plan_training(cfg, TrainPlanConfig(tokens=B * T, count=1, seq_len=T, mtp_depth=0), ACCELERATORS["h100"])
    expected = B * T * (plan.flops_per_token - 6 * gains - L * causal + L * full)
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)
    assert plan.total_flops == pytest.approx(plan.flops_per_token * B * T)


def test_time_and_money_arithmetic():
    dev = Accelerator("x", 100e12, None, 80e9, 2e12, 3.0)
    cfg = TINY
    p = plan_training(cfg, TrainPlanConfig(tokens=1e12, count=4, seq_len=256, global_batch=8, mfu=0.5), dev)
    hours = p.flops_per_token * 1e12 / (0.5 * 100e12 * 3600)
    assert p.gpu_hours == pytest.approx(hours) and p.dollars == pytest.approx(3 * hours)
    assert p.wall_days == pytest.approx(hours / 4 / 24)
    assert p.step_s == pytest.approx(8 * 256 * p.flops_per_token / (4 * 100e12 * 0.5))


@pytest.mark.parametrize("layout", [Layout(), Layout(tp=2, pp=2, ep=2, zero=0), Layout(pp=3, ep=4, zero=3)])
def test_memory_per_device_matches_meta_sizes(layout):
    """Weights, gradients and optimizer state of the fullest device against the parameter sizes of the
    Transformer built on meta, sharded by hand: stage by stage, routed experts over ep, the rest over tp,
    states over dp (routed: dp / ep) by ZeRO stage."""
    count = layout.tp * layout.pp * 4
    cfg = TINY
    lay = check_layout(cfg, count, layout)
    b = Precision(weight=2, grad=4, master=4, moment=4, act=2)
    with torch.device("meta"):
        model = Transformer(cfg)
    stages = stage_layers(cfg.num_hidden_layers, lay.pp)
    per_stage = []
    for s, layers in enumerate(stages):
        dense = routed = 0.0
        for name, p in model.named_parameters():
            parts = name.split(".")
            mine = (
                (parts[0] == "layers" and int(parts[1]) in layers)
                or (parts[0] == "embed_tokens" and s == 0)
                or (parts[0] in ("norm", "lm_head", "mtp") and s == lay.pp - 1)
            )
            if mine:
                if ".mlp.experts." in name:
                    routed += p.numel()
                else:
                    dense += p.numel()
        dense, routed = dense / lay.tp, routed / lay.ep
        edp = lay.dp // lay.ep
        w = 2 * (dense / (lay.dp if lay.zero >= 3 else 1) + routed / (edp if lay.zero >= 3 else 1))
        g = 4 * (dense / (lay.dp if lay.zero >= 2 else 1) + routed / (edp if lay.zero >= 2 else 1))
        o = 12 * (dense / (lay.dp if lay.zero >= 1 else 1) + routed / (edp if lay.zero >= 1 else 1))
        per_stage.append((w, g, o))
    plan = TrainPlanConfig(tokens=1, count=count, seq_len=64, mtp_depth=1, layout=lay, bytes=b)
    m = memory_per_device(cfg, plan)
    assert (m.weights, m.grads, m.optimizer) in [pytest.approx(x) for x in per_stage]
    if layout == Layout():  # one stage, no tp or ep: every weight on every device, the state over dp = 4
        n = sum(p.numel() for p in model.parameters())
        assert m.weights == pytest.approx(2 * n) and m.optimizer == pytest.approx(12 * n / 4)
    assert m.activations > 0
    recomputed = memory_per_device(cfg, replace(plan, recompute=True))
    assert recomputed.activations < m.activations


@pytest.mark.parametrize(
    "count,layout,degree",
    [
        (8, Layout(tp=3), "tp=3"),  # 4 heads
        (8, Layout(ep=3), "ep=3"),  # 8 experts
        (8, Layout(tp=2, pp=3), "pp=3"),  # 6 does not divide 8
        (8, Layout(dp=3), "dp=3"),
        (8, Layout(pp=5), "pp=5"),  # more stages than 4 layers
        (4, Layout(tp=2, ep=4), "ep=4"),  # ep must divide dp=2
    ],
)
def test_impossible_layouts_are_refused_naming_the_degree(count, layout, degree):
    with pytest.raises(PlanError, match=degree):
        check_layout(TINY, count, layout)


def test_does_not_fit_and_the_smallest_layout_that_does():
    tiny_device = Accelerator("small-mem", 1e12, None, 15e6, 1e11, 1.0)
    plan = TrainPlanConfig(tokens=1e9, count=8, seq_len=128, mtp_depth=1)
    p = plan_training(TINY, plan, tiny_device)
    assert not p.fits
    best = smallest_fitting_layout(TINY, plan, tiny_device)
    assert best is not None
    assert plan_training(TINY, replace(plan, layout=best), tiny_device).fits


def test_v3_gpu_hours_within_15_percent_of_the_report():
    """The report's MFU is derived (an output), then the plan at the round figure 0.4 of bf16 peak lands
    within 15% of the 2.664M pretraining GPU-hours."""
    d = v3_implied_mfu()
    assert 0.3 < d.mfu_bf16 < 0.5 and d.mfu_fp8 == pytest.approx(d.mfu_bf16 * 989 / 1979)
    plan = TrainPlanConfig(tokens=parse_count("14.8T"), count=2048, seq_len=4096, mtp_depth=1, mfu=0.4)
    p = plan_training(get_preset("deepseek-v3"), plan, ACCELERATORS["h800"])
    assert abs(p.gpu_hours / V3_PRETRAIN_GPU_HOURS - 1) < 0.15
    assert abs(p.dollars / 5.328e6 - 1) < 0.15  # 2.664M hours at $2


def test_v2_cache_reduction_from_the_configs():
    c = v2_cache_check()
    assert c.mla_values == (512 + 64) * 60 and c.mha_values == 2 * 128 * 128 * 60
    assert c.reduction_vs_mha == pytest.approx(1 - 576 / 32768)
    assert c.reduction_vs_67b_6bit == pytest.approx(0.933, abs=0.002)  # the paper's 93.3%
    s = cache_sizes(get_preset("deepseek-v2"), cache_bytes=2, gqa_groups=8)
    assert s.gqa == 2 * 8 * 128 * 60 * 2 and model_stats(get_preset("deepseek-v2")).latent_cache_bytes == s.mla
    with pytest.raises(PlanError, match="gqa_groups=3"):
        plan_serving(get_preset("deepseek-v2-lite"), ServePlanConfig(cache="gqa", gqa_groups=3), ACCELERATORS["h200"])


def test_v32_stores_the_indexer_key_and_reads_only_the_top_k_latents():
    """DeepSeek-V3.2 on 16 H800s at 128K context: each token stores 576 + 128 values a layer, and a decode step
    reads every indexer key but only 2,048 latents a sequence, so the bound beats dense V3 per device."""
    v3, v32 = get_preset("deepseek-v3"), get_preset("deepseek-v3.2")
    s = cache_sizes(v32, cache_bytes=2)
    assert s.index == 128 * 61 * 2 and s.mla == (576 + 128) * 61 * 2
    assert cache_read(v32, s, "mla", 131072) == 131072 * s.index + 2048 * 576 * 61 * 2
    assert cache_read(v32, s, "mla", 1000) == 1000 * s.mla  # shorter than index_topk: everything is read
    assert cache_read(v3, cache_sizes(v3), "mla", 131072) == 131072 * 576 * 61 * 2
    plan = ServePlanConfig(context=131072, count=16)
    dense, sparse = (plan_serving(c, plan, ACCELERATORS["h800"]) for c in (v3, v32))
    assert sparse.max_sequences < dense.max_sequences  # a bigger cache per token holds fewer sequences
    assert sparse.tokens_per_s_device > 1.2 * dense.tokens_per_s_device  # but each step reads far less


def test_serving_bound_by_hand():
    """tiny on a made-up device: 1 GB, 1 GB/s, $3.6/h, one device, bf16 weights and cache, batch 1 at 100 tokens.
    bytes = 2·active + 100·cache; step = bytes / 1e9 s; tokens/s = 1 / step; $/M = 3.6 / 3600 / tok_s · 1e6."""
    dev = Accelerator("hand", 1e12, None, 1e9, 1e9, 3.6)
    s = model_stats(TINY)
    cache = (64 + 16) * 4 * 2  # (kv_lora + rope) · layers · 2 bytes
    plan = plan_serving(TINY, ServePlanConfig(context=100, batch=1, count=1, weight_bytes=2, headroom=1.0), dev)
    step_bytes = 2 * s.active + 100 * cache
    assert plan.cache_per_token == cache and plan.step_bytes == step_bytes
    assert plan.tokens_per_s_device == pytest.approx(1e9 / step_bytes)
    assert plan.dollars_per_million == pytest.approx(3.6 / 3600 / (1e9 / step_bytes) * 1e6)
    assert plan.max_sequences == (1e9 - 2 * s.total) // (100 * cache)
    # a batch of 8 tokens touches 8·(1 − (1 − 2/8)^8) experts of 8 per MoE layer, not 2
    touched = 8 * (1 - 0.75**8)
    assert weights_read(TINY, 8, s.active) == pytest.approx(s.active + (touched - 2) * 3 * 128 * 128 * 3)


def test_cli_plan_train_serve_check(capsys, tmp_path):
    argv = ["plan", "train", "--model", "deepseek-v3", "--tokens", "14.8T", "--gpu", "h800", "--count", "2048"]
    assert main([*argv, "--pp", "16", "--ep", "64", "--recompute", "--search"]) == 0
    out = capsys.readouterr().out
    for key in ("GPU-hours", "FLOPs per token", "memory per device", "smallest layout that fits", "this plan / report"):
        assert key in out
    assert main([*argv, "--zero", "0"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main([*argv, "--ep", "3"]) == 2
    assert "ep=3" in capsys.readouterr().err
    png = tmp_path / "serve.png"
    serve = ["plan", "serve", "--model", "deepseek-v2", "--gpu", "h200", "--count", "8", "--context", "8192"]
    assert main([*serve, "--api-price", "deepseek=1.10", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for key in ("MLA latent", "MHA, same heads", "concurrent sequences", "decode bound", "per million", "deepseek"):
        assert key in out
    assert png.stat().st_size > 1000
    assert main(["plan", "check"]) == 0
    assert "93.3%" in capsys.readouterr().out
