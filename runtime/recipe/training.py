"""One Environment Tuning run, wired top to bottom: from a config and open engines to learner steps.

``train`` builds, in order: the tokenizer and the BFCL environment, the curriculum scheduler, the
LoRA learner (restored from a checkpoint on resume), the adapter publisher (weight sync through the
engine client), the rollout actor, the learner actor and a metrics recorder, all under one
supervisor, and runs until the curriculum or the step budget ends or ``stop`` is set.

Left out: opening the engines and the process around the run (``envtune.runtime.cli``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog
from envtune.agents.chat_tokens import ChatTokenizer
from envtune.agents.engine import Engine, WeightSync
from envtune.agents.grammar import ConstraintCache, GrammarOptions
from envtune.environments.episode import BfclEnvironment
from envtune.runtime.metrics import MetricsRecorder
from envtune.runtime.recipe.config import Config
from envtune.runtime.recipe.curriculum import CurriculumScheduler
from envtune.runtime.recipe.episodes import CurriculumEpisodes, CurriculumTaskSource, make_validator
from envtune.runtime.recipe.learner_actor import LearnerActor, restore
from envtune.runtime.recipe.run_folder import Checkpoint, RunFolder
from envtune.runtime.rollout import RolloutActor
from envtune.runtime.supervisor import Supervisor
from envtune.runtime.weight_sync import AdapterPublisher

log = structlog.get_logger(__name__)

METRICS_INTERVAL_S = 30.0
"""Period of the runtime's own metrics records in ``metrics.jsonl``."""
LEARNER_STOP_TIMEOUT_S = 3600.0
"""The learner may be mid-step (minutes on a GPU) when asked to stop: it gets this long to finish."""


def load_policy_model(path: Path) -> Any:
    """The policy model for the learner: bf16 on a GPU, fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    if torch.cuda.is_available():
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        return model.to("cuda")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


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
) -> int:
    """Run the curriculum into ``folder`` until it ends, the step budget ends or ``stop`` is set.

    ``engine`` samples the episodes, ``weight_sync`` receives every published adapter (usually the
    same SGLang client). Returns the number of learner steps completed (including those before a
    resume). Raises ``EngineUnavailable`` or ``WeightSyncError``, after an orderly stop with a
    checkpoint, when the engines are gone.
    """
    from envtune.optim.learner import Learner
    from transformers import AutoTokenizer

    stop = stop or asyncio.Event()
    scheduler = CurriculumScheduler(config.curriculum, seed=config.run.seed)
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, model_path)
    chat = ChatTokenizer(tokenizer)
    env = BfclEnvironment()
    model = await asyncio.to_thread(load_policy_model, model_path)
    # The learner divides logits by the rollout temperature to match the behaviour logprobs.
    learner = Learner(model, config.learner, temperature=config.sampling.temperature)
    start_step = 0
    if checkpoint is not None:
        await asyncio.to_thread(restore, learner, scheduler, checkpoint.path, checkpoint.state)
        start_step = checkpoint.step
        log.info("resumed", step=start_step, stage=scheduler.stage, policy_version=learner.policy_version)
    publisher = AdapterPublisher(folder.path / "adapters", [weight_sync])
    if learner.policy_version > 0:
        await publisher.publish(learner)
    think = config.sampling.max_think_chars
    constraints = ConstraintCache(options=GrammarOptions(max_think_chars=think or None))
    concurrency = config.rollout.max_concurrent_episodes
    learner_actor = LearnerActor(
        learner,
        scheduler,
        publisher,
        folder,
        config.rollout,
        config.run,
        decode=lambda ids: str(tokenizer.decode(list(ids), skip_special_tokens=False)),
        validate=make_validator(
            scheduler,
            engine,
            env,
            chat,
            publisher,
            config.sampling,
            concurrency=concurrency,
            constraints=constraints,
        ),
        on_step=on_step,
        start_step=start_step,
    )
    source = CurriculumTaskSource(scheduler)
    if scheduler.finished or (config.run.max_steps and start_step >= config.run.max_steps):
        log.info("nothing_to_do", step=start_step)
        return start_step
    rollout = RolloutActor(
        config.rollout,
        source,
        CurriculumEpisodes(engine, env, chat, publisher, config.sampling, constraints),
        learner_actor,
        policy_version=learner.policy_version,
    )
    learner_actor.connect(rollout, source)
    recorder = MetricsRecorder(
        rollout,
        queue=learner_actor.mailbox.statistics,
        interval_s=METRICS_INTERVAL_S,
        on_record=lambda r: folder.append_metrics(
            {"event": "runtime", "step": learner_actor.step, **r.as_dict()}
        ),
    )
    supervisor = Supervisor([rollout, learner_actor, recorder], stop_timeout_s=LEARNER_STOP_TIMEOUT_S)

    async def until_done_or_stopped() -> None:
        async with asyncio.TaskGroup() as group:
            waiters = {
                group.create_task(learner_actor.done.wait()),
                group.create_task(stop.wait()),
                group.create_task(rollout.failed.wait()),
            }
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()  # the others: a cancelled child ends the group quietly
        if rollout.engine_failure is not None:
            learner_actor.finish("the engine is unavailable")
        if stop.is_set():
            learner_actor.finish("stop requested")

    await supervisor.run(until_done_or_stopped())
    # The engines are gone: the run stopped in order (checkpoint written); now say why, once.
    failure = rollout.engine_failure or learner_actor.failure
    if failure is not None:
        raise failure
    return learner_actor.step
