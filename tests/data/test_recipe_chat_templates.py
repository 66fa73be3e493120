"""Recipes whose model has a thinking mode (Qwen3) turn it off for student and teacher, as the SDPO release does; no
other recipe sets chat-template variables."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_recipes_of_qwen3_models_turn_thinking_off_and_no_other_recipe_sets_it():
    recipes = {path.name: yaml.safe_load(path.read_text()) for path in sorted((ROOT / "recipes").glob("*.yaml"))}
    qwen3 = {name for name, recipe in recipes.items() if "qwen3" in str(recipe.get("model", "")).lower()}
    assert qwen3 == {"sdpo_rich_feedback.yaml", "sdpo_science.yaml"}
    for name, recipe in recipes.items():
        expected = {"enable_thinking": False} if name in qwen3 else None
        assert recipe.get("chat_template_kwargs") == expected, name
        assert "teacher_chat_template_kwargs" not in recipe  # the teacher follows the student, as in the release
