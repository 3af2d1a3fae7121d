"""`nanoseek zero`: DeepSeek-R1-Zero in one command, from nothing: corpus, tokenizer, base model, GRPO, report.

    nanoseek zero --preset default --out runs/zero          # 20-25 minutes on 2 CPU cores
    nanoseek zero --preset smoke --out /tmp/zero            # about a minute: the test suite runs it
    nanoseek zero --out runs/zero --resume                  # continue a run that was stopped or killed
    nanoseek zero --nproc 2 --out runs/zero                 # pretraining and GRPO as 2 processes (torchrun)

    result = run_zero(preset("default"), "runs/zero")      # ZeroResult: evals, stage times, paths

Stages (each timed; pretraining, evaluation and GRPO show a progress bar):
1. corpus     the demo task's train-split problems, in two formats (CorpusPart): "r1_zero" documents (prompt,
              "<think>...</think> <answer>...</answer>", EOS), of which a `reasoning_fraction` carry the full
              worked solution in the think part and the rest answer directly with an empty think; and
              "worked" documents, questions with their worked solutions as plain text, several to a
              document like a worksheet (arithmetic done on paper, no prompt, no tags). Nothing else: no
              SFT data, no other text, no held-out problem.
2. tokenizer  byte-level BPE trained on that corpus (digits split), with the r1_zero chat template;
              the corpus is tokenized into RUN_DIR/data.
3. pretrain   a small MLA + DeepSeekMoE base model with MTP (so it also drafts for speculative decoding).
4. eval_base  held-out pass@1 / pass@k, format rate, response length, reasoning rate (R1-Zero template,
              through the engine).
5. grpo       GRPO from the base model with rule rewards only (accuracy + format).
6. eval_rl    the same evaluation of the RL model.
7. report     RUN_DIR/report.md with the numbers, curves (PNG), the config and example completions.

Why RL can work here: the base model has seen the step-by-step procedure, but rarely. It
mostly answers directly, which a tiny model does badly on multi-digit multiplication, and sometimes
reasons, which it does well: pass@1 is low and pass@k high. GRPO rewards the completions that are right,
which are mostly the reasoned ones, so the policy learns to reason: pass@1 rises and responses lengthen.

RUN_DIR layout (see docs/zero.md): config.json, stages.json (what is done, wall times), corpus.json,
data/, pretrain/, base/ (HF model + tokenizer), eval_base.json, grpo/, model/ (the final HF model +
tokenizer: `nanoseek serve --model RUN_DIR/model`, `nanoseek chat --model RUN_DIR/model`), eval_rl.json,
plots/*.png, report.md.

The configuration and presets are zero_config.py, the stage runner stages.py (shared with distill.py), the
report report.py; this module runs the stages.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nanoseek.checkpoint.hf import from_pretrained
from nanoseek.checkpoint.tokenizer import Tokenizer, train_tokenizer
from nanoseek.engine.engine import Engine
from nanoseek.errors import NanoseekError
from nanoseek.fileio import atomic_write_json
from nanoseek.rl.evaluate import evaluate, task_label
from nanoseek.rl.grpo import train_grpo
from nanoseek.rl.report import targets, write_report
from nanoseek.rl.stages import STAGES_FILE, Stages, publish_model
from nanoseek.rl.zero_config import (
    BASE_DIR,
    CONFIG_FILE,
    MODEL_DIR,
    STAGES,
    CorpusPart,
    EvalConfig,
    ZeroConfig,
    ZeroError,
)
from nanoseek.tasks import get_task, parse_completion
from nanoseek.tasks.rewards import task_reward_fn
from nanoseek.train import parallel
from nanoseek.train.data import build_dataset, load_dataset
from nanoseek.train.metrics import read_metrics
from nanoseek.train.state import latest_checkpoint
from nanoseek.train.trainer import pretrain


# ---- results -----------------------------------------------------------------------------------------
@dataclass
class ZeroResult:
    run_dir: Path
    report: Path
    model_dir: Path  # the RL model, HF format + tokenizer (r1_zero template)
    base_dir: Path  # the base model, the same format
    base: dict[str, dict[str, Any]]  # task label -> evaluation of the base model
    rl: dict[str, dict[str, Any]]  # task label -> evaluation of the RL model
    seconds: dict[str, float]  # wall time per stage
    targets: dict[str, Any]  # the targets on the demo task, measured (report.targets)


def run_zero(
    cfg: ZeroConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    nproc: int = 1,
) -> ZeroResult:
    """Run every stage of `cfg` into `out_dir` (see the module docstring); with resume, skip the stages
    already done and continue pretraining / GRPO from their last checkpoints. With nproc > 1, pretraining and
    GRPO run as that many processes under torchrun (zero_worker.py), each with threads / nproc threads."""
    run = Path(out_dir)
    check_nproc(cfg, nproc)
    _prepare_run_dir(run, cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stages = Stages(run, STAGES, fresh=not resume)
    stages.data.setdefault("machine", _machine())

    def stage(name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        stages.run(name, fn, log)

    stage("corpus", lambda: _stage_corpus(cfg, run, progress))
    stage("tokenizer", lambda: _stage_tokenizer(cfg, run))
    if nproc > 1:
        log(f"zero: pretraining and GRPO run as {nproc} processes (torchrun, gloo)")
    if nproc == 1:
        stage("pretrain", lambda: stage_pretrain(cfg, run, progress, log))
    else:
        stage("pretrain", lambda: _launch("pretrain", run, nproc, progress))
    stage("eval_base", lambda: _stage_eval(cfg, run / BASE_DIR, run / "eval_base.json", "base", progress))
    stage("grpo", lambda: stage_grpo(cfg, run, progress) if nproc == 1 else _launch("grpo", run, nproc, progress))
    stage("eval_rl", lambda: _stage_eval(cfg, run / MODEL_DIR, run / "eval_rl.json", "rl", progress))
    stages.data["machine"]["load_at_end"] = _load()

    t0 = time.perf_counter()
    report = write_report(run, cfg, stages.data)
    stages.finish("report", time.perf_counter() - t0)
    report = write_report(run, cfg, stages.data)  # again, so it shows its own time
    base, rl = _read(run / "eval_base.json"), _read(run / "eval_rl.json")

    log(f"zero: report in {report}; model in {run / MODEL_DIR}")
    return ZeroResult(
        run,
        report,
        run / MODEL_DIR,
        run / BASE_DIR,
        base,
        rl,
        stages.seconds(),
        targets(cfg, base, rl, _read_metrics_or_empty(run / "grpo")),
    )


def _prepare_run_dir(run: Path, cfg: ZeroConfig, resume: bool) -> None:
    saved = run / CONFIG_FILE
    if resume:
        if not saved.exists():
            raise ZeroError(f"cannot resume: {run} holds no zero run ({CONFIG_FILE} is missing)")
        old = ZeroConfig.from_dict(json.loads(saved.read_text())).to_dict()  # fields added since: defaults
        new = cfg.to_dict()
        changed = sorted(k for k in new if k != "threads" and old.get(k) != new[k])  # threads: speed only
        if changed:
            raise ZeroError(
                f"--resume: the run in {run} was made with other settings for {', '.join(changed)}; "
                "resume with the same preset and seed (or no --preset to take the run's own)"
            )
        return
    if saved.exists() or (run / STAGES_FILE).exists():
        raise ZeroError(f"{run} already holds a zero run; pass --resume to continue it, or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved, cfg.to_dict())


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_at_start": _load(),
    }


def _load() -> float | None:
    """The 1-minute load average (runnable processes, ours included), where the OS reports one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def _read_metrics_or_empty(run: Path) -> list[dict[str, Any]]:
    try:
        return read_metrics(run)
    except NanoseekError:
        return []


