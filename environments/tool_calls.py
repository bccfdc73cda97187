"""Parsing a model reply into tool calls, without ever running any of it.

A reply has the paper's shape (docs/method.md §1.2): ``<think>…</think>`` then either
``<tool_call>[{"name": …, "arguments": {…}}, …]</tool_call>`` or ``<answer>…</answer>``. BFCL's own
pythonic form ``[f(a=1), g(b='x')]`` (its ground truth, and what its checker consumes) is parsed by
walking Python's AST and accepting literals only; nothing here calls ``eval``, ``exec`` or
``compile``. Every failure is a ``FormatError`` whose text is the message shown to the model.

Left out on purpose: checking calls against the function docs (``schemas.py``) and executing them
(the episode). Input from a model is hostile: size, nesting, call count and character set are bounded
before the expensive parsers run, and parser failures (including ``RecursionError``/``MemoryError``)
become ``FormatError``.
"""

from __future__ import annotations

import ast
import json
import keyword
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, NoReturn

from envtune.environments.types import ToolCall

MAX_REPLY_CHARS = 256 * 1024
"""Largest reply (characters for ``str``, bytes for ``bytes``) the parsers look at; a longer one is a
format error at once, so a runaway generation costs no parsing time."""
MAX_NESTING_DEPTH = 16
"""Deepest container nesting in a tool-call body: JSON brackets, or the call list, the call itself
and literal containers in pythonic form. Legitimate BFCL calls need at most 5."""
MAX_CALLS_PER_STEP = 64
"""Most calls one reply may make; ground truth needs up to 34 in one turn (multi_turn_long_context_46)."""
MAX_SNIPPET_CHARS = 60
"""How much of an offending piece of text an error message quotes."""

