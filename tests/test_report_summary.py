"""The report's headline, warnings and per-stage reward curves say whether a run learned."""

from __future__ import annotations

from pathlib import Path

import pytest
from envtune.runtime.recipe.report import PLOTS, write_report
from envtune.runtime.recipe.report_summary import headline, warnings
from envtune.runtime.recipe.run_folder import RunFolder


def _records(zero_variance: float, grad_norm: float) -> list[dict[str, object]]:
    steps: list[dict[str, object]] = []
    for step in range(1, 13):
        stage = "syntax" if step <= 6 else "hints"
        steps.append(
            {
                "step": step, "time_s": 10.0 * step, "stage": 1 + (step > 6), "stage_name": stage,
                "train/reward": 0.1 * step, "train/groups": 4.0, "train/zero_variance_share": zero_variance,
                "learner/grad_norm": grad_norm, "learner/loss": 0.5, "learner/num_loss_tokens": 4000.0,
                "rollout/episodes_completed": 8.0 * step,
                **({"validation/accuracy": 0.05 * step} if step % 4 == 0 else {}),
            }
        )  # fmt: skip
    return steps


def test_headline_numbers() -> None:
    line = headline(_records(0.25, 0.3))
    assert line.stages == ("syntax", "hints") and line.steps == 12
    assert line.wall_s == 120.0 and line.validation_accuracy == pytest.approx(0.6)
    assert line.episodes_per_s == 96 / 120
    # Each stage's own trend (quarters of 6 steps: one step each); stages are never mixed.
    syntax, hints = line.stage_rewards
    assert (syntax.stage, syntax.steps, syntax.first, syntax.last) == ("syntax", 6, 0.1, pytest.approx(0.6))
    assert (hints.stage, hints.first, hints.last) == ("hints", pytest.approx(0.7), pytest.approx(1.2))
    assert "syntax 0.100 → 0.600 (6 steps), hints 0.700 → 1.200 (6 steps)" in line.text()
    assert "12 learner steps" in line.text() and "syntax → hints" in line.text() and "2:00" in line.text()


def test_warnings_name_what_stopped_learning() -> None:
    assert warnings(_records(0.25, 0.3), []) == []
    found = warnings(_records(0.9, 0.0), [{"event": "run_failed", "step": 3, "message": "no learner step"}])
    assert len(found) == 5
    assert "failed at step 3: no learner step" in found[0]
    assert "Stage syntax: 90% of its 24 groups had zero reward variance" in found[1]
    assert "Stage syntax: the gradient norm was zero in 6 of 6" in found[2]
    assert len(warnings(_records(0.9, 0.0), [])) == 4  # both stages, both reasons


def test_the_page_leads_with_the_headline_and_per_stage_curves(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path, "t")
    for record in _records(0.9, 0.3):
        folder.append_metrics(record)
    folder.append_metrics(
        {"event": "promotion", "step": 6, "from_name": "syntax", "to_name": "hints", "reason": "plateau",
         "detail": "validation/progress plateaued"}
    )  # fmt: skip
    page = write_report(folder).read_text()
    assert "12 learner steps; stages syntax → hints" in page
    assert "Warning:</b> Stage syntax: 90% of its 24 groups" in page
    assert "validation/progress plateaued" in page  # why the stage ended, in the promotions table
    assert page.index("stage_rewards.png") < page.index("rewards.png'")  # the stage curves come first
    assert (folder.report_dir / "stage_rewards.png").read_bytes()[:4] == b"\x89PNG"


def test_the_learner_plot_holds_no_counts() -> None:
    learner = next(spec for spec in PLOTS if spec.file_name == "learner.png")
    assert not learner.select("learner/num_loss_tokens")
    health = ("learner/loss", "learner/pg_loss", "learner/kl_ref", "learner/grad_norm")
    assert all(learner.select(k) for k in health)
