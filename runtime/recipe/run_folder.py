"""A run folder: config snapshot, metrics, sample trajectories, atomic checkpoints, the report.

Layout of ``<out_dir>/<UTC timestamp>-<name>/``::

    config.toml            the full config the run used (commented; loads back with load_config)
    metrics.jsonl          one JSON object per learner step, plus event records ({"event": ...})
    trajectories.jsonl     sampled trajectories, decoded for reading
    checkpoints/step-N/    learner files + state.json + COMPLETE (written last)
    report/                PNG plots and index.html (runtime/report.py)

Checkpoints are atomic: everything is written into a hidden temp folder beside the final one,
each file fsync'ed, the ``COMPLETE`` marker (listing every file and its size) written last, then
the folder is renamed into place and the parent fsync'ed. A folder without a valid marker (a crash
mid-write, a half-copied folder) is never picked up by ``latest_complete_checkpoint()``.

Leftovers of a process killed mid-write (temp checkpoint folders ``.step-*``, the ``.trash-*`` of a
re-save, temp files of atomic writes, the publisher's temp adapter folders) are removed when the
folder is created or reopened, and at every prune; a torn last line of a ``.jsonl`` file is skipped
on read, reported in the log, and dropped by ``truncate_after`` (so a resume repairs it).

Left out: what goes into a checkpoint (the caller's ``write`` callback and ``state``), and any
metric computation.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

COMPLETE = "COMPLETE"
"""Marker file name; its presence with a valid file list makes a checkpoint complete."""
STATE_FILE = "state.json"
"""The JSON-able run state stored in every checkpoint (step, curriculum, policy version...)."""
_STEP_DIR = re.compile(r"^step-(\d+)$")


class RunFolderError(RuntimeError):
    """The run folder is missing, or not a run folder."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A complete checkpoint on disk."""

    step: int
    """Learner step it was taken after."""
    path: Path
    """Its folder (learner files, ``state.json``, ``COMPLETE``)."""
    state: Mapping[str, Any]
    """The run state saved with it."""


