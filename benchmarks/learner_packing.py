"""Learner throughput: padding-free packed micro-batches vs right-padded ones.

Both arms run the real ``Learner.step`` (reference forward for the KL, forward + backward, AdamW)
on the same synthetic multi-turn trajectories (lengths uniform in [64, 1024], prompt and environment
segments masked), with the same budget of computed positions per micro-batch, on the tiny Qwen2
model. Steps alternate between the arms so machine noise hits both alike. Reported: real (non-pad)
tokens per second of each arm and their ratio. The last line of output is one JSON object.

The padded baseline a peer would run is length-bucketed (sequences sorted by length before they
are cut into micro-batches); the arrival-order padded arm is reported too, for the record. The
headline is packed over bucketed-padded, by CPU time per round (median [min, max]).

What the ratio contains: no compute on pad positions and Σ L² instead of rows × longest² attention.
Both arms send only the predicted positions' hidden states through the LM head (``optim/logprobs.py``),
so the LM-head share the audit flagged is no longer in the ratio. The peer the paper ran (verl with
remove-padding) is packed too.

    python benchmarks/learner_packing.py --quick     # < ~60 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import time

import structlog
import torch
from envtune.agents.trajectory import Trajectory
from envtune.optim.config import Batching, LearnerConfig
from envtune.optim.learner import Learner
from envtune.optim.packing import plan_microbatches
from envtune.runtime.cli.bench_registry import Benchmark, Figure
from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir
from transformers import AutoModelForCausalLM

BENCHMARK = Benchmark(
    name="learner_packing",
    summary="learner step, packed micro-batches vs right-padded ones bucketed by length (tiny model)",
    quick=("--quick",),
    full=(),
    figures=(
        Figure(key="cpu_time_ratio", unit="x",
               label="learner step CPU, bucketed padded / packed (tiny model)",
               target=">= 1.1", samples="cpu_time_ratio_samples", baseline_key="padded_bucketed_tokens_per_s",
               baseline_label="right-padded micro-batches of length-sorted sequences", ratio=True),
        Figure(key="cpu_time_ratio_vs_arrival_order", unit="x",
               label="the same against padded in arrival order",
               baseline_key="padded_tokens_per_s", baseline_label="right-padded, arrival order", ratio=True),
    ),
    timeout_s=1800,
)


def synthetic_batch(n: int, vocab: int, seed: int, min_len: int, max_len: int) -> list[Trajectory]:
    """Multi-turn-shaped trajectories: a masked prompt, then model turns and masked tool replies."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(min_len, max_len)
        prompt = max(8, length // 3)
        mask = [False] * prompt
        while len(mask) < length:
            mask += [True] * rng.randint(8, 64)
            mask += [False] * rng.randint(8, 48)
        mask = mask[:length]
        ids = tuple(rng.randrange(vocab) for _ in range(length))
        behavior = tuple(-rng.uniform(0.5, 4.0) if m else 0.0 for m in mask)
        out.append(
            Trajectory(
                task_id=f"task{i // 8}", group_id=f"g{i // 8}", token_ids=ids, loss_mask=tuple(mask),
                behavior_logprobs=behavior, policy_versions=tuple(0 if m else -1 for m in mask),
                reward=rng.random(), progress=0.0, format_reward=0.0, tool_reward=0.0, turn_passed=(),
                step_codes=(), stage=2, start_version=0,
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sequences and repetitions (CI)")
    parser.add_argument("--sequences", type=int, default=None, help="trajectories per step")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per arm")
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (1: on a shared 2-core box, 2 threads oversubscribe; 10x noise)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # quiet step logs
    n_seq = args.sequences or (16 if args.quick else 48)
    reps = args.reps or (2 if args.quick else 5)

    folder = build_tiny_model(default_tiny_model_dir())
    base = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    batch = synthetic_batch(n_seq, base.config.vocab_size, 0, args.min_len, args.max_len)
    real_tokens = sum(len(t.token_ids) for t in batch)

    # Three arms: packed; right-padded in arrival order; right-padded after sorting by length, i.e.
    # bucketed, which is what a peer without remove-padding does (the fair padded baseline).
    arms = {"packed": Batching.PACKED, "padded": Batching.PADDED, "padded_bucketed": Batching.PADDED}
    inputs = {"packed": batch, "padded": batch,
              "padded_bucketed": sorted(batch, key=lambda t: len(t.token_ids))}
    learners = {}
    for arm, batching in arms.items():
        torch.manual_seed(0)
        config = LearnerConfig(lr=1e-5, micro_batch_tokens=args.micro_batch_tokens, batching=batching)
        learners[arm] = Learner(copy.deepcopy(base), config, device=args.device)

    times: dict[str, list[float]] = {a: [] for a in learners}
    cpu_times: dict[str, list[float]] = {a: [] for a in learners}
    computed: dict[str, int] = {}
    micro: dict[str, int] = {}
    for rep in range(reps + 1):  # the first round warms up; arms alternate within a round
        for arm, learner in learners.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics = learner.step(inputs[arm])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            micro[arm] = metrics.num_microbatches
            if rep > 0:
                times[arm].append(elapsed)
                cpu_times[arm].append(cpu)
    for arm, batching in arms.items():
        lengths = [len(t.token_ids) for t in inputs[arm]]
        plan = plan_microbatches(lengths, args.micro_batch_tokens, batching)
        rows = [[lengths[i] for i in mb] for mb in plan]
        computed[arm] = sum(sum(r) if batching is Batching.PACKED else len(r) * max(r) for r in rows)

    # Per-round ratios (the arms of one round ran back to back): median [min, max].
    cpu_ratios = {
        base: [p_ / q for p_, q in zip(cpu_times[base], cpu_times["packed"], strict=True)]
        for base in ("padded", "padded_bucketed")
    }
    tps = {a: real_tokens / statistics.median(ts) for a, ts in times.items()}
    ratio = tps["packed"] / tps["padded_bucketed"]
    print(
        f"trajectories={n_seq} real_tokens={real_tokens} budget={args.micro_batch_tokens} "
        f"device={args.device} threads={torch.get_num_threads()}"
    )
    for a in learners:
        steps = ", ".join(f"{x:.2f}" for x in times[a])
        print(
            f"{a:>16}: {tps[a]:9.0f} tokens/s  micro-batches={micro[a]}  "
            f"computed_positions={computed[a]}  step_s=[{steps}]"
        )
    print(f"packed / padded-bucketed tokens/s: {ratio:.2f}; packed / padded in arrival order: "
          f"{tps['packed'] / tps['padded']:.2f}")
    print(
        json.dumps(
            {
                "packed_tokens_per_s": round(tps["packed"], 1),
                "padded_tokens_per_s": round(tps["padded"], 1),
                "padded_bucketed_tokens_per_s": round(tps["padded_bucketed"], 1),
                "ratio": round(ratio, 3),
                "ratio_vs_arrival_order": round(tps["packed"] / tps["padded"], 3),
                "cpu_time_ratio": round(statistics.median(cpu_ratios["padded_bucketed"]), 3),
                "cpu_time_ratio_samples": [round(x, 3) for x in cpu_ratios["padded_bucketed"]],
                "cpu_time_ratio_vs_arrival_order": round(statistics.median(cpu_ratios["padded"]), 3),
                "padding_fraction": round(1 - real_tokens / computed["padded"], 3),
                "padding_fraction_bucketed": round(1 - real_tokens / computed["padded_bucketed"], 3),
                "real_tokens": real_tokens,
                "trajectories": n_seq,
                "micro_batch_tokens": args.micro_batch_tokens,
                "device": args.device,
                "load_average": round(os.getloadavg()[0], 2),
            }
        )
    )

if __name__ == "__main__":
    main()
