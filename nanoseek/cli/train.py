"""`nanoseek pretrain`, `nanoseek plot` and `nanoseek bench train`.

    nanoseek pretrain runs/tiny --preset tiny --task arithmetic --task-docs 20000 --max-steps 500
    nanoseek pretrain runs/text --preset small --corpus book.txt notes.jsonl --seq-len 512
    nanoseek pretrain runs/tiny --resume                 # continue where the run (or a kill) left it
    torchrun --nproc_per_node 2 -m nanoseek.cli pretrain runs/ddp --preset tiny --task arithmetic \
        [--fsdp | --expert-parallel]
    nanoseek plot runs/tiny                              # runs/tiny/plots/*.png
    nanoseek bench train --preset small                  # tokens/s against transformers, and MFU
    nanoseek bench train --preset small --mode forward   # forward and forward+backward tokens/s

Flags map onto `nanoseek.train.TrainConfig`. On --resume every setting comes from the run itself; a flag
given again must agree with it (only --max-steps and the eval/save/log cadence may change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from nanoseek.bench.train import MODES, TrainBenchConfig
from nanoseek.bench.train import run as run_bench_train
from nanoseek.checkpoint.hf import from_pretrained, load_config
from nanoseek.checkpoint.tokenizer import Tokenizer
from nanoseek.model.presets import get_preset
from nanoseek.train import parallel
from nanoseek.train.data import TaskCorpus, TextCorpus, build_dataset, load_dataset
from nanoseek.train.metrics import plot_run
from nanoseek.train.resume import check_model_flags, read_saved_state
from nanoseek.train.trainer import RUN_FILE, TrainConfig, TrainError, check_run_dir, pretrain

TRAIN_FLAGS = {  # flag -> (TrainConfig field, type, help)
    "--seq-len": ("seq_len", int, "tokens per sequence (default 256)"),
    "--batch-size": ("batch_size", int, "sequences per micro-batch per process (default 8)"),
    "--grad-accum": ("grad_accum", int, "micro-batches per optimizer step (default 1)"),
    "--max-steps": ("max_steps", int, "optimizer steps (default 1000)"),
    "--lr": ("lr", float, "peak learning rate (default 3e-4)"),
    "--min-lr-ratio": ("min_lr_ratio", float, "final lr as a fraction of --lr (default 0.1)"),
    "--warmup-steps": ("warmup_steps", int, "linear warmup steps (default 100)"),
    "--schedule": ("schedule", str, "cosine or wsd (default cosine)"),
    "--decay-fraction": ("decay_fraction", float, "wsd: fraction of steps in the final decay (default 0.2)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay on matrices (default 0.1)"),
    "--grad-clip": ("grad_clip", float, "global gradient-norm clip, 0 = off (default 1.0)"),
    "--mtp-depth": ("mtp_depth", int, "MTP modules to train (default: all the model has; 0 = off)"),
    "--mtp-lambda": ("mtp_lambda", float, "MTP loss weight λ (default 0.3)"),
    "--bias-update-speed": ("bias_update_speed", float, "γ of the aux-loss-free bias update (default 1e-3)"),
    "--aux-loss-alpha": ("aux_loss_alpha", float, "α of the sequence-wise balance loss (default: model config)"),
    "--dsa-warmup-steps": (
        "dsa_warmup_steps",
        int,
        "DeepSeek-V3.2 models: first steps with dense attention, the lightning indexer alone trained by KL "
        "toward it; then sparse training of everything (default 0: sparse from the start)",
    ),
    "--seed": ("seed", int, "model init and data order (default 0)"),
    "--device": ("device", str, "auto, cpu, cuda, cuda:N (default auto)"),
    "--dtype": ("dtype", str, "auto, fp32 or bf16 autocast (default auto: bf16 on CUDA, fp32 on CPU)"),
    "--eval-every": ("eval_every", int, "steps between held-out evaluations; 0 = end only, -1 = never (default 100)"),
    "--eval-sequences": ("eval_sequences", int, "held-out sequences per evaluation, in total (default 32)"),
    "--save-every": ("save_every", int, "steps between checkpoints; 0 = end only (default 500)"),
    "--keep-last": ("keep_last", int, "checkpoints kept (default 3)"),
    "--log-every": ("log_every", int, "steps between metric lines (default 1)"),
}
SWITCHES = {  # argparse dest -> (TrainConfig field, value when the flag is given)
    "no_doc_mask": ("doc_mask", False),
    "dsa_warmup_train_all": ("dsa_warmup_train_all", True),
    "compile": ("compile", True),
    "expert_parallel": ("expert_parallel", True),
    "fsdp": ("fsdp", True),
}


LAUNCH_FIELDS = ("device", "compile", "expert_parallel", "fsdp")


def _train_config(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    changes = {}
    for flag, (name, _, _) in TRAIN_FLAGS.items():
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    for dest, (name, value) in SWITCHES.items():
        if getattr(args, dest):
            changes[name] = value
    if args.beta1 is not None or args.beta2 is not None:
        changes["betas"] = (
            args.beta1 if args.beta1 is not None else base.betas[0],
            args.beta2 if args.beta2 is not None else base.betas[1],
        )
    if args.peak_tflops is not None:
        changes["peak_flops"] = args.peak_tflops * 1e12
    return dataclasses.replace(base, **changes)


def _task_knobs(pairs: list[str]) -> dict:
    knobs = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise TrainError(f"--task-knob takes key=value, got {pair!r}")
        try:
            knobs[key] = json.loads(value)
        except json.JSONDecodeError:
            knobs[key] = value
    return knobs


def cmd_pretrain(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    sources = [n for n in ("preset", "init", "corpus", "task", "data") if getattr(args, n)]
    if args.resume:
        if sources:
            raise TrainError(f"--resume continues the run's own model and data; drop --{' --'.join(sources)}")
        ckpt = check_run_dir(run_dir, args.resume)
        saved = read_saved_state(ckpt)
        # How the run was launched (device, compile, expert parallelism) is for this launch's flags to say.
        base = dataclasses.replace(
            TrainConfig.from_dict(saved["train_config"]), **{f: getattr(TrainConfig(), f) for f in LAUNCH_FIELDS}
        )
        cfg = _train_config(args, base)
        model = load_config(ckpt)
        data = saved["dataset"]
        run_file = run_dir / RUN_FILE
        if run_file.exists():
            data = json.loads(run_file.read_text()).get("dataset", data)
        resume = ckpt if args.resume is not True else True
    else:
        cfg = _train_config(args, TrainConfig())
        cfg.validate()
        check_run_dir(run_dir, False)  # refuse to overwrite a run before any tokenizing starts
        for flag, on in (("--expert-parallel", cfg.expert_parallel), ("--fsdp", cfg.fsdp)):
            if on and int(os.environ.get("WORLD_SIZE", "1")) < 2:
                raise TrainError(f"{flag} needs several processes: launch with torchrun --nproc_per_node N")
        if bool(args.preset) == bool(args.init):
            raise TrainError("give the model as exactly one of --preset NAME or --init CHECKPOINT")
        if sum(bool(x) for x in (args.corpus, args.task, args.data)) != 1:
            raise TrainError("give the data as exactly one of --data DATASET_DIR, --corpus FILE... or --task NAME")
        if args.data and (args.vocab_size or args.heldout_percent is not None):
            raise TrainError("--vocab-size and --heldout-percent shape a new dataset; --data names a built one")
        model = get_preset(args.preset) if args.preset else from_pretrained(args.init)
        check_model_flags(cfg, model if args.preset else model.config)  # V4's limits, before any tokenizing
        tokenizer = None
        if args.init and (Path(args.init) / "tokenizer.json").exists():
            tokenizer = Tokenizer.from_pretrained(args.init)
        elif args.init and not args.data:
            raise TrainError(
                f"{args.init} has no tokenizer.json; the data must be tokenized with the model's tokenizer"
            )
        data = args.data
        rank, _ = parallel.init_distributed(
            "cuda" if (cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
        )
        if not data:
            data = run_dir / "data"
            if rank == 0:
                heldout_percent = 5.0 if args.heldout_percent is None else args.heldout_percent
                vocab = args.vocab_size or (model.config.vocab_size if args.init else model.vocab_size)
                if args.corpus:
                    train_docs, heldout_docs = TextCorpus(args.corpus, txt_split=args.txt_split), None
                else:
                    knobs = _task_knobs(args.task_knob)
                    train_docs = TaskCorpus(
                        args.task, args.task_docs, cfg.seed, "train", args.reasoning_fraction, **knobs
                    )
                    heldout_docs = (
                        TaskCorpus(args.task, args.heldout_docs, cfg.seed, "heldout", args.reasoning_fraction, **knobs)
                        if args.heldout_docs > 0
                        else None
                    )
                    heldout_percent = 0.0 if heldout_docs is None else heldout_percent
                print(f"tokenizing into {data} ...", flush=True)
                ds = build_dataset(
                    data,
                    train_docs,
                    heldout_docs,
                    tokenizer=tokenizer,
                    vocab_size=vocab,
                    heldout_percent=heldout_percent,
                    chat_template="r1_zero" if args.task else "deepseek",
                )
                s = ds.meta["splits"]
                print(
                    f"dataset: {s['train']['n_tokens']:,} train tokens in {s['train']['n_docs']:,} documents, "
                    f"{s['heldout']['n_tokens']:,} held-out tokens; vocab {ds.tokenizer.vocab_size}"
                )
            parallel.barrier()
        ds = load_dataset(data)
        if args.preset:  # the model's special ids follow the dataset's tokenizer
            model = model.replace(
                bos_token_id=ds.tokenizer.bos_id, eos_token_id=ds.tokenizer.eos_id, pad_token_id=ds.tokenizer.pad_id
            )
        data = ds
        resume = False
    result = pretrain(model, cfg, data, run_dir, resume=resume, progress=not args.no_progress)
    if parallel.rank() == 0:
        held = f"{result.heldout_loss:.4f}" if result.heldout_loss is not None else "n/a"
        mfu = f", MFU {result.mfu:.1%}" if result.mfu is not None else ""
        load = f", expert load max/mean {max(result.expert_load):.2f}" if result.expert_load else ""
        kl = f", indexer KL {result.indexer_loss:.4f}" if result.indexer_loss is not None else ""
        print(
            f"step {result.step}: train loss {result.train_loss:.4f}, held-out loss {held}{kl}, "
            f"{result.tokens_per_s:,.0f} tokens/s{mfu}{load}"
        )
        print(f"checkpoint: {result.checkpoint}\nmetrics: {run_dir / 'metrics.jsonl'} (plot: nanoseek plot {run_dir})")
    parallel.shutdown_distributed()


def cmd_plot(args: argparse.Namespace) -> None:
    for path in plot_run(args.run_dir, args.out):
        print(path)


def cmd_bench_train(args: argparse.Namespace) -> None:
    """Training throughput against transformers: see `nanoseek.bench.train`."""
    run_bench_train(TrainBenchConfig(**{k: getattr(args, k) for k in TrainBenchConfig.__dataclass_fields__}))


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a base model (resumable; torchrun for several processes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="run directory: metrics.jsonl, checkpoints/, data/, run.json")
    g = p.add_argument_group("model")
    g.add_argument("--preset", help="a fresh model of this preset (tiny, small, ...)")
    g.add_argument("--init", help="continue training a checkpoint directory (HF format)")
    g = p.add_argument_group("data (one of)")
    g.add_argument("--data", help="a dataset directory built before (meta.json, train.bin, ...)")
    g.add_argument("--corpus", nargs="+", help=".txt (one document per blank-line paragraph) or .jsonl ('text') files")
    g.add_argument("--task", help="a synthetic task's R1-Zero documents (arithmetic, countdown, ...)")
    g = p.add_argument_group("building the dataset")
    g.add_argument(
        "--txt-split",
        choices=("paragraph", "file"),
        default="paragraph",
        help=".txt documents: per blank-line-separated paragraph (default) or per file",
    )
    g.add_argument("--vocab-size", type=int, help="tokenizer size when training one (default: the model's vocab)")
    g.add_argument("--heldout-percent", type=float, help="share of corpus documents held out, by hash (default 5)")
    g.add_argument("--task-docs", type=int, default=20000, help="training documents of --task (default 20000)")
    g.add_argument("--heldout-docs", type=int, default=500, help="held-out documents of --task (default 500)")
    g.add_argument(
        "--reasoning-fraction",
        type=float,
        default=1.0,
        help="share of task documents with a worked solution in <think> (default 1.0)",
    )
    g.add_argument("--task-knob", action="append", metavar="KEY=VALUE", help="task difficulty knob, repeatable")
    g = p.add_argument_group("training")
    for flag, (name, typ, help_) in TRAIN_FLAGS.items():
        g.add_argument(flag, dest=name, type=typ, default=None, help=help_)
    g.add_argument("--beta1", type=float, default=None, help="AdamW β1 (default 0.9)")
    g.add_argument("--beta2", type=float, default=None, help="AdamW β2 (default 0.95)")
    g.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: estimated)")
    g.add_argument(
        "--no-doc-mask", action="store_true", help="let packed documents attend to each other (faster; default: masked)"
    )
    g.add_argument(
        "--dsa-warmup-train-all",
        action="store_true",
        help="the dense warm-up trains every parameter (LM loss + indexer KL), not the indexer alone: "
        "for pretraining a V3.2 model from scratch",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP",
    )
    g.add_argument(
        "--expert-parallel",
        action="store_true",
        help="under torchrun: each process holds a slice of the routed experts (all_to_all dispatch)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue RUN_DIR from its latest checkpoint (or the one given)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)

    pl = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="output directory (default RUN_DIR/plots)")
    pl.set_defaults(func=cmd_plot)

    b = bench.add_parser("train", help="training tokens/s: nanoseek vs transformers DeepseekV3ForCausalLM, and MFU")
    b.add_argument("--preset", default="small")
    b.add_argument(
        "--mode",
        choices=MODES,
        default="step",
        help="step: full training steps with the optimizer, and MFU (default); forward: forward and "
        "forward+backward of the model alone",
    )
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--seq", type=int, default=256)
    b.add_argument("--steps", type=int, default=5, help="timed steps (or passes) per side (median reported)")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument(
        "--compile", action="store_true", help="torch.compile nanoseek's side (the training forward, or the model)"
    )
    b.add_argument(
        "--hf-eager-experts",
        action="store_true",
        help="also time transformers with its expert-by-expert loop (experts_implementation='eager')",
    )
    b.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: estimated)")
    b.set_defaults(func=cmd_bench_train)
