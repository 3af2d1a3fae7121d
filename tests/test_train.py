"""The pretraining loop: schedule, loss going down on held-out data, accumulation, bias balancing, resume after
a real kill, and the CLI's errors for bad input and conflicting flags."""

import math
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nanoseek import from_pretrained, get_preset
from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.cli import main
from nanoseek.model.moe import Experts
from nanoseek.model.stats import model_stats
from nanoseek.model.transformer import Transformer
from nanoseek.train.data import TaskCorpus, build_dataset
from nanoseek.train.metrics import read_metrics
from nanoseek.train.objective import PretrainObjective
from nanoseek.train.trainer import TrainConfig, TrainError, lr_factor, pretrain, training_flops_per_token

from helpers import TRAIN_MODEL

MODEL = TRAIN_MODEL
FAST = dict(seq_len=64, batch_size=8, lr=3e-3, warmup_steps=5, save_every=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two-digit arithmetic in the R1-Zero format: 600 training and 40 held-out problems."""
    return build_dataset(
        tmp_path_factory.mktemp("data"),
        TaskCorpus("arithmetic", 600, split="train", max_digits=2),
        TaskCorpus("arithmetic", 40, split="heldout", max_digits=2),
        vocab_size=384,
        chat_template="r1_zero",
    )


def losses(run_dir, key="loss/train"):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def test_schedule_warmup_cosine_and_wsd():
    cos = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cos) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[-1] == pytest.approx(0.1)
    assert f[54] == pytest.approx(0.55, abs=0.01)  # halfway through the cosine
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    wsd = TrainConfig(max_steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    g = [lr_factor(s, wsd) for s in range(100)]
    assert g[10:80] == [1.0] * 70 and g[89] == pytest.approx(0.5) and g[99] == 0.0
    with pytest.raises(TrainError, match="overlaps the decay"):
        TrainConfig(max_steps=100, warmup_steps=90, schedule="wsd").validate()


def counted_flops(cfg, batch: int, seq_len: int, mtp_depth: int) -> tuple[int, Transformer]:
    """FLOPs torch's FlopCounterMode counts in one forward+backward of the training objective on random tokens.
    The counter has formulas for matmuls and for the math attention kernel, not for torch._grouped_mm or the
    fused CPU attention kernel: the experts run their per-expert matmuls and attention the math kernel."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    for m in model.modules():
        if isinstance(m, Experts):
            m.use_grouped_mm = False
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        targets = [x[:, 1 + k :] for k in range(1 + mtp_depth)]
        sums, aux = PretrainObjective(model, mtp_depth)(x[:, :-1], targets, None)
        (sums.sum() + aux).backward()
    return counter.get_total_flops(), model


def test_flops_per_token_match_torch_flop_counter():
    """`training_flops_per_token` against torch.utils.flop_counter on a real forward+backward of MODEL (a dense
    layer, a MoE layer, MTP depth 1), once the conventions that differ are accounted for:
    - the formula charges 6 FLOPs per norm gain; a norm is elementwise work, which the counter does not count
      (the input embedding is a lookup for both: neither counts it);
    - the formula counts causal attention, 6·H·(d_qk + d_v)·(T+1)/2 per token and layer; the math kernel
      computes every one of the T×T scores, with v zero-padded to d_qk (mla.py): 6·H·2·d_qk·T;
    - MTP depth 1 runs on T-1 positions; the formula charges its block and the head for each of the T.
    The counts are integers and the rest matches matmul for matmul (the router, every expert's share of the
    tokens, the head), so the tolerance is float rounding only: 1e-9 relative."""
    cfg, B, T = MODEL, 2, 64
    H, L, d_qk = cfg.num_attention_heads, cfg.num_hidden_layers, cfg.qk_head_dim
    causal = 6 * H * (d_qk + cfg.v_head_dim) * (T + 1) / 2  # the formula's attention per token and layer

    def full(n: int) -> int:  # the math kernel's attention per token and layer over n positions
        return 6 * H * 2 * d_qk * n

    main_flops, model = counted_flops(cfg, B, T, 0)
    gains = {
        part: sum(p.numel() for n, p in model.named_parameters() if p.dim() < 2 and n.startswith("mtp.") == part)
        for part in (False, True)
    }
    per_token = training_flops_per_token(cfg, T)
    assert main_flops == pytest.approx(B * T * (per_token - 6 * gains[False] - L * causal + L * full(T)), rel=1e-9)
    mtp_flops = counted_flops(cfg, B, T, 1)[0] - main_flops
    mtp_per_token = training_flops_per_token(cfg, T, mtp_depth=1) - per_token - causal
    assert mtp_flops == pytest.approx(B * (T - 1) * (mtp_per_token - 6 * gains[True] + full(T - 1)), rel=1e-9)

    cfg = get_preset("small")
    T = 256
    attention = 6 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (T + 1) / 2
    # MTP depth 1 adds a block with top-k of the experts, another pass through the head, one attention layer.
    extra = training_flops_per_token(cfg, T, mtp_depth=1) - training_flops_per_token(cfg, T)
    assert (
        6 * (cfg.vocab_size * cfg.hidden_size)
        < extra
        < 6 * model_stats(cfg).mtp + 6 * cfg.vocab_size * cfg.hidden_size + attention
    )


def test_tiny_run_learns_and_the_bias_update_balances_experts(dataset, tmp_path):
    """60 steps: held-out loss from ln(384) = 5.95 to below 2.0; with γ = 0.01 the max/mean expert load stays
    under 1.7 (averaged over the last 20 steps) and below the same run without bias updates."""
    result = pretrain(
        MODEL,
        TrainConfig(max_steps=60, eval_every=20, bias_update_speed=1e-2, **FAST),
        dataset,
        tmp_path / "run",
        progress=False,
    )
    held = losses(tmp_path / "run", "loss/heldout")
    assert sorted(held) == [20, 40, 60] and held[20] > held[60] and result.heldout_loss == held[60]
    assert result.heldout_loss < 2.0, held
    rows = read_metrics(tmp_path / "run")
    assert {
        "loss/train",
        "loss/mtp",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "expert_load/layers.1.mlp",
        "expert_load/mtp.0.mlp",
    } <= set(rows[-1])
    assert result.checkpoint.name == "step_00000060" and (result.checkpoint / "model.safetensors").exists()
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert {"loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "expert_load.png"} <= {
        p.name for p in (tmp_path / "run" / "plots").iterdir()
    }

    def load(run):
        return statistics.mean(r["expert_load/layers.1.mlp"] for r in read_metrics(run)[-20:])

    pretrain(
        MODEL,
        TrainConfig(max_steps=60, eval_every=-1, bias_update_speed=0.0, **FAST),
        dataset,
        tmp_path / "nobias",
        progress=False,
    )
    balanced, free = load(tmp_path / "run"), load(tmp_path / "nobias")
    assert balanced < 1.7 and balanced < free, (balanced, free)
    biases = from_pretrained(result.checkpoint).layers[1].mlp.gate.e_score_correction_bias
    assert biases.abs().max() > 0.05  # the biases really moved


def test_accumulation_equals_one_big_batch(dataset, tmp_path):
    """Batch 4 = 2 micro-batches of 2, with every loss term on (MTP, the balance loss with α = 0.01) and the
    bias update applied once per optimizer step, not per micro-batch."""
    common = dict(max_steps=3, eval_every=-1, seq_len=64, lr=3e-3, warmup_steps=1, save_every=0, aux_loss_alpha=1e-2)
    pretrain(MODEL, TrainConfig(batch_size=4, grad_accum=1, **common), dataset, tmp_path / "big", progress=False)
    pretrain(MODEL, TrainConfig(batch_size=2, grad_accum=2, **common), dataset, tmp_path / "acc", progress=False)
    for key in ("loss/train", "loss/mtp", "loss/aux", "grad_norm"):
        big, acc = losses(tmp_path / "big", key), losses(tmp_path / "acc", key)
        assert list(big) == [1, 2, 3]
        assert [acc[s] for s in big] == pytest.approx(list(big.values()), rel=1e-5), key
    assert 0 < losses(tmp_path / "big", "loss/aux")[1] < 0.1  # α Σ f_i P_i is about α at balance


def test_dense_model_without_mtp_trains(dataset, tmp_path):
    """No MoE layer and no MTP module (a distillation student's shape): no MTP or balance terms, loss falls."""
    dense = MODEL.replace(
        n_routed_experts=0,
        n_shared_experts=0,
        num_experts_per_tok=0,
        first_k_dense_replace=0,
        num_nextn_predict_layers=0,
    )
    pretrain(dense, TrainConfig(max_steps=8, eval_every=-1, **FAST), dataset, tmp_path / "dense", progress=False)
    rows = read_metrics(tmp_path / "dense")
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[-1]["loss/train"] < rows[0]["loss/train"]
    assert not {k for k in rows[-1] if k.startswith(("loss/mtp", "expert_load"))}


RESUME_FLAGS = [
    "--seq-len",
    "64",
    "--batch-size",
    "4",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "2",
    "--max-steps",
    "16",
    "--save-every",
    "4",
    "--eval-every",
    "8",
    "--no-progress",
]


def test_resume_after_kill_reproduces_the_uninterrupted_curve(dataset, tmp_path):
    """A real `nanoseek pretrain` process is SIGKILLed after its step-4 checkpoint; `--resume` then gives
    the same per-step losses as an uninterrupted run (tolerance: 1e-5 relative; in practice bit-equal)."""
    init = tmp_path / "init"
    torch.manual_seed(0)
    save_pretrained(Transformer(MODEL), init)
    dataset.tokenizer.save_pretrained(init)
    assert (
        main(["pretrain", str(tmp_path / "whole"), "--init", str(init), "--data", str(dataset.root)] + RESUME_FLAGS)
        == 0
    )

    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "nanoseek.cli",
        "pretrain",
        str(run),
        "--init",
        str(init),
        "--data",
        str(dataset.root),
    ] + RESUME_FLAGS
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_00000004").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run / "checkpoints" / "step_00000016").exists()  # it died mid-run
    assert main(["pretrain", str(run), "--resume", "--no-progress"]) == 0

    whole, resumed = losses(tmp_path / "whole"), losses(run)
    assert list(resumed) == list(range(1, 17))  # each step once: lines past the checkpoint were dropped
    for s in whole:
        assert resumed[s] == pytest.approx(whole[s], rel=1e-5), s
    assert losses(run, "loss/heldout") == pytest.approx(losses(tmp_path / "whole", "loss/heldout"), rel=1e-5)


