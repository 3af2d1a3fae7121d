"""`nanoseek bench quality`: what each weight format costs in quality on a trained checkpoint, against fp32.

    nanoseek bench quality --model runs/zero/model --heldout runs/zero/data        # fp32 bf16 int8 int4
    nanoseek bench quality --model runs/zero/base --weights fp32 int8 --eval-problems 0   # loss rows only

    result = run(QualityBenchConfig(model="runs/zero/model", heldout="runs/zero/data"))

One fp32 model is loaded from the checkpoint; each format's model is `quantize_model(copy.deepcopy(fp32), fmt)`
(weight-only, see nanoseek/model/quant.py; "fp32" is the loaded model itself). Measured per format:

- held-out loss: mean next-token cross-entropy, teacher forcing, over the first `sequences` windows of
  `seq_len` tokens of the held-out split in file order (`PackedBatches(shuffle=False)`), with the same
  document masking as pretraining's held-out loss (attention stays inside a document; a target in another
  document is not scored): with the run's seq_len and 32 sequences the fp32 row is the number pretraining
  reported. Δ loss is (loss - fp32 loss) / fp32 loss, in %;
- top-1 agreement with fp32: the share of those scored positions where the format's argmax logit is fp32's
  argmax; and the mean KL(fp32 || format) of the next-token distributions there (nats per token), a finer
  measure of the same drift (left out when fp32's log-probs would take more than 512 MiB to keep);
- held-out pass@1 (and pass@k) of the task through the engine on that format (`Engine(fp32, weights=fmt)`,
  eager), by `nanoseek.rl.evaluate` with the protocol of `nanoseek zero`'s evaluation: for a model directory
  inside a zero run (RUN/base, RUN/model) the run's demo task and its `eval` settings (problems, samples
  per problem, k, temperature, top-p, max tokens, seed, MTP), so the fp32 row reproduces eval_base.json /
  eval_rl.json (another `task` keeps the protocol, with that task's default knobs); elsewhere `EvalConfig`'s
  defaults with 200 problems of `task` ("arithmetic"). Every format gets the same problems and per-sample
  seeds, so Δ pass@1 vs fp32 is a paired difference; both come with a standard error over problems (pass@1
  of a problem: its correct share of samples);
- the bytes of the model's weights as that format stores them (`weight_bytes`: the embedding, routers and
  norms stay fp32), and the wall time of each part (quantizing, the loss pass, the evaluation).

`eval_problems=0` skips pass@1; `heldout=None` skips the loss and agreement rows.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nanoseek.checkpoint.hf import from_pretrained
from nanoseek.checkpoint.tokenizer import Tokenizer
from nanoseek.engine.engine import Engine
from nanoseek.errors import NanoseekError
from nanoseek.model.quant import WEIGHT_FORMATS, quantize_model, weight_bytes
from nanoseek.model.transformer import Transformer
from nanoseek.rl.evaluate import evaluate, task_label
from nanoseek.rl.zero_config import BASE_DIR, MODEL_DIR, EvalConfig, ZeroConfig, load_run_config
from nanoseek.tasks import get_task
from nanoseek.train.data import IGNORE_INDEX, PackedBatches, load_dataset, tokenizer_hash

DEFAULT_SEQ_LEN = 256
DEFAULT_EVAL_PROBLEMS = 200
KL_REFERENCE_LIMIT = 512 << 20  # bytes of fp32 log-probs kept for the KL column
BATCH = 8  # held-out windows per forward


@dataclass
class QualityBenchConfig:
    model: str
    heldout: str | None = None  # a dataset directory holding heldout.bin (as `nanoseek pretrain` writes it)
    weights: list[str] = field(default_factory=lambda: list(WEIGHT_FORMATS))
    sequences: int = 64
    seq_len: int | None = None  # default: the zero run's pretraining seq_len, else 256
    eval_problems: int | None = None  # default: the zero run's, else 200; 0 skips pass@1
    task: str | None = None  # default: the zero run's demo task, else "arithmetic"
    seed: int = 0
    threads: int | None = None
    compile: bool | None = False  # the engines' compiled decode step (None: the engine decides); quality only


@dataclass
class _Context:
    """What the checkpoint's zero run (if any) says about how it is evaluated."""

    run: ZeroConfig | None
    task: Any
    eval: EvalConfig
    seq_len: int


