"""The sharded learner: 2 gloo ranks under torchrun vs the single-process Learner, and its edges.

The 2-rank comparison is ``benchmarks/fsdp_equivalence.py --ci`` (one torchrun job); this test
asserts on its JSON. The rest runs in-process on a one-rank gloo group.
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
from envtune.optim.config import DistributedConfig, KlReference, LearnerConfig, LoraSettings, LossConfig
from envtune.optim.distributed import (
    ShardedCore,
    ShardedLearner,
    StepAborted,
    assign_to_ranks,
    init_distributed,
    serve_worker,
    write_adapter_folder,
)
from envtune.optim.learner import Learner
from transformers import Qwen2Config, Qwen2ForCausalLM

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "fsdp_equivalence.py"
TOLERANCE = 1e-5


def test_two_gloo_ranks_match_the_single_process_learner() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--ranks", "2", "--steps", "3", "--ci"],
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
    # The shared objective's parts were on: masks on most tokens, and a KL to a moved reference.
    assert all(0.3 < f < 1 for f in r["constrained_fraction"])
    assert r["kl_ref"][0] < 1e-12 < r["kl_ref"][2]
    # The check would catch per-rank loss means: that arm is off by far more than the tolerance.
    assert r["control_steps"] == 1 and r["control_per_rank_mean_max_abs_diff"] > 100 * TOLERANCE
    # Uneven shares, in tokens and in loss tokens, on every step.
    assert all(a != b for a, b in r["tokens_per_rank"])
    assert all(a != b for a, b in r["loss_tokens_per_rank"])
    assert r["adapter_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert r["saved_keys_match_peft"]
    g1, g2 = r["single_grad_norm_step0"], r["sharded_grad_norm_step0"]
    assert abs(g1 - g2) <= 1e-9 * g1


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


def sharded(**overrides: object) -> ShardedLearner:
    ctx = init_distributed("gloo")
    torch.manual_seed(100)
    return ShardedLearner(ShardedCore(tiny(), config(**overrides), context=ctx))


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
    with pytest.raises(ValueError, match="control_timeout_s"):
        DistributedConfig(control_timeout_s=0)


# --- the shared objective on the sharded path: masks, KL reference, chunks, checkpointing, ZeRO-2 --------


def random_masks(t: Trajectory, seed: int) -> torch.Tensor:
    """One int32 xgrammar-layout row per sampled token: that token plus a random third of the rest."""
    targets = [x for x, m in zip(t.token_ids, t.loss_mask, strict=True) if m]
    g = torch.Generator().manual_seed(seed)
    words = (VOCAB + 31) // 32
    allowed = torch.zeros(len(targets), words * 32, dtype=torch.int64)
    allowed[:, :VOCAB] = (torch.rand(len(targets), VOCAB, generator=g) < 0.3).long()
    allowed[torch.arange(len(targets)), torch.tensor(targets)] = 1
    packed = (allowed.view(len(targets), words, 32) << torch.arange(32)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


SHARED = {
    "loss": LossConfig(kl_coef=0.1, entropy_coef=0.01),
    "kl_reference": KlReference.STAGE_START,
    "logits_chunk_elements": VOCAB * 5,  # 5 positions per chunk: several chunks per micro-batch
    "gradient_checkpointing": True,
    "distributed": DistributedConfig(reshard_after_forward=False),  # units stay gathered after forwards
}


def test_one_rank_runs_the_learners_objective_with_masks_and_a_moving_reference(one_rank: None) -> None:
    from envtune.optim.lora import adapter_state

    learner = sharded(**SHARED)
    torch.manual_seed(100)
    single = Learner(tiny(), config(**SHARED))
    for seed in range(3):
        b = batch(seed)
        masks = {i: random_masks(t, 10 * seed + i) for i, t in enumerate(b) if i != 1}
        a, r = learner.step(b, token_masks=masks.get), single.step(b, token_masks=masks.get)
        assert a.updated and a.constrained_fraction == r.constrained_fraction > 0
        for name in ("loss", "kl_ref", "entropy", "grad_norm", "behavior_weight_mean"):
            assert abs(getattr(a, name) - getattr(r, name)) < 1e-6, name
        if seed == 0:
            # From here on the reference is the adapter after step 1, not the base model.
            assert learner.snapshot_reference() and single.snapshot_reference()
    assert a.kl_ref > 1e-6
    ours, theirs = learner.adapter_state(), adapter_state(single.model)
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-6
    learner.close()


def test_a_mask_that_does_not_fit_aborts_the_step_everywhere(one_rank: None) -> None:
    learner = sharded(**SHARED)
    b = batch(3)
    short = {0: random_masks(b[0], 0)[:-1]}
    with pytest.raises(StepAborted, match="mask rows"):
        learner.step(b, token_masks=short.get)
    wrong = random_masks(b[0], 0)
    wrong[0] = 0  # forbids the first sampled token
    with pytest.raises(ValueError, match="forbidden"):
        learner.step(b, token_masks={0: wrong}.get)
    assert learner.policy_version == 0 and learner.num_steps == 0
    assert learner.step(b, token_masks={0: random_masks(b[0], 0)}.get).updated
    learner.close()


def test_resumed_state_carries_the_reference_snapshot(one_rank: None) -> None:
    first = sharded(**SHARED)
    first.step(batch(0))
    first.snapshot_reference()
    first.step(batch(1))
    state = first.state_dict()
    assert state["reference"].keys() == state["adapter"].keys()
    first.step(batch(2))
    continued = first.adapter_state()
    first.close()
    second = sharded(**SHARED)
    second.load_state_dict(state)
    second.step(batch(2))
    resumed = second.adapter_state()
    # The KL term depends on the reference: a lost or wrong snapshot would move the weights elsewhere.
    assert all(torch.equal(resumed[k], continued[k]) for k in continued)
    with pytest.raises(ValueError, match="no KL reference"):
        second.load_state_dict({k: v for k, v in state.items() if k != "reference"})
    second.close()
