"""Training DeepSeek-V3.2's sparse attention (V3.2 §2.1.1): the dense warm-up trains the lightning indexer
alone, sparse training trains everything with the indexer's KL reaching only the indexer, the stages survive
accumulation and resume, the flags and their errors, and GRPO's training forward on a DSA model."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanoseek import from_pretrained
from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.cli import main
from nanoseek.cli.zero import _zero_config
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.transformer import Transformer
from nanoseek.rl.rollout import Rollout
from nanoseek.rl.zero_config import preset
from nanoseek.train.data import PackedBatches, TaskCorpus, build_dataset
from nanoseek.train.metrics import read_metrics
from nanoseek.train.objective import PretrainObjective
from nanoseek.train.trainer import TrainConfig, Trainer, pretrain

from helpers import TRAIN_MODEL, assert_policy_logprobs_match, random_model, tiny_config

# TRAIN_MODEL (a dense and a MoE layer, MTP depth 1) behind a 2-head indexer: its top-16 of a 64-token window
# makes attention sparse in every window.
V32 = TRAIN_MODEL.replace(model_type="deepseek_v32", q_lora_rank=32, index_n_heads=2, index_head_dim=16, index_topk=16)
FAST = dict(seq_len=64, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=-1, save_every=0)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(
        tmp_path_factory.mktemp("data"),
        TaskCorpus("arithmetic", 300, split="train", max_digits=2),
        TaskCorpus("arithmetic", 30, split="heldout", max_digits=2),
        vocab_size=384,
        chat_template="r1_zero",
    )


def quiet(*args, **kwargs):
    pass


def column(run_dir, key):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def is_indexer(name: str) -> bool:
    return ".indexer." in name


def test_warmup_trains_only_the_indexer(dataset, tmp_path):
    """Five warm-up steps on one fixed batch (random weights of std 0.08: peaked attention, so a KL to fit):
    every parameter outside the indexers and the routing biases stay bit-identical, every indexer parameter
    moves, the KL falls by more than half, and the LM loss is the same to the bit each step (dense attention
    ignores the indexer). With --dsa-warmup-train-all the warm-up trains the main model too."""
    cfg = TrainConfig(max_steps=8, dsa_warmup_steps=8, **FAST)
    trainer = Trainer(random_model(V32), cfg, dataset, tmp_path / "frozen", log=quiet)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    biases = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    rows = []
    for _ in range(5):
        trainer.position = 0  # the same batch every step
        rows.append(trainer.train_step())
    assert all(m.dense_attention and m.indexer_kl for m in model.dsa_layers())
    assert len(model.dsa_layers()) == 3  # two layers and the MTP block
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != is_indexer(name), name
    assert all(torch.equal(m.gate.e_score_correction_bias, b) for m, b in zip(model.moe_layers(), biases))
    kl = [r["loss/indexer"] for r in rows]
    assert kl[-1] < 0.5 * kl[0], kl
    assert len({r["loss/train"] for r in rows}) == 1
    assert all(r["grad_norm"] == 0.0 and r["grad_norm/indexer"] > 0 for r in rows)

    # The step after the warm-up is sparse and trains every parameter.
    trainer.set_stage(8)
    assert not any(m.dense_attention for m in model.dsa_layers()) and all(p.requires_grad for p in model.parameters())
    # A finished run hands the model back as inference runs it: sparse, no KL, nothing frozen.
    trainer.set_stage(0)
    trainer.run(progress=False)
    assert not any(m.dense_attention or m.indexer_kl for m in model.dsa_layers())
    assert all(p.requires_grad for p in model.parameters())

    cfg = TrainConfig(max_steps=8, dsa_warmup_steps=8, dsa_warmup_train_all=True, **FAST)
    trainer = Trainer(random_model(V32), cfg, dataset, tmp_path / "all", log=quiet)
    trainer.train_step()
    trainer.metrics.close()
    assert all(m.dense_attention for m in trainer.model.dsa_layers())
    assert all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_sparse_stage_kl_reaches_only_the_indexer(dataset):
    """One sparse forward and backward of LM + balance + indexer KL: every parameter gets a gradient, and the
    main model's gradients equal those of the same step with the KL off, to the bit (the indexer's inputs
    are detached; top-k passes no gradient); without the KL the indexer gets none."""
    model = random_model(V32.replace(aux_loss_alpha=0.01))
    batch = PackedBatches(dataset.train, 64, seed=0).get(0, 4)
    objective = PretrainObjective(model, 1, indexer_loss=True)
    targets = [batch.targets(k) for k in range(2)]

    def grads(kl_on: bool):
        model.zero_grad(set_to_none=True)
        model.set_dsa_stage(dense_attention=False, indexer_kl=kl_on)
        sums, aux, kl = objective(batch.inputs, targets, batch.attention_mask())
        (sums.sum() / 100 + aux + kl).backward()
        return {n: p.grad for n, p in model.named_parameters()}, float(kl.detach())

    with_kl, kl = grads(True)
    without, no_kl = grads(False)
    assert kl > 0 and no_kl == 0
    for name, g in with_kl.items():
        assert g is not None and g.abs().sum() > 0, name
        if is_indexer(name):
            assert without[name] is None, name
        else:
            assert torch.equal(g, without[name]), name


def test_accumulation_equals_one_big_batch_across_the_stages(dataset, tmp_path):
    """Batch 4 = 2 micro-batches of 2, over a warm-up step and two sparse ones: the same losses, KL and
    gradient norms (tolerance 1e-5 relative: the sums add in another order; the KL, ~1e-4 at this
    initialization and a difference of nearly equal terms, 1e-8 absolute)."""
    common = dict(max_steps=3, dsa_warmup_steps=1, eval_every=-1, seq_len=64, lr=1e-2, warmup_steps=1, save_every=0)
    pretrain(V32, TrainConfig(batch_size=4, **common), dataset, tmp_path / "big", progress=False)
    pretrain(V32, TrainConfig(batch_size=2, grad_accum=2, **common), dataset, tmp_path / "acc", progress=False)
    for key in ("loss/train", "loss/mtp", "loss/indexer", "grad_norm", "grad_norm/indexer"):
        big, acc = column(tmp_path / "big", key), column(tmp_path / "acc", key)
        assert list(big) == [1, 2, 3]
        tol = dict(rel=1e-5, abs=1e-8 if key == "loss/indexer" else 0)
        assert [acc[s] for s in big] == pytest.approx(list(big.values()), **tol), key
    assert column(tmp_path / "big", "grad_norm")[1] == 0.0 < column(tmp_path / "big", "grad_norm")[2]


def test_resume_across_the_warmup_boundary(dataset, tmp_path):
    """A run resumed at step 2 of a 3-step warm-up continues the warm-up and then trains sparse exactly as
    the uninterrupted run: per-step losses and KL within 1e-5 relative (in practice equal), the same weights."""
    cfg = TrainConfig(max_steps=6, dsa_warmup_steps=3, seq_len=64, batch_size=4, lr=1e-2, warmup_steps=1)
    cfg.save_every, cfg.eval_every = 2, 3
    whole = pretrain(V32, cfg, dataset, tmp_path / "whole", progress=False)
    run = shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    for step in (4, 6):
        shutil.rmtree(run / "checkpoints" / f"step_{step:08d}")
    resumed = pretrain(V32, cfg, dataset, run, resume=True, progress=False)
    for key in ("loss/train", "loss/indexer", "loss/heldout", "grad_norm"):
        a, b = column(tmp_path / "whole", key), column(run, key)
        assert list(a) == list(b) and [b[s] for s in a] == pytest.approx(list(a.values()), rel=1e-5), key
    final = from_pretrained(resumed.checkpoint).state_dict()
    assert all(torch.equal(p, final[n]) for n, p in from_pretrained(whole.checkpoint).state_dict().items())
    # The sparse steps trained every parameter (steps 1-2 had only moved the indexers).
    warm = from_pretrained(run / "checkpoints" / "step_00000002")
    assert all(not torch.equal(p, final[n]) for n, p in warm.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [[], ["--fsdp"], ["--expert-parallel"]], ids=["ddp", "fsdp", "ep"])
def test_two_processes_train_the_one_process_curve(dataset, tmp_path, parallel):
    """`torchrun --nproc_per_node 2` (gloo) over 2 warm-up and 2 sparse steps, batch 2 per process, against
    one process with batch 4: every step's losses, KL and gradient norms and the held-out loss agree within
    1e-4 relative, as the V3 scale-out tests hold. DDP: the frozen warm-up averages the indexers' gradients
    itself; FSDP2: blocks stay gathered until their backward, which the KL reaches around their output;
    expert parallelism: frozen expert slices get no gradient (so no weight decay) in the warm-up."""
    torch.manual_seed(0)
    save_pretrained(Transformer(V32), tmp_path / "init")
    dataset.tokenizer.save_pretrained(tmp_path / "init")
    flags = ["--init", str(tmp_path / "init"), "--data", str(dataset.root), "--seq-len", "64", "--lr", "1e-2"]
    flags += ["--warmup-steps", "1", "--max-steps", "4", "--dsa-warmup-steps", "2", "--save-every", "0"]
    flags += ["--eval-every", "2", "--eval-sequences", "6", "--no-progress"]
    assert main(["pretrain", str(tmp_path / "one"), "--batch-size", "4", *flags]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nanoseek.cli"]
    cmd += ["pretrain", str(tmp_path / "two"), "--batch-size", "2", *parallel, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("loss/train", "loss/indexer", "grad_norm", "grad_norm/indexer", "loss/heldout"):
        one, two = column(tmp_path / "one", key), column(tmp_path / "two", key)
        assert list(one) == list(two) and [two[s] for s in one] == pytest.approx(list(one.values()), rel=1e-4), key


def cli_error(capsys, *argv) -> str:
    assert main(["pretrain", *map(str, argv), "--no-progress"]) == 2
    return capsys.readouterr().err


def test_flags_metrics_and_errors(dataset, tmp_path, capsys):
    """--dsa-warmup-steps and --dsa-warmup-train-all land in the run's TrainConfig, every step logs the KL and
    the indexer's gradient norm, the summary prints the KL; on a V3 model the flags are refused by name, as
    is a resume that changes the warm-up."""
    run = tmp_path / "run"
    args = ["pretrain", str(run), "--preset", "tiny-v32", "--data", str(dataset.root), "--seq-len", "64"]
    args += ["--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--eval-every", "-1", "--no-progress"]
    assert main(args + ["--dsa-warmup-steps", "1", "--dsa-warmup-train-all"]) == 0
    assert "indexer KL" in capsys.readouterr().out
    saved = json.loads((run / "run.json").read_text())["train_config"]
    assert saved["dsa_warmup_steps"] == 1 and saved["dsa_warmup_train_all"] is True
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss/indexer"] > 0 and "grad_norm/indexer" in r for r in rows)
    assert "dsa_warmup_steps: 1 in the run, 2 now" in cli_error(capsys, run, "--resume", "--dsa-warmup-steps", "2")

    v3 = ["--preset", "tiny", "--data", dataset.root]
    err = cli_error(capsys, tmp_path / "v3", *v3, "--dsa-warmup-steps", "5")
    assert "--dsa-warmup-steps" in err and "deepseek_v3" in err
    assert "--dsa-warmup-steps N" in cli_error(capsys, tmp_path / "v3", *v3, "--dsa-warmup-train-all")
    assert not (tmp_path / "v3" / "checkpoints").exists()
    # A V3 run logs nothing about an indexer.
    pretrain(TRAIN_MODEL, TrainConfig(max_steps=2, **FAST), dataset, tmp_path / "plain", progress=False)
    assert not any("indexer" in k for r in read_metrics(tmp_path / "plain") for k in r)


def test_zero_model_preset_maps_to_a_dsa_run(tmp_path):
    """`nanoseek zero --model-preset tiny-v32`: the preset's shape with an indexer, pretrained with a dense
    warm-up of everything; on --resume the run's own preset is taken, with or without the flag again."""
    cfg = _zero_config(argparse.Namespace(resume=False, preset="smoke", model_preset="tiny-v32", seed=None, threads=1))
    plain = preset("smoke")
    assert cfg.model.dsa and not plain.model.dsa
    assert cfg.model.replace(model_type="deepseek_v3").to_hf_dict() == plain.model.to_hf_dict()  # the same shape
    assert cfg.train.dsa_warmup_steps == cfg.train.max_steps // 6 > 0 and cfg.train.dsa_warmup_train_all
    assert plain.train.dsa_warmup_steps == 0
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    for flag in (None, "tiny-v32"):
        args = argparse.Namespace(resume=True, preset=None, model_preset=flag, seed=None, threads=1, out=tmp_path)
        assert _zero_config(args).to_dict() == cfg.to_dict()


def test_grpo_training_forward_on_a_dsa_model():
    """GRPO's training forward (each prompt once, completions attending to their group's prompt latents and
    indexer keys) equals the full forward of every prompt + completion under top-4 sparse attention, and
    the engine's sampling log-probs (sparse absorbed decode). Tolerances as the V3 test's: 1e-5, 1e-4.
    16 indexer heads: with few, index scores tie at exactly 0 (every ReLU off) and the top-k is a coin toss."""
    cfg = tiny_config(model_type="deepseek_v32", index_n_heads=16, index_head_dim=16, index_topk=4)
    model = random_model(cfg).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
    outs = Engine(model).generate(prompts, SamplingParams(n=3, max_tokens=10, logprobs=True, seed=3))
    rs = [
        Rollout(None, g, p, list(c.token_ids), "", c.finish_reason, c.logprobs)
        for g, (p, o) in enumerate(zip(prompts, outs))
        for c in o.outputs
    ]
    assert_policy_logprobs_match(model, rs, 3)
