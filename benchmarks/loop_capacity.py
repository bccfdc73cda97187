"""Real-path loop capacity: CPU per engine call of one event loop, by part, and its saturation rate.

What runs is what a training run runs on its event loop, with only the model replaced:
``RolloutActor`` dispatching GRPO groups of real BFCL V3 training tasks; per episode the real
episode loop (``run_episode``) with the real ``ChatTokenizer`` (the tiny model's BPE tokenizer and
chat template), a real ``BfclEnvironment`` episode (parsing, validation, tool execution, augmented
feedback, scoring), and the real ``SGLangClient`` over HTTP to a stub SGLang server in another
process (``envtune.runtime.testing.sglang_stub``) that answers each ``/generate`` at once.

The replies. A first, untimed pass plays the episodes against the scripted policy of
``_bfcl_policy.py`` (ground-truth calls, format errors, long-tailed think text) and records every
reply as the tokenizer's real ids with distinct behaviour logprobs. The timed passes replay those
replies, so every arm does the same work (the same prompts, replies, environment steps), and the
trajectories of every arm must equal the recorded ones (checked: the run fails otherwise).

Two arms, interleaved, ``--repeats`` rounds, the same episodes each time:
* ``http``: the real path above (the stub serves the recorded replies by routing key);
* ``inproc``: the same episodes with an in-process engine that hands back the recorded
  ``Completion`` after one loop yield. The difference is the cost of the HTTP client path.

Parts (event-loop thread CPU, ``time.thread_time``, per engine call): ``tokenize`` (render the
prompt, append environment messages, decode replies), ``environment`` (episode creation, start,
step, score), ``request_build`` (the ``/generate`` body, JSON encoding included: the client's
``encode_request``), ``response`` (JSON decoding of the body, every check, building the
``Completion``s: the client's ``_decode_completions`` and, for a body it does not take, the
field-by-field ``_completions``), ``bookkeeping`` (episode loop, rollout actor, asyncio) = inproc
total - its tokenize - its environment, and ``http`` (the rest of the client path: aiohttp, sockets,
retries and balancing) = http total - every other part.

Saturation: one loop can make ``1e6 / cpu_us_per_call`` calls per second when it does nothing
else; the run also reports the wall-clock rate it reached and the loop's busy fraction (on a
shared machine the stub competes for the same cores, so the wall rate is a lower bound).

CPython's default GC settings (the product's); the GC's share of the loop CPU is reported, in total
and by the part it ran inside (``gc_in_<part>``: a collection runs inside whatever part allocated
past the threshold, and costs what every part left young: about half of it is young collections,
two thirds of whose work is the first scan of each new prompt or trajectory tuple, thousands of ids
each; most of the rest is the rare full collection). ``ChatTokenizer`` caches an episode's opening
prompt per group and recently seen environment messages: the run reports its hit rate. Here the
scripted policy repeats its group's tool calls more than a learning policy would, so the hit rate is
an upper end; the ``tokenize`` part at the hit rate reached is what the figure charges. The
machine's load average is recorded.

    python benchmarks/loop_capacity.py --quick    # ~1 min
    python benchmarks/loop_capacity.py            # more episodes, concurrency and rounds
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import structlog
from _bfcl_policy import GROUP_SIZE, ScriptedPolicy, Spec, train_specs
from envtune.agents.chat_tokens import ChatTokenizer
from envtune.agents.config import AgentConfig
from envtune.agents.engine import Completion, FinishReason, GenerateRequest
from envtune.agents.episode_loop import run_episode
from envtune.agents.trajectory import Trajectory
from envtune.environments import BfclEnvironment, EpisodeConfig
from envtune.environments.types import EpisodeScore, FunctionDoc, Message, StepResult
from envtune.runtime.cli.bench_registry import Benchmark, Figure
from envtune.runtime.engines.settings import SGLangClientConfig
from envtune.runtime.engines.sglang_client import SGLangClient
from envtune.runtime.records import IteratorTaskSource
from envtune.runtime.rollout import RolloutActor, RolloutConfig
from envtune.runtime.testing.sglang_stub import RUN_SEPARATOR, ScriptedReply, stub_process, write_script

BENCHMARK = Benchmark(
    name="loop_capacity",
    summary="one event loop on the real path: tokenizer, SGLang client over HTTP, environment, episode loop",
    quick=("--quick",),
    full=(),
    figures=(
        Figure(
            key="cpu_us_per_call",
            label="loop CPU per engine call, real path",
            unit="us",
            target="<= 300",
            samples="cpu_us_per_call_samples",
            baseline_label="absolute target (no baseline)",
        ),
        Figure(
            key="saturation_calls_per_s",
            label="calls/s at which one loop saturates",
            unit="calls/s",
            target=">= 3000",
            samples="saturation_calls_per_s_samples",
            baseline_label="absolute target (no baseline)",
        ),
        Figure(
            key="http_client_us_per_call",
            label="of which the HTTP client path (build, JSON, aiohttp, validation)",
            unit="us",
            samples="http_client_us_per_call_samples",
            baseline_key="inproc_us_per_call",
            baseline_label="same episodes, in-process engine (no HTTP)",
        ),
    ),
    checks=("trajectories_identical",),
)

PARTS = ("tokenize", "environment", "request_build", "response", "http", "bookkeeping")
GC_PARTS = ("tokenize", "environment", "request_build", "response", "other")
"""Where the garbage collector's time is reported (``other``: the untimed rest, http or bookkeeping)."""


