"""GRPO (nanoseek/rl/grpo.py): the loss against hand-computed values for every loss option, advantages,
zero-variance groups, the shared-prompt training forward, the engine following the optimizer, a short
run that learns, resume, and the `nanoseek grpo` command."""

import json
import math

import pytest
import torch

from nanoseek.engine.engine import Engine
from nanoseek.rl.grpo import Batch, GRPOConfig, GRPOError, GRPOTrainer, Rollout, group_advantages, grpo_loss, is_timing_metric, sequence_logprobs, train_grpo
from nanoseek.engine.sampling import SamplingParams
from helpers import SayDigits, Score, TOKENIZER, arithmetic_checkpoint, digit_reward, short_prompt, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


# ---- a fixed batch: 2 completions (one group, A = +1 and -1), 3 token slots, the second has 2 tokens ----
DELTA = [[0.5, -0.5, 0.0], [0.5, -0.5, 0.3]]  # log π_θ - log π_old per token
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -1.0]
REF_MINUS_LOGP = [[0.1, -0.2, 0.0], [0.3, 0.05, 0.7]]  # log π_ref - log π_θ


def hand_loss(loss_type, eps_low=0.2, eps_high=0.2, beta=0.0, L=4):
    """The GRPO objective written out token by token in plain Python."""
    per_seq = []
    for i in range(2):
        terms = []
        for t in range(3):
            if not MASK[i][t]:
                continue
            rho = math.exp(DELTA[i][t])
            a = ADV[i]
            clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
            ell = -min(rho * a, clipped * a)
            d = REF_MINUS_LOGP[i][t]
            ell += beta * (math.exp(d) - d - 1)
            terms.append(ell)
        per_seq.append(terms)
    if loss_type == "grpo":
        return sum(sum(s) / len(s) for s in per_seq) / 2
    if loss_type == "dapo":
        return sum(sum(s) for s in per_seq) / sum(len(s) for s in per_seq)
    return sum(sum(s) for s in per_seq) / (2 * L)  # dr_grpo


def fixed_batch():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    old = logp - torch.tensor(DELTA)
    ref = logp + torch.tensor(REF_MINUS_LOGP)
    return logp, old, ref, torch.tensor(ADV), torch.tensor(MASK, dtype=torch.float32)


# ε = 0.2: ρ = e^0.5 = 1.6487 is clipped to 1.2 for A > 0; ρ = e^-0.5 = 0.6065 is clipped to 0.8 for A < 0.
#   sequence 0 (A=+1): -1.2, -0.60653, -1           sequence 1 (A=-1): +1.64872, +0.8
# grpo = (-2.80653/3 + 2.44872/2)/2,  dapo = (-2.80653 + 2.44872)/5,  dr_grpo = (-0.35781)/(2*4)
HAND = {"grpo": 0.144426, "dapo": -0.071562, "dr_grpo": -0.044726}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_equals_hand_computed_value_with_clipping(loss_type):
    logp, old, ref, adv, mask = fixed_batch()
    out = grpo_loss(logp, old, adv, mask, loss_type=loss_type, epsilon=0.2, max_completion_length=4)
    assert float(out.loss) == pytest.approx(HAND[loss_type], abs=1e-5)
    assert float(out.loss) == pytest.approx(hand_loss(loss_type), abs=1e-6)
    # clipping is active on exactly one token each way
    assert (out.clip_low, out.clip_high, out.n_tokens, out.kl_sum) == (1.0, 1.0, 5.0, 0.0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_with_kl_and_clip_higher_equals_hand_computed(loss_type):
    logp, old, ref, adv, mask = fixed_batch()
    out = grpo_loss(logp, old, adv, mask, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, beta=0.04,
                    ref_logps=ref, max_completion_length=4)
    assert float(out.loss) == pytest.approx(hand_loss(loss_type, 0.2, 0.28, 0.04), abs=1e-6)
    kl = sum(math.exp(d) - d - 1 for row, m in zip(REF_MINUS_LOGP, MASK) for d, k in zip(row, m) if k)
    assert out.kl_sum == pytest.approx(kl, abs=1e-6)
    assert out.kl_sum > 0


def test_loss_needs_reference_when_beta_positive():
    logp, old, ref, adv, mask = fixed_batch()
    with pytest.raises(GRPOError, match="reference"):
        grpo_loss(logp, old, adv, mask, beta=0.1)


def test_on_policy_gradient_is_minus_advantage_over_length():
    """With ρ = 1 (one update per batch), d loss / d log π(o_t) = -A_i / |o_i| / N for grpo."""
    logp, _, _, adv, mask = fixed_batch()
    logp.requires_grad_(True)
    grpo_loss(logp, logp.detach(), adv, mask, loss_type="grpo").loss.backward()
    expected = torch.tensor([[-1 / 3, -1 / 3, -1 / 3], [1 / 2, 1 / 2, 0.0]]) / 2
    torch.testing.assert_close(logp.grad, expected)


def test_micro_batches_sum_to_the_minibatch_loss():
    """Each micro-batch divides by the whole minibatch's counts, so accumulated gradients are exact."""
    logp, old, ref, adv, mask = fixed_batch()
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        whole = grpo_loss(logp, old, adv, mask, loss_type=loss_type, max_completion_length=4).loss
        parts = sum(grpo_loss(logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], loss_type=loss_type,
                              max_completion_length=4, num_sequences=2, num_tokens=5.0).loss for i in range(2))
        assert float(parts) == pytest.approx(float(whole), abs=1e-7)


