"""GRPO's objective (nanoseek/rl/loss.py): the loss against hand-computed values for every loss option, the
KL and clip-higher terms, the on-policy gradient, micro-batch accumulation, and group advantages; GSPO's
sequence ratio against hand-computed values and against TRL's own loss code."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from nanoseek.rl.config import GRPOConfig, GRPOError
from nanoseek.rl.loss import group_advantages, grpo_loss

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
    out = grpo_loss(
        logp,
        old,
        adv,
        mask,
        loss_type=loss_type,
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.04,
        ref_logps=ref,
        max_completion_length=4,
    )
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
        parts = sum(
            grpo_loss(
                logp[i : i + 1],
                old[i : i + 1],
                adv[i : i + 1],
                mask[i : i + 1],
                loss_type=loss_type,
                max_completion_length=4,
                num_sequences=2,
                num_tokens=5.0,
            ).loss
            for i in range(2)
        )
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


# ---- GSPO: one length-normalized ratio per sequence, clipped per sequence ---------------------------------
GSPO_DELTA = [[1e-3, -2e-3, 4e-3], [-1e-4, -3e-4, 0.3]]  # the padded slot's 0.3 must not count
EPS_LOW, EPS_HIGH = 3e-4, 4e-4  # the GSPO paper's clip range (§5.1), GRPOConfig's default for gspo


def gspo_batch():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]], dtype=torch.float64)
    old = logp - torch.tensor(GSPO_DELTA, dtype=torch.float64)
    ref = logp + torch.tensor(REF_MINUS_LOGP, dtype=torch.float64)
    return logp, old, ref, torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64)


def hand_gspo(beta=0.0):
    """GSPO (Zheng et al. 2025) by hand: s_i = exp(mean_t log(π_θ/π_old)), ℓ_i = -min(s_i A_i, clip(s_i) A_i)
    plus β times sequence i's mean k3 KL, averaged over sequences."""
    total = 0.0
    for i in range(2):
        deltas = [d for d, m in zip(GSPO_DELTA[i], MASK[i]) if m]
        s = math.exp(sum(deltas) / len(deltas))
        ell = -min(s * ADV[i], min(max(s, 1 - EPS_LOW), 1 + EPS_HIGH) * ADV[i])
        kls = [math.exp(d) - d - 1 for d, m in zip(REF_MINUS_LOGP[i], MASK[i]) if m]
        total += ell + beta * sum(kls) / len(kls)
    return total / 2


# s_0 = e^(1e-3) = 1.0010005 > 1 + 4e-4 with A = +1: clipped, ℓ_0 = -1.0004 (no gradient).
# s_1 = e^(-2e-4) = 0.99980002, inside [1 - 3e-4, 1 + 4e-4]: ℓ_1 = +0.99980002.   loss = (ℓ_0 + ℓ_1) / 2
HAND_GSPO = (-1.0004 + math.exp(-2e-4)) / 2


