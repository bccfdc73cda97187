"""Reliability under faults, load and hostile input: the checks a user can rerun, one JSON line at the end.

Sections (``--only NAME`` runs one; ``--quick`` runs each smaller, as CI does):

``engine_faults``  Episodes of the toy environment through the real stack: ``RolloutActor`` -> the
    real episode loop -> ``SGLangClient`` -> ``FaultProxy`` (runtime/testing/fault_proxy.py) ->
    envtune's SGLang-protocol server -> the embedded engine on the tiny model. About 10% of
    ``/generate`` requests get a fault (5xx, a stall past the client's timeout, a connection reset
    mid-body, malformed or truncated JSON, wrong-length logprobs, a NaN logprob, an out-of-vocabulary
    id). A stand-in learner publishes a real LoRA adapter every few groups (real weight sync through
    the proxy). Mid-run the proxy goes away for 2 s (an outage), and later the engine server itself
    is restarted (it loses its adapters: the client loads them again). Checked: every episode
    started ends completed or dropped with a ``DropReason``; no group or trajectory reaches the
    learner twice; every emitted group holds exactly its members that finished; no trajectory holds
    a NaN or positive logprob or an out-of-vocabulary id.
``engine_gone``    The same stack; the proxy stops for good mid-run. Checked: the client's circuit
    breaker ends the rollout with one ``EngineUnavailable`` within its outage limit, the accounting
    holds, and the log says so in a handful of lines (not one per dropped episode).
``process``        ``envtune-run`` (CPU preset, tiny steps) is SIGKILLed at chosen points
    (``benchmarks/_crash_points.py``: rollout, learner step, adapter publish, metrics append,
    checkpoint write, checkpoint rename, report), then resumed, until it finishes. Checked: each
    resume continues from the last complete checkpoint; no half-written checkpoint is ever picked
    up; torn metrics lines are dropped on resume (reported); at the end every step appears once,
    with its stage and policy version, and no temp folder is left.
``engine_killed``  ``envtune-run --sglang`` loses its ``envtune-serve`` (SIGKILL) after a step: it must
    end by itself within the outage limit, with one error line, exit code 1, its checkpoint and
    its report.
``server``         ``envtune-serve`` (the real entry point, a 256-descriptor file limit as in the
    review, an API key) under the review's attacks: malformed, huge and deep bodies, NaN
    parameters, out-of-vocabulary ids, invalid grammars, adapter path traversal, cross-site
    requests, missing and wrong keys, slowloris, 200 concurrent clients, streams abandoned
    mid-way. Checked: each gets its expected status, ``/health`` keeps answering, the process lives.
``soak``           10,000 concurrent toy episodes (the real episode loop and rollout, the tiny
    tokenizer, ``LatencyModelEngine`` as the model) for several minutes: RSS growth after
    warm-up, queue depths within their bounds, asyncio tasks back to the baseline afterwards.
``fuzz``           ``benchmarks/fuzz_tools.py`` (tool-call strings through the parser and dispatcher)
    when it is present; its counters are copied.

    python benchmarks/faults.py --quick     # CI sizes
    python benchmarks/faults.py             # full sizes (process: 7 kill points; soak: 10,000 x 5 min)

The last line is one JSON object: episodes_started, completed, dropped, duplicates, kills,
resumes_ok, torn_records, fuzz_cases, fuzz_crashes, fuzz_escapes, rss_growth_pct, server_cases,
server_deaths, and per-section detail. ``ok`` is false if any check failed (exit code 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from envtune.runtime.cli.bench_registry import Benchmark, Figure
from envtune.runtime.testing.smoke import SMOKE_OVERRIDES

BENCHMARK = Benchmark(
    name="faults",
    summary="engine faults and outages, an engine that is gone, SIGKILLs then --resume, server abuse, soak",
    quick=("--quick",),
    full=(),
    figures=(
        Figure(key="duplicates", label="trajectories trained twice under engine faults", target="<= 0"),
        Figure(key="torn_records", label="log lines torn by the SIGKILLs (skipped, repaired on resume)"),
        Figure(key="resumes_ok", label="--resume after a SIGKILL that continued correctly", unit="resumes"),
        Figure(key="server_deaths", label="server deaths under abuse", target="<= 0"),
        Figure(key="rss_growth_pct", label="soak RSS growth after warm-up", unit="%", target="<= 5"),
        Figure(key="fuzz_crashes", label="fuzzed tool calls that crashed a step", target="<= 0"),
    ),
    checks=("ok",),
    timeout_s=3600,
)

REPO = Path(__file__).resolve().parent.parent
CRASH_POINTS = Path(__file__).resolve().parent / "_crash_points.py"
FUZZ = Path(__file__).resolve().parent / "fuzz_tools.py"
CPU_PRESET = REPO / "runtime" / "recipe" / "presets" / "cpu.toml"

# The CPU preset cut down so one learner step is a few seconds: the same settings as the CLI smoke test.
SMOKE = [*SMOKE_OVERRIDES, "run.checkpoint_every=1", "run.trajectories.mode=all"]
STAGES = ("syntax", "hints", "hard", "independent")
"""The CPU preset's stage names: with one step per stage, step k runs in stage k."""


