"""Training-side pieces of the Megatron-core backend: parallel state, student and teacher GPTModels loaded from a Hugging
Face checkpoint, completion hidden states, gradient finalisation and clipping under TP x DP, and the gathered
Hugging Face weights (weight sync to a vLLM server, saving).

Parallel layout: `torchrun` starts one process per GPU; TP groups are consecutive ranks
(keep TP within a node), data parallelism runs across TP groups. Every rank of a TP group must see the same batch:
shard data by `data_parallel_rank()`, not by the global rank. No pipeline or sequence parallelism, no Megatron DDP or
distributed optimizer: a plain torch optimizer per rank over its shards, gradients averaged over the DP group here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sdft_utils.errors import UserInputError
from sdft_utils.megatron.convert import (
    Layout,
    gpt_model_from_hf_config,
    layout_from_hf_config,
    load_hf_weights,
    megatron_final_to_hf,
    megatron_layer_to_hf,
    safetensors_reader,
)


def require_megatron() -> None:
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        raise UserInputError("--backend megatron needs megatron-core: pip install -e '.[megatron]' "
                             "(megatron-core 0.16.1 on Python 3.11; 0.17+ needs Python >= 3.12).") from None


def initialize_parallel(tensor_model_parallel_size: int, seed: int) -> None:
    """torch.distributed (nccl on GPUs, gloo on CPUs; env from torchrun) and megatron's TP/DP groups."""
    require_megatron()
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    if tensor_model_parallel_size < 1 or world % tensor_model_parallel_size:
        raise UserInputError(f"--tensor_model_parallel_size {tensor_model_parallel_size} must divide the number of "
                             f"processes ({world}); launch with torchrun --nproc-per-node a multiple of it.")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size)
    if torch.cuda.is_available():  # megatron's RNG tracker is CUDA-only (CPU tests install their own, see tests/)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def tensor_parallel_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def data_parallel_rank_and_size() -> tuple[int, int]:
    """Which data shard this rank trains on (all ranks of a TP group share it), and how many shards there are."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def load_gpt_model(model_path: str | Path, tensor_model_parallel_size: int, dtype: torch.dtype,
                   make_vocab_size_divisible_by: int = 128) -> tuple[nn.Module, Layout]:
    """This rank's GPTModel shard with the weights of a local Hugging Face folder (read lazily from safetensors)."""
    from megatron.core import parallel_state
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_path)
    layout = layout_from_hf_config(hf_config, tensor_model_parallel_size, make_vocab_size_divisible_by)
    model = gpt_model_from_hf_config(hf_config, layout, dtype)
    if torch.cuda.is_available():
        model.cuda()
    load_hf_weights(model, safetensors_reader(model_path), layout, parallel_state.get_tensor_model_parallel_rank())
    return model, layout


def make_megatron_teacher(kind: str, student: nn.Module, source: str | Path, tensor_model_parallel_size: int,
                          dtype: torch.dtype) -> nn.Module:
    """The teacher as a second GPTModel with the student's shard layout (`ema`, `frozen`), or the student (`live`).
    An EMA then updates shard by shard with `sdft_utils.training.teachers.ema_update_` (same names, same shapes)."""
    if kind == "live":
        return student
    teacher, _ = load_gpt_model(source, tensor_model_parallel_size, dtype)
    student_shapes = {n: p.shape for n, p in student.named_parameters()}
    if kind == "ema" and {n: p.shape for n, p in teacher.named_parameters()} != student_shapes:
        raise UserInputError(f"an EMA teacher needs the student's architecture, but '{source}' differs. "
                             "Use --teacher_kind frozen for a different teacher model.")
    teacher.requires_grad_(False)
    return teacher.eval()


def attention_inputs(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, S) 0/1 padding mask (left-padded prompts, right-padded completions) -> position ids (B, S) restarting at 0
    after the left padding (as HF generate) and megatron's boolean mask (B, 1, S, S), True = not attended (causal
    and padded keys). Passing the mask explicitly also avoids megatron building a CUDA-only default one."""
    seq = attention_mask.shape[-1]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).triu(1)
    masked = causal[None] | ~attention_mask.bool()[:, None, :]
    return positions, masked[:, None]


@contextmanager
def _hidden_states_instead_of_logits(model: nn.Module):
    """GPTModel applies its output layer inside forward; for the chunked vocab-parallel loss we want the final hidden
    states instead (the head is applied chunk by chunk there). Swap the output layer's forward for the identity."""
    layer = model.output_layer
    layer.forward = lambda hidden_states, weight=None, runtime_gather_output=None, **_: (hidden_states, None)
    try:
        yield
    finally:
        del layer.forward


