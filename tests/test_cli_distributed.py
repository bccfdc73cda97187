"""``envtune-run`` on the real path: under ``torchrun`` (the sharded learner), and the memory check.

- A 2-rank ``torchrun`` run of one learner step on the tiny model (gloo): the learner is sharded
  (``world_size`` 2 in its step log), the per-GPU estimate is printed and checked against a set
  capacity, the checkpoint holds the gathered sharded state; it is resumed on ONE rank (a sharded
  checkpoint loads on any number of ranks; this part runs in this process with a one-rank job)
  and continues at policy version 2; resuming it without ``torchrun`` is refused before anything
  starts.
- The memory check refuses a Qwen2.5-7B-shaped model (a ``config.json`` only: nothing could load)
  that cannot fit an 80 GiB GPU, with what to change, before a run folder exists; under ``torchrun``
  every rank stops. With the paper's settings (checkpointing on) the same model fits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from envtune.optim.memory import GIB, MemoryBudgetError
from envtune.runtime.cli.run import main
from envtune.runtime.recipe.config import load_config
from envtune.runtime.recipe.learner_setup import check_memory
from envtune.runtime.recipe.run_folder import RunFolder
from envtune.runtime.testing.smoke import smoke_args

SMOKE_ARGS = smoke_args(
    "run.checkpoint_every=0",
    "run.trajectories.mode=none",
    "learner.memory.capacity_gib=4",  # the tiny model's estimate is ~1 GiB: checked, and it starts
)

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}  # fmt: skip
"""Qwen2.5-7B-Instruct's config.json sizes."""


def events(text: str, name: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{") and f'"event": "{name}"' in line:
            out.append(json.loads(line))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_train_checkpoint_and_resume_on_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, "-m", "envtune.runtime.cli.run", *SMOKE_ARGS, "--set", "run.max_steps=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    folder = tmp_path / done.stdout.strip().splitlines()[-1]
    [estimate] = events(done.stderr, "learner_memory_estimate")  # rank 0 prints it (others log warnings)
    assert estimate["ranks"] == 2 and estimate["capacity_gib"] == 4.0
    assert 0 < float(estimate["per_gpu_gib"]) < 4  # type: ignore[arg-type]
    assert [e["world_size"] for e in events(done.stderr, "learner_step")] == [2]
    checkpoint = RunFolder(folder).latest_complete_checkpoint()
    assert checkpoint is not None and checkpoint.step == 1
    state = torch.load(checkpoint.path / "learner.pt", weights_only=True)
    assert state["format"] == "envtune-sharded-learner-v1" and state["world_size"] == 2
    assert (checkpoint.path / "adapter" / "adapter_model.safetensors").exists()

    # Without torchrun the sharded checkpoint is refused at once, with what to run instead.
    with pytest.raises(SystemExit) as refused:
        main(["--resume", str(folder), "--set", "run.max_steps=2"])
    assert refused.value.code == 2 and "torchrun" in capsys.readouterr().err

    # Resumed on one rank (a one-rank job in this process).
    monkeypatch.chdir(tmp_path)
    for key, value in {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    main(["--resume", str(folder), "--set", "run.max_steps=2"])
    steps = [r for r in RunFolder(folder).read_metrics() if "event" not in r]
    assert [(r["step"], r["policy_version"]) for r in steps] == [(1, 1), (2, 2)]
    last = RunFolder(folder).latest_complete_checkpoint()
    assert last is not None and last.step == 2
    resumed = torch.load(last.path / "learner.pt", weights_only=True)
    assert resumed["world_size"] == 1 and resumed["policy_version"] == 2


def qwen_7b_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "Qwen2.5-7B-shaped"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN25_7B))
    return folder


def test_a_7b_model_that_cannot_fit_is_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = qwen_7b_folder(tmp_path)
    args = ["--model", str(model), "--out", str(tmp_path / "runs"), "--set", "learner.memory.capacity_gib=80"]
    with pytest.raises(SystemExit) as refused:
        main([*args, "--set", "learner.gradient_checkpointing=false"])
    err = capsys.readouterr().err
    assert refused.value.code == 2
    assert "GiB per GPU" in err and "turn on gradient checkpointing" in err
    assert not (tmp_path / "runs").exists()  # refused before the run folder, engines or weights
    # The paper's settings (checkpointing on, chunked log-probs) fit the same GPU, alone or sharded.
    config = load_config(None, [f"model.path={model}", "learner.memory.capacity_gib=80"])
    for ranks in (1, 4):
        estimate = check_memory(config, model, world_size=ranks, sharded=ranks > 1, on_gpu=True)
        assert estimate is not None and estimate.total < 0.95 * 80 * GIB
    off = load_config(
        None,
        [f"model.path={model}", "learner.memory.capacity_gib=80", "learner.gradient_checkpointing=false"],
    )
    with pytest.raises(MemoryBudgetError, match="GiB"):
        check_memory(off, model, world_size=4, sharded=True, on_gpu=True)


def test_under_torchrun_every_rank_stops_when_the_model_cannot_fit(tmp_path: Path) -> None:
    model = qwen_7b_folder(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "envtune.runtime.cli.run", "--model", str(model), "--set", "learner.memory.capacity_gib=80",
            "--set", "learner.gradient_checkpointing=false",
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode != 0
    assert "turn on gradient checkpointing" in done.stderr
    assert not (tmp_path / "runs").exists()
