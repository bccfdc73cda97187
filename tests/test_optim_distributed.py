"""The sharded learner: 2 gloo ranks under torchrun vs the single-process Learner, and its edges.

The 2-rank comparison is ``benchmarks/fsdp_equivalence.py`` (one torchrun job, ~1.5-3 min on two
busy cores); this test asserts on its JSON. The rest runs in-process on a one-rank gloo group.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from envtune.agents.trajectory import Trajectory
from envtune.optim.config import LearnerConfig, LoraSettings, LossConfig
from envtune.optim.distributed import (
    ShardedCore,
    ShardedLearner,
    ShardingSettings,
    assign_to_ranks,
    init_distributed,
    serve_worker,
    write_adapter_folder,
)
from envtune.optim.learner import Learner
from envtune.optim.memory import MemoryBudgetError
from transformers import Qwen2Config, Qwen2ForCausalLM

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "fsdp_equivalence.py"
TOLERANCE = 1e-5


def test_two_gloo_ranks_match_the_single_process_learner() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--ranks", "2", "--steps", "3", "--timing-steps", "0"],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["ranks"] == 2 and r["steps"] == 3
    # The weights moved (by ~3e-2) and the two arms agree far below that.
    assert r["update_max_abs"] > 1e-3
    assert r["max_abs_diff"] <= TOLERANCE
    assert r["reload_logits_max_diff"] <= TOLERANCE
    assert r["resume_max_abs_diff"] <= TOLERANCE and r["resumed_policy_version"] == 3
    assert r["checkpointing_max_abs_diff"] <= TOLERANCE
    assert r["two_updates_max_abs_diff"] <= TOLERANCE
    # The check would catch per-rank loss means: that arm is off by far more than the tolerance.
    assert r["control_per_rank_mean_max_abs_diff"] > 1000 * TOLERANCE
    # Uneven shares, in tokens and in loss tokens, on every step.
    assert all(a != b for a, b in r["tokens_per_rank"])
    assert all(a != b for a, b in r["loss_tokens_per_rank"])
    assert r["adapter_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert r["saved_keys_match_peft"]
    g1, g2 = r["fp32_single_grad_norm_step0"], r["fp32_sharded_grad_norm_step0"]
    assert abs(g1 - g2) <= 1e-5 * g1


# --- one rank, in this process ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


VOCAB = 61


def tiny(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config)


def config(**overrides: object) -> LearnerConfig:
    fields: dict[str, object] = {
        "lr": 1e-2,
        "micro_batch_tokens": 24,
        "lora": LoraSettings(rank=4, alpha=8.0),
    }
    return LearnerConfig(**{**fields, **overrides})


def batch(seed: int, *, same_reward: bool = False) -> list[Trajectory]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(4):
        n = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        mask = [False] * 3 + [True] * (n - 3)
        behavior = [-3.0 if m else 0.0 for m in mask]
        reward = 0.5 if same_reward else float(k % 2)
        out.append(
            Trajectory(
                task_id="t",
                group_id="g",
                token_ids=tuple(ids),
                loss_mask=tuple(mask),
                behavior_logprobs=tuple(behavior),
                policy_versions=tuple(0 if m else -1 for m in mask),
                reward=reward,
                progress=reward,
                format_reward=0.0,
                tool_reward=0.0,
                turn_passed=(),
                step_codes=(),
                stage=2,
                start_version=0,
            )
        )
    return out


def sharded(settings: ShardingSettings | None = None, **overrides: object) -> ShardedLearner:
    ctx = init_distributed("gloo")
    torch.manual_seed(100)
    return ShardedLearner(
        ShardedCore(tiny(), config(**overrides), settings or ShardingSettings(), context=ctx)
    )


def test_one_rank_steps_like_the_learner_and_writes_a_peft_folder(one_rank: None, tmp_path: Path) -> None:
    from peft import PeftModel

    learner = sharded()
    torch.manual_seed(100)
    reference = Learner(tiny(), config())
    for seed in range(2):
        a, b = learner.step(batch(seed)), reference.step(batch(seed))
        assert a.updated and a.policy_version == b.policy_version == seed + 1
        assert a.num_loss_tokens == b.num_loss_tokens and a.num_tokens == b.num_tokens
        assert abs(a.loss - b.loss) < 1e-6 and abs(a.grad_norm - b.grad_norm) < 1e-6
    ours = learner.adapter_state()
    theirs = {k: v for k, v in reference.model.state_dict().items() if "lora_" in k}
    assert len(ours) == len(theirs) > 0
    assert learner.save_adapter(tmp_path / "v2") == 2
    assert sorted(p.name for p in (tmp_path / "v2").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    reloaded = PeftModel.from_pretrained(tiny(), str(tmp_path / "v2")).eval()
    reference.model.eval()
    ids = torch.tensor([batch(5)[0].token_ids])
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - reference.model(input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-5
    learner.close()


def test_bad_batches_are_refused_before_anything_is_sent(one_rank: None) -> None:
    learner = sharded(loss=LossConfig(kl_coef=0.0, entropy_coef=0.0), weight_decay=0.0)
    good = batch(0)
    with pytest.raises(ValueError, match="at least one"):
        learner.step([])
    first = good[0]
    bad = Trajectory(
        **{**{f: getattr(first, f) for f in first.__slots__}, "loss_mask": (True, *first.loss_mask[1:])}
    )
    with pytest.raises(ValueError, match="token 0"):
        learner.step([bad, *good[1:]])
    assert learner.policy_version == 0 and learner.num_steps == 0
    # Zero-variance groups have no policy gradient: with no KL, entropy or decay the weights stay.
    metrics = learner.step(batch(1, same_reward=True))
    assert metrics.num_zero_variance_groups >= 1 and metrics.grad_norm == 0.0 and learner.num_steps == 1
    assert learner.step(good).updated  # the workers' command stream is still in order
    learner.close()
    learner.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        learner.step(good)


def test_state_round_trip_and_foreign_states_refused(one_rank: None) -> None:
    learner = sharded()
    learner.step(batch(0))
    state = learner.state_dict()
    assert state["policy_version"] == 1 and state["world_size"] == 1
    after_one = learner.adapter_state()
    learner.step(batch(1))
    learner.load_state_dict(state)
    assert learner.policy_version == 1
    restored = learner.adapter_state()
    assert all(torch.equal(restored[k], after_one[k]) for k in after_one)
    torch.manual_seed(100)
    single_state = Learner(tiny(), config()).state_dict()
    with pytest.raises(ValueError, match="not a sharded learner state"):
        learner.load_state_dict(single_state)
    learner.close()


def test_memory_check_refuses_before_sharding(one_rank: None) -> None:
    ctx = init_distributed("gloo")
    with pytest.raises(MemoryBudgetError, match="GiB"):
        ShardedCore(tiny(), config(), ShardingSettings(memory_capacity_gib=1e-6), context=ctx)


def test_rank_roles_are_enforced(one_rank: None) -> None:
    learner = sharded()
    with pytest.raises(ValueError, match="other ranks"):
        serve_worker(learner._core)
    learner.close()


def test_assign_to_ranks_balances_longest_first_and_allows_empty_ranks() -> None:
    assert assign_to_ranks([100, 10, 10, 10], 2) == [[0], [1, 2, 3]]
    assert assign_to_ranks([5, 5, 5], 2) == [[0, 2], [1]]
    assert assign_to_ranks([7], 3) == [[0], [], []]
    shares = assign_to_ranks(list(range(1, 30)), 4)
    assert sorted(i for s in shares for i in s) == list(range(29))


def test_write_adapter_folder_replaces_files_in_an_existing_folder(tmp_path: Path) -> None:
    from peft import LoraConfig

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"old")
    (folder / "keep.txt").write_text("x")
    write_adapter_folder(folder, {"w": torch.ones(2)}, LoraConfig(r=2, target_modules=["q_proj"]))
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(folder / "adapter_model.safetensors"))["w"], torch.ones(2))
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2
    assert (folder / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="max_sequence_tokens"):
        ShardingSettings(max_sequence_tokens=-1)
    with pytest.raises(ValueError, match="logits_chunk_tokens"):
        ShardingSettings(logits_chunk_tokens=0)
