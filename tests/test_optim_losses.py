"""The policy loss against hand-computed values, and GRPO advantages."""

from __future__ import annotations

import math

import pytest
import torch
from envtune.optim.advantages import group_advantages
from envtune.optim.config import AdvantageConfig, LossConfig, WeightLevel, WeightMode
from envtune.optim.losses import k3_kl, policy_loss

NO_EXTRAS = LossConfig(kl_coef=0.0, entropy_coef=0.0)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool)


def test_hand_computed_clip_and_truncation() -> None:
    # token 0: A=1, ratio 1.5 -> clipped to 1.28, behaviour weight 1.2  -> -1.28 * 1.2 = -1.536
    # token 1: A=-1, ratio 0.5 -> clipped to 0.8,  weight 3 truncated to 2 ->  0.8 * 2  =  1.6
    # token 2: A=2, ratio 1, weight 1                                      -> -2
    prox = t(-1.0, -2.0, -0.5)
    logp = prox + t(math.log(1.5), math.log(0.5), 0.0)
    behav = prox - t(math.log(1.2), math.log(3.0), 0.0)
    loss, stats = policy_loss(logp, prox, behav, t(1.0, -1.0, 2.0), ones(3), num_tokens=3, config=NO_EXTRAS)
    assert loss.item() == pytest.approx((-1.536 + 1.6 - 2.0) / 3, abs=1e-9)
    assert stats.num_tokens == 3
    assert stats.clipped == 2
    assert stats.weight_truncated == 1
    assert stats.weight_masked == 0
    assert stats.weight_max == pytest.approx(3.0)
    assert stats.weight_min == pytest.approx(1.0)
    assert stats.weight_sum == pytest.approx(1.2 + 2.0 + 1.0)
    # k3 of KL(behaviour || proximal) with r = prox/behav: r - 1 - log r
    expected_kl = sum(r - 1 - math.log(r) for r in (1.2, 3.0, 1.0))
    assert stats.behavior_kl_sum == pytest.approx(expected_kl)


def test_gradient_is_zero_where_clipped() -> None:
    prox = t(-1.0, -1.0)
    logp = (prox + t(math.log(1.5), math.log(1.1))).requires_grad_()
    loss, _ = policy_loss(logp, prox, prox, t(1.0, 1.0), ones(2), num_tokens=2, config=NO_EXTRAS)
    loss.backward()
    # clipped token: no gradient; unclipped: d/dlogp(-A r / 2) = -r / 2
    assert logp.grad[0].item() == 0.0
    assert logp.grad[1].item() == pytest.approx(-1.1 / 2)


def test_truncation_caps_the_weight() -> None:
    prox = t(-1.0)
    for w in (0.5, 2.0, 7.0, 1e6):
        behav = prox - math.log(w)
        cfg = LossConfig(kl_coef=0.0, entropy_coef=0.0, behavior_weight_cap=2.0)
        loss, stats = policy_loss(prox.clone(), prox, behav, t(-1.0), ones(1), num_tokens=1, config=cfg)
        assert loss.item() == pytest.approx(min(w, 2.0))
        assert stats.weight_truncated == int(w > 2.0)


def test_mask_mode_zeroes_out_of_range_tokens() -> None:
    prox = t(-1.0, -1.0, -1.0)
    behav = prox - t(math.log(3.0), math.log(0.1), math.log(1.5))
    cfg = LossConfig(
        kl_coef=0.0, entropy_coef=0.0, behavior_weight_mode=WeightMode.MASK,
        behavior_weight_cap=2.0, behavior_weight_floor=0.5,
    )
    loss, stats = policy_loss(prox.clone(), prox, behav, t(1.0, 1.0, 1.0), ones(3), num_tokens=3, config=cfg)
    assert stats.weight_masked == 2
    assert loss.item() == pytest.approx(-1.5 / 3)


def test_sequence_level_weight_is_geometric_mean() -> None:
    prox = t(-1.0, -1.0, -1.0)
    behav = prox - t(math.log(2.0), math.log(8.0), 0.0)
    seq = torch.tensor([0, 0, 1])
    cfg = LossConfig(
        kl_coef=0.0, entropy_coef=0.0, behavior_weight_level=WeightLevel.SEQUENCE, behavior_weight_cap=5.0
    )
    loss, stats = policy_loss(
        prox.clone(), prox, behav, t(-1.0, -1.0, -1.0), ones(3), num_tokens=3, config=cfg, sequence_index=seq
    )
    # sequence 0: sqrt(2 * 8) = 4 for both tokens; sequence 1: 1
    assert loss.item() == pytest.approx((4 + 4 + 1) / 3)
    assert stats.weight_max == pytest.approx(4.0)
    with pytest.raises(ValueError, match="sequence_index"):
        policy_loss(prox, prox, behav, t(1, 1, 1), ones(3), num_tokens=3, config=cfg)


