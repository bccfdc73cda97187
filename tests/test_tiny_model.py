"""The tiny local model: deterministic, cached, Qwen2-shaped, with a BFCL-trained tokenizer."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import torch
from envtune.environments.tasks import load_tasks
from envtune.runtime.engines.tiny_model import (
    PROTOCOL_TOKENS,
    SPECIAL_TOKENS,
    TinyModelSpec,
    build_tiny_model,
    fingerprint,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


def test_reuse_leaves_a_complete_build_untouched(tiny_model_dir: Path) -> None:
    marker = tiny_model_dir / "envtune-tiny-model.json"
    before = (marker.stat().st_mtime_ns, (tiny_model_dir / "model.safetensors").stat().st_mtime_ns)
    assert build_tiny_model(tiny_model_dir) == tiny_model_dir
    after = (marker.stat().st_mtime_ns, (tiny_model_dir / "model.safetensors").stat().st_mtime_ns)
    assert before == after
    assert json.loads(marker.read_text())["seed"] == 0


def test_foreign_folder_is_refused_then_overwritten_deterministically(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        build_tiny_model(target)
    assert build_tiny_model(target, overwrite=True) == target
    assert not (target / "notes.txt").exists()
    # Same seed, same spec: byte-identical tokenizer and weights.
    assert fingerprint(target) == fingerprint(tiny_model_dir)
    # No temp build folders left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_build_by_an_older_recipe_is_rebuilt(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A cached build from before a recipe change (the chat template learning function calling) is
    ours and stale: rebuilt in place, not refused as a foreign folder."""
    import shutil

    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    marker = target / "envtune-tiny-model.json"
    payload = json.loads(marker.read_text())
    marker.write_text(json.dumps({**payload, "format_version": payload["format_version"] - 1}))
    (target / "chat_template.jinja").write_text("{{ messages }}")  # what an old recipe left
    assert build_tiny_model(target) == target
    assert json.loads(marker.read_text()) == payload
    assert fingerprint(target) == fingerprint(tiny_model_dir)
    assert "tool_call" in (target / "chat_template.jinja").read_text()


def test_other_seed_of_a_build_is_not_silently_reused(tiny_model_dir: Path) -> None:
    with pytest.raises(FileExistsError):
        build_tiny_model(tiny_model_dir, seed=1)


def test_model_is_qwen2_shaped_and_small(tiny_model_dir: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    spec = TinyModelSpec()
    config = model.config
    assert config.model_type == "qwen2"
    assert config.vocab_size == len(tokenizer)
    assert (config.hidden_size, config.num_hidden_layers) == (spec.hidden_size, spec.num_hidden_layers)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    params = sum(p.numel() for p in model.parameters())
    assert 500_000 < params < 5_000_000
    ids = torch.tensor([tokenizer.encode("<tool_call>ls()</tool_call>")])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_special_and_protocol_tokens(tokenizer) -> None:
    assert [tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS] == [0, 1, 2]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    for tag in PROTOCOL_TOKENS:
        ids = tokenizer.encode(tag)
        assert len(ids) == 1, tag
        assert tag not in tokenizer.all_special_tokens
    text = "<think>go</think><tool_call>[]</tool_call><answer>ok</answer><|im_end|>"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text.removesuffix(
        "<|im_end|>"
    )


def test_every_loader_tokenizes_identically(tiny_model_dir: Path, tokenizer) -> None:
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    fast = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    texts = [q for task in list(load_tasks().values())[::40] for turn in task.questions for q in turn]
    texts.append(
        '<think>a  b\n\n c</think><tool_call>[{"name": "cd", "arguments": {"folder": "d"}}]</tool_call>'
    )
    for text in texts:
        expected = raw.encode(text).ids
        assert tokenizer.encode(text) == expected
        assert fast.encode(text) == expected


def test_bpe_learned_bfcl_vocabulary(tokenizer) -> None:
    # Frequent BFCL words compress well: a BFCL question is far shorter in tokens than in bytes.
    question = next(iter(load_tasks().values())).questions[0][0]
    assert len(tokenizer.encode(question)) < len(question.encode()) / 2.5


def test_chat_template_renders_chatml_with_grouped_tool_results(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "<tool_call>[]</tool_call>"},
        {"role": "tool", "content": '{"a": 1}'},
        {"role": "tool", "content": '{"b": 2}'},
        {"role": "user", "content": "next"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>[]</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"a": 1}\n</tool_response>\n'
        '<tool_response>\n{"b": 2}\n</tool_response><|im_end|>\n'
        "<|im_start|>user\nnext<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert not plain.endswith("<|im_start|>assistant\n")


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_byte_level_round_trip(tokenizer, text: str) -> None:
    # NFC normalisation is part of Qwen2's pipeline: round trips hold for NFC text.
    text = unicodedata.normalize("NFC", text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
