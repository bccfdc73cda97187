"""Peak memory of one learner micro-batch at a real vocabulary: full-vocabulary logits vs chunked.

One ``Learner.step`` on one micro-batch of ``--tokens`` tokens (two trajectories of a GRPO group, every
token but the first of each a sampled one), at ``--vocab`` (Qwen2.5's 152,064 by default) on a small
Qwen2 (hidden 64, 2 layers): the reference forward for the KL, the forward with entropy, the loss,
the backward, AdamW. Arms:

- ``full``: ``logits_chunk_elements=0``, what the learner did before: fp32 logits, log-softmax,
  exp and p·log p over the whole micro-batch (the baseline a user would otherwise run);
- ``chunked``: the default, ``optim/logprobs.py``'s autograd Function (analytic backward);
- ``checkpointed``: the same chunks with ``torch.utils.checkpoint`` around the plain per-chunk math
  (the alternative design, patched in here only to compare).

How peak memory is measured (CPU). ``tracemalloc`` does not see torch's allocations and torch has no
CPU allocator statistics, so each measurement runs in a fresh subprocess that builds the model and
the batch, resets the kernel's resident-set high-water mark (``/proc/self/clear_refs`` = 5), reads
``VmRSS``, runs the step and reads ``VmHWM``: peak = VmHWM - VmRSS before the step. Workers run with
``MALLOC_MMAP_THRESHOLD_=65536``: glibc then maps every block of 64 KiB or more on its own and unmaps
it when freed, so RSS follows the live tensors (with its default, blocks up to 32 MiB come from a heap
that keeps freed memory and fragments, which inflated and scattered the figures: measured 578-1529 MB
for one arm over three runs); what the heap still keeps can only make a figure larger, never hide an
allocation. Arms alternate (full, chunked,
checkpointed, full, ...) over ``--reps`` rounds; reported as median [min, max].

Cross-check (separate subprocesses, same size, non-zero adapter): logprobs, entropies and the LoRA
gradients of a fixed loss, full vs each chunked arm; the run fails loudly unless they agree to 1e-5
(``torch.allclose(atol=1e-5, rtol=1e-5)``: absolute for logprobs; an entropy of 12 nats summed over
152k fp32 terms is itself only good to ~3e-5, so each arm's entropy error against an fp64
computation of the first 256 tokens is printed too, and the chunked one must be no worse than 2x the
full one's).

Memory needed: the full arm holds about 5 fp32 [tokens, vocab] tensors: ~25 GB at the defaults. On a
smaller machine pass ``--vocab``: the chunk budget then shrinks with the vocabulary so that a chunk
keeps the 441 tokens it has at 152,064 (the learner's default budget), every vocabulary-sized tensor
of both arms scales by the same factor, and the ratio approaches the default's (the small fixed
part, model and activations, weighs a little more). Say so when quoting such a figure. ``--arms``
measures a subset (e.g. the chunked arm alone at the real vocabulary).

    python benchmarks/learner_memory.py                  # 8192 tokens at vocab 152064 (~25 GB free)
    python benchmarks/learner_memory.py --quick          # 8192 tokens at vocab 16384 (~3 GB free)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from envtune.runtime.cli.bench_registry import Benchmark, Figure

BENCHMARK = Benchmark(
    name="learner_memory",
    summary="peak memory of log-probabilities + entropy + backward: full [T, V] logits vs chunked",
    quick=("--quick",),
    full=(),
    figures=(
        Figure(key="peak_ratio", label="peak memory, full logits / chunked", unit="x",
               baseline_key="peak_full_mb", baseline_label="all [T, V] fp32 logits at once", ratio=True),
        Figure(key="peak_chunked_mb", label="peak memory, chunked", unit="MB"),
    ),
    timeout_s=1800,
)

ARMS = ("full", "chunked", "checkpointed")
TOLERANCE = 1e-5
QWEN_VOCAB = 152064
"""Qwen2.5's vocabulary: the size the learner's default chunk budget is meant for."""


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _load_avg() -> float:
    return os.getloadavg()[0]


def _setup(job: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """The learner and the batch of one arm, in a worker process."""
    import structlog
    import torch
    from envtune.agents.trajectory import Trajectory
    from envtune.optim import packing as packing_module
    from envtune.optim.config import LearnerConfig, LoraSettings, LossConfig
    from envtune.optim.learner import Learner
    from transformers import Qwen2Config, Qwen2ForCausalLM

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=job["vocab"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=job["tokens"],
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config)
    chunk_elements = 0 if job["arm"] == "full" else job["chunk_elements"]
    learner_config = LearnerConfig(
        lr=1e-4, micro_batch_tokens=job["tokens"], logits_chunk_elements=chunk_elements,
        lora=LoraSettings(rank=8, alpha=16.0), loss=LossConfig(kl_coef=0.1, entropy_coef=0.001),
    )
    learner = Learner(model, learner_config)
    with torch.no_grad():  # a non-zero adapter: every LoRA matrix gets a gradient
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    if job["arm"] == "checkpointed":
        packing_module.chunked_token_logprobs = _checkpointed_chunks
    g = torch.Generator().manual_seed(1)
    half = job["tokens"] // 2
    batch = []
    for i in range(2):
        ids = tuple(torch.randint(0, job["vocab"], (half,), generator=g).tolist())
        batch.append(
            Trajectory(
                task_id="t", group_id="g", token_ids=ids, loss_mask=(False,) + (True,) * (half - 1),
                behavior_logprobs=(0.0,) + (-math.log(job["vocab"]),) * (half - 1),
                policy_versions=(-1,) + (0,) * (half - 1), reward=float(i), progress=float(i),
                format_reward=0.0, tool_reward=0.0, turn_passed=(), step_codes=(), stage=2, start_version=0,
            )
        )
    return learner, torch, batch


def _checkpointed_chunks(hidden, head, targets, *, temperature, masks, with_entropy, chunk_tokens):
    """The alternative design: plain autograd per chunk under ``torch.utils.checkpoint``."""
    import torch
    from envtune.optim.logprobs import token_logprobs_reference
    from torch.utils.checkpoint import checkpoint

    def one(h, t, m):
        return token_logprobs_reference(
            head(h), t, temperature=temperature, masks=m, with_entropy=with_entropy
        )

    outs = [
        checkpoint(
            one, hidden[s : s + chunk_tokens], targets[s : s + chunk_tokens],
            None if masks is None else masks[s : s + chunk_tokens], use_reentrant=False,
        )
        for s in range(0, hidden.shape[0], chunk_tokens)
    ]
    logp = torch.cat([o[0] for o in outs])
    return logp, torch.cat([o[1] for o in outs]) if with_entropy else None


def worker_peak(job: dict[str, Any]) -> dict[str, Any]:
    learner, _, batch = _setup(job)
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kb("VmRSS")
    began = time.perf_counter()
    metrics = learner.step(batch)
    seconds = time.perf_counter() - began
    peak = _status_kb("VmHWM")
    if not metrics.updated:
        raise RuntimeError(f"the measured step did not update: {metrics.skip_reason}")
    return {"peak_mb": (peak - before) / 1024, "step_s": seconds, "loss_tokens": metrics.num_loss_tokens}


def worker_check(job: dict[str, Any]) -> dict[str, Any]:
    """Logprobs, entropies and LoRA gradients of a fixed loss, saved for the parent to compare."""
    learner, torch, batch = _setup(job)
    from envtune.optim.config import Batching
    from envtune.optim.packing import build_batch, token_logprobs

    model = learner.model
    batch_in = build_batch(
        [t.token_ids for t in batch], [t.loss_mask for t in batch], [0, 1], Batching.PACKED
    )
    logp, entropy = token_logprobs(
        model, batch_in, temperature=0.9, with_entropy=True,
        logits_chunk_elements=learner.config.logits_chunk_elements,
    )
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(logp.shape, generator=g)
    (logp * weights).sum().add(0.5 * entropy.sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # fp64 truth for the first tokens (the benchmark's private peek at the hidden states).
    from envtune.optim.packing import _predicted_hidden

    with torch.no_grad():
        hidden = _predicted_hidden(model, batch_in)[:256].double()
        z = hidden @ model.get_base_model().get_output_embeddings().weight.double().T / 0.9
        log_probs = torch.log_softmax(z, -1)
        entropy64 = -(log_probs.exp() * log_probs).sum(-1)
    torch.save(
        {"logp": logp.detach(), "entropy": entropy.detach(), "grads": grads, "entropy64": entropy64},
        job["out"],
    )
    return {"saved": job["out"]}


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True, text=True, check=False, env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker {job['kind']}/{job['arm']} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cross_check(base: dict[str, Any], folder: Path) -> dict[str, float]:
    import torch  # the parent only loads the workers' results

    saved = {}
    for arm in ARMS:
        path = folder / f"{arm}.pt"
        run_worker({**base, "kind": "check", "arm": arm, "out": str(path)})
        saved[arm] = torch.load(path)
    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(torch.allclose(a, b, atol=TOLERANCE, rtol=TOLERANCE))

    def fp64_error(arm: str) -> float:
        return float((saved[arm]["entropy"][:256].double() - saved[arm]["entropy64"]).abs().max())

    diffs: dict[str, float] = {"full_entropy_err_fp64": fp64_error("full")}
    failures = []
    full = saved["full"]
    for arm in ARMS[1:]:
        got = saved[arm]
        diffs[f"{arm}_logp_max_diff"] = float((got["logp"] - full["logp"]).abs().max())
        diffs[f"{arm}_entropy_max_diff"] = float((got["entropy"] - full["entropy"]).abs().max())
        diffs[f"{arm}_grad_max_diff"] = max(
            float((got["grads"][n] - g).abs().max()) for n, g in full["grads"].items()
        )
        diffs[f"{arm}_entropy_err_fp64"] = fp64_error(arm)
        if not close(got["logp"], full["logp"]):
            failures.append(f"{arm} logprobs")
        if not close(got["entropy"], full["entropy"]):
            failures.append(f"{arm} entropies")
        if not all(close(got["grads"][n], g) for n, g in full["grads"].items()):
            failures.append(f"{arm} gradients")
        if diffs[f"{arm}_entropy_err_fp64"] > 2 * max(diffs["full_entropy_err_fp64"], 1e-6):
            failures.append(f"{arm} entropy accuracy vs fp64")
    diffs["grad_max_abs"] = max(float(g.abs().max()) for g in full["grads"].values())
    if failures:
        raise SystemExit(f"CROSS-CHECK FAILED ({', '.join(failures)}): {diffs}")
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="vocab 16384 (about 3 GB for the full arm)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens in the micro-batch")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 152064)")
    parser.add_argument(
        "--chunk-elements", type=int, default=None,
        help="fp32 logits per chunk (default: the learner's default scaled by vocab / 152064)",
    )
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    parser.add_argument("--reps", type=int, default=3, help="fresh-process measurements per arm")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each worker")
    parser.add_argument("--skip-check", action="store_true", help="no value/gradient cross-check")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        result = worker_peak(job) if job["kind"] == "peak" else worker_check(job)
        print(json.dumps(result))
        return
    from envtune.optim.packing import DEFAULT_LOGITS_CHUNK_ELEMENTS

    vocab = args.vocab or (16384 if args.quick else QWEN_VOCAB)
    chunk_elements = args.chunk_elements or DEFAULT_LOGITS_CHUNK_ELEMENTS * vocab // QWEN_VOCAB
    arms = tuple(a for a in ARMS if a in args.arms.split(","))
    if not arms or set(args.arms.split(",")) - set(ARMS):
        raise SystemExit(f"--arms must name some of {ARMS}")
    base = {"tokens": args.tokens, "vocab": vocab, "chunk_elements": chunk_elements, "threads": args.threads}
    began = time.monotonic()
    loads = [_load_avg()]
    peaks: dict[str, list[float]] = {arm: [] for arm in arms}
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(args.reps):
        for arm in arms:
            result = run_worker({**base, "kind": "peak", "arm": arm})
            peaks[arm].append(result["peak_mb"])
            seconds[arm].append(result["step_s"])
            loads.append(_load_avg())
    diffs: dict[str, float] = {}
    if not args.skip_check and arms == ARMS:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            diffs = cross_check(base, Path(folder))

    def summary(xs: list[float]) -> str:
        return f"{statistics.median(xs):.0f} [{min(xs):.0f}, {max(xs):.0f}]"

    print(
        f"tokens={args.tokens} vocab={vocab} chunk_tokens={max(1, chunk_elements // vocab)} "
        f"threads={args.threads} reps={args.reps} load_avg={statistics.median(loads):.2f} "
        f"[{min(loads):.2f}, {max(loads):.2f}]"
    )
    for arm in arms:
        print(f"{arm:>13}: peak MB {summary(peaks[arm])}  step s {statistics.median(seconds[arm]):.2f} "
              f"[{min(seconds[arm]):.2f}, {max(seconds[arm]):.2f}]")
    for k, v in diffs.items():
        print(f"  {k} = {v:.3g}")
    result: dict[str, Any] = {}
    for arm in arms:
        result[f"peak_{arm}_mb"] = round(statistics.median(peaks[arm]), 1)
        result[f"peak_{arm}_mb_range"] = [round(min(peaks[arm]), 1), round(max(peaks[arm]), 1)]
    if "full" in arms and "chunked" in arms:
        result["peak_ratio"] = round(result["peak_full_mb"] / result["peak_chunked_mb"], 2)
    if "full" in arms and "checkpointed" in arms:
        result["peak_ratio_checkpointed"] = round(result["peak_full_mb"] / result["peak_checkpointed_mb"], 2)
    for arm in arms:
        result[f"step_s_{arm}"] = round(statistics.median(seconds[arm]), 3)
    print(
        json.dumps(
            {
                **result,
                **{k: float(f"{v:.3g}") for k, v in diffs.items()},
                "tokens": args.tokens,
                "vocab": vocab,
                "chunk_tokens": max(1, chunk_elements // vocab),
                "reps": args.reps,
                "threads": args.threads,
                "load_avg": [round(min(loads), 2), round(statistics.median(loads), 2), round(max(loads), 2)],
                "wall_s": round(time.monotonic() - began, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