_EXPONENT = re.compile(r"[0-9][eE]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TAG = re.compile(r"<(/?)(think|tool_call|answer)>")
_LOOKS_LIKE_TAG = re.compile(r"</?[A-Za-z_][\w-]*>")
# A JSON string (with escapes); used only to blank strings out before counting brackets.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_ENTRY_KEYS = frozenset({"name", "arguments"})


ANSWER_REPLY = "<think>done</think><answer>Done.</answer>"
"""A well-formed reply that ends the user turn without calling anything (scripted policies, tests)."""


def format_reply(calls: Sequence[ToolCall], think: str = "calling") -> str:
    """The paper-format reply that makes ``calls``: the inverse of ``parse_reply`` for a tool step."""
    body = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
    return f"<think>{think}</think><tool_call>{body}</tool_call>"


class FormatError(ValueError):
    """The reply breaks the output format; ``str(exc)`` is the message shown to the model."""

    def __init__(self, message: str, reason: str = "format") -> None:
        super().__init__(message)
        self.reason = reason
        """Short machine-readable cause (``missing_tag``, ``invalid_json``, ``too_large``, …) for metrics."""


@dataclass(frozen=True, slots=True)
class ParsedReply:
    """A reply that passed the format rules."""

    kind: Literal["tool_call", "answer"]
    """Which of the two formats the reply used."""
    think: str
    """The reasoning between ``<think>`` and ``</think>``, stripped ('' when absent and not required)."""
    calls: tuple[ToolCall, ...]
    """The calls of a ``tool_call`` reply, in order (never empty); ``()`` for an answer."""
    answer: str | None
    """The stripped text of an ``answer`` reply; None for a tool call."""


def _snippet(text: str) -> str:
    text = text.strip()
    if len(text) > MAX_SNIPPET_CHARS:
        text = text[:MAX_SNIPPET_CHARS] + "…"
    return repr(text)


def _fail(message: str, reason: str) -> NoReturn:
    raise FormatError(f"Error: {message}", reason)


def _check_text(text: str | bytes, what: str) -> str:
    """Decode and bound raw input: type, size, UTF-8, NUL."""
    if isinstance(text, bytes | bytearray):
        if len(text) > MAX_REPLY_CHARS:
            _fail(f"{what} is too long ({len(text)} bytes; the limit is {MAX_REPLY_CHARS})", "too_large")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            _fail(
                f"{what} is not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
                "encoding",
            )
    if not isinstance(text, str):
        _fail(f"{what} must be text, got {type(text).__name__}", "type")
    if len(text) > MAX_REPLY_CHARS:
        _fail(f"{what} is too long ({len(text)} characters; the limit is {MAX_REPLY_CHARS})", "too_large")
    if "\x00" in text:
        _fail(f"{what} contains a NUL character at position {text.index(chr(0))}", "nul")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        _fail(f"{what} contains invalid unicode (a lone surrogate at position {exc.start})", "encoding")
    return text


def _check_string_value(value: str, where: str) -> None:
    """Strings from JSON escapes or Python literals may hold NUL or lone surrogates; refuse them."""
    if "\x00" in value:
        _fail(f"{where} contains a NUL character", "nul")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _fail(f"{where} contains an invalid unicode escape (a lone surrogate)", "encoding")


def _too_many_calls(count: int) -> NoReturn:
    _fail(f"Too many calls in one reply ({count}; the limit is {MAX_CALLS_PER_STEP})", "too_many_calls")


def _is_ascii_identifier(name: str) -> bool:
    """``[A-Za-z_][A-Za-z0-9_]*`` and not a keyword (``isidentifier`` on ASCII text is exactly that)."""
    return name.isascii() and name.isidentifier() and not keyword.iskeyword(name)


def _check_function_name(name: object, where: str) -> str:
    if not isinstance(name, str):
        _fail(f'{where}: "name" must be a string, got {_json_type(name)}', "bad_entry")
    # ASCII only: Python NFKC-normalises identifiers, so a full-width 'ｃｄ' would silently become 'cd'.
    if not _is_ascii_identifier(name):
        _fail(
            f"{where}: {_snippet(name)} is not a valid function name (use the bare name, e.g. 'cd')",
            "bad_name",
        )
    return name


def _check_argument_name(key: object, function: str) -> str:
    if not isinstance(key, str) or not _is_ascii_identifier(key):
        _fail(f"argument name {_snippet(str(key))} of {function}() is not a valid parameter name", "bad_name")
    return key


def _json_type(value: object) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "a list"
        case dict():
            return "an object"
    return type(value).__name__


# --- the tagged reply ----------------------------------------------------------------------------


def parse_reply(text: str | bytes, *, require_think: bool = True) -> ParsedReply:
    """Apply the paper's format rules (docs/method.md §1.2, in their order) and parse the tool calls.

    With ``require_think=False`` a missing think block is allowed, but one that is present must still be
    a single well-formed pair. The think block must come before the tool call or answer.
    """
    text = _check_text(text, "The reply")
    fast = _fast_parse(text)
    if fast is not None:
        return fast
    opens: dict[str, list[re.Match[str]]] = {"think": [], "tool_call": [], "answer": []}
    closes: dict[str, list[re.Match[str]]] = {"think": [], "tool_call": [], "answer": []}
    for match in _TAG.finditer(text):
        (closes if match.group(1) else opens)[match.group(2)].append(match)

    # 1. exactly one think pair
    n_open, n_close = len(opens["think"]), len(closes["think"])
    if n_open == 0 and n_close == 0:
        if require_think:
            _fail(
                "Missing <think></think> tags: start the reply with <think>your reasoning</think>",
                "missing_tag",
            )
    elif n_open > 1 or n_close > 1:
        _fail(
            f"Found {max(n_open, n_close)} <think> tags; exactly one <think></think> pair is required",
            "duplicate_tag",
        )
    elif n_open == 0:
        _fail("Missing <think> opening tag (found </think> without <think>)", "missing_tag")
    elif n_close == 0:
        _fail("Missing </think> closing tag", "missing_tag")

    # 2. at most one tool_call pair and one answer pair
    for tag, advice in (
        ("tool_call", "put all calls in one JSON list inside a single <tool_call></tool_call> pair"),
        ("answer", "use a single <answer></answer> pair"),
    ):
        n_open, n_close = len(opens[tag]), len(closes[tag])
        if n_open > 1 or n_close > 1:
            _fail(f"Found {max(n_open, n_close)} <{tag}> tags; {advice}", "duplicate_tag")
        if n_open == 1 and n_close == 0:
            _fail(f"Missing </{tag}> closing tag", "missing_tag")
        if n_close == 1 and n_open == 0:
            _fail(f"Missing <{tag}> opening tag (found </{tag}> without <{tag}>)", "missing_tag")

    # 3. mutually exclusive, one required
    has_call, has_answer = bool(opens["tool_call"]), bool(opens["answer"])
    if has_call and has_answer:
        _fail("Use either <tool_call> or <answer> in one reply, not both", "both_tags")
    if not has_call and not has_answer:
        _fail(
            "Missing <tool_call></tool_call> or <answer></answer> tags: after </think>, either call tools "
            "or answer",
            "missing_tag",
        )
    kind: Literal["tool_call", "answer"] = "tool_call" if has_call else "answer"

    blocks: list[tuple[str, re.Match[str], re.Match[str]]] = []
    if opens["think"]:
        blocks.append(("think", opens["think"][0], closes["think"][0]))
    blocks.append((kind, opens[kind][0], closes[kind][0]))
    for tag, open_match, close_match in blocks:
        if close_match.start() < open_match.start():
            _fail(f"</{tag}> comes before <{tag}>", "tag_order")
    if len(blocks) == 2:
        (_, think_open, think_close), (_, action_open, _) = blocks
        if action_open.start() < think_open.start():
            _fail(f"<think></think> must come before <{kind}>", "tag_order")
        if action_open.start() < think_close.end():
            _fail(f"<{kind}> must not be inside <think></think>; close </think> first", "tag_order")

    # 4. nothing but whitespace outside the tags
    cursor = 0
    for _, open_match, close_match in blocks:
        _check_outside(text[cursor : open_match.start()])
        cursor = close_match.end()
    _check_outside(text[cursor:])

    think = text[blocks[0][1].end() : blocks[0][2].start()].strip() if opens["think"] else ""
    body = text[opens[kind][0].end() : closes[kind][0].start()]
    if kind == "answer":
        return ParsedReply(kind="answer", think=think, calls=(), answer=body.strip())
    # 5. the tool-call body
    return ParsedReply(kind="tool_call", think=think, calls=_parse_checked_json_calls(body), answer=None)


def _fast_parse(text: str) -> ParsedReply | None:
    """The common, well-formed reply with plain string operations; None sends it to the full checks.

    Accepts exactly: optional whitespace, ``<think>…</think>``, whitespace, one ``<tool_call>…</tool_call>``
    or ``<answer>…</answer>``, whitespace, and no other of the three tags anywhere (four tags in all).
    """
    stripped = text.strip()
    if (
        not stripped.startswith("<think>")
        or stripped.count("<think>") != 1
        or stripped.count("</think>") != 1
    ):
        return None
    calls = stripped.count("<tool_call>"), stripped.count("</tool_call>")
    answers = stripped.count("<answer>"), stripped.count("</answer>")
    if {calls, answers} != {(1, 1), (0, 0)}:
        return None
    think_end = stripped.find("</think>")
    if think_end < 0:
        return None
    rest = stripped[think_end + len("</think>") :].lstrip()
    think = stripped[len("<think>") : think_end].strip()
    if rest.startswith("<tool_call>") and rest.endswith("</tool_call>"):
        body = rest[len("<tool_call>") : -len("</tool_call>")]
        return ParsedReply(kind="tool_call", think=think, calls=_parse_checked_json_calls(body), answer=None)
    if rest.startswith("<answer>") and rest.endswith("</answer>"):
        return ParsedReply(
            kind="answer", think=think, calls=(), answer=rest[len("<answer>") : -len("</answer>")].strip()
        )
    return None


def _check_outside(segment: str) -> None:
    if not segment.strip():
        return
    tag = _LOOKS_LIKE_TAG.search(segment)
    if tag:
        _fail(
            f"Unknown tag {tag.group(0)!r}; only <think>, <tool_call> and <answer> are allowed", "stray_text"
        )
    _fail(
        f"Found text outside the tags: {_snippet(segment)}; everything must be inside <think>, "
        "<tool_call> or <answer>",
        "stray_text",
    )


# --- the JSON form -------------------------------------------------------------------------------


def _json_depth(body: str) -> int:
    """Bracket depth with strings blanked out: cheap, and no recursion."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub('""', body)):
        if match.group(0) in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _reject_constant(name: str) -> NoReturn:
    _fail(f"Invalid JSON inside <tool_call>: {name} is not a JSON number", "invalid_json")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        counts: dict[str, int] = {}
        for key, _ in pairs:
            counts[key] = counts.get(key, 0) + 1
        duplicate = next(key for key, _ in pairs if counts[key] > 1)
        _fail(f"Invalid JSON inside <tool_call>: duplicate key {duplicate!r} in an object", "invalid_json")
    return result


def _check_json_value(value: Any, where: str) -> None:
    """Walk a decoded value (depth already bounded) for non-finite numbers and bad strings."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _check_string_value(item, where)
        elif isinstance(item, float) and not math.isfinite(item):
            _fail(f"{where} holds a number out of range", "invalid_json")
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())