# ---- 1. corpus --------------------------------------------------------------------------------------
class ZeroCorpus:
    """The pretraining documents of every corpus part, interleaved in a seeded order; iterable again and
    again with the same result (the tokenizer and the tokenization both read it)."""

    def __init__(self, parts: list[CorpusPart], seed: int, split: str = "train", documents: int | None = None):
        self.parts, self.seed, self.split, self.documents = parts, seed, split, documents

    def sizes(self) -> list[int]:
        return [self.documents or p.documents for p in self.parts]

    def __iter__(self) -> Iterator[str]:
        sources = [p.documents_of(self.seed, self.split, n) for p, n in zip(self.parts, self.sizes())]
        order = [i for i, n in enumerate(self.sizes()) for _ in range(n)]
        random.Random(f"zero-corpus-{self.seed}-{self.split}").shuffle(order)
        for i in order:
            yield next(sources[i])


def corpus_stats(parts: list[CorpusPart], seed: int) -> list[dict[str, Any]]:
    """Per part: documents, how many carry a worked solution, characters. (The same draws as ZeroCorpus.)"""

    out = []
    for p in parts:
        n_trace = chars = 0
        for doc in p.documents_of(seed):
            if p.format == "worked":
                n_trace += 1
            else:  # the think part of the response (the preamble names the tags too)
                n_trace += bool(parse_completion(doc.rsplit(" Assistant:", 1)[1]).think)
            chars += len(doc)
        out.append(
            {
                "task": task_label(get_task(p.task, **p.knobs)),
                "knobs": p.knobs,
                "format": p.format,
                "documents": p.documents,
                "problems": p.documents * p.per_document,
                "with_trace": n_trace,
                "trace_fraction": n_trace / p.documents,
                "reasoning_fraction": p.reasoning_fraction if p.format == "r1_zero" else None,
                "characters": chars,
            }
        )
    return out


