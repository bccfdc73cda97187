"""The grammar masks a batch was sampled under, for the learner: from trajectories to ``token_masks``.

Each ``Trajectory`` records the constraint of every reply sampled under a grammar
(``agents.ConstraintSpan``); ``mask_replay.MaskReplayer`` rebuilds the token masks of one reply from
its constraint and sampled ids. This module joins the two: ``reply_constraints`` lines a
trajectory's spans up with its replies (the runs of sampled tokens), and ``BatchMasks.source`` gives
``Learner.step`` the ``token_masks`` callable of a batch, or None when nothing in it was constrained
(the learner then skips masking). Stages whose ``learner_masks`` is ``unconstrained_target`` cannot
sample under a grammar (the config refuses it), so a recorded constraint always means replay.

Left out: the replay itself (``mask_replay``), the learner's masked logprobs (``optim.logprobs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from envtune.agents.engine import Constraint
from envtune.agents.trajectory import Trajectory
from envtune.runtime.recipe.mask_replay import MaskReplayer, ReplayError, loss_runs


def reply_constraints(trajectory: Trajectory) -> list[Constraint | None]:
    """The constraint of each reply (run of sampled tokens) of ``trajectory``, None where unconstrained.

    ReplayError when a recorded span is not exactly one reply (the record and the ids disagree).
    """
    by_start = {span.start: span for span in trajectory.constraint_spans}
    out: list[Constraint | None] = []
    for start, end in loss_runs(trajectory.loss_mask):
        span = by_start.pop(start, None)
        if span is not None and span.end != end:
            raise ReplayError(
                f"{trajectory.task_id}/{trajectory.group_id}: constraint span [{span.start}, {span.end}) "
                f"does not cover the reply [{start}, {end})"
            )
        out.append(span.constraint if span is not None else None)
    if by_start:
        raise ReplayError(
            f"{trajectory.task_id}/{trajectory.group_id}: constraint spans at {sorted(by_start)} "
            "start no reply"
        )
    return out


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The stop ids an engine's grammar compiler is built with: the model's generation-config EOS ids
    and the tokenizer's EOS (what ``EmbeddedEngine`` uses; an SGLang server uses its model's EOS)."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(token) for token in eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


class BatchMasks:
    """``token_masks`` for ``Learner.step`` from the trajectories' recorded constraints."""

    def __init__(self, replayer: MaskReplayer) -> None:
        self.replayer = replayer

    @classmethod
    def for_model(cls, model: Any, tokenizer: Any) -> BatchMasks:
        """Masks as an engine serving ``model`` with ``tokenizer`` builds them (vocabulary = the
        model's logits width, stop ids = its EOS ids)."""
        return cls(MaskReplayer(tokenizer, int(model.config.vocab_size), eos_token_ids(model, tokenizer)))

    @classmethod
    def for_model_path(cls, path: Path, tokenizer: Any) -> BatchMasks:
        """``for_model`` from the model's folder, without loading its weights (the learner may be
        sharded over ranks, or not built here)."""
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(path)
        try:
            generation = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: what from_pretrained derives from the config
            generation = GenerationConfig.from_model_config(config)
        return cls.for_model(SimpleNamespace(config=config, generation_config=generation), tokenizer)

    def source(self, trajectories: Sequence[Trajectory]) -> Any:
        """The ``token_masks`` callable of this batch (masks replayed when the learner asks, one
        micro-batch at a time), or None when no trajectory was sampled under a grammar."""
        if not any(t.constrained for t in trajectories):
            return None
        constraints = [reply_constraints(t) for t in trajectories]  # fail here, before the step starts
        return self.replayer.mask_source(trajectories, constraints)
