"""Rollout engines: sample completions from the student and return their tokens and log-probabilities.

Every engine has the same two methods, so the training scripts never branch on the backend:
- `generate(prompt_ids, sampling, seeds=None) -> Rollouts`; with one seed per prompt (`prompt_seeds`) the samples
  of a prompt depend only on its seed, not on which process or generate() batch it lands in, so a run gives the
  same rollouts on 1 or N processes (HF: inverse-CDF sampling at counter-based uniforms; vLLM colocate: per-request
  seeds)
- `sync_weights(model)`: make the engine sample from the model's current weights (a no-op for `HFRollout`,
  which samples from the training model itself).

`HFRollout` decodes with its own eager loop over the model's dynamic KV cache. On a GPU that is launch-bound: every
decode step costs ~24 ms whatever the batch (research/gpu_anchor.md). `HFRollout(compile_decode=True)` uses HF
`generate` with a static KV cache and a `torch.compile`d decode step instead (7.4x faster on an H200 at batch 8).
Compiled graphs are specialised on shapes, so prompts are left-padded to a multiple of `prompt_bucket` tokens and
batches to a fixed size; the first call of each shape compiles (tens of seconds), later ones replay.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import CompileConfig, GenerationConfig, LogitsProcessor, LogitsProcessorList

from sdft_utils.distributed import holds_shards
from sdft_utils.modeling import position_ids_from_mask


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


def uniform_draws(row_keys: torch.Tensor, position: int) -> torch.Tensor:
    """(B,) int64 keys -> (B,) float64 uniforms in (0, 1) that depend only on (key, position)."""
    bits = _mix64(_mix64(row_keys * _to_signed(0x9E3779B97F4A7C15) + position))
    return (_shift_right(bits, 11).double() + 0.5) / float(1 << 53)


def process_scores(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(B, V) next-token logits -> float32 scores of the sampling distribution: divided by the temperature (0 =
    greedy: unscaled) and with the tokens outside the top-p nucleus set to -inf."""
    scores = logits.float()
    if temperature > 0:
        scores = scores / temperature
    if 0 < top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(-1)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the token that crosses top_p
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scores


def sample_tokens(scores: torch.Tensor, row_keys: torch.Tensor | None, position: int,
                  record: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, V) processed scores -> ((B,) tokens, (B,) their log-probs or None). `row_keys` None means greedy.

    Sampling inverts the CDF at one counter-based uniform per row: an exact sample whose value depends only on the
    row's scores, key and position, never on the other rows of the batch (unlike torch.multinomial), and one hash
    per row instead of one per vocabulary entry.
    """
    probs = scores.softmax(-1)
    if row_keys is None:
        tokens = scores.argmax(-1)
    else:
        cdf = probs.double().cumsum_(-1)
        targets = uniform_draws(row_keys.to(scores.device), position).unsqueeze(-1) * cdf[:, -1:]
        # the first token whose CDF exceeds the draw; a token of probability 0 never does
        tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp_(max=scores.shape[-1] - 1)
    if not record:
        return tokens, None
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log()


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
    """HF `generate`'s hook for the compiled path: processes the scores, picks the token with `sample_tokens` and
    hands generate a one-hot distribution, so both paths sample alike; records the log-prob of each picked token."""

    def __init__(self, temperature: float, top_p: float, row_keys: torch.Tensor | None, record: bool = True):
        self.temperature, self.top_p, self.row_keys, self.record = temperature, top_p, row_keys, record
        self.position = 0
        self.recorded: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.position += 1
        scores = process_scores(scores, self.temperature, self.top_p)
        tokens, logprobs = sample_tokens(scores, self.row_keys, self.position, self.record)
        if self.record:
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

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> Rollouts:
        prompts = [ids for ids in prompt_ids for _ in range(sampling.num_samples)]
        if sampling.temperature <= 0:
            row_keys = None  # greedy
        elif seeds is None:  # unseeded: keys from torch's global generator (torch.manual_seed reproduces them)
            row_keys = torch.randint(-(1 << 63), (1 << 63) - 1, (len(prompts),), dtype=torch.long)
        else:
            row_keys = torch.tensor([_to_signed(_splitmix64(seed ^ sample)) for seed in seeds
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
                scores = process_scores(output.logits[:, -1], sampling.temperature, sampling.top_p)
                if generated < min_new_tokens:  # the model folder's generation_config, as HF generate honours it
                    scores[:, eos_ids] = float("-inf")
                chosen, chosen_logprobs = sample_tokens(scores, row_keys, generated + 1, sampling.logprobs)
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
        recorder = _SampleAndRecord(sampling.temperature, sampling.top_p, row_keys, sampling.logprobs)
        compile_config = CompileConfig(backend=self.compile_backend, dynamic=False, fullgraph=False,
                                       mode="reduce-overhead" if self.compile_backend == "inductor" and
                                       device.type == "cuda" else None)
        compile_config._compile_all_devices = device.type != "cuda"  # transformers only auto-compiles on GPUs
        # temperature/top-p are applied by the recorder, which also picks the token (generate's own warpers are off)
        config = GenerationConfig(
            do_sample=False, max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids, use_cache=True, cache_implementation="static",
            compile_config=compile_config,
            min_new_tokens=getattr(model.generation_config, "min_new_tokens", None) or 0,
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
