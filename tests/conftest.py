"""Shared test set-up: the tiny local model and its tokenizer, chat renderer and grammar compiler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from envtune.agents.chat_tokens import ChatTokenizer
from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Entry points configure structlog for the process; no test may leak that into the next."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny Qwen2-shaped model with its BPE tokenizer (built once, then reused)."""
    return build_tiny_model(default_tiny_model_dir())


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def chat(tokenizer: Any) -> ChatTokenizer:
    return ChatTokenizer(tokenizer)


@pytest.fixture(scope="session")
def grammar_compiler(tokenizer: Any) -> Any:
    """An xgrammar compiler for the tiny tokenizer, ``<|im_end|>`` as the stop token."""
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=len(tokenizer), stop_token_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")]
    )
    return xgrammar.GrammarCompiler(info, max_threads=1)
