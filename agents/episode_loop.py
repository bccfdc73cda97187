"""One episode, token in and token out: generate, let the environment step, append its answer.

``run_episode`` drives an ``Engine`` and an environment episode through the user turns of a task:
the prompt is rendered once; each reply is kept exactly as the engine sampled it (ids, behaviour
logprobs, the policy version that sampled it, loss mask on); the reply's text goes to
``episode.step``; the environment's messages are tokenized alone and appended (loss mask off). The
environment decides turn ends, the per-turn step limit, revealed functions and scores; this loop
only stops early at the length caps of ``SamplingConfig`` (marked truncated). An episode whose
``step`` blocks (a simulated user over HTTP, tools in a child process) may return an awaitable
instead, which ``run_episode`` awaits (``AwaitableStepEpisode``), so the event loop keeps running.
The trajectory carries the ``Transcript`` too: the opening messages and each reply's text with the
environment's result.

``run_episode_sync`` is the reference loop: the same episode, written top to bottom against a plain
``generate`` function. Tests check that both produce the same trajectory.

Error boundary: ``EngineError`` from the engine (and an aborted generation, raised as a retryable
``EngineError``) propagates to the caller, which owns retries and dropping. The caller also owns
the episode object (creating and closing it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog
from envtune.agents.chat_tokens import ChatTokenizer
from envtune.agents.config import AgentConfig
from envtune.agents.engine import (
    Completion,
    Constraint,
    Engine,
    EngineError,
    FinishReason,
    GenerateRequest,
    SamplingParams,
)
from envtune.agents.grammar import ConstraintCache
from envtune.agents.trajectory import ConstraintSpan, Reply, Trajectory, Transcript
from envtune.environments.types import EpisodeScore, FunctionDoc, Message, StepResult

log = structlog.get_logger(__name__)

NOT_SAMPLED_VERSION = -1
"""Policy version recorded for prompt and environment tokens."""


class EpisodeLike(Protocol):
    """What the loop needs of an environment episode (``envtune.environments.Episode``)."""

    def start(self) -> tuple[Message, ...]: ...

    def step(self, reply: str) -> StepResult: ...

    def visible_tools(self) -> tuple[FunctionDoc, ...]: ...

    def score(self) -> EpisodeScore: ...


class AwaitableStepEpisode(Protocol):
    """An episode whose ``step`` answers later (``run_episode`` only; it awaits the step)."""

    def start(self) -> tuple[Message, ...]: ...

    def step(self, reply: str) -> Awaitable[StepResult]: ...

    def visible_tools(self) -> tuple[FunctionDoc, ...]: ...

    def score(self) -> EpisodeScore: ...


def reply_sampling(config: AgentConfig, chat: ChatTokenizer, history_len: int) -> SamplingParams:
    """Sampling for the next reply: stop at end-of-turn, never past ``max_episode_tokens``."""
    sampling = config.sampling
    stops = sampling.stop_token_ids
    if chat.end_of_turn_id not in stops:
        stops = (*stops, chat.end_of_turn_id)
    room = sampling.max_episode_tokens - history_len
    return sampling.request_params(min(sampling.max_new_tokens, room), stops, config.seed)


def single_completion(completions: Sequence[Completion]) -> Completion:
    """The one completion of an n=1 request, checked (an engine bug is not a trajectory)."""
    if len(completions) != 1:
        raise EngineError(f"expected 1 completion, got {len(completions)}", retryable=False)
    completion = completions[0]
    if completion.finish_reason is FinishReason.ABORT:
        raise EngineError("generation aborted", retryable=True)
    if len(completion.logprobs) != len(completion.token_ids):
        raise EngineError(
            f"{len(completion.token_ids)} tokens but {len(completion.logprobs)} logprobs", retryable=False
        )
    return completion


class _TokenBuffer:
    """The growing trajectory: ids with their mask, behaviour logprobs and policy versions.

    Plain lists on purpose: the finished ``Trajectory`` holds tuples of Python numbers, and request
    tuples share the list's int objects (a typed array would box every number anew on conversion).
    """

    def __init__(self, prompt_ids: Sequence[int]) -> None:
        self.ids: list[int] = list(prompt_ids)
        self.mask: list[bool] = [False] * len(self.ids)
        self.logprobs: list[float] = [0.0] * len(self.ids)
        self.versions: list[int] = [NOT_SAMPLED_VERSION] * len(self.ids)
        self.spans: list[ConstraintSpan] = []

    def __len__(self) -> int:
        return len(self.ids)

    def add_sampled(self, completion: Completion, constraint: Constraint | None) -> None:
        n = len(completion.token_ids)
        if constraint is not None and n:
            self.spans.append(ConstraintSpan(len(self.ids), len(self.ids) + n, constraint))
        self.ids.extend(completion.token_ids)
        self.mask.extend([True] * n)
        self.logprobs.extend(completion.logprobs)
        self.versions.extend([completion.policy_version] * n)

    def add_environment(self, ids: Sequence[int]) -> None:
        n = len(ids)
        self.ids.extend(ids)
        self.mask.extend([False] * n)
        self.logprobs.extend([0.0] * n)
        self.versions.extend([NOT_SAMPLED_VERSION] * n)


def build_trajectory(
    *,
    task_id: str,
    group_id: str,
    ids: Sequence[int],
    mask: Sequence[bool],
    logprobs: Sequence[float],
    versions: Sequence[int],
    score: EpisodeScore,
    config: AgentConfig,
    stage: int,
    start_version: int,
    truncated: bool,
    constraint_spans: Sequence[ConstraintSpan] = (),
    transcript: Transcript | None = None,
) -> Trajectory:
    """The finished record, rewards taken from the environment's score."""
    return Trajectory(
        task_id=task_id,
        group_id=group_id,
        token_ids=tuple(ids),
        loss_mask=tuple(mask),
        behavior_logprobs=tuple(logprobs),
        policy_versions=tuple(versions),
        reward=score.reward(config.reward),
        progress=score.progress,
        format_reward=score.format_reward,
        tool_reward=score.tool_reward,
        turn_passed=score.turn_passed,
        step_codes=score.step_codes,
        stage=stage,
        start_version=start_version,
        truncated=truncated,
        constraint_spans=tuple(constraint_spans),
        transcript=transcript,
    )


