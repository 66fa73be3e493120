"""Rollout engines: sample completions from the student and return their tokens and log-probabilities.

Every engine has the same two methods, so the training scripts never branch on the backend:
- `generate(prompt_ids, sampling, seeds=None) -> Rollouts`; with one seed per prompt (`prompt_seeds`) the samples
  of a prompt depend only on its seed, not on which process or generate() batch it lands in, so a run gives the
  same rollouts on 1 or N processes (HF: counter-based Gumbel-max noise; vLLM colocate: per-request seeds)
- `sync_weights(model)`: make the engine sample from the model's current weights (a no-op for HF `generate`,
  which samples from the training model itself).

HF `generate` with its default dynamic KV cache is launch-bound on a GPU: every decode step costs ~24 ms whatever the
batch (research/gpu_anchor.md). `HFRollout(compile_decode=True)` uses a static KV cache and a `torch.compile`d decode
step instead (7.4x faster on an H200 at batch 8). Compiled graphs are specialised on shapes, so prompts are
left-padded to a multiple of `prompt_bucket` tokens and batches to a fixed size; the first call of each shape
compiles (tens of seconds), later ones replay.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import CompileConfig, GenerationConfig, LogitsProcessor, LogitsProcessorList


@dataclass
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    num_samples: int = 1  # completions per prompt
    # False when the caller never reads the log-probs (HF rollouts sample from the training weights, so no IS
    # correction needs them): HF generate then skips a (B, V) log-softmax per token and returns empty lists
    logprobs: bool = True


@dataclass
class Rollouts:
    """Completions of a list of prompts; with num_samples > 1 the samples of one prompt are consecutive."""

    completion_ids: list[list[int]]  # each ends with EOS unless it hit max_new_tokens
    logprobs: list[list[float]]  # log-prob of each sampled token under the sampling distribution
    from_training_weights: bool  # True when the engine *is* the training model (no mismatch to correct)


_UINT64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """A 64-bit integer hash (SplitMix64 finaliser) on Python ints."""
    value = (value + 0x9E3779B97F4A7C15) & _UINT64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _UINT64
    return value ^ (value >> 31)


def prompt_seeds(seed: int, step: int, positions: list[int]) -> list[int]:
    """One sampling seed per prompt, from the run's seed, the step and the prompt's position in the step's global
    batch (`data.process_positions`)."""
    return [_splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ position) >> 1 for position in positions]


def _to_signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)  # logical shift on int64 (>> alone is arithmetic)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps around, as in unsigned arithmetic)."""
    x = x ^ _shift_right(x, 30)
    x = x * _to_signed(0xBF58476D1CE4E5B9)
    x = x ^ _shift_right(x, 27)
    x = x * _to_signed(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


def gumbel_noise(row_keys: torch.Tensor, position: int, vocab_size: int) -> torch.Tensor:
    """(B,) int64 keys -> (B, V) float32 Gumbel(0, 1) noise that depends only on (key, position, token).

    argmax(logprobs + noise) is an exact sample from softmax(logprobs) (the Gumbel-max trick); unlike
    torch.multinomial, a row's sample does not depend on the other rows of the batch.
    """
    base = _mix64(row_keys * _to_signed(0x9E3779B97F4A7C15) + position)
    bits = _mix64(base[:, None] + torch.arange(vocab_size, device=row_keys.device))
    uniform = (_shift_right(bits, 11).double() + 0.5) / float(1 << 53)  # in (0, 1)
    return (-torch.log(-torch.log(uniform))).float()


def left_pad(sequences: list[list[int]], pad_id: int, multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention mask), both (B, width), padded on the left; width = the longest sequence
    rounded up to a multiple of `multiple_of` (so compiled code sees few distinct shapes)."""
    width = math.ceil(max(len(sequence) for sequence in sequences) / multiple_of) * multiple_of
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence):] = torch.tensor(sequence)
            mask[row, width - len(sequence):] = 1
    return ids, mask


def right_pad(sequences: list[list], pad_value, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists -> (values, mask), both (B, max_len), padded on the right."""
    width = max(1, max(len(sequence) for sequence in sequences))
    values = torch.full((len(sequences), width), pad_value, dtype=dtype)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        values[row, :len(sequence)] = torch.tensor(sequence, dtype=dtype)
        mask[row, :len(sequence)] = 1
    return values, mask


class _SampleAndRecord(LogitsProcessor):
    """Applies temperature and top-p, and records the log-probability of each token that gets sampled.

    The token sampled at step k only appears in `input_ids` at step k+1, so the processor keeps the previous
    step's log-probabilities (one (B, V) tensor, not one per step) and reads them then.
    """

    def __init__(self, temperature: float, top_p: float, record: bool = True,
                 row_keys: torch.Tensor | None = None):
        self.temperature, self.top_p, self.record_logprobs = temperature, top_p, record
        self.row_keys = row_keys  # (B,) int64: sample with per-row noise instead of generate's multinomial
        self.position = 0
        self.previous_logprobs: torch.Tensor | None = None
        self.recorded: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.record(input_ids[:, -1])
        scores = scores.float()
        if self.temperature > 0:
            scores = scores / self.temperature
        if 0 < self.top_p < 1:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop_sorted = cumulative - sorted_scores.softmax(-1) >= self.top_p  # keep the token that crosses top_p
            scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        if self.record_logprobs:
            self.previous_logprobs = scores.log_softmax(-1)
        self.position += 1
        if self.row_keys is None or self.temperature <= 0:
            return scores
        noise = gumbel_noise(self.row_keys.to(scores.device), self.position, scores.shape[-1])
        chosen = (scores + noise).argmax(-1, keepdim=True)  # Gumbel-max: softmax's normaliser does not matter
        # generate() then samples from a one-hot distribution: it picks exactly the chosen token
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)

    def record(self, last_tokens: torch.Tensor) -> None:
        if self.previous_logprobs is not None:
            self.recorded.append(self.previous_logprobs.gather(-1, last_tokens[:, None])[:, 0])
            self.previous_logprobs = None


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
    """Sampling with Hugging Face `generate` on the training model itself.

    `compile_decode=True`: static KV cache + compiled decode step (`compile_backend`, "inductor" with CUDA graphs
    on a GPU; "eager" only traces, which the tests use). When compilation is unavailable or fails, it warns once and
    falls back to the dynamic cache, which samples the same distribution.
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

    def sync_weights(self, model: nn.Module) -> None:
        self.model = model  # generate() reads the training parameters directly

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> Rollouts:
        prompts = [ids for ids in prompt_ids for _ in range(sampling.num_samples)]
        row_keys = None if seeds is None else torch.tensor(
            [_to_signed(_splitmix64(seed ^ sample)) for seed in seeds for sample in range(sampling.num_samples)])
        step = self.batch_size or len(prompts)
        completions, logprobs = [], []
        for start in range(0, len(prompts), step):
            chunk = prompts[start:start + step]
            keys = None if row_keys is None else row_keys[start:start + step]
            if self.compile_decode:
                chunk_ids, chunk_logprobs = self._generate_compiled(chunk, step, sampling, keys)
            else:
                chunk_ids, chunk_logprobs = self._generate_batch(chunk, sampling, keys)
            completions += chunk_ids
            logprobs += chunk_logprobs
        return Rollouts(completions, logprobs, from_training_weights=True)

    def _generate_compiled(self, prompts: list[list[int]], batch_size: int, sampling: SamplingConfig,
                           row_keys: torch.Tensor | None = None):
        """Static cache + compiled decode; falls back to the dynamic cache (for good) when compilation fails."""
        device = next(extract_model_from_parallel(self.model).parameters()).device
        reason = compile_available(device, self.compile_backend)
        if reason is None:
            # a short last chunk is padded with copies of its first prompt: one batch shape, one compiled graph
            padded = prompts + [prompts[0]] * (batch_size - len(prompts))
            padded_keys = None if row_keys is None else torch.cat(
                [row_keys, row_keys[:1].expand(batch_size - len(prompts))])
            try:
                completions, logprobs = self._generate_batch(padded, sampling, padded_keys, static=True)
                return completions[:len(prompts)], logprobs[:len(prompts)]
            except Exception as error:  # noqa: BLE001 - any compiler failure means: use the eager path
                reason = f"{type(error).__name__}: {str(error)[:300]}"
        warnings.warn(f"compiled decoding unavailable ({reason}); using HF generate with a dynamic cache",
                      stacklevel=3)
        self.compile_decode = False
        return self._generate_batch(prompts, sampling, row_keys)

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig,
                        row_keys: torch.Tensor | None = None, static: bool = False):
        model = extract_model_from_parallel(self.model)
        device = next(model.parameters()).device
        input_ids, attention_mask = (tensor.to(device) for tensor in left_pad(
            prompts, self.pad_token_id, self.prompt_bucket if static else 1))
        recorder = _SampleAndRecord(sampling.temperature, sampling.top_p, sampling.logprobs, row_keys)
        compile_options = {}
        if static:
            compile_config = CompileConfig(backend=self.compile_backend, dynamic=False, fullgraph=False,
                                           mode="reduce-overhead" if self.compile_backend == "inductor" and
                                           device.type == "cuda" else None)
            compile_config._compile_all_devices = device.type != "cuda"  # transformers only auto-compiles on GPUs
            compile_options = dict(cache_implementation="static", compile_config=compile_config)
        # temperature/top-p are applied by the recorder; generate's own warpers are turned off so it samples from
        # exactly the distribution whose log-probabilities are recorded
        config = GenerationConfig(
            do_sample=sampling.temperature > 0, temperature=1.0, top_p=1.0, top_k=0,
            max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_ids,
            use_cache=True, **compile_options,
        )
        was_training = model.training
        model.eval()
        try:
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                logits_processor=LogitsProcessorList([recorder]),
            )
        finally:
            model.train(was_training)
        new_tokens = output[:, input_ids.shape[1]:]
        recorder.record(new_tokens[:, -1])  # the last sampled token is never fed back
        # one device->host copy per batch (not one per token)
        sampled_logprobs = torch.stack(recorder.recorded, dim=1).cpu() if sampling.logprobs else None
        new_tokens = new_tokens.cpu()
        completions, logprobs = [], []
        for row in range(new_tokens.shape[0]):
            tokens = new_tokens[row].tolist()
            length = next((i + 1 for i, token in enumerate(tokens) if token in self.eos_token_ids), len(tokens))
            completions.append(tokens[:length])
            logprobs.append([] if sampled_logprobs is None else sampled_logprobs[row, :length].tolist())
        return completions, logprobs
