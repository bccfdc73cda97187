"""Metrics recorder and the latency-model engine / virtual clock it is tested with."""

from __future__ import annotations

import asyncio
import json

import pytest
from envtune.agents.engine import Engine, EngineError, GenerateRequest, SamplingParams
from envtune.agents.trajectory import Trajectory
from envtune.runtime.actors import Mailbox
from envtune.runtime.metrics import MetricsRecord, MetricsRecorder, SampleNow
from envtune.runtime.records import IteratorTaskSource, TaskSpec, TrajectoryGroup
from envtune.runtime.rollout import RolloutActor, RolloutConfig
from envtune.runtime.supervisor import Supervisor
from envtune.runtime.testing.fake_engine import (
    LatencyModel,
    LatencyModelEngine,
    VirtualClockDeadlock,
    run_virtual,
)


def test_latency_model_engine_sleeps_per_model_and_counts() -> None:
    async def main() -> None:
        engine = LatencyModelEngine(LatencyModel(fixed_s=0.5, per_token_s=0.25), lambda r: (1, 2, 3, 4))
        assert isinstance(engine, Engine)
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with asyncio.TaskGroup() as tg:
            calls = [tg.create_task(engine.generate(GenerateRequest((9,)))) for _ in range(100)]
        assert loop.time() - start == pytest.approx(1.5)  # 100 overlapping calls: infinitely parallel
        (completion,) = calls[0].result()
        assert completion.token_ids == (1, 2, 3, 4) and len(completion.logprobs) == 4
        assert completion.prompt_tokens == 1 and completion.policy_version == 0
        stats = engine.statistics()
        assert (stats.calls, stats.generated_tokens) == (100, 400)
        assert (stats.peak_in_flight, stats.in_flight) == (100, 0)
        assert stats.modeled_s == pytest.approx(150.0)
        many = await engine.generate(GenerateRequest((9,), SamplingParams(n=3)))
        assert len(many) == 3
        engine.policy_version = 7
        assert (await engine.generate(GenerateRequest((9,))))[0].policy_version == 7
        await engine.close()
        with pytest.raises(EngineError, match="closed"):
            await engine.generate(GenerateRequest((9,)))

    run_virtual(main())


def test_virtual_clock_reports_a_deadlock_instead_of_hanging() -> None:
    async def main() -> None:
        await asyncio.Event().wait()

    from envtune.runtime.testing.fake_engine import VirtualClockLoop

    loop = VirtualClockLoop(idle_limit_s=0.01)
    try:
        with pytest.raises(VirtualClockDeadlock):
            loop.run_until_complete(main())
    finally:
        loop.close()


def test_latency_model_validates() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        LatencyModel(fixed_s=-1.0)


async def _episode(task: TaskSpec, group_id: str, start_version: int) -> Trajectory:
    await asyncio.sleep(2.0)
    return Trajectory(
        task_id=task.task_id,
        group_id=group_id,
        token_ids=(1, 2, 3),
        loss_mask=(False, True, True),
        behavior_logprobs=(0.0, -1.0, -1.0),
        policy_versions=(-1, 0, 0),
        reward=0.0,
        progress=0.0,
        format_reward=0.0,
        tool_reward=0.0,
        turn_passed=(False,),
        step_codes=(0,),
        stage=0,
        start_version=start_version,
    )


def test_recorder_samples_rates_and_depth_periodically() -> None:
    async def main() -> None:
        sink: Mailbox[TrajectoryGroup] = Mailbox("learner", 1000)
        config = RolloutConfig(max_concurrent_episodes=10, group_size=2, max_staleness=None)
        specs = [TaskSpec(f"t{i}") for i in range(20)]
        rollout = RolloutActor(config, IteratorTaskSource(specs), _episode, sink)
        written: list[str] = []
        recorder = MetricsRecorder(
            rollout,
            sink.statistics,
            interval_s=1.0,
            on_record=lambda record: written.append(json.dumps(record.as_dict())),
        )

        async def drive() -> None:
            await rollout.wait_until_done()
            await recorder.send(SampleNow("done"))
            await asyncio.sleep(1.5)  # one more periodic record after the last completion

        await Supervisor([recorder, rollout]).run(drive())
        records = recorder.records()
        assert records[0].label == "start" and records[-1].label == "final"
        assert any(r.label == "done" for r in records)
        assert len(written) == len(records)
        periodic = [r for r in records if r.label == ""]
        # 40 episodes, 10 at a time, 2 s each: 8 s of work, 5 episodes/s and 10 tokens/s while running.
        assert periodic[0].interval_s == pytest.approx(1.0)
        assert max(r.episodes_per_s for r in periodic) == pytest.approx(10.0)  # 5 groups land at once
        assert sum(r.episodes_per_s * r.interval_s for r in records) == pytest.approx(40)
        assert sum(r.tokens_per_s * r.interval_s for r in records) == pytest.approx(80)
        assert max(r.in_flight for r in periodic) == 10
        last = records[-1]
        assert (last.episodes_completed, last.episodes_dropped, last.in_flight) == (40, 0, 0)
        assert last.queue_depth == 20 and last.queue_capacity == 1000
        assert dict(last.staleness) == {0: 20}
        decoded = json.loads(written[-1])
        assert decoded["staleness"] == {"0": 20} and decoded["label"] == "final"

    run_virtual(main())


def test_record_is_json_ready() -> None:
    record = MetricsRecord(
        time_s=1.0,
        interval_s=1.0,
        episodes_per_s=2.0,
        tokens_per_s=3.0,
        episodes_started=4,
        episodes_completed=2,
        episodes_dropped=1,
        dropped_by_reason={"stale": 1},
        in_flight=1,
        queue_depth=0,
        queue_capacity=8,
        policy_version=3,
        staleness={1: 2},
    )
    assert json.loads(json.dumps(record.as_dict()))["dropped_by_reason"] == {"stale": 1}
    with pytest.raises(ValueError, match="interval_s"):
        MetricsRecorder(None, interval_s=0)  # type: ignore[arg-type]