# ---- advantages ----------------------------------------------------------------------------------------
def test_group_advantages_per_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 1.1]])
    a = group_advantages(r, "group")
    s0 = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    torch.testing.assert_close(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s0 + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))  # all equal: exactly zero, not 1e-9 residues
    s2 = math.sqrt((3 * 0.275**2 + 0.825**2) / 3)
    torch.testing.assert_close(a[2], torch.tensor([-0.275, -0.275, -0.275, 0.825]) / (s2 + 1e-4))
    assert torch.allclose(a.sum(dim=1), torch.zeros(3), atol=1e-6)  # zero mean within each group
    none = group_advantages(r, "none")
    torch.testing.assert_close(none[2], torch.tensor([-0.275, -0.275, -0.275, 0.825]))
    batch = group_advantages(r, "batch")
    torch.testing.assert_close(batch[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (r.std() + 1e-4))
    assert torch.equal(batch[1], torch.zeros(4))


def test_group_advantages_rejects_bad_shapes_and_options():
    with pytest.raises(GRPOError):
        group_advantages(torch.ones(4, 1))
    with pytest.raises(GRPOError):
        group_advantages(torch.ones(2, 4), "median")


# ---- a tiny model, tokenizer and task ----------------------------------------------------------------














def run(cfg, run_dir=None, model=None, **kw):
    return train_grpo(model or tiny_model(), TOKENIZER, SayDigits(), cfg, run_dir, progress=False,
                      reward_fn=digit_reward, prompt_fn=short_prompt, **kw)


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
    batch = Batch.from_rollouts(rs, 3)
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


def test_zero_variance_group_contributes_no_gradient():
    model = tiny_model(std=0.1)
    rs = rollouts_of(model, [[5, 6, 7], [8, 9]], G=4)
    rewards = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.0, 1.1, 0.1, 1.1]])  # group 0 carries no signal
    for r, a in zip(rs, group_advantages(rewards).flatten().tolist()):
        r.advantage = a
    batch = Batch.from_rollouts(rs, 4)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        logps, _ = sequence_logprobs(model, batch)
        logps.retain_grad()
        grpo_loss(logps, logps.detach(), batch.advantages, batch.mask, loss_type=loss_type,
                  max_completion_length=10).loss.backward()
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
    for bad in (dict(loss_type="ppo"), dict(num_generations=1), dict(scale_rewards="max"), dict(temperature=0),
                dict(old_logprobs="engine", temperature=0.7), dict(reward_weights={"style": 1.0}),
                dict(num_minibatches=5, prompts_per_step=4)):
        with pytest.raises(GRPOError):
            GRPOConfig(**bad)
    assert GRPOConfig(loss_type="dr_grpo").reward_scaling == "none"
    assert GRPOConfig(loss_type="grpo").reward_scaling == "group"
    assert GRPOConfig(loss_type="dr_grpo", scale_rewards="batch").reward_scaling == "batch"
    assert GRPOConfig(epsilon=0.2).clip_high == 0.2 and GRPOConfig(epsilon_high=0.28).clip_high == 0.28


def test_engine_decodes_with_the_new_weights_after_each_optimizer_step():
    model = tiny_model(std=0.1)
    cfg = GRPOConfig(num_generations=4, prompts_per_step=2, max_completion_length=8, learning_rate=3e-2,
                     num_iterations=2, num_minibatches=2)
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


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
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
        cfg = GRPOConfig(num_generations=3, prompts_per_step=3, max_completion_length=10, learning_rate=1e-2,
                         loss_type=loss_type, micro_batch_size=micro)
        trainer = GRPOTrainer(model, TOKENIZER, SayDigits(), cfg, reward_fn=digit_reward, prompt_fn=short_prompt)
        trainer.update(Batch.from_rollouts(rs, 3), step=1)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-4)


