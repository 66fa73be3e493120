"""Verifiers: score and feedback for math, multiple choice, code (in the sandbox) and tool calls."""

import json
import re

import pytest

from sdft_utils.errors import UserInputError
from sdft_utils.sdpo.verifiers import (
    FEEDBACK_CHARS,
    Verdict,
    extract_code,
    load_reward_fn,
    quote,
    verify_code,
    verify_math,
    verify_mcq,
    verify_tool,
)


@pytest.mark.parametrize("completion, answer, score", [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("3 + 4 = 7", "7", 1.0),
    ("It is 7. No wait, 8", "7", 0.0),
    ("\\boxed{x^2+2x+1} is it", "(x+1)^2", 1.0),
    ("The total is 1,234.", "1234", 1.0),
])
def test_math_checks_the_boxed_or_last_number_with_math_verify(completion, answer, score):
    assert verify_math(completion, {"answer": answer}).score == score


def test_math_without_an_answer_gets_format_feedback():
    verdict = verify_math("I do not know", {"answer": "3"})
    assert verdict.score == 0.0 and "boxed" in verdict.feedback


def test_mcq_reads_the_answer_tag_or_the_last_choice_letter():
    row = {"answer": "B", "choices": ["x", "y", "z"]}
    assert verify_mcq("<reasoning>..</reasoning><answer>B</answer>", row).score == 1.0
    assert verify_mcq("A seems right but the answer is B", row).score == 1.0
    assert verify_mcq("The answer is C", row).score == 0.0
    assert "answer" in verify_mcq("no idea", row).feedback


SQUARE_TESTS = [{"input": "3\n", "output": "9\n"}, {"input": "12\n", "output": "144"}]


def code(body: str) -> str:
    return f"Here you go:\n```python\n{body}\n```"


def test_code_that_passes_every_test_scores_one_with_no_feedback():
    assert verify_code(code("n = int(input())\nprint(n * n)"), {"tests": SQUARE_TESTS}) == Verdict(1.0, "")


def test_code_wrong_answer_shows_input_output_expected_each_in_a_fence():
    verdict = verify_code(code("print(int(input()) * 2)"), {"tests": SQUARE_TESTS})
    assert verdict.score == 0.0 and verdict.feedback.startswith("Wrong Answer: 0/2 tests passed")
    assert "Input:\n```\n3\n```" in verdict.feedback
    assert "Output:\n```\n6\n```" in verdict.feedback and "Expected:\n```\n9\n```" in verdict.feedback


def test_code_runtime_error_names_the_line():
    verdict = verify_code(code("n = int(input())\nprint(n // 0)"), {"tests": SQUARE_TESTS})
    assert verdict.feedback.startswith("Runtime Error\n```\nZeroDivisionError")
    assert "Line 2: print(n // 0)" in verdict.feedback and "<string>" not in verdict.feedback
    assert "Last Executed Input:\n```\n3\n```" in verdict.feedback


@pytest.mark.parametrize("body, verdict_line", [
    ("while True:\n    pass", "Time Limit Exceeded"),
    ("x = bytearray(8 << 30)", "Memory Limit Exceeded"),
    ("while True:\n    print('x' * 65536)", "Output Limit Exceeded"),
])
def test_code_limits_are_reported_with_the_last_input(body, verdict_line):
    verdict = verify_code(code(body), {"tests": SQUARE_TESTS, "time_limit": 1})
    assert verdict.score == 0.0 and verdict.feedback.startswith(f"{verdict_line}\nLast Executed Input:\n```\n3")


def test_function_tests_call_the_function_or_solution_method():
    tests = [{"fn_name": "add", "args": [1, 2], "output": 3}, {"fn_name": "add", "args": [2, 2], "output": 4}]
    assert verify_code(code("def add(a, b):\n    return a + b"), {"tests": tests}).score == 1.0
    leet = "class Solution:\n    def add(self, a, b):\n        return a - b"
    verdict = verify_code(code(leet), {"tests": tests})
    assert verdict.score == 0.0 and "Expected:\n```\n3\n```" in verdict.feedback


def test_code_feedback_is_capped_and_format_errors_are_explained():
    verdict = verify_code(code("print('x' * 100000)\n1/0"), {"tests": SQUARE_TESTS})
    assert len(verdict.feedback) <= FEEDBACK_CHARS and "Output before the error:" in verdict.feedback
    assert "```python```" in verify_code("just text", {"tests": SQUARE_TESTS}).feedback
    assert extract_code("```py\na\n```\n```python\nlonger\n```") == "longer\n"


def test_a_completion_cut_off_inside_its_code_block_gets_truncation_feedback():
    """The release tells a truncated attempt apart from a format error ("response was too long")."""
    verdict = verify_code("Let me write it.\n```python\nn = int(input())\nprint(n *", {"tests": SQUARE_TESTS})
    assert verdict.score == 0.0 and verdict.feedback.startswith("Truncated Attempt")
    closed_then_cut = code("print(9)") + "\nA second version:\n```python\nprint("
    assert verify_code(closed_then_cut, {"tests": [{"input": "", "output": "9"}]}).score == 1.0
    assert verify_code("no code at all", {"tests": SQUARE_TESTS}).feedback.startswith("Incorrect Format")


@pytest.mark.parametrize("text", ["plain", "```\nfake\n```", "a ```` b\n`````", "ends with a fence\n```"])
def test_quote_fences_text_with_a_fence_nothing_inside_can_close(text):
    quoted = quote(text)
    fence = quoted.split("\n")[0]
    assert set(fence) == {"`"} and quoted == f"{fence}\n{text}\n{fence}"
    assert all(len(run) < len(fence) for run in re.findall(r"`+", text))


def test_tool_calls_must_match_names_and_arguments():
    expected = [{"action": "getWeather", "arguments": {"city": "Paris"}}]
    good = 'Thought: x\nAction: getWeather\nAction Input: {"city": "Paris"}'
    assert verify_tool(good, {"answer": expected}).score == 1.0
    assert verify_tool(good, {"answer": json.dumps(expected)}).score == 1.0
    wrong = verify_tool('Action: getWeather\nAction Input: {"city": "Rome"}', {"answer": expected})
    assert wrong.score == 0.0 and "city" in wrong.feedback and "Paris" not in wrong.feedback
    assert verify_tool("Action: getWeather\nAction Input: {bad", {"answer": expected}).score == 0.0


def test_reward_fn_plugin_from_a_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def score(completion, row):\n    return (float(row['answer'] in completion), 'say ' + row['answer'])\n")
    reward = load_reward_fn(f"{path}:score")
    assert reward("it is 42", {"answer": "42"}) == Verdict(1.0, "say 42")
    with pytest.raises(UserInputError, match="no function"):
        load_reward_fn(f"{path}:missing")
    with pytest.raises(UserInputError, match="module:function"):
        load_reward_fn("nonsense")
