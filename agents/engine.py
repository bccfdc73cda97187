"""The engine contract the agent calls: token ids in, sampled token ids and their logprobs out.

Every inference backend (``envtune.runtime.engines``: the embedded transformers engine, the SGLang
HTTP client) implements ``Engine``, and those that take new weights implement ``WeightSync``. The
episode loop and the runtime only ever see these protocols and records, which is why they live here,
below the runtime, in the standard library only.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class ConstraintKind(enum.StrEnum):
    """Grammar constraint kinds, named as SGLang's sampling parameters name them."""

    EBNF = "ebnf"
    JSON_SCHEMA = "json_schema"
    STRUCTURAL_TAG = "structural_tag"
    REGEX = "regex"


@dataclass(frozen=True, slots=True)
class Constraint:
    """One grammar constraint for a generation (at most one per request, as in SGLang)."""

    kind: ConstraintKind
    """Which SGLang sampling parameter carries it."""
    grammar: str
    """The grammar text: EBNF, a JSON schema string, a structural-tag JSON string, or a regex."""


MAX_SEED = (1 << 63) - 1
"""Largest sampling seed: a 64-bit signed integer, what torch generators and SGLang take."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling parameters, a subset of SGLang's ``SamplingParams`` with the same meaning."""

    max_new_tokens: int = 256
    """Upper bound on generated tokens."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = -1
    """-1 disables top-k."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation stops after any of these tokens (the stop token is kept in the output)."""
    n: int = 1
    """Samples per prompt (a whole GRPO group in one request)."""
    seed: int | None = None
    """Sampling seed (SGLang's ``sampling_seed``), for reproducible tests."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        # NaN passes every comparison, and an infinite temperature divides logits into NaN.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")


class FinishReason(enum.StrEnum):
    """Why a generation ended (SGLang's ``meta_info.finish_reason.type``)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class Completion:
    """One sampled continuation of one prompt."""

    token_ids: tuple[int, ...]
    """Exactly the token ids the engine sampled (never re-tokenized)."""
    logprobs: tuple[float, ...]
    """Logprob of each sampled token under the sampling policy (behaviour logprobs)."""
    finish_reason: FinishReason
    """Why generation ended."""
    policy_version: int
    """Version of the weights (adapter) that produced these tokens."""
    prompt_tokens: int = 0
    """Prompt length as the engine saw it."""
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (SGLang reports it; the embedded engine may not)."""


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """What the runtime asks of an engine."""

    prompt_ids: tuple[int, ...]
    """The full token history (token-in)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Sampling parameters; ``sampling.n`` completions come back."""
    constraint: Constraint | None = None
    """Optional grammar constraint."""
    adapter: str | None = None
    """Name of a loaded LoRA adapter (SGLang's ``lora_path``), or None for the current policy."""
    affinity_key: str | None = None
    """Requests with the same key go to the same replica (episode affinity, prefix-cache reuse)."""


class EngineError(RuntimeError):
    """An engine failed to serve a request; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class EngineUnavailable(EngineError):
    """The engine is gone: nothing answered for longer than its client's outage limit, or it cannot
    be reached at all (a bad URL). Unlike other ``EngineError``s it is not one episode's failure:
    whoever runs many episodes stops the run with this error instead of dropping them one by one."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@runtime_checkable
class Engine(Protocol):
    """Any inference backend."""

    async def generate(self, request: GenerateRequest) -> Sequence[Completion]:
        """``request.sampling.n`` completions of ``request.prompt_ids``; raises ``EngineError``."""
        ...

    async def close(self) -> None:
        """Release connections, threads and models."""
        ...


@runtime_checkable
class WeightSync(Protocol):
    """What the learner's publisher calls to put new weights into an engine (SGLang's weight-sync
    endpoints).

    Versions travel explicitly: the caller says which policy version an adapter or a checkpoint
    holds, and a completion reports the version of the adapter it used (or of the base weights when
    it used none). An engine never derives a version from a name.
    """

    @property
    def policy_version(self) -> int:
        """The highest version published so far (base weights or any adapter; never decreases)."""
        ...

    async def load_adapter(self, name: str, path: str, *, version: int) -> None:
        """Load the LoRA adapter folder ``path`` (peft layout) under ``name``, holding policy ``version``."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Unload a LoRA adapter."""
        ...

    async def update_weights_from_disk(self, path: str, *, version: int) -> None:
        """Replace the base weights with the checkpoint at ``path``, holding policy ``version``."""
        ...

    async def flush_cache(self) -> None:
        """Drop any prefix cache (after a weight change the cached KV is stale)."""
        ...
