"""AdapterPublisher: atomic versioned folders, versioned names, unload once unused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from envtune.agents.engine import WeightSync
from envtune.agents.trajectory import Trajectory
from envtune.optim.config import LearnerConfig, LoraSettings
from envtune.optim.learner import Learner
from envtune.runtime.weight_sync import AdapterPublisher, WeightSyncError
from peft import PeftModel
from transformers import Qwen2Config, Qwen2ForCausalLM


class FakeEngine:
    """Records load/unload calls; checks that what it loads is a complete folder."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_on = fail_on
        self.versions: dict[str, int] = {}

    @property
    def policy_version(self) -> int:
        return max(self.versions.values(), default=0)

    async def load_adapter(self, name: str, path: str, *, version: int) -> None:
        self.calls.append(("load", name))
        if name == self.fail_on:
            raise RuntimeError("engine says no")
        # The version travels explicitly and matches what the folder holds.
        assert (Path(path) / "adapter_model.safetensors").read_text() == str(version)
        self.loaded[name] = path
        self.versions[name] = version

    async def unload_adapter(self, name: str) -> None:
        self.calls.append(("unload", name))
        del self.loaded[name]

    async def update_weights_from_disk(self, path: str, *, version: int) -> None:
        raise NotImplementedError

    async def flush_cache(self) -> None:
        pass


class FakeSource:
    def __init__(self) -> None:
        self.version = 0

    def save_adapter(self, folder: Path) -> int:
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_text(str(self.version))
        return self.version


async def test_publish_loads_versioned_names_and_retires_unused(tmp_path: Path) -> None:
    engines = [FakeEngine(), FakeEngine()]
    assert all(isinstance(e, WeightSync) for e in engines)
    pub = AdapterPublisher(tmp_path, engines)
    source = FakeSource()
    assert pub.acquire() is None  # nothing published: requests use the base model

    v0 = await pub.publish(source)
    assert v0.name == "policy-v0" and v0.path == tmp_path / "v0"
    assert all(e.loaded == {"policy-v0": str(tmp_path / "v0")} for e in engines)

    held = pub.acquire()
    assert held == v0
    source.version = 1
    v1 = await pub.publish(source)
    assert pub.current == v1
    # v0 is still held by a request: loaded and on disk
    assert set(engines[0].loaded) == {"policy-v0", "policy-v1"}
    assert pub.statistics().in_flight == ((0, 1),)
    await pub.release(held)
    assert set(engines[0].loaded) == {"policy-v1"}
    assert not (tmp_path / "v0").exists() and (tmp_path / "v1").exists()

    # an unheld version is retired as soon as the next one is current
    source.version = 2
    await pub.publish(source)
    assert set(engines[1].loaded) == {"policy-v2"}
    stats = pub.statistics()
    assert stats.current_version == 2 and stats.loaded_versions == (2,)
    assert stats.published == 3 and stats.unloaded == 2
    assert [p.name for p in tmp_path.iterdir()] == ["v2"]  # no temporary folders left


async def test_use_context_and_concurrent_requests(tmp_path: Path) -> None:
    engine = FakeEngine()
    pub = AdapterPublisher(tmp_path, [engine])
    source = FakeSource()
    await pub.publish(source)
    gate = asyncio.Event()
    names: list[str] = []

    async def request() -> None:
        async with pub.use() as adapter:
            assert adapter is not None
            names.append(adapter.name)
            await gate.wait()

    async with asyncio.TaskGroup() as tg:
        for _ in range(3):
            tg.create_task(request())
        await asyncio.sleep(0)
        source.version = 1
        await pub.publish(source)
        assert "policy-v0" in engine.loaded  # three requests still on v0
        gate.set()
    assert names == ["policy-v0"] * 3
    assert set(engine.loaded) == {"policy-v1"}
    assert engine.calls[-1] == ("unload", "policy-v0")
    with pytest.raises(ValueError, match="without a matching acquire"):
        await pub.release(pub.current)


async def test_failed_load_keeps_the_previous_version(tmp_path: Path) -> None:
    good, bad = FakeEngine(), FakeEngine(fail_on="policy-v1")
    pub = AdapterPublisher(tmp_path, [good, bad])
    source = FakeSource()
    await pub.publish(source)
    source.version = 1
    with pytest.raises(WeightSyncError, match="policy-v1"):
        await pub.publish(source)
    assert pub.current is not None and pub.current.version == 0
    assert set(good.loaded) == {"policy-v0"}  # rolled back on the engine that had loaded it
    assert set(bad.loaded) == {"policy-v0"}


