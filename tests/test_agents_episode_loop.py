"""The episode loop with a scripted engine: exact token accounting, caps, and real BFCL replays."""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import xgrammar
from envtune.agents import AgentConfig, ChatTokenizer, SamplingConfig, run_episode, run_episode_sync
from envtune.agents.engine import (
    Completion,
    EngineError,
    FinishReason,
    GenerateRequest,
)
from envtune.environments import BfclEnvironment, EpisodeConfig, RewardKind, load_function_docs, load_tasks
from envtune.environments.ground_truth import positional_names_for
from envtune.environments.tool_calls import parse_pythonic_calls
from envtune.environments.types import EpisodeScore, FunctionDoc, Message, StepCode, StepResult

# --- fakes -----------------------------------------------------------------------------------------


class FakeEpisode:
    """Two user turns; a tool step gets tool feedback, an answer closes the turn, anything else is a
    format error. Turn 1 reveals ``mkdir`` (tools_changed)."""

    def __init__(self) -> None:
        docs = load_function_docs()
        self._tools: list[FunctionDoc] = [docs["cd"], docs["ls"]]
        self._revealed = docs["mkdir"]
        self.turn = 0
        self.codes: list[int] = []
        self.passed = [False, False]
        self.observations: list[tuple[Message, ...]] = []
        self.replies: list[str] = []

    def start(self) -> tuple[Message, ...]:
        return (Message("system", "You call tools."), Message("user", "Go to the docs folder."))

    def visible_tools(self) -> tuple[FunctionDoc, ...]:
        return tuple(self._tools)

    def step(self, reply: str) -> StepResult:
        self.replies.append(reply)
        turn = self.turn
        if "<tool_call>" in reply:
            result = StepResult(StepCode.TOOL_OK, (Message("tool", f"result of step {len(self.codes)}"),),
                                False, False, turn)
        elif "<answer>" in reply:
            self.passed[turn] = True
            self.turn += 1
            done = self.turn == 2
            if not done:
                self._tools.append(self._revealed)
            observation = () if done else (Message("user", "mkdir is available now.\n\nMake a folder."),)
            result = StepResult(StepCode.TURN_PASS, observation, True, done, turn, tools_changed=not done)
        else:
            notice = (Message("user", "Format error: fix it."),)
            result = StepResult(StepCode.FORMAT_ERROR, notice, False, False, turn, error="fix it")
        self.codes.append(int(result.code))
        self.observations.append(result.observation)
        return result

    def score(self) -> EpisodeScore:
        steps = len(self.codes)
        fmt = (steps - self.codes.count(StepCode.FORMAT_ERROR)) / steps if steps else 0.0
        tool = 1.0 if StepCode.TOOL_OK in self.codes else 0.0
        return EpisodeScore(tuple(self.passed), sum(self.passed) / 2, fmt, tool, tool * (fmt + tool),
                            tuple(self.codes), self.turn + 1)


@dataclass
class Reply:
    text: str
    version: int = 0
    finish: FinishReason = FinishReason.STOP
    cut: bool = False
    """Drop the end-of-turn token (a reply stopped by a length cap)."""


@dataclass
class ScriptedEngine:
    """Returns the scripted replies in order, tokenized as a model would have sampled them."""

    chat: ChatTokenizer
    replies: list[Reply]
    requests: list[GenerateRequest] = field(default_factory=list)
    sampled: list[tuple[int, ...]] = field(default_factory=list)
    compiler: xgrammar.GrammarCompiler | None = None

    def generate_sync(self, request: GenerateRequest) -> Sequence[Completion]:
        reply = self.replies[len(self.requests)]
        self.requests.append(request)
        ids = self.chat.encode_reply(reply.text)
        finish = reply.finish
        if reply.cut:
            ids = ids[:-1]
        if len(ids) > request.sampling.max_new_tokens:  # an engine never exceeds the cap
            ids, finish = ids[: request.sampling.max_new_tokens], FinishReason.LENGTH
        if self.compiler is not None:  # a constrained engine could only have sampled grammatical ids
            assert request.constraint is not None
            matcher = xgrammar.GrammarMatcher(self.compiler.compile_grammar(request.constraint.grammar))
            assert all(matcher.accept_token(t) for t in ids), reply.text
            assert matcher.is_terminated(), reply.text
        logprobs = tuple(-0.01 * (i + 1) for i in range(len(ids)))
        self.sampled.append(tuple(ids))
        return [Completion(tuple(ids), logprobs, finish, policy_version=reply.version)]

    async def generate(self, request: GenerateRequest) -> Sequence[Completion]:
        return self.generate_sync(request)

    async def close(self) -> None:
        return None


