"""``benchmarks/gpu_check.py --cpu``: the prepared GPU check runs end to end at tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_every_phase_on_cpu() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--budget-s", "900"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["skipped"] == []
    names = [run["name"] for run in r["learner"]]
    assert names == ["short_no_checkpointing", "short_checkpointing", "long_checkpointing"]
    for run in r["learner"]:
        assert run["tokens_per_s"] > 0 and run["estimate_gib"] > 0 and "oom" not in run
    short_plain, short_ckpt, long_ckpt = r["learner"]
    # Checkpointing recomputes, it does not change the step: same batch, same gradient.
    assert abs(short_plain["grad_norm"] - short_ckpt["grad_norm"]) <= 1e-5 * short_plain["grad_norm"]
    assert long_ckpt["longest"] == 512 > short_plain["longest"]
    assert r["logprob_memory"]["full_ok"] and r["logprob_memory"]["chunked_ok"]
    engine = r["engine"]
    assert engine["batch_1"]["generated"] > 0 and engine["batch_4"]["generated"] > 0
