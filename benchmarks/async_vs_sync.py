"""Async against synchronous RL at equal bounded engine capacity, with a learner and weight sync.

The question a practitioner asks: on the same inference capacity, how many trained episodes per
second does envtune's async discipline give against what peers run? Every arm trains the same
number of learner steps on the same groups (same tasks, same per-episode shapes, same order) and
shares one engine model (``BatchedEngineModel``: a running batch of at most ``max_running``
requests, per-token latency growing with the batch, prefill stalls, a stall per weight load).

Arms (what a peer would actually run, at the same engine capacity):
* ``sync`` (verl's default step, TRL, ART): generate the whole batch of ``groups_per_step`` groups
  at once (``run_synchronous_batches``: every episode of the batch in flight, the batch ends with
  its slowest episode), train, publish the weights, repeat. The engine idles while the learner
  trains.
* ``one_step_off`` (verl one-step-off, slime ``train_async.py``): batch k+1 is generated while the
  learner trains on batch k; weights are published between generations.
* ``async_eta{1,2,4}`` (envtune; AReaL, SkyRL, verl fully-async): the real ``RolloutActor`` with
  its staleness gate (eta = ``max_staleness``, ``(eta + 1) * groups_per_step`` groups in flight)
  feeding a learner actor through its bounded mailbox; stale groups are dropped by the rollout at
  emission and by the learner at consumption (the product's rule, ``is_stale``).
* ``async_eta1_same_flight``: eta = 1 with only the synchronous arm's episodes in flight, to
  separate removing the batch barrier from running more episodes at once.

The learner is a double (``LearnerDouble``): it takes groups exactly as ``LearnerActor`` does
(stale check, batches of ``groups_per_step``, publish, ``PolicyUpdated``, ``GroupsDiscarded``), and
a step costs ``learner_s_per_token`` per trained token, calibrated so that in the synchronous arm
training takes ``--learner-ratio`` of the generation time (default 0.43: rollout = 70% of a step,
verl's one-step-off measurement on DAPO), then ``publish_s`` to save and load the adapter, during
which the engine stalls ``engine_pause_s``.

Episode shapes come from the real tasks: each episode is the scripted policy of
``_bfcl_policy.py`` played against a real ``BfclEnvironment`` episode; its replies and the
environment's answers give the per-call reply and prompt lengths (4 characters per token), its
turns and the environment's step limit give the number of calls. The prompt is prefilled once per
group (prefix cache), the rest per call.

Clock: ``VirtualClockLoop`` without CPU charging: modelled engine, environment (``env_step_s``) and
learner times only, so the figures are deterministic for a seed and free of machine load; the
runtime's own CPU per call is what ``loop_capacity.py`` measures. Repeats use different seeds
(task order and policy draws); figures are median [min, max] over seeds. Steady state: steps
``warmup_steps``..N (the first steps fill the pipeline).

    python benchmarks/async_vs_sync.py --quick
    python benchmarks/async_vs_sync.py           # the paper's preset: 32 groups x 16 per step
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import structlog
from _bfcl_policy import GROUP_SIZE, ScriptedPolicy, Spec, train_specs
from envtune.agents.engine import GenerateRequest, SamplingParams
from envtune.agents.trajectory import Trajectory
from envtune.environments import BfclEnvironment, EpisodeConfig
from envtune.runtime.actors import Actor, MailboxClosed
from envtune.runtime.cli.bench_registry import Benchmark, Figure
from envtune.runtime.records import (
    DropReason,
    GroupsDiscarded,
    PolicyUpdated,
    TrajectoryGroup,
    is_stale,
)
from envtune.runtime.reference import run_synchronous_batches
from envtune.runtime.rollout import RolloutActor, RolloutConfig
from envtune.runtime.testing.batch_engine import BatchedEngineModel, BatchLatency
from envtune.runtime.testing.fake_engine import VirtualClockLoop

BENCHMARK = Benchmark(
    name="async_vs_sync",
    summary="trained episodes/s of async (eta 1, 2, 4) vs sync and one-step-off on one bounded engine",
    quick=("--quick",),
    full=(),
    figures=(
        Figure(
            key="async_eta1_over_sync",
            label="async eta=1 over synchronous, trained episodes/s",
            unit="x",
            target=">= 1.5",
            samples="async_eta1_over_sync_samples",
            baseline_key="sync_episodes_per_s",
            baseline_label="verl-style sync: generate batch -> train -> publish, same engine",
            ratio=True,
        ),
        Figure(
            key="one_step_off_over_sync",
            label="one-step-off over synchronous",
            unit="x",
            samples="one_step_off_over_sync_samples",
            baseline_key="sync_episodes_per_s",
            baseline_label="verl-style sync",
            ratio=True,
        ),
        Figure(
            key="async_eta1_over_one_step_off",
            label="async eta=1 over one-step-off",
            unit="x",
            samples="async_eta1_over_one_step_off_samples",
            baseline_key="one_step_off_episodes_per_s",
            baseline_label="verl one-step-off / slime train_async",
            ratio=True,
        ),
        Figure(
            key="async_eta2_over_sync", label="async eta=2 over synchronous", unit="x",
            samples="async_eta2_over_sync_samples", baseline_key="sync_episodes_per_s",
            baseline_label="verl-style sync", ratio=True,
        ),
        Figure(
            key="async_eta4_over_sync", label="async eta=4 over synchronous", unit="x",
            samples="async_eta4_over_sync_samples", baseline_key="sync_episodes_per_s",
            baseline_label="verl-style sync", ratio=True,
        ),
    ),
    checks=("accounting_ok", "staleness_bound_ok"),
)

ENV_STEP_S = 0.005
"""Modelled tool execution + loop work between two engine calls of an episode."""
CHARS_PER_TOKEN = 4


# --- episode shapes from the real tasks ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EpisodeShape:
    """One episode's engine calls: (uncached prompt tokens, reply tokens) each, and its length."""

    calls: tuple[tuple[int, int], ...]
    total_tokens: int


