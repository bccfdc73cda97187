"""The learner step: what changes, accumulation, resume, on-policy sanity, bad batches."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math

import pytest
import torch
from envtune.agents.trajectory import Trajectory
from envtune.optim.config import (
    Batching,
    KlReference,
    LearnerConfig,
    LoraSettings,
    LossConfig,
)
from envtune.optim.learner import Learner, SkipReason
from envtune.optim.logprobs import unpack_bitmask
from transformers import Qwen2Config, Qwen2ForCausalLM

VOCAB = 61


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config)


def make_learner(seed: int = 0, **overrides: object) -> Learner:
    fields: dict[str, object] = {"lr": 1e-2, "lora": LoraSettings(rank=4, alpha=8.0)}
    fields.update(overrides)
    torch.manual_seed(seed + 100)  # LoRA A matrices are drawn from the global generator
    return Learner(tiny_model(seed), LearnerConfig(**fields))


def on_policy_logprobs(learner: Learner, ids: list[int]) -> list[float]:
    model = learner.model
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return [0.0] + [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]


def make_batch(
    learner: Learner, seed: int, groups: int = 2, size: int = 4, version: int = 0
) -> list[Trajectory]:
    """Prompt (masked) + model turn + environment turn (masked) + model turn; behaviour = current policy."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for gi in range(groups):
        prompt = torch.randint(0, VOCAB, (5,), generator=g).tolist()
        for _ in range(size):
            n1, n2 = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
            turn1 = torch.randint(0, VOCAB, (n1,), generator=g).tolist()
            env = torch.randint(0, VOCAB, (3,), generator=g).tolist()
            turn2 = torch.randint(0, VOCAB, (n2,), generator=g).tolist()
            ids = prompt + turn1 + env + turn2
            mask = [False] * 5 + [True] * len(turn1) + [False] * 3 + [True] * len(turn2)
            lp = on_policy_logprobs(learner, ids)
            behavior = [x if m else 0.0 for x, m in zip(lp, mask, strict=True)]
            reward = float(torch.rand(1, generator=g))
            out.append(
                Trajectory(
                    task_id=f"t{gi}", group_id=f"g{seed}-{gi}", token_ids=tuple(ids), loss_mask=tuple(mask),
                    behavior_logprobs=tuple(behavior),
                    policy_versions=tuple(version if m else -1 for m in mask),
                    reward=reward, progress=reward, format_reward=0.0, tool_reward=0.0, turn_passed=(),
                    step_codes=(), stage=2, start_version=version,
                )
            )
    return out


def named_params(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters()}


def with_fields(t: Trajectory, **changes: object) -> Trajectory:
    return Trajectory(**{**{f: getattr(t, f) for f in t.__dataclass_fields__}, **changes})


def test_only_lora_parameters_change() -> None:
    learner = make_learner()
    before = named_params(learner)
    metrics = learner.step(make_batch(learner, seed=1))
    after = named_params(learner)
    assert metrics.updated and metrics.policy_version == learner.policy_version == 1
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "nothing was trained"
    assert all("lora_" in n for n in changed), sorted(changed)
    assert any("lora_B" in n for n in changed)


def test_on_policy_batch_has_unit_weights_and_no_clipping() -> None:
    learner = make_learner()
    batch = make_batch(learner, seed=2)
    m = learner.step(batch)
    assert m.clip_fraction == 0.0
    assert m.behavior_weight_mean == pytest.approx(1.0, abs=1e-5)
    assert m.behavior_kl == pytest.approx(0.0, abs=1e-6)
    assert m.kl_ref == pytest.approx(0.0, abs=1e-9)  # B = 0 at start: policy == reference
    assert m.num_loss_tokens == sum(t.num_model_tokens for t in batch)
    assert m.num_tokens == sum(len(t.token_ids) for t in batch)
    assert 0 < m.masked_token_fraction < 1
    assert m.staleness_mean == 0.0 and m.entropy > 0
    # After the update the same data is off-policy: the behaviour weights move away from 1.
    m2 = learner.step(batch)
    assert m2.behavior_kl > 0 and m2.staleness_max == 1
    assert m2.kl_ref > 0


