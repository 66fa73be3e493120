"""Training weights -> rollout engine: full parameters one at a time, engine names, layer-aligned buckets, and a check.

Every backend consumes the same stream of `(hf_name, full_tensor)` pairs, so ZeRO-3 / FSDP handling lives here once:
- plain / DDP models: the parameter itself (no copy);
- DeepSpeed ZeRO-3: `GatheredParameters([param])` materialises one parameter on every rank (all ranks must take part,
  in the same order), the pair holds a copy, and the shard is released before the next one;
- FSDP2 (`DTensor` parameters): `full_tensor()` of one parameter at a time (also a collective).
So the whole model is never gathered at once: at most one parameter (or one bucket, for backends that send buckets).
A LoRA model (`--use_peft`) streams its base weights with the adapter merged in, under the base model's names
(`lora.merged_parameters`), so the engine never needs to know about adapters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from sdft_utils.losses.divergence import nucleus_log_mass
from sdft_utils.training.lora import is_lora_model, merged_parameters

# wrappers add these to parameter names; vLLM expects the Hugging Face checkpoint names
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def engine_name(name: str) -> str:
    """Training-side parameter name -> Hugging Face checkpoint name (what vLLM's loaders map from)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name.removeprefix("module.")


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed engine
        model = model.module
    return model


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")  # DeepSpeed ZeRO-3 partitioned parameter


def full_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full detached tensor) for every parameter, in module order (= layer order), one at a time.
    Tied weights appear once (named_parameters deduplicates), under the first name (the input embedding)."""
    if hasattr(model, "hf_parameters"):  # Megatron TP shards (sdft_utils.megatron.backend): gathered, HF names
        yield from model.hf_parameters()
        return
    if is_lora_model(_unwrap(model)):
        yield from merged_parameters(_unwrap(model))
        return
    for name, param in _unwrap(model).named_parameters():
        if _is_zero3(param):
            import deepspeed  # only present where ZeRO-3 runs

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                tensor = param.detach().clone()  # the gathered storage is released when the context exits
        elif hasattr(param, "full_tensor"):  # FSDP2 DTensor
            tensor = param.full_tensor().detach()
        else:
            tensor = param.detach()
        yield engine_name(name), tensor


def layer_buckets(pairs: Iterable[tuple[str, torch.Tensor]], max_bytes: int
                  ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group the stream into buckets of about `max_bytes`, cutting only between transformer layers, so each
    bucket holds whole layers: vLLM's layerwise reload re-processes (fuses, re-packs) a layer once all its weights
    arrived, and a layer split over two calls would be left half-loaded. One layer may exceed max_bytes."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size, layer = 0, None
    for name, tensor in pairs:
        match = _LAYER_INDEX.search(name)
        this_layer = match.group(1) if match else None
        if bucket and size >= max_bytes and this_layer != layer:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        layer = this_layer
    if bucket:
        yield bucket


@torch.no_grad()
def sequence_logprobs(model: nn.Module, prompt_ids: list[int], completion_ids: list[int], temperature: float,
                      top_p: float = 1.0) -> torch.Tensor:
    """The trainer's log-probs of `completion_ids` after `prompt_ids`, at `temperature` (float32, on CPU). With
    top_p < 1, renormalised over the trainer's own top-p nucleus at each position (log p − log Z, Z the nucleus
    mass), the support a top-p sampler such as vLLM reports its log-probs on."""
    model = _unwrap(model)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    finally:
        model.train(was_training)
    if temperature > 0:
        logits = logits / temperature
    logprobs = logits.log_softmax(-1)
    chosen = logprobs.gather(-1, ids[0, len(prompt_ids):, None])[:, 0]
    return (chosen - nucleus_log_mass(logprobs, top_p)).cpu()


def check_weight_sync(rollout, model: nn.Module, prompt_ids: list[int], max_new_tokens: int, tolerance: float,
                      ) -> float:
    """Sample one sequence from the engine at temperature 1 and compare its log-probs with the trainer's.
    Returns the largest absolute difference; raises RuntimeError beyond `tolerance` (a failed or partial sync)."""
    from sdft_utils.rollout.sampling import SamplingConfig  # local: rollout imports nothing from here

    sample = rollout.generate([prompt_ids], SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0))
    tokens = sample.completion_ids[0]
    if not tokens:
        return 0.0
    engine = torch.tensor(sample.logprobs[0], dtype=torch.float32)
    trainer = sequence_logprobs(model, prompt_ids, tokens, temperature=1.0)
    difference = (engine - trainer).abs().max().item()
    if not difference <= tolerance:  # also catches nan
        engine_dtype = getattr(rollout, "dtype", None)
        precision = (f" The engine computes in {str(engine_dtype).removeprefix('torch.')}, where log-probs differ by "
                     "up to a few 1e-2 even with identical weights: raise --weight_sync_tolerance (0.25 is the 16-bit "
                     "default) or run the engine in float32."
                     if engine_dtype in (torch.bfloat16, torch.float16) else "")
        raise RuntimeError(
            f"weight sync check failed: the rollout engine's log-probs differ from the trainer's by {difference:.3g} "
            f"(> --weight_sync_tolerance {tolerance:g}) on a {len(tokens)}-token sample. The engine is not sampling "
            f"from the trained weights (names not mapped, a layer not reloaded, a stale tied lm_head?).{precision}")
    return difference
