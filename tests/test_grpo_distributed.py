"""GRPO under torchrun (nanoseek/rl/distributed.py): 2 processes (gloo, CPU), each rolling out half of every
step's prompts, log the same per-step loss, reward and gradient norm as 1 process on the same prompts and seeds,
and end with the same weights; a 2-process run resumed from its checkpoint (in 2 processes or in 1) continues
the same curve; a prompts_per_step the world size does not divide is refused by `torchrun ... -m nanoseek.cli
grpo`.

This file is also the torchrun worker of those runs (`python -m torch.distributed.run ... THIS_FILE RUN_DIR
STEPS CONFIG [--resume]`): GRPO on the toy task of tests/helpers.py, whose reward a random model already varies."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek import from_pretrained
from nanoseek.model.transformer import Transformer
from nanoseek.rl.config import GRPOConfig, GRPOError
from nanoseek.rl.distributed import check_world
from nanoseek.rl.grpo import train_grpo
from nanoseek.train import parallel
from nanoseek.train.metrics import read_metrics

from helpers import (
    TOKENIZER,
    SayDigits,
    arithmetic_checkpoint,
    chat_v4_config,
    digit_reward,
    short_prompt,
    tiny_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

COMMON = dict(num_generations=4, prompts_per_step=4, max_completion_length=6, learning_rate=1e-2, micro_batch_size=4)
CONFIGS = {
    # dapo's token normalizer, two minibatches drawn across both ranks' groups (a rank may hold none of one),
    # μ = 2, β > 0, dynamic sampling with a refill round split unevenly, batch-std advantages, the MoE router
    # bias moving with the routed tokens of both ranks
    "dapo": dict(
        loss_type="dapo",
        router_bias_update_speed=1e-3,
        num_iterations=2,
        num_minibatches=2,
        beta=0.04,
        dynamic_sampling=True,
        max_resample_rounds=1,
        scale_rewards="batch",
    ),
    # GSPO's sequence ratios, off-policy on the second minibatch; weight decay (none on the unused MTP weights)
    "gspo": dict(loss_type="gspo", num_minibatches=2, weight_decay=0.1, save_steps=2),
}
KEYS = ("loss", "grad_norm", "entropy", "kl", "clip_ratio/total", "reward/total", "completion_length/mean")
# The ranks sample the same tokens as one process (same per-prompt seeds); what may differ is float32 summation
# order: DDP's all-reduce of the two ranks' gradients, and the engine's matmuls over half the batch: ~1e-7
# relative (5e-7 in the weights after 2 steps of another config; these runs came out bit-identical on this
# 2-core machine), which Adam (lr 1e-2) carries into the next steps. 1e-4 leaves room for other CPUs' kernels.
REL = 1e-4
# Sharded updates sum the ranks' gradients in another order (FSDP2's reduce-scatter, the experts' all_to_all
# back-propagated): ~1e-7 relative in a gradient, which Adam's m / sqrt(v) turns into up to ~2e-5 in a weight
# where a gradient is near 0, against steps of lr = 1e-2. 1e-4 is 1% of one step.
SHARDED_ATOL = 1e-4


def policy():
    """A tiny MoE with an MTP module: GRPO's forward leaves the MTP parameters out, which DDP must allow."""
    torch.manual_seed(0)
    return Transformer(tiny_config(num_nextn_predict_layers=1))


def run_grpo(run_dir, steps, config, resume=False, **sharding):
    cfg = GRPOConfig(**COMMON, **CONFIGS[config], max_steps=steps, **sharding)
    return train_grpo(
        policy(),
        TOKENIZER,
        SayDigits(),
        cfg,
        run_dir,
        resume=resume,
        progress=False,
        reward_fn=digit_reward,
        prompt_fn=short_prompt,
    )


