"""Verifiers: score and feedback for math, multiple choice, code (in the sandbox) and tool calls."""

import json
import re

import pytest

from sdft_utils.errors import UserInputError
from sdft_utils.sdpo.verifiers import (
    FEEDBACK_CHARS,
    MATH_FORMAT_FEEDBACK,
    GradingConfig,
    Verdict,
    extract_code,
    load_reward_fn,
    quote,
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
    with pytest.raises(UserInputError, match="--reward_fn .* has no attribute 'missing'"):
        load_reward_fn(f"{path}:missing")
    with pytest.raises(UserInputError, match="--reward_fn 'nonsense': expected 'module:attribute'"):
        load_reward_fn("nonsense")
