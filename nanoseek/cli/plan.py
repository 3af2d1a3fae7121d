"""`nanoseek plan train` and `nanoseek plan serve`: what a run costs before it runs.

    nanoseek plan train --model deepseek-v3 --tokens 14.8T --gpu h800 --count 2048 --pp 16 --ep 64
    nanoseek plan train --model small --tokens 10M --gpu cpu --count 1 --seq-len 256 --global-batch 8
    nanoseek plan serve --model deepseek-v3 --gpu h200 --count 8 --context 8192 --plot plan.png
    nanoseek plan check                  # the published figures: V3 GPU-hours and MFU, V2's cache reduction

Flags map onto `nanoseek.plan.train.TrainPlanConfig` (with `Layout`, `Precision`) and
`nanoseek.plan.serve.ServePlanConfig`; `--gpu` names an accelerator preset (`nanoseek.plan.hardware`) or
`cpu`, this machine as measured (peak from /proc/cpuinfo, a copy bandwidth).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek.checkpoint.hf import load_config
from nanoseek.model.config import ConfigError, ModelConfig
from nanoseek.model.presets import PRESETS, get_preset
from nanoseek.model.v4_config import CSA, HCA
from nanoseek.plan.hardware import ACCELERATORS, Accelerator, get_accelerator, human, parse_count, this_cpu
from nanoseek.plan.plot import context_grid, serving_curves, write_plot
from nanoseek.plan.reference import (
    V3_GPUS,
    V3_PRETRAIN_GPU_HOURS,
    V3_PRICE,
    V3_TOKENS,
    V3_TOTAL_GPU_HOURS,
    v2_cache_check,
    v3_implied_mfu,
)
from nanoseek.plan.serve import ServePlanConfig, cache_sizes, plan_serving
from nanoseek.plan.train import Layout, Precision, TrainPlanConfig, plan_training, smallest_fitting_layout


def _config(name_or_dir: str) -> ModelConfig:
    if Path(name_or_dir).is_dir():
        return load_config(name_or_dir)
    if name_or_dir in PRESETS:
        return get_preset(name_or_dir)
    raise ConfigError(f"{name_or_dir!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")


def _device(args: argparse.Namespace) -> Accelerator:
    if args.gpu == "cpu":
        dev = this_cpu(bandwidth=args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else None)
        dev = dev.with_price(args.price or 0.0)
    else:
        dev = get_accelerator(args.gpu, args.price)
    if args.peak_tflops:
        dev = Accelerator(dev.name, args.peak_tflops * 1e12, None, dev.memory_bytes, dev.bandwidth, dev.price_per_hour)
    return dev


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB"


def cmd_train(args: argparse.Namespace) -> None:
    cfg, dev = _config(args.model), _device(args)
    precision = Precision(args.weight_bytes, args.grad_bytes, args.master_bytes, args.moment_bytes, args.act_bytes)
    layout = Layout(tp=args.tp, pp=args.pp, ep=args.ep, zero=args.zero, dp=args.dp)
    mtp = cfg.num_nextn_predict_layers if args.mtp_depth is None else args.mtp_depth
    plan_cfg = TrainPlanConfig(
        tokens=parse_count(args.tokens),
        count=args.count,
        seq_len=args.seq_len,
        global_batch=args.global_batch,
        micro_batch=args.micro_batch,
        mtp_depth=mtp,
        mfu=args.mfu,
        precision=args.precision,
        recompute=args.recompute,
        headroom=args.headroom,
        layout=layout,
        bytes=precision,
    )
    p = plan_training(cfg, plan_cfg, dev)
    label = "fp32 threads x FMA width x clock" if args.gpu == "cpu" and not args.peak_tflops else plan_cfg.precision
    print(f"plan: train {args.model} on {plan_cfg.count} x {dev.name}, {human(plan_cfg.tokens)} tokens")
    print(
        f"  FLOPs per token        {human(p.flops_per_token)}  (6 x active params + causal attention, seq "
        f"{plan_cfg.seq_len}, MTP depth {mtp})"
    )
    print(f"  total FLOPs            {p.total_flops:.3e}")
    print(f"  peak per device        {human(p.peak, 'FLOP/s')} ({label}), MFU {plan_cfg.mfu:.3f} (assumed)")
    print(f"  GPU-hours              {p.gpu_hours:,.2f}  ({p.gpu_hours / 1e6:.3f}M)")
    print(
        f"  wall time              {p.wall_days:,.2f} days  ({p.wall_days * 24:,.2f} h, {p.wall_days * 86400:,.0f} s)"
    )
    print(
        f"  step                   {p.step_s:,.3f} s for {plan_cfg.global_batch} x {plan_cfg.seq_len} tokens; "
        f"{p.steps:,.0f} steps"
    )
    print(f"  cost                   ${p.dollars:,.0f} at ${dev.price_per_hour:g} per device-hour (assumed price)")
    m = p.memory
    print(f"  memory per device      layout {p.layout.describe()}, recompute {'on' if plan_cfg.recompute else 'off'}")
    print(
        f"    weights {_gb(m.weights)}, gradients {_gb(m.grads)}, optimizer {_gb(m.optimizer)}, "
        f"activations {_gb(m.activations)}"
    )
    verdict = "fits" if p.fits else "DOES NOT FIT"
    print(
        f"    total {_gb(m.total)} of {_gb(p.capacity)} usable ({plan_cfg.headroom:.0%} of {_gb(dev.memory_bytes)}): "
        f"{verdict}"
    )
    if not p.fits or args.search:
        best = smallest_fitting_layout(cfg, plan_cfg, dev)
        found = best.describe() if best else f"none on {plan_cfg.count} devices"
        print(f"  smallest layout that fits: {found}")
    if args.model == "deepseek-v3":
        ratio = p.gpu_hours / V3_PRETRAIN_GPU_HOURS
        print(
            f"  DeepSeek-V3 report: {V3_PRETRAIN_GPU_HOURS / 1e6:.3f}M GPU-hours of pretraining; "
            f"this plan / report = {ratio:.3f}"
        )


def cmd_serve(args: argparse.Namespace) -> None:
    cfg, dev = _config(args.model), _device(args)
    plan_cfg = ServePlanConfig(
        context=args.context,
        batch=args.batch,
        count=args.count,
        cache=args.cache,
        gqa_groups=args.gqa_groups,
        cache_bytes=args.cache_bytes,
        weight_bytes=args.weight_bytes,
        headroom=args.headroom,
        overhead_s=args.overhead_ms / 1e3,
        seq_overhead_s=args.seq_overhead_ms / 1e3,
    )
    sizes = cache_sizes(cfg, args.cache_bytes, args.gqa_groups, args.context)
    print(
        f"plan: serve {args.model} on {args.count} x {dev.name} ({_gb(dev.memory_bytes)}, "
        f"{dev.bandwidth / 1e12:.2f} TB/s), context {args.context}"
    )
    print(f"  cache per token ({args.cache_bytes:g} B a value, {cfg.num_hidden_layers} layers):")
    if cfg.model_type == "deepseek_v4":
        v4 = cfg.v4
        print(
            f"    V4 window + compressed {sizes.mla:>10,.0f} B  (at {args.context} tokens: a {v4.sliding_window}-token "
            f"window, CSA 1/{v4.rate(CSA)} with top-{cfg.index_topk:,} read, HCA 1/{v4.rate(HCA)})"
        )
    elif sizes.index:
        print(
            f"    MLA latent + indexer {sizes.mla:>12,.0f} B  "
            f"(indexer key {sizes.index:,.0f} B; top-{cfg.index_topk:,} read)"
        )
    else:
        print(f"    MLA latent           {sizes.mla:>12,.0f} B")
    own = "V4's cache" if cfg.model_type == "deepseek_v4" else "the latent"
    kind = "V4" if cfg.model_type == "deepseek_v4" and args.cache == "mla" else args.cache
    if sizes.gqa is not None:
        print(f"    GQA, {sizes.gqa_groups} groups        {sizes.gqa:>12,.0f} B  ({sizes.gqa / sizes.mla:.1f}x {own})")
    print(f"    MHA, same heads      {sizes.mha:>12,.0f} B  ({sizes.mha / sizes.mla:.1f}x {own})")
    p = plan_serving(cfg, plan_cfg, dev)
    print(
        f"  weights per device     {_gb(p.weights_per_device)} ({args.weight_bytes:g} B a weight); "
        f"free for the cache {_gb(p.free_per_device)}"
    )
    print(
        f"  concurrent sequences   {p.max_sequences:,} at {args.context} tokens ({kind} cache, group of {args.count})"
    )
    print(
        f"  decode bound           batch {p.batch:,}: {human(p.step_bytes, 'B')} read per step, "
        f"{p.step_s * 1e3:,.2f} ms a step, {p.tokens_per_s_device:,.0f} tokens/s per device"
    )
    print(
        f"  cost                   ${p.dollars_per_million:,.3f} per million output tokens at "
        f"${dev.price_per_hour:g} per device-hour (assumed price; a bound: real serving is slower)"
    )
    for item in args.api_price or []:
        name, _, price = item.partition("=")
        print(f"    published API price  {name}: ${float(price):,.3f} per million output tokens")
    if args.plot:
        curves = serving_curves(cfg, plan_cfg, dev, context_grid(max(args.context, cfg.max_position_embeddings)))
        write_plot(args.plot, f"{args.model} on {args.count} x {dev.name}", curves, args.gqa_groups)
        print(f"  plot: {args.plot}")


def cmd_check(args: argparse.Namespace) -> None:
    d = v3_implied_mfu()
    print("DeepSeek-V3 (report: 2.664M H800 GPU-hours pretraining of 2.788M, 14.8T tokens, 4K, FP8, 2,048 GPUs)")
    print(f"  FLOPs per token (4K, MTP depth 1)   {human(d.flops_per_token)}")
    print(
        f"  implied MFU = fpt x 14.8T / (2.664M x 3600 x peak): {d.mfu_bf16:.3f} of bf16 peak (989 TFLOP/s), "
        f"{d.mfu_fp8:.3f} of fp8 peak (1979)"
    )
    cfg = get_preset("deepseek-v3")
    plan_cfg = TrainPlanConfig(tokens=V3_TOKENS, count=V3_GPUS, seq_len=4096, mtp_depth=1, mfu=args.mfu)
    p = plan_training(cfg, plan_cfg, ACCELERATORS["h800"])
    print(
        f"  plan at MFU {args.mfu} of bf16 peak: {p.gpu_hours / 1e6:.3f}M GPU-hours "
        f"({p.gpu_hours / V3_PRETRAIN_GPU_HOURS - 1:+.1%} vs 2.664M); ${p.dollars / 1e6:.3f}M at ${V3_PRICE:g}/h "
        f"(report: ${V3_TOTAL_GPU_HOURS * V3_PRICE / 1e6:.3f}M for all {V3_TOTAL_GPU_HOURS / 1e6:.3f}M hours)"
    )
    c = v2_cache_check()
    print("DeepSeek-V2 KV cache (values per token, all layers)")
    print(
        f"  MLA latent (512 + 64) x 60 = {c.mla_values:,}; MHA with the same 128 heads of 128: {c.mha_values:,} "
        f"-> {c.reduction_vs_mha:.1%} smaller ({c.mha_values / c.mla_values:.1f}x)"
    )
    print(
        f"  DeepSeek 67B (GQA, 8 KV heads of 128, 95 layers): {c.gqa67b_values:,} -> {c.reduction_vs_67b_bf16:.1%} "
        f"smaller at equal precision; {c.reduction_vs_67b_6bit:.1%} with V2's ~6-bit cache (paper: 93.3%)"
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="deepseek-v3", help="preset name or checkpoint directory")
    p.add_argument("--gpu", default="h800", choices=[*ACCELERATORS, "cpu"], help="accelerator preset, or cpu")
    p.add_argument("--count", type=int, default=8, help="devices")
    p.add_argument("--price", type=float, help="$ per device-hour (default: the preset's assumed price)")
    p.add_argument("--headroom", type=float, default=0.9, help="fraction of device memory a plan may fill")
    p.add_argument("--peak-tflops", type=float, help="override the device's peak TFLOP/s")
    p.add_argument("--bandwidth-gbs", type=float, help="with --gpu cpu: memory bandwidth in GB/s (default: measured)")


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan",
        help="what a training or serving run costs: memory, time, money",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan_sub = plan.add_subparsers(dest="plan", required=True)

    t = plan_sub.add_parser("train", help="FLOPs, GPU-hours, dollars and memory per device of a training run")
    _common(t)
    t.add_argument("--tokens", required=True, help="token budget: 14.8T, 500M, 1e9")
    t.add_argument("--seq-len", type=int, default=4096)
    t.add_argument("--global-batch", type=int, default=1920, help="sequences per optimizer step, all devices")
    t.add_argument("--micro-batch", type=int, default=1, help="sequences per device per forward")
    t.add_argument("--mtp-depth", type=int, help="MTP depth trained (default: the model's MTP modules)")
    t.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization assumed (default 0.4)")
    t.add_argument("--precision", default="bf16", choices=["bf16", "fp8"], help="the peak the MFU is of")
    g = t.add_argument_group("layout (dp = count / (tp x pp))")
    g.add_argument("--tp", type=int, default=1)
    g.add_argument("--pp", type=int, default=1)
    g.add_argument("--ep", type=int, default=1)
    g.add_argument("--dp", type=int, default=0, help="checked against count / (tp x pp) when given")
    g.add_argument("--zero", type=int, default=1, help="0 DDP, 1 optimizer sharded, 2 + gradients, 3 FSDP")
    g.add_argument("--recompute", action="store_true", help="full activation recomputation")
    g.add_argument("--search", action="store_true", help="also print the smallest layout that fits")
    g = t.add_argument_group("bytes per value")
    g.add_argument("--weight-bytes", type=float, default=2)
    g.add_argument("--grad-bytes", type=float, default=4)
    g.add_argument("--master-bytes", type=float, default=4, help="fp32 master weights (0 when weights are fp32)")
    g.add_argument("--moment-bytes", type=float, default=4, help="each Adam moment (DeepSeek-V3: 2, bf16)")
    g.add_argument("--act-bytes", type=float, default=2)
    t.set_defaults(func=cmd_train)

    s = plan_sub.add_parser("serve", help="cache, concurrent sequences, decode bound and $ per million tokens")
    _common(s)
    s.add_argument("--context", type=int, default=4096, help="tokens per sequence held in the cache")
    s.add_argument("--batch", type=int, default=0, help="sequences decoded together (0: as many as fit)")
    s.add_argument("--cache", default="mla", choices=["mla", "mha", "gqa"])
    s.add_argument("--gqa-groups", type=int, default=8)
    s.add_argument("--cache-bytes", type=float, default=2)
    s.add_argument("--weight-bytes", type=float, default=1, help="bytes per weight (1 = fp8, as V3 is released)")
    s.add_argument("--overhead-ms", type=float, default=0.0, help="per decode step time beyond memory traffic")
    s.add_argument("--seq-overhead-ms", type=float, default=0.0, help="per sequence per decode step, beyond traffic")
    s.add_argument("--api-price", action="append", metavar="NAME=PRICE", help="a published $ per M output tokens")
    s.add_argument("--plot", help="PNG: concurrent sequences and decode bound vs context, MLA vs MHA vs GQA")
    s.set_defaults(func=cmd_serve)

    c = plan_sub.add_parser("check", help="the plan against DeepSeek's published figures")
    c.add_argument("--mfu", type=float, default=0.4, help="MFU of bf16 peak the V3 plan is run at (default 0.4)")
    c.set_defaults(func=cmd_check)
