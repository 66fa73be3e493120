"""A quick answer-accuracy check run before and after training (held-out questions, and prior knowledge).

Each row of an evaluation file has `prompt` (a string or chat messages) and `answers` (a string or a list of
strings); a greedy completion counts as correct when it contains one of the answers, ignoring case.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdft_utils.data.prompts import to_messages
from sdft_utils.data.tables import load_rows
from sdft_utils.errors import UserInputError


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


