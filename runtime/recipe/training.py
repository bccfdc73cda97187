"""One Environment Tuning run, wired top to bottom: from a config and open engines to learner steps.

``train`` builds, in order: the tokenizer and the BFCL environment, the curriculum scheduler, the
LoRA learner (restored from a checkpoint on resume), the adapter publisher (weight sync through the
engine client), the rollout actor, the learner actor and a metrics recorder, all under one
supervisor, and runs until the curriculum or the step budget ends or ``stop`` is set.

Left out: opening the engines and the process around the run (``envtune.runtime.cli``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from envtune.agents.chat_tokens import ChatTokenizer
from envtune.agents.engine import Engine, WeightSync
from envtune.agents.grammar import ConstraintCache
from envtune.environments.episode import BfclEnvironment
from envtune.runtime.metrics import MetricsRecorder
from envtune.runtime.recipe import config_io
from envtune.runtime.recipe.config import Config
from envtune.runtime.recipe.curriculum import CurriculumScheduler
from envtune.runtime.recipe.episodes import (
    CurriculumEpisodes,
    CurriculumTaskSource,
    EpisodeSource,
    GroupAdapters,
    make_validator,
)
from envtune.runtime.recipe.learner_actor import LearnerActor, restore
from envtune.runtime.recipe.run_folder import Checkpoint, RunFolder
from envtune.runtime.recipe.sinks import MetricSinks, open_run_sinks
from envtune.runtime.recipe.trajectory_log import SampleMode, TrajectoryLog
from envtune.runtime.rollout import RolloutActor
from envtune.runtime.supervisor import Supervisor
from envtune.runtime.watchdog import NoProgressError, ProgressWatchdog
from envtune.runtime.weight_sync import AdapterPublisher

if TYPE_CHECKING:
    from envtune.optim.learner import Learner, PolicyLearner

log = structlog.get_logger(__name__)

METRICS_INTERVAL_S = 30.0
"""Period of the runtime's own metrics records in ``metrics.jsonl``."""
LEARNER_STOP_TIMEOUT_S = 3600.0
"""The learner may be mid-step (minutes on a GPU) when asked to stop: it gets this long to finish."""


@contextlib.contextmanager
def _own_sinks(config: Config, folder: RunFolder, sinks: MetricSinks | None) -> Iterator[MetricSinks]:
    """The caller's sinks as they are, or the config's, opened here and closed on the way out."""
    if sinks is not None:
        yield sinks
        return
    own = open_run_sinks(folder.path, config.metrics, config_io.to_dict(config))
    try:
        yield own
    finally:
        own.close()


async def train(
    config: Config,
    folder: RunFolder,
    engine: Engine,
    weight_sync: WeightSync,
    model_path: Path,
    *,
    checkpoint: Checkpoint | None = None,
    stop: asyncio.Event | None = None,
    on_step: Callable[[Mapping[str, Any]], None] | None = None,
    sinks: MetricSinks | None = None,
    env: EpisodeSource | None = None,
    scheduler: CurriculumScheduler | None = None,
    learner: PolicyLearner | None = None,
    wrap_learner: Callable[[Learner], Learner] | None = None,
) -> int:
    """Run the curriculum into ``folder`` until it ends, the step budget ends or ``stop`` is set.

    ``engine`` samples the episodes, ``weight_sync`` receives every published adapter (usually the
    same SGLang client). ``sinks`` receive the metrics (the caller keeps them open and closes them);
    when None the config's sinks are opened and closed here. ``learner``: the one to train (the
    sharded learner of a ``torchrun`` job, built before the engines opened); None builds the
    single-process one here. Returns the number of learner steps completed (including those before
    a resume). ``env``, ``scheduler`` and ``wrap_learner`` replace parts for tests and benchmarks (a
    toy environment and its curriculum, a control arm's learner); a run leaves them None. Raises
    ``EngineUnavailable`` or ``WeightSyncError``, after an orderly stop with a checkpoint, when the
    engines are gone, and ``NoProgressError`` when no learner step completes for
    ``run.no_progress_timeout_s``.
    """
    with _own_sinks(config, folder, sinks) as run_sinks:
        return await _train(
            config,
            folder,
            engine,
            weight_sync,
            model_path,
            checkpoint=checkpoint,
            stop=stop,
            on_step=on_step,
            sinks=run_sinks,
            env=env,
            scheduler=scheduler,
            learner=learner,
            wrap_learner=wrap_learner,
        )


