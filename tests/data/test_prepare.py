"""data/prepare.py: each recipe's converter on a small fixture in its source's real format, offline.

Every fixture below is written from the source's published schema (each builder's docstring names where it came
from), with rows shaped like the real ones (shortened). The tests check the rows written, that the recipe's own
loader reads them with the recipe's column names, that the answers in them are what the verifiers accept, and that
a missing source or no network ends in a message with exit 2, never a traceback.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml

from sdft_utils.cli import parse_args
from sdft_utils.data.sdft import load_sdft_dataset
from sdft_utils.errors import UserInputError
from sdft_utils.sdpo.tasks import load_sdpo_tasks
from sdft_utils.sdpo.verifiers import verify_code, verify_mcq, verify_tool

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "data" / "prepare.py"


def _load_prepare():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


prepare = _load_prepare()

SYSTEM = ("\nGiven a question and four options, please select the right answer. Respond in the following format:\n"
          "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n\nFor the answer, only output the letter "
          "corresponding to the correct option (A, B, C, or D), and nothing else.\n")
TOOL_PROMPT = ("Your task is to answer the user's question using available tools. \nYou have access to the following "
               "tools:\nName: Axolotl\nDescription: Collection of axolotl pictures and facts\nDocumentation:\n"
               "getRandomAxolotlImage: Retrieve a random axolotl image.\nParameters: {}\n"
               "searchAxolotlImages: Search for axolotl images.\nParameters: {\"color\": \"string.\", \"page\": "
               "\"integer.\"}\nUse the following format:\nThought: ...\nAction: ...\nAction Input: ...\n\nBegin!\n\n"
               "Question: {question}")


# ---------------------------------------------------------------------------------------------------- fixtures
def write_sdft_tooluse_clone(root: Path) -> Path:
    """idanshen/Self-Distillation at 0570f07: `data/tooluse_data/{train_data,eval_data}`, datasets save_to_disk
    folders. Features copied from the committed `dataset_info.json` of each folder (train adds `golden_response`, a
    list of strings); rows shaped like the committed eval arrow's first row."""
    calls = datasets.List({"Action": datasets.Value("string"), "Action_Input": datasets.Value("string")})
    base = {name: datasets.Value("string") for name in ("prompt", "name", "description", "nl_documentation",
                                                        "instruction")}
    train_features = datasets.Features({**base, "golden_answer": calls,
                                        "golden_response": datasets.List(datasets.Value("string"))})
    eval_features = datasets.Features({**base, "golden_answer": calls})

    def row(question, answer):
        return {"prompt": TOOL_PROMPT.replace("{question}", question), "name": "Axolotl",
                "description": "Collection of axolotl pictures and facts", "nl_documentation": "...",
                "instruction": question, "golden_answer": answer}

    train = [
        {**row("Show me a random axolotl.", [{"Action": "getRandomAxolotlImage", "Action_Input": "{}"}]),
         "golden_response": ["Thought: I need a random image.", "Action: getRandomAxolotlImage", "Action Input: {}"]},
        {**row("Find albino axolotls, page 2.",
               [{"Action": "searchAxolotlImages", "Action_Input": "{\"color\": \"albino\", \"page\": 2}"}]),
         "golden_response": ["Thought: search by color.", "Action: searchAxolotlImages",
                             "Action Input: {\"color\": \"albino\", \"page\": 2}"]},
    ]
    evaluation = [
        row("Hey, can you show me a random picture of an axolotl?",
            [{"Action": "getRandomAxolotlImage", "Action_Input": "{}"}]),
        row("Leucistic ones, then a random one.",
            [{"Action": "searchAxolotlImages", "Action_Input": "{\"color\": \"leucistic\"}"},
             {"Action": "getRandomAxolotlImage", "Action_Input": "not json"}]),
    ]
    folder = root / "data" / "tooluse_data"
    datasets.Dataset.from_list(train, features=train_features).save_to_disk(str(folder / "train_data"))
    datasets.Dataset.from_list(evaluation, features=eval_features).save_to_disk(str(folder / "eval_data"))
    return root


