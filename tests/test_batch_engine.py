"""The bounded-batch engine model: latency per its formula, the batch bound, FIFO admission."""

from __future__ import annotations

import asyncio

import pytest
from envtune.agents.engine import GenerateRequest, SamplingParams
from envtune.runtime.testing.batch_engine import BatchedEngineModel, BatchLatency
from envtune.runtime.testing.fake_engine import run_virtual

LATENCY = BatchLatency(max_running=2, step_base_s=0.01, step_per_request_s=0.005, prefill_s_per_token=0.001)


def shaped(shapes: dict[str, tuple[int, int]]) -> BatchedEngineModel:
    return BatchedEngineModel(LATENCY, lambda r: shapes[str(r.affinity_key)])


async def serve(engine: BatchedEngineModel, keys: list[str], gap_s: float = 0.0) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    done: dict[str, float] = {}
    t0 = loop.time()

    async def one(key: str, delay: float) -> None:
        await asyncio.sleep(delay)
        await engine.generate(
            GenerateRequest((1,), SamplingParams(max_new_tokens=1000), affinity_key=key)
        )
        done[key] = loop.time() - t0

    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(engine.run())
        async with asyncio.TaskGroup() as inner:
            for i, key in enumerate(keys):
                inner.create_task(one(key, i * gap_s))
        await engine.close()
        runner.cancel()
    return done


def test_a_lone_request_takes_prefill_then_its_tokens_at_batch_one() -> None:
    engine = shaped({"a": (100, 20)})
    done = run_virtual(serve(engine, ["a"]))
    assert done["a"] == pytest.approx(100 * 0.001 + 20 * LATENCY.step_s(1))
    stats = engine.statistics()
    assert stats.generated_tokens == 20 and stats.prefill_tokens == 100 and stats.calls == 1


def test_two_requests_share_the_batch_and_each_runs_slower() -> None:
    engine = shaped({"a": (0, 10), "b": (0, 10)})
    done = run_virtual(serve(engine, ["a", "b"]))
    assert done["a"] == pytest.approx(10 * LATENCY.step_s(2))
    assert done["b"] == pytest.approx(10 * LATENCY.step_s(2))
    assert engine.statistics().batch_token_s == pytest.approx(2 * 10 * LATENCY.step_s(2))


def test_the_running_batch_is_bounded_and_admission_is_fifo() -> None:
    engine = shaped({"a": (0, 10), "b": (0, 30), "c": (0, 10)})
    done = run_virtual(serve(engine, ["a", "b", "c"]))
    # c waits for a slot: it starts when a ends (10 steps at batch 2), then shares with b.
    t_a = 10 * LATENCY.step_s(2)
    assert done["a"] == pytest.approx(t_a)
    assert done["c"] == pytest.approx(t_a + 10 * LATENCY.step_s(2))
    assert done["b"] == pytest.approx(done["c"] + 10 * LATENCY.step_s(1))
    assert done["a"] < done["c"] < done["b"]


def test_a_stall_delays_decoding() -> None:
    engine = shaped({"a": (0, 10)})

    async def main() -> dict[str, float]:
        engine.stall(0.5)
        return await serve(engine, ["a"])

    done = run_virtual(main())
    assert done["a"] == pytest.approx(0.5 + 10 * LATENCY.step_s(1))
    assert engine.statistics().stalled_s == pytest.approx(0.5)


def test_the_latency_model_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BatchLatency(max_running=0)
    with pytest.raises(ValueError):
        BatchLatency(step_base_s=0.0, step_per_request_s=0.0)
    assert LATENCY.tokens_per_s(2) == pytest.approx(2 / 0.02)