def zero_run_of(model_dir: Path) -> ZeroConfig | None:
    """The configuration of the `nanoseek zero` run a model directory belongs to (RUN/base or RUN/model)."""
    if model_dir.name not in (BASE_DIR, MODEL_DIR):
        return None
    try:
        return load_run_config(model_dir.parent)
    except (NanoseekError, KeyError, TypeError, ValueError, json.JSONDecodeError):
        return None  # a config.json of something else: no context


def _context(cfg: QualityBenchConfig) -> _Context:
    run = zero_run_of(Path(cfg.model))
    ecfg = copy.copy(run.eval) if run is not None else EvalConfig(n_problems=DEFAULT_EVAL_PROBLEMS)
    if run is not None and cfg.task in (None, run.task):
        task = run.demo_task()  # with the run's difficulty knobs
    else:
        task = get_task(cfg.task or "arithmetic")
    if cfg.eval_problems is not None:
        ecfg.n_problems = cfg.eval_problems
    seq_len = cfg.seq_len or (run.train.seq_len if run is not None else DEFAULT_SEQ_LEN)
    return _Context(run, task, ecfg, seq_len)


# ---- teacher-forced pass over the held-out windows -------------------------------------------------------
def _heldout_batches(cfg: QualityBenchConfig, seq_len: int, model: Transformer, tokenizer) -> list:
    ds = load_dataset(cfg.heldout)
    if tokenizer is not None and tokenizer_hash(tokenizer) != ds.meta["tokenizer_sha256"]:
        raise NanoseekError(f"{cfg.heldout} was tokenized with another tokenizer than {cfg.model}'s")
    if ds.meta["vocab_size"] > model.config.vocab_size:
        raise NanoseekError(f"{cfg.heldout}'s vocabulary is larger than the model's ({model.config.vocab_size})")
    seq_len = min(seq_len, model.config.max_position_embeddings, ds.heldout.n_tokens - 1)
    batches = PackedBatches(ds.heldout, seq_len, shuffle=False, name="heldout")
    n = min(cfg.sequences, batches.n_windows)
    if n < 1:
        raise NanoseekError("--sequences must be at least 1")
    return [batches.take(range(i, min(i + BATCH, n))) for i in range(0, n, BATCH)]


@torch.no_grad()
def _teacher_forced(model: Transformer, batches: list, ref: dict | None) -> dict[str, Any]:
    """Loss over the scored positions; with `ref` (fp32's pass), top-1 agreement and KL against it. Without
    it, returns what a later pass compares with: the argmax (and log-probs, where they fit) per batch."""
    model.eval()
    loss_sum = agree = kl_sum = 0.0
    n_scored = 0
    keep = {"argmax": [], "logp": []}
    for i, mb in enumerate(batches):
        tgt = mb.targets(0)
        logits = model(mb.inputs, mask=mb.attention_mask())  # (B, T, V) float
        scored = tgt != IGNORE_INDEX
        logits, tgt = logits[scored], tgt[scored]  # (N, V), (N,)
        loss_sum += float(F.cross_entropy(logits, tgt, reduction="sum"))
        n_scored += int(tgt.numel())
        logp = logits.log_softmax(-1)
        top1 = logits.argmax(-1)
        if ref is None:
            keep["argmax"].append(top1)
            keep["logp"].append(logp if _ref_fits(batches, logits.shape[-1]) else None)
            continue
        agree += float((top1 == ref["argmax"][i]).sum())
        if ref["logp"][i] is not None:
            p_ref = ref["logp"][i]
            kl_sum += float((p_ref.exp() * (p_ref - logp)).sum())
    out = {"loss": loss_sum / max(n_scored, 1), "tokens": n_scored}
    if ref is None:
        out.update(keep)
    else:
        out["top1_agreement"] = agree / max(n_scored, 1)
        out["kl"] = kl_sum / max(n_scored, 1) if ref["logp"][0] is not None else None
    return out


