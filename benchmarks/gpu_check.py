"""One prepared GPU check (<= 8 min on one GPU): the sharded learner and the embedded engine at 7B.

What it does, in order, each phase skipped (and said so) when the time budget runs short:

1. Builds a Qwen2.5-7B-shaped model (the published config's sizes) with random bf16 weights on the
   GPU: nothing is downloaded.
2. Learner: the FSDP2 learner (``optim/distributed.py``) on one rank (NCCL), bf16 compute with fp32
   reduction, LoRA r=16 on every linear, KL and entropy on. Sequences have BFCL lengths: each
   episode is a real V3 task's tool documentation + questions (characters / 3.3 = tokens, an
   estimate for Qwen's tokenizer on JSON-heavy text) followed by its turns (per user turn: 3
   replies of 120 sampled tokens and 3 tool results of 150 masked tokens, assumed); one 32k-token
   episode joins the long set. Three runs: checkpointing off and on over episodes <= 8k tokens
   (same batches), and on over the long set. Each: one warm-up step, then timed steps; reports
   tokens/s, the CUDA peak and the per-GPU estimate (``optim/memory.py``, what ``envtune-run``
   prints and checks at start) beside it. A run whose estimate exceeds the GPU is skipped, not run
   into an out-of-memory error. Log-probabilities are chunked as the learner computes them
   (``learner.logits_chunk_elements``, the default).
3. Log-probability memory: the CUDA peak of LM head + log-softmax + entropy + backward over 16k
   predicted positions at the real vocabulary, all at once (``optim.logprobs.token_logprobs_reference``
   on full logits) vs the learner's chunked computation (``optim.logprobs.chunked_token_logprobs``,
   1k positions per chunk).
4. The embedded engine (``runtime/engines/embedded.py``) on the same weights saved to local disk
   (bf16 safetensors; the engine loads them as it does, in fp32): generated tokens/s with 1, 16
   and 64 concurrent requests (1024-token prompts, 64 new tokens, temperature 1).

Ends with one JSON line. ``--cpu`` runs every phase at tiny sizes on CPU (gloo), which is what
the test does; it proves the script runs, not any speed.

    python benchmarks/gpu_check.py [--budget-s 450] [--steps 2]
    python benchmarks/gpu_check.py --cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from envtune.runtime.cli.bench_registry import Benchmark, Figure

BENCHMARK = Benchmark(
    name="gpu_check",
    summary="7B-shaped learner and engine on a GPU (quick: every phase at tiny sizes on CPU, no speed)",
    quick=("--cpu",),
    full=(),
    figures=(Figure(key="device", label="device the check ran on (quick mode proves the script runs)"),),
    timeout_s=1800,
    needs=(),
)

CHARS_PER_TOKEN = 3.3
"""Estimate for Qwen2.5's tokenizer on BFCL's JSON tool docs and English questions."""
REPLY_TOKENS, FEEDBACK_TOKENS, STEPS_PER_TURN = 120, 150, 3
"""Assumed shape of a multi-turn episode (see the module docstring)."""

QWEN25_7B = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}  # fmt: skip
"""Qwen2.5-7B-Instruct's config.json sizes."""

TINY = {
    "vocab_size": 2100, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}  # fmt: skip


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def bfcl_episode_lengths(n: int, scale: float = 1.0) -> list[tuple[int, int]]:
    """(prompt tokens, turns) of the first ``n`` BFCL V3 tasks; ``scale`` shrinks them for --cpu."""
    from envtune.environments.tasks import class_function_docs, load_tasks

    out = []
    for task in list(load_tasks().values())[:n]:
        tools = json.dumps([d.to_json() for d in class_function_docs(task.involved_classes)])
        chars = len(tools) + len(task.questions[0][0]) + 200  # + the chat template and system text
        out.append((max(8, int(chars / CHARS_PER_TOKEN * scale)), len(task.questions)))
    return out


