"""The runtime side of reliability: an engine that is gone ends a rollout with one error, one bad task
is one failed task, run folders are cleaned of a killed process's leftovers, failures read as one
line (reviews/reliability.md D4, D11, D17, D19)."""

from __future__ import annotations

import asyncio
import errno
import json
from pathlib import Path
from typing import Any

import pytest
import structlog
from envtune.agents.engine import EngineError, EngineUnavailable, GenerateRequest
from envtune.agents.trajectory import Trajectory
from envtune.runtime.actors import Mailbox
from envtune.runtime.cli.exits import describe_failure, leaves, signal_exit_code
from envtune.runtime.logs import LogThrottle
from envtune.runtime.recipe import evaluation
from envtune.runtime.recipe.run_folder import RunFolder
from envtune.runtime.records import DropReason, IteratorTaskSource, TaskSpec, TrajectoryGroup
from envtune.runtime.rollout import RolloutActor, RolloutConfig
from envtune.runtime.testing.fake_engine import LatencyModel, LatencyModelEngine, run_virtual
from envtune.runtime.weight_sync import WeightSyncError


def trajectory(task_id: str, group_id: str) -> Trajectory:
    return Trajectory(
        task_id=task_id,
        group_id=group_id,
        token_ids=(1, 2, 3),
        loss_mask=(False, True, True),
        behavior_logprobs=(0.0, -1.0, -1.0),
        policy_versions=(-1, 0, 0),
        reward=0.0,
        progress=0.0,
        format_reward=1.0,
        tool_reward=0.0,
        turn_passed=(False,),
        step_codes=(1,),
        stage=0,
        start_version=0,
    )


def test_an_engine_that_is_gone_ends_the_rollout_with_one_error() -> None:
    gone_after = 40

    def fault(request: GenerateRequest, index: int) -> EngineError | None:
        if index >= gone_after:
            return EngineUnavailable("no SGLang server answered for 90 s")
        return None

    engine = LatencyModelEngine(LatencyModel(fixed_s=1.0, per_token_s=0.0), lambda _r: (5,), fault_fn=fault)

    async def runner(task: TaskSpec, group_id: str, start_version: int) -> Trajectory:
        await engine.generate(GenerateRequest((1, 2)))
        return trajectory(task.task_id, group_id)

    async def main() -> tuple[RolloutActor, list[TrajectoryGroup], list[dict[str, Any]]]:
        sink: Mailbox[TrajectoryGroup] = Mailbox("learner", 10_000)
        config = RolloutConfig(group_size=4, max_concurrent_episodes=16, max_staleness=None)
        endless = IteratorTaskSource(TaskSpec(f"t{i}") for i in range(10**9))
        actor = RolloutActor(config, endless, runner, sink)
        with structlog.testing.capture_logs() as logs:
            async with asyncio.TaskGroup() as group:
                run = group.create_task(actor.run())
                await actor.failed.wait()
                await actor.stop()
                await run
        received = []
        while sink.statistics().depth:
            received.append(await sink.receive())
        return actor, received, logs  # type: ignore[return-value]

    actor, received, logs = run_virtual(main())
    stats = actor.statistics()
    assert isinstance(actor.engine_failure, EngineUnavailable)
    # Dispatch stopped at once: only the episodes already in flight ran into the dead engine.
    assert stats.episodes_started <= gone_after + 16 + 4
    assert stats.episodes_started == stats.episodes_completed + stats.episodes_dropped
    assert stats.episodes_completed == sum(len(g.trajectories) for g in received)
    assert set(stats.dropped_by_reason) <= {
        DropReason.ENGINE_ERROR,
        DropReason.CANCELLED,
        DropReason.GROUP_INCOMPLETE,
    }
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["rollout.engine_unavailable"]


def test_engine_errors_are_throttled_not_one_line_per_episode() -> None:
    clock = [0.0]
    throttle = LogThrottle(interval_s=10.0, clock=lambda: clock[0])
    assert throttle.allow("x") == 0
    assert [throttle.allow("x") for _ in range(1000)] == [None] * 1000
    assert throttle.allow("y") == 0  # keys are independent
    clock[0] = 10.0
    assert throttle.allow("x") == 1000  # the next line says how many were held back
    assert throttle.allow("x") is None


