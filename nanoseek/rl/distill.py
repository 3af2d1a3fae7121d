"""`nanoseek distill`: R1's last step in miniature: distill the RL model's reasoning into a smaller dense student,
and compare with the same student trained by RL alone (R1 paper §4.1).

    nanoseek distill --run runs/zero [--preset default|smoke] [--out runs/zero/distill] [--resume]

    result = run_distill(distill_preset("default"), "runs/zero")     # DistillResult

Stages (timed, resumable like `nanoseek zero`):
1. sample          rejection sampling: the RL model (RUN_DIR/model) writes `samples` completions of each of
                   `problems` train-split problems of the demo task; only completions that are well formed,
                   stopped on their own (EOS), and whose answer the task's verifier accepts are kept
                   (`keep_per_problem` distinct ones per problem at most). Held-out problems are never used.
2. student_pretrain the student (smaller, dense: no MoE, no MTP; the teacher's tokenizer) pretrained on the
                   zero run's own corpus (RUN_DIR/data), as the teacher was.
3. sft             the distilled student: supervised fine-tuning of the pretrained student on the kept
                   traces, loss on the response tokens only (prompt tokens are context, not targets).
4. student_grpo    the RL-alone student: GRPO from the same pretrained student with the teacher's GRPO
                   settings (the same steps, prompts and G: the same RL budget).
5. eval            held-out pass@1 / pass@k of the pretrained, distilled and RL students, with the zero
                   run's evaluation settings; the teacher's numbers come from RUN_DIR/eval_rl.json.
6. report          OUT/report.md, and the zero run's report gains a "Distillation" section.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nanoseek.checkpoint.hf import from_pretrained, save_pretrained
from nanoseek.checkpoint.tokenizer import Tokenizer
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import NanoseekError
from nanoseek.fileio import atomic_directory, atomic_write_json, atomic_write_text
from nanoseek.model.config import ModelConfig
from nanoseek.model.stats import model_stats
from nanoseek.rl.evaluate import task_label
from nanoseek.rl.grpo import train_grpo
from nanoseek.rl.report import distill_table, write_report
from nanoseek.rl.stages import STAGES_FILE, Stages, publish_model
from nanoseek.rl.zero import evaluate_model
from nanoseek.rl.zero_config import MODEL_DIR, ZeroConfig, load_run_config
from nanoseek.tasks.rewards import task_reward_fn
from nanoseek.tasks.template import prompt_text
from nanoseek.train.data import IGNORE_INDEX, load_dataset
from nanoseek.train.metrics import MetricsLogger
from nanoseek.train.optim import adamw
from nanoseek.train.state import latest_checkpoint
from nanoseek.train.trainer import TrainConfig, lr_factor, pretrain

DISTILL_STAGES = ("sample", "student_pretrain", "sft", "student_grpo", "eval", "report")
TRACES_FILE = "traces.jsonl"


class DistillError(NanoseekError):
    """A distillation that cannot run: no zero run, no verified trace, a changed config on resume."""


@dataclass
class SFTConfig:
    """Supervised fine-tuning on verified traces (token-mean cross-entropy over response tokens)."""

    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class DistillConfig:
    preset: str
    student: dict[str, Any]  # ModelConfig fields overriding the teacher's (vocab and positions are the teacher's)
    student_train_steps: int  # pretraining steps of the student (the teacher's TrainConfig otherwise)
    problems: int = 512  # train-split problems sampled for traces
    samples: int = 4  # completions per problem
    temperature: float = 0.6
    keep_per_problem: int = 1  # distinct verified traces kept per problem
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl_steps: int | None = None  # GRPO steps of the RL-alone student; None = the teacher's (same budget)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        return cls(**{**d, "sft": SFTConfig(**d["sft"])})


# A dense student (no MoE, no MTP), one layer fewer: about a third of the teacher's total parameters.
_DENSE_STUDENT = dict(
    n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=0, first_k_dense_replace=0, num_nextn_predict_layers=0
)


def distill_preset(name: str = "default", seed: int = 0) -> DistillConfig:
    if name == "default":
        return DistillConfig(
            preset=name,
            seed=seed,
            student={**_DENSE_STUDENT, "num_hidden_layers": 3, "intermediate_size": 256},
            student_train_steps=600,
            problems=512,
            samples=4,
            keep_per_problem=1,
            sft=SFTConfig(epochs=3, batch_size=16, lr=1e-3, seed=seed),
        )
    if name == "smoke":
        return DistillConfig(
            preset=name,
            seed=seed,
            student={**_DENSE_STUDENT, "num_hidden_layers": 1, "intermediate_size": 64},
            student_train_steps=6,
            problems=32,
            samples=4,
            keep_per_problem=2,
            sft=SFTConfig(epochs=2, batch_size=4, lr=1e-3, warmup_steps=1, seed=seed),
            rl_steps=2,
        )
    raise DistillError(f"unknown distill preset {name!r}; presets: default, smoke")


def student_config(zero: ZeroConfig, cfg: DistillConfig, vocab_size: int) -> ModelConfig:
    return zero.model.replace(**{**cfg.student, "vocab_size": vocab_size})


@dataclass
class DistillResult:
    out_dir: Path
    report: Path
    traces: dict[str, Any]  # sampled / kept counts
    evals: dict[str, dict[str, Any]]  # "teacher", "student_base", "student_distill", "student_rl" -> demo-task eval
    seconds: dict[str, float]


# ---- 1. rejection sampling ----------------------------------------------------------------------------
def verified(problems: Sequence[Any], completions: Sequence[str], finish_reasons: Sequence[str], task) -> list[bool]:
    """Which completions may be distilled: well formed, stopped by EOS (not cut), answer verified exactly."""

    scores = task_reward_fn(task)(problems, completions)
    return [
        s.accuracy == 1.0 and s.format == 1.0 and reason == "stop"
        for s, reason in zip(scores, finish_reasons, strict=True)
    ]


def sample_traces(
    model_dir: Path, task, zero: ZeroConfig, cfg: DistillConfig, out: Path, progress: bool = True
) -> dict[str, Any]:
    """Rejection sampling from the RL model on train-split problems; writes OUT/traces.jsonl (prompt and
    completion token ids, text) and returns the counts."""

    engine = Engine(model_dir, max_batch_size=128, cache_tokens=128 * (zero.eval.max_tokens + 160))
    rng = random.Random(f"distill-{cfg.seed}")
    problems, seen = [], set()
    while len(problems) < cfg.problems:
        p = task.sample(rng, "train")
        if p.key not in seen:
            seen.add(p.key)
            problems.append(p)
    params = [
        SamplingParams(
            n=cfg.samples, temperature=cfg.temperature, max_tokens=zero.eval.max_tokens, seed=rng.getrandbits(62)
        )
        for _ in problems
    ]
    rows, flat, texts, reasons = [], [], [], []
    chunk = 32
    bar = tqdm(total=len(problems), desc="sample traces", unit="problem", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(problems), chunk):
        batch = problems[start : start + chunk]
        outs = engine.generate([prompt_text(p) for p in batch], params[start : start + chunk])
        for p, o in zip(batch, outs):
            for c in sorted(o.outputs, key=lambda c: c.index):
                rows.append((p, o.prompt_token_ids, c))
                flat.append(p)
                texts.append(c.text or "")
                reasons.append(c.finish_reason or "length")
        bar.update(len(batch))
    bar.close()
    ok = verified(flat, texts, reasons, task)
    kept, per_problem = [], {}
    for (p, prompt_ids, c), good in zip(rows, ok):
        n = per_problem.setdefault(p.key, set())
        if good and len(n) < cfg.keep_per_problem and tuple(c.token_ids) not in n:
            n.add(tuple(c.token_ids))
            kept.append(
                {
                    "task": p.task,
                    "key": p.key,
                    "question": p.question,
                    "answer": p.answer,
                    "data": p.data,
                    "prompt_ids": prompt_ids,
                    "completion_ids": list(c.token_ids),
                    "completion": c.text,
                }
            )
    atomic_write_text(out / TRACES_FILE, "".join(json.dumps(k) + "\n" for k in kept))
    if not kept:
        raise DistillError(
            f"no verified trace among {len(rows)} samples of {len(problems)} problems: the RL "
            "model solves none; distillation needs a teacher that is right sometimes"
        )
    return {
        "problems": len(problems),
        "sampled": len(rows),
        "verified": sum(ok),
        "kept": len(kept),
        "problems_with_trace": sum(1 for v in per_problem.values() if v),
        "mean_trace_tokens": sum(len(k["completion_ids"]) for k in kept) / len(kept),
    }


def read_traces(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / TRACES_FILE).read_text().splitlines() if line.strip()]


# ---- 3. supervised fine-tuning on the traces ---------------------------------------------------------
def sft_batch(examples: Sequence[dict[str, Any]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (B, T), targets (B, T)): prompt + completion right-padded; targets are the next tokens,
    IGNORE_INDEX on prompt positions and padding, so only the response is learned."""
    seqs = [e["prompt_ids"] + e["completion_ids"] for e in examples]
    T = max(map(len, seqs)) - 1
    inputs = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (e, s) in enumerate(zip(examples, seqs)):
        n = len(s) - 1
        inputs[i, :n] = torch.tensor(s[:-1])
        targets[i, :n] = torch.tensor(s[1:])
        targets[i, : len(e["prompt_ids"]) - 1] = IGNORE_INDEX  # positions whose next token is still prompt
    return inputs, targets


