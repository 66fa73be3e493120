"""Load SDFT training data (prompt + expert demonstration per row) and check all of it before any model loads.

Row numbers in error messages are 1-based, as a user sees them in an editor: "line N" for JSON-lines files
(the physical line, blank lines included) and "row N" for everything else (the first data row is row 1; a
CSV header is not counted). `SDFTExample.row` is the 0-based index of the row in the loaded data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sdft_utils.errors import UserInputError

FORMATS = ".jsonl, .json, .parquet or .csv file, a datasets save_to_disk folder, or a Hugging Face hub dataset id"
ROLES = ("system", "user", "assistant", "tool")
# A missing source with one of these suffixes is a mistyped path, never a hub id, so we do not ask the hub.
PATH_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst"}
MAX_LISTED_ROWS = 5


@dataclass
class Table:
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
    return read_table(source, split).rows


def read_table(source: str, split: str) -> Table:
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(source, path, split)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows, numbers = _read_json_lines(source, _read_text(source, path))
            return Table(rows, source, "line", numbers)
        if suffix == ".json":
            return _read_json(source, path)
        if suffix == ".parquet":
            return Table(_read_parquet(source, path), source)
        if suffix == ".csv":
            return Table(_read_csv(source, path), source)
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
            bad.append((number, f"it holds a JSON {json_type(value)}, not an object"))
            continue
        rows.append(value)
        numbers.append(number)
    if bad:
        first_line, reason = bad[0]
        others = f" ({len(bad) - 1} more bad lines: {number_list([n for n, _ in bad[1:]])})" if len(bad) > 1 else ""
        raise UserInputError(
            f"{source}: line {first_line} is not a valid JSON object ({reason}){others}. Each line of a "
            "JSON-lines file must hold one JSON object such as {\"prompt\": ..., \"demonstration\": ...}; "
            "fix or remove that line."
        )
    return rows, numbers


def _read_json(source: str, path: Path) -> Table:
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
        return Table(rows, source, "line", numbers)
    if isinstance(document, dict):
        return Table([document], source)
    if not isinstance(document, list):
        raise UserInputError(
            f"{source}: holds a JSON {json_type(document)}; expected a list of objects (one per row) "
            "or one object per line. Rewrite the file in one of those shapes."
        )
    not_objects = [i for i, value in enumerate(document) if not isinstance(value, dict)]
    if not_objects:
        raise UserInputError(
            f"{source}: the list's items must be JSON objects, but {rows_phrase([i + 1 for i in not_objects], 'item')} "
            f"{'is' if len(not_objects) == 1 else 'are'} not (found a {json_type(document[not_objects[0]])}). "
            "Make every item an object such as {\"prompt\": ..., \"demonstration\": ...}."
        )
    return Table(document, source)


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


def _read_folder(source: str, path: Path, split: str) -> Table:
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
            return Table(loaded[split].to_list(), f"{source} (split '{split}')")
        return Table(loaded.to_list(), source)
    # Any other folder: let datasets find data files in it (e.g. a downloaded hub snapshot).
    try:
        loaded = datasets.load_dataset(str(path), split=split)
    except Exception as error:
        raise UserInputError(
            f"{source}: is a folder but neither a save_to_disk folder nor one datasets can read "
            f"({type(error).__name__}: {error}). Expected a {FORMATS}. Pass the data file itself."
        ) from None
    return Table(loaded.to_list(), f"{source} (split '{split}')")


def _read_hub(source: str, split: str) -> Table:
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
    return Table(loaded.to_list(), f"hub dataset {source} (split '{split}')")


def rows_phrase(numbers: list[int], unit: str) -> str:
    """'rows 3, 17, 20, 21, 30 (and 2 more)' or 'row 3', from the numbers the user sees."""
    return f"{unit}{'s' if len(numbers) > 1 else ''} {number_list(numbers)}"


def number_list(numbers: list[int]) -> str:
    listed = ", ".join(map(str, numbers[:MAX_LISTED_ROWS]))
    extra = len(numbers) - MAX_LISTED_ROWS
    return f"{listed} (and {extra} more)" if extra > 0 else listed


def quote(column: str) -> str:
    return column if column.startswith("'") else f"'{column}'"


def json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), "null" if value is None else type(value).__name__)