def test_one_failing_task_is_one_failed_result(monkeypatch: pytest.MonkeyPatch) -> None:
    from envtune.environments.episode import BfclEnvironment
    from envtune.runtime.recipe.config import EvalConditions

    env = BfclEnvironment()
    ids = list(env.tasks)[:5]
    failures: dict[str, BaseException] = {
        ids[0]: ValueError("Exceeds the limit (4300 digits) for integer string conversion"),
        ids[1]: UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        ids[2]: TypeError("float() argument must be a string or a real number, not 'NoneType'"),
        ids[3]: EngineError("HTTP 400: bad", retryable=False),
    }

    async def fake_run_episode(
        engine: Any, episode: Any, chat: Any, agent: Any, *, task_id: str, **_: Any
    ) -> Any:
        await asyncio.sleep(0)
        if task_id in failures:
            raise failures[task_id]
        return trajectory(task_id, "g")

    monkeypatch.setattr(evaluation, "run_episode", fake_run_episode)
    results = asyncio.run(
        evaluation.evaluate_tasks(
            object(),  # type: ignore[arg-type]
            env,
            object(),  # type: ignore[arg-type]
            ids,
            sampling=evaluation.SamplingConfig(temperature=0.0),
            conditions=EvalConditions(concurrency=2),
        )
    )
    assert [r.task_id for r in results] == ids
    assert [r.error is not None for r in results] == [True, True, True, True, False]
    assert "4300 digits" in (results[0].error or "") and not any(r.passed for r in results[:4])
    # An engine that is gone is not a task failure: the evaluation ends with that one error.
    failures[ids[4]] = EngineUnavailable("no SGLang server answered")
    with pytest.raises(EngineUnavailable):
        asyncio.run(
            evaluation.evaluate_tasks(
                object(),  # type: ignore[arg-type]
                env,
                object(),  # type: ignore[arg-type]
                ids,
                sampling=evaluation.SamplingConfig(temperature=0.0),
                conditions=EvalConditions(concurrency=5),
            )
        )


def test_leftovers_of_a_killed_process_are_removed_and_torn_lines_repaired(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path, "run")
    folder.write_config("x = 1\n")
    folder.save_checkpoint(1, {"policy_version": 1})
    folder.append_metrics({"step": 1, "loss": 0.5})
    # What SIGKILLs at various points leave behind.
    (folder.checkpoints_dir / ".step-000002-abc").mkdir()
    (folder.checkpoints_dir / ".step-000002-abc" / "learner.pt").write_bytes(b"half")
    (folder.checkpoints_dir / ".trash-xyz" / "step-000001").mkdir(parents=True)
    (folder.path / ".metrics.jsonl.tmp1").write_text("partial")
    (folder.path / "adapters" / ".tmp-1").mkdir(parents=True)
    (folder.path / "adapters" / ".old-2").mkdir(parents=True)
    with folder.metrics_path.open("a") as handle:
        handle.write('{"step": 2, "lo')  # a record cut by the kill
    reopened = RunFolder.open(folder.path)
    leftovers = [p for p in folder.path.rglob(".*")]
    assert leftovers == []
    assert [c.step for c in reopened.checkpoints()] == [1]
    with structlog.testing.capture_logs() as logs:
        reopened.truncate_after(1)
    assert any(e["event"] == "run_folder_skipped_torn_line" for e in logs)  # reported
    lines = folder.metrics_path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]  # repaired


def test_failures_read_as_one_line_and_signals_as_their_exit_codes() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/.step-1/learner.pt")
    group = ExceptionGroup("actors", [ExceptionGroup("learner", [full])])
    assert leaves(group) == [full]
    line = describe_failure(group, "/runs/x")
    assert line is not None and "no space left" in line and "--out" in line and "\n" not in line
    read_only = describe_failure(OSError(errno.EROFS, "Read-only file system"), "/runs/x")
    assert read_only is not None and "/runs/x" in read_only and "writable" in read_only
    gone = describe_failure(WeightSyncError("loading policy-v3 failed: no SGLang server answered"), "/r")
    assert gone is not None and "no SGLang server answered" in gone
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "no space left" in (describe_failure(ExceptionGroup("g", [rust]), "/runs/x") or "")
    assert describe_failure(ExceptionGroup("bug", [KeyError("x")]), "/r") is None  # a bug keeps its traceback
    assert (signal_exit_code(2), signal_exit_code(15)) == (130, 143)


def test_published_adapter_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from envtune.runtime.weight_sync import AdapterPublisher

    class Engine:
        """A weight-sync target in another process: only an absolute path means the same folder."""

        def __init__(self) -> None:
            self.paths: list[str] = []

        async def load_adapter(self, name: str, path: str, *, version: int) -> None:
            self.paths.append(path)

        async def unload_adapter(self, name: str) -> None: ...

    class Source:
        def save_adapter(self, folder: Path) -> int:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "adapter_config.json").write_text("{}")
            return 1

    monkeypatch.chdir(tmp_path)
    engine = Engine()
    adapter = asyncio.run(AdapterPublisher(Path("runs/x/adapters"), [engine]).publish(Source()))  # type: ignore[list-item]
    assert Path(engine.paths[0]).is_absolute() and Path(engine.paths[0]) == tmp_path / "runs/x/adapters/v1"
    assert adapter.path.is_absolute()