def test_gspo_loss_equals_hand_computed_value_and_counts_clipped_sequences():
    logp, old, ref, adv, mask = gspo_batch()
    logp.requires_grad_(True)
    out = grpo_loss(logp, old, adv, mask, loss_type="gspo", epsilon=EPS_LOW, epsilon_high=EPS_HIGH)
    assert float(out.loss.detach()) == pytest.approx(HAND_GSPO, abs=1e-12)
    assert float(out.loss.detach()) == pytest.approx(hand_gspo(), abs=1e-12)
    # one ratio per sequence: sequence 0 is clipped above, out of 2 sequences (not out of 5 tokens)
    assert (out.clip_low, out.clip_high, out.n_ratios, out.n_tokens) == (0.0, 1.0, 2.0, 5.0)
    out.loss.backward()
    # GSPO-token: every token of sequence 1 gets -A·s_1/|y_1|/N; the clipped sequence 0 gets none
    s1 = math.exp(-2e-4)
    expected = torch.tensor([[0.0, 0.0, 0.0], [s1 / 4, s1 / 4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, atol=1e-12, rtol=0)


def test_gspo_loss_with_kl_equals_hand_computed():
    logp, old, ref, adv, mask = gspo_batch()
    out = grpo_loss(
        logp, old, adv, mask, loss_type="gspo", epsilon=EPS_LOW, epsilon_high=EPS_HIGH, beta=0.04, ref_logps=ref
    )
    assert float(out.loss) == pytest.approx(hand_gspo(beta=0.04), abs=1e-12)


def test_gspo_on_policy_gradient_equals_grpo():
    """With one update per batch s_i = 1 and GSPO's gradient is GRPO's: -A_i/|o_i|/N on every token."""
    logp, _, _, adv, mask = gspo_batch()
    grads = []
    for loss_type in ("gspo", "grpo"):
        x = logp.clone().requires_grad_(True)
        grpo_loss(x, x.detach(), adv, mask, loss_type=loss_type).loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-15, rtol=0)


def test_gspo_micro_batches_sum_to_the_minibatch_loss():
    logp, old, _, adv, mask = gspo_batch()
    kw = dict(loss_type="gspo", epsilon=EPS_LOW, epsilon_high=EPS_HIGH)
    whole = grpo_loss(logp, old, adv, mask, **kw).loss
    parts = sum(
        grpo_loss(logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], num_sequences=2, **kw).loss
        for i in range(2)
    )
    assert float(parts) == pytest.approx(float(whole), abs=1e-15)


def test_gspo_config_defaults_to_the_papers_clip_range():
    cfg = GRPOConfig(loss_type="gspo")
    assert (cfg.epsilon, cfg.clip_high) == (3e-4, 4e-4)
    assert GRPOConfig(loss_type="gspo", epsilon=1e-3).clip_high == 1e-3  # an explicit ε applies to both sides
    assert (GRPOConfig().epsilon, GRPOConfig().clip_high) == (0.2, 0.2)  # token-level losses keep PPO's
    assert GRPOConfig(**cfg.to_dict()) == cfg  # stored resolved: a checkpoint's config compares equal


def test_gspo_equals_trls_sequence_level_importance_sampling():
    """TRL's own GRPOTrainer._compute_loss with importance_sampling_level="sequence" and loss_type="grpo" (TRL's
    recipe for GSPO) on the same log-probs: the same loss and the same gradient, clipping active on both sides."""
    from trl.trainer.grpo_trainer import GRPOTrainer as TRLTrainer

    gen = torch.Generator().manual_seed(0)
    n, t = 6, 5
    logp = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 3
    old = logp - torch.randn(n, t, generator=gen, dtype=torch.float64) * 6e-4
    ref = logp + torch.randn(n, t, generator=gen, dtype=torch.float64) * 0.1
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0], dtype=torch.float64)
    mask = (torch.arange(t)[None] < torch.tensor([5, 3, 4, 5, 1, 2])[:, None]).to(torch.float64)

    x = logp.clone().requires_grad_(True)
    ours = grpo_loss(
        x, old, adv, mask, loss_type="gspo", epsilon=EPS_LOW, epsilon_high=EPS_HIGH, beta=0.04, ref_logps=ref
    )
    ours.loss.backward()
    assert ours.clip_low > 0 and ours.clip_high > 0 and ours.clip_low + ours.clip_high < n

    y = logp.clone().requires_grad_(True)
    theirs = TRLTrainer._compute_loss(trl_stub(y, EPS_LOW, EPS_HIGH, beta=0.04), None, trl_inputs(old, ref, adv, mask))
    theirs.backward()
    assert float(ours.loss.detach()) == pytest.approx(float(theirs.detach()), abs=1e-12)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-12, rtol=0)


class OneProcess:
    """The accelerator TRL's loss reads, for a single process."""

    num_processes = 1
    sync_gradients = True

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x


def trl_stub(logps, eps_low, eps_high, beta):
    """The state TRL's GRPOTrainer._compute_loss reads (no vLLM, no entropy bonus, no masks), with the policy's
    log-probs given instead of computed by a model."""
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="sequence",
        loss_type="grpo",
        beta=beta,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        accelerator=OneProcess(),
        _metrics=defaultdict(lambda: defaultdict(list)),
    )


def trl_inputs(old, ref, adv, mask):
    n, t = mask.shape
    return {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
