"""BFCL v4 from bfcl-eval: rows, executable environments, and the leaderboard's own checkers."""

import json

import pytest

pytest.importorskip("bfcl_eval", reason="BFCL tasks need bfcl-eval (pip install --no-deps bfcl-eval==2026.3.23)")

from sdft_utils.tools import bfcl  # noqa: E402
from sdft_utils.tools.config import ToolConfig  # noqa: E402
from sdft_utils.tools.parsing import ToolCall, calls_of_message, format_calls  # noqa: E402
from sdft_utils.tools.rollout import ToolPrompt, Trajectory  # noqa: E402
from sdft_utils.tools.schemas import normalize_message  # noqa: E402
from sdft_utils.tools.verify import score_trajectory  # noqa: E402


@pytest.fixture(scope="module")
def simple():
    return bfcl.simple_rows()


@pytest.fixture(scope="module")
def multi_turn():
    return {row["id"]: row for row in bfcl.multi_turn_rows()}


def trajectory_of(calls_per_turn):
    return Trajectory(calls=[[list(step) for step in turn] for turn in calls_per_turn])


def test_every_simple_python_demonstration_passes_the_ast_checker(simple):
    assert len(simple) == 400
    for row in simple:
        calls = calls_of_message(normalize_message(row["demonstration"][0]))
        assert score_trajectory("bfcl_ast", row, trajectory_of([[calls]])).score == 1.0, row["id"]


def test_the_ast_checker_rejects_wrong_calls(simple):
    row = simple[0]  # calculate_triangle_area(base=10, height=5)
    assert row["tools"][0]["function"]["parameters"]["type"] == "object"  # BFCL's "dict", as the leaderboard maps it
    assert row["tools"][0]["function"]["description"].endswith("Note that the provided function is in Python 3 syntax.")
    for calls, error in [
        ([ToolCall("calculate_triangle_area", {"base": 10, "height": 6})], "Invalid value for parameter 'height'"),
        ([ToolCall("calculate_triangle_area", {"base": "10", "height": 5})], "Incorrect type for parameter 'base'"),
        ([ToolCall("triangle_area", {"base": 10, "height": 5})], "Function name 'calculate_triangle_area' not found"),
        ([], "No function call"),
    ]:
        verdict = score_trajectory("bfcl_ast", row, trajectory_of([[calls]] if calls else [[]]))
        assert verdict.score == 0.0 and error in verdict.feedback


def test_every_multi_turn_ground_truth_passes_and_a_wrong_call_fails(multi_turn):
    assert len(multi_turn) == 200
    for row in multi_turn.values():
        turns = bfcl.ground_truth_calls(row)
        assert bfcl.check_multi_turn([[turn] if turn else [] for turn in turns], row)["valid"], row["id"]
    row = multi_turn["multi_turn_base_12"]
    turns = bfcl.ground_truth_calls(row)
    turns[0][1] = ToolCall("touch", {"file_name": "summery.txt"})
    verdict = score_trajectory("bfcl_multi_turn", row, trajectory_of([[turn] for turn in turns]))
    assert verdict.score == 0.0 and "does not match the state" in verdict.feedback
    short = score_trajectory("bfcl_multi_turn", row, trajectory_of([[turns[0]]]))
    assert short.score == 0.0 and "covered 1 of the task's 3 user turns" in short.feedback


def test_calls_reach_the_checkers_eval_only_as_literal_method_calls():
    names = {"cd", "ls"}
    assert bfcl.call_string(ToolCall("cd", {"folder": "x'); import os; ('"}), names) == \
        "cd(folder=\"x'); import os; ('\")"
    assert bfcl.call_string(ToolCall("open", {"file": "/etc/passwd"}), names) is None  # not a task function
    assert bfcl.call_string(ToolCall("cd", {"folder=__import__('os').getcwd(),x": 1}), names) is None
    assert bfcl.call_string(ToolCall("ls", {"lambda": 1}), names) is None  # a keyword is no argument name


def test_a_scripted_policy_drives_the_bfcl_environment_to_the_known_final_state(multi_turn):
    """Through the real loop (fallback rendering, hermes calls): the ground truth turn by turn, each followed by a
    short answer; the environment hands out the later user turns; the leaderboard's checker scores 1."""
    from test_tool_rollout import run

    row = multi_turn["multi_turn_base_12"]
    turns = []
    for calls in bfcl.ground_truth_calls(row):
        turns += [format_calls(calls, "hermes"), "Done."]
    prompts = [ToolPrompt.from_row(row["prompt"], row)]
    rollouts, engine, _, _ = run([turns], prompts, ToolConfig(), max_new_tokens=30000)
    trajectory = rollouts.trajectories[0]
    assert trajectory.finish_reason == "answer" and trajectory.model_turns == 6 and trajectory.errors == []
    documents = trajectory.final_state["GorillaFileSystem"]["root"].contents["Documents"].contents
    assert documents["summary.txt"].content == "quantum computing"
    assert [m["content"] for m in trajectory.messages if m["role"] == "user"] == row["environment_state"]["user_turns"]
    word_count = [m["content"] for m in trajectory.messages if m["role"] == "tool"][-1]
    assert json.loads(word_count) == {"count": 2, "type": "words"}
    assert score_trajectory("bfcl_multi_turn", row, trajectory).score == 1.0


def test_environment_errors_are_the_feedback(multi_turn):
    from test_tool_rollout import run

    row = multi_turn["multi_turn_base_12"]
    turns = ['<tool_call>{"name": "cd", "arguments": {"folder": "Docs"}}</tool_call>', "Sorry.", "Ok.", "Ok."]
    rollouts = run([turns], [ToolPrompt.from_row(row["prompt"], row)], ToolConfig(), max_new_tokens=30000)[0]
    verdict = score_trajectory("bfcl_multi_turn", row, rollouts.trajectories[0])
    assert verdict.score == 0.0
    assert verdict.feedback == "cd: cd: 'Docs': No such file or directory"  # the environment's own message


def test_the_loaders_accept_bfcl_rows(tmp_path, simple, multi_turn):
    from sdft_utils.data.sdft import load_sdft_dataset
    from sdft_utils.sdpo.tasks import load_sdpo_tasks

    path = tmp_path / "simple.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in simple[:3]))
    example = load_sdft_dataset(str(path))[0]
    assert example.tools == simple[0]["tools"] and example.demonstration_messages[0]["tool_calls"]
    assert ('<tool_call>\n{"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}\n</tool_call>'
            in example.teacher_prompt[-1]["content"])
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps(multi_turn["multi_turn_base_12"]) + "\n" + json.dumps(simple[0]) + "\n")
    tasks = load_sdpo_tasks(str(path))
    assert [task.verifier for task in tasks] == ["bfcl_multi_turn", "bfcl_ast"]
    broken = dict(multi_turn["multi_turn_base_12"], environment_state={"id": "x"})
    path.write_text(json.dumps(broken) + "\n")
    with pytest.raises(Exception, match="column 'environment_state': expected an object with id, initial_config"):
        load_sdpo_tasks(str(path))
