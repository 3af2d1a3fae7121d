"""`nanoseek generate` (a quick look at a checkpoint, streamed), `nanoseek bench decode` (speed) and `nanoseek bench
quality` (what each weight format costs in quality); see docs/engine.md.

nanoseek generate --model runs/tiny --prompt "What is 12 + 30?" --max-tokens 64 --temperature 0
nanoseek generate --model runs/tiny --prompt "Hi" --chat --n 3 --seed 1 --mtp
nanoseek bench decode --preset small            # or --model DIR; nanoseek vs transformers, as ratios
nanoseek bench decode --preset small --weights fp32 bf16 int8 int4      # each weight format beside the others
nanoseek bench decode --preset long-v32 --context 1024 4096 16384 --compare-dense   # V3.2 vs dense V3 by context
nanoseek bench quality --model runs/zero/model --heldout runs/zero/data          # loss, top-1 agreement, pass@1
nanoseek bench profile --preset small --weights fp32 int8 --compile --no-compile  # where a decode step's time goes
nanoseek bench constrained --preset tiny --batch 16   # grammar-constrained (JSON schema) vs free decoding
nanoseek bench prefill --preset tiny                  # chunked prefill: running streams' gaps, new prompts' TTFT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from nanoseek.bench.constrained import ConstrainedBenchConfig
from nanoseek.bench.constrained import run as run_constrained
from nanoseek.bench.decode import DecodeBenchConfig, run
from nanoseek.bench.prefill import PrefillBenchConfig
from nanoseek.bench.prefill import run as run_prefill
from nanoseek.bench.profile import ProfileConfig
from nanoseek.bench.profile import run as run_profile
from nanoseek.bench.quality import QualityBenchConfig
from nanoseek.bench.quality import run as run_quality
from nanoseek.cli.flags import add_allow_nonfinite_weights, add_engine_weights
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import NanoseekError
from nanoseek.fileio import atomic_write_text
from nanoseek.model.quant import WEIGHT_FORMATS


def cmd_generate(args: argparse.Namespace) -> None:
    if not (Path(args.model) / "config.json").is_file():
        raise NanoseekError(f"{args.model} is not a checkpoint directory (no config.json)")
    if not (Path(args.model) / "tokenizer.json").is_file():
        raise NanoseekError(f"{args.model} has no tokenizer.json: `generate` takes and prints text")
    if args.threads:
        torch.set_num_threads(args.threads)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        n=args.n,
    )
    engine = Engine(
        args.model,
        use_mtp=args.mtp,
        device=args.device,
        max_batch_size=max(args.n, 1),
        allow_nonfinite=args.allow_nonfinite_weights,
        weights=args.weights,
        compile=args.compile,
    )
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    try:
        if args.n == 1:
            _stream(engine, tok, tok.encode(text), params)
        else:
            for c in engine.generate([tok.encode(text)], params)[0].outputs:
                print(f"--- sample {c.index} ({c.finish_reason}, {len(c.token_ids)} tokens)\n{c.text}")
    except ValueError as e:  # the engine refuses a request with ValueError: say what and exit 2
        raise NanoseekError(str(e)) from None
    s = engine.stats
    mtp = f", MTP acceptance {s.acceptance_rate:.0%}" if engine.use_mtp else ""
    compiled = f", {engine.compile_seconds:.1f} s compiling the decode step" if engine.compiled else ""
    print(
        f"[{s.generated_tokens} tokens in {s.decode_steps} decode steps{mtp}{compiled}; {args.weights} weights]",
        file=sys.stderr,
    )


def _stream(engine, tok, ids: list[int], params) -> None:
    """Print text as tokens arrive; a character split over tokens waits for its last byte."""
    decoder = tok.decode_stream(skip_special_tokens=True)
    printed, out_ids, finish = "", [], None
    for event in engine.stream(ids, params):
        out_ids.append(event.token_id)
        piece = decoder.step(tok.tk, event.token_id)
        if piece:
            print(piece, end="", flush=True)
            printed += piece
        finish = event.finish_reason
    full = tok.decode(out_ids, skip_special_tokens=True)  # the end may hold incomplete bytes: print them as
    print(full[len(printed) :] if full.startswith(printed) else "")  # the full decode does (U+FFFD)
    print(f"[finished: {finish}]", file=sys.stderr)


def cmd_bench_quality(args: argparse.Namespace) -> None:
    result = run_quality(QualityBenchConfig(**{k: getattr(args, k) for k in QualityBenchConfig.__dataclass_fields__}))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")


def cmd_bench_profile(args: argparse.Namespace) -> None:
    if bool(args.model) == bool(args.preset):
        raise NanoseekError("give either --model DIR or --preset NAME")
    args.compile = args.compile or [False]
    run_profile(ProfileConfig(**{k: getattr(args, k) for k in ProfileConfig.__dataclass_fields__}))


def cmd_bench_constrained(args: argparse.Namespace) -> None:
    fields = ConstrainedBenchConfig.__dataclass_fields__
    run_constrained(ConstrainedBenchConfig(**{k: getattr(args, k) for k in fields if hasattr(args, k)}))


def cmd_bench_prefill(args: argparse.Namespace) -> None:
    run_prefill(PrefillBenchConfig(**{k: getattr(args, k) for k in PrefillBenchConfig.__dataclass_fields__}))


def cmd_bench_decode(args: argparse.Namespace) -> None:
    if bool(args.model) == bool(args.preset):
        raise NanoseekError("give either --model DIR or --preset NAME")
    run(DecodeBenchConfig(**{k: getattr(args, k) for k in DecodeBenchConfig.__dataclass_fields__}))


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text from a checkpoint through the engine (streams)")
    g.add_argument("--model", required=True, help="checkpoint directory (with tokenizer.json)")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    g.add_argument("--seed", type=int, help="same seed, same output")
    g.add_argument("--n", type=int, default=1, help="samples of the prompt (sharing one prefill)")
    g.add_argument("--mtp", action="store_true", help="MTP self-speculative decoding (checkpoints with MTP modules)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    add_allow_nonfinite_weights(g)
    add_engine_weights(g, long_running=False)
    g.set_defaults(func=cmd_generate)

    b = bench.add_parser(
        "decode",
        help="prefill and decode tokens/s against transformers' generate (per weight format), bandwidth "
        "fraction, KV-cache bytes, MTP acceptance and speedup",
    )
    b.add_argument("--model", help="checkpoint directory")
    b.add_argument("--preset", help="or a preset with random weights (e.g. small)")
    b.add_argument("--seed", type=int, default=0, help="weights of --preset and the random prompts")
    b.add_argument(
        "--prompt",
        nargs="+",
        help="prompt texts for the decode runs, cycled through (needs the "
        "checkpoint's tokenizer); default: random token ids",
    )
    b.add_argument("--prompt-len", type=int, default=32, help="random prompt length for the decode runs")
    b.add_argument("--prefill-len", type=int, default=256, help="prompt length of the prefill measurement")
    b.add_argument("--tokens", type=int, default=64, help="new tokens per decode measurement")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="decode batch sizes")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    b.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    b.add_argument("--bandwidth-mb", type=int, default=256, help="size of the copy measuring memory bandwidth")
    b.add_argument("--no-reference", action="store_true", help="skip transformers (nanoseek figures only)")
    b.add_argument(
        "--context",
        type=int,
        nargs="+",
        metavar="N",
        help="instead of the usual table: batch-1 greedy decode tok/s after a prefill of N tokens, for each N "
        "(e.g. 1024 4096 16384), and the cache bytes per token; no transformers reference",
    )
    b.add_argument(
        "--compare-dense",
        action="store_true",
        help="with --context and a DeepSeek-V3.2 model: also measure it as dense DeepSeek-V3 (the same weights, "
        "the indexer dropped), interleaved, with the ratio",
    )
    add_engine_weights(b, several=True)
    b.set_defaults(func=cmd_bench_decode)

    q = bench.add_parser(
        "quality",
        help="what each weight format costs against fp32: held-out loss, top-1 agreement, KL, pass@1, weight bytes",
    )
    q.add_argument("--model", required=True, help="checkpoint directory (with tokenizer.json for pass@1)")
    q.add_argument("--heldout", help="dataset directory holding heldout.bin (e.g. RUN/data); omit: no loss rows")
    q.add_argument(
        "--weights",
        nargs="+",
        choices=WEIGHT_FORMATS,
        default=list(WEIGHT_FORMATS),
        metavar="FORMAT",
        help=f"weight formats to measure ({', '.join(WEIGHT_FORMATS)}; default all)",
    )
    q.add_argument("--sequences", type=int, default=64, help="held-out windows scored (default 64)")
    q.add_argument("--seq-len", type=int, help="tokens per window (default: the zero run's seq_len, else 256)")
    q.add_argument(
        "--eval-problems",
        type=int,
        help="held-out problems for pass@1 (default: the zero run's, else 200; 0 = skip pass@1)",
    )
    q.add_argument("--task", help="task of pass@1 (default: the zero run's demo task, else arithmetic)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    q.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the engines' decode step (default off: quality, not speed, is measured)",
    )
    q.add_argument("--json", help="also write the numbers as JSON here")
    q.set_defaults(func=cmd_bench_quality)

    p = bench.add_parser("profile", help="where a decode step's time goes: operators, time outside them, host syncs")
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--preset", help="or a preset with random weights (e.g. small)")
    p.add_argument("--seed", type=int, default=0, help="weights of --preset and the random prompts")
    p.add_argument("--weights", nargs="+", choices=WEIGHT_FORMATS, default=["fp32"], metavar="FORMAT")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="decode batch sizes")
    p.add_argument("--steps", type=int, default=20, help="decode steps profiled per configuration")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--compile", dest="compile", action="append_const", const=True, help="profile compiled engines")
    p.add_argument("--no-compile", dest="compile", action="append_const", const=False, help="eager engines (default)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--top", type=int, default=8, help="operators listed by self time per configuration (0: none)")
    p.set_defaults(func=cmd_bench_profile)

    c = bench.add_parser("constrained", help="grammar-constrained vs free decode tokens/s in one batch, mask cost")
    c.add_argument("--model", help="checkpoint directory (with tokenizer.json)")
    c.add_argument("--preset", help="or a preset with random weights and a tokenizer made on the spot (e.g. tiny)")
    c.add_argument("--seed", type=int, default=0, help="weights and tokenizer of --preset")
    c.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    c.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--mtp", action="store_true", help="MTP self-speculative decoding (checkpoints with MTP modules)")
    c.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    c.set_defaults(func=cmd_bench_constrained)

    f = bench.add_parser("prefill", help="running streams' inter-token gaps and new prompts' TTFT per prefill budget")
    f.add_argument("--model", help="checkpoint directory")
    f.add_argument("--preset", help="or a preset with random weights (its context stretched to fit the prompts)")
    f.add_argument("--seed", type=int, default=0, help="weights of --preset and the random prompts")
    f.add_argument("--running", type=int, default=16, help="requests decoding when the prompts arrive")
    f.add_argument("--arrivals", type=int, default=8, help="prompts arriving at once")
    f.add_argument("--prompt-len", type=int, default=1000, help="tokens per arriving prompt")
    f.add_argument(
        "--budgets", type=int, nargs="+", default=[0, 256, 1024, 2048], help="max_num_batched_tokens (0: whole)"
    )
    f.add_argument("--rounds", type=int, default=3)
    f.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    f.set_defaults(func=cmd_bench_prefill)
