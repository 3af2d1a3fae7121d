"""`nanoseek zero` (nanoseek/rl/zero.py, rl/report.py): the smoke preset end to end through the CLI; the report's
numbers equal the run's own files; the final checkpoint loads in the engine and in the server with the
R1-Zero template; resume skips finished stages and finishes an interrupted one; the corpus is what the
docs say it is."""

import json
import re
import shutil

import pytest

from nanoseek.cli import main
from nanoseek.rl.evaluate import task_label
from nanoseek.rl.zero import ZeroCorpus, corpus_stats, evaluate_model
from nanoseek.rl.zero_config import (
    BASE_DIR,
    CONFIG_FILE,
    MODEL_DIR,
    STAGES,
    ZERO_PRESETS,
    CorpusPart,
    ZeroConfig,
    ZeroError,
    load_run_config,
    preset,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture
def run(zero_smoke_run):
    """The shared smoke run, read only: a test that changes or resumes a run copies it first (`run_copy`)."""
    return zero_smoke_run


@pytest.fixture
def run_copy(zero_smoke_run, tmp_path):
    """This test's own copy of the smoke run, to change or resume."""
    return shutil.copytree(zero_smoke_run, tmp_path / "run")


def _table_rows(report: str, header_start: str) -> list[list[str]]:
    """The body rows of the markdown table whose header line starts with `header_start`."""
    lines = report.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _pct(cell: str) -> float:
    return float(cell.rstrip("%")) / 100


def test_smoke_run_writes_every_artifact(run):
    for name in (
        "report.md",
        "config.json",
        "stages.json",
        "corpus.json",
        "eval_base.json",
        "eval_rl.json",
        "data/meta.json",
        "pretrain/metrics.jsonl",
        "grpo/metrics.jsonl",
        "base/config.json",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
    ):
        assert (run / name).is_file(), name
    for png in ("reward", "accuracy", "response_length", "pretrain_loss"):
        data = (run / "plots" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    stages = json.loads((run / "stages.json").read_text())
    assert all(stages[s]["done"] and stages[s]["seconds"] > 0 for s in STAGES)


def test_report_numbers_are_the_runs_own(run):
    report = (run / "report.md").read_text()
    cfg = load_run_config(run)
    base, rl = (json.loads((run / f).read_text()) for f in ("eval_base.json", "eval_rl.json"))
    label = task_label(cfg.demo_task())
    rows = _table_rows(report, "| task | model | pass@1")
    assert [r[:2] for r in rows] == [[label, "base"], [label, "after GRPO"]]
    for row, ev in zip(rows, (base[label], rl[label])):
        assert _pct(row[2]) == pytest.approx(ev["pass_at_1"], abs=5.01e-4)  # the report rounds to 0.1%
        assert _pct(row[3]) == pytest.approx(ev["pass_at_k"], abs=5.01e-4)  # the report rounds to 0.1%
        assert _pct(row[4]) == pytest.approx(ev["format_rate"], abs=5.01e-4)  # the report rounds to 0.1%
        assert float(row[8]) == pytest.approx(ev["mean_response_length"], abs=0.05)
        assert ev["n_problems"] == cfg.eval.n_problems and ev["samples_per_problem"] == cfg.eval.samples
        assert 0 <= ev["pass_at_1"] <= ev["pass_at_k"] <= 1

    # wall time per stage: the table holds stages.json's numbers and their sum
    stages = json.loads((run / "stages.json").read_text())
    times = {r[0]: r[1] for r in _table_rows(report, "| stage | seconds")}
    for s in STAGES:
        assert float(times[s]) == pytest.approx(stages[s]["seconds"], abs=0.05)
    assert float(times["**total**"].strip("*")) == pytest.approx(sum(stages[s]["seconds"] for s in STAGES), abs=0.2)

    # GRPO: as many metric lines as steps; the report's length trend is read from them
    grpo = [json.loads(line) for line in (run / "grpo/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in grpo] == list(range(1, cfg.grpo.max_steps + 1))
    assert f"{len(grpo)} steps x {cfg.grpo.prompts_per_step} prompts" in report
    lengths = [r["completion_length/mean"] for r in grpo]
    early, late = lengths[: max(1, len(lengths) // 10)], lengths[-max(1, len(lengths) // 10) :]
    trend = _table_rows(report, "| target | measured")[3][1]
    assert trend.startswith(f"{sum(early) / len(early):.1f} → {sum(late) / len(late):.1f} tokens")
    # pretraining: the steps and the last held-out loss
    pre = [json.loads(line) for line in (run / "pretrain/metrics.jsonl").read_text().splitlines()]
    assert pre[-1]["step"] == cfg.train.max_steps
    assert f"held-out loss {pre[-1]['loss/heldout']:.4f}" in report
    # the corpus section and the config are there
    corpus = json.loads((run / "corpus.json").read_text())["parts"][0]
    assert (
        f"| {corpus['task']} | {corpus['format']} | {corpus['documents']:,} | {corpus['problems']:,} | "
        f"{corpus['with_trace']:,} |"
    ) in report
    assert json.loads(report.split("```json\n")[1].split("\n```")[0]) == json.loads((run / CONFIG_FILE).read_text())
    # paths are relative to the run directory: the report reads the same wherever the run is moved
    assert str(run) not in report and str(run.parent) not in report
    assert "nanoseek chat --model model\n" in report and "![reward](plots/reward.png)" in report


@pytest.mark.parametrize("model, saved", [(MODEL_DIR, "eval_rl.json"), (BASE_DIR, "eval_base.json")])
def test_published_model_reproduces_its_evaluation(run, model, saved):
    """The model directory the run published, loaded again and evaluated with the run's own eval settings,
    gives exactly the numbers the run recorded (evaluation is seeded): the published weights are the ones
    that were evaluated."""
    cfg = load_run_config(run)
    recorded = json.loads((run / saved).read_text())
    again = evaluate_model(run / model, cfg.eval_tasks(), cfg.eval, progress=False)
    assert set(again) == set(recorded)
    for label, ev in recorded.items():
        for key in ("pass_at_1", "pass_at_k", "format_rate", "mean_response_length", "reasoning_rate"):
            assert again[label][key] == ev[key], (label, key)
        assert again[label]["examples"] == ev["examples"]


def test_final_checkpoint_serves_with_the_r1_zero_template(run):
    from fastapi.testclient import TestClient

    from nanoseek.engine.engine import Engine
    from nanoseek.engine.sampling import SamplingParams
    from nanoseek.server.app import create_app
    from nanoseek.server.config import ServerConfig
    from nanoseek.tasks import prompt_text

    engine = Engine(run / "model")
    tok = engine.tokenizer
    assert tok.chat_template == "r1_zero"
    problem = load_run_config(run).demo_task().heldout(1)[0]
    assert tok.apply_chat_template([{"role": "user", "content": problem.question}]) == prompt_text(problem)
    out = engine.generate([prompt_text(problem)], SamplingParams(max_tokens=8, temperature=0))[0]
    assert out.error is None and len(out.outputs[0].token_ids) >= 1

    # the server's own loader and a chat completion through it
    with TestClient(create_app(ServerConfig(model=str(run / "model")))) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "model"
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": "model",
                "max_tokens": 8,
                "temperature": 0,
                "messages": [{"role": "user", "content": problem.question}],
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(prompt_text(problem)))


def test_resume_skips_finished_stages_and_finishes_an_interrupted_one(run_copy, capsys):
    run = run_copy
    stages_path = run / "stages.json"
    before = json.loads(stages_path.read_text())
    # as if killed during eval_rl: the stage is not done and its output is gone
    before["eval_rl"]["done"] = False
    stages_path.write_text(json.dumps(before))
    recorded = json.loads((run / "eval_rl.json").read_text())
    (run / "eval_rl.json").unlink()
    assert main(["zero", "--out", str(run), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for s in ("corpus", "tokenizer", "pretrain", "eval_base", "grpo"):
        assert f"zero: {s}: done earlier" in out
    assert "zero: eval_rl ..." in out and (run / "eval_rl.json").is_file()
    after = json.loads(stages_path.read_text())
    assert after["eval_rl"]["done"] and after["eval_rl"]["seconds"] > before["eval_rl"]["seconds"]
    assert after["pretrain"] == before["pretrain"]
    again = json.loads((run / "eval_rl.json").read_text())  # the stage ran again: the same seeded numbers
    assert {k: v["pass_at_1"] for k, v in again.items()} == {k: v["pass_at_1"] for k, v in recorded.items()}


def test_refuses_to_overwrite_or_to_resume_with_other_settings(run, tmp_path, capsys):
    assert main(["zero", "--preset", "smoke", "--out", str(run), "--no-progress"]) == 2
    assert "already holds a zero run; pass --resume" in capsys.readouterr().err
    assert main(["zero", "--preset", "smoke", "--seed", "1", "--out", str(run), "--resume", "--no-progress"]) == 2
    assert "other settings for" in capsys.readouterr().err
    assert main(["zero", "--out", str(tmp_path / "none"), "--resume", "--no-progress"]) == 2
    assert "holds no zero run" in capsys.readouterr().err


def test_config_round_trips_through_json():
    for name in ("default", "smoke"):
        cfg = preset(name, seed=3)
        again = ZeroConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again.to_dict() == cfg.to_dict() and again.seed == 3 and again.train.seed == 3


def test_corpus_is_the_demo_task_with_a_fraction_of_traces():
    parts = [
        CorpusPart("arithmetic", {"min_digits": 2, "max_digits": 2, "ops": "*"}, documents=400, reasoning_fraction=0.25)
    ]
    docs = list(ZeroCorpus(parts, seed=0))
    assert docs == list(ZeroCorpus(parts, seed=0)) and len(docs) == 400
    responses = [d.rsplit(" Assistant:", 1)[1] for d in docs]
    traced = [r for r in responses if not r.startswith(" <think> </think>")]
    assert 0.18 < len(traced) / len(docs) < 0.32
    assert corpus_stats(parts, seed=0)[0]["with_trace"] == len(traced)
    assert all("*" in r and "shift" in r for r in traced)  # the long multiplication trace
    from nanoseek.tasks import get_task

    heldout = {p.key for p in get_task("arithmetic", **parts[0].knobs).heldout(500)}
    questions = {re.search(r"User: What is (\d+) \* (\d+)\?", d).groups() for d in docs}
    assert not {f"{a}*{b}" for a, b in questions} & heldout  # no held-out problem is pretrained on


def test_unknown_preset_is_an_error():
    with pytest.raises(ZeroError, match="unknown zero preset"):
        preset("huge")
    for name in ZERO_PRESETS:
        assert preset(name).preset == name


def test_worked_documents_are_question_and_solution_without_template():
    knobs = {"min_digits": 2, "max_digits": 2, "ops": "+"}
    part = CorpusPart("arithmetic", knobs, documents=50, format="worked", per_document=3)
    docs = list(part.documents_of(seed=0))
    assert len(docs) == 50 and docs == list(part.documents_of(seed=0))
    for doc in docs:
        problems = doc.split("\n\n")
        assert len(problems) == 3  # a worksheet: the question is not always at the start of the document
        for text in problems:
            question, first, *rest = text.splitlines()
            a, b = re.fullmatch(r"What is (\d+) \+ (\d+)\?", question).groups()
            assert first == f"{a} + {b}" and rest[-1] == f"{a}+{b}={int(a) + int(b)}"
        assert "<think>" not in doc and "Assistant" not in doc
    assert corpus_stats([part], seed=0)[0]["problems"] == 150
    with pytest.raises(Exception, match="format must be one of"):
        CorpusPart("arithmetic", knobs, format="chat")
    with pytest.raises(Exception, match="per_document"):
        CorpusPart("arithmetic", knobs, per_document=2)  # r1_zero documents hold one problem each


# ---- --nproc: pretraining and GRPO as several processes ----------------------------------------------------
def test_nproc_2_runs_pretraining_and_grpo_as_two_processes(tmp_path, capsys):
    """The smoke run with --nproc 2: both training stages under torchrun (gloo), each process with half the
    pretraining batch and half of GRPO's groups; the run's artifacts are those of a one-process run, and its
    model reproduces its own evaluation."""
    out = tmp_path / "run"
    assert main(["zero", "--preset", "smoke", "--out", str(out), "--nproc", "2", "--no-progress"]) == 0
    assert "run as 2 processes" in capsys.readouterr().out
    cfg = load_run_config(out)
    grpo = [json.loads(line) for line in (out / "grpo/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in grpo] == list(range(1, cfg.grpo.max_steps + 1))
    pre = [json.loads(line) for line in (out / "pretrain/metrics.jsonl").read_text().splitlines()]
    assert pre[-1]["step"] == cfg.train.max_steps
    stages = json.loads((out / "stages.json").read_text())
    assert stages["pretrain"]["steps"] == cfg.train.max_steps and stages["grpo"]["steps"] == cfg.grpo.max_steps
    assert not list(out.glob("*.result.json"))  # the workers' summaries were taken in
    label = task_label(cfg.demo_task())
    saved = json.loads((out / "eval_rl.json").read_text())[label]
    again = evaluate_model(out / MODEL_DIR, [cfg.demo_task()], cfg.eval, progress=False)[label]
    for key in ("pass_at_1", "pass_at_k", "format_rate", "mean_response_length", "examples"):
        assert again[key] == saved[key], key


@pytest.mark.parametrize(
    "nproc, cores, why",
    [
        (3, 2, "needs at least 3 CPU cores"),
        (3, 8, "prompts_per_step \\(4\\) must be divisible"),  # smoke: 4 prompts a step, 3 processes
        (0, 8, "at least 1"),
    ],
)
def test_nproc_the_machine_or_the_batches_cannot_split_is_refused(nproc, cores, why, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    out = tmp_path / "run"
    assert main(["zero", "--preset", "smoke", "--out", str(out), "--nproc", str(nproc), "--no-progress"]) == 2
    assert re.search(why, capsys.readouterr().err)
    assert not (out / "pretrain").exists()  # refused before any stage ran


def test_countdown_smoke_runs_every_stage_and_reports_the_traces(tmp_path):
    """`--preset countdown-smoke`: TinyZero's task end to end; the evaluations carry each task's trace counts,
    and the report shows them beside the rules it counted by (when a model reasons at all)."""
    out = tmp_path / "run"
    assert main(["zero", "--preset", "countdown-smoke", "--out", str(out), "--no-progress"]) == 0
    cfg = load_run_config(out)
    assert cfg.task == "countdown" and cfg.preset == "countdown-smoke"
    label = task_label(cfg.demo_task())
    for f in ("eval_base.json", "eval_rl.json"):
        ev = json.loads((out / f).read_text())[label]
        assert set(ev["trace_stats"]) in (set(), set(cfg.demo_task().trace_rules))
        assert (ev["trace_stats"] == {}) == (ev["reasoning_rate"] == 0)
    assert f"| {label} | base |" in (out / "report.md").read_text()


def test_smoke_runs_on_deepseek_v4(tmp_path):
    """`--model-preset tiny-v4`: DeepSeek-V4 pretrained (no document mask: its compressors pool across documents),
    evaluated and trained by GRPO through the engine's V4 caches (MTP drafting), and reproducing its evaluation."""
    out = tmp_path / "run"
    assert main(["zero", "--preset", "smoke", "--model-preset", "tiny-v4", "--out", str(out), "--no-progress"]) == 0
    cfg = load_run_config(out)
    assert cfg.model.model_type == "deepseek_v4" and not cfg.train.doc_mask
    label = task_label(cfg.demo_task())
    saved = json.loads((out / "eval_rl.json").read_text())[label]
    assert saved["acceptance_rate"] is not None  # the RL model's MTP module drafted during evaluation
    again = evaluate_model(out / MODEL_DIR, [cfg.demo_task()], cfg.eval, progress=False)[label]
    assert again["pass_at_1"] == saved["pass_at_1"] and again["examples"] == saved["examples"]
