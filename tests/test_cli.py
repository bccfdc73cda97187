"""envtune-run and envtune-eval: arguments, config resolution, and one real smoke run of each.

The smoke run is the whole pipeline on the tiny model (embedded engine behind the SGLang-protocol
server, BFCL episodes, LoRA learner, adapter publishing): one learner step, then a resume from the
checkpoint that leaves, then an evaluation of the trained adapter. Its run folder is then checked as
a user reads it: TensorBoard's own reader, ``datasets`` on the trajectories, the JSON log, and the
README's run-folder section (every file and every metric name the run wrote is documented). Another
run is stopped with SIGINT and must still exit cleanly with its folder and report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from envtune.runtime.cli.evaluate import main as eval_main
from envtune.runtime.cli.run import build_arg_parser, main, resolve_config
from envtune.runtime.cli.serve import main as serve_main
from envtune.runtime.recipe import glossary
from envtune.runtime.recipe.config import Config, load_config
from envtune.runtime.recipe.run_folder import RunFolder
from envtune.runtime.testing.smoke import smoke_args

REPO = Path(__file__).resolve().parent.parent

# Two short stages, tiny groups, short replies: each learner step is a few seconds on 2 cores.


def test_help_of_both_commands(capsys: pytest.CaptureFixture[str]) -> None:
    for entry in (main, eval_main, serve_main):
        with pytest.raises(SystemExit) as info:
            entry(["--help"])
        assert info.value.code == 0
    text = capsys.readouterr().out
    assert "envtune-run" in text and "--resume" in text and "--launch-sglang" in text
    assert "envtune-eval" in text and "--adapter" in text and "--list-keys" in text
    assert "envtune-serve" in text


def test_installed_console_scripts_answer_help() -> None:
    for name in ("envtune-run", "envtune-eval", "envtune-serve", "envtune-export"):
        script = Path(sys.executable).parent / name
        assert script.exists(), f"{name} is not installed; pip install -e '.[dev]'"
        done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and name in done.stdout


def test_config_resolution() -> None:
    parser = build_arg_parser()
    cpu, folder, checkpoint = resolve_config(parser.parse_args([]))
    assert cpu.engine.kind == "embedded" and cpu.run.name == "cpu-default" and folder is checkpoint is None
    paper, _, _ = resolve_config(parser.parse_args(["--model", "/m", "--sglang", "http://a:1,http://b:2"]))
    assert paper.engine.kind == "sglang" and paper.engine.sglang.urls == ("http://a:1", "http://b:2")
    assert paper.curriculum == Config().curriculum and paper.rollout.group_size == 16
    launch, _, _ = resolve_config(parser.parse_args(["--model", "/m", "--launch-sglang", "--out", "/tmp/x"]))
    assert launch.engine.kind == "launch" and launch.run.out_dir == "/tmp/x"
    assert resolve_config(parser.parse_args(["--preset", "cpu"]))[0] == cpu
    assert resolve_config(parser.parse_args(["--preset", "paper"]))[0] == Config()


def test_a_users_toml_is_laid_over_the_chosen_preset(tmp_path: Path) -> None:
    """The README's promise: a TOML file goes over the paper preset, or over the CPU one with
    ``--preset cpu``; tables merge key by key, ``--set`` goes last."""
    mine = tmp_path / "my.toml"
    mine.write_text('[rollout]\ngroup_size = 12\n\n[run]\nname = "mine"\n')
    parser = build_arg_parser()
    cpu, _, _ = resolve_config(parser.parse_args([]))
    over_cpu, _, _ = resolve_config(parser.parse_args(["--preset", "cpu", str(mine), "--set", "run.seed=7"]))
    assert (over_cpu.rollout.group_size, over_cpu.run.name, over_cpu.run.seed) == (12, "mine", 7)
    # Everything the file does not name is the CPU preset's, including keys beside it in [rollout].
    assert over_cpu.rollout.groups_per_step == cpu.rollout.groups_per_step == 4
    assert over_cpu.curriculum == cpu.curriculum and over_cpu.sampling == cpu.sampling
    over_paper, _, _ = resolve_config(parser.parse_args([str(mine)]))
    assert over_paper.rollout.group_size == 12 and over_paper.rollout.groups_per_step == 32
    assert over_paper.curriculum == Config().curriculum


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "rollout.nope=1"], "unknown key 'rollout.nope'"),
        (["--launch-sglang"], "needs model.path"),
        (["--set", "sampling.top_p=0.5"], "training needs temperature > 0, top_p = 1"),
        (["missing.toml"], "does not exist"),
        (["x.toml", "--resume"], "--resume uses the run's own config.toml"),
        (["--preset", "cpu", "--resume"], "--resume uses the run's own config.toml"),
        (["-v", "-q"], "not allowed with argument"),
        (["--set", 'metrics.sinks=["mlflow"]'], "metrics.sinks"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_print_config_round_trips(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    main(["--print-config", "--set", "rollout.group_size=3"])
    path = tmp_path / "printed.toml"
    path.write_text(capsys.readouterr().out)
    assert load_config(path).rollout.group_size == 3
    main(["--list-keys"])
    assert "curriculum.stages.<n|name|*>.promotion.max_steps" in capsys.readouterr().out


def _run(args: list[str], cwd: Path, stderr: Path) -> subprocess.Popen[str]:
    with stderr.open("w") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "envtune.runtime.cli.run", *args],
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
        )


def _steps(folder: Path) -> list[int]:
    return [r["step"] for r in RunFolder(folder).read_metrics() if "event" not in r]


SMOKE_ARGS = smoke_args(
    "run.checkpoint_every=0",
    "run.trajectories.mode=all",
)


def test_sigint_stops_cleanly_and_still_reports(tmp_path: Path) -> None:
    log_path = tmp_path / "stderr.log"
    process = _run(SMOKE_ARGS, tmp_path, log_path)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if "supervisor.started" in log_path.read_text():
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    err = log_path.read_text()
    assert process.returncode == 130, err[-3000:]  # 128 + SIGINT: a scheduler reads it as interrupted
    assert "stop_requested" in err and "supervisor.stopped" in err
    last = out.strip().splitlines()[-1]
    assert last.startswith("runs/") and (tmp_path / last / "report" / "index.html").exists()
    assert (tmp_path / last / "config.toml").exists()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One learner step of stage 1 (the checkpoint is the one written when the run stops), then a
    resume for step 2; returns the run folder."""
    tmp_path = tmp_path_factory.mktemp("smoke")
    process = _run([*SMOKE_ARGS, "--set", "run.max_steps=1"], tmp_path, tmp_path / "first.log")
    out, _ = process.communicate(timeout=240)
    assert process.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    folder = tmp_path / out.strip().splitlines()[-1]  # the contract: the run folder is the last line
    assert folder.parent == tmp_path / "runs" and _steps(folder) == [1]
    checkpoint = RunFolder(folder).latest_complete_checkpoint()
    assert checkpoint is not None and checkpoint.step == 1
    assert (checkpoint.path / "adapter" / "adapter_config.json").exists()
    # Resume: step 2 runs in stage 2 (stage 1's budget of one step was spent and promoted).
    resumed = _run(["--resume", str(folder), "--set", "run.max_steps=2"], tmp_path, tmp_path / "second.log")
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert out.strip().splitlines()[-1] == str(folder)
    return folder


