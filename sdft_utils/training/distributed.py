"""What changes when the student is sharded: the accelerator, the teacher's layout, the output head, the EMA.

The scripts run unchanged under every accelerate config in `accelerate_configs/` (one process, DDP, DeepSpeed
ZeRO-2/3, FSDP2). The differences live here:
- `make_accelerator` picks gloo on machines without a GPU and fills the DeepSpeed keys accelerate cannot infer
  without a dataloader (micro-batch size, gradient clipping);
- `prepare_teacher` shards the EMA/frozen teacher exactly like the student (ZeRO-3 partitions, FSDP2 shards), or
  replicates it when the student's parameters are replicated (DDP, ZeRO-1/2);
- `run_with_output_head` runs the loss inside the forward of the module that owns the output head, so ZeRO-3 and
  FSDP2 gather the head for the loss and again for its backward, as they do for any layer;
- `gathered_output_head` gives a full copy of a head for no-grad use (the teacher's side of the divergence);
- `local_parameters` is what this rank holds of each parameter: the EMA and the teacher checkpoint work shard by
  shard, and nothing ever gathers a whole model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, extract_model_from_parallel
from torch import nn

from sdft_utils.errors import UserInputError

T = TypeVar("T")


def start_processes() -> int:
    """The number of processes `accelerate launch` / torchrun started; call it before the Accelerator exists.

    Without a GPU the process group is joined here with gloo, and DDP is asked for explicitly: accelerate would
    otherwise quietly run every process as a separate single-process job. Elsewhere the Accelerator joins it.
    """
    num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available() and num_processes > 1:
        PartialState(cpu=not _deepspeed_requested(), backend="gloo")
    return num_processes


def make_accelerator(gradient_accumulation_steps: int, max_grad_norm: float, micro_batch_size: int,
                     log_with: str | None, project_dir: str, mixed_precision: str = "no") -> Accelerator:
    """The Accelerator for either script, configured by `accelerate launch --config_file ...` as usual, except for
    `mixed_precision`, which `--dtype` decides (it overrides the launch config's)."""
    multi_cpu = start_processes() > 1 and not torch.cuda.is_available()
    kwargs_handlers = [InitProcessGroupKwargs(backend="gloo")] if multi_cpu else []
    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, log_with=log_with,
                              project_dir=project_dir, kwargs_handlers=kwargs_handlers, mixed_precision=mixed_precision,
                              cpu=multi_cpu and not _deepspeed_requested())
    if multi_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _apply_fsdp_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = micro_batch_size  # accelerate reads it from a dataloader
        # accelerate leaves a falsy clipping value out of the config, and DeepSpeed's own default is 1.0
        config["gradient_clipping"] = max_grad_norm
    return accelerator


def _deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _apply_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """accelerate 1.15 only switches to FSDP on GPU-like devices; on a CPU it silently falls back to DDP.

    Without a GPU (tests, CPU clusters) we apply the FSDP plugin that `accelerate launch` put in the environment,
    the way accelerate does on GPUs. This touches accelerate's shared state (checked against 1.15); GPU runs never
    come here.
    """
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables set by `accelerate launch`
    if plugin.fsdp_version != 2:
        raise UserInputError("on a machine without a GPU only FSDP2 (fsdp_version: 2) is supported; use "
                             "accelerate_configs/fsdp2.yaml")
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if accelerator.distributed_type != DistributedType.FSDP:
        raise RuntimeError("could not switch accelerate to FSDP on CPU; this accelerate version is not supported")


