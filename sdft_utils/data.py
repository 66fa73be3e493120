"""Load SDFT training data (prompt + expert demonstration per row) and check all of it before any model loads.

Row numbers in error messages are 1-based, as a user sees them in an editor: "line N" for JSON-lines files
(the physical line, blank lines included) and "row N" for everything else (the first data row is row 1; a
CSV header is not counted). `SDFTExample.row` is the 0-based index of the row in the loaded data.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdft_utils.errors import UserInputError
from sdft_utils.prompts import AUTHORS_TEMPLATE, build_teacher_messages, check_teacher_template, to_messages

FORMATS = ".jsonl, .json, .parquet or .csv file, a datasets save_to_disk folder, or a Hugging Face hub dataset id"
ROLES = ("system", "user", "assistant", "tool")
# A missing source with one of these suffixes is a mistyped path, never a hub id, so we do not ask the hub.
PATH_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst"}
MAX_LISTED_ROWS = 5


@dataclass
class _Table:
    """Rows as plain dicts plus how to name them in messages."""

    rows: list[dict]
    label: str  # the source as given, e.g. "data/train.jsonl" or "hub dataset org/name (split 'train')"
    unit: str = "row"  # "line" for JSON-lines files
    numbers: list[int] | None = None  # what the user sees for each row; None means index + 1

    def number(self, index: int) -> int:
        return self.numbers[index] if self.numbers is not None else index + 1


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Read every row of `source` as a plain dict.

    `source` is a local .jsonl file, a .json file (a list of objects, or JSON lines), a .parquet or .csv file,
    a folder written by `datasets` save_to_disk (a DatasetDict folder gives its `split`; a plain Dataset folder
    ignores `split`), another folder of data files (read by `datasets.load_dataset`), or, when no such local
    path exists, a hub dataset id loaded with `datasets.load_dataset(source, split=split)`.
    CSV cells holding a JSON list (chat messages, a list of demonstrations) are decoded; empty cells are None.
    Every problem (missing path, unparseable file, unreachable hub) raises UserInputError.
    """
    return _read_table(source, split).rows


def _read_table(source: str, split: str) -> _Table:
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(source, path, split)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows, numbers = _read_json_lines(source, _read_text(source, path))
            return _Table(rows, source, "line", numbers)
        if suffix == ".json":
            return _read_json(source, path)
        if suffix == ".parquet":
            return _Table(_read_parquet(source, path), source)
        if suffix == ".csv":
            return _Table(_read_csv(source, path), source)
        raise UserInputError(
            f"{source}: unsupported file type '{path.suffix}'. Expected a {FORMATS}. "
            "Convert the file to JSON lines (one object per line) or parquet."
        )
    if _looks_like_path(source):
        raise UserInputError(
            f"{source}: no such file or folder (relative paths start from {os.getcwd()}). "
            f"Expected a {FORMATS}. Check the path."
        )
    return _read_hub(source, split)


def _looks_like_path(source: str) -> bool:
    """True when a missing `source` cannot be a hub id ("org/name" or "name")."""
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in PATH_SUFFIXES
    )


def _read_json_lines(source: str, text: str) -> tuple[list[dict], list[int]]:
    """Parse JSON lines; blank lines are skipped but still counted, so numbers match an editor's lines."""
    rows, numbers, bad = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            bad.append((number, f"{error.msg} at column {error.colno}"))
            continue
        if not isinstance(value, dict):
            bad.append((number, f"it holds a JSON {_json_type(value)}, not an object"))
            continue
        rows.append(value)
        numbers.append(number)
    if bad:
        first_line, reason = bad[0]
        others = f" ({len(bad) - 1} more bad lines: {_number_list([n for n, _ in bad[1:]])})" if len(bad) > 1 else ""
        raise UserInputError(
            f"{source}: line {first_line} is not a valid JSON object ({reason}){others}. Each line of a "
            "JSON-lines file must hold one JSON object such as {\"prompt\": ..., \"demonstration\": ...}; "
            "fix or remove that line."
        )
    return rows, numbers


