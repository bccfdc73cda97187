"""Metric sinks: the same scalars, step by step, to metrics.jsonl, TensorBoard and W&B.

Users watch multi-day runs in TensorBoard or W&B, not in a JSONL file; the run folder's
``metrics.jsonl`` stays the offline copy every tool can read. A ``MetricSink`` takes
``write(step, scalars)`` and ``close()``; ``MetricSinks`` fans one learner record out to all of them,
so every sink sees exactly the same numbers under the same names.

- ``JsonlSink``: appends ``{"step": N, ...}`` lines (the run folder's ``metrics.jsonl``; always on).
  Whole records (with text fields such as ``stage_name``) and events go through ``write_record``.
- ``TensorBoardSink``: TensorBoard's own ``EventFileWriter`` and protos (neither TensorFlow nor torch
  is imported): one event per step with a ``simple_value`` per scalar (the classic form every reader,
  ``EventAccumulator`` included, loads as scalars); the run config as a markdown text summary
  (tag ``config``) and as hparams (the HParams dashboard). Flushed after every step, so the
  dashboard is live.
- ``WandbSink``: ``wandb.init(mode="offline")`` by default (no network; ``wandb sync`` uploads later),
  the config as the run config, quiet on the terminal. ``wandb`` is optional and imported here only.

Left out: which metrics exist (the learner and curriculum decide), MLflow (a sink is ~30 lines).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

TENSORBOARD_DIR = "tensorboard"
"""Event files live in ``<run folder>/tensorboard/``."""
WANDB_DIR = "wandb"
"""W&B's offline runs live in ``<run folder>/wandb/``."""


SinkKind = Literal["tensorboard", "wandb"]


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Where a run's metrics go (the config's ``metrics`` section); ``metrics.jsonl`` always."""

    sinks: tuple[SinkKind, ...] = ("tensorboard",)
    """Live sinks besides ``metrics.jsonl``: ``tensorboard`` (event files in ``<run>/tensorboard``;
    ``tensorboard --logdir runs``) and/or ``wandb`` (needs ``pip install 'envtune[wandb]'``)."""
    wandb_project: str = "envtune"
    """W&B project name."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """``offline`` writes the W&B run under ``<run>/wandb`` without network (``wandb sync`` uploads
    it later); ``online`` streams it."""


class SinkUnavailable(RuntimeError):
    """A configured sink cannot start (its package is missing); the message says how to fix it."""


@runtime_checkable
class MetricSink(Protocol):
    """Somewhere scalars go, step by step."""

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record ``scalars`` (name -> value) at learner step ``step``."""
        ...

    def close(self) -> None:
        """Flush and release files or processes (idempotent)."""
        ...


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a record (bools count as 0/1; text, lists and None are left out)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, int | float):  # bool is an int: counted as 0/1
            out[key] = float(value)
    return out


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as ``{"section.key": value}``: scalars kept, lists and the rest as JSON text
    (TensorBoard's hparams and text summaries take flat values only)."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # metrics.jsonl stays strict JSON
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class JsonlSink:
    """Appends one JSON line per step (and per event) to a file; each line is flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        self.write_record({"step": step, **scalars})

    def write_record(self, record: Mapping[str, Any]) -> None:
        """A whole record: a step's metrics with its text fields, or an event (``{"event": ...}``)."""
        if self._handle.closed:
            raise ValueError(f"{self.path}: sink is closed")
        self._handle.write(json.dumps(_json_safe(record), ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


def _config_markdown(flat: Mapping[str, Any]) -> str:
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in sorted(flat.items()))
    return f"| key | value |\n|---|---|\n{rows}"


class TensorBoardSink:
    """TensorBoard event files under ``logdir`` (see the module docstring)."""

    def __init__(self, logdir: Path, *, config: Mapping[str, Any] | None = None) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer: Any = EventFileWriter(str(self.logdir))
        self._closed = False
        if config:
            self._write_config(flatten_config(config))

    def _write_config(self, flat: Mapping[str, str | int | float | bool]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
        from tensorboard.plugins.hparams import summary_v2 as hparams
        from tensorboard.plugins.text import metadata as text_metadata

        tensor = tensor_pb2.TensorProto(
            dtype="DT_STRING",
            string_val=[_config_markdown(flat).encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[]),
        )
        text = summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(
                    tag="config",
                    metadata=text_metadata.create_summary_metadata(display_name="config", description=""),
                    tensor=tensor,
                )
            ]
        )
        now = time.time()
        self._writer.add_event(event_pb2.Event(wall_time=now, step=0, summary=text))
        hparams_summary = hparams.hparams_pb(dict(flat), start_time_secs=int(now))
        self._writer.add_event(event_pb2.Event(wall_time=now, step=0, summary=hparams_summary))
        self._writer.flush()

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        if self._closed:
            raise ValueError(f"{self.logdir}: sink is closed")
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]
        event = event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values))
        self._writer.add_event(event)
        # A learner step takes seconds to minutes: flushing each one is what makes the dashboard live.
        self._writer.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()


