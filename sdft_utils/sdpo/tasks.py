"""SDPO data: questions plus the columns their verifier reads, all checked before any model loads; greedy success rate.

A row has a prompt (string or chat messages) and, per verifier: `answer` (math: string or number; mcq: the letter,
with optional `choices`; tool: a list of {"action", "arguments"} or its JSON), or `tests` (code: a list of
{"input", "output"} or {"fn_name", "args", "output"}, with an optional `time_limit` in seconds). A `verifier`
column may name the verifier per row (mixed data sets); otherwise `--verifier` applies to every row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdft_utils.data.prompts import to_messages, tokenize_chat_prompts
from sdft_utils.data.tables import load_rows
from sdft_utils.errors import UserInputError
from sdft_utils.rollout.sampling import SamplingConfig
from sdft_utils.sdpo.verifiers import REQUIRED_COLUMNS, VERIFIERS, Verdict, Verifier, verifiers_for

MAX_LISTED_ROWS = 5


@dataclass
class Task:
    prompt: list[dict[str, str]]
    row: dict  # the whole row, handed to the verifier
    verifier: str  # a name in VERIFIERS, or "reward_fn"


def _prompt_problem(value: object) -> str | None:
    if isinstance(value, str):
        return None if value.strip() else "is empty"
    if isinstance(value, list) and value:
        for message in value:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) or \
                    message.get("role") not in ("system", "user", "assistant", "tool"):
                return "has a message without a valid role and string content"
        if not any(message["role"] == "user" for message in value):
            return "has no user message"
        return None
    return "is not a string or a list of chat messages"


def _column_problem(verifier: str, row: dict) -> tuple[str, str] | None:
    """(column, expectation) when the row cannot be verified, else None."""
    if verifier == "math":
        answer = row.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
            return "answer", "a non-empty string or number (the final answer)"
    elif verifier == "mcq":
        answer = row.get("answer")
        if not isinstance(answer, str) or len(answer.strip()) != 1 or not answer.strip().isalpha():
            return "answer", "one letter such as 'B'"
        choices = row.get("choices")
        if choices is not None and (not isinstance(choices, list) or ord(answer.strip().upper()) - 65 >= len(choices)):
            return "choices", "a list of options that includes the answer letter"
    elif verifier == "code":
        tests = row.get("tests")
        tests = json.loads(tests) if isinstance(tests, str) and tests.strip().startswith("[") else tests
        row["tests"] = tests
        if not isinstance(tests, list) or not tests or not all(
                isinstance(t, dict) and "output" in t and ("input" in t or "fn_name" in t) for t in tests):
            return "tests", 'a non-empty list of {"input", "output"} or {"fn_name", "args", "output"} objects'
    elif verifier == "tool":
        answer = row.get("answer")
        try:
            answer = json.loads(answer) if isinstance(answer, str) else answer
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, list) or not answer or not all(isinstance(c, dict) and "action" in c for c in answer):
            return "answer", 'a list of {"action": name, "arguments": {...}} (or its JSON text)'
    return None


def load_sdpo_tasks(source: str, prompt_column: str = "prompt", verifier: str = "math",
                    verifier_column: str = "verifier", custom_reward: bool = False, split: str = "train") -> list[Task]:
    """Every row checked at once; all problems reported together (column, rows, expectation, fix), exit 2."""
    rows = load_rows(source, split)
    if not rows:
        raise UserInputError(f"{source}: the data set is empty.")
    if prompt_column not in rows[0] and all(prompt_column not in row for row in rows):
        close = [name for name in ("prompt", "question", "problem", "messages") if name in rows[0]]
        hint = f" It has {close[0]!r}: pass --prompt_column {close[0]}." if close else \
            f" Its columns are {sorted(rows[0])}; pass the right one with --prompt_column."
        raise UserInputError(f"{source}: no column {prompt_column!r} with the questions.{hint}")
    problems: dict[tuple[str, str], list[int]] = {}
    tasks = []
    for number, row in enumerate(rows, start=1):
        name = "reward_fn" if custom_reward else str(row.get(verifier_column) or verifier)
        prompt_problem = _prompt_problem(row.get(prompt_column))
        if prompt_problem:
            problems.setdefault((prompt_column, f"a non-empty string or chat messages (it {prompt_problem})"),
                                []).append(number)
            continue
        if name not in VERIFIERS and name != "reward_fn":
            problems.setdefault((verifier_column, f"one of {sorted(VERIFIERS)}"), []).append(number)
            continue
        problem = None if name == "reward_fn" else _column_problem(name, row)
        if problem:
            problems.setdefault((problem[0], f"{problem[1]} for the {name} verifier"), []).append(number)
            continue
        tasks.append(Task(to_messages(row[prompt_column]), row, name))
    if problems:
        lines = []
        for (column, expectation), numbers in problems.items():
            shown = ", ".join(map(str, numbers[:MAX_LISTED_ROWS]))
            more = f" and {len(numbers) - MAX_LISTED_ROWS} more" if len(numbers) > MAX_LISTED_ROWS else ""
            lines.append(f"column {column!r}: expected {expectation}; rows {shown}{more} (1-based)")
        needed = ", ".join(f"{name}: {'/'.join(columns)}" for name, columns in REQUIRED_COLUMNS.items())
        raise UserInputError(f"{source}: {sum(map(len, problems.values()))} rows cannot be used:\n  "
                             + "\n  ".join(lines) + f"\nFix or drop those rows (columns per verifier: {needed}; "
                             "or pass --reward_fn module:function for your own).")
    return tasks


def make_scorer(reward_fn: Verifier | None, lenient: bool = False) -> Callable[[Task, str], Verdict]:
    """(task, completion) -> Verdict, dispatching on the task's verifier. `lenient` (the `--lenient_grading`
    flag, off by default) swaps the release's math and multiple-choice rules for the forgiving ones; it does not
    touch a `--reward_fn`."""
    built_in = verifiers_for(lenient)

    def score(task: Task, completion: str) -> Verdict:
        verify = reward_fn if task.verifier == "reward_fn" else built_in[task.verifier]
        return verify(completion, task.row)

    return score


def success_rate(rollout, tokenizer, tasks: list[Task], score: Callable[[Task, str], Verdict], accelerator,
                 max_prompt_length: int, max_new_tokens: int, threshold: float = 0.5, temperature: float = 0.0,
                 samples: int = 1) -> float:
    """Success rate (reward >= threshold) over all processes: greedy by default, or the mean over `samples`
    completions per question at `temperature` (what the policy actually does when it samples)."""
    mine = tasks[accelerator.process_index::accelerator.num_processes]
    correct = 0
    if mine:
        prompt_ids, _ = tokenize_chat_prompts(tokenizer, [task.prompt for task in mine], max_prompt_length)
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  num_samples=samples if temperature > 0 else 1)
        rollouts = rollout.generate(prompt_ids, sampling)
        texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        repeated = [task for task in mine for _ in range(sampling.num_samples)]
        correct = sum(score(task, text).score >= threshold for task, text in zip(repeated, texts, strict=True))
        correct /= sampling.num_samples
    total = accelerator.reduce(torch.tensor([correct, len(mine)], dtype=torch.float64, device=accelerator.device),
                               reduction="sum")
    return (total[0] / total[1]).item()
