"""Rollout engines: sample completions from the student and return their tokens and log-probabilities.

Every engine has the same two methods, so the training scripts never branch on the backend:
- `generate(prompt_ids, sampling) -> Rollouts`
- `sync_weights(model)`: make the engine sample from the model's current weights (a no-op for HF `generate`,
  which samples from the training model itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList


@dataclass
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    num_samples: int = 1  # completions per prompt


@dataclass
class Rollouts:
    """Completions of a list of prompts; with num_samples > 1 the samples of one prompt are consecutive."""

    completion_ids: list[list[int]]  # each ends with EOS unless it hit max_new_tokens
    logprobs: list[list[float]]  # log-prob of each sampled token under the sampling distribution
    from_training_weights: bool  # True when the engine *is* the training model (no mismatch to correct)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention mask), both (B, max_len), padded on the left."""
    width = max(len(sequence) for sequence in sequences)
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

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p
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
        self.previous_logprobs = scores.log_softmax(-1)
        return scores

    def record(self, last_tokens: torch.Tensor) -> None:
        if self.previous_logprobs is not None:
            self.recorded.append(self.previous_logprobs.gather(-1, last_tokens[:, None])[:, 0])
            self.previous_logprobs = None


class HFRollout:
    """Sampling with Hugging Face `generate` on the training model itself."""

    def __init__(self, model: nn.Module, pad_token_id: int, eos_token_ids: list[int], batch_size: int | None = None):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
        self.batch_size = batch_size  # prompts per generate() call; None = all at once

    def sync_weights(self, model: nn.Module) -> None:
        self.model = model  # generate() reads the training parameters directly

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> Rollouts:
        prompts = [ids for ids in prompt_ids for _ in range(sampling.num_samples)]
        step = self.batch_size or len(prompts)
        completions, logprobs = [], []
        for start in range(0, len(prompts), step):
            chunk_ids, chunk_logprobs = self._generate_batch(prompts[start:start + step], sampling)
            completions += chunk_ids
            logprobs += chunk_logprobs
        return Rollouts(completions, logprobs, from_training_weights=True)

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig):
        model = extract_model_from_parallel(self.model)
        device = next(model.parameters()).device
        input_ids, attention_mask = (tensor.to(device) for tensor in left_pad(prompts, self.pad_token_id))
        recorder = _SampleAndRecord(sampling.temperature, sampling.top_p)
        # temperature/top-p are applied by the recorder; generate's own warpers are turned off so it samples from
        # exactly the distribution whose log-probabilities are recorded
        config = GenerationConfig(
            do_sample=sampling.temperature > 0, temperature=1.0, top_p=1.0, top_k=0,
            max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_ids,
            use_cache=True,
        )
        was_training = model.training
        model.eval()
        try:
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config, logits_processor=LogitsProcessorList([recorder]),
            )
        finally:
            model.train(was_training)
        new_tokens = output[:, input_ids.shape[1]:]
        recorder.record(new_tokens[:, -1])  # the last sampled token is never fed back
        sampled_logprobs = torch.stack(recorder.recorded, dim=1).cpu()
        new_tokens = new_tokens.cpu()
        completions, logprobs = [], []
        for row in range(new_tokens.shape[0]):
            tokens = new_tokens[row].tolist()
            length = next((i + 1 for i, token in enumerate(tokens) if token in self.eos_token_ids), len(tokens))
            completions.append(tokens[:length])
            logprobs.append(sampled_logprobs[row, :length].tolist())
        return completions, logprobs
