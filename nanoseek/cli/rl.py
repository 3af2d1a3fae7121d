"""`nanoseek grpo`, `nanoseek eval` and `nanoseek bench grpo`: RL from verifiable rewards on the command line.

    nanoseek grpo --model ckpt/ --task arithmetic --out runs/grpo [--max-steps 200 --loss-type dr_grpo ...] [--resume]
    torchrun --nproc-per-node 2 -m nanoseek.cli grpo ...   (each rank rolls out prompts_per_step / 2 prompts)
    nanoseek eval --model runs/grpo/final --task arithmetic [--n 200 --k 8 --temperature 0.6] [--json out.json]
    nanoseek bench grpo [--steps 4 --rounds 3 --prompts 4 --num-generations 8 --length 64]

Every field of `GRPOConfig` is a flag of `grpo` (`--num-generations`, `--epsilon-high`, `--beta`, ...);
`--reward-weights accuracy=1,format=0.1`; task difficulty knobs as `--task-arg max_digits=3`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

import torch

from nanoseek.bench.grpo import BenchSettings, run_bench
from nanoseek.checkpoint.hf import from_pretrained
from nanoseek.checkpoint.tokenizer import Tokenizer
from nanoseek.cli.flags import add_allow_nonfinite_weights, add_engine_weights, add_progress
from nanoseek.engine.engine import Engine
from nanoseek.errors import NanoseekError
from nanoseek.rl.config import GRPOConfig
from nanoseek.rl.evaluate import evaluate
from nanoseek.rl.grpo import train_grpo
from nanoseek.tasks import get_task
from nanoseek.train import parallel
from nanoseek.train.metrics import plot_run

HELP = {
    "num_generations": "G: completions sampled per prompt",
    "prompts_per_step": "prompts per step (the batch is G x this)",
    "max_completion_length": "tokens per completion, EOS included",
    "temperature": "rollout sampling temperature",
    "top_p": "rollout nucleus sampling",
    "ignore_eos": "every completion runs to max_completion_length (benchmarks)",
    "loss_type": "grpo (per-sequence mean) | dr_grpo (constant normalizer) | dapo (token mean) | gspo (sequence ratio)",
    "scale_rewards": "advantage scaling: group | batch | none | auto (none for dr_grpo, else group)",
    "epsilon": "ratio clip ε (lower side); default 0.2, or 3e-4 for gspo (GSPO §5.1)",
    "epsilon_high": "upper ratio clip (DAPO clip-higher: 0.28); default = epsilon, or 4e-4 for gspo",
    "beta": "weight of the k3 KL to the reference; 0 loads no reference",
    "ref_model_sync_steps": "replace the reference by the policy every N steps (0 = never)",
    "mask_truncated_completions": "truncated completions get no loss (DAPO overlong filtering)",
    "dynamic_sampling": "drop groups whose rewards are all equal (DAPO)",
    "max_resample_rounds": "with --dynamic-sampling: extra sampling rounds to refill the batch",
    "reward_weights": "e.g. accuracy=1,format=0.1",
    "learning_rate": "AdamW learning rate",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay on matrices",
    "max_grad_norm": "gradient norm clip",
    "num_iterations": "μ: passes over each batch of rollouts",
    "num_minibatches": "optimizer steps per pass (minibatches of whole groups)",
    "micro_batch_size": "completions per forward/backward (memory only)",
    "old_logprobs": "π_old source when there are several updates: auto | forward | engine",
    "router_bias_update_speed": "γ of the MoE aux-loss-free bias update during RL (0 = frozen routing)",
    "max_steps": "GRPO steps to run (a resumed run continues to this step)",
    "seed": "seed of prompt sampling and rollouts",
    "save_steps": "checkpoint every N steps (and at the end)",
    "save_total_limit": "checkpoints kept",
    "eval_steps": "greedy held-out pass@1 every N steps (0 = never)",
    "eval_problems": "held-out problems per periodic eval",
    "fsdp": "under torchrun: the update under FSDP2 (weights, gradients, AdamW state sharded); the engine "
    "samples from a full copy synced after every optimizer step",
    "expert_parallel": "under torchrun: each rank holds E / WORLD_SIZE routed experts in the update (DDP for "
    "the rest); the engine samples from a full copy synced after every optimizer step",
}

BENCH_HELP = {
    "preset": "model shape to build with random weights (when --model is not given)",
    "model": "an existing HF-format checkpoint directory with a tokenizer",
    "prompts": "prompts per GRPO step",
    "num_generations": "G, completions per prompt",
    "length": "completion tokens, forced equal on both sides",
    "rounds": "rounds; each runs --steps steps of each side, alternating who goes first",
    "steps": "GRPO steps per side per round",
    "threads": "torch threads for both sides (0 = torch's default)",
    "skip_trl": "time nanoseek alone",
}

THREADS_HELP = "torch threads (0 = torch's default); small models on a busy machine run faster on 1"


# ---- flags <-> dataclass fields -----------------------------------------------------------------------
def _parse_kv(text: str, what: str) -> dict[str, typing.Any]:
    """'a=1,b=x' -> {"a": 1, "b": "x"} (values parsed as JSON when they are, else kept as text)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise NanoseekError(f"{what}: expected key=value, got {part!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _flag_type(hint) -> type:
    """bool / int / float / str / dict of an annotation (`float | None` -> float, `dict[str, float]` -> dict)."""
    if typing.get_origin(hint) is dict or hint is dict:
        return dict
    options = [hint, *typing.get_args(hint)]
    return next((t for t in (bool, int, float, str) if t in options), str)


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag per dataclass field, typed from its annotation; unset flags keep the dataclass default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), _flag_type(hints[f.name])
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=HELP.get(f.name))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind is dict:
            parser.add_argument(flag, type=str, metavar="K=V,...", **kw)
        else:
            parser.add_argument(flag, type=kind, **kw)


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass with every flag the user gave (parsed) and its defaults for the rest."""
    hints = typing.get_type_hints(cls)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for name, value in values.items():
        if _flag_type(hints[name]) is dict and isinstance(value, str):
            values[name] = _parse_kv(value, "--" + name.replace("_", "-"))
    return cls(**values)


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)


UNISOLATED_HELP = (
    "DANGEROUS: where no kernel isolation (namespaces) can be made, still run model-written code (the program "
    "task), as this user with only Python-level guards; without it such a machine refuses to run it"
)


def _load(args: argparse.Namespace):
    model = from_pretrained(args.model, allow_nonfinite=args.allow_nonfinite_weights)
    return model, Tokenizer.from_pretrained(args.model)


def _task(args: argparse.Namespace):
    knobs = {}
    for item in args.task_arg or []:
        knobs.update(_parse_kv(item, "--task-arg"))
    if args.allow_unisolated_code:
        if args.task != "program":
            raise NanoseekError(
                f"--allow-unisolated-code applies to tasks that run model code (program), not {args.task}"
            )
        knobs["allow_unisolated"] = True
        print(f"nanoseek {args.command}: warning: {UNISOLATED_HELP}", file=sys.stderr)
    try:
        return get_task(args.task, **knobs)
    except NanoseekError:
        raise
    except (TypeError, ValueError) as e:  # a knob of the wrong type that the task did not check itself
        raise NanoseekError(f"task {args.task!r} cannot take knobs {knobs}: {e}") from None


# ---- commands -------------------------------------------------------------------------------------------
def _grpo_device(args: argparse.Namespace) -> str:
    """cpu, or under torchrun with --device cuda this rank's GPU (cuda:LOCAL_RANK)."""
    if args.device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise NanoseekError(f"--device {args.device}: no CUDA device is available")
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.device == "cuda" else args.device


