"""Recipes parse into the script's arguments, and every flag is documented in the README."""

from pathlib import Path

import pytest

import train_sdft
from sdft_utils.cli import parse_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["sdft_tooluse", "sdft_science"])
def test_paper_recipes_hold_the_paper_settings(name):
    args = parse_args(train_sdft.Args, ["--config", str(ROOT / "recipes" / f"{name}.yaml")])
    train_sdft.check_args(args)
    assert args.model == "Qwen/Qwen2.5-7B-Instruct"
    assert (args.learning_rate, args.num_train_epochs, args.prompts_per_step) == (5e-5, 2.0, 32)
    assert (args.alpha, args.divergence_mode, args.num_loss_tokens_to_skip) == (0.0, "full", 3)
    assert (args.teacher_kind, args.ema_rate, args.is_cap) == ("ema", 0.01, 2.0)
    assert (args.max_prompt_length, args.max_completion_length, args.dtype) == (1024, 1024, "bfloat16")


def test_embedded_recipe_points_at_bundled_files():
    args = parse_args(train_sdft.Args, ["--config", str(train_sdft.EMBEDDED_RECIPE)])
    train_sdft.check_args(args)
    assert args.model is None  # the converted SmolLM2
    for path in [args.dataset, *args.eval_datasets]:
        assert (ROOT / path).is_file(), path


def test_defaults_are_the_authors():
    args = train_sdft.Args()
    assert (args.alpha, args.divergence_mode, args.num_loss_tokens_to_skip, args.is_cap) == (0.0, "full", 3, 2.0)
    assert (args.teacher_kind, args.ema_rate, args.num_generations, args.temperature, args.top_p) == (
        "ema", 0.01, 1, 1.0, 1.0)
    assert (args.learning_rate, args.lr_scheduler, args.warmup_ratio, args.max_grad_norm, args.weight_decay) == (
        2e-5, "cosine", 0.1, 1.0, 0.0)
    assert (args.prompts_per_step, args.max_prompt_length, args.max_completion_length) == (32, 1024, 1024)


def test_every_flag_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in train_sdft.Args.__dataclass_fields__ if f"`--{name}`" not in readme]
    assert not missing, f"flags missing from README.md: {missing}"