def _stage_corpus(cfg: ZeroConfig, run: Path, progress: bool) -> dict[str, Any]:
    """Count what the corpus holds (documents are generated again, identically, when tokenized)."""
    stats = []
    for part in tqdm(cfg.corpus.parts, desc="corpus", unit="part", disable=not progress, dynamic_ncols=True):
        stats += corpus_stats([part], cfg.seed)
    atomic_write_json(run / "corpus.json", {"parts": stats, "heldout_documents_per_part": cfg.corpus.heldout_documents})
    return {"documents": sum(s["documents"] for s in stats), "with_trace": sum(s["with_trace"] for s in stats)}


# ---- 2. tokenizer -----------------------------------------------------------------------------------
def _stage_tokenizer(cfg: ZeroConfig, run: Path) -> dict[str, Any]:
    docs = ZeroCorpus(cfg.corpus.parts, cfg.seed)
    tokenizer = train_tokenizer(docs, cfg.corpus.vocab_size, chat_template="r1_zero")
    heldout = ZeroCorpus(cfg.corpus.parts, cfg.seed, split="heldout", documents=cfg.corpus.heldout_documents)
    ds = build_dataset(run / "data", docs, heldout, tokenizer=tokenizer)
    return {
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": ds.meta["splits"]["train"]["n_tokens"],
        "heldout_tokens": ds.meta["splits"]["heldout"]["n_tokens"],
    }


# ---- 3. pretrain ------------------------------------------------------------------------------------
def stage_pretrain(cfg: ZeroConfig, run: Path, progress: bool, log) -> dict[str, Any]:
    ds = load_dataset(run / "data")
    resume = latest_checkpoint(run / "pretrain") is not None
    model_cfg = cfg.model.replace(vocab_size=max(cfg.model.vocab_size, ds.tokenizer.vocab_size))
    result = pretrain(model_cfg, cfg.train, ds, run / "pretrain", resume=resume, progress=progress, log=log)
    if parallel.rank() == 0:
        publish_model(result.checkpoint, run / BASE_DIR)
    return {
        "train_loss": result.train_loss,
        "heldout_loss": result.heldout_loss,
        "tokens_per_s": result.tokens_per_s,
        "steps": result.step,
    }


# ---- 4, 6. evaluation -------------------------------------------------------------------------------
def evaluate_model(
    model_dir: Path, tasks: list, ecfg: EvalConfig, progress: bool = True, desc: str = "eval"
) -> dict[str, dict[str, Any]]:
    """`evaluate` of a checkpoint on each task, plus how often it reasons (a non-empty think) and how
    accurate it is when it does and when it does not. Task label -> results."""

    engine = Engine(model_dir, max_batch_size=128, use_mtp=ecfg.use_mtp, cache_tokens=128 * (ecfg.max_tokens + 160))
    out = {}
    for task in tasks:
        seen: list[tuple[str, Any]] = []
        traces: list[dict[str, float]] = []  # trace_stats of each completion that reasons

        def reward_fn(problems, completions, score=task_reward_fn(task)):
            scores = score(problems, completions)
            seen.extend(zip(completions, scores))
            for p, c in zip(problems, completions):
                if think := parse_completion(c).think:
                    traces.append(task.trace_stats(p, think))
            return scores

        drafted, accepted = engine.stats.draft_tokens, engine.stats.accepted_tokens  # this task's share below
        restore = _count_finished(engine, ecfg.n_problems * ecfg.samples, f"{desc} {task_label(task)}", progress)
        try:
            r = evaluate(
                engine,
                task,
                n_problems=ecfg.n_problems,
                k=ecfg.k,
                samples_per_problem=ecfg.samples,
                temperature=ecfg.temperature,
                top_p=ecfg.top_p,
                max_tokens=ecfg.max_tokens,
                seed=ecfg.seed,
                n_examples=ecfg.n_examples,
                reward_fn=reward_fn,
            )
        finally:
            restore()
        thinks = [bool(parse_completion(c).think) for c, _ in seen]
        reasoned = [s.accuracy for (c, s), t in zip(seen, thinks) if t]
        direct = [s.accuracy for (c, s), t in zip(seen, thinks) if not t]
        d = r.to_dict()
        d.pop("per_problem", None)
        d.update(
            label=task_label(task),
            knobs=task.knobs(),
            reasoning_rate=sum(thinks) / max(len(thinks), 1),
            trace_stats={k: sum(t[k] for t in traces) / len(traces) for k in task.trace_rules} if traces else {},
            accuracy_when_reasoning=sum(reasoned) / len(reasoned) if reasoned else None,
            accuracy_when_direct=sum(direct) / len(direct) if direct else None,
            acceptance_rate=(engine.stats.accepted_tokens - accepted) / (engine.stats.draft_tokens - drafted)
            if ecfg.use_mtp and engine.stats.draft_tokens > drafted
            else None,
        )
        out[d["label"]] = d
    return out


