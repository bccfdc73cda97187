"""The texts of the interaction protocol (docs/method.md §4), in envtune's own words.

System prompts for stages 1-2 (basic) and 3-4 (resourceful), the feedback message after a tool
step, and the notices the environment injects: a forced turn end, revealed functions, a call on a
turn that must not call, and a format error. Texts only: no state, no decisions.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

from envtune.environments.tasks import load_function_docs
from envtune.environments.types import CallOutcome, FunctionDoc, PromptStyle, ToolListing

_FORMATS = """\
Reply in exactly one of these two formats, with nothing outside the tags:

Format 1, to call tools:
<think>your reasoning</think><tool_call>[{"name": "function_name", "arguments": {"arg": "value"}}]</tool_call>

Format 2, to reply to the user:
<think>your reasoning</think><answer>your final message, clarifying question, or refusal</answer>

Rules:
- Put every call of a step in one JSON array inside a single <tool_call> block; arguments are JSON values.
- After a tool step you receive the results and may call again.
- Use <answer> only when the request is fulfilled, or when you need more information from the user, or
  must refuse."""

_RESOURCEFUL = """\
- Be resourceful: before asking the user for a missing value, check whether a function can look it up.
- Prefer clarity to assumptions: if a required function is not available, or a required parameter is missing
  and no function can retrieve it, do NOT make a tool call with invented values; ask with <answer>."""


_ENCODER = json.JSONEncoder(ensure_ascii=False)
"""A stateless, configured encoder made once: ``json.dumps`` with a non-default option builds a new
encoder on every call, which costs more than encoding a step's feedback."""


_SIGNATURES_NOTE = "(one function per line; ? marks an optional argument)"


def tool_listing(tools: Sequence[FunctionDoc], listing: ToolListing = ToolListing.FULL) -> str:
    """One line per tool; BFCL's registered docs are immutable, so a listing is rendered once."""
    registry = load_function_docs()
    if all(registry.get(doc.name) is doc for doc in tools):
        return _registered_listing(tuple(doc.name for doc in tools), listing)
    return "\n".join(_doc_line(doc, listing) for doc in tools)


@functools.lru_cache(maxsize=4096)
def _registered_listing(names: tuple[str, ...], listing: ToolListing) -> str:
    registry = load_function_docs()
    return "\n".join(_doc_line(registry[name], listing) for name in names)


def _doc_line(doc: FunctionDoc, listing: ToolListing) -> str:
    if listing is ToolListing.FULL:
        return _ENCODER.encode(doc.to_json())
    properties = doc.parameters.get("properties", {})
    required = set(doc.parameters.get("required", ()))
    arguments = ", ".join(
        f"{name}{'' if name in required else '?'}: {schema.get('type', 'any')}"
        for name, schema in properties.items()
    )
    return f"{doc.name}({arguments})"


def system_prompt(
    style: PromptStyle, tools: Sequence[FunctionDoc], listing: ToolListing = ToolListing.FULL
) -> str:
    """The system prompt of a stage, with the visible tools listed as ``listing`` says."""
    tools_text = tool_listing(tools, listing)
    if listing is ToolListing.SIGNATURES:
        tools_text = f"{_SIGNATURES_NOTE}\n{tools_text}"
    rules = _FORMATS if style is PromptStyle.BASIC else f"{_FORMATS}\n{_RESOURCEFUL}"
    return (
        "You are an expert at composing function calls. You are given a user request and a set of functions. "
        "Make one or more function calls to fulfil the request. If none of the functions fits, say so and "
        "refuse. If the request lacks a parameter that a function needs, say so and ask for it.\n\n"
        f"You can use these functions:\n{tools_text}\n\n{rules}"
    )


def tool_feedback(outcomes: Sequence[CallOutcome]) -> str:
    """The message after a tool step: one entry per call, results JSON-encoded once."""
    entries = []
    for outcome in outcomes:
        entry: dict[str, str] = {"name": outcome.call.name, "result": outcome.result}
        if outcome.hint:
            entry["hint"] = outcome.hint
        entries.append(entry)
    return (
        "Execution results:\n"
        + _ENCODER.encode(entries)
        + "\nIf the request is fulfilled, think briefly and summarise the result in <answer></answer>; "
        "otherwise keep calling functions."
    )


def format_error_message(error: str) -> str:
    """What the model sees after a reply that broke the format."""
    return (
        f"Format error: {error}\nReply with <think>...</think> followed by one <tool_call> or one <answer>."
    )


def forced_turn_end_notice(max_steps: int) -> str:
    """Shown when a turn is ended because it used its whole step budget."""
    return (
        f"[Notice] The previous request used all {max_steps} steps allowed for one turn and was ended "
        "without a final answer."
    )


def must_not_call_warning() -> str:
    """Shown when the model called a tool on a turn where a function or parameter was missing."""
    return (
        "[Warning] In the previous turn a function or a required parameter was missing, so no call could "
        "be right: the calls were not executed and the turn was ended. When that happens, ask the user or "
        "explain with <answer> instead of calling."
    )


def revealed_functions_message(
    docs: Sequence[FunctionDoc], listing: ToolListing = ToolListing.FULL
) -> str:
    """Injected at the turn that reveals functions that were held out until then."""
    return (
        f"These functions are now available as well:\n{tool_listing(docs, listing)}\n"
        "Please try the previous request again with them."
    )
