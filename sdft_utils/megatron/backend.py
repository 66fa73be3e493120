"""`--backend megatron`: what train_sdft.py / train_sdpo.py call instead of the accelerate-specific pieces.

The scripts keep their loop, data, prompting, rollouts and logging; with this backend they
- start torch.distributed and megatron's TP/DP groups before creating the Accelerator (which then joins the same
  process group and is used for printing, metrics reduction, trackers and gradient-accumulation bookkeeping only);
- shard data by the data-parallel rank (every rank of a TP group trains on the same sequences);
- train GPTModel shards (sdft_utils.megatron.training) with a plain torch optimizer; the teacher is a second GPTModel
  with the same shards (EMA per shard through sdft_utils.training.teachers.ema_update_);
- compute the divergence with sdft_utils.megatron.vocab_parallel (modeling.completion_hidden_states/output_head
  dispatch to the megatron versions for a GPTModel, so the loop's calls stay the same);
- sample on TP rank 0 of each data-parallel group and broadcast the rollouts to the other TP ranks;
- save Hugging Face weights (gathered) plus one trainer-state file per rank, and resume from them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sdft_utils.errors import UserInputError
from sdft_utils.losses.divergence import TokenDivergence

BACKENDS = ["accelerate", "megatron"]


def check_megatron_args(args) -> None:
    """Flag combinations the Megatron backend does not support yet, before any model is loaded."""
    if args.backend not in BACKENDS:
        raise UserInputError(f"--backend must be one of {BACKENDS}, got '{args.backend}'.")
    if args.backend != "megatron":
        if args.tensor_model_parallel_size != 1:
            raise UserInputError("--tensor_model_parallel_size needs --backend megatron (accelerate shards with "
                                 "DeepSpeed/FSDP instead).")
        return
    unsupported = {
        "--rollout vllm --vllm_mode colocate (use --vllm_mode server, or --rollout hf)":
            args.rollout == "vllm" and args.vllm_mode == "colocate",
        "--check_weight_sync": getattr(args, "check_weight_sync", False),
        "--eval_datasets": bool(args.eval_datasets),
        "--eval_every": getattr(args, "eval_every", 0) > 0,
        "--teacher_kind trust_region": args.teacher_kind == "trust_region",
        "--grpo_lambda > 0": getattr(args, "grpo_lambda", 0) > 0,
        "--mini_batches > 1": getattr(args, "mini_batches", 1) > 1,
        "--teacher_fp32": getattr(args, "teacher_fp32", False),
        "--use_peft": getattr(args, "use_peft", False),
    }
    named = [flag for flag, used in unsupported.items() if used]
    if named:
        raise UserInputError(f"--backend megatron does not support {', '.join(named)} yet; drop the flag or use "
                             "--backend accelerate.")
    if args.model is None or not Path(args.model).is_dir():
        raise UserInputError("--backend megatron loads a local Hugging Face folder: pass --model /path/to/model "
                             f"(got {args.model!r}; download hub models first with huggingface-cli download).")


class MegatronBackend:
    """Parallel state, models and the TP-aware replacements of the accelerate calls. One per process."""

    def __init__(self, tensor_model_parallel_size: int, seed: int):
        from sdft_utils.megatron.training import (
            data_parallel_rank_and_size,
            initialize_parallel,
            tensor_parallel_group,
        )

        if not torch.cuda.is_available():
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")  # accelerate then joins the gloo group under torchrun
        initialize_parallel(tensor_model_parallel_size, seed)
        self.tensor_parallel_size = tensor_model_parallel_size
        self.tp_group = tensor_parallel_group()
        self.tp_rank = dist.get_rank(self.tp_group)
        self.data_rank, self.data_world = data_parallel_rank_and_size()
        self.layout = None
        self.model_path = None

    # ------------------------------------------------------------------ models
    def load_models(self, model_path: str, teacher_kind: str, teacher_path: str | None, dtype: torch.dtype
                    ) -> tuple[nn.Module, nn.Module]:
        from sdft_utils.megatron.training import load_gpt_model, make_megatron_teacher

        model, self.layout = load_gpt_model(model_path, self.tensor_parallel_size, dtype)
        self.model_path = model_path
        teacher = make_megatron_teacher(teacher_kind, model, teacher_path or model_path, self.tensor_parallel_size,
                                        dtype)
        return model, teacher

    def eos_token_ids(self, tokenizer) -> list[int]:
        from transformers import GenerationConfig

        try:
            configured = GenerationConfig.from_pretrained(self.model_path).eos_token_id
        except OSError:
            configured = None
        configured = configured if isinstance(configured, list) else [configured]
        return sorted({tokenizer.eos_token_id, *configured} - {None})

    # ------------------------------------------------------------------ loss and step
    def token_divergence(self, student_hidden: Tensor, student_head_weight: Tensor, teacher_hidden: Tensor,
                         teacher_head_weight: Tensor, completion_ids: Tensor, *, student_head_bias=None,
                         teacher_head_bias=None, **options: Any) -> TokenDivergence:
        """Same call as losses.chunked_token_divergence, on head shards (no biases in these architectures)."""
        from sdft_utils.megatron.vocab_parallel import vocab_parallel_token_divergence

        return vocab_parallel_token_divergence(
            student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, completion_ids,
            vocab_size=self.layout.vocab_size, group=self.tp_group, student_head_bias=student_head_bias,
            teacher_head_bias=teacher_head_bias, **options)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """Complete the gradients (TP-replicated q/k norms, DP average), then clip by the global norm."""
        from sdft_utils.megatron.training import clip_grad_norm_, finalize_grads

        finalize_grads(model)
        return clip_grad_norm_(model, max_norm)

    @property
    def metric_weight(self) -> float:
        """Per-step totals are summed over all processes; TP ranks hold copies, so only TP rank 0 contributes."""
        return 1.0 if self.tp_rank == 0 else 0.0

    # ------------------------------------------------------------------ rollouts
    def rollout_engine(self, args, tokenizer, accelerator, eos_token_ids: list[int], model: nn.Module):
        """TP rank 0 of each data-parallel group samples; the others receive its rollouts."""
        if args.rollout == "vllm":
            from sdft_utils.rollout.vllm_server import VLLMServerRollout

            # HTTP transfer of the gathered HF weights (the NCCL path needs per-parameter metadata of an HF model)
            engine = VLLMServerRollout(args.vllm_server_url, eos_token_ids, accelerator,
                                       bucket_bytes=args.vllm_sync_bucket_mb << 20,
                                       connect_timeout=args.vllm_server_timeout, seed=args.seed, transfer="http")
        else:
            engine = _HFCopyRollout(self.model_path, tokenizer.pad_token_id, eos_token_ids,
                                    args.generation_batch_size, keep=self.tp_rank == 0)
        return _TensorParallelRollout(engine, self, model)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, output_dir: str | Path, step: int, model: nn.Module, teacher: nn.Module, optimizer,
                        scheduler, tokenizer, progress: dict, keep_last: int | None) -> Path:
        """checkpoint-STEP/ = a Hugging Face folder (gathered weights, loadable by from_pretrained) + trainer_state/
        with one file per rank (its model/teacher shards, optimizer, scheduler, RNG) + progress.json, written to
        a .tmp folder and renamed, as sdft_utils.training.checkpoint does."""
        from sdft_utils.megatron.training import save_hf_checkpoint
        from sdft_utils.training.checkpoint import list_checkpoints

        output_dir = Path(output_dir)
        final, staging = output_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}.tmp"
        rank = dist.get_rank()
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        (staging / "trainer_state").mkdir(exist_ok=True)
        torch.save(self._trainer_state(model, teacher, optimizer, scheduler),
                   staging / "trainer_state" / f"megatron_rank{rank}.pt")
        save_hf_checkpoint(model, self.layout, self.model_path, staging, tokenizer)
        if rank == 0:
            (staging / "progress.json").write_text(json.dumps({**progress, "world_size": dist.get_world_size(),
                                                               "tensor_model_parallel_size":
                                                                   self.tensor_parallel_size}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            if keep_last:
                for old in list_checkpoints(output_dir)[:-keep_last]:
                    shutil.rmtree(old)
        dist.barrier()
        return final

    def load_checkpoint(self, path: str | Path, model: nn.Module, teacher: nn.Module, optimizer, scheduler) -> dict:
        path = Path(path)
        progress = json.loads((path / "progress.json").read_text())
        if (progress.get("world_size"), progress.get("tensor_model_parallel_size")) != \
                (dist.get_world_size(), self.tensor_parallel_size):
            raise UserInputError(f"--resume_from_checkpoint {path}: saved with {progress.get('world_size')} processes "
                                 f"and TP {progress.get('tensor_model_parallel_size')}; resume with the same layout "
                                 "(or start a new run from its Hugging Face weights with --model).")
        state = torch.load(path / "trainer_state" / f"megatron_rank{dist.get_rank()}.pt", weights_only=False)
        model.load_state_dict(state["model"])
        if teacher is not model:
            teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        return progress

    @staticmethod
    def _trainer_state(model, teacher, optimizer, scheduler) -> dict:
        return {
            "model": model.state_dict(), "teacher": None if teacher is model else teacher.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
        }


class _MegatronWeights:
    """What the rollout engines' sync_weights iterate: the gathered Hugging Face weights of the GPTModel shards."""

    def __init__(self, model: nn.Module, layout):
        self.model, self.layout = model, layout

    def hf_parameters(self):
        from sdft_utils.megatron.training import hf_parameters

        return hf_parameters(self.model, self.layout)


