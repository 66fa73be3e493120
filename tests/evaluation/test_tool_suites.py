"""evaluate.py's tool suites: BFCL held-out tasks rolled out with tools and scored by the leaderboard's checkers."""

import json
from pathlib import Path

import pytest

pytest.importorskip("bfcl_eval", reason="BFCL tasks need bfcl-eval (pip install --no-deps bfcl-eval==2026.3.23)")

from sdft_utils.evaluation.report import run_benchmark  # noqa: E402
from sdft_utils.evaluation.suites import load_task_file, load_tool_suite  # noqa: E402
from sdft_utils.rollout.sampling import SamplingConfig  # noqa: E402
from sdft_utils.testing import ScriptedEngine, byte_level_tokenizer, run_training_script, save_tiny_model  # noqa: E402
from sdft_utils.tools.parsing import calls_of_message, format_calls  # noqa: E402
from sdft_utils.tools.schemas import normalize_message  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "data" / "bfcl"


@pytest.mark.parametrize("suite, file", [("bfcl_simple", "simple_heldout.jsonl"),
                                         ("bfcl_multi_turn", "multi_turn_heldout.jsonl")])
def test_the_suites_are_the_held_out_files(suite, file):
    tasks = load_tool_suite(suite)
    rows = [json.loads(line) for line in (DATA / file).read_text().splitlines()]
    assert [task.row for task in tasks] == rows  # make_data.py wrote what the suites load
    assert [task.verifier for task in load_task_file(str(DATA / file))] == [rows[0]["verifier"]] * len(rows)
    assert load_tool_suite(suite, limit=3, seed=1) == load_tool_suite(suite, limit=3, seed=1)


def test_run_benchmark_scores_tool_rollouts_with_the_ast_checker():
    tasks = load_tool_suite("bfcl_simple")[:3]
    right = [format_calls(calls_of_message(normalize_message(t.row["demonstration"][0])), "hermes") for t in tasks]
    wrong = right[1].replace('"arguments": {', '"arguments": {"unexpected": 1, ', 1)
    tokenizer = byte_level_tokenizer()
    engine = ScriptedEngine(tokenizer, [[right[0]], [wrong], [right[2]]])  # a fake engine: see its docstring
    correct, texts = run_benchmark(engine, tokenizer, tasks, SamplingConfig(max_new_tokens=300), 4096)
    assert correct == [[True], [False], [True]]
    assert "<tool_call>" in texts[0][0]


@pytest.mark.slow
def test_evaluate_runs_a_tool_suite_end_to_end(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "report"
    run_training_script("evaluate.py", "--model", model, "--tasks", "bfcl_simple", "--limit", 2,
                        "--max_new_tokens", 8, "--max_prompt_length", 1900, "--output_dir", out)
    report = json.loads((out / "report.json").read_text())
    assert report["benchmarks"]["bfcl_simple"] == {"kind": "new task", "questions": 2}
    assert report["models"]["tiny"]["benchmarks"]["bfcl_simple"]["accuracy"] == 0.0  # a random model calls nothing
    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [line["benchmark"] for line in lines] == ["bfcl_simple"] * 2