def _count_finished(engine, total: int, desc: str, progress: bool) -> Callable[[], None]:
    """A progress bar of finished samples while the engine runs `evaluate`'s batch (the engine has no
    callback; this wraps its `step` on this instance only). Returns the function that undoes it."""
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)
    step = engine.step

    def counted():
        events = step()
        bar.update(sum(e.finish_reason is not None for e in events))
        return events

    engine.step = counted

    def restore() -> None:
        del engine.step
        bar.close()

    return restore


def _stage_eval(cfg: ZeroConfig, model_dir: Path, out: Path, desc: str, progress: bool) -> dict[str, Any]:
    results = evaluate_model(model_dir, cfg.eval_tasks(), cfg.eval, progress, desc=f"eval {desc}")
    atomic_write_json(out, results)
    demo = results[task_label(cfg.demo_task())]
    return {
        "pass@1": demo["pass_at_1"],
        f"pass@{cfg.eval.k}": demo["pass_at_k"],
        "mean_length": demo["mean_response_length"],
    }


# ---- 5. GRPO ----------------------------------------------------------------------------------------
def stage_grpo(cfg: ZeroConfig, run: Path, progress: bool) -> dict[str, Any]:
    model, tokenizer = from_pretrained(run / BASE_DIR), Tokenizer.from_pretrained(run / BASE_DIR)
    resume = latest_checkpoint(run / "grpo") is not None
    result = train_grpo(model, tokenizer, cfg.demo_task(), cfg.grpo, run / "grpo", resume=resume, progress=progress)
    if parallel.rank() == 0:
        publish_model(result.final_model_dir, run / MODEL_DIR)
    f = result.final
    return {
        "steps": result.steps,
        "final_reward": f.get("reward/total"),
        "final_accuracy": f.get("reward/accuracy"),
        "final_length": f.get("completion_length/mean"),
    }


# ---- several processes (--nproc) ---------------------------------------------------------------------
def check_nproc(cfg: ZeroConfig, nproc: int) -> None:
    """Refuse a process count the machine or the run's batches cannot be split over, naming why."""
    cores = os.cpu_count() or 1
    if nproc < 1:
        raise ZeroError(f"--nproc must be at least 1, not {nproc}")
    if nproc > cores:
        raise ZeroError(f"--nproc {nproc} needs at least {nproc} CPU cores (a process each); this machine has {cores}")
    if cfg.grpo.prompts_per_step % nproc:
        raise ZeroError(
            f"--nproc {nproc}: GRPO's prompts_per_step ({cfg.grpo.prompts_per_step}) must be divisible by it: each "
            f"process rolls out whole groups of num_generations ({cfg.grpo.num_generations}), and a group never "
            "spans processes"
        )
    if cfg.train.batch_size % nproc:
        raise ZeroError(
            f"--nproc {nproc}: pretraining's batch_size ({cfg.train.batch_size}) must be divisible by it (each "
            "process takes batch_size / nproc sequences a step)"
        )


def result_file(stage: str) -> str:
    return f"{stage}.result.json"


def _launch(stage: str, run: Path, nproc: int, progress: bool) -> dict[str, Any]:
    """Run a stage as nproc processes under torchrun (zero_worker.py) and return rank 0's summary of it."""
    threads = max(1, (torch.get_num_threads() or 1) // nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "nanoseek.rl.zero_worker", stage, str(run)] + ([] if progress else ["--no-progress"])
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=False)
    if done.returncode != 0:
        raise ZeroError(
            f"the {stage} stage failed under torchrun (exit {done.returncode}; each process's error is above); "
            "--resume continues from its last checkpoint"
        )
    path = run / result_file(stage)
    info = json.loads(path.read_text())
    path.unlink()
    return info
