"""Multiple choice by log-likelihood, the way lm-evaluation-harness scores ARC, SciQ, OpenBookQA and MMLU.

The model writes nothing: for each option it reads `Question: {question}\nAnswer: {option}` (plain text, no chat
template, lm-eval's ARC format) and the option with the highest summed log-probability of its own tokens is the
model's choice (lm-eval's `acc`). A small model that is at chance when it must *write* a letter (it picks A or B
whatever the question) can still rank the right option first, so this is the reading that shows what such a model
knows and what fine-tuning took away. The numbers follow lm-eval's method, not its exact prompts for every
benchmark (its HellaSwag and Winogrande formats differ), so compare checkpoints with them, not papers.
"""

from __future__ import annotations

import torch

from sdft_utils.sdpo.tasks import Task

CONTEXT_TEMPLATE = "Question: {question}\nAnswer:"


def option_sequences(tokenizer, task: Task) -> tuple[list[list[int]], list[int]]:
    """Token ids of context + " option" for each option, and how many of them belong to the option. Context and
    option are tokenized apart and joined, as lm-eval does, so the option's tokens are the same whatever precedes
    them."""
    context = tokenizer(CONTEXT_TEMPLATE.format(question=task.row["question"]), add_special_tokens=False)["input_ids"]
    options = [tokenizer(" " + str(option), add_special_tokens=False)["input_ids"] for option in task.row["choices"]]
    return [context + option for option in options], [len(option) for option in options]


@torch.no_grad()
def sequence_logprobs(model, sequences: list[list[int]], scored: list[int], pad_id: int,
                      batch_size: int = 16) -> list[float]:
    """Sum of log p(token | everything before it) over the last `scored[i]` tokens of each sequence."""
    device = next(model.parameters()).device
    totals = []
    for start in range(0, len(sequences), batch_size):
        rows, counts = sequences[start:start + batch_size], scored[start:start + batch_size]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, sequence in enumerate(rows):  # right padding: positions need no shifting
            ids[row, :len(sequence)] = torch.tensor(sequence)
            mask[row, :len(sequence)] = 1
        logprobs = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
        for row, (sequence, count) in enumerate(zip(rows, counts, strict=True)):
            positions = torch.arange(len(sequence) - count, len(sequence), device=device)
            targets = torch.tensor(sequence[-count:], device=device)
            totals.append(logprobs[row, positions - 1, targets].sum().item())
    return totals


def likelihood_choices(model, tokenizer, tasks: list[Task], batch_size: int = 16) -> list[int]:
    """The index of the most likely option of each multiple-choice task (rows need `question` and `choices`)."""
    sequences, scored = [], []
    for task in tasks:
        rows, counts = option_sequences(tokenizer, task)
        sequences += rows
        scored += counts
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    totals = sequence_logprobs(model, sequences, scored, pad_id, batch_size)
    choices, position = [], 0
    for task in tasks:  # a task's options are consecutive in `totals`
        scores = totals[position:position + len(task.row["choices"])]
        choices.append(max(range(len(scores)), key=scores.__getitem__))
        position += len(scores)
    return choices
