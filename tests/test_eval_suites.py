"""``envtune-eval --suite``: every suite family end to end on the tiny model, ``--run``, the errors.

The end-to-end test is one evaluation (one engine start) over BFCL V3, BFCL V4 memory (key-value) and
web search (both variants), τ² retail with a local OpenAI-compatible user simulator (a stub HTTP
server), and ACEBench's agent suite on the test fixture; a BFCL V3 task whose episode raises must
come out as one failed task with its error. The tiny model fails nearly everything, so the checks are
on the shape and the counts of what was written, which are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from envtune.environments.suite_api import SuiteTask
from envtune.environments.suites import suite_names
from envtune.environments.tau2.worker import default_python
from envtune.runtime.cli import evaluate
from envtune.runtime.recipe.config import ConfigError
from envtune.runtime.recipe.eval_output import SCHEMA_VERSION, trajectories_path
from envtune.runtime.recipe.evaluation import select_tasks
from envtune.runtime.recipe.suite_eval import BfclV3Suite, PlannedRun, ids_for_suite, plan_runs

REPO = Path(__file__).resolve().parent.parent
ACEBENCH = REPO / "tests" / "fixtures" / "acebench"
needs_ood = pytest.mark.skipif(
    not default_python().exists(), reason="needs the OOD extra environment (make setup-ood)"
)
# Short episodes: the tiny model's replies are noise, and each token costs on 2 cores.
SHORT = [
    "--set", "sampling.max_new_tokens=16",
    "--set", "conditions.episode.max_steps_per_turn=1",
    "--set", "conditions.tau2.max_steps=4",
    "--set", "conditions.acebench.max_messages=6",
    "--set", "logging.format=json",
    "--no-progress",
]  # fmt: skip


class _StubUser(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint playing the user: states a request, then ends the chat."""

    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"auth": self.headers.get("Authorization"), "body": body})
        first = len(body["messages"]) <= 2  # system prompt and the agent's greeting
        text = "Hi, I want to cancel my pending order #W0000000." if first else "Thanks! ###STOP###"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub_user() -> Iterator[str]:
    _StubUser.requests = []
    server = HTTPServer(("127.0.0.1", 0), _StubUser)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _user_args(url: str) -> list[str]:
    return [
        "--set", f"suites.tau2_user.base_url={url}",
        "--set", "suites.tau2_user.model=stub-user",
        "--set", "suites.tau2_user.temperature=0.5",
        "--set", "suites.tau2_user.api_key_env=ENVTUNE_TEST_USER_KEY",
    ]  # fmt: skip


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- end to end -------------------------------------------------------------------------------------------