def episode_shapes(
    env: BfclEnvironment, spec: Spec, max_new_tokens: int, max_tokens: int
) -> list[EpisodeShape]:
    """The ``GROUP_SIZE`` members of a group: the scripted policy against real episodes."""
    shapes = []
    for member in range(GROUP_SIZE):
        policy = ScriptedPolicy(env, spec.task_id, spec.seed, member)
        episode = env.make_episode(spec.task_id, EpisodeConfig())
        try:
            prompt = sum(len(m.content) for m in episode.start()) // CHARS_PER_TOKEN + 16
            calls = []
            total = prompt
            new = prompt // GROUP_SIZE  # the group's shared prompt is prefilled once (prefix cache)
            for _ in range(100):
                reply = policy.next_reply()
                tokens = min(max_new_tokens, len(reply) // CHARS_PER_TOKEN + 1)
                calls.append((new, tokens))
                total += tokens
                result = episode.step(reply)
                policy.observe(result)
                if result.done:
                    break
                new = sum(len(m.content) for m in result.observation) // CHARS_PER_TOKEN + 8
                if total + new >= max_tokens:
                    break
                total += new
            shapes.append(EpisodeShape(tuple(calls), total))
        finally:
            episode.close()
    return shapes


@dataclass(frozen=True, slots=True)
class ShapedSpec:
    """A group's task spec with the index of its shapes."""

    task_id: str
    shape: int
    stage: int = 0


class Shapes:
    """The groups' shapes, cycled as an endless task order (the same for every arm)."""

    def __init__(self, env: BfclEnvironment, groups: int, seed: int) -> None:
        specs = train_specs(env, groups, seed)
        self.groups = [episode_shapes(env, s, 2048, 32768) for s in specs]
        self.task_ids = [s.task_id for s in specs]

    def spec(self, index: int) -> ShapedSpec:
        g = index % len(self.groups)
        return ShapedSpec(self.task_ids[g], g)

    def specs(self) -> Iterator[ShapedSpec]:
        return (self.spec(i) for i in itertools.count())

    def group_tokens(self, spec: ShapedSpec) -> int:
        return sum(s.total_tokens for s in self.groups[spec.shape])


# --- episodes against the engine model ---------------------------------------------------------


class ReplayRunner:
    """The ``EpisodeRunner``: an episode's calls against the engine, with the environment's time."""

    def __init__(self, shapes: Shapes) -> None:
        self.shapes = shapes
        self._members: dict[str, int] = {}
        self._next: dict[str, tuple[int, int]] = {}
        self._sampling = SamplingParams(max_new_tokens=4096)
        self.engine: BatchedEngineModel | None = None

    def shape_of(self, request: GenerateRequest) -> tuple[int, int]:
        return self._next.pop(str(request.affinity_key))

    async def __call__(self, spec: ShapedSpec, group_id: str, start_version: int) -> Trajectory:
        assert self.engine is not None
        member = self._members.get(group_id, 0)
        self._members[group_id] = member + 1
        if member + 1 == GROUP_SIZE:
            del self._members[group_id]
        shape = self.shapes.groups[spec.shape][member]
        key = f"{group_id}/{member}"
        for call in shape.calls:
            self._next[key] = call
            await self.engine.generate(GenerateRequest((1,), self._sampling, affinity_key=key))
            await asyncio.sleep(ENV_STEP_S)
        return Trajectory(
            task_id=spec.task_id, group_id=group_id, token_ids=(1, 2), loss_mask=(False, True),
            behavior_logprobs=(0.0, -1.0), policy_versions=(-1, start_version), reward=float(member % 2),
            progress=0.0, format_reward=0.0, tool_reward=0.0, turn_passed=(), step_codes=(),
            stage=0, start_version=start_version,
        )


# --- the learner double -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LearnerCost:
    """What one learner step and one publish cost (modelled seconds)."""

    per_token_s: float
    fixed_s: float = 1.0
    publish_s: float = 2.0
    """Save the adapter and load it into the engine (``AdapterPublisher.publish``)."""
    engine_pause_s: float = 0.5
    """How long the adapter load stalls the engine's decoding."""


@dataclass(slots=True)
class StepRecord:
    start: float
    end: float
    episodes: int
    tokens: int
    engine: Any
    staleness: list[int] = field(default_factory=list)


class LearnerDouble(Actor[TrajectoryGroup]):
    """``LearnerActor``'s consumption rules with a step of modelled cost (see the module docstring)."""

    accepts = (TrajectoryGroup,)

    def __init__(
        self, shapes: Shapes, engine: BatchedEngineModel, cost: LearnerCost, groups_per_step: int,
        max_staleness: int | None, steps: int,
    ) -> None:
        super().__init__("learner", max(2, 2 * groups_per_step))
        self.shapes = shapes
        self.engine = engine
        self.cost = cost
        self.groups_per_step = groups_per_step
        self.max_staleness = max_staleness
        self.steps = steps
        self.version = 0
        self.records: list[StepRecord] = []
        self.discarded: Counter[DropReason] = Counter()
        self.done = asyncio.Event()
        self._batch: list[TrajectoryGroup] = []
        self.rollout: RolloutActor | None = None
        self.t0 = asyncio.get_running_loop().time()

    async def handle(self, message: TrajectoryGroup) -> None:
        if self.done.is_set():
            await self._discard(DropReason.RUN_ENDING)
        elif is_stale(message.start_version, self.version, self.max_staleness):
            await self._discard(DropReason.STALE)
        else:
            self._batch.append(message)
            if len(self._batch) >= self.groups_per_step:
                batch, self._batch = self._batch, []
                await self.train(batch)
                await self.publish()

    async def _discard(self, reason: DropReason) -> None:
        self.discarded[reason] += 1
        if self.rollout is not None:
            with contextlib.suppress(MailboxClosed):  # the rollout already stopped (run ending)
                await self.rollout.send(GroupsDiscarded(count=1, reason=reason))

    async def train(self, batch: list[TrajectoryGroup]) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tokens = sum(self.shapes.group_tokens(g.task) for g in batch)
        self.engine.mark(True)
        await asyncio.sleep(self.cost.fixed_s + self.cost.per_token_s * tokens)
        self.engine.mark(False)
        self.records.append(
            StepRecord(start, 0.0, sum(len(g.trajectories) for g in batch), tokens, None,
                       [self.version - g.start_version for g in batch])
        )

    async def publish(self) -> None:
        """Save and load the new adapter; the load stalls the engine's decoding."""
        await asyncio.sleep(self.cost.publish_s - self.cost.engine_pause_s)
        self.engine.stall(self.cost.engine_pause_s)
        await asyncio.sleep(self.cost.engine_pause_s)
        self.version += 1
        self.engine.policy_version = self.version
        record = self.records[-1]
        record.end = asyncio.get_running_loop().time()
        record.engine = self.engine.statistics()
        if self.rollout is not None:
            with contextlib.suppress(MailboxClosed):
                await self.rollout.send(PolicyUpdated(version=self.version))
        if len(self.records) >= self.steps:
            self.done.set()


# --- the arms -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    groups_per_step: int
    steps: int
    warmup_steps: int
    latency: BatchLatency
    cost: LearnerCost


def new_engine(setup: Setup, runner: ReplayRunner) -> BatchedEngineModel:
    engine = BatchedEngineModel(setup.latency, runner.shape_of)
    runner.engine = engine
    return engine


async def run_sync(shapes: Shapes, setup: Setup) -> dict[str, Any]:
    runner = ReplayRunner(shapes)
    engine = new_engine(setup, runner)
    learner = LearnerDouble(shapes, engine, setup.cost, setup.groups_per_step, 0, setup.steps)
    specs = shapes.specs()
    gen_s: list[float] = []
    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as tg:
        engine_task = tg.create_task(engine.run())
        for _ in range(setup.steps):
            batch_specs = [next(specs) for _ in range(setup.groups_per_step)]
            t0 = loop.time()
            result = await run_synchronous_batches(
                batch_specs, runner, group_size=GROUP_SIZE, groups_per_batch=setup.groups_per_step,
                policy_version=learner.version,
            )
            gen_s.append(loop.time() - t0)
            await learner.train(list(result.groups))
            await learner.publish()
        await engine.close()
        engine_task.cancel()
    return summarize("sync", learner, engine, setup, extra={"generation_s": gen_s})


async def run_one_step_off(shapes: Shapes, setup: Setup) -> dict[str, Any]:
    runner = ReplayRunner(shapes)
    engine = new_engine(setup, runner)
    learner = LearnerDouble(shapes, engine, setup.cost, setup.groups_per_step, 1, setup.steps)
    specs = shapes.specs()

    async def generate(version: int) -> list[TrajectoryGroup]:
        batch_specs = [next(specs) for _ in range(setup.groups_per_step)]
        result = await run_synchronous_batches(
            batch_specs, runner, group_size=GROUP_SIZE, groups_per_batch=setup.groups_per_step,
            policy_version=version,
        )
        return list(result.groups)

    async with asyncio.TaskGroup() as tg:
        engine_task = tg.create_task(engine.run())
        pending = tg.create_task(generate(learner.version))
        published = 0
        for k in range(setup.steps):
            batch = await pending
            if learner.version > published:  # the last step's weights go out between generations,
                await asyncio.sleep(setup.cost.publish_s)  # while the engine has nothing to run
                published = learner.version
            if k + 1 < setup.steps:
                pending = tg.create_task(generate(learner.version))
            await learner.train(batch)
            learner.version += 1
            learner.records[-1].end = asyncio.get_running_loop().time()
            learner.records[-1].engine = engine.statistics()
        await engine.close()
        engine_task.cancel()
    return summarize("one_step_off", learner, engine, setup)


async def run_async(
    shapes: Shapes, setup: Setup, eta: int, in_flight_groups: int, name: str
) -> dict[str, Any]:
    runner = ReplayRunner(shapes)
    engine = new_engine(setup, runner)
    learner = LearnerDouble(shapes, engine, setup.cost, setup.groups_per_step, eta, setup.steps)
    config = RolloutConfig(
        group_size=GROUP_SIZE, groups_per_step=setup.groups_per_step, max_staleness=eta,
        max_concurrent_episodes=in_flight_groups * GROUP_SIZE,
    )
    rollout = RolloutActor(config, _Source(shapes.specs()), runner, learner)
    learner.rollout = rollout
    async with asyncio.TaskGroup() as tg:
        engine_task = tg.create_task(engine.run())
        rollout_task = tg.create_task(rollout.run())
        learner_task = tg.create_task(learner.run())
        await learner.done.wait()
        await rollout.stop("done")
        await rollout_task
        await learner.stop("done")
        await learner_task
        await engine.close()
        engine_task.cancel()
    stats = rollout.statistics()
    return summarize(name, learner, engine, setup, rollout=stats)


class _Source:
    def __init__(self, specs: Iterator[ShapedSpec]) -> None:
        self._specs = specs

    async def next_task(self) -> ShapedSpec:
        return next(self._specs)


def summarize(
    name: str, learner: LearnerDouble, engine: BatchedEngineModel, setup: Setup,
    rollout: Any = None, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    records = learner.records[: setup.steps]
    a, b = records[setup.warmup_steps - 1], records[-1]
    window = b.end - a.end
    episodes = sum(r.episodes for r in records[setup.warmup_steps :])
    trained_tokens = sum(r.tokens for r in records[setup.warmup_steps :])
    ea, eb = a.engine, b.engine
    train_s = sum(
        setup.cost.fixed_s + setup.cost.per_token_s * r.tokens for r in records[setup.warmup_steps :]
    )
    out: dict[str, Any] = {
        "arm": name,
        "episodes_per_s": episodes / window,
        "trained_tokens_per_s": trained_tokens / window,
        "generated_tokens_per_s": (eb.generated_tokens - ea.generated_tokens) / window,
        "step_s": window / (len(records) - setup.warmup_steps),
        "time_to_first_step_s": records[0].start - learner.t0,
        "engine_busy": (eb.busy_s - ea.busy_s) / window,
        "engine_batch_fill": (eb.batch_token_s - ea.batch_token_s) / window / setup.latency.max_running,
        "learner_busy": train_s / window,
        "overlap": (eb.marked_busy_s - ea.marked_busy_s) / window,
        "max_staleness_trained": max((s for r in records for s in r.staleness), default=0),
        "stale_groups_learner": learner.discarded[DropReason.STALE],
    }
    if rollout is not None:
        dropped = rollout.dropped_by_reason
        out["stale_episodes_rollout"] = dropped.get(DropReason.STALE, 0)
        out["accounting_ok"] = (
            rollout.episodes_started
            == rollout.episodes_completed + rollout.episodes_dropped + rollout.in_flight
        )
        out["episodes_started"] = rollout.episodes_started
    if extra:
        out.update(extra)
    return out


async def one_seed(args: argparse.Namespace, seed: int) -> dict[str, dict[str, Any]]:
    env = BfclEnvironment()
    shapes = Shapes(env, args.distinct_groups, seed)
    g = args.groups_per_step
    latency = BatchLatency(max_running=args.max_running)
    # Calibrate the learner: its step costs --learner-ratio of the synchronous generation time.
    probe = Setup(g, 3, 1, latency, LearnerCost(per_token_s=0.0))
    calib = await run_sync(shapes, probe)
    gen = statistics.fmean(calib["generation_s"])
    tokens_per_step = statistics.fmean(
        sum(shapes.group_tokens(shapes.spec(k * g + i)) for i in range(g)) for k in range(3)
    )
    cost = LearnerCost(per_token_s=max(0.0, args.learner_ratio * gen - 1.0) / tokens_per_step)
    setup = Setup(g, args.steps, args.warmup_steps, latency, cost)
    arms = {
        "sync": await run_sync(shapes, setup),
        "one_step_off": await run_one_step_off(shapes, setup),
        "async_eta1_same_flight": await run_async(shapes, setup, 1, g, "async_eta1_same_flight"),
    }
    for eta in (1, 2, 4):
        arms[f"async_eta{eta}"] = await run_async(shapes, setup, eta, (eta + 1) * g, f"async_eta{eta}")
    for arm in arms.values():
        arm["learner_step_s"] = cost.fixed_s + cost.per_token_s * tokens_per_step
        arm["sync_generation_s"] = gen
    return arms


def run(args: argparse.Namespace) -> dict[str, Any]:
    per_seed = []
    for seed in range(args.seed, args.seed + args.repeats):
        with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
            per_seed.append(runner.run(one_seed(args, seed)))
    names = list(per_seed[0])
    out: dict[str, Any] = {
        "groups_per_step": args.groups_per_step,
        "group_size": GROUP_SIZE,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "max_running": args.max_running,
        "learner_ratio": args.learner_ratio,
        "seeds": args.repeats,
        "load_average": round(os.getloadavg()[0], 2),
        "clock": "virtual (modelled engine, environment and learner time)",
    }
    for name in names:
        for key in ("episodes_per_s", "generated_tokens_per_s", "trained_tokens_per_s", "step_s",
                    "time_to_first_step_s", "engine_busy", "engine_batch_fill", "learner_busy", "overlap",
                    "max_staleness_trained", "stale_groups_learner", "stale_episodes_rollout"):
            values = [s[name][key] for s in per_seed if key in s[name]]
            if values:
                out[f"{name}_{key}"] = round(statistics.median(values), 4)
    out["learner_step_s"] = round(statistics.median(s["sync"]["learner_step_s"] for s in per_seed), 3)
    out["sync_generation_s"] = round(statistics.median(s["sync"]["sync_generation_s"] for s in per_seed), 3)
    for name in names:
        for base in ("sync", "one_step_off"):
            if name == base or (base == "one_step_off" and name != "async_eta1"):
                continue
            ratios = [s[name]["episodes_per_s"] / s[base]["episodes_per_s"] for s in per_seed]
            out[f"{name}_over_{base}"] = round(statistics.median(ratios), 3)
            out[f"{name}_over_{base}_samples"] = [round(r, 3) for r in ratios]
    out["accounting_ok"] = all(s[n].get("accounting_ok", True) for s in per_seed for n in names)
    out["staleness_bound_ok"] = all(
        s[n]["max_staleness_trained"] <= bound
        for s in per_seed
        for n, bound in [("sync", 0), ("one_step_off", 1), ("async_eta1", 1), ("async_eta2", 2),
                         ("async_eta4", 4), ("async_eta1_same_flight", 1)]
    )
    return out


def report(out: dict[str, Any]) -> None:
    print(
        f"{out['groups_per_step']} groups x {out['group_size']} per step, {out['steps']} steps "
        f"(steady state from step {out['warmup_steps']}), engine running batch <= {out['max_running']}, "
        f"learner step {out['learner_step_s']:.1f} s = {out['learner_ratio']} x sync generation "
        f"({out['sync_generation_s']:.1f} s); {out['seeds']} seeds; clock: {out['clock']}"
    )
    print(f"{'arm':<24} {'ep/s':>7} {'gen tok/s':>9} {'step s':>7} {'1st step s':>10} {'engine':>7} "
          f"{'fill':>6} {'learner':>7} {'overlap':>7} {'stale':>5} {'x sync':>6}")
    for name in ("sync", "one_step_off", "async_eta1_same_flight", "async_eta1", "async_eta2", "async_eta4"):
        p = f"{name}_"
        stale = out.get(p + "stale_groups_learner", 0) * GROUP_SIZE + out.get(p + "stale_episodes_rollout", 0)
        ratio = out.get(f"{name}_over_sync", 1.0)
        print(f"{name:<24} {out[p + 'episodes_per_s']:>7.2f} {out[p + 'generated_tokens_per_s']:>9.0f} "
              f"{out[p + 'step_s']:>7.1f} {out[p + 'time_to_first_step_s']:>10.1f} "
              f"{out[p + 'engine_busy']:>7.0%} {out[p + 'engine_batch_fill']:>6.0%} "
              f"{out[p + 'learner_busy']:>7.0%} {out[p + 'overlap']:>7.0%} "
              f"{stale:>5.0f} {ratio:>6.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 groups per step, 2 seeds")
    parser.add_argument("--groups-per-step", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--max-running", type=int, default=None, help="engine running-batch bound")
    parser.add_argument("--learner-ratio", type=float, default=0.43,
                        help="learner step / synchronous generation time (0.43: rollout 70%% of a step)")
    parser.add_argument("--distinct-groups", type=int, default=None, help="distinct group shapes (cycled)")
    parser.add_argument("--repeats", type=int, default=None, help="seeds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.groups_per_step = args.groups_per_step or (8 if args.quick else 32)
    args.steps = args.steps or (8 if args.quick else 12)
    args.max_running = args.max_running or args.groups_per_step * GROUP_SIZE // 4
    args.distinct_groups = args.distinct_groups or 4 * args.groups_per_step
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.steps <= args.warmup_steps:
        parser.error("--steps must exceed --warmup-steps")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    out = run(args)
    report(out)
    print(json.dumps(out))
    if not (out["accounting_ok"] and out["staleness_bound_ok"]):
        raise SystemExit("an accounting or staleness invariant failed")


if __name__ == "__main__":
    main()
