"""Hostile tool-call strings driven through the real parsers and dispatcher of real BFCL episodes.

``ToolCallFuzzer`` writes replies a model under RL could emit, aimed at the episode in front of it:
envtune's ``<tool_call>`` JSON and BFCL's pythonic form, with well-formed calls to the visible
functions carrying hostile values (huge and deep literals, path tricks, precision and exponent bombs,
type confusion), calls to hidden, private, dunder and foreign names, attribute chains, code
(``__import__``, lambdas, comprehensions, f-strings), malformed JSON and tags, NUL, lone surrogates,
invalid UTF-8, and call sequences that make the file system cyclic before walking it.

``run_fuzz`` plays them through ``Episode.step`` (a pythonic string is first parsed by
``parse_pythonic_calls``, then its calls are stepped as JSON) and counts:

- **crashes**: any exception that escapes ``Episode.step`` or the pythonic parser (``FormatError`` from
  the parser is its normal answer, not a crash);
- **escapes**: any execution outside the visible BFCL methods, seen by ``tripwires.Tripwires`` (a
  dispatch to a method that is not visible, ``open``/``eval``/``exec``/``compile``, a new import,
  processes, sockets, file-system changes), plus any module that appeared during a step.

This is a test and benchmark harness (``benchmarks/fuzz_tools.py``, ``tests/test_environments_fuzz.py``);
the product never imports it. Tripwires patch process-wide names while installed: do not run it next to
other work in the same process.
"""

from __future__ import annotations

import collections
import datetime
import json
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from envtune.environments.episode import EVAL_MAX_STEPS_PER_TURN, BfclEnvironment, Episode, EpisodeConfig
from envtune.environments.ground_truth import positional_names_for
from envtune.environments.instances import CLASS_MODULES, bfcl_class
from envtune.environments.tasks import CATEGORIES, Task, load_function_docs
from envtune.environments.tool_calls import FormatError, parse_pythonic_calls
from envtune.environments.tripwires import Tripwires
from envtune.environments.types import FeedbackMode, FunctionDoc

MAX_EXAMPLES = 10
"""How many crashes a report quotes."""


# --- the generator -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FuzzCase:
    """One hostile input."""

    family: str
    """Which kind of attack it is (see ``FAMILIES``)."""
    text: str | bytes
    """The reply given to ``Episode.step``, or the pythonic source when ``pythonic`` is set."""
    pythonic: bool = False
    """Parse ``text`` with ``parse_pythonic_calls`` first, then step its calls as JSON."""


@dataclass(frozen=True, slots=True)
class Target:
    """What the fuzzer aims at: the episode in front of it."""

    visible: tuple[FunctionDoc, ...]
    hidden: tuple[str, ...]
    foreign: tuple[str, ...]
    """Functions of BFCL classes this episode does not involve."""


# Integers of thousands of digits cost a quadratic int->str conversion each time they are written, so the
# generator carries markers and writes the digits into the finished text (``_unmark``).
_BIG = "\ue000big4299\ue000"
_NEG_BIG = "\ue000-big4299\ue000"
_BIG_1000 = "\ue000big1000\ue000"
_BIG_DIGITS = MappingProxyType({_BIG: "9" * 4299, _NEG_BIG: "-" + "9" * 4299, _BIG_1000: "1" + "0" * 1000})
_INTS = (0, 1, -1, 2, 3, 7, 10, 100, 5000, 10**6, 10**7, 10**9, 2**31 - 1, 2**31, -(2**31), 2**63,
         -(2**63) - 1, 10**18, 10**100, _BIG_1000, _BIG, _NEG_BIG)  # fmt: skip
