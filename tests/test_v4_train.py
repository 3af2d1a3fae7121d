"""Pretraining DeepSeek-V4 (`--preset tiny-v4`): the loss falls with the MTP loss logged, the score-routed
layers' correction biases move while the hash tables stay fixed, checkpoints round-trip (logits and hash tables
exact), a resumed run equals the uninterrupted one, and what V4 cannot train with is refused by name."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_v4 import CONFIGS as V4_CONFIGS

from nanoseek import from_pretrained
from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.cli import main
from nanoseek.model.csa import Indexer
from nanoseek.model.presets import get_preset
from nanoseek.model.stats import model_stats
from nanoseek.model.v4_attention import indexer_kl
from nanoseek.model.v4_config import CSA, HCA, SLIDING
from nanoseek.model.v4_moe import HashGate
from nanoseek.train.data import TaskCorpus, build_dataset
from nanoseek.train.metrics import read_metrics
from nanoseek.train.objective import training_flops_per_token
from nanoseek.train.trainer import TrainConfig, TrainError, pretrain

from helpers import random_model

# tiny-v4's shape, smaller: every attention kind (CSA 1/4 with a top-4 indexer, HCA 1/16, a 16-token window), a
# hash layer then score-routed ones, 4 mHC streams, one MTP module; 64-token windows.
V4 = get_preset(
    "tiny-v4",
    vocab_size=384,
    hidden_size=64,
    moe_intermediate_size=32,
    q_lora_rank=32,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=4,
    qk_rope_head_dim=8,
)
V4 = V4.replace(
    v4=dataclasses.replace(
        V4.v4,
        head_dim=16,
        layer_types=(SLIDING, CSA, HCA),
        mlp_layer_types=("hash_moe", "moe", "moe"),
        sliding_window=16,
        o_lora_rank=16,
        hc_sinkhorn_iters=10,
    ),
    num_hidden_layers=3,
)
FAST = dict(seq_len=64, batch_size=4, lr=1e-2, warmup_steps=1, doc_mask=False, save_every=0)

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


def column(run_dir, key):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def hash_tables(model) -> list[torch.Tensor]:
    return [m.tid2eid.clone() for m in model.modules() if isinstance(m, HashGate)]


def test_the_preset_matches_tiny_in_parameters():
    """tiny-v4 has every attention kind at rates dividing the engine's 16-token blocks, and within 1% of tiny's
    total parameters (2,313,341 against 2,298,624) and 2% of its active ones (1,166,461 against 1,151,744)."""
    cfg, tiny = get_preset("tiny-v4"), get_preset("tiny")
    assert set(cfg.v4.layer_types) == {SLIDING, CSA, HCA} and "hash_moe" in cfg.v4.mlp_layer_types
    assert all(16 % r == 0 for r in cfg.v4.compress_rates.values()) and cfg.num_nextn_predict_layers == 1
    ours, theirs = model_stats(cfg), model_stats(tiny)
    assert abs(ours.total / theirs.total - 1) < 0.01 and abs(ours.active / theirs.active - 1) < 0.02
    assert training_flops_per_token(cfg, 256, 1) > training_flops_per_token(cfg, 256, 0) > 6 * ours.active


def test_pretraining_learns_with_mtp_and_balances_score_routed_experts(dataset, tmp_path):
    """12 steps: the held-out loss falls, MTP's loss is logged and falls, the checkpoint gives the trained
    model's logits exactly, the score-routed layers' correction biases moved (the auxiliary-loss-free update),
    the hash tables did not (routing is by table), and the CSA indexers trained by their KL toward the main
    attention (logged as loss/indexer, which falls), handed back as inference runs them (top-k, no KL)."""
    torch.manual_seed(0)
    init = random_model(V4)
    tables = hash_tables(init)
    indexers = [m for m in init.modules() if isinstance(m, Indexer)]
    before = [p.detach().clone() for m in indexers for p in m.parameters()]
    cfg = TrainConfig(max_steps=12, eval_every=6, eval_sequences=8, **FAST)
    result = pretrain(init, cfg, dataset, tmp_path / "run", progress=False)
    held = column(tmp_path / "run", "loss/heldout")
    mtp = column(tmp_path / "run", "loss/mtp")
    assert list(held) == [6, 12] and held[12] < held[6]
    assert len(mtp) == 12 and mtp[12] < mtp[1]
    assert column(tmp_path / "run", "loss/train")[12] < column(tmp_path / "run", "loss/train")[1]
    assert any(k.startswith("expert_load/") for k in read_metrics(tmp_path / "run")[0])
    model = from_pretrained(result.checkpoint)
    x = torch.randint(0, V4.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the checkpoint is the trained model, to the bit
        assert torch.equal(model(x), init.eval()(x))
    assert all(torch.equal(a, b) for a, b in zip(hash_tables(model), tables))
    biases = [m.gate.e_score_correction_bias for m in model.moe_layers() if not isinstance(m.gate, HashGate)]
    assert len(biases) == 3 and all(b.abs().sum() > 0 for b in biases)  # 2 main layers and the MTP layer
    assert indexers and all(p.requires_grad for m in indexers for p in m.parameters())
    assert all(not torch.equal(p, q) for p, q in zip(before, (p for m in indexers for p in m.parameters())))
    kl = column(tmp_path / "run", "loss/indexer")
    assert len(kl) == 12 and kl[12] < kl[1]
    assert all(not m.indexer_kl and not m.dense_attention for m in init.dsa_layers())


def test_checkpoint_round_trip_keeps_logits_and_the_hash_table(tmp_path):
    """save_pretrained then from_pretrained: the same logits and MTP logits (exactly), the same hash tables
    (stored per hash layer as DeepSeek's `layers.N.ffn.gate.tid2eid`), and a table that differs from a fresh
    draw, so it really was read from disk."""
    model = random_model(V4).eval()
    save_pretrained(model, tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        stored = f.get_tensor("model.layers.0.ffn.gate.tid2eid")
    assert torch.equal(stored, model.layers[0].mlp.gate.tid2eid)
    torch.manual_seed(123)  # from_pretrained must not keep a table of its own drawing
    loaded = from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(hash_tables(loaded), hash_tables(model)))
    x = torch.randint(0, V4.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        a, b = loaded.mtp_logits(loaded.streams(x), x), model.mtp_logits(model.streams(x), x)
    assert len(a) == 1 and torch.equal(a[0], b[0])


def test_resume_equals_the_uninterrupted_run(dataset, tmp_path):
    """A run resumed from its step-3 checkpoint: per-step train, MTP and held-out losses and gradient norms within
    1e-5 relative of the uninterrupted run (in practice equal), and the same final weights and hash tables."""
    cfg = TrainConfig(max_steps=6, eval_every=3, eval_sequences=8, **{**FAST, "save_every": 3})
    whole = pretrain(random_model(V4), cfg, dataset, tmp_path / "whole", progress=False)
    run = shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    resumed = pretrain(random_model(V4, seed=5), cfg, dataset, run, resume=True, progress=False)
    for key in ("loss/train", "loss/mtp", "loss/heldout", "grad_norm"):
        a, b = column(tmp_path / "whole", key), column(run, key)
        assert list(a) == list(b) and [b[s] for s in a] == pytest.approx(list(a.values()), rel=1e-5), key
    final = from_pretrained(resumed.checkpoint).state_dict()
    assert all(torch.equal(p, final[n]) for n, p in from_pretrained(whole.checkpoint).state_dict().items())


@pytest.mark.slow
def test_two_ddp_processes_train_the_one_process_curve(dataset, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, DDP) with batch 2 per process against one process with batch 4 over 3
    steps: every step's train and MTP losses, gradient norms and the held-out loss within 1e-4 relative (the V3
    scale-out tolerance), the CSA indexers' KL and gradient norm too."""
    torch.manual_seed(0)
    save_pretrained(random_model(V4), tmp_path / "init")
    dataset.tokenizer.save_pretrained(tmp_path / "init")
    flags = ["--init", str(tmp_path / "init"), "--data", str(dataset.root), "--seq-len", "64", "--lr", "1e-2"]
    flags += ["--warmup-steps", "1", "--max-steps", "3", "--save-every", "0", "--no-doc-mask"]
    flags += ["--eval-every", "3", "--eval-sequences", "6", "--no-progress"]
    assert main(["pretrain", str(tmp_path / "one"), "--batch-size", "4", *flags]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nanoseek.cli"]
    cmd += ["pretrain", str(tmp_path / "two"), "--batch-size", "2", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("loss/train", "loss/mtp", "grad_norm", "loss/indexer", "grad_norm/indexer", "loss/heldout"):
        one, two = column(tmp_path / "one", key), column(tmp_path / "two", key)
        assert list(one) == list(two) and [two[s] for s in one] == pytest.approx(list(one.values()), rel=1e-4), key


def cli_error(capsys, *argv) -> str:
    assert main(["pretrain", *map(str, argv), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek pretrain: error: ") and err.count("\n") == 1, err
    return err


def test_cli_trains_the_preset_and_refuses_what_v4_cannot_do(dataset, tmp_path, capsys, monkeypatch):
    """`nanoseek pretrain --preset tiny-v4 --no-doc-mask` trains and resumes; without --no-doc-mask, and with
    --fsdp or --expert-parallel (under a torchrun-like world size), the run is refused by name before any work."""
    run = tmp_path / "run"
    args = ["pretrain", str(run), "--preset", "tiny-v4", "--data", str(dataset.root), "--seq-len", "64"]
    args += ["--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--eval-every", "-1", "--no-progress"]
    assert main(args + ["--no-doc-mask"]) == 0
    assert "train loss" in capsys.readouterr().out
    assert json.loads((run / "run.json").read_text())["model_config"]["model_type"] == "deepseek_v4"
    assert main(["pretrain", str(run), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3] and "loss/mtp" in read_metrics(run)[-1]

    v4 = ["--preset", "tiny-v4", "--data", dataset.root]
    assert "--no-doc-mask" in cli_error(capsys, tmp_path / "masked", *v4)
    with pytest.raises(TrainError, match="--no-doc-mask"):
        pretrain(
            V4,
            TrainConfig(max_steps=2, seq_len=64, batch_size=2, warmup_steps=1),
            dataset,
            tmp_path / "api",
            progress=False,
        )
    monkeypatch.setenv("WORLD_SIZE", "2")  # past the "needs several processes" check: V4's own refusal
    for flag in ("--fsdp", "--expert-parallel"):
        err = cli_error(capsys, tmp_path / "sharded", *v4, "--no-doc-mask", flag)
        assert f"{flag} is not supported for DeepSeek-V4" in err
    assert not (tmp_path / "masked").exists() and not (tmp_path / "sharded").exists()


# ---- training the CSA indexer (V3.2's KL, on V4's compressed entries) --------------------------------------
def test_indexer_kl_equals_a_hand_computed_value():
    """Two queries over three entries: p is the heads' summed attention on the attended entries, L1-normalized;
    q the index scores' softmax over the same entries; a query attending none is left out of the mean."""
    probs = torch.tensor([[[[0.2, 0.1, 0.3], [0.0, 0.0, 0.0]], [[0.2, 0.1, 0.1], [0.0, 0.0, 0.0]]]])  # (1, 2, 2, 3)
    index = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]], requires_grad=True)
    attended = torch.tensor([[[True, False, True], [False, False, False]]])
    p = torch.tensor([0.4, 0.4]) / 0.8  # heads summed over entries 0 and 2
    q = torch.tensor([1.0, 0.5]).softmax(0)
    want = float((p * (p / q).log()).sum())
    got = indexer_kl(probs, index, attended)
    assert abs(got.detach().item() - want) < 1e-6
    got.backward()
    assert index.grad[0, 0, 1] == 0 and index.grad[0, 1].abs().sum() == 0  # nothing through unattended entries


@pytest.mark.parametrize("dense", [False, True])
def test_the_indexer_kl_trains_the_indexers_alone_and_leaves_the_forward_as_it_was(dense):
    """With indexer_kl on, a training forward gives the same logits and computes each CSA layer's KL; its
    gradient reaches the indexers' parameters only, and the LM loss reaches none of them. The dense stage
    attends every visible entry: the logits of the same weights with an indexer that keeps everything."""
    cfg = V4_CONFIGS["v4_sparse"]
    model = random_model(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    plain = model(x)
    model.set_dsa_stage(dense_attention=dense, indexer_kl=True)
    logits = model(x)
    if dense:
        wide = random_model(cfg.replace(index_topk=64)).train()
        torch.testing.assert_close(logits, wide(x), atol=1e-5, rtol=0)
    else:
        assert torch.equal(logits, plain)
    kl = model.indexer_loss()
    assert len(model.dsa_layers()) == 2 and kl.item() > 0
    indexer = {id(p) for m in model.dsa_layers() for p in m.indexer.parameters()}
    params = list(model.parameters())
    from_kl = torch.autograd.grad(kl, params, retain_graph=True, allow_unused=True)
    from_lm = torch.autograd.grad(logits.logsumexp(-1).sum(), params, allow_unused=True)
    for p, g_kl, g_lm in zip(params, from_kl, from_lm):
        if id(p) in indexer:
            assert g_lm is None or g_lm.abs().sum() == 0
        else:
            assert g_kl is None or g_kl.abs().sum() == 0
    assert any(g is not None and g.abs().sum() > 0 for p, g in zip(params, from_kl) if id(p) in indexer)
