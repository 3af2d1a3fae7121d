"""`nanoseek zero`: DeepSeek-R1-Zero in one command, from nothing: corpus, tokenizer, base model, GRPO, report.

    nanoseek zero --preset default --out runs/zero          # 20-25 minutes on 2 CPU cores
    nanoseek zero --preset smoke --out /tmp/zero            # about a minute: the test suite runs it
    nanoseek zero --out runs/zero --resume                  # continue a run that was stopped or killed

    from nanoseek.rl.zero import preset, run_zero
    result = run_zero(preset("default"), "runs/zero")      # ZeroResult: evals, stage times, paths

Stages (each timed; pretraining, evaluation and GRPO show a progress bar):
1. corpus     the demo task's train-split problems, in two formats (CorpusPart): "r1_zero" documents (prompt,
              "<think>...</think> <answer>...</answer>", EOS), of which a `reasoning_fraction` carry the full
              worked solution in the think part and the rest answer directly with an empty think; and
              "worked" documents, questions with their worked solutions as plain text, several to a
              document like a worksheet (arithmetic done on paper, no prompt, no tags). Nothing else: no SFT data, no other text, no held-out problem.
2. tokenizer  byte-level BPE trained on that corpus (digits split), with the r1_zero chat template;
              the corpus is tokenized into RUN_DIR/data.
3. pretrain   a small MLA + DeepSeekMoE base model with MTP (so it also drafts for speculative decoding).
4. eval_base  held-out pass@1 / pass@k, format rate, response length, reasoning rate (R1-Zero template,
              through the engine).
5. grpo       GRPO from the base model with rule rewards only (accuracy + format).
6. eval_rl    the same evaluation of the RL model.
7. report     RUN_DIR/report.md with the numbers, curves (PNG), the config and example completions.

Why RL can work here (REFERENCE §2): the base model has seen the step-by-step procedure, but rarely. It
mostly answers directly, which a tiny model does badly on multi-digit multiplication, and sometimes
reasons, which it does well: pass@1 is low and pass@k high. GRPO rewards the completions that are right,
which are mostly the reasoned ones, so the policy learns to reason: pass@1 rises and responses lengthen.

RUN_DIR layout (see docs/zero.md): config.json, stages.json (what is done, wall times), corpus.json,
data/, pretrain/, base/ (HF model + tokenizer), eval_base.json, grpo/, model/ (the final HF model +
tokenizer: `nanoseek serve --model RUN_DIR/model`, `nanoseek chat --model RUN_DIR/model`), eval_rl.json,
plots/*.png, report.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nanoseek.model.config import ModelConfig
from nanoseek.model.presets import get_preset
from nanoseek.errors import NanoseekError
from nanoseek.rl.grpo import GRPOConfig

STAGES = ("corpus", "tokenizer", "pretrain", "eval_base", "grpo", "eval_rl", "report")
CONFIG_FILE, STAGES_FILE, REPORT_FILE = "config.json", "stages.json", "report.md"
MODEL_DIR, BASE_DIR = "model", "base"


class ZeroError(NanoseekError):
    """A zero run that cannot start or continue: a run directory in the wrong state, a changed config."""


# ---- configuration -----------------------------------------------------------------------------------
FORMATS = ("r1_zero", "worked")


@dataclass
class CorpusPart:
    """`documents` train-split problems of one task (with its difficulty knobs), written as

    - "r1_zero": R1-Zero prompt + " <think> ... </think> <answer> ... </answer>" + EOS; a
      `reasoning_fraction` of them carry the worked solution in the think part, the rest an empty think
      and the answer directly (`tasks.pretraining_documents`);
    - "worked": the question and its worked solution, as plain text (no prompt, no tags): arithmetic
      worked out on paper, the kind of text a base model's corpus holds outside any chat format;
      `per_document` problems one after another, like a worksheet (a question that is not always at the
      start of its document makes the model learn to copy operands wherever they stand, as it must
      after an R1-Zero prompt, instead of from a fixed position)."""

    task: str = "arithmetic"
    knobs: dict[str, Any] = field(default_factory=dict)
    documents: int = 1000
    format: str = "r1_zero"
    reasoning_fraction: float = 0.1  # r1_zero only
    per_document: int = 1  # worked only: problems per document, one after another like a worksheet

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ZeroError(f"corpus part format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.per_document < 1 or (self.per_document > 1 and self.format != "worked"):
            raise ZeroError("per_document must be >= 1, and > 1 only for the worked format")

    def documents_of(self, seed: int, split: str = "train", n: int | None = None) -> Iterator[str]:
        from nanoseek.tasks import get_task, pretraining_documents

        task = get_task(self.task, **self.knobs)
        n = self.documents if n is None else n
        if self.format == "r1_zero":
            return pretraining_documents(task, n, seed, self.reasoning_fraction, split=split)
        rng = random.Random(f"{task.name}-worked-{split}-{seed}")
        return ("\n\n".join(_worked(task, task.sample(rng, split)) for _ in range(self.per_document))
                for _ in range(n))


def _worked(task, problem) -> str:
    """A problem worked out on paper: the question, then the solution, as plain text. The question comes
    first so that the model learns to read the operands off it, as it must after an R1-Zero prompt."""
    return f"{problem.question}\n{task.solution(problem)}"


@dataclass
class CorpusConfig:
    parts: list[CorpusPart] = field(default_factory=lambda: [CorpusPart()])
    heldout_documents: int = 200  # per part, from the task's held-out split: only for the held-out loss
    vocab_size: int = 512


@dataclass
class EvalConfig:
    """Held-out evaluation, R1 paper style: `samples` completions per problem at `temperature`; pass@1 is
    their mean correctness, pass@k the unbiased estimate from them."""

    n_problems: int = 100
    samples: int = 8
    k: int = 8
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 320
    seed: int = 0  # which held-out problems (fixed whatever the run's seed, so runs compare)
    use_mtp: bool = True  # MTP self-speculative decoding (exact: same distribution, fewer forwards)
    n_examples: int = 3


@dataclass
class ZeroConfig:
    """Everything a zero run does. `task`/`task_knobs` is the demo task: GRPO trains on it and it is
    evaluated; every corpus part's task is evaluated too."""

    preset: str
    model: ModelConfig
    corpus: CorpusConfig
    train: Any  # nanoseek.train.TrainConfig (imported lazily: the CLI parses flags before torch work)
    grpo: GRPOConfig
    eval: EvalConfig
    task: str = "arithmetic"
    task_knobs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    threads: int = 0  # torch threads; 0 = torch's default

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset, "task": self.task, "task_knobs": self.task_knobs, "seed": self.seed,
            "threads": self.threads, "model": self.model.to_hf_dict(),
            "corpus": dataclasses.asdict(self.corpus), "train": self.train.to_dict(),
            "grpo": self.grpo.to_dict(), "eval": dataclasses.asdict(self.eval),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZeroConfig:
        from nanoseek.train.trainer import TrainConfig

        corpus = dict(d["corpus"])
        corpus["parts"] = [CorpusPart(**p) for p in corpus["parts"]]
        return cls(preset=d["preset"], model=ModelConfig.from_hf_dict(d["model"]),
                   corpus=CorpusConfig(**corpus), train=TrainConfig.from_dict(d["train"]),
                   grpo=GRPOConfig(**d["grpo"]), eval=EvalConfig(**d["eval"]), task=d["task"],
                   task_knobs=dict(d["task_knobs"]), seed=d["seed"], threads=d.get("threads", 0))

    def demo_task(self):
        from nanoseek.tasks import get_task

        return get_task(self.task, **self.task_knobs)

    def eval_tasks(self) -> list:
        """The demo task first, then each other task of the corpus (distinct by name and knobs)."""
        from nanoseek.tasks import get_task

        tasks, seen = [self.demo_task()], {(self.task, json.dumps(self.task_knobs, sort_keys=True))}
        for p in self.corpus.parts:
            key = (p.task, json.dumps(p.knobs, sort_keys=True))
            if key not in seen:
                seen.add(key)
                tasks.append(get_task(p.task, **p.knobs))
        return tasks


