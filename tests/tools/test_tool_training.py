"""End to end: two steps of each script on rows that call tools, with a real HF engine on a tiny model.

A random model rarely writes a well-formed call, so the environment (`tool_fixtures:Counter`) supplies later user
turns: every rollout has several model turns with user/tool context between them, which the loss must skip. The
masks themselves are checked token by token in test_tool_rollout.py; here the scripts must carry them through.
"""

import json
import math
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sdft_utils.testing import byte_level_tokenizer, favour_token, run_training_script, tiny_llama

FIXTURES = Path(__file__).resolve().parent
EOS = 2


@pytest.fixture(scope="module")
def short_turn_model(tmp_path_factory) -> Path:
    """Turns end after a few tokens, so a step stays cheap."""
    path = tmp_path_factory.mktemp("short_turns")
    favour_token(tiny_llama(), EOS, logit_gap=4.0).save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def fixtures_on_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FIXTURES), os.environ.get("PYTHONPATH")])))


def rows(extra: dict) -> list[dict]:
    return [{"prompt": f"Count to {n}.", "environment": "tool_fixtures:Counter",
             "environment_state": {"user_turns": ["more", "and more"]}, **extra} for n in range(4)]


def write(path: Path, data: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    return path


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def check_trained(out: Path, metrics: list[dict]) -> None:
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert math.isfinite(m["loss"]) and m["tools/turns"] >= 2  # the environment asked twice more
        assert 0 < m["tools/model_token_fraction"] < 1  # user/tool context inside the completions
    first, second = (load_file(out / f"checkpoint-{step}" / "model.safetensors") for step in (1, 2))
    assert any(not first[name].equal(second[name]) for name in first)


COMMON = ["--prompts_per_step", 2, "--per_device_batch_size", 2, "--max_completion_length", 96,
          "--max_prompt_length", 2048, "--max_steps", 2, "--save_steps", 1, "--gradient_checkpointing", "false",
          "--learning_rate", 1e-3, "--max_turns", 4]


@pytest.mark.slow
def test_sdft_trains_on_multi_turn_tool_rollouts(tmp_path, short_turn_model, fixtures_on_path):
    data = write(tmp_path / "train.jsonl", rows({"demonstration": "The counter is at 3."}))
    out = tmp_path / "out"
    run_training_script("train_sdft.py", "--model", short_turn_model, "--dataset", data, "--output_dir", out,
                        "--num_loss_tokens_to_skip", 0, "--warmup_ratio", 0, *COMMON)
    check_trained(out, metrics_of(out))


@pytest.mark.slow
def test_sdpo_trains_on_multi_turn_tool_rollouts(tmp_path, short_turn_model, fixtures_on_path):
    data = write(tmp_path / "train.jsonl", rows({"verifier": "contains", "answers": ["a", "e"]}))
    out = tmp_path / "out"
    run_training_script("train_sdpo.py", "--model", short_turn_model, "--dataset", data, "--output_dir", out,
                        "--num_generations", 2, "--top_k", 5, "--warmup_steps", 0, "--grpo_lambda", 0.5, *COMMON)
    metrics = metrics_of(out)
    check_trained(out, metrics)
    for m in metrics:
        assert 0.0 <= m["reward/mean"] <= 1.0 and 0.0 <= m["reprompt/reprompt_sample_fraction"] <= 1.0
