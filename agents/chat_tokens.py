"""Chat messages to token ids with the tokenizer's own chat template, incrementally.

An episode's history is token ids, never text: the prompt is rendered once, the model's reply is
kept exactly as sampled, and every later environment message is tokenized *alone* and appended.
``ChatTokenizer.append_messages`` finds the ids of only the new messages with the template-delimiter
method: it renders a fixed short probe conversation that ends with an assistant reply, once, and
for each append renders ``probe + new messages`` and keeps the text after the probe's end-of-turn
token. The cost of an append therefore depends on the new messages only, not on the history.

The end-of-turn token (``<|im_end|>`` for ChatML) closes the assistant's reply in the template. A
reply sampled with that token as its stop token already ends with it; a reply cut off by a length
cap does not, and ``missing_end_of_turn`` returns the id to insert (a non-sampled, unmasked token)
before the next messages are appended, so the ids stay what the template would have produced.

Speed (every call runs on the rollout's event loop): an episode's opening prompt, the same for
the 16 members of a group, is rendered and tokenized once per group, environment messages seen
recently (format-error notices, the same tool result for several members) are tokenized once
(two small bounded caches: the ids are a pure function of the messages), and a
fast tokenizer's Rust backend encodes and decodes directly when it gives the same ids and text as
the HF wrapper (checked on the probe at construction), skipping ~100 us of wrapper per call.

Left out: rendering tools into the prompt (the environment writes the system prompt, tools
included) and any knowledge of a particular model family beyond what its template renders.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from envtune.environments.types import Message

_PROBE_REPLY = "ok"
"""Content of the probe's assistant message; the text after it starts with the end-of-turn token."""
PROMPT_CACHE_SIZE = 256
"""Opening prompts kept tokenized (a group's members share one; a few KB of ids each)."""
APPEND_CACHE_SIZE = 4096
"""Environment messages kept tokenized: format-error notices repeat verbatim, and the members of a
group calling the same tool get the same result; tokenizing them is the loop's largest cost."""


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used incrementally (or has no end-of-turn token)."""


def _as_dicts(messages: Sequence[Message]) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": m.content} for m in messages]


class ChatTokenizer:
    """A HF tokenizer with a chat template, used token-in/token-out.

    ``render_prompt`` renders the opening messages; ``append_messages`` returns the ids of new
    messages plus the next generation prompt, never touching the history.
    """

    def __init__(self, tokenizer: Any, *, end_of_turn: str | None = None) -> None:
        """``end_of_turn``: the token that ends an assistant message in the template; found from
        the template when None (the first token the template writes after an assistant's content)."""
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self._backend: Any = None
        self._prompts: OrderedDict[tuple[tuple[str, str], ...], tuple[int, ...]] = OrderedDict()
        self._appends: OrderedDict[tuple[tuple[str, str], ...], tuple[int, ...]] = OrderedDict()
        self._append_hits = 0
        self._append_misses = 0
        probe = [
            Message("system", "s"),
            Message("user", "u"),
            Message("assistant", _PROBE_REPLY),
        ]
        self._probe = _as_dicts(probe)
        rendered = self._template(self._probe, add_generation_prompt=False)
        cut = rendered.rfind(_PROBE_REPLY)
        if cut < 0:
            raise ChatTemplateError("the chat template does not render the assistant content verbatim")
        cut += len(_PROBE_REPLY)
        after = rendered[cut:]
        if end_of_turn is None:
            after_ids = self._encode(after)
            if not after_ids:
                raise ChatTemplateError("the chat template writes nothing after an assistant message")
            end_of_turn = tokenizer.convert_ids_to_tokens(after_ids[0])
        if not after.startswith(end_of_turn):
            raise ChatTemplateError(
                f"end-of-turn {end_of_turn!r} does not follow the assistant content; the template writes "
                f"{after[:40]!r}"
            )
        eot_ids = self._encode(end_of_turn)
        if len(eot_ids) != 1:
            raise ChatTemplateError(f"end-of-turn {end_of_turn!r} is not a single token ({eot_ids})")
        self.end_of_turn: str = end_of_turn
        """The text of the token that closes an assistant message."""
        self.end_of_turn_id: int = eot_ids[0]
        """Its id: the stop token of every generation."""
        # The probe rendered up to and including the reply's end-of-turn token: every append renders
        # probe + new messages and keeps what follows this prefix.
        self._probe_prefix = rendered[: cut + len(end_of_turn)]
        self._backend = self._checked_backend(rendered)

    def _checked_backend(self, sample: str) -> Any:
        """The fast tokenizer's backend, if it encodes and decodes ``sample`` as the wrapper does."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or not getattr(self.tokenizer, "is_fast", False):
            return None
        if getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return None  # the wrapper post-processes decoded text
        try:
            ids = backend.encode(sample, add_special_tokens=False).ids
            wrapper_ids = list(self.tokenizer(sample, add_special_tokens=False)["input_ids"])
            same_text = backend.decode(ids, skip_special_tokens=False) == self.tokenizer.decode(
                ids, skip_special_tokens=False
            )
        except Exception:
            return None
        return backend if ids == wrapper_ids and same_text else None

    # --- rendering -------------------------------------------------------------------------------

    def _template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if not isinstance(text, str):
            raise ChatTemplateError(f"apply_chat_template returned {type(text).__name__}, not text")
        return text

    def _encode(self, text: str) -> list[int]:
        # The template already wrote every special token it wants; never add BOS/EOS here.
        if self._backend is not None:
            ids: list[int] = self._backend.encode(text, add_special_tokens=False).ids
            return ids
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Ids of the opening messages followed by the generation prompt (the episode's prompt)."""
        if not messages:
            raise ValueError("render_prompt needs at least one message")
        key = tuple((m.role, m.content) for m in messages)
        ids = self._prompts.get(key)
        if ids is None:
            ids = tuple(self._encode(self._template(_as_dicts(messages), add_generation_prompt=True)))
            self._prompts[key] = ids
            if len(self._prompts) > PROMPT_CACHE_SIZE:
                self._prompts.popitem(last=False)
        else:
            self._prompts.move_to_end(key)
        return list(ids)

    def render_text(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The whole conversation as template text (the re-templating baseline; for tests and benches)."""
        return self._template(_as_dicts(messages), add_generation_prompt=add_generation_prompt)

    def append_messages(self, messages: Sequence[Message]) -> list[int]:
        """Ids of ``messages`` as they follow an assistant reply, plus the next generation prompt
        (with no messages, whatever the template writes between two assistant messages).

        The reply must already end with ``end_of_turn_id`` (see ``missing_end_of_turn``). The text
        is the template's own (delimiters included); it is tokenized on its own, which is exact
        because it starts right after a special token, where no BPE merge can cross.
        """
        if any(m.role == "assistant" for m in messages):
            raise ValueError("assistant text is never appended: the model's sampled ids are the reply")
        key = tuple((m.role, m.content) for m in messages)
        cached = self._appends.get(key)
        if cached is not None:
            self._append_hits += 1
            self._appends.move_to_end(key)
            return list(cached)
        self._append_misses += 1
        full = self._template([*self._probe, *_as_dicts(messages)], add_generation_prompt=True)
        if not full.startswith(self._probe_prefix):
            raise ChatTemplateError(
                "the chat template is not incremental: rendering more messages changed the earlier text"
            )
        ids = self._encode(full[len(self._probe_prefix) :])
        self._appends[key] = tuple(ids)
        if len(self._appends) > APPEND_CACHE_SIZE:
            self._appends.popitem(last=False)
        return ids

    # --- the model's reply -----------------------------------------------------------------------

    def clear_caches(self) -> None:
        """Forget every cached prompt and message (benchmarks time the uncached cost with it)."""
        self._prompts.clear()
        self._appends.clear()

    def cache_statistics(self) -> dict[str, int]:
        """Entries, hits and misses of the tokenization caches (for metrics and benchmarks)."""
        return {
            "prompts": len(self._prompts),
            "appends": len(self._appends),
            "append_hits": self._append_hits,
            "append_misses": self._append_misses,
        }

    def missing_end_of_turn(self, sampled_ids: Sequence[int]) -> tuple[int, ...]:
        """Ids to insert after a reply before new messages: none when it ended with end-of-turn,
        the end-of-turn token when it stopped without (length cap, another stop token)."""
        if sampled_ids and sampled_ids[-1] == self.end_of_turn_id:
            return ()
        return (self.end_of_turn_id,)

    def decode_reply(self, sampled_ids: Sequence[int], *, stopped: bool = False) -> str:
        """The reply text the environment parses: the sampled ids minus their terminator.

        The terminator is the closing end-of-turn, or, when the engine reports that the reply ended
        on a stop token (``stopped``), that last token whatever it is: a model may end a turn with
        another EOS of its generation config (Qwen's ``<|endoftext|>``), and the engine keeps the
        matched stop token in its output. Special tokens elsewhere are kept, so a reply that emits
        them is judged as written.
        """
        ids = list(sampled_ids)
        if ids and (stopped or ids[-1] == self.end_of_turn_id):
            ids.pop()
        decoder = self._backend if self._backend is not None else self.tokenizer
        text: str = decoder.decode(ids, skip_special_tokens=False)
        return text

    def encode_reply(self, text: str) -> list[int]:
        """Ids of a reply text followed by end-of-turn: what a model that wrote ``text`` would sample
        (for scripted engines in tests and benchmarks)."""
        return [*self._encode(text), self.end_of_turn_id]