def completion_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                             num_completion_tokens: int) -> Tensor:
    """Megatron twin of `sdft_utils.training.modeling.completion_hidden_states`: (B, S) [left-padded prompt | right-padded
    completion of width T] -> final hidden states (B, T, H) at the positions that predict the completion tokens.
    Replicated over the TP group (no sequence parallelism)."""
    positions, mask = attention_inputs(attention_mask)
    with _hidden_states_instead_of_logits(model):
        hidden = model(input_ids=input_ids, position_ids=positions, attention_mask=mask)  # (B, S, H)
    return hidden[:, -num_completion_tokens - 1:-1]


def output_head_shard(model: nn.Module) -> Tensor:
    """This rank's rows (V_local, H) of the output head (the embedding when tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def _is_sharded(name: str) -> bool:
    """In the local-spec layout only the norms are replicated over the TP group (see convert.py). Decided by name:
    megatron's own `tensor_model_parallel` attribute is not set when it skips initialisation (we load weights)."""
    return "layernorm" not in name


def finalize_grads(model: nn.Module, bucket_bytes: int = 256 << 20) -> None:
    """After backward: sum the gradients of Qwen3's q/k norms over the TP group (each rank saw only its heads; the
    other replicated parameters already get complete gradients because their inputs' gradients were all-reduced),
    then average every gradient over the data-parallel group."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) > 1:
        for name, param in model.named_parameters():
            if param.grad is not None and ("q_layernorm" in name or "k_layernorm" in name):
                dist.all_reduce(param.grad, group=tp_group)
    dp_group = parallel_state.get_data_parallel_group()
    dp_size = dist.get_world_size(dp_group)
    if dp_size > 1:
        bucket, size = [], 0
        for grad in [p.grad for p in model.parameters() if p.grad is not None] + [None]:
            if grad is not None:
                bucket.append(grad)
                size += grad.numel() * grad.element_size()
            if bucket and (grad is None or size >= bucket_bytes):  # one all-reduce per ~bucket_bytes of gradients
                flat = torch.cat([g.reshape(-1) for g in bucket]).div_(dp_size)
                dist.all_reduce(flat, group=dp_group)
                for synced_grad, synced in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                    synced_grad.copy_(synced.view_as(synced_grad))
                bucket, size = [], 0


def clip_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """Global gradient norm over the whole (unsharded) model, counting replicated parameters once; gradients are
    scaled in place when it exceeds `max_norm` (max_norm <= 0: only measure)."""
    from megatron.core import parallel_state

    params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    device = params[0][1].grad.device if params else torch.device("cpu")
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [sharded, replicated] sums of squares, on device
    for name, param in params:
        sums[0 if _is_sharded(name) else 1] += param.grad.detach().double().square().sum()
    sharded = sums[0].clone()
    dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
    norm = float((sharded + sums[1]).sqrt())
    if max_norm > 0 and norm > max_norm:
        for _, param in params:
            param.grad.mul_(max_norm / (norm + 1e-6))
    return norm


@torch.no_grad()
def hf_parameters(model: nn.Module, layout: Layout) -> Iterator[tuple[str, Tensor]]:
    """Yield (hf_name, full tensor) for the whole model, one decoder layer at a time: each sharded parameter is
    all-gathered over the TP group (every TP rank must iterate, in step) and converted to Hugging Face names. Feeds
    `sdft_utils.rollout.weight_sync.layer_buckets` (vLLM server push) and `save_hf_checkpoint`."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    params = dict(model.named_parameters())

    def shards_of(prefixes: tuple[str, ...]) -> list[dict[str, Tensor]]:
        shards: list[dict[str, Tensor]] = [{} for _ in range(tp)]
        for name, param in params.items():
            if not name.startswith(prefixes):
                continue
            if _is_sharded(name) and tp > 1:
                parts = [torch.empty_like(param) for _ in range(tp)]
                dist.all_gather(parts, param.detach().contiguous(), group=group)
            else:
                parts = [param.detach()] * tp
            for shard, part in zip(shards, parts, strict=True):
                shard[name] = part
        return shards

    yield from megatron_layer_to_hf(shards_of(("embedding.",)), layout, None)
    for layer in range(layout.num_layers):
        yield from megatron_layer_to_hf(shards_of((f"decoder.layers.{layer}.",)), layout, layer)
    yield from megatron_final_to_hf(shards_of(("decoder.final_layernorm.", "output_layer.")), layout)


def save_hf_checkpoint(model: nn.Module, layout: Layout, model_path: str | Path, folder: str | Path,
                       tokenizer=None) -> Path:
    """Write the trained weights as a Hugging Face folder (config copied from `model_path`) into `folder`: every rank
    takes part in the gathers, global rank 0 writes. Callers write into a staging folder and rename it (as
    `MegatronBackend.save_checkpoint` does), so a crash leaves no half checkpoint under the final name."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    folder = Path(folder)
    writer = dist.get_rank() == 0
    state = {}
    for name, tensor in hf_parameters(model, layout):
        if writer:
            state[name] = tensor.detach().to("cpu", copy=True).contiguous()
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        AutoConfig.from_pretrained(model_path).save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    dist.barrier()
    return folder
