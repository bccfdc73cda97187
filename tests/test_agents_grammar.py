"""The reply grammar, checked with xgrammar itself: valid replies pass, broken ones are refused."""

from __future__ import annotations

import json

import pytest
import xgrammar
from envtune.agents.chat_tokens import ChatTokenizer
from envtune.agents.engine import ConstraintKind
from envtune.agents.grammar import (
    MAX_CALLS_PER_REPLY,
    ConstraintCache,
    SchemaError,
    bfcl_to_json_schema,
    reply_constraint,
    reply_grammar,
)
from envtune.environments.tasks import load_function_docs
from envtune.environments.types import FunctionDoc


@pytest.fixture(scope="module")
def tools() -> tuple[FunctionDoc, ...]:
    docs = load_function_docs()
    return tuple(docs[name] for name in ("cd", "ls", "post_tweet", "edit_ticket", "mean", "lockDoors"))


@pytest.fixture(scope="module")
def compiled(grammar_compiler, tools) -> xgrammar.CompiledGrammar:
    return grammar_compiler.compile_grammar(reply_grammar(tools))


def accepts(compiled: xgrammar.CompiledGrammar, text: str) -> bool:
    matcher = xgrammar.GrammarMatcher(compiled)
    return matcher.accept_string(text) and matcher.is_completed()


def call(*calls: dict) -> str:
    return f"<think>I will call.</think><tool_call>{json.dumps(list(calls))}</tool_call>"


VALID = [
    call({"name": "cd", "arguments": {"folder": "document"}}),
    call({"name": "ls", "arguments": {}}),
    call({"name": "ls", "arguments": {"a": True}}, {"name": "cd", "arguments": {"folder": ".."}}),
    call({"arguments": {"folder": "x"}, "name": "cd"}),  # keys in any order
    call({"name": "post_tweet", "arguments": {"tags": ["a", "b"], "content": "hi", "mentions": []}}),
    call({"name": "edit_ticket", "arguments": {"ticket_id": 3, "updates": {"priority": 2, "status": "ok"}}}),
    call({"name": "mean", "arguments": {"numbers": [1, 2.5, -3e2]}}),  # ints are valid floats
    "<think>x < 3 and a<-b</think><answer>Done: the file is 5 > 4 bytes.</answer>",
    "<think></think>\n<answer></answer>",
    '<think>\nmulti\nline\n</think>\n<tool_call>\n[{"name": "cd", "arguments": {"folder": "d"}}]\n'
    "</tool_call>",
]

INVALID = {
    "unknown function": call({"name": "rm_rf", "arguments": {}}),
    "wrong argument type": call({"name": "cd", "arguments": {"folder": 3}}),
    "float for an integer": call({"name": "edit_ticket", "arguments": {"ticket_id": 1.5, "updates": {}}}),
    "string in a float array": call({"name": "mean", "arguments": {"numbers": ["1"]}}),
    "missing required argument": call({"name": "cd", "arguments": {}}),
    "unknown argument": call({"name": "cd", "arguments": {"folder": "d", "force": True}}),
    "unknown nested key": call({"name": "edit_ticket", "arguments": {"ticket_id": 1, "updates": {"x": 1}}}),
    "empty call list": "<think>x</think><tool_call>[]</tool_call>",
    "no think": "<answer>hi</answer>",
    "text outside the tags": "<think>x</think>Sure! <answer>hi</answer>",
    "tag inside think": "<think>x<answer>y</answer></think><answer>z</answer>",
    "both formats": "<think>x</think><answer>a</answer><tool_call>[]</tool_call>",
    "two think blocks": "<think>x</think><think>y</think><answer>a</answer>",
    "not JSON": "<think>x</think><tool_call>cd(folder='d')</tool_call>",
}


@pytest.mark.parametrize("text", VALID)
def test_valid_replies_are_accepted(compiled, text: str) -> None:
    assert accepts(compiled, text)


@pytest.mark.parametrize("reason", sorted(INVALID))
def test_invalid_replies_are_refused(compiled, reason: str) -> None:
    assert not accepts(compiled, INVALID[reason])


def test_too_many_calls_are_refused(compiled) -> None:
    one = {"name": "ls", "arguments": {}}
    assert accepts(compiled, call(*[one] * MAX_CALLS_PER_REPLY))
    assert not accepts(compiled, call(*[one] * (MAX_CALLS_PER_REPLY + 1)))


def test_token_level_matching_ends_at_end_of_turn(compiled, tokenizer) -> None:
    """The engine's view: the reply's sampled ids, then the stop token, terminate the matcher."""
    chat = ChatTokenizer(tokenizer)
    ids = chat.encode_reply(VALID[0])
    matcher = xgrammar.GrammarMatcher(compiled)
    for token in ids[:-1]:
        assert matcher.accept_token(token)
        assert not matcher.is_terminated()
    assert matcher.accept_token(ids[-1])  # <|im_end|>
    assert matcher.is_terminated()
    bad = xgrammar.GrammarMatcher(compiled)
    assert not all(bad.accept_token(t) for t in chat.encode_reply("<think>x</think>oops"))


def test_without_tools_only_answers_are_allowed(grammar_compiler) -> None:
    compiled = grammar_compiler.compile_grammar(reply_grammar(()))
    assert accepts(compiled, "<think>x</think><answer>no tools</answer>")
    assert not accepts(compiled, call({"name": "cd", "arguments": {"folder": "d"}}))


def test_grammar_text_reparses_as_ebnf(tools) -> None:
    """SGLang receives the text and compiles it with xgrammar's EBNF parser."""
    constraint = reply_constraint(tools)
    assert constraint.kind is ConstraintKind.EBNF
    assert str(xgrammar.Grammar.from_ebnf(constraint.grammar)) == constraint.grammar


def test_every_bfcl_function_converts() -> None:
    docs = tuple(load_function_docs().values())
    assert len(reply_grammar(docs)) > 0
    schema = bfcl_to_json_schema(load_function_docs()["mean"].parameters)
    assert schema["properties"]["numbers"] == {"type": "array", "items": {"type": "number"}}
    assert schema["additionalProperties"] is False


def test_schema_conversion() -> None:
    schema = bfcl_to_json_schema(
        {
            "type": "dict",
            "properties": {
                "n": {"type": "integer", "description": "d"},
                "opt": {"type": "dict", "properties": {"flag": {"type": "boolean"}}},
                "mode": {"type": "string", "enum": ["a", "b"]},
                "anything": {"type": "any"},
            },
            "required": ["n", "ghost"],
        }
    )
    assert schema == {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "opt": {
                "type": "object",
                "properties": {"flag": {"type": "boolean"}},
                "required": [],
                "additionalProperties": False,
            },
            "mode": {"type": "string", "enum": ["a", "b"]},
            "anything": {},
        },
        "required": ["n"],
        "additionalProperties": False,
    }
    with pytest.raises(SchemaError, match=r"parameters\.x: unknown BFCL type 'complex'"):
        bfcl_to_json_schema({"type": "dict", "properties": {"x": {"type": "complex"}}})


def test_constraint_cache_reuses_and_bounds(tools) -> None:
    cache = ConstraintCache(max_entries=2)
    first = cache.get(tools[:2])
    assert cache.get(tools[:2]) is first
    cache.get(tools[2:4])
    cache.get(tools[4:])
    assert len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 3)
    assert cache.get(tools[:2]) is not first  # evicted, rebuilt (equal text)
    assert cache.get(tools[:2]).grammar == first.grammar
