"""The teacher: the same model as the student, seen through a different prompt.

Kinds (SDFT paper App. A.3, authors' code):
- `ema`: an exponential moving average of the student, updated after every optimizer step (the default; best).
- `frozen`: the initial model, never updated (stable but worse).
- `live`: the current student itself (diverges: small noise gets amplified on-policy).

With a LoRA student (`--use_peft`) no second model is loaded: the teachers are views of the student's PeftModel
(`sdft_utils.training.lora`: adapters off, an EMA adapter, or the student's adapter).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from sdft_utils.errors import UserInputError
from sdft_utils.training.distributed import local_parameters
from sdft_utils.training.lora import AdapterTeacher, is_lora_model, make_lora_teacher
from sdft_utils.training.modeling import load_model

TEACHER_KINDS = ["ema", "frozen", "live"]


def make_teacher(kind: str, student: nn.Module, source: str | Path, dtype: torch.dtype,
                 attn_implementation: str | None = None) -> nn.Module:
    """Build the teacher for `student`.

    `ema` and `frozen` load a second copy from `source` (the student's starting checkpoint, or `--teacher_model`),
    never a deepcopy, so the same code works when the student is sharded. `live` returns the student itself.
    A LoRA student gets a view of itself instead (`lora.make_lora_teacher`; `source` and `dtype` are unused).
    """
    if kind not in TEACHER_KINDS:
        raise UserInputError(f"--teacher_kind must be one of {TEACHER_KINDS}, got '{kind}'.")
    if kind == "live":
        warnings.warn("teacher_kind=live: the teacher is the current student; the paper found this unstable "
                      "(it diverges). Use it for ablations only.", stacklevel=2)
    if is_lora_model(student):
        return make_lora_teacher(kind, student)
    if kind == "live":
        return extract_model_from_parallel(student)
    teacher = load_model(source, dtype=dtype, attn_implementation=attn_implementation)
    check_same_layout(teacher, extract_model_from_parallel(student), source, need_same_parameters=kind == "ema")
    teacher.requires_grad_(False)
    return teacher.eval()


def check_same_layout(teacher: nn.Module, student: nn.Module, source: str | Path, need_same_parameters: bool) -> None:
    """The divergence compares next-token distributions, so the vocabularies must match; an EMA also needs every
    parameter to have the same name and shape."""
    teacher_vocab = _full_shape(teacher.get_output_embeddings().weight)[0]
    student_vocab = _full_shape(student.get_output_embeddings().weight)[0]
    if teacher_vocab != student_vocab:
        raise UserInputError(f"the teacher '{source}' has a vocabulary of {teacher_vocab} tokens but the student has "
                             f"{student_vocab}; a per-token divergence needs the same tokenizer.")
    if need_same_parameters:
        teacher_shapes = {name: _full_shape(p) for name, p in teacher.named_parameters()}
        student_shapes = {name: _full_shape(p) for name, p in student.named_parameters()}
        if teacher_shapes != student_shapes:
            raise UserInputError(f"an EMA teacher needs the student's architecture, but '{source}' has different "
                                 "parameters. Use --teacher_kind frozen for a different teacher model.")


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions keep the full shape in ds_shape


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, rate: float) -> None:
    """teacher <- (1 - rate) * teacher + rate * student, elementwise, in the teacher's dtype.

    Works on whatever each rank holds: whole tensors, or the matching shards when both models are sharded the same
    way (ZeRO-3 partitions, FSDP2 local shards), so it never communicates.
    A LoRA EMA teacher (`AdapterTeacher`) updates its adapter from the student's adapter only.
    """
    if isinstance(teacher, AdapterTeacher):
        targets, student_tensors = teacher.ema_pairs()
        sources = [p.detach().to(q.dtype) for p, q in zip(student_tensors, targets, strict=True)]
        torch._foreach_lerp_(targets, sources, rate)
        return
    teacher_params = local_parameters(teacher)
    student_params = local_parameters(student)
    targets = [teacher_params[name] for name in student_params]
    sources = [p.detach().to(q.dtype) for p, q in zip(student_params.values(), targets, strict=True)]
    torch._foreach_lerp_(targets, sources, rate)