def sharding(accelerator: Accelerator) -> str:
    """`zero3` and `fsdp` shard parameters across processes; `none` means every process holds whole tensors."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if accelerator.distributed_type == DistributedType.DEEPSPEED and \
            accelerator.state.deepspeed_plugin.zero_stage == 3:
        return "zero3"
    return "none"


def prepare_teacher(teacher: nn.Module, student: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Give the teacher the student's layout. `student` is the prepared model; a live teacher is returned as is."""
    if teacher is extract_model_from_parallel(student):
        return teacher
    layout = sharding(accelerator)
    if layout == "zero3":
        import deepspeed

        student_config = accelerator.state.deepspeed_plugin.deepspeed_config
        config = {
            "train_micro_batch_size_per_gpu": student_config["train_micro_batch_size_per_gpu"],
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "bf16": {"enabled": teacher.dtype == torch.bfloat16},
            "fp16": {"enabled": teacher.dtype == torch.float16},
        }
        # an engine without an optimizer: it only partitions the parameters and gathers them layer by layer
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        engine.eval()
        return engine
    if layout == "fsdp":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, teacher.to(accelerator.device)).eval()
    return teacher.to(accelerator.device)


def run_with_output_head(model: nn.Module, compute: Callable[[torch.Tensor, torch.Tensor | None], T]) -> T:
    """`compute(head_weight, head_bias)`, run inside the forward of the module that owns the output head.

    With one process, DDP or ZeRO-1/2 this is a plain call. Under ZeRO-3 the head's own hooks gather it for the
    call and again before the backward of what `compute` returns; under FSDP2 the hooks of the unit that owns the
    head do the same when it was resharded after the forward (accelerate keeps the final norm and head unsharded
    until their backward, so there it is a plain call too, and the unit's post-backward reduce-scatters the grad). `compute` returns a tensor, a tuple of tensors or a dataclass
    of tensors (flattened for the hooks, rebuilt here).
    """
    unwrapped = extract_model_from_parallel(model)
    head = unwrapped.get_output_embeddings()
    if hasattr(head.weight, "ds_id"):
        carrier = head  # ZeRO-3: the head's own hooks gather it
    elif _is_dtensor(head.weight):
        carrier = head if _is_fsdp2(head) else unwrapped  # FSDP2 resharded it after the forward: its unit regathers
    else:
        return compute(head.weight, head.bias)  # whole tensors here (also an FSDP2 unit kept unsharded)
    rebuild = []

    def forward(*_args, **_kwargs):
        result = compute(head.weight, head.bias)
        if dataclasses.is_dataclass(result):
            rebuild.append(type(result))
            return tuple(getattr(result, field.name) for field in dataclasses.fields(result))
        return result

    carrier.forward = forward  # an instance attribute shadows the class's forward for this one call
    try:
        outputs = carrier()
    finally:
        del carrier.forward
    return rebuild[0](*outputs) if rebuild else outputs


def gathered_output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A detached, full copy of the output head (V, H) and bias, for no-grad use (teacher logits).

    Only this one layer is gathered; without sharding the parameters themselves are returned, no copy made.
    """
    head = extract_model_from_parallel(model).get_output_embeddings()
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    if hasattr(head.weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            full = [param.detach().clone() for param in params]
    else:
        full = [_full_tensor(param).detach() for param in params]
    return full[0], full[1] if len(full) > 1 else None


def local_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """What this process holds of each parameter, by name: a ZeRO-3 partition, an FSDP2 local shard, or the
    whole tensor. Two models sharded the same way hold matching pieces, so elementwise updates need no gather."""
    unwrapped = extract_model_from_parallel(model)
    for module in unwrapped.modules():
        if _is_fsdp2(module):
            module.reshard()  # units kept unsharded after a no-grad forward would otherwise show full tensors
    return {name: _local_tensor(param) for name, param in unwrapped.named_parameters()}


def holds_shards(model: nn.Module) -> bool:
    """True when this process holds only part of the model's parameters (ZeRO-3 or FSDP2)."""
    unwrapped = extract_model_from_parallel(model)
    return _is_fsdp2(unwrapped) or any(hasattr(param, "ds_id") for param in unwrapped.parameters())


def _local_tensor(param: torch.Tensor) -> torch.Tensor:
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    if _is_dtensor(param):
        return param.to_local()
    return param


def _full_tensor(param: torch.Tensor) -> torch.Tensor:
    return param.full_tensor() if _is_dtensor(param) else param


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _is_fsdp2(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch builds without distributed support
        return False
    return isinstance(module, FSDPModule)
