"""τ²-bench tasks and domains as plain records, fetched once from the tool worker.

The worker reads them with tau2's own loaders (``tasks.json``, ``split_tasks.json``, policies, tool
schemas from the tool signatures); envtune keeps what its episodes and judge need: the user's
instructions (rendered as tau2 renders them for its user simulator), the evaluation criteria, and the
agent's and user's tool schemas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from envtune.environments.types import FunctionDoc

DOMAINS: tuple[str, ...] = ("retail", "airline", "telecom")
"""The three τ² domains the method's Table 2 reports."""
SPLITS: tuple[str, ...] = ("base", "test", "train")
"""tau2's task splits (``base``: airline 50, retail 114, telecom 114; ``test``: 20, 40, 40)."""
REWARD_BASES: frozenset[str] = frozenset({"DB", "ENV_ASSERTION", "NL_ASSERTION", "ACTION", "COMMUNICATE"})


@dataclass(frozen=True, slots=True)
class Action:
    """A gold action (``evaluation_criteria.actions``)."""

    action_id: str
    requestor: str
    """``assistant`` or ``user`` (telecom's user acts on their phone)."""
    name: str
    arguments: Mapping[str, Any]
    compare_args: tuple[str, ...] | None
    """Arguments compared with a predicted call (None: all of the call's arguments)."""


@dataclass(frozen=True, slots=True)
class EnvAssertion:
    """A check run on the final environment (telecom)."""

    env_type: str
    func_name: str
    arguments: Mapping[str, Any]
    assert_value: bool
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "env_type": self.env_type,
            "func_name": self.func_name,
            "arguments": dict(self.arguments),
            "assert_value": self.assert_value,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class Tau2Task:
    """One τ² task."""

    id: str
    domain: str
    user_instructions: str
    """``str(task.user_scenario)``: what tau2 gives its user simulator inside ``<scenario>``."""
    has_criteria: bool
    """False when the task has no evaluation criteria (tau2 then rewards 1)."""
    reward_basis: tuple[str, ...]
    actions: tuple[Action, ...] = ()
    env_assertions: tuple[EnvAssertion, ...] = ()
    communicate_info: tuple[str, ...] = ()
    nl_assertions: tuple[str, ...] = ()
    has_message_history: bool = False
    """Tasks that start mid-conversation (none in the base splits; not supported by envtune's episode)."""
    env_criteria_absent: bool = False
    """``actions`` and ``env_assertions`` are both null (not merely empty): tau2's environment check then
    passes without comparing databases."""


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """What an agent and a user simulator are given in a domain."""

    domain: str
    policy: str
    tools: tuple[FunctionDoc, ...]
    user_tools: tuple[FunctionDoc, ...]
    """Telecom's user-side tools (empty elsewhere)."""
    user_tool_schemas: tuple[Mapping[str, Any], ...] = ()
    """The same user tools as OpenAI ``tools`` entries, for an LLM user simulator."""
    guidelines: str = ""
    guidelines_with_tools: str = ""
    agent_tool_names: frozenset[str] = field(default_factory=frozenset)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A mutable JSON copy of a frozen value."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def parse_task(domain: str, row: Mapping[str, Any]) -> Tau2Task:
    """A worker ``tasks`` row (tau2's ``Task.model_dump(mode="json")``) as a record."""
    raw = row["task"]
    criteria = raw.get("evaluation_criteria")
    initial = raw.get("initial_state") or {}
    if criteria is None:
        return Tau2Task(
            id=raw["id"],
            domain=domain,
            user_instructions=row["user_instructions"],
            has_criteria=False,
            reward_basis=(),
            has_message_history=bool(initial.get("message_history")),
        )
    basis = tuple(criteria.get("reward_basis") or ())
    unknown = set(basis) - REWARD_BASES
    if unknown:
        raise ValueError(f"task {raw['id']}: unknown reward basis {sorted(unknown)}")
    actions = tuple(
        Action(
            action_id=str(a.get("action_id", "")),
            requestor=a.get("requestor", "assistant"),
            name=a["name"],
            arguments=_freeze(a.get("arguments") or {}),
            compare_args=tuple(a["compare_args"]) if a.get("compare_args") is not None else None,
        )
        for a in criteria.get("actions") or ()
    )
    assertions = tuple(
        EnvAssertion(
            env_type=e["env_type"],
            func_name=e["func_name"],
            arguments=_freeze(e.get("arguments") or {}),
            assert_value=bool(e.get("assert_value", True)),
            message=e.get("message"),
        )
        for e in criteria.get("env_assertions") or ()
    )
    return Tau2Task(
        id=raw["id"],
        domain=domain,
        user_instructions=row["user_instructions"],
        has_criteria=True,
        reward_basis=basis,
        actions=actions,
        env_assertions=assertions,
        communicate_info=tuple(criteria.get("communicate_info") or ()),
        nl_assertions=tuple(criteria.get("nl_assertions") or ()),
        has_message_history=bool(initial.get("message_history")),
        env_criteria_absent=criteria.get("actions") is None and criteria.get("env_assertions") is None,
    )


def _doc(schema: Mapping[str, Any], class_name: str) -> FunctionDoc:
    function = schema["function"]
    return FunctionDoc(
        name=function["name"],
        class_name=class_name,
        description=function.get("description", ""),
        parameters=function.get("parameters", {"type": "object", "properties": {}}),
    )


def parse_domain(domain: str, raw: Mapping[str, Any]) -> DomainInfo:
    """A worker ``domain`` reply as a record."""
    tools = tuple(_doc(schema, f"tau2.{domain}") for schema in raw["tools"])
    user_schemas: Sequence[Mapping[str, Any]] = raw.get("user_tools") or ()
    return DomainInfo(
        domain=domain,
        policy=raw["policy"],
        tools=tools,
        user_tools=tuple(_doc(schema, f"tau2.{domain}.user") for schema in user_schemas),
        user_tool_schemas=tuple(_freeze(dict(schema)) for schema in user_schemas),
        guidelines=raw.get("guidelines", ""),
        guidelines_with_tools=raw.get("guidelines_with_tools", ""),
        agent_tool_names=frozenset(doc.name for doc in tools),
    )
