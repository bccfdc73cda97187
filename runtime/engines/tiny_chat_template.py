"""The tiny model's chat template with function calling, rendered as Qwen2.5 renders it.

``tiny_model.CHAT_TEMPLATE`` ignores ``tools`` and cannot render an assistant message that carries
``tool_calls`` (its content is None then), so an OpenAI-style request with tools could not be served
by the tiny model. ``TOOL_CHAT_TEMPLATE`` is a superset: without tools and tool calls it renders
byte for byte what ``CHAT_TEMPLATE`` renders (a test checks it), so the incremental chat tokenizer
and every trajectory stay the same; with them it renders Qwen2.5's format:

- ``tools`` go into the first system message (the caller's system text first, if any), one JSON
  object per line between ``<tools>`` and ``</tools>``, followed by the instruction to answer with
  ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``;
- an assistant message's ``tool_calls`` render as one such block each, after its content; the
  arguments may be a dict (Hugging Face's convention, rendered with ``tojson``) or a JSON string
  (OpenAI's, rendered as given).

Integration: this replaces ``CHAT_TEMPLATE`` in ``tiny_model.py`` (with ``_FORMAT_VERSION`` bumped so
cached builds are rebuilt); until then callers set ``tokenizer.chat_template`` to it.
"""

from __future__ import annotations

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
"""What opens the tool listing in the system message (Qwen2.5's wording)."""

TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call>'
)
"""What closes it."""


def _jinja_string(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


TOOL_CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] + '\\n\\n' -}}"
    "{%- endif -%}"
    "{{- " + _jinja_string(TOOLS_PREAMBLE) + " -}}"
    "{%- for tool in tools -%}"
    "{{- '\\n' + (tool | tojson) -}}"
    "{%- endfor -%}"
    "{{- " + _jinja_string(TOOLS_POSTAMBLE) + " + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if tools and loop.first and message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}"
    "{{- '<|im_start|>user' -}}"
    "{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined"
    " and message['tool_calls'] -%}"
    "{{- '<|im_start|>assistant' -}}"
    "{%- if message['content'] -%}"
    "{{- '\\n' + message['content'] -}}"
    "{%- endif -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- if call['function'] is defined -%}{%- set call = call['function'] -%}{%- endif -%}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' -}}"
    "{%- if call['arguments'] is string -%}"
    "{{- call['arguments'] -}}"
    "{%- else -%}"
    "{{- call['arguments'] | tojson -}}"
    "{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)
"""ChatML plus Qwen2.5's tool rendering (see the module docstring)."""
