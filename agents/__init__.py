"""Agents: chat messages to tokens, the reply grammar, and the token-in/token-out episode loop."""

from envtune.agents.chat_tokens import ChatTemplateError, ChatTokenizer
from envtune.agents.config import AgentConfig, RewardKind
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
from envtune.agents.trajectory import Trajectory

__all__ = [
    "AgentConfig",
    "ChatTemplateError",
    "ChatTokenizer",
    "ConstraintCache",
    "EpisodeLike",
    "GrammarOptions",
    "RewardKind",
    "SchemaError",
    "Trajectory",
    "bfcl_to_json_schema",
    "reply_constraint",
    "reply_grammar",
    "run_episode",
    "run_episode_sync",
    "tool_calls_json_schema",
]
