import json

import pytest

from sdft_utils.data.prompts import AUTHORS_TEMPLATE
from sdft_utils.data.sdft import SDFTExample, load_sdft_dataset
from sdft_utils.data.tables import load_rows
from sdft_utils.errors import UserInputError

ROWS = [
    {"prompt": "What is 2+2?", "demonstration": "4"},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
        "demonstration": "Paris",
    },
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def load_error(path, rows=None, **kwargs) -> str:
    if rows is not None:
        write_jsonl(path, rows)
    with pytest.raises(UserInputError) as error:
        load_sdft_dataset(str(path), **kwargs)
    return str(error.value)


# --- loaders -------------------------------------------------------------------------------------------------


def test_jsonl_and_json_list_and_json_lines(tmp_path):
    assert load_rows(write_jsonl(tmp_path / "a.jsonl", ROWS)) == ROWS
    (tmp_path / "b.json").write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert load_rows(str(tmp_path / "b.json")) == ROWS
    assert load_rows(write_jsonl(tmp_path / "c.json", ROWS)) == ROWS


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "demonstration": ["a", "b"]}]), tmp_path / "d.parquet")
    assert load_rows(str(tmp_path / "d.parquet")) == [{"prompt": "p", "demonstration": ["a", "b"]}]


def test_csv_with_json_messages_cell(tmp_path):
    import pandas as pd

    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u, with a comma"}]
    frame = pd.DataFrame(
        {"prompt": [json.dumps(messages), "[1, 2] sorted?", "NA"], "demonstration": ["d", "", "x"]}
    )
    frame.to_csv(tmp_path / "e.csv", index=False)
    rows = load_rows(str(tmp_path / "e.csv"))
    assert rows == [
        {"prompt": messages, "demonstration": "d"},
        {"prompt": "[1, 2] sorted?", "demonstration": None},  # empty cell -> missing
        {"prompt": "NA", "demonstration": "x"},  # no NA guessing
    ]
    # CSV rows are numbered from the first data row, the header not counted.
    assert "row 2 has neither" in load_error(tmp_path / "e.csv")
    frame.drop(index=1).to_csv(tmp_path / "f.csv", index=False)
    examples = load_sdft_dataset(str(tmp_path / "f.csv"))
    assert examples[0].prompt == messages and examples[0].teacher_prompt[0] == messages[0]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS[:1]).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(str(tmp_path / "ds")) == ROWS[:1]
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:1]), test=datasets.Dataset.from_list([{"prompt": "t", "demonstration": "u"}])
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    assert load_rows(str(tmp_path / "dd"), split="test") == [{"prompt": "t", "demonstration": "u"}]
    with pytest.raises(UserInputError, match=r"has no split 'validation' \(splits found: 'train', 'test'\)\. Choose one of them with --dataset_split"):
        load_rows(str(tmp_path / "dd"), split="validation")


def test_missing_paths_and_unreachable_hub(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="data/train.jsonl: no such file or folder"):
        load_rows("data/train.jsonl")
    with pytest.raises(UserInputError, match="no such file or folder"):
        load_rows(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="does not exist locally, and the Hugging Face hub could not be reached"):
        load_rows("no-such-org/no-such-dataset")