class Checks:
    """Collects failed checks (a benchmark reports them all rather than stopping at the first)."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            self.failed.append(what)
            print(f"CHECK FAILED: {what}", file=sys.stderr, flush=True)


def rss_kb(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def tiny_model() -> Path:
    from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir

    return build_tiny_model(default_tiny_model_dir())


# --- engine faults ------------------------------------------------------------------------------------


class RecordingRunner:
    """Wraps an episode runner: per group, episodes started, finished and failed."""

    def __init__(self, inner: Callable[[Any, str, int], Awaitable[Any]]) -> None:
        self.inner = inner
        self.started: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    async def __call__(self, task: Any, group_id: str, start_version: int) -> Any:
        self.started[group_id] += 1
        try:
            trajectory = await self.inner(task, group_id, start_version)
        except BaseException as exc:
            self.failed[group_id] += 1
            self.errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
            raise
        self.finished[group_id] += 1
        return trajectory


class _AdapterCopies:
    """An ``AdapterSource`` handing out copies of one prepared peft adapter as versions 1, 2, ..."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.policy_version = 0

    def save_adapter(self, folder: Path) -> int:
        self.policy_version += 1
        shutil.copytree(self.folder, folder, dirs_exist_ok=True)
        return self.policy_version


def prepare_adapter(model_dir: Path, folder: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)
    return folder


