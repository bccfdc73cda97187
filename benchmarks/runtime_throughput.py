"""Rollout runtime scale: steady-state efficiency, memory and loop lag at 100 / 1,000 / 10,000 episodes.

Scope (since issue 13): this measures the runtime's scheduling at scale with an in-process engine
stand-in and a stand-in tokenizer. The real per-call path (tokenizer, SGLang client over HTTP) is
``loop_capacity.py``; async against synchronous RL at equal bounded engine capacity, with a learner,
is ``async_vs_sync.py`` (the former ``sync_ratio`` here measured an infinitely parallel engine
model, not envtune, and is gone).

What runs. ``RolloutActor`` dispatches GRPO groups (n = 16) of BFCL V3 multi-turn *training* tasks.
Each episode is the real episode loop (``envtune.agents.episode_loop.run_episode``) driving a real
``BfclEnvironment`` episode (tool execution, augmented feedback, turn scoring). Two things are
stood in: the model, by ``LatencyModelEngine`` (each call sleeps ``fixed + per_token x tokens``),
and the tokenizer, by a 4-characters-per-token counter whose reply ids carry a key to the reply
text. The stand-in policy replays the task's ground-truth calls one per step, makes a format error
with probability ``P_ERROR`` per step (the environment answers it, and force-ends a turn after 6
steps), and thinks for a length drawn per reply (``THINK_TOKENS``) scaled by a per-episode
verbosity (``VERBOSITY``): RL rollouts have a long tail, which is what async rollout is for.
Draws are seeded by (group, member), so every run of the same episodes does the same work.

Runs per level (one subprocess each, so RSS starts clean):
1. real episodes through the actor, ``waves`` waves of ``concurrency`` episodes (at least 8):
   steady-state efficiency, memory, full-stack CPU per call;
2. replay: the same episodes' engine calls (count, reply lengths, groups) recorded in 1, through
   the actor with a runner that only awaits the engine. Its CPU per call is the runtime's own:
   actor, asyncio, engine stand-in.

Definitions.
* steady-state efficiency: episodes completed per second between the end of the first wave and
  the start of the last (the ``concurrency``-th and the (N - ``concurrency``)-th completion), over
  the same rate of the ideal schedule: the episodes, in the order the run started them,
  list-scheduled on ``concurrency`` slots with zero overhead (an infinitely parallel engine).
  Neither the ramp-up nor the drain tail enters it. (The makespan efficiency
  of the old benchmark is still printed, for the record.)
* overhead_us_per_call = process CPU of run 2 / its engine calls (nothing subtracted).
  full_stack_cpu_us_per_call = the same for run 1 (adds the episode loop, stand-in tokenizer and
  policy, the environment); env_cpu_us_per_call = CPU inside the environment's own methods.
* mem_kb_per_episode = (peak RSS during run 1 - RSS before it) / concurrency.

Clock. Engine latencies at 10,000 concurrent episodes are seconds per call, so a wall-clock run
takes many minutes. By default each run uses ``VirtualClockLoop(charge_cpu=True)``: the clock
skips idle waiting (the modelled engine latency) but advances by every CPU second the event-loop
thread spends, so the runtime's own cost delays episodes exactly as on a dedicated core. That
premise is checked: the default run first runs one small level (100 concurrent, 8 waves, a 20x
faster engine) on both clocks and FAILS (exit code 1) when their steady-state efficiencies differ
by more than 5 points: on a machine whose cores are shared, the CPU time a loop gets is not a
dedicated core's, and the virtual figures would not hold. ``--clock real`` runs on the wall clock.

GC: CPython's defaults, the product's (the old benchmark-only thresholds and ``gc.freeze`` are
gone); the GC's CPU is reported.

Finally the event loop's lag is measured while a torch matmul loop runs in a worker thread
(``asyncio.to_thread``), and, for contrast, on the loop itself.

    python benchmarks/runtime_throughput.py --quick     # 100 and 1,000 concurrent, 8 waves each
    python benchmarks/runtime_throughput.py             # and 10,000 concurrent, 8 waves
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import heapq
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from envtune.agents.config import AgentConfig, SamplingConfig
from envtune.agents.engine import GenerateRequest, SamplingParams
from envtune.agents.episode_loop import run_episode
from envtune.agents.trajectory import Trajectory
from envtune.environments import BfclEnvironment, EpisodeConfig, load_split
from envtune.environments.ground_truth import ground_truth_calls
from envtune.environments.types import EpisodeScore, FunctionDoc, Message, StepResult
from envtune.runtime.cli.bench_registry import Benchmark, Figure
from envtune.runtime.records import IteratorTaskSource
from envtune.runtime.rollout import RolloutActor, RolloutConfig
from envtune.runtime.testing.fake_engine import LatencyModel, LatencyModelEngine, VirtualClockLoop

BENCHMARK = Benchmark(
    name="runtime_throughput",
    summary="rollout runtime at scale (engine and tokenizer stood in): steady-state efficiency, memory, lag",
    quick=("--quick",),
    full=(),
    figures=(
        Figure(key="efficiency", label="steady-state efficiency at the largest level (stand-in path)",
               target=">= 0.95", baseline_key="ideal_episodes_per_s",
               baseline_label="the same episodes list-scheduled with zero overhead, same window", ratio=True),
        Figure(key="overhead_us_per_call", label="runtime CPU per engine call (actor, asyncio, stand-in)",
               unit="us", target="<= 100", baseline_label="absolute target"),
        Figure(key="mem_kb_per_episode", label="memory per in-flight episode (stand-in token values)",
               unit="KB"),
        Figure(key="loop_lag_ms_torch_thread", label="loop lag, torch matmuls in a worker thread", unit="ms",
               baseline_key="loop_lag_ms_torch_on_loop", baseline_label="the same matmuls on the loop"),
    ),
    checks=("clock_check_ok",),
    timeout_s=5400,
)

GROUP_SIZE = 16
"""n, as in the paper's runs."""
P_ERROR = 0.25
"""Chance that a reply is a format error instead of the next ground-truth step."""
THINK_TOKENS = ((16, 0.15), (32, 0.2), (64, 0.25), (128, 0.2), (256, 0.1), (512, 0.07), (1024, 0.03))
"""Thinking tokens per reply and their probabilities (mean about 100)."""
VERBOSITY = ((0.5, 0.3), (1.0, 0.5), (2.0, 0.2))
"""Per-episode multiplier of thinking length and its probabilities."""
CHARS_PER_TOKEN = 4
FILL, EOT = 7, 2
"""Filler token id and end-of-turn id of the stand-in tokenizer."""
TAG_BASE, KEY_BASE = 10_000_000, 1_000
"""First prompt id = TAG_BASE + episode serial; first reply id = KEY_BASE + reply-text index."""
CLOCK_TOLERANCE = 0.05
"""Largest gap between the wall-clock and the virtual-clock efficiency the cross-check accepts."""
DEFAULT_LATENCY = LatencyModel(fixed_s=0.5, per_token_s=0.03)
"""A loaded server: 0.5 s queueing + prefill per call, 30 ms per decoded token."""


