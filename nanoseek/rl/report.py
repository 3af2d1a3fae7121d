"""The report of a `nanoseek zero` run: RUN_DIR/report.md and its PNG curves, from the run's own files.

    write_report(run_dir, cfg, stages)      # reads eval_base.json, eval_rl.json, corpus.json, metrics
    targets(cfg, base, rl, grpo_rows)       # the targets on the demo task, measured

Every number in the report is read from a file the run wrote (evaluations, metrics.jsonl, stages.json),
so the report can be rebuilt at any time and checked against them (tests/test_zero.py does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nanoseek.fileio import atomic_write_text
from nanoseek.model.stats import model_stats
from nanoseek.rl.evaluate import task_label
from nanoseek.rl.zero_config import REPORT_FILE, STAGES
from nanoseek.train.metrics import plot_series, read_metrics

# The targets on the demo task (held-out pass@1, sampled as the R1 paper evaluates).
BASE_MAX, RL_MIN, GAIN_MIN = 0.30, 0.75, 0.40
PLOTS = {
    "reward": "reward.png",
    "accuracy": "accuracy.png",
    "length": "response_length.png",
    "pretrain": "pretrain_loss.png",
}


def _window_mean(rows: list[dict[str, Any]], key: str, first: bool) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if not vals:
        return None
    n = max(1, len(vals) // 10)  # the first / last tenth of the run
    part = vals[:n] if first else vals[-n:]
    return sum(part) / len(part)


def targets(cfg, base: dict[str, Any], rl: dict[str, Any], grpo_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Base and RL pass@1 on the demo task, the gain, the response length early vs late in RL, and
    whether each target is met."""
    label = task_label(cfg.demo_task())
    b, r = base[label], rl[label]
    early = _window_mean(grpo_rows, "completion_length/mean", first=True)
    late = _window_mean(grpo_rows, "completion_length/mean", first=False)
    out = {
        "task": label,
        "base_pass@1": b["pass_at_1"],
        "rl_pass@1": r["pass_at_1"],
        "gain": r["pass_at_1"] - b["pass_at_1"],
        "rl_length_early": early,
        "rl_length_late": late,
        "eval_length_base": b["mean_response_length"],
        "eval_length_rl": r["mean_response_length"],
    }
    out["met"] = {
        f"base pass@1 <= {BASE_MAX:.0%}": out["base_pass@1"] <= BASE_MAX,
        f"RL pass@1 >= {RL_MIN:.0%}": out["rl_pass@1"] >= RL_MIN,
        f"gain >= +{GAIN_MIN * 100:.0f} points": out["gain"] >= GAIN_MIN,
        "response length grows during RL": early is not None and late is not None and late > early,
    }
    return out


# ---- curves ------------------------------------------------------------------------------------------
FIGURE_SIZE = (6.4, 3.6)  # inches, every curve of the report


def _points(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]


def write_curves(run: Path, pretrain_rows: list[dict[str, Any]], grpo_rows: list[dict[str, Any]]) -> dict[str, Path]:
    out = run / "plots"
    out.mkdir(exist_ok=True)
    return {
        "reward": plot_series(
            out / PLOTS["reward"],
            "GRPO: reward per step (rollouts)",
            [("reward/total", _points(grpo_rows, "reward/total"))],
            ylabel="mean reward",
            size=FIGURE_SIZE,
        ),
        "accuracy": plot_series(
            out / PLOTS["accuracy"],
            "GRPO: accuracy per step",
            [
                ("rollout accuracy (T=1)", _points(grpo_rows, "reward/accuracy")),
                ("format rate", _points(grpo_rows, "reward/format")),
                ("held-out pass@1 (greedy)", _points(grpo_rows, "eval/pass@1")),
            ],
            ylabel="accuracy",
            size=FIGURE_SIZE,
        ),
        "length": plot_series(
            out / PLOTS["length"],
            "GRPO: mean response length",
            [("completion_length/mean", _points(grpo_rows, "completion_length/mean"))],
            ylabel="tokens",
            size=FIGURE_SIZE,
        ),
        "pretrain": plot_series(
            out / PLOTS["pretrain"],
            "Pretraining loss",
            [
                ("train", _points(pretrain_rows, "loss/train")),
                ("held-out", _points(pretrain_rows, "loss/heldout")),
                ("MTP (depth 1)", _points(pretrain_rows, "loss/mtp")),
            ],
            ylabel="cross-entropy (nats/token)",
            log_y=True,
            size=FIGURE_SIZE,
        ),
    }