@pytest.mark.parametrize("batching", [Batching.PACKED, Batching.PADDED])
def test_accumulation_matches_one_big_microbatch(batching: Batching) -> None:
    # adam_eps=1 makes the first update ~lr·g instead of ~lr·sign(g), whose sign flips on float noise
    # where the gradient is ~0; the comparison is then of gradients, as intended.
    whole = make_learner(micro_batch_tokens=10_000, adam_eps=1.0, lr=1.0)
    split = make_learner(micro_batch_tokens=12, batching=batching, adam_eps=1.0, lr=1.0)
    batch = make_batch(whole, seed=3)
    m_whole = whole.step(batch)
    m_split = split.step(batch)
    assert m_split.num_microbatches > m_whole.num_microbatches == 1
    assert m_split.loss == pytest.approx(m_whole.loss, abs=1e-6)
    assert m_split.grad_norm == pytest.approx(m_whole.grad_norm, rel=1e-4)
    a, b = named_params(whole), named_params(split)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_resume_reproduces_the_state() -> None:
    first = make_learner()
    b1, b2 = make_batch(first, seed=4), make_batch(first, seed=5)
    first.step(b1)
    state = copy.deepcopy(first.state_dict())
    m_first = first.step(b2)

    resumed = make_learner(seed=0)
    torch.manual_seed(999)  # different global RNG state; load_state_dict restores it
    resumed.load_state_dict(state)
    assert resumed.policy_version == 1 and resumed.num_steps == 1
    m_resumed = resumed.step(b2)
    assert m_resumed.loss == pytest.approx(m_first.loss, abs=1e-7)
    a, b = named_params(first), named_params(resumed)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-7), name
    assert resumed.policy_version == first.policy_version == 2


def test_zero_variance_groups_are_counted_and_have_no_policy_gradient() -> None:
    # With no KL and no entropy term, advantage 0 everywhere leaves nothing to learn from.
    learner = make_learner(loss=LossConfig(kl_coef=0.0, entropy_coef=0.0), weight_decay=0.0)
    batch = [with_fields(t, reward=1.0) for t in make_batch(learner, seed=6)]
    before = named_params(learner)
    m = learner.step(batch)
    assert m.num_zero_variance_groups == 2 and m.num_trained == 8
    assert m.pg_loss == 0.0 and m.grad_norm == 0.0
    after = named_params(learner)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_nonfinite_batch_does_not_touch_the_weights() -> None:
    learner = make_learner()
    batch = make_batch(learner, seed=7)
    t0 = batch[0]
    before = named_params(learner)
    # +inf behaviour logprobs give weight exp(-20) after the log-ratio clamp: finite, still trains.
    batch[0] = with_fields(t0, behavior_logprobs=tuple(math.inf if m else 0.0 for m in t0.loss_mask))
    m = learner.step(batch)
    assert m.updated and math.isfinite(m.loss)
    assert m.skip_reason is None and m.updates_applied == 1
    mid = named_params(learner)
    assert any(not torch.equal(before[n], mid[n]) for n in before)
    # NaN logprobs poison the gradient: the update is skipped and the version stays.
    batch[0] = with_fields(t0, behavior_logprobs=tuple(math.nan if m else 0.0 for m in t0.loss_mask))
    m_nan = learner.step(batch)
    assert not m_nan.updated and m_nan.policy_version == m.policy_version == 1
    assert m_nan.skip_reason is SkipReason.NON_FINITE_GRAD and m_nan.updates_applied == 0
    assert all(torch.equal(mid[n], p) for n, p in named_params(learner).items())


def test_batch_without_sampled_tokens_is_reported_not_trained() -> None:
    learner = make_learner()
    batch = [with_fields(t, loss_mask=(False,) * len(t.loss_mask)) for t in make_batch(learner, seed=11)]
    before = named_params(learner)
    m = learner.step(batch)
    assert (m.updated, m.skip_reason) == (False, SkipReason.NO_LOSS_TOKENS)
    assert m.num_trained == m.num_loss_tokens == 0
    assert m.policy_version == learner.policy_version == 0 and learner.num_steps == 1
    assert all(torch.equal(before[n], p) for n, p in named_params(learner).items())
    assert m.as_dict()["skip_reason"] == "no_loss_tokens"


def test_nan_in_the_second_update_keeps_the_first() -> None:
    learner = make_learner(updates_per_step=2)
    batch = make_batch(learner, seed=12)  # mini-batches: group 0, then group 1
    t = batch[5]
    batch[5] = with_fields(t, behavior_logprobs=tuple(math.nan if m else 0.0 for m in t.loss_mask))
    m = learner.step(batch)
    assert (m.updated, m.skip_reason, m.updates_applied, m.policy_version) == (True, None, 1, 1)