_FLOATS = (0.0, -0.0, 0.5, 2.5, 3.14, 1e-300, 5e-324, 1e16, 1e308, -1e308, 1.7976931348623157e308)
_STRINGS = (
    "", " ", ".", "..", "/", "//", "../..", "../../../../etc/passwd", "/etc/passwd", "/proc/self/environ",
    "~/.ssh/id_rsa", "C:\\Windows\\system32", "a/b/c", "./.", "....//", "%2e%2e%2f", "\\\\host\\share",
    "__class__", "__import__('os').system('id')", "${HOME}", "$(id)", "`id`", "; rm -rf /", "{0.__class__}",
    "%s%s%n", "\u202egnp.exe", "ｃｄ", "😀" * 3, "ä", "\x7f", "\t\n\r", "null", "None", "True", "0", "-1",
    "1e400", "NaN", "<think>", "</tool_call>", "<answer>x</answer>", "'\"", "\\u0000", "USD", "EUR", "JFK",
    "document", "temp", "final_report.pdf", "AAPL", "celsius", "km", "lines", "#tag", "@user",
)  # fmt: skip
_NAMES = (
    "__init__", "__class__", "__dict__", "__getattribute__", "__reduce__", "__del__", "__eq__",
    "__subclasses__", "__globals__", "__builtins__", "__import__", "_load_scenario", "_navigate_to_directory",
    "_parse_positions", "_random", "_api_description", "_validate_file_or_directory_name",
    "_generate_id", "_get_item", "root", "_current_dir", "eval", "exec", "open", "compile", "getattr",
    "system", "popen", "kill", "exit", "quit", "self", "print", "help", "breakpoint", "globals",
)  # fmt: skip
_DOTTED = ("os.system", "builtins.open", "GorillaFileSystem.cd", "self.root", "subprocess.run",
           "math_api.MathAPI", "sys.modules", "cd.__globals__", "x.__class__.__bases__")  # fmt: skip
_PYTHONIC = (
    "__import__('os').system('touch /tmp/pwned')",
    "os.system('id')",
    "(lambda: 1)()",
    "[cd(folder=x) for x in ()]",
    "cd(folder=open('/etc/passwd').read())",
    "getattr(cd, '__globals__')",
    "cd.__class__.__bases__[0].__subclasses__()",
    "eval('1')",
    "exec('import os')",
    "compile('1', '', 'eval')",
    "cd(**{'folder': 'x'})",
    "cd(*['x'])",
    "cd(folder=f'{1}')",
    "cd(folder=(x := 1))",
    "cd(folder=1 if 1 else 2)",
    "cd(folder=[1, 2][0])",
    "cd(folder={1, 2})",
    "cd(folder=b'x')",
    "cd(folder=...)",
    "cd(folder=1j)",
    "power(base=10, exponent=10**9)",
    "power(10, 1000000000)",
    "square_root(2, 1000000000)",
    "logarithm(value=2, base=3, precision=100000000)",
    "mean(numbers=[1e400])",
    "cd(folder='\\x00')",
    "_load_scenario(scenario={})",
    "__init__()",
    "GorillaFileSystem().cd(folder='x')",
    "self.cd(folder='x')",
    "cd(folder='x').y",
    "cd(folder='x')()",
    "cd(folder='x')[0]",
    "ｃｄ(folder='x')",
    "cd(ｆolder='x')",
    "await cd(folder='x')",
    "cd(folder=undefined)",
    "cd(folder=True, folder=False)",
    "cd(folder='\\ud800')",
    "cd(folder=-(-1))",
    "cd(folder=+1)",
    "cd(folder=not 1)",
    "cd(folder=1 < 2)",
    "cd(folder='a' 'b')",
    "cd(folder=r'\\x')",
    "cd(folder=0x10)",
    "cd(folder=1_000)",
    "cd(folder=None)(1)",
    "cd(folder=[*range(3)])",
    "cd(folder={**{}})",
    "[cd(folder='a'), __import__('os')]",
    "cd(folder='x'); import os",
    "cd(folder='x')\nimport os",
)
_BAD_JSON = (
    "{not json", "[", "]", "[{]", '[{"name": "cd", "arguments": {"folder": "x"}', "[{'name': 'cd'}]",
    '[{"name": "cd", "arguments": {"folder": "x"},}]', '[{"name": "cd" /* c */}]', "NaN", "Infinity",
    '[{"name": "cd", "arguments": {"folder": NaN}}]', '[{"name": "mean", "arguments": {"numbers": [1e400]}}]',
    '[{"name": "cd", "name": "ls"}]', '[{"name": "cd", "arguments": {"folder": "a", "folder": "b"}}]',
    '[{"name": 1}]', '[{"name": null}]', '[{"name": ["cd"]}]', '[{"name": "cd", "arguments": []}]',
    '[{"name": "cd", "arguments": "folder=x"}]', '[{"name": "cd", "args": {}}]', "[1, 2, 3]", '"cd"',
    "null", "true", "{}", "[]", "[[]]", '[{"name": "cd", "arguments": {"folder": "\\u0000"}}]',
    '[{"name": "cd", "arguments": {"folder": "\\ud800"}}]', '[{"name": "cd\\u0000"}]',
)  # fmt: skip
_TAGS = (
    "",
    "plain text",
    "<think>x</think>",
    "<think>x</think><tool_call></tool_call>",
    "<think>x</think><answer>a</answer><tool_call>[]</tool_call>",
    "<think>a</think><think>b</think><answer>c</answer>",
    "<tool_call>[]</tool_call>",
    "<think>x<tool_call>[]</tool_call></think>",
    "</think><think><answer>x</answer>",
    '<think>x</think><tool_call>[{"name": "pwd"}]</tool_call><tool_call>[]</tool_call>',
    "<think>x</think>stray<answer>y</answer>",
    "<think>x</think><answer>y</answer>trailing",
    '<think>x</think><tool_call>[{"name": "pwd"}]',
    "<think>x</think><foo>y</foo>",
    "<THINK>x</THINK><ANSWER>y</ANSWER>",
    "<think >x</think ><answer>y</answer>",
)

