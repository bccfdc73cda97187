"""The grammar of a well-formed reply, built from the tools visible in a turn.

Constrained decoding (on or off per curriculum stage) lets the engine sample only replies of the
paper's two formats (docs/method.md §1.2)::

    <think>free text</think> then either <answer>free text</answer>
                             or <tool_call>[{"name": <visible name>, "arguments": {...}}, ...]</tool_call>

where each call's arguments follow that function's BFCL schema (types, nested properties, required
keys, no unknown keys, keys in any order). Free text may not contain ``<`` followed by a letter, ``/``
or ``<``, so no tag can open inside it: the environment's parser then sees exactly one think block
and one action block. The grammar is EBNF text as xgrammar prints it (SGLang's ``ebnf`` sampling
parameter and the embedded engine both compile it with xgrammar); the JSON part is xgrammar's own
JSON-schema conversion, so escapes and numbers follow JSON exactly. One gap, xgrammar 0.2.8's: with
keys in any order a key may repeat (and then a required one may be missing), which the parser
refuses; ``GrammarOptions.any_order=False`` closes it at the price of a fixed key order.

``GrammarOptions`` narrows the grammar for probes and tiny models (its defaults give the grammar
above): a bounded think block (a random model rarely closes a free one), no answer branch, fewer
calls per block, bounded strings and arrays in arguments, no free whitespace, keys in schema order.

Left out: semantic checks (a value that type-checks but is wrong is the environment's business), and
JSON string values that themselves contain tag text (allowed by JSON, refused by the parser; rare).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from envtune.agents.engine import Constraint, ConstraintKind
from envtune.environments.schemas import SchemaError as SchemaError
from envtune.environments.schemas import bfcl_to_json_schema as bfcl_to_json_schema
from envtune.environments.tool_calls import MAX_CALLS_PER_STEP
from envtune.environments.types import FunctionDoc

if TYPE_CHECKING:
    import xgrammar

MAX_CALLS_PER_REPLY = MAX_CALLS_PER_STEP
"""Most calls one ``<tool_call>`` block may hold: the environment parser's own limit."""

# Free text: no "<" that could start a tag ("<" followed by a letter, "/" or another "<"), and no "<"
# right before the closing tag (that "<" would be followed by "<").
_FREE_TEXT = 'root ::= ([^<] | "<" [^a-zA-Z/<])*'
_WS = 'root ::= [ \\n\\t]{0,8}'
"""Whitespace between blocks, bounded so a constrained model cannot pad forever."""


def _check_max_calls(max_calls: int) -> None:
    if not 1 <= max_calls <= MAX_CALLS_PER_REPLY:
        raise ValueError(f"max_calls must be in [1, {MAX_CALLS_PER_REPLY}], got {max_calls}")