def preset(name: str = "default", seed: int = 0) -> ZeroConfig:
    """The named run: "default" (the demo, ~20-25 min on 2 cores) or "smoke" (about a minute; what the tests run)."""
    from nanoseek.train.trainer import TrainConfig

    if name == "default":
        # Two-digit addition: the tiny model's direct answers are mostly wrong, its worked column additions
        # far more often right. Most of the corpus is worksheets of worked problems as plain text (cheap:
        # no 100-token prompt), plus R1-Zero documents of which a quarter reason (0.5 did much worse, see
        # docs/zero.md); windows of 256 tokens hold a whole document.
        knobs = {"min_digits": 2, "max_digits": 2, "ops": "+"}
        return ZeroConfig(
            preset=name, task="arithmetic", task_knobs=knobs, seed=seed,
            model=get_preset("tiny", vocab_size=512, max_position_embeddings=512),
            corpus=CorpusConfig(parts=[CorpusPart("arithmetic", knobs, documents=4_000, reasoning_fraction=0.25),
                                       CorpusPart("arithmetic", knobs, documents=5_000, format="worked",
                                                  per_document=4)],
                                heldout_documents=200, vocab_size=512),
            train=TrainConfig(seq_len=256, batch_size=16, max_steps=600, lr=6e-3, warmup_steps=50, min_lr_ratio=0.1,
                              eval_every=100, save_every=100, keep_last=1, seed=seed),
            grpo=GRPOConfig(num_generations=8, prompts_per_step=16, max_completion_length=96, learning_rate=1e-4,
                            loss_type="dr_grpo", max_steps=40, save_steps=10, save_total_limit=1, seed=seed),
            eval=EvalConfig(n_problems=100, samples=8, k=8, max_tokens=96),
        )
    if name == "smoke":
        knobs = {"min_digits": 1, "max_digits": 1, "ops": "+"}
        return ZeroConfig(
            preset=name, task="arithmetic", task_knobs=knobs, seed=seed,
            model=get_preset("tiny", vocab_size=384, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
                             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                             n_group=1, topk_group=1, max_position_embeddings=512),
            corpus=CorpusConfig(parts=[CorpusPart("arithmetic", knobs, documents=400, reasoning_fraction=0.3)],
                                heldout_documents=20, vocab_size=384),
            # a window holds a whole document (~140 tokens), so every answer is seen with its question
            train=TrainConfig(seq_len=256, batch_size=8, max_steps=150, lr=1e-2, warmup_steps=5, eval_every=75,
                              eval_sequences=8, save_every=75, keep_last=1, seed=seed),
            grpo=GRPOConfig(num_generations=4, prompts_per_step=4, max_completion_length=48, learning_rate=1e-4,
                            loss_type="dr_grpo", max_steps=3, save_steps=2, save_total_limit=1, seed=seed),
            eval=EvalConfig(n_problems=8, samples=4, k=4, max_tokens=48, n_examples=2),
        )
    raise ZeroError(f"unknown zero preset {name!r}; presets: default, smoke")