def make_trajectories(
    specs: list[tuple[int, int]], vocab: int, seed: int, scale: float, cap: int
) -> list[Any]:
    """Random ids with BFCL lengths and the loss mask of a multi-turn episode."""
    import torch
    from envtune.agents.trajectory import Trajectory

    g = torch.Generator().manual_seed(seed)
    reply, feedback = max(2, int(REPLY_TOKENS * scale)), max(2, int(FEEDBACK_TOKENS * scale))
    out = []
    for i, (prompt, turns) in enumerate(specs):
        mask = [False] * prompt
        for _ in range(turns):
            for _ in range(STEPS_PER_TURN):
                mask += [True] * reply + [False] * feedback
        mask = mask[:cap]
        ids = torch.randint(3, vocab, (len(mask),), generator=g).tolist()
        behavior = [-1.5 if m else 0.0 for m in mask]
        reward = float(i % 3) / 2
        out.append(
            Trajectory(
                task_id=f"t{i}", group_id=f"g{i // 4}", token_ids=tuple(ids), loss_mask=tuple(mask),
                behavior_logprobs=tuple(behavior), policy_versions=tuple(0 if m else -1 for m in mask),
                reward=reward, progress=reward, format_reward=0.0, tool_reward=0.0, turn_passed=(),
                step_codes=(), stage=2, start_version=0,
            )
        )  # fmt: skip
    return out


def _with_model_tokens(t: Any, n: int, vocab: int) -> Any:
    """``t`` followed by ``n`` sampled (loss) tokens."""
    import torch
    from envtune.agents.trajectory import Trajectory

    ids = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    fields = {f: getattr(t, f) for f in Trajectory.__slots__}
    fields.update(
        token_ids=t.token_ids + tuple(ids), loss_mask=t.loss_mask + (True,) * n,
        behavior_logprobs=t.behavior_logprobs + (-1.5,) * n, policy_versions=t.policy_versions + (0,) * n,
    )  # fmt: skip
    return Trajectory(**fields)


