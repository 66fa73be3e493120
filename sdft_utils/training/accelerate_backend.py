"""The accelerate backend: one process, DDP, DeepSpeed ZeRO-2/3 or FSDP2, configured by `accelerate launch`.

What changes between those layouts (the teacher's sharding, gathering the output head for the chunked loss, the
EMA shard by shard) lives in `sdft_utils.training.distributed`; this class only calls it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdft_utils.errors import UserInputError
from sdft_utils.losses.divergence import (
    IDENTITY,
    DivergenceOptions,
    TokenDivergence,
    chunked_token_divergence,
)
from sdft_utils.rollout.engines import make_rollout_engine
from sdft_utils.sdpo.policy_gradient import token_logprobs
from sdft_utils.training.backend import accumulation_steps, resolve_precision
from sdft_utils.training.checkpoint import load_checkpoint, save_checkpoint
from sdft_utils.training.config import RunArgs
from sdft_utils.training.distributed import (
    gathered_output_head,
    local_parameters,
    make_accelerator,
    prepare_teacher,
    run_with_output_head,
    start_processes,
)
from sdft_utils.training.lora import add_lora, check_lora, lora_summary, save_merged_model
from sdft_utils.training.metrics import tracker_for
from sdft_utils.training.modeling import (
    check_logit_transform,
    completion_hidden_states,
    eos_token_ids,
    load_model,
    logit_transform,
)
from sdft_utils.training.teachers import make_teacher


class AccelerateBackend:
    def __init__(self, args: RunArgs, mini_batches: int = 1):
        self.args = args
        self.precision = resolve_precision(args.dtype)
        self.world = start_processes()
        self.accumulation_steps = accumulation_steps(args, self.world, mini_batches)
        self.accelerator = make_accelerator(self.accumulation_steps, args.max_grad_norm, args.per_device_batch_size,
                                            tracker_for(args.report_to), args.output_dir,
                                            mixed_precision="bf16" if self.precision.compute else "no")
        self.rank = self.accelerator.process_index
        self.metric_weight = 1.0
        check_lora(args, self.accelerator)  # LoRA combinations that cannot work under this launch config
        self.logit_transform = IDENTITY  # read from the model's config by load_models
        self.teacher_state: nn.Module | None = None  # what checkpoints must carry of the teacher (an EMA)

    def load_models(self, model_path: str, tokenizer) -> tuple[nn.Module, nn.Module, list[int]]:
        args = self.args
        model = load_model(model_path, self.precision.parameters, args.attn_implementation)
        # Gemma's soft-capping, Cohere's/Granite's scaling: the loss must score what the rollouts sample
        self.logit_transform = logit_transform(model.config)
        check_logit_transform(model, self.logit_transform)
        if args.teacher_kind == "trust_region" and not self.logit_transform.is_linear:
            raise UserInputError("--teacher_kind trust_region mixes raw logits, which a soft-capped model (Gemma) does "
                                 "not expose linearly; use --teacher_kind ema or frozen with this model.")
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.use_peft:  # LoRA: the teacher below becomes a view of this one model (sdft_utils/training/lora.py)
            model = add_lora(model, args, self.accelerator)
            self.accelerator.print(lora_summary(model))
        # a trust region mixes the frozen initial model with the current student at scoring time
        kind = "frozen" if args.teacher_kind == "trust_region" else args.teacher_kind
        teacher = make_teacher(kind, model, args.teacher_model or model_path,
                               self.precision.teacher_dtype(args.teacher_fp32), args.attn_implementation)
        return model, teacher, eos_token_ids(tokenizer, model.generation_config)

    def prepare(self, model: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any):
        model, optimizer = self.accelerator.prepare(model, optimizer)
        teacher = prepare_teacher(teacher, model, self.accelerator)  # sharded like the student (ZeRO-3 / FSDP2)
        # the schedule counts steps; it is not prepared, because accelerate would step it once per process
        self.accelerator.register_for_checkpointing(scheduler)
        self.teacher_state = teacher if self.args.teacher_kind == "ema" else None
        return model, teacher, optimizer

    def rollout_engine(self, model: nn.Module, tokenizer, model_path: str, eos_token_ids: list[int]):
        return make_rollout_engine(self.args, model, tokenizer, self.accelerator, model_path, eos_token_ids,
                                   self.args.max_prompt_length, self.args.seed)

    def hidden_states(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, width: int) -> Tensor:
        with self.accelerator.autocast():  # mixed precision: bf16 compute over float32 weights (teacher too)
            return completion_hidden_states(model, input_ids, attention_mask, width)

    def teacher_head(self, teacher: nn.Module) -> tuple[Tensor, Tensor | None]:
        return gathered_output_head(teacher)

    def token_divergence(self, model: nn.Module, student_hidden: Tensor, teacher_hidden: Tensor,
                         teacher_head: tuple[Tensor, Tensor | None], completion_ids: Tensor,
                         options: DivergenceOptions) -> TokenDivergence:
        teacher_weight, teacher_bias = teacher_head
        divergence = partial(chunked_token_divergence, teacher_hidden=teacher_hidden,
                             teacher_head_weight=teacher_weight, teacher_head_bias=teacher_bias,
                             completion_ids=completion_ids, alpha=options.alpha, mode=options.mode,
                             top_k=options.top_k, tail_bucket=options.tail_bucket, temperature=options.temperature,
                             chunk_size=options.chunk_size, grad_memory_mib=options.grad_memory_mib,
                             logit_transform=options.logit_transform, nucleus_top_p=options.nucleus_top_p)
        # inside the head's forward, so that ZeRO-3 / FSDP2 gather the student's head (a plain call otherwise)
        return run_with_output_head(model, lambda weight, bias: divergence(
            student_hidden, weight, student_head_bias=bias))

    def token_logprobs(self, model: nn.Module, hidden: Tensor, completion_ids: Tensor, temperature: float,
                       chunk_size: int) -> Tensor:
        return run_with_output_head(model, lambda weight, bias: token_logprobs(
            hidden, weight, bias, completion_ids, temperature, chunk_size, self.logit_transform))

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor | float:
        # DeepSpeed clips inside its own step (its config carries --max_grad_norm) and skips a step whose gradients
        # are not finite; accelerate then returns the norm DeepSpeed measured (inf for a skipped step).
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
        if norm is None:
            return float("nan")
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a replicated DTensor

    def parameters_finite(self, model: nn.Module) -> bool:
        finite = all(bool(torch.isfinite(tensor).all()) for tensor in local_parameters(model).values())
        flag = torch.tensor(float(finite), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() == self.accelerator.num_processes)

    def save(self, output_dir: str | Path, step: int, model, teacher, optimizer, scheduler, tokenizer, progress: dict,
             keep_last: int | None) -> Path:
        return save_checkpoint(self.accelerator, output_dir, step, model, tokenizer, progress, keep_last,
                               self.teacher_state)

    def load(self, path: str | Path, model, teacher, optimizer, scheduler) -> dict:
        return load_checkpoint(self.accelerator, path, self.teacher_state)

    def finish(self, model: nn.Module, tokenizer, output_dir: str | Path) -> None:
        if self.args.merge_adapter_at_end:  # LoRA: also a plain Hugging Face folder with the adapter merged in
            path = save_merged_model(self.accelerator, model, tokenizer, Path(output_dir) / "merged_model")
            self.accelerator.print(f"merged model: {path}")
