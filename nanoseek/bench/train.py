"""`nanoseek bench train`: nanoseek's training throughput against transformers' DeepseekV3ForCausalLM on the
same weights and the same random batches, in one run, with the ratio.

    nanoseek bench train --preset small                    # full training steps, tokens/s and MFU
    nanoseek bench train --preset small --mode forward     # forward, and forward+backward, tokens/s

mode "step" (the default): one step = forward, cross-entropy, backward, clip, fused AdamW step, for every
side. nanoseek's step is the trainer's own objective plus the aux-loss-free bias update; MTP is off
(transformers does not train MTP) and every sequence is one document (no document mask), so all sides
compute the same function. The sides take turns step by step, so load on a shared machine hits them alike.
Wall-clock medians are the result; CPU-time medians (process time / threads) are printed beside them
because they hardly move with the machine's load. transformers runs its default experts implementation
(grouped_mm on this version); `hf_eager_experts` adds its expert-by-expert loop as a further side.

mode "forward": the model alone, no optimizer: the median tokens/s of a no-grad forward and of a
forward+backward of the cross-entropy, each side timed in turn.

Both modes run fp32 (the compute dtype on CPU).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.errors import NanoseekError
from nanoseek.model.moe import update_bias
from nanoseek.model.presets import get_preset
from nanoseek.model.transformer import Transformer
from nanoseek.train.objective import PretrainObjective, peak_flops, training_flops_per_token
from nanoseek.train.optim import adamw

MODES = ("step", "forward")


@dataclass
class TrainBenchConfig:
    preset: str = "small"
    mode: str = "step"  # "step": full training steps; "forward": forward and forward+backward only
    batch: int = 8
    seq: int = 256
    steps: int = 5  # timed steps (or forward passes) per side; medians are reported
    threads: int | None = None
    compile: bool = False  # torch.compile nanoseek's side
    hf_eager_experts: bool = False  # also time transformers' expert-by-expert loop
    peak_tflops: float | None = None  # peak for MFU; None = estimated from the hardware


def load_reference(model: Transformer, eager_experts: bool = False) -> dict[str, nn.Module]:
    """transformers' model of the same weights (saved and reloaded), and with its expert loop if asked."""
    try:
        # transformers is the reference, a dev dependency only: imported when the benchmark runs.
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise NanoseekError("bench train compares against transformers: pip install 'transformers>=5.20'") from None
    hf = {}
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
        hf["transformers"] = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        if eager_experts:
            hf["transformers (eager experts)"] = AutoModelForCausalLM.from_pretrained(
                d, dtype=torch.float32, experts_implementation="eager"
            )
    return hf


def run(cfg: TrainBenchConfig, log=print) -> dict[str, float]:
    """Run the benchmark, print the table, return the median tokens/s of each side (and the ratios)."""
    if cfg.mode not in MODES:
        raise NanoseekError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_cfg = get_preset(cfg.preset, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    ours = Transformer(model_cfg)
    hf = load_reference(ours, cfg.hf_eager_experts)
    gen = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, model_cfg.vocab_size, (cfg.batch, cfg.seq + 1), generator=gen) for _ in range(cfg.steps + 1)
    ]
    return (_steps if cfg.mode == "step" else _forward)(cfg, ours, hf, batches, log)