def write_sdft_science_clone(root: Path) -> Path:
    """idanshen/Self-Distillation at 0570f07: `data/science_data/train_data` (features `messages`: list of
    {content, role}, `output_text`: string) and `eval_data` (`prompt`: list of {content, role}, `answer`: string),
    from the committed `dataset_info.json` files; GPT-4o demonstrations end in <answer>X</answer>."""
    message = {"content": datasets.Value("string"), "role": datasets.Value("string")}
    question = "How many atoms are there in (2S)-2-aminopentanoate?\n\nA: 63\nB: 18\nC: 58\nD: 80"
    train = [{"messages": [{"content": SYSTEM, "role": "system"}, {"content": question, "role": "user"}],
              "output_text": "<reasoning>\nC5H10NO2- has 18 atoms.\n</reasoning>\n<answer>\nB\n</answer>"}]
    evaluation = [{"prompt": [{"content": SYSTEM, "role": "system"}, {"content": question, "role": "user"}],
                   "answer": "B"}]
    folder = root / "data" / "science_data"
    datasets.Dataset.from_list(train, features=datasets.Features(
        {"messages": datasets.List(message), "output_text": datasets.Value("string")})).save_to_disk(
        str(folder / "train_data"))
    datasets.Dataset.from_list(evaluation, features=datasets.Features(
        {"prompt": datasets.List(message), "answer": datasets.Value("string")})).save_to_disk(
        str(folder / "eval_data"))
    return root


def release_row(idx: int, prompt: str, answer: str, kind: str, dataset: str, system: str | None) -> dict:
    """lasgroup/SDPO at 0e6d510, `datasets/*/{train,test}.json`: JSON lines with the columns its
    data/load_dataset.py selects (idx, kind, dataset, answer, elo, prompt, description, tests, embedding, system)."""
    return {"idx": idx, "kind": kind, "dataset": dataset, "answer": answer, "elo": 1500, "prompt": prompt,
            "description": prompt + f" The solution will be evaluated in a {kind} environment.", "tests": "-",
            "embedding": [], "system": system}


def write_sdpo_clone(root: Path) -> Path:
    """lasgroup/SDPO at 0e6d510: `datasets/sciknoweval/chemistry/{train,test}.json` (the MCQ prompt of its
    data/format/sciknoweval.py, with the system prompt) and `datasets/tooluse/{train,test}.json` (answer = JSON text
    of [{"Action", "Action_Input"}], system null)."""
    chemistry = root / "datasets" / "sciknoweval" / "chemistry"
    tooluse = root / "datasets" / "tooluse"
    chemistry.mkdir(parents=True)
    tooluse.mkdir(parents=True)
    mcq = "What is the molar weight of 'CC(=O)CN(CN)CN'?\n\nA: 171.620\nB: 191.340\nC: 131.180\nD: 153.610\n" \
          "Please reason step by step."
    splits = {"train": [release_row(608, mcq, "C", "mcq", "sciknoweval", SYSTEM),
                        release_row(743, mcq.replace("CC(=O)", "CCC"), "A", "mcq", "sciknoweval", SYSTEM)],
              "test": [release_row(1522, mcq, "C", "mcq", "sciknoweval", SYSTEM)]}
    for split, rows in splits.items():
        (chemistry / f"{split}.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    answer = json.dumps([{"Action": "searchAxolotlImages", "Action_Input": "{\"color\": \"albino\"}"}])
    for split, idx in (("train", 0), ("test", 4046)):
        row = release_row(idx, TOOL_PROMPT.replace("{question}", "Albino axolotls?"), answer, "tooluse", "tooluse",
                          None)
        (tooluse / f"{split}.json").write_text(json.dumps({**row, "tests": None}) + "\n")
    return root


