"""Scale-out: `torchrun --nproc_per_node 2` (gloo on CPU) trains the same curve as one process with the same
global batch: data-parallel with DDP or FSDP2 (fully_shard), and expert-parallel (each rank holds half the
routed experts, tokens travel by all_to_all); checkpoints do not depend on the world size or sharding."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanoseek import from_pretrained
from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.cli import main
from nanoseek.model.transformer import Transformer
from nanoseek.train.data import TaskCorpus, build_dataset
from nanoseek.train.metrics import read_metrics

from helpers import TRAIN_MODEL

pytestmark = pytest.mark.slow

MODEL = TRAIN_MODEL
FLAGS = [
    "--seq-len",
    "64",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "1",
    "--max-steps",
    "4",
    "--save-every",
    "2",
    "--eval-every",
    "2",
    "--eval-sequences",
    "6",
    "--no-progress",
]
REL = 1e-4  # fp32 sums in a different order (per-rank partial sums, all_reduce) than one process


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ds = build_dataset(
        root / "data",
        TaskCorpus("arithmetic", 300, split="train", max_digits=2),
        TaskCorpus("arithmetic", 30, split="heldout", max_digits=2),
        vocab_size=384,
        chat_template="r1_zero",
    )
    torch.manual_seed(0)
    save_pretrained(Transformer(MODEL), root / "init")
    ds.tokenizer.save_pretrained(root / "init")
    common = ["--init", str(root / "init"), "--data", str(ds.root)] + FLAGS
    assert single_process(["pretrain", str(root / "single"), "--batch-size", "4"] + common) == 0
    return root, common


def single_process(argv):
    """`nanoseek ...` in this process, on one thread as each torchrun worker runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def torchrun(run_dir, args, batch=("--batch-size", "2")):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "nanoseek.cli",
        "pretrain",
        str(run_dir),
        *batch,
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def curve(run_dir):
    rows = read_metrics(run_dir)
    return (
        [r["loss/train"] for r in rows],
        [r["loss/heldout"] for r in rows if "loss/heldout" in r],
        [r["grad_norm"] for r in rows],
    )


def assert_same_run(a, b):
    for xs, ys in zip(curve(a), curve(b)):
        assert len(xs) == len(ys) > 0
        assert ys == pytest.approx(xs, rel=REL)
    wa = from_pretrained(a / "checkpoints" / "step_00000004").state_dict()
    wb = from_pretrained(b / "checkpoints" / "step_00000004").state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:  # full weights, experts gathered from both ranks; the correction biases too
        torch.testing.assert_close(wb[name], wa[name], atol=2e-4, rtol=1e-3, msg=name)


def test_ddp_two_processes_match_one(setup):
    root, common = setup
    torchrun(root / "ddp", common)
    assert_same_run(root / "single", root / "ddp")


def test_fsdp_two_processes_match_one_and_resume_a_single_process_run(setup):
    root, common = setup
    micro = ("--batch-size", "1", "--grad-accum", "2")  # 2 ranks x 2 micro-batches x 1 = the global 4
    torchrun(root / "fsdp", common + ["--fsdp"], micro)
    assert_same_run(root / "single", root / "fsdp")
    # A single-process checkpoint loads into the shards and continues the curve.
    resumed = root / "fsdp_resumed"
    shutil.copytree(root / "single", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    torchrun(resumed, ["--resume", "--fsdp", "--no-progress"], micro)
    assert_same_run(root / "single", resumed)


def test_expert_parallel_matches_one_process_and_resumes_anywhere(setup):
    root, common = setup
    proc = torchrun(root / "ep", common + ["--expert-parallel"])
    assert "expert load max/mean" in proc.stdout
    assert_same_run(root / "single", root / "ep")
    # The expert-parallel run's step-2 checkpoint resumes in one process (same global batch of 4) and
    # continues the single-process curve.
    resumed = root / "ep_resumed"
    shutil.copytree(root / "ep", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    assert single_process(["pretrain", str(resumed), "--resume", "--batch-size", "4", "--no-progress"]) == 0
    assert_same_run(root / "single", resumed)
