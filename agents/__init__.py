"""Agents: the engine contract, chat messages to tokens, the reply grammar, the token-in/token-out
episode loop and the trajectories it produces. Standard library only at import time (the grammar
imports xgrammar when it composes one; the chat tokenizer wraps a tokenizer it is given)."""

from envtune.agents.chat_tokens import ChatTemplateError, ChatTokenizer
from envtune.agents.config import AgentConfig, SamplingConfig
from envtune.agents.engine import (
    Completion,
    Constraint,
    ConstraintKind,
    Engine,
    EngineError,
    EngineUnavailable,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    WeightSync,
)
from envtune.agents.episode_loop import EpisodeLike, run_episode, run_episode_sync
from envtune.agents.grammar import (
    ConstraintCache,
    GrammarOptions,
    SchemaError,
    bfcl_to_json_schema,
    reply_constraint,
    reply_grammar,
    tool_calls_json_schema,
)
from envtune.agents.trajectory import ConstraintSpan, Trajectory

__all__ = [
    "AgentConfig",
    "ChatTemplateError",
    "ChatTokenizer",
    "Completion",
    "Constraint",
    "ConstraintCache",
    "ConstraintKind",
    "ConstraintSpan",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "EpisodeLike",
    "FinishReason",
    "GenerateRequest",
    "GrammarOptions",
    "SamplingConfig",
    "SamplingParams",
    "SchemaError",
    "Trajectory",
    "WeightSync",
    "bfcl_to_json_schema",
    "reply_constraint",
    "reply_grammar",
    "run_episode",
    "run_episode_sync",
    "tool_calls_json_schema",
]