def encode_private(cases: list[dict]) -> str:
    """code_generation_lite's `private_test_cases`: base64 of zlib of a pickled JSON string (LiveCodeBench's
    lcb_runner/benchmarks/code_generation.py decodes it this way, as does the SDPO release's livecodebench.py)."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def lcb_row(question_id: str, date: str, *, functional: bool, private: list[dict], encoded: bool = True) -> dict:
    """livecodebench/code_generation_lite, split `test`: question_title, question_content, platform, question_id,
    contest_id, contest_date (ISO text), starter_code, difficulty, public_test_cases (JSON text), private_test_cases,
    metadata (JSON text with func_name for LeetCode problems), as in its dataset card and lcb_runner's
    CodeGenerationProblem."""
    starter = "class Solution:\n    def addTwo(self, a: int, b: int) -> int:\n        " if functional else ""
    cases = [{**case, "testtype": "functional" if functional else "stdin"} for case in private]
    return {"question_title": f"Problem {question_id}", "question_content": f"Add the numbers ({question_id}).",
            "platform": "leetcode" if functional else "atcoder", "question_id": question_id, "contest_id": "c1",
            "contest_date": date, "starter_code": starter, "difficulty": "easy",
            "public_test_cases": json.dumps(cases[:1]),
            "private_test_cases": encode_private(cases) if encoded else json.dumps(cases),
            "metadata": json.dumps({"func_name": "addTwo"}) if functional else "{}"}


def write_lcb_rows(path: Path) -> Path:
    functional = [{"input": f"{a}\n{b}", "output": str(a + b)} for a, b in ((1, 2), (3, 4), (10, -3), (0, 0), (7, 8))]
    stdin = [{"input": f"{a} {b}\n", "output": f"{a + b}\n"} for a, b in ((1, 1), (2, 5), (9, 9))]
    rows = [lcb_row("too-early", "2025-01-31T23:00:00", functional=False, private=stdin),
            lcb_row("lc1", "2025-02-01T00:00:00", functional=True, private=functional),
            lcb_row("ac1", "2025-03-15T12:00:00", functional=False, private=stdin, encoded=False),
            lcb_row("ac2", "2025-04-30T00:00:00", functional=False, private=stdin[:1]),
            lcb_row("too-late", "2025-05-01T00:00:00", functional=True, private=functional)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def recipe_args(script: str, recipe: str, dataset: Path):
    module = __import__(script)
    return parse_args(module.Args, ["--config", str(ROOT / "recipes" / f"{recipe}.yaml"), "--dataset", str(dataset)])


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


# ---------------------------------------------------------------------------------------------------- SDFT
def test_sdft_tooluse_keeps_the_demonstrations_the_recipe_joins(tmp_path):
    written = prepare.prepare("sdft_tooluse", str(write_sdft_tooluse_clone(tmp_path / "clone")), str(tmp_path / "out"))
    train = read_jsonl(written["train"])
    assert train[0] == {"prompt": TOOL_PROMPT.replace("{question}", "Show me a random axolotl."),
                        "golden_response": ["Thought: I need a random image.", "Action: getRandomAxolotlImage",
                                            "Action Input: {}"]}
    args = recipe_args("train_sdft", "sdft_tooluse", written["train"])
    examples = load_sdft_dataset(args.dataset, prompt_column=args.prompt_column,
                                 demonstration_column=args.demonstration_column)
    assert examples[0].prompt == [{"role": "user", "content": train[0]["prompt"]}]  # no system turn, as the authors
    teacher = examples[0].teacher_prompt[-1]["content"]
    assert "\nThought: I need a random image.\nAction: getRandomAxolotlImage\nAction Input: {}\n" in teacher


def test_sdft_tooluse_eval_rows_score_the_golden_calls(tmp_path):
    written = prepare.prepare("sdft_tooluse", str(write_sdft_tooluse_clone(tmp_path / "clone")), str(tmp_path / "out"))
    evaluation = read_jsonl(written["eval"])
    assert evaluation[1]["answer"] == [{"action": "searchAxolotlImages", "arguments": {"color": "leucistic"}},
                                       {"action": "getRandomAxolotlImage", "arguments": {}}]  # not JSON: no arguments
    tasks = load_sdpo_tasks(str(written["eval"]))  # evaluate.py's loader
    golden = "Action: searchAxolotlImages\nAction Input: {\"color\": \"leucistic\"}\n" \
             "Action: getRandomAxolotlImage\nAction Input: {}"
    assert tasks[1].verifier == "tool" and verify_tool(golden, tasks[1].row).score == 1.0
    assert verify_tool("Action: getRandomAxolotlImage\nAction Input: {}", tasks[1].row).score == 0.0


def test_sdft_science_keeps_the_system_message_and_the_demonstration(tmp_path):
    written = prepare.prepare("sdft_science", str(write_sdft_science_clone(tmp_path / "clone")), str(tmp_path / "out"))
    args = recipe_args("train_sdft", "sdft_science", written["train"])
    (example,) = load_sdft_dataset(args.dataset, prompt_column=args.prompt_column,
                                   demonstration_column=args.demonstration_column)
    assert [m["role"] for m in example.prompt] == ["system", "user"]
    assert example.teacher_prompt[0] == {"role": "system", "content": SYSTEM}
    assert "<answer>\nB\n</answer>" in example.teacher_prompt[1]["content"]
    (task,) = load_sdpo_tasks(str(written["eval"]))
    assert task.verifier == "mcq" and verify_mcq("<reasoning>18</reasoning>\n<answer>\nB\n</answer>", task.row).score


def test_a_train_data_folder_alone_is_enough(tmp_path):
    clone = write_sdft_tooluse_clone(tmp_path / "clone")
    written = prepare.prepare("sdft_tooluse", str(clone / "data" / "tooluse_data" / "train_data"),
                              str(tmp_path / "out"))
    assert list(written) == ["train"] and len(read_jsonl(written["train"])) == 2


# ---------------------------------------------------------------------------------------------------- SDPO
def test_sdpo_science_rows_are_the_release_prompt_and_letter(tmp_path):
    written = prepare.prepare("sdpo_science", str(write_sdpo_clone(tmp_path / "clone")), str(tmp_path / "out"))
    train, test = read_jsonl(written["train"]), read_jsonl(written["test"])
    assert len(train) == 2 and len(test) == 1
    assert train[0]["prompt"][0] == {"role": "system", "content": SYSTEM}
    assert train[0]["prompt"][1]["content"].endswith("D: 153.610\nPlease reason step by step.")
    assert train[0]["answer"] == "C"
    args = recipe_args("train_sdpo", "sdpo_science", written["train"])
    tasks = load_sdpo_tasks(args.dataset, verifier=args.verifier)
    assert verify_mcq("<answer>\nC\n</answer>", tasks[0].row).score == 1.0
    assert verify_mcq("<answer>\nA\n</answer>", tasks[0].row).score == 0.0


def test_sdpo_science_reads_the_release_parquet_too(tmp_path):
    """The parquet files of the release's data/preprocess.py: prompt = messages, reward_model.ground_truth."""
    folder = tmp_path / "chemistry"
    folder.mkdir()
    for split in ("train", "test"):
        row = {"data_source": "sciknoweval", "ability": "mcq",
               "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Q?\n\nA: x\nB: y"}],
               "reward_model": {"style": "mcq", "ground_truth": "B"},
               "extra_info": {"split": split, "index": "3", "description": "Q?", "problem": "Q?", "elo": 1500,
                              "achievement_prior": 0}}
        datasets.Dataset.from_list([row]).to_parquet(str(folder / f"{split}.parquet"))
    written = prepare.prepare("sdpo_science", str(folder), str(tmp_path / "out"))
    assert read_jsonl(written["test"]) == [{"prompt": [{"role": "system", "content": SYSTEM},
                                                       {"role": "user", "content": "Q?\n\nA: x\nB: y"}],
                                            "answer": "B", "verifier": "mcq"}]


