"""Does the default run learn? The real actors on real BFCL train tasks, against a shuffled-reward control.

Each arm is ``recipe.training.train`` exactly as ``envtune-run`` runs it (rollout actor, staleness
gate, learner actor, curriculum scheduler, adapters published into the embedded engine and pinned
per group, grammar masks replayed in the learner, KL 0.1 to the stage-start policy) with the CPU
preset's learning stage as it is (stage 1, ``syntax``: the paper's stage-1 reward on the 4 shortest
BFCL V3 base train tasks, one reply per episode under the preset's narrow grammar, 4 groups of 8 per
step, a LoRA adapter on the LM head), for a fixed number of learner steps (no early promotion).
The control arm is the same run with ``ShuffledRewards``: every batch's rewards permuted across its
trajectories inside the learner step, so it costs the same and sees the same reward spread, but no
reward belongs to its sample. The two arms of a seed run side by side in one process
(each has its own engine), so machine load hits both alike; seeds run one after another.

Measured per arm: ``train/reward`` (the stage's own reward, of the samples each step trained on,
before any shuffle) per step. ``learning_gain`` is the mean over seeds of (mean of the last quarter
of the steps - mean of the first quarter) of the trained arm, ``control_gain`` the same of the
control. Target (issue 10): learning_gain >= 0.15 and >= control_gain + 0.1. Sampling seeds are the
engine's own (not fixed); ``--seeds`` sets the run seed (task order) and the adapter's initial
weights. The last line of output is one JSON object.

    python benchmarks/learning_curve.py --quick      # 3 seeds x 16 steps x 32 episodes
    python benchmarks/learning_curve.py              # 5 seeds x 32 steps x 32 episodes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
import torch
from envtune.runtime.cli.bench_registry import Benchmark, Figure
from envtune.runtime.engines.embedded import EmbeddedEngine
from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir
from envtune.runtime.recipe.config import CPU_PRESET, Config, load_config
from envtune.runtime.recipe.run_folder import RunFolder
from envtune.runtime.recipe.training import train
from envtune.runtime.recipe.trajectory_log import SampleMode, TrajectorySampling
from envtune.runtime.testing.controls import ShuffledRewards

BENCHMARK = Benchmark(
    name="learning_curve",
    summary="stage-1 reward gain through the real actors on BFCL vs a shuffled-reward control",
    quick=("--quick",),
    full=(),
    figures=(
        Figure(key="learning_gain", label="stage-1 reward gain, last - first quarter", target=">= 0.15"),
        Figure(key="control_gain", label="the same for the shuffled-reward control"),
        Figure(key="gain_over_control", label="learning gain over the control's", target=">= 0.1"),
    ),
    checks=("target_met",),
    timeout_s=5400,
)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def arm_config(steps: int, seed: int, extra: list[str]) -> Config:
    """The CPU preset reduced to its learning stage, for exactly ``steps`` learner steps."""
    preset = load_config(CPU_PRESET, extra)
    learning = preset.curriculum.stages[0]
    stage = replace(learning, promotion=replace(learning.promotion, metric="", max_steps=steps))
    return replace(
        preset,
        curriculum=replace(preset.curriculum, stages=(stage,), validation_every=0),
        run=replace(
            preset.run,
            max_steps=steps,
            seed=seed,
            checkpoint_every=0,
            trajectories=TrajectorySampling(SampleMode.NONE),
            progress_bar=False,
        ),
    )


async def run_arm(
    config: Config, model_dir: Path, root: Path, *, control: bool, seed: int
) -> list[dict[str, Any]]:
    folder = RunFolder.create(root, f"{'control' if control else 'trained'}-{seed}")
    torch.manual_seed(seed)  # the adapter's A matrices (B starts at 0: both arms start from the base)
    async with await EmbeddedEngine.open(model_dir, config.engine.embedded) as engine:
        await train(
            config,
            folder,
            engine,
            engine,
            model_dir,
            wrap_learner=(lambda learner: ShuffledRewards(learner, seed=seed)) if control else None,  # type: ignore[arg-type,return-value]
        )
    return [r for r in folder.read_metrics() if "event" not in r]


def rewards(records: list[dict[str, Any]]) -> list[float]:
    return [float(r["train/reward"]) for r in records if "train/reward" in r]


def quarter_gain(values: list[float]) -> float:
    n = max(1, len(values) // 4)
    return statistics.fmean(values[-n:]) - statistics.fmean(values[:n])


def zero_variance_fraction(records: list[dict[str, Any]]) -> float:
    groups = [(r["train/groups"], r["train/zero_variance_share"]) for r in records if "train/groups" in r]
    total = sum(g for g, _ in groups)
    return sum(g * z for g, z in groups) / total if total else 0.0


async def one_seed(
    config: Config, model_dir: Path, root: Path, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    async with asyncio.TaskGroup() as tg:
        trained = tg.create_task(run_arm(config, model_dir, root, control=False, seed=seed))
        control = tg.create_task(run_arm(config, model_dir, root, control=True, seed=seed))
    return trained.result(), control.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds x 16 learner steps (else 5 x 32)")
    parser.add_argument("--seeds", default=None, help="comma-separated run seeds (0,1,2; else 0..4)")
    parser.add_argument("--steps", type=int, default=None, help="learner steps per arm")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    parser.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    torch.set_num_threads(1)
    seeds = [int(s) for s in (args.seeds or ("0,1,2" if args.quick else "0,1,2,3,4")).split(",")]
    steps = args.steps or (16 if args.quick else 32)
    model_dir = build_tiny_model(default_tiny_model_dir())
    load_start = os.getloadavg()
    wall0, cpu0 = time.monotonic(), cpu_seconds()
    gains, control_gains, zero, control_zero = [], [], [], []
    curves: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out) if args.out else Path(scratch)
        for seed in seeds:
            config = arm_config(steps, seed, args.overrides)
            began = time.monotonic()
            trained, control = asyncio.run(one_seed(config, model_dir, root, seed))
            up, flat = rewards(trained), rewards(control)
            gains.append(quarter_gain(up))
            control_gains.append(quarter_gain(flat))
            zero.append(zero_variance_fraction(trained))
            control_zero.append(zero_variance_fraction(control))
            curves[str(seed)] = {"trained": [round(x, 3) for x in up], "control": [round(x, 3) for x in flat]}
            seconds = time.monotonic() - began
            print(
                f"seed {seed}: trained {curves[str(seed)]['trained']} gain {gains[-1]:+.3f} | control "
                f"{curves[str(seed)]['control']} gain {control_gains[-1]:+.3f} | {seconds:.0f} s "
                f"| load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    learning_gain, control_gain = statistics.fmean(gains), statistics.fmean(control_gains)
    rollout = arm_config(steps, 0, args.overrides).rollout
    result = {
        "learning_gain": round(learning_gain, 4),
        "control_gain": round(control_gain, 4),
        "gain_over_control": round(learning_gain - control_gain, 4),
        "target_met": learning_gain >= 0.15 and learning_gain >= control_gain + 0.1,
        "gains": [round(g, 4) for g in gains],
        "control_gains": [round(g, 4) for g in control_gains],
        "seeds": seeds,
        "steps": steps,
        "episodes_per_step": rollout.groups_per_step * rollout.group_size,
        "zero_variance_fraction": round(statistics.fmean(zero), 4),
        "control_zero_variance_fraction": round(statistics.fmean(control_zero), 4),
        "curves": curves,
        "wall_s": round(time.monotonic() - wall0, 1),
        "cpu_s": round(cpu_seconds() - cpu0, 1),
        "load_avg_1m_start": round(load_start[0], 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