class Clock:
    """CPU seconds of the event-loop thread, per part, and of the garbage collector (in total and
    by the part it interrupted: a collection runs inside whatever allocated past the threshold, so
    its cost is the whole loop's, not that part's)."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = dict.fromkeys((*PARTS, "gc"), 0.0)
        self.gc_in: dict[str, float] = dict.fromkeys(GC_PARTS, 0.0)
        self.current = "other"
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.thread_time()
        else:
            spent = time.thread_time() - self._gc_start
            self.parts["gc"] += spent
            self.gc_in[self.current] += spent

    def start(self, part: str) -> tuple[str, str, float]:
        """Enter ``part``; hand the token to ``stop``."""
        token = (part, self.current, time.thread_time())
        self.current = part
        return token

    def stop(self, token: tuple[str, str, float]) -> None:
        part, self.current, started = token
        self.parts[part] += time.thread_time() - started

    def reset(self) -> None:
        for key in self.parts:
            self.parts[key] = 0.0
        for key in self.gc_in:
            self.gc_in[key] = 0.0


class TimedChat:
    """The ``ChatTokenizer`` surface ``run_episode`` uses, timed."""

    def __init__(self, chat: ChatTokenizer, clock: Clock) -> None:
        self._chat = chat
        self._clock = clock
        self.end_of_turn_id = chat.end_of_turn_id

    def render_prompt(self, messages: Sequence[Message]) -> list[int]:
        t = self._clock.start("tokenize")
        try:
            return self._chat.render_prompt(messages)
        finally:
            self._clock.stop(t)

    def append_messages(self, messages: Sequence[Message]) -> list[int]:
        t = self._clock.start("tokenize")
        try:
            return self._chat.append_messages(messages)
        finally:
            self._clock.stop(t)

    def missing_end_of_turn(self, sampled_ids: Sequence[int]) -> tuple[int, ...]:
        return self._chat.missing_end_of_turn(sampled_ids)

    def decode_reply(self, sampled_ids: Sequence[int], *, stopped: bool = False) -> str:
        t = self._clock.start("tokenize")
        try:
            return self._chat.decode_reply(sampled_ids, stopped=stopped)
        finally:
            self._clock.stop(t)


class TimedEpisode:
    """An environment episode, timed; tells the recording policy where the turn is."""

    __slots__ = ("_clock", "_episode", "policy")

    def __init__(self, episode: Any, clock: Clock, policy: ScriptedPolicy | None) -> None:
        self._episode = episode
        self._clock = clock
        self.policy = policy

    def start(self) -> tuple[Message, ...]:
        t = self._clock.start("environment")
        try:
            return self._episode.start()
        finally:
            self._clock.stop(t)

    def step(self, reply: str) -> StepResult:
        t = self._clock.start("environment")
        try:
            result = self._episode.step(reply)
        finally:
            self._clock.stop(t)
        if self.policy is not None:
            self.policy.observe(result)
        return result

    def visible_tools(self) -> tuple[FunctionDoc, ...]:
        return self._episode.visible_tools()

    def score(self) -> EpisodeScore:
        t = self._clock.start("environment")
        try:
            return self._episode.score()
        finally:
            self._clock.stop(t)


class RecordingEngine:
    """In-process engine of the untimed first pass: the scripted policy's replies, recorded."""

    def __init__(self, chat: ChatTokenizer) -> None:
        self._chat = chat
        self.policies: dict[str, ScriptedPolicy] = {}
        self.script: dict[str, list[ScriptedReply]] = {}
        self._encoded: dict[str, tuple[int, ...]] = {}

    async def generate(self, request: GenerateRequest) -> Sequence[Completion]:
        key = str(request.affinity_key).rsplit(RUN_SEPARATOR, 1)[-1]
        policy = self.policies[key]
        text = policy.next_reply()
        ids = self._encoded.get(text)
        if ids is None:
            ids = self._encoded[text] = tuple(self._chat.encode_reply(text))
        finish = FinishReason.STOP
        if len(ids) > request.sampling.max_new_tokens:  # cut where an engine would
            ids, finish = ids[: request.sampling.max_new_tokens], FinishReason.LENGTH
            text = self._chat.tokenizer.decode(list(ids), skip_special_tokens=False)
        reply = ScriptedReply(ids, policy.logprobs(len(ids)), text, finish.value)
        self.script.setdefault(key, []).append(reply)
        await asyncio.sleep(0)
        return [Completion(reply.ids, reply.logprobs, finish, 0, len(request.prompt_ids))]

    async def close(self) -> None:
        return None


