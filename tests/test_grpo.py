"""GRPO (nanoseek/rl/grpo.py, trainer.py, rollout.py): zero-variance groups, the shared-prompt training forward,
the engine following the optimizer, micro-batching, a short run that learns, resume, and the `nanoseek grpo`
command. The loss and advantages against hand-computed values: test_grpo_loss.py."""

import dataclasses
import json

import pytest
import torch
from test_v4 import CONFIGS as V4_CONFIGS

from nanoseek.checkpoint.hf import from_pretrained
from nanoseek.cli import main
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.transformer import Transformer
from nanoseek.rl.config import GRPOConfig, GRPOError
from nanoseek.rl.grpo import train_grpo
from nanoseek.rl.loss import group_advantages, grpo_loss, sequence_logprobs
from nanoseek.rl.rollout import Rollout, RolloutBatch, is_timing_metric
from nanoseek.rl.trainer import GRPOTrainer
from nanoseek.train.state import latest_checkpoint

from helpers import (
    TOKENIZER,
    SayDigits,
    Score,
    arithmetic_checkpoint,
    assert_policy_logprobs_match,
    digit_reward,
    random_model,
    short_prompt,
    tiny_config,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


# ---- a tiny model, tokenizer and task ----------------------------------------------------------------


def run(cfg, run_dir=None, model=None, **kw):
    return train_grpo(
        model or tiny_model(),
        TOKENIZER,
        SayDigits(),
        cfg,
        run_dir,
        progress=False,
        reward_fn=digit_reward,
        prompt_fn=short_prompt,
        **kw,
    )


def rollouts_of(model, prompts, G, max_tokens=10, seed=3):
    outs = Engine(model).generate(prompts, SamplingParams(n=G, max_tokens=max_tokens, logprobs=True, seed=seed))
    rs = []
    for g, (p, o) in enumerate(zip(prompts, outs)):
        for c in o.outputs:
            rs.append(Rollout(None, g, p, list(c.token_ids), "", c.finish_reason, c.logprobs))
    return rs


# ---- the training forward ------------------------------------------------------------------------------
def test_shared_prompt_forward_equals_full_forward_and_engine_logprobs():
    model = tiny_model(std=0.1).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
    rs = rollouts_of(model, prompts, G=3)
    for i, r in enumerate(rs):  # ragged completions
        cut = 10 - (i % 4) * 2
        r.completion_ids, r.sample_logprobs = r.completion_ids[:cut], r.sample_logprobs[:cut]
    batch = RolloutBatch.from_rollouts(rs, 3)
    logps, entropy = sequence_logprobs(model, batch, with_entropy=True)
    for i, r in enumerate(rs):
        full = model(torch.tensor([r.prompt_ids + r.completion_ids])).log_softmax(-1)[0]
        tp = len(r.prompt_ids)
        want = torch.stack([full[tp + t - 1, tok] for t, tok in enumerate(r.completion_ids)])
        torch.testing.assert_close(logps[i, : len(want)], want, atol=1e-5, rtol=0)
        ent = -(full.exp() * full).sum(-1)[tp - 1 : tp - 1 + len(want)]
        torch.testing.assert_close(entropy[i, : len(want)], ent, atol=1e-4, rtol=0)
    # the engine's temperature-1 log-probs (absorbed decode over the paged cache) agree with it
    real = batch.token_mask
    assert float((logps.detach() - batch.sample_logps)[real].abs().max()) < 1e-4
    # a temperature divides the logits
    r = rs[0]
    with torch.no_grad():
        hot, _ = sequence_logprobs(model, batch, temperature=0.5)
        full = (model(torch.tensor([r.prompt_ids + r.completion_ids])) / 0.5).log_softmax(-1)[0]
    assert float(hot[0, 0]) == pytest.approx(float(full[len(r.prompt_ids) - 1, r.completion_ids[0]]), abs=1e-5)


def test_v4_policy_forward_equals_full_forward_and_engine_logprobs():
    """DeepSeek-V4 runs each row's whole prompt + completion (its compressed branches pool fixed windows of
    positions, so no shared prompt prefix): the same log-probs as a forward of each sequence alone, and as the
    engine's, which decoded it over the V4 caches. Prompts and completions long enough to cross the window (6)
    and several compression windows (4 and 8)."""
    model = random_model(V4_CONFIGS["v4_sparse"].replace(vocab_size=TOKENIZER.vocab_size)).eval()
    prompts = [list(range(5, 14)), [10, 11, 12], list(range(13, 30))]
    rs = rollouts_of(model, prompts, G=2, max_tokens=20)
    for i, r in enumerate(rs):  # ragged completions
        cut = 20 - (i % 3) * 5
        r.completion_ids, r.sample_logprobs = r.completion_ids[:cut], r.sample_logprobs[:cut]
    assert_policy_logprobs_match(model, rs, 2)


def test_zero_variance_group_contributes_no_gradient():
    model = tiny_model(std=0.1)
    rs = rollouts_of(model, [[5, 6, 7], [8, 9]], G=4)
    rewards = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.0, 1.1, 0.1, 1.1]])  # group 0 carries no signal
    for r, a in zip(rs, group_advantages(rewards).flatten().tolist()):
        r.advantage = a
    batch = RolloutBatch.from_rollouts(rs, 4)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        logps, _ = sequence_logprobs(model, batch)
        logps.retain_grad()
        grpo_loss(
            logps, logps.detach(), batch.advantages, batch.mask, loss_type=loss_type, max_completion_length=10
        ).loss.backward()
        assert torch.equal(logps.grad[:4], torch.zeros_like(logps.grad[:4]))
        assert logps.grad[4:].abs().sum() > 0
    # a batch of only zero-variance groups moves no weight at all
    model.zero_grad()
    only = batch.select([0])
    logps, _ = sequence_logprobs(model, only)
    grpo_loss(logps, logps.detach(), only.advantages, only.mask).loss.backward()
    assert all(p.grad is None or torch.equal(p.grad, torch.zeros_like(p.grad)) for p in model.parameters())