def _steps(cfg: TrainBenchConfig, ours: Transformer, hf: dict[str, nn.Module], batches, log) -> dict[str, float]:
    threads = torch.get_num_threads()
    ours.train()
    objective = PretrainObjective(ours, 0)
    forward = torch.compile(objective) if cfg.compile else objective

    def ours_step(opt):
        def step(x):
            sums, _ = forward(x[:, :-1], [x[:, 1:]], None)
            (sums[0] / x[:, 1:].numel()).backward()
            torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_bias(ours, 1e-3)

        return step

    def hf_step(model, opt):
        def step(x):
            logits = model(x[:, :-1]).logits
            F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def optimizer(m: nn.Module):  # every side alike: the trainer's fused AdamW
        return adamw(m, 1e-4, weight_decay=0.1, betas=(0.9, 0.95))

    sides: dict[str, Callable] = {f"nanoseek{' (compiled)' if cfg.compile else ''}": ours_step(optimizer(ours))}
    sides.update({name: hf_step(m.train(), optimizer(m)) for name, m in hf.items()})
    B, T = cfg.batch, cfg.seq
    log(
        f"preset {cfg.preset} (MTP off), batch {B} x {T} tokens, {threads} threads, fp32; {cfg.steps} steps "
        f"per side, interleaved, after a warm-up; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    for step in sides.values():  # warm-up (and compilation)
        step(batches[0])
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for x in batches[1:]:
        for name, step in sides.items():
            w0, c0 = time.perf_counter(), time.process_time()
            step(x)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append((time.process_time() - c0) / threads)
    flops = training_flops_per_token(ours.config, T)
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(torch.device("cpu"), torch.float32)
    log(f"{'':30}{'tokens/s':>10}{'step s':>9}{'MFU':>8}   {'tokens/s by CPU time':>20}{'MFU':>8}")
    rate, out = {}, {}
    for name in sides:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        rate[name] = (B * T / w, B * T / c)
        out[name], out[f"{name} by CPU time"] = rate[name]
        mfu = [f"{flops * r / peak:8.1%}" if peak else "     n/a" for r in rate[name]]
        log(f"{name:30}{rate[name][0]:10.0f}{w:9.2f}{mfu[0]}   {rate[name][1]:20.0f}{mfu[1]}")
    ours_name = next(iter(sides))
    for name in hf:
        out[f"ratio/{name}"] = rate[ours_name][0] / rate[name][0]
        log(
            f"ratio nanoseek / {name}: {rate[ours_name][0] / rate[name][0]:.2f}x wall-clock, "
            f"{rate[ours_name][1] / rate[name][1]:.2f}x by CPU time"
        )
    if peak:
        log(
            f"MFU: {flops / 1e6:.1f} MFLOP per token (6 x activated "
            f"parameters + causal attention) over a peak of {peak / 1e9:.1f} GFLOP/s ({threads} threads x "
            "FLOPs/cycle x base clock; --peak-tflops to override)"
        )
    return out


def _forward(cfg: TrainBenchConfig, ours: Transformer, hf: dict[str, nn.Module], batches, log) -> dict[str, float]:
    ours_fn = torch.compile(ours) if cfg.compile else ours
    models: dict[str, tuple[nn.Module, Callable]] = {
        f"nanoseek{' (compiled)' if cfg.compile else ''}": (ours, lambda x: ours_fn(x))
    }
    models.update({name: (m, lambda x, m=m: m(x).logits) for name, m in hf.items()})
    n_tokens = cfg.batch * cfg.seq
    log(
        f"preset {cfg.preset} (MTP off), batch {cfg.batch} x {cfg.seq} tokens, {torch.get_num_threads()} threads, "
        f"fp32; {cfg.steps} passes per side, interleaved, after a warm-up"
    )
    width = {name: max(20, len(name) + 8) for name in hf}
    log(f"{'':22}{'nanoseek tok/s':>16}" + "".join(f"{name + ' tok/s':>{width[name]}}{'ratio':>8}" for name in hf))

    def forward(logits_of):
        def run_once(x):
            with torch.no_grad():
                logits_of(x[:, :-1])

        return run_once

    def forward_backward(model, logits_of):
        def run_once(x):
            F.cross_entropy(logits_of(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten()).backward()
            model.zero_grad(set_to_none=True)

        return run_once

    out = {}
    for label, train in (("forward", False), ("forward+backward", True)):
        runs = {}
        for name, (model, logits_of) in models.items():
            model.train(train)
            runs[name] = forward_backward(model, logits_of) if train else forward(logits_of)
        for fn in runs.values():  # warm-up
            fn(batches[0])
        times: dict[str, list[float]] = {name: [] for name in runs}
        for x in batches[1:]:
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
        rate = {name: n_tokens / statistics.median(t) for name, t in times.items()}
        ours_name = next(iter(rate))
        row = f"{label:22}{rate[ours_name]:16.0f}"
        for name in hf:
            out[f"{label}/ratio/{name}"] = rate[ours_name] / rate[name]
            row += f"{rate[name]:{width[name]}.0f}{rate[ours_name] / rate[name]:7.2f}x"
        out.update({f"{label}/{name}": r for name, r in rate.items()})
        log(row)
    return out
