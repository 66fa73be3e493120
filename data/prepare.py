"""Make the data of the paper recipes: one subcommand per recipe, writing exactly the rows that recipe reads.

  python data/prepare.py sdft_tooluse         # -> data/sdft_tooluse/{train,eval}.jsonl     recipes/sdft_tooluse.yaml
  python data/prepare.py sdft_science         # -> data/sdft_science/{train,eval}.jsonl     recipes/sdft_science.yaml
  python data/prepare.py sdpo_science         # -> data/sciknoweval/chemistry/{train,test}.jsonl  recipes/sdpo_science.yaml
  python data/prepare.py sdpo_tooluse         # -> data/sdpo_tooluse/{train,test}.jsonl     (Section 3's tool-use task)
  python data/prepare.py sdpo_rich_feedback   # -> data/lcb_v6/{train,test}.jsonl           recipes/sdpo_rich_feedback.yaml

Where the data comes from, as the authors prepared it (nothing is re-generated or re-filtered here):
- SDFT (idanshen/Self-Distillation): the `datasets.save_to_disk` folders the authors commit, `data/tooluse_data` (ToolAlpaca,
  4,046 train / 97 eval) and `data/science_data` (SciKnowEval Chemistry L3 with GPT-4o demonstrations, eval 507),
  read at a pinned commit. Train rows keep the columns the recipe names (tool use: `prompt`, `golden_response`, a list
  of strings the trainer joins with newlines, as their main.py does; science: `messages` = system + user,
  `output_text`). The eval split becomes rows for `evaluate.py` (`prompt`, `answer`, `verifier`).
- SDPO (lasgroup/SDPO): the JSON splits the release commits, `datasets/sciknoweval/<subject>/{train,test}.json`
  (L3 multiple choice, 90/10 split with seed 42; chemistry 1,890 / 210) and `datasets/tooluse/{train,test}.json`,
  turned into what its `data/preprocess.py` feeds the trainer: prompt = [system, user] messages, the answer letter
  (or the expected tool calls).
- SDPO rich feedback: LiveCodeBench `livecodebench/code_generation_lite` (revision `refs/pr/6`, split `test`) from the
  Hugging Face hub, the release's `data/utils/livecodebench.py` + `data/split_tests.py` redone: the 131 problems
  with contest dates from 2025-02-01 up to (not including) 2025-05-01, its coding prompt, every private test in
  `test.jsonl` and a random half of them (numpy seed 0, per problem in order, at least one) in `train.jsonl`.
  Train and test hold the same questions, as in the paper: the held-out part is the tests, not the questions.

`--source PATH` reads files you already have instead of downloading: a clone of the authors' repository, the data
folder inside it, or the files themselves (for LiveCodeBench, a local copy of the hub rows as .jsonl/.parquet, or the
release's own `train`/`test` .json/.parquet from its preprocessing). `--source URL` downloads from another mirror of
the same layout. Every problem (no network, offline mode, a missing file or column) stops with a message, exit 2.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pickle
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python data/prepare.py` from anywhere

from sdft_utils.data.tables import load_rows  # noqa: E402
from sdft_utils.errors import UserInputError, exit_on_user_error  # noqa: E402

# The authors' repositories, at the commits these converters were written against.
SDFT_REPOSITORY = "https://raw.githubusercontent.com/idanshen/Self-Distillation/0570f07ed34f568e2662a8d5caa4624364bff62c"
SDPO_REPOSITORY = "https://raw.githubusercontent.com/lasgroup/SDPO/0e6d5106abe69f578c63bf38a9394e22905c8773"
ARROW_FILE = "data-00000-of-00001.arrow"  # the single shard save_to_disk writes for data sets this small
LCB_HUB_ID, LCB_REVISION = "livecodebench/code_generation_lite", "refs/pr/6"
LCB_FIRST_DATE, LCB_END_DATE = datetime(2025, 2, 1), datetime(2025, 5, 1)  # the release's LCB v6 window
LCB_TIME_LIMIT = 6  # seconds per test, the release's constant
LCB_TRAIN_TEST_FRACTION = 0.5
# The release's data/format/prompts.py CODE_PROMPT.
CODE_PROMPT = (
    "You are a coding expert. You will be given a coding problem, and you need to write a correct Python program that "
    "matches the specification and passes all tests. The time limit is 1 second. You may start by outlining your "
    "thought process. In the end, please provide the complete code in a code block enclosed with ``` ```.\n\n{problem}"
)
SCIKNOWEVAL_SUBJECTS = ("biology", "chemistry", "material", "physics")


@dataclass
class Output:
    """One file a converter writes, and how to check it with the loader the recipe's script uses."""

    name: str  # "train", "eval" or "test"
    rows: list[dict]