async def test_republishing_a_version_replaces_its_folder(tmp_path: Path) -> None:
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "stale").write_text("from a crashed run")
    engine = FakeEngine()
    pub = AdapterPublisher(tmp_path, [engine])
    source = FakeSource()
    source.version = 3
    adapter = await pub.publish(source)
    names = sorted(p.name for p in adapter.path.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors"]
    again = await pub.publish(source)  # same version: nothing new to load
    assert again == adapter and engine.calls == [("load", "policy-v3")]
    await pub.unload_all()
    assert engine.loaded == {} and pub.current is None


class PeftEngine:
    """Loads each published folder with peft onto its own copy of the base model."""

    def __init__(self, base_factory) -> None:
        self.base_factory = base_factory
        self.models: dict[str, torch.nn.Module] = {}

    async def load_adapter(self, name: str, path: str, *, version: int) -> None:
        self.models[name] = PeftModel.from_pretrained(self.base_factory(), path).eval()

    async def unload_adapter(self, name: str) -> None:
        del self.models[name]


async def test_learner_adapter_round_trips_through_the_publisher(tmp_path: Path) -> None:
    def base() -> Qwen2ForCausalLM:
        torch.manual_seed(0)
        config = Qwen2Config(
            vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        )
        return Qwen2ForCausalLM(config)

    learner = Learner(base(), LearnerConfig(lr=1e-1, lora=LoraSettings(rank=4, alpha=8.0)))
    ids = (3, 5, 7, 9, 11, 13)
    traj = [
        Trajectory(
            task_id="t", group_id="g", token_ids=ids, loss_mask=(False, False, True, True, True, True),
            behavior_logprobs=(0.0, 0.0, -3.7, -3.7, -3.7, -3.7), policy_versions=(-1, -1, 0, 0, 0, 0),
            reward=float(r), progress=0.0, format_reward=0.0, tool_reward=0.0, turn_passed=(), step_codes=(),
            stage=2, start_version=0,
        )
        for r in (0, 1)
    ]
    await asyncio.to_thread(learner.step, traj)
    engine = PeftEngine(base)
    pub = AdapterPublisher(tmp_path, [engine])
    adapter = await pub.publish(learner)
    assert adapter.name == "policy-v1"
    served = engine.models["policy-v1"]
    learner.model.eval()
    with torch.no_grad():
        expected = learner.model(input_ids=torch.tensor([ids])).logits
        got = served(input_ids=torch.tensor([ids])).logits
    assert torch.allclose(expected, got, atol=1e-5)
    with torch.no_grad():
        base_logits = base()(input_ids=torch.tensor([ids])).logits
    assert not torch.allclose(base_logits, got, atol=1e-4)  # the adapter carries the update


async def test_a_pinned_group_keeps_its_version_loaded_until_it_ends(tmp_path: Path) -> None:
    """Issue 10 (8): every member of a group samples under the version current at dispatch."""
    from envtune.runtime.recipe.episodes import GroupAdapters

    engine, source = FakeEngine(), FakeSource()
    publisher = AdapterPublisher(tmp_path, [engine])
    pins = GroupAdapters(publisher)
    assert pins.pin("g0") is None and pins.adapter("g0") is None  # before the first publish: the base
    source.version = 1
    await publisher.publish(source)
    assert pins.pin("g1") == 1
    source.version = 2
    await publisher.publish(source)  # v2 is current; g1 still holds v1
    assert pins.pin("g2") == 2
    assert set(engine.loaded) == {"policy-v1", "policy-v2"}
    assert pins.adapter("g1").name == "policy-v1"  # type: ignore[union-attr]  # a late member of g1
    await pins.unpin("g1")  # the group ended: v1 goes
    assert set(engine.loaded) == {"policy-v2"} and "g1" not in pins
    await pins.unpin("g0")
    await pins.unpin("g2")
    assert set(engine.loaded) == {"policy-v2"}  # current: stays
    with pytest.raises(ValueError, match="already pinned"):
        pins.pin("g3"), pins.pin("g3")
    with pytest.raises(KeyError):
        pins.adapter("nope")
