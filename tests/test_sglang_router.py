"""SGLang's real router (``sglang-router``, Rust binary) in front of two launched workers, on loopback.

``open_engines`` with ``engine.kind = "launch"`` and ``engine.router.enabled``: the launcher starts
two workers from ``engine.launch.python`` with its real ``sglang.launch_server`` command line (a
wrapper hands it to ``sglang_envtune_worker.py``, which serves it with ``envtune-serve`` on the tiny
model), then the router with the ``manual`` policy. Checked, in one stack (starting workers is the
slow part):

- the header contract the client relies on: raw requests carrying the same ``X-SMG-Routing-Key``
  land on one worker, and a round-robin router fed the same requests spreads them (so stickiness is
  the header's doing, not an accident of two idle workers); which worker served a request is read
  from each worker's ``/server_info`` token counter;
- the client of the stack sends each episode to one worker through the router;
- publishing from the sharded learner (one gloo rank, FSDP2): ``AdapterPublisher`` writes the
  gathered adapter atomically and the client loads it on *every* worker directly (each worker then
  generates with it when asked directly), and generation through the router uses it.
"""

from __future__ import annotations

import socket
import stat
import sys
from pathlib import Path

import aiohttp
import pytest
from envtune.agents.engine import GenerateRequest, SamplingParams
from envtune.runtime.cli.engine_stack import open_engines
from envtune.runtime.engines.settings import RouterSettings, SGLangLaunchSettings
from envtune.runtime.engines.sglang_launcher import RouterConfig, SGLangRouter
from envtune.runtime.recipe.config import EngineConfig, ModelConfig

pytest.importorskip("sglang_router", reason="sglang-router (a dev dependency) is not installed")

WORKER = Path(__file__).resolve().parent / "sglang_envtune_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_block(n: int) -> int:
    for _ in range(50):
        base = free_port()
        if base + n < 65000 and all(_free(base + k) for k in range(n)):
            return base
    raise RuntimeError("no free port block")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def sglang_python(folder: Path) -> str:
    """Stands in for ``.venv-sglang/bin/python``: ``-m sglang.launch_server ARGS`` -> envtune-serve."""
    path = folder / "python"
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "sglang.launch_server" ]; then\n'
        f'  shift 2; exec "{sys.executable}" "{WORKER}" "$@"\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def tokens_generated(session: aiohttp.ClientSession, urls: list[str]) -> list[int]:
    counts = []
    for url in urls:
        async with session.get(f"{url}/server_info") as r:
            counts.append((await r.json())["internal_states"][0]["tokens_generated"])
    return counts


async def served_by(session: aiohttp.ClientSession, router: str, workers: list[str], key: str | None) -> int:
    """Send one /generate through the router; return the index of the worker that generated it."""
    before = await tokens_generated(session, workers)
    body = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    headers = {"X-SMG-Routing-Key": key} if key is not None else {}
    async with session.post(f"{router}/generate", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        await r.json()
    after = await tokens_generated(session, workers)
    moved = [k for k in range(len(workers)) if after[k] > before[k]]
    assert len(moved) == 1, (before, after)
    return moved[0]


def sharded_learner_after_one_step(model_dir: Path):  # type: ignore[no-untyped-def]
    """A one-rank FSDP2 learner on the tiny model whose adapter has moved (B != 0)."""
    import torch
    import torch.distributed as dist
    from envtune.agents.trajectory import Trajectory
    from envtune.optim.config import LearnerConfig, LoraSettings
    from envtune.optim.distributed import ShardedCore, ShardedLearner, init_distributed
    from transformers import AutoModelForCausalLM

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LearnerConfig(lr=1e-2, gradient_checkpointing=False, lora=LoraSettings(rank=4, alpha=8.0))
    learner = ShardedLearner(ShardedCore(model, config, context=init_distributed("gloo")))
    batch = [
        Trajectory(
            task_id="t", group_id="g", token_ids=(5, 6, 7, 8, 9, 10),
            loss_mask=(False, False, True, True, True, True),
            behavior_logprobs=(0.0, 0.0, -2.0, -2.0, -2.0, -2.0), policy_versions=(0,) * 6, reward=float(k),
            progress=0.0, format_reward=0.0, tool_reward=0.0, turn_passed=(), step_codes=(), stage=2,
            start_version=0,
        )
        for k in range(2)
    ]  # fmt: skip
    assert learner.step(batch).updated
    return learner


async def test_launched_workers_behind_the_router(tmp_path: Path) -> None:
    import torch.distributed as dist
    from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir
    from envtune.runtime.weight_sync import AdapterPublisher

    model = build_tiny_model(default_tiny_model_dir())
    engine = EngineConfig(
        kind="launch",
        launch=SGLangLaunchSettings(
            python=sglang_python(tmp_path), gpus=("0", "1"), base_port=free_block(2), health_timeout_s=180.0,
            shutdown_timeout_s=10.0,
        ),
        # Its own metrics port: the default (29000) may be taken on a shared machine.
        router=RouterSettings(
            enabled=True, python=sys.executable, port=free_port(), metrics_port=free_port()
        ),
    )  # fmt: skip
    async with (
        open_engines(ModelConfig(path=str(model)), engine, log_dir=tmp_path / "run") as engines,
        aiohttp.ClientSession() as session,
    ):
        client = engines.client
        workers = list(client.config.urls)
        router = client.config.router_url
        assert len(workers) == 2 and router == f"http://127.0.0.1:{engine.router.port}"

        # 1. The header contract: one worker per routing key with the manual policy...
        for key in ("episode-a", "episode-b", "episode-c"):
            seen = {await served_by(session, router, workers, key) for _ in range(3)}
            assert len(seen) == 1, (key, seen)
        # ... and spread by a round-robin router fed the same requests.
        spread = RouterConfig(
            RouterSettings(port=free_port(), policy="round_robin", metrics_port=free_port()),
            python=sys.executable,
            worker_urls=tuple(workers), log_dir=str(tmp_path),
        )  # fmt: skip
        async with SGLangRouter(spread) as round_robin:
            seen = {await served_by(session, round_robin.url, workers, "episode-a") for _ in range(4)}
            assert seen == {0, 1}

        # 2. The stack's client: an episode's requests stay on one worker.
        for key in ("episode-d", "episode-e"):
            before = await tokens_generated(session, workers)
            for _ in range(3):
                request = GenerateRequest((5, 6, 7), SamplingParams(max_new_tokens=2), affinity_key=key)
                await client.generate(request)
            after = await tokens_generated(session, workers)
            assert sum(a > b for a, b in zip(after, before, strict=True)) == 1, (key, before, after)

        # 3. Publishing from the sharded learner: on every worker, directly.
        learner = sharded_learner_after_one_step(model)
        try:
            publisher = AdapterPublisher(tmp_path / "run" / "adapters", [client])
            adapter = await publisher.publish(learner)
        finally:
            learner.close()
            dist.destroy_process_group()
        assert adapter.name == "policy-v1" and sorted(p.name for p in adapter.path.iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors",
        ]  # fmt: skip
        body = {
            "input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "temperature": 0},
            "lora_path": "policy-v1",
        }  # fmt: skip
        for url in workers:
            async with session.post(f"{url}/generate", json=body) as r:
                assert r.status == 200, (url, await r.text())
        request = GenerateRequest(
            (5, 6, 7), SamplingParams(max_new_tokens=2), adapter="policy-v1", affinity_key="e"
        )
        [completion] = await client.generate(request)
        assert completion.policy_version == 1