# ---------------------------------------------------------------------------------------------------- reading
def offline() -> bool:
    return any(os.environ.get(name, "0").lower() not in ("", "0", "false", "no")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _no_download(what: str, where: str, reason: str,
                 files: str = "a clone of the repository, or the folder that holds them") -> UserInputError:
    return UserInputError(
        f"cannot download {what} from {where}: {reason}. Download it on a machine with internet access and pass "
        f"the files with --source PATH ({files}), or run where the network is reachable.")


def download(builder: str, urls: dict[str, str], what: str, where: str) -> dict[str, list[dict]]:
    """Rows of each split, fetched with `datasets.load_dataset(builder, data_files=urls)`; clear errors only."""
    if offline():
        raise _no_download(what, where, "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set; unset it "
                                        "to download)")
    import datasets

    try:
        loaded = datasets.load_dataset(builder, data_files=urls)
    except Exception as error:  # connection refused, DNS, HTTP 404, ...: all end the same way for the user
        raise _no_download(what, where, f"{type(error).__name__}: {_first_line(error)}") from None
    return {split: loaded[split].to_list() for split in urls}


def download_hub(hub_id: str, revision: str, split: str, what: str) -> list[dict]:
    files = f"the .jsonl or .parquet files of {hub_id}, e.g. from `hf download --repo-type dataset`"
    if offline():
        raise _no_download(what, f"the Hugging Face hub ({hub_id})",
                           "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set; unset it to download)",
                           files)
    import datasets

    try:
        return datasets.load_dataset(hub_id, split=split, revision=revision).to_list()
    except Exception as error:
        raise _no_download(what, f"the Hugging Face hub ({hub_id}, revision {revision})",
                           f"{type(error).__name__}: {_first_line(error)}", files) from None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else "no details"


def read_local(path: Path) -> list[dict]:
    """A save_to_disk folder, or any file `load_rows` reads (.jsonl, .json, .parquet, .csv)."""
    if path.is_dir() and not (path / "state.json").is_file() and not (path / "dataset_info.json").is_file():
        raise UserInputError(f"{path}: is a folder but not a datasets save_to_disk folder (no state.json).")
    return load_rows(str(path))


def find_first(base: Path, candidates: list[str]) -> Path | None:
    for candidate in candidates:
        if (base / candidate).exists():
            return base / candidate
    return None


def local_splits(source: str, layouts: dict[str, list[str]], what: str, required: tuple[str, ...]
                 ) -> dict[str, list[dict]]:
    """Find each split of `what` under --source: `layouts` maps a split to the relative paths it may have (a clone's
    layout first, then shorter ones). A file given directly is the first required split."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserInputError(f"--source {source}: no such file or folder. Pass a clone of the repository, the folder "
                             f"that holds {what}, or leave --source out to download it.")
    if path.is_file() or (path / "state.json").is_file():
        return {required[0]: read_local(path)}
    found = {split: find_first(path, paths) for split, paths in layouts.items()}
    missing = [split for split in required if found[split] is None]
    if missing:
        tried = "; ".join(f"{split}: {', '.join(layouts[split])}" for split in missing)
        raise UserInputError(f"--source {source}: found no {'/'.join(missing)} split of {what} there (looked for "
                             f"{tried}). Point --source at the repository clone or at the folder with those files.")
    return {split: read_local(found_path) for split, found_path in found.items() if found_path is not None}


def require_columns(rows: list[dict], columns: tuple[str, ...], what: str) -> None:
    if not rows:
        raise UserInputError(f"{what}: holds no rows.")
    missing = [column for column in columns if column not in rows[0]]
    if missing:
        raise UserInputError(f"{what}: no column {', '.join(map(repr, missing))} (columns found: "
                             f"{', '.join(map(repr, rows[0]))}). This is not the expected source; see "
                             "`python data/prepare.py --help` for what each subcommand reads.")


# ---------------------------------------------------------------------------------------------------- SDFT
def read_sdft_source(source: str | None, folder: str, what: str) -> dict[str, list[dict]]:
    """The authors' `data/<folder>/{train_data,eval_data}` save_to_disk folders (eval optional for a local source)."""
    if source is None or source.startswith(("http://", "https://")):
        base = (source or SDFT_REPOSITORY).rstrip("/")
        urls = {split: f"{base}/data/{folder}/{split}_data/{ARROW_FILE}" for split in ("train", "eval")}
        return download("arrow", urls, what, base)
    layouts = {split: [f"data/{folder}/{split}_data", f"{folder}/{split}_data", f"{split}_data"]
               for split in ("train", "eval")}
    return local_splits(source, layouts, what, required=("train",))


def tool_calls(golden: list[dict] | str) -> list[dict]:
    """ToolAlpaca / release calls [{"Action", "Action_Input": JSON text}] -> [{"action", "arguments"}] for our `tool`
    verifier. An Action_Input that is not JSON counts as no arguments, as the authors' and the release's graders do."""
    calls = json.loads(golden) if isinstance(golden, str) else golden
    converted = []
    for call in calls:
        arguments = call.get("Action_Input", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {}
        converted.append({"action": call["Action"], "arguments": arguments if isinstance(arguments, dict) else {}})
    return converted


def sdft_tooluse(source: str | None) -> list[Output]:
    splits = read_sdft_source(source, "tooluse_data", "the SDFT tool-use data (ToolAlpaca)")
    require_columns(splits["train"], ("prompt", "golden_response"), "SDFT tool-use train split")
    train = [{"prompt": row["prompt"], "golden_response": list(row["golden_response"])} for row in splits["train"]]
    outputs = [Output("train", train)]
    if "eval" in splits:
        require_columns(splits["eval"], ("prompt", "golden_answer"), "SDFT tool-use eval split")
        outputs.append(Output("eval", [{"prompt": row["prompt"], "answer": tool_calls(row["golden_answer"]),
                                        "verifier": "tool"} for row in splits["eval"]]))
    return outputs


def sdft_science(source: str | None) -> list[Output]:
    splits = read_sdft_source(source, "science_data", "the SDFT science data (SciKnowEval Chemistry)")
    require_columns(splits["train"], ("messages", "output_text"), "SDFT science train split")
    train = [{"messages": _messages(row["messages"]), "output_text": row["output_text"]} for row in splits["train"]]
    outputs = [Output("train", train)]
    if "eval" in splits:
        require_columns(splits["eval"], ("prompt", "answer"), "SDFT science eval split")
        outputs.append(Output("eval", [{"prompt": _messages(row["prompt"]), "answer": row["answer"].strip(),
                                        "verifier": "mcq"} for row in splits["eval"]]))
    return outputs


def _messages(messages: list[dict]) -> list[dict]:
    return [{"role": message["role"], "content": message["content"]} for message in messages]  # fixed key order


# ---------------------------------------------------------------------------------------------------- SDPO release
def read_release_splits(source: str | None, folder: str, what: str) -> dict[str, list[dict]]:
    """The release's `datasets/<folder>/{train,test}.json` (JSON lines), or the parquet files its preprocess.py
    writes next to them."""
    if source is None or source.startswith(("http://", "https://")):
        base = (source or SDPO_REPOSITORY).rstrip("/")
        urls = {split: f"{base}/datasets/{folder}/{split}.json" for split in ("train", "test")}
        return download("json", urls, what, base)
    layouts = {split: [f"{prefix}{split}.{suffix}" for prefix in (f"datasets/{folder}/", f"{folder}/", "")
                       for suffix in ("json", "parquet")] for split in ("train", "test")}
    return local_splits(source, layouts, what, required=("train", "test"))


def release_prompt(row: dict) -> list[dict]:
    """The release's preprocess.py: [system (when given), user]. Parquet rows already hold those messages."""
    if isinstance(row["prompt"], list):
        return _messages(row["prompt"])
    system = row.get("system")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": row["prompt"]}]


def release_answer(row: dict) -> object:
    """`answer` in the JSON files, `reward_model.ground_truth` in the preprocessed parquet files."""
    return row["reward_model"]["ground_truth"] if "reward_model" in row else row["answer"]


def _require_release_columns(rows: list[dict], what: str) -> None:
    require_columns(rows, ("prompt",), what)
    if "answer" not in rows[0] and "reward_model" not in rows[0]:
        require_columns(rows, ("answer",), what)


def sdpo_science(source: str | None, subject: str = "chemistry") -> list[Output]:
    splits = read_release_splits(source, f"sciknoweval/{subject}", f"the SDPO release's SciKnowEval {subject} split")
    outputs = []
    for name in ("train", "test"):
        _require_release_columns(splits[name], f"SciKnowEval {subject} {name} split")
        outputs.append(Output(name, [{"prompt": release_prompt(row), "answer": str(release_answer(row)).strip(),
                                      "verifier": "mcq"} for row in splits[name]]))
    return outputs


def sdpo_tooluse(source: str | None) -> list[Output]:
    splits = read_release_splits(source, "tooluse", "the SDPO release's tool-use split (ToolAlpaca)")
    outputs = []
    for name in ("train", "test"):
        _require_release_columns(splits[name], f"SDPO tool-use {name} split")
        outputs.append(Output(name, [{"prompt": release_prompt(row), "answer": tool_calls(release_answer(row)),
                                      "verifier": "tool"} for row in splits[name]]))
    return outputs


# ---------------------------------------------------------------------------------------------------- LiveCodeBench
class _StringsOnly(pickle.Unpickler):
    """LiveCodeBench pickles a JSON string; refuse anything that would import or call code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test-case field")


def decode_private_tests(field: str) -> list[dict]:
    """`private_test_cases`: JSON text, or (code_generation_lite) base64 of zlib of a pickled JSON string."""
    if field.lstrip().startswith("["):
        return json.loads(field)
    import io

    text = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(field.encode())))).load()
    return json.loads(text)


def _signature(starter_code: str) -> str:
    """The release's `_parse_signature`: the first `def` line of the starter code."""
    return "def " + starter_code.split("def ")[1].split("Input\n")[0].strip()


def _contest_date(value: object) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    return datetime.fromisoformat(str(value)).replace(tzinfo=None)


def lcb_prompt(row: dict) -> str:
    """Problem (its statement already shows the public examples) + the signature for function problems, in the
    release's coding prompt; `(self, ` is dropped as its preprocess.py does, so a plain function is asked for."""
    problem = row["question_content"]
    if row.get("starter_code", "").strip():
        problem += f"\n\nYour solution should have the following signature: ```python\n{_signature(row['starter_code'])}\n```"
    return CODE_PROMPT.format(problem=problem).replace("(self, ", "(")


def lcb_tests(cases: list[dict], fn_name: str) -> list[dict]:
    """LiveCodeBench cases -> our code verifier's tests. A functional case's input holds one JSON value per line (the
    arguments) and its output one JSON value; a stdin case is compared as text."""
    tests = []
    for case in cases:
        if case.get("testtype") == "functional":
            arguments = [json.loads(line) for line in case["input"].split("\n") if line.strip()]
            tests.append({"fn_name": fn_name, "args": arguments, "output": json.loads(case["output"])})
        else:
            tests.append({"input": case["input"], "output": case["output"]})
    return tests


def half_of_the_tests(problems: list[dict], seed: int = 0) -> list[dict]:
    """The release's split_tests.py: per problem, in order, keep max(1, int(n / 2)) tests drawn without replacement
    by numpy's legacy generator seeded once with `seed`, in their original order."""
    import numpy as np

    generator = np.random.RandomState(seed)
    halves = []
    for problem in problems:
        tests = problem["tests"]
        keep = np.sort(generator.choice(len(tests), size=max(1, int(len(tests) * LCB_TRAIN_TEST_FRACTION)),
                                        replace=False))
        halves.append({**problem, "tests": [tests[index] for index in keep]})
    return halves


def _lcb_row(prompt: str, tests: list[dict], question_id: str, difficulty: str, time_limit: float) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "tests": tests, "time_limit": time_limit,
            "verifier": "code", "question_id": question_id, "difficulty": difficulty}


def lcb_problems(rows: list[dict]) -> list[dict]:
    """Hub rows -> the release's LCB v6 problems (date window, prompt, all private tests), in the source's order."""
    require_columns(rows, ("question_content", "contest_date", "starter_code", "private_test_cases", "metadata"),
                    "LiveCodeBench rows")
    problems = []
    for row in rows:
        if not LCB_FIRST_DATE <= _contest_date(row["contest_date"]) < LCB_END_DATE:
            continue
        fn_name = json.loads(row["metadata"]).get("func_name", "") if row["metadata"].strip() else ""
        tests = lcb_tests(decode_private_tests(row["private_test_cases"]), fn_name)
        problems.append(_lcb_row(lcb_prompt(row), tests, str(row.get("question_id", "")),
                                 str(row.get("difficulty", "")), LCB_TIME_LIMIT))
    if not problems:
        raise UserInputError(f"LiveCodeBench rows: none has a contest date from {LCB_FIRST_DATE:%Y-%m-%d} up to "
                             f"{LCB_END_DATE:%Y-%m-%d}, the v6 window of the paper. Pass the full code_generation_lite "
                             "test split (release_v6 or later).")
    return problems


def release_lcb_rows(rows: list[dict]) -> list[dict]:
    """The release's own LCB files (load_dataset.py / split_tests.py JSON, or preprocess.py parquet): `prompt` plus a
    `tests` JSON {"inputs", "outputs", "testtype", "fn_name", "time_limit"} (parquet: reward_model.ground_truth)."""
    converted = []
    for row in rows:
        spec = json.loads(row["reward_model"]["ground_truth"] if "reward_model" in row else row["tests"])
        cases = [{"input": i, "output": o, "testtype": spec["testtype"]}
                 for i, o in zip(spec["inputs"], spec["outputs"], strict=True)]
        prompt = row["prompt"][-1]["content"] if isinstance(row["prompt"], list) else row["prompt"]
        converted.append(_lcb_row(prompt.replace("(self, ", "("), lcb_tests(cases, spec.get("fn_name") or ""),
                                  str(row.get("idx", "")), "", float(spec.get("time_limit") or LCB_TIME_LIMIT)))
    return converted


def read_lcb_source(source: str | None) -> tuple[list[dict], list[dict] | None]:
    """(hub-shaped rows, None), or (release train rows, release test rows) for the release's own split files."""
    if source is None:
        return download_hub(LCB_HUB_ID, LCB_REVISION, "test", "LiveCodeBench (code_generation_lite)"), None
    path = Path(source).expanduser()
    if not path.exists():
        raise UserInputError(f"--source {source}: no such file or folder. Pass a local copy of "
                             f"{LCB_HUB_ID} (its .jsonl or .parquet files, or a folder of them), or the release's "
                             "datasets/lcb_v6 folder with train/test .json or .parquet.")
    if path.is_dir():
        release = {split: find_first(path, [f"{split}.json", f"{split}.parquet"]) for split in ("train", "test")}
        if all(release.values()):
            return read_local(release["train"]), read_local(release["test"])
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet"))
        if not files:
            raise UserInputError(f"--source {source}: holds no .jsonl or .parquet files and no train/test split.")
        return [row for file in files for row in load_rows(str(file))], None
    return read_local(path), None


def sdpo_rich_feedback(source: str | None) -> list[Output]:
    rows, release_test = read_lcb_source(source)
    if release_test is not None:  # the release's split already made
        return [Output("train", release_lcb_rows(rows)), Output("test", release_lcb_rows(release_test))]
    if rows and "question_content" not in rows[0] and ("tests" in rows[0] or "reward_model" in rows[0]):
        test = release_lcb_rows(rows)  # the release's lcb_v6.json before its split
    else:
        test = lcb_problems(rows)
    return [Output("train", half_of_the_tests(test)), Output("test", test)]


# ---------------------------------------------------------------------------------------------------- writing
def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Atomically: a crash leaves the old file or none, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(path.suffix + ".tmp")
    with staging.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    staging.replace(path)


def check_with_the_trainers_loaders(recipe: str, outputs: dict[str, Path]) -> None:
    """Load what was written with the loaders the training scripts and evaluate.py use: a file that passes here is
    one the recipe reads."""
    from sdft_utils.data.sdft import load_sdft_dataset
    from sdft_utils.sdpo.tasks import load_sdpo_tasks

    for name, path in outputs.items():
        if recipe.startswith("sdft") and name == "train":
            columns = {"sdft_tooluse": ("prompt", "golden_response"), "sdft_science": ("messages", "output_text")}
            prompt_column, demonstration_column = columns[recipe]
            load_sdft_dataset(str(path), prompt_column=prompt_column, demonstration_column=demonstration_column)
        else:
            load_sdpo_tasks(str(path))  # per-row `verifier` column: mcq, tool or code


@dataclass
class Recipe:
    convert: Callable[..., list[Output]]
    output_dir: str
    recipe_file: str | None
    source_help: str


RECIPES = {
    "sdft_tooluse": Recipe(sdft_tooluse, "data/sdft_tooluse", "recipes/sdft_tooluse.yaml",
                           "a clone of idanshen/Self-Distillation, its data/tooluse_data folder, or a train_data folder"),
    "sdft_science": Recipe(sdft_science, "data/sdft_science", "recipes/sdft_science.yaml",
                           "a clone of idanshen/Self-Distillation, its data/science_data folder, or a train_data folder"),
    "sdpo_science": Recipe(sdpo_science, "data/sciknoweval/{subject}", "recipes/sdpo_science.yaml",
                           "a clone of lasgroup/SDPO or the folder with train/test .json (or preprocess.py's .parquet)"),
    "sdpo_tooluse": Recipe(sdpo_tooluse, "data/sdpo_tooluse", None,
                           "a clone of lasgroup/SDPO or the folder with train/test .json (or preprocess.py's .parquet)"),
    "sdpo_rich_feedback": Recipe(sdpo_rich_feedback, "data/lcb_v6", "recipes/sdpo_rich_feedback.yaml",
                                 f"a local copy of {LCB_HUB_ID} (.jsonl/.parquet file or folder), or the release's "
                                 "datasets/lcb_v6 folder"),
}


def prepare(recipe: str, source: str | None = None, output_dir: str | None = None, subject: str = "chemistry"
            ) -> dict[str, Path]:
    """Convert, write and check one recipe's data; returns {split name: written file}."""
    spec = RECIPES[recipe]
    outputs = spec.convert(source, subject) if recipe == "sdpo_science" else spec.convert(source)
    folder = Path(output_dir or ROOT / spec.output_dir.format(subject=subject))
    written = {}
    for output in outputs:
        written[output.name] = folder / f"{output.name}.jsonl"
        write_jsonl(written[output.name], output.rows)
    check_with_the_trainers_loaders(recipe, written)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    for name, spec in RECIPES.items():
        command = commands.add_parser(name, help=f"data for {spec.recipe_file or name}")
        command.add_argument("--source", default=None, help=f"read local files instead of downloading: {spec.source_help}"
                                                            "; or a URL of a mirror with the same layout")
        command.add_argument("--output_dir", default=None, help=f"where to write (default {spec.output_dir})")
        if name == "sdpo_science":
            command.add_argument("--subject", default="chemistry", choices=SCIKNOWEVAL_SUBJECTS,
                                 help="SciKnowEval subject (the recipe trains chemistry)")
    options = parser.parse_args(argv)
    written = prepare(options.recipe, options.source, options.output_dir, getattr(options, "subject", "chemistry"))
    for name, path in written.items():
        count = sum(1 for _ in path.open(encoding="utf-8"))
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        print(f"{name}: {count} rows -> {shown}")
    recipe_file = RECIPES[options.recipe].recipe_file
    if recipe_file:  # the recipe's `dataset:` is the default output folder; another one needs --dataset
        print(f"train with: --config {recipe_file}" + (f" --dataset {written['train']}" if options.output_dir else ""))


if __name__ == "__main__":
    exit_on_user_error(main)