# ---- the trainer --------------------------------------------------------------------------------------
def test_beta_zero_loads_no_reference_model():
    cfg = GRPOConfig(num_generations=2, prompts_per_step=2, max_completion_length=4, beta=0.0)
    trainer = GRPOTrainer(tiny_model(), TOKENIZER, SayDigits(), cfg, reward_fn=digit_reward, prompt_fn=short_prompt)
    assert trainer.ref_model is None
    cfg = GRPOConfig(num_generations=2, prompts_per_step=2, max_completion_length=4, beta=0.04)
    model = tiny_model()
    trainer = GRPOTrainer(model, TOKENIZER, SayDigits(), cfg, reward_fn=digit_reward, prompt_fn=short_prompt)
    assert trainer.ref_model is not None and trainer.ref_model is not model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), trainer.ref_model.parameters()))


def test_config_rejects_bad_values():
    for bad in (
        dict(loss_type="ppo"),
        dict(num_generations=1),
        dict(scale_rewards="max"),
        dict(temperature=0),
        dict(old_logprobs="engine", temperature=0.7),
        dict(reward_weights={"style": 1.0}),
        dict(num_minibatches=5, prompts_per_step=4),
    ):
        with pytest.raises(GRPOError):
            GRPOConfig(**bad)
    assert GRPOConfig(loss_type="dr_grpo").reward_scaling == "none"
    assert GRPOConfig(loss_type="grpo").reward_scaling == "group"
    assert GRPOConfig(loss_type="dr_grpo", scale_rewards="batch").reward_scaling == "batch"
    assert GRPOConfig(epsilon=0.2).clip_high == 0.2 and GRPOConfig(epsilon_high=0.28).clip_high == 0.28


