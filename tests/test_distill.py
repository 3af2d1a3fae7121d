"""`nanoseek distill` (nanoseek/rl/distill.py): rejection sampling keeps only verified traces (a wrong one is
rejected), SFT learns only the response tokens, and the smoke preset runs end to end on a smoke zero run,
writing its table into both reports."""

import json
import random
import shutil

import pytest
import torch

from nanoseek.checkpoint.tokenizer import EOS
from nanoseek.cli import main
from nanoseek.rl.distill import SFTConfig, distill_preset, read_traces, sft, sft_batch, student_config, verified
from nanoseek.rl.evaluate import task_label
from nanoseek.rl.report import ROWS
from nanoseek.rl.zero import evaluate_model
from nanoseek.rl.zero_config import load_run_config
from nanoseek.tasks import format_response, get_task
from nanoseek.tasks.base import split_of
from nanoseek.train.data import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def test_only_verified_traces_are_kept():
    task = get_task("arithmetic", min_digits=2, max_digits=2, ops="*")
    p = task.sample(random.Random(0))
    right = format_response(task.solution(p), p.answer) + EOS
    wrong_answer = format_response(task.solution(p), str(int(p.answer) + 1)) + EOS
    wrong_trace_lucky = format_response("I guess.", p.answer) + EOS  # right answer, well formed: kept (R1 keeps it too)
    malformed = f" <answer> {p.answer} </answer>" + EOS  # no think block
    empty = format_response(task.solution(p), "") + EOS
    texts = [right, wrong_answer, wrong_trace_lucky, malformed, empty, right]
    reasons = ["stop", "stop", "stop", "stop", "stop", "length"]  # the last was cut at max_tokens
    assert verified([p] * len(texts), texts, reasons, task) == [True, False, True, False, False, False]


def test_sft_batch_targets_only_the_response():
    examples = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 1]}, {"prompt_ids": [5, 6], "completion_ids": [1]}]
    inputs, targets = sft_batch(examples, pad_id=2)
    assert inputs.tolist() == [[5, 6, 7, 8, 9], [5, 6, 2, 2, 2]]
    # position t predicts token t+1; the prompt's own tokens and the padding are never targets
    assert targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 8, 9, 1], [IGNORE_INDEX, 1] + [IGNORE_INDEX] * 3]


def test_sft_lowers_the_response_loss():
    from nanoseek import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            n_routed_experts=0,
            first_k_dense_replace=0,
            max_position_embeddings=64,
        )
    )
    traces = [
        {"prompt_ids": [0, 3, 4, 5], "completion_ids": [10, 11, 12, 1]},
        {"prompt_ids": [0, 6, 7], "completion_ids": [13, 14, 1]},
    ]
    losses = sft(model, traces, SFTConfig(epochs=30, batch_size=2, lr=1e-2, warmup_steps=2), pad_id=2, progress=False)
    assert losses[-1] < 0.2 * losses[0]


@pytest.fixture
def zero_run(zero_smoke_run, tmp_path):
    """A copy of the shared smoke run: distillation writes into the run (distill/, report.md)."""
    return shutil.copytree(zero_smoke_run, tmp_path / "run")


def test_distill_smoke_end_to_end(zero_run, capsys):
    assert main(["distill", "--run", str(zero_run), "--preset", "smoke", "--no-progress"]) == 0
    out = zero_run / "distill"
    stages = json.loads((out / "stages.json").read_text())
    traces = read_traces(out)
    cfg, zero = distill_preset("smoke"), load_run_config(zero_run)
    task = zero.demo_task()
    # every kept trace is a verified one, of a train-split problem, at most keep_per_problem per problem
    assert len(traces) == stages["sample"]["kept"] > 0
    assert all(split_of(t["key"], task.heldout_percent) == "train" for t in traces)
    from nanoseek.tasks import Problem

    kept = [Problem(t["task"], t["question"], t["answer"], t["key"], t["data"]) for t in traces]
    assert all(verified(kept, [t["completion"] for t in traces], ["stop"] * len(traces), task))
    # the student is smaller and dense; it trained (SFT and GRPO) and was evaluated
    from nanoseek.checkpoint.hf import load_config
    from nanoseek.model.stats import model_stats

    student = load_config(out / "student_distill")
    assert student.n_routed_experts == 0 and student.num_nextn_predict_layers == 0
    assert model_stats(student).total < model_stats(zero.model).total
    assert student == student_config(zero, cfg, student.vocab_size).replace(torch_dtype=student.torch_dtype)
    sft_rows = [json.loads(line) for line in (out / "sft/metrics.jsonl").read_text().splitlines()]
    assert len(sft_rows) == stages["sft"]["steps"] > 0
    assert len((out / "student_grpo/metrics.jsonl").read_text().splitlines()) == cfg.rl_steps
    evals = json.loads((out / "eval.json").read_text())
    assert set(evals) == {key for key, _ in ROWS}
    # the table in both reports carries eval.json's numbers
    for report in (out / "report.md", zero_run / "report.md"):
        text = report.read_text()
        for key, name in ROWS:
            assert f"| {name} | {100 * evals[key]['pass_at_1']:.1f}% |" in text
        assert str(zero_run) not in text  # paths relative to the run directory
    # the teacher's row is the zero run's own evaluation of its RL model
    label = task_label(task)
    assert evals["teacher"] == json.loads((zero_run / "eval_rl.json").read_text())[label]
    # the published distilled student, loaded again and evaluated with the run's settings, gives eval.json's numbers
    again = evaluate_model(out / "student_distill", [task], zero.eval, progress=False)[label]
    for key in ("pass_at_1", "pass_at_k", "format_rate", "mean_response_length"):
        assert again[key] == evals["student_distill"][key], key
    assert "pass@1: teacher" in capsys.readouterr().out
