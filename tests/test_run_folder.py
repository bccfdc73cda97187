"""Run folders: records, atomic checkpoints, resume picking, and the report."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest
from envtune.runtime.recipe.config import Config, dump_config, load_config
from envtune.runtime.recipe.report import PLOTS, write_report
from envtune.runtime.recipe.run_folder import COMPLETE, RunFolder, RunFolderError


def _folder(tmp_path: Path) -> RunFolder:
    folder = RunFolder.create(
        tmp_path / "runs", "my run/1", now=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    )
    folder.write_config(dump_config(Config()))
    return folder


def test_create_names_folders_by_time_and_never_reuses_one(tmp_path: Path) -> None:
    first = _folder(tmp_path)
    second = RunFolder.create(
        tmp_path / "runs", "my run/1", now=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    )
    assert first.path.name == "20260102-030405-my-run-1"
    assert second.path.name == "20260102-030405-my-run-1-1"
    assert load_config(first.config_path) == Config()
    with pytest.raises(RunFolderError):
        RunFolder.open(second.path)  # no config snapshot yet


def test_metrics_are_strict_json_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    folder.append_metrics({"step": 1, "train/reward": float("nan"), "x": 1.5})
    folder.append_metrics({"event": "promotion", "step": 1})
    with folder.metrics_path.open("a") as handle:
        handle.write('{"step": 2, "trunc')  # a crash mid-append
    assert folder.read_metrics() == [
        {"step": 1, "train/reward": None, "x": 1.5},
        {"event": "promotion", "step": 1},
    ]


def test_checkpoint_round_trip_and_pruning(tmp_path: Path) -> None:
    folder = _folder(tmp_path)

    def write(path: Path) -> None:
        (path / "adapter").mkdir()
        (path / "adapter" / "weights.bin").write_bytes(b"w" * 100)
        (path / "optimizer.pt").write_bytes(b"o" * 10)

    for step in (2, 4, 6):
        folder.save_checkpoint(step, {"curriculum": {"index": step}}, write)
    latest = folder.latest_complete_checkpoint()
    assert latest is not None and latest.step == 6
    assert latest.state == {"curriculum": {"index": 6}, "step": 6}
    assert (latest.path / "adapter" / "weights.bin").read_bytes() == b"w" * 100
    manifest = json.loads((latest.path / COMPLETE).read_text())
    assert manifest["files"]["optimizer.pt"] == 10
    folder.prune_checkpoints(keep=2)
    assert [c.step for c in folder.checkpoints()] == [4, 6]
    folder.save_checkpoint(6, {"again": True}, write)  # re-saving a step replaces it atomically
    assert folder.latest_complete_checkpoint().state["again"] is True  # type: ignore[union-attr]


def test_incomplete_or_damaged_checkpoints_are_ignored(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    folder.save_checkpoint(1, {"ok": True}, lambda p: (p / "adapter.bin").write_bytes(b"x" * 8))
    # A crash before the marker: a later step without COMPLETE.
    partial = folder.checkpoints_dir / "step-000002"
    partial.mkdir()
    (partial / "state.json").write_text("{}")
    # A marker whose files no longer match (truncated copy).
    folder.save_checkpoint(3, {"ok": True}, lambda p: (p / "adapter.bin").write_bytes(b"x" * 8))
    with (folder.checkpoints_dir / "step-000003" / "adapter.bin").open("r+b") as handle:
        handle.truncate(4)
    # A temp folder left by a crash mid-write.
    (folder.checkpoints_dir / ".step-000004-abc").mkdir()
    latest = folder.latest_complete_checkpoint()
    assert latest is not None and latest.step == 1
    assert RunFolder.latest_run(tmp_path / "runs") == folder.path


def test_a_failing_writer_leaves_nothing_behind(tmp_path: Path) -> None:
    folder = _folder(tmp_path)

    def boom(path: Path) -> None:
        (path / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        folder.save_checkpoint(5, {}, boom)
    assert os.listdir(folder.checkpoints_dir) == []
    assert folder.latest_complete_checkpoint() is None


def test_truncate_after_drops_later_records(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    for step in range(1, 6):
        folder.append_metrics({"step": step, "v": step})
        folder.append_trajectories([{"step": step, "text": "hi"}])
    folder.truncate_after(3)
    assert [r["step"] for r in folder.read_metrics()] == [1, 2, 3]
    assert [r["step"] for r in folder.read_trajectories()] == [1, 2, 3]


def test_report_writes_plots_and_an_html_page(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    for step in range(1, 13):
        folder.append_metrics(
            {
                "step": step,
                "train/progress": step / 12,
                "train/format_reward": min(1.0, step / 6),
                "train/tool_reward": 0.5,
                "validation/progress": step / 24 if step % 4 == 0 else None,
                "train/zero_variance_share": 0.25,
                "curriculum/stage": 1 + (step > 4) + (step > 8),
                "rollout/tokens_per_s": 100.0 + step,
                "rollout/staleness_mean": 0.5,
                "learner/loss": 1.0 / step,
                "learner/num_loss_tokens": 1000 + step,
                "learner/entropy": 7.5,
            }
        )
        if step in (4, 8):
            folder.append_metrics(
                {"event": "promotion", "step": step, "from_name": "a", "to_name": "b", "reason": "budget"}
            )
    index = write_report(folder)
    page = index.read_text()
    for name in ("rewards.png", "curriculum.png", "throughput.png", "staleness.png", "learner.png"):
        png = folder.report_dir / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 5000
        assert f"src='{name}'" in page
    assert "budget" in page and "train/progress" in page and "[learner]" in page


def test_report_of_an_empty_run_still_renders(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    page = write_report(folder).read_text()
    assert "0 learner steps logged" in page and "<img" not in page


def test_learner_plot_keeps_losses_on_their_own_panel() -> None:
    """A token count matched as a "loss" once flattened every learner series onto the axis."""
    learner = next(spec for spec in PLOTS if spec.file_name == "learner.png")
    keys = [
        "learner/loss", "learner/pg_loss", "learner/num_loss_tokens", "learner/kl_ref", "learner/behavior_kl",
        "learner/entropy", "learner/grad_norm", "learner/clip_fraction", "learner/dual_clip_fraction",
        "learner/lr", "learner/behavior_weight_max", "train/reward",
    ]  # fmt: skip
    assert list(learner.panels(keys)) == ["loss", "KL", "entropy", "gradient norm", "clip fraction"]
    assert learner.panels(keys) == {
        "loss": ["learner/loss", "learner/pg_loss"],
        "KL": ["learner/kl_ref", "learner/behavior_kl"],
        "entropy": ["learner/entropy"],
        "gradient norm": ["learner/grad_norm"],
        "clip fraction": ["learner/clip_fraction", "learner/dual_clip_fraction"],
    }
    throughput = next(spec for spec in PLOTS if spec.file_name == "throughput.png")
    assert throughput.panels(["rollout/episodes_per_s", "rollout/tokens_per_s", "learner/tokens_per_s"]) == {
        "episodes / s": ["rollout/episodes_per_s"],
        "tokens / s": ["rollout/tokens_per_s", "learner/tokens_per_s"],
    }
