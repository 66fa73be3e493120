"""SDFT rows: a student prompt plus a demonstration (or an explicit teacher prompt), all checked before any model loads.

Row numbers in error messages are 1-based, as a user sees them in an editor (see `sdft_utils.data.tables`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdft_utils.data.prompts import (
    AUTHORS_TEMPLATE,
    build_teacher_messages,
    check_teacher_template,
    to_messages,
)
from sdft_utils.data.tables import MAX_LISTED_ROWS, ROLES, Table, quote, read_table, rows_phrase
from sdft_utils.errors import UserInputError
from sdft_utils.tools.schemas import (
    is_message_list,
    normalize_message,
    normalize_tools,
    tool_calls_problem,
    tools_problem,
    trajectory_problem,
)


@dataclass
class SDFTExample:
    prompt: list[dict]  # chat messages for the student (ends with a user turn)
    teacher_prompt: list[dict]  # chat messages for the teacher
    row: int  # 0-based row index in the source
    tools: list[dict] | None = None  # the row's function schemas (`tools` column), wrapped OpenAI-style
    environment: str | None = None  # the row's `environment` (module:attribute), if any
    environment_state: Any = None  # the row's `environment_state`, handed to the environment's reset
    demonstration_messages: list[dict] | None = None  # a demonstration given as a tool trajectory


def load_sdft_dataset(
    source: str,
    *,
    prompt_column: str = "prompt",
    demonstration_column: str = "demonstration",
    teacher_prompt_column: str = "teacher_prompt",
    teacher_template: str = AUTHORS_TEMPLATE,
    split: str = "train",
    tools_column: str = "tools",
    call_format: str = "hermes",
) -> list[SDFTExample]:
    """Load `source` (see `load_rows`) and turn each row into a student prompt and a teacher prompt.

    Row contract: `prompt_column` holds a non-empty string (one user turn) or a list of chat messages
    ({"role", "content"} with roles system/user/assistant/tool, ending with a user turn; assistant messages may
    carry OpenAI-shaped `tool_calls` and then need no content). Each row then has either a demonstration that
    `teacher_template` embeds into the last user turn, or an explicit teacher prompt (string or messages) used as
    given. When a row has both, the non-null teacher prompt wins and the demonstration is ignored. A demonstration
    is a non-empty string, a non-empty list of strings (joined with newlines), or a tool trajectory: a list of
    messages starting with the assistant's first turn (calls, tool results, final answer), embedded as text by
    `sdft_utils.tools.render.demonstration_text` with the calls in `call_format` syntax.

    Tool rows may also have `tools_column` (function schemas as `apply_chat_template(tools=...)` takes them),
    `environment` (module:attribute of what executes the calls) and `environment_state` (its initial state).

    Everything is checked before returning; all problems in the dataset are reported together in one
    UserInputError, grouped by problem, with the first offending row numbers (1-based, see the module doc).
    """
    check_teacher_template(teacher_template)
    table = read_table(source, split)
    if not table.rows:
        raise UserInputError(
            f"{table.label}: holds no rows. SDFT needs rows with a '{prompt_column}' and a "
            f"'{demonstration_column}' (or '{teacher_prompt_column}'); add data or pass another file."
        )

    report = _Report(table)
    columns = list(dict.fromkeys(key for row in table.rows for key in row))
    found = ", ".join(map(repr, columns))
    has_prompt = prompt_column in columns
    has_demo = demonstration_column in columns
    has_teacher = teacher_prompt_column in columns
    if not has_prompt:
        report.column_problems.append(
            f"{table.label}: no column '{prompt_column}' (columns found: {found}). Rename the prompt column "
            f"in the data or pass its name with --prompt_column."
        )
    if not has_demo and not has_teacher:
        report.column_problems.append(
            f"{table.label}: no column '{demonstration_column}' and no column '{teacher_prompt_column}' (columns "
            f"found: {found}). Each row needs a demonstration (embedded into the teacher prompt by the template) "
            f"or an explicit teacher prompt; pass the column's name with --demonstration_column or "
            f"--teacher_prompt_column."
        )

    for index, row in enumerate(table.rows):
        if has_prompt:
            _check_prompt(report, index, prompt_column, row.get(prompt_column))
        _check_tool_columns(report, index, row, tools_column)
        teacher = row.get(teacher_prompt_column) if has_teacher else None
        demonstration = row.get(demonstration_column) if has_demo else None
        if teacher is not None:
            _check_prompt(report, index, teacher_prompt_column, teacher)
        elif demonstration is not None:
            _check_demonstration(report, index, demonstration_column, demonstration)
        elif has_demo or has_teacher:
            report.add(
                f"'{demonstration_column}' or '{teacher_prompt_column}'",
                "must hold a value in every row",
                "{have} neither (both are null or absent)",
                "Add a demonstration to those rows or drop them.",
                index,
            )
    report.raise_if_any()

    examples = []
    for index, row in enumerate(table.rows):
        prompt = to_messages(row[prompt_column])
        teacher = row.get(teacher_prompt_column) if has_teacher else None
        trajectory = None
        if teacher is not None:
            teacher_messages = to_messages(teacher)
        else:
            demonstration = row[demonstration_column]
            if is_message_list(demonstration):  # a tool trajectory, written out as text in the model's call syntax
                from sdft_utils.tools.render import demonstration_text

                trajectory = [normalize_message(message) for message in demonstration]
                demonstration = demonstration_text(trajectory, call_format)
            elif isinstance(demonstration, list):
                demonstration = "\n".join(demonstration)  # the authors join ToolAlpaca golden responses this way
            teacher_messages = build_teacher_messages(prompt, demonstration, teacher_template)
        tools = row.get(tools_column)
        examples.append(SDFTExample(prompt=prompt, teacher_prompt=teacher_messages, row=index,
                                    tools=normalize_tools(tools) if tools else None,
                                    environment=row.get("environment") or None,
                                    environment_state=row.get("environment_state"),
                                    demonstration_messages=trajectory))
    return examples


@dataclass
class _Problem:
    column: str
    expected: str  # "must be ..." clause
    predicate: str  # what the rows show, with {be}/{have}/{do} for singular/plural agreement
    fix: str
    rows: list[int] = field(default_factory=list)
    found: dict[str, None] = field(default_factory=dict)  # distinct offending values, in order of appearance


class _Report:
    """Collects problems over the whole dataset, one group per (column, kind of problem)."""

    def __init__(self, table: Table):
        self.table = table
        self.column_problems: list[str] = []
        self.problems: dict[tuple[str, str], _Problem] = {}

    def add(self, column: str, expected: str, predicate: str, fix: str, index: int, found: str | None = None):
        problem = self.problems.setdefault(
            (column, predicate), _Problem(column, expected, predicate, fix)
        )
        if not problem.rows or problem.rows[-1] != index:
            problem.rows.append(index)
        if found is not None:
            problem.found[found] = None

    def raise_if_any(self) -> None:
        messages = self.column_problems + [self._render(problem) for problem in self.problems.values()]
        if len(messages) == 1:
            raise UserInputError(messages[0])
        if messages:
            listing = "\n".join(f"  - {message}" for message in messages)
            raise UserInputError(f"{self.table.label}: {len(messages)} problems in the data:\n{listing}")

    def _render(self, problem: _Problem) -> str:
        plural = len(problem.rows) > 1
        predicate = problem.predicate.format(
            be="are" if plural else "is", have="have" if plural else "has", do="do" if plural else "does"
        )
        if problem.found:
            values = list(problem.found)
            shown = ", ".join(values[:MAX_LISTED_ROWS]) + (", ..." if len(values) > MAX_LISTED_ROWS else "")
            predicate += f" (found: {shown})"
        numbers = [self.table.number(index) for index in problem.rows]
        return (
            f"{self.table.label}: column {quote(problem.column)} {problem.expected}; "
            f"{rows_phrase(numbers, self.table.unit)} {predicate}. {problem.fix}"
        )


def _check_prompt(report: _Report, index: int, column: str, value: object) -> None:
    """A prompt (student or teacher): a non-empty string or a list of chat messages ending with a user turn."""
    expected = "must be a non-empty string or a list of chat messages"

    def add(predicate: str, fix: str, found: str | None = None) -> None:
        report.add(column, expected, predicate, fix, index, found)

    if isinstance(value, str):
        if not value.strip():
            add("{be} empty", "Fix those rows or drop them.")
        return
    if value is None:
        add("{be} empty (null)", "Fix those rows or drop them.")
        return
    if not isinstance(value, list | tuple):
        add("{have} another type", "Store the prompt as text or as a list of {\"role\", \"content\"} messages.",
            type(value).__name__)
        return
    if not value:
        add("{have} no messages (an empty list)", "Fix those rows or drop them.")
        return
    message_fix = 'Write each message as {"role": ..., "content": "..."}.'
    if not all(isinstance(message, dict) for message in value):
        bad = next(message for message in value if not isinstance(message, dict))
        add("{have} messages that are not objects", message_fix, type(bad).__name__)
        return
    # an assistant message that calls tools may have no content (OpenAI's shape)
    if not all("role" in message and ("content" in message or message.get("tool_calls")) for message in value):
        keys = next(sorted(message) for message in value if "role" not in message or "content" not in message)
        add("{have} messages without a 'role' or 'content' key", message_fix, "keys " + "/".join(keys))
        return
    for message in value:
        content = message.get("content")
        if not isinstance(content, str) and not (message.get("tool_calls") and content is None):
            add("{have} messages whose content is not a string", message_fix, type(content).__name__)
        if message["role"] not in ROLES:
            add("{have} messages with unknown roles", f"Use only the roles {', '.join(ROLES)}.",
                repr(message["role"]))
        if message.get("tool_calls") is not None:
            problem = "tool_calls on a non-assistant message" if message["role"] != "assistant" else \
                tool_calls_problem(message["tool_calls"])
            if problem:
                add("{have} invalid tool calls", 'Write each call as {"type": "function", "function": {"name": '
                    '"...", "arguments": {...}}} on an assistant message.', problem)
    if value[-1]["role"] != "user":
        add("{do} not end with a user turn", "End each prompt with the user turn the model should answer; "
            "if the last assistant turn is the expert answer, move it to the demonstration column.",
            f"last role {value[-1]['role']!r}")


def _check_demonstration(report: _Report, index: int, column: str, value: object) -> None:
    """A demonstration: a non-empty string, a non-empty list of strings (joined with newlines), or a tool
    trajectory (a list of messages that starts with an assistant turn)."""
    expected = "must be a non-empty string or a non-empty list of strings"
    if is_message_list(value):
        problem = trajectory_problem(value)
        if problem:
            report.add(column, "must be text, a list of strings, or a tool trajectory (a list of messages)",
                       "{have} a trajectory that " + problem.removeprefix("has ").removeprefix("is "),
                       "Start the trajectory with the assistant's first turn; give calls as tool_calls and their "
                       "results as tool messages.", index)
        return
    if isinstance(value, str):
        if not value.strip():
            report.add(column, expected, "{be} empty", "Fix those rows or drop them.", index)
    elif isinstance(value, list | tuple):
        if not value or all(isinstance(item, str) and not item.strip() for item in value):
            report.add(column, expected, "{have} an empty list", "Fix those rows or drop them.", index)
        elif not all(isinstance(item, str) for item in value):
            bad = next(item for item in value if not isinstance(item, str))
            report.add(column, expected, "{have} lists with non-string items",
                       "Store each demonstration as text.", index, type(bad).__name__)
    else:
        report.add(column, expected, "{have} another type", "Store each demonstration as text.",
                   index, type(value).__name__)


def _check_tool_columns(report: _Report, index: int, row: dict, tools_column: str) -> None:
    """The optional tool columns: function schemas, and an environment named module:attribute."""
    tools = row.get(tools_column)
    if tools is not None:
        problem = tools_problem(tools)
        if problem:
            report.add(tools_column, "must be a list of function schemas ({\"type\": \"function\", \"function\": "
                       "{\"name\", \"description\", \"parameters\"}})", "{have} a list that " +
                       problem.removeprefix("has ").removeprefix("is "),
                       "Give each tool a name and a JSON-schema 'parameters' object, as apply_chat_template(tools=) "
                       "takes them.", index)
    environment = row.get("environment")
    if environment is not None and (not isinstance(environment, str) or ":" not in environment):
        report.add("environment", "must be 'module:attribute' naming what executes the calls", "{have} another value",
                   "Name an importable function, list of functions or environment class.", index, repr(environment))
