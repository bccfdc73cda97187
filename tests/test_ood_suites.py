"""The suite registry: names, listing, options, opening environments (lazily, sharing a τ² worker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from envtune.environments.suites import (
    SUITES,
    SuiteOptions,
    close_shared,
    get_suite,
    listing,
    open_suites,
    suite_names,
)
from envtune.environments.tau2.worker import default_python

FIXTURE = Path(__file__).parent / "fixtures" / "acebench"


def test_the_issue_names_every_suite() -> None:
    assert suite_names() == (
        "bfcl-v3",
        "bfcl-v4-memory-kv",
        "bfcl-v4-memory-vector",
        "bfcl-v4-memory-rec-sum",
        "bfcl-v4-web-search",
        "bfcl-v4-web-search-no-snippet",
        "tau2-retail",
        "tau2-airline",
        "tau2-telecom",
        "acebench-agent",
    )
    text = listing()
    assert all(name in text for name in SUITES) and "make setup-ood" in text
    assert {name for name, info in SUITES.items() if info.blocking_steps} == {
        "tau2-retail",
        "tau2-airline",
        "tau2-telecom",
        "acebench-agent",
    }
    with pytest.raises(KeyError, match="unknown suite 'bfcl-v5'"):
        get_suite("bfcl-v5")


def test_listing_imports_no_suite_package() -> None:
    code = (
        "import sys; import envtune.environments.suites as s; s.listing(); "
        "print(sorted(m for m in sys.modules if any(k in m for k in ('tau2', 'bfcl_v4', 'acebench'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bfcl_v4_suites_open_with_their_options() -> None:
    environments, shared = open_suites(
        ["bfcl-v4-memory-rec-sum", "bfcl-v4-web-search-no-snippet"],
        SuiteOptions(web_search_failure_rate=0.25, seed=7),
    )
    memory, web = environments.values()
    assert memory.suite == "bfcl-v4-memory-rec-sum" and len(memory.tasks()) == 192
    assert sum(t.scored for t in memory.tasks()) == 155
    assert web.failure_rate == 0.25 and web.seed == 7 and len(web.tasks()) == 100
    close_shared(shared)


def test_bad_options_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERPAPI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="SERPAPI_API_KEY"):
        get_suite("bfcl-v4-web-search").open(SuiteOptions(web_search_backend="serpapi"))
    with pytest.raises(ValueError, match="unknown web-search backend"):
        get_suite("bfcl-v4-web-search").open(SuiteOptions(web_search_backend="bing"))
    with pytest.raises(ValueError, match="--data PATH"):
        get_suite("acebench-agent").open(SuiteOptions())
    with pytest.raises(FileNotFoundError):
        get_suite("bfcl-v4-memory-vector").open(SuiteOptions(memory_embedder="/no/such/model"))


def test_acebench_opens_on_a_checkout() -> None:
    environment = get_suite("acebench-agent").open(SuiteOptions(acebench_data=FIXTURE))
    try:
        assert {t.category for t in environment.tasks()} == {"agent_multi_turn", "agent_multi_step"}
    finally:
        environment.close()


@pytest.mark.skipif(not default_python().exists(), reason="needs the OOD extra environment (make setup-ood)")
def test_tau2_suites_share_one_worker() -> None:
    environments, shared = open_suites(["tau2-airline", "tau2-retail"], SuiteOptions(tau2_split="test"))
    try:
        airline, retail = environments.values()
        assert airline.worker is retail.worker is shared["tau2_worker"]
        assert len(airline.tasks()) == 20 and len(retail.tasks()) == 40
    finally:
        close_shared(shared)
