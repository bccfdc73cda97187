"""A learnability probe: the user names one of a few tools, and the reward is calling exactly that one.

One turn, one reply. The system prompt lists ``K`` argument-free tools with short, distinct names;
the user message names one of them. The reply is parsed with the real ``parse_reply`` and scored
with the real records: reward 1 when its ``<tool_call>`` holds exactly one call, to the named tool
(with no arguments), else 0. Nothing is executed. A random model calls the named tool about 1/K of
the time; when every prompt names the same tool, a working training loop raises the reward past
0.5 in about ten steps on CPU, so one that does not is broken: that is the probe's whole purpose
(``tests/test_learning_e2e.py``). Prompts that name different tools also test that the policy reads
the prompt, a slower lesson for a random model (the name is one token among dozens).

It has the episode API of ``envtune.environments.Episode`` (``start``, ``visible_tools``, ``step``,
``score``, ``done``, ``close``); ``ToyEnvironment`` and ``toy_curriculum_data`` let the real
curriculum, rollout and learner actors run it (``tests/test_learning_actors.py``).
Deliberately left out: multiple turns, feedback, anything of BFCL's.
A format error ends the episode too (BFCL would let the model retry within the turn).
"""

from __future__ import annotations

from collections.abc import Sequence

from envtune.environments.episode import EpisodeStateError
from envtune.environments.tasks import Split, Task
from envtune.environments.tool_calls import FormatError, parse_reply
from envtune.environments.types import (
    CallOutcome,
    EpisodeScore,
    FunctionDoc,
    Message,
    StepCode,
    StepResult,
)

TOY_TOOLS: tuple[str, ...] = ("cd", "ls", "mv", "sort")
"""Default tool names: one token each in the tiny model's tokenizer, no two with the same first letter."""

_PHRASINGS: tuple[str, ...] = ("Call {name}.", "Use {name}.", "Run {name} now.")
"""User messages; ``{name}`` is the tool to call."""


def toy_function_docs(names: Sequence[str] = TOY_TOOLS) -> tuple[FunctionDoc, ...]:
    """Docs of argument-free tools with these names."""
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"tool names must be distinct and non-empty, got {names!r}")
    return tuple(
        FunctionDoc(
            name=name,
            class_name="ToyTools",
            description=f"The tool called {name}.",
            parameters={"type": "dict", "properties": {}, "required": []},
        )
        for name in names
    )


def system_prompt(names: Sequence[str]) -> str:
    """Short on purpose: a tiny model's prompt tokens are most of the probe's cost, and every prompt
    token dilutes its random attention to the one token that differs between prompts (the name)."""
    return (
        f"Tools: {', '.join(names)}. Call the one the user names: "
        '<think></think><tool_call>[{"name": "...", "arguments": {}}]</tool_call>'
    )


class NamedToolEpisode:
    """One episode of the probe; ``seed`` picks the named tool (``seed % K``) and the phrasing."""

    def __init__(self, seed: int, names: Sequence[str] = TOY_TOOLS, *, require_think: bool = True) -> None:
        self._tools = toy_function_docs(names)
        self.target = self._tools[seed % len(self._tools)].name
        """The tool the user names."""
        self._question = _PHRASINGS[(seed // len(self._tools)) % len(_PHRASINGS)].format(name=self.target)
        self._require_think = require_think
        self._started = False
        self._code: StepCode | None = None
        self._formatted = False
        self._called = False

    @property
    def done(self) -> bool:
        return self._code is not None

    def start(self) -> tuple[Message, ...]:
        self._started = True
        return (
            Message("system", system_prompt([t.name for t in self._tools])),
            Message("user", self._question),
        )

    def visible_tools(self) -> tuple[FunctionDoc, ...]:
        return self._tools

    def step(self, reply: str | bytes) -> StepResult:
        if not self._started or self.done:
            raise EpisodeStateError("step() needs a started episode that is not over")
        try:
            parsed = parse_reply(reply, require_think=self._require_think)
        except FormatError as exc:
            self._code = StepCode.FORMAT_ERROR
            return StepResult(
                code=self._code, observation=(), turn_ended=True, done=True, turn_index=0, error=str(exc)
            )
        self._formatted = True
        self._called = parsed.kind == "tool_call"
        outcomes = tuple(
            CallOutcome(
                call=call,
                executed=False,
                ok=call.name == self.target and not call.arguments,
                result="ok" if call.name == self.target else f"Error: the user named {self.target}",
            )
            for call in parsed.calls
        )
        passed = len(outcomes) == 1 and outcomes[0].ok
        self._code = StepCode.TURN_PASS if passed else StepCode.TURN_FAIL
        return StepResult(
            code=self._code, observation=(), turn_ended=True, done=True, turn_index=0, calls=outcomes
        )

    def score(self) -> EpisodeScore:
        passed = self._code is StepCode.TURN_PASS
        reward = 1.0 if passed else 0.0
        format_reward = 1.0 if self._formatted else 0.0
        return EpisodeScore(
            turn_passed=(passed,),
            progress=reward,
            format_reward=format_reward,
            tool_reward=reward,
            stage1_reward=format_reward + reward if self._called else 0.0,
            step_codes=() if self._code is None else (int(self._code),),
            turns_reached=1 if self._started else 0,
        )

    def close(self) -> None:
        """Nothing to release (the BFCL episode's API has it)."""


# --- the probe as a curriculum's environment --------------------------------------------------------

TOY_TASK_PREFIX = "toy_"
"""Task ids of the probe in a curriculum: ``toy_<seed>`` plays ``NamedToolEpisode(seed)``."""


def toy_task_id(seed: int) -> str:
    return f"{TOY_TASK_PREFIX}{seed}"


class ToyEnvironment:
    """``make_episode`` for a curriculum over toy task ids (the ``BfclEnvironment`` role)."""

    def __init__(self, names: Sequence[str] = TOY_TOOLS) -> None:
        self._names = tuple(names)

    def make_episode(self, task_id: str, config: object = None) -> NamedToolEpisode:
        """The probe episode of ``toy_<seed>``; the stage's episode config has nothing to set here."""
        if not task_id.startswith(TOY_TASK_PREFIX):
            raise ValueError(f"not a toy task id: {task_id!r}")
        return NamedToolEpisode(int(task_id.removeprefix(TOY_TASK_PREFIX)), self._names)


def toy_curriculum_data(seeds: Sequence[int]) -> tuple[Split, dict[str, Task]]:
    """A split and task records that let ``CurriculumScheduler`` hand out toy tasks: every seed is a
    ``base`` training task (no test or validation ids), so any stage over ``base`` draws from them."""
    ids = tuple(toy_task_id(seed) for seed in seeds)
    tasks = {
        task_id: Task(
            id=task_id,
            category="base",
            questions=((task_id,),),
            initial_config={},
            involved_classes=(),
            ground_truth=((),),
            missed_function={},
        )
        for task_id in ids
    }
    return Split(train=ids, test=(), validation=()), tasks
