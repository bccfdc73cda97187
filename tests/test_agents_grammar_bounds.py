"""``GrammarOptions``: the narrowed reply grammars, checked with xgrammar and with a random model."""

from __future__ import annotations

import asyncio
import json

import pytest
import xgrammar
from envtune.agents.chat_tokens import ChatTokenizer
from envtune.agents.engine import GenerateRequest, SamplingParams
from envtune.agents.grammar import (
    MAX_CALLS_PER_REPLY,
    ConstraintCache,
    GrammarOptions,
    reply_constraint,
    reply_grammar,
)
from envtune.environments.tasks import load_function_docs
from envtune.environments.tool_calls import parse_reply
from envtune.environments.types import FunctionDoc, Message
from envtune.runtime.engines.embedded import EmbeddedEngine
from envtune.runtime.engines.settings import EmbeddedEngineConfig
from envtune.runtime.testing.toy_env import toy_function_docs

NARROW = GrammarOptions(
    max_think_chars=0, allow_answer=False, max_calls=1, any_whitespace=False, any_order=False
)


@pytest.fixture(scope="module")
def tools() -> tuple[FunctionDoc, ...]:
    docs = load_function_docs()
    return (docs["cd"], docs["ls"])


def accepts(grammar_compiler: xgrammar.GrammarCompiler, grammar: str, text: str) -> bool:
    matcher = xgrammar.GrammarMatcher(grammar_compiler.compile_grammar(grammar))
    return matcher.accept_string(text) and matcher.is_completed()


def reply(think: str, calls: str = '[{"name": "ls", "arguments": {}}]', sep: str = "") -> str:
    return f"<think>{think}</think>{sep}<tool_call>{calls}</tool_call>"


def test_default_options_are_the_full_format(tools) -> None:
    assert reply_grammar(tools) == reply_grammar(tools, GrammarOptions())
    assert reply_constraint(tools).grammar == reply_grammar(tools)


@pytest.mark.parametrize("bound", [0, 1, 8])
def test_think_text_is_bounded_in_characters(grammar_compiler, tools, bound: int) -> None:
    grammar = reply_grammar(tools, GrammarOptions(max_think_chars=bound))
    xgrammar.Grammar.from_ebnf(grammar)  # the {0,N} repetition survives a round trip as EBNF text
    assert accepts(grammar_compiler, grammar, reply("é" * bound))  # characters, not bytes
    assert not accepts(grammar_compiler, grammar, reply("x" * (bound + 1)))
    assert accepts(grammar_compiler, grammar, reply(""))


def test_bounded_think_refuses_every_angle_bracket(grammar_compiler, tools) -> None:
    free, bounded = reply_grammar(tools), reply_grammar(tools, GrammarOptions(max_think_chars=8))
    assert accepts(grammar_compiler, free, reply("a < b"))
    assert not accepts(grammar_compiler, bounded, reply("a < b"))


def test_without_the_answer_branch_only_tool_calls_pass(grammar_compiler, tools) -> None:
    grammar = reply_grammar(tools, GrammarOptions(allow_answer=False))
    assert accepts(grammar_compiler, grammar, reply("go"))
    assert not accepts(grammar_compiler, grammar, "<think>go</think><answer>done</answer>")
    assert accepts(grammar_compiler, reply_grammar(tools), "<think>go</think><answer>done</answer>")
    with pytest.raises(ValueError, match="at least one visible tool"):
        reply_grammar((), GrammarOptions(allow_answer=False))


def test_max_calls_bounds_the_call_list(grammar_compiler, tools) -> None:
    one = json.dumps([{"name": "ls", "arguments": {}}])
    two = json.dumps([{"name": "ls", "arguments": {}}, {"name": "cd", "arguments": {"folder": "d"}}])
    grammar = reply_grammar(tools, GrammarOptions(max_calls=1))
    assert accepts(grammar_compiler, grammar, reply("", one))
    assert not accepts(grammar_compiler, grammar, reply("", two))
    for bad in (0, MAX_CALLS_PER_REPLY + 1):
        with pytest.raises(ValueError, match="max_calls"):
            GrammarOptions(max_calls=bad)
    with pytest.raises(ValueError, match="max_think_chars"):
        GrammarOptions(max_think_chars=-1)


def test_without_free_whitespace_one_spelling_remains(grammar_compiler, tools) -> None:
    grammar = reply_grammar(tools, GrammarOptions(any_whitespace=False))
    assert accepts(grammar_compiler, grammar, reply("", '[{"name": "cd", "arguments": {"folder": "d"}}]'))
    assert not accepts(grammar_compiler, grammar, reply("", '[{"name":"cd","arguments":{"folder":"d"}}]'))
    assert not accepts(grammar_compiler, grammar, reply("", '[ {"name": "ls", "arguments": {}}]'))
    assert not accepts(grammar_compiler, grammar, reply("", sep="\n"))
    assert accepts(grammar_compiler, reply_grammar(tools), reply("", sep="\n"))


def test_keys_in_schema_order_close_xgrammars_repeated_key_gap(grammar_compiler, tools) -> None:
    repeated = reply("", '[{"name": "ls", "name": "ls"}]')
    swapped = reply("", '[{"arguments": {}, "name": "ls"}]')
    # xgrammar 0.2.8 with any_order: a repeated key passes (the environment's parser refuses it).
    assert accepts(grammar_compiler, reply_grammar(tools), repeated)
    assert accepts(grammar_compiler, reply_grammar(tools), swapped)
    ordered = reply_grammar(tools, GrammarOptions(any_order=False))
    assert not accepts(grammar_compiler, ordered, repeated)
    assert not accepts(grammar_compiler, ordered, swapped)
    assert accepts(grammar_compiler, ordered, reply(""))


def test_constraint_cache_builds_with_its_options(tools) -> None:
    cache = ConstraintCache(max_entries=2, options=NARROW)
    first = cache.get(tools)
    assert first.grammar == reply_grammar(tools, NARROW) != reply_grammar(tools)
    assert cache.get(tools) is first and (cache.hits, cache.misses) == (1, 1)
    assert ConstraintCache().options == GrammarOptions()


def test_a_random_model_under_the_narrow_grammar_writes_parseable_replies(tiny_model_dir) -> None:
    """The point of the options: a random model's replies end, within a small budget, and parse."""
    tools = toy_function_docs()

    async def sample() -> list[str]:
        config = EmbeddedEngineConfig(device="cpu")
        async with await EmbeddedEngine.open(tiny_model_dir, config) as engine:
            prompt = ChatTokenizer(engine.tokenizer).render_prompt([Message("user", "Call cd.")])
            request = GenerateRequest(
                prompt_ids=tuple(prompt),
                sampling=SamplingParams(max_new_tokens=64, temperature=1.0, n=16, seed=5),
                constraint=reply_constraint(tools, NARROW),
            )
            completions = await engine.generate(request)
            assert all(c.token_ids[-1] in engine.eos_token_ids for c in completions)  # none cut off
            # The closing stop token is dropped whichever EOS it was (see test_learning_e2e: Known).
            return [engine.tokenizer.decode(c.token_ids[:-1]) for c in completions]

    texts = asyncio.run(sample())
    names = {t.name for t in tools}
    for text in texts:
        parsed = parse_reply(text)
        assert parsed.kind == "tool_call" and parsed.think == ""
        assert len(parsed.calls) == 1 and parsed.calls[0].name in names
