"""`HFRollout`: sampling from the training model itself with a Hugging Face model's forward and KV cache.

It decodes with its own eager loop over the model's dynamic KV cache. On a GPU that is launch-bound: every decode
step costs about the same whatever the batch. `HFRollout(compile_decode=True)` uses HF `generate` with a static KV
cache and a `torch.compile`d decode step instead. Compiled graphs are specialised on shapes, so prompts are
left-padded to a multiple of `prompt_bucket` tokens and batches to a fixed size; the first call of each shape
compiles (tens of seconds), later ones replay.

Recorded log-probs are of the tempered full-vocabulary distribution, also under top-p (`Rollouts.logprob_top_p` 1.0):
what the trainer computes, so they serve as π_old as they are.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import CompileConfig, GenerationConfig, LogitsProcessor, LogitsProcessorList

from sdft_utils.rollout.sampling import (
    Rollouts,
    SamplingConfig,
    left_pad,
    row_key,
    sample_tokens,
    tempered_scores,
    top_p_filter,
)
from sdft_utils.training.distributed import holds_shards
from sdft_utils.training.modeling import position_ids_from_mask


def _sampling_scores(logits: torch.Tensor, sampling: SamplingConfig, banned: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits -> (scores to sample from: tempered, top-p filtered, `banned` ids at -inf; the tempered scores
    whose full-vocabulary log-probs are recorded, as the trainer computes them)."""
    tempered = tempered_scores(logits, sampling.temperature)
    scores = top_p_filter(tempered, sampling.top_p)
    if banned is not None:
        scores = scores.index_fill(-1, banned, float("-inf"))  # out of place: `tempered` stays as the model's
    return scores, tempered


class _SampleAndRecord(LogitsProcessor):
    """HF `generate`'s hook for the compiled path: processes the scores, picks the token with `sample_tokens` and
    hands generate a one-hot distribution, so both paths sample alike; records the log-prob of each picked token.
    It also holds EOS off for the model's `min_new_tokens` (generate's own processor would change the scores that
    are recorded)."""

    def __init__(self, sampling: SamplingConfig, row_keys: torch.Tensor | None, eos_ids: torch.Tensor,
                 min_new_tokens: int = 0):
        self.sampling, self.row_keys, self.eos_ids, self.min_new_tokens = sampling, row_keys, eos_ids, min_new_tokens
        self.position = 0
        self.recorded: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.position += 1
        banned = self.eos_ids if self.position <= self.min_new_tokens else None
        scores, tempered = _sampling_scores(scores, self.sampling, banned)
        tokens, logprobs = sample_tokens(scores, self.row_keys, self.position, self.sampling.logprobs, tempered)
        if self.sampling.logprobs:
            self.recorded.append(logprobs)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens.unsqueeze(-1), 0.0)


