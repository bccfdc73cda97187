"""Metric sinks: every sink gets the same scalars, read back with each tool's own reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from envtune.runtime.recipe.sinks import (
    JsonlSink,
    MetricSinks,
    SinkUnavailable,
    TensorBoardSink,
    WandbSink,
    flatten_config,
    open_sinks,
    scalars_of,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CONFIG = {
    "model": {"path": "", "tiny_seed": 0},
    "rollout": {"group_size": 4, "sampling": {"temperature": 1.0}},
    "learner": {"lora": {"target_modules": ["q_proj", "v_proj"]}},
    "run": {"name": "demo", "progress_bar": True},
}
RECORDS = [
    {
        "step": step,
        "stage": 1,
        "stage_name": "syntax",
        "learner/loss": 0.5 / step,
        "train/reward": 0.1 * step,
        "rollout/episodes_per_s": 2.0 + step,
        "groups/discarded/stale": step - 1,
    }
    for step in (1, 2, 3)
]


def _load_events(logdir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_scalars_of_and_flatten_config() -> None:
    assert scalars_of({"a": 1, "b": True, "c": "x", "d": None, "e": [1], "f": 2.5}) == {
        "a": 1.0,
        "b": 1.0,
        "f": 2.5,
    }
    flat = flatten_config(CONFIG)
    assert flat["rollout.sampling.temperature"] == 1.0
    assert flat["learner.lora.target_modules"] == '["q_proj", "v_proj"]'
    assert flat["run.progress_bar"] is True


def test_tensorboard_events_load_with_tensorboards_reader(tmp_path: Path) -> None:
    sinks = open_sinks(tmp_path, ["tensorboard"], config=CONFIG, run_name="demo")
    for record in RECORDS:
        sinks.write_step(record)
    sinks.close()
    accumulator = _load_events(tmp_path / "tensorboard")
    tags = accumulator.Tags()
    expected = {"stage", "learner/loss", "train/reward", "rollout/episodes_per_s", "groups/discarded/stale"}
    assert set(tags["scalars"]) == expected  # text fields (stage_name) are not scalars
    for tag in expected:
        events = accumulator.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3]
        assert [e.value for e in events] == pytest.approx([float(r[tag]) for r in RECORDS], rel=1e-6)
    # The config rides along as a text summary and as hparams.
    assert "config" in tags["tensors"]
    (text,) = accumulator.Tensors("config")
    markdown = text.tensor_proto.string_val[0].decode()
    assert "| `rollout.group_size` | `4` |" in markdown
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["rollout.group_size"].number_value == 4
    assert hparams["run.name"].string_value == "demo"
    # The same numbers went to metrics.jsonl, with the text fields.
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == RECORDS


def test_tensorboard_is_live_without_close(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path)
    sink.write(7, {"a/b": 1.5})
    accumulator = _load_events(tmp_path)  # read while the writer is still open
    assert [(e.step, e.value) for e in accumulator.Scalars("a/b")] == [(7, 1.5)]
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(ValueError):
        sink.write(8, {"a/b": 1.0})


def test_jsonl_events_and_non_finite_values(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sinks = MetricSinks(sink)
    sinks.write_step({"step": 1, "x": float("nan")})
    sinks.write_event({"event": "promotion", "step": 1, "from_stage": 1})
    sinks.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "x": None}, {"event": "promotion", "step": 1, "from_stage": 1}]


def test_unknown_sink_fails_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mlflow"):
        open_sinks(tmp_path, ["tensorboard", "mlflow"], config=CONFIG, run_name="x")
    assert not (tmp_path / "tensorboard").exists()


def test_wandb_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(SinkUnavailable, match=r"pip install 'envtune\[wandb\]'"):
        WandbSink(tmp_path, project="p", name="n")


# --- W&B offline, read back from the run file -----------------------------------------------------


def _wandb_records(path: Path) -> list[Any]:
    """Records of a ``.wandb`` file: a 7-byte header, then a LevelDB-style log of protobuf records
    (32 KiB blocks; each chunk has crc32c(4), length(2), type(1): 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += block - pos % block if pos % block else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_gets_the_same_scalars_and_the_config(tmp_path: Path) -> None:
    sinks = open_sinks(tmp_path, ["wandb"], config=CONFIG, run_name="demo", wandb_project="envtune-test")
    (wandb_sink,) = sinks.others
    assert isinstance(wandb_sink, WandbSink)
    run_dir = wandb_sink.run_dir
    for record in RECORDS:
        sinks.write_step(record)
    sinks.close()
    (run_file,) = run_dir.glob("run-*.wandb")
    records = _wandb_records(run_file)
    history: dict[int, dict[str, Any]] = {}
    config: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history[int(items["_step"])] = items
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    assert sorted(history) == [1, 2, 3]
    for record in RECORDS:
        logged = history[int(record["step"])]
        for key, value in scalars_of(record).items():
            if key != "step":
                assert logged[key] == pytest.approx(value)
    assert config["rollout"] == {"group_size": 4, "sampling": {"temperature": 1.0}}


def test_tensorboard_sink_needs_neither_tensorflow_nor_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from envtune.runtime.recipe.sinks import TensorBoardSink\n"
        f"sink = TensorBoardSink({str(tmp_path)!r}, config={{'a': 1}})\n"
        "sink.write(1, {'x': 1.0}); sink.close()\n"
        "print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