def sft(
    model: torch.nn.Module,
    traces: list[dict[str, Any]],
    cfg: SFTConfig,
    pad_id: int,
    run_dir: Path | None = None,
    progress: bool = True,
) -> list[float]:
    """Fine-tune `model` in place on the traces (AdamW, warmup + cosine); returns the loss per step and
    logs it to run_dir/metrics.jsonl."""

    steps_per_epoch = math.ceil(len(traces) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = TrainConfig(
        max_steps=total, lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, total - 1), min_lr_ratio=cfg.min_lr_ratio
    )
    opt = adamw(model, cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    rng = random.Random(f"sft-{cfg.seed}")
    logger = MetricsLogger(run_dir) if run_dir is not None else None
    losses, step = [], 0
    model.train()
    bar = tqdm(total=total, desc="sft", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for _ in range(cfg.epochs):
            order = list(range(len(traces)))
            rng.shuffle(order)
            for start in range(0, len(order), cfg.batch_size):
                inputs, targets = sft_batch([traces[i] for i in order[start : start + cfg.batch_size]], pad_id)
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor(step, sched)
                logits = model(inputs)  # (B, T, V)
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                losses.append(float(loss.detach()))
                if logger is not None:
                    logger.log(step, **{"loss/sft": losses[-1], "lr": opt.param_groups[0]["lr"]})
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
                bar.update(1)
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    model.eval()
    return losses


# ---- the run -----------------------------------------------------------------------------------------
def run_distill(
    cfg: DistillConfig,
    zero_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    log=print,
) -> DistillResult:
    """Every stage of the module docstring; `zero_dir` is a finished `nanoseek zero` run."""

    zero_dir = Path(zero_dir)
    zero = load_run_config(zero_dir)
    if not (zero_dir / MODEL_DIR / "config.json").exists() or not (zero_dir / "eval_rl.json").exists():
        raise DistillError(
            f"{zero_dir} is not a finished zero run (no {MODEL_DIR}/ or eval_rl.json); "
            "run `nanoseek zero` first (or --resume it)"
        )
    out = Path(out_dir) if out_dir is not None else zero_dir / "distill"
    _prepare(out, cfg, resume)
    if zero.threads:
        torch.set_num_threads(zero.threads)
    stages = Stages(out, DISTILL_STAGES, fresh=not resume)
    task = zero.demo_task()
    tokenizer = Tokenizer.from_pretrained(zero_dir / MODEL_DIR)
    student_cfg = student_config(zero, cfg, tokenizer.vocab_size)

    def stage(name: str, fn) -> None:
        stages.run(name, fn, log, job="distill")

    def student_pretrain() -> dict[str, Any]:
        train = dataclasses.replace(
            zero.train,
            max_steps=cfg.student_train_steps,
            warmup_steps=min(zero.train.warmup_steps, cfg.student_train_steps - 1),
            mtp_depth=0,
        )
        r = pretrain(
            student_cfg,
            train,
            load_dataset(zero_dir / "data"),
            out / "student_pretrain",
            resume=latest_checkpoint(out / "student_pretrain") is not None,
            progress=progress,
            log=log,
        )
        publish_model(r.checkpoint, out / "student_base")
        return {"train_loss": r.train_loss, "heldout_loss": r.heldout_loss, "steps": r.step}

    def distill_student() -> dict[str, Any]:
        model = from_pretrained(out / "student_base")
        torch.manual_seed(cfg.seed)
        losses = sft(model, read_traces(out), cfg.sft, tokenizer.pad_id, out / "sft", progress)
        with atomic_directory(out / "sft" / "final") as tmp:
            save_pretrained(model, tmp)
            tokenizer.save_pretrained(tmp)
        publish_model(out / "sft" / "final", out / "student_distill")
        return {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}

    def student_rl() -> dict[str, Any]:
        grpo = dataclasses.replace(zero.grpo, max_steps=cfg.rl_steps or zero.grpo.max_steps)
        model = from_pretrained(out / "student_base")
        r = train_grpo(
            model,
            tokenizer,
            task,
            grpo,
            out / "student_grpo",
            resume=latest_checkpoint(out / "student_grpo") is not None,
            progress=progress,
        )
        publish_model(r.final_model_dir, out / "student_rl")
        return {"steps": r.steps}

    def evaluate_all() -> dict[str, Any]:
        label = task_label(task)
        evals = {"teacher": json.loads((zero_dir / "eval_rl.json").read_text())[label]}
        for name in ("student_base", "student_distill", "student_rl"):
            evals[name] = evaluate_model(out / name, [task], zero.eval, progress, desc=f"eval {name}")[label]
        atomic_write_json(out / "eval.json", evals)
        return {name: e["pass_at_1"] for name, e in evals.items()}

    stage("sample", lambda: sample_traces(zero_dir / MODEL_DIR, task, zero, cfg, out, progress))
    stage("student_pretrain", student_pretrain)
    stage("sft", distill_student)
    stage("student_grpo", student_rl)
    stage("eval", evaluate_all)
    t0 = time.perf_counter()
    report = write_distill_report(out, zero, cfg, stages.data, student_cfg)
    stages.finish("report", time.perf_counter() - t0)
    report = write_distill_report(out, zero, cfg, stages.data, student_cfg)
    _refresh_zero_report(zero_dir, zero)
    log(f"distill: report in {report}")
    return DistillResult(
        out,
        report,
        stages.data["sample"],
        json.loads((out / "eval.json").read_text()),
        stages.seconds(),
    )


def _prepare(out: Path, cfg: DistillConfig, resume: bool) -> None:
    saved = out / "distill_config.json"
    if resume:
        if not saved.exists():
            raise DistillError(f"cannot resume: {out} holds no distillation (distill_config.json is missing)")
        if json.loads(saved.read_text()) != cfg.to_dict():
            raise DistillError(f"--resume: the distillation in {out} was made with other settings")
        return
    if saved.exists():
        raise DistillError(f"{out} already holds a distillation; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved, cfg.to_dict())


def _refresh_zero_report(zero_dir: Path, zero: ZeroConfig) -> None:
    """Rewrite the zero run's report so it shows the distillation section too."""

    stages_file = zero_dir / STAGES_FILE
    if stages_file.exists():
        write_report(zero_dir, zero, json.loads(stages_file.read_text()))


# ---- the report --------------------------------------------------------------------------------------
def write_distill_report(
    out: Path, zero: ZeroConfig, cfg: DistillConfig, stages: dict[str, Any], student_cfg: ModelConfig
) -> Path:
    evals = json.loads((out / "eval.json").read_text())
    s, t = model_stats(student_cfg), model_stats(zero.model)
    tr = stages["sample"]
    L = [
        f"# nanoseek distill (preset `{cfg.preset}`)",
        "",
        f"Teacher: the RL model of the zero run ({t.total / 1e6:.2f}M parameters, {t.active / 1e6:.2f}M active). "
        f"Student: dense, {student_cfg.num_hidden_layers} layers, hidden {student_cfg.hidden_size}, no MoE, no MTP "
        f"({s.total / 1e6:.2f}M parameters), the teacher's tokenizer, pretrained on the zero run's corpus for "
        f"{cfg.student_train_steps} steps.",
        "",
        f"Rejection sampling: {tr['sampled']} completions ({cfg.samples} per problem, temperature {cfg.temperature}) "
        f"of {tr['problems']} train-split problems; {tr['verified']} verified correct (well formed, stopped, "
        f"answer accepted by the verifier); {tr['kept']} kept (at most {cfg.keep_per_problem} per problem, "
        f"{tr['problems_with_trace']} problems), mean {tr['mean_trace_tokens']:.0f} tokens. SFT: "
        f"{cfg.sft.epochs} epochs, batch {cfg.sft.batch_size}, lr {cfg.sft.lr}, loss on response tokens only.",
        "",
        f"Held-out evaluation of the demo task ({task_label(zero.demo_task())}), the zero run's settings:",
        "",
    ]
    L += distill_table(evals, zero.eval.k)
    L += ["", "| stage | seconds |", "|---|---|"]
    L += [f"| {n} | {stages[n]['seconds']:.1f} |" for n in DISTILL_STAGES if n in stages]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(L) + "\n")
    return path