# ---- the report --------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _examples(ev: dict[str, Any], title: str) -> list[str]:
    lines = [f"**{title}**", ""]
    for ex in ev.get("examples", []):
        mark = "correct" if ex["correct"] else "wrong"
        lines += [
            f"- {ex['question']} (answer {ex['answer']}; {mark}, "
            f"{'well formed' if ex['well_formed'] else 'malformed'})",
            "",
            "```",
            ex["completion"].strip(),
            "```",
            "",
        ]
    return lines


# The rows of the distillation table (`nanoseek distill`): eval.json key, what the model is.
ROWS = (
    ("teacher", "teacher: RL model of the zero run (MoE)"),
    ("student_base", "student, pretrained only"),
    ("student_distill", "student + SFT on the teacher's verified traces (distilled)"),
    ("student_rl", "student + GRPO alone (same RL budget as the teacher)"),
)


def distill_table(evals: dict[str, dict[str, Any]], k: int) -> list[str]:
    """Markdown rows: one per model, pass@1 / pass@k / format / reasoning rate / mean length."""
    lines = [
        f"| model | pass@1 | pass@{k} | format | reasoning rate | mean length (tokens) |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in ROWS:
        e = evals.get(key)
        if e is not None:
            lines.append(
                f"| {name} | {100 * e['pass_at_1']:.1f}% | {100 * e['pass_at_k']:.1f}% | "
                f"{100 * e['format_rate']:.1f}% | {100 * e['reasoning_rate']:.1f}% | "
                f"{e['mean_response_length']:.1f} |"
            )
    return lines


def _trace_table(cfg, base: dict[str, Any], rl: dict[str, Any]) -> list[str]:
    """What the reasoning traces hold before and after RL, counted by each task's stated rules."""
    L = []
    for task in cfg.eval_tasks():
        label = task_label(task)
        before, after = (ev.get(label, {}).get("trace_stats") for ev in (base, rl))
        if not task.trace_rules or not (before or after):
            continue
        L += [f"## Reasoning traces: {label}", "", "Means over the completions that reason (a non-empty think).", ""]
        L += ["| count | base | after GRPO | rule |", "|---|---|---|---|"]
        for name, rule in task.trace_rules.items():
            L.append(f"| {name} | {_stat((before or {}).get(name))} | {_stat((after or {}).get(name))} | {rule} |")
        L.append("")
    return L


def _stat(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def write_report(run: str | os.PathLike, cfg, stages: dict[str, Any]) -> Path:
    run = Path(run)
    base = json.loads((run / "eval_base.json").read_text())
    rl = json.loads((run / "eval_rl.json").read_text())
    corpus = json.loads((run / "corpus.json").read_text())
    pre_rows, grpo_rows = read_metrics(run / "pretrain"), read_metrics(run / "grpo")
    plots = write_curves(run, pre_rows, grpo_rows)
    t = targets(cfg, base, rl, grpo_rows)
    k = cfg.eval.k
    demo = task_label(cfg.demo_task())
    machine = stages.get("machine", {})
    seconds = {s: stages[s]["seconds"] for s in STAGES if s in stages}
    stats = model_stats(cfg.model)
    pre = stages.get("pretrain", {})
    tok = stages.get("tokenizer", {})

    L = [f"# nanoseek zero: R1-Zero from scratch (preset `{cfg.preset}`, seed {cfg.seed})", ""]
    L += [
        f"Demo task: **{demo}**. Base model pretrained from scratch on the corpus below, then GRPO with "
        "rule rewards only (accuracy + format); no SFT anywhere. Evaluation: "
        f"{cfg.eval.n_problems} held-out problems (never trained on) x {cfg.eval.samples} samples at "
        f"temperature {cfg.eval.temperature}, top-p {cfg.eval.top_p}, R1-Zero template, through the engine; "
        f"pass@1 is the mean correctness of the samples, pass@{k} the unbiased estimate (Chen et al. 2021).",
        "",
    ]
    unisolated = [task_label(task) for task in cfg.eval_tasks() if getattr(task, "allow_unisolated", False)]
    if unisolated:
        L += [
            f"**Rewards ran unisolated** for {', '.join(unisolated)}: the run allowed model-written code to run "
            "where no kernel isolation could be made (`allow_unisolated`), as the trainer's user behind "
            "Python-level guards only.",
            "",
        ]
    L += ["## Targets (demo task)", "", "| target | measured | met |", "|---|---|---|"]
    vals = [
        f"{_pct(t['base_pass@1'])}",
        f"{_pct(t['rl_pass@1'])}",
        f"{100 * t['gain']:+.1f} points",
        f"{_num(t['rl_length_early'])} → {_num(t['rl_length_late'])} tokens (first vs last tenth of the RL steps)",
    ]
    for (name, ok), v in zip(t["met"].items(), vals):
        L.append(f"| {name} | {v} | {'yes' if ok else '**no**'} |")
    L += [
        "",
        "## Held-out results per task",
        "",
        f"| task | model | pass@1 | pass@{k} | format | reasoning rate | acc. when reasoning | acc. when direct "
        "| mean length (tokens) | truncated |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in base:
        for name, ev in (("base", base[label]), ("after GRPO", rl.get(label))):
            if ev is None:
                continue
            L.append(
                f"| {label} | {name} | {_pct(ev['pass_at_1'])} | {_pct(ev['pass_at_k'])} | "
                f"{_pct(ev['format_rate'])} | {_pct(ev['reasoning_rate'])} | {_pct(ev['accuracy_when_reasoning'])} | "
                f"{_pct(ev['accuracy_when_direct'])} | {ev['mean_response_length']:.1f} | "
                f"{_pct(ev['truncated_rate'])} |"
            )
    L += [
        "",
        "*reasoning rate*: completions whose `<think>` is not empty; *acc. when reasoning / direct*: "
        "accuracy among those that reason / answer with an empty think.",
        "",
    ]
    L += _trace_table(cfg, base, rl)
    L += ["## Curves", ""] + [f"![{name}](plots/{p.name})" for name, p in plots.items()] + [""]
    L += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    L += [f"| {s} | {v:.1f} |" for s, v in seconds.items()] + [f"| **total** | **{sum(seconds.values()):.1f}** |", ""]
    L += [
        f"Machine: {machine.get('cpus')} CPUs ({machine.get('processor')}), torch {machine.get('torch')} with "
        f"{machine.get('torch_threads')} threads; load average (1 min) "
        f"{_num(machine.get('load_at_start'), '{:.2f}')} at "
        f"the start, {_num(machine.get('load_at_end'), '{:.2f}')} at the end of the run. The load counts "
        "other processes on the machine too: a load above the core count means the run shared its cores.",
        "",
    ]
    L += [
        "## What the pretraining corpus contains",
        "",
        "Only synthetic problems of the tasks below (train split; never a held-out problem), in two formats. "
        '`r1_zero`: `BOS + R1-Zero prompt + " <think> ... </think> <answer> ... </answer>" + EOS`, where a '
        "document carries the task's worked solution in the think part with probability `reasoning_fraction` "
        "and otherwise has an empty think (`<think> </think>`) and the correct answer directly. `worked`: the "
        "question and its worked solution as plain text (no prompt, no tags, no template), like arithmetic "
        "worked out on paper, several problems to a document like a worksheet. No other text, no SFT data.",
        "",
        "| task | format | documents | problems | with a worked solution | fraction |",
        "|---|---|---|---|---|---|",
    ]
    for p in corpus["parts"]:
        L.append(
            f"| {p['task']} | {p['format']} | {p['documents']:,} | {p.get('problems', p['documents']):,} | "
            f"{p['with_trace']:,} | {p['trace_fraction']:.1%} |"
        )
    L += [
        "",
        f"Tokenizer: byte-level BPE, {tok.get('vocab_size')} tokens, digits split one per token. "
        f"Tokens: {tok.get('train_tokens', 0):,} train, {tok.get('heldout_tokens', 0):,} held out "
        f"({corpus['heldout_documents_per_part']} held-out documents per task, for the held-out loss only).",
        "",
    ]
    L += [
        "## Base model and pretraining",
        "",
        f"MLA + DeepSeekMoE, {cfg.model.num_hidden_layers} layers, hidden {cfg.model.hidden_size}, "
        f"{cfg.model.n_routed_experts} routed experts (top-{cfg.model.num_experts_per_tok}) + "
        f"{cfg.model.n_shared_experts} shared, {cfg.model.num_nextn_predict_layers} MTP module: "
        f"{stats.total / 1e6:.2f}M parameters, {stats.active / 1e6:.2f}M active per token. "
        f"{pre.get('steps')} steps of {cfg.train.batch_size} x {cfg.train.seq_len} tokens "
        f"({(pre.get('steps') or 0) * cfg.train.batch_size * cfg.train.seq_len:,} tokens), final train loss "
        f"{_num(pre.get('train_loss'), '{:.4f}')}, held-out loss {_num(pre.get('heldout_loss'), '{:.4f}')}, "
        f"median {_num(pre.get('tokens_per_s'), '{:,.0f}')} tokens/s.",
        "",
    ]
    first, last = (grpo_rows[0], grpo_rows[-1]) if grpo_rows else ({}, {})
    L += [
        "## GRPO",
        "",
        f"{len(grpo_rows)} steps x {cfg.grpo.prompts_per_step} prompts x G={cfg.grpo.num_generations}, loss "
        f"`{cfg.grpo.loss_type}`, lr {cfg.grpo.learning_rate}, β {cfg.grpo.beta}, rollout temperature "
        f"{cfg.grpo.temperature}, at most {cfg.grpo.max_completion_length} tokens. Rollout reward "
        f"{_num(first.get('reward/total'), '{:.3f}')} → {_num(last.get('reward/total'), '{:.3f}')}, accuracy "
        f"{_pct(first.get('reward/accuracy'))} → {_pct(last.get('reward/accuracy'))}, mean length "
        f"{_num(first.get('completion_length/mean'))} → {_num(last.get('completion_length/mean'))} tokens.",
        "",
    ]
    distill = run / "distill"
    if (distill / "eval.json").exists():
        L += [
            "## Distillation (`nanoseek distill`)",
            "",
            "The RL model's verified traces distilled into a smaller dense student, beside the same student "
            "trained by GRPO alone; details in [distill/report.md](distill/report.md).",
            "",
        ]
        L += distill_table(json.loads((distill / "eval.json").read_text()), k) + [""]
    L += ["## Example completions (the same held-out problems before and after)", ""]
    L += _examples(base[demo], "Base model") + _examples(rl[demo], "After GRPO")
    L += [
        "## Use the model",
        "",
        "From this directory (the model is `model/`, HF format with its tokenizer):",
        "",
        "```bash",
        "nanoseek chat --model model",
        "nanoseek serve --model model",
        f"nanoseek eval --model model --task {cfg.task} "
        + " ".join(f"--task-arg {a}={json.dumps(b)}" for a, b in cfg.task_knobs.items()),
        "```",
        "",
    ]
    L += ["## Config", "", "```json", json.dumps(cfg.to_dict(), indent=1), "```", ""]
    path = run / REPORT_FILE
    atomic_write_text(path, "\n".join(L))
    return path
