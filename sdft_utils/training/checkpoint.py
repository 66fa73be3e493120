"""Checkpoints that a crash cannot corrupt, and exact resumption.

Layout of `OUTPUT_DIR/checkpoint-STEP/`:
- a Hugging Face model folder (config, weights, tokenizer): `from_pretrained` loads it as it is;
- `trainer_state/`: accelerate's state (model, optimizer, scheduler, RNG of every process), sharding-aware;
- `teacher/`: the EMA teacher as each process holds it (`rank0.pt` when replicated, one file per rank when
  sharded under ZeRO-3/FSDP2, so saving it never gathers the model);
- `progress.json`: the step the run reached, written last.

Everything is written to `checkpoint-STEP.tmp` first and renamed when complete, so a folder named
`checkpoint-STEP` is always whole. Only the newest `keep_last` checkpoints are kept, plus the best one.

Best checkpoint (`--eval_every N`): `BestCheckpoint` remembers the best evaluation so far; it is saved in every
checkpoint's progress.json (so a resumed run knows it), pruning never removes a checkpoint that a kept checkpoint
names as its best, and `OUTPUT_DIR/best` (a relative symlink) and `OUTPUT_DIR/best.json` point at it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from sdft_utils.errors import UserInputError
from sdft_utils.training.distributed import holds_shards, local_parameters

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
BEST_LINK, BEST_FILE = "best", "best.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in output_dir.iterdir()
             if (match := CHECKPOINT_PATTERN.match(path.name)) and (path / "progress.json").is_file()]
    return [path for _, path in sorted(found)]


def resolve_resume_path(value: str | None, output_dir: str | Path) -> Path | None:
    """`--resume_from_checkpoint`: None, `latest` (newest complete checkpoint in output_dir) or a folder."""
    if value is None:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise UserInputError(f"--resume_from_checkpoint latest: no complete checkpoint in '{output_dir}'. "
                                 "Drop the flag to start a new run.")
        return checkpoints[-1]
    path = Path(value)
    if not (path / "progress.json").is_file() or not (path / "trainer_state").is_dir():
        raise UserInputError(f"--resume_from_checkpoint {value}: not a complete checkpoint folder (it needs "
                             "progress.json and trainer_state/). Pass a checkpoint-STEP folder or 'latest'.")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, model, tokenizer,
                    progress: dict[str, Any], keep_last: int | None, teacher: nn.Module | None = None) -> Path:
    """Write checkpoint-STEP atomically; every process must call this (sharded states are saved collectively).

    `teacher`: a teacher with its own state (EMA) to save; None when it can be rebuilt (frozen, live)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left over from a crash during an earlier save
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(staging / "trainer_state"))
    if teacher is not None:
        _save_teacher(accelerator, teacher, staging / "teacher")
    state_dict = accelerator.get_state_dict(model)  # gathers shards under ZeRO-3 / FSDP
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        (staging / "progress.json").write_text(json.dumps(progress, indent=2))
        if final.exists():  # a re-save of the same step (e.g. the final save) replaces it whole
            shutil.rmtree(final)
        staging.rename(final)
        if keep_last:
            checkpoints = list_checkpoints(output_dir)
            protected = _best_steps(checkpoints[-keep_last:])  # a kept checkpoint's best must stay resumable
            for old in checkpoints[:-keep_last]:
                if _step_of(old) not in protected:
                    shutil.rmtree(old)
        if progress.get("best"):
            point_to_best(output_dir, progress["best"])
    accelerator.wait_for_everyone()
    return final


def _step_of(checkpoint: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))


def _best_steps(checkpoints: list[Path]) -> set[int]:
    steps = set()
    for checkpoint in checkpoints:
        best = json.loads((checkpoint / "progress.json").read_text()).get("best")
        if best:
            steps.add(best["step"])
    return steps


