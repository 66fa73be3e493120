"""SDPO data: questions plus the columns their verifier reads, all checked before any model loads; greedy success rate.

A row has a prompt (string or chat messages) and, per verifier: `answer` (math: string or number; mcq: the letter,
with optional `choices`; tool: a list of {"action", "arguments"} or its JSON), or `tests` (code: a list of
{"input", "output"} or {"fn_name", "args", "output"}, with an optional `time_limit` in seconds). A `verifier`
column may name the verifier per row (mixed data sets); otherwise `--verifier` applies to every row.
Tool rows may carry `tools` (function schemas), `environment` (module:attribute) and `environment_state`; the
trajectory verifiers `bfcl_ast` and `bfcl_multi_turn` (`sdft_utils.tools.verify`) score whole tool rollouts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from sdft_utils.data.prompts import to_messages, tokenize_chat_prompts
from sdft_utils.data.tables import load_rows
from sdft_utils.errors import UserInputError
from sdft_utils.rollout.sampling import SamplingConfig
from sdft_utils.sdpo.sandbox import UNSAFE_WARNING, SandboxConfig
from sdft_utils.sdpo.verifiers import (
    REQUIRED_COLUMNS,
    VERIFIERS,
    Verdict,
    Verifier,
    verifiers_for,
    verify_code,
)
from sdft_utils.tools import verify as tool_verify
from sdft_utils.tools.schemas import message_problem, tools_problem

logger = logging.getLogger(__name__)

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
            problem = message_problem(message)  # tool calls and tool results included
            if problem:
                return problem
        if not any(message["role"] == "user" for message in value):
            return "has no user message"
        return None
    return "is not a string or a list of chat messages"


def _column_problem(verifier: str, row: dict) -> tuple[str, str] | None:
    """(column, expectation) when the row cannot be verified, else None."""
    if row.get("tools") is not None and tools_problem(row["tools"]):
        return "tools", f"a list of function schemas (it {tools_problem(row['tools'])})"
    environment = row.get("environment")
    if environment is not None and (not isinstance(environment, str) or ":" not in environment):
        return "environment", "'module:attribute' naming what executes the calls"
    if verifier in tool_verify.TRAJECTORY_VERIFIERS:
        return tool_verify.column_problem(verifier, row)
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
    elif verifier == "contains":
        answers = row.get("answers")
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
            return "answers", "a non-empty string or list of strings, one of which the answer must contain"
        row["answers"] = answers
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
        if name not in VERIFIERS and name not in tool_verify.TRAJECTORY_VERIFIERS and name != "reward_fn":
            problems.setdefault((verifier_column, f"one of {sorted(VERIFIERS) + sorted(tool_verify.TRAJECTORY_VERIFIERS)}"),
                                []).append(number)
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
        needed = ", ".join(f"{name}: {'/'.join(columns)}" for name, columns in
                           [*REQUIRED_COLUMNS.items(), *tool_verify.TRAJECTORY_COLUMNS.items()])
        raise UserInputError(f"{source}: {sum(map(len, problems.values()))} rows cannot be used:\n  "
                             + "\n  ".join(lines) + f"\nFix or drop those rows (columns per verifier: {needed}; "
                             "or pass --reward_fn module:function for your own).")
    return tasks


Scorer = Callable[[Task, str], Verdict]


def make_scorer(reward_fn: Verifier | None, sandbox: SandboxConfig | None = None, lenient: bool = False) -> Scorer:
    """(task, completion) -> Verdict, dispatching on the task's verifier; code runs under `sandbox`'s settings.
    `lenient` (the `--lenient_grading` flag, off by default) swaps the release's math and multiple-choice rules for
    the forgiving ones; it does not touch a `--reward_fn`."""
    built_in = verifiers_for(lenient)

    def score(task: Task, completion: str) -> Verdict:
        if task.verifier in tool_verify.TRAJECTORY_VERIFIERS:
            raise ValueError(f"the {task.verifier} verifier scores tool rollouts, not text: use "
                             "sdft_utils.tools.verify.score_trajectory on the rollout's trajectory")
        if task.verifier == "reward_fn":
            return reward_fn(completion, task.row)
        if task.verifier == "code":
            return verify_code(completion, task.row, sandbox)
        return built_in[task.verifier](completion, task.row)

    return score


def needs_sandbox(tasks: list[Task]) -> bool:
    """Does this run execute model-written code (so `SandboxConfig.check_isolation()` must pass before any model loads)?"""
    return any(task.verifier == "code" for task in tasks)


def score_all(tasks: list[Task], completions: list[str], score: Scorer, sandbox: SandboxConfig) -> list[Verdict]:
    """Verdicts of (task, completion) pairs, in order, with up to `sandbox.workers` code completions scored at once.

    Code completions go to a thread pool: each thread only waits on its sandboxed programs, so threads are enough.
    Every other verifier runs in this thread (math-verify's timeouts need the main thread). Under
    `--unsafe_code_execution` every call that runs code logs a warning (once per training step).
    """
    if len(tasks) != len(completions):
        raise ValueError(f"{len(tasks)} tasks but {len(completions)} completions")
    coded = [index for index, task in enumerate(tasks) if task.verifier == "code"]
    if coded and sandbox.unsafe_code_execution:
        logger.warning(UNSAFE_WARNING)
    verdicts: list[Verdict | None] = [None] * len(tasks)
    with ThreadPoolExecutor(max_workers=max(1, min(sandbox.workers, len(coded)))) as pool:
        futures = {index: pool.submit(score, tasks[index], completions[index]) for index in coded}
        for index, (task, completion) in enumerate(zip(tasks, completions, strict=True)):
            if index not in futures:
                verdicts[index] = score(task, completion)
        for index, future in futures.items():
            verdicts[index] = future.result()
    return verdicts


def is_tool_task(task: Task) -> bool:
    """Rolled out with tools (and scored on the trajectory) rather than answered in one generation."""
    return task.verifier in tool_verify.TRAJECTORY_VERIFIERS or bool(task.row.get("tools") or task.row.get("environment"))


def score_rollouts(tasks: list[Task], rollouts, tokenizer, score: Scorer, sandbox: SandboxConfig, tool_chat=None,
                   reward_fn: Verifier | None = None) -> tuple[list[str], list[Verdict]]:
    """Each rollout's text (what a reprompt shows as a sibling's solution) and its verdict. Text rollouts: the
    decoded completion, scored by the task's verifier (code under the sandbox, `--sandbox_workers` at once). Tool
    rollouts (`tool_chat` given): the trajectory written as a demonstration, scored on what happened (calls, final
    environment state), with the environment's errors as the feedback."""
    if tool_chat is None:
        texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        return texts, score_all(tasks, texts, score, sandbox)
    texts = [tool_chat.demonstration_text(trajectory.messages) for trajectory in rollouts.trajectories]
    verdicts = [tool_verify.score_trajectory(task.verifier, task.row, trajectory, reward_fn)
                for task, trajectory in zip(tasks, rollouts.trajectories, strict=True)]
    return texts, verdicts


