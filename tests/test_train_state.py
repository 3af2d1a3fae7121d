"""Training-state checkpoints (exact round trip, pruning, atomicity under SIGKILL) and the metrics log."""

import json
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanoseek import CheckpointError, ModelConfig, Transformer, from_pretrained
from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.train.metrics import MetricsLogger, plot_run, read_metrics
from nanoseek.train.state import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

from helpers import MICRO

CFG = MICRO


def setup(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**CFG)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    return model, opt, sched


def train_step(model, opt, sched, x):
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    for moe in model.moe_layers():  # a bias update, so the checkpoint must carry non-zero biases
        moe.gate.e_score_correction_bias.add_(torch.randn(4) * 1e-3)
    return model(x[:, :-1]).sum().item()


def test_round_trip_restores_model_optimizer_schedule_rng_and_state(tmp_path):
    model, opt, sched = setup()
    x = torch.randint(0, 64, (2, 17))
    for _ in range(3):
        train_step(model, opt, sched, x)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    path = save_checkpoint(tmp_path, 3, model, optimizer=opt, scheduler=sched, state={"data_position": 48})
    expect_rng = (random.random(), np.random.rand(), torch.rand(1).item())
    after = train_step(model, opt, sched, x)  # what step 4 gives from the original objects

    model2, opt2, sched2 = setup(seed=1)  # different weights: everything must come from the checkpoint
    state = load_checkpoint(path, model2, optimizer=opt2, scheduler=sched2)
    assert state == {"data_position": 48, "step": 3}
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect_rng
    assert train_step(model2, opt2, sched2, x) == after  # bit-exact continuation
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    # The directory is a Hugging Face checkpoint in its own right.
    assert from_pretrained(path).config.hidden_size == 32


def test_keeps_last_k_and_ignores_half_written_dirs(tmp_path):
    model, opt, sched = setup()
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, optimizer=opt, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    (tmp_path / "checkpoints" / ".tmp-step_00000050-123").mkdir()
    (tmp_path / "checkpoints" / "step_00000060").mkdir()  # no trainer_state.json: not a checkpoint
    assert latest_checkpoint(tmp_path).name == "step_00000040"
    save_checkpoint(tmp_path, 50, model, keep_last=2)
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000050-123").exists()  # leftovers cleaned


KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_train_state import setup, train_step
    from nanoseek.train import state as train_state
    model, opt, sched = setup()
    train_step(model, opt, sched, torch.randint(0, 64, (2, 17)))
    train_state.save_checkpoint({run!r}, 1, model, optimizer=opt, scheduler=sched, state={{"k": 1}})
    train_step(model, opt, sched, torch.randint(0, 64, (2, 17)))

    def die_halfway(tensors, path, metadata=None):  # the optimizer file is half written when the kill comes
        with open(path, "wb") as f:
            f.write(b"\\x00" * 100)
        os.kill(os.getpid(), signal.SIGKILL)

    train_state.save_file = die_halfway
    train_state.save_checkpoint({run!r}, 2, model, optimizer=opt, scheduler=sched, state={{"k": 2}})
""")


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    run = tmp_path / "run"
    code = KILLER.format(tests=str(__import__("pathlib").Path(__file__).parent), run=str(run))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = list((run / "checkpoints").glob(".tmp-step_00000002-*"))
    assert leftovers and (leftovers[0] / "model.safetensors").exists()  # it really died mid-save
    assert latest_checkpoint(run).name == "step_00000001"
    model, opt, sched = setup(seed=3)
    assert load_checkpoint(latest_checkpoint(run), model, optimizer=opt, scheduler=sched)["k"] == 1


def test_load_errors_name_the_problem(tmp_path):
    model, opt, _ = setup()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", model)
    save_pretrained(model, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "plain", model)
    path = save_checkpoint(tmp_path, 1, model)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(path, model, optimizer=opt)
    other = Transformer(ModelConfig(**{**CFG, "hidden_size": 48}))
    with pytest.raises(CheckpointError, match="different config"):
        load_checkpoint(path, other)
    with pytest.raises(CheckpointError, match="JSON-serializable"):
        save_checkpoint(tmp_path, 2, model, state={"bad": object()})
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_metrics_resume_truncates_and_plots(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for s in range(1, 11):
            log.log(s, **{"loss/train": 5 / s, "loss/heldout": 6 / s, "lr": 1e-3, "expert_load/layers.1.mlp": 1.2})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss/tr')  # a line torn by a kill
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 11))
    with MetricsLogger(tmp_path, resume_step=6) as log:  # the run resumed from its step-6 checkpoint
        log.log(7, **{"loss/train": 0.5, "lr": 1e-3})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7] and rows[-1]["loss/train"] == 0.5
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["expert_load.png", "loss.png", "lr.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in paths)
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