def test_engine_decodes_with_the_new_weights_after_each_optimizer_step():
    model = tiny_model(std=0.1)
    cfg = GRPOConfig(
        num_generations=4,
        prompts_per_step=2,
        max_completion_length=8,
        learning_rate=3e-2,
        num_iterations=2,
        num_minibatches=2,
    )
    trainer = GRPOTrainer(model, TOKENIZER, SayDigits(), cfg, reward_fn=digit_reward, prompt_fn=short_prompt)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompt = TOKENIZER.encode("say 12345")
    before = trainer.engine.generate([prompt], greedy)[0].outputs[0].token_ids
    w0 = model.lm_head.weight.detach().clone()
    trainer.train_step()  # four optimizer steps
    assert not torch.equal(model.lm_head.weight, w0)
    after = trainer.engine.generate([prompt], greedy)[0].outputs[0].token_ids
    fresh = Engine(model).generate([prompt], greedy)[0].outputs[0].token_ids
    assert after == fresh  # the long-lived engine sees exactly the updated weights
    assert after != before


def test_prefix_cache_never_serves_latents_of_old_weights():
    """Prompts longer than a cache block share a prefix across steps: after each optimizer step (fused AdamW,
    which leaves parameters' version counters alone) the engine must recompute it, or its sampling
    log-probs drift from the policy's (measured 0.75 nats per token before the trainer reset the cache)."""
    prefix = "Answer with digits only, nothing else. " * 3
    cfg = GRPOConfig(num_generations=4, prompts_per_step=2, max_completion_length=6, learning_rate=3e-2)
    trainer = GRPOTrainer(
        tiny_model(std=0.1),
        TOKENIZER,
        SayDigits(),
        cfg,
        reward_fn=digit_reward,
        prompt_fn=lambda p: prefix + short_prompt(p),
    )
    assert len(TOKENIZER.encode(prefix)) > 2 * trainer.engine.cache.block_size
    for _ in range(3):
        assert trainer.train_step()["logprob_gap"] < 1e-5


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_micro_batching_does_not_change_the_update(loss_type):
    """One group per forward (sorted by length, padding trimmed each time) accumulates the gradient of one
    forward over the whole batch (compared before Adam, which amplifies 1e-9 differences of tiny gradients)."""
    rs = rollouts_of(tiny_model(std=0.1), [[5, 6, 7], [8, 9], [10, 11, 12, 13]], G=3, max_tokens=10)
    for i, r in enumerate(rs):  # ragged lengths so that the groups pad differently
        r.completion_ids = r.completion_ids[: 3 + (i * 7) % 8]
        r.sample_logprobs = r.sample_logprobs[: len(r.completion_ids)]
        r.advantage = ((i * 5) % 7 - 3) / 3
    grads = []
    for micro in (3, 64):
        model = tiny_model(std=0.1)
        cfg = GRPOConfig(
            num_generations=3,
            prompts_per_step=3,
            max_completion_length=10,
            learning_rate=1e-2,
            loss_type=loss_type,
            micro_batch_size=micro,
        )
        trainer = GRPOTrainer(model, TOKENIZER, SayDigits(), cfg, reward_fn=digit_reward, prompt_fn=short_prompt)
        trainer.update(RolloutBatch.from_rollouts(rs, 3), step=1)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-4)


def test_old_logprobs_from_the_engine_match_a_forward():
    """μ = 2 with π_old taken from the engine's sampling log-probs: the same update as with a no-grad forward."""
    metrics = {}
    for source in ("engine", "forward"):
        cfg = GRPOConfig(
            num_generations=4,
            prompts_per_step=2,
            max_completion_length=6,
            num_iterations=2,
            learning_rate=1e-2,
            old_logprobs=source,
        )
        trainer = GRPOTrainer(
            tiny_model(std=0.1), TOKENIZER, SayDigits(), cfg, reward_fn=digit_reward, prompt_fn=short_prompt
        )
        metrics[source] = trainer.train_step()
    assert metrics["engine"]["logprob_gap"] < 1e-4
    for key in ("loss", "clip_ratio/total", "entropy", "grad_norm", "reward/total"):
        assert metrics["engine"][key] == pytest.approx(metrics["forward"][key], rel=1e-3, abs=1e-5), key


