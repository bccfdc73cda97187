"""Smoke run of the runtime-scale benchmark's worker: real BFCL episodes through the rollout actor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "runtime_throughput.py"


def test_one_small_level_runs_and_replays_the_same_calls() -> None:
    job = {
        "concurrency": 16,
        "episodes": 48,
        "seed": 3,
        "clock": "virtual",
        "replays": True,
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
    full, replay = result["full_async"], result["replay_async"]
    assert full["episodes"] + full["dropped"] == 48 and full["dropped"] == 0
    assert full["calls"] > 48 * 4  # every BFCL task needs several replies
    assert replay["calls"] == full["calls"] and replay["episodes"] == 48  # the same engine calls
    # Steady state (between the first and the last wave) against the zero-overhead schedule.
    assert 0 < full["efficiency"] <= 1.1  # the same window of the zero-overhead schedule
    assert 0 < full["makespan_efficiency"] <= 1.0 + 1e-9
    assert full["env_cpu_us_per_call"] > 0
