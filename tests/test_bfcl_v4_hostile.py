"""Hostile tool calls into the BFCL V4 environments: error observations, bounded state, nothing run."""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from envtune.environments.bfcl_v4 import MemoryEnvironment, WebSearchEnvironment
from envtune.environments.bfcl_v4.conformance import call_reply
from envtune.environments.bfcl_v4.memory_rec_sum import MAX_REPLACED_MEMORY_CHARS
from envtune.environments.bfcl_v4.web_search import MAX_RESULTS_CAP
from envtune.environments.episode import EpisodeConfig
from envtune.environments.tool_calls import MAX_REPLY_CHARS
from envtune.environments.types import StepCode, ToolCall

CONFIG = EpisodeConfig(max_steps_per_turn=10_000)


def _episode(env, task_id: str):
    episode = env.make_episode(task_id, CONFIG)
    episode.start()
    return episode


def _step(episode, *calls: ToolCall):
    return episode.step(call_reply(calls))


@pytest.fixture
def tripwires(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Arm (after set-up) tripwires: fail loudly if a step opens files, runs processes or evaluates text."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"executed something it must not: {args!r}")

    def arm() -> None:
        for module, name in (
            (os, "system"),
            (os, "popen"),
            (builtins, "open"),
            (builtins, "eval"),
            (builtins, "exec"),
        ):
            monkeypatch.setattr(module, name, forbidden)

    return arm


@pytest.mark.parametrize("backend", ["kv", "vector", "rec_sum"])
@pytest.mark.parametrize(
    "name",
    [
        "_load",
        "_export",
        "_context_dump",
        "__init__",
        "__class__",
        "_core",
        "_memory",
        "eval",
        "open",
        "__dict__",
    ],
)
def test_private_and_unknown_names_are_refused(
    backend: str, name: str, tripwires: Callable[[], None]
) -> None:
    env = MemoryEnvironment(backend)
    episode = _episode(env, "memory_" + backend + "_prereq_0-customer-0")
    tripwires()
    result = _step(episode, ToolCall(name, {"snapshot": {"memory": "x"}}))
    assert result.code == StepCode.TOOL_ERROR
    assert not result.calls[0].executed
    assert result.calls[0].result.startswith("Error during execution: No function named")


def test_path_like_keys_write_no_file(tripwires: Callable[[], None]) -> None:
    env = MemoryEnvironment("kv")
    episode = _episode(env, "memory_kv_prereq_0-customer-0")
    tripwires()
    for key in ("../../etc/passwd", "/tmp/pwned", "a/b", "..", "C:\\x"):
        result = _step(episode, ToolCall("archival_memory_add", {"key": key, "value": "x"}))
        assert (
            result.calls[0].result
            == '{"error": "Key must be in snake_case format and cannot contain spaces."}'
        )
    episode.close()
    assert env.snapshot("customer") == {"core_memory": {}, "archival_memory": {}}


def test_huge_arguments_are_refused_before_parsing_or_by_the_backend() -> None:
    env = MemoryEnvironment("kv")
    episode = _episode(env, "memory_kv_prereq_0-customer-0")
    too_big = call_reply((ToolCall("archival_memory_add", {"key": "k", "value": "v" * MAX_REPLY_CHARS}),))
    assert episode.step(too_big).code == StepCode.FORMAT_ERROR
    result = _step(episode, ToolCall("archival_memory_add", {"key": "k", "value": "v" * 200_000}))
    assert "Entry is too long" in result.calls[0].result
    result = _step(episode, ToolCall("archival_memory_key_search", {"query": "q " * 50_000, "k": 10**18}))
    assert result.code == StepCode.TOOL_ERROR  # an empty memory: BFCL's BM25 reports a division by zero
    episode.close()
    assert env.snapshot("customer") == {"core_memory": {}, "archival_memory": {}}


def test_memory_floods_stay_within_the_limits() -> None:
    for backend, add in (
        ("kv", lambda i: ToolCall("archival_memory_add", {"key": f"k_{i}", "value": "x" * 2000})),
        ("vector", lambda i: ToolCall("archival_memory_add", {"text": f"entry {i} " + "x" * 1990})),
    ):
        env = MemoryEnvironment(backend)
        episode = _episode(env, f"memory_{backend}_prereq_0-customer-0")
        results = [_step(episode, *(add(64 * j + i) for i in range(64))) for j in range(4)]
        errors = sum(not c.ok for r in results for c in r.calls)
        assert errors == 4 * 64 - 50  # the archival memory holds 50 entries
        episode.close()
        snapshot = env.snapshot("customer")
        stored = snapshot["archival_memory"] if backend == "kv" else snapshot["archival_memory"]["store"]
        assert len(stored) == 50


def test_recursive_summary_replace_cannot_explode_the_memory() -> None:
    env = MemoryEnvironment("rec_sum")
    episode = _episode(env, "memory_rec_sum_prereq_0-customer-0")
    _step(episode, ToolCall("memory_update", {"text": "a" * 10_000}))
    result = _step(episode, ToolCall("memory_replace", {"old_text": "a", "new_text": "b" * 10_000}))
    assert result.code == StepCode.TOOL_ERROR and "limit is" in result.calls[0].result
    result = _step(episode, ToolCall("memory_replace", {"old_text": "", "new_text": "b" * 100}))
    assert result.code == StepCode.TOOL_ERROR
    episode.close()
    assert len(env.snapshot("customer")["memory"]) == 10_000 <= MAX_REPLACED_MEMORY_CHARS


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://example.org/x", "javascript:alert(1)", "/etc/passwd", "../secrets", ""],
)
def test_web_fetch_refuses_non_http_urls(url: str, tripwires: Callable[[], None]) -> None:
    episode = _episode(WebSearchEnvironment("base"), "web_search_base_0")
    tripwires()
    result = _step(episode, ToolCall("fetch_url_content", {"url": url}))
    assert result.code == StepCode.TOOL_ERROR
    assert result.calls[0].result.startswith("Error during execution: Invalid URL")


