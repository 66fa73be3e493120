"""Metrics: one JSON line per step in OUTPUT_DIR/metrics.jsonl, plus accelerate's trackers (wandb, tensorboard)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from sdft_utils.errors import UserInputError

REPORT_TO_CHOICES = ["none", "wandb", "tensorboard"]


def tracker_for(report_to: str) -> str | None:
    """Check the tracker's package is installed (before any model loads) and pick wandb's offline mode without a key."""
    if report_to == "none":
        return None
    if importlib.util.find_spec(report_to) is None:
        raise UserInputError(f"--report_to {report_to}: the '{report_to}' package is not installed. "
                             f"Run `pip install {report_to}` or use --report_to none.")
    if report_to == "wandb" and "WANDB_API_KEY" not in os.environ and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"  # logs stay on disk; `wandb sync` uploads them later
    return report_to


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