def _ref_fits(batches: list, vocab: int) -> bool:
    tokens = sum(mb.inputs.numel() for mb in batches)
    return tokens * vocab * 4 <= KL_REFERENCE_LIMIT


# ---- pass@1 -----------------------------------------------------------------------------------------------
def _pass_at_1(model: Transformer, tokenizer, fmt: str, ctx: _Context, cfg: QualityBenchConfig) -> dict[str, Any]:
    e = ctx.eval
    # as nanoseek zero's evaluation builds its engine (rl/zero.py evaluate_model), on weights `fmt`
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=128,
        use_mtp=e.use_mtp,
        cache_tokens=128 * (e.max_tokens + 160),
        weights=fmt,
        compile=cfg.compile,
    )
    r = evaluate(
        engine,
        ctx.task,
        n_problems=e.n_problems,
        k=e.k,
        samples_per_problem=e.samples,
        temperature=e.temperature,
        top_p=e.top_p,
        max_tokens=e.max_tokens,
        seed=e.seed,
        n_examples=0,
    )
    per = [c / r.samples_per_problem for c in r.per_problem]
    return {
        "pass_at_1": r.pass_at_1,
        "pass_at_1_se": _se(per),
        f"pass_at_{r.k}": r.pass_at_k,
        "format_rate": r.format_rate,
        "mean_response_length": r.mean_response_length,
        "per_problem": per,
    }


def _se(xs: list[float]) -> float:
    """Standard error of the mean of xs (0 for fewer than two)."""
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