def test_dual_clip_bounds_negative_advantages() -> None:
    prox = t(-3.0)
    logp = prox + math.log(20.0)
    loss, stats = policy_loss(logp, prox, prox, t(-1.0), ones(1), num_tokens=1, config=NO_EXTRAS)
    assert loss.item() == pytest.approx(10.0)
    assert stats.dual_clipped == 1
    no_dual = LossConfig(kl_coef=0.0, entropy_coef=0.0, dual_clip=None)
    loss, stats = policy_loss(logp, prox, prox, t(-1.0), ones(1), num_tokens=1, config=no_dual)
    assert loss.item() == pytest.approx(20.0)
    assert stats.dual_clipped == 0


def test_kl_and_entropy_terms() -> None:
    logp = t(math.log(0.5), math.log(0.5))
    ref = t(math.log(0.25), math.log(0.5))
    k3 = 0.5 + math.log(2.0) - 1.0
    assert k3_kl(logp, ref).tolist() == pytest.approx([k3, 0.0])
    cfg = LossConfig(kl_coef=0.1, entropy_coef=0.01)
    loss, stats = policy_loss(
        logp, logp, logp, t(0.0, 0.0), ones(2),
        num_tokens=2, config=cfg, entropy=t(1.0, 3.0), ref_logprobs=ref,
    )
    assert loss.item() == pytest.approx((0.1 * k3 - 0.01 * 4.0) / 2)
    assert stats.kl_ref_sum == pytest.approx(k3)
    assert stats.entropy_sum == pytest.approx(4.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_policy_reduces_to_plain_clipped_ppo(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 64
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) > 0.3
    cfg = LossConfig(kl_coef=0.0, entropy_coef=0.0, dual_clip=None)
    loss, _ = policy_loss(logp, old, old, adv, mask, num_tokens=int(mask.sum()), config=cfg)
    (grad,) = torch.autograd.grad(loss, logp)

    ratio = torch.exp(logp - old)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.28) * adv)
    reference = -(surrogate[mask]).mean()
    (ref_grad,) = torch.autograd.grad(reference, logp)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-12)


def test_global_token_normalisation_sums_over_microbatches() -> None:
    g = torch.Generator().manual_seed(3)
    n = 40
    prox = -torch.rand(n, generator=g, dtype=torch.float64)
    logp = prox + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    behav = prox + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) > 0.5
    total = int(mask.sum())
    whole, whole_stats = policy_loss(logp, prox, behav, adv, mask, num_tokens=total)
    parts = [slice(0, 7), slice(7, 30), slice(30, n)]
    losses = [policy_loss(logp[s], prox[s], behav[s], adv[s], mask[s], num_tokens=total) for s in parts]
    assert sum(loss.item() for loss, _ in losses) == pytest.approx(whole.item(), abs=1e-12)
    merged = losses[0][1].merge(losses[1][1]).merge(losses[2][1])
    assert merged.num_tokens == whole_stats.num_tokens == total
    assert merged.weight_max == whole_stats.weight_max


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="num_tokens"):
        policy_loss(t(0.0), t(0.0), t(0.0), t(1.0), ones(1), num_tokens=0)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(t(0.0, 0.0), t(0.0), t(0.0), t(1.0), ones(1), num_tokens=1)
    with pytest.raises(ValueError):
        LossConfig(clip_low=1.5)


def test_group_advantages_hand_values() -> None:
    res = group_advantages([1.0, 0.0, 0.5, 0.5, 2.0], ["a", "a", "b", "b", "c"])
    std = math.sqrt(0.5)  # unbiased std of [1, 0]
    assert res.advantages[0] == pytest.approx(0.5 / (std + 1e-6))
    assert res.advantages[1] == pytest.approx(-0.5 / (std + 1e-6))
    assert res.advantages[2:] == (0.0, 0.0, 0.0)
    assert res.num_groups == 3
    assert res.num_zero_variance_groups == 2  # "b" is constant, "c" is a singleton


def test_group_advantages_zero_variance_and_no_std() -> None:
    cfg = AdvantageConfig(normalize_std=False)
    res = group_advantages([1.0, 0.0, 0.5, 0.5], ["a", "a", "b", "b"], cfg)
    assert res.advantages == (0.5, -0.5, 0.0, 0.0)
    assert res.num_zero_variance_groups == 1
    with pytest.raises(ValueError):
        group_advantages([1.0], ["a", "b"])
    with pytest.raises(ValueError):
        group_advantages([math.nan], ["a"])