def parse_json_calls(body: str) -> tuple[ToolCall, ...]:
    """Parse a ``<tool_call>`` body: a JSON list of ``{"name": str, "arguments": object}``.

    A single object (no list) is accepted and wrapped, as the paper's ``parse_tool_calls`` does: the
    intent is unambiguous and the paper's reward never penalised it. ``arguments`` may be omitted
    (no arguments); any other key in an entry is an error, since it usually means a misspelled
    ``arguments`` whose values would otherwise be lost silently.
    """
    return _parse_checked_json_calls(_check_text(body, "The <tool_call> body"))


def _parse_checked_json_calls(body: str) -> tuple[ToolCall, ...]:
    """``parse_json_calls`` on text already bounded and decoded (a slice of a checked reply)."""
    if not body.strip():
        _fail("The <tool_call> block is empty; write a JSON list of calls", "no_calls")
    # Counting brackets bounds the depth from above in C; the exact (regex) depth only when it could matter.
    if body.count("[") + body.count("{") > MAX_NESTING_DEPTH and _json_depth(body) > MAX_NESTING_DEPTH:
        _fail(f"The <tool_call> JSON nests deeper than {MAX_NESTING_DEPTH} levels", "too_deep")
    try:
        decoded = json.loads(body, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        _fail(
            f"Invalid JSON inside <tool_call>: {exc.msg} at line {exc.lineno} column {exc.colno} "
            f"(char {exc.pos})",
            "invalid_json",
        )
    except (ValueError, RecursionError, MemoryError) as exc:  # huge integers, pathological input
        if isinstance(exc, FormatError):
            raise
        _fail(
            f"Invalid JSON inside <tool_call>: {type(exc).__name__}: {str(exc)[:MAX_SNIPPET_CHARS]}",
            "invalid_json",
        )
    entries = [decoded] if isinstance(decoded, dict) else decoded
    if not isinstance(entries, list):
        _fail(
            'The <tool_call> body must be a JSON list of calls like [{"name": "...", "arguments": {}}], '
            f"got {_json_type(decoded)}",
            "bad_shape",
        )
    if not entries:
        _fail(
            "The <tool_call> list is empty: no calls. Call at least one function or use <answer>", "no_calls"
        )
    if len(entries) > MAX_CALLS_PER_STEP:
        _too_many_calls(len(entries))
    # Decoded strings can only hold NUL or lone surrogates through a \u escape, and a float can only
    # overflow to inf through an exponent: without either in the text, the walk can find nothing.
    needs_value_walk = "\\u" in body or _EXPONENT.search(body) is not None
    calls = []
    for index, entry in enumerate(entries):
        where = f"Call #{index + 1} in <tool_call>"
        if not isinstance(entry, dict):
            _fail(
                f'{where} must be an object {{"name": ..., "arguments": {{...}}}}, got {_json_type(entry)}',
                "bad_entry",
            )
        if "name" not in entry:
            _fail(f'{where} has no "name"', "bad_entry")
        if len(entry) > 2 or (len(entry) == 2 and "arguments" not in entry):
            extra = sorted(set(entry) - _ENTRY_KEYS)
            _fail(
                f'{where} has unexpected key {extra[0]!r}; a call has only "name" and "arguments"',
                "bad_entry",
            )
        name = _check_function_name(entry["name"], where)
        arguments = entry.get("arguments", {})
        if not isinstance(arguments, dict):
            _fail(
                f'{where} ({name}): "arguments" must be a JSON object, got {_json_type(arguments)}',
                "bad_entry",
            )
        for key, value in arguments.items():
            _check_argument_name(key, name)
            if needs_value_walk:
                _check_json_value(value, f"argument {key!r} of {name}()")
        calls.append(ToolCall(name=name, arguments=arguments))  # a fresh dict from json.loads
    return tuple(calls)


# --- BFCL's pythonic form ------------------------------------------------------------------------

_CONSTRUCTS: Mapping[type[ast.AST], str] = MappingProxyType(
    {
        ast.Constant: "a constant",
        ast.Name: "a variable name",
        ast.Attribute: "attribute access",
        ast.Call: "a function call",
        ast.Lambda: "a lambda",
        ast.ListComp: "a comprehension",
        ast.SetComp: "a comprehension",
        ast.DictComp: "a comprehension",
        ast.GeneratorExp: "a generator expression",
        ast.BinOp: "an operator expression",
        ast.BoolOp: "a boolean expression",
        ast.Compare: "a comparison",
        ast.UnaryOp: "a unary operator",
        ast.Subscript: "a subscript",
        ast.JoinedStr: "an f-string",
        ast.Starred: "a starred expression",
        ast.Set: "a set literal",
        ast.IfExp: "a conditional expression",
        ast.NamedExpr: "an assignment expression",
        ast.Await: "an await expression",
        ast.Yield: "a yield expression",
        ast.YieldFrom: "a yield expression",
        ast.Slice: "a slice",
    }
)


class _LiteralReader:
    """Turns the AST of one pythonic call list into ToolCalls, accepting literal values only."""

    def __init__(self, source: str, positional_names: Mapping[str, Sequence[str]] | None) -> None:
        self.source = source
        self.positional_names = positional_names
        # Python NFKC-normalises identifiers ('ｃｄ' parses as 'cd'); only non-ASCII text can differ, so
        # the per-line byte table for comparing names with the text as written is built only then.
        self.lines: list[bytes] | None = None
        if not source.isascii():
            self.lines = [line.encode("utf-8") for line in re.split(r"\r\n|\r|\n", source)]

    def written_as(self, name: str, node: ast.Name | ast.keyword) -> bool:
        """Whether the identifier at ``node`` is spelled exactly ``name`` in the source."""
        if self.lines is None:
            return True
        match = _IDENTIFIER.match(self.lines[node.lineno - 1][node.col_offset :].decode("utf-8", "replace"))
        return match is not None and match.group(0) == name

    def describe(self, node: ast.AST) -> str:
        construct = _CONSTRUCTS.get(type(node), f"a {type(node).__name__} expression")
        segment = ast.get_source_segment(self.source, node) or ""
        return f"{construct} ({_snippet(segment)})" if segment else construct

    def calls(self, body: ast.expr) -> tuple[ToolCall, ...]:
        if isinstance(body, ast.List | ast.Tuple):
            nodes, depth = body.elts, 2
        else:
            nodes, depth = [body], 1
        if not nodes:
            _fail("The call list is empty: no calls", "no_calls")
        if len(nodes) > MAX_CALLS_PER_STEP:
            _too_many_calls(len(nodes))
        return tuple(self.call(node, depth) for node in nodes)

    def call(self, node: ast.expr, depth: int) -> ToolCall:
        if not isinstance(node, ast.Call):
            _fail(f"Expected a function call like f(a=1), got {self.describe(node)}", "bad_entry")
        if not isinstance(node.func, ast.Name):
            _fail(f"The called function must be a plain name, not {self.describe(node.func)}", "bad_name")
        name = node.func.id
        if not self.written_as(name, node.func):
            _fail(
                f"{_snippet(ast.get_source_segment(self.source, node.func) or name)} is not a valid "
                "function name (ASCII letters, digits and _ only)",
                "bad_name",
            )
        _check_function_name(name, "The call")
        for value in node.args:
            if isinstance(value, ast.Starred):
                _fail(f"{name}() arguments must be literals, not {self.describe(value)}", "not_literal")
        arguments: dict[str, Any] = {}
        if node.args:
            names = self.positional_names.get(name) if self.positional_names is not None else None
            if names is None:
                _fail(
                    f"{name}() got positional arguments but its parameter names are unknown; "
                    "use keyword arguments like name=value",
                    "positional",
                )
            if len(node.args) > len(names):
                _fail(
                    f"{name}() takes at most {len(names)} positional arguments ({len(node.args)} given)",
                    "positional",
                )
            for parameter, value in zip(names, node.args, strict=False):
                arguments[parameter] = self.literal(value, depth + 1, f"argument {parameter!r} of {name}()")
        for kw in node.keywords:
            if kw.arg is None:
                _fail(f"{name}() arguments must be literals, not **kwargs unpacking", "not_literal")
            key = _check_argument_name(kw.arg, name)
            if not self.written_as(key, kw):
                _fail(
                    f"an argument name of {name}() is not a valid parameter name (ASCII letters, digits "
                    "and _ only)",
                    "bad_name",
                )
            if key in arguments:
                _fail(f"{name}() got multiple values for argument {key!r}", "positional")
            arguments[key] = self.literal(kw.value, depth + 1, f"argument {key!r} of {name}()")
        return ToolCall(name=name, arguments=arguments)

    def literal(self, node: ast.expr, depth: int, where: str) -> Any:
        if depth > MAX_NESTING_DEPTH:
            _fail(f"{where} nests deeper than {MAX_NESTING_DEPTH} levels", "too_deep")
        if isinstance(node, ast.Constant):
            return self.constant(node.value, node, where)
        if (
            isinstance(node, ast.UnaryOp)
            and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, int | float)
            and not isinstance(node.operand.value, bool)
        ):
            return self.constant(-node.operand.value, node, where)
        if isinstance(node, ast.List | ast.Tuple):
            return [self.literal(item, depth + 1, where) for item in node.elts]
        if isinstance(node, ast.Dict):
            result: dict[str, Any] = {}
            for key_node, value_node in zip(node.keys, node.values, strict=True):
                if key_node is None:
                    _fail(f"{where} must be a literal, not dict unpacking (**)", "not_literal")
                key = self.literal(key_node, depth + 1, where)
                if not isinstance(key, str):
                    _fail(f"{where}: dictionary keys must be strings, got {_json_type(key)}", "not_literal")
                result[key] = self.literal(value_node, depth + 1, where)
            return result
        _fail(
            f"{where} must be a literal (string, number, True/False/None, list or dict), not "
            f"{self.describe(node)}",
            "not_literal",
        )

    def constant(self, value: object, node: ast.expr, where: str) -> Any:
        if value is None or isinstance(value, bool | int):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                _fail(f"{where} holds a number out of range", "not_literal")
            return value
        if isinstance(value, str):
            _check_string_value(value, where)
            return value
        _fail(
            f"{where} must be a string, number, True/False/None, list or dict, not {type(value).__name__} "
            f"({_snippet(ast.get_source_segment(self.source, node) or '')})",
            "not_literal",
        )


