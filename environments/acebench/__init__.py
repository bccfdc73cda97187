"""ACEBench agent suite (multi-turn and multi-step) over a user-supplied ACEBench checkout.

No registry package ships ACEBench's data, and its executable scenarios are code of the checkout, so
the user passes the checkout (``--data PATH``); envtune runs its classes in a child process only.
Public names:
"""

from envtune.environments.acebench.data import AceBenchDataError, AceTask, load_layout, load_tasks
from envtune.environments.acebench.environment import AceBenchEnvironment
from envtune.environments.acebench.episode import AceEpisode, AceEpisodeConfig

__all__ = [
    "AceBenchDataError",
    "AceBenchEnvironment",
    "AceEpisode",
    "AceEpisodeConfig",
    "AceTask",
    "load_layout",
    "load_tasks",
]