def test_old_logprobs_from_the_engine_match_a_forward():
    """μ = 2 with π_old taken from the engine's sampling log-probs: the same update as with a no-grad forward."""
    metrics = {}
    for source in ("engine", "forward"):
        cfg = GRPOConfig(num_generations=4, prompts_per_step=2, max_completion_length=6, num_iterations=2,
                         learning_rate=1e-2, old_logprobs=source)
        trainer = GRPOTrainer(tiny_model(std=0.1), TOKENIZER, SayDigits(), cfg, reward_fn=digit_reward,
                              prompt_fn=short_prompt)
        metrics[source] = trainer.train_step()
    assert metrics["engine"]["logprob_gap"] < 1e-4
    for key in ("loss", "clip_ratio/total", "entropy", "grad_norm", "reward/total"):
        assert metrics["engine"][key] == pytest.approx(metrics["forward"][key], rel=1e-3, abs=1e-5), key


@pytest.mark.slow
def test_short_run_raises_the_reward():
    """A random 2-layer MoE learns to write digits: the mean reward (fraction of digit characters,
    about 0.03 at random) must reach at least 0.25 and 5x its start within 15 steps (it reaches ~0.8)."""
    torch.manual_seed(0)
    cfg = GRPOConfig(num_generations=8, prompts_per_step=4, max_completion_length=8, learning_rate=1e-2,
                     max_steps=15, loss_type="dapo")
    res = run(cfg)
    rewards = [h["reward/total"] for h in res.history]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-2:]) / 2
    assert end >= 0.25 and end >= 5 * start, rewards
    assert res.steps == 15 and len(res.history) == 15
    for key in ("reward/accuracy", "reward/format", "completion_length/mean", "kl", "clip_ratio/total", "entropy",
                "throughput/tokens_per_s", "time/rollout_s", "time/reward_s", "time/update_s"):
        assert key in res.final


def test_dynamic_sampling_drops_flat_groups_and_refills():
    cfg = GRPOConfig(num_generations=4, prompts_per_step=3, max_completion_length=6, dynamic_sampling=True,
                     max_resample_rounds=2, max_steps=1)
    calls = []

    def flat_first_round(problems, completions):
        calls.append(len(problems))
        if len(calls) == 1:  # first round: every group flat but the first
            return [Score(float(i == 0), 0.0, 0.0) for i in range(len(problems))]
        return digit_reward(problems, completions)

    trainer = GRPOTrainer(tiny_model(std=0.1), TOKENIZER, SayDigits(), cfg, reward_fn=flat_first_round,
                          prompt_fn=short_prompt)
    sampled, kept, _ = trainer.collect(1)
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
    cfg = dict(num_generations=4, prompts_per_step=3, max_completion_length=6, learning_rate=1e-2, beta=0.04,
               ref_model_sync_steps=2, num_iterations=2, num_minibatches=2, dynamic_sampling=True,
               max_resample_rounds=1, save_steps=2)
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
    from nanoseek import from_pretrained
    from nanoseek.train.state import latest_checkpoint

    final = from_pretrained(tmp_path / "b" / "final")  # the trained policy, as a plain HF directory
    torch.testing.assert_close(final.lm_head.weight, from_pretrained(latest_checkpoint(tmp_path / "b")).lm_head.weight)


# ---- the command ---------------------------------------------------------------------------------------


def test_grpo_cli_on_arithmetic(tmp_path, capsys):
    from nanoseek.cli import main

    arithmetic_checkpoint(tmp_path / "base")
    base = ["grpo", "--model", str(tmp_path / "base"), "--task", "arithmetic", "--out", str(tmp_path / "run"),
            "--num-generations", "2", "--prompts-per-step", "2", "--max-completion-length", "4",
            "--loss-type", "dr_grpo", "--reward-weights", "accuracy=1,format=0.5", "--no-progress"]
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
    pytest.importorskip("trl")
    from nanoseek.cli import main

    arithmetic_checkpoint(tmp_path)
    assert main(["bench", "grpo", "--model", str(tmp_path), "--prompts", "2", "--num-generations", "2", "--length", "4", "--rounds", "1",
                 "--steps", "1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = {line.split(":")[0]: line for line in lines if line.startswith(("nanoseek:", "TRL:"))}
    assert "mean completion length 4.0" in summary["nanoseek"] and "mean completion length 4.0" in summary["TRL"]
    assert "faster per GRPO step than TRL" in lines[-1]
