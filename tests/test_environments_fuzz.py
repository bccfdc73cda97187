"""The tool-call fuzz in CI: a few thousand hostile cases, 0 crashes, 0 escapes; and its checks can fail.

``benchmarks/fuzz_tools.py`` runs the same harness on >= 100,000 cases.
"""

from __future__ import annotations

import builtins

import pytest
from envtune.environments import BfclEnvironment
from envtune.environments import episode as episode_module
from envtune.environments.fuzzing import FAMILIES, Target, ToolCallFuzzer, run_fuzz
from envtune.environments.instances import Dispatcher
from envtune.environments.tripwires import Tripwires
from envtune.environments.types import ToolFault

ENV = BfclEnvironment()


@pytest.fixture(scope="module")
def report():
    return run_fuzz(2500, seed=7, env=ENV)


def test_fuzz_finds_no_crash_and_no_escape(report) -> None:
    assert report.crashes == 0, report.crash_examples
    assert report.escapes == 0, report.escape_examples
    assert report.cases == 2500


def test_fuzz_reaches_the_dispatcher_and_every_family(report) -> None:
    """The cases are not all refused at the parser: many run, some meet each kind of bound."""
    assert set(report.families) == set(FAMILIES)
    assert report.executed_calls > 1000
    for fault in (ToolFault.LIMIT, ToolFault.RAISED, ToolFault.TRUNCATED):
        assert report.faults.get(str(fault), 0) > 0, report.faults
    assert report.episodes > 30


def test_fuzz_is_deterministic_for_a_seed() -> None:
    episode = ENV.make_episode("multi_turn_base_0")
    episode.start()
    target = Target(episode.visible_tools(), (), ("power",))
    fuzzer_a, fuzzer_b = ToolCallFuzzer(3), ToolCallFuzzer(3)
    cases = [fuzzer_a.case(target) for _ in range(200)]
    assert cases == [fuzzer_b.case(target) for _ in range(200)]
    assert cases != [ToolCallFuzzer(4).case(target) for _ in range(200)]


def test_fuzz_counts_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    original = episode_module.protocol.tool_feedback

    def broken_feedback(outcomes):  # breaks on refused calls only (the warm-up replays ground truth)
        if any(outcome.fault is ToolFault.LIMIT for outcome in outcomes):
            raise RuntimeError("feedback broke")
        return original(outcomes)

    monkeypatch.setattr(episode_module.protocol, "tool_feedback", broken_feedback)
    result = run_fuzz(150, seed=1, env=ENV)
    assert result.crashes > 0
    assert "feedback broke" in result.crash_examples[0]


def test_fuzz_counts_an_escape_through_the_dispatcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whitelist that lets every name through: hidden and private methods get run, and are counted."""
    monkeypatch.setattr(episode_module, "validate_call", lambda call, visible: None)
    monkeypatch.setattr(Dispatcher, "__contains__", lambda self, name: True)
    original_class_of = Dispatcher.class_of

    def any_class(self, name):
        try:
            return original_class_of(self, name)
        except KeyError:
            return next(iter(self._instances))

    def lenient_dispatch(self, function_name, arguments, *, deadline=None):
        if function_name not in self._classes:
            self._classes = {**self._classes, function_name: any_class(self, function_name)}
        return original_dispatch(self, function_name, arguments, deadline=deadline)

    original_dispatch = Dispatcher.dispatch
    monkeypatch.setattr(Dispatcher, "class_of", any_class)
    monkeypatch.setattr(Dispatcher, "dispatch", lenient_dispatch)
    result = run_fuzz(600, seed=2, env=ENV)
    assert result.escapes > 0
    assert any("entered from envtune.environments.instances" in e for e in result.escape_examples)


def test_tripwires_catch_process_level_escapes() -> None:
    tripwires = Tripwires()
    tripwires.install()
    try:
        tripwires.active = True
        for attempt in (
            lambda: builtins.open("/etc/hostname"),  # noqa: SIM115 - it must never open
            lambda: builtins.eval("1"),
            lambda: __import__("this_module_does_not_exist_envtune"),
        ):
            with pytest.raises(PermissionError):
                attempt()
        tripwires.active = False
        assert builtins.eval("1 + 1") == 2  # inactive: everything passes through
    finally:
        tripwires.uninstall()
    assert tripwires.escapes == 3
    assert builtins.open is not None and builtins.eval("2") == 2