def test_gspo_clip_ratio_counts_sequences():
    """GSPO with μ = 2 (the second pass is off-policy): whole sequences are clipped at the paper's 3e-4 / 4e-4,
    and clip_ratio is a share of the 2 x 8 sequence ratios, not of tokens."""
    cfg = GRPOConfig(
        num_generations=4,
        prompts_per_step=2,
        max_completion_length=6,
        num_iterations=2,
        learning_rate=1e-2,
        loss_type="gspo",
    )
    trainer = GRPOTrainer(
        tiny_model(std=0.1), TOKENIZER, SayDigits(), cfg, reward_fn=digit_reward, prompt_fn=short_prompt
    )
    m = trainer.train_step()
    clipped = m["clip_ratio/total"] * 16
    assert 0 < clipped <= 8  # only second-pass ratios move, and only sequences with A != 0 count
    assert clipped == pytest.approx(round(clipped), abs=1e-9)


@pytest.mark.slow
def test_short_run_raises_the_reward_of_a_v4_policy():
    """GRPO on a random DeepSeek-V4 (rollouts decoded over its caches, its own training forward): the reward
    rises as it does for V3's model."""
    cfg = GRPOConfig(
        num_generations=8,
        prompts_per_step=4,
        max_completion_length=8,
        learning_rate=1e-2,
        max_steps=12,
        loss_type="dapo",
    )
    model = random_model(V4_CONFIGS["v4_sparse"].replace(vocab_size=TOKENIZER.vocab_size))
    rewards = [h["reward/total"] for h in run(cfg, model=model).history]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-2:]) / 2
    assert end >= 0.25 and end >= 3 * start, rewards


def test_short_run_raises_the_reward():
    """A random 2-layer MoE learns to write digits: the mean reward (fraction of digit characters,
    about 0.03 at random) must reach at least 0.25 and 5x its start within 15 steps (it reaches ~0.8)."""
    torch.manual_seed(0)
    cfg = GRPOConfig(
        num_generations=8,
        prompts_per_step=4,
        max_completion_length=8,
        learning_rate=1e-2,
        max_steps=15,
        loss_type="dapo",
    )
    res = run(cfg)
    rewards = [h["reward/total"] for h in res.history]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-2:]) / 2
    assert end >= 0.25 and end >= 5 * start, rewards
    assert res.steps == 15 and len(res.history) == 15
    # the routing's balance in each update: max/mean tokens per expert, averaged over the MoE layers, and the worst
    assert all(1.0 <= h["expert_load/mean"] <= h["expert_load/max"] <= 8 for h in res.history)
    torch.manual_seed(0)
    with_mtp = Transformer(tiny_config(num_nextn_predict_layers=1))  # its MTP module's MoE routes nothing in GRPO
    mtp = run(dataclasses.replace(cfg, max_steps=2), model=with_mtp).history
    assert all(1.0 <= h["expert_load/mean"] for h in mtp)
    for key in (
        "reward/accuracy",
        "reward/format",
        "completion_length/mean",
        "kl",
        "clip_ratio/total",
        "entropy",
        "throughput/tokens_per_s",
        "time/rollout_s",
        "time/reward_s",
        "time/update_s",
    ):
        assert key in res.final


