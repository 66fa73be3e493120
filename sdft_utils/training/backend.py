"""The training backend: one interface, two implementations, chosen once by `--backend`.

- `AccelerateBackend` (`sdft_utils.training.accelerate_backend`): one process, DDP, DeepSpeed ZeRO-2/3 or FSDP2,
  as `accelerate launch --config_file accelerate_configs/X.yaml` sets it up.
- `MegatronBackend` (`sdft_utils.megatron.backend`): Megatron-core tensor parallelism under torchrun.

`make_backend` is the only place that names both; nothing on the accelerate path imports `sdft_utils.megatron`.
The run set-up (`sdft_utils.training.run`) and the scripts call only the methods of `Backend`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from sdft_utils.errors import UserInputError
from sdft_utils.losses.divergence import DivergenceOptions, LogitTransform, TokenDivergence
from sdft_utils.training.config import RunArgs


@dataclass(frozen=True)
class Precision:
    """What `--dtype` means on this machine: the parameters' dtype, and the autocast dtype of the forwards (None =
    no autocast). Mixed precision keeps float32 master weights and a float32 EMA teacher, as the SDPO release does;
    in pure bfloat16 an EMA at rate 0.01-0.05 cannot move the teacher (the increments fall below bf16's resolution)."""

    parameters: torch.dtype
    compute: torch.dtype | None

    @property
    def name(self) -> str:
        return "mixed" if self.compute is not None else str(self.parameters).removeprefix("torch.")

    def teacher_dtype(self, teacher_fp32: bool) -> torch.dtype:
        return torch.float32 if teacher_fp32 else self.parameters


def resolve_precision(dtype: str, on_gpu: bool | None = None) -> Precision:
    """`auto` is mixed precision on a GPU and float32 on a CPU (bf16 matmuls are slow and inexact on CPUs)."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if dtype == "auto":
        dtype = "mixed" if on_gpu else "float32"
    if dtype == "mixed":
        return Precision(torch.float32, torch.bfloat16)
    return Precision({"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype], None)


class Backend(Protocol):
    """What a training backend provides. `world`/`rank` are data-parallel: the processes of one tensor-parallel
    group share their data and count as one."""

    world: int
    rank: int
    accelerator: Accelerator  # printing, metric reduction, trackers, gradient-accumulation bookkeeping
    precision: Precision
    metric_weight: float  # per-step totals are summed over processes; copies (TP ranks) count zero
    logit_transform: LogitTransform  # what the model does to hidden @ W^T before its logits (Gemma soft-capping)

    def load_models(self, model_path: str, tokenizer) -> tuple[nn.Module, nn.Module, list[int]]:
        """(student, teacher, end-of-sequence ids); the student with LoRA / gradient checkpointing as flagged."""

    def prepare(self, model: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        """Wrap/shard for training; the teacher gets the student's layout."""

    def rollout_engine(self, model: nn.Module, tokenizer, model_path: str, eos_token_ids: list[int]) -> Any:
        """An engine with `generate(prompt_ids, sampling, seeds)` and `sync_weights(model)`."""

    def hidden_states(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, width: int) -> Tensor:
        """Final hidden states (B, width, H) at the positions that predict the completion tokens."""

    def teacher_head(self, teacher: nn.Module) -> tuple[Tensor, Tensor | None]:
        """The teacher's output head (weight, bias), detached (this rank's vocabulary rows under TP)."""

    def token_divergence(self, model: nn.Module, student_hidden: Tensor, teacher_hidden: Tensor,
                         teacher_head: tuple[Tensor, Tensor | None], completion_ids: Tensor,
                         options: DivergenceOptions) -> TokenDivergence:
        """Per-token divergence on (N, H) hidden states, gradients through the student only."""

    def token_logprobs(self, model: nn.Module, hidden: Tensor, completion_ids: Tensor, temperature: float,
                       chunk_size: int) -> Tensor:
        """log pi(y_t) (N,) of the student, with gradients when grad mode is on."""

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor | float:
        """Complete the gradients, clip them to `max_norm` (0 = measure only), return the global norm (inf or NaN
        when they are not finite)."""

    def parameters_finite(self, model: nn.Module) -> bool:
        """True when every weight of the model (over all processes) is finite."""

    def save(self, output_dir, step: int, model, teacher, optimizer, scheduler, tokenizer, progress: dict,
             keep_last: int | None):
        """checkpoint-STEP, atomically; every process calls it."""

    def load(self, path, model, teacher, optimizer, scheduler) -> dict:
        """Restore what `save` wrote; returns the saved progress."""

    def finish(self, model: nn.Module, tokenizer, output_dir) -> None:
        """After the last step (e.g. write the merged LoRA model)."""


def make_backend(args: RunArgs, mini_batches: int = 1) -> Backend:
    """The backend named by --backend, with its processes started and its own flags checked."""
    if args.backend == "megatron":
        from sdft_utils.megatron.backend import MegatronBackend

        return MegatronBackend(args, mini_batches)
    from sdft_utils.training.accelerate_backend import AccelerateBackend

    return AccelerateBackend(args, mini_batches)


def accumulation_steps(args: RunArgs, world: int, mini_batches: int) -> int:
    """Micro-batches per optimizer step on each process, after checking that a step's sequences split evenly."""
    prompts_per_mini_batch = args.prompts_per_step // mini_batches
    sequences = prompts_per_mini_batch // world * args.num_generations
    if args.prompts_per_step % (world * mini_batches) or sequences % args.per_device_batch_size:
        raise UserInputError(
            f"--prompts_per_step {args.prompts_per_step} must split evenly over {world} processes"
            + (f" and --mini_batches {mini_batches}" if mini_batches > 1 else "")
            + f", and each process's share x --num_generations {args.num_generations} into micro-batches of "
            f"--per_device_batch_size {args.per_device_batch_size}.")
    return sequences // args.per_device_batch_size