# --- stand-ins: tokenizer, policy ---------------------------------------------------------------


class ReplyTable:
    """Reply texts by key; a reply's first token id is its key."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self._index: dict[str, int] = {}

    def key(self, text: str) -> int:
        if text not in self._index:
            self._index[text] = len(self.texts)
            self.texts.append(text)
        return KEY_BASE + self._index[text]


class StandInChat:
    """The ``ChatTokenizer`` surface ``run_episode`` uses, at 4 characters per token."""

    end_of_turn_id = EOT

    def __init__(self, tag: int, table: ReplyTable) -> None:
        self._tag = tag
        self._table = table

    def render_prompt(self, messages: Sequence[Message]) -> list[int]:
        chars = sum(len(m.content) for m in messages)
        return [self._tag, *([FILL] * (chars // CHARS_PER_TOKEN))]

    def append_messages(self, messages: Sequence[Message]) -> list[int]:
        return [FILL] * (1 + sum(len(m.content) for m in messages) // CHARS_PER_TOKEN)

    def missing_end_of_turn(self, sampled_ids: Sequence[int]) -> tuple[int, ...]:
        return () if sampled_ids and sampled_ids[-1] == EOT else (EOT,)

    def decode_reply(self, sampled_ids: Sequence[int], *, stopped: bool = False) -> str:
        return self._table.texts[sampled_ids[0] - KEY_BASE]


class ScriptedEpisode:
    """A real environment episode (timed) plus the stand-in policy that answers it."""

    __slots__ = (
        "_episode", "_fills", "_replies", "_rng", "_turn", "_verbosity",
        "cursor", "env_cpu", "lengths", "modeled_s",
    )

    def __init__(self, episode: Any, replies: Any, rng: random.Random, fills: tuple[int, ...]) -> None:
        self._episode = episode
        self._replies = replies  # per turn: tuple of (key, call tokens) for each GT call
        self._rng = rng
        self._fills = fills
        self._verbosity = rng.choices([v for v, _ in VERBOSITY], [w for _, w in VERBOSITY])[0]
        self._turn = 0
        self.cursor = 0
        self.env_cpu = 0.0
        self.modeled_s = 0.0
        self.lengths: list[int] = []

    # EpisodeLike, timed
    def start(self) -> tuple[Message, ...]:
        t = time.thread_time()
        try:
            return self._episode.start()
        finally:
            self.env_cpu += time.thread_time() - t

    def step(self, reply: str) -> StepResult:
        t = time.thread_time()
        try:
            result = self._episode.step(reply)
        finally:
            self.env_cpu += time.thread_time() - t
        if result.turn_ended:
            self._turn, self.cursor = result.turn_index + 1, 0
        return result

    def visible_tools(self) -> tuple[FunctionDoc, ...]:
        return self._episode.visible_tools()

    def score(self) -> EpisodeScore:
        t = time.thread_time()
        try:
            return self._episode.score()
        finally:
            self.env_cpu += time.thread_time() - t

    # the policy
    def next_reply(self, table: ReplyTable, latency: LatencyModel) -> tuple[int, ...]:
        rng = self._rng
        think = int(_THINK_VALUES[bisect.bisect(_THINK_CUMULATIVE, rng.random())] * self._verbosity)
        calls = self._replies[self._turn] if self._turn < len(self._replies) else ()
        if rng.random() < P_ERROR:
            key, body = _ERROR_KEY, 12
        elif self.cursor < len(calls):
            key, body = calls[self.cursor]
            self.cursor += 1
        else:
            key, body = _ANSWER_KEY, 8
        n = think + body
        self.modeled_s += latency.seconds(n + 2)
        self.lengths.append(n + 2)
        return (key, *self._fills[:n], EOT)


_THINK_VALUES = [v for v, _ in THINK_TOKENS]
_THINK_CUMULATIVE = list(itertools.accumulate(w for _, w in THINK_TOKENS))[:-1]
ERROR_TEXT = "<think>r</think>I should look at the files before calling anything."
ANSWER_TEXT = "<think>r</think><answer>Done.</answer>"
_ERROR_KEY, _ANSWER_KEY = KEY_BASE, KEY_BASE + 1


@dataclass(frozen=True, slots=True)
class BenchSpec:
    """A task spec with the seed of its group's stand-in policy."""

    task_id: str
    stage: int = 0
    seed: int = 0


