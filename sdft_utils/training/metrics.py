"""Metrics: one JSON line per step in OUTPUT_DIR/metrics.jsonl, plus accelerate's trackers (wandb, tensorboard).

Both trackers write inside the run's output folder: tensorboard event files in OUTPUT_DIR/RUN_NAME/, the wandb run in
OUTPUT_DIR/wandb/ (offline unless an API key or WANDB_MODE is set; `wandb sync OUTPUT_DIR/wandb/offline-run-*` uploads
it). Each step's values are the ones in metrics.jsonl, where a non-finite value is written as null and a None value
is left out of the trackers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, TensorBoardTracker, WandBTracker, register_tracker_class

from sdft_utils.errors import UserInputError

REPORT_TO_CHOICES = ["none", "wandb", "tensorboard"]


class RunTensorBoard(TensorBoardTracker):
    """accelerate's tensorboard tracker, but the run's configuration may hold None and lists (the scripts' flags do):
    tensorboard's hparams accept only numbers, strings and booleans, and accelerate's tracker crashes on anything else."""

    name = "sdft_tensorboard"

    def store_init_configuration(self, values: dict) -> None:
        super().store_init_configuration({key: _hparam(value) for key, value in values.items()})


class RunWandB(WandBTracker):
    """accelerate's wandb tracker, writing its run into the output folder instead of ./wandb of whatever folder the
    script was started from."""

    name = "sdft_wandb"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike, **kwargs):
        super().__init__(run_name, **{"dir": str(logging_dir), **kwargs})


TRACKERS = {"wandb": RunWandB, "tensorboard": RunTensorBoard}


def _hparam(value: Any) -> int | float | str | bool:
    if isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value)  # None -> "null", lists -> their JSON text


def tracker_for(report_to: str) -> str | None:
    """Check the tracker's package is installed (before any model loads), pick wandb's offline mode without a key,
    and return the name `Accelerator(log_with=...)` builds our tracker from (registered with accelerate once)."""
    if report_to == "none":
        return None
    if importlib.util.find_spec(report_to) is None:
        raise UserInputError(f"--report_to {report_to}: the '{report_to}' package is not installed. "
                             f"Run `pip install {report_to}` or use --report_to none.")
    if report_to == "wandb" and "WANDB_API_KEY" not in os.environ and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"  # logs stay on disk; `wandb sync` uploads them later
    tracker = TRACKERS[report_to]
    if tracker.name not in LOGGER_TYPE_TO_CLASS:
        register_tracker_class(tracker)
    return tracker.name


class MetricsLog:
    """Appends metrics to a JSONL file (main process only) and forwards them to accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, resume_step: int | None = None):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                self._drop_after(resume_step)
            elif self.path.exists():
                self.path.unlink()  # a fresh run must not mix its curve with an earlier one

    def _drop_after(self, step: int) -> None:
        """On resume, forget the steps after the checkpoint: they are about to be run again."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        staging = self.path.with_suffix(".jsonl.tmp")
        staging.write_text("".join(line + "\n" for line in kept))
        staging.replace(self.path)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
                 for key, value in metrics.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **clean}) + "\n")
        self.accelerator.log({key: value for key, value in metrics.items() if value is not None}, step=step)
