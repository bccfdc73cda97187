"""The correctness checks of the quick benchmarks, as tests (their timings are not asserted here)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import async_vs_sync
import loop_capacity


def test_the_http_path_and_the_in_process_path_give_the_recorded_trajectories() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    args = argparse.Namespace(episodes=16, concurrency=16, repeats=1, seed=5)
    figures = asyncio.run(loop_capacity.measure(args))
    assert figures["trajectories_identical"] is True
    assert figures["calls_per_arm"] > 16 * 3
    assert figures["cpu_us_per_call"] > figures["inproc_us_per_call"] > 0  # HTTP costs the loop something
    parts = sum(figures[f"part_{p}"] for p in loop_capacity.PARTS)
    assert abs(parts - figures["cpu_us_per_call"]) < 1e-6 * figures["cpu_us_per_call"] + 1.0


def test_every_discipline_keeps_its_staleness_bound_and_accounts_every_episode() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    args = argparse.Namespace(
        groups_per_step=2, steps=4, warmup_steps=2, max_running=8, learner_ratio=0.43,
        distinct_groups=4, repeats=1, seed=1,
    )
    out = async_vs_sync.run(args)
    assert out["accounting_ok"] is True and out["staleness_bound_ok"] is True
    assert out["sync_max_staleness_trained"] == 0 and out["sync_overlap"] == 0.0
    assert out["one_step_off_max_staleness_trained"] <= 1
    for arm in ("sync", "one_step_off", "async_eta1", "async_eta2", "async_eta4"):
        assert out[f"{arm}_episodes_per_s"] > 0
        assert 0 <= out[f"{arm}_engine_busy"] <= 1.0 + 1e-9