class ReplayEngine:
    """In-process engine of the ``inproc`` arm: the recorded ``Completion``s, after one loop yield."""

    def __init__(self, script: dict[str, list[ScriptedReply]]) -> None:
        self._completions = {
            key: [Completion(r.ids, r.logprobs, FinishReason(r.finish), 0) for r in replies]
            for key, replies in script.items()
        }
        self._cursor: dict[str, int] = {}

    async def generate(self, request: GenerateRequest) -> Sequence[Completion]:
        routing = str(request.affinity_key)
        index = self._cursor.get(routing, 0)
        self._cursor[routing] = index + 1
        await asyncio.sleep(0)
        return [self._completions[routing.rsplit(RUN_SEPARATOR, 1)[-1]][index]]

    async def close(self) -> None:
        return None


class CountingEngine:
    """Counts calls through any engine."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.calls = 0

    async def generate(self, request: GenerateRequest) -> Sequence[Completion]:
        self.calls += 1
        result: Sequence[Completion] = await self.engine.generate(request)
        return result

    async def close(self) -> None:
        await self.engine.close()


def timed_client(client: SGLangClient, clock: Clock) -> None:
    """Time the client's request encoding and its response decoding and checks, in place."""
    encode, decode, check = client.encode_request, client._decode_completions, client._completions

    def encode_request(request: GenerateRequest, rid: str | None = None) -> bytes:
        t = clock.start("request_build")
        try:
            return encode(request, rid)
        finally:
            clock.stop(t)

    def decode_completions(raw: bytes, request: GenerateRequest) -> list[Completion] | None:
        t = clock.start("response")
        try:
            return decode(raw, request)
        finally:
            clock.stop(t)

    def completions(payload: Any, request: GenerateRequest) -> list[Completion]:
        t = clock.start("response")
        try:
            return check(payload, request)
        finally:
            clock.stop(t)

    client.encode_request = encode_request  # type: ignore[method-assign]
    client._decode_completions = decode_completions  # type: ignore[method-assign]
    client._completions = completions  # type: ignore[method-assign]