def tool_calls_json_schema(
    tools: Sequence[FunctionDoc],
    *,
    max_calls: int = MAX_CALLS_PER_REPLY,
    max_string_chars: int | None = None,
    max_array_items: int | None = None,
    max_number_magnitude: float | None = None,
) -> dict[str, Any]:
    """JSON Schema of the ``<tool_call>`` body: 1 to ``max_calls`` calls of the visible tools, their
    arguments bounded as ``GrammarOptions`` describes when the bounds are set."""
    if not tools:
        raise ValueError("a tool-call grammar needs at least one visible tool")
    _check_max_calls(max_calls)
    bounds = _Bounds(max_string_chars, max_array_items, max_number_magnitude)
    cases = [
        {
            "type": "object",
            "properties": {
                "name": {"const": doc.name},
                "arguments": bounds.apply(bfcl_to_json_schema(doc.parameters, doc.name)),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for doc in tools
    ]
    return {
        "type": "array",
        "items": cases[0] if len(cases) == 1 else {"anyOf": cases},
        "minItems": 1,
        "maxItems": max_calls,
    }


@dataclass(frozen=True, slots=True)
class _Bounds:
    """The value bounds of ``GrammarOptions``, applied to an arguments schema."""

    string_chars: int | None
    array_items: int | None
    number_magnitude: float | None

    def apply(self, schema: dict[str, Any]) -> dict[str, Any]:
        """``schema`` with every string, array and number below it bounded."""
        out = dict(schema)
        kind = out.get("type")
        if self.string_chars is not None and kind == "string" and not {"enum", "pattern"} & out.keys():
            # A pattern, not maxLength: xgrammar 0.2.8's maxLength strings admit control characters,
            # which JSON (and the environment's parser) refuse. No quote, backslash or "<" either, so
            # a bounded string needs no escape and cannot hold tag text.
            out["pattern"] = f'^[^\\x00-\\x1f"\\\\<]{{0,{self.string_chars}}}$'
        if self.array_items is not None and kind == "array":
            out["maxItems"] = min(self.array_items, out.get("maxItems", self.array_items))
        if self.number_magnitude is not None and kind in ("number", "integer") and "enum" not in out:
            bound = self.number_magnitude if kind == "number" else int(self.number_magnitude)
            out["minimum"] = max(-bound, out.get("minimum", -bound))
            out["maximum"] = min(bound, out.get("maximum", bound))
        if "properties" in out:
            out["properties"] = {name: self.apply(sub) for name, sub in out["properties"].items()}
        if "items" in out:
            out["items"] = self.apply(out["items"])
        return out


@dataclass(frozen=True, slots=True)
class GrammarOptions:
    """How much of the reply format a grammar allows; the defaults allow all of it."""

    max_think_chars: int | None = None
    """None: free think text. Otherwise at most this many characters, none of them ``<`` (so the
    bound is exact in characters); 0 forces ``<think></think>``."""
    allow_answer: bool = True
    """False leaves only the ``<tool_call>`` branch (needs at least one visible tool)."""
    max_calls: int = MAX_CALLS_PER_REPLY
    """Most calls one ``<tool_call>`` block may hold, in ``[1, MAX_CALLS_PER_REPLY]``."""
    any_whitespace: bool = True
    """False: no whitespace between blocks and one spacing of the JSON (xgrammar's separators
    ``", "`` and ``": "``), so a random model cannot spend its tokens on padding."""
    max_string_chars: int | None = None
    """None: any JSON string argument. Otherwise each string argument (enums excepted) holds at most
    this many characters, none of them a control character, ``"``, ``\\`` or ``<``; so the grammar
    closes it: a random model almost never samples a closing quote by itself (one token of ~2,000)
    and would fill its reply budget with one string instead."""
    max_array_items: int | None = None
    """None: arrays of any length; otherwise at most this many items in each array argument."""
    max_number_magnitude: float | None = None
    """None: any JSON number. Otherwise numbers lie in [-bound, bound] (no exponent can overflow to
    infinity, which the parser refuses)."""
    any_order: bool = True
    """Object keys in any order. xgrammar 0.2.8 then also accepts repeated keys (and objects missing
    a required key when the object has two or more), which the environment's parser refuses; False
    pins keys to schema order (``name`` then ``arguments``; arguments in the doc's order) and the
    grammar then admits only replies that parse."""

    def __post_init__(self) -> None:
        if self.max_think_chars is not None and self.max_think_chars < 0:
            raise ValueError(f"max_think_chars must be >= 0 or None, got {self.max_think_chars}")
        _check_max_calls(self.max_calls)
        for name in ("max_string_chars", "max_array_items", "max_number_magnitude"):
            bound = getattr(self, name)
            if bound is not None and bound < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {bound}")


DEFAULT_OPTIONS = GrammarOptions()
"""The full paper format."""


def _think_text(max_think_chars: int | None) -> str:
    """EBNF of the think text: free text, or at most ``max_think_chars`` characters without ``<``."""
    if max_think_chars is None:
        return _FREE_TEXT
    if max_think_chars == 0:
        return 'root ::= ""'
    return f"root ::= [^<]{{0,{max_think_chars}}}"


def reply_grammar(tools: Sequence[FunctionDoc], options: GrammarOptions = DEFAULT_OPTIONS) -> str:
    """EBNF (xgrammar dialect) of a whole reply for these visible tools; see the module docstring.

    With no visible tools, only the answer format is allowed (so ``allow_answer=False`` then is an
    error: no reply would be possible).
    """
    if not tools and not options.allow_answer:
        raise ValueError("allow_answer=False needs at least one visible tool")
    import xgrammar  # composing grammars needs it; importing this module must not (stdlib-only agents)

    def lit(text: str) -> xgrammar.Grammar:
        return xgrammar.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")

    free = xgrammar.Grammar.from_ebnf(_FREE_TEXT)
    ws = xgrammar.Grammar.from_ebnf(_WS if options.any_whitespace else 'root ::= ""')
    think_text = xgrammar.Grammar.from_ebnf(_think_text(options.max_think_chars))
    think = xgrammar.Grammar.concat(lit("<think>"), think_text, lit("</think>"))
    answer = xgrammar.Grammar.concat(lit("<answer>"), free, lit("</answer>"))
    action = answer
    if tools:
        calls = xgrammar.Grammar.from_json_schema(
            json.dumps(
                tool_calls_json_schema(
                    tools,
                    max_calls=options.max_calls,
                    max_string_chars=options.max_string_chars,
                    max_array_items=options.max_array_items,
                    max_number_magnitude=options.max_number_magnitude,
                )
            ),
            any_whitespace=options.any_whitespace,
            strict_mode=True,
            any_order=options.any_order,
            max_whitespace_cnt=8 if options.any_whitespace else None,
        )
        tool_call = xgrammar.Grammar.concat(lit("<tool_call>"), ws, calls, ws, lit("</tool_call>"))
        action = xgrammar.Grammar.union(tool_call, answer) if options.allow_answer else tool_call
    return str(xgrammar.Grammar.concat(think, ws, action))


def reply_constraint(tools: Sequence[FunctionDoc], options: GrammarOptions = DEFAULT_OPTIONS) -> Constraint:
    """The engine constraint for a reply with these visible tools."""
    return Constraint(kind=ConstraintKind.EBNF, grammar=reply_grammar(tools, options))


def _tools_key(tools: Sequence[FunctionDoc]) -> tuple[tuple[str, ...], str]:
    # Names alone would do for BFCL (docs never change), but a digest of the docs keeps the cache
    # honest if two callers ever pass different docs under one name.
    digest = hashlib.sha256(json.dumps([d.to_json() for d in tools], sort_keys=True).encode()).hexdigest()
    return tuple(d.name for d in tools), digest


class ConstraintCache:
    """Reply constraints by visible tool set, least recently used dropped past ``max_entries``.

    BFCL has few distinct tool sets (one per class combination, plus revealed functions), so a
    runtime can share one cache across all its episodes; building one costs milliseconds. One cache
    builds with one ``GrammarOptions``.
    """

    def __init__(self, max_entries: int = 256, options: GrammarOptions = DEFAULT_OPTIONS) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.options = options
        """The grammar options of every constraint this cache builds."""
        self._entries: OrderedDict[tuple[tuple[str, ...], str], Constraint] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, tools: Sequence[FunctionDoc]) -> Constraint:
        """The constraint for ``tools`` (built on first use)."""
        key = _tools_key(tools)
        found = self._entries.get(key)
        if found is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return found
        self.misses += 1
        constraint = reply_constraint(tools, self.options)
        self._entries[key] = constraint
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return constraint

    def __len__(self) -> int:
        return len(self._entries)
