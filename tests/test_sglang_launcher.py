"""The SGLang launcher: command lines, GPU groups, the admin key, health waits, deaths, shutdown.

Lifecycle tests start ``sglang_standin_worker.py`` (aiohttp, SGLang's flag spelling) in place of
``sglang.launch_server``; no SGLang or GPU is needed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from envtune.runtime.engines.sglang_launcher import (
    LaunchError,
    RouterConfig,
    SGLangLaunchConfig,
    SGLangWorkers,
    WorkerDied,
    router_command,
    worker_command,
    worker_environment,
)

STANDIN = str(Path(__file__).resolve().parent / "sglang_standin_worker.py")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def free_port_block(n: int) -> int:
    """A base port with n free consecutive ports (probed; the launcher re-checks)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
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


def config(tmp_path: Path, **overrides: object) -> SGLangLaunchConfig:
    fields: dict[str, object] = {
        "python": sys.executable,
        "model_path": "/models/Qwen2.5-7B-Instruct",
        "lora_rank": 16,
        "lora_target_modules": TARGETS,
        "entry": (STANDIN,),
        "log_dir": str(tmp_path / "logs"),
        "health_timeout_s": 30.0,
        "shutdown_timeout_s": 5.0,
    }
    fields.update(overrides)
    return SGLangLaunchConfig(**fields)  # type: ignore[arg-type]


def test_worker_command_is_sglangs_launch_server_with_the_lora_flags(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        entry=("-m", "sglang.launch_server"),
        python=".venv-sglang/bin/python",
        gpus=("0", "1", "2", "3"),
        tp_size=2,
        base_port=30000,
        max_loras_per_batch=4,
        max_loaded_loras=8,
        mem_fraction_static=0.8,
        extra_args=("--context-length", "32768"),
    )
    assert worker_command(cfg, 1, "/run/key.yaml") == [
        ".venv-sglang/bin/python", "-m", "sglang.launch_server",
        "--model-path", "/models/Qwen2.5-7B-Instruct",
        "--host", "127.0.0.1", "--port", "30001", "--tp-size", "2",
        "--enable-lora", "--max-lora-rank", "16", "--lora-target-modules", *TARGETS,
        "--max-loras-per-batch", "4", "--max-loaded-loras", "8", "--mem-fraction-static", "0.8",
        "--config", "/run/key.yaml", "--context-length", "32768",
    ]  # fmt: skip
    assert cfg.gpu_groups() == [("0", "1"), ("2", "3")]
    assert cfg.urls() == ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]
    env = worker_environment(cfg, 1, {"PATH": "/bin", "VIRTUAL_ENV": "/work/.venv", "PYTHONPATH": "x"})
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "2,3"}


def test_bad_launch_configs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tensor-parallel groups of 2"):
        config(tmp_path, gpus=("0", "1", "2"), tp_size=2)
    with pytest.raises(ValueError, match="repeat"):
        config(tmp_path, gpus=("0", "0"))
    with pytest.raises(ValueError, match="--dp-size"):
        config(tmp_path, extra_args=("--dp-size", "2"))
    with pytest.raises(ValueError, match="--admin-api-key"):
        config(tmp_path, extra_args=("--admin-api-key=secret",))
    with pytest.raises(ValueError, match="lora_rank"):
        config(tmp_path, lora_rank=0)


def test_router_command_uses_the_manual_policy(tmp_path: Path) -> None:
    cfg = RouterConfig(python="py", worker_urls=("http://a:1", "http://b:2"), port=30080)
    assert router_command(cfg) == [
        "py", "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", "30080",
        "--policy", "manual", "--assignment-mode", "min_load", "--worker-urls", "http://a:1", "http://b:2",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="policy"):
        RouterConfig(python="py", worker_urls=("http://a:1",), policy="sticky")


async def test_two_workers_start_healthy_keep_the_key_private_and_stop(tmp_path: Path) -> None:
    base = free_port_block(2)
    cfg = config(tmp_path, gpus=("0", "1", "2", "3"), tp_size=2, base_port=base)
    workers = SGLangWorkers(cfg)
    async with workers:
        assert workers.urls == [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
        pids = workers.pids
        async with aiohttp.ClientSession() as session:
            for k, url in enumerate(workers.urls):
                async with session.get(f"{url}/standin") as r:
                    info = await r.json()
                assert info["cuda_visible_devices"] == ("0,1" if k == 0 else "2,3")
                assert info["admin_key_set"] and info["virtual_env"] is None
                assert "--enable-lora" in info["argv"] and "--config" in info["argv"]
                # Control calls need the key; with it they pass.
                body = {"lora_name": "policy-v1", "lora_path": "/tmp/v1"}
                async with session.post(f"{url}/load_lora_adapter", json=body) as r:
                    assert r.status == 401
                headers = {"Authorization": f"Bearer {workers.admin_api_key}"}
                async with session.post(f"{url}/load_lora_adapter", json=body, headers=headers) as r:
                    assert r.status == 200
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert workers.admin_api_key not in cmdline
        for k in range(2):
            log_file = tmp_path / "logs" / f"sglang-worker-{k}.log"
            assert log_file.stat().st_mode & 0o077 == 0  # SGLang logs its arguments, key included
        workers.check()  # all alive
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    assert workers.urls == []


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


async def test_a_worker_that_dies_before_health_fails_the_start_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STANDIN_STARTUP_S", "30")
    monkeypatch.setenv("STANDIN_EXIT_AFTER_S", "0.5")
    workers = SGLangWorkers(config(tmp_path, base_port=free_port_block(1)))
    with pytest.raises(LaunchError, match="exited with code 3") as err:
        await workers.start()
    assert "simulated crash" in str(err.value)
    assert workers.urls == []


async def test_health_timeout_stops_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_STARTUP_S", "60")
    workers = SGLangWorkers(config(tmp_path, base_port=free_port_block(1), health_timeout_s=2.0))
    with pytest.raises(LaunchError, match="not healthy after 2 s"):
        await workers.start()
    assert workers.urls == []


async def test_a_worker_dying_later_is_reported_by_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STANDIN_STARTUP_S", "0")
    monkeypatch.setenv("STANDIN_EXIT_AFTER_S", "2")
    async with SGLangWorkers(config(tmp_path, base_port=free_port_block(1))) as workers:
        with pytest.raises(WorkerDied, match=r"sglang-worker-0 .* exited with code 3"):
            await asyncio.wait_for(workers.watch(interval_s=0.1), timeout=30)


async def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        workers = SGLangWorkers(config(tmp_path, base_port=port))
        with pytest.raises(LaunchError, match="in use"):
            await workers.start()
    assert not (tmp_path / "logs").exists() or not os.listdir(tmp_path / "logs")
