"""The sharded learner (FSDP2, gloo, N ranks under torchrun) against the single-process Learner.

Both arms train the tiny model (``runtime/engines/tiny_model.py``) from the same LoRA init on the
same global batches: 3 GRPO groups of 4 trajectories with prompt, model and environment turns of
random lengths (one episode per batch of ~950 tokens, ~650 with ``--ci``, three quarters masked;
the others 20-150), behaviour logprobs near on-policy, the KL and entropy terms on, with what the
learners share in ``optim/objective.py`` switched on: grammar masks on two thirds of the
trajectories, log-probabilities in chunks of 48 positions, gradient checkpointing, and a KL
reference that moves to the adapter after step 1 (a stage promotion). The sharded arm splits each
batch over the ranks with uneven token counts and different numbers of micro-batches (so
zero-weight padding passes happen).

The equivalence checks run in float64: in fp32, AdamW's first steps turn summation-order roundoff
(~1e-10) in gradient elements near its epsilon (1e-8) into weight differences of 1e-5..1e-4
(update = lr * g / (|g| + eps)), which says nothing about the sharding. ``fp32_max_abs_diff`` reports
that arm too. Measured, all on rank 0 of one torchrun job:

- ``max_abs_diff``: largest |sharded - single| over the LoRA weights after ``--steps`` AdamW steps
  (``update_max_abs`` is how far the weights moved, for scale), with both arms' first gradient norms;
- ``reload_logits_max_diff``: the gathered adapter saved by ``save_adapter`` and reloaded with
  ``PeftModel.from_pretrained`` into a fresh base, vs the single-process model's logits;
- ``resume_max_abs_diff``: a sharded run checkpointed after step 2 (``state_dict`` -> ``torch.save``
  -> ``torch.load`` into new learners on every rank) and stepped once more, vs the unresumed run;
- ``two_updates_max_abs_diff`` (not with ``--ci``): both arms with two optimizer updates per batch
  (the proximal pass, masked, with padding passes);
- ``control_per_rank_mean_max_abs_diff``: a negative control, the sharded arm normalising each rank's
  loss by its own token count (per-rank means), after ``control_steps`` steps (1 with ``--ci``): it
  must differ by far more than the tolerance;
- step time (not with ``--ci``): after the comparison, ``--timing-steps`` more steps, interleaved
  (single, sharded, ...); every process runs one intra-op thread (the project's setting on shared
  CPUs: two OpenMP threads on a busy 2-core machine ran a step ~10x slower), so the sharded arm uses
  ``--ranks`` cores and the single one one core. On CPU this measures the sharding overhead, not a
  GPU speed-up.

Ends with one JSON line. ``--quick`` shortens the timing. Run the job directly:

    python benchmarks/fsdp_equivalence.py [--ranks 2] [--steps 3] [--timing-steps 6] [--quick]

``tests/test_optim_distributed.py`` runs it with ``--ci`` and asserts on the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from envtune.runtime.cli.bench_registry import Benchmark, Figure

BENCHMARK = Benchmark(
    name="fsdp_equivalence",
    summary="FSDP2 sharded LoRA learner (2 gloo ranks) against the single-process learner",
    quick=("--quick",),
    full=(),
    figures=(
        Figure(key="max_abs_diff", label="LoRA weights, sharded vs single, after the steps", target="<= 1e-5",
               baseline_key="update_max_abs", baseline_label="single-process Learner (how far it moved)"),
        Figure(key="resume_max_abs_diff", label="sharded resumed from a checkpoint vs uninterrupted",
               target="<= 1e-5"),
    ),
    timeout_s=1800,
)

RANK_ENV = "ENVTUNE_FSDP_JOB"
"""Set on the torchrun children: the job's JSON."""


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --- inside the torchrun job ---------------------------------------------------------------------------


def _load(model_dir: str, dtype: Any):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")


def _learner_config(job: dict[str, Any], updates: int = 1):
    from envtune.optim.config import KlReference, LearnerConfig, LoraSettings

    return LearnerConfig(
        lr=job["lr"],
        micro_batch_tokens=job["micro_batch_tokens"],
        updates_per_step=updates,
        lora=LoraSettings(rank=8, alpha=16.0),
        gradient_checkpointing=True,
        kl_reference=KlReference.STAGE_START,
        # A few hundred positions per chunk at the tiny vocabulary: micro-batches span several chunks.
        logits_chunk_elements=job["chunk_positions"] * job["vocab"],
    )