def build_model(shape: dict[str, Any], device: str, dtype: Any) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: no 30 GB fp32 detour on the GPU
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def learner_run(
    name: str, shape: dict[str, Any], trajectories: list[Any], *, checkpointing: bool, micro: int, cap: int,
    steps: int, device: str, ctx: Any, budget: Budget,
) -> dict[str, Any]:  # fmt: skip
    import torch
    from envtune.optim.config import LearnerConfig, LoraSettings
    from envtune.optim.distributed import ShardedCore, ShardedLearner
    from envtune.optim.memory import GIB, MemoryBudgetError, check_fits, estimate_for_config

    on_gpu = device == "cuda"
    config = LearnerConfig(
        lr=1e-6,
        micro_batch_tokens=micro,
        gradient_checkpointing=checkpointing,
        lora=LoraSettings(rank=16, alpha=32.0),
    )
    result: dict[str, Any] = {
        "name": name,
        "gradient_checkpointing": checkpointing,
        "micro_batch_tokens": micro,
    }
    est = estimate_for_config(
        shape, config, world_size=ctx.world_size, sharded=True, on_gpu=on_gpu, max_sequence_tokens=cap
    )
    result["estimate_gib"] = round(est.total / GIB, 2) if est is not None else None
    if on_gpu and est is not None:
        try:
            check_fits(est, torch.cuda.get_device_properties(0).total_memory)
        except MemoryBudgetError as exc:
            return {**result, "skipped": str(exc)}
    model = build_model(shape, device, torch.bfloat16 if on_gpu else torch.float32)
    learner = ShardedLearner(ShardedCore(model, config, context=ctx))
    tokens = sum(len(t.token_ids) for t in trajectories)
    result["batch_tokens"] = tokens
    result["longest"] = max(len(t.token_ids) for t in trajectories)
    times = []
    try:
        for i in range(steps + 1):
            if times and budget.left() < 2 * max(times):
                result["stopped_early"] = "time budget"
                break
            if on_gpu:
                torch.cuda.synchronize()
                if i == 1:
                    torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            metrics = learner.step(trajectories)
            if on_gpu:
                torch.cuda.synchronize()
            if i >= 1:
                times.append(time.perf_counter() - started)
            result["grad_norm"] = metrics.grad_norm
        if times:
            result["step_s"] = {"median": statistics.median(times), "min": min(times), "max": max(times)}
            result["tokens_per_s"] = tokens / statistics.median(times)
        if on_gpu:
            result["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
            result["reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    except torch.OutOfMemoryError as exc:  # reported, not fatal: the estimate was wrong
        result["oom"] = str(exc).splitlines()[0]
    finally:
        learner.close()
        del learner, model
        if on_gpu:
            torch.cuda.empty_cache()
    return result


def logprob_memory(shape: dict[str, Any], positions: int, chunk: int, device: str) -> dict[str, Any]:
    """CUDA peak of logprobs + entropy + backward over ``positions`` rows: all at once vs chunked."""
    import torch
    from envtune.optim.logprobs import chunked_token_logprobs, token_logprobs_reference

    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    head = torch.nn.Linear(shape["hidden_size"], shape["vocab_size"], bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=g)
    head.weight.requires_grad_(False)  # frozen, as the base model's LM head
    targets = torch.randint(0, shape["vocab_size"], (positions,), device=device, generator=g)

    out: dict[str, Any] = {"positions": positions, "chunk": chunk, "vocab": shape["vocab_size"]}
    for name in ("full", "chunked"):
        hidden = torch.randn(positions, shape["hidden_size"], device=device, dtype=dtype, requires_grad=True)
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        if name == "full":
            lp, ent = token_logprobs_reference(head(hidden), targets, with_entropy=True)
        else:
            lp, ent = chunked_token_logprobs(hidden, head, targets, with_entropy=True, chunk_tokens=chunk)
        assert ent is not None
        (lp.sum() + 0.001 * ent.sum()).backward()
        if on_gpu:
            torch.cuda.synchronize()
            out[f"{name}_peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 1024**3, 3)
        out[f"{name}_ok"] = bool(torch.isfinite(hidden.grad).all())
        del hidden, lp, ent
    return out


async def engine_throughput(
    folder: Path, batches: list[int], prompt_len: int, new_tokens: int
) -> dict[str, Any]:
    from envtune.agents.engine import GenerateRequest, SamplingParams
    from envtune.runtime.engines.embedded import EmbeddedEngine, EmbeddedEngineConfig

    out: dict[str, Any] = {"prompt_tokens": prompt_len, "new_tokens": new_tokens}
    config = EmbeddedEngineConfig(max_batch_rows=max(batches), prefix_cache_tokens=0)
    started = time.perf_counter()
    engine = await EmbeddedEngine.open(folder, config)
    out["load_s"] = time.perf_counter() - started
    try:
        vocab = min(engine.vocab_size, len(engine.tokenizer))
        for b in batches:
            requests = [
                GenerateRequest(
                    tuple((7 * k + 13 * j) % (vocab - 3) + 3 for j in range(prompt_len)),
                    SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=k),
                )
                for k in range(b)
            ]
            started = time.perf_counter()
            results = await asyncio.gather(*(engine.generate(r) for r in requests))
            elapsed = time.perf_counter() - started
            generated = sum(len(c.token_ids) for cs in results for c in cs)
            out[f"batch_{b}"] = {
                "tokens_per_s": generated / elapsed,
                "generated": generated,
                "wall_s": elapsed,
            }
    finally:
        await engine.close()
    return out


def save_for_engine(shape: dict[str, Any], device: str, folder: Path) -> None:
    """The random model's weights (bf16 on GPU) and the tiny tokenizer, as an engine model folder."""
    import torch
    from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir
    from transformers import AutoTokenizer

    model = build_model(shape, device, torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    AutoTokenizer.from_pretrained(build_tiny_model(default_tiny_model_dir())).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on CPU (what the test runs)")
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument(
        "--steps", type=int, default=2, help="timed learner steps per run (after one warm-up)"
    )
    parser.add_argument("--episodes", type=int, default=8, help="BFCL episodes per batch (~8k tokens each)")
    parser.add_argument("--engine-batches", default=None, help="default 1,16,64 (GPU) or 1,4 (CPU)")
    parser.add_argument(
        "--work-dir", default=None, help="where the engine's model folder goes (default: a temp dir)"
    )
    args = parser.parse_args()

    import torch
    from envtune.optim.distributed import init_distributed
    from envtune.optim.memory import GIB

    started = time.perf_counter()
    budget = Budget(args.budget_s)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the tiny CPU version")
    shape = TINY if args.cpu else QWEN25_7B
    scale = 0.03 if args.cpu else 1.0
    cap, short_cap = (512, 160) if args.cpu else (32768, 8192)
    micro_short, micro_long = (160, 320) if args.cpu else (8192, 16384)
    if args.cpu:
        args.episodes, args.steps = min(args.episodes, 8), 1
    batches = [int(b) for b in (args.engine_batches or ("1,4" if args.cpu else "1,16,64")).split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    ctx = init_distributed("gloo" if args.cpu else "nccl")
    on_gpu = device == "cuda"
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "gpu_total_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1) if on_gpu else None,
        "model": "tiny" if args.cpu else "Qwen2.5-7B-shaped, random bf16",
        "torch": torch.__version__,
        "chars_per_token_assumed": CHARS_PER_TOKEN,
        "learner": [],
        "skipped": [],
    }  # fmt: skip

    specs = bfcl_episode_lengths(args.episodes, scale)
    short = make_trajectories(specs, shape["vocab_size"], 0, scale, short_cap)
    long = make_trajectories(specs, shape["vocab_size"], 1, scale, cap)
    long[0] = make_trajectories([(cap // 2, 0)], shape["vocab_size"], 2, scale, cap)[0]
    long[0] = _with_model_tokens(long[0], cap - cap // 2, shape["vocab_size"])  # the 32k-token episode
    runs = [
        ("short_no_checkpointing", short, False, micro_short),
        ("short_checkpointing", short, True, micro_short),
        ("long_checkpointing", long, True, micro_long),
    ]
    for name, trajectories, ckpt, micro in runs:
        if budget.left() < (30 if args.cpu else 120):
            result["skipped"].append(f"learner {name}: time budget")
            continue
        longest = max(len(t.token_ids) for t in trajectories)
        run = learner_run(
            name, shape, trajectories, checkpointing=ckpt, micro=micro, cap=longest,
            steps=args.steps, device=device, ctx=ctx, budget=budget,
        )  # fmt: skip
        result["learner"].append(run)
    no, yes = (
        result["learner"][0] if result["learner"] else {},
        result["learner"][1] if len(result["learner"]) > 1 else {},
    )
    if no.get("tokens_per_s") and yes.get("tokens_per_s"):
        result["checkpointing_speed_ratio"] = yes["tokens_per_s"] / no["tokens_per_s"]

    positions, chunk = (512, 64) if args.cpu else (16384, 1024)
    if budget.left() > (10 if args.cpu else 60):
        result["logprob_memory"] = logprob_memory(shape, positions, chunk, device)
    else:
        result["skipped"].append("logprob memory: time budget")

    if budget.left() > (20 if args.cpu else 200):
        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="envtune-gpu-check-"))
        folder = work / "engine-model"
        try:
            save_for_engine(shape, device, folder)
            result["engine"] = asyncio.run(
                engine_throughput(folder, batches, 64 if args.cpu else 1024, 16 if args.cpu else 64)
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        result["skipped"].append("engine: time budget")

    import torch.distributed as dist

    dist.destroy_process_group()
    result["wall_s"] = time.perf_counter() - started
    result["load_avg_1m"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