def compile_available(device: torch.device, backend: str = "inductor") -> str | None:
    """None when `torch.compile` with `backend` can run on `device`, else the reason it cannot."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python/platform"
    except ImportError:
        return "this torch has no torch.compile"
    if backend == "inductor" and device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "the inductor backend needs triton on a GPU"
    return None


class HFRollout:
    """Sampling from the training model itself with a Hugging Face model's forward and KV cache.

    `compile_decode=True`: HF `generate` with a static KV cache + compiled decode step (`compile_backend`,
    "inductor" with CUDA graphs on a GPU; "eager" only traces, which the tests use). When compilation is unavailable
    or fails, it warns once and falls back to the eager loop, which samples the same tokens.
    """

    def __init__(self, model: nn.Module, pad_token_id: int, eos_token_ids: list[int], batch_size: int | None = None,
                 compile_decode: bool = False, compile_backend: str = "inductor", prompt_bucket: int = 64):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
        self.batch_size = batch_size  # prompts per generate() call; None = all at once
        self.compile_decode = compile_decode
        self.compile_backend = compile_backend
        self.prompt_bucket = prompt_bucket
        self.synced: bool | None = None  # processes must stop decoding together (ZeRO-3/FSDP2); set on first use

    def sync_weights(self, model: nn.Module) -> None:
        self.model = model  # generate() reads the training parameters directly

    def close(self) -> None:
        """Nothing to shut down: the engine is the training model."""

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> Rollouts:
        prompts = [ids for ids in prompt_ids for _ in range(sampling.num_samples)]
        if sampling.temperature <= 0:
            row_keys = None  # greedy
        elif seeds is None:  # unseeded: keys from torch's global generator (torch.manual_seed reproduces them)
            row_keys = torch.randint(-(1 << 63), (1 << 63) - 1, (len(prompts),), dtype=torch.long)
        else:
            row_keys = torch.tensor([row_key(seed, sample) for seed in seeds
                                     for sample in range(sampling.num_samples)])
        step = self.batch_size or len(prompts)
        completions, logprobs = [], []
        for start in range(0, len(prompts), step):
            chunk = prompts[start:start + step]
            keys = None if row_keys is None else row_keys[start:start + step]
            if self.compile_decode:
                chunk_ids, chunk_logprobs = self._generate_compiled(chunk, step, sampling, keys)
            else:
                chunk_ids, chunk_logprobs = self._decode(chunk, sampling, keys)
            completions += chunk_ids
            logprobs += chunk_logprobs
        return Rollouts(completions, logprobs, from_training_weights=True)

    def _generate_compiled(self, prompts: list[list[int]], batch_size: int, sampling: SamplingConfig,
                           row_keys: torch.Tensor | None):
        """Static cache + compiled decode; falls back to the eager loop (for good) when compilation fails."""
        device = next(extract_model_from_parallel(self.model).parameters()).device
        reason = compile_available(device, self.compile_backend)
        if reason is None:
            # a short last chunk is padded with copies of its first prompt: one batch shape, one compiled graph
            padded = prompts + [prompts[0]] * (batch_size - len(prompts))
            padded_keys = None if row_keys is None else torch.cat(
                [row_keys, row_keys[:1].expand(batch_size - len(prompts))])
            try:
                completions, logprobs = self._generate_static(padded, sampling, padded_keys)
                return completions[:len(prompts)], logprobs[:len(prompts)]
            except Exception as error:  # noqa: BLE001 - any compiler failure means: use the eager path
                reason = f"{type(error).__name__}: {str(error)[:300]}"
        warnings.warn(f"compiled decoding unavailable ({reason}); using the eager decode loop", stacklevel=3)
        self.compile_decode = False
        return self._decode(prompts, sampling, row_keys)

    def _decode(self, prompts: list[list[int]], sampling: SamplingConfig, row_keys: torch.Tensor | None):
        """The eager path: prefill, then one forward per new token with the model's dynamic KV cache.

        A plain loop rather than HF `generate`: it computes only the last position's logits, samples with
        `sample_tokens` and carries nothing else per step (no logits-processor list, stopping criteria or score
        copies): on a CPU 2x `generate`'s tokens/s with a 49k vocabulary, the same with a toy one
        (benchmarks/RESULTS.md, section 3).
        """
        model = extract_model_from_parallel(self.model)
        device = next(model.parameters()).device
        input_ids, prompt_mask = (tensor.to(device) for tensor in left_pad(prompts, self.pad_token_id))
        batch, width = input_ids.shape
        new_tokens = sampling.max_new_tokens
        attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, new_tokens)], dim=1)
        positions = position_ids_from_mask(prompt_mask)
        eos_ids = torch.tensor(self.eos_token_ids, device=device)
        min_new_tokens = getattr(getattr(model, "generation_config", None), "min_new_tokens", None) or 0
        # ZeRO-3/FSDP2 gather parameters inside each forward, a collective: every process must run as many
        # forwards as the slowest one, so finishing early is decided together
        if self.synced is None:  # sharding never changes during a run: look once
            self.synced = holds_shards(self.model) and dist.is_available() and dist.is_initialized()
        tokens = torch.full((batch, new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((batch, new_tokens), device=device) if sampling.logprobs else None
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        feed, cache, generated = input_ids, None, 0
        was_training = model.training
        model.eval()
        try:
            while generated < new_tokens:
                output = model(input_ids=feed, attention_mask=attention_mask[:, :width + generated],
                               position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = output.past_key_values
                # EOS held off for the model folder's generation_config min_new_tokens, as HF generate does
                scores, tempered = _sampling_scores(output.logits[:, -1], sampling,
                                                    eos_ids if generated < min_new_tokens else None)
                chosen, chosen_logprobs = sample_tokens(scores, row_keys, generated + 1, sampling.logprobs, tempered)
                tokens[:, generated] = chosen.masked_fill(finished, self.pad_token_id)
                if logprobs is not None:
                    logprobs[:, generated] = chosen_logprobs
                finished |= torch.isin(chosen, eos_ids)
                generated += 1
                feed, positions = chosen.unsqueeze(-1), positions[:, -1:] + 1
                remaining = (~finished).sum()
                if self.synced:
                    dist.all_reduce(remaining)
                if remaining.item() == 0:  # one host sync per token, as in HF generate's stopping check
                    break
        finally:
            model.train(was_training)
        return self._split(tokens[:, :generated], None if logprobs is None else logprobs[:, :generated])

    def _generate_static(self, prompts: list[list[int]], sampling: SamplingConfig, row_keys: torch.Tensor | None):
        """HF `generate` with a static KV cache and transformers' compiled decode step."""
        model = extract_model_from_parallel(self.model)
        device = next(model.parameters()).device
        input_ids, attention_mask = (tensor.to(device) for tensor in left_pad(
            prompts, self.pad_token_id, self.prompt_bucket))
        min_new_tokens = getattr(model.generation_config, "min_new_tokens", None) or 0
        recorder = _SampleAndRecord(sampling, row_keys, torch.tensor(self.eos_token_ids, device=device), min_new_tokens)
        compile_config = CompileConfig(backend=self.compile_backend, dynamic=False, fullgraph=False,
                                       mode="reduce-overhead" if self.compile_backend == "inductor" and
                                       device.type == "cuda" else None)
        compile_config._compile_all_devices = device.type != "cuda"  # transformers only auto-compiles on GPUs
        # temperature/top-p are applied by the recorder, which also picks the token (generate's own warpers are off)
        config = GenerationConfig(
            do_sample=False, max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids, use_cache=True, cache_implementation="static",
            compile_config=compile_config, min_new_tokens=0,  # the recorder holds EOS off itself
        )
        was_training = model.training
        model.eval()
        try:
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                    logits_processor=LogitsProcessorList([recorder]))
        finally:
            model.train(was_training)
        new_tokens = output[:, input_ids.shape[1]:]
        return self._split(new_tokens, torch.stack(recorder.recorded, dim=1) if sampling.logprobs else None)

    def _split(self, new_tokens: torch.Tensor, logprobs: torch.Tensor | None):
        """(B, T) tokens (+ log-probs) -> per-row lists cut after the first EOS; one device->host copy each."""
        new_tokens = new_tokens.cpu()
        logprobs = None if logprobs is None else logprobs.cpu()
        completions, completion_logprobs = [], []
        for row in range(new_tokens.shape[0]):
            row_tokens = new_tokens[row].tolist()
            length = next((i + 1 for i, token in enumerate(row_tokens) if token in self.eos_token_ids),
                          len(row_tokens))
            completions.append(row_tokens[:length])
            completion_logprobs.append([] if logprobs is None else logprobs[row, :length].tolist())
        return completions, completion_logprobs
