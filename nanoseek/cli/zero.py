"""`nanoseek zero` and `nanoseek distill`: R1-Zero from scratch in one command, then distillation into a
smaller student (see docs/zero.md).

    nanoseek zero [--preset smoke|default] [--model-preset tiny|tiny-v32|tiny-v4] [--out RUN_DIR] [--seed N]
                  [--threads N] [--nproc N] [--resume]
    nanoseek distill --run RUN_DIR [--preset smoke|default] [--out DIR] [--resume]
"""

from __future__ import annotations

import argparse

from nanoseek.cli.flags import add_progress
from nanoseek.errors import NanoseekError
from nanoseek.rl.distill import distill_preset, run_distill
from nanoseek.rl.zero import run_zero
from nanoseek.rl.zero_config import MODEL_PRESETS, ZERO_PRESETS, load_run_config, preset


def _zero_config(args: argparse.Namespace):
    if args.resume and args.preset is None and args.model_preset is None:
        cfg = load_run_config(args.out)  # the run's own settings
        if args.seed is not None and args.seed != cfg.seed:
            raise NanoseekError(f"--resume: the run in {args.out} has seed {cfg.seed}, not {args.seed}")
    else:  # with --resume, the settings asked for must be the run's (run_zero compares them)
        name = args.preset or (load_run_config(args.out).preset if args.resume else "default")
        cfg = preset(name, seed=args.seed or 0, model=args.model_preset or "tiny")
    if args.threads is not None:
        cfg.threads = args.threads
    return cfg


def cmd_zero(args: argparse.Namespace) -> None:
    cfg = _zero_config(args)
    result = run_zero(cfg, args.out, resume=args.resume, progress=args.progress, nproc=args.nproc)
    t = result.targets
    print(
        f"zero: {t['task']}: held-out pass@1 {t['base_pass@1']:.1%} (base) -> {t['rl_pass@1']:.1%} (after GRPO), "
        f"mean length {t['eval_length_base']:.0f} -> {t['eval_length_rl']:.0f} tokens; "
        f"total {sum(result.seconds.values()):.0f}s"
    )
    print(f"zero: report {result.report}")
    print(f"zero: model  {result.model_dir}   (nanoseek chat --model {result.model_dir})")


def cmd_distill(args: argparse.Namespace) -> None:
    cfg = distill_preset(args.preset, seed=args.seed)
    result = run_distill(cfg, args.run, args.out, resume=args.resume, progress=args.progress)
    e = result.evals
    print(
        f"distill: kept {result.traces['kept']} verified traces of {result.traces['sampled']} samples; held-out "
        f"pass@1: teacher {e['teacher']['pass_at_1']:.1%}, student pretrained {e['student_base']['pass_at_1']:.1%}, "
        f"distilled {e['student_distill']['pass_at_1']:.1%}, RL alone {e['student_rl']['pass_at_1']:.1%}"
    )
    print(f"distill: report {result.report}")


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    z = sub.add_parser(
        "zero",
        help="R1-Zero from scratch: corpus, tokenizer, base model, GRPO, report",
        description="Build the corpus, train the tokenizer, pretrain a small MLA+MoE base model, "
        "evaluate it, run GRPO from it with rule rewards, evaluate again and write "
        "RUN_DIR/report.md. The final model (HF format + tokenizer) is RUN_DIR/model.",
    )
    z.add_argument(
        "--preset",
        choices=ZERO_PRESETS,
        default=None,
        help="default: the demo (~20-25 min on 2 cores); smoke: about a minute (tests). Default: default, or "
        "the run's own preset with --resume",
    )
    z.add_argument(
        "--model-preset",
        choices=MODEL_PRESETS,
        default=None,
        help="the model shape's base: tiny (DeepSeek-V3, the default), tiny-v32 (DeepSeek-V3.2: sparse attention "
        "behind a lightning indexer, pretrained with a dense warm-up first) or tiny-v4 (DeepSeek-V4: sliding window, "
        "compressed attention, hyper-connections)",
    )
    z.add_argument("--out", default="runs/zero", help="run directory (default runs/zero)")
    z.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the corpus, model init, data order and GRPO (the held-out eval problems stay fixed); default 0",
    )
    z.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice; on a busy machine 1 can be much faster)",
    )
    z.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes for pretraining and GRPO (torchrun, one CPU core each at least; evaluation stays in one). "
        "GRPO's prompts per step and pretraining's batch must divide by it. Default 1",
    )
    z.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out: finished stages are skipped, pretraining and GRPO resume from checkpoints",
    )
    add_progress(z)
    z.set_defaults(func=cmd_zero)

    d = sub.add_parser(
        "distill",
        help="distill a zero run's RL model into a smaller dense student; compare with the student trained by RL alone",
        description="Rejection-sample verified reasoning traces from RUN_DIR/model on train-split "
        "problems, fine-tune a smaller dense student (pretrained on the run's corpus) on "
        "them, train the same student by GRPO alone, and report held-out pass@1 of each.",
    )
    d.add_argument("--run", required=True, help="a finished `nanoseek zero` run directory")
    d.add_argument("--preset", choices=ZERO_PRESETS, default="default", help="default: a few minutes; smoke: seconds")
    d.add_argument("--out", default=None, help="output directory (default RUN/distill)")
    d.add_argument("--seed", type=int, default=0, help="seed of the sampled problems and the fine-tuning order")
    d.add_argument("--resume", action="store_true", help="continue a stopped distillation in --out")
    add_progress(d)
    d.set_defaults(func=cmd_distill)
