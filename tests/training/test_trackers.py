"""--report_to wandb / tensorboard for real: a 2-step train_sdft.py run, then its tracker files read back.

Both packages are installed in the test environment (extra `tracking`). wandb runs offline (no
key); its run file is read with a small reader of the LevelDB-log framing wandb documents for `.wandb` files (wandb's
own reader moved into its Go core) and parsed with wandb's protobuf `Record`. Tensorboard's event files are read with
tensorboard's EventAccumulator. Every step's values must equal metrics.jsonl: exactly for wandb (JSON numbers),
to float32 for tensorboard (its scalar summaries are float32).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from sdft_utils.testing import run_training_script

pytest.importorskip("wandb")
pytest.importorskip("tensorboard")

LEVELDB_BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def write_dataset(path: Path) -> Path:
    rows = [{"prompt": f"What is the code word number {i}?", "demonstration": f"The code word is w{i}x."}
            for i in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def two_steps(tiny_model_dir: Path, root: Path, report_to: str) -> Path:
    output_dir = root / "out"
    run_training_script("train_sdft.py", "--model", tiny_model_dir, "--dataset", write_dataset(root / "train.jsonl"),
                        "--output_dir", output_dir, "--prompts_per_step", 4, "--per_device_batch_size", 2,
                        "--max_completion_length", 8, "--max_prompt_length", 48, "--gradient_checkpointing", "false",
                        "--max_steps", 2, "--report_to", report_to, "--run_name", "tracked")
    return output_dir


def metrics_jsonl(output_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row.pop("step"): row for row in rows}


def wandb_records(path: Path):
    """Payloads of a `.wandb` file: a 7-byte header (":W&B", magic 0xBEE1, version), then LevelDB log blocks of
    32 KiB holding records (crc32 of type + data, length, type, data), a record split over blocks as FIRST..LAST."""
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    offset, pending = 7, b""
    while offset + 7 <= len(data):
        left = LEVELDB_BLOCK - offset % LEVELDB_BLOCK
        if left < 7:  # a block trailer too short for a header
            offset += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if kind == 0:  # zero padding to the block's end
            offset += left
            continue
        payload = data[offset + 7:offset + 7 + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum
        offset += 7 + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload


def wandb_history(output_dir: Path) -> dict[int, dict]:
    from wandb.proto import wandb_internal_pb2

    (run_file,) = output_dir.glob("wandb/offline-run-*/run-*.wandb")  # inside the output folder, not ./wandb
    history = {}
    for payload in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row.pop("_step")] = {key: value for key, value in row.items() if not key.startswith("_")}
    return history


def test_wandb_offline_run_holds_the_metrics_of_metrics_jsonl(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables wandb; without a key the run goes offline
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    output_dir = two_steps(tiny_model_dir, tmp_path, "wandb")
    expected, logged = metrics_jsonl(output_dir), wandb_history(output_dir)
    assert sorted(logged) == sorted(expected) == [1, 2]
    for step, row in expected.items():
        assert logged[step] == {key: value for key, value in row.items() if value is not None}
        assert "loss" in logged[step] and "kl" in logged[step]


def test_tensorboard_events_hold_the_metrics_of_metrics_jsonl(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = two_steps(tiny_model_dir, tmp_path, "tensorboard")
    events = EventAccumulator(str(output_dir / "tracked"), size_guidance={"scalars": 0}).Reload()
    expected = metrics_jsonl(output_dir)
    logged: dict[int, dict] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            logged.setdefault(event.step, {})[tag] = event.value
    assert sorted(logged) == sorted(expected) == [1, 2]
    for step, row in expected.items():
        finite = {key: value for key, value in row.items() if value is not None}
        assert set(logged[step]) == set(finite)
        for key, value in finite.items():
            assert np.float32(logged[step][key]) == np.float32(value), key
    assert list(output_dir.glob("tracked/*/hparams.yml"))  # the run's flags, None and lists included