def test_unparseable_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n[1]\n', encoding="utf-8")
    with pytest.raises(UserInputError) as error:
        load_rows(str(tmp_path / "bad.jsonl"))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'bad.jsonl'}: line 3 is not a valid JSON object (Expecting property")
    assert "(1 more bad lines: 4)" in message
    (tmp_path / "bad.json").write_text('[\n {"prompt": "a"},\n {"prompt" "b"}\n]', encoding="utf-8")
    with pytest.raises(UserInputError, match=r"bad.json: line 3 is not valid JSON \(Expecting ':' delimiter"):
        load_rows(str(tmp_path / "bad.json"))
    (tmp_path / "items.json").write_text('[{"prompt": "a"}, 3]', encoding="utf-8")
    with pytest.raises(UserInputError, match="items.json: the list's items must be JSON objects, but item 2 is not"):
        load_rows(str(tmp_path / "items.json"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserInputError, match="bad.parquet: cannot be read as parquet"):
        load_rows(str(tmp_path / "bad.parquet"))
    (tmp_path / "bad.txt").write_text("x", encoding="utf-8")
    with pytest.raises(UserInputError, match="unsupported file type '.txt'"):
        load_rows(str(tmp_path / "bad.txt"))


# --- SDFT examples -------------------------------------------------------------------------------------------


def test_examples_from_demonstrations(tmp_path):
    examples = load_sdft_dataset(write_jsonl(tmp_path / "train.jsonl", ROWS))
    assert examples[0] == SDFTExample(
        prompt=[{"role": "user", "content": "What is 2+2?"}],
        teacher_prompt=[{"role": "user", "content": AUTHORS_TEMPLATE.format(prompt="What is 2+2?", demonstration="4")}],
        row=0,
    )
    assert examples[1].prompt == ROWS[1]["prompt"]
    assert examples[1].teacher_prompt[0] == {"role": "system", "content": "Be brief."}
    assert examples[1].row == 1


def test_demonstration_list_is_joined_with_newlines(tmp_path):
    rows = [{"q": "Call the API", "golden": ["step one", "step two"]}]
    (example,) = load_sdft_dataset(
        write_jsonl(tmp_path / "t.jsonl", rows), prompt_column="q", demonstration_column="golden",
        teacher_template="{prompt}|{demonstration}",
    )
    assert example.teacher_prompt == [{"role": "user", "content": "Call the API|step one\nstep two"}]


def test_explicit_teacher_prompt_is_used_verbatim(tmp_path):
    messages = [{"role": "system", "content": "Expert mode"}, {"role": "user", "content": "Teacher sees this"}]
    rows = [
        {"prompt": "a", "teacher_prompt": "Teacher text", "demonstration": "ignored"},
        {"prompt": "b", "teacher_prompt": messages},
        {"prompt": "c", "teacher_prompt": None, "demonstration": "used"},
    ]
    examples = load_sdft_dataset(write_jsonl(tmp_path / "t.jsonl", rows), teacher_template="{prompt}+{demonstration}")
    assert examples[0].teacher_prompt == [{"role": "user", "content": "Teacher text"}]
    assert examples[1].teacher_prompt == messages
    assert examples[2].teacher_prompt == [{"role": "user", "content": "c+used"}]


# --- validation ----------------------------------------------------------------------------------------------


def test_empty_prompts_with_truncated_row_list(tmp_path):
    rows = [{"prompt": "" if i in (2, 16, 20, 21, 30, 31, 40) else "q", "demonstration": "d"} for i in range(45)]
    message = load_error(tmp_path / "train.jsonl", rows)
    assert message == (
        f"{tmp_path / 'train.jsonl'}: column 'prompt' must be a non-empty string or a list of chat messages; "
        "lines 3, 17, 21, 22, 31 (and 2 more) are empty. Fix those rows or drop them."
    )


def test_line_numbers_count_blank_lines_and_other_formats_use_rows(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "q", "demonstration": "d"}\n\n{"prompt": 7, "demonstration": "d"}\n', encoding="utf-8")
    assert "line 3 has another type (found: int)" in load_error(path)
    (tmp_path / "t.json").write_text(json.dumps([ROWS[0], {"prompt": 7, "demonstration": "d"}]), encoding="utf-8")
    assert "row 2 has another type (found: int)" in load_error(tmp_path / "t.json")


def test_missing_columns_list_existing_ones_and_flags(tmp_path):
    message = load_error(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}])
    assert message.startswith(f"{tmp_path / 't.jsonl'}: 2 problems in the data:\n")
    assert "no column 'prompt' (columns found: 'question', 'answer')" in message and "--prompt_column" in message
    assert "no column 'demonstration' and no column 'teacher_prompt'" in message
    assert "--demonstration_column" in message and "--teacher_prompt_column" in message
    # A renamed column is named as given.
    message = load_error(tmp_path / "t.jsonl", prompt_column="query", demonstration_column="answer")
    assert message.endswith(
        "no column 'query' (columns found: 'question', 'answer'). Rename the prompt column in the data or pass "
        "its name with --prompt_column."
    )


def test_empty_dataset(tmp_path):
    (tmp_path / "t.jsonl").write_text("\n", encoding="utf-8")
    assert "t.jsonl: holds no rows" in load_error(tmp_path / "t.jsonl")
    (tmp_path / "t.csv").write_text("prompt,demonstration\n", encoding="utf-8")
    assert "t.csv: holds no rows" in load_error(tmp_path / "t.csv")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (None, "line 2 is empty (null). Fix those rows or drop them."),
        ("  ", "line 2 is empty. Fix those rows or drop them."),
        ([], "line 2 has no messages (an empty list). Fix those rows"),
        ({"role": "user"}, "line 2 has another type (found: dict). Store the prompt as text or as a list of"),
        (["hi"], "line 2 has messages that are not objects (found: str). Write each message as"),
        ([{"role": "user", "text": "hi"}], "line 2 has messages without a 'role' or 'content' key (found: keys role/text)"),
        ([{"role": "user", "content": 3}], "line 2 has messages whose content is not a string (found: int)"),
        ([{"role": "human", "content": "hi"}, {"role": "user", "content": "?"}], "line 2 has messages with unknown roles (found: 'human'). Use only the "
         "roles system, user, assistant, tool."),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
         "line 2 does not end with a user turn (found: last role 'assistant'). End each prompt with the user turn"),
    ],
)
def test_prompt_problems(tmp_path, prompt, expected):
    message = load_error(tmp_path / "t.jsonl", [ROWS[0], {"prompt": prompt, "demonstration": "d"}])
    assert message.startswith(
        f"{tmp_path / 't.jsonl'}: column 'prompt' must be a non-empty string or a list of chat messages; "
    )
    assert expected in message


