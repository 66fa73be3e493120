"""Which rows a step trains on: seeded per-epoch shuffles, shared out so 1 or N processes see the same steps."""

from __future__ import annotations

import functools

import torch


def process_positions(prompts_per_step: int, num_processes: int, process_index: int,
                      mini_batches: int = 1) -> list[int]:
    """Which of a step's prompts (positions 0..prompts_per_step-1) this process takes.

    Each mini-batch is a contiguous block of the step, and every process takes an equal contiguous share of each
    block, so an optimizer step sees the same prompts whether the run uses 1 process or N.
    """
    per_mini_batch = prompts_per_step // mini_batches
    share = per_mini_batch // num_processes
    return [block * per_mini_batch + process_index * share + offset
            for block in range(mini_batches) for offset in range(share)]


def step_indices(step: int, num_examples: int, prompts_per_step: int, seed: int, positions: list[int]) -> list[int]:
    """The dataset rows at `positions` of `step`. The data is an endless stream of seeded per-epoch shuffles, so
    the position in it is a function of the step alone and a resumed run sees exactly the same prompts."""
    rows = [divmod(step * prompts_per_step + position, num_examples) for position in positions]
    return [epoch_order(num_examples, seed, epoch)[offset] for epoch, offset in rows]


@functools.lru_cache(maxsize=2)
def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