async def run_episode(
    engine: Engine,
    episode: EpisodeLike | AwaitableStepEpisode,
    chat: ChatTokenizer,
    config: AgentConfig,
    *,
    task_id: str,
    group_id: str,
    stage: int = 0,
    start_version: int = 0,
    affinity_key: str | None = None,
    constraints: ConstraintCache | None = None,
) -> Trajectory:
    """Play ``episode`` to its end (or a cap) with ``engine``; see the module docstring.

    ``affinity_key`` defaults to ``group_id`` (a group shares its prompt, so one replica's prefix cache
    serves it). ``constraints`` is a cache shared across episodes; a private one is used when None.
    """
    opening = episode.start()
    buffer = _TokenBuffer(chat.render_prompt(opening))
    replies: list[Reply] = []
    cache = constraints if constraints is not None else ConstraintCache(max_entries=4)
    constraint: Constraint | None = cache.get(episode.visible_tools()) if config.constrained else None
    key = affinity_key if affinity_key is not None else group_id
    truncated = True  # unless the environment says done
    for _ in range(config.sampling.max_replies):
        if len(buffer) >= config.sampling.max_episode_tokens:
            break
        request = GenerateRequest(
            prompt_ids=tuple(buffer.ids),
            sampling=reply_sampling(config, chat, len(buffer)),
            constraint=constraint,
            adapter=config.adapter,
            affinity_key=key,
        )
        completion = single_completion(await engine.generate(request))
        buffer.add_sampled(completion, constraint)
        stopped = completion.finish_reason is FinishReason.STOP
        text = chat.decode_reply(completion.token_ids, stopped=stopped)
        stepped = episode.step(text)
        result = stepped if isinstance(stepped, StepResult) else await stepped
        replies.append(Reply.of(text, result))
        if result.done:
            truncated = False
            break
        if result.tools_changed and config.constrained:
            constraint = cache.get(episode.visible_tools())
        closing = chat.missing_end_of_turn(completion.token_ids)
        feedback = [*closing, *chat.append_messages(result.observation)]
        if len(buffer) + len(feedback) >= config.sampling.max_episode_tokens:
            break  # no room left to answer the feedback: the trailing ids would train nothing
        buffer.add_environment(feedback)
    score = episode.score()
    log.debug(
        "episode_finished",
        task_id=task_id,
        group_id=group_id,
        tokens=len(buffer),
        model_tokens=sum(buffer.mask),
        progress=score.progress,
        truncated=truncated,
    )
    return build_trajectory(
        task_id=task_id,
        group_id=group_id,
        ids=buffer.ids,
        mask=buffer.mask,
        logprobs=buffer.logprobs,
        versions=buffer.versions,
        score=score,
        config=config,
        stage=stage,
        start_version=start_version,
        truncated=truncated,
        constraint_spans=buffer.spans,
        transcript=Transcript.of(opening, tuple(replies)),
    )