FAMILIES: tuple[str, ...] = (
    "values", "bounds", "names", "arguments", "json_shape", "pythonic", "pythonic_in_tag", "bytes", "tags",
    "sequences", "random_text", "many_calls",
)  # fmt: skip
"""Kinds of attack, in the order of ``_WEIGHTS``."""
_WEIGHTS = (22, 10, 10, 8, 6, 12, 4, 5, 4, 5, 5, 2)


def _unmark(text: str) -> str:
    """Write the digits of the big-integer markers (quoted as JSON or Python strings) into ``text``."""
    if "\ue000" not in text:
        return text
    for marker, digits in _BIG_DIGITS.items():
        text = text.replace(f'"{marker}"', digits).replace(f"'{marker}'", digits)
    return text


def _reply(entries: object) -> str:
    return _unmark(f"<think>f</think><tool_call>{json.dumps(entries, ensure_ascii=False)}</tool_call>")


class ToolCallFuzzer:
    """Deterministic hostile replies aimed at one episode's tools (same seed, same cases)."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._serial = 0

    # values ---------------------------------------------------------------------------------------

    def _string(self) -> str:
        rng = self._rng
        roll = rng.random()
        if roll < 0.75:
            return rng.choice(_STRINGS)
        if roll < 0.85:
            return "".join(
                chr(rng.choice((rng.randrange(32, 127), rng.randrange(0xA0, 0x2FFF)))) for _ in range(20)
            )
        if roll < 0.93:
            return rng.choice(("a/", "../", "x" * 50 + "/")) * rng.choice((10, 300, 3000))
        if roll < 0.995:
            return "x" * rng.choice((1000, 10_000, 60_000))
        return "y" * 200_000  # near the reply limit: rare, it costs a 200 KB parse

    def _value(self, schema: Mapping[str, Any] | None, depth: int = 0) -> Any:
        rng = self._rng
        kind = (schema or {}).get("type", "any")
        if rng.random() < 0.15 or kind == "any":  # type confusion
            kind = rng.choice(("string", "integer", "float", "boolean", "array", "dict", "null"))
        enum = (schema or {}).get("enum")
        if enum and rng.random() < 0.5:
            return rng.choice(list(enum))
        if kind == "string":
            return self._string()
        if kind == "integer":
            return rng.choice(_INTS)
        if kind == "float":
            return rng.choice(_FLOATS + _INTS[:12])
        if kind == "boolean":
            return rng.random() < 0.5
        if kind in ("array", "tuple"):
            if depth > 10:
                return []
            roll = rng.random()
            if roll < 0.1:
                return [rng.choice(_INTS[:10])] * rng.choice((1000, 20_000))
            if roll < 0.2:
                nested: Any = 1
                for _ in range(rng.randrange(1, 15)):
                    nested = [nested]
                return nested
            items = (schema or {}).get("items")
            return [
                self._value(items if isinstance(items, Mapping) else None, depth + 1)
                for _ in range(rng.randrange(4))
            ]
        if kind == "dict":
            if depth > 10:
                return {}
            properties = (schema or {}).get("properties") or {}
            keys = list(properties) or ["title", "__class__", "a"]
            return {
                rng.choice([*keys, "__class__", "self", "x" * 300]): self._value(None, depth + 1)
                for _ in range(rng.randrange(4))
            }
        return None

    def _call_arguments(self, doc: FunctionDoc) -> dict[str, Any]:
        rng = self._rng
        properties = doc.parameters.get("properties") or {}
        arguments = {
            name: self._value(schema)
            for name, schema in properties.items()
            if name in (doc.parameters.get("required") or ()) or rng.random() < 0.5
        }
        if rng.random() < 0.1 and arguments:
            del arguments[rng.choice(list(arguments))]  # missing required
        return arguments

    def _name(self, target: Target) -> str:
        rng = self._rng
        pool = rng.choice(("hidden", "foreign", "private", "dotted", "case", "long"))
        if pool == "hidden" and target.hidden:
            return rng.choice(target.hidden)
        if pool == "foreign" and target.foreign:
            return rng.choice(target.foreign)
        if pool == "dotted":
            return rng.choice(_DOTTED)
        if pool == "case" and target.visible:
            name = rng.choice(target.visible).name
            return rng.choice((name.upper(), name.title(), name + "_", " " + name, name + "()", "ｃｄ"))
        if pool == "long":
            return "a" * rng.choice((100, 10_000))
        return rng.choice(_NAMES)

    # families -------------------------------------------------------------------------------------

    def case(self, target: Target) -> FuzzCase:
        """The next hostile input for an episode whose tools are ``target``."""
        family = self._rng.choices(FAMILIES, _WEIGHTS)[0]
        return FuzzCase(family, *getattr(self, f"_{family}")(target))

    def _values(self, target: Target) -> tuple[str | bytes, bool]:
        doc = self._rng.choice(target.visible)
        calls = [
            {"name": doc.name, "arguments": self._call_arguments(doc)}
            for _ in range(self._rng.randrange(1, 4))
        ]
        return _reply(calls), False

    def _bounds(self, target: Target) -> tuple[str | bytes, bool]:
        """The calls that made BFCL's classes work without bound (power, precision, round, find...)."""
        rng = self._rng
        big: int | str = rng.choice((10**9, 10**7, 5000, 10**6, _BIG, 3000, 1000, 1001))
        negative = _NEG_BIG if isinstance(big, str) else -big
        builders: dict[str, Callable[[], dict[str, Any]]] = {
            "power": lambda: {"base": rng.choice((10, 2, 3, 1, -1, 0, 10.0)), "exponent": big},
            "square_root": lambda: {"number": rng.choice((2, _BIG, 0.5)), "precision": big},
            "logarithm": lambda: {"value": rng.choice((2, _BIG)), "base": 3, "precision": big},
            "round_number": lambda: {"number": rng.choice((5, 2.5)), "decimal_places": negative},
            "multiply": lambda: {"a": _BIG, "b": rng.choice((_BIG, 7))},
            "mean": lambda: {"numbers": [_BIG] * 3},
            "find": lambda: {"path": "p" * rng.choice((10, 5000, 100_000)), "name": ""},
            "tail": lambda: {"file_name": "x", "lines": negative},
            "fund_account": lambda: {"amount": _BIG},
            "create_ticket": lambda: {"title": "t", "priority": _BIG},
        }
        visible = [doc.name for doc in target.visible if doc.name in builders]
        name = rng.choice(visible or list(builders))
        return _reply([{"name": name, "arguments": builders[name]()}]), False

    def _names(self, target: Target) -> tuple[str | bytes, bool]:
        return _reply([{"name": self._name(target), "arguments": {}}]), False

    def _arguments(self, target: Target) -> tuple[str | bytes, bool]:
        doc = self._rng.choice(target.visible)
        arguments = self._call_arguments(doc)
        key = self._rng.choice(("__class__", "self", "kwargs", "_current_dir", "0", "x" * 200, "folder", "a"))
        arguments[key] = self._value(None)
        return _reply([{"name": doc.name, "arguments": arguments}]), False

    def _json_shape(self, target: Target) -> tuple[str | bytes, bool]:
        rng = self._rng
        roll = rng.random()
        if roll < 0.6:
            body = rng.choice(_BAD_JSON)
        elif roll < 0.75:
            depth = rng.choice((17, 100, 5000))
            body = "[" * depth + "]" * depth
        elif roll < 0.9:
            body = (
                '[{"name": "power", "arguments": {"base": 10, "exponent": '
                + "9" * rng.choice((4301, 6000))
                + "}}]"
            )
        else:
            body = '[{"name": "mean", "arguments": {"numbers": [1' + "e9" + "9" * 3 + "]}}]"
        return f"<think>j</think><tool_call>{body}</tool_call>", False

    def _pythonic(self, target: Target) -> tuple[str | bytes, bool]:
        rng = self._rng
        if rng.random() < 0.5:
            source = rng.choice(_PYTHONIC)
        else:  # a well-formed pythonic call with hostile literal values, positional or keyword
            doc = rng.choice(target.visible)
            arguments = self._call_arguments(doc)
            if rng.random() < 0.4:
                parts = [repr(value) for value in arguments.values()]
            else:
                parts = [f"{key}={value!r}" for key, value in arguments.items()]
            source = _unmark(f"[{doc.name}({', '.join(parts)})]")
        return source, True

    def _pythonic_in_tag(self, target: Target) -> tuple[str | bytes, bool]:
        source, _ = self._pythonic(target)
        return f"<think>p</think><tool_call>[{source!s}]</tool_call>", False

    def _bytes(self, target: Target) -> tuple[str | bytes, bool]:
        rng = self._rng
        base = _reply([{"name": rng.choice(target.visible).name, "arguments": {}}]).encode()
        roll = rng.random()
        if roll < 0.3:
            position = rng.randrange(len(base))
            return base[:position] + bytes([rng.choice((0xFF, 0xC0, 0x80, 0xED, 0xF8))]) + base[
                position:
            ], False
        if roll < 0.5:
            return base.replace(b"f", b"\xed\xa0\x80", 1), False  # an encoded surrogate (invalid UTF-8)
        if roll < 0.7:
            return base.replace(b"f", b"\x00", 1), False
        if roll < 0.8:
            return b"\xef\xbb\xbf" + base, False
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), False

    def _tags(self, target: Target) -> tuple[str | bytes, bool]:
        rng = self._rng
        if rng.random() < 0.05:
            return "<think>" + "z" * 300_000 + "</think><answer>x</answer>", False
        return rng.choice(_TAGS), False

    def _sequences(self, target: Target) -> tuple[str | bytes, bool]:
        """Stateful attacks in one reply: cyclic and shared folders, then walks; big files, then reads."""
        rng = self._rng
        self._serial += 1
        d = f"d{self._serial}"
        visible = {doc.name for doc in target.visible}
        script = rng.choice(
            (
                [
                    ("mkdir", {"dir_name": d}),
                    ("cp", {"source": d, "destination": d}),
                    ("find", {}),
                    ("du", {"human_readable": True}),
                    ("cd", {"folder": d}),
                    ("cd", {"folder": d}),
                    ("pwd", {}),
                    ("find", {"path": ".", "name": d}),
                    ("ls", {"a": True}),
                ],
                [
                    ("mkdir", {"dir_name": d}),
                    ("cd", {"folder": d}),
                    ("mkdir", {"dir_name": "x"}),
                    ("cd", {"folder": ".."}),
                    *[("cp", {"source": d, "destination": f"{d}c{i}"}) for i in range(8)],
                    *[("mv", {"source": f"{d}c{i}", "destination": d}) for i in range(8)],
                    ("find", {}),
                    ("du", {}),
                ],
                [
                    ("echo", {"content": "line\n" * 20_000, "file_name": f"{d}.txt"}),
                    ("cat", {"file_name": f"{d}.txt"}),
                    ("sort", {"file_name": f"{d}.txt"}),
                    ("grep", {"file_name": f"{d}.txt", "pattern": "line"}),
                    ("wc", {"file_name": f"{d}.txt", "mode": "w"}),
                    ("tail", {"file_name": f"{d}.txt", "lines": 10**9}),
                    ("diff", {"file_name1": f"{d}.txt", "file_name2": f"{d}.txt"}),
                ],
                [
                    ("cd", {"folder": "../../../../etc"}),
                    ("cat", {"file_name": "/etc/passwd"}),
                    ("cd", {"folder": "/"}),
                    ("cd", {"folder": ".."}),
                    ("ls", {"a": True}),
                    ("find", {"path": "/"}),
                ],
                [
                    ("logarithm", {"value": 2, "base": 3, "precision": 1000}),
                    ("square_root", {"number": 2, "precision": 1000}),
                    ("logarithm", {"value": 10, "base": 10, "precision": 5}),
                    ("power", {"base": 3, "exponent": 9000}),
                ],
            )
        )
        calls = [{"name": name, "arguments": args} for name, args in script if name in visible]
        if not calls:
            return self._values(target)
        return _reply(calls), False

    def _random_text(self, target: Target) -> tuple[str | bytes, bool]:
        rng = self._rng
        pieces = [
            "<think>",
            "</think>",
            "<tool_call>",
            "</tool_call>",
            "<answer>",
            "</answer>",
            "[",
            "]",
            "{",
            "}",
            '"name"',
            ":",
            ",",
            '"arguments"',
            "cd",
            "(",
            ")",
            "'",
            "\\",
            "\x00",
            "\ud800",
            "é",
            " ",
        ]
        return "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40))), False

    def _many_calls(self, target: Target) -> tuple[str | bytes, bool]:
        """The call limit per step (64) and past it; one argument set repeated: the count is what costs."""
        rng = self._rng
        doc = rng.choice(target.visible)
        entry = {"name": doc.name, "arguments": self._call_arguments(doc)}
        return _reply([entry] * rng.choice((63, 64, 65, 500))), False


