"""Reprompts follow the release's rule: first other success as the solution, feedback only without one, else masked."""

import pytest

from sdft_utils.sdpo.reprompt import (
    FEEDBACK_TEMPLATE,
    REPROMPT_TEMPLATE,
    SOLUTION_TEMPLATE,
    RepromptConfig,
    build_reprompts,
    reprompt_messages,
    strip_thinking,
    tokenize_reprompts,
)

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
CONFIG = RepromptConfig()


def build(rewards, feedbacks=None, completions=None, config=CONFIG):
    n = len(rewards)
    completions = completions or [f"attempt {i}" for i in range(n)]
    return build_reprompts([QUESTION], completions, rewards, feedbacks or [""] * n, n, config)


def user_turn(reprompt) -> str:
    return reprompt.messages[-1]["content"]


def test_no_success_and_no_feedback_masks_every_rollout():
    reprompts, stats = build([0, 0, 0])
    assert [r.used for r in reprompts] == [False] * 3
    assert all(r.messages == QUESTION for r in reprompts)
    assert stats["reprompt_sample_fraction"] == 0 and stats["success_group_fraction"] == 0


def test_a_lone_success_teaches_the_others_but_not_itself():
    reprompts, stats = build([0, 1, 0])
    assert [r.solution for r in reprompts] == ["attempt 1", None, "attempt 1"]
    assert not reprompts[1].used
    assert stats["success_sample_fraction"] == pytest.approx(1 / 3)
    assert stats["reprompt_sample_fraction"] == pytest.approx(2 / 3)


def test_several_successes_use_the_first_other_one():
    reprompts, _ = build([1, 0, 1, 1])
    assert [r.solution for r in reprompts] == ["attempt 2", "attempt 0", "attempt 0", "attempt 0"]


def test_self_success_is_allowed_when_the_flag_is_off():
    reprompts, _ = build([0, 1], config=RepromptConfig(dont_reprompt_on_self_success=False))
    assert [r.solution for r in reprompts] == ["attempt 1", "attempt 1"]


def test_threshold_is_inclusive_at_one_half():
    reprompts, _ = build([0.5, 0.49])
    assert reprompts[1].solution == "attempt 0" and reprompts[0].solution is None


def test_feedback_is_used_only_without_a_solution():
    reprompts, stats = build([0, 0, 1], feedbacks=["error A", "", ""])
    # rollout 0 has feedback AND a solution (rollout 2): the solution wins, the feedback is dropped
    assert reprompts[0].solution == "attempt 2" and reprompts[0].feedback is None
    reprompts, stats = build([0, 0], feedbacks=["error A", ""])
    assert reprompts[0].feedback == "error A" and reprompts[0].solution is None and reprompts[0].used
    assert not reprompts[1].used
    assert stats["feedback_used_fraction"] == 0.5 and stats["feedback_available_fraction"] == 0.5


def test_feedback_with_a_solution_when_both_are_allowed():
    config = RepromptConfig(environment_feedback_only_without_solution=False)
    reprompts, _ = build([0, 1], feedbacks=["wrong: got 5", ""], config=config)
    text = user_turn(reprompts[0])
    assert "Correct solution:" in text and "wrong: got 5" in text
    assert text.index("Correct solution:") < text.index("feedback from your unsuccessful")


def test_feedback_is_ignored_when_environment_feedback_is_off():
    reprompts, _ = build([0, 0], feedbacks=["error", "error"],
                         config=RepromptConfig(include_environment_feedback=False))
    assert not any(r.used for r in reprompts)


def test_thinking_is_stripped_from_the_demonstration():
    reprompts, _ = build([0, 1], completions=["x", "<think>long musing</think>\nThe answer is 4."])
    assert reprompts[0].solution == "The answer is 4."
    kept = build([0, 1], completions=["x", "<think>m</think>4"],
                 config=RepromptConfig(remove_thinking_from_demonstration=False))[0]
    assert kept[0].solution == "<think>m</think>4"


def test_thinking_removal_is_the_release_pattern_and_trims_nothing_else():
    # r"<think>.*?</think>\s*": each block and the whitespace after it, across lines; other whitespace stays
    assert strip_thinking("  <think>a\nb</think>\n\n4 <think>c</think> end\n") == "  4 end\n"
    assert strip_thinking("no thinking here ") == "no thinking here "


def test_whitespace_only_feedback_is_no_feedback():
    reprompts, stats = build([0, 0, 0], feedbacks=["  \n\t", "", "real error"])
    assert [r.feedback for r in reprompts] == [None, None, "real error"]
    assert [r.used for r in reprompts] == [False, False, True]
    assert stats["feedback_available_fraction"] == pytest.approx(1 / 3)


def test_template_text_is_what_the_release_ran():
    # actor.yaml's `|-` block strings: no trailing newline on any of the three
    assert REPROMPT_TEMPLATE == "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
    assert SOLUTION_TEMPLATE == "\nCorrect solution:\n\n{successful_previous_attempt}"
    assert FEEDBACK_TEMPLATE == "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"


def test_template_text_and_system_messages_are_kept():
    messages = reprompt_messages(QUESTION, "The answer is 4.", None)
    assert messages[0] == QUESTION[0]
    assert messages[1] == {"role": "user", "content": "What is 2+2?\nCorrect solution:\n\nThe answer is 4.\n\n"
                                                      "Correctly solve the original question."}
    feedback = reprompt_messages(QUESTION, None, "boom")[1]["content"]
    assert feedback == ("What is 2+2?\nThe following is feedback from your unsuccessful earlier attempt:\n\nboom\n\n"
                        "Correctly solve the original question.")
    both = reprompt_messages(QUESTION, "4", "boom")[1]["content"]
    assert both == ("What is 2+2?\nCorrect solution:\n\n4\nThe following is feedback from your unsuccessful "
                    "earlier attempt:\n\nboom\n\nCorrectly solve the original question.")


def test_groups_are_independent():
    reprompts, stats = build_reprompts([QUESTION, QUESTION], ["a", "b", "c", "d"], [1, 0, 0, 0], [""] * 4, 2, CONFIG)
    assert [r.solution for r in reprompts] == [None, "a", None, None]
    assert stats["success_group_fraction"] == 0.5


def test_truncation_sides(tokenizer):
    long_solution = "step " * 60 + "so the answer is 4."
    reprompts, _ = build([0, 1], completions=["x", long_solution])
    prompts = [QUESTION, QUESTION]
    full, _ = tokenize_reprompts(tokenizer, prompts, reprompts, 10_000)
    limit = len(full[0]) - 100
    generation_prompt = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]

    right, count = tokenize_reprompts(tokenizer, prompts, reprompts, limit, "right")
    assert count == 1 and right[0] == full[0][:limit]  # the release's default cuts the generation prompt
    left, _ = tokenize_reprompts(tokenizer, prompts, reprompts, limit, "left")
    assert left[0] == full[0][-limit:]
    short, _ = tokenize_reprompts(tokenizer, prompts, reprompts, limit, "demonstration")
    text = tokenizer.decode(short[0])
    assert len(short[0]) <= limit and short[0][-len(generation_prompt):] == generation_prompt
    assert text.startswith("<|im_start|>system\nBe brief.") and "What is 2+2?" in text
    assert "so the answer is 4." in text and "Correctly solve the original question." in text
    with pytest.raises(ValueError, match="more than"):
        tokenize_reprompts(tokenizer, prompts, reprompts, limit, "error")
