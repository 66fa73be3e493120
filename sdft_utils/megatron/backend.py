"""`--backend megatron`: the `Backend` interface (`sdft_utils.training.backend`) over Megatron-core tensor parallelism.

The scripts and the run set-up are the same as with accelerate; this backend
- starts torch.distributed and megatron's TP/DP groups before creating the Accelerator (which then joins the same
  process group and is used for printing, metrics reduction, trackers and gradient-accumulation bookkeeping only);
- shards data by the data-parallel rank (every rank of a TP group trains on the same sequences);
- trains GPTModel shards (sdft_utils.megatron.training) with a plain torch optimizer; the teacher is a second GPTModel
  with the same shards (EMA per shard through sdft_utils.training.teachers.ema_update_);
- computes the divergence and token log-probs vocab-parallel (sdft_utils.megatron.vocab_parallel);
- samples on TP rank 0 of each data-parallel group and broadcasts the rollouts to the other TP ranks;
- saves Hugging Face weights (gathered) plus one trainer-state file per rank, and resumes from them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sdft_utils.errors import UserInputError
from sdft_utils.losses.divergence import IDENTITY, DivergenceOptions, TokenDivergence
from sdft_utils.training.backend import accumulation_steps, resolve_precision
from sdft_utils.training.config import RunArgs
from sdft_utils.training.distributed import make_accelerator
from sdft_utils.training.metrics import tracker_for
from sdft_utils.training.modeling import eos_token_ids


class MegatronBackend:
    """Parallel state, models and the TP-aware twins of the accelerate backend's methods. One per process."""

    def __init__(self, args: RunArgs, mini_batches: int = 1):
        from sdft_utils.megatron.training import (
            data_parallel_rank_and_size,
            initialize_parallel,
            tensor_parallel_group,
        )

        self.args = args
        self.check_args(args)  # before any process group or model: a mistake exits 2 at once
        self.precision = resolve_precision(args.dtype)
        if not torch.cuda.is_available():
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")  # accelerate then joins the gloo group under torchrun
        initialize_parallel(args.tensor_model_parallel_size, args.seed)
        self.tensor_parallel_size = args.tensor_model_parallel_size
        self.tp_group = tensor_parallel_group()
        self.tp_rank = dist.get_rank(self.tp_group)
        self.rank, self.world = data_parallel_rank_and_size()  # TP ranks of one group share their data
        self.accumulation_steps = accumulation_steps(args, self.world, mini_batches)
        self.accelerator = make_accelerator(self.accumulation_steps, args.max_grad_norm, args.per_device_batch_size,
                                            tracker_for(args.report_to), args.output_dir)
        # per-step totals are summed over all processes; TP ranks hold copies, so only TP rank 0 contributes
        self.metric_weight = 1.0 if self.tp_rank == 0 else 0.0
        self.layout = None
        self.model_path = None
        self.logit_transform = IDENTITY  # the converted architectures (Llama, Qwen2, Qwen3) return plain logits

    @staticmethod
    def check_args(args: RunArgs) -> None:
        """What this backend does not support yet, and what it needs, before any model is loaded."""
        unsupported = {
            "--rollout vllm --vllm_mode colocate (use --vllm_mode server, or --rollout hf)":
                args.rollout == "vllm" and args.vllm_mode == "colocate",
            "--check_weight_sync": args.check_weight_sync,
            "--eval_datasets": bool(args.eval_datasets),
            "--eval_every": args.eval_every > 0,
            "--teacher_kind trust_region": args.teacher_kind == "trust_region",
            "--teacher_fp32": args.teacher_fp32,
            "--use_peft": args.use_peft,
            "--rollout vllm with --top_p < 1 (the nucleus mass needs a global sort over the sharded vocabulary)":
                args.rollout == "vllm" and args.top_p < 1.0,
        }
        named = [flag for flag, used in unsupported.items() if used]
        if named:
            raise UserInputError(f"--backend megatron does not support {', '.join(named)} yet; drop the flag or use "
                                 "--backend accelerate.")
        if args.model is None or not Path(args.model).is_dir():
            raise UserInputError("--backend megatron loads a local Hugging Face folder: pass --model /path/to/model "
                                 f"(got {args.model!r}; download hub models first with `hf download`).")

    # ------------------------------------------------------------------ models
    def load_models(self, model_path: str, tokenizer) -> tuple[nn.Module, nn.Module, list[int]]:
        from transformers import GenerationConfig

        from sdft_utils.megatron.training import load_gpt_model, make_megatron_teacher

        # mixed precision: float32 shards, bf16 compute under autocast in `hidden_states`
        model, self.layout = load_gpt_model(model_path, self.tensor_parallel_size, self.precision.parameters)
        self.model_path = model_path
        teacher = make_megatron_teacher(self.args.teacher_kind, model, self.args.teacher_model or model_path,
                                        self.tensor_parallel_size, self.precision.parameters)
        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:
            generation_config = None
        return model, teacher, eos_token_ids(tokenizer, generation_config)

    def prepare(self, model: nn.Module, teacher: nn.Module, optimizer, scheduler):
        return model, teacher, optimizer  # the shards are placed already; checkpoints carry the teacher shards

    # ------------------------------------------------------------------ scoring and loss
    def hidden_states(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, width: int) -> Tensor:
        from sdft_utils.megatron.training import completion_hidden_states

        with torch.autocast(input_ids.device.type, self.precision.compute or torch.float32,
                            enabled=self.precision.compute is not None):
            return completion_hidden_states(model, input_ids, attention_mask, width)

    def teacher_head(self, teacher: nn.Module) -> tuple[Tensor, Tensor | None]:
        from sdft_utils.megatron.training import output_head_shard

        return output_head_shard(teacher).detach(), None  # this rank's vocabulary rows: the loss is vocab-parallel

    def token_divergence(self, model: nn.Module, student_hidden: Tensor, teacher_hidden: Tensor,
                         teacher_head: tuple[Tensor, Tensor | None], completion_ids: Tensor,
                         options: DivergenceOptions) -> TokenDivergence:
        """Megatron's vocab-parallel twin of the chunked divergence; it always recomputes the logits in backward
        (`options.grad_memory_mib` is not used)."""
        from sdft_utils.megatron.training import output_head_shard
        from sdft_utils.megatron.vocab_parallel import vocab_parallel_token_divergence

        return vocab_parallel_token_divergence(
            student_hidden, output_head_shard(model), teacher_hidden, teacher_head[0], completion_ids,
            vocab_size=self.layout.vocab_size, group=self.tp_group, alpha=options.alpha, mode=options.mode,
            top_k=options.top_k, tail_bucket=options.tail_bucket, temperature=options.temperature,
            chunk_size=options.chunk_size)

    def token_logprobs(self, model: nn.Module, hidden: Tensor, completion_ids: Tensor, temperature: float,
                       chunk_size: int) -> Tensor:
        from sdft_utils.megatron.training import output_head_shard
        from sdft_utils.megatron.vocab_parallel import vocab_parallel_token_logprobs

        return vocab_parallel_token_logprobs(hidden, output_head_shard(model), completion_ids,
                                             vocab_size=self.layout.vocab_size, group=self.tp_group,
                                             temperature=temperature, chunk_size=chunk_size)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """Complete the gradients (TP-replicated q/k norms, DP average), then clip by the global norm."""
        from sdft_utils.megatron.training import clip_grad_norm_, finalize_grads

        finalize_grads(model)
        return clip_grad_norm_(model, max_norm)

    def parameters_finite(self, model: nn.Module) -> bool:
        finite = torch.tensor(float(all(bool(torch.isfinite(p).all()) for p in model.parameters())))
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item() == 1.0)

    # ------------------------------------------------------------------ rollouts
    def rollout_engine(self, model: nn.Module, tokenizer, model_path: str, eos_token_ids: list[int]):
        """TP rank 0 of each data-parallel group samples; the others receive its rollouts."""
        args = self.args
        if args.rollout == "vllm":
            from sdft_utils.rollout.vllm_server import VLLMServerRollout

            # HTTP transfer of the gathered HF weights (the NCCL path needs per-parameter metadata of an HF model)
            engine = VLLMServerRollout(args.vllm_server_url, eos_token_ids, self.accelerator,
                                       bucket_bytes=args.vllm_sync_bucket_mb << 20,
                                       connect_timeout=args.vllm_server_timeout, seed=args.seed, transfer="http")
        else:
            engine = _HFCopyRollout(self.model_path, tokenizer.pad_token_id, eos_token_ids,
                                    args.generation_batch_size, keep=self.tp_rank == 0)
        return _TensorParallelRollout(engine, self, model)

    def finish(self, model: nn.Module, tokenizer, output_dir) -> None:
        pass  # the checkpoints are Hugging Face folders already

    # ------------------------------------------------------------------ checkpoints
    def save(self, output_dir: str | Path, step: int, model: nn.Module, teacher: nn.Module, optimizer, scheduler,
             tokenizer, progress: dict, keep_last: int | None) -> Path:
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

    def load(self, path: str | Path, model: nn.Module, teacher: nn.Module, optimizer, scheduler) -> dict:
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