PRESETS = ("default", "smoke")


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
    targets: dict[str, Any]  # the targets on the demo task, measured


def task_label(task) -> str:
    """A short, stable name of a task with its knobs, e.g. "arithmetic(2-2 digits, *)"."""
    k = task.knobs()
    if task.name == "arithmetic":
        return f"arithmetic({k['min_digits']}-{k['max_digits']} digits, {k['ops']})"
    shown = ", ".join(f"{a}={b}" for a, b in k.items() if isinstance(b, (int, float, str)))
    return f"{task.name}({shown})"


# ---- the run -----------------------------------------------------------------------------------------
class _Stages:
    """RUN_DIR/stages.json: which stages are done, their wall time and small results; rewritten atomically."""

    def __init__(self, run_dir: Path, fresh: bool):
        self.path = run_dir / STAGES_FILE
        self.data: dict[str, Any] = {} if fresh or not self.path.exists() else json.loads(self.path.read_text())

    def done(self, name: str) -> bool:
        return bool(self.data.get(name, {}).get("done"))

    def seconds(self) -> dict[str, float]:
        return {s: self.data[s]["seconds"] for s in STAGES if s in self.data}

    def finish(self, name: str, seconds: float, **info: Any) -> None:
        prev = self.data.get(name, {}).get("seconds", 0.0)  # a resumed stage adds to its earlier time
        self.data[name] = {"done": True, "seconds": prev + seconds, **info}
        self._write()

    def interrupted(self, name: str, seconds: float) -> None:
        prev = self.data.get(name, {}).get("seconds", 0.0)
        self.data[name] = {"done": False, "seconds": prev + seconds}
        self._write()

    def run(self, name: str, fn: Callable[[], dict[str, Any] | None], log: Callable[[str], None],
            job: str = "zero") -> None:
        """Run stage `name` unless it is done: timed, its result recorded; a stage that raises (or is
        interrupted) keeps its time so far and stays not done, for --resume."""
        if self.done(name):
            log(f"{job}: {name}: done earlier ({self.data[name]['seconds']:.0f}s), skipped")
            return
        log(f"{job}: {name} ...")
        t0 = time.perf_counter()
        try:
            info = fn() or {}
        except BaseException:
            self.interrupted(name, time.perf_counter() - t0)
            raise
        self.finish(name, time.perf_counter() - t0, **info)
        log(f"{job}: {name}: {self.data[name]['seconds']:.1f}s")

    def _write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


