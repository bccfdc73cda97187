"""BFCL V3 multi-turn environments: tasks, episodes, actionable feedback and progress rewards.

Knows nothing of agents, runtime or optim. Public names:
"""

from envtune.environments.api import Feedback, ToolSession
from envtune.environments.episode import (
    EVAL_MAX_STEPS_PER_TURN,
    TRAIN_MAX_STEPS_PER_TURN,
    BfclEnvironment,
    Episode,
    EpisodeConfig,
    EpisodeStateError,
)
from envtune.environments.tasks import CATEGORIES, Split, Task, load_function_docs, load_split, load_tasks
from envtune.environments.types import (
    CallOutcome,
    EpisodeScore,
    FeedbackMode,
    FunctionDoc,
    Message,
    PromptStyle,
    RewardKind,
    StepCode,
    StepResult,
    ToolCall,
    ToolFault,
    ToolListing,
)

__all__ = [
    "CATEGORIES",
    "EVAL_MAX_STEPS_PER_TURN",
    "TRAIN_MAX_STEPS_PER_TURN",
    "BfclEnvironment",
    "CallOutcome",
    "Episode",
    "EpisodeConfig",
    "EpisodeScore",
    "EpisodeStateError",
    "Feedback",
    "FeedbackMode",
    "FunctionDoc",
    "Message",
    "PromptStyle",
    "RewardKind",
    "Split",
    "StepCode",
    "StepResult",
    "Task",
    "ToolCall",
    "ToolFault",
    "ToolListing",
    "ToolSession",
    "load_function_docs",
    "load_split",
    "load_tasks",
]