class WandbSink:
    """A W&B run; offline unless told otherwise (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        project: str,
        name: str,
        config: Mapping[str, Any] | None = None,
        mode: str = "offline",
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"W&B mode must be offline, online or disabled, got {mode!r}")
        try:
            import wandb
        except ImportError as exc:
            raise SinkUnavailable(
                "W&B logging is configured but the wandb package is missing: "
                "pip install 'envtune[wandb]' (wandb>=0.31), or remove wandb from the metric sinks"
            ) from exc
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", quiet=True, x_disable_stats=True)
        self._run: Any = wandb.init(
            project=project,
            name=name,
            dir=str(self.directory),
            config=dict(config or {}),
            mode=mode,  # type: ignore[arg-type]  # one of the three modes checked above
            settings=settings,
        )
        self._wandb: Any = wandb
        self._closed = False

    @property
    def run_dir(self) -> Path:
        """The W&B run's own folder (holds the ``.wandb`` file ``wandb sync`` uploads)."""
        return Path(self._run.dir).parent

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._closed:
            raise ValueError("W&B sink is closed")
        self._run.log(dict(scalars), step=step)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._run.finish()
            # finish() can return before W&B's service has flushed the run file (wandb 0.31: the
            # .wandb file still held only its header right after finish); teardown waits for the
            # service to exit. envtune opens one W&B run per process, so nothing else is cut short.
            self._wandb.teardown()


class MetricSinks:
    """Fans each learner record out: the whole record to ``metrics.jsonl``, its scalars to every sink."""

    def __init__(self, jsonl: JsonlSink, others: Iterable[MetricSink] = ()) -> None:
        self.jsonl = jsonl
        self.others = tuple(others)

    def write_step(self, record: Mapping[str, Any]) -> None:
        """One learner step's record (must hold ``step``)."""
        step = int(record["step"])
        self.jsonl.write_record(record)
        scalars = scalars_of({k: v for k, v in record.items() if k != "step"})
        for sink in self.others:
            sink.write(step, scalars)

    def write_event(self, record: Mapping[str, Any]) -> None:
        """An event record (promotion, runtime sample...): metrics.jsonl only."""
        self.jsonl.write_record(record)

    def close(self) -> None:
        """Close every sink, even when one fails (the first failure is raised afterwards)."""
        failure: BaseException | None = None
        for sink in (*self.others, self.jsonl):
            try:
                sink.close()
            except Exception as exc:  # one broken sink must not leave the others open
                failure = failure or exc
        if failure is not None:
            raise failure


def open_sinks(
    run_folder: Path,
    kinds: Iterable[str],
    *,
    config: Mapping[str, Any],
    run_name: str,
    wandb_project: str = "envtune",
    wandb_mode: str = "offline",
) -> MetricSinks:
    """The sinks a run's config names (``"tensorboard"``, ``"wandb"``); metrics.jsonl always.

    Raises ``ValueError`` for an unknown kind and ``SinkUnavailable`` for a missing package, before
    any file is written, so a misconfigured run fails at once rather than after hours.
    """
    kinds = tuple(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in ("tensorboard", "wandb")]
    if unknown:
        raise ValueError(f"unknown metric sink {unknown[0]!r}; valid: 'tensorboard', 'wandb'")
    folder = Path(run_folder)
    others: list[MetricSink] = []
    try:
        for kind in kinds:
            if kind == "tensorboard":
                others.append(TensorBoardSink(folder / TENSORBOARD_DIR, config=config))
            else:
                others.append(
                    WandbSink(
                        folder / WANDB_DIR,
                        project=wandb_project,
                        name=run_name,
                        config=config,
                        mode=wandb_mode,
                    )
                )
    except BaseException:
        for sink in others:
            sink.close()
        raise
    return MetricSinks(JsonlSink(folder / "metrics.jsonl"), others)


def open_run_sinks(run_folder: Path, metrics: MetricsConfig, config: Mapping[str, Any]) -> MetricSinks:
    """A run's sinks as its ``metrics`` section names them, ``config`` (the whole run config as plain
    data) attached to each; the run's folder name is the W&B run name."""
    return open_sinks(
        run_folder,
        metrics.sinks,
        config=config,
        run_name=Path(run_folder).name,
        wandb_project=metrics.wandb_project,
        wandb_mode=metrics.wandb_mode,
    )