def generate_cases(count: int, target: Target, seed: int = 0) -> Iterator[FuzzCase]:
    """``count`` cases aimed at one fixed target (for inspection; ``run_fuzz`` re-aims per episode)."""
    fuzzer = ToolCallFuzzer(seed)
    for _ in range(count):
        yield fuzzer.case(target)


# --- the driver ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FuzzReport:
    """What a fuzz run found."""

    cases: int
    crashes: int
    """Exceptions that escaped ``Episode.step`` or the pythonic parser."""
    escapes: int
    """Executions outside the visible BFCL methods (tripwires)."""
    seconds: float
    executed_calls: int
    """Calls that entered a BFCL method: how much of the fuzz reached the dispatcher."""
    hint_lookups: int
    faults: Mapping[str, int]
    """``CallOutcome.fault`` counts (``limit``, ``raised``, ``time_limit``, ...)."""
    families: Mapping[str, int]
    episodes: int
    crash_examples: tuple[str, ...]
    escape_examples: tuple[str, ...]

    @property
    def cases_per_s(self) -> float:
        return self.cases / self.seconds if self.seconds > 0 else 0.0


def fuzz_tasks(env: BfclEnvironment) -> tuple[str, ...]:
    """One task per (category, BFCL class): every class is fuzzed in every category."""
    chosen: list[str] = []
    for category in CATEGORIES:
        for class_name in CLASS_MODULES:
            task = next(
                (
                    t
                    for t in env.tasks.values()
                    if t.category == category and class_name in t.involved_classes
                ),
                None,
            )
            if task is not None and task.id not in chosen:
                chosen.append(task.id)
    return tuple(chosen)


