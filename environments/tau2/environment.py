"""The τ²-bench suites (retail, airline, telecom): tasks, episodes, and the gold-state cache.

``Tau2Environment`` owns (or shares) a ``Tau2Worker``, loads a domain's policy, tools and a split's
tasks from it once, and builds ``Tau2Episode``s. The gold databases of a task — its initial state with
the gold actions replayed the way tau2's evaluator replays them (``make_tool_call``, no sync, errors
ignored) — are hashed once per task and cached, so judging a conversation costs one hash of the final
state instead of tau2's two fresh environments and full replays.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from envtune.environments.suite_api import SuiteTask, TaskVerdict
from envtune.environments.tau2.data import DOMAINS, DomainInfo, Tau2Task, parse_domain, parse_task, thaw
from envtune.environments.tau2.episode import Tau2Episode, Tau2EpisodeConfig
from envtune.environments.tau2.judge import STOP_REASONS, EnvFacts, judge
from envtune.environments.tau2.nl_judge import judge_nl_assertions
from envtune.environments.tau2.user import EndpointConfig, OpenAIUserSimulator, UserSimulator
from envtune.environments.tau2.worker import Tau2Worker, WorkerError

UserFactory = Callable[[Tau2Task], UserSimulator]


def suite_name(domain: str) -> str:
    return f"tau2-{domain}"


class Tau2Environment:
    """Episodes of one τ² domain and split."""

    def __init__(
        self,
        domain: str,
        *,
        split: str = "base",
        user: UserSimulator | UserFactory | EndpointConfig | None = None,
        judge: EndpointConfig | None = None,
        worker: Tau2Worker | None = None,
        config: Tau2EpisodeConfig | None = None,
    ) -> None:
        if domain not in DOMAINS:
            raise ValueError(f"unknown τ² domain {domain!r}; expected one of {DOMAINS}")
        self.domain = domain
        self.split = split
        self.suite = suite_name(domain)
        self.judge = judge
        self.config = config or Tau2EpisodeConfig()
        self._owns_worker = worker is None
        self.worker = worker or Tau2Worker()
        self._user = user
        self.info: DomainInfo = parse_domain(domain, self.worker.request("domain", domain=domain))
        rows = self.worker.request("tasks", domain=domain, split=split)
        self.task_map: Mapping[str, Tau2Task] = MappingProxyType(
            {row["id"]: parse_task(domain, row) for row in rows}
        )
        self._gold: dict[str, tuple[str | None, str | None]] = {}
        self._gold_lock = threading.Lock()
        self._sessions = itertools.count()

    def tasks(self) -> tuple[SuiteTask, ...]:
        return tuple(SuiteTask(id=task.id, category=self.domain) for task in self.task_map.values())

    def user_for(self, task: Tau2Task) -> UserSimulator:
        user = self._user
        if user is None:
            raise ValueError(
                f"{self.suite} needs a user simulator: an OpenAI-compatible endpoint (EndpointConfig) "
                "or a script"
            )
        if isinstance(user, EndpointConfig):
            return OpenAIUserSimulator(user)
        if hasattr(user, "reply"):
            return user  # type: ignore[return-value]
        return user(task)

    def make_episode(
        self, task_id: str, config: Tau2EpisodeConfig | None = None, *, user: UserSimulator | None = None
    ) -> Tau2Episode:
        try:
            task = self.task_map[task_id]
        except KeyError:
            raise KeyError(f"unknown task id {task_id!r} in {self.suite} ({self.split} split)") from None
        if "NL_ASSERTION" in task.reward_basis and self.judge is None:
            raise ValueError(
                f"task {task_id} is scored on NL assertions: configure a judge endpoint to run it"
            )
        session = f"{self.suite}:{task_id}:{next(self._sessions)}"
        return Tau2Episode(
            self, task, self.info, user or self.user_for(task), config or self.config, session, self.judge
        )

    def gold_hashes(self, task: Tau2Task) -> tuple[str | None, str | None]:
        """The databases after the gold actions (computed once per task)."""
        with self._gold_lock:
            cached = self._gold.get(task.id)
        if cached is not None:
            return cached
        session = f"{self.suite}:gold:{task.id}:{next(self._sessions)}"
        self.worker.open_session(session, self.domain, task.id)
        try:
            for index, action in enumerate(task.actions):
                self.worker.call(
                    session,
                    action.name,
                    thaw(action.arguments),
                    requestor=action.requestor,
                    call_id=f"gold{index}",
                    sync=False,
                )
            hashes = self.worker.request("hash", session=session)
        finally:
            self.worker.close_session(session)
        result = (hashes["agent"], hashes["user"])
        with self._gold_lock:
            self._gold[task.id] = result
        return result

    def environment_facts(self, task: Tau2Task, session: str) -> EnvFacts:
        """Final-state hashes and env-assertion results of an open session, with the gold hashes."""
        hashes: Mapping[str, Any] = self.worker.request("hash", session=session)
        assertions: tuple[bool, ...] = ()
        if task.env_assertions:
            assertions = tuple(
                self.worker.request(
                    "assert", session=session, assertions=[a.to_json() for a in task.env_assertions]
                )
            )
        return EnvFacts(
            predicted_hashes=(hashes["agent"], hashes["user"]),
            gold_hashes=self.gold_hashes(task),
            assertions=assertions,
        )

    def judge_conversation(
        self,
        task: Tau2Task,
        session: str,
        messages: Sequence[Mapping[str, Any]],
        termination: str,
        judge_endpoint: EndpointConfig | None = None,
    ) -> TaskVerdict:
        """tau2's reward for a conversation whose final state is the open ``session`` (see judge.py)."""
        facts = None
        nl = None
        try:
            if termination in STOP_REASONS and task.has_criteria:
                if {"DB", "ENV_ASSERTION"} & set(task.reward_basis):
                    facts = self.environment_facts(task, session)
                if "NL_ASSERTION" in task.reward_basis and judge_endpoint is not None:
                    nl = judge_nl_assertions(judge_endpoint, messages, task.nl_assertions)
            return judge(task, messages, termination, facts, nl, suite=self.suite)
        except WorkerError as exc:
            return TaskVerdict(
                task_id=task.id,
                suite=self.suite,
                category=task.domain,
                passed=False,
                reward=0.0,
                detail={"termination_reason": termination, "error": f"environment check failed: {exc}"},
            )

    def close(self) -> None:
        if self._owns_worker:
            self.worker.close()