# ---- the run ----------------------------------------------------------------------------------------------
def run(cfg: QualityBenchConfig, log=print) -> dict[str, Any]:
    """Measure every format of `cfg.weights`, print the table, return the numbers (see the module docstring)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    formats = list(dict.fromkeys(cfg.weights))
    bad = [f for f in formats if f not in WEIGHT_FORMATS]
    if not formats or bad:
        raise NanoseekError(f"--weights takes one or more of {', '.join(WEIGHT_FORMATS)}; got {formats}")
    if cfg.heldout is None and cfg.eval_problems == 0:
        raise NanoseekError("nothing to measure: no --heldout data and --eval-problems 0")
    path = Path(cfg.model)
    fp32 = from_pretrained(path).eval()
    tokenizer = Tokenizer.from_pretrained(path) if (path / "tokenizer.json").exists() else None
    ctx = _context(cfg)
    do_eval = ctx.eval.n_problems > 0
    if do_eval and tokenizer is None:
        raise NanoseekError(f"pass@1 needs the checkpoint's tokenizer ({path}/tokenizer.json); or --eval-problems 0")
    if do_eval:
        ctx.task.heldout(ctx.eval.n_problems, seed=ctx.eval.seed)  # fails now, not after the loss pass, if too few
    torch.manual_seed(cfg.seed)

    batches = ref = None
    ref_seconds = 0.0
    if cfg.heldout is not None:
        batches = _heldout_batches(cfg, ctx.seq_len, fp32, tokenizer)
        t0 = time.perf_counter()
        ref = _teacher_forced(fp32, batches, None)
        ref_seconds = time.perf_counter() - t0

    rows: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        row: dict[str, Any] = {"seconds": {}}
        t0 = time.perf_counter()
        model = fp32 if fmt == "fp32" else quantize_model(copy.deepcopy(fp32), fmt).eval()
        row["seconds"]["quantize"] = time.perf_counter() - t0
        row["weight_bytes"] = weight_bytes(model)
        if ref is not None:
            if fmt == "fp32":  # the reference pass itself: identical by construction
                tf = {"loss": ref["loss"], "tokens": ref["tokens"], "top1_agreement": 1.0}
                tf["kl"] = 0.0 if ref["logp"][0] is not None else None
                row["seconds"]["loss"] = ref_seconds
            else:
                t1 = time.perf_counter()
                tf = _teacher_forced(model, batches, ref)
                row["seconds"]["loss"] = time.perf_counter() - t1
            row.update(tf, delta_loss_pct=100 * (tf["loss"] - ref["loss"]) / ref["loss"])
        del model  # the engine below makes its own copy from fp32
        if do_eval:
            t1 = time.perf_counter()
            row.update(_pass_at_1(fp32, tokenizer, fmt, ctx, cfg))
            row["seconds"]["eval"] = time.perf_counter() - t1
        row["seconds"]["total"] = sum(row["seconds"].values())
        rows[fmt] = row
        log(_progress_line(fmt, row), flush=True)

    if do_eval and "fp32" in rows:  # paired over the same problems and seeds
        base = rows["fp32"]["per_problem"]
        for row in rows.values():
            diff = [a - b for a, b in zip(row["per_problem"], base)]
            row["delta_pass_at_1"] = sum(diff) / len(diff)
            row["delta_pass_at_1_se"] = _se(diff)
    for row in rows.values():
        row.pop("per_problem", None)

    result = {
        "model": str(path),
        "heldout": cfg.heldout,
        "formats": rows,
        "threads": torch.get_num_threads(),
        "zero_run": ctx.run is not None,
    }
    if ref is not None:
        result.update(sequences=sum(mb.inputs.shape[0] for mb in batches), seq_len=batches[0].inputs.shape[1])
        result["scored_tokens"] = ref["tokens"]
    if do_eval:
        result["task"] = task_label(ctx.task)
        result["eval"] = asdict(ctx.eval)
    for line in table(result):
        log(line)
    return result


def _progress_line(fmt: str, row: dict[str, Any]) -> str:
    parts = [f"{fmt}:"]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.4f} ({row['delta_loss_pct']:+.2f}%), top-1 {row['top1_agreement']:.2%}")
    if "pass_at_1" in row:
        parts.append(f"pass@1 {row['pass_at_1']:.2%}")
    parts.append(f"({row['seconds']['total']:.1f} s)")
    return " ".join(parts)


def table(result: dict[str, Any]) -> list[str]:
    """The markdown table of a result, with a header line saying what was measured."""
    out = [f"\nnanoseek bench quality: {result['model']} ({result['threads']} threads)"]
    if "scored_tokens" in result:
        out.append(
            f"  held-out: {result['sequences']} sequences of {result['seq_len']} tokens from {result['heldout']} "
            f"({result['scored_tokens']:,} scored positions)"
        )
    if "eval" in result:
        e = result["eval"]
        out.append(
            f"  pass@1: {result['task']}, {e['n_problems']} held-out problems x {e['samples']} samples, "
            f"T={e['temperature']}, top-p {e['top_p']}, max {e['max_tokens']} tokens, MTP {e['use_mtp']}"
            + (" (the zero run's protocol)" if result["zero_run"] else "")
        )
    out += [
        "",
        "| format | held-out loss | Δ loss vs fp32 | top-1 agreement | KL vs fp32 | pass@1 | Δ pass@1 vs fp32 "
        "| weight bytes | wall s (quant + loss + eval) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt, r in result["formats"].items():
        s = r["seconds"]
        loss = f"{r['loss']:.4f}" if "loss" in r else "-"
        dloss = f"{r['delta_loss_pct']:+.2f}%" if "loss" in r else "-"
        agree = f"{r['top1_agreement']:.2%}" if "loss" in r else "-"
        kl = f"{r['kl']:.2e}" if r.get("kl") is not None else "-"
        p1 = f"{r['pass_at_1']:.2%} ± {r['pass_at_1_se']:.2%}" if "pass_at_1" in r else "-"
        dp1 = f"{r['delta_pass_at_1']:+.2%} ± {r['delta_pass_at_1_se']:.2%}" if "delta_pass_at_1" in r else "-"
        wall = f"{s['total']:.1f} ({s['quantize']:.1f} + {s.get('loss', 0):.1f} + {s.get('eval', 0):.1f})"
        out.append(
            f"| {fmt} | {loss} | {dloss} | {agree} | {kl} | {p1} | {dp1} | {r['weight_bytes'] / 1e6:.2f} MB | {wall} |"
        )
    return out