class Workload:
    """The episodes, run through the real rollout actor with a given engine."""

    def __init__(self, chat: ChatTokenizer, env: BfclEnvironment, specs: list[Spec]) -> None:
        self.chat = chat
        self.env = env
        self.specs = specs
        self.agent = AgentConfig()
        self.episode_config = EpisodeConfig()
        self.clock = Clock()

    async def run(
        self, engine: Any, run_tag: str, concurrency: int, recorder: RecordingEngine | None = None
    ) -> tuple[dict[str, Trajectory], dict[str, float]]:
        trajectories: dict[str, Trajectory] = {}
        members: dict[str, int] = {}
        counted = CountingEngine(engine)
        # A fresh tokenizer wrapper per run: its caches start cold, as in a new training run.
        self.run_chat = ChatTokenizer(self.chat.tokenizer)
        chat = TimedChat(self.run_chat, self.clock)
        parts = self.clock.parts

        async def runner(spec: Spec, group_id: str, start_version: int) -> Trajectory:
            member = members.get(group_id, 0)
            members[group_id] = member + 1
            key = f"{spec.seed}:{member}"
            policy = None
            if recorder is not None:
                policy = recorder.policies[key] = ScriptedPolicy(self.env, spec.task_id, spec.seed, member)
            t = self.clock.start("environment")
            episode = self.env.make_episode(spec.task_id, self.episode_config)
            self.clock.stop(t)
            try:
                trajectory = await run_episode(
                    counted,
                    TimedEpisode(episode, self.clock, policy),
                    chat,  # type: ignore[arg-type]
                    self.agent,
                    task_id=spec.task_id,
                    group_id=group_id,
                    start_version=start_version,
                    affinity_key=f"{run_tag}{RUN_SEPARATOR}{key}",
                )
            finally:
                t = self.clock.start("environment")
                episode.close()
                self.clock.stop(t)
            trajectories[key] = trajectory
            return trajectory

        class Sink:
            async def send(self, group: Any) -> None:
                return None

        config = RolloutConfig(max_concurrent_episodes=concurrency, group_size=GROUP_SIZE, max_staleness=None)
        loop = asyncio.get_running_loop()
        self.clock.reset()
        cpu0, wall0 = time.thread_time(), loop.time()
        async with asyncio.TaskGroup() as tg:
            actor = RolloutActor(config, IteratorTaskSource(self.specs), runner, Sink())
            task = tg.create_task(actor.run())
            await actor.wait_until_done()
            await actor.stop()
            await task
        cpu, wall = time.thread_time() - cpu0, loop.time() - wall0
        stats = actor.statistics()
        if stats.episodes_dropped:
            dropped = dict(stats.dropped_by_reason)
            raise RuntimeError(f"{run_tag}: {stats.episodes_dropped} episodes dropped: {dropped}")
        cache = self.run_chat.cache_statistics()
        hits = cache["append_hits"] / max(1, cache["append_hits"] + cache["append_misses"])
        gc_in = {f"gc_in_{k}": v for k, v in self.clock.gc_in.items()}
        figures = {"cpu_s": cpu, "wall_s": wall, "calls": counted.calls, "cache_hits": hits, **parts, **gc_in}
        return trajectories, figures


def same_trajectories(a: dict[str, Trajectory], b: dict[str, Trajectory]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].token_ids == b[k].token_ids
        and a[k].behavior_logprobs == b[k].behavior_logprobs
        and a[k].loss_mask == b[k].loss_mask
        and a[k].reward == b[k].reward
        for k in a
    )