def test_several_updates_per_step_equal_sequential_steps_when_nothing_clips() -> None:
    # Decoupled PPO: with two updates per batch the second mini-batch's ratio is taken against the
    # pre-step (proximal) policy; as separate steps, its proximal is the post-update policy and the
    # behaviour weight carries the difference. Without clipping the gradients are identical.
    loose = LossConfig(
        clip_low=0.999, clip_high=1e6, dual_clip=None, behavior_weight_cap=1e6, kl_coef=0.0, entropy_coef=0.0
    )
    combined = make_learner(updates_per_step=2, lr=1.0, adam_eps=1.0, loss=loose)  # eps: see above
    sequential = make_learner(lr=1.0, adam_eps=1.0, loss=loose)
    batch = make_batch(combined, seed=8)  # group 0 = first half, group 1 = second half
    m = combined.step(batch)
    assert m.updated and m.policy_version == 1 and m.num_microbatches == 2
    sequential.step(batch[:4])
    m_seq = sequential.step(batch[4:])
    assert m_seq.behavior_weight_mean != pytest.approx(1.0, abs=1e-4)  # the correction did something
    a, b = named_params(combined), named_params(sequential)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_rejects_bad_batches() -> None:
    learner = make_learner()
    with pytest.raises(ValueError):
        learner.step([])
    t0 = make_batch(learner, seed=9)[0]
    bad = with_fields(t0, loss_mask=(True, *t0.loss_mask[1:]))
    with pytest.raises(ValueError, match="token 0"):
        learner.step([bad])


async def test_step_runs_in_a_worker_thread_and_saves_adapter(tmp_path) -> None:
    learner = make_learner()
    batch = make_batch(learner, seed=10)
    metrics = await asyncio.to_thread(learner.step, batch)
    version = await asyncio.to_thread(learner.save_adapter, tmp_path / "a")
    assert version == metrics.policy_version == 1
    assert (tmp_path / "a" / "adapter_config.json").exists()
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()


# --- the KL reference: base model or the policy at the stage's start ------------------------------


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def test_stage_start_reference_is_the_snapshot_and_does_not_move() -> None:
    learner = make_learner(loss=LossConfig(kl_coef=0.1))
    assert learner.config.kl_reference is KlReference.STAGE_START
    batch = make_batch(learner, seed=13)
    start = learner.logprobs(batch)
    assert max_diff(learner.logprobs(batch, reference=True), start) == 0.0  # the fresh adapter
    for _ in range(2):
        learner.step(batch)
    assert max_diff(learner.logprobs(batch, reference=True), start) == 0.0
    assert learner.snapshot_reference() is True
    snapshot = learner.logprobs(batch)
    assert max_diff(snapshot, start) > 1e-3  # the policy had moved before the snapshot
    assert max_diff(learner.logprobs(batch, reference=True), snapshot) == 0.0
    m = learner.step(batch)  # policy == reference during this step
    assert m.updated and m.kl_ref == pytest.approx(0.0, abs=1e-7)
    learner.step(batch)
    assert max_diff(learner.logprobs(batch), snapshot) > 1e-3
    assert max_diff(learner.logprobs(batch, reference=True), snapshot) == 0.0
    # Resume keeps the reference; a state without one is refused before anything is loaded.
    resumed = make_learner(seed=0, loss=LossConfig(kl_coef=0.1))
    state = learner.state_dict()
    resumed.load_state_dict(state)
    assert max_diff(resumed.logprobs(batch, reference=True), snapshot) == 0.0
    fresh = make_learner(seed=0)
    with pytest.raises(ValueError, match="no KL reference"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "reference"})
    assert fresh.policy_version == 0


def test_base_reference_is_the_model_without_adapter() -> None:
    learner = make_learner(loss=LossConfig(kl_coef=0.1), kl_reference=KlReference.BASE)
    batch = make_batch(learner, seed=14)
    start = learner.logprobs(batch)
    for _ in range(2):
        learner.step(batch)
    assert learner.snapshot_reference() is False
    assert max_diff(learner.logprobs(batch, reference=True), start) < 1e-6
    assert max_diff(learner.logprobs(batch), start) > 1e-3
    m = learner.step(batch)
    assert m.kl_ref > 1e-6


# --- grammar masks in the learner step ---------------------------------------------------------


