"""BFCL V4 episodes: the protocol, memory across prerequisite conversations, web-search backends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from envtune.environments.bfcl_v4 import MemoryEnvironment, WebSearchEnvironment
from envtune.environments.bfcl_v4.conformance import answer_reply, call_reply, run_prerequisites
from envtune.environments.bfcl_v4.search_backends import (
    FetchError,
    Page,
    RecordedBackend,
    RecordingBackend,
    WebRecording,
)
from envtune.environments.episode import EpisodeConfig, EpisodeStateError
from envtune.environments.suite_api import DependencyError
from envtune.environments.types import FeedbackMode, StepCode, ToolCall

QUESTION = "memory_kv_0-customer-0"
FIRST_PREREQ = "memory_kv_prereq_0-customer-0"


def test_questions_wait_for_their_prerequisite_conversations() -> None:
    env = MemoryEnvironment("kv")
    with pytest.raises(DependencyError, match="memory_kv_prereq_0-customer-0"):
        env.make_episode(QUESTION)
    with pytest.raises(DependencyError):
        env.make_episode("memory_kv_prereq_1-customer-1")
    env.make_episode(FIRST_PREREQ)  # the head of a chain needs nothing


def test_memory_written_in_prerequisites_is_what_the_question_sees() -> None:
    env = MemoryEnvironment("kv")
    first = env.make_episode(FIRST_PREREQ)
    first.start()
    result = first.step(call_reply((ToolCall("core_memory_add", {"key": "first_name", "value": "Michael"}),)))
    assert result.code == StepCode.TOOL_OK
    assert result.calls[0].result == '{"status": "Key-value pair added."}'
    first.close()  # a conversation cut short still hands over its memory, as BFCL flushes at the end
    assert env.snapshot("customer") == {"core_memory": {"first_name": "Michael"}, "archival_memory": {}}
    for task in env.task_map.values():  # the rest of the chain, each conversation answered without tools
        if task.scored or task.scenario != "customer" or env.completed(task.id):
            continue
        episode = env.make_episode(task.id)
        episode.start()
        while not episode.done:
            episode.step(answer_reply("Understood."))
    episode = env.make_episode(QUESTION)
    system, user = episode.start()
    assert '"first_name": "Michael"' in system.content
    assert "Final answer format" in system.content and user.content == "What is my first name?"
    result = episode.step(answer_reply("{'answer': 'Michael', 'context': 'from memory'}"))
    assert result.done and result.code == StepCode.TURN_PASS
    verdict = episode.verdict()
    assert verdict is not None and verdict.passed and verdict.detail["matched"] == "Michael"
    with pytest.raises(EpisodeStateError):
        episode.step(answer_reply("again"))


def test_question_memory_is_private_to_the_episode() -> None:
    env = MemoryEnvironment("rec_sum")
    run_prerequisites(env, "notetaker")
    before = env.snapshot("notetaker")
    question = next(t.id for t in env.task_map.values() if t.scored and t.scenario == "notetaker")
    episode = env.make_episode(question)
    episode.start()
    episode.step(call_reply((ToolCall("memory_clear", {}),)))
    episode.close()
    assert env.snapshot("notetaker") == before and before["memory"]


def test_step_budget_ends_a_question_without_an_answer() -> None:
    env = WebSearchEnvironment("base")
    episode = env.make_episode(
        "web_search_base_0", EpisodeConfig(feedback=FeedbackMode.STANDARD, max_steps_per_turn=3)
    )
    episode.start()
    results = [episode.step("not the format") for _ in range(3)]
    assert [r.code for r in results] == [StepCode.FORMAT_ERROR, StepCode.FORMAT_ERROR, StepCode.TURN_FAIL]
    assert results[-1].done
    verdict = episode.verdict()
    assert (
        verdict is not None and not verdict.passed and verdict.detail["reason"] == "agentic:no_last_message"
    )
    assert episode.score().turn_passed == (False,)


def test_no_snippet_hides_bodies_and_offline_corpus_answers_hops() -> None:
    hop = WebSearchEnvironment("base").task_map["web_search_base_0"].sources[0]
    outputs = {}
    for variant in ("base", "no_snippet"):
        env = WebSearchEnvironment(variant)
        episode = env.make_episode(f"web_search_{variant}_0")
        episode.start()
        result = episode.step(
            call_reply((ToolCall("search_engine_query", {"keywords": hop["subquestion"]}),))
        )
        outputs[variant] = json.loads(result.observation[0].content.split("\n")[1])[0]["result"]
    assert "'body':" in outputs["base"] and "'body':" not in outputs["no_snippet"]
    assert hop["source"].split("#")[0] in outputs["no_snippet"]


def test_injected_failures_are_seeded_and_at_the_configured_rate() -> None:
    url = str(WebSearchEnvironment("base").task_map["web_search_base_1"].sources[0]["source"])
    call = call_reply((ToolCall("fetch_url_content", {"url": url}),))

    def errors(seed: int, rate: float) -> list[bool]:
        env = WebSearchEnvironment("base", failure_rate=rate, seed=seed)
        episode = env.make_episode("web_search_base_1", EpisodeConfig(max_steps_per_turn=50))
        episode.start()
        return [episode.step(call).code == StepCode.TOOL_ERROR for _ in range(40)]

    assert errors(3, 0.5) == errors(3, 0.5)
    assert errors(3, 0.5) != errors(4, 0.5)
    assert 8 <= sum(errors(3, 0.5)) <= 32
    assert not any(errors(3, 0.0)) and all(errors(3, 1.0))


class _FakeLive:
    name = "fake-live"

    def search(self, keywords: str, region: str) -> list[dict[str, str]]:
        return [{"title": f"About {keywords}", "link": "https://example.org/a", "snippet": "snippet"}]

    def fetch(self, url: str) -> Page:
        if "missing" in url:
            raise FetchError(f"404 Client Error: Not Found for url: {url}")
        return Page(url=url, body="<html><body><p>live page</p><script>x()</script></body></html>")


def test_a_recording_replays_what_the_live_backend_said(tmp_path: Path) -> None:
    recorder = RecordingBackend(_FakeLive(), tmp_path / "rec.json")
    live = recorder.search("Eiffel tower height", "wt-wt")
    page = recorder.fetch("https://example.org/a")
    with pytest.raises(FetchError):
        recorder.fetch("https://example.org/missing")
    replay = RecordedBackend(WebRecording.load(recorder.save()))
    assert replay.search("  eiffel  TOWER height ", "wt-wt") == live
    assert replay.fetch("https://example.org/a#section").body == page.body
    with pytest.raises(FetchError, match="404"):
        replay.fetch("https://example.org/missing")
    env = WebSearchEnvironment("base", backend=replay)
    episode = env.make_episode("web_search_base_2")
    episode.start()
    result = episode.step(
        call_reply((ToolCall("fetch_url_content", {"url": "https://example.org/a", "mode": "truncate"}),))
    )
    assert "live page" in result.observation[0].content and "x()" not in result.observation[0].content


def test_augmented_feedback_adds_schema_hints_to_refused_calls() -> None:
    env = MemoryEnvironment("kv")
    episode = env.make_episode(
        FIRST_PREREQ, EpisodeConfig(feedback=FeedbackMode.AUGMENTED, max_steps_per_turn=20)
    )
    episode.start()
    result = episode.step(call_reply((ToolCall("core_memory_ad", {"key": "a", "value": "b"}),)))
    assert result.code == StepCode.TOOL_ERROR
    assert "core_memory_add" in result.calls[0].hint