def test_sdpo_tooluse_turns_the_release_answer_into_calls(tmp_path):
    written = prepare.prepare("sdpo_tooluse", str(write_sdpo_clone(tmp_path / "clone")), str(tmp_path / "out"))
    (row,) = read_jsonl(written["test"])
    assert row["prompt"] == [{"role": "user", "content": TOOL_PROMPT.replace("{question}", "Albino axolotls?")}]
    assert row["answer"] == [{"action": "searchAxolotlImages", "arguments": {"color": "albino"}}]
    (task,) = load_sdpo_tasks(str(written["test"]))
    assert verify_tool("Action: searchAxolotlImages\nAction Input: {\"color\": \"albino\"}", task.row).score == 1.0


# ---------------------------------------------------------------------------------------------------- LiveCodeBench
def test_lcb_keeps_the_v6_window_and_splits_the_tests_as_the_release(tmp_path):
    written = prepare.prepare("sdpo_rich_feedback", str(write_lcb_rows(tmp_path / "lcb.jsonl")),
                              str(tmp_path / "out"))
    train, test = read_jsonl(written["train"]), read_jsonl(written["test"])
    assert [row["question_id"] for row in test] == ["lc1", "ac1", "ac2"]  # [2025-02-01, 2025-05-01), source order
    assert [row["question_id"] for row in train] == ["lc1", "ac1", "ac2"]  # same questions, fewer tests
    assert [len(row["tests"]) for row in test] == [5, 3, 1]
    assert [len(row["tests"]) for row in train] == [2, 1, 1]  # max(1, int(n / 2))
    generator = np.random.RandomState(0)  # split_tests.py: np.random.seed(0), then one draw per problem in order
    for full, half in zip(test, train, strict=True):
        n = len(full["tests"])
        keep = np.sort(generator.choice(n, size=max(1, int(n * 0.5)), replace=False))
        assert half["tests"] == [full["tests"][index] for index in keep]
    assert test[0]["tests"][2] == {"fn_name": "addTwo", "args": [10, -3], "output": 7}
    assert test[1]["tests"][0] == {"input": "1 1\n", "output": "2\n"} and test[1]["time_limit"] == 6
    prompt = test[0]["prompt"][0]["content"]
    assert prompt.startswith("You are a coding expert.") and "def addTwo(a: int, b: int) -> int:" in prompt


