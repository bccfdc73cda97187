"""Tool-call fuzz: hostile replies through the real parsers and dispatcher of real BFCL episodes.

Generates ``--cases`` tool-call strings (envtune's ``<tool_call>`` JSON and BFCL's pythonic form;
hostile values, hidden/private/dunder names, code, malformed JSON and tags, NUL, invalid UTF-8, lone
surrogates, path tricks, cyclic file systems), plays each through ``Episode.step`` of episodes that
rotate over every (category, BFCL class), and counts crashes (an exception escaping the step or the
pythonic parser) and escapes (any execution outside the visible BFCL methods, seen by tripwires).
See ``environments/fuzzing.py``. The target is 0 and 0; speed is reported, not compared.

    python benchmarks/fuzz_tools.py [--cases 100000] [--seed 0] [--quick]

Ends with one JSON line: fuzz_cases, fuzz_crashes, fuzz_escapes, cases_per_s, and what the cases
reached (executed calls, faults by kind, families, episodes), with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from envtune.environments.fuzzing import run_fuzz
from envtune.runtime.cli.bench_registry import Benchmark, Figure

BENCHMARK = Benchmark(
    name="fuzz_tools",
    summary="hostile tool-call strings through real episodes: crashes and calls outside the visible tools",
    quick=("--quick",),
    full=(),
    figures=(
        Figure(key="fuzz_crashes", label="fuzzed tool-call strings that crashed a step", target="<= 0"),
        Figure(key="fuzz_escapes", label="calls executed outside the visible tools", target="<= 0"),
        Figure(key="fuzz_cases", label="fuzzed tool-call strings", unit="cases"),
    ),
    timeout_s=1800,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=100_000, help="tool-call strings (default 100,000)")
    parser.add_argument("--quick", action="store_true", help="10,000 cases")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cases = 10_000 if args.quick else args.cases

    load_before = os.getloadavg()[0]
    report = run_fuzz(cases, seed=args.seed)
    load_after = os.getloadavg()[0]
    for example in report.crash_examples:
        print(f"CRASH {example}")
    for example in report.escape_examples:
        print(f"ESCAPE {example}")
    print(
        f"fuzz: {report.cases} cases, {report.crashes} crashes, {report.escapes} escapes, "
        f"{report.executed_calls} calls executed, {report.cases_per_s:.0f} cases/s"
    )
    print(
        json.dumps(
            {
                "fuzz_cases": report.cases,
                "fuzz_crashes": report.crashes,
                "fuzz_escapes": report.escapes,
                "cases_per_s": round(report.cases_per_s),
                "seconds": round(report.seconds, 1),
                "executed_calls": report.executed_calls,
                "hint_lookups": report.hint_lookups,
                "faults": dict(sorted(report.faults.items())),
                "families": dict(sorted(report.families.items())),
                "episodes": report.episodes,
                "seed": args.seed,
                "load_1m": [round(load_before, 2), round(load_after, 2)],
                "cpus": os.cpu_count(),
            }
        )
    )
    return 0 if report.crashes == 0 and report.escapes == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
