"""The benchmark registry and ``envtune-bench``: every benchmark declares itself, the table is right."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from envtune.runtime.cli import bench
from envtune.runtime.cli.bench_registry import (
    Benchmark,
    DeclarationError,
    Figure,
    Target,
    discover,
    lookup,
    read_declaration,
)

REPO = Path(__file__).resolve().parents[1]


def test_every_benchmark_script_declares_itself() -> None:
    found = discover(REPO / "benchmarks")
    names = {f.path.stem for f in found}
    assert names >= {"loop_capacity", "async_vs_sync", "env_step", "runtime_throughput"}
    undeclared = [f"{f.path.name}: {f.error}" for f in found if f.benchmark is None]
    assert undeclared == []
    for f in found:
        assert f.benchmark is not None and f.benchmark.figures, f.path.name
        for figure in f.benchmark.figures:
            figure.parsed_target()  # every target parses


def test_targets_and_lookup() -> None:
    assert Target.parse(">= 1.5").holds(1.5) and not Target.parse(">= 1.5").holds(1.49)
    assert Target.parse("<= 300").holds(299) and not Target.parse("<= 300").holds(301)
    with pytest.raises(DeclarationError):
        Target.parse("at least 3")
    assert lookup({"a": {"b": 2}}, "a.b") == 2 and lookup({"a": 1}, "a.b") is None


def test_a_script_without_a_declaration_is_reported(tmp_path: Path) -> None:
    (tmp_path / "plain.py").write_text("print('hi')\n")
    (tmp_path / "_helper.py").write_text("X = 1\n")
    found = discover(tmp_path)
    assert [f.path.name for f in found] == ["plain.py"]
    assert found[0].benchmark is None and "declares no BENCHMARK" in found[0].error
    with pytest.raises(DeclarationError, match="evaluate"):
        (tmp_path / "bad.py").write_text("BENCHMARK = Benchmark(name='bad', summary=open('x'))\n")
        read_declaration(tmp_path / "bad.py")


FAKE = textwrap.dedent(
    """
    import json, sys
    from envtune.runtime.cli.bench_registry import Benchmark, Figure
    BENCHMARK = Benchmark(
        name="fake",
        summary="a fake benchmark",
        quick=("--quick",),
        figures=(
            Figure(key="speed", label="speed", unit="x", target=">= 2", samples="speed_samples",
                   baseline_key="base", baseline_label="the slow path"),
            Figure(key="ratio", label="ratio", target=">= 1.5", ratio=True),
            Figure(key="absent", label="never printed"),
        ),
        checks=("same",),
    )
    if __name__ == "__main__":
        quick = "--quick" in sys.argv
        print("some table")
        print(json.dumps({"speed": 6.0, "speed_samples": [5.0, 6.0, 9.0], "base": 2.0, "ratio": 1.2,
                          "same": quick}))
    """
)


def test_envtune_bench_runs_the_declared_scripts_and_writes_the_report(tmp_path: Path) -> None:
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "benchmarks" / "fake.py").write_text(FAKE)
    (tmp_path / "benchmarks" / "nodecl.py").write_text("print(1)\n")
    out = tmp_path / "result.json"
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--root", str(tmp_path), "--write", "--json", str(out)])
    assert exit_.value.code == 1  # quick mode: the fake's check passes, but a script is undeclared
    result = json.loads(out.read_text())
    rows = {r["key"]: r for r in result["figures"] if r["benchmark"] == "fake"}
    assert rows["speed"]["value"] == 6.0 and rows["speed"]["ratio"] == 3.0
    assert rows["speed"]["verdict"] == "pass"
    assert rows["speed"]["spread"] == {"median": 6.0, "min": 5.0, "max": 9.0, "n": 3}
    assert rows["ratio"]["ratio"] == 1.2 and rows["ratio"]["verdict"] == "FAIL"
    assert rows["absent"]["verdict"] == "missing"
    assert [c["verdict"] for c in result["checks"]] == ["pass"]
    assert any(r["verdict"] == "undeclared" for r in result["figures"])
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "quick mode" in md and "| fake | speed |" in md and "python benchmarks/fake.py --quick" in md


def test_a_failing_check_fails_the_run(tmp_path: Path) -> None:
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "benchmarks" / "fake.py").write_text(FAKE)
    out = tmp_path / "full.json"
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--root", str(tmp_path), "--full", "--json", str(out)])  # full: "same" is false
    assert exit_.value.code == 1
    assert [c["verdict"] for c in json.loads(out.read_text())["checks"]] == ["FAIL"]


def test_console_script_lists_without_torch() -> None:
    code = (
        "import sys; from envtune.runtime.cli.bench import main; main(['--list']); "
        "assert 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "loop_capacity" in done.stdout and "UNDECLARED" not in done.stdout


def test_declarations_are_frozen_records() -> None:
    figure = Figure(key="k", label="l", target=">= 1")
    decl = Benchmark(name="x", summary="s", figures=(figure,))
    with pytest.raises(AttributeError):
        decl.name = "y"  # type: ignore[misc]
    with pytest.raises(DeclarationError):
        Benchmark(name="x", summary="s", figures=(figure, figure))


def test_update_replaces_only_the_benchmarks_rerun(tmp_path: Path) -> None:
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "benchmarks" / "fake.py").write_text(FAKE)
    (tmp_path / "benchmarks" / "other.py").write_text(FAKE.replace('name="fake"', 'name="other"'))
    bench.main(["--root", str(tmp_path), "--write"])
    (tmp_path / "benchmarks" / "fake.py").write_text(FAKE.replace('"speed": 6.0', '"speed": 8.0'))
    bench.main(["--root", str(tmp_path), "--write", "--update", "--only", "fake"])
    result = json.loads((tmp_path / "BENCHMARKS.json").read_text())
    speeds = {r["benchmark"]: r["value"] for r in result["figures"] if r["key"] == "speed"}
    assert speeds == {"fake": 8.0, "other": 6.0} and result["updated"] == ["fake"]
    assert sorted(r["name"] for r in result["runs"]) == ["fake", "other"]