def cmd_grpo(args: argparse.Namespace) -> None:
    cfg = config_from_args(GRPOConfig, args)
    _set_threads(args)
    task = _task(args)
    device = _grpo_device(args)
    parallel.init_distributed(device)  # under torchrun: gloo on CPU, NCCL on CUDA; else nothing
    _run_grpo(args, cfg, task, device)
    parallel.shutdown_distributed()  # not after an error: a rank that failed alone would hang in its barrier


def _run_grpo(args: argparse.Namespace, cfg: GRPOConfig, task, device: str) -> None:
    model, tokenizer = _load(args)
    model.to(device)

    def report(m: dict) -> None:
        print(
            f"step {m['step']}: reward {m['reward/total']:.3f} accuracy {m['reward/accuracy']:.3f} "
            f"format {m['reward/format']:.3f} length {m['completion_length/mean']:.1f} kl {m.get('kl', 0):.4f} "
            f"entropy {m.get('entropy', 0):.3f} {m['time/step_s']:.1f}s",
            flush=True,
        )

    result = train_grpo(
        model,
        tokenizer,
        task,
        cfg,
        args.out,
        resume=args.resume,
        progress=args.progress,
        on_step=None if args.progress else report,
    )
    if parallel.rank() != 0:
        return
    if args.plot and result.history:
        plot_run(args.out)
    f = result.final
    if f:
        where = f"model in {result.final_model_dir}, metrics in {Path(args.out) / 'metrics.jsonl'}"
        if args.plot:
            where += f", curves in {Path(args.out) / 'plots'}"
        print(
            f"grpo: step {result.steps}, reward {f['reward/total']:.3f}, accuracy {f['reward/accuracy']:.3f}, "
            f"mean length {f['completion_length/mean']:.1f}; {where}"
        )
    else:
        print(f"grpo: already at step {result.steps} (max_steps); nothing to do")