def load_average() -> float:
    return os.getloadavg()[0]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir
    from transformers import AutoTokenizer

    chat = ChatTokenizer(AutoTokenizer.from_pretrained(build_tiny_model(default_tiny_model_dir())))
    env = BfclEnvironment()
    specs = train_specs(env, args.episodes // GROUP_SIZE, args.seed)
    for spec in specs:
        env.ground_truth.get(env.tasks[spec.task_id])  # the per-task trace is computed once per run
    work = Workload(chat, env, specs)
    recorder = RecordingEngine(chat)
    recorded, _ = await work.run(recorder, "record", args.concurrency, recorder)
    script = recorder.script
    calls = sum(len(v) for v in script.values())
    prompt_tokens = [len(t.token_ids) for t in recorded.values()]
    rounds: list[dict[str, dict[str, float]]] = []
    identical = True
    loads = [load_average()]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "script.json"
        write_script(path, script)
        with stub_process(path) as url:
            client = SGLangClient(SGLangClientConfig(urls=(url,), max_connections=args.concurrency))
            timed_client(client, work.clock)
            try:
                await work.run(client, "warmup", min(args.concurrency, 32))
                for r in range(args.repeats):
                    result: dict[str, dict[str, float]] = {}
                    order = ("http", "inproc") if r % 2 == 0 else ("inproc", "http")
                    for arm in order:
                        engine = client if arm == "http" else ReplayEngine(script)
                        trajectories, figures = await work.run(engine, f"{arm}{r}", args.concurrency)
                        identical &= same_trajectories(trajectories, recorded)
                        result[arm] = figures
                    rounds.append(result)
                    loads.append(load_average())
            finally:
                await client.close()
    out = summarize(rounds, calls, prompt_tokens, identical, loads, args)
    out["append_cache_hit_rate"] = round(statistics.median(r["http"]["cache_hits"] for r in rounds), 3)
    return out


def summarize(
    rounds: list[dict[str, dict[str, float]]],
    calls: int,
    prompt_tokens: list[int],
    identical: bool,
    loads: list[float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    def us(arm: dict[str, float], key: str) -> float:
        return 1e6 * arm[key] / arm["calls"]

    per_round = []
    for r in rounds:
        http, inproc = r["http"], r["inproc"]
        total, base = us(http, "cpu_s"), us(inproc, "cpu_s")
        gc_us = us(http, "gc")
        parts = {
            "tokenize": us(http, "tokenize"),
            "environment": us(http, "environment"),
            "request_build": us(http, "request_build"),
            "response": us(http, "response"),
            "bookkeeping": base - us(inproc, "tokenize") - us(inproc, "environment"),
        }
        parts["http"] = total - sum(parts.values())  # the rest of the client path
        per_round.append(
            {
                "cpu_us_per_call": total,
                "inproc_us_per_call": base,
                "http_client_us_per_call": total - base,
                "saturation_calls_per_s": 1e6 / total,
                "wall_calls_per_s": http["calls"] / http["wall_s"],
                "loop_busy": http["cpu_s"] / http["wall_s"],
                "gc_us_per_call": gc_us,
                **{f"gc_in_{k}_us_per_call": us(http, f"gc_in_{k}") for k in GC_PARTS},
                **{f"part_{k}": v for k, v in parts.items()},
            }
        )

    def stat(key: str) -> dict[str, float]:
        values = [p[key] for p in per_round]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out: dict[str, Any] = {
        "episodes": args.episodes,
        "concurrency": args.concurrency,
        "calls_per_arm": calls,
        "repeats": args.repeats,
        "mean_episode_tokens": round(statistics.fmean(prompt_tokens)),
        "trajectories_identical": identical,
        "load_average": [round(x, 2) for x in loads],
    }
    for key in per_round[0]:
        s = stat(key)
        out[key] = round(s["median"], 1)
        out[f"{key}_samples"] = [round(p[key], 1) for p in per_round]
    return out


def report(figures: dict[str, Any]) -> None:
    f = figures
    print(
        f"{f['episodes']} episodes ({f['calls_per_arm']} engine calls, {f['mean_episode_tokens']} tokens per "
        f"episode on average) at {f['concurrency']} concurrent, {f['repeats']} rounds; "
        f"load {f['load_average']}"
    )
    print(f"{'part':<14} {'us/call':>8}   [min, max]")
    for part in PARTS:
        samples = f[f"part_{part}_samples"]
        print(f"{part:<14} {f[f'part_{part}']:>8.1f}   [{min(samples):.1f}, {max(samples):.1f}]")
    s = f["cpu_us_per_call_samples"]
    print(f"{'total':<14} {f['cpu_us_per_call']:>8.1f}   [{min(s):.1f}, {max(s):.1f}]  (target <= 300)")
    gc_in = ", ".join(f"{k} {f[f'gc_in_{k}_us_per_call']:.1f}" for k in GC_PARTS)
    print(
        f"of which GC {f['gc_us_per_call']:.1f} us/call (CPython defaults; inside {gc_in}); tokenizer cache "
        f"hit rate for environment messages {f['append_cache_hit_rate']:.0%}"
    )
    print(
        f"one loop saturates at {f['saturation_calls_per_s']:.0f} calls/s (target >= 3000); reached "
        f"{f['wall_calls_per_s']:.0f} calls/s on the wall clock with the loop {f['loop_busy']:.0%} busy; "
        f"in-process engine (no HTTP): {f['inproc_us_per_call']:.1f} us/call; trajectories identical "
        f"across arms: {f['trajectories_identical']}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer episodes and rounds")
    parser.add_argument("--episodes", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.episodes = args.episodes or (128 if args.quick else 512)
    args.concurrency = args.concurrency or (64 if args.quick else 256)
    args.repeats = args.repeats or (3 if args.quick else 5)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    figures = asyncio.run(measure(args))
    report(figures)
    print(json.dumps(figures))
    if not figures["trajectories_identical"]:
        raise SystemExit("the HTTP path and the in-process path produced different trajectories")


if __name__ == "__main__":
    main()
