"""The evaluation suites by name: what ``envtune-eval --suite NAME`` (and ``--suite list``) offers.

One ``SuiteInfo`` per suite: its name, family, metric, what it needs installed, whether its episode
steps block on the network or a child process (τ²'s user simulator and tool worker; a runner then
calls ``step`` in a thread), and how to open its environment from ``SuiteOptions``. Opening imports
the suite's package only then, so listing suites costs nothing. ``open_suites`` opens several at once
and lets the τ² suites share one tool worker.

BFCL V3 (``bfcl-v3``) is listed for completeness; its environment is ``episode.BfclEnvironment``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from envtune.environments.endpoint import EndpointConfig

if TYPE_CHECKING:
    from envtune.environments.tau2.worker import Tau2Worker


@dataclass(frozen=True, slots=True)
class SuiteOptions:
    """Settings of the out-of-distribution suites (one record for all; each suite reads its part).

    ``envtune-eval`` takes this record unchanged as its ``suites`` config section
    (``--set suites.tau2_split=test``); ``extra`` is not a config key.
    """

    seed: int = 0
    """Seeds injected web failures (per task)."""
    web_search_backend: str = "recorded"
    """``recorded`` (offline; the annotation corpus unless ``web_search_recording`` is given), ``serpapi``
    (BFCL's service; needs a key and network) or ``duckduckgo`` (the ``duckduckgo_search`` package)."""
    web_search_recording: Path | None = None
    """An ``envtune-web-recording/1`` file for the recorded backend."""
    serpapi_key_env: str = "SERPAPI_API_KEY"
    """Environment variable holding the SerpAPI key (BFCL's name for it)."""
    web_search_failure_rate: float = 0.0
    """Probability that a successful page fetch is answered with an injected network error (BFCL's
    class can; the paper evaluates with failures, the 2026.3.23 package ships them off)."""
    memory_embedder: str = "hashing"
    """``hashing`` (offline, not MiniLM) or the path of a local sentence-transformers model folder."""
    tau2_split: str = "base"
    """tau2 split: ``base`` (airline 50, retail 114, telecom 114) or ``test`` (20, 40, 40; the split the
    paper's Table 2 figures correspond to)."""
    tau2_user: EndpointConfig | None = None
    """The user simulator's OpenAI-compatible endpoint (required to run τ², and ACEBench's multi-turn
    tasks, against a model); a table: base_url, model, temperature, ..."""
    tau2_judge: EndpointConfig | None = None
    """Optional judge endpoint for NL assertions (without it, tasks scored on them are refused)."""
    tau2_python: Path | None = None
    """Python of the OOD extra environment (none: ``.cache/ood-venv/bin/python``)."""
    acebench_data: Path | None = None
    """An ACEBench checkout (data and scenario classes), for ``acebench-agent`` (``--data PATH``)."""
    extra: Mapping[str, Any] = field(default_factory=dict, metadata={"config": False})
    """Test hooks (e.g. ``tau2_user_factory``); not a user setting and not a config key."""


@dataclass(frozen=True, slots=True)
class SuiteInfo:
    """One suite of the registry."""

    name: str
    family: str
    """``bfcl-v3``, ``bfcl-v4``, ``tau2`` or ``acebench``."""
    metric: str
    """What its accuracy means."""
    description: str
    needs: str
    """What must be installed or configured."""
    blocking_steps: bool
    """True when ``step`` may wait on a network call or a child process (run it in a thread)."""
    opener: Callable[[SuiteOptions, dict[str, Any]], Any]
    """(options, shared resources) -> environment; use ``open`` instead."""

    def open(self, options: SuiteOptions | None = None, shared: dict[str, Any] | None = None) -> Any:
        return self.opener(options or SuiteOptions(), shared if shared is not None else {})


def _open_bfcl_v3(options: SuiteOptions, shared: dict[str, Any]) -> Any:
    from envtune.environments.episode import BfclEnvironment

    return BfclEnvironment()


def _memory(backend: str) -> Callable[[SuiteOptions, dict[str, Any]], Any]:
    def open_memory(options: SuiteOptions, shared: dict[str, Any]) -> Any:
        from envtune.environments.bfcl_v4.embeddings import HashingEmbedder, SentenceTransformerEmbedder
        from envtune.environments.bfcl_v4.memory_env import MemoryEnvironment

        embedder = (
            HashingEmbedder()
            if options.memory_embedder == "hashing"
            else SentenceTransformerEmbedder(Path(options.memory_embedder))
        )
        return MemoryEnvironment(backend, embedder=embedder)

    return open_memory


def _web_search(variant: str) -> Callable[[SuiteOptions, dict[str, Any]], Any]:
    def open_web_search(options: SuiteOptions, shared: dict[str, Any]) -> Any:
        import os

        from envtune.environments.bfcl_v4 import search_backends as sb
        from envtune.environments.bfcl_v4.web_search_env import WebSearchEnvironment

        backend: Any = None
        if options.web_search_backend == "recorded":
            if options.web_search_recording is not None:
                backend = sb.RecordedBackend(sb.WebRecording.load(options.web_search_recording))
        elif options.web_search_backend == "serpapi":
            key = os.environ.get(options.serpapi_key_env, "")
            if not key:
                raise ValueError(f"the serpapi web-search backend needs ${options.serpapi_key_env}")
            backend = sb.SerpApiBackend(key)
        elif options.web_search_backend == "duckduckgo":
            backend = sb.DuckDuckGoBackend()
        else:
            raise ValueError(
                f"unknown web-search backend {options.web_search_backend!r}; "
                "expected recorded, serpapi or duckduckgo"
            )
        return WebSearchEnvironment(
            variant, backend=backend, failure_rate=options.web_search_failure_rate, seed=options.seed
        )

    return open_web_search


def _tau2(domain: str) -> Callable[[SuiteOptions, dict[str, Any]], Any]:
    def open_tau2(options: SuiteOptions, shared: dict[str, Any]) -> Any:
        from envtune.environments.tau2.environment import Tau2Environment
        from envtune.environments.tau2.worker import Tau2Worker

        worker: Tau2Worker | None = shared.get("tau2_worker")
        if worker is None:
            worker = shared["tau2_worker"] = Tau2Worker(options.tau2_python)
        user = options.extra.get("tau2_user_factory") or options.tau2_user
        return Tau2Environment(
            domain, split=options.tau2_split, user=user, judge=options.tau2_judge, worker=worker
        )

    return open_tau2


def _acebench(options: SuiteOptions, shared: dict[str, Any]) -> Any:
    from envtune.environments.acebench.environment import AceBenchEnvironment

    if options.acebench_data is None:
        raise ValueError(
            "needs --data PATH (suites.acebench_data): an ACEBench checkout (data_all/ and model_inference/)"
        )
    return AceBenchEnvironment(options.acebench_data, user=options.tau2_user, extra=options.extra)


_BFCL_V4_NEEDS = "the bfcl-eval 2026.3.23 data asset (make setup)"
_TAU2_NEEDS = "the OOD extra environment (make setup-ood) and a user-simulator endpoint"


def _registry() -> Mapping[str, SuiteInfo]:
    suites = [
        SuiteInfo(
            "bfcl-v3",
            "bfcl-v3",
            "per-turn BFCL checker, all turns pass",
            "BFCL V3 multi-turn (base, miss_func, miss_param, long_context)",
            "bfcl-eval 2025.6.13 (make setup)",
            False,
            _open_bfcl_v3,
        ),
    ]
    for backend, label in (("kv", "key-value"), ("vector", "vector"), ("rec_sum", "recursive summarization")):
        suites.append(
            SuiteInfo(
                "bfcl-v4-memory-" + backend.replace("_", "-"),
                "bfcl-v4",
                "possible answer in the final message (BFCL agentic checker)",
                f"BFCL V4 memory, {label} backend: 155 questions after 37 prerequisite conversations",
                _BFCL_V4_NEEDS,
                False,
                _memory(backend),
            )
        )
    for variant, label in (("base", "snippets shown"), ("no_snippet", "snippets hidden")):
        suites.append(
            SuiteInfo(
                "bfcl-v4-web-search" + ("" if variant == "base" else "-no-snippet"),
                "bfcl-v4",
                "possible answer in the final message (BFCL agentic checker)",
                f"BFCL V4 web search, {label}: 100 multi-hop questions",
                _BFCL_V4_NEEDS + "; network and a key for live backends",
                False,
                _web_search(variant),
            )
        )
    for domain in ("retail", "airline", "telecom"):
        suites.append(
            SuiteInfo(
                f"tau2-{domain}",
                "tau2",
                "tau2 reward = 1 (DB/env assertions x actions x communicated info); pass^k over trials",
                f"tau2-bench {domain} with a simulated user",
                _TAU2_NEEDS,
                True,
                _tau2(domain),
            )
        )
    suites.append(
        SuiteInfo(
            "acebench-agent",
            "acebench",
            "end state equals the ground truth (ACEBench agent checker); process accuracy reported",
            "ACEBench agent: multi-turn (simulated user) and multi-step",
            "an ACEBench checkout given with --data; a user-simulator endpoint for multi-turn",
            True,
            _acebench,
        )
    )
    return MappingProxyType({suite.name: suite for suite in suites})


SUITES: Mapping[str, SuiteInfo] = _registry()
"""Every suite by name, in listing order."""


def suite_names() -> tuple[str, ...]:
    return tuple(SUITES)


def get_suite(name: str) -> SuiteInfo:
    try:
        return SUITES[name]
    except KeyError:
        raise KeyError(f"unknown suite {name!r}; known: {', '.join(SUITES)}") from None


def open_suites(
    names: Sequence[str], options: SuiteOptions | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Environments of several suites sharing resources (one τ² worker); close them, then the shared.

    Returns (name -> environment, shared resources). ``close_shared`` releases the shared ones.
    """
    shared: dict[str, Any] = {}
    opened: dict[str, Any] = {}
    try:
        for name in names:
            opened[name] = get_suite(name).open(options, shared)
    except BaseException:
        for environment in opened.values():
            environment.close()
        close_shared(shared)
        raise
    return opened, shared


def close_shared(shared: Mapping[str, Any]) -> None:
    worker: Tau2Worker | None = shared.get("tau2_worker")
    if worker is not None:
        worker.close()


def listing() -> str:
    """What ``--suite list`` prints."""
    width = max(len(name) for name in SUITES)
    return "\n".join(
        f"{info.name.ljust(width)}  {info.description}  [needs: {info.needs}]" for info in SUITES.values()
    )
