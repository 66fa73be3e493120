"""SDPO recipes parse into train_sdpo's arguments with the paper's settings; defaults are the release's."""

from pathlib import Path

import train_sdpo
from sdft_utils.cli import parse_args

ROOT = Path(__file__).resolve().parents[2]


def recipe(name: str) -> train_sdpo.Args:
    args = parse_args(train_sdpo.Args, ["--config", str(ROOT / "recipes" / f"{name}.yaml")])
    args.check()
    return args


def test_section_3_recipe():
    args = recipe("sdpo_science")
    assert (args.alpha, args.divergence_mode, args.top_k, args.teacher_update_rate) == (0.5, "topk", 100, 0.05)
    assert (args.learning_rate, args.mini_batches, args.prompts_per_step, args.num_generations) == (1e-5, 1, 32, 8)
    assert (args.include_environment_feedback, args.warmup_steps) == (False, 10)
    assert (args.eval_temperature, args.eval_top_p, args.eval_samples) == (0.6, 0.95, 16)  # the release's avg@16


def test_section_4_rich_feedback_recipe():
    args = recipe("sdpo_rich_feedback")
    assert (args.alpha, args.top_k, args.teacher_update_rate, args.learning_rate) == (1.0, 20, 0.01, 1e-6)
    assert args.prompts_per_step // args.mini_batches == 1  # a mini-batch of one question
    assert (args.verifier, args.include_environment_feedback, args.warmup_steps) == ("code", True, 0)
    assert (args.eval_temperature, args.eval_top_p, args.eval_samples) == (0.6, 0.95, 4)  # avg@4 in Section 4


def test_embedded_recipe_points_at_bundled_files():
    args = recipe("sdpo_embedded")
    assert args.model is None and args.grpo_lambda == 0.5  # the lambda sweep's most reliable setting
    for path in [args.dataset, *args.eval_datasets]:
        assert (ROOT / path).is_file(), path


def test_defaults_are_the_releases():
    args = train_sdpo.Args()
    assert (args.num_generations, args.prompts_per_step, args.temperature) == (8, 32, 1.0)
    assert (args.alpha, args.divergence_mode, args.top_k, args.tail_bucket) == (0.5, "topk", 100, True)
    assert (args.teacher_kind, args.teacher_update_rate, args.success_threshold) == ("ema", 0.05, 0.5)
    assert (args.is_cap, args.rollout_is_cap, args.grpo_lambda, args.mini_batches) == (2.0, 2.0, 0.0, 1)
    assert (args.dont_reprompt_on_self_success, args.remove_thinking_from_demonstration,
            args.environment_feedback_only_without_solution) == (True, True, True)
    assert (args.max_reprompt_length, args.reprompt_truncation) == (10240, "right")
    assert args.overlong_prompts == "drop"  # verl's filter_overlong_prompts, on in the release

