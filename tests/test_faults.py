"""The correctness checks of ``benchmarks/faults.py --quick``, as CI runs them (its timings are not
asserted): engine faults and outages, an engine that is gone, server abuse, the soak, and SIGKILLs
followed by ``--resume``. Each section runs in a subprocess and reports every failed check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

FAULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "faults.py"


def run_sections(tmp_path: Path, *sections: str, timeout: float = 3000) -> dict[str, Any]:
    only = [arg for name in sections for arg in ("--only", name)]
    done = subprocess.run(
        [sys.executable, str(FAULTS), "--quick", *only, "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-4000:]
    summary: dict[str, Any] = json.loads(lines[-1])
    assert summary["failed_checks"] == [] and done.returncode == 0, summary["failed_checks"]
    return summary


def test_engine_faults_outages_an_engine_that_is_gone_abuse_and_soak(tmp_path: Path) -> None:
    summary = run_sections(tmp_path, "engine_faults", "engine_gone", "engine_killed", "server", "soak")
    faults = summary["sections"]["engine_faults"]
    assert summary["episodes_started"] == summary["completed"] + summary["dropped"] > 0
    assert summary["duplicates"] == 0 and faults["malformed_in_trajectories"] == 0
    assert sum(faults["faults_injected"].values()) > 0 and faults["adapter_reloads"] > 0
    gone = summary["sections"]["engine_gone"]
    assert "no SGLang server" in gone["error"] and gone["warning_lines"] <= 40
    assert summary["server_deaths"] == 0 and summary["server_cases"] >= 30
    killed = summary["sections"]["engine_killed"]
    assert killed["exit"] == 1 and "no SGLang server" in killed["error"] and killed["checkpoint_step"] >= 1
    soak = summary["sections"]["soak"]
    assert soak["tasks_after"] <= soak["tasks_before"]
    assert soak["peak_mailbox_depth"] <= soak["mailbox_capacity"]


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path: Path) -> None:
    # Kept out of CI (three envtune-run processes): benchmarks/faults.py runs it, with 7 kill points.
    summary = run_sections(tmp_path, "process")
    assert summary["kills"] == summary["resumes_ok"] >= 2  # every resume took the last complete checkpoint
