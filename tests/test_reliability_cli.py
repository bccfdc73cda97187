"""``envtune-run`` ends the way users and schedulers need: one clear line and a non-zero exit for bad
input or a failure, 130/143 for a signal, nothing overwritten, a second signal ends it at once
(reviews/reliability.md D11, D17). Each case runs the real entry point in a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from envtune.runtime.recipe.run_folder import RunFolder
from envtune.runtime.testing.smoke import smoke_args

SMOKE_ARGS = smoke_args(
    "run.checkpoint_every=1",
)


def start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "envtune.runtime.cli.run", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(args: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str, str]:
    process = start(args, cwd)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


@pytest.mark.parametrize(
    ("setup", "args", "needle"),
    [
        (lambda d: (d / "c.toml").write_bytes(b'[run]\nname = "\xff\xfe"\n'), ["c.toml"], "not UTF-8"),
        (lambda d: (d / "folder.toml").mkdir(), ["folder.toml"], "is a folder"),
        (lambda d: None, ["--set", "learner.lr=nan"], "learner.lr"),
        (lambda d: None, ["--set", "learner.lr=inf"], "lr must be a finite number"),
        (lambda d: None, ["--sglang", "not a url", "--model", "."], "not an http"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(
    tmp_path: Path, setup: object, args: list[str], needle: str
) -> None:
    setup(tmp_path)  # type: ignore[operator]
    code, _, err = run(args, tmp_path, timeout=120)
    assert code == 2 and needle in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_an_unwritable_output_folder_is_one_line_and_nothing_is_written(tmp_path: Path) -> None:
    code, _, err = run(["--out", "/sys/envtune-cannot-write-here"], tmp_path, timeout=120)
    assert code == 1 and "Traceback" not in err, err[-2000:]
    [line] = error_lines(err)
    assert "cannot write" in line and "run.out_dir" in line


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_engine_fails_fast_with_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    preset = Path(__file__).resolve().parents[1] / "runtime" / "recipe" / "presets" / "cpu.toml"
    args = [
        str(preset),
        "--model",
        str(tiny_model_dir),
        "--sglang",
        url,
        "--set",
        "engine.sglang.outage_timeout_s=3",
    ]
    code, out, err = run([*args, *SMOKE_ARGS], tmp_path, timeout=300)
    assert code == 1 and "Traceback" not in err, err[-3000:]
    [line] = error_lines(err)
    assert "no SGLang server answers /health" in line and url in line
    warnings = [line for line in err.splitlines() if '"warning"' in line]
    assert len(warnings) < 10  # not one line per dropped episode
    folder = tmp_path / out.strip().splitlines()[-1]
    assert (folder / "report" / "index.html").exists()  # the run folder still gets its report


def test_ctrl_c_while_starting_exits_130_without_a_traceback(tmp_path: Path) -> None:
    process = start(SMOKE_ARGS, tmp_path)
    time.sleep(2.0)  # imports and engine start: before the run's own handlers, or just after
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130 and "Traceback" not in err, err[-3000:]


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("needs permission to mount a small tmpfs (root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_second_signal_aborts_at_once_and_a_full_disk_is_one_line(tmp_path: Path) -> None:
    # A second signal: the user wants out now, without a traceback.
    process = start(SMOKE_ARGS, tmp_path)
    assert process.stderr is not None
    for line in process.stderr:
        if "supervisor.started" in line:
            break
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "aborting now" in err and "Traceback" not in err, err[-3000:]
    # A disk that fills up during the run: one line naming it, exit 1, no half checkpoint.
    with small_filesystem(tmp_path / "small", "160k") as out:
        code, _, err = run(
            [*SMOKE_ARGS, "--out", str(out), "--set", "run.max_steps=3"], tmp_path, timeout=900
        )
        assert code == 1 and "Traceback" not in err, err[-3000:]
        [line] = error_lines(err)
        assert "no space left" in line, line
        for folder in out.iterdir():
            run_folder = RunFolder(folder)
            assert all((c.path / "COMPLETE").exists() for c in run_folder.checkpoints())