def _target(episode: Episode, task: Task, docs: Mapping[str, FunctionDoc]) -> Target:
    visible = episode.visible_tools()
    names = {doc.name for doc in visible}
    return Target(
        visible=visible,
        hidden=tuple(sorted(task.hidden_functions(max(episode.turn_index, 0)))),
        foreign=tuple(sorted(n for n, d in docs.items() if d.class_name not in task.involved_classes))
        or tuple(sorted(set(docs) - names)),
    )


def _warm_up(env: BfclEnvironment, task_ids: Sequence[str]) -> None:
    """Import everything a step may import lazily (mpmath's parts, hint code) before the tripwires."""
    from envtune.environments.conformance import ground_truth_run
    from envtune.environments.tool_calls import ANSWER_REPLY, format_reply

    for task_id in task_ids:
        for feedback in FeedbackMode:
            episode = env.make_episode(task_id, EpisodeConfig(feedback=feedback))
            episode.start()
            for turn in ground_truth_run(env.tasks[task_id]).turns:
                for step in turn:
                    episode.step(format_reply(step))
                if not episode.done:
                    episode.step(ANSWER_REPLY)
    math = bfcl_class("MathAPI")()
    math.logarithm(2, 3, 20)
    math.square_root(2, 20)
    datetime.datetime.strptime("2024-09-01", "%Y-%m-%d")  # imports _strptime (TradingBot, TravelAPI)


