"""ChatTokenizer: prompt rendering and incremental appends equal the template's own tokens."""

from __future__ import annotations

import pytest
from envtune.agents.chat_tokens import ChatTemplateError, ChatTokenizer
from envtune.environments.types import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer


def _template_ids(tokenizer, messages: list[Message], *, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
    )
    return list(out["input_ids"])


def test_end_of_turn_is_found_from_the_template(chat: ChatTokenizer, tokenizer) -> None:
    assert chat.end_of_turn == "<|im_end|>"
    assert chat.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_render_prompt_is_the_template_with_generation_prompt(chat: ChatTokenizer, tokenizer) -> None:
    messages = [Message("system", "You call tools."), Message("user", "List the files, please.")]
    ids = chat.render_prompt(messages)
    assert ids == _template_ids(tokenizer, messages, add_generation_prompt=True)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


SCRIPT: list[tuple[str, list[Message]]] = [
    (
        '<think>I list first.</think><tool_call>[{"name": "ls", "arguments": {}}]</tool_call>',
        [Message("tool", 'Execution results:\n[{"name": "ls", "result": "{\\"files\\": []}"}]')],
    ),
    (
        '<think>Two calls.</think>\n<tool_call>[{"name": "cd", "arguments": {"folder": "doc"}}, '
        '{"name": "pwd", "arguments": {}}]</tool_call>',
        [Message("tool", "result one"), Message("tool", "result two")],
    ),
    (
        "<think>Done.</think><answer>The folder is empty.</answer>",
        [Message("user", "Now create a file named ünïcode 文件.txt\n\nwith two lines.")],
    ),
    (
        "<think>bad format",
        [Message("user", "Format error: Error: Missing </think> closing tag")],
    ),
    (
        "<think>ok</think><answer>Which content?</answer>",
        [Message("user", "[Notice] a notice"), Message("user", "The next question.")],
    ),
]


def test_incremental_ids_equal_full_re_templating(chat: ChatTokenizer, tokenizer) -> None:
    """prompt + sampled + appended ids == the template rendered over the whole history, every step."""
    messages = [Message("system", "System prompt with tools."), Message("user", "First question?")]
    ids = chat.render_prompt(messages)
    pieces: list[list[int]] = [list(ids)]
    for reply_text, observation in SCRIPT:
        sampled = chat.encode_reply(reply_text)  # what an engine would have sampled
        appended = chat.append_messages(observation)
        pieces += [sampled, appended]
        ids = ids + sampled + appended
        messages += [Message("assistant", reply_text), *observation]
        assert ids == _template_ids(tokenizer, messages, add_generation_prompt=True)
    assert ids == [token for piece in pieces for token in piece]


def test_append_cost_does_not_depend_on_history(chat: ChatTokenizer) -> None:
    """The same new message yields the same ids whatever came before (nothing is re-rendered)."""
    message = [Message("tool", "the same feedback")]
    assert chat.append_messages(message) == chat.append_messages(message)
    assert chat.append_messages(message)[0] != chat.end_of_turn_id  # starts after the reply's end


def test_a_reply_cut_by_a_length_cap_gets_its_end_of_turn(chat: ChatTokenizer, tokenizer) -> None:
    messages = [Message("system", "s"), Message("user", "u")]
    cut_reply = chat.encode_reply("<think>a very long thought that")[:-1]  # no end-of-turn sampled
    assert chat.missing_end_of_turn(cut_reply) == (chat.end_of_turn_id,)
    assert chat.missing_end_of_turn(chat.encode_reply("<think>x</think>")) == ()
    observation = [Message("user", "Format error")]
    ids = chat.render_prompt(messages) + cut_reply + [*chat.missing_end_of_turn(cut_reply)]
    ids += chat.append_messages(observation)
    expected = [*messages, Message("assistant", chat.decode_reply(cut_reply)), *observation]
    assert ids == _template_ids(tokenizer, expected, add_generation_prompt=True)


def test_decode_reply_drops_only_the_closing_end_of_turn(chat: ChatTokenizer) -> None:
    text = "<think>x</think><answer>y</answer>"
    assert chat.decode_reply(chat.encode_reply(text)) == text
    assert chat.decode_reply(chat.encode_reply(text)[:-1]) == text


def test_assistant_messages_are_never_appended(chat: ChatTokenizer) -> None:
    with pytest.raises(ValueError, match="assistant"):
        chat.append_messages([Message("assistant", "hi")])


def test_no_messages_appends_only_the_generation_prompt(chat: ChatTokenizer, tokenizer) -> None:
    assert tokenizer.decode(chat.append_messages([])) == "\n<|im_start|>assistant\n"


def test_a_template_that_rewrites_history_is_refused(tokenizer) -> None:
    fresh = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    # The system header counts the messages, so adding a message changes earlier text.
    fresh.chat_template = (
        "{%- for m in messages -%}<|im_start|>{{ m['role'] }} {{ messages|length }}\n{{ m['content'] }}"
        "<|im_end|>\n{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
    )
    chat = ChatTokenizer(fresh)
    with pytest.raises(ChatTemplateError, match="not incremental"):
        chat.append_messages([Message("user", "more")])


def test_a_tokenizer_without_template_is_refused(tokenizer) -> None:
    fresh = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    fresh.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatTokenizer(fresh)


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    contents=st.lists(st.tuples(st.sampled_from(["user", "tool"]), _text), min_size=1, max_size=4),
    reply=st.text(st.characters(blacklist_categories=("Cs", "Z", "Cc")), min_size=1, max_size=30),
)
def test_any_feedback_text_appends_exactly(chat: ChatTokenizer, tokenizer, contents, reply) -> None:
    """Property: for arbitrary environment text, appended ids equal the template's tokens.

    The reply starts with a visible character: a reply starting with whitespace may tokenize
    differently inside a whole re-rendered text, which is exactly why the loop never re-renders.
    """
    messages = [Message("system", "sys"), Message("user", "q")]
    observation = [Message(role, text) for role, text in contents]
    ids = chat.render_prompt(messages) + chat.encode_reply(reply) + chat.append_messages(observation)
    expected = [*messages, Message("assistant", reply), *observation]
    assert ids == _template_ids(tokenizer, expected, add_generation_prompt=True)
