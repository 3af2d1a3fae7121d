"""GRPO's objective (nanoseek/rl/loss.py): the loss against hand-computed values for every loss option, the
KL and clip-higher terms, the on-policy gradient, micro-batch accumulation, and group advantages."""

import math

import pytest
import torch

from nanoseek.rl.config import GRPOError
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