def test_smoke_run_resume_and_eval(smoke_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = smoke_run
    records = RunFolder(folder).read_metrics()
    steps = [r for r in records if "event" not in r]
    assert [(r["step"], r["stage_name"]) for r in steps] == [(1, "syntax"), (2, "hints")]
    assert [r["step"] for r in records if r.get("event") == "promotion"] == [1, 2]
    assert steps[1]["policy_version"] == 2  # the resumed learner continued from version 1
    assert RunFolder(folder).latest_complete_checkpoint().step == 2  # type: ignore[union-attr]
    page = (folder / "report" / "index.html").read_text()
    assert "rewards.png" in page and "syntax" in page
    assert (folder / "report" / "rewards.png").read_bytes()[:4] == b"\x89PNG"
    # 3. Evaluate the run's final adapter (step 2's checkpoint) on one validation task: eval.json goes
    #    into the run folder, and --json prints it.
    capsys.readouterr()
    eval_main(
        [
            "--run", str(folder), "--json", "--no-progress",
            "--set", "tasks.split=validation", "--set", "tasks.categories=base", "--limit", "1",
            "--set", "conditions.episode.max_steps_per_turn=1", "--set", "sampling.max_new_tokens=16",
            "--set", "logging.format=json",
        ]
    )  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((folder / "eval.json").read_text())
    assert result["checkpoint_step"] == 2 and result["adapter"].endswith("step-000002/adapter")
    suite = result["suites"]["bfcl-v3"]
    assert suite["tasks"] == 1 and set(suite["categories"]) == {"base"}
    assert 0.0 <= suite["accuracy"] <= 1.0 and suite["errors"] == 0


def test_tensorboard_reads_the_runs_events(smoke_run: Path) -> None:
    """TensorBoard is on in the CPU preset: its own reader loads both runs' (first and resumed) steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(smoke_run / "tensorboard"))
    accumulator.Reload()
    tags = accumulator.Tags()
    expected = {"learner/loss", "learner/entropy", "learner/grad_norm", "train/reward", "curriculum/stage"}
    assert expected <= set(tags["scalars"]), sorted(tags["scalars"])
    assert [e.step for e in accumulator.Scalars("learner/loss")] == [1, 2]
    assert [e.value for e in accumulator.Scalars("curriculum/stage")] == [1.0, 2.0]
    assert "config" in tags["tensors"]  # the run config, attached as a text summary


def test_trajectories_load_as_a_dataset(smoke_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    table = datasets.load_dataset(
        "json",
        data_files=str(smoke_run / "trajectories.jsonl"),
        split="train",
        cache_dir=str(smoke_run.parent / "hf-cache"),
    )
    # group_size 2, one group per step, two steps; a group finished as the run was ending is
    # logged too, with its reason.
    trained = [row for row in table if row["drop_reason"] is None]
    assert sorted(row["step"] for row in trained) == [1, 1, 2, 2]
    assert {row["stage"] for row in trained} == {1, 2} and set(table["category"]) == {"base"}
    assert set(table["drop_reason"]) <= {None, "run_ending"}
    for row in table:
        roles = [m["role"] for m in row["messages"]]
        assert roles[:2] == ["system", "user"] and "assistant" in roles
        replies = [m for m in row["messages"] if m["role"] == "assistant"]
        assert [m["step_code"] for m in replies] == row["step_codes"]
        assert row["completion_tokens"] > 0 and row["prompt_tokens"] > 0


def test_log_file_holds_every_event_in_full(smoke_run: Path) -> None:
    events = [json.loads(line) for line in (smoke_run / "log.jsonl").read_text().splitlines()]
    names = {e["event"] for e in events}
    assert {"run_started", "engines_ready", "run_finished"} <= names
    assert all("timestamp" in e and "level" in e for e in events)


def test_readme_documents_the_run_folder_and_every_metric(smoke_run: Path) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert glossary.readme_block(readme) == glossary.render(), (
        "README.md's glossary is stale: python -m envtune.runtime.recipe.glossary --write"
    )
    section = readme.partition("## The run folder")[2].partition("\n## ")[0]
    for entry in smoke_run.iterdir():
        name = entry.name + ("/" if entry.is_dir() else "")
        assert f"`{name}" in section, f"the README's run-folder section does not list {name}"
    names = glossary.step_metrics()
    events = glossary.event_fields()
    for record in RunFolder(smoke_run).read_metrics():
        kind = record.get("event")
        known = names if kind is None else events[kind]
        missing = [key for key in record if not glossary.matches(key, known)]
        assert not missing, f"{kind or 'step'} record keys missing from the glossary: {missing}"
