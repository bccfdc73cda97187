"""Inference engines: the ``Engine`` protocol, the embedded transformers engine, the SGLang client,
SGLang's ``/generate`` contract, and the SGLang-protocol server that serves the embedded engine."""

from envtune.runtime.engines.base import (
    ADAPTER_NAME_PREFIX,
    Completion,
    Constraint,
    ConstraintKind,
    Engine,
    EngineError,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    WeightSync,
    adapter_name,
    adapter_version,
)
from envtune.runtime.engines.embedded import (
    EmbeddedEngine,
    EmbeddedEngineConfig,
    EngineStatistics,
    TokenEvent,
)
from envtune.runtime.engines.sglang_client import (
    ClientStatistics,
    EndpointStatistics,
    SGLangClient,
    SGLangClientConfig,
)
from envtune.runtime.engines.sglang_protocol import ContractError, ParsedGenerate, parse_generate
from envtune.runtime.engines.sglang_server import SGLangProtocolServer

__all__ = [
    "ADAPTER_NAME_PREFIX",
    "ClientStatistics",
    "Completion",
    "Constraint",
    "ConstraintKind",
    "ContractError",
    "EmbeddedEngine",
    "EmbeddedEngineConfig",
    "EndpointStatistics",
    "Engine",
    "EngineError",
    "EngineStatistics",
    "FinishReason",
    "GenerateRequest",
    "ParsedGenerate",
    "SGLangClient",
    "SGLangClientConfig",
    "SGLangProtocolServer",
    "SamplingParams",
    "TokenEvent",
    "WeightSync",
    "adapter_name",
    "adapter_version",
    "parse_generate",
]
