"""τ² episodes on tau2's own domains (the worker in the OOD extra environment) vs tau2's evaluator."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import pytest
from envtune.environments.tau2.conformance import (
    agreements,
    plan_from_actions,
    play,
    reference_reward,
    summary,
)
from envtune.environments.tau2.environment import Tau2Environment
from envtune.environments.tau2.episode import Tau2EpisodeConfig
from envtune.environments.tau2.metrics import pass_hat_k
from envtune.environments.tau2.user import EndpointConfig, OpenAIUserSimulator, ScriptedUser, UserReply
from envtune.environments.tau2.worker import Tau2Worker, WorkerLost, default_python
from envtune.environments.types import StepCode

pytestmark = pytest.mark.skipif(
    not default_python().exists(),
    reason="needs the OOD extra environment (make setup-ood; make test builds it)",
)


@pytest.fixture(scope="module")
def worker() -> Iterator[Tau2Worker]:
    shared = Tau2Worker()
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def retail(worker: Tau2Worker) -> Tau2Environment:
    return Tau2Environment("retail", worker=worker)


def _reply(calls: list[dict[str, Any]]) -> str:
    return f"<think>x</think><tool_call>{json.dumps(calls)}</tool_call>"


@pytest.mark.parametrize("domain", ["retail", "airline", "telecom"])
def test_sampled_tasks_agree_with_tau2_under_every_perturbation(worker: Tau2Worker, domain: str) -> None:
    """One task per domain in CI (the first with three or more gold actions, one of them a write) and
    four perturbations; benchmarks/ood_conformance.py replays every task and perturbation of every split."""
    env = Tau2Environment(domain, worker=worker)
    reads = ("get_", "search_", "list_", "find_", "calculate", "think")
    task = next(
        t
        for t in env.task_map.values()
        if len(t.actions) >= 3 and any(not a.name.startswith(reads) for a in t.actions)
    )
    kinds = ("drop_action", "wrong_argument", "withhold_info", "too_many_errors")
    items = list(agreements(env, seed=1, task_ids=[task.id], kinds=kinds))
    result = summary(items)
    assert result["agreement"] == 1.0, [
        (a.plan.kind, a.plan.task_id, a.envtune_reward, a.reference_reward) for a in items if not a.agree
    ]
    assert result["ground_truth_reward1_envtune"] == result["ground_truth_reward1_tau2"] == 1
    failing = {a.plan.kind for a in items if a.reference_reward == 0.0}  # non-vacuous: tau2 fails these too
    assert "too_many_errors" in failing and failing & {"drop_action", "wrong_argument"}


@pytest.mark.slow
@pytest.mark.parametrize("domain", ["retail", "airline", "telecom"])
def test_every_task_ground_truth_agrees(worker: Tau2Worker, domain: str) -> None:
    env = Tau2Environment(domain, worker=worker)
    items = list(agreements(env, perturbed=False))
    assert len(items) == len(env.task_map) and all(a.agree and a.envtune_reward == 1.0 for a in items)


def test_unbounded_calculations_and_huge_arguments_never_reach_tau2(retail: Tau2Environment) -> None:
    episode = retail.make_episode("0", user=ScriptedUser([UserReply(text="hi")]))
    episode.start()
    for expression in ("9**9**9**9", "(" * 40 + "1" + ")" * 40, "1+" * 200 + "1"):
        result = episode.step(_reply([{"name": "calculate", "arguments": {"expression": expression}}]))
        assert result.code == StepCode.TOOL_ERROR and not result.calls[0].executed
        assert "envtune refused" in result.calls[0].result
    result = episode.step(
        _reply(
            [
                {
                    "name": "find_user_id_by_name_zip",
                    "arguments": {"first_name": "x" * 70_000, "last_name": "y", "zip": "1"},
                }
            ]
        )
    )
    assert "envtune refused" in result.calls[0].result
    result = episode.step(_reply([{"name": "calculate", "arguments": {"expression": "(2 + 3) * 4 / 3"}}]))
    assert result.code == StepCode.TOOL_OK and result.calls[0].result == "6.67"
    assert [
        m.get("tool_calls", [{}])[0].get("name") for m in episode.trajectory() if m.get("tool_calls")
    ] == ["calculate"]
    episode.close()


def test_unknown_tools_get_tau2s_own_error_and_errors_end_the_conversation(retail: Tau2Environment) -> None:
    episode = retail.make_episode(
        "0", Tau2EpisodeConfig(max_errors=3), user=ScriptedUser([UserReply(text="hi")])
    )
    episode.start()
    for _ in range(3):
        result = episode.step(_reply([{"name": "__init__", "arguments": {}}]))
    assert result.calls[0].result == "Error: Tool '__init__' not found."
    assert result.done and episode.termination_reason == "too_many_errors"
    verdict = episode.verdict()
    assert verdict is not None and verdict.reward == 0.0
    assert reference_reward(retail, "0", episode.trajectory(), "too_many_errors") == 0.0


def test_a_hung_tool_restarts_the_worker_and_open_sessions_survive(retail: Tau2Environment) -> None:
    worker = Tau2Worker()
    try:
        worker.open_session("s", "retail", "0")
        initial = worker.request("hash", session="s")
        task = retail.task_map["0"]
        for index, action in enumerate(task.actions):
            worker.call(
                "s",
                action.name,
                json.loads(json.dumps(dict(action.arguments))),
                requestor="assistant",
                call_id=str(index),
            )
        written = worker.request("hash", session="s")
        assert written != initial
        with pytest.raises(WorkerLost, match="did not answer"):
            worker.call(
                "s",
                "calculate",
                {"expression": "9**9**9**9"},
                requestor="assistant",
                call_id="x",
                timeout_s=3,
            )
        assert worker.restarts == 1
        assert worker.request("hash", session="s") == written  # rebuilt by replaying the logged calls
    finally:
        worker.close()


def test_a_dead_user_endpoint_ends_the_conversation_as_a_user_error(retail: Tau2Environment) -> None:
    config = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="nobody", timeout_s=2)
    episode = retail.make_episode("0", user=OpenAIUserSimulator(config))
    messages = episode.start()
    assert episode.done and episode.termination_reason == "user_error" and messages[-1].role == "assistant"
    verdict = episode.verdict()
    assert verdict is not None and verdict.reward == 0.0 and "nobody" in verdict.detail["user_simulator"]


class _FakeChat(BaseHTTPRequestHandler):
    replies: ClassVar[list[dict[str, Any]]] = []
    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        payload = json.dumps({"choices": [{"message": type(self).replies.pop(0)}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def test_an_openai_compatible_user_acts_on_its_phone_and_speaks(
    worker: Tau2Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    telecom = Tau2Environment("telecom", worker=worker)
    task = next(iter(telecom.task_map.values()))
    _FakeChat.requests = []
    _FakeChat.replies = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "check_status_bar", "arguments": "{}"}}
            ],
        },
        {"role": "assistant", "content": "My phone shows no signal."},
        {"role": "assistant", "content": "Thanks! ###STOP###"},
    ]
    server = HTTPServer(("127.0.0.1", 0), _FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("ENVTUNE_TEST_TOKEN", "secret")
    try:
        config = EndpointConfig(
            base_url=f"http://127.0.0.1:{server.server_port}/v1",
            model="user-model",
            temperature=0.3,
            api_key_env="ENVTUNE_TEST_TOKEN",
        )
        env = Tau2Environment("telecom", worker=worker, user=config)
        episode = env.make_episode(task.id)
        messages = episode.start()
        assert messages[-1].content == "My phone shows no signal."
        result = episode.step("<think>x</think><answer>Please restart. ###STOP###</answer>")
        assert result.done and episode.termination_reason == "agent_stop"
    finally:
        server.shutdown()
    first, second = _FakeChat.requests[:2]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer secret"
    assert first["body"]["model"] == "user-model" and first["body"]["temperature"] == 0.3
    system = first["body"]["messages"][0]
    assert (
        system["role"] == "system"
        and "<scenario>" in system["content"]
        and task.user_instructions in system["content"]
    )
    assert first["body"]["messages"][1] == {"role": "user", "content": "Hi! How can I help you today?"}
    assert {t["function"]["name"] for t in first["body"]["tools"]} >= {"check_status_bar"}
    assert (
        second["body"]["messages"][-1]["role"] == "tool"
        and "check_status_bar" not in second["body"]["messages"][-1]["content"]
    )
    trajectory = episode.trajectory()
    assert trajectory[1]["tool_calls"][0]["requestor"] == "user" and trajectory[2]["requestor"] == "user"


def test_pass_hat_k_is_tau2s(worker: Tau2Worker) -> None:
    for n in range(1, 6):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_hat_k(n, c, k) == worker.request("pass_hat_k", num_trials=n, success_count=c, k=k)


def test_ground_truth_plan_really_executes_the_gold_actions(retail: Tau2Environment) -> None:
    task = retail.task_map["0"]
    reward, termination, messages, detail = play(
        retail, plan_from_actions(task, list(task.actions), "ground_truth")
    )
    calls = [c["name"] for m in messages if m.get("tool_calls") for c in m["tool_calls"]]
    assert calls == [a.name for a in task.actions] and termination == "user_stop"
    assert reward == 1.0 and detail["db_match"] is True


def test_the_worker_uses_the_constructors_tau2s_registry_registers(worker: Tau2Worker) -> None:
    expected = {"retail": True, "airline": True, "telecom": True}
    assert worker.request("registry_check", timeout_s=600) == expected
