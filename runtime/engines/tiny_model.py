"""A tiny Qwen2-shaped causal LM with random weights and a BPE tokenizer trained on BFCL texts.

It is what tests, the CPU default run and the embedded engine use when no real model is given: the
same architecture family, chat template and protocol tokens as a Qwen instruct model, small enough
to build in seconds and generate hundreds of tokens a second on a laptop CPU. Nothing is downloaded:
the tokenizer is trained locally on BFCL questions, function docs and ground-truth calls.

Chat template: ChatML. ``system``/``user``/``assistant`` render as
``<|im_start|>{role}\\n{content}<|im_end|>\\n``. ``tool`` messages render Qwen2.5-style: a run of
consecutive tool messages becomes ONE ``user`` message whose content is each tool message wrapped in
``<tool_response>\\n...\\n</tool_response>`` (newline separated). ``add_generation_prompt`` appends
``<|im_start|>assistant\\n``. ``<|im_end|>`` is the EOS token; ``<|endoftext|>`` pads. With
function calling (what ``envtune-serve``'s ``/v1/chat/completions`` renders), Qwen2.5's format:

- ``tools`` go into the first system message (the caller's system text first, if any), one JSON
  object per line between ``<tools>`` and ``</tools>``, followed by the instruction to answer with
  ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``;
- an assistant message's ``tool_calls`` render as one such block each, after its content; the
  arguments may be a dict (Hugging Face's convention, rendered with ``tojson``) or a JSON string
  (OpenAI's, rendered as given).

Without tools and tool calls the template is plain ChatML, so envtune's own episodes (tools listed
by the environment's system prompt, calls in the reply text) render exactly as before.

Deliberately left out: any notion of training; the weights are random (seeded) and stay so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Special tokens (skipped by ``skip_special_tokens``), ids 0, 1, 2 in this order."""

PROTOCOL_TOKENS: tuple[str, ...] = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<answer>",
    "</answer>",
    "<tool_response>",
    "</tool_response>",
)
"""Protocol tags, single added tokens that are *not* special, so they survive decoding."""

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
"""Qwen2's pre-tokenizer split (transformers ``models/qwen2/tokenization_qwen2.py``)."""

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