async def _toy_stack(
    model_dir: Path,
    work: Path,
    *,
    episodes: int,
    plan: Any,
    client_settings: dict[str, Any],
    events: Callable[[Any], Awaitable[None]],
) -> dict[str, Any]:
    """Run ``episodes`` toy episodes through rollout -> client -> proxy -> server -> engine.

    ``events(ctx)`` runs beside the rollout (outages, restarts); returns what the checks need.
    """
    import structlog
    from envtune.agents import AgentConfig, ChatTokenizer, ConstraintCache, SamplingConfig, run_episode
    from envtune.agents.grammar import GrammarOptions
    from envtune.runtime.actors import Actor
    from envtune.runtime.engines.embedded import EmbeddedEngine
    from envtune.runtime.engines.settings import EmbeddedEngineConfig, SGLangClientConfig
    from envtune.runtime.engines.sglang_client import SGLangClient
    from envtune.runtime.engines.sglang_server import SGLangProtocolServer
    from envtune.runtime.records import IteratorTaskSource, PolicyUpdated, TaskSpec, TrajectoryGroup
    from envtune.runtime.rollout import RolloutActor, RolloutConfig
    from envtune.runtime.supervisor import Supervisor
    from envtune.runtime.testing.fault_proxy import FaultProxy
    from envtune.runtime.testing.toy_env import NamedToolEpisode
    from envtune.runtime.weight_sync import AdapterPublisher

    group_size = 4
    engine_config = EmbeddedEngineConfig(device="cpu", max_batch_rows=32)
    engine = await EmbeddedEngine.open(model_dir, engine_config)
    server = SGLangProtocolServer(engine)
    upstream = await server.start()
    proxy = FaultProxy(upstream, plan)
    await proxy.start()
    client = SGLangClient(
        SGLangClientConfig(urls=(proxy.url,), **client_settings), vocab_size=engine.vocab_size
    )
    chat = ChatTokenizer(engine.tokenizer)
    constraints = ConstraintCache(
        options=GrammarOptions(
            max_think_chars=0, allow_answer=False, max_calls=1, any_whitespace=False, any_order=False
        )
    )
    sampling = SamplingConfig(max_new_tokens=48, max_episode_tokens=256)
    publisher = AdapterPublisher(work / "adapters", [client])
    source = _AdapterCopies(prepare_adapter(model_dir, work / "prepared"))

    async def play(task: TaskSpec, group_id: str, start_version: int) -> Any:
        seed = int(task.task_id.split("-")[1])
        async with publisher.use() as adapter:
            config = AgentConfig(
                sampling=sampling, constrained=True, adapter=adapter.name if adapter is not None else None
            )
            return await run_episode(
                client,
                NamedToolEpisode(seed),
                chat,
                config,
                task_id=task.task_id,
                group_id=group_id,
                start_version=start_version,
                constraints=constraints,
            )

    runner = RecordingRunner(play)
    received: list[TrajectoryGroup] = []
    rollout_ref: list[RolloutActor] = []
    published: set[int] = {0}

    class Learner(Actor[TrajectoryGroup]):
        """Stands in for the learner: takes groups, publishes a real adapter every 3 groups."""

        accepts = (TrajectoryGroup,)

        async def handle(self, message: TrajectoryGroup) -> None:
            received.append(message)
            if len(received) % 3 == 0:
                with contextlib.suppress(Exception):  # engine_gone: publishing fails at the end
                    adapter = await publisher.publish(source)
                    published.add(adapter.version)
                    await rollout_ref[0].send(PolicyUpdated(adapter.version))

    learner = Learner("learner", 64)
    config = RolloutConfig(
        group_size=group_size,
        min_group_size=2,
        groups_per_step=3,
        max_staleness=None,
        max_concurrent_episodes=24,
        episode_timeout_s=120.0,
    )
    specs = [TaskSpec(f"toy-{i}") for i in range(episodes // group_size)]
    rollout = RolloutActor(config, IteratorTaskSource(specs), runner, learner)
    rollout_ref.append(rollout)
    ctx = {"proxy": proxy, "server": server, "engine": engine, "rollout": rollout, "client": client}

    async def restart_server() -> None:
        """The engine server dies and comes back on the same port, without its adapters."""
        port = server.port
        await server.close()
        await engine.close()
        fresh = await EmbeddedEngine.open(model_dir, engine_config)
        ctx["engine"] = fresh
        ctx["server"] = SGLangProtocolServer(fresh)
        await ctx["server"].start("127.0.0.1", port)

    ctx["restart_server"] = restart_server
    supervisor = Supervisor([rollout, learner], stop_timeout_s=300.0)
    baseline_tasks = len(asyncio.all_tasks())
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:

        async def drive() -> None:
            async with asyncio.TaskGroup() as group:
                side = group.create_task(events(ctx))
                waiters = [
                    group.create_task(rollout.wait_until_done()),
                    group.create_task(rollout.failed.wait()),
                ]
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in [*waiters, side]:
                    waiter.cancel()

        try:
            await supervisor.run(drive())
        finally:
            seconds = time.monotonic() - started
            await client.close()
            await proxy.close()
            await ctx["server"].close()
            await ctx["engine"].close()
    return {
        "stats": rollout.statistics(),
        "runner": runner,
        "received": received,
        "published": published,
        "client": client.statistics(),
        "proxy": proxy.statistics(),
        "failure": rollout.engine_failure,
        "logs": logs,
        "seconds": seconds,
        "tasks_leaked": len(asyncio.all_tasks()) - baseline_tasks,
        "vocab_size": engine.vocab_size,
        "group_size": group_size,
    }


def check_rollout_accounting(result: dict[str, Any], checks: Checks, label: str) -> dict[str, int]:
    """The invariants every run must keep, faults or not; returns the counters."""
    from envtune.runtime.records import DropReason

    stats, runner, received = result["stats"], result["runner"], result["received"]
    started = stats.episodes_started
    checks.check(started == sum(runner.started.values()), f"{label}: every started episode was run once")
    checks.check(
        started == stats.episodes_completed + stats.episodes_dropped,
        f"{label}: completed + dropped == started "
        f"({stats.episodes_completed} + {stats.episodes_dropped} != {started})",
    )
    checks.check(stats.in_flight == 0, f"{label}: nothing left in flight")
    checks.check(
        all(isinstance(reason, DropReason) for reason in stats.dropped_by_reason)
        and sum(stats.dropped_by_reason.values()) == stats.episodes_dropped,
        f"{label}: every drop has a DropReason",
    )
    group_ids = [g.group_id for g in received]
    trajectories = [(g.group_id, id(t)) for g in received for t in g.trajectories]
    duplicates = (len(group_ids) - len(set(group_ids))) + (len(trajectories) - len(set(trajectories)))
    checks.check(duplicates == 0, f"{label}: no group or trajectory reached the learner twice")
    checks.check(
        sum(len(g.trajectories) for g in received) == stats.episodes_completed,
        f"{label}: the learner got exactly the completed episodes",
    )
    missing = [
        g.group_id
        for g in received
        if len(g.trajectories) != runner.finished[g.group_id] or g.size != runner.started[g.group_id]
    ]
    checks.check(
        missing == [], f"{label}: every emitted group holds exactly its finished members {missing[:3]}"
    )
    vocab = result["vocab_size"]
    bad = 0
    for group in received:
        for t in group.trajectories:
            for token, logprob, sampled, version in zip(
                t.token_ids, t.behavior_logprobs, t.loss_mask, t.policy_versions, strict=True
            ):
                if sampled and not (
                    0 <= token < vocab
                    and math.isfinite(logprob)
                    and logprob <= 0
                    and version in result["published"]
                ):
                    bad += 1
    checks.check(bad == 0, f"{label}: no malformed value in a trajectory ({bad} bad tokens)")
    return {
        "episodes_started": started,
        "completed": stats.episodes_completed,
        "dropped": stats.episodes_dropped,
        "duplicates": duplicates,
        "malformed_in_trajectories": bad,
    }


async def engine_faults(quick: bool, work: Path, checks: Checks) -> dict[str, Any]:
    from envtune.runtime.testing.fault_proxy import FaultPlan

    episodes = 160 if quick else 1600

    async def events(ctx: dict[str, Any]) -> None:
        rollout = ctx["rollout"]

        async def when_started(count: int) -> None:
            while rollout.statistics().episodes_started < count:
                await asyncio.sleep(0.05)

        await when_started(episodes // 3)
        await ctx["proxy"].outage(2.0)  # the engine unreachable for 2 s
        await when_started(2 * episodes // 3)
        # The engine server restarts and forgets its adapters. Meanwhile the proxy answers 502, as a
        # router does, and injects nothing (a fault needs something behind it to be one).
        ctx["proxy"].enabled = False
        await ctx["restart_server"]()
        ctx["proxy"].enabled = True

    result = await _toy_stack(
        tiny_model(),
        work,
        episodes=episodes,
        plan=FaultPlan(rate=0.1, stall_s=21.0, seed=7),
        client_settings={
            # Generous: on a loaded 2-core machine a real answer can take seconds; a stall is longer.
            "request_timeout_s": 20.0,
            "max_retries": 5,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "unhealthy_cooldown_s": 0.2,
            "outage_timeout_s": 60.0,
        },
        events=events,
    )
    counters = check_rollout_accounting(result, checks, "engine_faults")
    proxy, client = result["proxy"], result["client"]
    checks.check(result["failure"] is None, f"engine_faults: the run was not ended ({result['failure']})")
    checks.check(counters["episodes_started"] == episodes, "engine_faults: every episode of the source ran")
    checks.check(len(proxy.faults) >= 6, f"engine_faults: most fault kinds were injected {proxy.faults}")
    checks.check(client.malformed_responses > 0, "engine_faults: malformed answers were caught")
    checks.check(client.adapter_reloads > 0, "engine_faults: the restarted server got its adapter back")
    checks.check(len(result["published"]) > 2, "engine_faults: adapters were published throughout")
    drop_share = counters["dropped"] / max(1, counters["episodes_started"])
    checks.check(drop_share < 0.25, f"engine_faults: retries kept drops rare ({drop_share:.1%})")
    return {
        **counters,
        "dropped_by_reason": {str(k): v for k, v in result["stats"].dropped_by_reason.items()},
        "episode_errors": dict(result["runner"].errors.most_common(5)),
        "faults_injected": proxy.faults,
        "outages": proxy.outages,
        "engine_restarts": 1,
        "client_retries": client.retries,
        "malformed_caught": client.malformed_responses,
        "adapter_reloads": client.adapter_reloads,
        "adapters_published": len(result["published"]) - 1,
        "seconds": round(result["seconds"], 1),
    }


async def engine_gone(quick: bool, work: Path, checks: Checks) -> dict[str, Any]:
    from envtune.agents.engine import EngineUnavailable
    from envtune.runtime.testing.fault_proxy import FaultPlan

    episodes = 400 if quick else 4000
    outage_s = 3.0
    gone_at: list[float] = []

    async def events(ctx: dict[str, Any]) -> None:
        rollout = ctx["rollout"]
        while rollout.statistics().episodes_completed < 20:
            await asyncio.sleep(0.05)
        gone_at.append(time.monotonic())
        await ctx["proxy"].stop_listening()  # for good

    result = await _toy_stack(
        tiny_model(),
        work,
        episodes=episodes,
        plan=FaultPlan(rate=0.0),
        client_settings={
            "request_timeout_s": 3.0,
            "max_retries": 3,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "unhealthy_cooldown_s": 0.2,
            "outage_timeout_s": outage_s,
        },
        events=events,
    )
    counters = check_rollout_accounting(result, checks, "engine_gone")
    failure = result["failure"]
    noisy = [e for e in result["logs"] if e.get("log_level") in ("warning", "error")]
    stopped_after = (time.monotonic() - gone_at[0]) if gone_at else math.inf
    checks.check(isinstance(failure, EngineUnavailable), f"engine_gone: one EngineUnavailable ({failure!r})")
    checks.check(counters["episodes_started"] < episodes, "engine_gone: dispatch stopped early")
    checks.check(
        len(noisy) <= 40, f"engine_gone: a handful of warning lines, not one per episode ({len(noisy)})"
    )
    return {
        **counters,
        "error": str(failure),
        "warning_lines": len(noisy),
        "seconds_to_fail_after_gone": round(stopped_after, 1),
        "outage_timeout_s": outage_s,
    }


# --- process faults -----------------------------------------------------------------------------------


def _run_cli(args: list[str], cwd: Path, log: Path, timeout_s: float, kill_at: tuple[str, int] | None) -> int:
    command = [sys.executable]
    command += (
        [str(CRASH_POINTS), kill_at[0], str(kill_at[1]), "--"]
        if kill_at
        else ["-m", "envtune.runtime.cli.run"]
    )
    with log.open("w") as sink:
        done = subprocess.run(
            [*command, *args],
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            timeout=timeout_s,
            check=False,
        )
    return done.returncode


def _folder_report(folder: Path) -> dict[str, Any]:
    """What is on disk: complete checkpoints, temp leftovers, torn lines, step records."""
    from envtune.runtime.recipe.run_folder import RunFolder

    run = RunFolder(folder)
    torn = 0
    steps: list[int] = []
    for path in (run.metrics_path, run.trajectories_path):
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    torn += 1
                    continue
                if path == run.metrics_path and "event" not in record:
                    steps.append(record["step"])
    leftovers = [p.name for p in run.checkpoints_dir.glob(".*")] if run.checkpoints_dir.is_dir() else []
    latest = run.latest_complete_checkpoint()
    return {
        "latest": None if latest is None else latest.step,
        "torn": torn,
        "steps": steps,
        "leftovers": leftovers,
        "checkpoints": [c.step for c in run.checkpoints()],
    }


def process_faults(quick: bool, work: Path, checks: Checks) -> dict[str, Any]:
    """Kill ``envtune-run`` at each point in turn, resuming after each kill, then finish."""
    import torch
    from envtune.runtime.recipe.run_folder import RunFolder

    tiny_model()  # built once, outside the timed runs
    max_steps = 2
    kills = (
        [("checkpoint_write", 2), ("metrics_append", 1)]
        if quick
        else [
            ("metrics_append", 2),
            ("checkpoint_write", 1),
            ("checkpoint_rename", 1),
            ("adapter_publish", 1),
            ("learner_step", 1),
            ("rollout", 1),
            ("report", 1),
        ]
    )
    base = [arg for item in [*SMOKE, f"run.max_steps={max_steps}"] for arg in ("--set", item)]
    work.mkdir(parents=True, exist_ok=True)
    timeout = 1800.0
    folder: Path | None = None
    resumes_ok = 0
    torn_seen = 0
    rounds = []
    for index, kill in enumerate(kills):
        log = work / f"round-{index}.log"
        args = base if folder is None else ["--resume", str(folder), "--set", f"run.max_steps={max_steps}"]
        before = None if folder is None else _folder_report(folder)
        code = _run_cli(args, work, log, timeout, kill)
        if folder is None:
            runs = sorted((work / "runs").iterdir())
            folder = runs[-1]
        after = _folder_report(folder)
        text = log.read_text(errors="replace")
        resumed = [
            json.loads(line) for line in text.splitlines() if line.startswith("{") and '"resumed"' in line
        ]
        if before is not None:
            # The resume took the newest complete checkpoint on disk when it started.
            ok = bool(resumed) and resumed[0].get("step") == before["latest"]
            resumes_ok += ok
            checks.check(ok, f"process: round {index} resumed from step {before['latest']} ({resumed[:1]})")
        checks.check(code == -signal.SIGKILL, f"process: round {index} died at {kill[0]} (exit {code})")
        checks.check(after["latest"] is not None, f"process: a complete checkpoint survives round {index}")
        if after["latest"] is not None:
            checkpoint = RunFolder(folder).latest_complete_checkpoint()
            assert checkpoint is not None
            state = torch.load(checkpoint.path / "learner.pt", map_location="cpu", weights_only=True)
            checks.check(
                int(state["policy_version"]) == checkpoint.step == checkpoint.state["policy_version"],
                f"process: checkpoint {checkpoint.step} is whole and consistent",
            )
        torn_seen += after["torn"]
        rounds.append({"killed_at": kill[0], "exit": code, **after})
    assert folder is not None
    before = _folder_report(folder)
    log = work / "final.log"
    code = _run_cli(
        ["--resume", str(folder), "--set", f"run.max_steps={max_steps}"], work, log, timeout, None
    )
    text = log.read_text(errors="replace")
    resumed = [json.loads(line) for line in text.splitlines() if line.startswith("{") and '"resumed"' in line]
    final_ok = bool(resumed) and resumed[0].get("step") == before["latest"]
    resumes_ok += final_ok
    final = _folder_report(folder)
    records = [r for r in RunFolder(folder).read_metrics() if "event" not in r]
    checks.check(code == 0, f"process: the last resume finished (exit {code})")
    checks.check(final["steps"] == list(range(1, max_steps + 1)), f"process: each step once {final['steps']}")
    checks.check(final["torn"] == 0, "process: no torn line left")
    checks.check(
        [(r["step"], r["stage_name"], r["policy_version"]) for r in records]
        == [(k, STAGES[k - 1], k) for k in range(1, max_steps + 1)],
        "process: steps, stages (the data cursor) and policy versions line up",
    )
    samples = [s for s in RunFolder(folder).read_trajectories() if s.get("drop_reason") is None]
    per_step = 2  # SMOKE: one group of two per step
    checks.check(
        sorted(s["step"] for s in samples) == [k for k in range(1, max_steps + 1) for _ in range(per_step)],
        "process: each trained episode logged once, in its step",
    )
    checks.check(final["leftovers"] == [], f"process: no temp folder left {final['leftovers']}")
    checks.check((folder / "report" / "index.html").exists(), "process: the report is there")
    return {
        "kills": len(kills),
        "resumes_ok": resumes_ok,
        "resumes": len(kills),
        "torn_records": torn_seen,
        "rounds": rounds,
        "final_checkpoints": final["checkpoints"],
    }


def engine_killed(work: Path, checks: Checks) -> dict[str, Any]:
    """``envtune-run`` against an ``envtune-serve`` that is SIGKILLed after the first learner step:
    the run must end on its own, with one error line, exit code 1, its checkpoint and its report."""
    from envtune.runtime.recipe.run_folder import RunFolder

    model = tiny_model()
    work.mkdir(parents=True, exist_ok=True)
    serve, url = _serve(work, nofile=4096, api_key="")
    log = work / "run.log"
    outage_s = 5.0
    args = [
        str(
            CPU_PRESET
        ),  # with --model, the paper preset would be taken: no grammar, no step on a random model
        *(arg for item in [*SMOKE, "run.max_steps=4"] for arg in ("--set", item)),
        *("--model", str(model), "--sglang", url, "--set", f"engine.sglang.outage_timeout_s={outage_s}"),
    ]
    with log.open("w") as sink:
        run = subprocess.Popen(
            [sys.executable, "-m", "envtune.runtime.cli.run", *args],
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        )
    killed_at = math.nan
    try:
        deadline = time.monotonic() + 1800
        while run.poll() is None and time.monotonic() < deadline:
            if '"checkpoint_saved"' in log.read_text(errors="replace"):
                serve.kill()  # the engine dies for good
                killed_at = time.monotonic()
                break
            time.sleep(0.2)
        out, _ = run.communicate(timeout=900)
        ended_after = time.monotonic() - killed_at
    finally:
        for process in (run, serve):
            if process.poll() is None:
                process.kill()
                process.wait()
    err = log.read_text(errors="replace")
    errors = [line for line in err.splitlines() if line.startswith("envtune-run: error:")]
    warnings = [line for line in err.splitlines() if '"warning"' in line]
    folder = work / out.strip().splitlines()[-1] if out.strip() else work
    checkpoint = RunFolder(folder).latest_complete_checkpoint()
    checks.check(run.returncode == 1, f"engine_killed: exit code 1 (got {run.returncode})")
    checks.check(
        len(errors) == 1 and "no SGLang server" in errors[0], f"engine_killed: one error line {errors[:2]}"
    )
    checks.check("Traceback" not in err, "engine_killed: no traceback")
    checks.check(len(warnings) <= 20, f"engine_killed: a handful of warnings ({len(warnings)})")
    checks.check(checkpoint is not None and checkpoint.step >= 1, "engine_killed: its checkpoint is there")
    checks.check((folder / "report" / "index.html").exists(), "engine_killed: its report is there")
    return {
        "exit": run.returncode,
        "error": errors[0] if errors else None,
        "seconds_to_end_after_kill": round(ended_after, 1),
        "outage_timeout_s": outage_s,
        "warning_lines": len(warnings),
        "checkpoint_step": None if checkpoint is None else checkpoint.step,
    }


# --- server abuse -------------------------------------------------------------------------------------


def _serve(work: Path, nofile: int, api_key: str = "sekret") -> tuple[subprocess.Popen[str], str]:
    def limit() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "envtune.runtime.cli.serve",
            "--port",
            "0",
            "--set",
            "server.limits.idle_timeout_s=5",
        ],
        stdout=subprocess.PIPE,
        stderr=(work / "serve.log").open("w"),
        text=True,
        env={**os.environ, "ENVTUNE_API_KEY": api_key, "OMP_NUM_THREADS": "1"},
        preexec_fn=limit,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"envtune-serve did not start: {line!r}, see {work / 'serve.log'}")
    return process, line.split("listening on ", 1)[1].strip()


SERVER_CASES: list[tuple[str, str, str | bytes, dict[str, str], int]] = [
    # (name, path, body, headers, expected status); the API key is added unless a header says otherwise
    ("bad json", "/generate", "{", {}, 400),
    ("empty body", "/generate", "", {}, 400),
    ("array body", "/generate", "[]", {}, 400),
    ("wrong type", "/generate", '{"input_ids": "abc"}', {}, 400),
    ("no prompt", "/generate", '{"sampling_params": {}}', {}, 400),
    ("oov ids", "/generate", '{"input_ids": [1, 99999999]}', {}, 400),
    ("negative ids", "/generate", '{"input_ids": [-1]}', {}, 400),
    ("2^63 id", "/generate", '{"input_ids": [9223372036854775808]}', {}, 400),
    ("million ids", "/generate", json.dumps({"input_ids": [1] * 1_000_000}), {}, 400),
    (
        "5000 digits",
        "/generate",
        '{"input_ids": [1], "sampling_params": {"max_new_tokens": 1' + "0" * 5000 + "}}",
        {},
        400,
    ),
    ("n 1e12", "/generate", '{"input_ids": [1], "sampling_params": {"n": 1000000000000}}', {}, 400),
    ("n 2048", "/generate", '{"input_ids": [1], "sampling_params": {"n": 2048}}', {}, 400),
    ("100k prompts", "/generate", json.dumps({"input_ids": [[1, 2]] * 100_000}), {}, 400),
    ("deep json", "/generate", '{"input_ids": ' + "[" * 200_000 + "]" * 200_000 + "}", {}, 400),
    ("nan temperature", "/generate", '{"input_ids": [1], "sampling_params": {"temperature": NaN}}', {}, 400),
    (
        "huge seed",
        "/generate",
        '{"input_ids": [1], "sampling_params": {"sampling_seed": 1' + "0" * 30 + "}}",
        {},
        400,
    ),
    (
        "bad charset",
        "/generate",
        '{"input_ids": [1]}',
        {"Content-Type": "application/json; charset=nope"},
        400,
    ),
    ("lone surrogate", "/generate", '{"text": "\\ud800"}', {}, 400),
    ("10 MB text", "/generate", json.dumps({"text": "lorem ipsum " * 900_000}), {}, 400),
    ("40 MB text", "/generate", b'{"text": "' + b"lorem " * 7_000_000 + b'"}', {}, 413),
    ("bad regex", "/generate", '{"input_ids": [1], "sampling_params": {"regex": "("}}', {}, 400),
    ("bad ebnf", "/generate", '{"input_ids": [1], "sampling_params": {"ebnf": "root ::= ("}}', {}, 400),
    ("bad schema", "/generate", '{"input_ids": [1], "sampling_params": {"json_schema": "{"}}', {}, 400),
    ("text/plain", "/generate", '{"input_ids": [1]}', {"Content-Type": "text/plain"}, 415),
    ("cross-site origin", "/generate", '{"input_ids": [1]}', {"Origin": "http://evil.example"}, 403),
    ("cross-site fetch", "/flush_cache", "", {"Sec-Fetch-Site": "cross-site"}, 403),
    (
        "form to control",
        "/load_lora_adapter",
        "lora_name=x&lora_path=/tmp",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
    ),
    ("traversal", "/load_lora_adapter", '{"lora_name": "x", "lora_path": "../../../../etc"}', {}, 400),
    ("/etc/passwd", "/load_lora_adapter", '{"lora_name": "x", "lora_path": "/etc/passwd"}', {}, 400),
    ("hub id", "/load_lora_adapter", '{"lora_name": "x", "lora_path": "someuser/some-adapter"}', {}, 400),
    ("hub weights", "/update_weights_from_disk", '{"model_path": "Qwen/Qwen2.5-0.5B"}', {}, 400),
    ("no key", "/generate", '{"input_ids": [1]}', {"Authorization": ""}, 401),
    ("wrong key", "/generate", '{"input_ids": [1]}', {"Authorization": "Bearer wrong"}, 401),
    ("key prefix", "/generate", '{"input_ids": [1]}', {"Authorization": "Bearer sekre"}, 401),
    ("good request", "/generate", '{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}', {}, 200),
]


async def _abuse(
    url: str, process: subprocess.Popen[str], quick: bool, checks: Checks, work: Path
) -> dict[str, Any]:
    import aiohttp

    host, port = url.removeprefix("http://").rsplit(":", 1)
    auth = {"Authorization": "Bearer sekret"}
    unexpected: list[str] = []
    health_failures = 0
    cases = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def health() -> bool:
            try:
                async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=10)) as response:
                    return response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        for name, path, body, headers, expected in SERVER_CASES:
            merged = {"Content-Type": "application/json", **auth, **headers}
            merged = {k: v for k, v in merged.items() if v}
            data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
            try:
                async with session.post(url + path, data=data, headers=merged) as response:
                    status = response.status
                    await response.read()
            except aiohttp.ClientError as exc:
                status = -1
                print(f"server case {name}: {exc!r}", file=sys.stderr)
            cases += 1
            if status != expected:
                unexpected.append(f"{name}: {status} (expected {expected})")
            health_failures += not await health()
        # Slowloris, above the connection limit (256 descriptors -> 192 connections).
        loop = asyncio.get_running_loop()
        slow: list[socket.socket] = []
        for _ in range(300 if not quick else 250):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (host, int(port)))
                await loop.sock_sendall(sock, b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            except OSError:
                sock.close()
                continue
            slow.append(sock)
        cases += 1
        reachable = [await health() for _ in range(5)]
        if not all(reachable):
            unexpected.append(f"slowloris: /health {reachable}")
        for sock in slow:
            sock.close()
        # Concurrent clients, each a real generation.
        concurrent = 200 if not quick else 100
        body = json.dumps({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}})

        async def one() -> int:
            async with session.post(
                url + "/generate", data=body, headers={**auth, "Content-Type": "application/json"}
            ) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(concurrent)), return_exceptions=True)
        cases += 1
        if any(s != 200 for s in statuses):
            unexpected.append(f"concurrent: {Counter(str(s) for s in statuses)}")
        # Streams abandoned after their first event, and non-streamed requests abandoned.
        for stream in (True, False):
            for _ in range(10):
                long = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 3000}, "stream": stream}
                with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                    async with asyncio.timeout(0.3):
                        async with session.post(url + "/generate", json=long, headers=auth) as response:
                            await response.content.readline()
                            await asyncio.sleep(1)
            cases += 1
        health_failures += not await health()
    return {"unexpected": unexpected, "health_failures": health_failures, "cases": cases}


