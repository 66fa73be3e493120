"""SDPO data: every row checked up front, problems named by column, rows and expectation."""

import json

import pytest

from sdft_utils.errors import UserInputError
from sdft_utils.sdpo.tasks import load_sdpo_tasks, make_scorer
from sdft_utils.sdpo.verifiers import Verdict


def write(tmp_path, rows):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_valid_rows_of_every_verifier_load(tmp_path):
    rows = [{"prompt": "1+1?", "answer": 2},
            {"prompt": "pick", "verifier": "mcq", "answer": "A", "choices": ["a", "b"]},
            {"prompt": "code", "verifier": "code", "tests": json.dumps([{"input": "", "output": "1"}])},
            {"prompt": "call", "verifier": "tool", "answer": [{"action": "f", "arguments": {}}]}]
    tasks = load_sdpo_tasks(write(tmp_path, rows))
    assert [task.verifier for task in tasks] == ["math", "mcq", "code", "tool"]
    assert tasks[2].row["tests"] == [{"input": "", "output": "1"}]
    assert make_scorer(None)(tasks[0], "it is \\boxed{2}").score == 1.0
    assert make_scorer(None)(tasks[0], "it is 2").score == 0.0  # the release's rule needs the box
    assert make_scorer(None, lenient=True)(tasks[0], "it is 2").score == 1.0
    assert make_scorer(None, lenient=True)(tasks[1], "(A)").score == 1.0
    assert make_scorer(None)(tasks[1], "(A)").score == 0.0


def test_all_problems_are_reported_together(tmp_path):
    rows = [{"prompt": "q", "answer": ""}, {"prompt": "q", "answer": None}, {"prompt": "", "answer": "1"},
            {"prompt": "q", "verifier": "mcq", "answer": "BB"}, {"prompt": "q", "verifier": "nope"},
            {"prompt": "q", "verifier": "code", "tests": [{"input": "1"}]}]
    with pytest.raises(UserInputError) as error:
        load_sdpo_tasks(write(tmp_path, rows))
    message = str(error.value)
    assert "6 rows cannot be used" in message
    assert "column 'answer': expected a non-empty string or number" in message and "rows 1, 2" in message
    assert "column 'prompt'" in message and "rows 3" in message
    assert "one letter" in message and "column 'verifier'" in message and "column 'tests'" in message
    assert "--reward_fn" in message


def test_missing_prompt_column_suggests_the_right_flag(tmp_path):
    with pytest.raises(UserInputError, match="--prompt_column question"):
        load_sdpo_tasks(write(tmp_path, [{"question": "q", "answer": "1"}]))


def test_a_reward_fn_needs_no_verifier_columns(tmp_path):
    tasks = load_sdpo_tasks(write(tmp_path, [{"prompt": "q"}]), custom_reward=True)
    assert tasks[0].verifier == "reward_fn"
    for lenient in (False, True):  # the grading rules are the built-in verifiers'; a reward_fn is used as it is
        assert make_scorer(lambda completion, row: Verdict(0.25, "mine"), lenient)(tasks[0], "x") == Verdict(0.25, "mine")


def test_success_rate_averages_sampled_completions_per_question(tokenizer):
    from accelerate import Accelerator

    from sdft_utils.rollout.hf import HFRollout
    from sdft_utils.rollout.sampling import SamplingConfig
    from sdft_utils.sdpo.tasks import Task, success_rate
    from sdft_utils.sdpo.verifiers import Verdict
    from sdft_utils.testing import tiny_llama

    tasks = [Task([{"role": "user", "content": f"q{i}"}], {"answer": str(i)}, "math") for i in range(3)]
    rollout = HFRollout(tiny_llama(), tokenizer.pad_token_id, [tokenizer.eos_token_id])
    seen = []

    def score(task, text):  # every second completion of each question succeeds
        seen.append(task.row["answer"])
        return Verdict(float(seen.count(task.row["answer"]) % 2 == 1), "")

    sampled = SamplingConfig(max_new_tokens=4, temperature=1.0, num_samples=4)
    rate = success_rate(rollout, tokenizer, tasks, Accelerator(cpu=True), 64, sampled, score)
    assert len(seen) == 12 and rate == 0.5
    seen.clear()
    greedy = SamplingConfig(max_new_tokens=4, temperature=0.0)
    assert success_rate(rollout, tokenizer, tasks, Accelerator(cpu=True), 64, greedy, score) == 1.0 and len(seen) == 3