def point_to_best(output_dir: str | Path, best: dict[str, Any]) -> None:
    """OUTPUT_DIR/best -> checkpoint-STEP (replaced atomically) and best.json with the metric and its value."""
    output_dir = Path(output_dir)
    target = f"checkpoint-{best['step']}"
    staging = output_dir / f".{BEST_LINK}.tmp"
    staging.unlink(missing_ok=True)
    try:
        staging.symlink_to(target, target_is_directory=True)  # relative: the run folder can be moved or copied
        os.replace(staging, output_dir / BEST_LINK)
    except OSError:  # a file system without symlinks: best.json alone names the checkpoint
        pass
    info = output_dir / f".{BEST_FILE}.tmp"
    info.write_text(json.dumps({**best, "checkpoint": target}, indent=2) + "\n")
    os.replace(info, output_dir / BEST_FILE)


@dataclass
class BestCheckpoint:
    """The best value of one evaluation metric so far (higher is better; a tie keeps the earlier step)."""

    metric: str
    value: float | None = None
    step: int | None = None

    def update(self, metrics: dict[str, Any], step: int) -> bool:
        """True when `metrics` holds a new best: the caller then saves a checkpoint at this step."""
        value = metrics.get(self.metric)
        if value is None or (self.value is not None and value <= self.value):
            return False
        self.value, self.step = float(value), step
        return True

    def state(self) -> dict[str, Any] | None:
        return None if self.step is None else {"metric": self.metric, "value": self.value, "step": self.step}

    def restore(self, progress: dict[str, Any]) -> None:
        """On resume: the best as the checkpoint knew it (a later best of the interrupted run is redone)."""
        best = progress.get("best")
        if best and best.get("metric") == self.metric:
            self.value, self.step = best["value"], best["step"]


def choose_eval_metric(requested: str | None, available: list[str], eval_every: int) -> str | None:
    """The metric that picks the best checkpoint (default: the first evaluation set's); checked before loading."""
    if eval_every < 0:
        raise UserInputError(f"--eval_every must be >= 0, got {eval_every}")
    if not eval_every:
        return None
    if not available:
        raise UserInputError("--eval_every needs a held-out split to evaluate: pass --eval_datasets FILE ...")
    if requested is None:
        return available[0]
    if requested not in available:
        raise UserInputError(f"--eval_metric {requested}: not one of the evaluation metrics {available}. "
                             "Each --eval_datasets file gives one (its file name without the extension).")
    return requested


def load_checkpoint(accelerator: Accelerator, path: str | Path, teacher: nn.Module | None = None) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote into the prepared objects; returns the saved progress."""
    path = Path(path)
    accelerator.load_state(str(path / "trainer_state"))
    if teacher is not None:
        _load_teacher(accelerator, teacher, path / "teacher")
    return json.loads((path / "progress.json").read_text())


def _teacher_file(accelerator: Accelerator, teacher: nn.Module, folder: Path) -> Path | None:
    """This process's file: its own shard when sharded, else the one copy written by the main process."""
    if holds_shards(teacher):
        return folder / f"rank{accelerator.process_index}.pt"
    return folder / "rank0.pt" if accelerator.is_main_process else None


def _save_teacher(accelerator: Accelerator, teacher: nn.Module, folder: Path) -> None:
    file = _teacher_file(accelerator, teacher, folder)
    if file is not None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({name: tensor.detach().cpu() for name, tensor in local_parameters(teacher).items()}, file)


@torch.no_grad()
def _load_teacher(accelerator: Accelerator, teacher: nn.Module, folder: Path) -> None:
    file = folder / (f"rank{accelerator.process_index}.pt" if holds_shards(teacher) else "rank0.pt")
    if not file.is_file():
        raise UserInputError(f"the checkpoint has no teacher state '{file}'. A sharded teacher (ZeRO-3/FSDP2) is "
                             "saved per process: resume with the same number of processes and the same config.")
    saved = torch.load(file, map_location="cpu", weights_only=True)
    for name, tensor in local_parameters(teacher).items():
        if saved[name].shape != tensor.shape:
            raise UserInputError(f"teacher state '{file}': parameter {name} has shape {tuple(saved[name].shape)}, "
                                 f"this process holds {tuple(tensor.shape)}. Resume with the same launch config.")
        tensor.copy_(saved[name])
