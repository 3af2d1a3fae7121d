"""Benchmark: seconds per GRPO step, nanoseek against TRL's GRPOTrainer, everything else equal.

    nanoseek bench grpo [--preset tiny | --model DIR] [--prompts 4 --num-generations 8 --length 64]
                        [--rounds 3 --steps 2]

Both sides start each round from the same HF-format checkpoint (written here from `--preset`, or yours),
take the same prompts (the task's train problems in the R1-Zero template, in the same order), sample G
completions of exactly `--length` tokens each (nanoseek ignores EOS; TRL gets `min_new_tokens`, so neither
stops early), score them with the same reward functions (the task's accuracy and format rewards, weights
1 and 0.1), and take one optimizer step per GRPO step (μ = 1, one minibatch, β and the loss type equal,
constant learning rate). Rounds alternate which side goes first; every step's wall time is kept (TRL's from
a callback around the step, nanoseek's from its own step timer) and the medians are compared.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from nanoseek.checkpoint.hf import from_pretrained, save_pretrained
from nanoseek.checkpoint.tokenizer import Tokenizer, train_tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.model.presets import get_preset
from nanoseek.model.transformer import Transformer
from nanoseek.rl.config import GRPOConfig
from nanoseek.rl.grpo import train_grpo
from nanoseek.tasks import get_task, pretraining_documents, prompt_text
from nanoseek.tasks.rewards import task_reward_fn


@dataclass
class BenchSettings:
    preset: str = "tiny"  # model shape to build (random weights) when --model is not given
    model: str = ""  # an existing HF-format checkpoint directory with a tokenizer
    task: str = "arithmetic"
    prompts: int = 4  # prompts per step
    num_generations: int = 8  # G
    length: int = 64  # completion tokens, forced equal on both sides
    rounds: int = 3  # each round runs `steps` steps of each side, alternating who goes first
    steps: int = 2
    beta: float = 0.0
    loss_type: str = "dapo"
    learning_rate: float = 1e-5
    seed: int = 0
    threads: int = 0  # torch threads for both sides (0 = torch's default)
    skip_trl: bool = False  # time nanoseek alone (no ratio)


class _FixedProblems:
    """A task whose train split is a fixed list, handed out in order (both sides see the same prompts)."""

    def __init__(self, task, problems):
        self.task, self.problems, self.name = task, problems, task.name
        self._next = 0

    def sample(self, rng, split="train"):
        p = self.problems[self._next % len(self.problems)]
        self._next += 1
        return p

    def __getattr__(self, name):
        return getattr(self.task, name)


def _checkpoint(s: BenchSettings, task, root: Path) -> Path:
    """The checkpoint both sides load: `--model`, or a seeded random `--preset` with a task-trained tokenizer."""
    if s.model:
        return Path(s.model)

    cfg = get_preset(s.preset)
    tok = train_tokenizer(
        list(pretraining_documents(task, n=1000, seed=0)), vocab_size=cfg.vocab_size, chat_template="r1_zero"
    )
    cfg = cfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(s.seed)
    out = root / "model"
    save_pretrained(Transformer(cfg), out)
    tok.save_pretrained(out)
    return out


def _nanoseek_round(s: BenchSettings, ckpt: Path, task, problems) -> tuple[list[float], list[dict]]:
    cfg = GRPOConfig(
        num_generations=s.num_generations,
        prompts_per_step=s.prompts,
        max_completion_length=s.length,
        ignore_eos=True,
        beta=s.beta,
        loss_type=s.loss_type,
        learning_rate=s.learning_rate,
        max_steps=s.steps,
        seed=s.seed,
        reward_weights={"accuracy": 1.0, "format": 0.1},
    )
    result = train_grpo(
        from_pretrained(ckpt),
        Tokenizer.from_pretrained(ckpt),
        _FixedProblems(task, problems),
        cfg,
        None,
        progress=False,
    )
    return [h["time/step_s"] for h in result.history], result.history


def _trl_round(s: BenchSettings, ckpt: Path, task, problems, out_dir: Path) -> tuple[list[float], list[dict]]:
    # TRL and its stack are the optional [bench] extra, and slow to import: only the TRL side loads them.
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback  # the [bench] extra, see above
    from trl import GRPOConfig as TRLConfig  # the [bench] extra, see above
    from trl import GRPOTrainer  # the [bench] extra, see above

    reward_fn = task_reward_fn(task)

    def scores(completions, idx):
        return reward_fn([problems[i] for i in idx], completions)

    def accuracy(prompts, completions, idx, **_):
        return [r.accuracy for r in scores(completions, idx)]

    def format_(prompts, completions, idx, **_):
        return [r.format for r in scores(completions, idx)]

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    dataset = Dataset.from_list([{"prompt": prompt_text(p), "idx": i} for i, p in enumerate(problems)])
    args = TRLConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        seed=s.seed,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        max_steps=s.steps,
        shuffle_dataset=False,
        per_device_train_batch_size=s.prompts * s.num_generations,
        gradient_accumulation_steps=1,
        num_generations=s.num_generations,
        max_completion_length=s.length,
        temperature=1.0,
        top_p=1.0,
        generation_kwargs={"min_new_tokens": s.length},
        num_iterations=1,
        beta=s.beta,
        loss_type=s.loss_type,
        learning_rate=s.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        adam_beta2=0.99,
        weight_decay=0.0,
        reward_weights=[1.0, 0.1],
        model_init_kwargs={"dtype": torch.float32},
    )
    trainer = GRPOTrainer(
        model=str(ckpt),
        reward_funcs=[accuracy, format_],
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(ckpt),
        callbacks=[StepTimer()],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    rollout_times: list[float] = []
    generate_and_score = trainer._generate_and_score_completions

    def timed(*a, **kw):  # TRL's rollout phase: generation, rewards, advantages
        t0 = time.perf_counter()
        out = generate_and_score(*a, **kw)
        rollout_times.append(time.perf_counter() - t0)
        return out

    trainer._generate_and_score_completions = timed
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    for log, t in zip(logs, rollout_times):
        log["rollout_s"] = t
    return times, logs


def run_bench(s: BenchSettings, out: TextIO = sys.stdout) -> dict[str, float]:
    """Run the interleaved benchmark, print a table and the ratio; returns the medians."""
    threads = torch.get_num_threads()
    if s.threads > 0:
        torch.set_num_threads(s.threads)
    try:
        return _run(s, out)
    finally:
        torch.set_num_threads(threads)


def _run(s: BenchSettings, out: TextIO) -> dict[str, float]:
    if not s.skip_trl:
        try:
            import trl  # noqa: F401  (optional: the [bench] extra; checked here to fail early and clearly)
        except ImportError:
            raise NanoseekError(
                "nanoseek bench grpo needs TRL: pip install -e '.[bench]' (or pass --skip-trl)"
            ) from None
        import transformers  # optional, installed with TRL: quiet its logging and progress bars

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars
        warnings.filterwarnings("ignore")
    task = get_task(s.task)

    rng = random.Random(f"bench-{s.seed}")
    problems = [task.sample(rng, "train") for _ in range(s.prompts * s.steps)]
    ours: list[float] = []
    theirs: list[float] = []
    lengths = {"nanoseek": [], "trl": []}
    trl_rollout: list[float] = []
    split = {"time/rollout_s": [], "time/reward_s": [], "time/update_s": []}
    with tempfile.TemporaryDirectory(prefix="nanoseek-bench-grpo-") as tmp:
        ckpt = _checkpoint(s, task, Path(tmp))
        print(
            f"GRPO step: {s.prompts} prompts x G={s.num_generations}, {s.length} completion tokens each, "
            f"loss {s.loss_type}, beta {s.beta}, mu 1; model {s.model or s.preset}; task {s.task}; "
            f"torch threads {torch.get_num_threads()}",
            file=out,
            flush=True,
        )
        for r in range(s.rounds):
            sides = ["nanoseek", "trl"] if r % 2 == 0 else ["trl", "nanoseek"]
            for side in sides:
                if side == "nanoseek":
                    times, hist = _nanoseek_round(s, ckpt, task, problems)
                    ours += times
                    lengths["nanoseek"] += [h["completion_length/mean"] for h in hist]
                    for k in split:
                        split[k] += [h[k] for h in hist]
                elif not s.skip_trl:
                    times, logs = _trl_round(s, ckpt, task, problems, Path(tmp) / f"trl-{r}")
                    theirs += times
                    lengths["trl"] += [float(h["completions/mean_length"]) for h in logs]
                    trl_rollout += [h["rollout_s"] for h in logs if "rollout_s" in h]
                else:
                    continue
                print(f"  round {r + 1} {side:>8}: " + ", ".join(f"{t:.2f}s" for t in times), file=out, flush=True)
    med = {"nanoseek_s": statistics.median(ours)}
    parts = ", ".join(f"{k.split('/')[1][:-2]} {statistics.median(v):.2f}s" for k, v in split.items())
    print(
        f"nanoseek: {med['nanoseek_s']:.2f} s/step (median of {len(ours)}; {parts}), "
        f"mean completion length {statistics.mean(lengths['nanoseek']):.1f}",
        file=out,
    )
    if theirs:
        med["trl_s"] = statistics.median(theirs)
        med["ratio"] = med["trl_s"] / med["nanoseek_s"]
        rollout = f"rollout {statistics.median(trl_rollout):.2f}s, " if trl_rollout else ""
        print(
            f"TRL:      {med['trl_s']:.2f} s/step (median of {len(theirs)}; {rollout}the rest is the update), "
            f"mean completion length {statistics.mean(lengths['trl']):.1f}",
            file=out,
        )
        print(
            f"nanoseek is {med['ratio']:.1f}x faster per GRPO step than TRL {__import__('trl').__version__}", file=out
        )
    return med