def success_rate(rollout, tokenizer, tasks: list[Task], accelerator, max_prompt_length: int,
                 sampling: SamplingConfig, score: Scorer, threshold: float = 0.5,
                 chat_template_kwargs: Mapping[str, Any] | None = None, tool_config=None) -> float:
    """Success rate (reward >= threshold) over all processes: greedy, or the mean over `sampling.num_samples`
    completions per question (avg@n, the SDPO paper's validation: what the policy does when it samples). Prompts are
    rendered with the student's `chat_template_kwargs`. Tool tasks (rows with `tools` or a trajectory verifier) are
    rolled out with tools under `tool_config` and scored on their trajectories."""
    mine = tasks[accelerator.process_index::accelerator.num_processes]
    correct = 0
    if mine and any(is_tool_task(task) for task in mine):
        from sdft_utils.tools.config import ToolConfig

        verdicts, _ = tool_verify.run_tool_tasks(rollout, tokenizer, mine, sampling, max_prompt_length,
                                                 tool_config or ToolConfig())
        correct = sum(verdict.score >= threshold for verdict in verdicts) / sampling.num_samples
    elif mine:
        prompt_ids, _ = tokenize_chat_prompts(tokenizer, [task.prompt for task in mine], max_prompt_length,
                                              chat_template_kwargs)
        rollouts = rollout.generate(prompt_ids, sampling)
        texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        repeated = [task for task in mine for _ in range(sampling.num_samples)]
        correct = sum(score(task, text).score >= threshold for task, text in zip(repeated, texts, strict=True))
        correct /= sampling.num_samples
    total = accelerator.reduce(torch.tensor([correct, len(mine)], dtype=torch.float64, device=accelerator.device),
                               reduction="sum")
    return (total[0] / total[1]).item()