async def _train(
    config: Config,
    folder: RunFolder,
    engine: Engine,
    weight_sync: WeightSync,
    model_path: Path,
    *,
    checkpoint: Checkpoint | None,
    stop: asyncio.Event | None,
    on_step: Callable[[Mapping[str, Any]], None] | None,
    sinks: MetricSinks,
    env: EpisodeSource | None,
    scheduler: CurriculumScheduler | None,
    learner: PolicyLearner | None,
    wrap_learner: Callable[[Learner], Learner] | None,
) -> int:
    from envtune.runtime.recipe.learner_setup import build_learner
    from transformers import AutoTokenizer

    stop = stop or asyncio.Event()
    if scheduler is None:
        scheduler = CurriculumScheduler(config.curriculum, seed=config.run.seed)
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, model_path)
    chat = ChatTokenizer(tokenizer)
    bfcl = BfclEnvironment()
    if learner is None:
        learner = await asyncio.to_thread(build_learner, config, model_path)
        if wrap_learner is not None:
            learner = wrap_learner(learner)
    masks = None
    if any(stage.constrained for stage in config.curriculum.stages):
        from envtune.runtime.recipe.learner_masks import BatchMasks

        # Constrained stages train the constrained policy (learner_masks = "replay"): the learner
        # replays each reply's grammar masks, so its logprobs are the engine's behaviour logprobs.
        masks = await asyncio.to_thread(BatchMasks.for_model_path, model_path, tokenizer)
    start_step = 0
    if checkpoint is not None:
        await asyncio.to_thread(restore, learner, scheduler, checkpoint.path, checkpoint.state)
        start_step = checkpoint.step
        log.info("resumed", step=start_step, stage=scheduler.stage, policy_version=learner.policy_version)
    publisher = AdapterPublisher(folder.path / "adapters", [weight_sync])
    if learner.policy_version > 0:
        await publisher.publish(learner)
    constraints = ConstraintCache(options=config.grammar)
    concurrency = config.rollout.max_concurrent_episodes
    sampling = config.run.trajectories
    trajectory_log = (
        TrajectoryLog(folder.trajectories_path, sampling, seed=config.run.seed)
        if sampling.mode is not SampleMode.NONE
        else None
    )
    learner_actor = LearnerActor(
        learner,
        scheduler,
        publisher,
        folder,
        config.rollout,
        config.run,
        sinks=sinks,
        trajectory_log=trajectory_log,
        category_of=lambda task_id: task.category if (task := bfcl.tasks.get(task_id)) else "",
        validate=make_validator(
            scheduler,
            engine,
            bfcl,
            chat,
            publisher,
            config.sampling,
            concurrency=concurrency,
            constraints=constraints,
        ),
        on_step=on_step,
        masks=masks,
        start_step=start_step,
    )
    source = CurriculumTaskSource(scheduler)
    if scheduler.finished or (config.run.max_steps and start_step >= config.run.max_steps):
        log.info("nothing_to_do", step=start_step)
        return start_step
    pins = GroupAdapters(publisher)  # one adapter version per GRPO group, held until it ends
    rollout = RolloutActor(
        config.rollout,
        source,
        CurriculumEpisodes(engine, env or bfcl, chat, publisher, config.sampling, constraints, pins),
        learner_actor,
        policy_version=learner.policy_version,
        pins=pins,
    )
    learner_actor.connect(rollout, source)
    recorder = MetricsRecorder(
        rollout,
        queue=learner_actor.mailbox.statistics,
        interval_s=METRICS_INTERVAL_S,
        on_record=lambda r: sinks.write_event(
            {"event": "runtime", "step": learner_actor.step, **r.as_dict()}
        ),
    )
    supervisor = Supervisor([rollout, learner_actor, recorder], stop_timeout_s=LEARNER_STOP_TIMEOUT_S)

    timeout_s = config.run.no_progress_timeout_s
    await run_actors(supervisor, learner_actor, rollout, folder, stop, no_progress_timeout_s=timeout_s)
    return learner_actor.step


async def run_actors(
    supervisor: Supervisor,
    learner_actor: LearnerActor,
    rollout: RolloutActor,
    folder: RunFolder,
    stop: asyncio.Event,
    *,
    no_progress_timeout_s: float,
) -> None:
    """Run the supervised actors until the learner is done, ``stop`` is set, or no learner step
    completes for ``no_progress_timeout_s`` (0 = never): then ``NoProgressError`` is raised after
    the orderly stop (the learner checkpoints on its way out) and a ``run_failed`` event is logged."""

    def describe() -> str:
        r = rollout.statistics()
        return (
            f"step {learner_actor.step}, stage {learner_actor.scheduler.stage}; rollout: "
            f"{r.episodes_running} episodes running, {r.in_flight} in flight, gate admits "
            f"{r.admission_capacity}, dispatching {r.dispatching}; learner queue "
            f"{learner_actor.mailbox.statistics().depth} groups"
        )

    async def until_done_or_stopped() -> None:
        try:
            async with asyncio.TaskGroup() as group:
                waiters = {
                    group.create_task(learner_actor.done.wait()),
                    group.create_task(stop.wait()),
                    group.create_task(rollout.failed.wait()),
                }
                if no_progress_timeout_s:
                    watchdog = ProgressWatchdog(
                        no_progress_timeout_s, lambda: learner_actor.step, describe, what="learner step"
                    )
                    waiters.add(group.create_task(watchdog.run()))
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()  # the others: a cancelled child ends the group quietly
        except* NoProgressError as stalled:
            error = stalled.exceptions[0]
            log.error("training_stalled", error=str(error))
            event = {"event": "run_failed", "step": learner_actor.step, "reason": "no_progress"}
            folder.append_metrics({**event, "message": str(error)})
            learner_actor.finish("no progress")
            raise error from None
        if rollout.engine_failure is not None:
            learner_actor.finish("the engine is unavailable")
        if stop.is_set():
            learner_actor.finish("stop requested")

    try:
        await supervisor.run(until_done_or_stopped())
    except* NoProgressError as stalled:  # the supervisor's TaskGroup wraps it; the caller wants it bare
        raise stalled.exceptions[0] from None
    # The engines are gone: the run stopped in order (checkpoint written); now say why, once.
    failure = rollout.engine_failure or learner_actor.failure
    if failure is not None:
        raise failure
