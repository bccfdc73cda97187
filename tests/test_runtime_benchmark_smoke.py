"""Smoke run of the throughput benchmark's worker: real BFCL episodes through the rollout actor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "runtime_throughput.py"


def test_one_small_level_runs_and_replays_the_same_calls() -> None:
    job = {
        "concurrency": 32,
        "episodes": 32,
        "seed": 3,
        "clock": "virtual",
        "replays": True,
        "replay_waves": 2,
        "fixed_s": 0.5,
        "per_token_s": 0.03,
    }
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    full, replay, sync = result["full_async"], result["replay_async"], result["replay_sync"]
    assert full["episodes"] + full["dropped"] == 32 and full["dropped"] == 0
    assert full["calls"] > 32 * 4  # every BFCL task needs several replies
    # Two waves of 32 replay the 32 recorded episodes twice: twice the calls, in both replays.
    assert replay["calls"] == sync["calls"] == 2 * full["calls"]
    assert replay["episodes"] == sync["episodes"] == 64
    assert 0 < full["efficiency"] <= 1.0 + 1e-9
    assert full["env_cpu_us_per_call"] > 0
    # Lock-step batches never beat list scheduling of the same episodes.
    assert sync["episodes_per_s"] <= replay["episodes_per_s"] * (1 + 1e-6)
