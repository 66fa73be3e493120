"""Recipes parse into the script's arguments, and docs/flags.md documents every flag of both scripts."""

from pathlib import Path

import pytest

import train_sdft
from sdft_utils.cli import flags_document, parse_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["sdft_tooluse", "sdft_science"])
def test_paper_recipes_hold_the_paper_settings(name):
    args = parse_args(train_sdft.Args, ["--config", str(ROOT / "recipes" / f"{name}.yaml")])
    args.check()
    assert args.model == "Qwen/Qwen2.5-7B-Instruct"
    assert (args.learning_rate, args.num_train_epochs, args.prompts_per_step) == (5e-5, 2.0, 32)
    assert (args.alpha, args.divergence_mode, args.num_loss_tokens_to_skip) == (0.0, "full", 3)
    assert (args.teacher_kind, args.teacher_update_rate, args.rollout_is_cap) == ("ema", 0.01, 2.0)
    assert (args.max_prompt_length, args.max_completion_length, args.dtype) == (1024, 1024, "mixed")


def test_embedded_recipe_points_at_bundled_files():
    args = parse_args(train_sdft.Args, ["--config", str(train_sdft.EMBEDDED_RECIPE)])
    args.check()
    assert args.model is None  # the converted SmolLM2
    for path in [args.dataset, *args.eval_datasets]:
        assert (ROOT / path).is_file(), path


def test_the_sdpo_tool_recipe_starts_from_the_sdft_tool_recipes_final_checkpoint():
    import train_sdpo

    sdft = parse_args(train_sdft.Args, ["--config", str(ROOT / "recipes" / "sdft_tools_embedded.yaml")])
    sdpo = parse_args(train_sdpo.Args, ["--config", str(ROOT / "recipes" / "sdpo_tools_simple_embedded.yaml")])
    assert sdpo.model == f"{sdft.output_dir}/checkpoint-{sdft.max_steps}"  # the checkpoint the SDFT run saves last
    assert sdpo.dataset == sdft.dataset and sdpo.max_turns == sdft.max_turns == 1
    # what made the SDFT tool recipe learn (docs/tool_use.md): the call first in the teacher's prompt, and the
    # `<tool_call>` opening inside the loss
    assert sdft.teacher_template.startswith("{demonstration}") and sdft.num_loss_tokens_to_skip == 0


def test_defaults_are_the_authors():
    args = train_sdft.Args()
    assert (args.alpha, args.divergence_mode, args.num_loss_tokens_to_skip, args.rollout_is_cap) == (0.0, "full", 3, 2.0)
    assert (args.teacher_kind, args.teacher_update_rate, args.num_generations, args.temperature, args.top_p) == (
        "ema", 0.01, 1, 1.0, 1.0)
    assert (args.learning_rate, args.lr_scheduler, args.warmup_ratio, args.max_grad_norm, args.weight_decay) == (
        2e-5, "cosine", 0.1, 1.0, 0.0)
    assert (args.prompts_per_step, args.max_prompt_length, args.max_completion_length) == (32, 1024, 1024)


def test_the_flag_reference_is_generated_from_both_scripts_and_current():
    import evaluate
    import train_sdpo

    expected = flags_document({"train_sdft.py": train_sdft.Args, "train_sdpo.py": train_sdpo.Args}, evaluate.Args)
    assert (ROOT / "docs" / "flags.md").read_text() == expected, \
        "docs/flags.md is stale: run `python -m sdft_utils.cli docs/flags.md`"
    for name in {**train_sdft.Args.__dataclass_fields__, **train_sdpo.Args.__dataclass_fields__,
                 **evaluate.Args.__dataclass_fields__}:
        assert f"| `--{name}` |" in expected


@pytest.mark.parametrize("recipe", sorted(path.name for path in (ROOT / "recipes").glob("*.yaml")))
def test_every_recipe_parses_and_passes_the_checks(recipe):
    import train_sdpo

    script = train_sdft if recipe.startswith("sdft_") else train_sdpo
    args = parse_args(script.Args, ["--config", str(ROOT / "recipes" / recipe)])
    args.check()
    if recipe.endswith("_embedded.yaml"):  # bundled data: it must be there; the paper recipes' data is prepared
        for path in [args.dataset, *args.eval_datasets]:
            assert (ROOT / path).is_file(), path