@needs_ood
def test_every_suite_family_end_to_end(
    tmp_path: Path,
    stub_user: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ok_id, bad_id = select_tasks("test", ("base",), 2)
    real_make_episode = BfclV3Suite.make_episode

    def make_episode(self: BfclV3Suite, task_id: str, config: Any = None) -> Any:
        if task_id == bad_id:
            raise RuntimeError("episode exploded on purpose")
        return real_make_episode(self, task_id, config)

    monkeypatch.setattr(BfclV3Suite, "make_episode", make_episode)
    monkeypatch.setenv("ENVTUNE_TEST_USER_KEY", "user-secret")
    suites = [
        "bfcl-v3",
        "bfcl-v4-memory-kv",
        "bfcl-v4-web-search",
        "bfcl-v4-web-search-no-snippet",
        "tau2-retail",
        "acebench-agent",
    ]
    output = tmp_path / "out" / "eval.json"
    evaluate.main(
        [
            *(arg for suite in suites for arg in ("--suite", suite)),
            "--limit", "1", "--trials", "2",
            "--ids", f"bfcl-v3:{ok_id},bfcl-v3:{bad_id}",
            "--data", str(ACEBENCH),
            "--output", str(output),
            *_user_args(stub_user),
            *SHORT,
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(output)  # the contract: eval.json's path is the last line
    assert all(any(line.startswith(suite) for line in printed) for suite in suites)
    assert any("tau2_judge" in line for line in printed)  # unjudged NL assertions are said so

    result = json.loads(output.read_text())
    assert result["schema_version"] == SCHEMA_VERSION and result["complete"] is True
    assert list(result["suites"]) == suites and result["adapter"] is None and result["run"] is None
    expected_tasks = {  # scored episodes: tasks x 2 trials
        "bfcl-v3": 4,
        "bfcl-v4-memory-kv": 2,
        "bfcl-v4-web-search": 2,
        "bfcl-v4-web-search-no-snippet": 2,
        "tau2-retail": 2,
        "acebench-agent": 4,  # one multi-turn and one multi-step task
    }
    for name, suite in result["suites"].items():
        verdicts = suite["verdicts"]
        assert suite["complete"] is True
        assert suite["tasks"] == len(verdicts) == expected_tasks[name], name
        assert suite["passed"] == sum(v["passed"] for v in verdicts)
        assert sum(c["tasks"] for c in suite["categories"].values()) == suite["tasks"]
        assert 0.0 <= suite["accuracy"] <= 1.0
        assert sorted(v["trial"] for v in verdicts) == sorted([0, 1] * (len(verdicts) // 2))
        assert len({(v["task_id"], v["trial"]) for v in verdicts}) == len(verdicts)  # one per episode
    overall = result["overall"]
    assert overall["suites"] == len(suites) and overall["tasks"] == sum(expected_tasks.values())

    v3 = result["suites"]["bfcl-v3"]
    assert v3["errors"] == 2 and v3["categories"]["base"]["tasks"] == 4
    failed = [v for v in v3["verdicts"] if v["task_id"] == bad_id]
    assert len(failed) == 2 and all("episode exploded on purpose" in v["detail"]["error"] for v in failed)
    assert all("turn_passed" in v["detail"] for v in v3["verdicts"] if v["task_id"] == ok_id)

    memory = result["suites"]["bfcl-v4-memory-kv"]
    assert memory["unscored_tasks"] > 0 and set(memory["categories"]) == {"memory_kv"}
    assert memory["bfcl_v4"]["memory_backend"] == "kv"
    snippets = {name: result["suites"][name]["bfcl_v4"]["snippets"] for name in suites[2:4]}
    assert snippets == {"bfcl-v4-web-search": True, "bfcl-v4-web-search-no-snippet": False}

    tau2 = result["suites"]["tau2-retail"]
    assert set(tau2["tau2"]["pass_hat"]) == {"1", "2"} and tau2["tau2"]["nl_judge"] is None
    assert "stub-user" in tau2["tau2"]["user_simulator"] and tau2["errors"] == 0
    assert _StubUser.requests and all(r["body"]["model"] == "stub-user" for r in _StubUser.requests)
    assert {r["auth"] for r in _StubUser.requests} == {"Bearer user-secret"}
    assert {r["body"]["temperature"] for r in _StubUser.requests} == {0.5}

    ace = result["suites"]["acebench-agent"]
    assert set(ace["categories"]) == {"agent_multi_turn", "agent_multi_step"}
    assert set(ace["acebench"]["process_accuracy"]) == {"all", "agent_multi_turn", "agent_multi_step"}

    lines = _lines(trajectories_path(output))
    episodes = sum(s["tasks"] + s["unscored_tasks"] for s in result["suites"].values())
    assert len(lines) == episodes and {line["suite"] for line in lines} == set(suites)
    assert all(line["messages"] for line in lines if line["error"] is None)
    assert sum(line["error"] is not None for line in lines) == 2


def test_run_folder_evaluates_its_final_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from envtune.optim.lora import LoraSettings, attach_lora, save_adapter
    from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir
    from envtune.runtime.recipe.run_folder import RunFolder
    from transformers import AutoModelForCausalLM

    folder = RunFolder.create(tmp_path / "runs", "eval-test")
    folder.write_config('[model]\npath = ""\n\n[engine]\nkind = "embedded"\n\n[run]\nname = "eval-test"\n')
    model = attach_lora(
        AutoModelForCausalLM.from_pretrained(build_tiny_model(default_tiny_model_dir())),
        LoraSettings(rank=4, alpha=8.0),
    )
    folder.save_checkpoint(2, {"policy_version": 2}, lambda f: save_adapter(model, f / "adapter"))
    folder.save_checkpoint(3, {"policy_version": 3}, lambda f: save_adapter(model, f / "adapter"))
    (folder.checkpoints_dir / "step-000005" / "adapter").mkdir(parents=True)  # never completed
    capsys.readouterr()  # the checkpoints' log lines
    evaluate.main(
        ["--run", str(folder.path), "--suite", "bfcl-v3", "--limit", "1",
         "--set", "tasks.categories=base", "--json", *SHORT]
    )  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((folder.path / "eval.json").read_text())
    assert printed == written
    assert written["run"] == str(folder.path) and written["checkpoint_step"] == 3
    assert written["policy_version"] == 3 and written["adapter"].endswith("step-000003/adapter")
    assert written["suites"]["bfcl-v3"]["tasks"] == 1 and written["suites"]["bfcl-v3"]["errors"] == 0
    assert trajectories_path(folder.path / "eval.json").is_file()


def test_run_folder_config_supplies_model_and_engine(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(
        '[model]\npath = "/models/x"\n\n[engine]\nkind = "sglang"\n\n[engine.sglang]\n'
        'urls = ["http://h:1"]\n\n[rollout]\ngroup_size = 16\n'
    )
    args = evaluate.build_arg_parser().parse_args(["--run", str(run)])
    config = evaluate.resolve_config(args)
    assert config.model.path == "/models/x" and config.engine.kind == "sglang"
    assert config.engine.sglang.urls == ("http://h:1",)
    assert evaluate.output_path(config) == run / "eval.json"
    overridden = evaluate.resolve_config(
        evaluate.build_arg_parser().parse_args(["--run", str(run), "--model", "/models/y"])
    )
    assert overridden.model.path == "/models/y"
    with pytest.raises(ConfigError, match="not a run folder"):
        evaluate.resolve_config(evaluate.build_arg_parser().parse_args(["--run", str(tmp_path)]))


def test_interrupted_evaluation_keeps_what_finished(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (the main task cancelled) mid-suite: eval.json holds the finished episodes, marked."""
    from envtune.runtime.cli import engine_stack
    from envtune.runtime.recipe import suite_eval
    from envtune.runtime.recipe.suite_eval import EpisodeTranscript

    @contextlib.asynccontextmanager
    async def no_engine(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        yield engine_stack.EngineStack(None, tiny_model_dir, "no engine")  # type: ignore[arg-type]

    async def one_then_stop(
        engine: Any, environment: Any, chat: Any, runs: Any, *, suite: str, on_finished: Any, **kw: Any
    ) -> Any:
        verdict = suite_eval.failed_verdict(runs[0], suite, "finished before the stop")
        on_finished(
            suite_eval.EpisodeOutcome(runs[0], verdict, None, None, EpisodeTranscript().freeze(), 0.1)
        )
        raise asyncio.CancelledError

    monkeypatch.setattr(engine_stack, "open_engines", no_engine)
    monkeypatch.setattr(suite_eval, "run_suite", one_then_stop)
    args = evaluate.build_arg_parser().parse_args(["--suite", "bfcl-v3", "--limit", "2"])
    config = evaluate.resolve_config(args)
    output = tmp_path / "eval.json"
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(evaluate.run_eval(config, output, progress=False))
    result = json.loads(output.read_text())
    suite = result["suites"]["bfcl-v3"]
    assert result["complete"] is False and suite["complete"] is False
    assert suite["tasks"] == 1 and suite["verdicts"][0]["detail"]["error"] == "finished before the stop"
    assert len(_lines(trajectories_path(output))) == 1


def test_ctrl_c_exits_130_and_keeps_the_finished_episodes(tmp_path: Path) -> None:
    """A real SIGINT to a real ``envtune-eval`` process once some episodes have finished."""
    import os
    import signal
    import subprocess
    import sys
    import time

    output = tmp_path / "eval.json"
    argv = ["--suite", "bfcl-v3", "--limit", "3", "--set", "conditions.concurrency=2", *SHORT]
    process = subprocess.Popen(
        [sys.executable, "-m", "envtune.runtime.cli.evaluate", *argv, "--output", str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = trajectories_path(output)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and log.read_text().strip():
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert f"what finished is in {output}" in err
    result = json.loads(output.read_text())
    suite = result["suites"]["bfcl-v3"]
    assert result["complete"] is False and suite["complete"] is False
    assert 1 <= suite["tasks"] < 12 and suite["tasks"] == len(suite["verdicts"])
    assert len(_lines(log)) >= suite["tasks"]  # every finished episode is in the trajectories


# --- listing and errors -----------------------------------------------------------------------------------


def test_suite_list(capsys: pytest.CaptureFixture[str]) -> None:
    evaluate.main(["--suite", "list"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(suite_names())
    assert len(lines) == 10 and "tau2-telecom" in suite_names() and "bfcl-v4-memory-rec-sum" in suite_names()


def _exit_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        evaluate.main([*argv, "--no-progress", "--set", "logging.format=json"])
    assert info.value.code == 2
    return capsys.readouterr().err


def test_unknown_suite_lists_the_suites(capsys: pytest.CaptureFixture[str]) -> None:
    message = _exit_message(["--suite", "bfcl-v9"], capsys)
    assert "unknown suite 'bfcl-v9'" in message and all(name in message for name in suite_names())


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--suite", "acebench-agent"], "needs --data PATH"),
        (["--suite", "acebench-agent", "--data", "/nonexistent/ace"], "is it an ACEBench checkout?"),
        (["--suite", "tau2-retail"], "set suites.tau2_user.base_url and suites.tau2_user.model"),
        (["--suite", "bfcl-v3", "--ids", "no_such_task"], "no task chosen"),
        (["--suite", "bfcl-v3", "--trials", "0"], "trials must be >= 1"),
        (["--suite", "bfcl-v3", "--set", "suites.tau2_user.model=m"], "missing required key 'base_url'"),
        (
            [
                "--suite",
                "tau2-retail",
                *_user_args("http://h:1/v1"),
                "--set",
                "suites.tau2_user.temperature=3",
            ],
            "temperature must be in [0, 2]",
        ),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert expected in _exit_message(argv, capsys)


def test_acebench_multi_turn_without_a_user_names_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    message = _exit_message(["--suite", "acebench-agent", "--data", str(ACEBENCH)], capsys)
    assert "multi-turn tasks need a user simulator" in message and "suites.tau2_user.model" in message


def test_missing_ood_environment_says_make_setup_ood(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--suite", "tau2-airline", "--set", "suites.tau2_python=/nonexistent/bin/python"]
    message = _exit_message([*argv, *_user_args("http://127.0.0.1:9/v1")], capsys)
    assert "make setup-ood" in message and "tau2-airline" in message


# --- which runs -------------------------------------------------------------------------------------------


TASKS = (
    SuiteTask("setup-a", "prep", scored=False),
    SuiteTask("setup-b", "prep", scored=False, depends_on=("setup-a",)),
    SuiteTask("q1", "memory", depends_on=("setup-b",)),
    SuiteTask("q2", "memory", depends_on=("setup-b",)),
    SuiteTask("w1", "web"),
)


def test_plan_runs_brings_dependencies_unscored_and_repeats_trials() -> None:
    runs = plan_runs(TASKS, limit=1, trials=2)
    assert [(r.task_id, r.scored, r.trial) for r in runs] == [
        ("setup-a", False, 0),
        ("setup-b", False, 0),
        ("q1", True, 0),
        ("q1", True, 1),
        ("w1", True, 0),
        ("w1", True, 1),
    ]
    assert [r.task_id for r in plan_runs(TASKS, ids={"w1"})] == ["w1"]
    named = plan_runs(TASKS, ids={"q1", "q2"}, limit=1)  # ids named one by one are all run
    assert [r.task_id for r in named if r.scored] == ["q1", "q2"]
    assert [r.task_id for r in plan_runs(TASKS)] == ["setup-a", "setup-b", "q1", "q2", "w1"]
    assert plan_runs(TASKS, ids={"q2"})[-1] == PlannedRun("q2", "memory", True, ("setup-b",), 0)


def test_plan_runs_refuses_unknown_dependencies_and_cycles() -> None:
    with pytest.raises(ConfigError, match="does not have"):
        plan_runs((SuiteTask("a", "c", depends_on=("ghost",)),))
    with pytest.raises(ConfigError, match="cycle"):
        plan_runs((SuiteTask("a", "c", depends_on=("b",)), SuiteTask("b", "c", depends_on=("a",))))


def test_ids_address_one_suite_or_every_suite() -> None:
    known = suite_names()
    assert ids_for_suite("tau2-retail", ["tau2-retail:0", "bfcl-v3:x"], known) == {"0"}
    assert ids_for_suite("bfcl-v3", ["tau2-retail:0"], known) is None  # its own selection applies
    assert ids_for_suite("bfcl-v3", ["plain", "tau2-retail:0"], known) == {"plain"}


def test_progress_counts_tasks_per_suite() -> None:
    """Without a terminal the display prints ``SUITE task DONE/TOTAL status`` lines (on a terminal, a bar
    titled with the suite)."""
    import io

    from envtune.runtime.recipe.progress import RunProgress
    from rich.console import Console

    sink = io.StringIO()
    console = Console(file=sink, force_terminal=False, width=200)
    with RunProgress(12, 0, console=console, label="tau2-retail", unit="task") as display:
        assert not display.live
        display.advance(3, "passed 1 · errors 0")
    assert sink.getvalue().strip() == "tau2-retail task 3/12 passed 1 · errors 0"
    with RunProgress(12, 0, console=console, enabled=False, label="x", unit="task") as display:
        display.advance(4, "quiet")
    assert "quiet" not in sink.getvalue()
