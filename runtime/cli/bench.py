"""``envtune-bench``: run every benchmark, print one table, write JSON and ``BENCHMARKS.md``.

Runs each script of ``benchmarks/`` that declares itself (``bench_registry``) as its own process
(quick mode by default, ``--full`` on request), one at a time, with one torch thread
(``OMP_NUM_THREADS=1``) so that two runs never fight for the cores. Each script prints one JSON
line last; the declaration says which keys are figures, which are their baselines (and which code
path a baseline is), their targets, their per-repeat samples, and which keys are correctness
checks. Around every run the machine's load average is recorded: on a shared machine it is part of
the figure.

The table: figure | value | baseline (code path) | ratio | target | pass/fail | median [min, max] |
load. A script without a declaration, a run that fails or prints no JSON, and a figure missing
from its JSON are rows too: nothing is skipped silently. Exit code 1 when a run or a correctness
check failed (``--strict`` also fails on missed targets).

    envtune-bench                  # quick mode, every benchmark
    envtune-bench --full --write   # full mode; writes BENCHMARKS.md and BENCHMARKS.json
    envtune-bench --only loop_capacity async_vs_sync
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envtune.runtime.cli.bench_registry import Benchmark, Discovered, Figure, discover, lookup

SKIP_EXIT_CODE = 2
"""A script that exits with 2 and prints no JSON lacks a requirement (an extra environment): skipped."""


def find_root(start: Path | None = None) -> Path:
    """The checkout holding ``benchmarks/``: upwards from ``start`` (the working folder), else the
    checkout this package is installed from (an editable install)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "benchmarks").is_dir() and (folder / "pyproject.toml").is_file():
            return folder
    installed = Path(__file__).resolve().parents[2]
    if (installed / "benchmarks").is_dir():
        return installed
    raise FileNotFoundError("no benchmarks/ folder: run envtune-bench inside an envtune checkout (or --root)")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = int(line.split()[1]) / 1024**2
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def git_commit(root: Path) -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            # The report files themselves do not make the measured code dirty.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md",
             ":!BENCHMARKS.json"],
            cwd=root, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = done.stdout.strip() or "unknown"
    return commit + ("+dirty" if dirty.stdout.strip() else "")


@dataclass(slots=True)
class Run:
    """One benchmark run and its outcome."""

    name: str
    command: list[str]
    mode: str
    status: str = "ok"
    """ok | failed | timeout | no-json | undeclared | skipped."""
    detail: str = ""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0
    payload: dict[str, Any] = field(default_factory=dict)


def run_one(found: Discovered, root: Path, full: bool, extra: list[str]) -> Run:
    bench = found.benchmark
    if bench is None:
        return Run(found.path.stem, [], "", status="undeclared", detail=found.error)
    mode = "full" if full else "quick"
    args = list(bench.full if full else bench.quick)
    command = [sys.executable, str(found.path.relative_to(root)), *args, *extra]
    run = Run(bench.name, command, mode)
    if "gpu" in bench.needs and not _has_gpu():
        run.status, run.detail = "skipped", "needs a GPU"
        return run
    timeout = bench.timeout_s if full else bench.timeout_s / 3
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run.load_before = os.getloadavg()[0]
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        run.status, run.detail = "timeout", f"over {timeout:.0f} s"
        return run
    finally:
        run.wall_s = time.perf_counter() - t0
        usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        run.cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        run.load_after = os.getloadavg()[0]
    if done.returncode == SKIP_EXIT_CODE and not done.stdout.strip().endswith("}"):
        run.status = "skipped"  # a requirement is missing (the script says which on stderr)
        run.detail = (done.stderr.strip() or done.stdout.strip())[-300:]
        return run
    if done.returncode != 0:
        run.status = "failed"
        run.detail = f"exit code {done.returncode}: " + done.stderr.strip()[-1500:]
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                run.payload = json.loads(line)
                break
            except ValueError:
                continue
    if not run.payload and run.status == "ok":
        run.status, run.detail = "no-json", "the run printed no JSON line"
    return run


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def figure_row(figure: Figure, run: Run) -> dict[str, Any]:
    """One table row: value, baseline, ratio, target verdict, spread, load."""
    raw = lookup(run.payload, figure.key)
    value = _number(raw)
    text = raw if isinstance(raw, str) else None  # a descriptive figure (a device name...)
    samples_raw = lookup(run.payload, figure.samples) if figure.samples else None
    listed = samples_raw if isinstance(samples_raw, list) else []
    samples = [float(x) for x in listed if _number(x) is not None]
    baseline = _number(lookup(run.payload, figure.baseline_key)) if figure.baseline_key else None
    ratio: float | None = None
    if value is not None:
        if figure.ratio:
            ratio = value
        elif baseline:
            ratio = value / baseline
    target = figure.parsed_target()
    verdict = "-"
    if run.status != "ok":
        verdict = run.status
    elif value is None and text is None:
        verdict = "missing"
    elif value is None:
        verdict = "FAIL" if target is not None else "-"
    elif target is not None:
        verdict = "pass" if target.holds(value) else "FAIL"
    spread = (
        {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}
        if samples
        else ({"median": value, "min": value, "max": value, "n": 1} if value is not None else None)
    )
    return {
        "benchmark": run.name,
        "figure": figure.label,
        "key": figure.key,
        "value": value,
        "text": text,
        "unit": figure.unit,
        "baseline": baseline,
        "baseline_path": figure.baseline_label,
        "ratio": ratio,
        "target": figure.target,
        "verdict": verdict,
        "spread": spread,
        "load": [round(run.load_before, 2), round(run.load_after, 2)],
    }