def _json_safe(value: Any) -> Any:
    """Non-finite floats become None: metrics.jsonl stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file, fsync and rename (readers see old or new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class RunFolder:
    """One run's folder on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, out_dir: Path, name: str, now: dt.datetime | None = None) -> RunFolder:
        """A new, empty run folder ``<out_dir>/<YYYYmmdd-HHMMSS>-<name>`` (suffixed if taken)."""
        stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d-%H%M%S")
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for attempt in range(1000):
            path = Path(out_dir) / (f"{stamp}-{safe}" if attempt == 0 else f"{stamp}-{safe}-{attempt}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            folder = cls(path)
            folder.checkpoints_dir.mkdir()
            return folder
        raise RunFolderError(f"could not create a run folder under {out_dir}")

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        """An existing run folder (for ``--resume``); leftovers of a killed process are removed."""
        folder = cls(path)
        if not folder.config_path.exists():
            raise RunFolderError(f"{path} is not a run folder (no config.toml)")
        folder.checkpoints_dir.mkdir(exist_ok=True)
        folder.remove_leftovers()
        return folder

    def remove_leftovers(self) -> list[Path]:
        """Delete what a process killed mid-write leaves behind; returns what was removed.

        Never a complete checkpoint: only hidden temp folders and files, which no reader uses.
        """
        patterns = [
            (self.checkpoints_dir, ".step-*"),
            (self.checkpoints_dir, ".trash-*"),
            (self.path, ".config.toml.*"),
            (self.path, ".metrics.jsonl.*"),
            (self.path, ".trajectories.jsonl.*"),
            (self.path / "adapters", ".tmp-*"),
            (self.path / "adapters", ".old-*"),
        ]
        removed = [p for parent, pattern in patterns if parent.is_dir() for p in parent.glob(pattern)]
        for leftover in removed:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        if removed:
            log.info("run_folder_leftovers_removed", paths=[str(p) for p in removed])
        return removed

    @staticmethod
    def latest_run(out_dir: Path) -> Path | None:
        """The newest run folder under ``out_dir`` that has a complete checkpoint, if any."""
        if not Path(out_dir).is_dir():
            return None
        candidates = sorted(
            (p for p in Path(out_dir).iterdir() if p.is_dir() and (p / "config.toml").exists()),
            key=lambda p: p.name,
            reverse=True,
        )
        for candidate in candidates:
            if RunFolder(candidate).latest_complete_checkpoint() is not None:
                return candidate
        return None

    # --- paths ------------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def trajectories_path(self) -> Path:
        return self.path / "trajectories.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    # --- records ----------------------------------------------------------------------------------

    def write_config(self, text: str) -> None:
        """The config snapshot (TOML text)."""
        atomic_write_text(self.config_path, text)

    def _append(self, path: Path, records: Iterable[Mapping[str, Any]]) -> None:
        lines = "".join(json.dumps(_json_safe(record), ensure_ascii=False) + "\n" for record in records)
        if lines:
            with path.open("a", encoding="utf-8") as handle:
                handle.write(lines)
                handle.flush()

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """One metrics record (a step's metrics, or an event with an ``event`` key)."""
        self._append(self.metrics_path, [record])

    def append_trajectories(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Decoded trajectory records."""
        self._append(self.trajectories_path, records)

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        records = []
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    # A line cut by a crash mid-append: everything before it is intact.
                    log.warning("run_folder_skipped_torn_line", path=str(path))
        return records

    def read_metrics(self) -> list[dict[str, Any]]:
        return self._read(self.metrics_path)

    def read_trajectories(self) -> list[dict[str, Any]]:
        return self._read(self.trajectories_path)

    def truncate_after(self, step: int) -> None:
        """Drop metrics and trajectory records of steps after ``step`` (resume replays them)."""
        for path in (self.metrics_path, self.trajectories_path):
            if path.exists():
                kept = [r for r in self._read(path) if int(r.get("step", 0)) <= step]
                atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    # --- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(
        self, step: int, state: Mapping[str, Any], write: Callable[[Path], None] | None = None
    ) -> Path:
        """Atomically write checkpoint ``step``: ``write(folder)`` adds the learner's files."""
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints_dir / f"step-{step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=self.checkpoints_dir))
        try:
            if write is not None:
                write(tmp)
            (tmp / STATE_FILE).write_text(json.dumps(_json_safe({**state, "step": step})), encoding="utf-8")
            files = {}
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                with file.open("rb") as handle:
                    os.fsync(handle.fileno())
                files[file.relative_to(tmp).as_posix()] = file.stat().st_size
            for folder in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
                _fsync_dir(folder)
            marker = tmp / COMPLETE
            with marker.open("w", encoding="utf-8") as handle:
                json.dump({"step": step, "files": files}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(tmp)
            if final.exists():
                # Re-saving a step (after a resume): move the old one aside, then delete it.
                trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.checkpoints_dir))
                os.replace(final, trash / final.name)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.checkpoints_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("checkpoint_saved", step=step, path=str(final))
        return final

    @staticmethod
    def _load_if_complete(folder: Path, step: int) -> Checkpoint | None:
        marker = folder / COMPLETE
        try:
            manifest = json.loads(marker.read_text(encoding="utf-8"))
            if manifest.get("step") != step:
                return None
            for name, size in manifest["files"].items():
                if (folder / name).stat().st_size != size:
                    return None
            state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return Checkpoint(step=step, path=folder, state=state)

    def checkpoints(self) -> list[Checkpoint]:
        """Every complete checkpoint, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for folder in self.checkpoints_dir.iterdir():
            match = _STEP_DIR.match(folder.name)
            if match and folder.is_dir():
                checkpoint = self._load_if_complete(folder, int(match.group(1)))
                if checkpoint is not None:
                    found.append(checkpoint)
        return sorted(found, key=lambda c: c.step)

    def latest_complete_checkpoint(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest ``keep`` complete checkpoints, and leftover temp folders."""
        for old in self.checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old.path, ignore_errors=True)
        for pattern in (".step-*", ".trash-*"):
            for leftover in self.checkpoints_dir.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