def test_dynamic_sampling_drops_flat_groups_and_refills():
    cfg = GRPOConfig(
        num_generations=4,
        prompts_per_step=3,
        max_completion_length=6,
        dynamic_sampling=True,
        max_resample_rounds=2,
        max_steps=1,
    )
    calls = []

    def flat_first_round(problems, completions):
        calls.append(len(problems))
        if len(calls) == 1:  # first round: every group flat but the first
            return [Score(float(i == 0), 0.0, 0.0) for i in range(len(problems))]
        return digit_reward(problems, completions)

    trainer = GRPOTrainer(
        tiny_model(std=0.1), TOKENIZER, SayDigits(), cfg, reward_fn=flat_first_round, prompt_fn=short_prompt
    )
    step = trainer.collect(1)
    sampled, kept = step.sampled, step.kept
    assert calls[0] == 12 and calls[1] == 8  # the second round samples only the two missing prompts
    assert len(kept) % 4 == 0 and len(kept) // 4 <= 3
    groups = [kept[i : i + 4] for i in range(0, len(kept), 4)]
    assert all(len({r.reward for r in g}) > 1 for g in groups)
    assert kept[0] is sampled[0]
    assert [r.group for r in sampled] == [i // 4 for i in range(len(sampled))]  # numbered across rounds


def strip_timing(history):
    return [{k: v for k, v in h.items() if not is_timing_metric(k)} for h in history]


@pytest.mark.slow
def test_resume_repeats_the_same_steps(tmp_path):
    """Interrupted at step 2 and resumed, a run logs the same metrics as an uninterrupted one, with β > 0,
    a reference synced every 2 steps (saved with the checkpoint), μ = 2 and dynamic sampling."""
    cfg = dict(
        num_generations=4,
        prompts_per_step=3,
        max_completion_length=6,
        learning_rate=1e-2,
        beta=0.04,
        ref_model_sync_steps=2,
        num_iterations=2,
        num_minibatches=2,
        dynamic_sampling=True,
        max_resample_rounds=1,
        save_steps=2,
    )
    straight = run(GRPOConfig(**cfg, max_steps=4), tmp_path / "a")
    first = run(GRPOConfig(**cfg, max_steps=2), tmp_path / "b")
    resumed = run(GRPOConfig(**cfg, max_steps=4), tmp_path / "b", resume=True)
    assert [h["step"] for h in resumed.history] == [3, 4]
    a, b = strip_timing(straight.history), strip_timing(first.history + resumed.history)
    assert a == b
    assert any(h["kl"] > 0 for h in a)
    assert (tmp_path / "b" / "reference").is_dir()  # the synced reference travels with the checkpoints
    logged = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    with pytest.raises(GRPOError, match="already holds a run"):
        run(GRPOConfig(**cfg, max_steps=4), tmp_path / "b")
    with pytest.raises(GRPOError, match="learning_rate"):
        run(GRPOConfig(**{**cfg, "learning_rate": 1e-3}, max_steps=6), tmp_path / "b", resume=True)
    final = from_pretrained(tmp_path / "b" / "final")  # the trained policy, as a plain HF directory
    torch.testing.assert_close(final.lm_head.weight, from_pretrained(latest_checkpoint(tmp_path / "b")).lm_head.weight)


# ---- the command ---------------------------------------------------------------------------------------


def test_grpo_cli_on_arithmetic(tmp_path, capsys):
    arithmetic_checkpoint(tmp_path / "base")
    base = [
        "grpo",
        "--model",
        str(tmp_path / "base"),
        "--task",
        "arithmetic",
        "--out",
        str(tmp_path / "run"),
        "--num-generations",
        "2",
        "--prompts-per-step",
        "2",
        "--max-completion-length",
        "4",
        "--loss-type",
        "dr_grpo",
        "--reward-weights",
        "accuracy=1,format=0.5",
        "--no-progress",
    ]
    assert main(base + ["--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "step 2" in out and (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert (tmp_path / "run" / "plots" / "reward.png").exists()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(base + ["--max-steps", "3"]) == 2  # the run exists: refused without --resume
    assert "already holds a run" in capsys.readouterr().err
    assert main(base + ["--max-steps", "3", "--resume", "--no-plot"]) == 0
    assert "step 3" in capsys.readouterr().out
    assert main(base[:7] + ["--loss-type", "ppo"]) == 2


@pytest.mark.slow
def test_bench_grpo_runs_both_trainers_on_equal_work(tmp_path, capsys):
    """The benchmark's plumbing (not its timing): both sides run, completions are forced to equal length."""
    import trl  # noqa: F401  (a dev dependency: missing is an error here, not a skip)

    arithmetic_checkpoint(tmp_path)
    assert (
        main(
            [
                "bench",
                "grpo",
                "--model",
                str(tmp_path),
                "--prompts",
                "2",
                "--num-generations",
                "2",
                "--length",
                "4",
                "--rounds",
                "1",
                "--steps",
                "1",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    summary = {line.split(":")[0]: line for line in lines if line.startswith(("nanoseek:", "TRL:"))}
    assert "mean completion length 4.0" in summary["nanoseek"] and "mean completion length 4.0" in summary["TRL"]
    assert "faster per GRPO step than TRL" in lines[-1]