def _mask_source(batch: list[Any], vocab: int, seed: int):
    """Grammar masks for two thirds of the trajectories (each allows its sampled token and a random
    quarter of the vocabulary), as ``Learner.step(token_masks=...)`` takes them."""
    import torch

    masks = {}
    for i, t in enumerate(batch):
        if i % 3 == 2:
            continue
        targets = [x for x, m in zip(t.token_ids, t.loss_mask, strict=True) if m]
        g = torch.Generator().manual_seed(seed * 1000 + i)
        words = (vocab + 31) // 32
        allowed = torch.zeros(len(targets), words * 32, dtype=torch.int64)
        allowed[:, :vocab] = (torch.rand(len(targets), vocab, generator=g) < 0.25).long()
        allowed[torch.arange(len(targets)), torch.tensor(targets)] = 1
        packed = (allowed.view(len(targets), words, 32) << torch.arange(32)).sum(-1)
        masks[i] = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return masks.get


def _train(learner, batches: list[list[Any]], first: int, vocab: int):
    """Steps on ``batches`` (numbered from ``first``) with their masks; the KL reference moves to the
    adapter after step 1, as a stage promotion does. Returns the last step's metrics."""
    metrics = None
    for b, batch in enumerate(batches, start=first):
        metrics = learner.step(batch, token_masks=_mask_source(batch, vocab, b))
        if b == 0:
            learner.snapshot_reference()
    return metrics