@pytest.mark.parametrize(
    ("demonstration", "expected"),
    [
        ("", "line 1 is empty"),
        ([], "line 1 has an empty list"),
        (["a", 3], "line 1 has lists with non-string items (found: int)"),
        (5, "line 1 has another type (found: int). Store each demonstration as text."),
    ],
)
def test_demonstration_problems(tmp_path, demonstration, expected):
    message = load_error(tmp_path / "t.jsonl", [{"prompt": "q", "demonstration": demonstration}])
    assert "column 'demonstration' must be a non-empty string or a non-empty list of strings; " + expected in message


def test_teacher_prompt_is_checked_like_a_prompt_and_rows_need_one_source(tmp_path):
    rows = [
        {"prompt": "q", "teacher_prompt": [{"role": "assistant", "content": "x"}]},
        {"prompt": "q", "teacher_prompt": None, "demonstration": None},
    ]
    message = load_error(tmp_path / "t.jsonl", rows)
    assert "column 'teacher_prompt' must be a non-empty string or a list of chat messages; line 1 does not end" in message
    assert (
        "column 'demonstration' or 'teacher_prompt' must hold a value in every row; line 2 has neither "
        "(both are null or absent). Add a demonstration to those rows or drop them."
    ) in message


def test_all_problems_reported_together_grouped(tmp_path):
    rows = [
        {"prompt": "", "demonstration": "d"},
        {"prompt": "q", "demonstration": ""},
        {"prompt": "", "demonstration": "d"},
        {"prompt": [{"role": "bot", "content": "x"}, {"role": "bot", "content": "y"}], "demonstration": "d"},
    ]
    message = load_error(tmp_path / "t.jsonl", rows)
    lines = message.splitlines()
    assert lines[0] == f"{tmp_path / 't.jsonl'}: 4 problems in the data:"
    assert "column 'prompt' must be a non-empty string or a list of chat messages; lines 1, 3 are empty." in lines[1]
    assert "column 'demonstration' must be a non-empty string or a non-empty list of strings; line 2 is empty." in lines[2]
    assert "line 4 has messages with unknown roles (found: 'bot')." in lines[3]  # row listed once for two messages
    assert "line 4 does not end with a user turn" in lines[4]
    assert all(line.startswith(f"  - {tmp_path / 't.jsonl'}: column ") for line in lines[1:])


def test_bad_teacher_template_argument(tmp_path):
    with pytest.raises(UserInputError, match="appears 0 times"):
        load_sdft_dataset(write_jsonl(tmp_path / "t.jsonl", ROWS), teacher_template="{prompt}")


def test_step_indices_cover_each_epoch_once_and_split_over_processes():
    from sdft_utils.data.order import process_positions, step_indices

    everything = [0, 1, 2, 3]
    stream = [i for step in range(5) for i in step_indices(step, 10, 4, seed=7, positions=everything)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    halves = [step_indices(3, 10, 4, seed=7, positions=process_positions(4, 2, rank)) for rank in (0, 1)]
    assert halves[0] + halves[1] == step_indices(3, 10, 4, seed=7, positions=everything)
    assert step_indices(3, 10, 4, 7, everything) == stream[12:16]  # a function of the step alone: resumable


def test_process_positions_give_each_process_a_share_of_every_mini_batch():
    from sdft_utils.data.order import process_positions

    assert process_positions(8, 1, 0) == list(range(8))
    assert process_positions(8, 2, 1) == [4, 5, 6, 7]
    # 2 mini-batches of 4 prompts over 2 processes: mini-batch 1 = {0,1,2,3} split as {0,1} and {2,3}
    assert process_positions(8, 2, 0, mini_batches=2) == [0, 1, 4, 5]
    assert process_positions(8, 2, 1, mini_batches=2) == [2, 3, 6, 7]
    shares = [process_positions(12, 3, rank, mini_batches=2) for rank in range(3)]
    assert sorted(p for share in shares for p in share) == list(range(12))