def parse_pythonic_calls(
    source: str, positional_names: Mapping[str, Sequence[str]] | None = None
) -> tuple[ToolCall, ...]:
    """Parse BFCL's pythonic calls, ``[f(a=1), g('x')]`` or a bare ``f(a=1)``, by reading the AST.

    Only literal arguments are accepted. Positional arguments are named through
    ``positional_names[function]`` (the method's parameters in order, see
    ``schemas.method_parameter_names``); without it they are an error.
    """
    source = _check_text(source, "The call text").strip()
    if not source:
        _fail("The call text is empty: no calls", "no_calls")
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        _fail(f"Invalid call syntax: {exc.msg} (line {exc.lineno}, column {exc.offset})", "invalid_syntax")
    except (ValueError, RecursionError, MemoryError) as exc:  # too-long ints, too-deep expressions
        _fail(
            f"Invalid call syntax: {type(exc).__name__} {str(exc)[:MAX_SNIPPET_CHARS]}".rstrip(),
            "invalid_syntax",
        )
    return _LiteralReader(source, positional_names).calls(tree.body)


def _literal_source(value: object) -> str:
    if value is None or isinstance(value, bool | int | str):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot format the non-finite number {value!r} as a literal")
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_literal_source(item) for item in value) + "]"
    if isinstance(value, dict):
        parts = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"dictionary keys must be strings, got {type(key).__name__}")
            parts.append(f"{key!r}: {_literal_source(item)}")
        return "{" + ", ".join(parts) + "}"
    raise ValueError(f"cannot format a {type(value).__name__} as a literal")


def format_pythonic_call(call: ToolCall) -> str:
    """BFCL's form ``name(k=repr(v), ...)``, for BFCL's own checker (which ``eval``s it).

    Because that text is evaluated downstream, the name and keys must be plain identifiers and the
    values plain literals; anything else raises ``ValueError`` instead of producing code.
    """
    if not _IDENTIFIER.fullmatch(call.name) or keyword.iskeyword(call.name):
        raise ValueError(f"{call.name!r} is not a valid function name")
    parts = []
    for key, value in call.arguments.items():
        if not isinstance(key, str) or not _IDENTIFIER.fullmatch(key) or keyword.iskeyword(key):
            raise ValueError(f"{key!r} is not a valid parameter name")
        parts.append(f"{key}={_literal_source(value)}")
    return f"{call.name}({', '.join(parts)})"