def run_fuzz(
    cases: int,
    *,
    seed: int = 0,
    env: BfclEnvironment | None = None,
    cases_per_episode: int = 40,
    step_time_limit_s: float | None = 2.0,
) -> FuzzReport:
    """Play ``cases`` hostile inputs through real episodes (rotating over ``fuzz_tasks``) and count."""
    env = env or BfclEnvironment()
    task_ids = fuzz_tasks(env)
    docs = load_function_docs()
    _warm_up(env, task_ids)
    fuzzer = ToolCallFuzzer(seed)
    tripwires = Tripwires()
    crashes = 0
    crash_examples: list[str] = []
    faults: collections.Counter[str] = collections.Counter()
    families: collections.Counter[str] = collections.Counter()
    executed = episodes = 0
    episode: Episode | None = None
    task: Task | None = None
    left_in_episode = 0
    target_key: tuple[int, int] = (-1, -1)
    target = Target((), (), ())
    tripwires.install()
    started = time.perf_counter()
    try:
        for index in range(cases):
            if episode is None or episode.done or left_in_episode <= 0:
                task = env.tasks[task_ids[episodes % len(task_ids)]]
                feedback = FeedbackMode.AUGMENTED if episodes % 2 else FeedbackMode.STANDARD
                episode = env.make_episode(
                    task.id,
                    EpisodeConfig(
                        feedback=feedback,
                        max_steps_per_turn=EVAL_MAX_STEPS_PER_TURN,
                        step_time_limit_s=step_time_limit_s,
                    ),
                )
                episode.start()
                episodes += 1
                left_in_episode = cases_per_episode
            assert task is not None
            left_in_episode -= 1
            if target_key != (episodes, episode.turn_index):  # tools change only when a turn opens
                target_key = (episodes, episode.turn_index)
                target = _target(episode, task, docs)
            case = fuzzer.case(target)
            families[case.family] += 1
            tripwires.begin_step(frozenset(doc.name for doc in episode.visible_tools()))
            try:
                reply: str | bytes | None = case.text
                if case.pythonic:
                    try:
                        calls = parse_pythonic_calls(str(case.text), positional_names_for(task))
                    except FormatError:
                        calls = None
                    reply = (
                        _reply([{"name": c.name, "arguments": c.arguments} for c in calls]) if calls else None
                    )
                if reply is not None:
                    result = episode.step(reply)
                    for outcome in result.calls:
                        executed += outcome.executed
                        if outcome.fault is not None:
                            faults[str(outcome.fault)] += 1
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                crashes += 1
                if len(crash_examples) < MAX_EXAMPLES:
                    crash_examples.append(
                        f"case {index} [{case.family}] {type(exc).__name__}: {str(exc)[:200]}"
                    )
                episode = None  # its state is unknown now
            finally:
                tripwires.end_step()
    finally:
        seconds = time.perf_counter() - started
        tripwires.uninstall()
    return FuzzReport(
        cases=cases,
        crashes=crashes,
        escapes=tripwires.escapes,
        seconds=seconds,
        executed_calls=executed,
        hint_lookups=tripwires.hint_lookups,
        faults=MappingProxyType(dict(faults)),
        families=MappingProxyType(dict(families)),
        episodes=episodes,
        crash_examples=tuple(crash_examples),
        escape_examples=tuple(tripwires.examples),
    )