def run_zero(cfg: ZeroConfig, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> ZeroResult:
    """Run every stage of `cfg` into `out_dir` (see the module docstring); with resume, skip the stages
    already done and continue pretraining / GRPO from their last checkpoints."""
    run = Path(out_dir)
    _prepare_run_dir(run, cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stages = _Stages(run, fresh=not resume)
    stages.data.setdefault("machine", _machine())

    def stage(name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        stages.run(name, fn, log)

    stage("corpus", lambda: _stage_corpus(cfg, run, progress))
    stage("tokenizer", lambda: _stage_tokenizer(cfg, run))
    stage("pretrain", lambda: _stage_pretrain(cfg, run, progress, log))
    stage("eval_base", lambda: _stage_eval(cfg, run / BASE_DIR, run / "eval_base.json", "base", progress))
    stage("grpo", lambda: _stage_grpo(cfg, run, progress))
    stage("eval_rl", lambda: _stage_eval(cfg, run / MODEL_DIR, run / "eval_rl.json", "rl", progress))
    stages.data["machine"]["load_at_end"] = _load()
    from nanoseek.rl.report import write_report

    t0 = time.perf_counter()
    report = write_report(run, cfg, stages.data)
    stages.finish("report", time.perf_counter() - t0)
    report = write_report(run, cfg, stages.data)  # again, so it shows its own time
    base, rl = _read(run / "eval_base.json"), _read(run / "eval_rl.json")
    from nanoseek.rl.report import targets

    log(f"zero: report in {report}; model in {run / MODEL_DIR}")
    return ZeroResult(run, report, run / MODEL_DIR, run / BASE_DIR, base, rl, stages.seconds(),
                      targets(cfg, base, rl, _read_metrics_or_empty(run / "grpo")))


def _prepare_run_dir(run: Path, cfg: ZeroConfig, resume: bool) -> None:
    saved = run / CONFIG_FILE
    if resume:
        if not saved.exists():
            raise ZeroError(f"cannot resume: {run} holds no zero run ({CONFIG_FILE} is missing)")
        old = json.loads(saved.read_text())
        new = cfg.to_dict()
        changed = sorted(k for k in new if k != "threads" and old.get(k) != new[k])  # threads: speed only
        if changed:
            raise ZeroError(f"--resume: the run in {run} was made with other settings for {', '.join(changed)}; "
                            "resume with the same preset and seed (or no --preset to take the run's own)")
        return
    if saved.exists() or (run / STAGES_FILE).exists():
        raise ZeroError(f"{run} already holds a zero run; pass --resume to continue it, or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    os.replace(tmp, saved)


def load_run_config(run: str | os.PathLike) -> ZeroConfig:
    path = Path(run) / CONFIG_FILE
    if not path.exists():
        raise ZeroError(f"{run} holds no zero run ({CONFIG_FILE} is missing)")
    return ZeroConfig.from_dict(json.loads(path.read_text()))


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "load_at_start": _load()}


def _load() -> float | None:
    """The 1-minute load average (runnable processes, ours included), where the OS reports one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def _read_metrics_or_empty(run: Path) -> list[dict[str, Any]]:
    from nanoseek.train.metrics import read_metrics

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
    from nanoseek.tasks import get_task, parse_completion

    out = []
    for p in parts:
        n_trace = chars = 0
        for doc in p.documents_of(seed):
            if p.format == "worked":
                n_trace += 1
            else:  # the think part of the response (the preamble names the tags too)
                n_trace += bool(parse_completion(doc.rsplit(" Assistant:", 1)[1]).think)
            chars += len(doc)
        out.append({"task": task_label(get_task(p.task, **p.knobs)), "knobs": p.knobs, "format": p.format,
                    "documents": p.documents, "problems": p.documents * p.per_document,
                    "with_trace": n_trace, "trace_fraction": n_trace / p.documents,
                    "reasoning_fraction": p.reasoning_fraction if p.format == "r1_zero" else None,
                    "characters": chars})
    return out


def _stage_corpus(cfg: ZeroConfig, run: Path, progress: bool) -> dict[str, Any]:
    """Count what the corpus holds (documents are generated again, identically, when tokenized)."""
    stats = []
    for part in tqdm(cfg.corpus.parts, desc="corpus", unit="part", disable=not progress, dynamic_ncols=True):
        stats += corpus_stats([part], cfg.seed)
    (run / "corpus.json").write_text(json.dumps({"parts": stats, "heldout_documents_per_part":
                                                 cfg.corpus.heldout_documents}, indent=1) + "\n")
    return {"documents": sum(s["documents"] for s in stats), "with_trace": sum(s["with_trace"] for s in stats)}


# ---- 2. tokenizer -----------------------------------------------------------------------------------
def _stage_tokenizer(cfg: ZeroConfig, run: Path) -> dict[str, Any]:
    from nanoseek.train.data import build_dataset
    from nanoseek.checkpoint.tokenizer import train_tokenizer

    docs = ZeroCorpus(cfg.corpus.parts, cfg.seed)
    tokenizer = train_tokenizer(docs, cfg.corpus.vocab_size, chat_template="r1_zero")
    heldout = ZeroCorpus(cfg.corpus.parts, cfg.seed, split="heldout", documents=cfg.corpus.heldout_documents)
    ds = build_dataset(run / "data", docs, heldout, tokenizer=tokenizer)
    return {"vocab_size": tokenizer.vocab_size, "train_tokens": ds.meta["splits"]["train"]["n_tokens"],
            "heldout_tokens": ds.meta["splits"]["heldout"]["n_tokens"]}


# ---- 3. pretrain ------------------------------------------------------------------------------------
def _stage_pretrain(cfg: ZeroConfig, run: Path, progress: bool, log) -> dict[str, Any]:
    from nanoseek.train.data import load_dataset
    from nanoseek.train.trainer import pretrain
    from nanoseek.train.state import latest_checkpoint

    ds = load_dataset(run / "data")
    resume = latest_checkpoint(run / "pretrain") is not None
    model_cfg = cfg.model.replace(vocab_size=max(cfg.model.vocab_size, ds.tokenizer.vocab_size))
    result = pretrain(model_cfg, cfg.train, ds, run / "pretrain", resume=resume, progress=progress, log=log)
    _publish(result.checkpoint, run / BASE_DIR)
    return {"train_loss": result.train_loss, "heldout_loss": result.heldout_loss,
            "tokens_per_s": result.tokens_per_s, "steps": result.step}


def _publish(src: Path, dst: Path) -> None:
    """Copy the model and tokenizer files of a checkpoint to a clean HF directory, atomically."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)
    for f in src.glob("model*.safetensors*"):
        shutil.copy2(f, tmp / f.name)
    if (src / "model.safetensors.index.json").exists():
        shutil.copy2(src / "model.safetensors.index.json", tmp / "model.safetensors.index.json")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


# ---- 4, 6. evaluation -------------------------------------------------------------------------------
def evaluate_model(model_dir: Path, tasks: list, ecfg: EvalConfig, progress: bool = True,
                   desc: str = "eval") -> dict[str, dict[str, Any]]:
    """`evaluate` of a checkpoint on each task, plus how often it reasons (a non-empty think) and how
    accurate it is when it does and when it does not. Task label -> results."""
    from nanoseek.engine.engine import Engine
    from nanoseek.rl.evaluate import evaluate
    from nanoseek.tasks import RewardWeights, parse_completion, score_batch

    engine = Engine(model_dir, max_batch_size=128, use_mtp=ecfg.use_mtp,
                    cache_tokens=128 * (ecfg.max_tokens + 160))
    out = {}
    for task in tasks:
        seen: list[tuple[str, Any]] = []

        def reward_fn(problems, completions, task=task):
            scores = score_batch(problems, completions, RewardWeights(), {task.name: task})
            seen.extend(zip(completions, scores))
            return scores

        drafted, accepted = engine.stats.draft_tokens, engine.stats.accepted_tokens  # this task's share below
        restore = _count_finished(engine, ecfg.n_problems * ecfg.samples, f"{desc} {task_label(task)}", progress)
        try:
            r = evaluate(engine, task, n_problems=ecfg.n_problems, k=ecfg.k, samples_per_problem=ecfg.samples,
                         temperature=ecfg.temperature, top_p=ecfg.top_p, max_tokens=ecfg.max_tokens, seed=ecfg.seed,
                         n_examples=ecfg.n_examples, reward_fn=reward_fn)
        finally:
            restore()
        thinks = [bool(parse_completion(c).think) for c, _ in seen]
        reasoned = [s.accuracy for (c, s), t in zip(seen, thinks) if t]
        direct = [s.accuracy for (c, s), t in zip(seen, thinks) if not t]
        d = r.to_dict()
        d.pop("per_problem", None)
        d.update(label=task_label(task), knobs=task.knobs(), reasoning_rate=sum(thinks) / max(len(thinks), 1),
                 accuracy_when_reasoning=sum(reasoned) / len(reasoned) if reasoned else None,
                 accuracy_when_direct=sum(direct) / len(direct) if direct else None,
                 acceptance_rate=(engine.stats.accepted_tokens - accepted) / (engine.stats.draft_tokens - drafted)
                 if ecfg.use_mtp and engine.stats.draft_tokens > drafted else None)
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
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, out)
    demo = results[task_label(cfg.demo_task())]
    return {"pass@1": demo["pass_at_1"], f"pass@{cfg.eval.k}": demo["pass_at_k"],
            "mean_length": demo["mean_response_length"]}


# ---- 5. GRPO ----------------------------------------------------------------------------------------
def _stage_grpo(cfg: ZeroConfig, run: Path, progress: bool) -> dict[str, Any]:
    from nanoseek.checkpoint.hf import from_pretrained
    from nanoseek.checkpoint.tokenizer import Tokenizer
    from nanoseek.train.state import latest_checkpoint
    from nanoseek.rl.grpo import train_grpo

    model, tokenizer = from_pretrained(run / BASE_DIR), Tokenizer.from_pretrained(run / BASE_DIR)
    resume = latest_checkpoint(run / "grpo") is not None
    result = train_grpo(model, tokenizer, cfg.demo_task(), cfg.grpo, run / "grpo", resume=resume, progress=progress)
    _publish(result.final_model_dir, run / MODEL_DIR)
    f = result.final
    return {"steps": result.steps, "final_reward": f.get("reward/total"), "final_accuracy": f.get("reward/accuracy"),
            "final_length": f.get("completion_length/mean")}