def random_masks(targets: list[int], seed: int, forced: bool = False) -> torch.Tensor:
    """One int32 xgrammar-layout row per target: the target plus (unless forced) a random third."""
    g = torch.Generator().manual_seed(seed)
    words = (VOCAB + 31) // 32
    allowed = torch.zeros(len(targets), words * 32, dtype=torch.int64)
    if not forced:
        allowed[:, :VOCAB] = (torch.rand(len(targets), VOCAB, generator=g) < 0.3).long()
    allowed[torch.arange(len(targets)), torch.tensor(targets)] = 1
    packed = (allowed.view(len(targets), words, 32) << torch.arange(32)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def sampled(t: Trajectory) -> list[int]:
    return [x for x, m in zip(t.token_ids, t.loss_mask, strict=True) if m]


def by_hand(learner: Learner, t: Trajectory, masks: torch.Tensor | None, reference: bool) -> torch.Tensor:
    """Masked log-softmax of one trajectory, straight from the model's logits."""
    model = learner.model
    model.eval()
    ctx = model.disable_adapter() if reference else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        logits = model(input_ids=torch.tensor([t.token_ids]), use_cache=False).logits[0].float()
    rows = logits[[j - 1 for j in range(1, len(t.token_ids)) if t.loss_mask[j]]]
    if masks is not None:
        rows = rows.masked_fill(~unpack_bitmask(masks, VOCAB), -math.inf)
    return torch.log_softmax(rows, -1).gather(-1, torch.tensor(sampled(t))[:, None]).squeeze(-1)


def test_constrained_step_is_on_policy_under_its_masks() -> None:
    learner = make_learner(loss=LossConfig(kl_coef=0.1), kl_reference=KlReference.BASE)
    learner.step(make_batch(learner, seed=15))  # a non-zero adapter, so policy != reference
    batch = make_batch(learner, seed=16)
    masks = {i: random_masks(sampled(t), seed=i) for i, t in enumerate(batch) if i % 4 != 3}

    def source(i: int) -> torch.Tensor | None:
        return masks.get(i)

    for reference in (False, True):
        got = learner.logprobs(batch, reference=reference, token_masks=source)
        want = [by_hand(learner, t, masks.get(i), reference) for i, t in enumerate(batch)]
        assert max_diff(got, want) < 1e-5
    # Behaviour logprobs as the engine reports them under the grammar: the masked policy.
    masked = learner.logprobs(batch, token_masks=source)
    batch = [
        with_fields(t, behavior_logprobs=tuple(_spread(t.loss_mask, lp.tolist())))
        for t, lp in zip(batch, masked, strict=True)
    ]
    twin = make_learner(loss=LossConfig(kl_coef=0.1), kl_reference=KlReference.BASE)
    twin.load_state_dict(learner.state_dict())
    m = learner.step(batch, token_masks=source)
    expected_fraction = sum(len(sampled(batch[i])) for i in masks) / sum(len(sampled(t)) for t in batch)
    assert m.constrained_fraction == pytest.approx(expected_fraction)
    assert m.behavior_weight_mean == pytest.approx(1.0, abs=1e-5) and m.behavior_kl < 1e-8
    unmasked = twin.step(batch)  # the same batch with the learner blind to the grammar
    assert unmasked.behavior_weight_mean < 0.9 and unmasked.constrained_fraction == 0.0
    assert unmasked.entropy > m.entropy


def _spread(mask: tuple[bool, ...], values: list[float]) -> list[float]:
    it = iter(values)
    return [next(it) if m else 0.0 for m in mask]


def test_forced_tokens_carry_no_gradient() -> None:
    learner = make_learner(loss=LossConfig(kl_coef=0.1), kl_reference=KlReference.BASE)
    learner.step(make_batch(learner, seed=17))
    batch = make_batch(learner, seed=18)
    batch = [with_fields(t, behavior_logprobs=(0.0,) * len(t.token_ids)) for t in batch]
    forced = {i: random_masks(sampled(t), seed=i, forced=True) for i, t in enumerate(batch)}
    m = learner.step(batch, token_masks=forced.__getitem__)
    assert m.entropy == 0.0 and m.kl_ref == 0.0 and m.grad_norm == 0.0 and m.constrained_fraction == 1.0


def test_bad_masks_are_refused_before_the_weights_change() -> None:
    learner = make_learner()
    batch = make_batch(learner, seed=19)
    before = named_params(learner)
    short = {i: random_masks(sampled(t)[:-1], seed=i) for i, t in enumerate(batch)}
    with pytest.raises(ValueError, match="mask rows"):
        learner.step(batch, token_masks=short.__getitem__)
    shifted = [[(x + 1) % VOCAB for x in sampled(t)] for t in batch]
    wrong = {i: random_masks(ids, seed=i, forced=True) for i, ids in enumerate(shifted)}
    with pytest.raises(ValueError, match="forbidden"):
        learner.step(batch, token_masks=wrong.__getitem__)
    assert all(torch.equal(before[n], p) for n, p in named_params(learner).items())
    assert learner.policy_version == 0
