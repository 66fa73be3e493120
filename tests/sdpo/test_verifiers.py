"""Verifiers: score and feedback for math, multiple choice, code (in the sandbox) and tool calls."""

import json

import pytest

from sdft_utils.errors import UserInputError
from sdft_utils.sdpo.verifiers import (
    FEEDBACK_CHARS,
    MATH_FORMAT_FEEDBACK,
    GradingConfig,
    Verdict,
    extract_code,
    load_reward_fn,
    verifiers_for,
    verify_code,
    verify_math,
    verify_math_lenient,
    verify_mcq,
    verify_mcq_lenient,
    verify_tool,
)


@pytest.mark.parametrize("completion, answer, score", [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),                 # math-verify equivalence
    ("\\boxed{x^2+2x+1} is it", "(x+1)^2", 1.0),
    ("\\boxed{7} first, then I changed my mind: \\boxed{8}", "7", 0.0),    # the last box counts
    ("3 + 4 = 7", "7", 0.0),                                              # no box: the release's format error
    ("\\boxed{7}" + " and some words" * 10, "7", 0.0),                    # the box ends 150 characters early
    ("x" * 500 + " \\boxed{7}", "7", 1.0),                                # only the final 100 characters matter
    ("\\boxed{}", "7", 0.0),
])
def test_math_reads_the_last_box_in_the_final_100_characters_like_the_release(completion, answer, score):
    assert verify_math(completion, {"answer": answer}).score == score


@pytest.mark.parametrize("completion, answer, score", [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("3 + 4 = 7", "7", 1.0),                                              # the last number
    ("It is 7. No wait, 8", "7", 0.0),
    ("\\boxed{7}" + " and some words" * 10, "7", 1.0),                    # a box anywhere
    ("The total is 1,234.", "1234", 1.0),
])
def test_lenient_math_takes_a_box_anywhere_else_the_last_number(completion, answer, score):
    assert verify_math_lenient(completion, {"answer": answer}).score == score


def test_math_without_an_answer_gets_format_feedback():
    verdict = verify_math("I do not know, maybe 3", {"answer": "3"})
    assert verdict.score == 0.0 and verdict.feedback == MATH_FORMAT_FEEDBACK
    assert "\\boxed{your_answer}" in MATH_FORMAT_FEEDBACK  # the release's wording
    assert verify_math("\\boxed{4}", {"answer": "3"}).feedback == ""  # a wrong answer gets no hint
    lenient = verify_math_lenient("I do not know", {"answer": "3"})
    assert lenient.score == 0.0 and "boxed" in lenient.feedback


@pytest.mark.parametrize("completion, score", [
    ("<reasoning>..</reasoning><answer>B</answer>", 1.0),
    ("<answer> B\n</answer>", 1.0),                      # stripped
    ("B", 1.0),                                          # no tag: the whole text, stripped, is the answer
    ("<answer>B", 1.0),                                  # unclosed: what follows the last opening tag
    ("<answer>A</answer> no: <answer>B</answer>", 1.0),  # the last tag
    ("<answer>(B)</answer>", 0.0),                       # exactly the letter, nothing around it
    ("<answer>b</answer>", 0.0),
    ("A seems right but the answer is B", 0.0),
    ("<answer>B</answer> and <answer>C</answer>", 0.0),
])
def test_mcq_is_the_text_in_the_last_answer_tag_exactly_like_the_release(completion, score):
    verdict = verify_mcq(completion, {"answer": "B", "choices": ["x", "y", "z"]})
    assert verdict == Verdict(score, "")  # the release gives no feedback


def test_lenient_mcq_reads_the_answer_tag_or_the_last_choice_letter():
    row = {"answer": "B", "choices": ["x", "y", "z"]}
    assert verify_mcq_lenient("<reasoning>..</reasoning><answer>B</answer>", row).score == 1.0
    assert verify_mcq_lenient("<answer>(B)</answer>", row).score == 1.0
    assert verify_mcq_lenient("A seems right but the answer is B", row).score == 1.0
    assert verify_mcq_lenient("The answer is C", row).score == 0.0
    assert "answer" in verify_mcq_lenient("no idea", row).feedback


def test_one_switch_chooses_the_rules_and_leaves_code_and_tools_alone():
    assert verifiers_for()["math"] is verify_math and verifiers_for(False)["mcq"] is verify_mcq
    assert verifiers_for(True)["math"] is verify_math_lenient and verifiers_for(True)["mcq"] is verify_mcq_lenient
    for name in ("code", "tool"):
        assert verifiers_for(True)[name] is verifiers_for(False)[name]
    assert GradingConfig().lenient_grading is False  # the release's rules by default


SQUARE_TESTS = [{"input": "3\n", "output": "9\n"}, {"input": "12\n", "output": "144"}]


def code(body: str) -> str:
    return f"Here you go:\n```python\n{body}\n```"


def test_code_that_passes_every_test_scores_one_with_no_feedback():
    assert verify_code(code("n = int(input())\nprint(n * n)"), {"tests": SQUARE_TESTS}) == Verdict(1.0, "")


def test_code_wrong_answer_shows_input_output_expected():
    verdict = verify_code(code("print(int(input()) * 2)"), {"tests": SQUARE_TESTS})
    assert verdict.score == 0.0
    assert "Wrong Answer" in verdict.feedback and "Input:\n3" in verdict.feedback
    assert "Output:\n6" in verdict.feedback and "Expected:\n9" in verdict.feedback


def test_code_runtime_error_names_the_line():
    verdict = verify_code(code("n = int(input())\nprint(n // 0)"), {"tests": SQUARE_TESTS})
    assert "Runtime Error" in verdict.feedback and "ZeroDivisionError" in verdict.feedback
    assert "Line 2" in verdict.feedback and "runner" not in verdict.feedback


def test_code_timeout_is_reported():
    verdict = verify_code(code("while True:\n    pass"), {"tests": SQUARE_TESTS, "time_limit": 1})
    assert verdict.score == 0.0 and verdict.feedback.startswith("Time Limit Exceeded")


def test_function_tests_call_the_function_or_solution_method():
    tests = [{"fn_name": "add", "args": [1, 2], "output": 3}, {"fn_name": "add", "args": [2, 2], "output": 4}]
    assert verify_code(code("def add(a, b):\n    return a + b"), {"tests": tests}).score == 1.0
    leet = "class Solution:\n    def add(self, a, b):\n        return a - b"
    verdict = verify_code(code(leet), {"tests": tests})
    assert verdict.score == 0.0 and "Expected:\n3" in verdict.feedback


def test_code_feedback_is_capped_and_format_errors_are_explained():
    verdict = verify_code(code("print('x' * 100000)\n1/0"), {"tests": SQUARE_TESTS})
    assert len(verdict.feedback) <= FEEDBACK_CHARS
    assert "```python```" in verify_code("just text", {"tests": SQUARE_TESTS}).feedback
    assert extract_code("```py\na\n```\n```python\nlonger\n```") == "longer\n"


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
