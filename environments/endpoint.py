"""An OpenAI-compatible chat endpoint: where a simulated user or a judge model is reached.

Its own module (standard library only) because the suite options carry it as a config table
(``envtune-eval``'s ``suites.tau2_user``, ``suites.tau2_judge``), and reading those options must not
import a suite's package. The client that talks to it is ``tau2.user.chat_completion``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """An OpenAI-compatible chat endpoint (user simulator or NL-assertion judge)."""

    base_url: str
    """E.g. ``http://localhost:30000/v1``; ``/chat/completions`` is appended."""
    model: str
    """The ``model`` field of the request."""
    temperature: float = 0.0
    """tau2's default for its user simulator and judge."""
    api_key_env: str | None = None
    """Name of an environment variable holding a bearer token (none: no Authorization header)."""
    timeout_s: float = 120.0
    """Longest wait for one reply."""
    max_tokens: int = 1024
    """Cap on one reply's tokens."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {self.base_url!r}")
        if not self.model:
            raise ValueError("model must be set")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
