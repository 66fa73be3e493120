"""A quick answer-accuracy check run before and after training (held-out questions, and prior knowledge).

Each row of an evaluation file has `prompt` (a string or chat messages) and `answers` (a string or a list of
strings); a greedy completion counts as correct when it contains one of the answers, ignoring case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from sdft_utils.data.prompts import to_messages, tokenize_chat_prompts
from sdft_utils.data.tables import load_rows
from sdft_utils.errors import UserInputError
from sdft_utils.rollout.sampling import SamplingConfig


@dataclass
class EvalExample:
    prompt: list[dict[str, str]]
    answers: list[str]


def load_eval_set(source: str) -> list[EvalExample]:
    rows = load_rows(source)
    if not rows:
        raise UserInputError(f"{source}: the evaluation set is empty.")
    examples, bad_rows = [], []
    for number, row in enumerate(rows, start=1):
        answers = row.get("answers")
        answers = [answers] if isinstance(answers, str) else answers
        prompt = row.get("prompt")
        if (not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers)
                or not isinstance(prompt, str | list) or not prompt):
            bad_rows.append(number)
            continue
        examples.append(EvalExample(to_messages(prompt), answers))
    if bad_rows:
        shown = ", ".join(map(str, bad_rows[:5])) + (f" (and {len(bad_rows) - 5} more)" if len(bad_rows) > 5 else "")
        raise UserInputError(f"{source}: evaluation rows need 'prompt' (string or chat messages) and 'answers' (a "
                             f"non-empty string or list of strings); rows {shown} (1-based) do not. Fix or drop them.")
    return examples


def eval_set_name(source: str) -> str:
    return Path(source).stem


def answer_accuracy(rollout, tokenizer, examples: list[EvalExample], accelerator: Accelerator,
                    max_prompt_length: int, sampling: SamplingConfig,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> float:
    """Accuracy over all processes: the fraction of completions that contain an answer (greedy by default; with
    `sampling.num_samples` > 1 the mean over the samples of each question, avg@n). Prompts are rendered with the
    student's `chat_template_kwargs`."""
    mine = examples[accelerator.process_index::accelerator.num_processes]
    correct = 0.0
    if mine:
        prompt_ids, _ = tokenize_chat_prompts(tokenizer, [example.prompt for example in mine], max_prompt_length,
                                              chat_template_kwargs)
        rollouts = rollout.generate(prompt_ids, sampling)
        texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        repeated = [example for example in mine for _ in range(sampling.num_samples)]
        correct = sum(any(answer.lower() in text.lower() for answer in example.answers)
                      for example, text in zip(repeated, texts, strict=True)) / sampling.num_samples
    total = torch.tensor([correct, len(mine)], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()
