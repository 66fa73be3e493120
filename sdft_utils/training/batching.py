"""Student and teacher inputs that share one completion block, so their positions line up token by token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdft_utils.rollout.sampling import left_pad, right_pad


@dataclass
class DistillBatch:
    student_input_ids: torch.Tensor  # (B, Ps + T) = [left-padded student prompt | right-padded completion]
    student_attention_mask: torch.Tensor
    teacher_input_ids: torch.Tensor  # (B, Pt + T) = [left-padded teacher prompt | the same completion]
    teacher_attention_mask: torch.Tensor
    completion_ids: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T) 1 on real completion tokens
    rollout_logprobs: torch.Tensor | None  # (B, T) log-probs reported by the rollout engine, None if from the trainer
    # (B, T) 1 on tokens the model wrote, 0 on tool results / later user turns inside a multi-turn completion and on
    # padding; None when every completion token is model-written. Multiply it into the loss mask.
    model_token_mask: torch.Tensor | None = None

    @property
    def num_completion_tokens(self) -> int:
        return self.completion_ids.shape[1]

    def to(self, device: torch.device) -> DistillBatch:
        return DistillBatch(**{name: None if value is None else to_device(value, device)
                               for name, value in vars(self).items()})


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor -> `device`. To a GPU the copy goes through pinned memory without blocking: a plain `.to("cuda")`
    of pageable memory waits for all queued GPU work, a host-device sync inside the step."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def build_distill_batch(student_prompts: list[list[int]], teacher_prompts: list[list[int]],
                        completions: list[list[int]], rollout_logprobs: list[list[float]] | None,
                        pad_token_id: int, model_token_masks: list[list[int]] | None = None) -> DistillBatch:
    """Pad and concatenate. Prompts are left-padded and completions right-padded, so the completion block starts at
    the same column for every row and its width T is the same for student and teacher.

    `model_token_masks` (one 0/1 list per completion, as long as it; from tool rollouts) becomes the (B, T)
    `model_token_mask`, 0 on padding; None keeps it None (every completion token is the model's)."""
    student_ids, student_mask = left_pad(student_prompts, pad_token_id)
    teacher_ids, teacher_mask = left_pad(teacher_prompts, pad_token_id)
    completion_ids, completion_mask = right_pad(completions, pad_token_id, torch.long)
    logprobs = None if rollout_logprobs is None else right_pad(rollout_logprobs, 0.0, torch.float32)[0]
    model_token_mask = None
    if model_token_masks is not None:
        if [len(mask) for mask in model_token_masks] != [len(completion) for completion in completions]:
            raise ValueError("each model token mask must be as long as its completion")
        model_token_mask = right_pad(model_token_masks, 0, torch.long)[0]
    return DistillBatch(
        student_input_ids=torch.cat([student_ids, completion_ids], dim=1),
        student_attention_mask=torch.cat([student_mask, completion_mask], dim=1),
        teacher_input_ids=torch.cat([teacher_ids, completion_ids], dim=1),
        teacher_attention_mask=torch.cat([teacher_mask, completion_mask], dim=1),
        completion_ids=completion_ids, completion_mask=completion_mask, rollout_logprobs=logprobs,
        model_token_mask=model_token_mask,
    )
