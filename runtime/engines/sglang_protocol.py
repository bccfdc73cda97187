"""SGLang 0.5.23's ``/generate`` contract, checked by envtune's own code, and what it asks of the engine.

The server uses it to refuse what SGLang's contract decoder (``sglang/api/v1/api_types.py``) refuses,
with the same wording: unknown sampling parameters, wrong types, a non-object body. It also refuses
what SGLang itself refuses after decoding (more than one grammar constraint, neither ``text`` nor
``input_ids``) and, with a clear message, what the embedded engine cannot honour (penalties, stop
strings, input logprobs, multimodal data...): those are accepted only at their defaults.

The decoder itself is a test-only judge (downloaded by ``make setup``), never imported here.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from envtune.agents.engine import MAX_SEED, Constraint, ConstraintKind, SamplingParams

_TOP_K_DISABLED = 1 << 30
"""SGLang's ``top_k`` default, meaning "no top-k"."""

_GREEDY_TEMPERATURE = 1e-6
"""Below this temperature SGLang samples greedily (its ``_SAMPLING_EPS``); dividing logits by a
smaller number overflows them to infinity."""


class ContractError(ValueError):
    """The request breaks SGLang's HTTP contract or asks for what this server cannot do (HTTP 400)."""


def _unexpected(value: Any) -> str:
    # serde's `Unexpected` display, as SGLang's decoder words it.
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value}"'
    if isinstance(value, list):
        return "sequence"
    if isinstance(value, dict):
        return "map"
    return type(value).__name__