def server_abuse(quick: bool, work: Path, checks: Checks) -> dict[str, Any]:
    tiny_model()
    work.mkdir(parents=True, exist_ok=True)
    process, url = _serve(work, nofile=256)
    try:
        rss_before = rss_kb(process.pid)
        result = asyncio.run(_abuse(url, process, quick, checks, work))
        time.sleep(1.0)
        alive = process.poll() is None
        rss_after = rss_kb(process.pid) if alive else 0
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    checks.check(alive, "server: the process lived through every case")
    checks.check(result["unexpected"] == [], f"server: every case got its status {result['unexpected']}")
    checks.check(result["health_failures"] == 0, "server: /health answered after every case")
    return {
        "server_cases": result["cases"],
        "server_deaths": 0 if alive else 1,
        "unexpected": result["unexpected"],
        "rss_mb_before": round(rss_before / 1024),
        "rss_mb_after": round(rss_after / 1024),
    }


# --- soak ---------------------------------------------------------------------------------------------


async def _soak(concurrency: int, duration_s: float, engine_s: float) -> dict[str, Any]:
    from envtune.agents import AgentConfig, ChatTokenizer, SamplingConfig, run_episode
    from envtune.runtime.actors import Actor
    from envtune.runtime.records import IteratorTaskSource, TaskSpec, TrajectoryGroup
    from envtune.runtime.rollout import RolloutActor, RolloutConfig
    from envtune.runtime.supervisor import Supervisor
    from envtune.runtime.testing.fake_engine import LatencyModel, LatencyModelEngine
    from envtune.runtime.testing.toy_env import NamedToolEpisode
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model())
    chat = ChatTokenizer(tokenizer)
    reply = '<think></think><tool_call>[{"name": "cd", "arguments": {}}]</tool_call>'
    reply_ids = (*tokenizer.encode(reply), chat.end_of_turn_id)
    engine = LatencyModelEngine(LatencyModel(fixed_s=engine_s, per_token_s=0.0), lambda _request: reply_ids)
    sampling = SamplingConfig(max_new_tokens=64, max_episode_tokens=512)
    config = AgentConfig(sampling=sampling)

    async def play(task: TaskSpec, group_id: str, start_version: int) -> Any:
        return await run_episode(
            engine,
            NamedToolEpisode(int(task.task_id)),
            chat,
            config,
            task_id=task.task_id,
            group_id=group_id,
            start_version=start_version,
        )

    consumed = 0

    class Sink(Actor[TrajectoryGroup]):
        accepts = (TrajectoryGroup,)

        async def handle(self, message: TrajectoryGroup) -> None:
            nonlocal consumed
            consumed += len(message.trajectories)

    sink = Sink("learner", 64)
    rollout = RolloutActor(
        RolloutConfig(
            group_size=8, groups_per_step=8, max_staleness=None, max_concurrent_episodes=concurrency
        ),
        IteratorTaskSource(TaskSpec(str(i)) for i in itertools.count()),
        play,
        sink,
    )
    samples: list[tuple[float, int, int, int]] = []
    baseline_tasks = len(asyncio.all_tasks())
    supervisor = Supervisor([rollout, sink], stop_timeout_s=600.0)
    peak_mailbox = 0

    async def sample() -> None:
        nonlocal peak_mailbox
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < duration_s:
            await asyncio.sleep(min(5.0, duration_s / 20))
            stats = rollout.statistics()
            peak_mailbox = max(peak_mailbox, sink.mailbox.statistics().depth)
            samples.append((elapsed, rss_kb(), stats.episodes_running, stats.episodes_completed))

    await supervisor.run(sample())
    await asyncio.sleep(0)
    stats = rollout.statistics()
    warm = [s for s in samples if s[0] >= duration_s * 0.3]
    rss_warm, rss_end = warm[0][1], max(s[1] for s in warm[-3:])
    return {
        "concurrency": concurrency,
        "duration_s": duration_s,
        "episodes_started": stats.episodes_started,
        "completed": stats.episodes_completed,
        "dropped": stats.episodes_dropped,
        "consumed": consumed,
        "peak_running": max(s[2] for s in samples),
        "rss_mb_after_warmup": round(rss_warm / 1024),
        "rss_mb_end": round(rss_end / 1024),
        "rss_growth_pct": round(100.0 * (rss_end - rss_warm) / rss_warm, 2),
        "peak_mailbox_depth": peak_mailbox,
        "mailbox_capacity": sink.mailbox.statistics().capacity,
        "tasks_before": baseline_tasks,
        "tasks_after": len(asyncio.all_tasks()),
        "rss_timeline_mb": [(round(t), round(r / 1024)) for t, r, _, _ in samples],
    }