TOOL = '<think>I go there.</think><tool_call>[{"name": "cd", "arguments": {"folder": "docs"}}]</tool_call>'
ANSWER = "<think>Done.</think><answer>I am in docs.</answer>"
MKDIR = '<think>New tool.</think><tool_call>[{"name": "mkdir", "arguments": {"dir_name": "new"}}]</tool_call>'
SCRIPT = [
    Reply(TOOL, version=5),
    Reply("<think>oops no tags", version=5),
    Reply(ANSWER, version=6),  # a weight swap happened between two steps of the episode
    Reply(MKDIR, version=6),
    Reply(ANSWER, version=7),
]


async def test_trajectory_is_prompt_plus_sampled_plus_appended(chat: ChatTokenizer, tokenizer) -> None:
    episode, engine = FakeEpisode(), ScriptedEngine(chat, list(SCRIPT))
    traj = await run_episode(engine, episode, chat, AgentConfig(), task_id="t", group_id="g", stage=2,
                             start_version=5)
    prompt = chat.render_prompt(episode.start())
    assert list(engine.requests[0].prompt_ids) == prompt
    expected_ids, expected_mask, expected_lp, expected_versions = list(prompt), [False] * len(prompt), [], []
    expected_lp = [0.0] * len(prompt)
    expected_versions = [-1] * len(prompt)
    for i, (reply, sampled) in enumerate(zip(SCRIPT, engine.sampled, strict=True)):
        assert list(engine.requests[i].prompt_ids) == expected_ids  # the engine saw exactly the history
        expected_ids += sampled
        expected_mask += [True] * len(sampled)
        expected_lp += [-0.01 * (k + 1) for k in range(len(sampled))]
        expected_versions += [reply.version] * len(sampled)
        if i + 1 < len(SCRIPT):
            appended = chat.append_messages(episode.observations[i])
            expected_ids += appended
            expected_mask += [False] * len(appended)
            expected_lp += [0.0] * len(appended)
            expected_versions += [-1] * len(appended)
    assert list(traj.token_ids) == expected_ids
    assert list(traj.loss_mask) == expected_mask
    assert list(traj.behavior_logprobs) == expected_lp
    assert list(traj.policy_versions) == expected_versions
    assert traj.min_policy_version == 5
    # The tiny template is prefix-stable, so the ids also equal a full re-templating of the history.
    history = list(episode.start())
    for reply, observation in zip(episode.replies, episode.observations, strict=True):
        history += [Message("assistant", reply), *observation]
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in history], tokenize=True
    )["input_ids"]
    assert list(traj.token_ids) == list(rendered)[:-1]  # the template adds "\n" after the last <|im_end|>
    assert episode.replies == [r.text for r in SCRIPT]
    assert (traj.progress, traj.reward, traj.truncated) == (1.0, 1.0, False)
    assert (traj.stage, traj.start_version) == (2, 5)
    assert traj.step_codes == (-1, -3, 1, -1, 1)
    # The transcript is the same episode as the environment saw it: opening, then each reply's text
    # with the environment's result (the very objects ``step`` returned).
    assert traj.transcript is not None
    assert traj.transcript.opening == tuple((m.role, m.content) for m in episode.start())
    assert [r.text for r in traj.transcript.replies] == episode.replies
    assert [r.observation for r in traj.transcript.replies] == [
        tuple((m.role, m.content) for m in observation) for observation in episode.observations
    ]
    assert [r.code for r in traj.transcript.replies] == list(traj.step_codes)
    assert [r.turn for r in traj.transcript.replies] == [0, 0, 0, 1, 1]
    # Atoms only below each reply: the collector stops tracking those tuples, so thousands of
    # transcripts in flight cost it one object per reply (see agents/trajectory.py). Nested tuples
    # are untracked one level per collection, so two.
    gc.collect()
    gc.collect()
    for reply in traj.transcript.replies:
        assert not gc.is_tracked(reply.observation) and not gc.is_tracked(reply.calls)
    assert not gc.is_tracked(traj.transcript.opening)


async def test_async_loop_agrees_with_the_reference_loop(chat: ChatTokenizer) -> None:
    config = AgentConfig(constrained=True, reward=RewardKind.STAGE1)
    fast = await run_episode(ScriptedEngine(chat, list(SCRIPT)), FakeEpisode(), chat, config,
                             task_id="t", group_id="g")
    reference_engine = ScriptedEngine(chat, list(SCRIPT))
    reference = run_episode_sync(reference_engine.generate_sync, FakeEpisode(), chat, config,
                                 task_id="t", group_id="g")
    assert fast == reference  # the transcripts too (a field of the trajectory)
    assert fast.transcript is not None and len(fast.transcript.replies) == len(SCRIPT)
    assert fast.reward == pytest.approx(0.8 + 1.0)  # stage-1 reward: 4 of 5 steps well-formed, tools ok