def _batches(model, job: dict[str, Any]) -> list[list[Any]]:
    """Deterministic batches; behaviour logprobs = the base policy's plus noise (weights != 1)."""
    import torch
    from envtune.agents.trajectory import Trajectory

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(job["seed"])
    batches = []
    model.eval()
    for b in range(job["steps"] + job["timing_steps"]):
        out = []
        for gi in range(3):
            prompt = torch.randint(
                3, vocab, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g
            ).tolist()
            for m in range(4):
                ids, mask = list(prompt), [False] * len(prompt)
                if gi == 0 and m == 0:
                    # One long episode per batch (more than half its tokens): the ranks' shares are
                    # uneven, and the rank that holds it runs padding passes while the other works.
                    # Three quarters of it masked (a long tool output): the ranks' loss-token counts
                    # differ more than their token counts.
                    n = job["long_episode"]
                    long_turn = torch.randint(3, vocab, (n,), generator=g).tolist()
                    ids += long_turn
                    mask += [False] * (3 * n // 4) + [True] * (n - 3 * n // 4)
                for turn in range(int(torch.randint(1, 4, (1,), generator=g))):
                    reply = torch.randint(
                        3, vocab, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g
                    )
                    ids += reply.tolist()
                    mask += [True] * len(reply)
                    if turn < 2:
                        env = torch.randint(
                            3, vocab, (int(torch.randint(4, 24, (1,), generator=g)),), generator=g
                        )
                        ids += env.tolist()
                        mask += [False] * len(env)
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
                logp = torch.log_softmax(logits, -1)
                noise = torch.randn(len(ids), generator=g) * 0.05
                behavior = [
                    float(logp[j - 1, ids[j]] + noise[j]) if mask[j] and j > 0 else 0.0
                    for j in range(len(ids))
                ]
                reward = float(torch.rand(1, generator=g))
                out.append(
                    Trajectory(
                        task_id=f"t{gi}",
                        group_id=f"b{b}-g{gi}",
                        token_ids=tuple(ids),
                        loss_mask=tuple(mask),
                        behavior_logprobs=tuple(behavior),
                        policy_versions=tuple(b if x else -1 for x in mask),
                        reward=reward,
                        progress=reward,
                        format_reward=0.0,
                        tool_reward=0.0,
                        turn_passed=(),
                        step_codes=(),
                        stage=2,
                        start_version=b,
                    )
                )
        batches.append(out)
    return batches


def _adapter(learner) -> dict[str, Any]:
    """Full LoRA tensors of either arm (the sharded one gathers them on every rank)."""
    from envtune.optim.lora import adapter_state

    return learner.adapter_state() if hasattr(learner, "adapter_state") else adapter_state(learner.model)


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    if a.keys() != b.keys():
        raise AssertionError(f"adapter keys differ: {sorted(a.keys() ^ b.keys())[:4]}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _rank_main(job: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist
    from envtune.optim.distributed import (
        ShardedCore,
        ShardedLearner,
        assign_to_ranks,
        init_distributed,
        serve_worker,
    )
    from envtune.optim.learner import Learner

    torch.set_num_threads(1)
    phase_started = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        nonlocal phase_started
        now = time.perf_counter()
        phases[name] = round(now - phase_started, 2)
        phase_started = now

    ctx = init_distributed("gloo")
    model_dir = job["model_dir"]
    rank0 = ctx.rank == 0
    base = _load(model_dir, torch.float32) if rank0 else None
    batches = _batches(base, job) if rank0 else []
    vocab = job["vocab"]
    steps = job["steps"]
    result: dict[str, Any] = {"ranks": ctx.world_size, "steps": steps}
    phase("start_and_batches")

    def sharded(updates: int = 1, dtype: Any = torch.float64, core_type: type = ShardedCore):
        torch.manual_seed(job["seed"] + 1)  # the same LoRA init as the single-process arm
        core = core_type(_load(model_dir, dtype), _learner_config(job, updates), context=ctx)
        if rank0:
            return ShardedLearner(core)
        serve_worker(core)
        return None

    class PerRankMeans(ShardedCore):
        """The negative control: each rank normalises by its own loss tokens (the classic bug)."""

        def _loss_normalizer(self, table: torch.Tensor) -> list[int]:
            return table[self.context.rank, :, 0].tolist()

    def single(updates: int = 1, dtype: Any = torch.float64) -> Learner:
        torch.manual_seed(job["seed"] + 1)
        return Learner(_load(model_dir, dtype), _learner_config(job, updates))

    # A (fp64): the main comparison (grammar masks, chunked log-probs, checkpointing, a KL reference
    # snapshot after step 1); the published adapter reloaded with peft.
    learner = sharded()
    state_path = Path(job["out_dir"]) / "learner.pt"
    ref_states = []
    if rank0:
        reference = single()
        initial = _adapter(reference)
        for b, batch in enumerate(batches[:steps]):
            ours = _train(learner, [batch], b, vocab)
            theirs = _train(reference, [batch], b, vocab)
            ref_states.append(_adapter(reference))
            if b == 1:
                # The checkpoint B resumes from: taken mid-run, it must not disturb this run either.
                torch.save(learner.state_dict(), state_path)
            if b == 0:
                result["single_grad_norm_step0"] = theirs.grad_norm
                result["sharded_grad_norm_step0"] = ours.grad_norm
            result.setdefault("constrained_fraction", []).append(ours.constrained_fraction)
            result.setdefault("kl_ref", []).append(ours.kl_ref)
        ref_state = _adapter(reference)
        sharded_state = _adapter(learner)
        result["max_abs_diff"] = _max_diff(sharded_state, ref_state)
        result["update_max_abs"] = _max_diff(ref_state, initial)
        with tempfile.TemporaryDirectory() as tmp:
            learner.save_adapter(Path(tmp) / "adapter")
            reference.save_adapter(Path(tmp) / "single")
            result["reload_logits_max_diff"] = _reload_diff(
                model_dir, Path(tmp) / "adapter", reference, batches[0]
            )
            result["adapter_files"] = sorted(p.name for p in (Path(tmp) / "adapter").iterdir())
            from safetensors.torch import load_file

            ours = load_file(str(Path(tmp) / "adapter" / "adapter_model.safetensors"))
            theirs = load_file(str(Path(tmp) / "single" / "adapter_model.safetensors"))
            result["saved_keys_match_peft"] = sorted(ours) == sorted(theirs)
        shares = [assign_to_ranks([len(t.token_ids) for t in b], ctx.world_size) for b in batches[:steps]]
        result["tokens_per_rank"] = [
            [sum(len(b[k].token_ids) for k in sh) for sh in s]
            for b, s in zip(batches[:steps], shares, strict=True)
        ]
        result["loss_tokens_per_rank"] = [
            [sum(b[k].num_model_tokens for k in sh) for sh in s]
            for b, s in zip(batches[:steps], shares, strict=True)
        ]
        learner.close()
        del reference
    phase("main_comparison")

    # B (fp64): resume after step 2 from A's state (adapter, optimizer, reference snapshot) that went
    # through torch.save / torch.load, on new learners on every rank; then the remaining steps.
    learner = sharded()
    if rank0:
        learner.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
        _train(learner, batches[2:steps], 2, vocab)
        result["resume_max_abs_diff"] = _max_diff(_adapter(learner), sharded_state)
        result["resumed_policy_version"] = learner.policy_version
        learner.close()
    phase("resume")

    if job["full"]:
        # D (fp64): two optimizer updates per batch (the proximal no-grad pass, masked, on every rank).
        learner = sharded(updates=2)
        if rank0:
            reference = single(updates=2)
            _train(learner, batches[:steps], 0, vocab)
            _train(reference, batches[:steps], 0, vocab)
            result["two_updates_max_abs_diff"] = _max_diff(_adapter(learner), _adapter(reference))
            learner.close()
            del reference
        phase("two_updates")

    # Control (fp64): per-rank loss means must show up as a difference far above the tolerance.
    learner = sharded(core_type=PerRankMeans)
    if rank0:
        control_steps = job["control_steps"]
        _train(learner, batches[:control_steps], 0, vocab)
        result["control_steps"] = control_steps
        result["control_per_rank_mean_max_abs_diff"] = _max_diff(
            _adapter(learner), ref_states[control_steps - 1]
        )
        learner.close()
    phase("control")

    if job["timing_steps"]:
        # E (fp32, what CPU runs use): the same comparison, then the timing steps, interleaved.
        learner = sharded(dtype=torch.float32)
        if rank0:
            reference = single(dtype=torch.float32)
            step_s: dict[str, list[float]] = {"single": [], "sharded": []}
            for i, batch in enumerate(batches):
                for name, arm in (("single", reference), ("sharded", learner)):
                    started = time.perf_counter()
                    _train(arm, [batch], i, vocab)
                    if i >= 1:  # the first step pays one-off costs (allocations, first all-gathers)
                        step_s[name].append(time.perf_counter() - started)
                if i + 1 == steps:
                    result["fp32_max_abs_diff"] = _max_diff(_adapter(learner), _adapter(reference))
            result["timed_steps"] = len(step_s["single"])
            result["single_step_s"] = _summary(step_s["single"])
            result["sharded_step_s"] = _summary(step_s["sharded"])
            result["sharded_over_single"] = (
                result["sharded_step_s"]["median"] / result["single_step_s"]["median"]
            )
            learner.close()
    if rank0:
        phase("timing")
        result["phase_s"] = phases
        result["load_avg_1m"] = os.getloadavg()[0]
        result["torch"] = torch.__version__
        Path(job["out_dir"], "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _reload_diff(model_dir: str, folder: Path, reference, batch: list[Any]) -> float:
    import torch
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(_load(model_dir, torch.float64), str(folder)).eval()
    reference.model.eval()
    worst = 0.0
    with torch.no_grad():
        for t in batch[:4]:
            ids = torch.tensor([t.token_ids])
            a = reloaded(input_ids=ids, use_cache=False).logits
            b = reference.model(input_ids=ids, use_cache=False).logits
            worst = max(worst, float((a - b).abs().max()))
    return worst


# --- the launcher --------------------------------------------------------------------------------------


def run(ranks: int, steps: int, timing_steps: int, out_dir: Path, *, full: bool = True) -> dict[str, Any]:
    """Build the tiny model, run the torchrun job, return its result."""
    from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir

    model_dir = build_tiny_model(default_tiny_model_dir())
    job = {
        "model_dir": str(model_dir),
        "vocab": json.loads((model_dir / "config.json").read_text())["vocab_size"],
        "seed": 7,
        "steps": steps,
        "timing_steps": timing_steps,
        "full": full,
        "lr": 1e-2,
        "micro_batch_tokens": 160,
        "chunk_positions": 48,
        "long_episode": 900 if full else 600,
        "control_steps": steps if full else 1,
        "out_dir": str(out_dir),
    }
    env = {**os.environ, RANK_ENV: json.dumps(job), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        str(Path(__file__).resolve()),
    ]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, timeout=1800)
    result = json.loads((out_dir / "result.json").read_text())
    result["job_wall_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timing-steps", type=int, default=6, help="0: equivalence checks only (the test)")
    parser.add_argument("--quick", action="store_true", help="two timing steps")
    parser.add_argument(
        "--ci",
        action="store_true",
        help="what the test runs: the main comparison, the resume and the control "
        "(no two-update arm, no timing)",
    )
    args = parser.parse_args()
    if args.ci:
        args.timing_steps = 0
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the resume check stops after step 2)")
    if args.timing_steps < 0:
        parser.error("--timing-steps must be >= 0")
    with tempfile.TemporaryDirectory() as tmp:
        timing = min(2, args.timing_steps) if args.quick else args.timing_steps
        result = run(args.ranks, args.steps, timing, Path(tmp), full=not args.ci)
    print(json.dumps(result))


if __name__ == "__main__":
    if RANK_ENV in os.environ and "LOCAL_RANK" in os.environ:
        _rank_main(json.loads(os.environ[RANK_ENV]))
    else:
        main()