class Workload:
    """Real BFCL episodes through the real episode loop, with the stand-ins wired in."""

    def __init__(self, latency: LatencyModel) -> None:
        self.env = BfclEnvironment()
        self.train_ids = load_split().ids("train")
        self.table = ReplyTable()
        assert self.table.key(ERROR_TEXT) == _ERROR_KEY and self.table.key(ANSWER_TEXT) == _ANSWER_KEY
        self.replies: dict[str, tuple[tuple[tuple[int, int], ...], ...]] = {}
        for task_id in self.train_ids:
            task = self.env.tasks[task_id]
            self.env.ground_truth.get(task)  # warm the per-task ground-truth cache
            turns = []
            for calls in ground_truth_calls(task):
                steps = []
                for call in calls:
                    body = json.dumps([{"name": call.name, "arguments": call.arguments}])
                    text = f"<think>r</think><tool_call>{body}</tool_call>"
                    steps.append((self.table.key(text), len(text) // CHARS_PER_TOKEN))
                turns.append(tuple(steps))
            self.replies[task_id] = tuple(turns)
        self.latency = latency
        self.engine = LatencyModelEngine(latency, self._reply)
        self.agent = AgentConfig(sampling=SamplingConfig(max_new_tokens=4096, max_episode_tokens=65536))
        self.episode_config = EpisodeConfig()
        self.fills = (FILL,) * 8192
        self.live: dict[int, ScriptedEpisode] = {}
        self.serial = itertools.count()
        self.members: dict[str, int] = {}
        self.env_cpu = 0.0
        self.durations: list[float] = []  # modelled seconds per episode, in start order
        self.finish_times: list[float] = []  # loop time at each episode's end
        self.shapes: dict[tuple[int, int], tuple[int, ...]] = {}  # (seed, member) -> reply lengths

    def specs(self, episodes: int, seed: int) -> list[BenchSpec]:
        order = list(self.train_ids)
        random.Random(seed).shuffle(order)
        groups = episodes // GROUP_SIZE
        return [BenchSpec(order[g % len(order)], seed=seed * 1_000_003 + g) for g in range(groups)]

    def _reply(self, request: GenerateRequest) -> tuple[int, ...]:
        return self.live[request.prompt_ids[0]].next_reply(self.table, self.latency)

    async def run(self, spec: BenchSpec, group_id: str, start_version: int) -> Trajectory:
        """The ``EpisodeRunner``: one real episode under the stand-in policy."""
        member = self.members.get(group_id, 0)
        self.members[group_id] = member + 1
        if member + 1 == GROUP_SIZE:
            del self.members[group_id]
        slot = len(self.durations)
        self.durations.append(0.0)
        tag = TAG_BASE + next(self.serial)
        t = time.thread_time()
        episode = self.env.make_episode(spec.task_id, self.episode_config)
        self.env_cpu += time.thread_time() - t
        rng = random.Random(spec.seed * 64 + member)
        scripted = ScriptedEpisode(episode, self.replies[spec.task_id], rng, self.fills)
        self.live[tag] = scripted
        try:
            return await run_episode(
                self.engine,
                scripted,
                StandInChat(tag, self.table),  # type: ignore[arg-type]
                self.agent,
                task_id=spec.task_id,
                group_id=group_id,
                stage=spec.stage,
                start_version=start_version,
            )
        finally:
            del self.live[tag]
            episode.close()
            self.env_cpu += scripted.env_cpu
            self.durations[slot] = scripted.modeled_s
            self.finish_times.append(asyncio.get_running_loop().time())
            self.shapes[(spec.seed, member)] = tuple(scripted.lengths)


# --- replay: the runtime alone ----------------------------------------------------------------------


class Replay:
    """The same episodes' engine calls (count, reply lengths, group structure), and nothing else.

    An ``EpisodeRunner`` whose episodes only wait for the engine: the CPU of a run with it is the
    runtime's own (actor, asyncio, engine stand-in) per engine call.
    """

    def __init__(self, latency: LatencyModel, shapes: dict[tuple[int, int], tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.fills = (FILL,) * 8192
        self.engine = LatencyModelEngine(latency, lambda r: self.fills[: r.sampling.max_new_tokens])
        self.sampling = {n: SamplingParams(max_new_tokens=n) for lengths in shapes.values() for n in lengths}
        self.members: dict[str, int] = {}
        self.env_cpu = 0.0
        self.durations: list[float] = []
        self.finish_times: list[float] = []
        self.latency = latency

    async def run(self, spec: BenchSpec, group_id: str, start_version: int) -> Trajectory:
        member = self.members.get(group_id, 0)
        self.members[group_id] = member + 1
        if member + 1 == GROUP_SIZE:
            del self.members[group_id]
        lengths = self.shapes[(spec.seed, member)]
        self.durations.append(sum(self.latency.seconds(n) for n in lengths))
        prompt = (TAG_BASE,)
        tokens = 0
        for n in lengths:
            (completion,) = await self.engine.generate(GenerateRequest(prompt, self.sampling[n]))
            tokens += len(completion.token_ids)
        self.finish_times.append(asyncio.get_running_loop().time())
        return Trajectory(
            task_id=spec.task_id,
            group_id=group_id,
            token_ids=(tokens,),
            loss_mask=(True,),
            behavior_logprobs=(0.0,),
            policy_versions=(start_version,),
            reward=0.0,
            progress=0.0,
            format_reward=0.0,
            tool_reward=0.0,
            turn_passed=(),
            step_codes=(),
            stage=spec.stage,
            start_version=start_version,
        )


# --- measurement ----------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ideal_finish_times(durations: Sequence[float], slots: int) -> list[float]:
    """Finish times of ``durations`` (in start order) list-scheduled on ``slots`` slots, zero overhead."""
    free = [0.0] * min(slots, len(durations))
    out = []
    for d in durations:
        start = heapq.heappop(free)
        heapq.heappush(free, start + d)
        out.append(start + d)
    return sorted(out)


def steady_rate(finished: Sequence[float], concurrency: int) -> float:
    """Completions per second between the end of the first wave and the start of the last."""
    n = len(finished)
    if n < 3 * concurrency:
        raise ValueError(f"steady state needs >= 3 waves of {concurrency}, got {n} episodes")
    return (n - 2 * concurrency) / (finished[n - concurrency - 1] - finished[concurrency - 1])


def ideal_makespan(durations: Sequence[float], slots: int) -> float:
    """Zero-overhead list schedule of ``durations`` (in start order) on ``slots`` parallel slots."""
    free = [0.0] * min(slots, len(durations))
    end = 0.0
    for d in durations:
        start = heapq.heappop(free)
        heapq.heappush(free, start + d)
        end = max(end, start + d)
    return end


class _Sink:
    """A trajectory sink that counts and discards (no learner in this benchmark)."""

    def __init__(self) -> None:
        self.episodes = 0

    async def send(self, group: Any) -> None:
        self.episodes += len(group.trajectories)


async def _sampler(state: dict[str, float], period_s: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period_s
        await asyncio.sleep(period_s)
        state["max_lag_s"] = max(state["max_lag_s"], loop.time() - due)
        state["peak_rss"] = max(state["peak_rss"], rss_bytes())


async def measure(work: Workload | Replay, specs: list[BenchSpec], concurrency: int) -> dict[str, Any]:
    """One run of ``specs`` through the rollout actor."""
    loop = asyncio.get_running_loop()
    state = {"max_lag_s": 0.0, "peak_rss": 0.0}
    gc.collect()
    base_rss = rss_bytes()
    calls0 = work.engine.statistics().calls
    cpu0, t0 = time.process_time(), loop.time()
    async with asyncio.TaskGroup() as tg:
        sampler = tg.create_task(_sampler(state, 1.0))
        config = RolloutConfig(  # no learner here, hence no staleness bound
            max_concurrent_episodes=concurrency, group_size=GROUP_SIZE, max_staleness=None
        )
        actor = RolloutActor(config, IteratorTaskSource(specs), work.run, _Sink())
        run = tg.create_task(actor.run())
        await actor.wait_until_done()
        await actor.stop()
        await run
        stats = actor.statistics()
        completed, dropped = stats.episodes_completed, stats.episodes_dropped
        sampler.cancel()
    wall = loop.time() - t0
    cpu = time.process_time() - cpu0
    calls = work.engine.statistics().calls - calls0
    assert completed + dropped == len(specs) * GROUP_SIZE, "an episode went missing"
    ideal = ideal_makespan(work.durations, concurrency)
    # Between the end of the first wave and the start of the last: no ramp-up, no drain tail; the
    # ideal is the same window of the same episodes scheduled with zero overhead.
    steady = steady_rate(sorted(work.finish_times), concurrency)
    ideal_steady = steady_rate(ideal_finish_times(work.durations, concurrency), concurrency)
    return {
        "episodes": completed,
        "dropped": dropped,
        "calls": calls,
        "wall_s": wall,
        "episodes_per_s": steady,
        "ideal_episodes_per_s": ideal_steady,
        "efficiency": steady / ideal_steady,
        "makespan_efficiency": ideal / wall,
        "cpu_us_per_call": 1e6 * cpu / calls,
        "env_cpu_us_per_call": 1e6 * work.env_cpu / calls,
        "mem_kb_per_episode": (max(state["peak_rss"], rss_bytes()) - base_rss) / 1024 / concurrency,
        "max_loop_lag_ms": 1e3 * state["max_lag_s"],
        "mean_episode_s": statistics.fmean(work.durations),
        "max_episode_s": max(work.durations),
    }


async def level(job: dict[str, Any]) -> dict[str, Any]:
    """Every run of one concurrency level: real episodes, then their replay."""
    latency = LatencyModel(job["fixed_s"], job["per_token_s"])
    concurrency = job["concurrency"]
    work = Workload(latency)
    specs = work.specs(job["episodes"], job["seed"])
    out: dict[str, Any] = {"full_async": await measure(work, specs, concurrency)}
    shapes = work.shapes
    del work
    if job.get("replays", True):
        out["replay_async"] = await measure(Replay(latency, shapes), specs, concurrency)
    return out


def worker(job: dict[str, Any]) -> None:
    """Subprocess entry: one level, one JSON line on stdout."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings only
    gc_time = [0.0, 0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_time[1] = time.thread_time()
        else:
            gc_time[0] += time.thread_time() - gc_time[1]

    gc.callbacks.append(on_gc)
    if job["clock"] == "real":
        result = asyncio.run(level(job))
    else:
        with asyncio.Runner(loop_factory=lambda: VirtualClockLoop(charge_cpu=True)) as runner:
            result = runner.run(level(job))
    result["gc_s"] = gc_time[0]
    print(json.dumps(result), flush=True)


def start_job(job: dict[str, Any]) -> subprocess.Popen[str]:
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def finish_job(proc: subprocess.Popen[str]) -> dict[str, Any]:
    stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed with exit code {proc.returncode}")
    return json.loads(stdout.strip().splitlines()[-1])


# --- event-loop lag while torch works -----------------------------------------------------------------


def loop_lag(seconds: float, size: int) -> dict[str, float]:
    """Lateness of a 5 ms ticker: idle, while matmuls run in a worker thread, and on the loop."""
    import torch

    torch.set_num_threads(1)  # leave the other core to the loop, as a learner process would

    def work(deadline: float) -> int:
        a = torch.randn(size, size)
        n = 0
        while time.perf_counter() < deadline:
            a = torch.tanh(a @ a)  # tanh keeps values bounded
            n += 1
        return n

    async def ticker(stop: asyncio.Event, lags: list[float]) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            due = loop.time() + 0.005
            await asyncio.sleep(0.005)
            lags.append(loop.time() - due)

    async def main(where: str) -> tuple[list[float], int]:
        lags: list[float] = []
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tick = tg.create_task(ticker(stop, lags))
            await asyncio.sleep(0.05)
            deadline = time.perf_counter() + seconds
            matmuls = 0
            if where == "thread":
                matmuls = await asyncio.to_thread(work, deadline)
            elif where == "loop":
                matmuls = work(deadline)
            else:  # idle: the machine's own scheduling noise
                await asyncio.sleep(seconds)
            await asyncio.sleep(0.05)
            stop.set()
            await tick
        return lags, matmuls

    idle, _ = asyncio.run(main("idle"))
    threaded, n_thread = asyncio.run(main("thread"))
    blocking, _ = asyncio.run(main("loop"))

    def p99(xs: list[float]) -> float:
        return sorted(xs)[int(0.99 * (len(xs) - 1))] if xs else 0.0

    return {
        "thread_max_lag_ms": 1e3 * max(threaded),
        "thread_p99_lag_ms": 1e3 * p99(threaded),
        "thread_matmuls": n_thread,
        "idle_max_lag_ms": 1e3 * max(idle),
        "idle_p99_lag_ms": 1e3 * p99(idle),
        "on_loop_max_lag_ms": 1e3 * max(blocking, default=0.0),
    }


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 concurrent only")
    parser.add_argument("--waves", type=int, default=8, help="waves of episodes per level (>= 8)")
    parser.add_argument("--clock", choices=("virtual", "real"), default="virtual")
    parser.add_argument("--fixed-s", type=float, default=DEFAULT_LATENCY.fixed_s)
    parser.add_argument("--per-token-s", type=float, default=DEFAULT_LATENCY.per_token_s)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.waves < 8:
        parser.error("--waves must be >= 8: fewer measure the ramp and the tail, not the steady state")
    latency = {"fixed_s": args.fixed_s, "per_token_s": args.per_token_s}
    levels = (100, 1000) if args.quick else (100, 1000, 10000)
    jobs = [
        {"concurrency": c, "episodes": c * args.waves, "seed": args.seed, "clock": args.clock,
         "replays": True, **latency}
        for c in levels
    ]
    # Two lanes on two cores: the largest level alone; the cross-check and the small levels beside it.
    big = start_job(jobs[-1])
    try:
        figures = run_levels(args, jobs, big)
    finally:
        if big.poll() is None:  # a failed level must not leave the largest one running unowned
            big.kill()
            big.wait()
    report_lag(figures, lag_s=2.0 if args.quick else 5.0)
    print(json.dumps(figures))
    if not figures.get("clock_check_ok", True):
        raise SystemExit(
            f"clock cross-check failed: steady-state efficiency {figures['clock_check']['real']:.1%} on the "
            f"wall clock vs {figures['clock_check']['virtual']:.1%} on the CPU-charged virtual clock (more "
            f"than {CLOCK_TOLERANCE:.0%} apart): this machine does not give the loop a dedicated core, so "
            "the virtual-clock figures above do not hold here"
        )


def run_levels(
    args: argparse.Namespace, jobs: list[dict[str, Any]], big: subprocess.Popen[str]
) -> dict[str, Any]:
    """Run the cross-check and every concurrency level (the largest is already running as ``big``)."""
    figures: dict[str, Any] = {"levels": {}}
    if args.clock == "virtual":
        # The CPU-charged virtual clock against the wall clock, on a level whose latencies are short
        # enough to run for real (a 20x faster engine), 8 waves, steady state.
        check = {"concurrency": 100, "episodes": 800, "seed": args.seed + 1, "replays": False,
                 "fixed_s": args.fixed_s / 20, "per_token_s": args.per_token_s / 20}
        real, virtual = (
            finish_job(start_job({**check, "clock": clock}))["full_async"] for clock in ("real", "virtual")
        )
        gap = abs(real["efficiency"] - virtual["efficiency"])
        print(f"clock cross-check (100 concurrent, 8 waves, engine 20x faster): steady-state efficiency "
              f"{real['efficiency']:.1%} on the wall clock ({real['wall_s']:.1f} s), "
              f"{virtual['efficiency']:.1%} on the CPU-charged virtual clock: "
              f"{'OK' if gap <= CLOCK_TOLERANCE else 'FAILED'} (tolerance {CLOCK_TOLERANCE:.0%})")
        figures["clock_check"] = {
            "real": round(real["efficiency"], 4), "virtual": round(virtual["efficiency"], 4)
        }
        figures["clock_check_ok"] = gap <= CLOCK_TOLERANCE
    results = [finish_job(start_job(job)) for job in jobs[:-1]]
    results.append(finish_job(big))
    print(f"latency model {args.fixed_s * 1e3:.0f} ms + {args.per_token_s * 1e3:.1f} ms/token; "
          f"n = {GROUP_SIZE}; clock: {args.clock}; {args.waves} waves per level; GC: CPython defaults")
    print(f"{'conc':>6} {'episodes':>8} {'ideal/s':>8} {'ep/s':>7} {'eff':>6} {'mk eff':>6} {'rt us':>6} "
          f"{'all us':>6} {'env us':>6} {'KB/ep':>6} {'lag ms':>7} {'gc s':>5}")
    for job, res in zip(jobs, results, strict=True):
        full, replay = res["full_async"], res["replay_async"]
        print(f"{job['concurrency']:>6} {full['episodes']:>8} {full['ideal_episodes_per_s']:>8.2f} "
              f"{full['episodes_per_s']:>7.2f} {full['efficiency']:>6.1%} "
              f"{full['makespan_efficiency']:>6.1%} "
              f"{replay['cpu_us_per_call']:>6.1f} {full['cpu_us_per_call']:>6.1f} "
              f"{full['env_cpu_us_per_call']:>6.1f} {full['mem_kb_per_episode']:>6.0f} "
              f"{full['max_loop_lag_ms']:>7.0f} {res['gc_s']:>5.1f}", flush=True)
        level_figures = {
            "efficiency": round(full["efficiency"], 4),
            "makespan_efficiency": round(full["makespan_efficiency"], 4),
            "overhead_us_per_call": round(replay["cpu_us_per_call"], 1),
            "mem_kb_per_episode": round(full["mem_kb_per_episode"], 1),
            "episodes": full["episodes"],
            "episodes_per_s": round(full["episodes_per_s"], 3),
            "ideal_episodes_per_s": round(full["ideal_episodes_per_s"], 3),
            "full_stack_cpu_us_per_call": round(full["cpu_us_per_call"], 1),
            "env_cpu_us_per_call": round(full["env_cpu_us_per_call"], 1),
            "max_loop_lag_ms": round(full["max_loop_lag_ms"], 1),
            "gc_s": round(res["gc_s"], 1),
        }
        figures["levels"][str(job["concurrency"])] = level_figures
        figures.update({"concurrency": job["concurrency"], **level_figures, "clock": args.clock})
    return figures


def report_lag(figures: dict[str, Any], lag_s: float) -> None:
    lag = loop_lag(seconds=lag_s, size=1024)  # one matmul takes far longer than the lag allowed
    print(f"event-loop lag, torch matmuls in a worker thread: max {lag['thread_max_lag_ms']:.2f} ms, "
          f"p99 {lag['thread_p99_lag_ms']:.2f} ms ({lag['thread_matmuls']} matmuls of 1024x1024, "
          f"{1e3 * lag_s / lag['thread_matmuls']:.0f} ms each); idle loop: "
          f"max {lag['idle_max_lag_ms']:.2f} ms, p99 {lag['idle_p99_lag_ms']:.2f} ms; "
          f"the same work on the loop: max {lag['on_loop_max_lag_ms']:.0f} ms")
    figures["loop_lag_ms_torch_thread"] = round(lag["thread_max_lag_ms"], 2)
    figures["loop_lag_p99_ms_torch_thread"] = round(lag["thread_p99_lag_ms"], 2)
    figures["loop_lag_ms_idle"] = round(lag["idle_max_lag_ms"], 2)
    figures["loop_lag_ms_torch_on_loop"] = round(lag["on_loop_max_lag_ms"], 1)


if __name__ == "__main__":
    main()
