"""The per-micro-batch objective both learners share (``optim/objective.py``): gradient
checkpointing changes nothing but memory, and the KL reference swap always puts the policy back."""

from __future__ import annotations

import pytest
import torch
from envtune.agents.trajectory import Trajectory
from envtune.optim.config import KlReference, LearnerConfig, LoraSettings, LossConfig
from envtune.optim.learner import Learner
from envtune.optim.lora import adapter_state
from envtune.optim.objective import ReferencePolicy, per_token
from transformers import Qwen2Config, Qwen2ForCausalLM

VOCAB = 67


def tiny() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa",
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def batch(seed: int) -> list[Trajectory]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(4):
        n = int(torch.randint(8, 30, (1,), generator=g))
        mask = (False,) * 4 + (True,) * (n - 4)
        ids = tuple(torch.randint(0, VOCAB, (n,), generator=g).tolist())
        out.append(
            Trajectory(
                task_id="t", group_id="g", token_ids=ids, loss_mask=mask,
                behavior_logprobs=tuple(-3.0 if m else 0.0 for m in mask), policy_versions=(0,) * n,
                reward=float(k % 2), progress=0.0, format_reward=0.0, tool_reward=0.0, turn_passed=(),
                step_codes=(), stage=2, start_version=0,
            )
        )  # fmt: skip
    return out


def test_gradient_checkpointing_gives_the_same_steps() -> None:
    def run(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        config = LearnerConfig(
            lr=1e-2, micro_batch_tokens=40, gradient_checkpointing=checkpointing,
            lora=LoraSettings(rank=4, alpha=8.0), loss=LossConfig(kl_coef=0.1),
        )  # fmt: skip
        learner = Learner(tiny(), config)
        for seed in range(2):
            assert learner.step(batch(seed)).updated
        return adapter_state(learner.model)

    plain, recomputed = run(False), run(True)
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)
    assert any(float(v.abs().max()) > 0 for k, v in plain.items() if "lora_B" in k)  # the steps moved B


def test_the_reference_swap_restores_the_policy_even_when_the_forward_fails() -> None:
    model = torch.nn.Linear(3, 3)
    params = list(model.parameters())
    reference = ReferencePolicy(model, params, KlReference.STAGE_START)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    current = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="boom"), reference.active():
        assert all(torch.equal(p, s) for p, s in zip(params, reference.tensors or [], strict=True))
        raise RuntimeError("boom")
    assert all(torch.equal(p, c) for p, c in zip(params, current, strict=True))
    assert ReferencePolicy(model, params, KlReference.BASE).snapshot() is False  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not fit"):
        reference.load([torch.zeros(2)])


def test_per_token_spreads_each_member_s_advantage_over_its_tokens() -> None:
    behavior, advantages = per_token([[-1.0, -2.0], [], [-3.0]], [0.5, 9.0, -1.0], torch.device("cpu"))
    assert behavior.tolist() == [-1.0, -2.0, -3.0] and advantages.tolist() == [0.5, 0.5, -1.0]
