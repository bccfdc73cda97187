"""BFCL V4 verdicts agree with BFCL's own checker (bfcl-eval 2026.3.23), task by task."""

from __future__ import annotations

import pytest
from envtune.environments.bfcl_v4 import MemoryEnvironment, WebSearchEnvironment, check_answer
from envtune.environments.bfcl_v4.conformance import (
    environment_agreements,
    judge_bfcl,
    plans_for,
    reference_checker,
    summary,
)
from envtune.environments.bfcl_v4.data import memory_tasks, web_search_tasks
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize("backend", ["kv", "vector", "rec_sum"])
def test_memory_every_task_and_perturbation_agrees(backend: str) -> None:
    items = list(environment_agreements(MemoryEnvironment(backend)))
    result = summary(items)
    assert result["tasks"] == 155
    assert result["ground_truth_pass_envtune"] == result["ground_truth_pass_bfcl"] == 155
    disagreements = [
        (a.plan.task_id, a.plan.kind, a.envtune_reason, a.bfcl_reason) for a in items if not a.agree
    ]
    assert disagreements == []
    # The perturbations are not vacuous: most of them fail under both judges.
    failing = {a.plan.kind for a in items if not a.bfcl_pass}
    assert {"wrong_answer", "glued_answer", "no_answer", "empty_answer", "refusal"} <= failing
    assert sum(not a.bfcl_pass for a in items) > 4 * 155


@pytest.mark.parametrize("variant", ["base", "no_snippet"])
def test_web_search_every_task_replays_and_agrees(variant: str) -> None:
    """Ground truth on all 100 tasks (search each hop, read its page, answer); perturbations on 25
    (the full perturbed set runs in benchmarks/ood_conformance.py)."""
    env = WebSearchEnvironment(variant)
    truth = list(environment_agreements(env, perturbed=False))
    assert len(truth) == 100 and all(a.agree and a.envtune_pass for a in truth)
    perturbed = list(environment_agreements(env, limit=25))
    assert all(a.agree for a in perturbed)
    assert {a.plan.kind for a in perturbed if not a.bfcl_pass} >= {"wrong_answer", "cut_answer", "no_answer"}


def test_ids_and_dependencies_follow_bfcl() -> None:
    tasks = memory_tasks("kv")
    questions = [t for t in tasks.values() if t.scored]
    prereqs = [t for t in tasks.values() if not t.scored]
    assert len(questions) == 155 and len(prereqs) == 37
    first = tasks["memory_kv_0-customer-0"]
    chain = [t.id for t in prereqs if t.scenario == "customer"]
    assert first.depends_on == tuple(chain) and chain[0] == "memory_kv_prereq_0-customer-0"
    assert tasks[chain[3]].depends_on == tuple(chain[:3])
    assert set(web_search_tasks("no_snippet")) == {f"web_search_no_snippet_{i}" for i in range(100)}


_answers = st.text(alphabet=st.sampled_from("ab1 ,.-_*^()'\"xyZ"), min_size=1, max_size=8)


@settings(max_examples=400, deadline=None)
@given(
    response=st.text(alphabet=st.sampled_from("ab1 ,.-_*^()'\"xyZ\n"), max_size=40),
    answers=st.lists(_answers, min_size=1, max_size=3),
)
def test_answer_rule_matches_bfcl_checker_on_arbitrary_text(response: str, answers: list[str]) -> None:
    reference = reference_checker().agentic_checker(response, answers)["valid"] if response else False
    assert check_answer(response, tuple(answers)).passed == reference


def test_reference_judge_sees_only_the_last_non_call_message() -> None:
    task = memory_tasks("rec_sum")["memory_rec_sum_0-customer-0"]
    plans = {p.kind: p for p in plans_for(task, "rec_sum", __import__("random").Random(0), ["Paris"])}
    assert judge_bfcl(task, plans["ground_truth"]) == (True, "valid")
    assert judge_bfcl(task, plans["no_answer"]) == (False, "agentic:no_last_message")
    assert judge_bfcl(task, plans["empty_answer"]) == (False, "agentic:no_last_message")
    assert judge_bfcl(task, plans["wrong_answer"]) == (False, "agentic:answer_not_found")
