"""A scripted stand-in policy on real BFCL tasks, shared by the benchmarks (not a benchmark itself).

The policy answers a real environment episode the way an RL policy early in training does: it
replays the task's ground-truth calls one per reply, makes a format error with probability
``P_ERROR`` per reply (the environment answers it, and ends the turn at its step limit), answers
when the turn's calls are done, and thinks for a length drawn per reply (``THINK_TOKENS``) scaled by
a per-episode verbosity (``VERBOSITY``). These lengths are assumptions (no recorded policy traces
of a real model on BFCL are available here); the number of replies per episode comes from the real
tasks (turns, ground-truth calls per turn) and the environment's own step limit.

Every draw is seeded by (group seed, member), so every run of the same episodes does the same work.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

from envtune.environments import BfclEnvironment, load_split
from envtune.environments.ground_truth import ground_truth_calls
from envtune.environments.types import StepResult

GROUP_SIZE = 16
"""n, as in the paper's runs."""
P_ERROR = 0.25
"""Chance that a reply is a format error instead of the next ground-truth step."""
THINK_TOKENS = ((16, 0.15), (32, 0.2), (64, 0.25), (128, 0.2), (256, 0.1), (512, 0.07), (1024, 0.03))
"""Thinking tokens per reply and their probabilities (mean about 100; a 3% tail at 1,024)."""
VERBOSITY = ((0.5, 0.3), (1.0, 0.5), (2.0, 0.2))
"""Per-episode multiplier of thinking length and its probabilities."""
CHARS_PER_TOKEN = 4
"""Think text is written at about this many characters per intended token."""

_THINK_VALUES = [v for v, _ in THINK_TOKENS]
_THINK_CUMULATIVE = list(itertools.accumulate(w for _, w in THINK_TOKENS))[:-1]
_WORDS = (
    "the", "user", "wants", "me", "to", "list", "files", "in", "the", "current", "folder", "first",
    "then", "move", "the", "report", "into", "the", "archive", "directory", "check", "that", "the",
    "target", "exists", "and", "call", "the", "tool", "with", "the", "exact", "path", "names",
    "from", "the", "last", "result", "before", "answering", "I", "should", "not", "guess",
    "arguments", "the", "previous", "call", "returned", "an", "error", "so", "fix", "the",
    "parameter", "types", "and", "retry", "once",
)
ERROR_TAIL = "I should look at the files before calling anything."
"""What a format error writes after its think block (no tool call, no answer block)."""


def think_text(tokens: int, rng: random.Random) -> str:
    """Plausible reasoning text of about ``tokens`` tokens."""
    words: list[str] = []
    chars = 0
    start = rng.randrange(len(_WORDS))
    while chars < tokens * CHARS_PER_TOKEN:
        word = _WORDS[(start + len(words)) % len(_WORDS)]
        words.append(word)
        chars += len(word) + 1
    return " ".join(words)


@dataclass(frozen=True, slots=True)
class Spec:
    """A task spec with the seed of its group's stand-in policy."""

    task_id: str
    stage: int = 0
    seed: int = 0


def train_specs(env: BfclEnvironment, groups: int, seed: int) -> list[Spec]:
    """``groups`` group specs over the training split, shuffled by ``seed`` (cycled if needed)."""
    order = list(load_split().ids("train"))
    random.Random(seed).shuffle(order)
    return [Spec(order[g % len(order)], seed=seed * 1_000_003 + g) for g in range(groups)]


class ScriptedPolicy:
    """One episode's stand-in policy: reply texts, steered by the environment's turn ends."""

    __slots__ = ("_calls", "_cursor", "_rng", "_turn", "_verbosity")

    def __init__(self, env: BfclEnvironment, task_id: str, seed: int, member: int) -> None:
        task = env.tasks[task_id]
        self._calls = [
            [json.dumps([{"name": c.name, "arguments": c.arguments}]) for c in turn]
            for turn in ground_truth_calls(task)
        ]
        self._rng = random.Random(seed * 64 + member)
        self._verbosity = self._rng.choices([v for v, _ in VERBOSITY], [w for _, w in VERBOSITY])[0]
        self._turn = 0
        self._cursor = 0

    def observe(self, result: StepResult) -> None:
        """The environment's answer to the last reply (a turn end resets the cursor)."""
        if result.turn_ended:
            self._turn, self._cursor = result.turn_index + 1, 0

    def next_reply(self) -> str:
        rng = self._rng
        think = int(_THINK_VALUES[bisect.bisect(_THINK_CUMULATIVE, rng.random())] * self._verbosity)
        calls: Sequence[str] = self._calls[self._turn] if self._turn < len(self._calls) else ()
        reasoning = think_text(think, rng)
        if rng.random() < P_ERROR:
            return f"<think>{reasoning}</think>{ERROR_TAIL}"
        if self._cursor < len(calls):
            body = calls[self._cursor]
            self._cursor += 1
            return f"<think>{reasoning}</think><tool_call>{body}</tool_call>"
        return f"<think>{reasoning}</think><answer>Done.</answer>"

    def logprobs(self, count: int) -> tuple[float, ...]:
        """Realistic behaviour logprobs: distinct negative floats, most near 0, some far."""
        rng = self._rng
        return tuple(-rng.expovariate(3.0) for _ in range(count))
