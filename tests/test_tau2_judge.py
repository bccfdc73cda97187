"""envtune's τ² reward rules, on hand-made conversations (no worker needed)."""

from __future__ import annotations

import pytest
from envtune.environments.tau2.data import Action, EnvAssertion, Tau2Task
from envtune.environments.tau2.judge import EnvFacts, NlResult, action_matches, judge
from envtune.environments.tau2.metrics import compute_metrics, pass_hat_k

SAME = EnvFacts(predicted_hashes=("a", None), gold_hashes=("a", None), assertions=())
DIFFERENT = EnvFacts(predicted_hashes=("b", None), gold_hashes=("a", None), assertions=())


def _task(**kwargs: object) -> Tau2Task:
    fields: dict[str, object] = {
        "id": "t",
        "domain": "retail",
        "user_instructions": "",
        "has_criteria": True,
        "reward_basis": ("DB", "COMMUNICATE"),
    }
    fields.update(kwargs)
    return Tau2Task(**fields)  # type: ignore[arg-type]


def _said(text: str) -> list[dict[str, object]]:
    return [
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": text},
    ]


def test_only_a_stop_earns_a_reward() -> None:
    task = _task()
    for reason in ("max_steps", "too_many_errors", "user_error", "agent_error"):
        verdict = judge(task, _said("x"), reason, SAME, suite="s")
        assert verdict.reward == 0.0 and not verdict.passed and "prematurely" in verdict.detail["note"]
    assert judge(task, _said("x"), "user_stop", SAME, suite="s").passed
    assert judge(task, _said("x"), "agent_stop", SAME, suite="s").passed


def test_components_multiply_over_the_reward_basis() -> None:
    task = _task(communicate_info=("1234.50",))
    assert judge(task, _said("Your refund is 1234.50 dollars"), "user_stop", SAME, suite="s").reward == 1.0
    # tau2 drops the message's commas (not the info's) and ignores case
    assert judge(task, _said("Your REFUND is 1,234.50"), "user_stop", SAME, suite="s").reward == 1.0
    assert judge(task, _said("Your refund is 1234,5"), "user_stop", SAME, suite="s").reward == 0.0
    assert judge(task, _said("refund 1234.50"), "user_stop", DIFFERENT, suite="s").reward == 0.0
    db_only = _task(reward_basis=("DB",), communicate_info=("never said",))
    assert judge(db_only, _said("nothing"), "user_stop", SAME, suite="s").reward == 1.0


def test_action_matching_uses_compare_args() -> None:
    action = Action("0", "assistant", "book", {"id": "A", "note": "x"}, ("id",))
    assert action_matches(action, {"name": "book", "arguments": {"id": "A", "note": "other"}})
    assert not action_matches(action, {"name": "book", "arguments": {"id": "B", "note": "x"}})
    assert not action_matches(action, {"name": "cancel", "arguments": {"id": "A"}})
    strict = Action("1", "assistant", "book", {"id": "A"}, None)  # all of the *call's* arguments
    assert not action_matches(strict, {"name": "book", "arguments": {"id": "A", "extra": 1}})
    assert action_matches(strict, {"name": "book", "arguments": {"id": "A"}})
    anything = Action("2", "assistant", "book", {"id": "A"}, ())
    assert action_matches(anything, {"name": "book", "arguments": {"id": "Z"}})


def test_env_assertions_compare_with_their_expected_value() -> None:
    assertions = (
        EnvAssertion("user", "airplane_mode_on", {}, False),
        EnvAssertion("user", "has_service", {}, True),
    )
    task = _task(reward_basis=("ENV_ASSERTION",), env_assertions=assertions, actions=())
    facts = EnvFacts(("a", "u"), ("x", "y"), assertions=(False, True))
    assert judge(task, _said(""), "user_stop", facts, suite="s").reward == 1.0  # DB is not in the basis
    facts = EnvFacts(("a", "u"), ("a", "u"), assertions=(True, True))
    assert judge(task, _said(""), "user_stop", facts, suite="s").reward == 0.0


def test_null_env_criteria_skip_the_database_check() -> None:
    task = _task(reward_basis=("DB",), env_criteria_absent=True)
    assert judge(task, _said(""), "user_stop", DIFFERENT, suite="s").reward == 1.0
    assert judge(_task(reward_basis=("DB",)), _said(""), "user_stop", DIFFERENT, suite="s").reward == 0.0


def test_nl_assertions_need_a_judge_and_name_it() -> None:
    task = _task(reward_basis=("NL_ASSERTION",), nl_assertions=("agent apologised",))
    verdict = judge(task, _said("sorry"), "user_stop", None, suite="s")
    assert not verdict.passed and "no judge endpoint" in verdict.detail["error"]
    verdict = judge(task, _said("sorry"), "user_stop", None, NlResult((True,), "m at http://j"), suite="s")
    assert verdict.passed and verdict.detail["nl_judge"] == "m at http://j"


def test_no_criteria_means_reward_one() -> None:
    assert judge(_task(has_criteria=False), [], "agent_stop", None, suite="s").reward == 1.0


def test_pass_hat_k_and_averages() -> None:
    assert pass_hat_k(4, 2, 1) == 0.5 and pass_hat_k(4, 2, 2) == 1 / 6 and pass_hat_k(4, 1, 2) == 0.0
    with pytest.raises(ValueError):
        pass_hat_k(2, 1, 3)
    metrics = compute_metrics([("a", 1.0), ("a", 0.0), ("b", 1.0), ("b", 1.0), ("c", 1.0)])
    assert metrics.pass_hat == {1: (0.5 + 1.0 + 1.0) / 3}  # k stops at the fewest trials (task c: 1)
    assert metrics.average_reward == 0.8 and metrics.tasks == 3