# ---- bad input and conflicting flags: a clear one-line error, exit 2, nothing lost ----------------------
def cli_error(capsys, *argv) -> str:
    assert main(["pretrain", *map(str, argv), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek pretrain: error: ") and err.count("\n") == 1, err
    return err


def test_bad_corpus_files_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty.txt is empty" in cli_error(capsys, tmp_path / "r1", "--preset", "tiny", "--corpus", empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("na\xefve text\n".encode("latin-1"))
    assert "latin.txt is not UTF-8 text: line 1" in cli_error(
        capsys, tmp_path / "r2", "--preset", "tiny", "--corpus", latin
    )
    short = tmp_path / "short.txt"
    short.write_text("Just one short paragraph.\n")
    err = cli_error(
        capsys,
        tmp_path / "r3",
        "--preset",
        "tiny",
        "--corpus",
        short,
        "--heldout-percent",
        "0",
        "--eval-every",
        "-1",
        "--seq-len",
        "128",
    )
    assert "fewer than one sequence of seq_len + 1 = 129" in err
    assert not (tmp_path / "r3" / "checkpoints").exists()


def test_conflicting_flags_are_refused_before_any_work(dataset, tmp_path, capsys):
    assert "does not exist" in cli_error(capsys, tmp_path / "nothing", "--resume")
    assert "drop --preset" in cli_error(capsys, tmp_path / "nothing", "--resume", "--preset", "tiny")
    data = ["--data", dataset.root]
    assert "--preset NAME or --init" in cli_error(capsys, tmp_path / "r", *data)
    assert "exactly one of --data" in cli_error(
        capsys, tmp_path / "r", "--preset", "tiny", *data, "--task", "arithmetic"
    )
    assert "warmup_steps (10) must be less than max_steps (5)" in cli_error(
        capsys, tmp_path / "r", "--preset", "tiny", *data, "--max-steps", "5", "--warmup-steps", "10"
    )
    assert "needs several processes" in cli_error(
        capsys, tmp_path / "r", "--preset", "tiny", *data, "--expert-parallel"
    )
    assert "mtp_depth 2 asked for, but the model has 1" in cli_error(
        capsys, tmp_path / "r", "--preset", "tiny", *data, "--mtp-depth", "2"
    )
    # A finished run is neither overwritten by a fresh one nor resumed with a different learning rate.
    run = tmp_path / "done"
    pretrain(
        MODEL,
        TrainConfig(max_steps=2, eval_every=-1, seq_len=32, batch_size=2, warmup_steps=1),
        dataset,
        run,
        progress=False,
    )
    before = (run / "checkpoints" / "step_00000002" / "model.safetensors").read_bytes()
    assert "already holds a run" in cli_error(capsys, run, "--preset", "tiny", *data)
    assert "lr: 0.0003 in the run, 0.01 now" in cli_error(capsys, run, "--resume", "--lr", "1e-2", "--max-steps", "4")
    assert (run / "checkpoints" / "step_00000002" / "model.safetensors").read_bytes() == before
    assert main(["pretrain", str(run), "--resume", "--max-steps", "3", "--no-progress"]) == 0  # extending is fine
    assert sorted(losses(run)) == [1, 2, 3] and all(math.isfinite(v) for v in losses(run).values())