def test_lcb_rows_run_through_the_code_verifier(tmp_path):
    written = prepare.prepare("sdpo_rich_feedback", str(write_lcb_rows(tmp_path / "lcb.jsonl")),
                              str(tmp_path / "out"))
    args = recipe_args("train_sdpo", "sdpo_rich_feedback", written["train"])
    functional, stdin, _ = load_sdpo_tasks(args.dataset, verifier=args.verifier)
    assert verify_code("```python\ndef addTwo(a, b):\n    return a + b\n```", functional.row).score == 1.0
    assert verify_code("```python\na, b = map(int, input().split())\nprint(a + b)\n```", stdin.row).score == 1.0
    wrong = verify_code("```python\ndef addTwo(a, b):\n    return a - b\n```", functional.row)
    assert wrong.score == 0.0 and "Wrong Answer" in wrong.feedback


def test_lcb_reads_the_releases_own_split_files(tmp_path):
    """lasgroup/SDPO data/split_tests.py output: JSON lines with `prompt` (CODE_PROMPT text) and `tests`, a JSON
    string {"inputs", "outputs", "testtype", "fn_name", "time_limit"} (data/utils/livecodebench.py)."""
    folder = tmp_path / "lcb_v6"
    folder.mkdir()
    spec = {"inputs": ["1\n2", "3\n4"], "outputs": ["3", "7"], "testtype": "functional", "fn_name": "addTwo",
            "time_limit": 6}
    row = {"idx": 0, "kind": "code", "dataset": "livecodebench", "answer": "-", "elo": "-",
           "prompt": prepare.CODE_PROMPT.format(problem="Add.\n```python\ndef addTwo(self, a, b)\n```"),
           "description": "Add.", "tests": json.dumps(spec), "embedding": []}
    (folder / "test.json").write_text(json.dumps(row) + "\n")
    (folder / "train.json").write_text(json.dumps({**row, "tests": json.dumps({**spec, "inputs": ["1\n2"],
                                                                                  "outputs": ["3"]})}) + "\n")
    written = prepare.prepare("sdpo_rich_feedback", str(folder), str(tmp_path / "out"))
    (train,), (test,) = read_jsonl(written["train"]), read_jsonl(written["test"])
    assert train["tests"] == [{"fn_name": "addTwo", "args": [1, 2], "output": 3}] and len(test["tests"]) == 2
    assert "def addTwo(a, b)" in test["prompt"][0]["content"]


def test_a_pickled_object_in_the_test_field_is_refused():
    payload = base64.b64encode(zlib.compress(pickle.dumps(Path("/etc")))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        prepare.decode_private_tests(payload)


# ---------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe,command", [("sdft_tooluse", "sdft_tooluse"), ("sdft_science", "sdft_science"),
                                            ("sdpo_science", "sdpo_science"),
                                            ("sdpo_rich_feedback", "sdpo_rich_feedback")])
def test_every_recipe_names_the_command_that_writes_its_data(recipe, command):
    text = (ROOT / "recipes" / f"{recipe}.yaml").read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert f"python data/prepare.py {command}" in header
    default_dir = prepare.RECIPES[command].output_dir.format(subject="chemistry")
    config = yaml.safe_load(text)
    assert config["dataset"] == f"{default_dir}/train.jsonl"
    assert all(path.startswith(default_dir) for path in config.get("eval_datasets", []))


# ---------------------------------------------------------------------------------------------------- failures
def test_missing_source_is_a_message_not_a_traceback(tmp_path):
    result = run_cli("sdpo_science", "--source", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no such file or folder" in result.stderr and "--source" in result.stderr


def test_offline_mode_without_a_source_says_how_to_continue(tmp_path):
    result = run_cli("sdft_tooluse", "--output_dir", str(tmp_path / "out"), HF_HUB_OFFLINE="1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "offline mode is on" in result.stderr and "--source PATH" in result.stderr
    assert not (tmp_path / "out").exists()


def test_no_network_is_a_message_not_a_traceback(tmp_path):
    """A mirror URL nobody listens on (port 9 of this machine): the download fails at once, as without a network."""
    result = run_cli("sdpo_tooluse", "--source", "http://127.0.0.1:9/SDPO", "--output_dir", str(tmp_path / "out"),
                     HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot download" in result.stderr and "http://127.0.0.1:9/SDPO" in result.stderr


def test_hub_unreachable_is_a_message_not_a_traceback(tmp_path):
    result = run_cli("sdpo_rich_feedback", "--output_dir", str(tmp_path / "out"), HF_HUB_OFFLINE="0",
                     HF_DATASETS_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "livecodebench/code_generation_lite" in result.stderr and "--source" in result.stderr


def test_the_wrong_files_name_the_missing_column(tmp_path):
    clone = write_sdft_science_clone(tmp_path / "clone")
    with pytest.raises(UserInputError, match="no column 'prompt', 'golden_response'"):
        prepare.prepare("sdft_tooluse", str(clone / "data" / "science_data"), str(tmp_path / "out"))