async def test_requests_stop_at_end_of_turn_and_carry_the_turns_constraint(chat: ChatTokenizer) -> None:
    engine = ScriptedEngine(chat, list(SCRIPT))
    config = AgentConfig(sampling=SamplingConfig(max_new_tokens=64, temperature=0.7, stop_token_ids=(0,)),
                         constrained=True, adapter="policy-3")
    await run_episode(engine, FakeEpisode(), chat, config, task_id="t", group_id="g", affinity_key="ep-1")
    for request in engine.requests:
        assert request.sampling.stop_token_ids == (0, chat.end_of_turn_id)
        assert request.sampling.temperature == 0.7
        assert (request.adapter, request.affinity_key) == ("policy-3", "ep-1")
    grammars = [r.constraint.grammar for r in engine.requests if r.constraint is not None]
    assert len(grammars) == len(SCRIPT)
    # mkdir is revealed at turn 1 (after the third reply): only then does the grammar name it.
    assert ['"\\"mkdir\\""' in g for g in grammars] == [False, False, False, True, True]
    plain = ScriptedEngine(chat, list(SCRIPT))
    await run_episode(plain, FakeEpisode(), chat, AgentConfig(), task_id="t", group_id="g")
    assert all(r.constraint is None and r.affinity_key == "g" for r in plain.requests)


async def test_each_reply_records_the_constraint_it_was_sampled_under(chat: ChatTokenizer) -> None:
    engine = ScriptedEngine(chat, list(SCRIPT))
    config = AgentConfig(constrained=True)
    traj = await run_episode(engine, FakeEpisode(), chat, config, task_id="t", group_id="g")
    # One span per reply, exactly over its sampled ids, holding the very constraint of its request.
    runs, start = [], None
    for i, sampled in enumerate([*traj.loss_mask, False]):
        if sampled and start is None:
            start = i
        elif not sampled and start is not None:
            runs.append((start, i))
            start = None
    assert [(s.start, s.end) for s in traj.constraint_spans] == runs
    assert [traj.token_ids[a:b] for a, b in runs] == engine.sampled
    assert [s.constraint for s in traj.constraint_spans] == [r.constraint for r in engine.requests]
    assert traj.constrained and traj.constraint_spans[3].constraint is not traj.constraint_spans[2].constraint
    plain = await run_episode(ScriptedEngine(chat, list(SCRIPT)), FakeEpisode(), chat, AgentConfig(),
                              task_id="t", group_id="g")
    assert plain.constraint_spans == () and not plain.constrained


def test_constraint_spans_must_cover_sampled_tokens_only() -> None:
    from envtune.agents import ConstraintSpan, Trajectory
    from envtune.agents.engine import Constraint, ConstraintKind

    c = Constraint(ConstraintKind.REGEX, "a+")
    fields = dict(task_id="t", group_id="g", token_ids=(1, 2, 3, 4), loss_mask=(False, True, True, False),
                  behavior_logprobs=(0.0,) * 4, policy_versions=(-1, 0, 0, -1), reward=0.0, progress=0.0,
                  format_reward=0.0, tool_reward=0.0, turn_passed=(), step_codes=(), stage=0, start_version=0)
    assert Trajectory(**fields, constraint_spans=(ConstraintSpan(1, 3, c),)).constrained
    for bad in ((0, 2), (2, 4), (2, 2), (3, 9)):
        with pytest.raises(ValueError, match="constraint span"):
            Trajectory(**fields, constraint_spans=(ConstraintSpan(*bad, c),))
    with pytest.raises(ValueError, match="out of order"):
        Trajectory(**fields, constraint_spans=(ConstraintSpan(2, 3, c), ConstraintSpan(1, 2, c)))


async def test_a_length_capped_reply_is_closed_with_an_unsampled_end_of_turn(chat: ChatTokenizer) -> None:
    script = [Reply("<think>I keep thinking and", finish=FinishReason.LENGTH, cut=True), *SCRIPT]
    engine = ScriptedEngine(chat, script)
    traj = await run_episode(engine, FakeEpisode(), chat, AgentConfig(), task_id="t", group_id="g")
    start = len(engine.requests[0].prompt_ids) + len(engine.sampled[0])
    assert engine.sampled[0][-1] != chat.end_of_turn_id
    assert traj.token_ids[start] == chat.end_of_turn_id
    assert not traj.loss_mask[start]
    assert (traj.policy_versions[start], traj.behavior_logprobs[start]) == (-1, 0.0)
    assert traj.step_codes[0] == StepCode.FORMAT_ERROR