def _read_json(source: str, path: Path) -> _Table:
    """A .json file is either one JSON document (a list of objects) or JSON lines."""
    text = _read_text(source, path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):
            raise UserInputError(
                f"{source}: line {error.lineno} is not valid JSON ({error.msg} at column {error.colno}). "
                "A .json file must hold a list of objects or one object per line; fix the JSON there."
            ) from None
        rows, numbers = _read_json_lines(source, text)
        return _Table(rows, source, "line", numbers)
    if isinstance(document, dict):
        return _Table([document], source)
    if not isinstance(document, list):
        raise UserInputError(
            f"{source}: holds a JSON {_json_type(document)}; expected a list of objects (one per row) "
            "or one object per line. Rewrite the file in one of those shapes."
        )
    not_objects = [i for i, value in enumerate(document) if not isinstance(value, dict)]
    if not_objects:
        raise UserInputError(
            f"{source}: the list's items must be JSON objects, but {_rows_phrase([i + 1 for i in not_objects], 'item')} "
            f"{'is' if len(not_objects) == 1 else 'are'} not (found a {_json_type(document[not_objects[0]])}). "
            "Make every item an object such as {\"prompt\": ..., \"demonstration\": ...}."
        )
    return _Table(document, source)


def _read_text(source: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserInputError(
            f"{source}: is not UTF-8 text ({error}). Re-save the file as UTF-8."
        ) from None


def _read_parquet(source: str, path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise UserInputError(
            f"{source}: cannot be read as parquet ({error}). Check that the file is a complete parquet file."
        ) from None


def _read_csv(source: str, path: Path) -> list[dict]:
    import pandas as pd

    try:
        # Everything as text and no NA guessing: a prompt "NA" or "null" stays a string.
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        raise UserInputError(
            f"{source}: cannot be parsed as CSV ({error}). Check the quoting on that line "
            "(cells with commas or newlines must be in double quotes)."
        ) from None
    return [{key: _csv_cell(value) for key, value in record.items()} for record in frame.to_dict("records")]


def _csv_cell(value: str) -> object:
    """Empty cells are missing values; a cell holding a JSON list of objects or strings is decoded."""
    if value == "":
        return None
    if value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, list) and (
            all(isinstance(item, dict) for item in decoded) or all(isinstance(item, str) for item in decoded)
        ):
            return decoded
    return value


def _read_folder(source: str, path: Path, split: str) -> _Table:
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as error:  # datasets raises many types for a damaged folder
            raise UserInputError(
                f"{source}: looks like a save_to_disk folder but cannot be loaded ({type(error).__name__}: "
                f"{error}). Save it again with Dataset.save_to_disk."
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserInputError(
                    f"{source}: has no split '{split}' (splits found: {', '.join(map(repr, loaded))}). "
                    "Choose one of them with --dataset_split."
                )
            return _Table(loaded[split].to_list(), f"{source} (split '{split}')")
        return _Table(loaded.to_list(), source)
    # Any other folder: let datasets find data files in it (e.g. a downloaded hub snapshot).
    try:
        loaded = datasets.load_dataset(str(path), split=split)
    except Exception as error:
        raise UserInputError(
            f"{source}: is a folder but neither a save_to_disk folder nor one datasets can read "
            f"({type(error).__name__}: {error}). Expected a {FORMATS}. Pass the data file itself."
        ) from None
    return _Table(loaded.to_list(), f"{source} (split '{split}')")


def _read_hub(source: str, split: str) -> _Table:
    import datasets

    try:
        loaded = datasets.load_dataset(source, split=split)
    except ConnectionError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
        how = "unset HF_HUB_OFFLINE to download it" if offline else "check the network connection"
        raise UserInputError(
            f"{source}: does not exist locally, and the Hugging Face hub could not be reached to load it as a "
            f"dataset id ({error}). Check the local path, or {how}."
        ) from None
    except Exception as error:  # unknown repo, unknown split, gated dataset, ...
        raise UserInputError(
            f"{source}: does not exist locally, and loading it from the Hugging Face hub with split '{split}' "
            f"failed ({type(error).__name__}: {error}). Expected a {FORMATS}. Check the path or the dataset id "
            "and split."
        ) from None
    return _Table(loaded.to_list(), f"hub dataset {source} (split '{split}')")


# ---------------------------------------------------------------------------------------------------------
# SDFT examples and their validation
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SDFTExample:
    prompt: list[dict[str, str]]  # chat messages for the student (ends with a user turn)
    teacher_prompt: list[dict[str, str]]  # chat messages for the teacher
    row: int  # 0-based row index in the source


def load_sdft_dataset(
    source: str,
    *,
    prompt_column: str = "prompt",
    demonstration_column: str = "demonstration",
    teacher_prompt_column: str = "teacher_prompt",
    teacher_template: str = AUTHORS_TEMPLATE,
    split: str = "train",
) -> list[SDFTExample]:
    """Load `source` (see `load_rows`) and turn each row into a student prompt and a teacher prompt.

    Row contract: `prompt_column` holds a non-empty string (one user turn) or a list of chat messages
    ({"role", "content"} with roles system/user/assistant/tool, ending with a user turn). Each row then has
    either a demonstration (a non-empty string, or a non-empty list of strings joined with newlines) that
    `teacher_template` embeds into the last user turn, or an explicit teacher prompt (string or messages)
    used as given. When a row has both, the non-null teacher prompt wins and the demonstration is ignored.

    Everything is checked before returning; all problems in the dataset are reported together in one
    UserInputError, grouped by problem, with the first offending row numbers (1-based, see the module doc).
    """
    check_teacher_template(teacher_template)
    table = _read_table(source, split)
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
        if teacher is not None:
            teacher_messages = to_messages(teacher)
        else:
            demonstration = row[demonstration_column]
            if isinstance(demonstration, list):
                demonstration = "\n".join(demonstration)  # the authors join ToolAlpaca golden responses this way
            teacher_messages = build_teacher_messages(prompt, demonstration, teacher_template)
        examples.append(SDFTExample(prompt=prompt, teacher_prompt=teacher_messages, row=index))
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

    def __init__(self, table: _Table):
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
            f"{self.table.label}: column {_quote(problem.column)} {problem.expected}; "
            f"{_rows_phrase(numbers, self.table.unit)} {predicate}. {problem.fix}"
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
    if not all("role" in message and "content" in message for message in value):
        keys = next(sorted(message) for message in value if "role" not in message or "content" not in message)
        add("{have} messages without a 'role' or 'content' key", message_fix, "keys " + "/".join(keys))
        return
    for message in value:
        if not isinstance(message["content"], str):
            add("{have} messages whose content is not a string", message_fix, type(message["content"]).__name__)
        if message["role"] not in ROLES:
            add("{have} messages with unknown roles", f"Use only the roles {', '.join(ROLES)}.",
                repr(message["role"]))
    if value[-1]["role"] != "user":
        add("{do} not end with a user turn", "End each prompt with the user turn the model should answer; "
            "if the last assistant turn is the expert answer, move it to the demonstration column.",
            f"last role {value[-1]['role']!r}")


def _check_demonstration(report: _Report, index: int, column: str, value: object) -> None:
    """A demonstration: a non-empty string, or a non-empty list of strings (joined with newlines)."""
    expected = "must be a non-empty string or a non-empty list of strings"
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


def _rows_phrase(numbers: list[int], unit: str) -> str:
    """'rows 3, 17, 20, 21, 30 (and 2 more)' or 'row 3', from the numbers the user sees."""
    return f"{unit}{'s' if len(numbers) > 1 else ''} {_number_list(numbers)}"


def _number_list(numbers: list[int]) -> str:
    listed = ", ".join(map(str, numbers[:MAX_LISTED_ROWS]))
    extra = len(numbers) - MAX_LISTED_ROWS
    return f"{listed} (and {extra} more)" if extra > 0 else listed


def _quote(column: str) -> str:
    return column if column.startswith("'") else f"'{column}'"


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


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