class _HFCopyRollout:
    """`--rollout hf` under Megatron: TP rank 0 keeps a Hugging Face copy of the model, refreshed from the gathered
    shards after every step, and samples with `generate`. Meant for small models and CPU checks; at scale use a vLLM
    server. The copy's log-probs are passed on (from_training_weights=False), so the importance weights correct for
    any kernel difference between the copy and the megatron model."""

    def __init__(self, model_path: str, pad_token_id: int, eos_token_ids: list[int], batch_size: int | None,
                 keep: bool):
        from sdft_utils.rollout.hf import HFRollout
        from sdft_utils.training.modeling import load_model

        self.copy = load_model(model_path, torch.float32 if not torch.cuda.is_available() else torch.bfloat16) \
            if keep else None
        if self.copy is not None and torch.cuda.is_available():
            self.copy.cuda()
        self.engine = HFRollout(self.copy, pad_token_id, eos_token_ids, batch_size) if keep else None

    def generate(self, prompt_ids, sampling, seeds=None):
        from sdft_utils.rollout.sampling import Rollouts

        result = self.engine.generate(prompt_ids, sampling, seeds)
        return Rollouts(result.completion_ids, result.logprobs, from_training_weights=False)

    @torch.no_grad()
    def sync_weights(self, weights: _MegatronWeights) -> None:
        params = dict(self.copy.named_parameters()) if self.copy is not None else {}
        for name, tensor in weights.hf_parameters():  # every TP rank takes part in the gathers
            if name in params:
                params[name].copy_(tensor)

    def close(self) -> None:
        """Nothing to shut down: a plain Hugging Face model."""


class _TensorParallelRollout:
    """Rollouts computed on TP rank 0 of each data-parallel group and broadcast to its other TP ranks, so that all
    ranks of a TP group train on identical sequences."""

    def __init__(self, engine, backend: MegatronBackend, model: nn.Module):
        self.engine, self.backend = engine, backend
        self.weights = _MegatronWeights(model, backend.layout)
        self.source = dist.get_global_rank(backend.tp_group, 0)

    def generate(self, prompt_ids, sampling, seeds=None):
        result = [self.engine.generate(prompt_ids, sampling, seeds) if self.backend.tp_rank == 0 else None]
        if self.backend.tensor_parallel_size > 1:
            dist.broadcast_object_list(result, src=self.source, group=self.backend.tp_group)
        return result[0]

    def sync_weights(self, model: nn.Module) -> None:
        self.engine.sync_weights(self.weights)

    def close(self) -> None:
        self.engine.close()
