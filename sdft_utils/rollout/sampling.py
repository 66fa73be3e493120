"""Rollout engines: sample completions from the student and return their tokens and log-probabilities.

Every engine has the same two methods, so the training scripts never branch on the backend:
- `generate(prompt_ids, sampling, seeds=None) -> Rollouts`; with one seed per prompt (`prompt_seeds`) the samples
  of a prompt depend only on its seed, not on which process or generate() batch it lands in, so a run gives the
  same rollouts on 1 or N processes (HF: inverse-CDF sampling at counter-based uniforms; vLLM colocate: per-request
  seeds)
- `sync_weights(model)`: make the engine sample from the model's current weights (a no-op for `HFRollout`,
  which samples from the training model itself).

`HFRollout` decodes with its own eager loop over the model's dynamic KV cache. On a GPU that is launch-bound: every
decode step costs about the same whatever the batch (benchmarks/RESULTS.md, section 3). `HFRollout(compile_decode=True)` uses HF
`generate` with a static KV cache and a `torch.compile`d decode step instead.
Compiled graphs are specialised on shapes, so prompts are left-padded to a multiple of `prompt_bucket` tokens and
batches to a fixed size; the first call of each shape compiles (tens of seconds), later ones replay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
    """Completions of a list of prompts; with num_samples > 1 the samples of one prompt are consecutive.

    `logprobs` are of the temperature-scaled distribution, renormalised over the top-p nucleus when
    `logprob_top_p` < 1. `HFRollout` records the full-vocabulary values (logprob_top_p 1.0), exactly what the trainer
    computes. vLLM can only report the sampler's renormalised ones under top-p (its `processed_logprobs`; its
    `raw_logprobs` ignore the temperature), so the vLLM engines set logprob_top_p = the sampling top_p; the trainer
    then adds its own nucleus mass before comparing (`losses.weighting.full_vocabulary_logprobs`).
    Multi-turn tool rollouts (`sdft_utils.tools.rollout.generate_with_tools`) put tool results (and later user turns)
    inside a completion: `model_token_masks` then marks with 1 the tokens the model wrote and with 0 the ones it only
    reads (their `logprobs` entries are 0.0 placeholders). None means every completion token is model-written.
    """

    completion_ids: list[list[int]]  # each ends with EOS unless it hit max_new_tokens
    logprobs: list[list[float]]  # log-prob of each sampled token (see above)
    from_training_weights: bool  # True when the engine *is* the training model (no mismatch to correct)
    logprob_top_p: float = 1.0  # the nucleus the log-probs are renormalised over; 1.0 = the full vocabulary
    model_token_masks: list[list[int]] | None = None  # 1 = sampled by the model, 0 = tool/user context; None = all 1
    trajectories: list | None = None  # tool rollouts: one sdft_utils.tools.rollout.Trajectory per completion


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


def derive_seed(seed: int, *values: int) -> int:
    """A non-negative 63-bit seed mixed from `seed` and further integers (e.g. a sample index and a turn number)."""
    for value in values:
        seed = _splitmix64(_splitmix64(seed) ^ value)
    return _splitmix64(seed) >> 1


def row_key(seed: int, sample: int) -> int:
    """The counter-based noise key of one sample of one prompt: a signed 64-bit mix of its seed and index."""
    return _to_signed(_splitmix64(seed ^ sample))


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


def tempered_scores(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, V) next-token logits -> float32 logits / temperature (0 = greedy: unscaled). May return `logits` itself."""
    scores = logits.float()
    return scores / temperature if temperature > 0 else scores


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) scores -> a copy with the tokens outside the top-p nucleus set to -inf (`scores` itself for top_p 1).
    The nucleus: the most probable tokens, in decreasing order, up to and including the one at which the cumulative
    mass reaches top_p (vLLM's rule; `losses.divergence.nucleus_log_mass` measures its mass)."""
    if not 0 < top_p < 1:
        return scores
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    sorted_probs = sorted_scores.softmax(-1)
    drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the token that crosses top_p
    return scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


def process_scores(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(B, V) next-token logits -> float32 scores of the sampling distribution: divided by the temperature (0 =
    greedy: unscaled) and with the tokens outside the top-p nucleus set to -inf."""
    return top_p_filter(tempered_scores(logits, temperature), top_p)


def sample_tokens(scores: torch.Tensor, row_keys: torch.Tensor | None, position: int, record: bool = True,
                  record_from: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, V) processed scores -> ((B,) tokens, (B,) their log-probs or None). `row_keys` None means greedy.

    The log-probs are those of softmax(`record_from`) (default: the sampled `scores`); `HFRollout` passes the
    tempered scores before top-p, so it records the full-vocabulary values the trainer computes.
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
    if record_from is None or record_from is scores:
        return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log()
    return tokens, record_from.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


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
