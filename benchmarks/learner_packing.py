"""Learner throughput: padding-free packed micro-batches vs right-padded ones.

Both arms run the real ``Learner.step`` (reference forward for the KL, forward + backward, AdamW)
on the same synthetic multi-turn trajectories (lengths uniform in [64, 1024], prompt and environment
segments masked), with the same budget of computed positions per micro-batch, on the tiny Qwen2
model. Steps alternate between the arms so machine noise hits both alike. Reported: real (non-pad)
tokens per second of each arm and their ratio. The last line of output is one JSON object.

What the ratio contains: no compute on pad positions and Σ L² instead of rows × longest² attention.
Both arms send only the predicted positions' hidden states through the LM head (``optim/logprobs.py``).

    python benchmarks/learner_packing.py --quick     # < ~60 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time

import structlog
import torch
from envtune.agents.trajectory import Trajectory
from envtune.optim.config import Batching, LearnerConfig
from envtune.optim.learner import Learner
from envtune.optim.packing import plan_microbatches
from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir
from transformers import AutoModelForCausalLM


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

    learners = {}
    for batching in (Batching.PACKED, Batching.PADDED):
        torch.manual_seed(0)
        config = LearnerConfig(lr=1e-5, micro_batch_tokens=args.micro_batch_tokens, batching=batching)
        learners[batching] = Learner(copy.deepcopy(base), config, device=args.device)

    times: dict[Batching, list[float]] = {b: [] for b in learners}
    cpu_times: dict[Batching, list[float]] = {b: [] for b in learners}
    computed: dict[Batching, int] = {}
    micro: dict[Batching, int] = {}
    for rep in range(reps + 1):  # the first round warms up
        for batching, learner in learners.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics = learner.step(batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            micro[batching] = metrics.num_microbatches
            if rep > 0:
                times[batching].append(elapsed)
                cpu_times[batching].append(cpu)
    lengths = [len(t.token_ids) for t in batch]
    for batching in learners:
        plan = plan_microbatches(lengths, args.micro_batch_tokens, batching)
        rows = [[lengths[i] for i in mb] for mb in plan]
        computed[batching] = sum(sum(r) if batching is Batching.PACKED else len(r) * max(r) for r in rows)

    tps = {b: real_tokens / statistics.median(ts) for b, ts in times.items()}
    ratio = tps[Batching.PACKED] / tps[Batching.PADDED]
    cpu_ratio = statistics.median(cpu_times[Batching.PADDED]) / statistics.median(cpu_times[Batching.PACKED])
    print(
        f"trajectories={n_seq} real_tokens={real_tokens} budget={args.micro_batch_tokens} "
        f"device={args.device} threads={torch.get_num_threads()}"
    )
    for b in learners:
        steps = ", ".join(f"{x:.2f}" for x in times[b])
        print(
            f"{b.value:>7}: {tps[b]:9.0f} tokens/s  micro-batches={micro[b]}  "
            f"computed_positions={computed[b]}  step_s=[{steps}]"
        )
    print(f"packed/padded tokens/s ratio: {ratio:.2f} (by CPU time: {cpu_ratio:.2f})")
    print(
        json.dumps(
            {
                "packed_tokens_per_s": round(tps[Batching.PACKED], 1),
                "padded_tokens_per_s": round(tps[Batching.PADDED], 1),
                "ratio": round(ratio, 3),
                "cpu_time_ratio": round(cpu_ratio, 3),
                "padding_fraction": round(1 - real_tokens / computed[Batching.PADDED], 3),
                "real_tokens": real_tokens,
                "trajectories": n_seq,
                "micro_batch_tokens": args.micro_batch_tokens,
                "device": args.device,
            }
        )
    )


if __name__ == "__main__":
    main()