def cmd_eval(args: argparse.Namespace) -> None:
    _set_threads(args)
    task = _task(args)
    # No reference to the loaded model is kept here: an engine that quantizes works on a copy, so the fp32
    # original can be freed.
    engine = Engine(*_load(args), max_batch_size=args.batch_size, weights=args.weights, compile=args.compile)
    result = evaluate(
        engine,
        task,
        n_problems=args.n,
        k=args.k,
        samples_per_problem=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        n_examples=args.examples,
    )
    print(result.summary())
    for ex in result.examples:
        mark = "correct" if ex["correct"] else "wrong"
        print(
            f"\n--- {ex['question']} (answer {ex['answer']}; {mark}, "
            f"{'well formed' if ex['well_formed'] else 'malformed'})\n{ex['completion']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def cmd_bench_grpo(args: argparse.Namespace) -> None:
    settings = BenchSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchSettings)})
    run_bench(settings, out=sys.stdout)


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "grpo",
        help="GRPO with rule rewards on a verifiable task (R1-Zero's RL)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g.add_argument("--model", required=True, help="HF-format checkpoint directory with a tokenizer")
    g.add_argument("--task", required=True, help="task name (arithmetic, countdown, program, ...)")
    g.add_argument("--allow-unisolated-code", action="store_true", help=UNISOLATED_HELP)
    add_allow_nonfinite_weights(g)
    g.add_argument("--task-arg", action="append", metavar="K=V", help="task difficulty knob(s), e.g. max_digits=3")
    g.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints/, final/")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_progress(g, "progress bar (default when a terminal); without it, one line per step")
    g.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    g.add_argument(
        "--device", default="cpu", help="cpu, cuda (under torchrun: each rank's cuda:LOCAL_RANK, NCCL) or cuda:N"
    )
    g.add_argument(
        "--plot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write PNG curves of the metrics to RUN_DIR/plots at the end",
    )
    add_config_flags(g, GRPOConfig)
    g.set_defaults(func=cmd_grpo)

    e = sub.add_parser("eval", help="held-out pass@1 / pass@k of a model on a task, R1-Zero template")
    e.add_argument("--model", required=True, help="HF-format checkpoint directory with a tokenizer")
    e.add_argument("--task", required=True)
    e.add_argument("--allow-unisolated-code", action="store_true", help=UNISOLATED_HELP)
    add_allow_nonfinite_weights(e)
    e.add_argument("--task-arg", action="append", metavar="K=V")
    e.add_argument("--n", type=int, default=100, help="held-out problems")
    e.add_argument("--k", type=int, default=1, help="k of pass@k")
    e.add_argument("--samples", type=int, default=None, help="samples per problem (default k; >= k)")
    e.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (one sample, pass@1 only)")
    e.add_argument("--top-p", type=float, default=0.95)
    e.add_argument("--max-tokens", type=int, default=256)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=64, help="engine batch (sequences decoded together)")
    e.add_argument("--examples", type=int, default=3, help="example completions to print")
    e.add_argument("--json", help="also write the result as JSON here")
    e.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    add_engine_weights(e, long_running=False)
    e.set_defaults(func=cmd_eval)

    b = bench.add_parser(
        "grpo",
        help="seconds per GRPO step: nanoseek vs TRL's GRPOTrainer, same everything",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(BenchSettings):
        flag, kw = "--" + f.name.replace("_", "-"), dict(dest=f.name, default=f.default, help=BENCH_HELP.get(f.name))
        if isinstance(f.default, bool):
            b.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            b.add_argument(flag, type=type(f.default), **kw)
    b.set_defaults(func=cmd_bench_grpo)
