"""``GrammarOptions``: the narrowed reply grammars, checked with xgrammar and with a random model."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

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


def sample_finished_replies(
    model_dir, tools, options: GrammarOptions, user: str, *, max_new_tokens: int, n: int, seed: int
) -> list[str]:
    """``n`` replies of the random tiny model under ``options``' grammar; each must end (not be cut)."""

    async def sample() -> list[str]:
        async with await EmbeddedEngine.open(model_dir, EmbeddedEngineConfig(device="cpu")) as engine:
            prompt = ChatTokenizer(engine.tokenizer).render_prompt([Message("user", user)])
            request = GenerateRequest(
                prompt_ids=tuple(prompt),
                sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=n, seed=seed),
                constraint=reply_constraint(tools, options),
            )
            completions = await engine.generate(request)
            assert all(c.token_ids[-1] in engine.eos_token_ids for c in completions)  # none cut off
            # The closing stop token is dropped whichever EOS it was (see test_learning_e2e: Known).
            return [engine.tokenizer.decode(c.token_ids[:-1]) for c in completions]

    return asyncio.run(sample())


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
    texts = sample_finished_replies(
        tiny_model_dir, tools, NARROW, "Call cd.", max_new_tokens=64, n=16, seed=5
    )
    names = {t.name for t in tools}
    for text in texts:
        parsed = parse_reply(text)
        assert parsed.kind == "tool_call" and parsed.think == ""
        assert len(parsed.calls) == 1 and parsed.calls[0].name in names


def test_string_array_and_number_arguments_are_bounded(grammar_compiler) -> None:
    docs = load_function_docs()
    tools = (docs["cd"], docs["notify_price_change"])  # a string; an array of strings and a number
    options = GrammarOptions(max_string_chars=4, max_array_items=2, max_number_magnitude=1000)
    grammar = reply_grammar(tools, options)

    def cd(folder: str) -> str:
        return reply("", json.dumps([{"name": "cd", "arguments": {"folder": folder}}], ensure_ascii=False))

    def notify(stocks: list[str], threshold: str = "1.5") -> str:
        return reply(
            "",
            '[{"name": "notify_price_change", "arguments": {"stocks": '
            + json.dumps(stocks)
            + f', "threshold": {threshold}}}}}]',
        )

    assert accepts(grammar_compiler, grammar, cd("éééé"))  # characters, not bytes
    assert accepts(grammar_compiler, grammar, cd(""))
    assert not accepts(grammar_compiler, grammar, cd("abcde"))
    # Nothing the parser would refuse and nothing that needs an escape: control characters (JSON
    # forbids them raw; xgrammar's own maxLength strings let them through), quotes, backslashes, "<".
    for bad in ("a\x01", 'a\\"', "a\\\\", "a<b"):
        text = reply("", '[{"name": "cd", "arguments": {"folder": "' + bad + '"}}]')
        assert not accepts(grammar_compiler, grammar, text), bad
    assert accepts(grammar_compiler, grammar, notify(["abcd", "x"]))
    assert not accepts(grammar_compiler, grammar, notify(["abcde"]))  # strings inside arrays too
    assert not accepts(grammar_compiler, grammar, notify(["a", "b", "c"]))
    assert accepts(grammar_compiler, grammar, notify(["a"], "-999.5"))
    for big in ("1000.5", "-2000", "5E650"):
        assert not accepts(grammar_compiler, grammar, notify(["a"], big)), big
    unbounded = reply_grammar(tools)
    assert accepts(grammar_compiler, unbounded, cd("x" * 200))
    assert accepts(grammar_compiler, unbounded, notify(["a"] * 9, "5E650"))
    for name in ("max_string_chars", "max_array_items", "max_number_magnitude"):
        with pytest.raises(ValueError, match=name):
            GrammarOptions(**{name: 0})


def test_bounds_keep_enums_patterns_and_tighter_bounds_of_the_schema() -> None:
    from envtune.agents.grammar import tool_calls_json_schema

    doc = FunctionDoc(
        name="pick",
        class_name="Toy",
        description="",
        parameters={
            "type": "dict",
            "properties": {
                "mode": {"type": "string", "enum": ["a-very-long-mode"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "count": {"type": "integer"},
            },
            "required": ["mode"],
        },
    )
    schema = tool_calls_json_schema((doc,), max_string_chars=3, max_array_items=5, max_number_magnitude=9.5)
    arguments = schema["items"]["properties"]["arguments"]["properties"]
    assert arguments["mode"] == {"type": "string", "enum": ["a-very-long-mode"]}  # stays callable
    assert arguments["tags"]["maxItems"] == 5 and arguments["tags"]["items"]["pattern"].endswith("{0,3}$")
    assert (arguments["count"]["minimum"], arguments["count"]["maximum"]) == (-9, 9)
    assert tool_calls_json_schema((doc,)) == tool_calls_json_schema((doc,), max_string_chars=None)


def test_a_random_model_under_bounded_arguments_writes_calls_the_parser_accepts(tiny_model_dir) -> None:
    """What the bounds are for: every sampled reply with string and number arguments parses."""
    docs = load_function_docs()
    tools = (docs["add_to_watchlist"], docs["fund_account"], docs["notify_price_change"])
    options = replace(NARROW, max_string_chars=16, max_array_items=2, max_number_magnitude=1e6)
    texts = sample_finished_replies(
        tiny_model_dir, tools, options, "Watch NVDA.", max_new_tokens=256, n=48, seed=3
    )
    called = set()
    for text in texts:
        parsed = parse_reply(text)  # raises on anything the environment would call a format error
        called.add(parsed.calls[0].name)
    assert len(called) >= 2  # the sample is not one degenerate call
