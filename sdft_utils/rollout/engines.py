"""Pick the rollout engine from the flags, so training scripts hold no per-backend code.

`--rollout hf` samples from the training model itself (`HFRollout`); `--rollout vllm` uses vLLM, either
in-process (`--vllm_mode colocate`) or as a separate `vllm serve` process (`--vllm_mode server`, started with
`python -m sdft_utils.rollout.vllm_server`). All three have `generate(prompt_ids, sampling)`, `sync_weights(model)`
and `close()`, which the run's teardown calls after its last collective and before `accelerator.end_training()`: a
colocated vLLM engine must shut down while the process group it uses still exists.
vLLM engines sample in the dtype the trainer computes in (bf16/fp16 under mixed precision, else the parameters').
"""

from __future__ import annotations

import torch

from sdft_utils.errors import UserInputError
from sdft_utils.rollout.context import fit_engine_length, model_context_length
from sdft_utils.rollout.hf import HFRollout
from sdft_utils.training.config import ROLLOUT_COMPILE_CHOICES, RolloutArgs


def use_compiled_decode(choice: str, accelerator) -> bool:
    """--rollout_compile: `auto` compiles the HF decode step on a single GPU or under DDP. Not under ZeRO-3/FSDP:
    their parameters are gathered inside each forward, which a captured CUDA graph would not redo."""
    if choice not in ROLLOUT_COMPILE_CHOICES:
        raise UserInputError(f"--rollout_compile must be one of {ROLLOUT_COMPILE_CHOICES}, got '{choice}'")
    if choice != "auto":
        return choice == "on"
    sharded = accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")
    return accelerator.device.type == "cuda" and not sharded


def weight_sync_tolerance(tolerance: float | None, dtype: torch.dtype) -> float:
    """Largest allowed |engine - trainer| log-prob for --check_weight_sync: float32 kernels agree to ~1e-6, 16-bit
    ones differ by a few hundredths per token even with identical weights."""
    if tolerance is not None:
        return tolerance
    return 1e-3 if dtype == torch.float32 else 0.25


def compute_dtype(model, accelerator) -> torch.dtype:
    """The dtype the trainer's forward runs in: the autocast dtype under mixed precision, else the parameters'."""
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    return autocast or next(accelerator.unwrap_model(model).parameters()).dtype


def make_rollout_engine(config: RolloutArgs, model, tokenizer, accelerator, model_path: str,
                        eos_token_ids: list[int], max_prompt_length: int, seed: int):
    """The engine named by --rollout / --vllm_mode, ready to generate from the model's current weights."""
    if config.rollout == "hf":
        return HFRollout(model, tokenizer.pad_token_id, eos_token_ids, config.generation_batch_size,
                         compile_decode=use_compiled_decode(config.rollout_compile, accelerator))
    dtype = compute_dtype(model, accelerator)
    if config.vllm_mode == "colocate":
        from sdft_utils.rollout.vllm_colocate import VLLMColocateRollout, VLLMEngineConfig

        max_model_len, warning = fit_engine_length(model_context_length(model_path), max_prompt_length,
                                                   config.max_completion_length, config.vllm_max_model_len)
        if warning:
            accelerator.print(f"warning: {warning}")
        engine_config = VLLMEngineConfig(
            model=model_path, dtype=dtype, tensor_parallel_size=config.vllm_tensor_parallel_size,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization, max_model_len=max_model_len,
            enable_sleep=config.vllm_enable_sleep_mode, seed=seed)
        return VLLMColocateRollout(engine_config, eos_token_ids, accelerator)
    from sdft_utils.rollout.vllm_server import VLLMServerRollout

    # the run syncs the engine once after a possible resume, then after every optimizer step
    return VLLMServerRollout(config.vllm_server_url, eos_token_ids, accelerator,
                             bucket_bytes=config.vllm_sync_bucket_mb << 20, connect_timeout=config.vllm_server_timeout,
                             seed=seed, trainer_dtype=dtype)
