"""What a `nanoseek zero` run is: its configuration (the corpus parts, the base model, pretraining, GRPO,
evaluation), the named presets (`preset("default")`, `preset("smoke")`), and the layout of its run directory.

    from nanoseek.rl.zero_config import preset
    cfg = preset("smoke", seed=1)          # a ZeroConfig; run it with nanoseek.rl.zero.run_zero
    cfg = preset("smoke", model="tiny-v32")  # the same run on DeepSeek-V3.2's sparse attention
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.errors import NanoseekError
from nanoseek.model.config import ModelConfig
from nanoseek.model.presets import get_preset
from nanoseek.model.v4_config import CSA, HCA
from nanoseek.rl.config import GRPOConfig
from nanoseek.tasks import get_task, pretraining_documents
from nanoseek.train.trainer import TrainConfig

STAGES = ("corpus", "tokenizer", "pretrain", "eval_base", "grpo", "eval_rl", "report")
CONFIG_FILE, REPORT_FILE = "config.json", "report.md"
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
        task = get_task(self.task, **self.knobs)
        n = self.documents if n is None else n
        if self.format == "r1_zero":
            return pretraining_documents(task, n, seed, self.reasoning_fraction, split=split)
        rng = random.Random(f"{task.name}-worked-{split}-{seed}")
        return ("\n\n".join(_worked(task, task.sample(rng, split)) for _ in range(self.per_document)) for _ in range(n))


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
    train: TrainConfig
    grpo: GRPOConfig
    eval: EvalConfig
    task: str = "arithmetic"
    task_knobs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    threads: int = 0  # torch threads; 0 = torch's default

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "task": self.task,
            "task_knobs": self.task_knobs,
            "seed": self.seed,
            "threads": self.threads,
            "model": self.model.to_hf_dict(),
            "corpus": dataclasses.asdict(self.corpus),
            "train": self.train.to_dict(),
            "grpo": self.grpo.to_dict(),
            "eval": dataclasses.asdict(self.eval),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZeroConfig:
        corpus = dict(d["corpus"])
        corpus["parts"] = [CorpusPart(**p) for p in corpus["parts"]]
        return cls(
            preset=d["preset"],
            model=ModelConfig.from_hf_dict(d["model"]),
            corpus=CorpusConfig(**corpus),
            train=TrainConfig.from_dict(d["train"]),
            grpo=GRPOConfig(**d["grpo"]),
            eval=EvalConfig(**d["eval"]),
            task=d["task"],
            task_knobs=dict(d["task_knobs"]),
            seed=d["seed"],
            threads=d.get("threads", 0),
        )

    def demo_task(self):
        return get_task(self.task, **self.task_knobs)

    def eval_tasks(self) -> list:
        """The demo task first, then each other task of the corpus (distinct by name and knobs)."""
        tasks, seen = [self.demo_task()], {(self.task, json.dumps(self.task_knobs, sort_keys=True))}
        for p in self.corpus.parts:
            key = (p.task, json.dumps(p.knobs, sort_keys=True))
            if key not in seen:
                seen.add(key)
                tasks.append(get_task(p.task, **p.knobs))
        return tasks


MODEL_PRESETS = ("tiny", "tiny-v32", "tiny-v4")


def preset(name: str = "default", seed: int = 0, model: str = "tiny") -> ZeroConfig:
    """The named run: "default" (the demo, ~25 min on 2 cores), "smoke" (about a minute; what the tests run),
    "countdown" or "countdown-smoke" (TinyZero's task).

    model: the model preset the run's shape is cut from: "tiny" (DeepSeek-V3: MLA, DeepSeekMoE, MTP) or
    "tiny-v32" (the same plus DeepSeek-V3.2's sparse attention behind a lightning indexer, top-64 keys).
    A V3.2 model is pretrained from scratch with a dense warm-up of every parameter (the indexer fitted to
    the dense attention by KL) before sparse training; GRPO, evaluation and the engine then run it sparse.
    "tiny-v4" is DeepSeek-V4 at tiny's size (sliding window, CSA and HCA, mHC, hash routing), pretrained
    without the document mask (its compressed branches pool fixed windows across documents), its CSA indexers
    with the same dense warm-up."""
    if model not in MODEL_PRESETS:
        raise ZeroError(f"unknown zero model preset {model!r}; presets: {', '.join(MODEL_PRESETS)}")
    cfg = _preset(name, seed, model)
    v4 = cfg.model.model_type == "deepseek_v4"
    if v4:
        cfg.train.doc_mask = False
        if name == "default":  # as measured on V4 (1.9x V3's time per step): 600 + 40 steps fit the budget
            cfg.train.max_steps, cfg.grpo.max_steps = 600, 40
    if cfg.model.dsa or v4:  # V4's CSA indexers train as V3.2's do
        cfg.train.dsa_warmup_steps = cfg.train.max_steps // 6
        cfg.train.dsa_warmup_train_all = True
    return cfg


def _smoke_model(model: str) -> ModelConfig:
    """The smoke run's two-layer cut of a model preset."""
    if model == "tiny-v4":
        v4 = get_preset(model).v4
        return get_preset(
            model,
            vocab_size=384,
            hidden_size=64,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            n_routed_experts=4,
            index_n_heads=2,
            index_head_dim=16,
            index_topk=8,
            max_position_embeddings=512,
            v4=dataclasses.replace(
                v4, head_dim=32, layer_types=(CSA, HCA), mlp_layer_types=("hash_moe", "moe"), o_lora_rank=16, hc_mult=2
            ),
        )
    return get_preset(
        model,
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
        max_position_embeddings=512,
    )


def _preset(name: str, seed: int, model: str) -> ZeroConfig:
    if name == "default":
        # Two-digit addition: the tiny model's direct answers are mostly wrong, its worked column additions
        # far more often right. Most of the corpus is worksheets of worked problems as plain text (cheap:
        # no 100-token prompt), plus R1-Zero documents of which a quarter reason (0.5 did much worse, see
        # docs/zero.md); windows of 256 tokens hold a whole document.
        knobs = {"min_digits": 2, "max_digits": 2, "ops": "+"}
        return ZeroConfig(
            preset=name,
            task="arithmetic",
            task_knobs=knobs,
            seed=seed,
            model=get_preset(model, vocab_size=512, max_position_embeddings=512),
            corpus=CorpusConfig(
                parts=[
                    CorpusPart("arithmetic", knobs, documents=4_000, reasoning_fraction=0.25),
                    CorpusPart("arithmetic", knobs, documents=5_000, format="worked", per_document=4),
                ],
                heldout_documents=200,
                vocab_size=512,
            ),
            # 1,500 steps: by then every seed tried had learned to copy the question's operands into its trace,
            # which decides what RL can reach (600: 66-100% by seed; 1,000: 19-99%; 1,500: 100% x 3; docs/zero.md)
            train=TrainConfig(
                seq_len=256,
                batch_size=16,
                max_steps=1500,
                lr=6e-3,
                warmup_steps=50,
                min_lr_ratio=0.1,
                eval_every=100,
                save_every=100,
                keep_last=1,
                seed=seed,
            ),
            grpo=GRPOConfig(
                num_generations=8,
                prompts_per_step=16,
                max_completion_length=96,
                learning_rate=1e-4,
                loss_type="dr_grpo",
                max_steps=60,
                save_steps=10,
                save_total_limit=1,
                seed=seed,
            ),
            eval=EvalConfig(n_problems=100, samples=8, k=8, max_tokens=96),
        )
    if name == "smoke":
        knobs = {"min_digits": 1, "max_digits": 1, "ops": "+"}
        return ZeroConfig(
            preset=name,
            task="arithmetic",
            task_knobs=knobs,
            seed=seed,
            model=_smoke_model(model),
            corpus=CorpusConfig(
                parts=[CorpusPart("arithmetic", knobs, documents=400, reasoning_fraction=0.3)],
                heldout_documents=20,
                vocab_size=384,
            ),
            # a window holds a whole document (~140 tokens), so every answer is seen with its question
            train=TrainConfig(
                seq_len=256,
                batch_size=8,
                max_steps=150,
                lr=1e-2,
                warmup_steps=5,
                eval_every=75,
                eval_sequences=8,
                save_every=75,
                keep_last=1,
                seed=seed,
            ),
            grpo=GRPOConfig(
                num_generations=4,
                prompts_per_step=4,
                max_completion_length=48,
                learning_rate=1e-4,
                loss_type="dr_grpo",
                max_steps=3,
                save_steps=2,
                save_total_limit=1,
                seed=seed,
            ),
            eval=EvalConfig(n_problems=8, samples=4, k=4, max_tokens=48, n_examples=2),
        )
    if name in ("countdown", "countdown-smoke"):
        return _countdown(name, seed, model)
    raise ZeroError(f"unknown zero preset {name!r}; presets: {', '.join(ZERO_PRESETS)}")


def _countdown(name: str, seed: int, model: str) -> ZeroConfig:
    """TinyZero's Countdown: make the target from 3 given numbers (1-25) with + - * /, each at most once.
    The worked solution is the depth-first search that finds the answer (tasks/countdown.py), at most 8
    tries, a quarter of the R1-Zero documents carrying it; worksheets of searches as plain text. `countdown`
    is sized for about an hour on 2 CPU cores; `countdown-smoke` runs every stage in about a minute (tests)."""
    knobs = {"min_count": 3, "max_count": 3, "max_number": 25, "max_target": 100, "max_search_steps": 8}
    smoke = name == "countdown-smoke"
    base = _preset("smoke" if smoke else "default", seed, model)
    base.preset, base.task, base.task_knobs = name, "countdown", knobs
    base.corpus.parts = [
        CorpusPart("countdown", knobs, documents=400 if smoke else 6_000, reasoning_fraction=0.25),
        CorpusPart("countdown", knobs, documents=100 if smoke else 5_000, format="worked", per_document=3),
    ]
    base.train.seq_len = 384  # an R1-Zero document with its search: ~110 prompt + ~120 trace tokens
    if not smoke:
        base.train.max_steps = 1000
        base.grpo.max_steps = 40
        base.grpo.max_completion_length = 160
        base.eval = EvalConfig(n_problems=100, samples=8, k=8, max_tokens=160)
    return base


ZERO_PRESETS = ("default", "smoke", "countdown", "countdown-smoke")


def load_run_config(run: str | os.PathLike) -> ZeroConfig:
    path = Path(run) / CONFIG_FILE
    if not path.exists():
        raise ZeroError(f"{run} holds no zero run ({CONFIG_FILE} is missing)")
    return ZeroConfig.from_dict(json.loads(path.read_text()))
