"""ACEBench scenario worker: runs in a child process with an ACEBench checkout on ``PYTHONPATH``.

The checkout's scenario classes (its phone platform, food delivery, travel APIs) are ACEBench's code;
envtune never imports them into its own process. This script imports them here and executes calls
the way ACEBench's executor does (its behaviour, written for envtune):

- a session holds one instance per involved class, each given its own initial config and then the
  ``BaseApi`` one (every scenario class inherits ``BaseApi``);
- a call goes to *every* instance that has a public method of that name, in class order, and the
  last result is the call's result (so ``turn_on_wifi`` turns Wi-Fi on everywhere);
- a name no instance has is skipped silently;
- results are rendered as BFCL's executor does (strings as they are, dicts as JSON, else ``str``).

Requests are JSON lines (``{"id", "op", ...}``) answered with ``{"id", "ok", "result"|"error"}``. It imports
no envtune module. ``op_reference_check`` runs the checkout's own ``model_eval.checker.agent_checker``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import traceback
from typing import Any


def _render(value: Any) -> str:
    if type(value) is str:
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


class Worker:
    def __init__(self) -> None:
        self.sessions: dict[str, tuple[list[tuple[str, Any]], dict[str, tuple[str, ...]]]] = {}

    def op_hello(self) -> dict[str, Any]:
        return {"python": sys.version.split()[0]}

    def op_open(
        self,
        session: str,
        modules: dict[str, str],
        involved_classes: list[str],
        initial_config: dict[str, Any],
        saved_attributes: dict[str, list[str]],
    ) -> bool:
        instances = []
        for class_name in involved_classes:
            cls = getattr(importlib.import_module(modules[class_name]), class_name)
            instance = cls()
            instance._load_scenario(json.loads(json.dumps(initial_config.get(class_name, {}))))
            instance._load_scenario(json.loads(json.dumps(initial_config.get("BaseApi", {}))))
            instances.append((class_name, instance))
        self.sessions[session] = (instances, {k: tuple(v) for k, v in saved_attributes.items()})
        return True

    def op_call(self, session: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        instances, _ = self.sessions[session]
        targets = [
            instance
            for _, instance in instances
            if not name.startswith("_") and inspect.ismethod(getattr(instance, name, None))
        ]
        if not targets:
            return {"executed": False, "result": None, "error": None}
        result: Any = None
        for instance in targets:
            try:
                result = getattr(instance, name)(**arguments)
            except Exception as exc:
                return {"executed": True, "result": None, "error": str(exc)}
        return {"executed": True, "result": _render(result), "error": None}

    def op_state(self, session: str) -> list[dict[str, Any]]:
        """Each instance's compared attributes, through JSON as ACEBench's result files hold them."""
        instances, saved = self.sessions[session]
        state = [
            {name: {k: v for k, v in vars(instance).items() if k in saved.get(name, ())}}
            for name, instance in instances
        ]
        return json.loads(json.dumps(state, default=str))

    def op_close(self, session: str) -> bool:
        return self.sessions.pop(session, None) is not None

    def op_reference_check(
        self, model_output: dict[str, Any], possible_answer: dict[str, Any]
    ) -> dict[str, Any]:
        from model_eval.checker import agent_checker

        return agent_checker(model_output, possible_answer)


def main() -> int:
    worker = Worker()
    out = sys.stdout
    sys.stdout = sys.stderr  # a print in scenario code must not corrupt the protocol stream
    for line in sys.stdin:
        request_id = None
        try:
            request = json.loads(line)
            request_id = request.pop("id", None)
            handler = getattr(worker, "op_" + str(request.pop("op")))
            reply: dict[str, Any] = {"id": request_id, "ok": True, "result": handler(**request)}
        except Exception as exc:
            reply = {
                "id": request_id,
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(limit=3),
            }
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