def torchrun(*args, module=False, ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    target = ["-m", "nanoseek.cli", *args] if module else [__file__, *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_same_curve(one, two, steps, weights_atol=1e-5):
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        for key in KEYS:
            assert rb[key] == pytest.approx(ra[key], rel=REL, abs=1e-7), (ra["step"], key)
    assert any(r["loss"] != 0 for r in a) and any(r["clip_ratio/total"] > 0 for r in a)  # not a trivial run
    wa, wb = (from_pretrained(d / "final").state_dict() for d in (one, two))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=weights_atol, rtol=1e-4, msg=name)


def test_two_processes_match_one(tmp_path):
    run_grpo(tmp_path / "one", 3, "dapo")
    torchrun(str(tmp_path / "two"), "3", "dapo")
    assert_same_curve(tmp_path / "one", tmp_path / "two", 3)
    assert max(r["groups/sampled"] for r in read_metrics(tmp_path / "one")) > 4  # a refill round ran


def test_two_processes_resume_the_same_curve(tmp_path):
    run_grpo(tmp_path / "one", 3, "gspo")
    torchrun(str(tmp_path / "two"), "2", "gspo")
    shutil.copytree(tmp_path / "two", tmp_path / "two_then_one")
    torchrun(str(tmp_path / "two"), "3", "gspo", "--resume")
    assert_same_curve(tmp_path / "one", tmp_path / "two", 3)
    # the 2-process checkpoint is the same files as a 1-process one: it resumes in 1 process too
    run_grpo(tmp_path / "two_then_one", 3, "gspo", resume=True)
    assert_same_curve(tmp_path / "one", tmp_path / "two_then_one", 3)


def test_sharded_updates_match_one(tmp_path):
    """FSDP2 and expert parallelism (the engine sampling from a gathered copy of the shards) make one
    process's updates: the dapo config leaves a rank with none of a minibatch's groups, or fewer micro-batches
    than the other, so it must run stand-ins through the collectives inside each forward."""
    run_grpo(tmp_path / "one", 3, "dapo")
    for flag in ("--fsdp", "--expert-parallel"):
        torchrun(str(tmp_path / flag), "3", "dapo", flag)
        assert_same_curve(tmp_path / "one", tmp_path / flag, 3, SHARDED_ATOL)


def test_sharded_run_resumes_under_another_sharding(tmp_path):
    """Checkpoints hold full tensors: 2 steps under FSDP2, resumed under expert parallelism, equal one process."""
    run_grpo(tmp_path / "one", 3, "gspo")
    torchrun(str(tmp_path / "two"), "2", "gspo", "--fsdp")
    torchrun(str(tmp_path / "two"), "3", "gspo", "--resume", "--expert-parallel")
    assert_same_curve(tmp_path / "one", tmp_path / "two", 3, SHARDED_ATOL)


@pytest.mark.parametrize(
    "sharding, world, model_cfg, message",
    [
        ({"fsdp": True}, 1, tiny_config(), "--fsdp needs several processes"),
        ({"expert_parallel": True}, 1, tiny_config(), "--expert-parallel needs several processes"),
        ({"fsdp": True, "expert_parallel": True}, 2, tiny_config(), "do not combine"),
        ({"expert_parallel": True}, 3, tiny_config(), "n_routed_experts (4) must divide evenly over 3 ranks"),
        ({"fsdp": True}, 2, chat_v4_config(TOKENIZER, 320), "not supported for DeepSeek-V4"),
    ],
)
def test_sharding_that_cannot_work_is_refused(sharding, world, model_cfg, message):
    cfg = GRPOConfig(**{**COMMON, "prompts_per_step": 12}, **sharding)
    with pytest.raises(GRPOError) as e:
        check_world(cfg, world, model_cfg)
    assert message in str(e.value)


def test_grpo_command_under_torchrun(tmp_path):
    """`torchrun ... -m nanoseek.cli grpo`: refuses a prompts_per_step the world size does not divide, naming
    both; otherwise runs, rank 0 alone printing and writing."""
    model = arithmetic_checkpoint(tmp_path / "model")
    args = ["grpo", "--model", str(model), "--task", "arithmetic", "--num-generations", "2", "--no-progress"]
    proc = torchrun(*args, "--out", str(tmp_path / "bad"), "--prompts-per-step", "3", module=True, ok=False)
    assert "prompts_per_step (3) must be divisible by the world size (2)" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
    flags = ["--prompts-per-step", "2", "--max-completion-length", "4", "--max-steps", "1", "--no-plot"]
    proc = torchrun(*args, "--out", str(tmp_path / "run"), *flags, module=True)
    assert proc.stdout.count("grpo: step 1,") == 1 and proc.stdout.count("step 1: reward") == 1
    assert [r["groups/sampled"] for r in read_metrics(tmp_path / "run")] == [2.0]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def worker(run_dir: str, steps: str, config: str, *flags: str) -> None:
    torch.set_num_threads(1)
    parallel.init_distributed("cpu")
    sharding = {"fsdp": "--fsdp" in flags, "expert_parallel": "--expert-parallel" in flags}
    run_grpo(Path(run_dir), int(steps), config, resume="--resume" in flags, **sharding)
    parallel.shutdown_distributed()


if __name__ == "__main__":
    worker(*sys.argv[1:])