CHAT_TEMPLATE = (
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
"""ChatML with Qwen2.5's rendering of tools, tool calls and tool results (see the module docstring)."""

_MARKER = "envtune-tiny-model.json"
"""Written last into a build: its presence (with matching contents) means the build is complete."""

_FORMAT_VERSION = 2
"""Bump when the build recipe changes, so stale cached builds are not reused."""


@dataclass(frozen=True, slots=True)
class TinyModelSpec:
    """Sizes of the tiny model and its tokenizer."""

    bpe_vocab_size: int = 2048
    """BPE vocabulary incl. the 256 byte symbols and the special tokens (protocol tokens come on top)."""
    hidden_size: int = 128
    """Model width."""
    num_hidden_layers: int = 4
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads (head dim = hidden_size / heads = 32)."""
    num_key_value_heads: int = 2
    """KV heads (grouped-query attention, as in Qwen2)."""
    intermediate_size: int = 256
    """MLP width."""
    max_position_embeddings: int = 32768
    """Longest sequence; BFCL prompts with tool docs run to several thousand tokens with a 2k vocab."""


def default_tiny_model_dir() -> Path:
    """``<repo>/.cache/tiny-model`` (git-ignored), or ``$ENVTUNE_TINY_MODEL_DIR`` when set."""
    override = os.environ.get("ENVTUNE_TINY_MODEL_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / ".cache" / "tiny-model"


def _corpus() -> Iterator[str]:
    """BFCL texts the tokenizer learns from, in a fixed order (so training is deterministic)."""
    from envtune.environments.tasks import load_function_docs, load_tasks

    for doc in load_function_docs().values():
        yield json.dumps(doc.to_json())
        yield json.dumps(doc.to_json(), indent=2)
    for task in load_tasks().values():
        for turn in task.questions:
            yield from turn
        for calls in task.ground_truth:
            yield "\n".join(calls)
            yield "<tool_call>[" + ", ".join(calls) + "]</tool_call>"
    protocol = (
        "<|im_start|>system\nYou are a helpful assistant that can call tools.<|im_end|>\n"
        "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        '<think>I should call the tool.</think><tool_call>[{"name": "cd", "arguments": {"folder": '
        '"document"}}]</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"current_working_directory":'
        ' "document"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>Done.</think>'
        "<answer>The task is complete.</answer><|im_end|>\n"
    )
    for _ in range(20):
        yield protocol


def _train_tokenizer(spec: TinyModelSpec):  # -> PreTrainedTokenizerFast (lazy import keeps startup light)
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    # Exactly Qwen2's normalizer and pre-tokenizer: transformers' AutoTokenizer rebuilds a qwen2
    # model's tokenizer as ``Qwen2Tokenizer`` from vocab + merges with these, and every loader (raw
    # tokenizers, PreTrainedTokenizerFast, AutoTokenizer) must produce the same ids.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.bpe_vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in PROTOCOL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=spec.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_into(folder: Path, spec: TinyModelSpec, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _train_tokenizer(spec)
    tokenizer.save_pretrained(folder)
    eos_ids = [tokenizer.convert_tokens_to_ids(tok) for tok in ("<|im_end|>", "<|endoftext|>")]
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # fork_rng: seeding must not disturb the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    model.save_pretrained(folder, safe_serialization=True)


def _marker_payload(spec: TinyModelSpec, seed: int) -> dict[str, object]:
    return {"format_version": _FORMAT_VERSION, "seed": seed, "spec": asdict(spec)}


def _is_complete(folder: Path, payload: dict[str, object]) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == payload
    except (OSError, json.JSONDecodeError):
        return False


def _is_older_build(folder: Path, payload: dict[str, object]) -> bool:
    """A complete build of the same seed and spec by an older recipe: ours, stale, safe to replace."""
    try:
        found = json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(found, dict) or not isinstance(found.get("format_version"), int):
        return False
    same = {k: v for k, v in found.items() if k != "format_version"}
    wanted = {k: v for k, v in payload.items() if k != "format_version"}
    return same == wanted and found["format_version"] < _FORMAT_VERSION


def build_tiny_model(
    folder: Path, *, seed: int = 0, overwrite: bool = False, spec: TinyModelSpec | None = None
) -> Path:
    """Build (or reuse) the tiny model + tokenizer in ``folder``; returns ``folder``.

    Deterministic for a ``seed`` and ``spec``. A folder that already holds a complete build of the
    same seed and spec is reused as is. The build goes to a temp dir beside ``folder`` and is
    renamed into place, so readers never see half a model. A build of the same seed and spec by an
    older recipe (``_FORMAT_VERSION``) is rebuilt. A folder holding anything else (another seed,
    foreign files) is only replaced with ``overwrite=True``; otherwise ``FileExistsError``.
    """
    folder = Path(folder)
    spec = spec or TinyModelSpec()
    payload = _marker_payload(spec, seed)
    if _is_complete(folder, payload) and not overwrite:
        return folder
    overwrite = overwrite or _is_older_build(folder, payload)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{folder} holds something other than a tiny model with seed={seed} and {spec}; "
            "pass overwrite=True to replace it"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-build-", dir=folder.parent))
    try:
        _build_into(tmp, spec, seed)
        (tmp / _MARKER).write_text(json.dumps(payload, sort_keys=True), encoding="utf-8")
        if folder.exists():
            # Only reached when empty or overwrite=True; a concurrent builder may have won the race.
            if _is_complete(folder, payload) and not overwrite:
                return folder
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:
            # Another process renamed its identical build into place first: use it.
            if _is_complete(folder, payload):
                return folder
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("tiny_model_built", folder=str(folder), seed=seed, fingerprint=fingerprint(folder))
    return folder


def fingerprint(folder: Path) -> str:
    """Short hash of a build's tokenizer and weights (equal builds have equal fingerprints)."""
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "model.safetensors"):
        digest.update((Path(folder) / name).read_bytes())
    return digest.hexdigest()[:16]