def _type_error(value: Any, expected: str) -> ContractError:
    return ContractError(f"invalid type: {_unexpected(value)}, expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(value: Any) -> int:
    if not _is_int(value):
        raise _type_error(value, "i64")
    return int(value)


def _uint(value: Any, expected: str = "u64") -> int:
    if not _is_int(value):
        raise _type_error(value, expected)
    if value < 0:
        raise ContractError(f"invalid value: integer `{value}`, expected {expected}")
    return int(value)


def _float(value: Any) -> float:
    if not _is_number(value):
        raise _type_error(value, "f64")
    return float(value)


def expect_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error(value, "a boolean")
    return value


def expect_str(value: Any) -> str:
    if not isinstance(value, str):
        raise _type_error(value, "a string")
    return value


def _seq(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _type_error(value, "a sequence")
    return value


def expect_map(value: Any, expected: str = "a map") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _type_error(value, expected)
    return value


def _token_ids(value: Any) -> list[int]:
    return [_int(item) for item in _seq(value)]


def _token_ids_or_list(value: Any) -> list[int] | list[list[int]]:
    if not isinstance(value, list):
        raise _type_error(value, "a value or an array of values for TokenIdsOrList")
    if not value or _is_number(value[0]):
        return _token_ids(value)
    return [_token_ids(item) for item in value]


def _one_or_list(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [check(item) for item in value]
        return check(value)

    return decode


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def _any(value: Any) -> Any:
    return value


_SAMPLING_FIELDS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    # name: (type check, the value that means "default" for parameters this engine cannot honour)
    "max_new_tokens": (_int, None),
    "stop": (_one_or_list(expect_str), None),
    "stop_token_ids": (_token_ids, None),
    "stop_regex": (_one_or_list(expect_str), None),
    "temperature": (_float, None),
    "top_p": (_float, None),
    "top_k": (_int, None),
    "min_p": (_float, 0.0),
    "frequency_penalty": (_float, 0.0),
    "presence_penalty": (_float, 0.0),
    "repetition_penalty": (_float, 1.0),
    "min_new_tokens": (_int, 0),
    "n": (_int, None),
    "json_schema": (expect_str, None),
    "regex": (expect_str, None),
    "ebnf": (expect_str, None),
    "structural_tag": (expect_str, None),
    "ignore_eos": (expect_bool, False),
    "skip_special_tokens": (expect_bool, None),
    "spaces_between_special_tokens": (expect_bool, None),
    "no_stop_trim": (expect_bool, None),
    "stream_interval": (_int, None),
    "logit_bias": (lambda v: {k: _float(x) for k, x in expect_map(v).items()}, {}),
    "sampling_seed": (_int, None),
    "custom_params": (_any, None),
    "beam_width": (_int, None),
    "watermark": (lambda v: expect_map(v, "struct WatermarkRequestConfig"), None),
    "choice": (lambda v: [expect_str(x) for x in _seq(v)], []),
}
"""SGLang's ``SamplingParams`` fields, in the decoder's order (its unknown-field message lists them)."""

_UNSUPPORTED_SAMPLING = {
    "stop": "stop strings",
    "stop_regex": "stop regexes",
    "min_p": "min_p",
    "frequency_penalty": "penalties",
    "presence_penalty": "penalties",
    "repetition_penalty": "penalties",
    "min_new_tokens": "min_new_tokens",
    "ignore_eos": "ignore_eos",
    "logit_bias": "logit_bias",
    "custom_params": "custom_params",
    "beam_width": "beam search",
    "watermark": "watermarks",
    "choice": "choice",
}
"""Parameters accepted only at their default (``None``/empty counts as default)."""


def _unknown_field(key: str, fields: Sequence[str]) -> ContractError:
    listed = ", ".join(f"`{name}`" for name in fields)
    return ContractError(f"unknown field `{key}`, expected one of {listed}")


@dataclass(frozen=True, slots=True)
class SamplingRequest:
    """A validated ``sampling_params`` object, as the embedded engine will run it."""

    params: SamplingParams
    constraint: Constraint | None
    skip_special_tokens: bool
    no_stop_trim: bool


def parse_sampling_params(value: Any) -> SamplingRequest:
    """Validate one ``sampling_params`` object; raises ``ContractError``."""
    fields = expect_map(value, "struct SamplingParams")
    decoded: dict[str, Any] = {}
    for key, raw in fields.items():
        if key not in _SAMPLING_FIELDS:
            raise _unknown_field(key, tuple(_SAMPLING_FIELDS))
        check, _ = _SAMPLING_FIELDS[key]
        decoded[key] = None if raw is None else check(raw)
    for key, what in _UNSUPPORTED_SAMPLING.items():
        default = _SAMPLING_FIELDS[key][1]
        if decoded.get(key) not in (None, default) and not (
            key in ("stop", "stop_regex") and decoded[key] == []
        ):
            raise ContractError(f"{what} ({key}) is not supported by envtune's embedded engine")
    if decoded.get("beam_width") not in (None, 0, 1):
        raise ContractError("beam search (beam_width) is not supported by envtune's embedded engine")
    constraints = [kind for kind in ConstraintKind if decoded.get(kind.value) is not None]
    if len(constraints) > 1:
        raise ContractError("Only one of regex, json_schema, ebnf, or structural_tag can be set.")
    top_k = decoded.get("top_k")
    if top_k is None or top_k >= _TOP_K_DISABLED:
        top_k = -1
    if top_k == 0 or top_k < -1:
        raise ContractError(f"top_k must be -1 (disabled) or at least 1, got {top_k}.")
    temperature = decoded.get("temperature")
    # Deterministic input errors are refused here, as HTTP 400, before they cost the engine a
    # prefill and come back as a retryable failure (Python's JSON reader accepts NaN and Infinity).
    for key in ("temperature", "top_p"):
        if decoded.get(key) is not None and not math.isfinite(decoded[key]):
            raise ContractError(f"{key} must be a finite number, got {decoded[key]}")
    if temperature is not None and temperature < 0:
        raise ContractError(f"temperature must be >= 0, got {temperature}")
    if temperature is not None and temperature < _GREEDY_TEMPERATURE:
        temperature = 0.0
    seed = decoded.get("sampling_seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ContractError(f"sampling_seed must be in [0, {MAX_SEED}], got {seed}")
    try:
        params = SamplingParams(
            max_new_tokens=128 if decoded.get("max_new_tokens") is None else decoded["max_new_tokens"],
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if decoded.get("top_p") is None else decoded["top_p"],
            top_k=top_k,
            stop_token_ids=tuple(decoded.get("stop_token_ids") or ()),
            n=1 if decoded.get("n") is None else decoded["n"],
            seed=decoded.get("sampling_seed"),
        )
    except ValueError as exc:
        raise ContractError(str(exc)) from exc
    constraint = None
    if constraints:
        constraint = Constraint(constraints[0], decoded[constraints[0].value])
    return SamplingRequest(
        params=params,
        constraint=constraint,
        skip_special_tokens=decoded.get("skip_special_tokens") is not False,
        no_stop_trim=bool(decoded.get("no_stop_trim")),
    )


_IGNORED_FIELDS: dict[str, Callable[[Any], Any]] = {
    # Accepted with their types checked; they do not change what the engine computes.
    "rid": _one_or_list(expect_str),
    "return_text_in_logprobs": expect_bool,
    "routed_dp_rank": _int,
    "disagg_prefill_dp_rank": _int,
    "extra_key": _one_or_list(expect_str),
    "priority": _int,
    "cache_salt": _one_or_list(expect_str),
    "require_reasoning": expect_bool,
    "routing_key": expect_str,
    "session_id": expect_str,
    "custom_labels": lambda v: {k: expect_str(x) for k, x in expect_map(v).items()},
    "return_prompt_token_ids": expect_bool,
    "routed_experts_start_len": _int,
    "bootstrap_host": _one_or_list(_optional(expect_str)),
    "bootstrap_port": _one_or_list(_optional(_int)),
    "bootstrap_room": _one_or_list(_optional(_int)),
    "bootstrap_pair_key": _one_or_list(_optional(expect_str)),
    "decode_tp_size": _one_or_list(_optional(_int)),
    "max_thinking_tokens": _uint,
}


def _truthy(value: Any) -> bool:
    return any(_truthy(item) for item in value) if isinstance(value, list) else bool(value)


_REFUSED_FIELDS: dict[str, tuple[Callable[[Any], Any], str]] = {
    # Type-checked, then accepted only when empty/false/0: the engine cannot produce what they ask for.
    "top_logprobs_num": (_one_or_list(_int), "top logprobs"),
    "token_ids_logprob": (_token_ids_or_list, "token-id logprobs"),
    "return_hidden_states": (_one_or_list(expect_bool), "hidden states"),
    "return_sampling_mask": (_one_or_list(expect_bool), "sampling masks"),
    "image_data": (_any, "images"),
    "video_data": (_any, "video"),
    "audio_data": (_any, "audio"),
    "mm_hashes": (_any, "multimodal hashes"),
    "session_params": (_any, "sessions"),
    "kv_hints": (_any, "KV hints"),
    "custom_logit_processor": (_any, "custom logit processors"),
    "images_config": (_any, "image configs"),
    "modalities": (_any, "modalities"),
}


@dataclass(frozen=True, slots=True)
class ParsedGenerate:
    """A validated ``/generate`` body: one entry per prompt."""

    prompts: tuple[tuple[int, ...], ...]
    """Token ids of each prompt (``text`` is tokenized here)."""
    sampling: tuple[SamplingRequest, ...]
    """Sampling for each prompt."""
    adapters: tuple[str | None, ...]
    """``lora_path`` (an adapter name) for each prompt."""
    rids: tuple[str, ...]
    """Request ids (SGLang's ``rid`` or generated)."""
    return_logprob: bool
    """Whether ``meta_info.output_token_logprobs`` is wanted."""
    return_text_in_logprobs: bool
    """Whether logprob entries carry token text."""
    return_prompt_token_ids: bool
    """Whether responses echo ``prompt_token_ids``."""
    stream: bool
    """SSE streaming."""
    batched: bool
    """The body held a batch (the response is a list even for one prompt)."""
    routing_key: str | None
    """SGLang's ``routing_key``: used as the engine's affinity key (its per-episode prefix cache)."""


def _per_item(value: Any, count: int, name: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != count:
            raise ContractError(f"{name} has {len(value)} entries for {count} prompts")
        return value
    return [value] * count


def _check_text(text: str, max_chars: int | None) -> str:
    if max_chars is not None and len(text) > max_chars:
        raise ContractError(
            f"text has {len(text)} characters, more than this server takes ({max_chars}: the model "
            "context times the characters a token may hold); send input_ids or a shorter text"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ContractError(f"text is not valid Unicode: {exc.reason} at character {exc.start}") from None
    return text


def parse_generate(
    body: Any,
    encode: Callable[[str], list[int]],
    *,
    max_samples: int | None = None,
    max_text_chars: int | None = None,
) -> ParsedGenerate:
    """Validate a ``/generate`` body (``encode`` tokenizes ``text``); raises ``ContractError``.

    ``max_samples`` caps prompts times ``n`` (what the request costs in rows); ``max_text_chars``
    caps each ``text`` before it is tokenized. Both are checked before any work is done.
    """
    try:
        return _parse_generate(body, encode, max_samples, max_text_chars)
    except RecursionError:
        raise ContractError("request body is nested too deeply") from None


def _parse_generate(
    body: Any, encode: Callable[[str], list[int]], max_samples: int | None, max_text_chars: int | None
) -> ParsedGenerate:
    fields = expect_map(body, "struct GenerateRequest")
    for key, check in _IGNORED_FIELDS.items():
        if fields.get(key) is not None:
            check(fields[key])
    for key, (check, what) in _REFUSED_FIELDS.items():
        value = fields.get(key)
        if value is not None and _truthy(check(value)):
            raise ContractError(f"{what} ({key}) are not supported by envtune's embedded engine")
    stream = False if fields.get("stream") is None else expect_bool(fields["stream"])
    input_ids = fields.get("input_ids")
    text = fields.get("text")
    if (input_ids is None) == (text is None):
        raise ContractError("Either text or input_ids should be provided.")
    prompts: list[tuple[int, ...]]
    if input_ids is not None:
        decoded_ids: list[Any] = _token_ids_or_list(input_ids)
        batched = bool(decoded_ids) and isinstance(decoded_ids[0], list)
        prompts = [tuple(ids) for ids in decoded_ids] if batched else [tuple(decoded_ids)]
    else:
        texts = _one_or_list(expect_str)(text)
        batched = isinstance(texts, list)
        text_list = [_check_text(item, max_text_chars) for item in (texts if batched else [texts])]
        if max_samples is not None and len(text_list) > max_samples:
            raise ContractError(f"{len(text_list)} prompts in one request; at most {max_samples}")
        prompts = [tuple(encode(item)) for item in text_list]
    count = len(prompts)
    if count == 0:
        raise ContractError("input_ids is an empty batch")
    if max_samples is not None and count > max_samples:
        raise ContractError(f"{count} prompts in one request; at most {max_samples}")
    raw_sampling = fields.get("sampling_params")
    if raw_sampling is None:
        raw_sampling = {}
    elif not isinstance(raw_sampling, list):
        expect_map(raw_sampling, "a value or an array of values for SamplingParamsOrList")
    sampling = [parse_sampling_params(item) for item in _per_item(raw_sampling, count, "sampling_params")]
    samples = sum(item.params.n for item in sampling)
    if max_samples is not None and samples > max_samples:
        raise ContractError(
            f"the request asks for {samples} sequences (prompts x n); this server takes at most "
            f"{max_samples} per request: split it"
        )
    return_logprob_raw = fields.get("return_logprob")
    return_logprob_each = [
        bool(item)
        for item in _per_item(
            _one_or_list(_optional(expect_bool))(return_logprob_raw), count, "return_logprob"
        )
    ]
    if len(set(return_logprob_each)) > 1:
        raise ContractError("mixed return_logprob values in one batch are not supported")
    start = fields.get("logprob_start_len")
    if start is not None:
        starts = _per_item(_one_or_list(_int)(start), count, "logprob_start_len")
        if any(item != -1 for item in starts) and return_logprob_each[0]:
            raise ContractError("input token logprobs (logprob_start_len >= 0) are not supported; use -1")
    lora = fields.get("lora_path")
    adapters = _per_item(_one_or_list(_optional(expect_str))(lora), count, "lora_path")
    rid = fields.get("rid")
    if rid is None:
        rids = [uuid.uuid4().hex for _ in range(count)]
    else:
        rids = [str(item) for item in _per_item(rid, count, "rid")]
    return ParsedGenerate(
        prompts=tuple(prompts),
        sampling=tuple(sampling),
        adapters=tuple(adapters),
        rids=tuple(rids),
        return_logprob=return_logprob_each[0],
        return_text_in_logprobs=bool(fields.get("return_text_in_logprobs")),
        return_prompt_token_ids=bool(fields.get("return_prompt_token_ids")),
        stream=stream,
        batched=batched,
        routing_key=fields.get("routing_key"),
    )