def soak(quick: bool, work: Path, checks: Checks) -> dict[str, Any]:
    concurrency, duration_s, engine_s = (1000, 30.0, 2.0) if quick else (10_000, 300.0, 20.0)
    result = asyncio.run(_soak(concurrency, duration_s, engine_s))
    checks.check(result["tasks_after"] <= result["tasks_before"], "soak: asyncio tasks back to the baseline")
    checks.check(
        result["peak_mailbox_depth"] <= result["mailbox_capacity"], "soak: the queue stayed in its bound"
    )
    checks.check(
        result["completed"] + result["dropped"] == result["episodes_started"]
        and result["consumed"] == result["completed"],
        "soak: every episode accounted for",
    )
    checks.check(result["peak_running"] >= 0.9 * concurrency, f"soak: {concurrency} episodes ran at once")
    if not quick:
        checks.check(
            result["rss_growth_pct"] < 5.0, f"soak: RSS growth {result['rss_growth_pct']}% < 5% after warm-up"
        )
    return result


# --- fuzz ---------------------------------------------------------------------------------------------


def fuzz(quick: bool, work: Path, checks: Checks) -> dict[str, Any]:
    """Hook for ``benchmarks/fuzz_tools.py`` (the environment's tool-call fuzzer), when present."""
    if not FUZZ.exists():
        return {"fuzz": "benchmarks/fuzz_tools.py is not in this checkout", "fuzz_cases": None}
    done = subprocess.run(
        [sys.executable, str(FUZZ), *(["--quick"] if quick else [])],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    checks.check(result.get("fuzz_crashes") == 0, f"fuzz: no crash ({result.get('fuzz_crashes')})")
    checks.check(result.get("fuzz_escapes") == 0, f"fuzz: no escape ({result.get('fuzz_escapes')})")
    return {k: result.get(k) for k in ("fuzz_cases", "fuzz_crashes", "fuzz_escapes", "cases_per_s")}


SECTIONS: dict[str, Callable[[bool, Path, Checks], dict[str, Any]]] = {
    "engine_faults": lambda q, w, c: asyncio.run(engine_faults(q, w, c)),
    "engine_gone": lambda q, w, c: asyncio.run(engine_gone(q, w, c)),
    "process": process_faults,
    "engine_killed": lambda q, w, c: engine_killed(w, c),
    "server": server_abuse,
    "soak": soak,
    "fuzz": fuzz,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI sizes")
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS), help="run these sections only")
    parser.add_argument("--work", help="keep the run folders and logs here (default: a temp folder)")
    args = parser.parse_args(argv)
    # A SIGTERM unwinds like an exception, so the sections' finally blocks stop their subprocesses.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    checks = Checks()
    results: dict[str, Any] = {}
    load = os.getloadavg()
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for name in args.only or list(SECTIONS):
            began = time.monotonic()
            print(f"--- {name}", file=sys.stderr, flush=True)
            results[name] = SECTIONS[name](args.quick, work / name, checks)
            results[name]["section_s"] = round(time.monotonic() - began, 1)
            print(json.dumps({name: results[name]}, default=str), file=sys.stderr, flush=True)
    faults, gone = results.get("engine_faults", {}), results.get("engine_gone", {})
    summary = {
        "mode": "quick" if args.quick else "full",
        "ok": not checks.failed,
        "failed_checks": checks.failed,
        "episodes_started": faults.get("episodes_started"),
        "completed": faults.get("completed"),
        "dropped": faults.get("dropped"),
        "duplicates": (faults.get("duplicates") or 0) + (gone.get("duplicates") or 0)
        if faults or gone
        else None,
        "kills": results.get("process", {}).get("kills"),
        "resumes_ok": results.get("process", {}).get("resumes_ok"),
        "torn_records": results.get("process", {}).get("torn_records"),
        "fuzz_cases": results.get("fuzz", {}).get("fuzz_cases"),
        "fuzz_crashes": results.get("fuzz", {}).get("fuzz_crashes"),
        "fuzz_escapes": results.get("fuzz", {}).get("fuzz_escapes"),
        "rss_growth_pct": results.get("soak", {}).get("rss_growth_pct"),
        "server_cases": results.get("server", {}).get("server_cases"),
        "server_deaths": results.get("server", {}).get("server_deaths"),
        "machine_load_1m": round(load[0], 2),
        "cpus": os.cpu_count(),
        "sections": results,
    }
    print(json.dumps(summary, default=str))
    return 0 if not checks.failed else 1


if __name__ == "__main__":
    sys.exit(main())