def check_rows(bench: Benchmark, run: Run) -> list[dict[str, Any]]:
    rows = []
    for key in bench.checks:
        value = lookup(run.payload, key)
        verdict = run.status if run.status != "ok" else ("pass" if value is True else "FAIL")
        rows.append({"benchmark": run.name, "check": key, "value": value, "verdict": verdict})
    return rows


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    header = (
        "benchmark", "figure", "value", "baseline", "ratio", "target", "verdict", "median [min, max]", "load"
    )
    body = []
    for r in rows:
        s = r["spread"]
        spread = f"{_fmt(s['median'])} [{_fmt(s['min'])}, {_fmt(s['max'])}] n={s['n']}" if s else "-"
        value = r.get("text") or "-"
        if r["value"] is not None:
            value = f"{_fmt(r['value'])} {r['unit']}".strip()
        baseline = r["baseline_path"]
        if r["baseline"] is not None:
            baseline = f"{_fmt(r['baseline'])}: {baseline}"
        body.append((
            r["benchmark"], r["figure"], value, baseline or "-", _fmt(r["ratio"]), r["target"] or "-",
            r["verdict"], spread, f"{r['load'][0]:.1f}->{r['load'][1]:.1f}",
        ))
    return [" | ".join(header), *(" | ".join(cells) for cells in body)]


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `envtune-bench{' --full' if result['mode'] == 'full' else ''} --write` at commit "
        f"`{result['commit']}` on {result['date']}, **{result['mode']} mode**"
        + (f" (rows of {', '.join(result['updated'])} rerun with `--update`; each run's commit is in the "
           "last table)." if result.get("updated") else "."),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"{m['platform']}. One torch thread per run. The machine is shared: each row gives the load "
        "average before and after its benchmark; wall-clock figures move with it (CPU-time and "
        "virtual-clock figures much less).",
        "",
        "| benchmark | figure | value | baseline (code path) | ratio | target | verdict | median [min, max] "
        "| load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for line in table_lines(result["figures"])[1:]:
        lines.append("| " + line + " |")
    lines += ["", "Correctness checks (quick mode runs them in CI as tests):", ""]
    lines += ["| benchmark | check | verdict |", "|---|---|---|"]
    lines += [f"| {c['benchmark']} | `{c['check']}` | {c['verdict']} |" for c in result["checks"]]
    lines += ["", "Runs (the exact commands; rerun any of them to reproduce a row):", ""]
    lines += ["| benchmark | commit | command | status | wall s | CPU s |", "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        command = " ".join(["python", *r["command"][1:]]) if r["command"] else "-"
        status = r["status"] + (f" ({r['detail'][:120]})" if r["detail"] else "")
        commit = r.get("commit", "earlier run")
        lines.append(
            f"| {r['name']} | {commit} | `{command}` | {status} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def updated(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with the benchmarks of ``new`` replaced (mode must match; the commit becomes new's)."""
    if old.get("mode") != new["mode"]:
        raise SystemExit(f"--update: the report is {old.get('mode')} mode, this run is {new['mode']} mode")
    names = {r["name"] for r in new["runs"]}
    merged = dict(new)
    for key in ("figures", "checks"):
        kept = [row for row in old[key] if row["benchmark"] not in names]
        merged[key] = sorted(kept + new[key], key=lambda row: row["benchmark"])
    runs = [{"commit": old.get("commit", "?"), **r} for r in old["runs"] if r["name"] not in names]
    runs += new["runs"]
    merged["runs"] = sorted(runs, key=lambda r: r["name"])
    merged["updated"] = sorted(names)
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="envtune-bench", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="full mode (default: quick)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--root", type=Path, default=None, help="the envtune checkout (default: found)")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md and BENCHMARKS.json")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here")
    parser.add_argument(
        "--update", action="store_true",
        help="with --write and --only: replace only these benchmarks' rows in the existing BENCHMARKS.json",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed too")
    args = parser.parse_args(argv)
    root = args.root.resolve() if args.root else find_root()
    found = discover(root / "benchmarks")
    if args.only:
        unknown = set(args.only) - {f.path.stem for f in found}
        if unknown:
            parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
        found = [f for f in found if f.path.stem in args.only]
    if args.list:
        for f in found:
            print(f"{f.path.stem:<22} {f.benchmark.summary if f.benchmark else 'UNDECLARED: ' + f.error}")
        return
    runs: list[Run] = []
    figures: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    for f in found:
        print(f"running {f.path.stem} ({'full' if args.full else 'quick'})...", file=sys.stderr, flush=True)
        run = run_one(f, root, args.full, [])
        runs.append(run)
        if f.benchmark is None:
            figures.append({
                "benchmark": run.name, "figure": "(no BENCHMARK declaration)", "key": "", "value": None,
                "unit": "", "baseline": None, "baseline_path": "", "ratio": None, "target": None,
                "verdict": "undeclared", "spread": None, "load": [0.0, 0.0],
            })
            continue
        figures += [figure_row(fig, run) for fig in f.benchmark.figures]
        checks += check_rows(f.benchmark, run)
        if run.status != "ok":
            print(f"  {run.status}: {run.detail[:500]}", file=sys.stderr)
    commit = git_commit(root)
    result = {
        "mode": "full" if args.full else "quick",
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "figures": figures,
        "checks": checks,
        "runs": [
            {"name": r.name, "commit": commit, "command": r.command, "mode": r.mode, "status": r.status,
             "detail": r.detail,
             "wall_s": round(r.wall_s, 1), "cpu_s": round(r.cpu_s, 1),
             "load": [round(r.load_before, 2), round(r.load_after, 2)], "payload": r.payload}
            for r in runs
        ],
    }
    print("\n".join(table_lines(figures)))
    for c in checks:
        print(f"check {c['benchmark']}.{c['check']}: {c['verdict']}")
    if args.write and args.update and (root / "BENCHMARKS.json").is_file():
        result = updated(json.loads((root / "BENCHMARKS.json").read_text(encoding="utf-8")), result)
    if args.write:
        (root / "BENCHMARKS.md").write_text(markdown(result), encoding="utf-8")
        (root / "BENCHMARKS.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    broken = [r for r in runs if r.status not in ("ok", "skipped")]
    failed_checks = [c for c in checks if c["verdict"] != "pass"]
    missed = [r for r in figures if r["verdict"] == "FAIL"]
    print(json.dumps({"runs": len(runs), "broken_runs": len(broken), "failed_checks": len(failed_checks),
                      "missed_targets": len(missed)}))
    if broken or failed_checks or (args.strict and missed):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
