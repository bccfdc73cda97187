"""envtune's memory backends against BFCL's own classes (bfcl-eval 2026.3.23 in the OOD extra environment)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from envtune.environments.bfcl_v4.backend_conformance import ReferenceBackends, compare, random_calls
from envtune.environments.bfcl_v4.bm25 import bm25_plus_scores, tokenize
from envtune.environments.tau2.worker import default_python

pytestmark = pytest.mark.skipif(
    not default_python().exists(),
    reason="needs the OOD extra environment (make setup-ood; make test builds it)",
)


@pytest.fixture(scope="module")
def reference() -> Iterator[ReferenceBackends]:
    runner = ReferenceBackends(default_python())
    yield runner
    runner.close()


@pytest.mark.parametrize("backend", ["kv", "rec_sum", "vector"])
def test_random_call_sequences_give_bfcls_results_and_state(
    reference: ReferenceBackends, backend: str
) -> None:
    rng = random.Random(f"backends-{backend}")
    comparisons = [compare(reference, backend, random_calls(backend, rng, 80)) for _ in range(25)]
    assert [c.mismatches[:1] for c in comparisons if not c.agree] == []
    assert all(c.state_equal and c.context_equal for c in comparisons)


def test_comparison_can_fail(reference: ReferenceBackends) -> None:
    """A sequence that hits envtune's one intended deviation (the replace flood bound) is reported."""
    calls = [
        {"name": "memory_update", "arguments": {"text": "a" * 10_000}},
        {"name": "memory_replace", "arguments": {"old_text": "a", "new_text": "b" * 20}},
    ]
    result = compare(reference, "rec_sum", calls)
    assert not result.agree and result.mismatches[0][0] == 1


def test_bm25_scores_are_bfcls_numbers(reference: ReferenceBackends) -> None:
    keys = ["favorite_drink", "drink_order_size", "home_city", "favorite_city_trip", "drink"]
    calls = [{"name": "core_memory_add", "arguments": {"key": k, "value": "v"}} for k in keys]
    calls.append({"name": "core_memory_key_search", "arguments": {"query": "favorite drink city", "k": 5}})
    assert compare(reference, "kv", calls).agree
    scores = bm25_plus_scores([tokenize(k) for k in keys], tokenize("favorite drink city"))
    ranked = [key for _, key in sorted(zip(scores, keys, strict=True), reverse=True)]
    assert set(ranked[:2]) == {"favorite_drink", "favorite_city_trip"}  # two query terms each