def run_episode_sync(
    generate: Callable[[GenerateRequest], Sequence[Completion]],
    episode: EpisodeLike,
    chat: ChatTokenizer,
    config: AgentConfig,
    *,
    task_id: str,
    group_id: str,
    stage: int = 0,
    start_version: int = 0,
) -> Trajectory:
    """The reference loop: what ``run_episode`` does, top to bottom, with a blocking ``generate``."""
    opening = episode.start()
    ids = chat.render_prompt(opening)
    replies: list[Reply] = []
    mask = [False] * len(ids)
    logprobs = [0.0] * len(ids)
    versions = [NOT_SAMPLED_VERSION] * len(ids)
    spans: list[ConstraintSpan] = []
    cache = ConstraintCache(max_entries=4)
    truncated = True
    for _ in range(config.sampling.max_replies):
        if len(ids) >= config.sampling.max_episode_tokens:
            break
        request = GenerateRequest(
            prompt_ids=tuple(ids),
            sampling=reply_sampling(config, chat, len(ids)),
            constraint=cache.get(episode.visible_tools()) if config.constrained else None,
            adapter=config.adapter,
            affinity_key=group_id,
        )
        reply = single_completion(generate(request))
        if request.constraint is not None and reply.token_ids:
            spans.append(ConstraintSpan(len(ids), len(ids) + len(reply.token_ids), request.constraint))
        ids += reply.token_ids
        mask += [True] * len(reply.token_ids)
        logprobs += reply.logprobs
        versions += [reply.policy_version] * len(reply.token_ids)
        text = chat.decode_reply(reply.token_ids, stopped=reply.finish_reason is FinishReason.STOP)
        result = episode.step(text)
        replies.append(Reply.of(text, result))
        if result.done:
            truncated = False
            break
        feedback = [*chat.missing_end_of_turn(reply.token_ids), *chat.append_messages(result.observation)]
        if len(ids) + len(feedback) >= config.sampling.max_episode_tokens:
            break
        ids += feedback
        mask += [False] * len(feedback)
        logprobs += [0.0] * len(feedback)
        versions += [NOT_SAMPLED_VERSION] * len(feedback)
    return build_trajectory(
        task_id=task_id,
        group_id=group_id,
        ids=ids,
        mask=mask,
        logprobs=logprobs,
        versions=versions,
        score=episode.score(),
        config=config,
        stage=stage,
        start_version=start_version,
        truncated=truncated,
        constraint_spans=spans,
        transcript=Transcript.of(opening, tuple(replies)),
    )