async def test_the_total_token_cap_truncates(chat: ChatTokenizer) -> None:
    prompt_len = len(chat.render_prompt(FakeEpisode().start()))
    cap = prompt_len + 60  # room for the first reply and its feedback, not for the whole episode
    engine = ScriptedEngine(chat, list(SCRIPT))
    config = AgentConfig(sampling=SamplingConfig(max_episode_tokens=cap))
    traj = await run_episode(engine, FakeEpisode(), chat, config, task_id="t", group_id="g")
    assert traj.truncated
    assert len(traj.token_ids) <= cap
    assert traj.progress == 0.0 and traj.turn_passed == (False, False)
    for request in engine.requests:
        assert len(request.prompt_ids) + request.sampling.max_new_tokens <= cap
    assert traj.loss_mask[-1]  # it ends on a (cut) model reply, never on feedback nobody answers


async def test_the_reply_cap_truncates(chat: ChatTokenizer) -> None:
    engine = ScriptedEngine(chat, [Reply(TOOL)] * 3)
    config = AgentConfig(sampling=SamplingConfig(max_replies=3))
    traj = await run_episode(engine, FakeEpisode(), chat, config, task_id="t", group_id="g")
    assert traj.truncated and len(engine.requests) == 3 and traj.step_codes == (-1, -1, -1)


@dataclass
class BrokenEngine:
    completions: list[Completion]

    async def generate(self, request: GenerateRequest) -> Sequence[Completion]:
        return self.completions

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(
    ("completions", "retryable"),
    [
        ([Completion((1,), (0.0,), FinishReason.ABORT, 0)], True),
        ([], False),
        ([Completion((1, 2), (0.0,), FinishReason.STOP, 0)], False),
    ],
)
async def test_engine_failures_raise_engine_error(chat: ChatTokenizer, completions, retryable: bool) -> None:
    with pytest.raises(EngineError) as info:
        await run_episode(
            BrokenEngine(completions), FakeEpisode(), chat, AgentConfig(), task_id="t", group_id="g"
        )
    assert info.value.retryable is retryable


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("max_new_tokens", 0),
        ("max_episode_tokens", 1),
        ("max_replies", 0),
    ],
)
def test_sampling_config_refuses_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


# --- a real BFCL episode -----------------------------------------------------------------------------

REPLAY_TASKS = (
    "multi_turn_base_3",
    "multi_turn_miss_func_5",
    "multi_turn_miss_param_7",
    "multi_turn_long_context_2",
)


def ground_truth_replies(task) -> list[Reply]:
    """The ground truth as a model would write it: per turn, one tool step with all its calls (when
    the turn has any) and then an answer."""
    positional = positional_names_for(task)
    replies = []
    for turn in task.ground_truth:
        if turn:
            calls = [c for source in turn for c in parse_pythonic_calls(source, positional)]
            body = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
            replies.append(Reply(f"<think>Calling.</think><tool_call>{body}</tool_call>"))
        replies.append(Reply("<think>Finished.</think><answer>Done.</answer>"))
    return replies


@pytest.fixture(scope="module")
def bfcl() -> BfclEnvironment:
    return BfclEnvironment(load_tasks())


@pytest.mark.parametrize("task_id", REPLAY_TASKS)
async def test_ground_truth_replay_scores_full_progress(
    chat: ChatTokenizer, bfcl: BfclEnvironment, grammar_compiler, task_id: str
) -> None:
    """The GT calls, sent through the loop under the grammar of each turn's visible tools, pass."""
    task = bfcl.tasks[task_id]
    engine = ScriptedEngine(chat, ground_truth_replies(task), compiler=grammar_compiler)
    episode = bfcl.make_episode(task_id, EpisodeConfig())
    config = AgentConfig(sampling=SamplingConfig(max_episode_tokens=200_000), constrained=True)
    traj = await run_episode(engine, episode, chat, config,
                             task_id=task_id, group_id="g")
    assert traj.progress == 1.0 and all(traj.turn_passed) and not traj.truncated
    assert len(traj.turn_passed) == task.num_turns
    assert len(engine.requests) == len(engine.replies)
    sampled = [t for t, m in zip(traj.token_ids, traj.loss_mask, strict=True) if m]
    assert sampled == [t for ids in engine.sampled for t in ids]


async def test_answering_without_calling_scores_zero(chat: ChatTokenizer, bfcl: BfclEnvironment) -> None:
    task_id = "multi_turn_base_3"
    replies = [Reply("<think>No.</think><answer>I will not.</answer>")] * 20
    engine = ScriptedEngine(chat, replies)
    traj = await run_episode(engine, bfcl.make_episode(task_id, EpisodeConfig()), chat, AgentConfig(),
                             task_id=task_id, group_id="g")
    assert traj.progress < 1.0 and not traj.truncated