def test_web_fetch_of_unrecorded_or_local_hosts_is_a_404_offline(tripwires: Callable[[], None]) -> None:
    episode = _episode(WebSearchEnvironment("base"), "web_search_base_0")
    tripwires()
    for url in (
        "http://127.0.0.1:22/",
        "http://169.254.169.254/latest/meta-data/",
        "https://localhost/../../x",
    ):
        result = _step(episode, ToolCall("fetch_url_content", {"url": url, "mode": "markdown"}))
        assert "404 Client Error" in json.loads(result.calls[0].result)["error"]


def test_web_search_results_are_capped_and_bad_modes_are_errors() -> None:
    episode = _episode(WebSearchEnvironment("base"), "web_search_base_0")
    result = _step(
        episode, ToolCall("search_engine_query", {"keywords": "the of in a to " * 200, "max_results": 10**9})
    )
    assert result.code == StepCode.TOOL_OK and result.calls[0].result.count("'href'") <= MAX_RESULTS_CAP
    result = _step(episode, ToolCall("fetch_url_content", {"url": "https://example.org", "mode": "exec"}))
    assert result.code == StepCode.TOOL_ERROR and not result.calls[0].executed  # the doc's enum refuses it


def test_no_snapshot_file_is_ever_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    from envtune.environments.bfcl_v4.conformance import run_prerequisites

    env = MemoryEnvironment("kv")
    run_prerequisites(env, "notetaker")
    assert list(tmp_path.iterdir()) == []
    assert env.snapshot("notetaker")["archival_memory"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/",
        "http://localhost/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::1]/",
    ],
)
def test_live_fetches_never_reach_local_or_private_hosts(url: str) -> None:
    from envtune.environments.bfcl_v4.search_backends import FetchError, HttpFetcher

    with pytest.raises(FetchError, match="non-public address"):
        HttpFetcher(timeout_s=1).fetch(url)
